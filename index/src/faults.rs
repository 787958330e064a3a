//! Disk faults on demand, for tests: every write and fsync of an index file asks [`check`]
//! first, and a test can arm one fault (on the next file whose name starts with a prefix) for
//! its own thread. Outside tests `check` is a no-op the compiler removes.

use std::path::Path;

/// Where in writing a file a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Writing the file's bytes (fails as a full disk: ENOSPC).
    Write,
    /// Flushing the file to disk (fails as an I/O error: EIO).
    Sync,
}

/// Fails with the armed fault when it matches `path` at `stage`.
#[inline]
pub(crate) fn check(path: &Path, stage: Stage) -> std::io::Result<()> {
    #[cfg(test)]
    return armed::take(path, stage);
    #[cfg(not(test))]
    {
        let _ = (path, stage);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod armed {
    use std::cell::RefCell;
    use std::path::Path;

    use super::Stage;

    thread_local! {
        static ARMED: RefCell<Option<(Stage, String)>> = const { RefCell::new(None) };
    }

    /// Makes the next `stage` of a file named `prefix…` fail, once, on this thread.
    pub(crate) fn arm(stage: Stage, prefix: &str) {
        ARMED.with(|a| *a.borrow_mut() = Some((stage, prefix.to_string())));
    }

    /// Whether the armed fault has not struck yet.
    pub(crate) fn pending() -> bool {
        ARMED.with(|a| a.borrow().is_some())
    }

    pub(super) fn take(path: &Path, stage: Stage) -> std::io::Result<()> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let strikes = ARMED.with(|a| {
            let mut armed = a.borrow_mut();
            let hit = matches!(&*armed, Some((s, prefix)) if *s == stage && name.starts_with(prefix.as_str()));
            if hit {
                *armed = None;
            }
            hit
        });
        match (strikes, stage) {
            (false, _) => Ok(()),
            (true, Stage::Write) => Err(std::io::Error::from_raw_os_error(28)), // ENOSPC
            (true, Stage::Sync) => Err(std::io::Error::from_raw_os_error(5)),   // EIO
        }
    }
}
