//! Clusters from the data ("topics"): spherical k-means over the synthetic questions' vectors,
//! beside the metadata clusters.
//!
//! A fit runs k-means++ seeding and Lloyd iterations on cosine similarity over (an even sample
//! of) the question vectors, then places every question. Between fits the topics are kept up to
//! date incrementally: a new question joins its nearest centroid (which moves towards it), a
//! removed one leaves it, and a re-fit runs once the questions changed since the last fit
//! reach a share of it (or new questions fit their topics clearly worse than the fitted ones
//! did). Membership overlaps: a question belongs to its nearest topic and to any other within
//! the overlap margin of it. A re-fit keeps a topic's name (and so its summary and the
//! personas naming it) when the new centroid is close to an old one.
//!
//! Persisted in `topics.json` (names and centroids, small); memberships are derived at open by
//! placing every question, so the file never has to be written with every commit.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::clusters::write_json;
use crate::support::SplitMix;
use mkflow_index::IndexError;

/// Topic names are this prefix and a number (`topic_007`).
pub const TOPIC_PREFIX: &str = "topic_";
/// File of the fitted topics, in the index directory.
pub const TOPICS_FILE: &str = "topics.json";
/// Fewest questions before the first fit.
pub const MIN_QUESTIONS: usize = 32;
/// Most topics a fit makes, whatever `mkflow.topic_clusters` asks (a fit's cost grows with
/// the number of topics).
pub const MAX_TOPICS: usize = 1024;
/// Most topics a question belongs to.
const MAX_MEMBERSHIPS: usize = 2;
/// Most vectors k-means runs on (an even sample beyond), which bounds a fit's cost.
const FIT_SAMPLE: usize = 20_000;
/// Most Lloyd iterations of a fit (it stops earlier once under 0.5% of the sample moves).
const ITERATIONS: usize = 10;
/// A new topic inherits an old topic's name when their centroids are at least this similar.
const INHERIT_SIMILARITY: f32 = 0.8;
/// New questions whose mean similarity to their topic falls this far below the fit's signal a
/// drift (once there are [`DRIFT_MIN_ADDED`] of them).
const SIMILARITY_DRIFT: f32 = 0.05;
/// Fewest new questions before their similarity can signal a drift.
const DRIFT_MIN_ADDED: usize = 64;

/// How topics are fitted and kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopicPolicy {
    /// Topics per fit; 0 for √(questions / 2), between 2 and 256 (at most [`MAX_TOPICS`]).
    pub clusters: usize,
    /// A question also belongs to every topic within this cosine similarity of its nearest.
    pub overlap: f32,
    /// Re-fit once the questions added or removed since the last fit reach this share of it.
    pub refit_growth: f64,
}

impl Default for TopicPolicy {
    /// √(questions / 2) topics, an overlap of 0.03, a re-fit after half as many changes as fitted.
    fn default() -> Self {
        TopicPolicy {
            clusters: 0,
            overlap: 0.03,
            refit_growth: 0.5,
        }
    }
}

impl TopicPolicy {
    /// The number of topics to fit over `questions` questions.
    pub fn topics_for(&self, questions: usize) -> usize {
        let k = if self.clusters > 0 {
            self.clusters.min(MAX_TOPICS)
        } else {
            ((questions as f64 / 2.0).sqrt().round() as usize).clamp(2, 256)
        };
        k.min(questions).max(1)
    }
}

/// One topic as the index shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicShape {
    /// Its name (`topic_007`).
    pub name: String,
    /// Documents with at least one question in it.
    pub documents: usize,
    /// Questions in it (a question can be in two).
    pub questions: usize,
    /// Its unit centroid.
    pub centroid: Vec<f32>,
}

/// How well the last fit matched, and what changed since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct FitStats {
    /// Questions placed by the last fit.
    fitted_questions: usize,
    /// Their mean similarity to their nearest centroid.
    fit_similarity: f32,
    /// Questions added or removed since.
    changed: usize,
    /// Questions added since, and the sum of their similarity to their nearest centroid.
    added: usize,
    added_similarity: f64,
}

