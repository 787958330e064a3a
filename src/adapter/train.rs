//! Training a query adapter: `W` starts as the identity and learns, by InfoNCE, to send each
//! synthetic question's vector to its document's among the documents of its batch and the
//! question's own hard negatives (the documents nearest it that are not its own, mined once with
//! the identity). A share of the questions is held out; after every pass their documents are
//! searched exactly among all documents, and the matrix with the best MRR@10 is kept — the
//! training stops when that has not improved for `patience` passes.
//!
//! Dense linear algebra through `ndarray` (matrixmultiply's SIMD kernels): SciFact's 26,740
//! questions × 5,183 documents × 384 dimensions take about a minute on 2 cores.

use ndarray::{Array1, Array2, ArrayView2, Axis, s};

use super::HeldOutScores;
use crate::support::SplitMix;

/// Steps a pass takes at least, when the index is small enough that full batches would give
/// fewer.
const MIN_STEPS_PER_PASS: usize = 16;

/// How an adapter is trained.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Most passes over the training questions.
    pub epochs: usize,
    /// Questions per step (fewer on a small index, so that a pass takes at least 16 steps).
    pub batch_size: usize,
    /// Adam's step size.
    pub learning_rate: f32,
    /// The softmax temperature of the similarities.
    pub temperature: f32,
    /// Hard negatives mined per question.
    pub hard_negatives: usize,
    /// Share of the questions held out to stop the training.
    pub held_out: f64,
    /// Passes without a better held-out MRR@10 before the training stops.
    pub patience: usize,
    /// Weight of `|W − I|²`, which keeps the map near the identity.
    pub regularization: f32,
    /// Seed of the split and the shuffles.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 20,
            batch_size: 256,
            learning_rate: 1e-4,
            temperature: 0.05,
            hard_negatives: 8,
            held_out: 0.1,
            patience: 2,
            regularization: 1e-3,
            seed: 7,
        }
    }
}

/// The question → document pairs: unit vectors, row-major.
#[derive(Debug, Clone, Copy)]
pub struct TrainingSet<'a> {
    /// The vectors' dimension.
    pub dimensions: usize,
    /// One vector per question.
    pub questions: &'a [f32],
    /// The document (its row in `documents`) of each question.
    pub positives: &'a [usize],
    /// One vector per document.
    pub documents: &'a [f32],
}

/// One pass over the training questions.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    /// The pass (from 1).
    pub epoch: usize,
    /// Mean InfoNCE loss of its steps.
    pub loss: f64,
    /// The held-out questions' scores after it.
    pub held_out: HeldOutScores,
}

/// What a training did.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The kept matrix, row-major.
    pub matrix: Vec<f32>,
    /// Questions trained on.
    pub trained_questions: usize,
    /// Questions held out.
    pub held_out_questions: usize,
    /// The held-out scores with the identity.
    pub before: HeldOutScores,
    /// Every pass.
    pub epochs: Vec<EpochReport>,
    /// The pass whose matrix was kept (0: the identity was best).
    pub best_epoch: usize,
}

impl Trained {
    /// The held-out scores of the kept matrix.
    pub fn after(&self) -> HeldOutScores {
        match self.best_epoch {
            0 => self.before,
            n => self.epochs[n - 1].held_out,
        }
    }
}

/// Rows of `questions` scored against every document, a block at a time (the whole score
/// matrix of a large index would not fit): calls `visit(row, scores)` per question.
fn score_blocks(questions: ArrayView2<f32>, documents: ArrayView2<f32>, mut visit: impl FnMut(usize, &[f32])) {
    const BLOCK: usize = 1024;
    let mut start = 0;
    while start < questions.nrows() {
        let end = (start + BLOCK).min(questions.nrows());
        let scores = questions.slice(s![start..end, ..]).dot(&documents.t());
        for (offset, row) in scores.outer_iter().enumerate() {
            visit(start + offset, row.as_slice().expect("a fresh matrix is contiguous"));
        }
        start = end;
    }
}

