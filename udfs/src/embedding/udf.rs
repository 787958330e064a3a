//! `embed(text)`: the SQL face of an [`Embedder`].

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};

use mkflow_index::vector::{vector_type, vectors_to_array};

use super::{EmbedError, Embedder, EmbeddingModelSpec};

/// An embedder loaded on first use, so that registering `embed` costs nothing until a query
/// calls it. Load errors are reported to that query and retried by the next.
#[derive(Debug)]
pub struct LazyEmbedder {
    spec: EmbeddingModelSpec,
    onnx_runtime: Option<PathBuf>,
    loaded: OnceLock<Arc<Embedder>>,
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

    /// The model if it has been loaded (nothing is loaded by asking).
    pub fn loaded(&self) -> Option<&Arc<Embedder>> {
        self.loaded.get()
    }

    /// The loaded model, loading it now if needed.
    pub fn get(&self) -> Result<Arc<Embedder>, EmbedError> {
        if let Some(e) = self.loaded.get() {
            return Ok(e.clone());
        }
        let _guard = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = self.loaded.get() {
            return Ok(e.clone());
        }
        let embedder = Arc::new(Embedder::load(self.spec.clone(), self.onnx_runtime.as_deref())?);
        Ok(self.loaded.get_or_init(|| embedder).clone())
    }
}

/// The scalar UDF `embed(text) -> FixedSizeList<Float32, D>`.
///
/// Null, empty and whitespace-only texts give a null vector; texts longer than the model's
/// token limit are truncated. One call embeds a whole Arrow batch in token-budget batches.
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
                vec![
                    TypeSignature::Exact(vec![DataType::Utf8]),
                    TypeSignature::Exact(vec![DataType::LargeUtf8]),
                    TypeSignature::Exact(vec![DataType::Utf8View]),
                ],
                Volatility::Immutable,
            ),
        }
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

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let started = std::time::Instant::now();
        let embedder = self.embedder.get().map_err(external)?;
        let [arg] = args.args.as_slice() else {
            return Err(DataFusionError::Plan(format!("{}(text) takes one argument", self.name)));
        };
        let is_scalar = matches!(arg, ColumnarValue::Scalar(_));
        let texts = cast(&arg.to_array(args.number_rows.max(1))?, &DataType::Utf8)?;
        let texts = texts
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8 gives a StringArray");
        let inputs: Vec<Option<&str>> = texts.iter().collect();
        let embeddings = embedder.embed(&inputs).map_err(external)?;
        let array = vectors_to_array(embeddings.vectors, embeddings.present, embeddings.dimensions)?;
        crate::observe::record(&self.name, inputs.len(), started);
        if is_scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?))
        } else {
            Ok(ColumnarValue::Array(array))
        }
    }

    fn documentation(&self) -> Option<&Documentation> {
        None
    }
}

fn external(e: EmbedError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}
