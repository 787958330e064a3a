//! The options of a source an `INSERT` can read piece by piece and resume (see
//! `streaming/`): how many records go into one piece (and one commit), and whether the next
//! run goes on from the stored position.

use datafusion::common::{Result, plan_err};

/// `commit_rows` and `resume`, as a source table's options set them.
#[derive(Debug, Clone, Copy)]
pub struct ResumeOptions {
    /// Records per batch, and per commit of an `INSERT` into a knowledge index.
    pub commit_rows: usize,
    /// Whether such an `INSERT` stores its position with each commit and resumes from it.
    pub resume: bool,
}

impl ResumeOptions {
    /// The options' defaults: `commit_rows` records, resuming.
    pub fn new(commit_rows: usize) -> Self {
        ResumeOptions {
            commit_rows,
            resume: true,
        }
    }

    /// Takes option `key` = `value` when it is one of these (`Ok(false)` when it is not);
    /// `records` names what `commit_rows` counts, for the error.
    pub fn take(&mut self, key: &str, value: &str, records: &str) -> Result<bool> {
        match key {
            "commit_rows" => match value.parse::<usize>() {
                Ok(rows) if rows > 0 => self.commit_rows = rows,
                _ => return plan_err!("commit_rows must be a positive number of {records}, not '{value}'"),
            },
            "resume" => match value.to_lowercase().as_str() {
                "true" => self.resume = true,
                "false" => self.resume = false,
                _ => return plan_err!("resume must be 'true' or 'false', not '{value}'"),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }
}
