//! What a network client may run, decided from the parsed statement and its logical plan —
//! never from the SQL text.
//!
//! - [`authorize`]: the statement's kind against the client's role (a reader runs `SELECT`,
//!   `EXPLAIN` of a read, `SHOW`, `DESCRIBE`); the settings a `SET` may change; the size of its
//!   string literals.
//! - [`confine`]: the files a statement names (`CREATE EXTERNAL TABLE … LOCATION`,
//!   `COPY … TO`) resolved under the allowed directories, and rewritten to those resolved paths.
//! - [`authorize_plan`]: a reader's plan calls no function that spends the server's generation
//!   budget and writes dead letters (`mk_metadata`, `mk_qa`, `mk_summary`).

use std::ops::ControlFlow;
use std::path::Path;

use datafusion::common::Result;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::parser::{CopyToSource, Statement};
use datafusion::sql::sqlparser::ast::{Value, ValueWithSpan, Visit, Visitor};
use mkflow_udfs::mk::MkOptions;

use crate::access::{Access, Refusal, Role};
use crate::sources::kafka::KAFKA_FORMAT;
use crate::sources::{JSONL_FORMAT, STDIN_LOCATION};
use crate::statement::StatementKind;

/// Functions that generate with the server's LLM and record failures: admin only.
const GENERATING_FUNCTIONS: [&str; 3] = ["mk_metadata", "mk_qa", "mk_summary"];

/// DataFusion settings a network admin may change for its own request (display and parsing
/// only); every other `datafusion.*` setting belongs to the server's configuration.
const CLIENT_DATAFUSION_SETTINGS: [&str; 4] = [
    "datafusion.explain.",
    "datafusion.format.",
    "datafusion.sql_parser.",
    "datafusion.execution.time_zone",
];

/// Checks a network client's statement before it is planned.
pub(super) fn authorize(statement: &Statement, role: Role, access: &Access) -> Result<()> {
    let kind = StatementKind::of(statement);
    if role == Role::Read && !kind.only_reads() {
        return Err(Refusal::Forbidden(format!(
            "{} needs the admin role; this client's token has the read role",
            kind.describe()
        ))
        .into_error());
    }
    if let StatementKind::Set { variable } = &kind {
        settable(variable.as_deref())?;
    }
    check_literals(statement, access.limits.max_literal_bytes)
}

/// Whether a network client may `SET` (or `RESET`) `variable` for its session.
fn settable(variable: Option<&str>) -> Result<()> {
    let Some(variable) = variable else {
        return Err(Refusal::Forbidden(
            "this form of SET changes several settings at once, which network clients cannot do; SET one setting"
                .into(),
        )
        .into_error());
    };
    let server_only = match variable.split_once('.') {
        Some((prefix, name)) if prefix == <MkOptions as datafusion::config::ConfigExtension>::PREFIX => {
            MkOptions::SERVER_ONLY.contains(&name)
        }
        _ => !CLIENT_DATAFUSION_SETTINGS
            .iter()
            .any(|allowed| variable.starts_with(allowed)),
    };
    if server_only {
        return Err(Refusal::Forbidden(format!(
            "'{variable}' is set by the server's configuration only (the [mkflow] table of its TOML file, or a pipeline), \
             not by network clients"
        ))
        .into_error());
    }
    Ok(())
}

