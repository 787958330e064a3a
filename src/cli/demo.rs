//! `mkflow demo`: ingest the bundled SciFact sample and show a few retrieval queries.

use mkflow::{Engine, EngineConfig};

use super::output::{Format, render};

/// The sample corpus, compiled in so the demo runs from any directory.
const SAMPLE_CORPUS: &str = include_str!("../../data/sample/scifact-sample.jsonl");
/// The pipeline users can copy; the demo runs it with the corpus path rewritten.
const PIPELINE: &str = include_str!("../../pipelines/scifact_sample.sql");
const PIPELINE_CORPUS_PATH: &str = "data/sample/scifact-sample.jsonl";

const QUERIES: &[(&str, &str)] = &[
    (
        "Semantic search: the 3 abstracts closest to a claim",
        "SELECT doc_id, title, round(score, 3) AS score \
         FROM vector_search(scifact, 'Vitamin D deficiency is associated with higher risk of disease', 3)",
    ),
    (
        "Search combined with a metadata filter (evaluated inside the ANN search)",
        "SELECT doc_id, title, round(score, 3) AS score \
         FROM vector_search(scifact, 'immune response to infection', 3) \
         WHERE title ILIKE '%cell%'",
    ),
    (
        "Spice.ai-style signature: vector_search(table, query, column, limit)",
        "SELECT doc_id, substr(title, 1, 70) AS title, round(score, 3) AS score \
         FROM vector_search(scifact, 'gene expression in cancer', 'body', 3)",
    ),
    (
        "Keyword search: BM25 over title and abstract (text_search)",
        "SELECT doc_id, substr(title, 1, 70) AS title, round(score, 2) AS bm25 \
         FROM text_search(scifact, 'vitamin D bone fractures', 3)",
    ),
    (
        "Hybrid search: vector and BM25 results fused by reciprocal rank (hybrid_search)",
        "SELECT doc_id, substr(title, 1, 70) AS title, round(fused_score, 4) AS fused_score \
         FROM hybrid_search(scifact, 'vitamin D bone fractures', 3)",
    ),
    (
        "embed() in any query: cosine similarity of two pairs of texts",
        "SELECT round(1 - cosine_distance(embed('A dog chases a ball'), embed('A puppy runs after a toy')), 3) AS related, \
                round(1 - cosine_distance(embed('A dog chases a ball'), embed('Quarterly revenue grew by 5%')), 3) AS unrelated",
    ),
];

/// Runs the demo in `config.data_dir`.
pub async fn run(config: EngineConfig) -> anyhow::Result<()> {
    crate::ensure_assets(&config.home)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let corpus = config.data_dir.join("scifact-sample.jsonl");
    std::fs::write(&corpus, SAMPLE_CORPUS)?;
    let pipeline = config.data_dir.join("scifact_sample.sql");
    let corpus_path = corpus.canonicalize()?;
    std::fs::write(
        &pipeline,
        PIPELINE.replace(PIPELINE_CORPUS_PATH, &corpus_path.to_string_lossy()),
    )?;

    let engine = Engine::new(config).await?;
    println!(
        "== Ingesting {} sample SciFact abstracts (pipelines/scifact_sample.sql)",
        SAMPLE_CORPUS.lines().count()
    );
    crate::run_pipeline(&engine, &pipeline).await?;
    for (title, sql) in QUERIES {
        println!("\n== {title}\n{sql}");
        let batches = engine.sql(sql).await?;
        println!("{}", render(&batches, Format::Table)?);
    }
    println!(
        "\nThe index is in {}. Try:\n  mkflow shell\n  mkflow sql \"SELECT doc_id, title, score FROM vector_search(scifact, 'your question', 5)\"",
        engine.config().data_dir.join("scifact").display()
    );
    Ok(())
}
