//! `mkflow train queries` (a query adapter for a knowledge index, learnt from its synthetic
//! questions: [`mkflow::adapter`]) and `mkflow train laser` (a LaSER embedding model trained on
//! them: [`mkflow::laser`]).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use mkflow::Engine;
use mkflow::adapter::train::{TrainOptions, TrainingSet, train};
use mkflow::adapter::{AdapterInfo, QueryAdapter, data::read_pairs};
use mkflow::assets::MODEL_SPEC_FILE;
use mkflow::laser::data::{DataOptions, TrainingData, read_training_set};
use mkflow::laser::{self, Backbone, ProbeText, Progress, PromptChoices, Report};
use mkflow::models::read_spec;
use mkflow::support::now_ms;
use mkflow_udfs::{EmbeddingModelSpec, TextRole};

/// Trains the query adapter of index `kb` (or removes it), telling the user how it goes.
pub async fn train_queries(engine: &Engine, kb: &str, options: &TrainOptions, remove: bool) -> anyhow::Result<()> {
    let Some(entry) = engine.entry(kb) else {
        let known = engine.index_names();
        bail!("no knowledge index '{kb}' (known: {})", known.join(", "));
    };
    let dir = entry.index.dir().to_path_buf();
    if remove {
        let removed = QueryAdapter::remove(&dir)?;
        eprintln!(
            "{}",
            if removed {
                format!("query adapter of '{kb}' removed: searches embed queries as the model does")
            } else {
                format!("'{kb}' has no query adapter")
            }
        );
        return Ok(());
    }
    let Some(mk) = entry.mk else {
        bail!(
            "'{kb}' has no synthetic questions to learn from (hint: create it with OPTIONS ('meta_knowledge' 'true') and insert documents with mk_qa questions)"
        );
    };
    let started = Instant::now();
    let (documents, questions) = (entry.index.clone(), mk.index.questions().clone());
    let pairs = tokio::task::spawn_blocking(move || read_pairs(&documents, &questions))
        .await?
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the question → document pairs of '{kb}'"))?;
    eprintln!(
        "training a query adapter for '{kb}': {} questions of {} documents, {} dimensions{}",
        pairs.positives.len(),
        pairs.documents.len() / pairs.dimensions.max(1),
        pairs.dimensions,
        if pairs.orphans > 0 {
            format!(" ({} questions without a document left out)", pairs.orphans)
        } else {
            String::new()
        }
    );
    let options = options.clone();
    let trained = tokio::task::spawn_blocking(move || {
        let set = TrainingSet {
            dimensions: pairs.dimensions,
            questions: &pairs.questions,
            positives: &pairs.positives,
            documents: &pairs.documents,
        };
        train(set, &options, |epoch| {
            eprintln!(
                "  pass {:>2}: loss {:.4}, held-out MRR@10 {:.4}, recall@10 {:.4}",
                epoch.epoch, epoch.loss, epoch.held_out.mrr_at_10, epoch.held_out.recall_at_10
            )
        })
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    let (before, after) = (trained.before, trained.after());
    let manifest = entry.index.manifest();
    if trained.best_epoch == 0 {
        eprintln!(
            "no pass beat the model alone on the held-out questions (MRR@10 {:.4}): no adapter written",
            before.mrr_at_10
        );
        return Ok(());
    }
    let adapter = QueryAdapter::new(
        AdapterInfo {
            model: manifest.model.clone(),
            dimensions: manifest.dimensions,
            trained_questions: trained.trained_questions,
            held_out_questions: trained.held_out_questions,
            before,
            after,
            epochs: trained.epochs.len(),
            best_epoch: trained.best_epoch,
            trained_at_ms: now_ms(),
        },
        trained.matrix,
    );
    adapter.save(&dir)?;
    eprintln!(
        "held-out questions ({}): MRR@10 {:.4} → {:.4}, recall@10 {:.4} → {:.4} (pass {} kept, {:.1} s); \
         written to {} — every search of '{kb}' now maps its query through it (`mkflow train queries --kb {kb} --remove` undoes it)",
        trained.held_out_questions,
        before.mrr_at_10,
        after.mrr_at_10,
        before.recall_at_10,
        after.recall_at_10,
        trained.best_epoch,
        started.elapsed().as_secs_f64(),
        dir.join(mkflow::adapter::ADAPTER_FILE).display()
    );
    Ok(())
}

/// What `mkflow train laser` was asked to do.
#[derive(Debug, Clone)]
pub struct LaserArgs {
    /// The Meta-Knowledge index to learn from.
    pub kb: String,
    /// The decoder export (installed model name or directory).
    pub backbone: String,
    /// The trained model's name (default: `<backbone>-<kb>`).
    pub name: Option<String>,
    /// Prompts and K, where they differ from the backbone's.
    pub choices: PromptChoices,
    /// How the training set is read and split.
    pub data: DataOptions,
    /// Arguments passed on to the trainer script (`--epochs 1`, `--batch-size 8`, …).
    pub trainer: Vec<String>,
}

/// Probe texts of each role the export is checked on.
const PROBES_PER_ROLE: usize = 3;

/// Trains a LaSER model on `kb`'s questions and installs it under the mkflow home.
pub async fn train_laser(engine: &Engine, args: &LaserArgs) -> anyhow::Result<()> {
    let home = engine.config().home.clone();
    let Some(entry) = engine.entry(&args.kb) else {
        bail!(
            "no knowledge index '{}' (known: {})",
            args.kb,
            engine.index_names().join(", ")
        );
    };
    let Some(mk) = entry.mk else {
        bail!(
            "'{}' has no synthetic questions to learn from (hint: create it with OPTIONS ('meta_knowledge' 'true') and insert documents with mk_qa questions)",
            args.kb
        );
    };
    let backbone = Backbone::resolve(&home, &args.backbone).map_err(anyhow::Error::msg)?;
    let name = args.name.clone().unwrap_or_else(|| {
        let base = backbone.spec.as_ref().map_or_else(
            || {
                backbone
                    .dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            },
            |s| s.name.clone(),
        );
        format!("{base}-{}", args.kb)
    });
    mkflow::model_add::check_model_name(&name)?;
    let target = home.join("models").join(&name);
    if target.exists() || engine.models().get(&name).is_some() {
        bail!(
            "a model named '{name}' is already installed ({}) (hint: choose another with --name)",
            target.display()
        );
    }
    let work = home.join("training").join(format!("{name}.{}", std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    let out = work.join("model");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let spec = laser::trained_spec(&backbone, &name, &out, &args.choices);
    let prompts = laser::prompts(&spec, &backbone.decoder).map_err(anyhow::Error::msg)?;

    let (documents, questions) = (entry.index.clone(), mk.index.questions().clone());
    let options = args.data.clone();
    let set = tokio::task::spawn_blocking(move || read_training_set(&documents, &questions, &prompts, &options))
        .await?
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("reading the training questions of '{}'", args.kb))?;
    if set.examples.len() < 2 {
        bail!(
            "'{}' has {} usable questions; training needs at least 2",
            args.kb,
            set.examples.len()
        );
    }
    let held_out = set.examples.iter().filter(|e| e.held_out).count();
    eprintln!(
        "training LaSER model '{name}' (K = {}) from {} on '{}': {} questions ({} held out) over {} documents{}",
        spec.latent_steps.unwrap_or(3),
        backbone.dir.display(),
        args.kb,
        set.examples.len(),
        held_out,
        set.documents.len(),
        if set.orphans > 0 {
            format!(" ({} questions without a document left out)", set.orphans)
        } else {
            String::new()
        }
    );
    let probes = write_training_files(&work, &set, &spec)?;

    let script = mkflow::llm_assets::laser_trainer(&home)?;
    let report_path = work.join("report.json");
    let mut command = std::process::Command::new(mkflow::llm_assets::python());
    command
        .arg(&script)
        .arg("--backbone")
        .arg(&backbone.dir)
        .arg("--data")
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report_path)
        .args(["--latent-steps", &spec.latent_steps.unwrap_or(3).to_string()])
        .args(&args.trainer)
        .stdout(std::process::Stdio::piped());
    let status = tokio::task::spawn_blocking(move || run_trainer(command)).await??;
    if !status.success() {
        bail!(
            "the trainer failed ({status}); its message is above (its files are kept in {})",
            work.display()
        );
    }
    let report: Report = serde_json::from_slice(
        &std::fs::read(&report_path).with_context(|| format!("reading {}", report_path.display()))?,
    )
    .with_context(|| format!("reading {}", report_path.display()))?;

    // The export must reproduce the trainer's own encoder, prompts included.
    let exported = read_spec(&out.join(MODEL_SPEC_FILE))?;
    let runtime = mkflow::assets::onnx_runtime_path(&home);
    let expected = report.probe.clone();
    let worst = tokio::task::spawn_blocking(move || laser::export_parity(exported, &runtime, &probes, &expected))
        .await?
        .map_err(anyhow::Error::msg)?;
    if worst < laser::PARITY {
        bail!(
            "the exported model does not reproduce the trained encoder (cosine {worst:.6} < {}); nothing installed (its files are kept in {})",
            laser::PARITY,
            work.display()
        );
    }
    std::fs::create_dir_all(home.join("models"))?;
    std::fs::rename(&out, &target).with_context(|| format!("installing {}", target.display()))?;
    std::fs::copy(&report_path, target.join("training-report.json"))?;
    std::fs::remove_dir_all(&work).ok();

    let loss = report.fixed_batch_loss;
    eprintln!(
        "{} steps on {} questions in {:.0} s; loss of a fixed batch {:.4} → {:.4}",
        report.steps, report.training_questions, report.seconds, loss.before, loss.after
    );
    if let Some(change) = report.held_out {
        eprintln!(
            "held-out questions ({}, each ranked among {} documents): MRR@10 {:.4} → {:.4}, recall@10 {:.4} → {:.4}",
            change.after.questions,
            change.after.pool,
            change.before.mrr_at_10,
            change.after.mrr_at_10,
            change.before.recall_at_10,
            change.after.recall_at_10
        );
    }
    eprintln!(
        "the export reproduces the trained encoder (worst cosine {worst:.6}); installed as '{name}' in {}\n\
         use it: mkflow --model {name} … (an index built in that session is embedded with it, and its searches too)",
        target.display()
    );
    Ok(())
}

/// Writes what the trainer reads into `work`; returns the probe texts it encodes.
fn write_training_files(work: &Path, set: &TrainingData, spec: &EmbeddingModelSpec) -> anyhow::Result<Vec<ProbeText>> {
    fn jsonl<T: serde::Serialize>(path: &Path, rows: impl Iterator<Item = T>) -> anyhow::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for row in rows {
            serde_json::to_writer(&mut out, &row)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    }
    jsonl(
        &work.join("documents.jsonl"),
        set.documents.iter().map(|text| serde_json::json!({ "text": text })),
    )?;
    jsonl(&work.join("examples.jsonl"), set.examples.iter())?;
    let probes: Vec<(ProbeText, &str)> = set
        .raw_queries
        .iter()
        .zip(&set.examples)
        .take(PROBES_PER_ROLE)
        .map(|(raw, example)| {
            (
                ProbeText {
                    text: raw.clone(),
                    role: TextRole::Query,
                },
                example.query.as_str(),
            )
        })
        .chain(
            set.raw_documents
                .iter()
                .zip(&set.documents)
                .take(PROBES_PER_ROLE)
                .map(|(raw, written)| {
                    (
                        ProbeText {
                            text: raw.clone(),
                            role: TextRole::Document,
                        },
                        written.as_str(),
                    )
                }),
        )
        .collect();
    jsonl(
        &work.join("probe.jsonl"),
        probes.iter().map(
            |(probe, written)| serde_json::json!({ "written": written, "text": probe.text, "role": probe.role.name() }),
        ),
    )?;
    std::fs::write(
        work.join("spec.json"),
        serde_json::to_vec_pretty(&laser::spec_fields(spec))?,
    )?;
    Ok(probes.into_iter().map(|(probe, _)| probe).collect())
}

/// Runs the trainer, turning its progress lines into a progress bar; returns how it exited.
fn run_trainer(mut command: std::process::Command) -> anyhow::Result<std::process::ExitStatus> {
    use std::io::BufRead;
    let python = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {python} (hint: set MKFLOW_PYTHON to a Python 3 with jax)"))?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} (eta {eta}) {prefix}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("compiling");
    // Without a terminal (a log, CI) the bar is hidden: plain lines instead, a step every 10%.
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut every = 1;
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        match serde_json::from_str::<Progress>(&line) {
            Ok(Progress::Start {
                device,
                steps,
                training,
            }) => {
                bar.set_length(steps as u64);
                every = steps.div_ceil(10).max(1);
                say(format!("  {steps} steps over {training} questions on {device}"));
            }
            Ok(Progress::Step { step, loss, q_d, kl }) => {
                let losses = format!("loss {loss:.4} (latent InfoNCE {q_d:.4}, KL {kl:.4})");
                bar.set_message("training");
                bar.set_position(step as u64);
                if bar.is_hidden() && step % every == 0 {
                    eprintln!("  step {step}: {losses}");
                }
                bar.set_prefix(losses);
            }
            Ok(Progress::HeldOut {
                stage,
                mrr_at_10,
                recall_at_10,
                pool,
            }) => say(format!(
                "  held-out {stage} training: MRR@10 {mrr_at_10:.4}, recall@10 {recall_at_10:.4} (pool of {pool} documents)"
            )),
            Ok(Progress::Done { .. }) => bar.set_message("exported"),
            Err(_) => say(line),
        }
    }
    bar.finish_and_clear();
    Ok(child.wait()?)
}
