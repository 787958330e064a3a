//! Think-then-embed: `vector_search(kb, 'query', k, reasoning => 'explicit')` has the session's
//! LLM write a short rationale for the query (what a document answering it would say, in its
//! terms) and searches with the embedding of query + rationale. It is the explicit reasoning a
//! LaSER model learns to do in latent space (Jin et al., 2026) and the reason-then-rewrite step
//! of Think-Then-Generate; `mkflow eval --modes doc,explicit,latent` compares the three.
//!
//! The rationale is returned in a `rationale` column, so a reader sees what was searched for.
//! Only a generator that writes (`local`, `openai`) can reason: with `embedded` the call is
//! refused when it is planned, with the setting to change.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::{DataFusionError, Result, plan_err};
use mkflow_udfs::mk::{Generator, GeneratorKind, GeneratorRegistry, MkOptions, REASONING_NEEDS_AN_LLM};

/// The column holding the rationale a reasoning search embedded.
pub const RATIONALE_COLUMN: &str = "rationale";

/// How a search turns its query text into the vector it searches with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reasoning {
    /// The query as written (`reasoning => 'none'`, the default).
    #[default]
    None,
    /// The query and a rationale the session's LLM writes for it (`reasoning => 'explicit'`).
    Explicit,
}

impl Reasoning {
    /// Parses the `reasoning` argument of `function`.
    pub fn parse(function: &str, value: Option<&str>) -> Result<Reasoning> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("none") => Ok(Reasoning::None),
            Some("explicit") => Ok(Reasoning::Explicit),
            Some(other) => plan_err!("{function}: reasoning must be 'none' or 'explicit', not '{other}'"),
        }
    }
}

/// The session's generator, ready to write rationales.
#[derive(Debug, Clone)]
pub struct Reasoner {
    generator: Arc<dyn Generator>,
}

impl Reasoner {
    /// The generator `session`'s settings name, refused (with the setting to change) when it
    /// cannot write.
    pub fn of_session(function: &str, session: &dyn Session, generators: &GeneratorRegistry) -> Result<Reasoner> {
        let options = MkOptions::of(session.config_options());
        if options.generator == GeneratorKind::Embedded {
            return plan_err!("{function}: reasoning => 'explicit' is refused: {REASONING_NEEDS_AN_LLM}");
        }
        let generator = generators
            .generator(&options)
            .map_err(|e| DataFusionError::Plan(format!("{function}: reasoning => 'explicit': {e}")))?;
        Ok(Reasoner { generator })
    }

    /// The rationale for `query`.
    pub async fn rationale(&self, function: &str, query: &str) -> Result<String> {
        self.generator.reason(query).await.map_err(|e| {
            DataFusionError::Execution(format!(
                "{function}: the rationale for the query could not be written ({e})"
            ))
        })
    }
}

/// The text embedded for `query` with `rationale`: the query first (it leads when the model
/// truncates), the rationale after it.
pub fn reasoned_query(query: &str, rationale: &str) -> String {
    format!("{}\n{}", query.trim(), rationale.trim())
}

/// `schema` with the rationale column appended.
pub fn with_rationale_column(schema: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(RATIONALE_COLUMN, DataType::Utf8, false));
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `batch` (rows of a search) with `rationale` on every row, under `schema`.
pub fn add_rationale(batch: RecordBatch, schema: SchemaRef, rationale: &str) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    columns.push(Arc::new(StringArray::from(vec![rationale; batch.num_rows()])) as ArrayRef);
    Ok(RecordBatch::try_new(schema, columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_parses_its_two_values_and_names_a_wrong_one() {
        assert_eq!(Reasoning::parse("vector_search", None).unwrap(), Reasoning::None);
        assert_eq!(
            Reasoning::parse("vector_search", Some("none")).unwrap(),
            Reasoning::None
        );
        assert_eq!(
            Reasoning::parse("vector_search", Some(" Explicit ")).unwrap(),
            Reasoning::Explicit
        );
        let error = Reasoning::parse("vector_search", Some("latent"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("'latent'") && error.contains("'explicit'"), "{error}");
    }

    #[test]
    fn the_rationale_column_follows_the_search_columns() {
        let schema = Arc::new(Schema::new(vec![Field::new("doc_id", DataType::Utf8, false)]));
        let extended = with_rationale_column(&schema);
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef]).unwrap();
        let out = add_rationale(batch, extended, "because").unwrap();
        assert_eq!(out.schema().field(1).name(), RATIONALE_COLUMN);
        let rationale = out.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((rationale.value(0), rationale.value(1)), ("because", "because"));
        assert_eq!(reasoned_query(" q ", " r "), "q\nr");
    }
}
