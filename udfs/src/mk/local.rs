//! A generator on a local LLM (an export of `scripts/export_decoder.py`, e.g. Qwen2.5-0.5B-Instruct
//! from its GGUF): the Meta-Knowledge pipeline runs fully offline. The model is loaded on first
//! use; a worker thread answers the queued conversations in batches, and holds every JSON answer
//! to its schema token by token (constrained decoding), so it parses and its labels are in the
//! taxonomy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::chat::{AnswerFormat, ChatBackend, ChatGenerator, ChatLimits, hex};
use super::generator::{GenerationError, GenerationStats};
use super::prompts::Message;
use super::schema::MetadataSchema;
use crate::decoder::constrain::JsonShape;
use crate::decoder::{ChatAnswer, ChatRequest, LocalLlm, Sampling};
use crate::runtime::{Device, resolve_threads};

/// How long the worker waits for more conversations to fill a batch once one arrived.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// No run of this many tokens repeats in a local answer: long enough for JSON's recurring
/// `"}, {"question": "` glue, short enough to stop a small model's phrase loops early.
const NO_REPEAT_NGRAM: usize = 12;

/// Which local model and how it generates.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSettings {
    /// The export directory (with `model.onnx`, `tokenizer.json`, `mkflow-decoder.json`).
    pub model_dir: PathBuf,
    /// Where it runs.
    pub device: Device,
    /// ONNX Runtime intra-op threads (0: one per core).
    pub threads: usize,
    /// The ONNX Runtime library, when the process has not loaded one yet.
    pub onnx_runtime: Option<PathBuf>,
    /// Most tokens per answer.
    pub max_new_tokens: usize,
    /// 0 for greedy decoding, else the sampling temperature.
    pub temperature: f32,
    /// Most QA pairs kept per document.
    pub max_questions: usize,
    /// Sub-queries asked for by query rewriting.
    pub rewrite_queries: usize,
    /// Most conversations answered together in one batch.
    pub batch_size: usize,
    /// The persistent answer cache (JSON Lines), if any.
    pub cache_file: Option<PathBuf>,
}

/// A local LLM as a [`ChatBackend`].
#[derive(Debug)]
pub struct LocalBackend {
    settings: LocalSettings,
    queue: OnceCell<ChatQueue>,
    /// The hash of the export's files, computed once (off the executor).
    files: OnceCell<String>,
}

/// One conversation waiting for the model.
struct Job {
    messages: Vec<Message>,
    prefix: &'static str,
    shape: Option<JsonShape>,
    reply: tokio::sync::oneshot::Sender<Result<ChatAnswer, String>>,
}

/// Conversations queued for the model; a worker thread (which ends with the queue) answers them
/// in batches of up to `batch_size`.
#[derive(Debug)]
struct ChatQueue {
    jobs: mpsc::Sender<Job>,
}

impl ChatQueue {
    fn start(llm: Arc<LocalLlm>, sampling: Sampling, batch_size: usize) -> Self {
        let (jobs, waiting) = mpsc::channel();
        std::thread::Builder::new()
            .name("mkflow-local-llm".into())
            .spawn(move || serve(&llm, &waiting, &sampling, batch_size.max(1)))
            .expect("the local LLM worker thread starts");
        ChatQueue { jobs }
    }
}

