//! The embedding queue: one worker thread per loaded model owns its ONNX Runtime session and
//! answers every query and pipeline of the process, as text-embeddings-inference does (router →
//! queue → backend).
//!
//! Callers send a [`Command`] over a channel and wait for the answer — asynchronously
//! ([`EmbedQueue::embed`], for queries and `embed()`), or blocking a thread that is not an async
//! executor's ([`EmbedQueue::embed_blocking`]). The worker never runs on the async runtime, so
//! model work cannot stall it, and it batches what arrives together:
//!
//! - **Interactive** requests (at most [`INTERACTIVE_TEXTS`] texts: search queries, `embed()` over
//!   a few rows) that wait at the same time share model calls, filled up to the model's token
//!   budget. Sixteen clients searching at once cost a few model calls, not sixteen.
//! - **Bulk** requests (ingest batches) are split into chunks of at most
//!   [`BULK_CHUNK_TEXTS`] texts, tokenised and run one token-budget call at a time, in arrival
//!   order. Interactive work goes first between two calls, so a query waits for at most one
//!   model call of a running ingest, never for the whole batch.
//!
//! Texts still in the model's recent-texts cache are answered by the caller without queueing.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Instant;

use tokenizers::Encoding;

use super::{EmbedError, Embedder, Embeddings, TextRole};

/// A request of at most this many texts is interactive: it is served before bulk work and
/// batched with the other interactive requests waiting.
pub const INTERACTIVE_TEXTS: usize = 32;

/// Bulk requests are tokenised and planned this many texts at a time, so that the worker
/// returns to interactive work between two model calls.
pub const BULK_CHUNK_TEXTS: usize = 512;

/// What the worker is asked to do.
enum Command {
    /// Embed `texts` (each with content; the caller answered the rest) into the answer.
    Embed(Job),
}

/// Where an answer goes.
enum Reply {
    /// To an async caller.
    Async(tokio::sync::oneshot::Sender<Result<Embeddings, EmbedError>>),
    /// To a thread blocked on it.
    Blocking(mpsc::SyncSender<Result<Embeddings, EmbedError>>),
}

impl Reply {
    fn send(self, answer: Result<Embeddings, EmbedError>) {
        // A caller that gave up (a cancelled query) no longer listens; nothing to do then.
        match self {
            Reply::Async(tx) => drop(tx.send(answer)),
            Reply::Blocking(tx) => drop(tx.send(answer)),
        }
    }
}

/// One request: the texts the model must embed and the answer under construction.
struct Job {
    /// The answer, already holding the cache's vectors.
    answer: Embeddings,
    /// Texts to embed, each with its position in the answer.
    texts: Vec<(usize, String)>,
    /// How many of `texts` are embedded (bulk jobs advance chunk by chunk).
    done: usize,
    /// The chunk in progress: its encodings and the model calls left, as indexes into it.
    chunk: Option<Chunk>,
    reply: Reply,
}

/// Part of a bulk job, tokenised and planned.
struct Chunk {
    encodings: Vec<Encoding>,
    calls: VecDeque<Vec<usize>>,
}

impl Job {
    fn is_interactive(&self) -> bool {
        self.texts.len() <= INTERACTIVE_TEXTS
    }
}

/// The queue of one model: cheap to share; the worker stops when the last handle is dropped.
#[derive(Debug)]
pub struct EmbedQueue {
    model: Arc<Embedder>,
    sender: Sender<Command>,
}

impl EmbedQueue {
    /// Starts the worker thread that owns `model`'s session.
    pub fn start(model: Arc<Embedder>) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let worker = Worker {
            model: model.clone(),
            receiver,
            interactive: VecDeque::new(),
            bulk: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name(format!("embed-{}", model.spec().name))
            .spawn(move || worker.run())?;
        Ok(EmbedQueue { model, sender })
    }

    /// The model behind the queue (its description, device and counters).
    pub fn model(&self) -> &Arc<Embedder> {
        &self.model
    }

    /// Embeds documents on the worker, waiting asynchronously. Same answer as
    /// [`Embedder::embed`].
    pub async fn embed(&self, texts: &[Option<&str>]) -> Result<Embeddings, EmbedError> {
        self.embed_as(texts, TextRole::Document).await
    }

