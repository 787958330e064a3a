//! Serializing a [`ShardExec`] for the trip from coordinator to worker: a
//! `PhysicalExtensionCodec` registered on both sides. The calls' arguments and filters travel
//! as DataFusion logical expressions (`datafusion-proto`), decoded on the worker only when the
//! call runs, against the worker's own functions.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::{Result, internal_err};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::logical_plan::DefaultLogicalExtensionCodec;
use datafusion_proto::logical_plan::from_proto::parse_exprs;
use datafusion_proto::logical_plan::to_proto::serialize_exprs;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use datafusion_proto::protobuf::{self, proto_error};
use prost::Message;

use super::exec::{ShardCall, ShardExec, ShardRunner};

#[derive(Clone, PartialEq, Message)]
struct ShardExecProto {
    #[prost(message, optional, tag = "1")]
    schema: Option<protobuf::Schema>,
    #[prost(message, repeated, tag = "2")]
    tasks: Vec<TaskProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TaskProto {
    #[prost(message, repeated, tag = "1")]
    calls: Vec<CallProto>,
}

#[derive(Clone, PartialEq, Message)]
struct CallProto {
    #[prost(string, tag = "1")]
    shard: String,
    #[prost(string, tag = "2")]
    worker: String,
    #[prost(string, optional, tag = "3")]
    function: Option<String>,
    #[prost(string, tag = "4")]
    table: String,
    #[prost(bytes = "vec", tag = "5")]
    args: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    filters: Vec<u8>,
    #[prost(uint64, repeated, tag = "7")]
    projection: Vec<u64>,
    #[prost(bool, tag = "8")]
    projected: bool,
    #[prost(uint64, optional, tag = "9")]
    limit: Option<u64>,
    #[prost(bytes = "vec", tag = "10")]
    text_statistics: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct ExprsProto {
    #[prost(message, repeated, tag = "1")]
    exprs: Vec<protobuf::LogicalExprNode>,
}

/// Serializes expressions (a call's arguments, pushed filters).
pub fn encode_exprs(exprs: &[Expr]) -> Result<Vec<u8>> {
    let exprs = serialize_exprs(exprs, &DefaultLogicalExtensionCodec {})?;
    Ok(ExprsProto { exprs }.encode_to_vec())
}

/// Reads expressions [`encode_exprs`] wrote, resolving functions in `context`.
pub fn decode_exprs(bytes: &[u8], context: &TaskContext) -> Result<Vec<Expr>> {
    let proto = ExprsProto::decode(bytes).map_err(|e| proto_error(format!("shard call arguments: {e}")))?;
    Ok(parse_exprs(&proto.exprs, context, &DefaultLogicalExtensionCodec {})?)
}

/// Encodes and decodes [`ShardExec`]; decoded on a worker, the leaf runs its calls with the
/// worker's [`ShardRunner`].
#[derive(Debug, Clone, Default)]
pub struct ShardCodec {
    runner: Option<Arc<dyn ShardRunner>>,
}

impl ShardCodec {
    /// The codec of a worker, whose leaves run with `runner`.
    pub fn for_worker(runner: Arc<dyn ShardRunner>) -> Self {
        ShardCodec { runner: Some(runner) }
    }
}

impl PhysicalExtensionCodec for ShardCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        _context: &TaskContext,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !inputs.is_empty() {
            return internal_err!("ShardExec has no inputs, got {}", inputs.len());
        }
        let proto = ShardExecProto::decode(buf).map_err(|e| proto_error(format!("ShardExec: {e}")))?;
        let schema: Schema = proto
            .schema
            .as_ref()
            .ok_or_else(|| proto_error("ShardExec without a schema"))?
            .try_into()?;
        let tasks = proto
            .tasks
            .into_iter()
            .map(|task| task.calls.into_iter().map(call_from_proto).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(ShardExec::new(tasks, Arc::new(schema), self.runner.clone())))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(exec) = node.downcast_ref::<ShardExec>() else {
            return internal_err!("ShardCodec encodes ShardExec, not {}", node.name());
        };
        let proto = ShardExecProto {
            schema: Some(node.schema().as_ref().try_into()?),
            tasks: exec
                .tasks()
                .iter()
                .map(|task| TaskProto {
                    calls: task.iter().map(call_to_proto).collect(),
                })
                .collect(),
        };
        proto.encode(buf).map_err(|e| proto_error(format!("ShardExec: {e}")))
    }
}

