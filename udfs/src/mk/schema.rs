//! The metadata schema: which fields `mk_metadata` extracts, what values each may take, and
//! their Arrow type (a `Struct`, one child per field).
//!
//! A schema is JSON (see `pipelines/metadata_schema.example.json`):
//! ```json
//! {"cluster_field": "research_fields",
//!  "fields": [
//!    {"name": "research_fields", "kind": "labels", "max": 3,
//!     "labels": [{"name": "Oncology", "description": "cancer, tumours, chemotherapy"}]},
//!    {"name": "study_type", "kind": "choice", "labels": [...]},
//!    {"name": "keyphrases", "kind": "keyphrases", "max": 8},
//!    {"name": "code_urls", "kind": "urls"},
//!    {"name": "evaluation_metrics", "kind": "terms", "terms": ["accuracy", "odds ratio"]}]}
//! ```
//! Kinds: `labels` (up to `max` labels of a taxonomy, a list), `choice` (exactly one label, a
//! string), `keyphrases` (free phrases from the text, a list), `urls` (links in the text, a
//! list), `terms` (entries of a lexicon that the text mentions, a list).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StringBuilder, StructArray};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One value of a taxonomy, with the words that describe it (used by the embedded generator's
/// zero-shot classifier and shown to LLMs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// The value stored in the column.
    pub name: String,
    /// What the label covers.
    #[serde(default)]
    pub description: String,
}

/// What a metadata field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// Up to `max` labels of the field's taxonomy (a list).
    Labels,
    /// Exactly one label of the field's taxonomy (a string).
    Choice,
    /// Up to `max` key phrases of the text (a list).
    Keyphrases,
    /// Links that appear in the text (a list).
    Urls,
    /// Entries of the field's lexicon (`terms`) that the text mentions (a list).
    Terms,
}

/// One metadata field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataField {
    /// Column name inside the metadata struct.
    pub name: String,
    /// What it holds.
    pub kind: FieldKind,
    /// Most values kept (lists only).
    #[serde(default = "default_max")]
    pub max: usize,
    /// Taxonomy (`labels`, `choice`).
    #[serde(default)]
    pub labels: Vec<Label>,
    /// Lexicon (`terms`).
    #[serde(default)]
    pub terms: Vec<String>,
    /// What the field means, for LLM prompts.
    #[serde(default)]
    pub description: String,
}

fn default_max() -> usize {
    8
}

/// The fields `mk_metadata` extracts, and which one clusters documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataSchema {
    /// The fields, in column order.
    pub fields: Vec<MetadataField>,
    /// The field whose (first) value is a document's cluster.
    pub cluster_field: String,
}

/// The cluster of documents whose cluster field is empty.
pub const UNCLUSTERED: &str = "unclustered";

/// Why a metadata schema is not usable ([`MetadataSchema::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The schema lists no field.
    #[error("it has no fields")]
    NoFields,
    /// Two fields share a name, or one has none.
    #[error("field names must be unique and non-empty ('{0}')")]
    BadFieldName(String),
    /// A `labels` or `choice` field has no taxonomy.
    #[error("field '{field}' ({kind:?}) needs labels")]
    NoLabels {
        /// The field's name.
        field: String,
        /// Its kind.
        kind: FieldKind,
    },
    /// A `terms` field has no lexicon.
    #[error("field '{0}' (terms) needs terms")]
    NoTerms(String),
    /// A field keeps no value.
    #[error("field '{0}': max must be at least 1")]
    ZeroMax(String),
    /// The cluster field is not one of the fields.
    #[error("cluster_field '{0}' is not one of the fields")]
    UnknownClusterField(String),
}

