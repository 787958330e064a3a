//! `mk_search(kb, 'query' [, k])`: Meta-Knowledge retrieval (Mombaerts et al., 2024) —
//! route the query to the clusters whose question centroid is nearest (every cluster within
//! `mkflow.route_margin` of the nearest, at most `mkflow.route_clusters`), rewrite it into
//! sub-queries conditioned on their summaries, match every sub-query against the synthetic
//! questions, and fuse the rankings by weighted reciprocal rank fusion.
//!
//! Routing shapes the rewrites (through the routed clusters' summaries); it limits where they
//! are matched only when `mkflow.strict_routing` is true (the paper's behaviour: every
//! sub-query matched inside the routed clusters only). By default every sub-query is matched
//! across all clusters, so a wrong route cannot hide the best answer: with zero-shot metadata
//! clusters the nearest centroid is often not the answer's cluster, and hard routing cost
//! SciFact a third of its nDCG@10. Each ranking counts once: the original query's with weight
//! `mkflow.original_query_weight`, each rewrite's with an equal share of
//! `mkflow.rewrite_weight`; a question's score is Σ weight / (60 + rank) over the rankings that
//! found it.
//!
//! Routing is by topics (clusters from the data) unless `mkflow.route_by = 'metadata'`. With
//! `persona => 'name'`, the query is routed among the persona's clusters, the persona's summary
//! leads the rewrites, and the persona's filter confines the matching.
//!
//! Each row is a QA pair with its provenance: the document it came from (with the document's
//! own columns), its metadata cluster and topics, the clusters the query was routed to, every sub-query used, and
//! which sub-queries found it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::compute::kernels::boolean::and;
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use futures::FutureExt;
use mkflow_udfs::TextRole;
use mkflow_udfs::mk::{ClusterBrief, ClusterKind, MkOptions, string_list_type};

use super::KbSchema;
use super::call_args::{CallArgs, int_arg, string_arg, table_arg};
use super::columns::string_lists;
use super::filters::CompiledFilter;
use super::vector_search::search_k;
use crate::access::Access;
use crate::mk::{CLUSTER_COLUMN, Cluster, MkAttachment, briefs, is_document_column, route_among};
use crate::support::batch_table::deferred_scan;
use crate::support::{index_error, tag_call};
use mkflow_index::{IndexError, KnowledgeIndex, TextQuery};

/// The constant of reciprocal rank fusion (Cormack et al., 2009).
const RRF_K: f32 = 60.0;

/// Questions each sub-query retrieves before fusion, per result asked for.
const POOL_PER_RESULT: usize = 3;

/// The `mk_search` table function.
#[derive(Debug)]
pub struct MkSearchFunction {
    registry: Arc<KbSchema>,
}

impl MkSearchFunction {
    /// A function resolving indexes in `registry`.
    pub fn new(registry: Arc<KbSchema>) -> Self {
        MkSearchFunction { registry }
    }
}

impl TableFunctionImpl for MkSearchFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        Ok(Arc::new(MkSearchTable::from_call("mk_search", &self.registry, args)?))
    }
}

/// Document columns carried into results (not the key, vector or Meta-Knowledge columns).
fn document_fields(documents: &KnowledgeIndex) -> Vec<(usize, Field)> {
    documents
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| is_document_column(documents, f.name()))
        .map(|(i, f)| (i, f.as_ref().clone().with_nullable(true)))
        .collect()
}

fn result_schema(documents: &KnowledgeIndex) -> SchemaRef {
    let mut fields = vec![
        Field::new("question_id", DataType::Utf8, false),
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new(CLUSTER_COLUMN, DataType::Utf8, true),
        Field::new("topics", string_list_type(), false),
        Field::new("score", DataType::Float32, false),
        Field::new("routed_clusters", string_list_type(), false),
        Field::new("sub_queries", string_list_type(), false),
        Field::new("matched_by", string_list_type(), false),
    ];
    fields.extend(document_fields(documents).into_iter().map(|(_, f)| f));
    Arc::new(Schema::new(fields))
}

/// One `mk_search` call, computed when the plan runs.
#[derive(Debug, Clone)]
pub(super) struct MkSearchTable {
    documents: Arc<KnowledgeIndex>,
    mk: MkAttachment,
    query: String,
    k: Option<usize>,
    /// The persona asking (`persona => 'name'`).
    persona: Option<String>,
    schema: SchemaRef,
}

