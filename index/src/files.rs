//! The index's files: Arrow IPC row files (rows with their hidden `u64` keys), written
//! atomically, and the clean-up of files no manifest names.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;

use crate::faults::{self, Stage};
use crate::segment::Segment;
use crate::{IndexError, Manifest};

/// Name of the hidden key column inside row files.
pub(crate) const KEY_FIELD: &str = "_key";

/// The row schema of an Arrow IPC row file (without the key column), and where its key
/// column is.
fn row_schema(path: &Path, stored_schema: &Schema) -> Result<(SchemaRef, usize), IndexError> {
    let key_position = stored_schema
        .index_of(KEY_FIELD)
        .map_err(|_| IndexError::Invalid(format!("{} lacks the {KEY_FIELD} column", path.display())))?;
    let fields: Vec<_> = stored_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != key_position)
        .map(|(_, f)| f.clone())
        .collect();
    Ok((Arc::new(Schema::new(fields)), key_position))
}

fn open_rows(path: &Path) -> Result<FileReader<std::io::BufReader<fs::File>>, IndexError> {
    let file = fs::File::open(path).map_err(|e| IndexError::io(path, e))?;
    FileReader::try_new(std::io::BufReader::new(file), None).map_err(|e| unreadable(path, e))
}

/// A row file that cannot be read, named, with what to do about it.
fn unreadable(path: &Path, e: arrow::error::ArrowError) -> IndexError {
    IndexError::Invalid(format!(
        "{} is not a readable Arrow row file ({e}); the index's rows cannot be recovered from it          (hint: restore the directory from a backup, or re-ingest the documents into a new LOCATION)",
        path.display()
    ))
}

/// The row schema of an Arrow IPC row file, without reading its rows.
pub(crate) fn read_schema(path: &Path) -> Result<SchemaRef, IndexError> {
    let reader = open_rows(path)?;
    Ok(row_schema(path, &reader.schema())?.0)
}

/// Reads an Arrow IPC row file: its schema without the key column, and each batch with its keys.
pub(crate) fn read_rows(path: &Path) -> Result<(SchemaRef, Vec<Segment>), IndexError> {
    let reader = open_rows(path)?;
    let (schema, key_position) = row_schema(path, &reader.schema())?;
    let mut segments = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| unreadable(path, e))?;
        let keys: Arc<[u64]> = Arc::from(
            batch
                .column(key_position)
                .as_primitive::<UInt64Type>()
                .values()
                .as_ref(),
        );
        let mut columns = batch.columns().to_vec();
        columns.remove(key_position);
        segments.push(Segment {
            batch: RecordBatch::try_new(schema.clone(), columns)?,
            keys,
        });
    }
    Ok((schema, segments))
}

/// Writes segments (rows with their keys) to an Arrow IPC file, atomically (temporary file,
/// fsync, rename).
pub(crate) fn write_rows(path: &Path, schema: &SchemaRef, segments: &[Segment]) -> Result<(), IndexError> {
    let mut fields = vec![Field::new(KEY_FIELD, DataType::UInt64, false)];
    fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
    let file_schema = Arc::new(Schema::new(fields));
    let tmp = path.with_extension("arrow.tmp");
    let file = fs::File::create(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
    faults::check(path, Stage::Write).map_err(|e| IndexError::io(&tmp, e))?;
    let mut writer = FileWriter::try_new(std::io::BufWriter::new(file), &file_schema)?;
    for segment in segments {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(segment.keys.to_vec()))];
        columns.extend(segment.batch.columns().iter().cloned());
        writer.write(&RecordBatch::try_new(file_schema.clone(), columns)?)?;
    }
    writer.finish()?;
    let file = writer
        .into_inner()?
        .into_inner()
        .map_err(|e| IndexError::io(&tmp, e.into_error()))?;
    faults::check(path, Stage::Sync)
        .and_then(|_| file.sync_all())
        .map_err(|e| IndexError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| IndexError::io(path, e))?;
    Ok(())
}

/// Flushes a file and its directory entry to disk.
pub(crate) fn fsync_file(path: &Path) -> Result<(), IndexError> {
    faults::check(path, Stage::Sync)
        .and_then(|_| fs::File::open(path))
        .and_then(|f| f.sync_all())
        .map_err(|e| IndexError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Flushes a directory's entries (renames) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IndexError::io(dir, e))
}

/// Deletes the data files `replaced` names (after a generation that no longer needs them is
/// published).
pub(crate) fn remove_files_of(dir: &Path, replaced: &Manifest) {
    for file in replaced.files() {
        let _ = fs::remove_file(dir.join(file));
    }
}

/// Deletes files of generations other than the manifest's (left by an interrupted commit).
pub(crate) fn remove_stray_files(dir: &Path, manifest: &Manifest) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_data = ((name.starts_with("rows-") || name.starts_with("delta-")) && name.ends_with(".arrow"))
            || (name.starts_with("ann-") && name.ends_with(".usearch"))
            || name.ends_with(".tmp");
        if is_data && !manifest.files().any(|f| f == name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}
