//! The process-wide ONNX Runtime environment.
//!
//! ONNX Runtime is loaded dynamically (ort's `load-dynamic`), from the library file named by
//! [`init_onnx_runtime`] or the `ORT_DYLIB_PATH` environment variable. ONNX Runtime allows one
//! environment per process, so it is created once and shared by every session.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Errors raised while loading ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No library path was given and `ORT_DYLIB_PATH` is unset.
    #[error(
        "ONNX Runtime library not configured: set ORT_DYLIB_PATH to libonnxruntime.so \
         (hint: `mkflow models pull` downloads it)"
    )]
    NotConfigured,
    /// The library could not be loaded or the environment could not be created.
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    Load {
        /// The library file that was tried.
        path: PathBuf,
        /// What ONNX Runtime or the loader said.
        message: String,
    },
}

/// Returns the shared environment, loading ONNX Runtime from `library` (or `ORT_DYLIB_PATH` when
/// `library` is `None`) the first time it is called. Later calls return the same environment
/// whatever path they pass.
pub fn init_onnx_runtime(library: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = match library {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .ok_or(RuntimeError::NotConfigured)?,
    };
    if !path.is_file() {
        return Err(RuntimeError::Load {
            path,
            message: "no such file (hint: `mkflow models pull`)".into(),
        });
    }
    let load_error = |message: String| RuntimeError::Load {
        path: path.clone(),
        message,
    };
    let env = ort::init_from(&path)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("mkflow")
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}