/// Why a metadata schema file cannot be loaded ([`MetadataSchema::from_file`]).
#[derive(Debug, thiserror::Error)]
pub enum SchemaFileError {
    /// The file cannot be read.
    #[error("cannot read metadata schema {}: {source}", .path.display())]
    Read {
        /// The schema file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not a schema in JSON.
    #[error("metadata schema {}: {source}", .path.display())]
    Parse {
        /// The schema file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// The schema is not usable.
    #[error("metadata schema {}: {source}", .path.display())]
    Invalid {
        /// The schema file.
        path: PathBuf,
        /// What is wrong with it.
        source: SchemaError,
    },
}

/// Why a generated metadata object does not fit the schema ([`MetadataSchema::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The metadata is not a JSON object.
    #[error("metadata must be a JSON object")]
    NotAnObject,
    /// A `choice` field has no value.
    #[error("field '{field}' needs one of {labels}")]
    NoChoice {
        /// The field's name.
        field: String,
        /// Its taxonomy, as `[a, b, …]`.
        labels: String,
    },
    /// A value is not a label of the field's taxonomy.
    #[error("field '{field}': '{value}' is not one of {labels}")]
    UnknownLabel {
        /// The field's name.
        field: String,
        /// The value given.
        value: String,
        /// The taxonomy, as `[a, b, …]`.
        labels: String,
    },
    /// A list field holds something other than strings.
    #[error("field '{0}' must hold strings")]
    NotStrings(String),
    /// A list field is neither a list nor a string.
    #[error("field '{0}' must be a list of strings")]
    NotAList(String),
}

impl MetadataSchema {
    /// Reads and checks a schema file.
    pub fn from_file(path: &Path) -> Result<Self, SchemaFileError> {
        let path_buf = || path.to_path_buf();
        let text = std::fs::read_to_string(path).map_err(|source| SchemaFileError::Read {
            path: path_buf(),
            source,
        })?;
        let schema: MetadataSchema = serde_json::from_str(&text).map_err(|source| SchemaFileError::Parse {
            path: path_buf(),
            source,
        })?;
        schema.check().map_err(|source| SchemaFileError::Invalid {
            path: path_buf(),
            source,
        })?;
        Ok(schema)
    }

    /// Checks that the schema is usable.
    pub fn check(&self) -> Result<(), SchemaError> {
        if self.fields.is_empty() {
            return Err(SchemaError::NoFields);
        }
        for (i, field) in self.fields.iter().enumerate() {
            if field.name.is_empty() || self.fields[..i].iter().any(|f| f.name == field.name) {
                return Err(SchemaError::BadFieldName(field.name.clone()));
            }
            let needs_labels = matches!(field.kind, FieldKind::Labels | FieldKind::Choice);
            if needs_labels && field.labels.is_empty() {
                return Err(SchemaError::NoLabels {
                    field: field.name.clone(),
                    kind: field.kind,
                });
            }
            if field.kind == FieldKind::Terms && field.terms.is_empty() {
                return Err(SchemaError::NoTerms(field.name.clone()));
            }
            if field.max == 0 {
                return Err(SchemaError::ZeroMax(field.name.clone()));
            }
        }
        if !self.fields.iter().any(|f| f.name == self.cluster_field) {
            return Err(SchemaError::UnknownClusterField(self.cluster_field.clone()));
        }
        Ok(())
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&MetadataField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The Arrow type of the metadata column.
    pub fn data_type(&self) -> DataType {
        DataType::Struct(self.arrow_fields())
    }

    fn arrow_fields(&self) -> Fields {
        self.fields
            .iter()
            .map(|f| {
                let data_type = match f.kind {
                    FieldKind::Choice => DataType::Utf8,
                    _ => string_list_type(),
                };
                Field::new(&f.name, data_type, true)
            })
            .collect()
    }

    /// Checks a generated metadata object against the schema and normalises it: labels are
    /// matched case-insensitively to the taxonomy, lists are cut to `max`, unknown keys
    /// dropped. Errors name the offending field.
    pub fn validate(&self, value: &Value) -> Result<Map<String, Value>, MetadataError> {
        let object = value.as_object().ok_or(MetadataError::NotAnObject)?;
        let mut out = Map::new();
        for field in &self.fields {
            let raw = object.get(&field.name).unwrap_or(&Value::Null);
            let normalised = match field.kind {
                FieldKind::Choice => {
                    let text = raw
                        .as_str()
                        .or_else(|| raw.as_array().and_then(|a| a.first()?.as_str()));
                    match text {
                        Some(t) => Value::String(field.label(t)?),
                        None => {
                            return Err(MetadataError::NoChoice {
                                field: field.name.clone(),
                                labels: field.label_names(),
                            });
                        }
                    }
                }
                _ => {
                    let items: Vec<&str> = match raw {
                        Value::Null => Vec::new(),
                        Value::String(s) if s.trim().is_empty() => Vec::new(),
                        Value::String(s) => vec![s.as_str()],
                        Value::Array(items) => items
                            .iter()
                            .map(|v| v.as_str().ok_or_else(|| MetadataError::NotStrings(field.name.clone())))
                            .collect::<Result<_, _>>()?,
                        _ => return Err(MetadataError::NotAList(field.name.clone())),
                    };
                    let mut kept: Vec<String> = Vec::new();
                    for item in items {
                        let item = item.trim();
                        let value = if field.kind == FieldKind::Labels {
                            field.label(item)?
                        } else {
                            item.to_string()
                        };
                        if !value.is_empty() && !kept.iter().any(|k| k.eq_ignore_ascii_case(&value)) {
                            kept.push(value);
                        }
                    }
                    kept.truncate(field.max);
                    Value::Array(kept.into_iter().map(Value::String).collect())
                }
            };
            out.insert(field.name.clone(), normalised);
        }
        Ok(out)
    }

    /// Builds the metadata column: one struct per document, null where `None`.
    pub fn to_array(&self, rows: &[Option<&Map<String, Value>>]) -> ArrayRef {
        let fields = self.arrow_fields();
        let mut children: Vec<ArrayRef> = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            let values = rows.iter().map(|r| r.and_then(|m| m.get(&field.name)));
            if field.kind == FieldKind::Choice {
                let mut builder = StringBuilder::new();
                for value in values {
                    builder.append_option(value.and_then(Value::as_str));
                }
                children.push(Arc::new(builder.finish()));
            } else {
                let mut builder = ListBuilder::new(StringBuilder::new());
                for value in values {
                    match value.and_then(Value::as_array) {
                        Some(items) => {
                            for item in items.iter().filter_map(Value::as_str) {
                                builder.values().append_value(item);
                            }
                            builder.append(true);
                        }
                        None => builder.append(false),
                    }
                }
                children.push(Arc::new(builder.finish()));
            }
        }
        let nulls = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<bool>>());
        Arc::new(StructArray::new(fields, children, Some(nulls)))
    }

