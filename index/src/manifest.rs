//! `manifest.json`: the file that says which generation of a knowledge index is current, as of
//! its last checkpoint.
//!
//! A commit writes its files under a fresh generation number — all live rows and the ANN graph
//! (a full commit), or only the rows it upserted (a delta). A full commit then replaces the
//! manifest atomically (write to a temporary file, fsync, rename); a small one appends its
//! manifest to the commit log instead, and opening replays the log into this file (see
//! [`crate::commit_log`], where `Manifest::read_latest` reads the last commit without opening).
//! A crash at any moment leaves either the old or the new generation, each naming complete
//! files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::faults::{self, Stage};
use crate::files::sync_dir;
use crate::{IndexError, Quantization, SourceOffsets, TextColumn};

/// The manifest's file name inside an index directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Current on-disk format version: 2 reads the commit log (`commit.log`) on open.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format version this mkflow opens (version 1: no commit log).
const OLDEST_FORMAT_VERSION: u32 = 1;

/// The persisted description of a knowledge index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// On-disk format version.
    pub format_version: u32,
    /// Commit counter; names this generation's files.
    pub generation: u64,
    /// Embedding model whose vectors the index holds.
    pub model: String,
    /// Vector length.
    pub dimensions: usize,
    /// Storage of vectors inside the ANN graph.
    pub quantization: Quantization,
    /// Column holding the document identifier (upserts replace rows by it).
    pub key_column: String,
    /// Column holding the vectors.
    pub vector_column: String,
    /// Next row key to hand out (keys are never reused).
    pub next_key: u64,
    /// Live rows at this generation.
    pub rows: usize,
    /// Arrow IPC file holding the rows (and their keys) of this generation.
    pub rows_file: String,
    /// usearch file of this generation.
    pub ann_file: String,
    /// Rows upserted since `rows_file` and `ann_file` were written, one Arrow IPC file per
    /// commit (rows with their keys), replayed over them on open in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<String>,
    /// Rows held in `deltas`.
    #[serde(default)]
    pub delta_rows: usize,
    /// Where each streaming source should resume, committed together with the rows they
    /// produced (exactly-once ingestion): source position key (e.g. `kafka:papers:0`) → the
    /// next offset to read.
    #[serde(default, skip_serializing_if = "SourceOffsets::is_empty")]
    pub source_offsets: SourceOffsets,
    /// Columns indexed for full-text search (in `fulltext/`, committed with this generation);
    /// empty: none. Absent in indexes made before full-text search: their string columns but
    /// the key column, indexed when they are opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_columns: Option<Vec<TextColumn>>,
    /// The generation whose text-index commit holds this generation's text, when an earlier one
    /// (a background compaction moves rows between files but changes no text, so it leaves the
    /// text index alone); absent: `generation` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_generation: Option<u64>,
    /// Keys of rows whose vectors `ann_file` lacks (a background compaction copied the graph
    /// before they reached it); added to the graph on open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ann_missing: Vec<u64>,
    /// Keys of rows that had left but whose vectors `ann_file` still holds; removed from the
    /// graph on open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ann_removed: Vec<u64>,
    /// The manifests of the companion indexes committed together with this one (a
    /// Meta-Knowledge index's questions, a chunked index's chunks), by subdirectory, as of this
    /// generation: opening rolls a companion that is ahead back to its entry (see
    /// [`KnowledgeIndex::open_companion`](crate::KnowledgeIndex::open_companion)).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub companions: BTreeMap<String, Manifest>,
    /// The epoch of the commit log that continues this manifest: the log's records of this
    /// epoch are the commits made since it was written (see [`crate::commit_log`]).
    #[serde(default)]
    pub log_epoch: u64,
}

impl Manifest {
    /// Reads `dir/manifest.json`; `Ok(None)` when the directory holds no index yet.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, IndexError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(IndexError::io(&path, e)),
        };
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| {
                IndexError::Invalid(format!(
                    "{} is not a valid manifest: {e} (it is only ever replaced by an atomic rename, so                      the file was damaged outside mkflow; hint: restore the index directory from a backup)",
                    path.display()
                ))
            })?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(IndexError::Invalid(format!(
                "{} has format version {}, this mkflow reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}",
                path.display(),
                manifest.format_version
            )));
        }
        Ok(Some(manifest))
    }

    /// The generation the text index must have committed for this manifest's rows (see
    /// [`Manifest::text_generation`](field@Manifest::text_generation)).
    pub fn text_generation(&self) -> u64 {
        self.text_generation.unwrap_or(self.generation)
    }

    /// The data files this generation names: rows, graph, then the deltas.
    pub(crate) fn files(&self) -> impl Iterator<Item = &str> {
        [&self.rows_file, &self.ann_file]
            .into_iter()
            .chain(&self.deltas)
            .map(String::as_str)
            .filter(|f| !f.is_empty())
    }

    /// Writes the manifest atomically: temporary file, fsync, rename, fsync of the directory.
    pub fn write_atomic(&self, dir: &Path) -> Result<(), IndexError> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        let mut file = fs::File::create(&tmp).map_err(|e| IndexError::io(&tmp, e))?;
        faults::check(&path, Stage::Write)
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| IndexError::io(&tmp, e))?;
        faults::check(&path, Stage::Sync)
            .and_then(|_| file.sync_all())
            .map_err(|e| IndexError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| IndexError::io(&path, e))?;
        sync_dir(dir)
    }
}
