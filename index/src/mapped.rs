//! Row files mapped into memory, and handing their pages back.

use memmap2::{Mmap, UncheckedAdvice};

/// A row file mapped into memory. The rows read from it share its pages: the kernel loads
/// them on access and can drop them again under memory pressure (they belong to the page
/// cache, not to the process's heap), so an index holds its rows without their weight in RAM.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: Mmap,
    name: String,
}

impl MappedFile {
    /// The mapping of the row file named `name` (in the index's directory).
    pub(crate) fn new(map: Mmap, name: String) -> Self {
        MappedFile { map, name }
    }

    /// The file's name in the index's directory.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Unmaps the pages read so far from this process (they stay in the page cache, and come
    /// back on the next access): after a full read — checking a file on open, copying it into
    /// a rewrite — the process's resident memory goes back to what it uses.
    pub(crate) fn release_pages(&self) {
        // SAFETY: a read-only shared mapping of a file that is never changed: dropped pages are
        // read from the file again on access, with the same bytes.
        if let Err(e) = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) } {
            log::debug!("madvise(DONTNEED) failed: {e}");
        }
    }
}
