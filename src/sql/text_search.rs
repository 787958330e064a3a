//! `text_search(kb, 'query' [, column] [, k] [, syntax => 'tantivy'])`: the `k` rows of a
//! knowledge index scoring best for a query under BM25, with a `score` column (the BM25 score).
//!
//! Spice.ai's signature: `column` names one text column to search (default: all of the index's
//! text columns, read as one text); without `k`, the query's `LIMIT` (when DataFusion pushes
//! it) or 10 rows, either checked against the session's `max_k`. The query is plain terms —
//! any text is valid, nothing in it is an operator — unless `syntax => 'tantivy'` asks for
//! tantivy's query language (`+must -not "a phrase" title:word`); a query that does not parse is
//! refused when the statement is planned, naming the position. `WHERE` clauses on the index's
//! columns are evaluated inside the search, as for `vector_search`.
//!
//! `qa_text_search(kb, 'query' [, column] [, k])` is the same search over the synthetic
//! questions of a Meta-Knowledge index, and `chunk_text_search` over the chunks of a chunked
//! index (passages). On a chunked index, `text_search` ranks documents by their best chunk
//! (BM25 over each chunk with its context) and returns that chunk (`best_chunk`, …); its
//! `column` may name the chunked column or the context column.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::FutureExt;

use super::KbSchema;
use super::call_args::{CallArgs, int_arg, string_arg, table_arg};
use super::catalog::SearchTarget;
use super::filters::{CompiledFilter, pushdown_support};
use super::vector_search::search_k;
use crate::access::Access;
use crate::chunks::{ChunkIndex, search::search_schema as chunked_schema};
use crate::support::batch_table::deferred_scan;
use crate::support::{index_error, tag_call};
use mkflow_index::{KnowledgeIndex, QuerySyntax, RowPredicate, TextQuery, TextStatistics};

/// The BM25 statistics a cluster worker gives the text searches of one shard call, as a
/// session extension: the coordinator's first round collects each shard's, its second scores
/// every shard with their sum, so scores compare across shards as within one index.
#[derive(Debug)]
pub enum ShardStatistics {
    /// Add each text search's statistics here, and answer no rows.
    Collect(Arc<Mutex<TextStatistics>>),
    /// Score with these.
    Use(TextStatistics),
}

/// The `text_search` and `qa_text_search` table functions.
#[derive(Debug)]
pub struct TextSearchFunction {
    registry: Arc<KbSchema>,
    target: SearchTarget,
}

impl TextSearchFunction {
    /// A function searching `target`, resolving tables in `registry`.
    pub fn new(registry: Arc<KbSchema>, target: SearchTarget) -> Self {
        TextSearchFunction { registry, target }
    }

    fn function_name(&self) -> &'static str {
        match self.target {
            SearchTarget::Documents => "text_search",
            SearchTarget::Questions => "qa_text_search",
            SearchTarget::Chunks => "chunk_text_search",
        }
    }
}

