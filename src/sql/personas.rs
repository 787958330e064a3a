//! `<kb>_personas`: the personas of a Meta-Knowledge index as a table (see
//! [`crate::mk::personas`]). `INSERT` adds or replaces personas by name (`name`, `description`,
//! `clusters`, `filter`; the other columns are the index's to fill), `DELETE` removes them,
//! `SELECT` shows them with their summaries and the clusters they route to now.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result, not_impl_err};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::StreamExt;
use mkflow_udfs::mk::{MkOptions, string_list_type};

use super::columns::string_lists;
use super::filters::CompiledFilter;
use super::memory_scan;
use crate::mk::{MkAttachment, PersonaRow};
use crate::support::blocking;

/// Schema of the personas table.
fn personas_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("description", DataType::Utf8, true),
        Field::new("clusters", string_list_type(), true),
        Field::new("filter", DataType::Utf8, true),
        Field::new("summary", DataType::Utf8, true),
        Field::new("summary_version", DataType::UInt64, true),
        Field::new("routed_clusters", string_list_type(), true),
    ]))
}

/// The personas table of one index.
#[derive(Debug)]
pub struct PersonasTable {
    mk: MkAttachment,
    schema: SchemaRef,
}

impl PersonasTable {
    /// The table over `mk`'s personas.
    pub fn new(mk: MkAttachment) -> Self {
        PersonasTable {
            mk,
            schema: personas_schema(),
        }
    }

    /// The personas now, routed as `options` route.
    fn batch(&self, options: &MkOptions) -> Result<RecordBatch> {
        let personas = self.mk.index.personas();
        let (count, margin) = (options.route_clusters, options.route_margin as f32);
        let routed: Vec<Vec<String>> = personas
            .iter()
            .map(|p| {
                self.mk
                    .index
                    .persona_clusters(p, count, margin)
                    .into_iter()
                    .map(|c| c.name)
                    .collect()
            })
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(personas.iter().map(|p| p.name.as_str()))),
            Arc::new(StringArray::from_iter_values(
                personas.iter().map(|p| p.description.as_str()),
            )),
            string_lists(personas.iter().map(|p| p.clusters.iter().map(String::as_str).collect())),
            Arc::new(StringArray::from(
                personas.iter().map(|p| p.filter.as_deref()).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                personas
                    .iter()
                    .map(|p| p.summary.as_ref().map(|s| s.text.as_str()))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from(
                personas
                    .iter()
                    .map(|p| p.summary.as_ref().map(|s| s.version))
                    .collect::<Vec<_>>(),
            )),
            string_lists(routed.iter().map(|r| r.iter().map(String::as_str).collect())),
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

#[async_trait]
impl TableProvider for PersonasTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let batch = self.batch(&MkOptions::of(state.config_options()))?;
        memory_scan(vec![batch], self.schema.clone(), projection, limit)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return not_impl_err!("{insert_op} is not supported by personas: INSERT adds or replaces them by name");
        }
        let sink = PersonaSink {
            mk: self.mk.clone(),
            schema: self.schema.clone(),
            delete: None,
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }

    async fn delete_from(&self, state: &dyn Session, filters: Vec<Expr>) -> Result<Arc<dyn ExecutionPlan>> {
        let filter = CompiledFilter::compile(state, &self.schema, &filters)?;
        let sink = PersonaSink {
            mk: self.mk.clone(),
            schema: self.schema.clone(),
            delete: Some(filter),
        };
        // The sink deletes when the plan runs, so planning a DELETE changes nothing.
        let input = Arc::new(EmptyExec::new(self.schema.clone()));
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Adds or replaces the inserted personas, or (`delete`) removes those a filter selects.
#[derive(Debug)]
struct PersonaSink {
    mk: MkAttachment,
    schema: SchemaRef,
    /// For a `DELETE`: its filter (`None` inside: every persona).
    delete: Option<Option<CompiledFilter>>,
}

impl DisplayAs for PersonaSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let what = if self.delete.is_some() { "delete" } else { "insert" };
        write!(f, "PersonaSink: {what}")
    }
}

#[async_trait]
impl DataSink for PersonaSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, mut data: SendableRecordBatchStream, context: &Arc<TaskContext>) -> Result<u64> {
        let options = MkOptions::of(context.session_config().options());
        if let Some(filter) = &self.delete {
            let current = PersonasTable::new(self.mk.clone()).batch(&options)?;
            let names = current.column(0).as_string::<i32>();
            let doomed: HashSet<String> = match filter {
                Some(filter) => {
                    let mask = filter
                        .evaluate(&current)
                        .map_err(|e| DataFusionError::Plan(e.to_string()))?;
                    (0..current.num_rows())
                        .filter(|&i| mask.is_valid(i) && mask.value(i))
                        .map(|i| names.value(i).to_string())
                        .collect()
                }
                None => names.iter().flatten().map(String::from).collect(),
            };
            let mk = self.mk.index.clone();
            return Ok(blocking(move || mk.delete_personas(&doomed)).await? as u64);
        }
        let mut rows = Vec::new();
        while let Some(batch) = data.next().await {
            rows.extend(persona_rows(&batch?)?);
        }
        let questions = self.mk.index.questions().schema();
        for row in &rows {
            if let Some(filter) = &row.filter {
                CompiledFilter::from_sql(filter, &questions).map_err(|e| {
                    DataFusionError::Plan(format!(
                        "persona '{}': its filter must be a predicate over the question rows ({}): {e}",
                        row.name,
                        questions
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            }
        }
        Ok(self.mk.put_personas(rows, &options).await? as u64)
    }
}

/// The personas of an inserted batch, checked: a name, and a description or clusters.
fn persona_rows(batch: &RecordBatch) -> Result<Vec<PersonaRow>> {
    let text = |name: &str| -> Result<ArrayRef> {
        let column = batch
            .column_by_name(name)
            .ok_or_else(|| DataFusionError::Plan(format!("personas: the inserted rows have no '{name}' column")))?;
        Ok(cast(column, &DataType::Utf8)?)
    };
    let (names, descriptions, filters) = (text("name")?, text("description")?, text("filter")?);
    let (names, descriptions, filters) = (
        names.as_string::<i32>(),
        descriptions.as_string::<i32>(),
        filters.as_string::<i32>(),
    );
    let clusters = batch
        .column_by_name("clusters")
        .map(|c| cast(c, &string_list_type()))
        .transpose()?;
    let clusters: Option<&ListArray> = clusters.as_ref().map(|c| c.as_list::<i32>());
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let name = if names.is_valid(i) { names.value(i).trim() } else { "" };
        if name.is_empty() {
            return Err(DataFusionError::Plan("personas: every persona needs a name".into()));
        }
        let named: Vec<String> = match clusters {
            Some(lists) if lists.is_valid(i) => lists
                .value(i)
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            _ => Vec::new(),
        };
        let description = if descriptions.is_valid(i) {
            descriptions.value(i).trim()
        } else {
            ""
        };
        if description.is_empty() && named.is_empty() {
            return Err(DataFusionError::Plan(format!(
                "persona '{name}' needs a description or clusters (hint: INSERT INTO <kb>_personas (name, description) VALUES ('{name}', 'what it is interested in'))"
            )));
        }
        let filter = filters
            .is_valid(i)
            .then(|| filters.value(i).trim().to_string())
            .filter(|f| !f.is_empty());
        rows.push(PersonaRow {
            name: name.to_string(),
            description: description.to_string(),
            clusters: named,
            filter,
        });
    }
    Ok(rows)
}
