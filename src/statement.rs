//! What a parsed SQL statement is, read from its syntax tree (never from its text).
//!
//! [`StatementKind::of`] sorts a [`Statement`] of DataFusion's parser into the kinds mkflow acts
//! on: reading ([`Query`](StatementKind::Query), [`Explain`](StatementKind::Explain) without
//! `ANALYZE`, [`Show`](StatementKind::Show)), changing rows ([`Insert`](StatementKind::Insert),
//! [`Delete`](StatementKind::Delete), [`Update`](StatementKind::Update)), changing the catalog
//! ([`CreateExternalTable`](StatementKind::CreateExternalTable), [`Ddl`](StatementKind::Ddl)),
//! changing the session ([`Set`](StatementKind::Set)) and the rest
//! ([`Other`](StatementKind::Other)). The engine uses it to react to a statement (new tables,
//! new Meta-Knowledge settings), the HTTP server to label query metrics; the kinds are kept
//! coarse and explicit so that statements can be authorised by them (read vs admin).
//!
//! [`search_function`] finds the search table function (`vector_search`, `qa_search`,
//! `mk_search`) a statement calls anywhere in its tree: in subqueries, CTEs, joins, `EXPLAIN`
//! or `COPY (…) TO`. Text that merely looks like a call (a string literal, a comment) is not one.
//!
//! [`placeholders`] lists the parameters (`$1`, `$2`, …) of a statement to be prepared.
//!
//! [`expression_depth`] measures, from the tokens alone, how deep the trees the parser would build
//! are: a chain of operators (`1+1+…`) builds a tree as deep as the chain is long, which every
//! later pass (planning, display, drop) walks recursively; the engine refuses scripts that nest
//! deeper than `max_expression_depth` before parsing them.

use std::ops::ControlFlow;

use datafusion::config::ConfigExtension;
use datafusion::sql::parser::{CopyToSource, ResetStatement, Statement};
use datafusion::sql::sqlparser::ast::{self, ObjectName, ObjectNamePart, TableFactor, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, TokenizerError};
use mkflow_udfs::mk::MkOptions;

/// The kind of a parsed statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// A query that only reads: `SELECT …`, `WITH … SELECT …`, `VALUES …`.
    Query,
    /// `EXPLAIN [ANALYZE] <statement>`. With `analyze` the explained statement really runs
    /// (an `EXPLAIN ANALYZE INSERT` inserts), so it is only as harmless as `statement`.
    Explain {
        /// Whether the explained statement is executed (`EXPLAIN ANALYZE`).
        analyze: bool,
        /// The kind of the explained statement.
        statement: Box<StatementKind>,
    },
    /// Reads the catalog or settings: `SHOW TABLES`, `SHOW COLUMNS`, `SHOW <variable>`,
    /// `DESCRIBE <table>`, ….
    Show,
    /// `CREATE EXTERNAL TABLE`: registers a table of a file format (such as a knowledge base
    /// `STORED AS KB`, a Kafka topic or JSONL files), possibly a new index.
    CreateExternalTable,
    /// Any other change of the catalog: `CREATE TABLE`/`VIEW`/`SCHEMA`/`DATABASE`/`FUNCTION`/
    /// `INDEX`, `DROP …`, `ALTER …`, `RENAME TABLE`.
    Ddl,
    /// `INSERT INTO …` (into a knowledge base it indexes documents; reading a Kafka table it
    /// runs as a continuous stream).
    Insert,
    /// Removes rows: `DELETE FROM …`, `TRUNCATE …`.
    Delete,
    /// Changes rows in place: `UPDATE …`, `MERGE …`.
    Update,
    /// Changes a session setting: `SET <variable> = <value>` or `RESET <variable>`.
    Set {
        /// The setting, lower-cased and dotted as DataFusion resolves it (`mkflow.llm_model`,
        /// `datafusion.execution.batch_size`); `None` for forms that name no single setting
        /// (`SET TIME ZONE …`, `SET ROLE …`, `SET (a, b) = …`, `RESET ALL`).
        variable: Option<String>,
    },
    /// `COPY … TO`: writes the result of a query to files.
    Copy,
    /// Anything else: transactions, `PREPARE`/`EXECUTE`, …. Not looked into, so to be treated
    /// as the most privileged kind.
    Other,
}

