//! Chunked knowledge indexes (`OPTIONS ('chunk_tokens' 'N')`): a folder of long Markdown
//! manuals read by `TEXT_FILES`, each answer only in a manual's last section, found by
//! `vector_search`, `text_search`, `hybrid_search` and `chunk_search` through its chunk.

mod common;

use std::path::Path;

use common::*;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int32Type, Int64Type};
use mkflow::Engine;

/// Sentences of routine content every manual is padded with (shared vocabulary, so a manual's
/// first few hundred words say nothing about its last section).
const ROUTINE: [&str; 8] = [
    "Check the logbook at the start of every shift and sign it when the inspection is complete.",
    "Keep walkways clear of tools, cables and packaging so that nobody trips during a rush.",
    "Report worn parts to the supervisor before the end of the day, with their serial numbers.",
    "Wear the protective gloves and glasses issued by the stores whenever a panel is open.",
    "The maintenance schedule lists weekly, monthly and yearly tasks for each station.",
    "Clean filters with compressed air and replace them when the indicator turns orange.",
    "New staff shadow an experienced colleague for two weeks before working alone.",
    "Store spare parts in labelled bins and update the inventory sheet after every use.",
];

/// The manuals: file name, title, and the last section's heading and text (the answer).
const MANUALS: [(&str, &str, &str, &str); 3] = [
    (
        "harbour.md",
        "Harbour operations handbook",
        "Lighthouse lamp",
        "To replace the lighthouse lamp, switch the beacon to its battery, climb to the lantern room, \
         unscrew the brass collar anticlockwise and fit a new xenon bulb of 1000 watts.",
    ),
    (
        "bakery.md",
        "Bakery operations handbook",
        "Sourdough starter",
        "Feed the sourdough starter every morning with equal weights of rye flour and warm water, \
         and keep it in the crock beside the proving cabinet.",
    ),
    (
        "greenhouse.md",
        "Greenhouse operations handbook",
        "Frost alarm",
        "When the frost alarm sounds, close the roof vents, light the paraffin heaters in rows \
         three and four and wrap the young citrus trees in fleece.",
    ),
];

/// A long manual: twelve routine sections, then its answer in the last one.
fn manual(title: &str, last_heading: &str, answer: &str) -> String {
    let mut text = format!("# {title}\n\n");
    for section in 0..12 {
        text.push_str(&format!("## Routine {section}\n\n"));
        for paragraph in 0..3 {
            let sentences: Vec<&str> = (0..5)
                .map(|i| ROUTINE[(section * 7 + paragraph * 3 + i) % ROUTINE.len()])
                .collect();
            text.push_str(&sentences.join(" "));
            text.push_str("\n\n");
        }
    }
    text.push_str(&format!("## {last_heading}\n\n{answer}\n"));
    text
}

/// Writes the manuals into `dir`; returns their bodies by file name.
fn write_manuals(dir: &Path) -> Vec<(String, String)> {
    std::fs::create_dir_all(dir).unwrap();
    MANUALS
        .iter()
        .map(|(file, title, heading, answer)| {
            let text = manual(title, heading, answer);
            std::fs::write(dir.join(file), &text).unwrap();
            (file.to_string(), text)
        })
        .collect()
}

/// Creates the manuals table and the chunked index `manuals` (200-token chunks), and ingests.
async fn ingest_manuals(engine: &Engine, folder: &Path, options: &str) {
    let script = format!(
        "CREATE EXTERNAL TABLE files STORED AS TEXT_FILES LOCATION '{}/' OPTIONS ('extensions' 'md');
         CREATE EXTERNAL TABLE IF NOT EXISTS manuals (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR)
           STORED AS KB LOCATION 'manuals' OPTIONS ({options});
         INSERT INTO manuals SELECT doc_id, title, body, NULL FROM files;",
        folder.display()
    );
    engine.run_script("test", &script, |_| {}).await.expect("ingest runs");
}

/// The single number `sql` answers.
async fn count(engine: &Engine, sql: &str) -> i64 {
    single_int(&engine.sql(sql).await.unwrap())
}

