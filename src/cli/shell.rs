//! `mkflow shell`: an interactive SQL prompt with history.

use std::path::PathBuf;

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use super::output::{Format, render};
use mkflow::Engine;

const HELP: &str = "\
Type SQL ending with ';' (it may span lines). Commands:
  \\d          list tables and knowledge indexes
  \\d NAME     describe a table
  \\help       this text
  \\q          quit (or Ctrl-D)
Examples:
  SELECT doc_id, title, score FROM vector_search(kb, 'how do vaccines work', 5);
  SELECT doc_id, title, score FROM text_search(kb, 'vaccine adjuvant', 5);
  SELECT doc_id, title, fused_score FROM hybrid_search(kb, 'how do vaccines work', 5);
  SELECT count(*) FROM kb;";

/// Runs the prompt until the user quits. History persists in `history_file`.
pub async fn run(engine: &Engine, history_file: PathBuf) -> anyhow::Result<()> {
    let mut editor = DefaultEditor::new()?;
    let _ = editor.load_history(&history_file);
    println!(
        "mkflow shell — data in {}. \\help for help, \\q to quit.",
        engine.config().data_dir.display()
    );
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() { "mkflow> " } else { "     -> " };
        match editor.readline(prompt) {
            Ok(line) => {
                let trimmed = line.trim();
                if buffer.is_empty() && trimmed.starts_with('\\') {
                    let _ = editor.add_history_entry(trimmed);
                    match trimmed {
                        "\\q" | "\\quit" => break,
                        "\\help" | "\\?" => println!("{HELP}"),
                        "\\d" => run_sql(engine, "SHOW TABLES").await,
                        other if other.starts_with("\\d ") => {
                            run_sql(engine, &format!("DESCRIBE {}", other[3..].trim())).await
                        }
                        other => println!("unknown command {other}; \\help lists them"),
                    }
                    continue;
                }
                buffer.push_str(&line);
                buffer.push('\n');
                if trimmed.ends_with(';') {
                    let sql = std::mem::take(&mut buffer);
                    let _ = editor.add_history_entry(sql.trim());
                    run_sql(engine, &sql).await;
                }
            }
            Err(ReadlineError::Interrupted) => buffer.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(dir) = history_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = editor.save_history(&history_file);
    Ok(())
}

async fn run_sql(engine: &Engine, sql: &str) {
    let started = std::time::Instant::now();
    match engine.sql(sql).await {
        Ok(batches) => match render(&batches, Format::Table) {
            Ok(text) => println!("{text}\n{:.3}s", started.elapsed().as_secs_f64()),
            Err(e) => eprintln!("error: {e}"),
        },
        Err(e) => eprintln!("error: {e}"),
    }
}