    /// Embeds texts in `role` on the worker, waiting asynchronously. Same answer as
    /// [`Embedder::embed_as`].
    pub async fn embed_as(&self, texts: &[Option<&str>], role: TextRole) -> Result<Embeddings, EmbedError> {
        let (answer, texts) = self.model.recalled(texts, role);
        if texts.is_empty() {
            return Ok(answer);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(answer, texts, Reply::Async(tx))?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Embeds texts in `role` on the worker, blocking this thread until the answer comes. For
    /// threads that are not an async executor's (blocking pools, plain threads).
    pub fn embed_blocking(&self, texts: &[Option<&str>], role: TextRole) -> Result<Embeddings, EmbedError> {
        let (answer, texts) = self.model.recalled(texts, role);
        if texts.is_empty() {
            return Ok(answer);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(answer, texts, Reply::Blocking(tx))?;
        rx.recv().map_err(|_| self.stopped())?
    }

    /// Embeds one query (the query template applied); errors when it has no content.
    pub async fn embed_query(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let embeddings = self.embed_as(&[Some(text)], TextRole::Query).await?;
        embeddings
            .get(0)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| EmbedError::Inference {
                model: self.model.spec().name.clone(),
                message: "cannot embed an empty text".into(),
            })
    }

    fn submit(&self, answer: Embeddings, texts: Vec<(usize, Cow<'_, str>)>, reply: Reply) -> Result<(), EmbedError> {
        let job = Job {
            answer,
            texts: texts
                .into_iter()
                .map(|(slot, text)| (slot, text.into_owned()))
                .collect(),
            done: 0,
            chunk: None,
            reply,
        };
        self.sender.send(Command::Embed(job)).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> EmbedError {
        EmbedError::Inference {
            model: self.model.spec().name.clone(),
            message: "the embedding worker stopped".into(),
        }
    }
}

/// The worker thread's state: the model and the requests not yet answered.
struct Worker {
    model: Arc<Embedder>,
    receiver: Receiver<Command>,
    interactive: VecDeque<Job>,
    bulk: VecDeque<Job>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.interactive.is_empty() && self.bulk.is_empty() {
                match self.receiver.recv() {
                    Ok(command) => self.accept(command),
                    Err(_) => return,
                }
            }
            loop {
                match self.receiver.try_recv() {
                    Ok(command) => self.accept(command),
                    Err(TryRecvError::Empty) => break,
                    // Every handle is gone: finish what is queued, then stop.
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if !self.interactive.is_empty() {
                let jobs: Vec<Job> = self.interactive.drain(..).collect();
                self.run_together(jobs);
            } else if let Some(job) = self.bulk.pop_front()
                && let Some(job) = self.advance(job)
            {
                self.bulk.push_front(job);
            }
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Embed(job) if job.is_interactive() => self.interactive.push_back(job),
            Command::Embed(job) => self.bulk.push_back(job),
        }
    }

    /// Runs interactive jobs as one token-budget plan over all their texts, then answers each.
    fn run_together(&self, mut jobs: Vec<Job>) {
        let texts: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.texts.len()).map(move |t| (j, t)))
            .collect();
        let contents: Vec<&str> = texts.iter().map(|&(j, t)| jobs[j].texts[t].1.as_str()).collect();
        let outcome = guarded(&self.model, || {
            let encodings = self.model.tokenize(&contents)?;
            let lengths: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
            let started = Instant::now();
            let mut pooled_calls = Vec::new();
            for call in self.model.spec().batching.plan(&lengths) {
                let batch: Vec<&Encoding> = call.iter().map(|&i| &encodings[i]).collect();
                pooled_calls.push((self.model.run_encoded(&batch)?, call));
            }
            self.model
                .record(contents.len(), lengths.iter().sum(), started.elapsed());
            Ok((pooled_calls, lengths))
        });
        match outcome {
            Ok((pooled_calls, lengths)) => {
                let dims = self.model.spec().dimensions;
                for (pooled, call) in pooled_calls {
                    for (row, &i) in call.iter().enumerate() {
                        let (j, t) = texts[i];
                        let Job {
                            answer,
                            texts: job_texts,
                            ..
                        } = &mut jobs[j];
                        let (slot, text) = &job_texts[t];
                        let vector = &pooled[row * dims..(row + 1) * dims];
                        self.model.place(answer, &[(*slot, text.as_str())], vector);
                        answer.tokens += lengths[i];
                    }
                }
                for job in jobs {
                    job.reply.send(Ok(job.answer));
                }
            }
            Err(e) => {
                for job in jobs {
                    job.reply.send(Err(self.copy_error(&e)));
                }
            }
        }
    }

    /// Runs the next model call of a bulk job; returns the job unless it is finished (answered).
    fn advance(&self, mut job: Job) -> Option<Job> {
        let step = guarded(&self.model, || {
            if job.chunk.is_none() {
                let end = (job.done + BULK_CHUNK_TEXTS).min(job.texts.len());
                let contents: Vec<&str> = job.texts[job.done..end].iter().map(|(_, t)| t.as_str()).collect();
                let encodings = self.model.tokenize(&contents)?;
                let lengths: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
                let calls = self.model.spec().batching.plan(&lengths).into();
                job.chunk = Some(Chunk { encodings, calls });
            }
            let chunk = job.chunk.as_mut().expect("chunk planned above");
            if let Some(call) = chunk.calls.pop_front() {
                let batch: Vec<&Encoding> = call.iter().map(|&i| &chunk.encodings[i]).collect();
                let tokens: usize = batch.iter().map(|e| e.get_ids().len()).sum();
                let started = Instant::now();
                let pooled = self.model.run_encoded(&batch)?;
                self.model.record(call.len(), tokens, started.elapsed());
                let placed: Vec<(usize, &str)> = call
                    .iter()
                    .map(|&i| {
                        let (slot, text) = &job.texts[job.done + i];
                        (*slot, text.as_str())
                    })
                    .collect();
                self.model.place(&mut job.answer, &placed, &pooled);
                job.answer.tokens += tokens;
            }
            if chunk.calls.is_empty() {
                job.done += chunk.encodings.len();
                job.chunk = None;
            }
            Ok(())
        });
        match step {
            Ok(()) if job.done < job.texts.len() => Some(job),
            Ok(()) => {
                job.reply.send(Ok(job.answer));
                None
            }
            Err(e) => {
                job.reply.send(Err(e));
                None
            }
        }
    }

    /// The same error again, for each of the jobs a failed call served.
    fn copy_error(&self, e: &EmbedError) -> EmbedError {
        EmbedError::Inference {
            model: self.model.spec().name.clone(),
            message: e.to_string(),
        }
    }
}

/// Runs model work, turning a panic into an error so the worker lives on.
fn guarded<T>(model: &Embedder, work: impl FnOnce() -> Result<T, EmbedError>) -> Result<T, EmbedError> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked".into());
        Err(EmbedError::Inference {
            model: model.spec().name.clone(),
            message: format!("model call panicked: {message}"),
        })
    })
}