/// `rows` scaled to unit length (zero rows stay zero); returns the norms too.
fn normalise_rows(rows: &mut Array2<f32>) -> Array1<f32> {
    let norms: Array1<f32> = rows.map_axis(Axis(1), |r| r.dot(&r).sqrt().max(1e-12));
    for (mut row, norm) in rows.outer_iter_mut().zip(&norms) {
        row.mapv_inplace(|x| x / norm);
    }
    norms
}

/// MRR@10 and recall@10 of `questions` (mapped by `w`) finding their documents among all.
fn held_out_scores(
    w: &Array2<f32>,
    questions: ArrayView2<f32>,
    positives: &[usize],
    documents: ArrayView2<f32>,
) -> HeldOutScores {
    if questions.nrows() == 0 {
        return HeldOutScores {
            mrr_at_10: 0.0,
            recall_at_10: 0.0,
        };
    }
    let mut mapped = questions.dot(&w.t());
    normalise_rows(&mut mapped);
    let (mut reciprocal, mut found) = (0.0, 0usize);
    score_blocks(mapped.view(), documents, |row, scores| {
        let own = scores[positives[row]];
        let rank = scores.iter().filter(|&&s| s > own).count();
        if rank < 10 {
            reciprocal += 1.0 / (rank + 1) as f64;
            found += 1;
        }
    });
    let n = questions.nrows() as f64;
    HeldOutScores {
        mrr_at_10: reciprocal / n,
        recall_at_10: found as f64 / n,
    }
}

/// For each question, the `count` documents nearest it that are not its own.
pub(crate) fn mine_hard_negatives(
    questions: ArrayView2<f32>,
    positives: &[usize],
    documents: ArrayView2<f32>,
    count: usize,
) -> Vec<Vec<usize>> {
    let mut negatives = vec![Vec::new(); questions.nrows()];
    if count == 0 {
        return negatives;
    }
    score_blocks(questions, documents, |row, scores| {
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(count + 1);
        for (doc, &score) in scores.iter().enumerate() {
            if doc == positives[row] || (best.len() == count && score <= best[count - 1].0) {
                continue;
            }
            let at = best.partition_point(|&(s, _)| s >= score);
            best.insert(at, (score, doc));
            best.truncate(count);
        }
        negatives[row] = best.into_iter().map(|(_, d)| d).collect();
    });
    negatives
}

/// Adam's state for one matrix.
struct Adam {
    m: Array2<f32>,
    v: Array2<f32>,
    step: i32,
}

impl Adam {
    fn new(d: usize) -> Self {
        Adam {
            m: Array2::zeros((d, d)),
            v: Array2::zeros((d, d)),
            step: 0,
        }
    }

    fn update(&mut self, w: &mut Array2<f32>, gradient: &Array2<f32>, rate: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.step += 1;
        self.m.zip_mut_with(gradient, |m, g| *m = b1 * *m + (1.0 - b1) * g);
        self.v.zip_mut_with(gradient, |v, g| *v = b2 * *v + (1.0 - b2) * g * g);
        let (c1, c2) = (1.0 - b1.powi(self.step), 1.0 - b2.powi(self.step));
        ndarray::Zip::from(w)
            .and(&self.m)
            .and(&self.v)
            .for_each(|w, m, v| *w -= rate * (m / c1) / ((v / c2).sqrt() + eps));
    }
}

