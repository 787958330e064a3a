//! A [`Generator`] on any chat model: the Meta-Knowledge prompts, JSON answers validated with one
//! corrective retry, and a persistent answer cache keyed by conversation and everything else that
//! decides the answer ([`ChatBackend::cache_identity`]), so that a re-run costs nothing. The model behind it is a [`ChatBackend`]: an OpenAI-compatible endpoint
//! ([`super::openai`]) or a local LLM on the decoder runtime ([`super::local`]).

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::generator::{
    ClusterBrief, ClusterDigest, Document, Evidence, GenerationError, GenerationStats, Generator, Judging, Prepared,
    Verdict,
};
use super::prompts::{self, Message};
use super::schema::MetadataSchema;

/// What a prompt asks the model to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerFormat {
    /// Free text.
    Text,
    /// A JSON object that opens with `start` (e.g. `{"queries": [`) and follows `schema` (a
    /// JSON Schema). Backends that can prefill the assistant's turn start the answer there;
    /// backends that decode themselves hold every token to the schema (the local LLM); the
    /// others ask for JSON their own way.
    Json {
        /// The opening of the expected object.
        start: &'static str,
        /// The answer's JSON Schema (see [`crate::decoder::constrain::JsonShape`] for the subset).
        schema: Arc<serde_json::Value>,
    },
}

/// A chat model: answers a conversation.
#[async_trait]
pub trait ChatBackend: Send + Sync + Debug {
    /// A name for messages (e.g. `openai:gpt-4o-mini`, `local:smollm2-135m`).
    fn name(&self) -> String;

    /// Everything besides the conversation that decides the answers: the backend, the model,
    /// where it is reached, every sampling setting, and for local models the hash of the
    /// model's files. Part of the cache key, so a changed setting or a re-exported model is
    /// never answered from the cache.
    async fn cache_identity(&self) -> String;

    /// The answer to `messages`, in `format`. Backends count their requests, retries and
    /// tokens in `stats`.
    async fn complete(
        &self,
        messages: &[Message],
        format: &AnswerFormat,
        stats: &GenerationStats,
    ) -> Result<String, GenerationError>;
}

/// What the prompts ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatLimits {
    /// Most QA pairs kept per document.
    pub max_questions: usize,
    /// Sub-queries asked for by query rewriting.
    pub rewrite_queries: usize,
    /// Documents prepared at once.
    pub concurrency: usize,
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

/// The Meta-Knowledge generator over a chat backend.
#[derive(Debug)]
pub struct ChatGenerator<B> {
    backend: B,
    schema: Arc<MetadataSchema>,
    limits: ChatLimits,
    cache: ResponseCache,
    stats: GenerationStats,
}

/// A generation in flight.
type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, GenerationError>> + Send + 'a>>;

impl<B: ChatBackend> ChatGenerator<B> {
    /// A generator asking `backend`, validating metadata against `schema`, caching answers in
    /// `cache_file` (JSON Lines) when given.
    pub fn with_backend(
        backend: B,
        schema: Arc<MetadataSchema>,
        limits: ChatLimits,
        cache_file: Option<PathBuf>,
    ) -> Self {
        ChatGenerator {
            backend,
            schema,
            limits,
            cache: ResponseCache::open(cache_file),
            stats: GenerationStats::default(),
        }
    }

    fn invalid(&self, message: String) -> GenerationError {
        GenerationError::InvalidOutput {
            backend: self.backend.name(),
            message,
        }
    }

    /// One answer (from the cache when this model saw this conversation before).
    async fn chat(&self, messages: &[Message], format: &AnswerFormat) -> Result<String, GenerationError> {
        let request = serde_json::to_string(messages).expect("messages serialise");
        let key = hex(&Sha256::digest(
            format!("{}\n{format:?}\n{request}", self.backend.cache_identity().await).as_bytes(),
        ));
        if let Some(content) = self.cache.get(&key) {
            GenerationStats::bump(&self.stats.cache_hits);
            return Ok(content);
        }
        let content = self.backend.complete(messages, format, &self.stats).await?;
        self.cache.put(key, content.clone());
        Ok(content)
    }