    /// The cluster of each row of a metadata column: the first value of the cluster field,
    /// [`UNCLUSTERED`] when it is empty or the row is null.
    pub fn clusters_of(&self, metadata: &StructArray) -> Vec<String> {
        let column = metadata.column_by_name(&self.cluster_field);
        (0..metadata.len())
            .map(|row| {
                column
                    .filter(|_| metadata.is_valid(row))
                    .and_then(|c| first_string(c.as_ref(), row))
                    .unwrap_or_else(|| UNCLUSTERED.to_string())
            })
            .collect()
    }
}

impl MetadataField {
    /// The taxonomy label matching `text` (case- and space-insensitively).
    fn canonical_label(&self, text: &str) -> Option<String> {
        let wanted = squash(text);
        self.labels
            .iter()
            .find(|l| squash(&l.name) == wanted)
            .map(|l| l.name.clone())
    }

    /// The taxonomy label `text` names, or the error naming the field and its labels.
    fn label(&self, text: &str) -> Result<String, MetadataError> {
        self.canonical_label(text).ok_or_else(|| MetadataError::UnknownLabel {
            field: self.name.clone(),
            value: text.to_string(),
            labels: self.label_names(),
        })
    }

    fn label_names(&self) -> String {
        let names: Vec<&str> = self.labels.iter().map(|l| l.name.as_str()).collect();
        format!("[{}]", names.join(", "))
    }
}

