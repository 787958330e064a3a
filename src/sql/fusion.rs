//! Fusing searches: `rrf(…)` (Spice.ai's signature) and its shorthands `hybrid_search` and
//! `qa_hybrid_search`.
//!
//! - `rrf(search1, search2, … [, join_key => 'doc_id'] [, k => 60.0])` takes calls of search
//!   table functions (`vector_search`, `text_search`, `qa_search`, `qa_text_search`,
//!   `mk_search`, `hybrid_search`, …) and ranks the rows they return by reciprocal rank fusion:
//!   a row's `fused_score` is Σ wᵢ / (k + rankᵢ) over the searches that return its join key, its
//!   rank in each being its position in that search's answer (best first, 1-based; a key
//!   returned several times counts at its best position). A search may carry
//!   `rank_weight => w` (default 1). The columns are those of the searches (a column of several
//!   taken from the first search that returned the row and has it; `score` left out), plus
//!   `fused_score`. Each search returns its own `k` rows, or, without one, the larger of the
//!   query's `LIMIT` and [`FUSION_DEPTH`].
//! - `hybrid_search(kb, 'query' [, k] [, questions => bool])` is `rrf(vector_search(kb,
//!   'query'), text_search(kb, 'query'))` joined on the index's key column; on a Meta-Knowledge
//!   index it also fuses `qa_search` and `qa_text_search` (joined on the questions' `doc_id`, a
//!   document ranked by its best question, three times deeper), unless `questions => false`.
//! - `qa_hybrid_search(kb, 'query' [, k])` is `rrf(qa_search(kb, 'query'),
//!   qa_text_search(kb, 'query'))` over the synthetic questions, joined on `question_id`, and
//!   `chunk_hybrid_search` the same over the chunks of a chunked index, joined on `chunk_id`.
//! - Each of them takes `rerank => N` (and `reranker => 'name'` when several are registered):
//!   the top `N` fused rows are reordered by a cross-encoder reading the query with each row's
//!   text (its text columns; on a chunked index its context and best chunk), see [`super::rerank`].
//!
//! `WHERE` clauses every fused search can evaluate inside itself are pushed into all of them.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, new_null_array};
use datafusion::arrow::compute::{cast, concat_batches, interleave};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, ScalarValue, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::{ExecutionPlan, collect};
use futures::FutureExt;
use futures::future::try_join_all;

use super::KbSchema;
use super::call_args::{CallArgs, int_arg, named_arg_name, nested_call, string_arg, table_arg};
use super::catalog::SearchTarget;
use super::kb_entry::Searched;
use super::rerank::RerankStep;
use super::vector_search::DEFAULT_K;
use crate::access::Access;
use crate::chunks::search::BEST_CHUNK;
use crate::models::ModelRegistry;
use crate::support::batch_table::deferred_scan;
use crate::support::tag_call;
use mkflow_index::SCORE_COLUMN;
use mkflow_index::fulltext::default_text_columns;

/// Rows each fused search returns when neither it nor the query's `LIMIT` asks for more.
pub const FUSION_DEPTH: usize = 100;

/// The RRF smoothing constant when `k` is not given (Cormack et al.'s 60).
pub const DEFAULT_RRF_K: f64 = 60.0;

/// Questions retrieved per document a fusion wants: a document has several (5 on average
/// with the embedded generator), so a question search goes this many times deeper.
const QUESTIONS_PER_DOCUMENT: usize = 3;

/// The column holding the fused score.
pub const FUSED_SCORE_COLUMN: &str = "fused_score";

/// The search table functions a fusion can take, by name.
pub type SearchFunctions = HashMap<&'static str, Arc<dyn TableFunctionImpl>>;

/// `rrf(…)`.
#[derive(Debug)]
pub struct RrfFunction {
    searches: Arc<SearchFunctions>,
}

impl RrfFunction {
    /// `rrf` over the functions in `searches`.
    pub fn new(searches: Arc<SearchFunctions>) -> Self {
        RrfFunction { searches }
    }
}

const RRF_USAGE: &str =
    "usage: rrf(vector_search(kb, 'q'), text_search(kb, 'q') [, …] [, join_key => 'doc_id'] [, k => 60.0])";

