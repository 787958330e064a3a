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

/// Intra-op threads for ONNX Runtime: `requested`, or one per available core when it is 0.
pub fn resolve_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider on GPU 0 (needs `onnxruntime-gpu`'s library and
    /// the CUDA libraries); falls back to the CPU with a warning when it cannot start.
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// A device name that is neither `cpu` nor `cuda`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a device is 'cpu' or 'cuda', not '{0}'")]
pub struct UnknownDevice(pub String);

impl std::str::FromStr for Device {
    type Err = UnknownDevice;

    /// `cpu` or `cuda`, as settings and model descriptions spell them.
    fn from_str(text: &str) -> Result<Self, UnknownDevice> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(UnknownDevice(other.to_string())),
        }
    }
}

/// An ONNX Runtime session and the device it actually runs on.
#[derive(Debug)]
pub struct DeviceSession {
    /// The session.
    pub session: ort::session::Session,
    /// [`Device::Cuda`] only when the CUDA execution provider was registered.
    pub device: Device,
}

/// Why [`build_session`] could not create a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// ONNX Runtime refused the session options.
    #[error(transparent)]
    Options(#[from] ort::Error),
    /// ONNX Runtime could not load the model file.
    #[error("cannot load {}: {source}", .path.display())]
    Load {
        /// The model file.
        path: PathBuf,
        /// What ONNX Runtime said.
        source: ort::Error,
    },
}

/// Creates a session for `model` with `threads` intra-op threads on `device`. A CUDA request that
/// cannot be met (a CPU-only ONNX Runtime library, missing CUDA libraries, no GPU) falls back to
/// the CPU and says why in a warning.
pub fn build_session(
    environment: &Environment,
    model: &Path,
    threads: usize,
    device: Device,
) -> Result<DeviceSession, SessionError> {
    use ort::ep::ExecutionProvider;
    use ort::session::{Session, builder::GraphOptimizationLevel, builder::SessionBuilder};

    let builder = || -> ort::Result<SessionBuilder> {
        Ok(Session::builder(environment)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_intra_threads(threads)?)
    };
    if device == Device::Cuda {
        let cuda = ort::ep::CUDA::default();
        // Only logged: a CUDA failure falls back to the CPU.
        let attempt = match ort::ep::CUDA::is_available() {
            Ok(true) => builder()
                .and_then(|b| Ok(b.with_execution_providers([cuda.build().error_on_failure()])?))
                .and_then(|mut b| b.commit_from_file(model))
                .map_err(|e| e.to_string()),
            Ok(false) => Err("this ONNX Runtime library has no CUDA execution provider (use onnxruntime-gpu's)".into()),
            Err(e) => Err(e.to_string()),
        };
        match attempt {
            Ok(session) => {
                return Ok(DeviceSession {
                    session,
                    device: Device::Cuda,
                });
            }
            Err(why) => log::warn!("{}: CUDA unavailable, running on the CPU: {why}", model.display()),
        }
    }
    let session = builder()?
        .commit_from_file(model)
        .map_err(|source| SessionError::Load {
            path: model.to_path_buf(),
            source,
        })?;
    Ok(DeviceSession {
        session,
        device: Device::Cpu,
    })
}
