//! `mk_answer(kb, 'query' [, k])`: the "read" step of Meta-Knowledge RAG (Mombaerts et al.,
//! 2024) — the `k` (default 5) QA pairs `mk_search` fuses for the query become numbered evidence,
//! and the session's generator answers from it, citing `[n]`: the `embedded` generator quotes the
//! best distinct answers (extractive), `local` and `openai` write the answer.
//!
//! One row: the query, the answer, its citations (`number`, `doc_id`, `question`, one per piece
//! of evidence, cited or not), the numbered context the generator was given, and the generator.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, ListBuilder, RecordBatch, StringArray, StringBuilder, StructBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::FutureExt;
use mkflow_udfs::mk::{Evidence, MkOptions, prompts};

use super::KbSchema;
use super::mk_search::MkSearchTable;
use crate::support::batch_table::deferred_scan;

/// Pieces of evidence an answer is built from when the call gives no `k`.
const DEFAULT_EVIDENCE: usize = 5;

/// The `mk_answer` table function.
#[derive(Debug)]
pub struct MkAnswerFunction {
    registry: Arc<KbSchema>,
}

impl MkAnswerFunction {
    /// A function resolving indexes in `registry`.
    pub fn new(registry: Arc<KbSchema>) -> Self {
        MkAnswerFunction { registry }
    }
}

impl TableFunctionImpl for MkAnswerFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let search = MkSearchTable::from_call("mk_answer", &self.registry, args)?;
        Ok(Arc::new(MkAnswerTable {
            search: Arc::new(search),
            schema: answer_schema(),
        }))
    }
}

/// The fields of one citation.
fn citation_fields() -> Fields {
    Fields::from(vec![
        Field::new("number", DataType::Int32, false),
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("question", DataType::Utf8, false),
    ])
}

fn answer_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("query", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new(
            "citations",
            DataType::List(Arc::new(Field::new_struct("item", citation_fields(), true))),
            false,
        ),
        Field::new("context", DataType::Utf8, false),
        Field::new("generator", DataType::Utf8, false),
    ]))
}

/// One `mk_answer` call, computed when the plan runs.
#[derive(Debug)]
struct MkAnswerTable {
    search: Arc<MkSearchTable>,
    schema: SchemaRef,
}

/// The evidence in `mk_search`'s rows, in rank order.
fn evidence(hits: &RecordBatch) -> Result<Vec<Evidence>> {
    let column =
        |name: &str| -> Result<&StringArray> { Ok(hits.column(hits.schema().index_of(name)?).as_string::<i32>()) };
    let (questions, answers, doc_ids) = (column("question")?, column("answer")?, column("doc_id")?);
    let titles = hits
        .schema()
        .index_of("title")
        .ok()
        .and_then(|i| hits.column(i).as_string_opt::<i32>().cloned());
    Ok((0..hits.num_rows())
        .map(|row| Evidence {
            question: questions.value(row).to_string(),
            answer: answers.value(row).to_string(),
            doc_id: doc_ids.value(row).to_string(),
            title: titles
                .as_ref()
                .filter(|t| t.is_valid(row))
                .map(|t| t.value(row).to_string()),
        })
        .collect())
}

impl MkAnswerTable {
    async fn answer(&self, options: &MkOptions) -> Result<RecordBatch> {
        let k = self.search.k().unwrap_or(DEFAULT_EVIDENCE);
        let hits = self.search.search(options, k).await?;
        let evidence = evidence(&hits)?;
        let services = &self.search.mk().services;
        let generator = services
            .generators
            .generator(options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let query = self.search.query();
        let answer = generator.answer(query, &evidence).await.map_err(|e| {
            services
                .failures
                .record(&format!("mk_answer ({})", generator.name()), query, &e.to_string());
            DataFusionError::Execution(format!("mk_answer: {e}"))
        })?;
        let mut citations = ListBuilder::new(StructBuilder::from_fields(citation_fields(), evidence.len()));
        for (i, e) in evidence.iter().enumerate() {
            let item = citations.values();
            item.field_builder::<Int32Builder>(0)
                .expect("number")
                .append_value(i as i32 + 1);
            item.field_builder::<StringBuilder>(1)
                .expect("doc_id")
                .append_value(&e.doc_id);
            item.field_builder::<StringBuilder>(2)
                .expect("question")
                .append_value(&e.question);
            item.append(true);
        }
        citations.append(true);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec![query])),
            Arc::new(StringArray::from(vec![answer])),
            Arc::new(citations.finish()),
            Arc::new(StringArray::from(vec![prompts::numbered_context(&evidence)])),
            Arc::new(StringArray::from(vec![generator.name()])),
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for MkAnswerTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let options = MkOptions::of(state.config_options());
        let search = self.search.clone();
        let schema = self.schema.clone();
        deferred_scan(self.schema.clone(), projection, None, move |_| {
            let table = MkAnswerTable {
                search: search.clone(),
                schema: schema.clone(),
            };
            let options = options.clone();
            async move { table.answer(&options).await }.boxed()
        })
    }
}