impl StatementKind {
    /// The kind of `statement`.
    pub fn of(statement: &Statement) -> Self {
        match statement {
            Statement::Statement(statement) => Self::of_sql(statement),
            Statement::CreateExternalTable(_) => Self::CreateExternalTable,
            Statement::CopyTo(_) => Self::Copy,
            Statement::Explain(explain) => Self::Explain {
                analyze: explain.options.analyze,
                statement: Box::new(Self::of(&explain.statement)),
            },
            Statement::Reset(ResetStatement::Variable(name)) => Self::Set {
                variable: Some(setting_name(name)),
            },
        }
    }

    /// Whether the statement only reads: a query, `SHOW`/`DESCRIBE`, or `EXPLAIN [ANALYZE]` of
    /// a statement that only reads. Everything else changes rows, the catalog, settings or files.
    pub fn only_reads(&self) -> bool {
        match self {
            Self::Query | Self::Show => true,
            Self::Explain { statement, .. } => statement.only_reads(),
            _ => false,
        }
    }

    /// The kind as a refusal names it (`DELETE`, `EXPLAIN ANALYZE`, `SET`, …).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Query => "SELECT",
            Self::Explain { analyze: true, .. } => "EXPLAIN ANALYZE",
            Self::Explain { analyze: false, .. } => "EXPLAIN",
            Self::Show => "SHOW",
            Self::CreateExternalTable => "CREATE EXTERNAL TABLE",
            Self::Ddl => "DDL (CREATE, DROP, ALTER)",
            Self::Insert => "INSERT",
            Self::Delete => "DELETE",
            Self::Update => "UPDATE",
            Self::Set { .. } => "SET",
            Self::Copy => "COPY",
            Self::Other => "this statement",
        }
    }

    /// Whether the statement sets (or resets) a Meta-Knowledge option (`mkflow.…`), after
    /// which the Meta-Knowledge functions are built anew.
    pub fn sets_mkflow_option(&self) -> bool {
        let Self::Set {
            variable: Some(variable),
        } = self
        else {
            return false;
        };
        variable
            .split_once('.')
            .is_some_and(|(prefix, _)| prefix == MkOptions::PREFIX)
    }

    fn of_sql(statement: &ast::Statement) -> Self {
        use ast::Statement as S;
        match statement {
            S::Query(_) => Self::Query,
            S::Explain { analyze, statement, .. } => Self::Explain {
                analyze: *analyze,
                statement: Box::new(Self::of_sql(statement)),
            },
            S::ExplainTable { .. }
            | S::ShowFunctions { .. }
            | S::ShowVariable { .. }
            | S::ShowStatus { .. }
            | S::ShowVariables { .. }
            | S::ShowCreate { .. }
            | S::ShowColumns { .. }
            | S::ShowCatalogs { .. }
            | S::ShowDatabases { .. }
            | S::ShowSchemas { .. }
            | S::ShowCharset(_)
            | S::ShowObjects(_)
            | S::ShowTables { .. }
            | S::ShowViews { .. }
            | S::ShowCollation { .. } => Self::Show,
            S::CreateTable(_)
            | S::CreateView(_)
            | S::CreateIndex(_)
            | S::CreateSchema { .. }
            | S::CreateDatabase { .. }
            | S::CreateFunction(_)
            | S::CreateType { .. }
            | S::CreateSequence { .. }
            | S::Drop { .. }
            | S::DropFunction(_)
            | S::AlterTable(_)
            | S::AlterView { .. }
            | S::AlterSchema(_)
            | S::AlterIndex { .. }
            | S::RenameTable(_) => Self::Ddl,
            S::Insert(_) => Self::Insert,
            S::Delete(_) | S::Truncate(_) => Self::Delete,
            S::Update(_) | S::Merge(_) => Self::Update,
            S::Set(ast::Set::SingleAssignment { variable, .. }) => Self::Set {
                variable: Some(setting_name(variable)),
            },
            S::Reset(ast::ResetStatement {
                reset: ast::Reset::ConfigurationParameter(name),
            }) => Self::Set {
                variable: Some(setting_name(name)),
            },
            S::Set(_) | S::Reset(_) => Self::Set { variable: None },
            _ => Self::Other,
        }
    }
}