/// The character range `[start, end)` of `text`.
fn chars(text: &str, start: i64, end: i64) -> String {
    text.chars().skip(start as usize).take((end - start) as usize).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_markdown_documents_are_found_by_their_last_section() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("docs");
    let bodies = write_manuals(&folder);
    let engine = engine(&dir.path().join("data")).await;
    ingest_manuals(&engine, &folder, "'chunk_tokens' '128', 'chunk_overlap' '16'").await;

    // One row per document; many chunks each.
    assert_eq!(
        single_int(&engine.sql("SELECT count(*) FROM manuals").await.unwrap()),
        3
    );
    let chunks = single_int(&engine.sql("SELECT count(*) FROM manuals_chunks").await.unwrap());
    assert!(chunks >= 3 * 8, "every manual is cut into many chunks: {chunks}");
    let over = single_int(
        &engine
            .sql("SELECT count(*) FROM manuals_chunks WHERE tokens > 128")
            .await
            .unwrap(),
    );
    assert_eq!(over, 0, "no chunk passes chunk_tokens");
    // A document inserted without a vector gets the mean of its chunks'.
    let vectors = single_int(
        &engine
            .sql("SELECT count(*) FROM manuals WHERE embedding IS NOT NULL")
            .await
            .unwrap(),
    );
    assert_eq!(vectors, 3);

    let questions = [
        ("harbour.md", "how do I replace the lighthouse lamp", "xenon bulb"),
        (
            "bakery.md",
            "what should the sourdough starter be fed with",
            "rye flour",
        ),
        (
            "greenhouse.md",
            "what to do when the frost alarm sounds",
            "paraffin heaters",
        ),
    ];
    for (expected, question, answer) in questions {
        let body = &bodies.iter().find(|(f, _)| f == expected).unwrap().1;
        for function in ["vector_search", "text_search", "hybrid_search"] {
            let batches = engine
                .sql(&format!(
                    "SELECT doc_id, best_chunk, best_chunk_index, best_chunk_start, best_chunk_end \
                     FROM {function}(manuals, {}, 3)",
                    quoted(question)
                ))
                .await
                .unwrap();
            let ids = strings(&batches, "doc_id");
            assert_eq!(
                ids.first().map(String::as_str),
                Some(expected),
                "{function}: {question}: {ids:?}"
            );
            let distinct: std::collections::HashSet<&String> = ids.iter().collect();
            assert_eq!(distinct.len(), ids.len(), "{function}: each document once: {ids:?}");
            if function != "text_search" {
                assert_eq!(ids.len(), 3, "{function}: k documents: {ids:?}");
            }
            let best = &strings(&batches, "best_chunk")[0];
            assert!(
                best.contains(answer),
                "{function}: the best chunk holds the answer: {best}"
            );
            let batch = &batches[0];
            let (start, end) = (
                batch.column(3).as_primitive::<Int64Type>().value(0),
                batch.column(4).as_primitive::<Int64Type>().value(0),
            );
            assert_eq!(
                &chars(body, start, end),
                best,
                "{function}: offsets locate the chunk in the body"
            );
            let index = batch.column(2).as_primitive::<Int32Type>().value(0);
            assert!(
                index >= 8,
                "{function}: the answer is in a late chunk, not the first: {index}"
            );
        }
        // Passages: the chunks themselves, the best one holding the answer.
        let passages = engine
            .sql(&format!(
                "SELECT doc_id, text, chunk_index FROM chunk_search(manuals, {}, 5)",
                quoted(question)
            ))
            .await
            .unwrap();
        assert_eq!(strings(&passages, "doc_id")[0], expected);
        assert!(strings(&passages, "text")[0].contains(answer));
        let fused = engine
            .sql(&format!(
                "SELECT chunk_id, text FROM chunk_hybrid_search(manuals, {}, 5)",
                quoted(question)
            ))
            .await
            .unwrap();
        assert!(strings(&fused, "text")[0].contains(answer));
    }

    // Filters on document columns run inside the search: k documents whenever k match.
    let filtered = engine
        .sql("SELECT doc_id FROM vector_search(manuals, 'replace the lighthouse lamp', 2) WHERE doc_id <> 'harbour.md'")
        .await
        .unwrap();
    let ids = strings(&filtered, "doc_id");
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(!ids.contains(&"harbour.md".to_string()));

    // text_search reads the chunked column or the context, nothing else.
    let error = sql_error(&engine, "SELECT * FROM text_search(manuals, 'lamp', 'doc_id', 3)").await;
    assert!(error.contains("chunks of 'body'"), "{error}");
    let by_title = engine
        .sql("SELECT doc_id FROM text_search(manuals, 'bakery', 'title', 3)")
        .await
        .unwrap();
    assert_eq!(strings(&by_title, "doc_id"), vec!["bakery.md"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_follow_upserts_deletes_reopening_and_new_settings() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("docs");
    write_manuals(&folder);
    let data = dir.path().join("data");
    {
        let engine = engine(&data).await;
        ingest_manuals(&engine, &folder, "'chunk_tokens' '128'").await;
        let harbour = count(
            &engine,
            "SELECT count(*) FROM manuals_chunks WHERE doc_id = 'harbour.md'",
        )
        .await;
        assert!(harbour > 8, "{harbour}");
        // A shorter version of a document leaves none of its old chunks behind.
        engine
            .sql("INSERT INTO manuals VALUES ('harbour.md', 'Harbour', 'The lighthouse lamp is a xenon bulb.', NULL)")
            .await
            .unwrap();
        let rows = engine
            .sql("SELECT chunk_id, text FROM manuals_chunks WHERE doc_id = 'harbour.md'")
            .await
            .unwrap();
        assert_eq!(strings(&rows, "chunk_id"), vec!["harbour.md#0"]);
        assert_eq!(strings(&rows, "text"), vec!["The lighthouse lamp is a xenon bulb."]);
        // Deleting a document deletes its chunks.
        engine
            .sql("DELETE FROM manuals WHERE doc_id = 'bakery.md'")
            .await
            .unwrap();
        assert_eq!(
            count(
                &engine,
                "SELECT count(*) FROM manuals_chunks WHERE doc_id = 'bakery.md'"
            )
            .await,
            0
        );
        let hits = engine
            .sql("SELECT doc_id FROM vector_search(manuals, 'sourdough starter', 5)")
            .await
            .unwrap();
        assert_eq!(row_count(&hits), 2, "a deleted document is never found");
    }
    // Reopened from the data directory: the stored settings, the same chunks.
    let engine = engine(&data).await;
    let before = count(&engine, "SELECT count(*) FROM manuals_chunks").await;
    let hits = engine
        .sql("SELECT doc_id, best_chunk FROM vector_search(manuals, 'frost alarm paraffin heaters', 1)")
        .await
        .unwrap();
    assert_eq!(strings(&hits, "doc_id"), vec!["greenhouse.md"]);
    // New settings cut the documents again.
    engine
        .sql("CREATE EXTERNAL TABLE manuals2 (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'manuals' OPTIONS ('chunk_tokens' '64', 'chunk_overlap' '0')")
        .await
        .unwrap();
    let after = count(&engine, "SELECT count(*) FROM manuals2_chunks").await;
    assert!(
        after > before,
        "64-token chunks outnumber 128-token ones: {after} vs {before}"
    );
    let over = count(&engine, "SELECT count(*) FROM manuals2_chunks WHERE tokens > 64").await;
    assert_eq!(over, 0);

    // Bad options are refused with their name.
    for (options, expected) in [
        ("'chunk_tokens' '1000'", "chunk_tokens"),
        ("'chunk_tokens' 'lots'", "'lots' is not a whole number"),
        ("'chunk_tokens' '100', 'chunk_column' 'nope'", "no column 'nope'"),
        ("'chunk_overlap' '10'", "needs chunk_tokens"),
    ] {
        let error = sql_error(
            &engine,
            &format!(
                "CREATE EXTERNAL TABLE bad (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'bad' OPTIONS ({options})"
            ),
        )
        .await;
        assert!(error.contains(expected), "{options}: {error}");
    }
    engine
        .sql("CREATE EXTERNAL TABLE plain (doc_id VARCHAR NOT NULL, body VARCHAR) STORED AS KB LOCATION 'plain'")
        .await
        .unwrap();
    let error = sql_error(&engine, "SELECT * FROM chunk_search(plain, 'x')").await;
    assert!(error.contains("'plain' is not chunked"), "{error}");
}
