//! Keeping a Meta-Knowledge index current as its documents change: questions replaced with
//! each upsert, removed with each delete, clusters recomputed, stale summaries rewritten.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use futures::StreamExt;
use mkflow_udfs::TextRole;
use mkflow_udfs::mk::{FailureLog, GeneratorRegistry, MkOptions};

use super::{MkIndex, PendingQuestions, Persona, SummaryPolicy, TopicPolicy};
use crate::models::ModelRegistry;
use crate::support::blocking;
use crate::support::now_ms;
use mkflow_index::{IndexError, KnowledgeIndex};

/// Summaries written at once after a commit.
const SUMMARY_CONCURRENCY: usize = 4;

/// What Meta-Knowledge indexes need from the engine.
#[derive(Debug)]
pub struct MkServices {
    /// Embedding models (questions are embedded with the index's model).
    pub models: Arc<ModelRegistry>,
    /// Generators (summaries, query rewriting), per session settings.
    pub generators: Arc<GeneratorRegistry>,
    /// Where failed generations are recorded.
    pub failures: Arc<dyn FailureLog>,
}

/// A Meta-Knowledge index with the services that maintain it.
#[derive(Debug, Clone)]
pub struct MkAttachment {
    /// The questions and clusters.
    pub index: Arc<MkIndex>,
    /// The engine's services.
    pub services: Arc<MkServices>,
}

impl MkAttachment {
    /// Explodes and embeds the questions of inserted documents (nothing committed yet).
    pub async fn pending_questions(
        &self,
        documents: &KnowledgeIndex,
        batches: Arc<Vec<RecordBatch>>,
    ) -> Result<PendingQuestions> {
        let model = self.services.models.model_of(documents)?;
        let key_column = documents.manifest().key_column;
        let mk = self.index.clone();
        blocking(move || {
            let embedder = model.get().map_err(|e| IndexError::Invalid(e.to_string()))?;
            mk.pending_questions(&batches, &key_column, &embedder)
        })
        .await
    }

    /// Recomputes the clusters after the documents changed, and rewrites the summaries the
    /// change made stale.
    pub async fn refresh(&self, context: &TaskContext) -> Result<()> {
        let options = MkOptions::of(context.session_config().options());
        let (mk, policy) = (self.index.clone(), topic_policy(&options));
        blocking(move || mk.refresh_clusters(policy)).await?;
        self.refresh_summaries(&options).await
    }

    /// Rewrites the summaries of clusters that changed enough; a failed summary is recorded
    /// and the old one kept.
    pub async fn refresh_summaries(&self, options: &MkOptions) -> Result<()> {
        let policy = SummaryPolicy {
            growth: options.summary_growth,
            max_age_ms: options.summary_max_age_secs.saturating_mul(1000) as i64,
        };
        let stale = self.index.stale_clusters(&policy, now_ms());
        let (count, margin) = (options.route_clusters, options.route_margin as f32);
        let stale_personas = self.index.stale_personas(&policy, now_ms(), count, margin);
        if stale.is_empty() && stale_personas.is_empty() {
            return Ok(());
        }
        let generator = self
            .services
            .generators
            .generator(options)
            .map_err(|e| DataFusionError::Configuration(e.to_string()))?;
        let mk = self.index.clone();
        let digests = blocking(move || mk.digests(&stale)).await?;
        let generator_ref = &generator;
        let mut summaries = futures::stream::iter(digests.into_iter().map(|digest| async move {
            let summary = generator_ref.summarize(&digest).await;
            (digest.cluster, summary)
        }))
        .buffer_unordered(SUMMARY_CONCURRENCY);
        let mut written = Vec::new();
        while let Some((cluster, summary)) = summaries.next().await {
            match summary {
                Ok(text) => written.push((cluster, text)),
                Err(e) => {
                    let what = format!("mk_summary ({})", generator.name());
                    self.services
                        .failures
                        .record(&what, &format!("cluster {cluster}"), &e.to_string());
                }
            }
        }
        let (mk, name) = (self.index.clone(), generator.name());
        blocking(move || mk.set_summaries(written, &name, now_ms())).await?;
        // Personas after clusters: a persona's summary is written from its clusters' questions.
        for (persona, clusters, questions) in stale_personas {
            let mk = self.index.clone();
            let for_digest = persona.clone();
            let digest = blocking(move || mk.persona_digest(&for_digest, &clusters)).await?;
            match generator.summarize(&digest).await {
                Ok(text) => {
                    let (mk, name) = (self.index.clone(), generator.name());
                    blocking(move || mk.set_persona_summary(&persona.name, text, questions, &name, now_ms())).await?;
                }
                Err(e) => {
                    let what = format!("mk_summary ({})", generator.name());
                    self.services
                        .failures
                        .record(&what, &format!("persona {}", persona.name), &e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Adds or replaces personas (name, description, clusters, filter), embedding their
    /// descriptions with the questions' model, then writes the summaries they need.
    pub async fn put_personas(&self, rows: Vec<PersonaRow>, options: &MkOptions) -> Result<usize> {
        let known: HashSet<String> = self.index.clusters().into_iter().map(|c| c.name).collect();
        for row in &rows {
            if let Some(unknown) = row.clusters.iter().find(|c| !known.contains(*c)) {
                let mut names: Vec<&String> = known.iter().collect();
                names.sort();
                return Err(DataFusionError::Plan(format!(
                    "persona '{}' names cluster '{unknown}', which the index does not have (clusters: {})",
                    row.name,
                    names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let embedder = self
            .services
            .models
            .model_of(self.index.questions())?
            .get_async()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let texts: Vec<Option<&str>> = rows.iter().map(|r| Some(r.description.as_str())).collect();
        let embeddings = embedder
            .embed_as(&texts, TextRole::Query)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let personas: Vec<Persona> = rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| Persona {
                description_vector: embeddings.get(i).map(<[f32]>::to_vec).unwrap_or_default(),
                name: row.name,
                description: row.description,
                clusters: row.clusters,
                filter: row.filter,
                summary: None,
            })
            .collect();
        let count = personas.len();
        let mk = self.index.clone();
        blocking(move || mk.put_personas(personas)).await?;
        self.refresh_summaries(options).await?;
        Ok(count)
    }
}

/// A persona as inserted into `<kb>_personas`.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonaRow {
    /// Its name.
    pub name: String,
    /// What it is interested in, in words.
    pub description: String,
    /// The clusters it names (empty: those nearest the description).
    pub clusters: Vec<String>,
    /// A SQL predicate over the question rows confining its searches.
    pub filter: Option<String>,
}

/// The topic settings of a session (`mkflow.topic_*`).
pub fn topic_policy(options: &MkOptions) -> TopicPolicy {
    TopicPolicy {
        clusters: options.topic_clusters,
        overlap: options.topic_overlap.max(0.0) as f32,
        refit_growth: options.topic_refit_growth.max(0.0),
    }
}
