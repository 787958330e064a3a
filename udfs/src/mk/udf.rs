//! The Meta-Knowledge functions of pipeline SQL:
//! - `mk_metadata([title,] body)` → the metadata `Struct` of the session's schema;
//! - `mk_qa([title,] body)` → `List<Struct<question, answer>>`;
//! - `mk_cluster(metadata | labels | label)` → the cluster key (`Utf8`);
//! - `mk_summary(question [, cluster])`, an aggregate → the Meta-Knowledge summary of a group.
//!
//! `mk_metadata` and `mk_qa` are async UDFs sharing one prepare call per document (the paper's
//! single generation call): call both with the same arguments. A document whose generation
//! fails gets null metadata and questions, and its error goes to the failure log (the
//! `dead_letters` table); the pipeline goes on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StringArray, StringBuilder, StructBuilder};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::async_udf::AsyncScalarUDFImpl;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use serde_json::{Map, Value};

use super::generator::{ClusterDigest, Document, FailureLog, Generator, Prepared, QaPair};
use super::schema::{MetadataSchema, UNCLUSTERED, first_string};

/// Prepared documents remembered so `mk_qa` reuses what `mk_metadata` asked for.
const RECENT_DOCUMENTS: usize = 8192;

/// Most questions a `mk_summary` group hands to the generator (evenly sampled beyond).
const SUMMARY_SAMPLE: usize = 256;

type Outcome = Arc<Result<Prepared, String>>;

/// Runs the generator's prepare step for the Meta-Knowledge UDFs, once per document.
#[derive(Debug)]
pub struct Preparer {
    generator: Arc<dyn Generator>,
    schema: Arc<MetadataSchema>,
    failures: Arc<dyn FailureLog>,
    recent: Mutex<(HashMap<String, Outcome>, VecDeque<String>)>,
}

impl Preparer {
    /// Prepares with `generator` into `schema`, recording failures in `failures`.
    pub fn new(generator: Arc<dyn Generator>, schema: Arc<MetadataSchema>, failures: Arc<dyn FailureLog>) -> Self {
        Preparer {
            generator,
            schema,
            failures,
            recent: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    fn key(document: &Document<'_>) -> String {
        format!("{}\u{1}{}", document.title.unwrap_or(""), document.body)
    }

    /// The outcome for each document (`None` where there is no document).
    pub async fn prepare(&self, documents: &[Option<Document<'_>>]) -> Vec<Option<Outcome>> {
        let mut out: Vec<Option<Outcome>> = vec![None; documents.len()];
        let mut missing: Vec<(usize, Document<'_>)> = Vec::new();
        {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            for (i, document) in documents.iter().enumerate() {
                if let Some(d) = document {
                    match recent.0.get(&Self::key(d)) {
                        Some(hit) => out[i] = Some(hit.clone()),
                        None => missing.push((i, *d)),
                    }
                }
            }
        }
        if missing.is_empty() {
            return out;
        }
        let batch: Vec<Document<'_>> = missing.iter().map(|(_, d)| *d).collect();
        let results = self.generator.prepare(&batch).await;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        for ((i, document), result) in missing.into_iter().zip(results) {
            let result = result.map_err(|e| e.to_string());
            if let Err(e) = &result {
                let what = format!("mk_prepare ({})", self.generator.name());
                self.failures.record(&what, &document.full_text(), e);
            }
            let outcome: Outcome = Arc::new(result);
            let key = Self::key(&document);
            if recent.0.insert(key.clone(), outcome.clone()).is_none() {
                recent.1.push_back(key);
            }
            while recent.1.len() > RECENT_DOCUMENTS {
                if let Some(old) = recent.1.pop_front() {
                    recent.0.remove(&old);
                }
            }
            out[i] = Some(outcome);
        }
        out
    }
}

/// The signatures of `f(body)` and `f(title, body)` over any string type.
fn document_signature() -> Signature {
    let strings = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];
    let mut variants: Vec<TypeSignature> = strings.iter().map(|t| TypeSignature::Exact(vec![t.clone()])).collect();
    for a in &strings {
        for b in &strings {
            variants.push(TypeSignature::Exact(vec![a.clone(), b.clone()]));
        }
    }
    Signature::one_of(variants, Volatility::Immutable)
}

/// The string arrays of a call's arguments.
fn string_args(name: &str, args: &ScalarFunctionArgs, rows: usize) -> Result<Vec<StringArray>> {
    if !(1..=2).contains(&args.args.len()) {
        return exec_err!("{name}([title,] body) takes one or two text arguments");
    }
    args.args
        .iter()
        .map(|a| {
            let array = cast(&a.to_array(rows)?, &DataType::Utf8)?;
            Ok(array.as_string::<i32>().clone())
        })
        .collect()
}

/// The documents of a call: `(title, body)` per row, `None` where the body is null or blank.
fn documents<'a>(arrays: &'a [StringArray]) -> Vec<Option<Document<'a>>> {
    let (titles, bodies) = match arrays {
        [body] => (None, body),
        [title, body] => (Some(title), body),
        _ => unreachable!("checked by string_args"),
    };
    (0..bodies.len())
        .map(|i| {
            let body = bodies.is_valid(i).then(|| bodies.value(i))?;
            let title = titles.filter(|t| t.is_valid(i)).map(|t| t.value(i));
            (!body.trim().is_empty() || title.is_some_and(|t| !t.trim().is_empty())).then_some(Document { title, body })
        })
        .collect()
}

fn is_scalar_call(args: &ScalarFunctionArgs) -> bool {
    args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)))
}

