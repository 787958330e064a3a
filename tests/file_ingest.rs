//! Inserting a JSON Lines file (or a directory of text files) into a knowledge index: batch by
//! batch, each batch committed with the position after it, so a re-run goes on where the last
//! one stopped — after new lines were appended, and after a SIGKILL at any moment — and inserts
//! every line (every file) exactly once.

mod common;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use mkflow_index::{KnowledgeIndex, Manifest};
use server::{kill_when, mkflow};

/// The sample corpus's titles, in order.
fn sample_titles() -> Vec<String> {
    std::fs::read_to_string(sample_corpus())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["title"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// `count` documents (ids `d0`…) with the sample corpus's titles, one JSON object per line, and
/// a bad line after every `bad_every` good ones. Returns the text and the bad lines' numbers.
fn corpus(count: usize, bad_every: usize, id_prefix: &str) -> (String, Vec<u64>) {
    let titles = sample_titles();
    let (mut text, mut bad) = (String::new(), Vec::new());
    let mut line = 0u64;
    for i in 0..count {
        let record = serde_json::json!({"doc_id": format!("{id_prefix}{i}"), "title": titles[i % titles.len()]});
        text.push_str(&format!("{record}\n"));
        line += 1;
        if (i + 1) % bad_every == 0 {
            text.push_str(&format!("{{\"doc_id\": \"{id_prefix}{i}-broken\", \"title\": \n"));
            line += 1;
            bad.push(line);
        }
    }
    (text, bad)
}

/// A pipeline inserting `file` into index `kb` in batches of `commit_rows` lines.
fn script(file: &Path, options: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}'
           OPTIONS ({options});
         CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, title, embed(title) FROM docs;",
        file.display()
    )
}

/// Runs `script` on a fresh engine over `data`; returns the rows the last statement inserted.
async fn run(data: &Path, script: &str) -> i64 {
    let engine = engine(data).await;
    let results = engine.run_script("test", script, |_| {}).await.unwrap();
    single_int(&results.last().unwrap().batches)
}