impl TableFunctionImpl for RrfFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let call = CallArgs::of("rrf", args.exprs(), &["join_key", "k"])?;
        if call.positional.is_empty() {
            return plan_err!("rrf needs at least one search; {RRF_USAGE}");
        }
        let mut inputs = Vec::with_capacity(call.positional.len());
        for expr in &call.positional {
            let Some((name, nested)) = nested_call(expr) else {
                return plan_err!("rrf takes calls of search functions, not '{expr}'; {RRF_USAGE}");
            };
            let function = self.searches.get(name).ok_or_else(|| {
                let mut known: Vec<&str> = self.searches.keys().copied().collect();
                known.sort();
                DataFusionError::Plan(format!("rrf cannot fuse {name}(…) (searches: {})", known.join(", ")))
            })?;
            // The weight is rrf's; the searched function judges the rest of its arguments.
            let (weights, own): (Vec<Expr>, Vec<Expr>) = nested
                .iter()
                .cloned()
                .partition(|e| named_arg_name(e) == Some("rank_weight"));
            let weight = CallArgs::of(name, &weights, &["rank_weight"])?
                .named_number("rank_weight")?
                .unwrap_or(1.0);
            let provider = function.call_with_args(TableFunctionArgs::new(&own, args.session()))?;
            inputs.push(FusedInput {
                provider,
                weight,
                join_column: String::new(),
                depth_factor: 1,
            });
        }
        let join_key = call.named_string("join_key")?.unwrap_or_else(|| "doc_id".to_string());
        for input in &mut inputs {
            input.join_column = join_key.clone();
        }
        let k = call.named_number("k")?.unwrap_or(DEFAULT_RRF_K);
        let mut table = RrfTable::new(inputs, k)?;
        table.schema = tag_call(&table.schema, "rrf", args.exprs());
        Ok(Arc::new(table))
    }
}

/// `hybrid_search`, `qa_hybrid_search` and `chunk_hybrid_search`.
#[derive(Debug)]
pub struct HybridSearchFunction {
    registry: Arc<KbSchema>,
    target: SearchTarget,
    searches: Arc<SearchFunctions>,
    models: Arc<ModelRegistry>,
}

impl HybridSearchFunction {
    /// The hybrid search over `target`, fusing the dense and BM25 searches in `searches`,
    /// reranking with the rerankers of `models` when asked.
    pub fn new(
        registry: Arc<KbSchema>,
        target: SearchTarget,
        searches: Arc<SearchFunctions>,
        models: Arc<ModelRegistry>,
    ) -> Self {
        HybridSearchFunction {
            registry,
            target,
            searches,
            models,
        }
    }

    /// The `rerank => N` step of a call, if asked: its cross-encoder and the columns read as
    /// each row's text.
    fn rerank_step(
        &self,
        function: &str,
        call: &CallArgs,
        access: &Access,
        searched: &Searched,
        query: &str,
    ) -> Result<Option<RerankStep>> {
        let Some(depth) = call.named("rerank") else {
            if call.named("reranker").is_some() {
                return plan_err!("{function}: reranker => needs rerank => N (the rows to rerank)");
            }
            return Ok(None);
        };
        let depth = int_arg(depth)
            .filter(|v| *v > 0)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| DataFusionError::Plan(format!("{function}: rerank must be a positive integer")))?;
        let depth = access.check_k(function, depth)?;
        let model = self
            .models
            .rerankers()
            .get(call.named_string("reranker")?.as_deref())
            .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?;
        let columns = match &searched.chunks {
            Some(chunks) => chunks
                .settings()
                .context
                .iter()
                .cloned()
                .chain([BEST_CHUNK.to_string()])
                .collect(),
            None => {
                let names: Vec<String> = searched.index.text_columns().into_iter().map(|c| c.name).collect();
                if names.is_empty() {
                    default_text_columns(&searched.index.schema(), &searched.index.manifest().key_column)
                        .into_iter()
                        .map(|c| c.name)
                        .collect()
                } else {
                    names
                }
            }
        };
        Ok(Some(RerankStep {
            depth,
            query: query.to_string(),
            columns,
            model,
        }))
    }

    fn names(&self) -> (&'static str, &'static str, &'static str) {
        match self.target {
            SearchTarget::Documents => ("hybrid_search", "vector_search", "text_search"),
            SearchTarget::Questions => ("qa_hybrid_search", "qa_search", "qa_text_search"),
            SearchTarget::Chunks => ("chunk_hybrid_search", "chunk_search", "chunk_text_search"),
        }
    }
}