/// The persisted form (`topics.json`).
#[derive(Debug, Serialize, Deserialize)]
struct TopicFile {
    dimensions: usize,
    names: Vec<String>,
    centroids: Vec<Vec<f32>>,
    next_id: u64,
    overlap: f32,
    stats: FitStats,
}

/// The topics of an index and every question's membership.
#[derive(Debug, Clone)]
pub struct Topics {
    dims: usize,
    names: Vec<String>,
    /// k × dims unit centroids.
    centroids: Vec<f32>,
    /// k × dims sums of the vectors of each topic's nearest-topic members.
    sums: Vec<f32>,
    /// Nearest-topic members per topic (those summed).
    primary: Vec<usize>,
    /// Members per topic.
    questions: Vec<usize>,
    /// Per topic: its members per document.
    documents: Vec<HashMap<String, u32>>,
    /// Question id → its topics, nearest first.
    members: HashMap<String, Vec<u16>>,
    /// The number the next new topic is named with.
    next_id: u64,
    overlap: f32,
    stats: FitStats,
}

impl Topics {
    /// Fits `k` topics to `sample` (row-major vectors of `dims`); names are inherited from
    /// `previous` where a centroid stayed. Questions are placed afterwards with
    /// [`place`](Self::place), then [`settle`](Self::settle).
    pub fn fit(sample: &[f32], dims: usize, k: usize, overlap: f32, previous: Option<&Topics>) -> Topics {
        let centroids = spherical_kmeans(sample, dims, k);
        let k = centroids.len() / dims.max(1);
        let mut next_id = previous.map_or(1, |p| p.next_id);
        let inherited = previous.map(|p| inherit_names(&centroids, p, dims)).unwrap_or_default();
        let names = (0..k)
            .map(|j| match inherited.get(&j) {
                Some(name) => name.clone(),
                None => {
                    next_id += 1;
                    format!("{TOPIC_PREFIX}{:03}", next_id - 1)
                }
            })
            .collect();
        Topics::with_centroids(dims, names, centroids, next_id, overlap, FitStats::default())
    }

    fn with_centroids(
        dims: usize,
        names: Vec<String>,
        centroids: Vec<f32>,
        next_id: u64,
        overlap: f32,
        stats: FitStats,
    ) -> Topics {
        let k = names.len();
        Topics {
            dims,
            names,
            centroids,
            sums: vec![0.0; k * dims],
            primary: vec![0; k],
            questions: vec![0; k],
            documents: vec![HashMap::new(); k],
            members: HashMap::new(),
            next_id,
            overlap: overlap.max(0.0),
            stats,
        }
    }

    /// Reads `topics.json` in `dir` (`None` when absent or of other dimensions); its questions
    /// are placed afterwards, as after a fit.
    pub fn read(dir: &Path, dims: usize) -> Result<Option<Topics>, IndexError> {
        let path = dir.join(TOPICS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(IndexError::Io { path, source: e }),
        };
        let file: TopicFile = serde_json::from_str(&text)
            .map_err(|e| IndexError::Invalid(format!("{} is damaged: {e}", path.display())))?;
        let consistent = file.dimensions == dims
            && file.names.len() == file.centroids.len()
            && file.centroids.iter().all(|c| c.len() == dims);
        if !consistent {
            return Ok(None);
        }
        let centroids = file.centroids.concat();
        Ok(Some(Topics::with_centroids(
            dims,
            file.names,
            centroids,
            file.next_id,
            file.overlap,
            file.stats,
        )))
    }