fn manifest(data: &Path) -> Manifest {
    Manifest::read_latest(&data.join("kb"))
        .unwrap()
        .expect("the index exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jsonl_insert_commits_batch_by_batch_and_a_rerun_reads_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = (dir.path().join("data"), dir.path().join("docs.jsonl"));
    let (text, bad) = corpus(60, 20, "d");
    std::fs::write(&file, &text).unwrap();
    let script = script(&file, "'commit_rows' '7'");

    assert_eq!(run(&data, &script).await, 60);
    let first = manifest(&data);
    assert_eq!((first.rows, first.next_key), (60, 60));
    // Creating the index is generation 1; then 63 lines in batches of 7: 9 commits, each with
    // the position after its batch.
    assert_eq!(first.generation, 1 + 9, "one commit per batch of lines");
    let positions: Vec<(&str, i64)> = first.source_offsets.iter().collect();
    assert_eq!(positions.len(), 3, "{positions:?}");
    assert!(positions[0].0.starts_with("file:") && positions[0].0.ends_with("docs.jsonl"));
    assert_eq!(positions[0].1, text.len() as i64, "byte offset at the end of the file");
    assert_eq!(positions[2], (format!("{}#lines", positions[0].0).as_str(), 63));

    // Nothing new: nothing inserted, nothing committed.
    assert_eq!(run(&data, &script).await, 0);
    assert_eq!(manifest(&data).generation, 1 + 9);

    // Appended lines, and only they, are read by the next run.
    let (more, _) = corpus(10, 100, "e");
    std::fs::write(&file, format!("{text}{more}")).unwrap();
    assert_eq!(run(&data, &script).await, 10);
    let appended = manifest(&data);
    assert_eq!((appended.rows, appended.next_key), (70, 70));

    // A file rewritten under the same name is read from its start.
    let (rewritten, _) = corpus(30, 100, "f");
    std::fs::write(&file, &rewritten).unwrap();
    assert_eq!(run(&data, &script).await, 30);
    assert_eq!(manifest(&data).rows, 100);

    // `resume 'false'` reads the whole file every time.
    let script = script_with_resume_off(&file);
    assert_eq!(run(&data, &script).await, 30);
    assert_eq!(run(&data, &script).await, 30);
    assert_eq!(manifest(&data).next_key, 160);

    // The bad lines went to the dead letters once each, with their line numbers.
    let engine = engine(&data).await;
    let letters = engine
        .sql("SELECT position FROM dead_letters ORDER BY position")
        .await
        .unwrap();
    let positions: Vec<u64> = strings(&letters, "position")
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(positions, bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jsonl_options_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.jsonl");
    std::fs::write(&file, "{\"doc_id\": \"a\"}\n").unwrap();
    let engine = engine(&dir.path().join("data")).await;
    let create = |options: &str| {
        format!(
            "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION '{}' OPTIONS ({options})",
            file.display()
        )
    };
    for (options, expected) in [
        (
            "'commit_rows' '0'",
            "commit_rows must be a positive number of lines, not '0'",
        ),
        ("'commit_rows' '-5'", "not '-5'"),
        (
            "'commit_rows' '99999999999999999999999'",
            "commit_rows must be a positive number",
        ),
        ("'resume' 'maybe'", "resume must be 'true' or 'false', not 'maybe'"),
        (
            "'batch' '10'",
            "unknown option 'batch' for STORED AS JSONL (known: commit_rows, resume)",
        ),
    ] {
        let error = sql_error(&engine, &create(options)).await;
        assert!(error.contains(expected), "{options}: {error}");
    }
    // A huge batch size is bounded by the bytes a batch may hold, and works.
    engine.sql(&create("'commit_rows' '1000000000'")).await.unwrap();
    assert_eq!(single_int(&engine.sql("SELECT count(*) FROM docs").await.unwrap()), 1);
}

fn script_with_resume_off(file: &Path) -> String {
    script(file, "'resume' 'false', 'commit_rows' '100'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_that_is_not_row_by_row_runs_whole_as_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = (dir.path().join("data"), dir.path().join("docs.jsonl"));
    let (text, _) = corpus(20, 100, "d");
    // Every document twice: the GROUP BY must see both copies, across batch boundaries.
    std::fs::write(&file, format!("{text}{text}")).unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}'
           OPTIONS ('commit_rows' '3');
         CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, copies BIGINT) STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, max(title), count(*), embed(max(title)) FROM docs GROUP BY doc_id;",
        file.display()
    );
    let engine = engine(&data).await;
    engine.run_script("test", &script, |_| {}).await.unwrap();
    let copies = engine.sql("SELECT DISTINCT copies FROM kb").await.unwrap();
    assert_eq!(strings(&copies, "copies"), vec!["2".to_string()]);
    let manifest = manifest(&data);
    assert_eq!(
        (manifest.rows, manifest.generation),
        (20, 1 + 1),
        "created, then one commit"
    );
    assert!(manifest.source_offsets.is_empty(), "{:?}", manifest.source_offsets);
    let limited = engine
        .sql("INSERT INTO kb SELECT doc_id, title, 0, embed(title) FROM docs LIMIT 5")
        .await
        .unwrap();
    assert_eq!(single_int(&limited), 5);
}

fn run_binary(data: &Path, pipeline: &Path) -> Child {
    mkflow(data)
        .arg("run")
        .arg(pipeline)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `pipeline` (inserting `total` rows into index `kb` under `data`) `kills` times, each
/// SIGKILLed a varying moment after the index holds a further share of the rows; returns how
/// many kills landed before a run finished.
fn kill_repeatedly(data: &Path, pipeline: &Path, total: usize, kills: usize) -> usize {
    let rows = || {
        Manifest::read_latest(&data.join("kb"))
            .ok()
            .flatten()
            .map_or(0, |m| m.rows)
    };
    (1..=kills)
        .filter(|k| {
            let threshold = (total * k / (kills + 1)).max(rows() + 1);
            let delay = Duration::from_millis((*k as u64 * 41) % 150);
            kill_when(run_binary(data, pipeline), delay, || rows() >= threshold)
        })
        .count()
}

#[test]
fn jsonl_ingestion_is_exactly_once_across_sigkill_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (data, file) = (dir.path().join("data"), dir.path().join("docs.jsonl"));
    let (text, bad) = corpus(800, 50, "d");
    std::fs::write(&file, &text).unwrap();
    let pipeline: PathBuf = dir.path().join("ingest.sql");
    std::fs::write(&pipeline, script(&file, "'commit_rows' '40'")).unwrap();
    assert_eq!(
        kill_repeatedly(&data, &pipeline, 800, 5),
        5,
        "every kill happened before the file was read to its end"
    );
    let status = run_binary(&data, &pipeline).wait().unwrap();
    assert!(status.success(), "the last run reads the file to its end: {status}");

    // Every good line once: 800 rows, and no row key handed out twice for the same line.
    let index = KnowledgeIndex::open(data.join("kb")).unwrap();
    let manifest = index.manifest();
    assert_eq!((manifest.rows, manifest.next_key), (800, 800));
    let letters = std::fs::read_to_string(data.join("dead_letters.jsonl")).unwrap();
    let mut positions: Vec<u64> = letters
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect();
    positions.sort();
    assert_eq!(positions, bad, "each bad line once, under its own line number");
}

