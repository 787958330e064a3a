//! `embed(text)`: the SQL face of an embedding model, an async UDF served by the model's
//! [`EmbedQueue`].

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue, not_impl_err};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};

use mkflow_index::vector::{vector_type, vectors_to_array};

use super::{EmbedError, EmbedQueue, Embedder, EmbeddingModelSpec, TextRole};

/// An embedding model loaded on first use, with its queue started then, so that registering
/// `embed` costs nothing until a query calls it. Load errors are reported to that query and
/// retried by the next.
#[derive(Debug)]
pub struct LazyEmbedder {
    spec: EmbeddingModelSpec,
    onnx_runtime: Option<PathBuf>,
    loaded: OnceLock<Arc<EmbedQueue>>,
    loading: Mutex<()>,
}

impl LazyEmbedder {
    /// An embedder for `spec`, loading ONNX Runtime from `onnx_runtime` (else
    /// `ORT_DYLIB_PATH`) when it is first needed.
    pub fn new(spec: EmbeddingModelSpec, onnx_runtime: Option<PathBuf>) -> Self {
        LazyEmbedder {
            spec,
            onnx_runtime,
            loaded: OnceLock::new(),
            loading: Mutex::new(()),
        }
    }

    /// The model's description (available without loading it).
    pub fn spec(&self) -> &EmbeddingModelSpec {
        &self.spec
    }

    /// The model's queue if the model has been loaded (nothing is loaded by asking).
    pub fn loaded(&self) -> Option<&Arc<EmbedQueue>> {
        self.loaded.get()
    }

    /// The model's queue, loading the model and starting its worker now if needed. Loading
    /// blocks: async callers use [`LazyEmbedder::get_async`].
    pub fn get(&self) -> Result<Arc<EmbedQueue>, EmbedError> {
        if let Some(queue) = self.loaded.get() {
            return Ok(queue.clone());
        }
        let _guard = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = self.loaded.get() {
            return Ok(queue.clone());
        }
        let embedder = Arc::new(Embedder::load(self.spec.clone(), self.onnx_runtime.as_deref())?);
        let queue = EmbedQueue::start(embedder).map_err(|e| EmbedError::Model {
            model: self.spec.name.clone(),
            message: format!("cannot start its worker thread: {e}"),
        })?;
        Ok(self.loaded.get_or_init(|| Arc::new(queue)).clone())
    }

    /// [`LazyEmbedder::get`] for async callers: a first load runs on the blocking pool.
    pub async fn get_async(self: &Arc<Self>) -> Result<Arc<EmbedQueue>, EmbedError> {
        if let Some(queue) = self.loaded.get() {
            return Ok(queue.clone());
        }
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.get()).await {
            Ok(loaded) => loaded,
            Err(e) => Err(EmbedError::Model {
                model: self.spec.name.clone(),
                message: format!("loading failed: {e}"),
            }),
        }
    }
}

/// The async scalar UDF `embed(text [, role]) -> FixedSizeList<Float32, D>`.
///
/// `role` is `'document'` (the default: what is stored) or `'query'` (what is searched with), for
/// models that write the two differently (see [`TextRole`]). Null, empty and whitespace-only
/// texts give a null vector; texts longer than the model's token limit are truncated. One call sends a whole Arrow batch to the model's queue, which
/// runs it in token-budget batches off the async runtime. Register it with
/// [`EmbedUdf::into_scalar_udf`].
#[derive(Debug)]
pub struct EmbedUdf {
    name: String,
    embedder: Arc<LazyEmbedder>,
    signature: Signature,
}

impl EmbedUdf {
    /// A UDF called `name` over `embedder`.
    pub fn new(name: impl Into<String>, embedder: Arc<LazyEmbedder>) -> Self {
        EmbedUdf {
            name: name.into(),
            embedder,
            signature: Signature::one_of(
                [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View]
                    .into_iter()
                    .flat_map(|text| {
                        [
                            TypeSignature::Exact(vec![text.clone()]),
                            TypeSignature::Exact(vec![text, DataType::Utf8]),
                        ]
                    })
                    .collect(),
                Volatility::Immutable,
            ),
        }
    }
}

impl EmbedUdf {
    /// The role a call's second argument names: a constant `'query'` or `'document'`.
    fn role(&self, arg: &ColumnarValue) -> Result<TextRole> {
        let not_constant = || {
            DataFusionError::Plan(format!(
                "{}(text, role): role must be a constant, 'query' or 'document'",
                self.name
            ))
        };
        let names = cast(&arg.to_array(1)?, &DataType::Utf8)?;
        let names = names
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8 gives a StringArray");
        let name = match names.iter().next() {
            Some(Some(name)) if names.iter().all(|n| n == Some(name)) => name,
            _ => return Err(not_constant()),
        };
        TextRole::parse(name).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{}(text, role): unknown role '{name}' (hint: 'query' for what you search with, 'document' for what is stored)",
                self.name
            ))
        })
    }

    /// The UDF to register with a session (DataFusion runs it as an async function).
    pub fn into_scalar_udf(self) -> ScalarUDF {
        AsyncScalarUDF::new(Arc::new(self)).into_scalar_udf()
    }
}

impl PartialEq for EmbedUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.embedder.spec == other.embedder.spec
    }
}

impl Eq for EmbedUdf {}

impl Hash for EmbedUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.embedder.spec.name.hash(state);
    }
}

impl ScalarUDFImpl for EmbedUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(vector_type(self.embedder.spec.dimensions))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        not_impl_err!(
            "{}() cannot be evaluated here (a join condition or a window): compute it in a subquery's SELECT list",
            self.name
        )
    }

    fn documentation(&self) -> Option<&Documentation> {
        None
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for EmbedUdf {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let started = std::time::Instant::now();
        let queue = self.embedder.get_async().await.map_err(external)?;
        let (arg, role) = match args.args.as_slice() {
            [text] => (text, TextRole::Document),
            [text, role] => (text, self.role(role)?),
            _ => {
                return Err(DataFusionError::Plan(format!(
                    "{}(text [, role]) takes one or two arguments",
                    self.name
                )));
            }
        };
        let is_scalar = matches!(arg, ColumnarValue::Scalar(_));
        let texts = cast(&arg.to_array(args.number_rows.max(1))?, &DataType::Utf8)?;
        let texts = texts
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8 gives a StringArray");
        let inputs: Vec<Option<&str>> = if is_scalar {
            vec![texts.iter().next().flatten()]
        } else {
            texts.iter().collect()
        };
        let embeddings = queue.embed_as(&inputs, role).await.map_err(external)?;
        let array = vectors_to_array(embeddings.vectors, embeddings.present, embeddings.dimensions)?;
        crate::observe::record(&self.name, inputs.len(), started);
        // DataFusion's async function step takes arrays only (a scalar answer would count as
        // one row): a constant text is embedded once and its vector repeated per row.
        if is_scalar {
            let vector = ScalarValue::try_from_array(&array, 0)?;
            Ok(ColumnarValue::Array(vector.to_array_of_size(args.number_rows.max(1))?))
        } else {
            Ok(ColumnarValue::Array(array))
        }
    }
}

fn external(e: EmbedError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}