impl TableFunctionImpl for TextSearchFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let function = self.function_name();
        let usage = format!("usage: {function}(kb, 'query' [, column] [, k] [, syntax => 'tantivy'])");
        let access = Access::of(args.session().config());
        let call = CallArgs::of(function, args.exprs(), &["syntax"])?;
        let exprs = &call.positional;
        if !(2..=4).contains(&exprs.len()) {
            return plan_err!("{function} takes 2 to 4 arguments; {usage}");
        }
        let name = table_arg(&exprs[0]).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{function}: the first argument must name a knowledge index; {usage}"
            ))
        })?;
        let searched = self.registry.search_target(function, &name, self.target)?;
        let (index, chunks) = (searched.index, searched.chunks);
        let text = string_arg(&exprs[1])
            .ok_or_else(|| DataFusionError::Plan(format!("{function}: the query must be a text; {usage}")))?;
        access.check_query_text(function, &text)?;
        let mut rest = &exprs[2..];
        let mut column = None;
        if let Some(first) = rest.first().filter(|e| int_arg(e).is_none()) {
            column = Some(string_arg(first).or_else(|| table_arg(first)).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{function}: the third argument must be k or a column name; {usage}"
                ))
            })?);
            rest = &rest[1..];
        }
        let k = match rest.first() {
            Some(limit) => {
                let value = int_arg(limit).filter(|v| *v > 0).ok_or_else(|| {
                    DataFusionError::Plan(format!("{function}: k must be a positive integer; {usage}"))
                })?;
                Some(access.check_k(function, usize::try_from(value).unwrap_or(usize::MAX))?)
            }
            None => None,
        };
        let syntax = match call.named_string("syntax")? {
            None => QuerySyntax::Terms,
            Some(name) => QuerySyntax::parse(&name).ok_or_else(|| {
                DataFusionError::Plan(format!("{function}: syntax must be 'terms' or 'tantivy', not '{name}'"))
            })?,
        };
        if let (Some(chunks), Some(name)) = (&chunks, &column) {
            column = Some(chunk_field(chunks, name).map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?);
        }
        let query = TextQuery { text, column, syntax };
        let schema = match &chunks {
            Some(chunks) => {
                chunks
                    .chunks()
                    .check_text_query(&query)
                    .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?;
                chunked_schema(&index)
            }
            None => {
                index
                    .check_text_query(&query)
                    .map_err(|e| DataFusionError::Plan(format!("{function}: {e}")))?;
                index.search_schema()
            }
        };
        Ok(Arc::new(TextSearchTable {
            function,
            schema: tag_call(&schema, function, args.exprs()),
            index,
            chunks,
            query,
            k,
        }))
    }
}

/// The field of a chunks index that a document column of a chunked index names in
/// `text_search(kb, 'q', column)`: the chunked column's text, or the context.
fn chunk_field(chunks: &ChunkIndex, column: &str) -> std::result::Result<String, String> {
    let settings = chunks.settings();
    if column == settings.column {
        Ok("text".into())
    } else if settings.context.as_deref() == Some(column) {
        Ok("context".into())
    } else {
        Err(format!(
            "the index is chunked: its full-text index holds the chunks of '{}'{}, not '{column}'",
            settings.column,
            settings
                .context
                .as_ref()
                .map(|c| format!(" with their '{c}'"))
                .unwrap_or_default()
        ))
    }
}

/// The result of one `text_search` call, computed when the plan runs.
#[derive(Debug, Clone)]
struct TextSearchTable {
    function: &'static str,
    /// The search schema, tagged with this call.
    schema: SchemaRef,
    index: Arc<KnowledgeIndex>,
    /// The chunks searched in the documents' place, when the index is chunked.
    chunks: Option<Arc<ChunkIndex>>,
    query: TextQuery,
    k: Option<usize>,
}

#[async_trait]
impl TableProvider for TextSearchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown_support(filters, &self.index.schema()))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let k = search_k(state, self.function, self.k, limit)?;
        let filter = CompiledFilter::pushed(state, &self.index.schema(), filters)?;
        let (index, query) = (self.index.clone(), Arc::new(self.query.clone()));
        let chunks = self.chunks.clone();
        let shard = state.config().get_extension::<ShardStatistics>();
        let schema = self.schema();
        deferred_scan(self.schema(), projection, None, move |_| {
            let (index, query, filter, chunks) = (index.clone(), query.clone(), filter.clone(), chunks.clone());
            let (shard, schema) = (shard.clone(), schema.clone());
            async move {
                let statistics = match shard.as_deref() {
                    Some(ShardStatistics::Collect(sink)) => {
                        let searched = chunks.as_ref().map_or(&index, |c| c.chunks());
                        let found = searched.text_statistics(&query).map_err(index_error)?;
                        sink.lock().unwrap_or_else(|e| e.into_inner()).add(&found);
                        return Ok(RecordBatch::new_empty(schema));
                    }
                    Some(ShardStatistics::Use(statistics)) => Some(statistics),
                    None => None,
                };
                // CPU work over the published state, like an operator's: no thread hop.
                let evaluate = filter.as_ref().map(|f| move |b: &_| f.evaluate(b));
                let filter = evaluate.as_ref().map(|f| f as &RowPredicate<'_>);
                match &chunks {
                    Some(chunks) => chunks.best_documents(&index, k, filter, &|depth, within| {
                        chunks.chunks().text_search_with(&query, depth, within, statistics)
                    }),
                    None => index.text_search_with(&query, k, filter, statistics),
                }
                .map_err(index_error)
            }
            .boxed()
        })
    }
}
