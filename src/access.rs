//! Who runs a session's statements, and what they may do: the role of a network client, where
//! the `LOCATION`s it names may point, which settings it may change, and the bounds every query
//! is held to.
//!
//! An [`Access`] travels in each session's configuration ([`Access::of`]); the engine checks
//! statements against it before planning them, and the search functions check `k` and query
//! sizes with it. Local sessions (the command line, pipeline files) are trusted and held only to
//! the bounds that keep the process alive (`max_value_bytes`, `max_expression_depth`); network
//! sessions (`mkflow serve`) get a [`Role`] from their bearer token and every bound.
//!
//! Refusals are [`Refusal`] errors, which the HTTP layer answers with the status they carry
//! (403 for a role, 400 or 413 for a limit), naming the limit or the role.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use datafusion::common::{DataFusionError, Result};
use datafusion::execution::config::SessionConfig;

/// What a network client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: `SELECT`, `EXPLAIN`, `SHOW`, `DESCRIBE`, the search table functions and `embed()`.
    Read,
    /// Everything a reader may, plus DDL, DML and `SET`.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Admin => "admin",
        })
    }
}

/// Where a session's statements come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The command line or a pipeline file of the server's own configuration: trusted.
    Local,
    /// A network client with this role.
    Network(Role),
}

/// The bounds a query is held to. Every refusal names the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most rows a network search may ask for (`k`, or a `LIMIT` pushed into it).
    pub max_k: usize,
    /// Longest query text a network search embeds, in bytes.
    pub max_query_text_bytes: usize,
    /// Most bytes one call of a growing function (`repeat`, `lpad`, `concat`, …) may make over
    /// a batch, estimated from its arguments before it runs (every session: a local one too
    /// must not abort the process).
    pub max_value_bytes: usize,
    /// Longest string literal a network statement may hold, in bytes.
    pub max_literal_bytes: usize,
    /// Deepest expression nesting a script may hold (a chain of `n` operators nests `n` deep:
    /// write long disjunctions as `IN (…)`).
    pub max_expression_depth: usize,
    /// Most rows a network statement may return.
    pub max_result_rows: usize,
    /// Most bytes (Arrow memory) a network statement's result may hold.
    pub max_result_bytes: usize,
    /// Memory a network request's operators (sorts, joins, aggregates) may reserve.
    pub max_query_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_k: 10_000,
            max_query_text_bytes: 64 << 10,
            max_value_bytes: 1 << 30,
            max_literal_bytes: 64 << 10,
            max_expression_depth: 1000,
            max_result_rows: 1_000_000,
            max_result_bytes: 256 << 20,
            max_query_memory: 1 << 30,
        }
    }
}

/// A session's access: its origin, its limits, and the directories its `LOCATION`s may name.
#[derive(Debug, Clone)]
pub struct Access {
    /// Who runs the statements.
    pub origin: Origin,
    /// The bounds of every query.
    pub limits: Limits,
    /// For network sessions: the directories (canonical) that `LOCATION`s must resolve under —
    /// the data directory and the server's `allowed_paths`.
    pub allowed_paths: Vec<PathBuf>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            origin: Origin::Local,
            limits: Limits::default(),
            allowed_paths: Vec::new(),
        }
    }
}