    /// A free-text answer, trimmed; empty is an error (naming `what` was asked for).
    async fn text(&self, messages: &[Message], what: &str) -> Result<String, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let result = self.chat(messages, &AnswerFormat::Text).await.and_then(|s| {
            let s = s.trim().to_string();
            if s.is_empty() {
                Err(self.invalid(format!("empty {what}")))
            } else {
                Ok(s)
            }
        });
        if result.is_err() {
            GenerationStats::bump(&self.stats.errors);
        }
        result
    }

    /// Asks, validates with `parse`, and on an invalid answer asks once more with the error.
    async fn ask<T>(
        &self,
        mut messages: Vec<Message>,
        format: AnswerFormat,
        parse: impl Fn(&str) -> Result<T, prompts::AnswerError>,
    ) -> Result<T, GenerationError> {
        GenerationStats::bump(&self.stats.calls);
        let result = async {
            let content = self.chat(&messages, &format).await?;
            match parse(&content) {
                Ok(v) => Ok(v),
                Err(first) => {
                    GenerationStats::bump(&self.stats.invalid_outputs);
                    messages.push(Message::new("assistant", content));
                    messages.push(prompts::correction(&first));
                    let content = self.chat(&messages, &format).await?;
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

/// Lower-case hexadecimal of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl<B: ChatBackend> Generator for ChatGenerator<B> {
    fn name(&self) -> String {
        self.backend.name()
    }

    async fn prepare(&self, documents: &[Document<'_>]) -> Vec<Result<Prepared, GenerationError>> {
        let max = self.limits.max_questions;
        let schema = &self.schema;
        let answer_schema = Arc::new(prompts::prepare_schema(schema, max));
        let calls: Vec<Pending<'_, Prepared>> = documents
            .iter()
            .map(|d| {
                let messages = prompts::prepare(schema, d, max);
                let format = AnswerFormat::Json {
                    start: prompts::PREPARE_ANSWER_START,
                    schema: answer_schema.clone(),
                };
                Box::pin(self.ask(messages, format, move |c: &str| prompts::parse_prepared(schema, c, max)))
                    as Pending<'_, _>
            })
            .collect();
        // Backends bound their own requests; this only bounds pending futures.
        futures::stream::iter(calls)
            .buffered(self.limits.concurrency.max(1) * 2)
            .collect()
            .await
    }

    async fn summarize(&self, cluster: &ClusterDigest) -> Result<String, GenerationError> {
        self.text(&prompts::summarize(cluster), "summary").await
    }

    async fn answer(&self, query: &str, evidence: &[Evidence]) -> Result<String, GenerationError> {
        self.text(&prompts::answer(query, evidence), "answer").await
    }

    async fn rewrite(&self, query: &str, clusters: &[ClusterBrief]) -> Result<Vec<String>, GenerationError> {
        let count = self.limits.rewrite_queries;
        let format = AnswerFormat::Json {
            start: prompts::REWRITE_ANSWER_START,
            schema: Arc::new(prompts::rewrite_schema(count)),
        };
        self.ask(prompts::rewrite(query, clusters, count), format, |c| {
            prompts::parse_rewrite(c, count)
        })
        .await
    }

    async fn reason(&self, query: &str) -> Result<String, GenerationError> {
        let format = AnswerFormat::Json {
            start: prompts::REASON_ANSWER_START,
            schema: Arc::new(prompts::reason_schema()),
        };
        self.ask(prompts::reason(query), format, prompts::parse_reason).await
    }

    async fn judge(&self, task: &Judging<'_>) -> Result<Verdict, GenerationError> {
        let pairwise = matches!(task, Judging::Pairwise { .. });
        let format = AnswerFormat::Json {
            start: prompts::JUDGE_ANSWER_START,
            schema: Arc::new(prompts::judge_schema(pairwise)),
        };
        self.ask(prompts::judge(task), format, |c| prompts::parse_judgement(c, pairwise))
            .await
    }

    fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backend that counts its calls and answers with its identity.
    #[derive(Debug)]
    struct Counting {
        identity: String,
        calls: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl ChatBackend for Counting {
        fn name(&self) -> String {
            "counting".into()
        }

        async fn cache_identity(&self) -> String {
            self.identity.clone()
        }

        async fn complete(
            &self,
            _: &[Message],
            _: &AnswerFormat,
            _: &GenerationStats,
        ) -> Result<String, GenerationError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(format!("answer of {}", self.identity))
        }
    }

    fn generator(identity: &str, calls: &Arc<AtomicUsize>, cache: &Path) -> ChatGenerator<Counting> {
        let limits = ChatLimits {
            max_questions: 1,
            rewrite_queries: 1,
            concurrency: 1,
        };
        let backend = Counting {
            identity: identity.into(),
            calls: calls.clone(),
        };
        ChatGenerator::with_backend(
            backend,
            Arc::new(MetadataSchema::default()),
            limits,
            Some(cache.to_path_buf()),
        )
    }

    #[tokio::test]
    async fn the_cache_answers_only_the_same_identity_and_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("generations.jsonl");
        let calls = Arc::new(AtomicUsize::new(0));
        async fn ask(g: &ChatGenerator<Counting>) -> String {
            g.chat(&[Message::new("user", "hello")], &AnswerFormat::Text)
                .await
                .unwrap()
        }
        let first = generator("model A, temperature 0", &calls, &cache);
        assert_eq!(ask(&first).await, "answer of model A, temperature 0");
        assert_eq!(ask(&first).await, "answer of model A, temperature 0");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the second ask is a cache hit");
        // Another process with the same identity reads the persisted answer.
        let same = generator("model A, temperature 0", &calls, &cache);
        assert_eq!(ask(&same).await, "answer of model A, temperature 0");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Any other setting (or model files) is another identity: the model is asked again.
        let changed = generator("model A, temperature 0.7", &calls, &cache);
        assert_eq!(ask(&changed).await, "answer of model A, temperature 0.7");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
