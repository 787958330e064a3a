//! `chunk()` through SQL with the default model's real tokenizer.

mod common;

use common::*;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int32Type, Int64Type};

/// A long Markdown manual: sections of paragraphs of sentences, each word numbered.
fn manual() -> String {
    let mut text = String::from("# Fleet manual\n\nThis manual covers the fleet.\n\n");
    let mut word = 0;
    for section in 0..12 {
        text.push_str(&format!("## Section {section}\n\n"));
        for _ in 0..3 {
            for _ in 0..5 {
                let sentence: Vec<String> = (0..12)
                    .map(|_| {
                        word += 1;
                        format!("w{word}")
                    })
                    .collect();
                text.push_str(&format!("The {} stays here. ", sentence.join(" ")));
            }
            text.push_str("\n\n");
        }
    }
    text
}

/// The default model's tokenizer, untruncated.
fn tokenizer() -> tokenizers::Tokenizer {
    let home = assets_home();
    let path = std::fs::read_dir(home.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("tokenizer.json"))
        .find(|p| p.is_file())
        .expect("the default model's tokenizer");
    let mut tokenizer = tokenizers::Tokenizer::from_file(path).unwrap();
    tokenizer.with_truncation(None).unwrap();
    tokenizer.with_padding(None);
    tokenizer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_respect_the_token_limit_and_the_documents_structure() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let text = manual();
    let tokenizer = tokenizer();
    let whole = tokenizer.encode(text.as_str(), false).unwrap().len();
    assert!(whole > 2000, "the manual is long: {whole} tokens");
    let literal = text.replace('\'', "''");
    for (max, overlap) in [(64usize, 0usize), (100, 20), (254, 0)] {
        let batches = engine
            .sql(&format!(
                "SELECT c['chunk_index'] AS i, c['text'] AS text, c['start_char'] AS s, c['end_char'] AS e, c['tokens'] AS t \
                 FROM (SELECT unnest(chunk('{literal}', {max}, {overlap})) AS c)"
            ))
            .await
            .unwrap();
        let chars: Vec<char> = text.chars().collect();
        let mut previous_end = 0;
        let mut chunks = 0;
        for batch in &batches {
            let (index, texts) = (
                batch.column(0).as_primitive::<Int32Type>(),
                batch.column(1).as_string::<i32>(),
            );
            let (starts, ends) = (
                batch.column(2).as_primitive::<Int64Type>(),
                batch.column(3).as_primitive::<Int64Type>(),
            );
            let tokens = batch.column(4).as_primitive::<Int32Type>();
            for row in 0..batch.num_rows() {
                let chunk = texts.value(row);
                let counted = tokenizer.encode(chunk, false).unwrap().len();
                assert!(
                    counted <= max,
                    "chunk {row} has {counted} tokens, over {max}: {chunk:?}"
                );
                assert_eq!(tokens.value(row) as usize, counted);
                assert_eq!(index.value(row) as usize, chunks);
                let (s, e) = (starts.value(row) as usize, ends.value(row) as usize);
                assert_eq!(
                    chars[s..e].iter().collect::<String>(),
                    chunk,
                    "offsets name the chunk's text"
                );
                if overlap == 0 {
                    assert!(s >= previous_end, "no overlap asked, none given");
                    // Nothing but whitespace is left between chunks.
                    assert!(chars[previous_end..s].iter().all(|c| c.is_whitespace()));
                } else if chunks > 0 && !chunk.starts_with('#') {
                    assert!(s < previous_end, "each chunk repeats the end of the one before");
                } else if chunks > 0 {
                    assert!(s >= previous_end, "a chunk opening a section repeats nothing before it");
                }
                assert!(
                    !chunk.trim_end().lines().last().unwrap().starts_with('#'),
                    "a heading stays with its section: {chunk:?}"
                );
                previous_end = e;
                chunks += 1;
            }
        }
        assert_eq!(
            previous_end,
            text.trim_end().chars().count(),
            "the chunks reach the end"
        );
        assert!(
            chunks >= whole / max,
            "{chunks} chunks of at most {max} for {whole} tokens"
        );
        eprintln!("max {max}, overlap {overlap}: {chunks} chunks for {whole} tokens");
    }
    // The default is the model's limit; more is refused, naming it.
    let batches = engine
        .sql(&format!(
            "SELECT max(c['tokens']) AS t FROM (SELECT unnest(chunk('{literal}')) AS c)"
        ))
        .await
        .unwrap();
    let largest = batches[0].column(0).as_primitive::<Int32Type>().value(0);
    assert!(largest > 200 && largest <= 254, "{largest}");
    let error = engine.sql("SELECT chunk('x', 1000)").await.unwrap_err().to_string();
    assert!(error.contains("between 1 and 254"), "{error}");
    let error = engine.sql("SELECT chunk('x', 10, 6)").await.unwrap_err().to_string();
    assert!(error.contains("at most half"), "{error}");
    let nulls = engine
        .sql("SELECT chunk(NULL) IS NULL AS n, cardinality(chunk('   ')) AS e")
        .await
        .unwrap();
    assert!(nulls[0].column(0).as_boolean().value(0));
    assert_eq!(
        nulls[0]
            .column(1)
            .as_primitive::<datafusion::arrow::datatypes::UInt64Type>()
            .value(0),
        0
    );
}