impl TableFunctionImpl for HybridSearchFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let (function, dense, lexical) = self.names();
        let usage = format!("usage: {function}(kb, 'query' [, k] [, rerank => N])");
        let accepted: &[&str] = match self.target {
            SearchTarget::Documents => &["questions", "rerank", "reranker"],
            SearchTarget::Questions | SearchTarget::Chunks => &["rerank", "reranker"],
        };
        let call = CallArgs::of(function, args.exprs(), accepted)?;
        let exprs = &call.positional;
        if !(2..=3).contains(&exprs.len()) {
            return plan_err!("{function} takes 2 or 3 arguments; {usage}");
        }
        let name = table_arg(&exprs[0]).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{function}: the first argument must name a knowledge index; {usage}"
            ))
        })?;
        let searched = self.registry.search_target(function, &name, self.target)?;
        let Some(query) = string_arg(&exprs[1]) else {
            return plan_err!("{function}: the query must be a text; {usage}");
        };
        let access = Access::of(args.session().config());
        let rerank = self.rerank_step(function, &call, &access, &searched, &query)?;
        let index = searched.index;
        let k = match exprs.get(2) {
            Some(e) => Some(
                int_arg(e)
                    .filter(|v| *v > 0)
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| {
                        DataFusionError::Plan(format!("{function}: k must be a positive integer; {usage}"))
                    })?,
            ),
            None => None,
        };
        let k = k.map(|k| access.check_k(function, k)).transpose()?;
        let key = index.manifest().key_column;
        // On a Meta-Knowledge index the documents' synthetic questions join the fusion (a
        // document ranked by its best question), unless `questions => false`.
        let questions = match call.named("questions") {
            None => self.target == SearchTarget::Documents && self.registry.has_questions(&name),
            Some(e) => match super::call_args::literal_arg(e) {
                Some(ScalarValue::Boolean(Some(b))) => *b,
                _ => return plan_err!("{function}: questions must be true or false"),
            },
        };
        let mut searches = vec![(dense, key.clone(), 1), (lexical, key.clone(), 1)];
        if questions {
            // Each document has several questions: a deeper list covers as many documents.
            searches.push(("qa_search", "doc_id".to_string(), QUESTIONS_PER_DOCUMENT));
            searches.push(("qa_text_search", "doc_id".to_string(), QUESTIONS_PER_DOCUMENT));
        }
        let table = Expr::Literal(ScalarValue::Utf8(Some(name)), None);
        let inner_args = [table, exprs[1].clone()];
        let mut inputs = Vec::with_capacity(searches.len());
        for (search, join_column, depth_factor) in searches {
            let provider = self.searches[search].call_with_args(TableFunctionArgs::new(&inner_args, args.session()))?;
            inputs.push(FusedInput {
                provider,
                weight: 1.0,
                join_column,
                depth_factor,
            });
        }
        let mut table = RrfTable::new(inputs, DEFAULT_RRF_K)?;
        table.limit = k;
        if let Some(step) = rerank {
            table.schema = RerankStep::schema(&table.fused_schema);
            table.rerank = Some(step);
        }
        table.schema = tag_call(&table.schema, function, args.exprs());
        Ok(Arc::new(table))
    }
}

/// One search of a fusion.
#[derive(Debug)]
struct FusedInput {
    provider: Arc<dyn TableProvider>,
    weight: f64,
    /// The column of its rows that names what is fused (a document id).
    join_column: String,
    /// Its depth, in multiples of the fusion's depth.
    depth_factor: usize,
}

/// The fused result, computed when the plan runs.
#[derive(Debug)]
struct RrfTable {
    inputs: Vec<FusedInput>,
    k: f64,
    /// Rows returned at most (`hybrid_search`'s `k`), before the query's `LIMIT`.
    limit: Option<usize>,
    /// The fused rows' schema.
    fused_schema: SchemaRef,
    /// The schema returned: the fused rows' (with `rerank_score` when reranked), tagged.
    schema: SchemaRef,
    /// The cross-encoder step over the top of the fused rows, if asked.
    rerank: Option<RerankStep>,
}