/// One step on a batch of questions: the loss, and `W`'s gradient added into `gradient`.
fn step(
    w: &Array2<f32>,
    batch: &[usize],
    set: (ArrayView2<f32>, &[usize], ArrayView2<f32>),
    negatives: &[Vec<usize>],
    temperature: f32,
    gradient: &mut Array2<f32>,
) -> f64 {
    let (questions, positives, documents) = set;
    let d = w.nrows();
    // The candidates: every document of the batch's questions and of their hard negatives, once.
    let mut candidates: Vec<usize> = Vec::new();
    let mut column = std::collections::HashMap::new();
    for &q in batch {
        for &doc in std::iter::once(&positives[q]).chain(&negatives[q]) {
            column.entry(doc).or_insert_with(|| {
                candidates.push(doc);
                candidates.len() - 1
            });
        }
    }
    let b = batch.len();
    let mut inputs = Array2::<f32>::zeros((b, d));
    for (row, &q) in batch.iter().enumerate() {
        inputs.row_mut(row).assign(&questions.row(q));
    }
    let mut docs = Array2::<f32>::zeros((candidates.len(), d));
    for (row, &doc) in candidates.iter().enumerate() {
        docs.row_mut(row).assign(&documents.row(doc));
    }
    let mut mapped = inputs.dot(&w.t());
    let norms = normalise_rows(&mut mapped);
    let mut logits = mapped.dot(&docs.t()) / temperature;
    let mut loss = 0.0f64;
    for (row, &q) in batch.iter().enumerate() {
        let mut r = logits.row_mut(row);
        let max = r.fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        r.mapv_inplace(|x| (x - max).exp());
        let sum = r.sum();
        r.mapv_inplace(|x| x / sum);
        let label = column[&positives[q]];
        loss -= f64::from(r[label].max(1e-30)).ln();
        // d loss / d logits = (p − one-hot) / b
        r[label] -= 1.0;
        r.mapv_inplace(|x| x / b as f32);
    }
    // Through the similarities, then the normalisation: d/du = (g − q̂ (q̂·g)) / |u|.
    let mut g = logits.dot(&docs) / temperature;
    for ((mut g_row, q_row), norm) in g.outer_iter_mut().zip(mapped.outer_iter()).zip(&norms) {
        let along = g_row.dot(&q_row);
        g_row.zip_mut_with(&q_row, |g, q| *g = (*g - q * along) / norm);
    }
    *gradient += &g.t().dot(&inputs);
    loss / b as f64
}

