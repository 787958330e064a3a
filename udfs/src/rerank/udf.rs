//! `rerank(query, text [, model])`: a cross-encoder's score of how well `text` answers `query`
//! (Float32, higher is better; NULL for a NULL or empty text). `model` names a registered
//! reranker, needed only when several are. Typical use: reorder the top of a search,
//! `SELECT … FROM hybrid_search(kb, 'q', 50) ORDER BY rerank('q', body) DESC LIMIT 10`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{AsArray, Float32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err, not_impl_err};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};

use super::Rerankers;

/// The async scalar UDF `rerank`.
#[derive(Debug)]
pub struct RerankUdf {
    rerankers: Rerankers,
    signature: Signature,
}

impl RerankUdf {
    /// `rerank` over the registered `rerankers`.
    pub fn new(rerankers: Rerankers) -> Self {
        let text = DataType::Utf8;
        RerankUdf {
            rerankers,
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![text.clone(), text.clone()]),
                    TypeSignature::Exact(vec![text.clone(), text.clone(), text]),
                ],
                Volatility::Immutable,
            ),
        }
    }

    /// The UDF to register with a session (DataFusion runs it as an async function).
    pub fn into_scalar_udf(self) -> ScalarUDF {
        AsyncScalarUDF::new(Arc::new(self)).into_scalar_udf()
    }
}

impl PartialEq for RerankUdf {
    fn eq(&self, other: &Self) -> bool {
        let names = |r: &Rerankers| r.all().map(|m| m.spec().name.clone()).collect::<Vec<_>>();
        names(&self.rerankers) == names(&other.rerankers)
    }
}

impl Eq for RerankUdf {}

impl Hash for RerankUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        "rerank".hash(state);
        for model in self.rerankers.all() {
            model.spec().name.hash(state);
        }
    }
}

impl ScalarUDFImpl for RerankUdf {
    fn name(&self) -> &str {
        "rerank"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float32)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        not_impl_err!(
            "rerank() cannot be evaluated here (a join condition or a window): compute it in a subquery's SELECT list"
        )
    }
}

/// The one value of a constant argument (`None` when it varies by row or is null).
fn constant(arg: &ColumnarValue) -> Option<Option<String>> {
    match arg {
        ColumnarValue::Scalar(value) => Some(match value {
            ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => v.clone(),
            _ => None,
        }),
        ColumnarValue::Array(_) => None,
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for RerankUdf {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows.max(1);
        let model_name = match args.args.get(2) {
            None => None,
            Some(arg) => match constant(arg) {
                Some(Some(name)) => Some(name),
                _ => return exec_err!("rerank: the model name must be a constant text"),
            },
        };
        let model = self
            .rerankers
            .get(model_name.as_deref())
            .map_err(|e| DataFusionError::Plan(format!("rerank: {e}")))?;
        let column = |i: usize| -> Result<Vec<Option<String>>> {
            let array = cast(&args.args[i].to_array(rows)?, &DataType::Utf8)?;
            Ok(array.as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect())
        };
        let (queries, texts) = (column(0)?, column(1)?);
        // Pairs grouped by query (usually one): a call scores one query's texts.
        let mut scores: Vec<Option<f32>> = vec![None; rows];
        let mut by_query: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        for row in 0..rows {
            if let (Some(query), Some(text)) = (&queries[row], &texts[row])
                && !query.trim().is_empty()
                && !text.trim().is_empty()
            {
                by_query.entry(query.clone()).or_default().push(row);
            }
        }
        for (query, rows_of_query) in by_query {
            let batch: Vec<String> = rows_of_query
                .iter()
                .map(|&r| texts[r].clone().unwrap_or_default())
                .collect();
            let scored = model
                .score_blocking(query, batch)
                .await
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
            for (row, score) in rows_of_query.into_iter().zip(scored) {
                scores[row] = Some(score);
            }
        }
        Ok(ColumnarValue::Array(Arc::new(Float32Array::from(scores))))
    }
}