impl RrfTable {
    fn new(inputs: Vec<FusedInput>, k: f64) -> Result<Self> {
        let schemas: Vec<SchemaRef> = inputs.iter().map(|i| i.provider.schema()).collect();
        for (i, (schema, input)) in schemas.iter().zip(&inputs).enumerate() {
            let join_key = &input.join_column;
            if schema.field_with_name(join_key).is_err() {
                return plan_err!(
                    "rrf: search {} returns no column '{join_key}' to join on (its columns: {}); name one with join_key => 'column'",
                    i + 1,
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let mut fields: Vec<Field> = Vec::new();
        for schema in &schemas {
            for field in schema.fields() {
                if field.name() != SCORE_COLUMN && !fields.iter().any(|f| f.name() == field.name()) {
                    fields.push(field.as_ref().clone().with_nullable(true));
                }
            }
        }
        fields.push(Field::new(FUSED_SCORE_COLUMN, DataType::Float64, false));
        let schema = Arc::new(Schema::new(fields));
        Ok(RrfTable {
            inputs,
            k,
            limit: None,
            fused_schema: schema.clone(),
            schema,
            rerank: None,
        })
    }
}

#[async_trait]
impl TableProvider for RrfTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        let mut support = vec![TableProviderFilterPushDown::Exact; filters.len()];
        for input in &self.inputs {
            for (s, theirs) in support
                .iter_mut()
                .zip(input.provider.supports_filters_pushdown(filters)?)
            {
                if theirs != TableProviderFilterPushDown::Exact {
                    *s = TableProviderFilterPushDown::Unsupported;
                }
            }
        }
        Ok(support)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let limit = match (self.limit, limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let depth = limit.unwrap_or(DEFAULT_K).max(FUSION_DEPTH);
        let mut plans = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            plans.push(
                input
                    .provider
                    .scan(state, None, filters, Some(depth * input.depth_factor))
                    .await?,
            );
        }
        let fusion = Arc::new(Fusion {
            plans,
            weights: self.inputs.iter().map(|i| i.weight).collect(),
            join_columns: self.inputs.iter().map(|i| i.join_column.clone()).collect(),
            k: self.k,
            // The rows reranked are fused first, however few are returned.
            limit: match &self.rerank {
                Some(step) => Some(limit.unwrap_or(DEFAULT_K).max(step.depth)),
                None => limit,
            },
            schema: self.fused_schema.clone(),
        });
        let rerank = self.rerank.clone().map(Arc::new);
        deferred_scan(self.schema(), projection, None, move |context| {
            let (fusion, rerank) = (fusion.clone(), rerank.clone());
            async move {
                let answers =
                    try_join_all(fusion.plans.iter().map(|plan| collect(plan.clone(), context.clone()))).await?;
                let fused = fusion.fuse(answers)?;
                match &rerank {
                    Some(step) => step.apply(fused, limit).await,
                    None => Ok(fused),
                }
            }
            .boxed()
        })
    }
}

/// The planned searches of a fusion and how to fuse their answers.
#[derive(Debug)]
struct Fusion {
    plans: Vec<Arc<dyn ExecutionPlan>>,
    weights: Vec<f64>,
    /// The join column of each search.
    join_columns: Vec<String>,
    k: f64,
    /// Fused rows kept, best first (`None`: all).
    limit: Option<usize>,
    schema: SchemaRef,
}

/// A fused row: its score, its best rank, and where its columns come from.
struct FusedRow {
    score: f64,
    best_rank: usize,
    key: String,
    /// (search, row) of each search that returned it, in search order.
    sources: Vec<(usize, usize)>,
}

impl Fusion {
    /// Ranks the join keys of `answers` (one per search, rows best first) by fused score.
    fn fuse(&self, answers: Vec<Vec<RecordBatch>>) -> Result<RecordBatch> {
        let answers: Vec<RecordBatch> = answers
            .into_iter()
            .zip(&self.plans)
            .map(|(batches, plan)| concat_batches(&plan.schema(), &batches))
            .collect::<std::result::Result<_, _>>()?;
        let mut rows: Vec<FusedRow> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (search, answer) in answers.iter().enumerate() {
            let keys = cast(
                answer
                    .column_by_name(&self.join_columns[search])
                    .expect("checked when planned"),
                &DataType::Utf8,
            )?;
            let keys = keys.as_string::<i32>();
            let mut rank = 0;
            let mut seen = std::collections::HashSet::new();
            for row in 0..answer.num_rows() {
                if keys.is_null(row) || !seen.insert(keys.value(row)) {
                    continue;
                }
                rank += 1;
                let key = keys.value(row);
                let contribution = self.weights[search] / (self.k + rank as f64);
                let index = *by_key.entry(key.to_string()).or_insert_with(|| {
                    rows.push(FusedRow {
                        score: 0.0,
                        best_rank: usize::MAX,
                        key: key.to_string(),
                        sources: Vec::new(),
                    });
                    rows.len() - 1
                });
                let fused = &mut rows[index];
                fused.score += contribution;
                fused.best_rank = fused.best_rank.min(rank);
                fused.sources.push((search, row));
            }
        }
        rows.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.best_rank.cmp(&b.best_rank))
                .then_with(|| a.key.cmp(&b.key))
        });
        if let Some(limit) = self.limit {
            rows.truncate(limit);
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields().iter().take(self.schema.fields().len() - 1) {
            columns.push(self.gather(field, &answers, &rows)?);
        }
        columns.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.score))));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// Column `field` of the fused rows: from the first search that returned each row and has
    /// the column (cast to the fused type), else null.
    fn gather(&self, field: &Field, answers: &[RecordBatch], rows: &[FusedRow]) -> Result<ArrayRef> {
        let mut sources: Vec<ArrayRef> = Vec::with_capacity(answers.len() + 1);
        let mut source_of: Vec<Option<usize>> = Vec::with_capacity(answers.len());
        for answer in answers {
            match answer.column_by_name(field.name()) {
                Some(column) => {
                    let column = if column.data_type() == field.data_type() {
                        column.clone()
                    } else {
                        cast(column, field.data_type())?
                    };
                    source_of.push(Some(sources.len()));
                    sources.push(column);
                }
                None => source_of.push(None),
            }
        }
        let null_source = sources.len();
        sources.push(new_null_array(field.data_type(), 1));
        let positions: Vec<(usize, usize)> = rows
            .iter()
            .map(|row| {
                row.sources
                    .iter()
                    .find_map(|&(search, r)| source_of[search].map(|s| (s, r)))
                    .unwrap_or((null_source, 0))
            })
            .collect();
        let arrays: Vec<&dyn Array> = sources.iter().map(|a| a.as_ref()).collect();
        Ok(interleave(&arrays, &positions)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float32Array, StringArray};
    use datafusion::physical_plan::empty::EmptyExec;

    fn answer(ids: &[&str], extra: &str) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, false),
            Field::new(extra, DataType::Utf8, true),
            Field::new(SCORE_COLUMN, DataType::Float32, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(StringArray::from(
                    ids.iter().map(|i| format!("{extra} of {i}")).collect::<Vec<_>>(),
                )),
                Arc::new(Float32Array::from(vec![1.0; ids.len()])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn reciprocal_ranks_add_up_and_columns_come_from_the_first_search_with_them() {
        let first = answer(&["a", "b", "c"], "title");
        let second = answer(&["c", "a", "a", "d"], "question");
        let schema = Arc::new(Schema::new(vec![
            Field::new("doc_id", DataType::Utf8, true),
            Field::new("title", DataType::Utf8, true),
            Field::new("question", DataType::Utf8, true),
            Field::new(FUSED_SCORE_COLUMN, DataType::Float64, false),
        ]));
        let fusion = Fusion {
            plans: vec![
                Arc::new(EmptyExec::new(first.schema())),
                Arc::new(EmptyExec::new(second.schema())),
            ],
            weights: vec![1.0, 2.0],
            join_columns: vec!["doc_id".into(), "doc_id".into()],
            k: 60.0,
            limit: Some(10),
            schema,
        };
        let fused = fusion.fuse(vec![vec![first], vec![second]]).unwrap();
        let ids = fused.column(0).as_string::<i32>();
        let scores = fused
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        // a: 1/61 + 2/62 (its repeat in the second list does not count); c: 1/63 + 2/61;
        // b: 1/62; d: 2/63.
        let expected = [
            ("c", 1.0 / 63.0 + 2.0 / 61.0),
            ("a", 1.0 / 61.0 + 2.0 / 62.0),
            ("d", 2.0 / 63.0),
            ("b", 1.0 / 62.0),
        ];
        assert_eq!(fused.num_rows(), 4);
        for (row, (id, score)) in expected.iter().enumerate() {
            assert_eq!(ids.value(row), *id);
            assert!((scores.value(row) - score).abs() < 1e-12, "{id}: {}", scores.value(row));
        }
        let titles = fused.column(1).as_string::<i32>();
        let questions = fused.column(2).as_string::<i32>();
        assert_eq!(titles.value(0), "title of c");
        assert_eq!(questions.value(0), "question of c");
        assert!(titles.is_null(2), "d came only from the search without titles");
    }
}
