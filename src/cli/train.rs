//! `mkflow train queries`: a query adapter for a knowledge index, learnt from its synthetic
//! questions ([`mkflow::adapter`]).

use std::time::Instant;

use anyhow::{Context, bail};
use mkflow::Engine;
use mkflow::adapter::train::{TrainOptions, TrainingSet, train};
use mkflow::adapter::{AdapterInfo, QueryAdapter, data::read_pairs};
use mkflow::support::now_ms;

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