fn columnar(array: ArrayRef, scalar: bool) -> Result<ColumnarValue> {
    if scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?))
    } else {
        Ok(ColumnarValue::Array(array))
    }
}

/// Which part of a prepared document a UDF returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreparedPart {
    /// `mk_metadata`.
    Metadata,
    /// `mk_qa`.
    Questions,
}

/// `mk_metadata` or `mk_qa` (see the module documentation).
#[derive(Debug)]
pub struct PrepareUdf {
    part: PreparedPart,
    preparer: Arc<Preparer>,
    signature: Signature,
}

impl PrepareUdf {
    /// The UDF returning `part` of what `preparer` makes.
    pub fn new(part: PreparedPart, preparer: Arc<Preparer>) -> Self {
        PrepareUdf {
            part,
            preparer,
            signature: document_signature(),
        }
    }
}

impl PartialEq for PrepareUdf {
    fn eq(&self, other: &Self) -> bool {
        self.part == other.part && Arc::ptr_eq(&self.preparer, &other.preparer)
    }
}

impl Eq for PrepareUdf {}

impl Hash for PrepareUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.part.hash(state);
        Arc::as_ptr(&self.preparer).hash(state);
    }
}

/// The type of `mk_qa`'s result.
pub fn qa_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(qa_fields()), true)))
}

fn qa_fields() -> Fields {
    Fields::from(vec![
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
    ])
}

fn qa_array(rows: &[Option<&[QaPair]>]) -> ArrayRef {
    let mut builder = ListBuilder::new(StructBuilder::from_fields(qa_fields(), 0));
    for row in rows {
        match row {
            Some(pairs) => {
                for pair in *pairs {
                    let items = builder.values();
                    items
                        .field_builder::<StringBuilder>(0)
                        .expect("question builder")
                        .append_value(&pair.question);
                    items
                        .field_builder::<StringBuilder>(1)
                        .expect("answer builder")
                        .append_value(&pair.answer);
                    items.append(true);
                }
                builder.append(true);
            }
            None => builder.append(false),
        }
    }
    Arc::new(builder.finish())
}

impl ScalarUDFImpl for PrepareUdf {
    fn name(&self) -> &str {
        match self.part {
            PreparedPart::Metadata => "mk_metadata",
            PreparedPart::Questions => "mk_qa",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.part {
            PreparedPart::Metadata => self.preparer.schema.data_type(),
            PreparedPart::Questions => qa_type(),
        })
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!("{} is an async function and runs only inside a query plan", self.name())
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for PrepareUdf {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let started = std::time::Instant::now();
        // Constant arguments make one document, prepared once.
        let scalar = is_scalar_call(&args);
        let rows = if scalar { 1 } else { args.number_rows.max(1) };
        let arrays = string_args(self.name(), &args, rows)?;
        let docs = documents(&arrays);
        let outcomes = self.preparer.prepare(&docs).await;
        let prepared: Vec<Option<&Prepared>> = outcomes
            .iter()
            .map(|o| o.as_ref().and_then(|r| r.as_ref().as_ref().ok()))
            .collect();
        let array = match self.part {
            PreparedPart::Metadata => {
                let rows: Vec<Option<&Map<String, Value>>> = prepared.iter().map(|p| p.map(|p| &p.metadata)).collect();
                self.preparer.schema.to_array(&rows)
            }
            PreparedPart::Questions => {
                let rows: Vec<Option<&[QaPair]>> = prepared.iter().map(|p| p.map(|p| p.qa.as_slice())).collect();
                qa_array(&rows)
            }
        };
        crate::observe::record(self.name(), docs.len(), started);
        // DataFusion's async function step takes arrays only (a scalar answer would count as
        // one row): the one document's answer is repeated per row.
        if scalar {
            let value = ScalarValue::try_from_array(&array, 0)?;
            Ok(ColumnarValue::Array(value.to_array_of_size(args.number_rows.max(1))?))
        } else {
            Ok(ColumnarValue::Array(array))
        }
    }
}

/// `mk_cluster(x)`: the cluster key of a document — for the metadata struct, the first value
/// of the schema's cluster field; for a list, its first value; for a string, itself;
/// `unclustered` when empty.
#[derive(Debug)]
pub struct ClusterUdf {
    schema: Arc<MetadataSchema>,
    signature: Signature,
}

impl ClusterUdf {
    /// The UDF for metadata of `schema`.
    pub fn new(schema: Arc<MetadataSchema>) -> Self {
        ClusterUdf {
            schema,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl PartialEq for ClusterUdf {
    fn eq(&self, other: &Self) -> bool {
        self.schema == other.schema
    }
}

impl Eq for ClusterUdf {}

impl Hash for ClusterUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.schema.cluster_field.hash(state);
    }
}

impl ScalarUDFImpl for ClusterUdf {
    fn name(&self) -> &str {
        "mk_cluster"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &arg_types[0] {
            DataType::Struct(fields) if fields.find(&self.schema.cluster_field).is_none() => exec_err!(
                "mk_cluster: the struct has no field '{}' (the schema's cluster field)",
                self.schema.cluster_field
            ),
            DataType::Struct(_)
            | DataType::List(_)
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Null => Ok(DataType::Utf8),
            other => exec_err!("mk_cluster takes the metadata struct, a list of labels or a label, not {other}"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let scalar = is_scalar_call(&args);
        let input = args.args[0].to_array(args.number_rows.max(1))?;
        let clusters: Vec<String> = match input.data_type() {
            DataType::Struct(_) => self.schema.clusters_of(input.as_struct()),
            _ => (0..input.len())
                .map(|row| first_string(input.as_ref(), row).unwrap_or_else(|| UNCLUSTERED.to_string()))
                .collect(),
        };
        columnar(Arc::new(StringArray::from(clusters)), scalar)
    }
}

/// Runs a generator future to completion from synchronous code (aggregates).
fn block_on<F: Future + Send>(future: F) -> F::Output
where
    F::Output: Send,
{
    use tokio::runtime::{Builder, Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime starts")
                        .block_on(future)
                })
                .join()
                .expect("the generator does not panic")
        }),
    }
}