/// Trains an adapter on `set`; `progress` hears of every pass.
pub fn train(
    set: TrainingSet<'_>,
    options: &TrainOptions,
    mut progress: impl FnMut(&EpochReport),
) -> Result<Trained, String> {
    let d = set.dimensions;
    let n = set.positives.len();
    let m = set.documents.len() / d.max(1);
    if d == 0 || set.questions.len() != n * d || set.documents.len() != m * d {
        return Err("the question and document vectors do not have the index's dimension".into());
    }
    if m < 2 {
        return Err(format!(
            "{m} document(s): an adapter learns to tell documents apart, it needs 2 or more"
        ));
    }
    if let Some(&bad) = set.positives.iter().find(|&&p| p >= m) {
        return Err(format!("a question names document row {bad}, the index has {m}"));
    }
    let held_out = ((n as f64 * options.held_out.clamp(0.0, 0.5)).ceil() as usize).max(1);
    if n < held_out + 10 {
        return Err(format!(
            "{n} synthetic questions are too few to train on and hold out {held_out} (hint: insert more documents with mk_qa questions)"
        ));
    }
    let questions = ArrayView2::from_shape((n, d), set.questions).map_err(|e| e.to_string())?;
    let documents = ArrayView2::from_shape((m, d), set.documents).map_err(|e| e.to_string())?;
    let mut rng = SplitMix(options.seed);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let (held, trained) = order.split_at(held_out);
    let gather = |rows: &[usize]| -> (Array2<f32>, Vec<usize>) {
        let mut out = Array2::<f32>::zeros((rows.len(), d));
        for (i, &r) in rows.iter().enumerate() {
            out.row_mut(i).assign(&questions.row(r));
        }
        (out, rows.iter().map(|&r| set.positives[r]).collect())
    };
    let (held_questions, held_positives) = gather(held);
    let (train_questions, train_positives) = gather(trained);

    let identity = Array2::<f32>::eye(d);
    let before = held_out_scores(&identity, held_questions.view(), &held_positives, documents);
    let negatives = mine_hard_negatives(
        train_questions.view(),
        &train_positives,
        documents,
        options.hard_negatives,
    );
    let mut w = identity.clone();
    let mut best = (before.mrr_at_10, 0usize, w.clone());
    let mut adam = Adam::new(d);
    let mut epochs = Vec::new();
    let mut batch_order: Vec<usize> = (0..trained.len()).collect();
    // A small index still takes several steps per pass: its batches shrink (to 16 questions).
    let batch_size = options.batch_size.min(trained.len() / MIN_STEPS_PER_PASS).max(16);
    for epoch in 1..=options.epochs.max(1) {
        rng.shuffle(&mut batch_order);
        let (mut loss, mut steps) = (0.0, 0usize);
        for batch in batch_order.chunks(batch_size) {
            let mut gradient = (&w - &identity) * (2.0 * options.regularization);
            loss += step(
                &w,
                batch,
                (train_questions.view(), &train_positives, documents),
                &negatives,
                options.temperature,
                &mut gradient,
            );
            steps += 1;
            adam.update(&mut w, &gradient, options.learning_rate);
        }
        let held_out = held_out_scores(&w, held_questions.view(), &held_positives, documents);
        let report = EpochReport {
            epoch,
            loss: loss / steps.max(1) as f64,
            held_out,
        };
        progress(&report);
        epochs.push(report);
        if held_out.mrr_at_10 > best.0 {
            best = (held_out.mrr_at_10, epoch, w.clone());
        } else if epoch - best.1 >= options.patience.max(1) {
            break;
        }
    }
    let (_, best_epoch, matrix) = best;
    Ok(Trained {
        matrix: matrix.iter().copied().collect(),
        trained_questions: trained.len(),
        held_out_questions: held_out,
        before,
        epochs,
        best_epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    /// Questions that, as embedded, sit nearer another document than their own — but by a
    /// consistent linear distortion: the adapter learns to undo it, on questions it never saw.
    #[test]
    fn an_adapter_learns_a_distortion_and_finds_held_out_documents() {
        let (d, m) = (8, 16);
        let mut rng = SplitMix(3);
        let mut random = || (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0;
        let documents: Vec<Vec<f32>> = (0..m).map(|_| unit((0..d).map(|_| random()).collect())).collect();
        // Questions: their document with noise, then the first two axes swapped and shrunk.
        let mut questions = Vec::new();
        let mut positives = Vec::new();
        for i in 0..400 {
            let doc = i % m;
            let mut q: Vec<f32> = documents[doc].iter().map(|x| x + 0.05 * random()).collect();
            q.swap(0, 1);
            q[2] *= -1.0;
            q[3] *= -1.0;
            questions.extend(unit(q));
            positives.push(doc);
        }
        let flat: Vec<f32> = documents.concat();
        let set = TrainingSet {
            dimensions: d,
            questions: &questions,
            positives: &positives,
            documents: &flat,
        };
        let options = TrainOptions {
            epochs: 60,
            batch_size: 32,
            learning_rate: 0.02,
            patience: 10,
            hard_negatives: 4,
            ..TrainOptions::default()
        };
        let mut passes = 0;
        let trained = train(set, &options, |_| passes += 1).unwrap();
        assert_eq!(trained.epochs.len(), passes);
        assert_eq!(trained.held_out_questions, 40);
        let (before, after) = (trained.before, trained.after());
        assert!(after.mrr_at_10 > before.mrr_at_10 + 0.2, "{before:?} → {after:?}");
        assert!(after.recall_at_10 >= 0.95, "{after:?}");
        assert!(trained.epochs[0].loss > trained.epochs[trained.best_epoch - 1].loss);
    }

    #[test]
    fn too_little_data_is_refused_with_a_hint() {
        let set = TrainingSet {
            dimensions: 2,
            questions: &[1.0, 0.0, 0.0, 1.0],
            positives: &[0, 1],
            documents: &[1.0, 0.0, 0.0, 1.0],
        };
        let err = train(set, &TrainOptions::default(), |_| {}).unwrap_err();
        assert!(err.contains("too few"), "{err}");
        let one_document = TrainingSet {
            documents: &[1.0, 0.0],
            positives: &[0, 0],
            ..set
        };
        let err = train(one_document, &TrainOptions::default(), |_| {}).unwrap_err();
        assert!(err.contains("needs 2 or more"), "{err}");
    }
}
