//! Full-text search and its ingest cost (run: `cargo bench --profile dev --bench text_search`;
//! `MKFLOW_BENCH_DOCS` changes the corpus size, 100k by default).
//!
//! 1. `text_search` through SQL against a bare tantivy index over the same documents (same
//!    analyzer: words, lowercase, English stop words, Snowball stemming; same BM25), both
//!    answering the same 500 queries for k = 10, one at a time: queries per second of each, and
//!    whether they return the same documents. The SQL path includes parsing, planning, the
//!    search, gathering the rows and collecting the result.
//! 2. Upserting the corpus (no embedding) with the text index on vs off: what the text index
//!    costs the commit path by itself.
//! 3. Ingesting the bundled sample corpus through SQL with `embed()` (what a user runs) with the
//!    text index on vs off.

/// The allocator of the mkflow binary, so the SQL path is measured as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use mkflow::{Engine, EngineConfig, assets};
use mkflow_index::{IndexSettings, KnowledgeIndex, Quantization, TextColumn};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{FAST, IndexRecordOption, STRING, TextFieldIndexing, TextOptions};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{Index, TantivyDocument, Term};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// A Zipf-like rank in `0..n`: frequent words are much more frequent.
    fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next() as f64 + 1.0) / (1u64 << 31) as f64;
        ((n as f64).powf(u) - 1.0) as usize % n
    }
}

/// A pronounceable pseudo-word for rank `i` (distinct for distinct ranks).
fn word(mut i: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "bu", "do", "fe", "ga", "hi", "jo", "pu",
    ];
    let mut w = String::new();
    loop {
        w.push_str(SYLLABLES[i % 16]);
        i /= 16;
        if i == 0 {
            break;
        }
    }
    w.push('x');
    w
}

fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(40))
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

fn summary(name: &str, mut micros: Vec<f64>) -> f64 {
    micros.sort_by(f64::total_cmp);
    let total: f64 = micros.iter().sum();
    let qps = micros.len() as f64 / (total / 1e6);
    println!(
        "{name:<34} {qps:>8.0} QPS  p50 {:>7.0} us  p99 {:>7.0} us",
        micros[micros.len() / 2],
        micros[micros.len() * 99 / 100]
    );
    qps
}

fn settings(text_columns: Option<Vec<TextColumn>>) -> IndexSettings {
    IndexSettings {
        model: "bench".into(),
        dimensions: 4,
        quantization: Quantization::F32,
        key_column: "doc_id".into(),
        vector_column: "embedding".into(),
        text_columns,
    }
}