    /// Writes `topics.json` in `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), IndexError> {
        let file = TopicFile {
            dimensions: self.dims,
            names: self.names.clone(),
            centroids: self.centroids.chunks(self.dims.max(1)).map(<[f32]>::to_vec).collect(),
            next_id: self.next_id,
            overlap: self.overlap,
            stats: self.stats,
        };
        write_json(&dir.join(TOPICS_FILE), &file)
    }

    /// Number of topics.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no topics.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The topics `vector` belongs to, nearest first, with their similarity.
    fn memberships(&self, vector: &[f32]) -> Vec<(u16, f32)> {
        let mut scored: Vec<(u16, f32)> = self
            .centroids
            .chunks(self.dims)
            .enumerate()
            .map(|(j, c)| (j as u16, dot(c, vector)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        let best = scored.first().map_or(0.0, |(_, s)| *s);
        scored.retain(|(_, s)| *s >= best - self.overlap);
        scored.truncate(MAX_MEMBERSHIPS);
        scored
    }

    /// Records `question` (of `document`) in its topics; returns its similarity to the nearest.
    fn join(&mut self, question: &str, document: &str, vector: &[f32]) -> Option<f32> {
        if vector.len() != self.dims || self.is_empty() {
            return None;
        }
        let memberships = self.memberships(vector);
        let (nearest, similarity) = memberships[0];
        self.primary[nearest as usize] += 1;
        let row = nearest as usize * self.dims;
        self.sums[row..row + self.dims]
            .iter_mut()
            .zip(vector)
            .for_each(|(s, v)| *s += v);
        for &(topic, _) in &memberships {
            self.questions[topic as usize] += 1;
            *self.documents[topic as usize].entry(document.to_string()).or_default() += 1;
        }
        self.members
            .insert(question.to_string(), memberships.iter().map(|(t, _)| *t).collect());
        Some(similarity)
    }

    /// Places an existing question after a fit or a read (not counted as a change).
    pub fn place(&mut self, question: &str, document: &str, vector: &[f32]) -> Option<f32> {
        self.join(question, document, vector)
    }

    /// After every question was placed: centroids become their members' normalised means
    /// (one more Lloyd step; a topic left empty keeps its centroid), and, after a fit,
    /// `fit_similarity` is the mean similarity of the placed questions.
    pub fn settle(&mut self, fit_similarity: Option<f32>) {
        for j in 0..self.len() {
            let row = j * self.dims;
            normalise_into(
                &self.sums[row..row + self.dims],
                &mut self.centroids[row..row + self.dims],
            );
        }
        match fit_similarity {
            Some(similarity) => {
                self.stats = FitStats {
                    fitted_questions: self.members.len(),
                    fit_similarity: similarity,
                    ..FitStats::default()
                }
            }
            // Read back: changes since the last write are not in the file, but the count shows them.
            None => {
                let unseen = self.members.len().abs_diff(self.stats.fitted_questions);
                self.stats.changed = self.stats.changed.max(unseen);
            }
        }
    }

    /// A new question joins its nearest topic, whose centroid moves towards it. (What counts
    /// as a change towards a re-fit is told apart, see [`note_changes`](Self::note_changes).)
    pub fn add(&mut self, question: &str, document: &str, vector: &[f32]) {
        if let Some(similarity) = self.join(question, document, vector) {
            let nearest = self.members[question][0] as usize * self.dims;
            normalise_into(
                &self.sums[nearest..nearest + self.dims],
                &mut self.centroids[nearest..nearest + self.dims],
            );
            self.stats.added += 1;
            self.stats.added_similarity += f64::from(similarity);
        }
    }

    /// A removed question leaves its topics (`vector`: the one it was added with); a topic
    /// left without nearest members keeps its centroid.
    pub fn remove(&mut self, question: &str, document: &str, vector: &[f32]) {
        let Some(topics) = self.members.remove(question) else {
            return;
        };
        for &topic in &topics {
            let topic = topic as usize;
            self.questions[topic] = self.questions[topic].saturating_sub(1);
            if let Some(count) = self.documents[topic].get_mut(document) {
                *count -= 1;
                if *count == 0 {
                    self.documents[topic].remove(document);
                }
            }
        }
        let nearest = topics[0] as usize;
        self.primary[nearest] = self.primary[nearest].saturating_sub(1);
        let row = nearest * self.dims;
        let sum = &mut self.sums[row..row + self.dims];
        if self.primary[nearest] == 0 {
            // Exactly empty, not the rounding left after subtracting every member.
            sum.fill(0.0);
        } else if vector.len() == self.dims {
            sum.iter_mut().zip(vector).for_each(|(s, v)| *s -= v);
            normalise_into(
                &self.sums[row..row + self.dims],
                &mut self.centroids[row..row + self.dims],
            );
        }
    }

    /// Counts `changes` questions added or removed towards a re-fit: a commit counts the
    /// questions it really added or removed, not those it replaced by themselves (a document
    /// delivered again).
    pub fn note_changes(&mut self, changes: usize) {
        self.stats.changed += changes;
    }

    /// Whether the questions changed enough since the last fit to re-fit: by count (a share
    /// `growth` of the fitted questions), or by fit (new questions clearly farther from their
    /// topics than the fitted ones were).
    pub fn drifted(&self, growth: f64) -> bool {
        let stats = &self.stats;
        let grown = stats.changed as f64 >= growth * stats.fitted_questions.max(MIN_QUESTIONS) as f64;
        let looser = stats.added >= DRIFT_MIN_ADDED
            && (stats.added_similarity / stats.added as f64) < f64::from(stats.fit_similarity - SIMILARITY_DRIFT);
        grown || looser
    }

    /// The topics of `question`, nearest first.
    pub fn topics_of(&self, question: &str) -> impl Iterator<Item = &str> {
        self.members
            .get(question)
            .into_iter()
            .flatten()
            .map(|&t| self.names[t as usize].as_str())
    }

    /// Whether `question` belongs to one of `topics`.
    pub fn in_any(&self, question: &str, topics: &HashSet<&str>) -> bool {
        self.topics_of(question).any(|t| topics.contains(t))
    }

    /// Every topic with its sizes and centroid.
    pub fn shapes(&self) -> Vec<TopicShape> {
        (0..self.len())
            .map(|j| TopicShape {
                name: self.names[j].clone(),
                documents: self.documents[j].len(),
                questions: self.questions[j],
                centroid: self.centroids[j * self.dims..(j + 1) * self.dims].to_vec(),
            })
            .collect()
    }

    /// The topics of each of `questions`, nearest first.
    pub fn topics_of_each<'a>(&self, questions: impl Iterator<Item = Option<&'a str>>) -> Vec<Vec<String>> {
        questions
            .map(|q| {
                q.map(|q| self.topics_of(q).map(str::to_string).collect())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Whether `name` is a topic now.
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// Names of the new topics that inherit an old one's: the most similar pairs first, each old
/// name at most once, only at [`INHERIT_SIMILARITY`] or more.
fn inherit_names(centroids: &[f32], previous: &Topics, dims: usize) -> HashMap<usize, String> {
    let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
    for (j, new) in centroids.chunks(dims).enumerate() {
        for (i, old) in previous.centroids.chunks(dims).enumerate() {
            let similarity = dot(new, old);
            if similarity >= INHERIT_SIMILARITY {
                pairs.push((similarity, j, i));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut named, mut used) = (HashMap::new(), HashSet::new());
    for (_, j, i) in pairs {
        if !named.contains_key(&j) && used.insert(i) {
            named.insert(j, previous.names[i].clone());
        }
    }
    named
}

/// An even sample of at most [`FIT_SAMPLE`] of `count` rows: every `step`-th.
pub fn sample_step(count: usize) -> usize {
    count.div_ceil(FIT_SAMPLE).max(1)
}

/// Spherical k-means (cosine) over unit `vectors` of `dims`: greedy k-means++ seeding, then Lloyd
/// iterations until under 0.5% of the rows move. Returns up to `k` unit centroids (fewer when
/// there are fewer distinct rows), row-major. Deterministic.
pub fn spherical_kmeans(vectors: &[f32], dims: usize, k: usize) -> Vec<f32> {
    let n = vectors.len() / dims.max(1);
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let row = |i: usize| &vectors[i * dims..(i + 1) * dims];
    let mut random = SplitMix(0x6d6b_666c_6f77);
    // Greedy k-means++ (Arthur & Vassilvitskii, 2007; as scikit-learn seeds): each next seed is
    // the best of a few candidates drawn with probability ∝ their distance (1 − cos) to the
    // nearest seed, the one leaving the least total distance.
    let candidates = 2 + (k as f64).ln().floor() as usize;
    let mut centroids: Vec<f32> = row(random.below(n)).to_vec();
    let mut distance: Vec<f32> = (0..n).map(|i| (1.0 - dot(row(i), &centroids)).max(0.0)).collect();
    while centroids.len() / dims < k.min(n) {
        let total: f64 = distance.iter().map(|&d| f64::from(d)).sum();
        if total <= 1e-9 {
            break;
        }
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        for _ in 0..candidates {
            let mut target = random.unit() * total;
            let mut chosen = distance.iter().rposition(|&d| d > 0.0).unwrap_or(n - 1);
            for (i, &d) in distance.iter().enumerate() {
                target -= f64::from(d);
                if target <= 0.0 && d > 0.0 {
                    chosen = i;
                    break;
                }
            }
            let seed = row(chosen);
            let after: Vec<f32> = distance
                .iter()
                .enumerate()
                .map(|(i, &d)| d.min((1.0 - dot(row(i), seed)).max(0.0)))
                .collect();
            let potential: f64 = after.iter().map(|&d| f64::from(d)).sum();
            if best.as_ref().is_none_or(|(p, _, _)| potential < *p) {
                best = Some((potential, chosen, after));
            }
        }
        let (_, chosen, after) = best.expect("at least one candidate");
        distance = after;
        centroids.extend_from_slice(row(chosen));
    }
    let k = centroids.len() / dims;
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..ITERATIONS {
        let mut moved = 0;
        for (i, assigned) in assignment.iter_mut().enumerate() {
            let nearest = nearest_centroid(&centroids, dims, row(i)).0;
            if *assigned != nearest {
                *assigned = nearest;
                moved += 1;
            }
        }
        let mut sums = vec![0.0f32; k * dims];
        for (i, &j) in assignment.iter().enumerate() {
            sums[j * dims..(j + 1) * dims]
                .iter_mut()
                .zip(row(i))
                .for_each(|(s, v)| *s += v);
        }
        for j in 0..k {
            normalise_into(
                &sums[j * dims..(j + 1) * dims],
                &mut centroids[j * dims..(j + 1) * dims],
            );
        }
        if moved * 200 <= n {
            break;
        }
    }
    centroids
}

/// The nearest of row-major `centroids` to `vector`, with its similarity.
fn nearest_centroid(centroids: &[f32], dims: usize, vector: &[f32]) -> (usize, f32) {
    centroids
        .chunks(dims)
        .enumerate()
        .map(|(j, c)| (j, dot(c, vector)))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        .unwrap_or((0, 0.0))
}

/// `target` = `sum` / |`sum`|; left as it is when `sum` is (nearly) zero.
fn normalise_into(sum: &[f32], target: &mut [f32]) {
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-6 {
        target.iter_mut().zip(sum).for_each(|(t, s)| *t = s / norm);
    }
}

/// Dot product in eight lanes (so the compiler vectorises it).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            lanes[lane] += x[lane] * y[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: usize = 16;

    /// A unit vector near axis `axis`, jittered by `seed`.
    fn near_axis(axis: usize, seed: u64, jitter: f32) -> Vec<f32> {
        let mut random = SplitMix(seed);
        let mut v: Vec<f32> = (0..DIMS).map(|_| (random.unit() as f32 - 0.5) * jitter).collect();
        v[axis] += 1.0;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    /// 3 separated groups of 40 questions (axes 0, 5, 10), 2 questions per document.
    fn three_groups() -> Vec<(String, String, Vec<f32>)> {
        (0..120)
            .map(|i| {
                let axis = (i % 3) * 5;
                (
                    format!("d{}#{}", i / 2, i % 2),
                    format!("d{}", i / 2),
                    near_axis(axis, i as u64, 0.3),
                )
            })
            .collect()
    }

    fn fitted(rows: &[(String, String, Vec<f32>)], k: usize, previous: Option<&Topics>) -> Topics {
        let sample: Vec<f32> = rows.iter().flat_map(|(_, _, v)| v.iter().copied()).collect();
        let mut topics = Topics::fit(&sample, DIMS, k, 0.0, previous);
        let mut total = 0.0;
        for (q, d, v) in rows {
            total += topics.place(q, d, v).unwrap();
        }
        topics.settle(Some(total / rows.len() as f32));
        topics
    }

    #[test]
    fn kmeans_finds_separated_groups() {
        let rows = three_groups();
        let topics = fitted(&rows, 3, None);
        // Every group lands in one topic, a different one per group.
        let mut topic_of_axis: HashMap<usize, String> = HashMap::new();
        for (i, (q, _, _)) in rows.iter().enumerate() {
            let topic = topics.topics_of(q).next().unwrap().to_string();
            let known = topic_of_axis.entry(i % 3).or_insert_with(|| topic.clone());
            assert_eq!(*known, topic, "question {q} left its group's topic");
        }
        let distinct: HashSet<&String> = topic_of_axis.values().collect();
        assert_eq!(distinct.len(), 3);
        let shapes = topics.shapes();
        assert!(shapes.iter().all(|s| s.questions == 40), "{shapes:?}");
        // A document's two questions are in different groups: 40 documents per topic.
        assert!(shapes.iter().all(|s| s.documents == 40));
        assert!(
            shapes
                .iter()
                .all(|s| (s.centroid.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4)
        );
        assert!(!topics.drifted(0.5));
    }

    #[test]
    fn overlap_puts_a_question_between_two_topics_in_both() {
        let rows = three_groups();
        let mut topics = fitted(&rows, 3, None);
        topics.overlap = 0.2;
        let mut between: Vec<f32> = near_axis(0, 1, 0.0)
            .iter()
            .zip(near_axis(5, 1, 0.0))
            .map(|(a, b)| a + b)
            .collect();
        let norm = between.iter().map(|x| x * x).sum::<f32>().sqrt();
        between.iter_mut().for_each(|x| *x /= norm);
        topics.add("between#0", "between", &between);
        assert_eq!(topics.topics_of("between#0").count(), 2);
        topics.add("clear#0", "clear", &near_axis(10, 9, 0.0));
        assert_eq!(topics.topics_of("clear#0").count(), 1);
    }

    #[test]
    fn added_and_removed_questions_keep_counts_and_trigger_a_refit() {
        let rows = three_groups();
        let mut topics = fitted(&rows, 3, None);
        let group = topics.topics_of(&rows[0].0).next().unwrap().to_string();
        let before = topics.shapes().into_iter().find(|s| s.name == group).unwrap();
        topics.add("new#0", "new", &near_axis(0, 500, 0.3));
        assert_eq!(topics.topics_of("new#0").next(), Some(group.as_str()));
        let after = topics.shapes().into_iter().find(|s| s.name == group).unwrap();
        assert_eq!(
            (after.questions, after.documents),
            (before.questions + 1, before.documents + 1)
        );
        topics.remove("new#0", "new", &near_axis(0, 500, 0.3));
        let back = topics.shapes().into_iter().find(|s| s.name == group).unwrap();
        assert_eq!((back.questions, back.documents), (before.questions, before.documents));
        for (a, b) in back.centroid.iter().zip(&before.centroid) {
            assert!((a - b).abs() < 1e-4);
        }
        // Half as many changes as fitted questions: a re-fit is due at growth 0.5, not at 1.
        for i in 0..60 {
            topics.add(&format!("more{i}#0"), &format!("more{i}"), &near_axis(10, 900 + i, 0.3));
        }
        topics.note_changes(59);
        assert!(!topics.drifted(0.5));
        topics.note_changes(1);
        assert!(topics.drifted(0.5) && !topics.drifted(1.0));
    }

    #[test]
    fn questions_far_from_every_topic_signal_a_drift() {
        let rows = three_groups();
        let mut topics = fitted(&rows, 3, None);
        // A fourth group, on an axis no topic covers: worse fit, re-fit long before growth says so.
        for i in 0..DRIFT_MIN_ADDED as u64 {
            topics.add(&format!("far{i}#0"), &format!("far{i}"), &near_axis(15, 2000 + i, 0.3));
        }
        assert!(topics.drifted(10.0));
    }

    #[test]
    fn a_refit_keeps_the_names_of_topics_that_stayed() {
        let rows = three_groups();
        let first = fitted(&rows, 3, None);
        let mut grown = rows.clone();
        grown.extend((0..40).map(|i| (format!("e{i}#0"), format!("e{i}"), near_axis(15, 3000 + i, 0.3))));
        let second = fitted(&grown, 4, Some(&first));
        for (q, _, _) in &rows {
            assert_eq!(
                first.topics_of(q).next(),
                second.topics_of(q).next(),
                "{q} changed topic name"
            );
        }
        let new_topic = second.topics_of("e0#0").next().unwrap();
        assert!(!first.has(new_topic), "the new group got an old name: {new_topic}");
        assert_eq!(new_topic, "topic_004");
    }

    #[test]
    fn topics_survive_a_write_and_read() {
        let rows = three_groups();
        let topics = fitted(&rows, 3, None);
        let dir = tempfile::tempdir().unwrap();
        topics.write(dir.path()).unwrap();
        let mut read = Topics::read(dir.path(), DIMS).unwrap().unwrap();
        for (q, d, v) in &rows {
            read.place(q, d, v);
        }
        read.settle(None);
        assert_eq!(read.shapes(), topics.shapes());
        assert_eq!(read.stats, topics.stats);
        assert!(Topics::read(dir.path(), DIMS + 1).unwrap().is_none());
        std::fs::write(dir.path().join(TOPICS_FILE), "{not json").unwrap();
        let error = Topics::read(dir.path(), DIMS).unwrap_err().to_string();
        assert!(error.contains(TOPICS_FILE), "{error}");
    }

    #[test]
    fn kmeans_handles_fewer_distinct_rows_than_k() {
        let v = near_axis(2, 1, 0.0);
        let sample: Vec<f32> = [v.clone(), v.clone(), v].concat();
        let centroids = spherical_kmeans(&sample, DIMS, 3);
        assert_eq!(centroids.len(), DIMS);
        assert!(spherical_kmeans(&[], DIMS, 3).is_empty());
        assert_eq!(
            TopicPolicy {
                clusters: 0,
                overlap: 0.0,
                refit_growth: 0.5
            }
            .topics_for(26_740),
            116
        );
        assert_eq!(
            TopicPolicy {
                clusters: 0,
                overlap: 0.0,
                refit_growth: 0.5
            }
            .topics_for(3),
            2
        );
        let huge = TopicPolicy {
            clusters: 1_000_000,
            ..TopicPolicy::default()
        };
        assert_eq!(huge.topics_for(26_740), MAX_TOPICS, "a fit's cost stays bounded");
    }
}
