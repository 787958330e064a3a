//! The embedding queue with the real default model: concurrent requests share model calls and
//! get the vectors the model gives each alone; queries are served between the calls of a
//! running ingest batch instead of after it; `embed()` runs through it as an async function,
//! `ORDER BY` included.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mkflow_udfs::Embedder;

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_queries_share_model_calls_and_get_their_own_vectors() {
    let data = tempfile::tempdir().unwrap();
    let engine = common::engine(data.path()).await;
    let queue = engine.models().default_model().get().unwrap();
    let model: &Arc<Embedder> = queue.model();
    let texts: Vec<String> = (0..16)
        .map(|i| format!("query {i}: how do penguins keep warm in winter number {}", i * 7))
        .collect();
    // The vectors the model gives each text alone (on this thread; no cache yet).
    let alone: Vec<Vec<f32>> = texts.iter().map(|t| model.embed_query(t).unwrap()).collect();
    model.forget_recent();
    let calls = || model.stats().calls.load(Ordering::Relaxed);
    let before = calls();
    let tasks: Vec<_> = texts
        .iter()
        .cloned()
        .map(|text| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.embed_query(&text).await.unwrap() })
        })
        .collect();
    let mut together = Vec::new();
    for task in tasks {
        together.push(task.await.unwrap());
    }
    let used = calls() - before;
    assert!(used < 16, "16 concurrent queries took {used} model calls: not batched");
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(
            cosine(a, b) > 0.9999,
            "text {i}: batched vector differs ({})",
            cosine(a, b)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_between_the_calls_of_an_ingest_batch() {
    let data = tempfile::tempdir().unwrap();
    let engine = common::engine(data.path()).await;
    let queue = engine.models().default_model().get().unwrap();
    queue.model().forget_recent();
    let corpus = std::fs::read_to_string(common::sample_corpus()).unwrap();
    let bodies: Vec<String> = corpus
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["body"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let finished = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (queue, finished) = (queue.clone(), finished.clone());
        tokio::spawn(async move {
            let texts: Vec<Option<&str>> = bodies.iter().map(|b| Some(b.as_str())).collect();
            let answer = queue.embed(&texts).await.unwrap();
            finished.store(true, Ordering::SeqCst);
            answer.present.iter().filter(|p| **p).count()
        })
    };
    // Let the worker start on the batch (400 abstracts take many model calls), then ask.
    while queue.model().stats().calls.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let vector = queue.embed_query("vitamin D and bone density").await.unwrap();
    assert_eq!(vector.len(), 384);
    assert!(
        !finished.load(Ordering::SeqCst),
        "the query waited for the whole ingest batch"
    );
    assert_eq!(ingest.await.unwrap(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_in_order_by_runs_as_an_async_function() {
    let data = tempfile::tempdir().unwrap();
    let engine = common::engine(data.path()).await;
    let batches = engine
        .sql(
            "SELECT t FROM (VALUES ('a kitten on a rug'), ('interest rates rose sharply'), ('a cat sat on the mat')) AS v(t) \
             ORDER BY cosine_distance(embed(t), embed('a cat')) ASC",
        )
        .await
        .unwrap();
    let order = common::strings(&batches, "t");
    assert_eq!(order.len(), 3);
    assert_eq!(order[2], "interest rates rose sharply", "{order:?}");
    assert_eq!(batches[0].num_columns(), 1, "the computed key is projected away");
}
