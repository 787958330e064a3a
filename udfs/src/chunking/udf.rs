//! `chunk(text [, max_tokens [, overlap_tokens]])`: a text's chunks as a list of structs
//! `{chunk_index, text, start_char, end_char, tokens}`, counted with the default embedding
//! model's tokenizer (`max_tokens` defaults to the model's limit; `overlap_tokens` to 0).

use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, Int64Builder, ListBuilder, StringBuilder, StructBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};

use super::{Chunk, ChunkError, Chunker};
use crate::embedding::EmbeddingModelSpec;

/// The fields of one chunk.
fn chunk_fields() -> Fields {
    Fields::from(vec![
        Field::new("chunk_index", DataType::Int32, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("start_char", DataType::Int64, false),
        Field::new("end_char", DataType::Int64, false),
        Field::new("tokens", DataType::Int32, false),
    ])
}

/// `List<Struct<chunk_index, text, start_char, end_char, tokens>>`.
pub fn chunk_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(chunk_fields()), true)))
}

/// The `chunk` function for one embedding model, its tokenizer loaded on first use.
#[derive(Debug)]
pub struct ChunkUdf {
    spec: EmbeddingModelSpec,
    chunker: OnceLock<std::result::Result<Arc<Chunker>, String>>,
    signature: Signature,
}

impl PartialEq for ChunkUdf {
    fn eq(&self, other: &Self) -> bool {
        self.spec.name == other.spec.name && self.spec.tokenizer_path == other.spec.tokenizer_path
    }
}

impl Eq for ChunkUdf {}

impl std::hash::Hash for ChunkUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.spec.name.hash(state);
        self.spec.tokenizer_path.hash(state);
    }
}

impl ChunkUdf {
    /// `chunk` counting with the tokenizer of `spec`.
    pub fn new(spec: EmbeddingModelSpec) -> Self {
        let text = DataType::Utf8;
        ChunkUdf {
            spec,
            chunker: OnceLock::new(),
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![text.clone()]),
                    TypeSignature::Exact(vec![text.clone(), DataType::Int64]),
                    TypeSignature::Exact(vec![text, DataType::Int64, DataType::Int64]),
                ],
                Volatility::Immutable,
            ),
        }
    }

    /// The chunker, loading the tokenizer on first use.
    pub fn chunker(&self) -> std::result::Result<Arc<Chunker>, ChunkError> {
        self.chunker
            .get_or_init(|| {
                Chunker::load(&self.spec.name, &self.spec.tokenizer_path, self.spec.max_tokens)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(ChunkError::Limits)
    }
}

fn external(e: ChunkError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

impl ScalarUDFImpl for ChunkUdf {
    fn name(&self) -> &str {
        "chunk"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(chunk_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let chunker = self.chunker().map_err(external)?;
        let all_scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let texts = cast(&arrays[0], &DataType::Utf8)?;
        let texts = texts.as_string::<i32>();
        let number = |i: usize| -> Option<ArrayRef> { arrays.get(i).cloned() };
        let (max, overlap) = (number(1), number(2));
        let mut builder = ListBuilder::new(StructBuilder::from_fields(chunk_fields(), 0));
        for row in 0..texts.len() {
            let setting = |array: &Option<ArrayRef>, default: usize| -> Result<usize> {
                match array {
                    None => Ok(default),
                    Some(a) if a.is_null(row) => Ok(default),
                    Some(a) => {
                        let value = a.as_primitive::<Int64Type>().value(row);
                        usize::try_from(value)
                            .or_else(|_| exec_err!("chunk: token counts must not be negative, got {value}"))
                    }
                }
            };
            if texts.is_null(row) {
                builder.append_null();
                continue;
            }
            let (max_tokens, overlap_tokens) = (setting(&max, chunker.limit())?, setting(&overlap, 0)?);
            let chunks = chunker
                .chunks(texts.value(row), max_tokens, overlap_tokens)
                .map_err(external)?;
            append(&mut builder, &chunks);
        }
        let chunks: ArrayRef = Arc::new(builder.finish());
        if all_scalar {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&chunks, 0)?));
        }
        Ok(ColumnarValue::Array(chunks))
    }
}

/// Appends one row's chunks.
fn append(builder: &mut ListBuilder<StructBuilder>, chunks: &[Chunk]) {
    let structs = builder.values();
    for chunk in chunks {
        structs
            .field_builder::<Int32Builder>(0)
            .expect("chunk_index")
            .append_value(chunk.index as i32);
        structs
            .field_builder::<StringBuilder>(1)
            .expect("text")
            .append_value(&chunk.text);
        structs
            .field_builder::<Int64Builder>(2)
            .expect("start_char")
            .append_value(chunk.start_char as i64);
        structs
            .field_builder::<Int64Builder>(3)
            .expect("end_char")
            .append_value(chunk.end_char as i64);
        structs
            .field_builder::<Int32Builder>(4)
            .expect("tokens")
            .append_value(chunk.tokens as i32);
        structs.append(true);
    }
    builder.append(true);
}
