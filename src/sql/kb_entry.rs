//! What the schema records per knowledge index ([`KbEntry`]: the index and its attachments),
//! and what a search reads ([`Searched`]).

use std::sync::Arc;

use mkflow_index::KnowledgeIndex;

use crate::chunks::ChunkIndex;
use crate::mk::MkAttachment;

/// A registered index with its Meta-Knowledge side and its chunks, if it has them.
#[derive(Debug, Clone)]
pub struct KbEntry {
    /// The documents.
    pub index: Arc<KnowledgeIndex>,
    /// The synthetic questions and clusters (`OPTIONS ('meta_knowledge' 'true')`).
    pub mk: Option<MkAttachment>,
    /// The chunks (`OPTIONS ('chunk_tokens' 'N')`).
    pub chunks: Option<Arc<ChunkIndex>>,
}

/// What a search reads: an index and, when the index is chunked and the documents are searched,
/// its chunks (the documents are then ranked by their best chunk).
#[derive(Debug, Clone)]
pub struct Searched {
    /// The index whose rows answer.
    pub index: Arc<KnowledgeIndex>,
    /// The chunks searched in its place.
    pub chunks: Option<Arc<ChunkIndex>>,
}