/// How `mk_search` weighs its rankings.
#[derive(Debug, Clone, Copy)]
struct Weights {
    /// The original query's ranking.
    original: f32,
    /// The rewrites' rankings together.
    rewrites: f32,
    /// Whether the original query is matched only inside the routed clusters.
    strict_routing: bool,
    /// The kind of the routed clusters.
    route_by: ClusterKind,
    /// Each of the documents' own rankings.
    documents: f32,
    /// Whether rankings are fused per document (each ranking counts a document once, at the
    /// rank of its best question) rather than per question.
    by_document: bool,
}

/// Where `mk_search` matches its sub-queries.
struct Scope<'a> {
    /// The clusters the query was routed to.
    routed: &'a [String],
    /// A persona's filter over the question rows.
    filter: Option<&'a CompiledFilter>,
}

/// A question (or, fusing by document, a document) found by at least one sub-query.
struct Fused {
    /// The hit shown for it: with document fusion, the question that added most to its score.
    batch: usize,
    row: usize,
    /// What that hit added.
    best: f32,
    score: f32,
    matched_by: Vec<usize>,
}

impl MkSearchTable {
    /// Checks the arguments of `function(kb, 'query' [, k] [, persona => 'name'])`
    /// (`mk_search`, `mk_answer`).
    pub(super) fn from_call(function: &str, registry: &KbSchema, args: TableFunctionArgs) -> Result<Self> {
        let usage = format!("usage: {function}(kb, 'query text' [, k] [, persona => 'name'])");
        let access = Access::of(args.session().config());
        let call = CallArgs::of(function, args.exprs(), &["persona"])?;
        let exprs = &call.positional;
        if !(2..=3).contains(&exprs.len()) {
            return plan_err!("{function} takes 2 or 3 arguments; {usage}");
        }
        let name = table_arg(&exprs[0]).ok_or_else(|| {
            DataFusionError::Plan(format!("{function}: the first argument must name an index; {usage}"))
        })?;
        let entry = registry.entry_or_error(function, &name)?;
        let (documents, mk) = (entry.index, entry.mk);
        let Some(mk) = mk else {
            return plan_err!(
                "{function}: '{name}' has no Meta-Knowledge side (create it with OPTIONS ('meta_knowledge' 'true'))"
            );
        };
        let query = string_arg(&exprs[1])
            .filter(|q| !q.trim().is_empty())
            .ok_or_else(|| DataFusionError::Plan(format!("{function}: the query must be a non-empty text; {usage}")))?;
        access.check_query_text(function, &query)?;
        let k = match exprs.get(2) {
            Some(e) => {
                let k = int_arg(e).filter(|v| *v > 0).ok_or_else(|| {
                    DataFusionError::Plan(format!("{function}: k must be a positive integer; {usage}"))
                })?;
                Some(access.check_k(function, usize::try_from(k).unwrap_or(usize::MAX))?)
            }
            None => None,
        };
        let persona = call.named_string("persona")?;
        if let Some(wanted) = &persona
            && mk.index.persona(wanted).is_none()
        {
            let known: Vec<String> = mk.index.personas().into_iter().map(|p| p.name).collect();
            return plan_err!(
                "{function}: '{name}' has no persona called '{wanted}' ({}); add one with INSERT INTO {name}_personas (name, description) VALUES (…)",
                if known.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("personas: {}", known.join(", "))
                }
            );
        }
        // Tagged with every argument, the persona included.
        let schema = tag_call(&result_schema(&documents), function, args.exprs());
        Ok(MkSearchTable {
            documents,
            mk,
            query,
            k,
            persona,
            schema,
        })
    }

    /// The query text.
    pub(super) fn query(&self) -> &str {
        &self.query
    }

    /// The `k` the call gave, if any.
    pub(super) fn k(&self) -> Option<usize> {
        self.k
    }

    /// The index's Meta-Knowledge side (its generators and failure log).
    pub(super) fn mk(&self) -> &MkAttachment {
        &self.mk
    }

    /// The `k` best QA pairs for the query, as `mk_search` returns them.
    pub(super) async fn search(&self, options: &MkOptions, k: usize) -> Result<RecordBatch> {
        let services = &self.mk.services;
        let questions = self.mk.index.questions().clone();
        let external = |e| DataFusionError::External(Box::new(e));
        let embedder = services
            .models
            .model_of(&questions)?
            .get_async()
            .await
            .map_err(external)?;
        let query_vector = embedder.embed_query(&self.query).await.map_err(external)?;

        // A persona routes among its own clusters, and its summary leads the rewrites.
        let persona =
            match &self.persona {
                Some(name) => Some(self.mk.index.persona(name).ok_or_else(|| {
                    DataFusionError::Plan(format!("mk_search: persona '{name}' was deleted meanwhile"))
                })?),
                None => None,
            };
        let (count, margin) = (options.route_clusters, options.route_margin as f32);
        let routed_clusters: Vec<Cluster> = match &persona {
            Some(persona) => route_among(
                self.mk.index.persona_clusters(persona, count, margin),
                &query_vector,
                count,
                margin,
            ),
            None => self.mk.index.route(&query_vector, options.route_by, count, margin),
        }
        .into_iter()
        .map(|(c, _)| c)
        .collect();
        if routed_clusters.is_empty() {
            return match &persona {
                Some(p) => plan_err!("mk_search: persona '{}' routes to no cluster of the index", p.name),
                None => {
                    plan_err!("mk_search: the index has no clusters yet (insert documents with mk_qa questions first)")
                }
            };
        }
        let mut context = briefs(&routed_clusters);
        if let Some(summary) = persona.as_ref().and_then(|p| p.summary.as_ref()) {
            let name = persona.as_ref().map(|p| p.name.clone()).unwrap_or_default();
            context.insert(
                0,
                ClusterBrief {
                    cluster: name,
                    summary: summary.text.clone(),
                },
            );
        }
        let filter = match persona.as_ref().and_then(|p| p.filter.as_deref()) {
            Some(sql) => Some(CompiledFilter::from_sql(sql, &questions.schema())?),
            None => None,
        };
        let routed: Vec<String> = routed_clusters.iter().map(|c| c.name.clone()).collect();
        let generator = services
            .generators
            .generator(options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let rewritten = match generator.rewrite(&self.query, &context).await {
            Ok(q) => q,
            Err(e) => {
                services.failures.record(
                    &format!("mk_search rewrite ({})", generator.name()),
                    &self.query,
                    &e.to_string(),
                );
                Vec::new()
            }
        };
        let mut sub_queries = vec![self.query.trim().to_string()];
        for q in rewritten {
            if !sub_queries.iter().any(|s| s.eq_ignore_ascii_case(q.trim())) {
                sub_queries.push(q.trim().to_string());
            }
        }
        let texts: Vec<Option<&str>> = sub_queries.iter().map(|q| Some(q.as_str())).collect();
        let embeddings = embedder.embed_as(&texts, TextRole::Query).await.map_err(external)?;
        let vectors: Vec<Vec<f32>> = (0..sub_queries.len())
            .map(|i| embeddings.get(i).unwrap_or(&query_vector).to_vec())
            .collect();
        // CPU work like any operator's (a few graph walks): it runs where DataFusion runs.
        let weights = Weights {
            // A negative (or NaN) weight counts as 0: that ranking is left out.
            original: options.original_query_weight.max(0.0) as f32,
            rewrites: options.rewrite_weight.max(0.0) as f32,
            documents: options.document_weight.max(0.0) as f32,
            strict_routing: options.strict_routing,
            route_by: options.route_by,
            by_document: options.fuse_documents,
        };
        let document_rankings = if weights.documents > 0.0 {
            // The documents are searched as vector_search does: through their query adapter.
            let document_vector = services.models.adapters().adapt(&self.documents, query_vector.clone());
            self.document_rankings(&document_vector, k)?
        } else {
            Vec::new()
        };
        let scope = Scope {
            routed: &routed,
            filter: filter.as_ref(),
        };
        self.rank(&vectors, &scope, &sub_queries, &document_rankings, weights, k)
    }

    /// The documents' own rankings for the original query (document id → rank from 1): by
    /// vector, and by BM25 when the index has text columns.
    fn document_rankings(&self, query_vector: &[f32], k: usize) -> Result<Vec<HashMap<String, usize>>> {
        let pool = k.saturating_mul(POOL_PER_RESULT).max(30);
        let mut hits = vec![self.documents.search(query_vector, pool, None).map_err(index_error)?];
        if !self.documents.text_columns().is_empty() {
            let query = TextQuery::terms(self.query.clone());
            hits.push(self.documents.text_search(&query, pool, None).map_err(index_error)?);
        }
        let key = self.documents.manifest().key_column;
        hits.iter()
            .map(|batch| {
                let ids =
                    datafusion::arrow::compute::cast(batch.column(batch.schema().index_of(&key)?), &DataType::Utf8)?;
                let ids = ids.as_string::<i32>();
                let mut ranks = HashMap::new();
                for id in ids.iter().flatten() {
                    let next = ranks.len() + 1;
                    ranks.entry(id.to_string()).or_insert(next);
                }
                Ok(ranks)
            })
            .collect()
    }

    /// Matches every sub-query (sub-query 0 is the original; inside the routed clusters only
    /// when routing is strict), fuses the rankings with their weights, adds the documents'
    /// own rankings to the pairs found, and builds the rows.
    fn rank(
        &self,
        vectors: &[Vec<f32>],
        scope: &Scope<'_>,
        sub_queries: &[String],
        document_rankings: &[HashMap<String, usize>],
        weights: Weights,
        k: usize,
    ) -> Result<RecordBatch> {
        let questions = self.mk.index.questions();
        let allowed: HashSet<&str> = scope.routed.iter().map(String::as_str).collect();
        // Strict routing and a persona's filter confine the matching; both must pass.
        let confine = |batch: &RecordBatch| -> std::result::Result<BooleanArray, IndexError> {
            let routed = match weights.strict_routing {
                true => Some(self.mk.index.in_clusters(batch, weights.route_by, &allowed)?),
                false => None,
            };
            let filtered = scope.filter.map(|f| f.evaluate(batch)).transpose()?;
            match (routed, filtered) {
                (Some(a), Some(b)) => and(&a, &b).map_err(|e| IndexError::Filter(e.to_string())),
                (Some(mask), None) | (None, Some(mask)) => Ok(mask),
                (None, None) => Ok(BooleanArray::from(vec![true; batch.num_rows()])),
            }
        };
        let confined = weights.strict_routing || scope.filter.is_some();
        let filter: Option<&mkflow_index::RowPredicate<'_>> = if confined { Some(&confine) } else { None };
        let pool = k.saturating_mul(POOL_PER_RESULT).max(30);
        // (sub-query index, hits), one ranking per sub-query.
        let mut rankings: Vec<(usize, RecordBatch)> = Vec::new();
        for (i, vector) in vectors.iter().enumerate() {
            rankings.push((i, questions.search(vector, pool, filter).map_err(index_error)?));
        }
        let rewrites = vectors.len().saturating_sub(1).max(1) as f32;
        let weight_of = |sub_query: usize| {
            if sub_query == 0 {
                weights.original
            } else {
                weights.rewrites / rewrites
            }
        };

        let mut fused: HashMap<String, Fused> = HashMap::new();
        for (batch_index, (sub_query, hits)) in rankings.iter().enumerate() {
            // Questions rank by their position; documents by their best question's, each once.
            let key_column = hits
                .schema()
                .index_of(if weights.by_document { "doc_id" } else { "question_id" })?;
            let keys = hits.column(key_column).as_string::<i32>();
            let weight = weight_of(*sub_query);
            let mut seen: HashSet<&str> = HashSet::new();
            for row in 0..hits.num_rows() {
                let key = keys.value(row);
                if !seen.insert(key) {
                    continue;
                }
                let added = weight / (RRF_K + seen.len() as f32);
                let entry = fused.entry(key.to_string()).or_insert(Fused {
                    batch: batch_index,
                    row,
                    best: added,
                    score: 0.0,
                    matched_by: Vec::new(),
                });
                entry.score += added;
                if added > entry.best {
                    (entry.batch, entry.row, entry.best) = (batch_index, row, added);
                }
                if !entry.matched_by.contains(sub_query) {
                    entry.matched_by.push(*sub_query);
                }
            }
        }
        // The documents' own rankings add to the pairs found (they bring no pair of their own).
        if !document_rankings.is_empty() {
            let doc_ids: Vec<&StringArray> = rankings
                .iter()
                .map(|(_, hits)| Ok(hits.column(hits.schema().index_of("doc_id")?).as_string::<i32>()))
                .collect::<Result<_>>()?;
            for entry in fused.values_mut() {
                let doc = doc_ids[entry.batch].value(entry.row);
                for ranks in document_rankings {
                    if let Some(rank) = ranks.get(doc) {
                        entry.score += weights.documents / (RRF_K + *rank as f32);
                    }
                }
            }
        }
        let mut ranked: Vec<(String, Fused)> = fused.into_iter().collect();
        ranked.sort_by(|a, b| b.1.score.total_cmp(&a.1.score).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(k);
        self.assemble(&rankings, &ranked, scope.routed, sub_queries)
    }

    /// Builds the result rows: question columns from the hits, provenance, document columns.
    fn assemble(
        &self,
        rankings: &[(usize, RecordBatch)],
        ranked: &[(String, Fused)],
        routed: &[String],
        sub_queries: &[String],
    ) -> Result<RecordBatch> {
        let hit_batches: Vec<&RecordBatch> = rankings.iter().map(|(_, b)| b).collect();
        let question_column = |name: &str| -> Result<ArrayRef> {
            let position = hit_batches[0].schema().index_of(name)?;
            let sources: Vec<&dyn Array> = hit_batches.iter().map(|b| b.column(position).as_ref()).collect();
            let positions: Vec<(usize, usize)> = ranked.iter().map(|(_, f)| (f.batch, f.row)).collect();
            Ok(datafusion::arrow::compute::interleave(&sources, &positions)?)
        };
        let doc_ids = question_column("doc_id")?;
        let question_ids = question_column("question_id")?;
        let topics = self.mk.index.topics_of(question_ids.as_string::<i32>());
        let mut columns: Vec<ArrayRef> = vec![
            question_ids,
            doc_ids.clone(),
            question_column("question")?,
            question_column("answer")?,
            question_column(CLUSTER_COLUMN)?,
            string_lists(topics.iter().map(|t| t.iter().map(String::as_str).collect())),
            Arc::new(Float32Array::from_iter_values(ranked.iter().map(|(_, f)| f.score))),
        ];
        let routed_refs: Vec<&str> = routed.iter().map(String::as_str).collect();
        let sub_refs: Vec<&str> = sub_queries.iter().map(String::as_str).collect();
        columns.push(string_lists(ranked.iter().map(|_| routed_refs.clone())));
        columns.push(string_lists(ranked.iter().map(|_| sub_refs.clone())));
        columns.push(string_lists(
            ranked
                .iter()
                .map(|(_, f)| f.matched_by.iter().map(|&i| sub_queries[i].as_str()).collect()),
        ));

        // Document columns, looked up once per distinct document.
        let doc_ids: &StringArray = doc_ids.as_string::<i32>();
        let mut seen: HashSet<&str> = HashSet::new();
        let distinct: Vec<&str> = doc_ids.iter().flatten().filter(|id| seen.insert(id)).collect();
        let rows = self.documents.lookup(&distinct).map_err(index_error)?;
        let keys = datafusion::arrow::compute::cast(
            rows.column(
                self.documents
                    .schema()
                    .index_of(&self.documents.manifest().key_column)?,
            ),
            &DataType::Utf8,
        )?;
        let found: HashMap<String, u32> = keys
            .as_string::<i32>()
            .iter()
            .enumerate()
            .filter_map(|(i, id)| id.map(|id| (id.to_string(), i as u32)))
            .collect();
        let indices = UInt32Array::from(
            doc_ids
                .iter()
                .map(|id| id.and_then(|id| found.get(id).copied()))
                .collect::<Vec<_>>(),
        );
        for (position, _) in document_fields(&self.documents) {
            columns.push(take(rows.column(position).as_ref(), &indices, None)?);
        }
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for MkSearchTable {
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
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let options = MkOptions::of(state.config_options());
        let k = search_k(state, "mk_search", self.k, limit)?;
        let table = Arc::new(self.clone());
        deferred_scan(self.schema.clone(), projection, None, move |_| {
            let (table, options) = (table.clone(), options.clone());
            async move { table.search(&options, k).await }.boxed()
        })
    }
}