/// A directory of `count` Markdown files (`n0000.md`…) with the sample corpus's titles as
/// headings.
fn notes(dir: &Path, count: usize) {
    let titles = sample_titles();
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        let text = format!("# {}\n\nNote {i}.\n", titles[i % titles.len()]);
        std::fs::write(dir.join(format!("n{i:04}.md")), text).unwrap();
    }
}

/// A pipeline inserting the text files under `notes` into index `kb`.
fn notes_script(notes: &Path, options: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE notes STORED AS TEXT_FILES LOCATION '{}' OPTIONS ({options});
         CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
         INSERT INTO kb SELECT doc_id, title, embed(title) FROM notes;",
        notes.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_insert_commits_batch_by_batch_and_a_finished_pass_clears_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let (data, notes_dir) = (dir.path().join("data"), dir.path().join("notes"));
    notes(&notes_dir, 30);
    let script = notes_script(&notes_dir, "'commit_rows' '7'");

    assert_eq!(run(&data, &script).await, 30);
    let first = manifest(&data);
    assert_eq!((first.rows, first.next_key), (30, 30));
    // Creating the index is generation 1; then 30 files in batches of 7: 5 commits.
    assert_eq!(first.generation, 1 + 5, "one commit per batch of files");
    let positions: Vec<(&str, i64)> = first.source_offsets.iter().collect();
    assert_eq!(positions.len(), 2, "{positions:?}");
    assert!(positions[0].0.starts_with("dir:") && positions[0].0.ends_with("notes"));
    assert_eq!(positions[0].1, 0, "the pass is over: the next one starts anew");

    // The next pass reads every file again; each replaces its row.
    std::fs::write(notes_dir.join("n0003.md"), "# Changed\n").unwrap();
    assert_eq!(run(&data, &script).await, 30);
    let second = manifest(&data);
    assert_eq!((second.rows, second.next_key, second.generation), (30, 60, 6 + 5));
    let engine = engine(&data).await;
    let changed = engine
        .sql("SELECT title FROM kb WHERE doc_id = 'n0003.md'")
        .await
        .unwrap();
    assert_eq!(strings(&changed, "title"), vec!["Changed".to_string()]);

    // Without `resume` no position is stored, and the whole directory is one pass anyway.
    let data = dir.path().join("data-without-resume");
    assert_eq!(run(&data, &notes_script(&notes_dir, "'resume' 'false'")).await, 30);
    assert!(manifest(&data).source_offsets.is_empty());
}

#[test]
fn directory_ingestion_is_exactly_once_across_sigkill_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (data, notes_dir) = (dir.path().join("data"), dir.path().join("notes"));
    notes(&notes_dir, 400);
    let pipeline: PathBuf = dir.path().join("ingest.sql");
    std::fs::write(&pipeline, notes_script(&notes_dir, "'commit_rows' '20'")).unwrap();
    assert_eq!(
        kill_repeatedly(&data, &pipeline, 400, 4),
        4,
        "every kill happened before the directory was read to its end"
    );
    let stored = Manifest::read_latest(&data.join("kb")).unwrap().unwrap().source_offsets;
    let done = stored
        .iter()
        .find(|(key, _)| key.starts_with("dir:") && !key.contains('#'));
    assert!(
        done.is_some_and(|(_, files)| files > 0 && files % 20 == 0),
        "a pass cut short stores the files it committed: {stored:?}"
    );
    let status = run_binary(&data, &pipeline).wait().unwrap();
    assert!(
        status.success(),
        "the last run reads the directory to its end: {status}"
    );

    // Every file once: 400 rows, and no row key handed out twice for the same file.
    let manifest = KnowledgeIndex::open(data.join("kb")).unwrap().manifest();
    assert_eq!((manifest.rows, manifest.next_key), (400, 400));
}