/// `mk_summary(question [, cluster])`: the Meta-Knowledge summary of a group of questions.
#[derive(Debug)]
pub struct SummaryUdaf {
    generator: Arc<dyn Generator>,
    signature: Signature,
}

impl SummaryUdaf {
    /// The aggregate summarising with `generator`.
    pub fn new(generator: Arc<dyn Generator>) -> Self {
        SummaryUdaf {
            generator,
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![DataType::Utf8]),
                    TypeSignature::Exact(vec![DataType::Utf8, DataType::Utf8]),
                ],
                Volatility::Immutable,
            ),
        }
    }
}

impl PartialEq for SummaryUdaf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.generator, &other.generator)
    }
}

impl Eq for SummaryUdaf {}

impl Hash for SummaryUdaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.generator.name().hash(state);
    }
}

impl AggregateUDFImpl for SummaryUdaf {
    fn name(&self) -> &str {
        "mk_summary"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SummaryAccumulator {
            generator: self.generator.clone(),
            cluster: None,
            questions: Vec::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}_questions", args.name),
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            )),
            Arc::new(Field::new(format!("{}_cluster", args.name), DataType::Utf8, true)),
        ])
    }
}

/// Collects a group's questions; summarises them on `evaluate`.
#[derive(Debug)]
struct SummaryAccumulator {
    generator: Arc<dyn Generator>,
    cluster: Option<String>,
    questions: Vec<String>,
}

impl SummaryAccumulator {
    fn absorb(&mut self, questions: &dyn Array, clusters: Option<&dyn Array>) {
        let questions = questions.as_string::<i32>();
        self.questions.extend(questions.iter().flatten().map(str::to_string));
        if self.cluster.is_none()
            && let Some(clusters) = clusters
        {
            self.cluster = clusters.as_string::<i32>().iter().flatten().next().map(str::to_string);
        }
    }
}

impl Accumulator for SummaryAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.absorb(values[0].as_ref(), values.get(1).map(|a| a.as_ref()));
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = states[0].as_list::<i32>();
        for row in 0..lists.len() {
            if lists.is_valid(row) {
                self.absorb(lists.value(row).as_ref(), None);
            }
        }
        self.absorb(&StringArray::new_null(0), Some(states[1].as_ref()));
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let values: Vec<ScalarValue> = self.questions.iter().map(|q| ScalarValue::from(q.as_str())).collect();
        Ok(vec![
            ScalarValue::List(ScalarValue::new_list_nullable(&values, &DataType::Utf8)),
            ScalarValue::Utf8(self.cluster.clone()),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        if self.questions.is_empty() {
            return Ok(ScalarValue::Utf8(None));
        }
        let step = self.questions.len().div_ceil(SUMMARY_SAMPLE);
        let digest = ClusterDigest {
            cluster: self.cluster.clone().unwrap_or_default(),
            documents: 0,
            questions: self.questions.iter().step_by(step).cloned().collect(),
            vectors: Vec::new(),
            previous_summary: None,
        };
        let generator = self.generator.clone();
        let summary = block_on(async move { generator.summarize(&digest).await })
            .map_err(|e| DataFusionError::Execution(format!("mk_summary: {e}")))?;
        Ok(ScalarValue::Utf8(Some(summary)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.questions.iter().map(|q| q.capacity() + 24).sum::<usize>()
    }
}