/// A setting's name as DataFusion resolves it: the identifiers joined by dots, lower-cased.
fn setting_name(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => ident.value.to_lowercase(),
            ObjectNamePart::Function(function) => function.to_string().to_lowercase(),
        })
        .collect();
    parts.join(".")
}

/// The deepest expression nesting in `sql`, estimated from its tokens: within each bracket
/// level, every operator since the last comma adds a level (a chain `a + b + c` nests as deep as
/// it is long), and every bracket adds one. An upper bound of the depth of the trees the parser
/// builds.
pub fn expression_depth(sql: &str) -> Result<usize, TokenizerError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize()?;
    // Operators counted at each open bracket level; the depth is the brackets plus their sum.
    let mut levels: Vec<usize> = vec![0];
    let (mut depth, mut deepest) = (0usize, 0usize);
    for token in &tokens {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => {
                levels.push(0);
                depth += 1;
            }
            Token::RParen | Token::RBracket | Token::RBrace if levels.len() > 1 => {
                depth -= 1 + levels.pop().unwrap_or(0);
            }
            Token::Comma | Token::SemiColon => {
                let top = levels.last_mut().expect("the outermost level stays");
                depth -= *top;
                *top = 0;
            }
            token if is_operator(token) => {
                *levels.last_mut().expect("the outermost level stays") += 1;
                depth += 1;
            }
            _ => {}
        }
        deepest = deepest.max(depth);
    }
    Ok(deepest)
}

/// Whether a token joins expressions (an operator symbol or keyword, a cast).
fn is_operator(token: &Token) -> bool {
    match token {
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::XOR
                | Keyword::NOT
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::IN
                | Keyword::BETWEEN
                | Keyword::WHEN
                | Keyword::COLLATE
        ),
        Token::EOF
        | Token::Number(..)
        | Token::Char(_)
        | Token::Whitespace(_)
        | Token::Period
        | Token::Colon
        | Token::Placeholder(_)
        | Token::Comma
        | Token::SemiColon
        | Token::LParen
        | Token::RParen
        | Token::LBracket
        | Token::RBracket
        | Token::LBrace
        | Token::RBrace
        | Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::QuoteDelimitedStringLiteral(_)
        | Token::NationalQuoteDelimitedStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_) => false,
        _ => true,
    }
}

/// A search table function of mkflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchFunction {
    /// `vector_search(kb, query, k)`: nearest documents.
    VectorSearch,
    /// `qa_search(kb, query, k)`: nearest synthetic questions.
    QaSearch,
    /// `mk_search(kb, query, k)`: Meta-Knowledge search (questions within a cluster summary).
    MkSearch,
    /// `text_search(kb, query, k)`: BM25 over the documents' text columns.
    TextSearch,
    /// `qa_text_search(kb, query, k)`: BM25 over the synthetic questions.
    QaTextSearch,
    /// `hybrid_search(kb, query, k)`: `vector_search` and `text_search` fused.
    HybridSearch,
    /// `qa_hybrid_search(kb, query, k)`: `qa_search` and `qa_text_search` fused.
    QaHybridSearch,
    /// `chunk_search(kb, query, k)`: nearest chunks (passages) of a chunked index.
    ChunkSearch,
    /// `chunk_text_search(kb, query, k)`: BM25 over the chunks.
    ChunkTextSearch,
    /// `chunk_hybrid_search(kb, query, k)`: `chunk_search` and `chunk_text_search` fused.
    ChunkHybridSearch,
    /// `rrf(search, search, …)`: searches fused by reciprocal rank.
    Rrf,
    /// `mk_answer(kb, query, k)`: an answer from `mk_search`'s QA pairs, with citations.
    MkAnswer,
}

