//! A generator on any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's
//! `llama-server`, Ollama): bounded concurrency, per-request timeouts, retries with
//! exponential backoff on 429/5xx/timeouts (honouring `Retry-After`), JSON answers validated
//! with one corrective retry, and a persistent cache keyed by model and prompt so that a re-run
//! costs nothing.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::generator::{ClusterBrief, ClusterDigest, Document, GenerationError, GenerationStats, Generator, Prepared};
use super::prompts::{self, Message};
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

/// One cached answer.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    content: String,
}

/// Answers by request key, persisted as JSON Lines (appended, loaded on start).
#[derive(Debug)]
struct ResponseCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<String, String>>,
}

impl ResponseCache {
    fn open(file: Option<PathBuf>) -> Self {
        let mut entries = HashMap::new();
        if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
            for entry in text.lines().filter_map(|l| serde_json::from_str::<CacheEntry>(l).ok()) {
                entries.insert(entry.key, entry.content);
            }
        }
        ResponseCache {
            file,
            entries: Mutex::new(entries),
        }
    }

    fn get(&self, key: &str) -> Option<String> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    fn put(&self, key: String, content: String) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = &self.file {
            let line = serde_json::to_string(&CacheEntry {
                key: key.clone(),
                content: content.clone(),
            })
            .expect("cache entries serialise");
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::OpenOptions::new().create(true).append(true).open(path))
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = written {
                log::warn!("cannot write generation cache {}: {e}", path.display());
            }
        }
        entries.insert(key, content);
    }
}

/// The OpenAI-compatible generator.
#[derive(Debug)]
pub struct OpenAiGenerator {
    settings: LlmSettings,
    schema: Arc<MetadataSchema>,
    client: reqwest::Client,
    permits: Semaphore,
    cache: ResponseCache,
    stats: GenerationStats,
}

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
        Ok(OpenAiGenerator {
            permits: Semaphore::new(settings.concurrency.max(1)),
            cache: ResponseCache::open(settings.cache_file.clone()),
            settings,
            schema,
            client,
            stats: GenerationStats::default(),
        })
    }

    fn request_error(&self, message: String) -> GenerationError {
        GenerationError::Request {
            backend: self.name(),
            message,
        }
    }

    fn invalid(&self, message: String) -> GenerationError {
        GenerationError::InvalidOutput {
            backend: self.name(),
            message,
        }
    }

    /// One chat completion (from the cache when this model saw this prompt before).
    async fn chat(&self, messages: &[Message], json_answer: bool) -> Result<String, GenerationError> {
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "temperature": 0,
        });
        if json_answer && self.settings.json_mode {
            body["response_format"] = json!({"type": "json_object"});
        }
        let key = hex(&Sha256::digest(format!("{}\n{}", self.settings.model, body).as_bytes()));
        if let Some(content) = self.cache.get(&key) {
            GenerationStats::bump(&self.stats.cache_hits);
            return Ok(content);
        }
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let url = format!("{}/chat/completions", self.settings.base_url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            GenerationStats::bump(&self.stats.requests);
            match self.attempt(&url, &body).await {
                Attempt::Done(content) => {
                    self.cache.put(key, content.clone());
                    return Ok(content);
                }
                Attempt::Fail(message) => return Err(self.request_error(message)),
                Attempt::Retry(message, retry_after) => {
                    if attempt >= self.settings.max_retries {
                        return Err(self.request_error(format!("{message} (gave up after {} attempts)", attempt + 1)));
                    }
                    let backoff = self.settings.retry_base.saturating_mul(1 << attempt.min(16));
                    let delay = retry_after.unwrap_or(backoff).min(Duration::from_secs(30));
                    log::debug!("{}: {message}; retrying in {delay:?}", self.name());
                    GenerationStats::bump(&self.stats.retries);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, url: &str, body: &Value) -> Attempt {
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
        self.stats
            .prompt_tokens
            .fetch_add(usage("prompt_tokens"), std::sync::atomic::Ordering::Relaxed);
        self.stats
            .completion_tokens
            .fetch_add(usage("completion_tokens"), std::sync::atomic::Ordering::Relaxed);
        match value["choices"][0]["message"]["content"].as_str() {
            Some(content) => Attempt::Done(content.to_string()),
            None => Attempt::Fail(format!("no choices[0].message.content in {}", snippet(&text))),
        }
    }

    /// Asks, validates with `parse`, and on an invalid answer asks once more with the error.
    async fn ask<T>(
        &self,
        mut messages: Vec<Message>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let result = async {
            let content = self.chat(&messages, true).await?;
            match parse(&content) {
                Ok(v) => Ok(v),
                Err(first) => {
                    GenerationStats::bump(&self.stats.invalid_outputs);
                    messages.push(Message::new("assistant", content));
                    messages.push(prompts::correction(&first));
                    let content = self.chat(&messages, true).await?;
                    parse(&content).map_err(|second| {
                        GenerationStats::bump(&self.stats.invalid_outputs);
                        self.invalid(format!("{second} (after a corrective retry; first: {first})"))
                    })
                }
            }
        }
        .await;
        if result.is_err() {
            GenerationStats::bump(&self.stats.errors);
        }
        result
    }
}

/// A generation in flight.
type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, GenerationError>> + Send + 'a>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn snippet(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 200 {
        format!("{}…", text.chars().take(200).collect::<String>())
    } else {
        text.to_string()
    }
}

#[async_trait]
impl Generator for OpenAiGenerator {
    fn name(&self) -> String {
        format!("openai:{}", self.settings.model)
    }

    async fn prepare(&self, documents: &[Document<'_>]) -> Vec<Result<Prepared, GenerationError>> {
        let max = self.settings.max_questions;
        let schema = &self.schema;
        let calls: Vec<Pending<'_, Prepared>> = documents
            .iter()
            .map(|d| {
                let messages = prompts::prepare(schema, d, max);
                Box::pin(self.ask(messages, move |c: &str| prompts::parse_prepared(schema, c, max))) as Pending<'_, _>
            })
            .collect();
        // Requests are bounded by the semaphore in `chat`; this only bounds pending futures.
        futures::stream::iter(calls)
            .buffered(self.settings.concurrency.max(1) * 2)
            .collect()
            .await
    }

    async fn summarize(&self, cluster: &ClusterDigest) -> Result<String, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let result = self.chat(&prompts::summarize(cluster), false).await.and_then(|s| {
            let s = s.trim().to_string();
            if s.is_empty() {
                Err(self.invalid("empty summary".into()))
            } else {
                Ok(s)
            }
        });
        if result.is_err() {
            GenerationStats::bump(&self.stats.errors);
        }
        result
    }

    async fn rewrite(&self, query: &str, clusters: &[ClusterBrief]) -> Result<Vec<String>, GenerationError> {
        let count = self.settings.rewrite_queries;
        self.ask(prompts::rewrite(query, clusters, count), |c| {
            prompts::parse_rewrite(c, count)
        })
        .await
    }

    fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}