fn squash(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// `List<Utf8>` with the default item field.
pub fn string_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

/// The first string of row `row` of a string or list-of-strings column.
pub fn first_string(column: &dyn Array, row: usize) -> Option<String> {
    if column.is_null(row) {
        return None;
    }
    match column.data_type() {
        DataType::Utf8 => Some(column.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(column.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Some(column.as_string_view().value(row).to_string()),
        DataType::List(_) => {
            let items = column.as_list::<i32>().value(row);
            (0..items.len()).find_map(|i| first_string(items.as_ref(), i))
        }
        _ => None,
    }
    .filter(|s| !s.trim().is_empty())
}

fn labels(entries: &[(&str, &str)]) -> Vec<Label> {
    entries
        .iter()
        .map(|(name, description)| Label {
            name: name.to_string(),
            description: description.to_string(),
        })
        .collect()
}

impl Default for MetadataSchema {
    /// The built-in schema for research papers, after the paper's: up to three research fields
    /// of a broad science taxonomy (the cluster key), the kind of study, key phrases, code
    /// links and evaluation metrics.
    fn default() -> Self {
        let fields = labels(&[
            (
                "Oncology",
                "cancer, tumours, tumor growth, metastasis, chemotherapy, carcinoma, leukemia",
            ),
            (
                "Immunology",
                "immune system, T cells, B cells, antibodies, inflammation, cytokines, autoimmunity, vaccines",
            ),
            (
                "Genetics and Genomics",
                "genes, DNA, mutations, gene expression, genome sequencing, heredity, epigenetics",
            ),
            (
                "Neuroscience",
                "brain, neurons, synapses, cognition, neurological and psychiatric disorders",
            ),
            (
                "Cardiovascular Medicine",
                "heart, blood vessels, hypertension, atherosclerosis, stroke, cardiac disease",
            ),
            (
                "Infectious Diseases and Microbiology",
                "bacteria, viruses, infection, HIV, malaria, tuberculosis, antibiotics, microbiome",
            ),
            (
                "Endocrinology and Metabolism",
                "hormones, diabetes, insulin, obesity, metabolism, lipids, nutrition",
            ),
            (
                "Cell and Molecular Biology",
                "cell signalling, proteins, organelles, cell cycle, autophagy, transcription, RNA",
            ),
            (
                "Pharmacology and Therapeutics",
                "drugs, treatment efficacy, dosing, adverse effects, drug targets",
            ),
            (
                "Epidemiology and Public Health",
                "populations, cohorts, risk factors, prevalence, mortality, health policy",
            ),
            (
                "Developmental and Stem Cell Biology",
                "embryos, stem cells, differentiation, regeneration, tissue development",
            ),
            (
                "Biochemistry and Structural Biology",
                "enzymes, protein structure, binding, catalysis, biochemical pathways",
            ),
            (
                "Clinical Medicine",
                "patients, clinical trials, diagnosis, surgery, hospital care, outcomes",
            ),
            (
                "Reproductive and Child Health",
                "pregnancy, birth, infants, children, maternal health, fertility",
            ),
            (
                "Machine Learning",
                "neural networks, deep learning, training, models, optimisation, prediction",
            ),
            (
                "Natural Language Processing",
                "text, language models, translation, question answering, retrieval",
            ),
            (
                "Computer Vision",
                "images, video, object detection, segmentation, visual recognition",
            ),
            (
                "Computer Systems",
                "software, databases, distributed systems, networks, hardware, security",
            ),
            (
                "Physics",
                "particles, quantum mechanics, optics, condensed matter, astrophysics",
            ),
            ("Chemistry", "molecules, reactions, synthesis, catalysts, spectroscopy"),
            (
                "Materials Science",
                "materials, nanoparticles, polymers, biomaterials, surfaces, mechanical properties",
            ),
            (
                "Mathematics and Statistics",
                "theorems, proofs, statistical methods, probability, estimation",
            ),
            (
                "Earth and Environmental Science",
                "climate, ecology, environment, pollution, geology, oceans",
            ),
            (
                "Economics and Social Science",
                "economics, markets, behaviour, society, education, policy",
            ),
        ]);
        let study_types = labels(&[
            (
                "applied",
                "develops, tests or evaluates a treatment, method, tool or system for practical use; clinical trials and interventions",
            ),
            (
                "theoretical",
                "explains mechanisms, develops theory or models, basic research on how something works",
            ),
            (
                "observational",
                "observes and measures associations in cohorts, populations or samples without intervening",
            ),
            ("review", "surveys, reviews or meta-analyses of earlier studies"),
        ]);
        let metrics = [
            "accuracy",
            "precision",
            "recall",
            "F1",
            "AUC",
            "ROC curve",
            "BLEU",
            "ROUGE",
            "perplexity",
            "mean squared error",
            "RMSE",
            "mean absolute error",
            "nDCG",
            "MRR",
            "mean average precision",
            "odds ratio",
            "hazard ratio",
            "relative risk",
            "risk ratio",
            "confidence interval",
            "p-value",
            "sensitivity",
            "specificity",
            "mortality",
            "survival",
            "incidence",
            "prevalence",
            "effect size",
            "correlation coefficient",
            "area under the curve",
            "number needed to treat",
            "QALY",
        ];
        MetadataSchema {
            fields: vec![
                MetadataField {
                    name: "research_fields".into(),
                    kind: FieldKind::Labels,
                    max: 3,
                    labels: fields,
                    terms: Vec::new(),
                    description: "the research fields the document belongs to, most relevant first".into(),
                },
                MetadataField {
                    name: "study_type".into(),
                    kind: FieldKind::Choice,
                    max: 1,
                    labels: study_types,
                    terms: Vec::new(),
                    description: "what kind of work the document reports".into(),
                },
                MetadataField {
                    name: "keyphrases".into(),
                    kind: FieldKind::Keyphrases,
                    max: 8,
                    labels: Vec::new(),
                    terms: Vec::new(),
                    description: "the key concepts, methods and entities of the document".into(),
                },
                MetadataField {
                    name: "code_urls".into(),
                    kind: FieldKind::Urls,
                    max: 5,
                    labels: Vec::new(),
                    terms: Vec::new(),
                    description: "links to code or data given in the document".into(),
                },
                MetadataField {
                    name: "evaluation_metrics".into(),
                    kind: FieldKind::Terms,
                    max: 8,
                    labels: Vec::new(),
                    terms: metrics.iter().map(|m| m.to_string()).collect(),
                    description: "the evaluation metrics or statistics the document reports".into(),
                },
            ],
            cluster_field: "research_fields".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_schema_is_valid_and_typed() {
        let schema = MetadataSchema::default();
        schema.check().unwrap();
        let DataType::Struct(fields) = schema.data_type() else {
            panic!()
        };
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[1].data_type(), &DataType::Utf8);
        assert_eq!(fields[0].data_type(), &string_list_type());
    }

    #[test]
    fn validate_normalises_labels_and_refuses_unknown_ones() {
        let schema = MetadataSchema::default();
        let ok = schema
            .validate(
                &json!({"research_fields": ["oncology", "IMMUNOLOGY", "Oncology", "Physics", "Chemistry"],
                "study_type": "Applied", "keyphrases": "T cells", "extra": 1}),
            )
            .unwrap();
        assert_eq!(ok["research_fields"], json!(["Oncology", "Immunology", "Physics"]));
        assert_eq!(ok["study_type"], json!("applied"));
        assert_eq!(ok["keyphrases"], json!(["T cells"]));
        assert_eq!(ok["code_urls"], json!([]));
        assert!(!ok.contains_key("extra"));
        let err = schema
            .validate(&json!({"research_fields": ["Astrology"], "study_type": "applied"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("research_fields") && err.contains("Astrology"), "{err}");
        let err = schema
            .validate(&json!({"research_fields": []}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("study_type"), "{err}");
        assert!(schema.validate(&json!([1, 2])).is_err());
    }

    #[test]
    fn arrays_round_trip_clusters() {
        let schema = MetadataSchema::default();
        let a = schema
            .validate(&json!({"research_fields": ["Neuroscience", "Immunology"], "study_type": "review"}))
            .unwrap();
        let b = schema
            .validate(&json!({"research_fields": [], "study_type": "review"}))
            .unwrap();
        let array = schema.to_array(&[Some(&a), None, Some(&b)]);
        assert_eq!(array.data_type(), &schema.data_type());
        let clusters = schema.clusters_of(array.as_struct());
        assert_eq!(clusters, vec!["Neuroscience", UNCLUSTERED, UNCLUSTERED]);
    }

    #[test]
    fn the_shipped_example_schema_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/metadata_schema.example.json");
        let schema = MetadataSchema::from_file(&path).unwrap();
        assert_eq!(schema.cluster_field, "topic");
        assert_eq!(schema.field("metrics").unwrap().kind, FieldKind::Terms);
    }

    #[test]
    fn bad_schemas_are_refused() {
        let schema = MetadataSchema {
            cluster_field: "nope".into(),
            ..Default::default()
        };
        assert_eq!(schema.check(), Err(SchemaError::UnknownClusterField("nope".into())));
        let mut schema = MetadataSchema::default();
        schema.fields[0].labels.clear();
        let error = schema.check().unwrap_err();
        assert_eq!(
            error,
            SchemaError::NoLabels {
                field: "research_fields".into(),
                kind: FieldKind::Labels
            }
        );
        assert_eq!(error.to_string(), "field 'research_fields' (Labels) needs labels");
    }
}
