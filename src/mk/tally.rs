//! The metadata clusters' sizes and centroids, kept by the commits that change them.
//!
//! A commit adds and removes the questions it replaces and moves the documents it writes; the
//! tally follows with one update per question and document touched (running sums of the
//! question vectors, in `f64` so long streams of additions and removals do not drift), so
//! refreshing the clusters after a commit costs what the commit changed, not a scan of the
//! index. The full scan happens once, when the index is opened.

use std::collections::HashMap;

use super::clusters::ClusterShape;

/// Running totals of one metadata cluster.
#[derive(Debug, Clone, Default)]
struct Tally {
    documents: usize,
    questions: usize,
    sum: Vec<f64>,
}

/// Every metadata cluster's documents, questions and question-vector sum, and each document's
/// cluster.
#[derive(Debug, Clone, Default)]
pub struct MetadataTally {
    dimensions: usize,
    clusters: HashMap<String, Tally>,
    /// Document id → its cluster (documents without one are not counted).
    documents: HashMap<String, String>,
}

impl MetadataTally {
    /// An empty tally of `dimensions`-dimensional question vectors.
    pub fn new(dimensions: usize) -> Self {
        MetadataTally {
            dimensions,
            ..Default::default()
        }
    }

    fn tally(&mut self, cluster: &str) -> &mut Tally {
        let dimensions = self.dimensions;
        self.clusters.entry(cluster.to_string()).or_insert_with(|| Tally {
            sum: vec![0.0; dimensions],
            ..Default::default()
        })
    }

    /// Drops `cluster` once nothing is left in it (and restarts its sum from exact zero).
    fn prune(&mut self, cluster: &str) {
        if let Some(t) = self.clusters.get_mut(cluster) {
            if t.questions == 0 {
                t.sum.iter_mut().for_each(|s| *s = 0.0);
            }
            if t.questions == 0 && t.documents == 0 {
                self.clusters.remove(cluster);
            }
        }
    }

    /// A question of `cluster` (`None`: no cluster) with `vector` was committed.
    pub fn add_question(&mut self, cluster: Option<&str>, vector: &[f32]) {
        let tally = self.tally(cluster.unwrap_or(""));
        tally.questions += 1;
        tally.sum.iter_mut().zip(vector).for_each(|(s, v)| *s += f64::from(*v));
    }

    /// A question added with [`MetadataTally::add_question`] was removed.
    pub fn remove_question(&mut self, cluster: Option<&str>, vector: &[f32]) {
        let name = cluster.unwrap_or("");
        let Some(tally) = self.clusters.get_mut(name) else {
            return;
        };
        tally.questions = tally.questions.saturating_sub(1);
        tally.sum.iter_mut().zip(vector).for_each(|(s, v)| *s -= f64::from(*v));
        self.prune(name);
    }

    /// Document `id` now belongs to `cluster` (`None`: to none).
    pub fn set_document(&mut self, id: &str, cluster: Option<&str>) {
        match cluster {
            Some(cluster) => {
                if let Some(previous) = self.documents.insert(id.to_string(), cluster.to_string()) {
                    self.leave(&previous);
                }
                self.tally(cluster).documents += 1;
            }
            None => self.remove_document(id),
        }
    }

    /// Document `id` was deleted.
    pub fn remove_document(&mut self, id: &str) {
        if let Some(previous) = self.documents.remove(id) {
            self.leave(&previous);
        }
    }

    fn leave(&mut self, cluster: &str) {
        if let Some(t) = self.clusters.get_mut(cluster) {
            t.documents = t.documents.saturating_sub(1);
        }
        self.prune(cluster);
    }

    /// Each cluster's size and normalised centroid (empty when it has no question vectors).
    pub fn shapes(&self) -> Vec<(String, ClusterShape)> {
        self.clusters
            .iter()
            .map(|(name, t)| {
                let norm = t.sum.iter().map(|x| x * x).sum::<f64>().sqrt();
                let centroid = if t.questions > 0 && norm > 1e-9 {
                    t.sum.iter().map(|x| (x / norm) as f32).collect()
                } else {
                    Vec::new()
                };
                let shape = ClusterShape {
                    documents: t.documents,
                    questions: t.questions,
                    centroid,
                };
                (name.clone(), shape)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tally: &MetadataTally, name: &str) -> Option<ClusterShape> {
        tally.shapes().into_iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    #[test]
    fn additions_removals_and_moves_keep_sizes_and_centroids() {
        let mut tally = MetadataTally::new(2);
        tally.set_document("d1", Some("a"));
        tally.set_document("d2", Some("a"));
        tally.set_document("d3", None);
        tally.add_question(Some("a"), &[1.0, 0.0]);
        tally.add_question(Some("a"), &[0.0, 1.0]);
        tally.add_question(None, &[1.0, 1.0]);
        let a = shape(&tally, "a").unwrap();
        assert_eq!((a.documents, a.questions), (2, 2));
        let s = std::f32::consts::FRAC_1_SQRT_2;
        assert!((a.centroid[0] - s).abs() < 1e-6 && (a.centroid[1] - s).abs() < 1e-6);
        assert_eq!(shape(&tally, "").unwrap().questions, 1);

        // d2 moves to b with its question; d1 is delivered again unchanged.
        tally.set_document("d2", Some("b"));
        tally.remove_question(Some("a"), &[0.0, 1.0]);
        tally.add_question(Some("b"), &[0.0, 1.0]);
        tally.set_document("d1", Some("a"));
        let a = shape(&tally, "a").unwrap();
        assert_eq!((a.documents, a.questions), (1, 1));
        assert!((a.centroid[0] - 1.0).abs() < 1e-6 && a.centroid[1].abs() < 1e-6);
        assert_eq!(shape(&tally, "b").unwrap().documents, 1);

        // Deleting the last document and question of a cluster removes it.
        tally.remove_document("d2");
        tally.remove_question(Some("b"), &[0.0, 1.0]);
        assert!(shape(&tally, "b").is_none());
        tally.remove_document("d3");
        assert_eq!(tally.shapes().len(), 2);
    }

    #[test]
    fn a_long_stream_of_changes_does_not_drift() {
        let mut tally = MetadataTally::new(3);
        tally.add_question(Some("a"), &[0.0, 0.0, 1.0]);
        for i in 0..100_000 {
            let v = [(i as f32).sin(), (i as f32).cos() * 1e3, 0.1];
            tally.add_question(Some("a"), &v);
            tally.remove_question(Some("a"), &v);
        }
        let a = shape(&tally, "a").unwrap();
        assert_eq!(a.questions, 1);
        assert!((a.centroid[2] - 1.0).abs() < 1e-6, "{:?}", a.centroid);
    }
}