/// The worker: takes what is waiting (up to `batch_size`), answers it as one batch, replies.
fn serve(llm: &LocalLlm, waiting: &mpsc::Receiver<Job>, sampling: &Sampling, batch_size: usize) {
    while let Ok(first) = waiting.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + BATCH_LINGER;
        while batch.len() < batch_size {
            match waiting.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let answer = |jobs: &[Job]| {
            let requests: Vec<ChatRequest<'_, Message>> = jobs
                .iter()
                .map(|job| ChatRequest {
                    messages: &job.messages,
                    answer_prefix: job.prefix,
                    shape: job.shape.as_ref(),
                })
                .collect();
            llm.chat_batch(&requests, sampling).map_err(|e| e.to_string())
        };
        match answer(&batch) {
            Ok(answers) => {
                for (job, answer) in batch.into_iter().zip(answers) {
                    let _ = job.reply.send(Ok(answer));
                }
            }
            // One bad conversation (e.g. too long a prompt) does not fail the others.
            Err(_) if batch.len() > 1 => {
                for job in batch {
                    let answer = answer(std::slice::from_ref(&job)).map(|mut a| a.remove(0));
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The SHA-256 of the files of an export directory (names and contents, in name order; a
/// missing or unreadable directory hashes as such), so a model re-exported into the same
/// directory gets another cache identity.
pub fn export_hash(dir: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        hasher.update(file.file_name().unwrap_or_default().as_encoded_bytes());
        hasher.update([0]);
        match std::fs::File::open(&file) {
            Ok(mut reader) => {
                if std::io::copy(&mut reader, &mut hasher).is_err() {
                    hasher.update(b"unreadable");
                }
            }
            Err(_) => hasher.update(b"unreadable"),
        }
        hasher.update([0]);
    }
    hex(&hasher.finalize())
}

/// The Meta-Knowledge generator on a local LLM.
pub type LocalGenerator = ChatGenerator<LocalBackend>;

impl LocalGenerator {
    /// A generator for `settings` (the model loads on first use), validating metadata against
    /// `schema`.
    pub fn new(settings: LocalSettings, schema: Arc<MetadataSchema>) -> Self {
        let limits = ChatLimits {
            max_questions: settings.max_questions.max(1),
            rewrite_queries: settings.rewrite_queries.max(1),
            concurrency: settings.batch_size.max(1),
        };
        let cache_file = settings.cache_file.clone();
        let backend = LocalBackend {
            settings,
            queue: OnceCell::new(),
            files: OnceCell::new(),
        };
        ChatGenerator::with_backend(backend, schema, limits, cache_file)
    }
}

impl LocalBackend {
    fn model_error(&self, message: String) -> GenerationError {
        GenerationError::Request {
            backend: self.name(),
            message,
        }
    }

    /// The queue to the model, which is loaded (off the executor) on first use.
    async fn queue(&self) -> Result<&ChatQueue, GenerationError> {
        self.queue
            .get_or_try_init(|| async {
                let s = self.settings.clone();
                let threads = resolve_threads(s.threads);
                let llm = tokio::task::spawn_blocking(move || {
                    LocalLlm::load(&s.model_dir, threads, s.device, s.onnx_runtime.as_deref())
                        .map(Arc::new)
                        .map_err(|e| format!("{e} (hint: `mkflow models pull --llm` exports the default local LLM)"))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
                .map_err(|e| self.model_error(e))?;
                let sampling = Sampling {
                    max_new_tokens: self.settings.max_new_tokens,
                    temperature: self.settings.temperature,
                    no_repeat_ngram: NO_REPEAT_NGRAM,
                    ..Sampling::default()
                };
                Ok(ChatQueue::start(llm, sampling, self.settings.batch_size))
            })
            .await
    }
}

#[async_trait]
impl ChatBackend for LocalBackend {
    fn name(&self) -> String {
        let model = self
            .settings
            .model_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        format!("local:{model}")
    }

    async fn cache_identity(&self) -> String {
        let s = &self.settings;
        let files = self
            .files
            .get_or_init(|| async {
                let dir = s.model_dir.clone();
                tokio::task::spawn_blocking(move || export_hash(&dir))
                    .await
                    .unwrap_or_else(|e| format!("unhashed: {e}"))
            })
            .await;
        format!(
            "local\nfiles={files}\nmax_new_tokens={}\ntemperature={}\nno_repeat_ngram={NO_REPEAT_NGRAM}\ndevice={}",
            s.max_new_tokens, s.temperature, s.device
        )
    }

    async fn complete(
        &self,
        messages: &[Message],
        format: &AnswerFormat,
        stats: &GenerationStats,
    ) -> Result<String, GenerationError> {
        let queue = self.queue().await?;
        // The answer opens as the prompt asks and, for JSON, keeps to its schema token by token.
        let (prefix, shape) = match format {
            AnswerFormat::Json { start, schema } => (
                *start,
                Some(JsonShape::from_schema(schema).map_err(|e| self.model_error(e.to_string()))?),
            ),
            AnswerFormat::Text => ("", None),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            messages: messages.to_vec(),
            prefix,
            shape,
            reply,
        };
        GenerationStats::bump(&stats.requests);
        queue
            .jobs
            .send(job)
            .map_err(|_| self.model_error("the local LLM worker has stopped".into()))?;
        let answer = answer
            .await
            .map_err(|_| self.model_error("the local LLM worker has stopped".into()))?
            .map_err(|e| self.model_error(e))?;
        use std::sync::atomic::Ordering::Relaxed;
        stats.prompt_tokens.fetch_add(answer.prompt_tokens as u64, Relaxed);
        stats
            .completion_tokens
            .fetch_add(answer.completion_tokens as u64, Relaxed);
        Ok(answer.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_re_exported_model_hashes_differently() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.onnx"), b"weights v1").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
        let first = export_hash(dir.path());
        assert_eq!(first, export_hash(dir.path()), "the hash is stable");
        std::fs::write(dir.path().join("model.onnx"), b"weights v2").unwrap();
        let second = export_hash(dir.path());
        assert_ne!(first, second, "new weights, new identity");
        std::fs::rename(dir.path().join("tokenizer.json"), dir.path().join("vocab.json")).unwrap();
        assert_ne!(second, export_hash(dir.path()), "file names count");
    }
}