/// Serializes one call (the body of a schema request, see [`super::coordinator`]).
pub fn encode_call(call: &ShardCall) -> Vec<u8> {
    call_to_proto(call).encode_to_vec()
}

/// Reads a call [`encode_call`] wrote.
pub fn decode_call(bytes: &[u8]) -> Result<ShardCall> {
    call_from_proto(CallProto::decode(bytes).map_err(|e| proto_error(format!("shard call: {e}")))?)
}

/// Serializes a schema (a schema request's answer).
pub fn encode_schema(schema: &Schema) -> Result<Vec<u8>> {
    let proto: protobuf::Schema = schema.try_into()?;
    Ok(proto.encode_to_vec())
}

/// Reads a schema [`encode_schema`] wrote.
pub fn decode_schema(bytes: &[u8]) -> Result<Schema> {
    let proto = protobuf::Schema::decode(bytes).map_err(|e| proto_error(format!("shard schema: {e}")))?;
    Ok((&proto).try_into()?)
}

fn call_to_proto(call: &ShardCall) -> CallProto {
    CallProto {
        shard: call.shard.clone(),
        worker: call.worker.to_string(),
        function: call.function.clone(),
        table: call.table.clone(),
        args: call.args.clone(),
        filters: call.filters.clone(),
        projection: call.projection.iter().flatten().map(|&i| i as u64).collect(),
        projected: call.projection.is_some(),
        limit: call.limit.map(|l| l as u64),
        text_statistics: call.text_statistics.clone(),
    }
}

fn call_from_proto(proto: CallProto) -> Result<ShardCall> {
    Ok(ShardCall {
        worker: proto
            .worker
            .parse()
            .map_err(|e| proto_error(format!("shard {}: worker '{}': {e}", proto.shard, proto.worker)))?,
        shard: proto.shard,
        function: proto.function,
        table: proto.table,
        args: proto.args,
        filters: proto.filters,
        projection: proto
            .projected
            .then(|| proto.projection.iter().map(|&i| i as usize).collect()),
        limit: proto.limit.map(|l| l as usize),
        text_statistics: proto.text_statistics,
    })
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field};
    use datafusion::prelude::{SessionContext, col, lit};
    use datafusion_proto::physical_plan::DefaultPhysicalProtoConverter;

    use super::*;

    #[test]
    fn a_shard_leaf_and_its_arguments_survive_the_trip() {
        let schema = Arc::new(Schema::new(vec![Field::new("score", DataType::Float32, false)]));
        let args = encode_exprs(&[lit("query text"), lit(5i64)]).unwrap();
        let call = ShardCall {
            shard: "kb-1".into(),
            worker: "http://127.0.0.1:7001".parse().unwrap(),
            function: Some("vector_search".into()),
            table: "kb".into(),
            args,
            filters: encode_exprs(&[col("year").gt(lit(2020))]).unwrap(),
            projection: Some(vec![0]),
            limit: Some(3),
            text_statistics: b"{}".to_vec(),
        };
        let exec: Arc<dyn ExecutionPlan> = Arc::new(ShardExec::new(vec![vec![call.clone()]], schema.clone(), None));
        let mut buf = Vec::new();
        let converter = DefaultPhysicalProtoConverter {};
        ShardCodec::default().try_encode(exec, &mut buf, &converter).unwrap();
        let context = SessionContext::new().task_ctx();
        let decoded = ShardCodec::default()
            .try_decode(&buf, &[], &context, &converter)
            .unwrap();
        let decoded = decoded.downcast_ref::<ShardExec>().unwrap();
        assert_eq!(decoded.tasks(), &[vec![call.clone()]]);
        assert_eq!(decoded.schema(), schema);
        let args = decode_exprs(&call.args, &context).unwrap();
        assert_eq!(args, vec![lit("query text"), lit(5i64)]);
        assert_eq!(
            decode_exprs(&call.filters, &context).unwrap(),
            vec![col("year").gt(lit(2020))]
        );
        assert!(decode_exprs(b"\xff\xff", &context).is_err());
    }
}
