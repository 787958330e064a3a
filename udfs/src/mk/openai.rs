//! A generator on any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's
//! `llama-server`, Ollama): bounded concurrency, per-request timeouts, retries with
//! exponential backoff on 429/5xx/timeouts (honouring `Retry-After`). Validation, corrective
//! retries and the answer cache are [`ChatGenerator`]'s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::chat::{AnswerFormat, ChatBackend, ChatGenerator, ChatLimits};
use super::generator::{GenerationError, GenerationStats};
use super::prompts::Message;
use super::schema::MetadataSchema;

/// Where and how to call the endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmSettings {
    /// Base URL, up to and including `/v1` (e.g. `http://127.0.0.1:8080/v1`).
    pub base_url: String,
    /// Model name sent with each request.
    pub model: String,
    /// Bearer token, when the endpoint needs one.
    pub api_key: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Limit per request.
    pub timeout: Duration,
    /// Repeats of a request after a 429, 5xx, timeout or connection error.
    pub max_retries: usize,
    /// First backoff delay; doubles with each retry (capped at 30 s).
    pub retry_base: Duration,
    /// Ask for `response_format: json_object` where a JSON answer is expected.
    pub json_mode: bool,
    /// Most QA pairs kept per document.
    pub max_questions: usize,
    /// Sub-queries asked for by query rewriting.
    pub rewrite_queries: usize,
    /// The persistent answer cache (JSON Lines), if any.
    pub cache_file: Option<PathBuf>,
}

/// An OpenAI-compatible chat-completions endpoint as a [`ChatBackend`].
#[derive(Debug)]
pub struct OpenAiBackend {
    settings: LlmSettings,
    client: reqwest::Client,
    permits: Semaphore,
}

/// The Meta-Knowledge generator on an OpenAI-compatible endpoint.
pub type OpenAiGenerator = ChatGenerator<OpenAiBackend>;

/// How one request attempt ended.
enum Attempt {
    Done(String),
    Retry(String, Option<Duration>),
    Fail(String),
}

impl OpenAiGenerator {
    /// A generator for `settings`, validating metadata against `schema`.
    pub fn new(settings: LlmSettings, schema: Arc<MetadataSchema>) -> Result<Self, GenerationError> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| GenerationError::Request {
                backend: "openai".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let limits = ChatLimits {
            max_questions: settings.max_questions,
            rewrite_queries: settings.rewrite_queries,
            concurrency: settings.concurrency,
        };
        let cache_file = settings.cache_file.clone();
        let backend = OpenAiBackend {
            permits: Semaphore::new(settings.concurrency.max(1)),
            settings,
            client,
        };
        Ok(ChatGenerator::with_backend(backend, schema, limits, cache_file))
    }
}

#[async_trait]
impl ChatBackend for OpenAiBackend {
    fn name(&self) -> String {
        format!("openai:{}", self.settings.model)
    }

    async fn cache_identity(&self) -> String {
        // The request's own settings (temperature 0, the JSON mode) and where it goes.
        format!(
            "openai\nbase_url={}\nmodel={}\ntemperature=0\njson_mode={}",
            self.settings.base_url.trim_end_matches('/'),
            self.settings.model,
            self.settings.json_mode
        )
    }

    /// One chat completion, retried after 429/5xx/timeouts with exponential backoff.
    async fn complete(
        &self,
        messages: &[Message],
        format: &AnswerFormat,
        stats: &GenerationStats,
    ) -> Result<String, GenerationError> {
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "temperature": 0,
        });
        if matches!(format, AnswerFormat::Json { .. }) && self.settings.json_mode {
            body["response_format"] = json!({"type": "json_object"});
        }
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let url = format!("{}/chat/completions", self.settings.base_url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            GenerationStats::bump(&stats.requests);
            match self.attempt(&url, &body, stats).await {
                Attempt::Done(content) => return Ok(content),
                Attempt::Fail(message) => return Err(self.request_error(message)),
                Attempt::Retry(message, retry_after) => {
                    if attempt >= self.settings.max_retries {
                        return Err(self.request_error(format!("{message} (gave up after {} attempts)", attempt + 1)));
                    }
                    let backoff = self.settings.retry_base.saturating_mul(1 << attempt.min(16));
                    let delay = retry_after.unwrap_or(backoff).min(Duration::from_secs(30));
                    log::debug!("{}: {message}; retrying in {delay:?}", self.name());
                    GenerationStats::bump(&stats.retries);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

impl OpenAiBackend {
    fn request_error(&self, message: String) -> GenerationError {
        GenerationError::Request {
            backend: self.name(),
            message,
        }
    }

    async fn attempt(&self, url: &str, body: &Value, stats: &GenerationStats) -> Attempt {
        let mut request = self.client.post(url).json(body);
        if let Some(key) = &self.settings.api_key {
            request = request.bearer_auth(key);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(format!("timed out after {:?}", self.settings.timeout), None);
            }
            Err(e) if e.is_connect() || e.is_request() => {
                return Attempt::Retry(format!("cannot reach {url}: {e}"), None);
            }
            Err(e) => return Attempt::Fail(e.to_string()),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) if e.is_timeout() => return Attempt::Retry("timed out reading the answer".into(), None),
            Err(e) => return Attempt::Retry(format!("cannot read the answer: {e}"), None),
        };
        if status.as_u16() == 429 || status.is_server_error() {
            return Attempt::Retry(format!("HTTP {status}: {}", snippet(&text)), retry_after);
        }
        if !status.is_success() {
            return Attempt::Fail(format!("HTTP {status}: {}", snippet(&text)));
        }
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            return Attempt::Fail(format!("the endpoint did not answer JSON: {}", snippet(&text)));
        };
        let usage = |k: &str| value["usage"][k].as_u64().unwrap_or(0);
        stats
            .prompt_tokens
            .fetch_add(usage("prompt_tokens"), std::sync::atomic::Ordering::Relaxed);
        stats
            .completion_tokens
            .fetch_add(usage("completion_tokens"), std::sync::atomic::Ordering::Relaxed);
        match value["choices"][0]["message"]["content"].as_str() {
            Some(content) => Attempt::Done(content.to_string()),
            None => Attempt::Fail(format!("no choices[0].message.content in {}", snippet(&text))),
        }
    }
}

fn snippet(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_string()
    }
}
