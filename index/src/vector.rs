//! The vector column: its Arrow type (`FixedSizeList<Float32, D>`), and conversions between it
//! and Rust vectors. Embedding UDFs produce this type and the index stores it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Float32Type};
use arrow::error::ArrowError;

use crate::IndexError;

/// The Arrow type of a vector column of `dimensions` floats.
pub fn vector_type(dimensions: usize) -> DataType {
    DataType::FixedSizeList(item_field(), dimensions as i32)
}

/// The element field of a vector column: non-null 32-bit floats.
fn item_field() -> FieldRef {
    Arc::new(Field::new("item", DataType::Float32, false))
}

/// Builds a vector column (`FixedSizeList<Float32, dims>`) from row-major values and each
/// row's validity (an invalid row is null; its values are ignored).
pub fn vectors_to_array(values: Vec<f32>, present: Vec<bool>, dims: usize) -> Result<ArrayRef, ArrowError> {
    let nulls = present.iter().any(|p| !p).then(|| NullBuffer::from(present));
    let size = i32::try_from(dims).map_err(|_| ArrowError::InvalidArgumentError(format!("{dims} dimensions")))?;
    Ok(Arc::new(FixedSizeListArray::try_new(
        item_field(),
        size,
        Arc::new(Float32Array::from(values)),
        nulls,
    )?))
}

/// Reads a vector column (fixed-size or variable list of floats) as one optional vector per
/// row, refusing vectors of the wrong length.
pub(crate) fn extract_vectors(column: &ArrayRef, dims: usize) -> Result<Vec<Option<Vec<f32>>>, IndexError> {
    let as_f32 = |values: &ArrayRef| -> Result<Vec<f32>, IndexError> {
        let values = cast(values, &DataType::Float32)?;
        Ok(values.as_primitive::<Float32Type>().values().to_vec())
    };
    let rows: Vec<Option<ArrayRef>> = match column.data_type() {
        DataType::FixedSizeList(_, _) => {
            let list = column.as_fixed_size_list();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::List(_) => {
            let list = column.as_list::<i32>();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::LargeList(_) => {
            let list = column.as_list::<i64>();
            (0..list.len())
                .map(|i| list.is_valid(i).then(|| list.value(i)))
                .collect()
        }
        DataType::Null => vec![None; column.len()],
        other => {
            return Err(IndexError::Invalid(format!(
                "the vector column must be a list of floats (e.g. embed(text)), got {other}"
            )));
        }
    };
    rows.into_iter()
        .map(|row| {
            row.map(|values| {
                let vector = as_f32(&values)?;
                if vector.len() != dims {
                    return Err(IndexError::DimensionMismatch {
                        expected: dims,
                        found: vector.len(),
                    });
                }
                if vector.iter().any(|x| !x.is_finite()) {
                    return Err(IndexError::Invalid("vector holds NaN or infinite values".into()));
                }
                Ok(vector)
            })
            .transpose()
        })
        .collect()
}

/// Optional vectors as a vector column (a missing vector is a null row).
pub(crate) fn vectors_to_column(vectors: &[Option<Vec<f32>>], dims: usize) -> Result<ArrayRef, IndexError> {
    let mut flat = Vec::with_capacity(vectors.len() * dims);
    for v in vectors {
        match v {
            Some(v) => flat.extend_from_slice(v),
            None => flat.extend(std::iter::repeat_n(0.0, dims)),
        }
    }
    let present: Vec<bool> = vectors.iter().map(Option::is_some).collect();
    Ok(vectors_to_array(flat, present, dims)?)
}

/// Exposes a vector column's values as a flat slice (nulls are zero vectors).
pub fn vector_values(column: &ArrayRef) -> &[f32] {
    let list: &FixedSizeListArray = column.as_fixed_size_list();
    list.values().as_primitive::<Float32Type>().values()
}
