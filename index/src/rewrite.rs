//! Full rewrites of an index's rows: when the deltas call for one, and how the live rows are
//! written to one row file — large segments kept as they are, small ones merged — by an inline
//! full commit ([`crate::commit`]) or a background compaction ([`crate::compaction`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;

use crate::IndexError;
use crate::files::{Pace, RowWriter};
use crate::segment::Segment;
use crate::state::{State, live_rows};

/// Most delta files before a commit rewrites the index in full.
pub const MAX_DELTA_FILES: usize = 32;

/// Most delta files a commit leaves for a background compaction before compacting inline.
pub const MAX_DEFERRED_DELTAS: usize = 16 * MAX_DELTA_FILES;

/// Whether deltas of this size call for a full rewrite.
pub(crate) fn deltas_grown(files: usize, delta_rows: usize, rows: usize) -> bool {
    files >= MAX_DELTA_FILES || delta_rows > rows / 4
}

/// A full rewrite keeps a segment whose rows are all live and whose buffers hold at least this
/// many bytes as it is (sharing its buffers), and merges smaller or thinned-out segments into
/// segments of about this size. So a rewrite copies only what it merges — its peak memory is
/// the index plus that, not twice the index — while a stream of small commits still ends up in
/// few segments.
const MERGED_SEGMENT_BYTES: usize = 32 << 20;

/// Writes all live rows of `state`, in order, to the row file `path` (see
/// [`MERGED_SEGMENT_BYTES`]), one segment at a time, at `pace`; returns them read back from the
/// file.
pub(crate) fn write_compacted(
    path: &Path,
    schema: &SchemaRef,
    state: &State,
    pace: Pace,
) -> Result<Vec<Segment>, IndexError> {
    let mut writer = RowWriter::create(path, schema, pace)?;
    let mut merging = Merging::default();
    for segment in &state.segments {
        let live: Vec<u64> = segment.keys.iter().copied().filter(|&k| state.is_live(k)).collect();
        if live.is_empty() {
            continue;
        }
        let batch = live_rows(segment, &state.locations)?;
        let bytes = data_bytes(&batch);
        if live.len() == segment.keys.len() && bytes >= MERGED_SEGMENT_BYTES {
            merging.write_to(&mut writer, schema)?;
            writer.write(segment)?;
            continue;
        }
        merging.batches.push(batch);
        merging.keys.extend(live);
        merging.bytes += bytes;
        if merging.bytes >= MERGED_SEGMENT_BYTES {
            merging.write_to(&mut writer, schema)?;
        }
    }
    merging.write_to(&mut writer, schema)?;
    writer.finish()
}

/// The bytes of `batch`'s rows (not of the buffers they are part of: a row file's whole
/// mapping, a larger batch's).
fn data_bytes(batch: &arrow::array::RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size())
        })
        .sum()
}

/// Rows being merged into one segment.
#[derive(Default)]
struct Merging {
    batches: Vec<arrow::array::RecordBatch>,
    keys: Vec<u64>,
    bytes: usize,
}

impl Merging {
    /// Writes the rows gathered so far as one segment (if there are any) and starts afresh.
    fn write_to(&mut self, writer: &mut RowWriter, schema: &SchemaRef) -> Result<(), IndexError> {
        let merging = std::mem::take(self);
        if merging.keys.is_empty() {
            return Ok(());
        }
        let merged = Segment::in_memory(concat_batches(schema, &merging.batches)?, Arc::from(merging.keys));
        writer.write(&merged)
    }
}

/// Key → (segment, row) of every row of `segments`.
pub(crate) fn locations_of(segments: &[Segment]) -> HashMap<u64, (usize, usize)> {
    segments
        .iter()
        .enumerate()
        .flat_map(|(i, segment)| segment.keys.iter().enumerate().map(move |(row, &key)| (key, (i, row))))
        .collect()
}