impl SearchFunction {
    const ALL: [SearchFunction; 12] = [
        Self::VectorSearch,
        Self::QaSearch,
        Self::MkSearch,
        Self::TextSearch,
        Self::QaTextSearch,
        Self::HybridSearch,
        Self::QaHybridSearch,
        Self::ChunkSearch,
        Self::ChunkTextSearch,
        Self::ChunkHybridSearch,
        Self::Rrf,
        Self::MkAnswer,
    ];

    /// The function's SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Self::VectorSearch => "vector_search",
            Self::QaSearch => "qa_search",
            Self::MkSearch => "mk_search",
            Self::TextSearch => "text_search",
            Self::QaTextSearch => "qa_text_search",
            Self::HybridSearch => "hybrid_search",
            Self::QaHybridSearch => "qa_hybrid_search",
            Self::ChunkSearch => "chunk_search",
            Self::ChunkTextSearch => "chunk_text_search",
            Self::ChunkHybridSearch => "chunk_hybrid_search",
            Self::Rrf => "rrf",
            Self::MkAnswer => "mk_answer",
        }
    }

    /// The search function called `name` (case-insensitive).
    fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(name))
    }
}

/// The first search table function (in the order of the syntax tree) that `statement` calls
/// in a `FROM` clause at any depth, if any.
pub fn search_function(statement: &Statement) -> Option<SearchFunction> {
    match statement {
        Statement::Statement(statement) => find_search(statement.as_ref()),
        Statement::Explain(explain) => search_function(&explain.statement),
        Statement::CopyTo(copy) => match &copy.source {
            CopyToSource::Query(query) => find_search(query.as_ref()),
            CopyToSource::Relation(_) => None,
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => None,
    }
}

fn find_search(node: &impl Visit) -> Option<SearchFunction> {
    match node.visit(&mut SearchFinder) {
        ControlFlow::Break(function) => Some(function),
        ControlFlow::Continue(()) => None,
    }
}

/// Stops at the first table factor calling a search function.
struct SearchFinder;

impl Visitor for SearchFinder {
    type Break = SearchFunction;

    fn pre_visit_table_factor(&mut self, table_factor: &TableFactor) -> ControlFlow<SearchFunction> {
        // As DataFusion resolves them: `FROM f(…)` by its first name part, `FROM LATERAL f(…)`
        // by its last.
        let name = match table_factor {
            TableFactor::Table {
                name, args: Some(_), ..
            } => name.0.first(),
            TableFactor::Function { name, .. } => name.0.last(),
            _ => None,
        };
        match name
            .and_then(ObjectNamePart::as_ident)
            .and_then(|i| SearchFunction::named(&i.value))
        {
            Some(function) => ControlFlow::Break(function),
            None => ControlFlow::Continue(()),
        }
    }
}

/// The parameters (`$1`, `$2`, … or `$name`) `statement` holds anywhere, each once: numbered
/// ones in their order, then named ones as they first appear.
pub fn placeholders(statement: &Statement) -> Vec<String> {
    let mut finder = PlaceholderFinder(Vec::new());
    let _ = match statement {
        Statement::Statement(statement) => statement.visit(&mut finder),
        Statement::Explain(explain) => return placeholders(&explain.statement),
        Statement::CopyTo(copy) => match &copy.source {
            CopyToSource::Query(query) => query.visit(&mut finder),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        Statement::CreateExternalTable(_) | Statement::Reset(_) => ControlFlow::Continue(()),
    };
    let mut found = finder.0;
    found.sort_by_key(|id| id[1..].parse::<usize>().unwrap_or(usize::MAX));
    found
}

/// Collects placeholders.
struct PlaceholderFinder(Vec<String>);

impl Visitor for PlaceholderFinder {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &ast::Expr) -> ControlFlow<()> {
        if let ast::Expr::Value(value) = expr
            && let ast::Value::Placeholder(id) = &value.value
            && !self.0.contains(id)
        {
            self.0.push(id.clone());
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;

    fn kind(sql: &str) -> StatementKind {
        let statements = DFParser::parse_sql(sql).unwrap();
        assert_eq!(statements.len(), 1, "{sql}");
        StatementKind::of(&statements[0])
    }

    fn search(sql: &str) -> Option<&'static str> {
        let statements = DFParser::parse_sql(sql).unwrap();
        assert_eq!(statements.len(), 1, "{sql}");
        search_function(&statements[0]).map(SearchFunction::name)
    }

    #[test]
    fn placeholders_are_listed_once_in_their_order_wherever_they_are() {
        let of = |sql: &str| placeholders(&DFParser::parse_sql(sql).unwrap()[0]);
        assert_eq!(
            of("SELECT * FROM vector_search(kb, $2, 5) WHERE category = $1 AND doc_id <> $2"),
            ["$1", "$2"]
        );
        assert_eq!(
            of("EXPLAIN SELECT * FROM rrf(vector_search(kb, $1), text_search(kb, $1))"),
            ["$1"]
        );
        assert_eq!(of("SELECT $10, $9"), ["$9", "$10"]);
        assert!(of("SELECT '$1' AS text").is_empty());
    }

    fn set(variable: &str) -> StatementKind {
        StatementKind::Set {
            variable: Some(variable.to_string()),
        }
    }

    #[test]
    fn statements_are_sorted_by_kind() {
        assert_eq!(kind("SELECT 1"), StatementKind::Query);
        assert_eq!(kind("WITH t AS (SELECT 1) SELECT * FROM t"), StatementKind::Query);
        assert_eq!(kind("VALUES (1), (2)"), StatementKind::Query);
        assert_eq!(kind("SHOW TABLES"), StatementKind::Show);
        assert_eq!(kind("SHOW COLUMNS FROM kb"), StatementKind::Show);
        assert_eq!(kind("DESCRIBE kb"), StatementKind::Show);
        assert_eq!(
            kind("CREATE EXTERNAL TABLE t STORED AS KB LOCATION 't'"),
            StatementKind::CreateExternalTable
        );
        assert_eq!(kind("CREATE TABLE t (a INT)"), StatementKind::Ddl);
        assert_eq!(kind("CREATE VIEW v AS SELECT 1"), StatementKind::Ddl);
        assert_eq!(kind("DROP TABLE t"), StatementKind::Ddl);
        assert_eq!(kind("INSERT INTO kb SELECT 1"), StatementKind::Insert);
        assert_eq!(kind("DELETE FROM kb WHERE doc_id = 'a'"), StatementKind::Delete);
        assert_eq!(kind("TRUNCATE TABLE kb"), StatementKind::Delete);
        assert_eq!(kind("UPDATE kb SET text = 'x'"), StatementKind::Update);
        assert_eq!(kind("COPY kb TO 'out.parquet'"), StatementKind::Copy);
        assert_eq!(kind("BEGIN"), StatementKind::Other);
    }

    #[test]
    fn explain_carries_what_it_explains() {
        assert_eq!(
            kind("EXPLAIN SELECT 1"),
            StatementKind::Explain {
                analyze: false,
                statement: Box::new(StatementKind::Query)
            }
        );
        assert_eq!(
            kind("EXPLAIN ANALYZE INSERT INTO kb SELECT 1"),
            StatementKind::Explain {
                analyze: true,
                statement: Box::new(StatementKind::Insert)
            }
        );
    }

    #[test]
    fn settings_are_named_as_datafusion_resolves_them() {
        assert_eq!(kind("SET mkflow.llm_model = 'm'"), set("mkflow.llm_model"));
        assert_eq!(kind("SET MKFLOW.Llm_Model TO 'm'"), set("mkflow.llm_model"));
        assert_eq!(
            kind("SET datafusion.execution.batch_size = 10"),
            set("datafusion.execution.batch_size")
        );
        assert_eq!(kind("RESET mkflow.llm_model"), set("mkflow.llm_model"));
        assert_eq!(kind("SET TIME ZONE 'UTC'"), StatementKind::Set { variable: None });
    }

    #[test]
    fn only_mkflow_settings_are_mkflow_options() {
        assert!(kind("SET mkflow.x = 1").sets_mkflow_option());
        assert!(kind("SET MKFLOW.x = 1").sets_mkflow_option());
        assert!(kind("RESET mkflow.x").sets_mkflow_option());
        assert!(!kind("SET datafusion.x = 1").sets_mkflow_option());
        // The value is no setting's name.
        assert!(!kind("SET datafusion.x = 'mkflow.y'").sets_mkflow_option());
        assert!(!kind("SET mkflowx.y = 1").sets_mkflow_option());
        assert!(!kind("SELECT 'mkflow.x'").sets_mkflow_option());
        assert!(!kind("SET TIME ZONE 'mkflow.x'").sets_mkflow_option());
    }

    #[test]
    fn search_functions_are_found_at_any_depth() {
        assert_eq!(search("SELECT * FROM mk_search(kb, 'x', 3)"), Some("mk_search"));
        assert_eq!(
            search("select doc_id from VECTOR_SEARCH(kb, 'x')"),
            Some("vector_search")
        );
        assert_eq!(search("SELECT * FROM Qa_Search(kb, 'x', 3)"), Some("qa_search"));
        assert_eq!(
            search("WITH hits AS (SELECT * FROM vector_search(kb, 'x', 5)) SELECT doc_id FROM hits"),
            Some("vector_search")
        );
        assert_eq!(
            search("SELECT * FROM (SELECT doc_id FROM qa_search(kb, 'x', 5)) AS q"),
            Some("qa_search")
        );
        assert_eq!(
            search("SELECT * FROM kb WHERE doc_id IN (SELECT doc_id FROM mk_search(kb, 'x', 5))"),
            Some("mk_search")
        );
        assert_eq!(
            search("SELECT * FROM kb JOIN vector_search(kb, 'x', 5) v ON kb.doc_id = v.doc_id"),
            Some("vector_search")
        );
        assert_eq!(search("EXPLAIN SELECT * FROM mk_search(kb, 'x', 3)"), Some("mk_search"));
        assert_eq!(
            search("INSERT INTO t SELECT * FROM vector_search(kb, 'x', 3)"),
            Some("vector_search")
        );
        assert_eq!(
            search("COPY (SELECT * FROM qa_search(kb, 'x', 3)) TO 'out.parquet'"),
            Some("qa_search")
        );
    }

    #[test]
    fn expression_depth_follows_chains_and_brackets() {
        let depth = |sql: &str| expression_depth(sql).unwrap();
        assert_eq!(depth("SELECT doc_id FROM kb"), 0);
        assert_eq!(depth("SELECT 1 + 2"), 1);
        assert_eq!(depth("SELECT a, b, c FROM t WHERE x = 1 AND y = 2"), 3);
        assert_eq!(depth(&format!("SELECT 1{}", "+1".repeat(5000))), 5000);
        assert_eq!(depth(&format!("SELECT {}1{}", "(".repeat(40), ")".repeat(40))), 40);
        // Lists are wide, not deep.
        let vector = format!("[{}]", vec!["0.1"; 384].join(", "));
        // (`*` counts as an operator: the estimate is an upper bound.)
        assert_eq!(depth(&format!("SELECT * FROM vector_search(kb, {vector}, 3)")), 3);
        let values = (0..1000)
            .map(|i| format!("('{i}', {i})"))
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(depth(&format!("INSERT INTO t VALUES {values}")), 1);
        // Operators inside strings and comments are text.
        assert_eq!(depth("SELECT '+ + + AND OR' -- + + +\n"), 0);
        assert_eq!(depth("SELECT x::int::bigint"), 2);
        // Unbalanced brackets never underflow.
        assert_eq!(depth("SELECT 1))) + 1"), 1);
    }

    #[test]
    fn text_that_looks_like_a_call_is_no_search() {
        assert_eq!(search("SELECT 'vector_search(kb, x)' AS s FROM kb"), None);
        assert_eq!(search("SELECT * FROM kb WHERE text LIKE '%mk_search(%'"), None);
        assert_eq!(search("SELECT * FROM kb -- qa_search(kb, 'x')\n"), None);
        // A table (not a call) of that name.
        assert_eq!(search("SELECT * FROM vector_search"), None);
        assert_eq!(search("SET mkflow.x = 'vector_search(kb)'"), None);
    }
}