/// Refuses string literals longer than `max_bytes`.
fn check_literals(statement: &Statement, max_bytes: usize) -> Result<()> {
    struct Literals {
        max_bytes: usize,
    }
    impl Visitor for Literals {
        type Break = usize;

        fn pre_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<usize> {
            let length = match &value.value {
                Value::SingleQuotedString(s)
                | Value::DoubleQuotedString(s)
                | Value::EscapedStringLiteral(s)
                | Value::UnicodeStringLiteral(s)
                | Value::NationalStringLiteral(s)
                | Value::HexStringLiteral(s)
                | Value::SingleQuotedByteStringLiteral(s)
                | Value::DoubleQuotedByteStringLiteral(s)
                | Value::SingleQuotedRawStringLiteral(s)
                | Value::DoubleQuotedRawStringLiteral(s) => s.len(),
                Value::DollarQuotedString(s) => s.value.len(),
                _ => 0,
            };
            if length > self.max_bytes {
                ControlFlow::Break(length)
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    let mut visitor = Literals { max_bytes };
    let found = match statement {
        Statement::Statement(inner) => inner.visit(&mut visitor),
        Statement::Explain(explain) => return check_literals(&explain.statement, max_bytes),
        Statement::CopyTo(copy) => match &copy.source {
            CopyToSource::Query(query) => query.visit(&mut visitor),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => ControlFlow::Continue(()),
    };
    match found {
        ControlFlow::Break(length) => Err(Refusal::Limit(format!(
            "a string literal of {length} bytes exceeds max_literal_bytes ({max_bytes})"
        ))
        .into_error()),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Resolves the files a network client's statement names under its allowed directories and
/// rewrites the statement to name the resolved paths; refuses URLs, standard input and Kafka
/// sources (those come from the server's pipelines).
pub(super) fn confine(statement: &mut Statement, access: &Access, data_dir: &Path) -> Result<()> {
    let resolve = |location: &str| -> Result<String> {
        if location.contains("://") {
            return Err(Refusal::Forbidden(format!(
                "LOCATION '{location}': network clients name files under the data directory, not URLs"
            ))
            .into_error());
        }
        Ok(access
            .resolve_location(location, data_dir)?
            .to_string_lossy()
            .into_owned())
    };
    match statement {
        Statement::CreateExternalTable(create) => {
            let format = create.file_type.to_ascii_uppercase();
            if format == KAFKA_FORMAT {
                return Err(Refusal::Forbidden(
                    "STORED AS KAFKA: Kafka sources run as pipelines of the server's configuration, not from network clients"
                        .into(),
                )
                .into_error());
            }
            if format == JSONL_FORMAT && create.locations.iter().any(|l| l == STDIN_LOCATION) {
                return Err(Refusal::Forbidden(
                    "LOCATION '-' reads the server's standard input, which network clients cannot".into(),
                )
                .into_error());
            }
            for location in &mut create.locations {
                *location = resolve(location)?;
            }
        }
        Statement::CopyTo(copy) => copy.target = resolve(&copy.target)?,
        Statement::Explain(explain) => confine(&mut explain.statement, access, data_dir)?,
        Statement::Statement(_) | Statement::Reset(_) => {}
    }
    Ok(())
}

/// Checks a network client's plan: a reader calls no generating function.
pub(super) fn authorize_plan(plan: &LogicalPlan, role: Role) -> Result<()> {
    if role == Role::Admin {
        return Ok(());
    }
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                let name = match e {
                    Expr::ScalarFunction(f) => Some(f.name()),
                    Expr::AggregateFunction(f) => Some(f.func.name()),
                    _ => None,
                };
                if let Some(name) = name.filter(|n| GENERATING_FUNCTIONS.contains(n)) {
                    found = Some(name.to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    match found {
        Some(name) => Err(Refusal::Forbidden(format!(
            "{name}() generates with the server's LLM and needs the admin role; this client's token has the read role"
        ))
        .into_error()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;
    use crate::access::Limits;

    fn parse(sql: &str) -> Statement {
        DFParser::parse_sql(sql).unwrap().pop_front().unwrap()
    }

    fn check(sql: &str, role: Role) -> std::result::Result<(), String> {
        authorize(&parse(sql), role, &Access::network(role, Limits::default(), vec![])).map_err(|e| e.to_string())
    }

    #[test]
    fn readers_read_and_admins_change() {
        for sql in [
            "SELECT 1",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "EXPLAIN SELECT * FROM kb",
            "EXPLAIN ANALYZE SELECT 1",
            "SHOW TABLES",
            "DESCRIBE kb",
            "SELECT * FROM vector_search(kb, 'x', 3)",
        ] {
            assert_eq!(check(sql, Role::Read), Ok(()), "{sql}");
        }
        for (sql, kind) in [
            ("DELETE FROM kb WHERE doc_id <> ''", "DELETE"),
            ("INSERT INTO kb SELECT 1", "INSERT"),
            ("DROP TABLE kb", "DDL"),
            (
                "CREATE EXTERNAL TABLE t STORED AS KB LOCATION 't'",
                "CREATE EXTERNAL TABLE",
            ),
            ("SET mkflow.route_clusters = 3", "SET"),
            ("EXPLAIN ANALYZE DELETE FROM kb", "EXPLAIN ANALYZE"),
            ("COPY kb TO 'out.parquet'", "COPY"),
            ("UPDATE kb SET title = 'x'", "UPDATE"),
        ] {
            let error = check(sql, Role::Read).unwrap_err();
            assert!(
                error.contains(kind) && error.contains("admin role") && error.contains("read role"),
                "{sql}: {error}"
            );
            if !sql.starts_with("SET") {
                assert_eq!(check(sql, Role::Admin), Ok(()), "{sql}");
            }
        }
    }

    #[test]
    fn server_settings_are_not_for_network_clients() {
        assert_eq!(check("SET mkflow.route_clusters = 3", Role::Admin), Ok(()));
        assert_eq!(check("SET datafusion.explain.format = 'tree'", Role::Admin), Ok(()));
        for sql in [
            "SET mkflow.llm_api_key_env = 'MKFLOW_AUTH_TOKEN'",
            "SET mkflow.llm_base_url = 'http://127.0.0.1:1/v1'",
            "SET MKFLOW.LOCAL_MODEL = '/tmp/x'",
            "SET mkflow.metadata_schema = '/etc/passwd'",
            "RESET mkflow.llm_base_url",
            "SET datafusion.runtime.memory_limit = '100G'",
            "SET datafusion.execution.batch_size = 100000000",
            "SET TIME ZONE 'UTC'",
        ] {
            let error = check(sql, Role::Admin).unwrap_err();
            assert!(error.contains("network clients"), "{sql}: {error}");
        }
    }

    #[test]
    fn long_literals_are_refused_naming_the_limit() {
        let limits = Limits {
            max_literal_bytes: 10,
            ..Limits::default()
        };
        let access = Access::network(Role::Admin, limits, vec![]);
        let long = parse("SELECT * FROM kb WHERE title = 'more than ten bytes'");
        let error = authorize(&long, Role::Admin, &access).unwrap_err().to_string();
        assert!(error.contains("max_literal_bytes (10)"), "{error}");
        assert!(authorize(&parse("SELECT 'short'"), Role::Admin, &access).is_ok());
        let explained = parse("EXPLAIN SELECT 'more than ten bytes'");
        assert!(authorize(&explained, Role::Admin, &access).is_err());
    }

    #[test]
    fn locations_are_confined_and_rewritten() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().canonicalize().unwrap();
        std::fs::write(data.join("docs.jsonl"), "{}").unwrap();
        let access = Access::network(Role::Admin, Limits::default(), vec![data.clone()]);
        let mut create =
            parse("CREATE EXTERNAL TABLE d (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION 'docs.jsonl'");
        confine(&mut create, &access, &data).unwrap();
        let Statement::CreateExternalTable(create) = create else {
            unreachable!()
        };
        assert_eq!(
            create.locations,
            vec![data.join("docs.jsonl").to_string_lossy().to_string()]
        );
        for sql in [
            "CREATE EXTERNAL TABLE pw (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION '/etc/passwd'",
            "CREATE EXTERNAL TABLE c STORED AS CSV LOCATION '../secrets.csv'",
            "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 'file:///etc/x.parquet'",
            "CREATE EXTERNAL TABLE s (doc_id VARCHAR NOT NULL) STORED AS JSONL LOCATION '-'",
            "CREATE EXTERNAL TABLE k (doc_id VARCHAR) STORED AS KAFKA LOCATION 'topic'",
            "COPY (SELECT 1) TO '/root/.bashrc'",
            "EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'",
        ] {
            let mut statement = parse(sql);
            let error = confine(&mut statement, &access, &data).unwrap_err().to_string();
            assert!(
                error.contains("network clients") || error.contains("LOCATION"),
                "{sql}: {error}"
            );
        }
        let mut copy = parse("COPY (SELECT 1) TO 'out.csv'");
        confine(&mut copy, &access, &data).unwrap();
        let Statement::CopyTo(copy) = copy else { unreachable!() };
        assert_eq!(copy.target, data.join("out.csv").to_string_lossy());
    }
}