/// Why a statement was refused, and the HTTP status that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The role does not allow the statement.
    Forbidden(String),
    /// A limit was exceeded by what the request asked (400).
    Limit(String),
    /// A limit was exceeded by what the request produced (413).
    TooLarge(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Forbidden(m) | Refusal::Limit(m) | Refusal::TooLarge(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Refusal {}

impl Refusal {
    /// The refusal as an engine error (the HTTP layer finds it again by its type).
    pub fn into_error(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }
}

impl Access {
    /// A network client's access.
    pub fn network(role: Role, limits: Limits, allowed_paths: Vec<PathBuf>) -> Self {
        Access {
            origin: Origin::Network(role),
            limits,
            allowed_paths,
        }
    }

    /// The access recorded in a session's configuration (local and default limits when none is).
    pub fn of(config: &SessionConfig) -> Arc<Access> {
        config.get_extension::<Access>().unwrap_or_default()
    }

    /// Whether the session serves a network client.
    pub fn is_network(&self) -> bool {
        matches!(self.origin, Origin::Network(_))
    }

    /// The role of a network client (`None` for local sessions, which may do everything).
    pub fn role(&self) -> Option<Role> {
        match self.origin {
            Origin::Local => None,
            Origin::Network(role) => Some(role),
        }
    }

    /// Checks a network search's `k` against `max_k` (a local one may ask for any `k`: the
    /// index caps it at its rows).
    pub fn check_k(&self, function: &str, k: usize) -> Result<usize> {
        if self.is_network() && k > self.limits.max_k {
            return Err(Refusal::Limit(format!(
                "{function}: k = {k} exceeds max_k ({}); ask for fewer rows",
                self.limits.max_k
            ))
            .into_error());
        }
        Ok(k)
    }

    /// Checks a script's expression nesting (see [`crate::statement::expression_depth`])
    /// against `max_expression_depth`. A script that does not tokenise passes: the parser names
    /// its error.
    pub fn check_expression_depth(&self, sql: &str) -> Result<()> {
        match crate::statement::expression_depth(sql) {
            Ok(depth) if depth > self.limits.max_expression_depth => Err(Refusal::Limit(format!(
                "the statement nests expressions {depth} levels deep, more than max_expression_depth ({}); \
                 write long chains of OR as IN (…)",
                self.limits.max_expression_depth
            ))
            .into_error()),
            _ => Ok(()),
        }
    }

    /// Checks a network search's query text against `max_query_text_bytes`.
    pub fn check_query_text(&self, function: &str, text: &str) -> Result<()> {
        if self.is_network() && text.len() > self.limits.max_query_text_bytes {
            return Err(Refusal::Limit(format!(
                "{function}: the query text has {} bytes, more than max_query_text_bytes ({})",
                text.len(),
                self.limits.max_query_text_bytes
            ))
            .into_error());
        }
        Ok(())
    }

    /// Where `location` (of a `CREATE EXTERNAL TABLE`) points: relative locations are under
    /// `base` (the data directory). A network session's location must stay under its allowed
    /// directories — no `..`, no absolute path elsewhere, no symbolic link leading out.
    pub fn resolve_location(&self, location: &str, base: &Path) -> Result<PathBuf> {
        let path = Path::new(location);
        let resolved = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        if !self.is_network() {
            return Ok(resolved);
        }
        let refuse = |why: &str| {
            Refusal::Forbidden(format!(
                "LOCATION '{location}' {why}: a network client's locations must be under the data directory{}",
                if self.allowed_paths.len() > 1 {
                    " or the server's allowed_paths"
                } else {
                    " (the server's allowed_paths adds others)"
                }
            ))
            .into_error()
        };
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(refuse("contains '..'"));
        }
        let real = canonical_prefix(&resolved).map_err(|e| refuse(&format!("cannot be resolved ({e})")))?;
        if self.allowed_paths.iter().any(|root| real.starts_with(root)) {
            Ok(resolved)
        } else {
            Err(refuse("is outside the allowed directories"))
        }
    }
}

/// The real path of `path`: its longest existing ancestor with every symbolic link resolved,
/// and the rest (not created yet) appended as written.
fn canonical_prefix(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                return Ok(rest
                    .iter()
                    .rev()
                    .fold(real, |acc, part: &std::ffi::OsString| acc.join(part)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = existing.file_name().map(|n| n.to_os_string());
                match (name, existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name);
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(dir: &Path) -> Access {
        Access::network(Role::Admin, Limits::default(), vec![dir.canonicalize().unwrap()])
    }

    #[test]
    fn network_locations_stay_in_the_allowed_directories() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(data.join("docs")).unwrap();
        std::fs::write(data.join("docs/a.jsonl"), "{}").unwrap();
        let access = network(&data);
        assert_eq!(
            access.resolve_location("docs/a.jsonl", &data).unwrap(),
            data.join("docs/a.jsonl")
        );
        // Not created yet: resolved through its existing parent.
        assert!(access.resolve_location("new_kb", &data).is_ok());
        assert!(access.resolve_location(data.join("x").to_str().unwrap(), &data).is_ok());
        for bad in ["/etc/passwd", "../outside", "docs/../../outside", "/tmp"] {
            let error = access.resolve_location(bad, &data).unwrap_err().to_string();
            assert!(error.contains(&format!("LOCATION '{bad}'")), "{error}");
        }
        // A symbolic link inside the data directory that leads out of it.
        std::os::unix::fs::symlink("/etc", data.join("etc")).unwrap();
        let error = access.resolve_location("etc/passwd", &data).unwrap_err().to_string();
        assert!(error.contains("outside the allowed directories"), "{error}");
        assert!(access.resolve_location("etc/not-yet", &data).is_err());
        // Local sessions are trusted.
        assert!(Access::default().resolve_location("/etc/passwd", &data).is_ok());
    }

    #[test]
    fn limits_are_named_in_refusals() {
        assert!(
            Access::default().check_k("vector_search", 1_000_000_000_000).is_ok(),
            "local: capped by the index"
        );
        let access = Access::network(Role::Read, Limits::default(), vec![]);
        assert_eq!(access.check_k("vector_search", 10_000).unwrap(), 10_000);
        let error = access
            .check_k("vector_search", 1_000_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(error.contains("max_k (10000)"), "{error}");
        let long = "x".repeat(access.limits.max_query_text_bytes + 1);
        let error = access.check_query_text("qa_search", &long).unwrap_err().to_string();
        assert!(error.contains("max_query_text_bytes"), "{error}");
    }
}