fn rows(index: &KnowledgeIndex, ids: &[String], bodies: &[String]) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids.to_vec())),
        Arc::new(StringArray::from(bodies.to_vec())),
        datafusion::arrow::array::new_null_array(index.schema().field(2).data_type(), ids.len()),
    ];
    RecordBatch::try_new(index.schema(), columns).unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let count: usize = std::env::var("MKFLOW_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    const VOCABULARY: usize = 30_000;
    let mut rng = Rng(7);
    let ids: Vec<String> = (0..count).map(|i| format!("doc-{i}")).collect();
    let bodies: Vec<String> = (0..count)
        .map(|_| {
            let length = 40 + rng.next() as usize % 80;
            (0..length)
                .map(|_| word(rng.zipf(VOCABULARY)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    // Questions as users ask them: 6 to 14 words drawn like the documents' (frequent words
    // included); and keyword queries: 2 to 4 words of middling frequency.
    let questions: Vec<String> = (0..500)
        .map(|_| {
            let n = 6 + rng.next() as usize % 9;
            (0..n).map(|_| word(rng.zipf(VOCABULARY))).collect::<Vec<_>>().join(" ")
        })
        .collect();
    let keywords: Vec<String> = (0..500)
        .map(|_| {
            let n = 2 + rng.next() as usize % 3;
            (0..n)
                .map(|_| word(50 + rng.next() as usize % 5000))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    println!(
        "text search benchmark: {count} documents of 40-120 words, 500 questions of 6-14 words and 500 keyword queries of 2-4 words, k = 10"
    );

    // Bare tantivy: the same analyzer and scoring, one writer thread, one segment per 10k docs.
    let bare_dir = tempfile::tempdir().unwrap();
    let mut builder = tantivy::schema::Schema::builder();
    let id_field = builder.add_text_field("doc_id", STRING | FAST);
    let body_field = builder.add_text_field(
        "body",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("english")
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        ),
    );
    let bare = Index::create_in_dir(bare_dir.path(), builder.build()).unwrap();
    bare.tokenizers().register("english", analyzer());
    let started = Instant::now();
    {
        let mut writer = bare.writer_with_num_threads(1, 64 << 20).unwrap();
        for (chunk_ids, chunk_bodies) in ids.chunks(10_000).zip(bodies.chunks(10_000)) {
            for (id, body) in chunk_ids.iter().zip(chunk_bodies) {
                let mut doc = TantivyDocument::new();
                doc.add_text(id_field, id);
                doc.add_text(body_field, body);
                writer.add_document(doc).unwrap();
            }
            writer.commit().unwrap();
        }
        writer.wait_merging_threads().unwrap();
    }
    let bare_build = started.elapsed().as_secs_f64();
    let reader = bare.reader().unwrap();
    let searcher = reader.searcher();
    let mut query_analyzer = analyzer();
    let bare_search = |text: &str, analyzer: &mut TextAnalyzer| -> Vec<String> {
        let mut terms = Vec::new();
        analyzer.token_stream(text).process(&mut |t| terms.push(t.text.clone()));
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .map(|t| {
                let q: Box<dyn Query> = Box::new(TermQuery::new(
                    Term::from_field_text(body_field, t),
                    IndexRecordOption::WithFreqs,
                ));
                (Occur::Should, q)
            })
            .collect();
        let top = searcher
            .search(&BooleanQuery::new(clauses), &TopDocs::with_limit(10).order_by_score())
            .unwrap();
        top.iter()
            .map(|(_, address)| {
                let ids = searcher
                    .segment_reader(address.segment_ord)
                    .fast_fields()
                    .str("doc_id")
                    .unwrap()
                    .unwrap();
                let mut id = String::new();
                let ord = ids.term_ords(address.doc_id).next().unwrap();
                ids.ord_to_str(ord, &mut id).unwrap();
                id
            })
            .collect()
    };

    // mkflow: the same documents upserted in 10k-row commits, with and without the text index.
    let columns = Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("body", DataType::Utf8, true),
    ]);
    let mut upsert_rate = Vec::new();
    let data = tempfile::tempdir().unwrap();
    for (name, text_columns) in [("off", Some(Vec::new())), ("on", None)] {
        let index = KnowledgeIndex::open_or_create(data.path().join(name), &columns, &settings(text_columns)).unwrap();
        let started = Instant::now();
        for (chunk_ids, chunk_bodies) in ids.chunks(10_000).zip(bodies.chunks(10_000)) {
            index.upsert(&[rows(&index, chunk_ids, chunk_bodies)]).unwrap();
        }
        upsert_rate.push(count as f64 / started.elapsed().as_secs_f64());
    }
    println!(
        "build: bare tantivy {:.0} docs/s | mkflow upsert (rows only) {:.0} docs/s, with text index {:.0} docs/s ({:.2}x)",
        count as f64 / bare_build,
        upsert_rate[0],
        upsert_rate[1],
        upsert_rate[1] / upsert_rate[0]
    );
    let index = Arc::new(KnowledgeIndex::open(data.path().join("on")).unwrap());
    let engine = Engine::new(EngineConfig {
        home: assets::home_dir(),
        default_model: None,
        embed_threads: None,
        until_caught_up: false,
        ..EngineConfig::new(tempfile::tempdir().unwrap().keep())
    })
    .await
    .unwrap();
    engine.register_index("bench", index.clone()).await.unwrap();

    for (kind, queries) in [("questions", &questions), ("keywords", &keywords)] {
        let (mut bare_us, mut sql_us, mut same) = (Vec::new(), Vec::new(), 0usize);
        let mut direct_us = Vec::new();
        for q in queries {
            let query = mkflow_index::TextQuery {
                text: q.clone(),
                column: None,
                syntax: mkflow_index::QuerySyntax::Terms,
            };
            let started = Instant::now();
            std::hint::black_box(index.text_search(&query, 10, None).unwrap());
            direct_us.push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            let expected = bare_search(q, &mut query_analyzer);
            bare_us.push(started.elapsed().as_secs_f64() * 1e6);
            let sql = format!("SELECT doc_id, score FROM text_search(bench, '{q}', 10)");
            let started = Instant::now();
            let batches = engine.sql(&sql).await.unwrap();
            sql_us.push(started.elapsed().as_secs_f64() * 1e6);
            let got: Vec<String> = batches
                .iter()
                .flat_map(|b| {
                    let a = b.column(0).as_string::<i32>().clone();
                    (0..a.len()).map(move |i| a.value(i).to_string()).collect::<Vec<_>>()
                })
                .collect();
            same += expected.iter().filter(|id| got.contains(id)).count();
        }
        println!("{kind}:");
        let bare_qps = summary("  bare tantivy", bare_us);
        summary("  index text_search (no SQL)", direct_us);
        let sql_qps = summary("  SQL text_search", sql_us);
        println!("  SQL / bare QPS: {:.2} (target >= 0.5)", sql_qps / bare_qps);
        println!(
            "  top-10 agreement SQL vs bare: {:.3}",
            same as f64 / (10.0 * queries.len() as f64)
        );
    }
    let mut floor_us = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        engine.sql("SELECT 1").await.unwrap();
        floor_us.push(started.elapsed().as_secs_f64() * 1e6);
    }
    summary("SQL floor (SELECT 1)", floor_us);

    // Ingest through SQL with the real model, text index on vs off.
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/scifact-sample.jsonl");
    let mut ingest_rate = Vec::new();
    for (name, options) in [("off", "OPTIONS ('text_columns' '')"), ("on", "")] {
        let engine = Engine::new(EngineConfig {
            home: assets::home_dir(),
            default_model: None,
            embed_threads: None,
            until_caught_up: false,
            ..EngineConfig::new(tempfile::tempdir().unwrap().keep())
        })
        .await
        .unwrap();
        // Load the model before timing.
        engine.sql("SELECT embed('warm up')").await.unwrap();
        let script = format!(
            "CREATE EXTERNAL TABLE docs STORED AS JSON LOCATION '{}';
             CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
               STORED AS KB LOCATION 'kb_{name}' {options};
             INSERT INTO kb SELECT doc_id, title, body, embed(concat_ws('. ', title, body)) FROM docs;",
            corpus.display()
        );
        let started = Instant::now();
        engine.run_script("bench", &script, |_| {}).await.unwrap();
        ingest_rate.push(400.0 / started.elapsed().as_secs_f64());
    }
    println!(
        "ingest with embed() (sample corpus, 400 docs): text index off {:.1} docs/s, on {:.1} docs/s ({:.2}x, target >= 0.9)",
        ingest_rate[0],
        ingest_rate[1],
        ingest_rate[1] / ingest_rate[0]
    );
}
