//! Meta-Knowledge preparation and retrieval end to end on real text with the real embedding
//! model: the UDFs' output, the questions and clusters tables, incremental summaries over two
//! batches, `qa_search` and `mk_search` with provenance, deletes, and failed generations.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use common::*;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, UInt64Type};
use mkflow::Engine;
use mkflow_index::{LOG_FILE, MANIFEST_FILE, Manifest};
use mkflow_udfs::mk::MetadataSchema;

/// Writes the first `skip..skip + take` sample documents to a JSON Lines file.
fn corpus_slice(dir: &Path, name: &str, skip: usize, take: usize) -> PathBuf {
    let text = std::fs::read_to_string(sample_corpus()).unwrap();
    let lines: Vec<&str> = text.lines().skip(skip).take(take).collect();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// The shipped pipeline's statements, pointed at `corpus`.
fn mk_pipeline(corpus: &Path) -> String {
    let pipeline =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/scifact_mk.sql")).unwrap();
    pipeline.replace(
        "LOCATION 'data/sample/scifact-sample.jsonl'",
        &format!("LOCATION '{}'", corpus.display()),
    )
}

async fn ingest_slice(engine: &Engine, corpus: &Path) {
    // A fresh source table per slice; the index persists.
    let _ = engine.context().deregister_table("scifact_docs");
    engine
        .run_script("test", &mk_pipeline(corpus), |_| {})
        .await
        .expect("MK pipeline runs");
}

fn u64s(batches: &[RecordBatch], column: &str) -> Vec<u64> {
    batches
        .iter()
        .flat_map(|b| {
            let a = datafusion::arrow::compute::cast(b.column_by_name(column).unwrap(), &DataType::UInt64).unwrap();
            a.as_primitive::<UInt64Type>().values().to_vec()
        })
        .collect()
}

/// The lists of text of a `List<Utf8>` column, one per row.
fn string_lists(batches: &[RecordBatch], column: &str) -> Vec<Vec<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let lists = b.column_by_name(column).unwrap().as_list::<i32>().clone();
            (0..lists.len()).map(move |i| {
                let values = lists.value(i);
                values.as_string::<i32>().iter().flatten().map(String::from).collect()
            })
        })
        .collect()
}

/// cluster → (questions, summary_version), for clusters of `kind` (`metadata` or `topic`).
async fn clusters(engine: &Engine, kind: &str) -> HashMap<String, (u64, u64)> {
    let batches = engine
        .sql(&format!(
            "SELECT cluster_name, questions, summary_version FROM scifact_mk_clusters WHERE kind = '{kind}'"
        ))
        .await
        .unwrap();
    let names = strings(&batches, "cluster_name");
    let questions = u64s(&batches, "questions");
    let versions = u64s(&batches, "summary_version");
    names.into_iter().zip(questions.into_iter().zip(versions)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udfs_produce_typed_metadata_and_self_contained_questions() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_slice(dir.path(), "docs.jsonl", 0, 30);
    let engine = engine(&dir.path().join("data")).await;
    engine
        .sql(&format!(
            "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS JSONL LOCATION '{}'",
            corpus.display()
        ))
        .await
        .unwrap();
    let batches = engine
        .sql(
            "SELECT doc_id, title, body, m, qa, mk_cluster(m) AS c FROM \
             (SELECT doc_id, title, body, mk_metadata(title, body) AS m, mk_qa(title, body) AS qa FROM docs)",
        )
        .await
        .unwrap();
    let schema = MetadataSchema::default();
    assert_eq!(
        batches[0].schema().field_with_name("m").unwrap().data_type(),
        &schema.data_type()
    );
    let fields = &schema.fields[0].labels;
    let study_types = &schema.fields[1].labels;
    let mut questions_total = 0;
    for batch in &batches {
        let metadata = batch.column_by_name("m").unwrap().as_struct();
        let research = metadata.column_by_name("research_fields").unwrap().as_list::<i32>();
        let study = metadata.column_by_name("study_type").unwrap().as_string::<i32>();
        let keyphrases = metadata.column_by_name("keyphrases").unwrap().as_list::<i32>();
        let qa = batch.column_by_name("qa").unwrap().as_list::<i32>();
        let cluster = batch.column_by_name("c").unwrap().as_string::<i32>();
        let utf8 = |name: &str| cast(batch.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
        let (title, body) = (utf8("title"), utf8("body"));
        let (title, body) = (title.as_string::<i32>(), body.as_string::<i32>());
        for row in 0..batch.num_rows() {
            let text = format!("{}. {}", title.value(row), body.value(row));
            let labels = research.value(row);
            let labels = labels.as_string::<i32>();
            assert!((1..=3).contains(&labels.len()), "1 to 3 research fields");
            for label in labels.iter().flatten() {
                assert!(fields.iter().any(|l| l.name == label), "{label} is in the taxonomy");
            }
            assert_eq!(
                cluster.value(row),
                labels.value(0),
                "the cluster is the first research field"
            );
            assert!(study_types.iter().any(|l| l.name == study.value(row)));
            let phrases = keyphrases.value(row);
            let phrases = phrases.as_string::<i32>();
            assert!(!phrases.is_empty());
            let words = |t: &str| format!(" {} ", mkflow_udfs::mk::text::words(t).join(" "));
            for phrase in phrases.iter().flatten() {
                assert!(
                    words(&text).contains(&words(phrase)),
                    "key phrase '{phrase}' comes from the text"
                );
            }
            let pairs = qa.value(row);
            let pairs = pairs.as_struct();
            assert!((1..=6).contains(&pairs.len()), "1 to 6 questions, got {}", pairs.len());
            questions_total += pairs.len();
            let (q, a) = (pairs.column(0).as_string::<i32>(), pairs.column(1).as_string::<i32>());
            for n in 0..pairs.len() {
                let question = q.value(n);
                assert!(question.ends_with('?'), "{question}");
                assert!(
                    question.starts_with("Is it true that ") || question.starts_with("What is known about "),
                    "{question}"
                );
                let lower = question.to_lowercase();
                for reference in ["this study", "the present study", "in this paper", " we "] {
                    assert!(!lower.contains(reference), "'{question}' refers to the document");
                }
                assert!(
                    text.contains(a.value(n)),
                    "answer '{}' is a sentence of the document",
                    a.value(n)
                );
            }
        }
    }
    assert!(
        questions_total >= 30 * 3,
        "about four questions per abstract, got {questions_total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_clusters_and_summaries_follow_two_batches() {
    let dir = tempfile::tempdir().unwrap();
    let first = corpus_slice(dir.path(), "first.jsonl", 0, 60);
    let second = corpus_slice(dir.path(), "second.jsonl", 60, 40);
    let engine = engine(&dir.path().join("data")).await;

    ingest_slice(&engine, &first).await;
    let count = |sql: &'static str| {
        let engine = &engine;
        async move { single_int(&engine.sql(sql).await.unwrap()) }
    };
    assert_eq!(count("SELECT count(*) FROM scifact_mk").await, 60);
    let questions = count("SELECT sum(array_length(qa)) FROM scifact_mk").await;
    assert_eq!(count("SELECT count(*) FROM scifact_mk_questions").await, questions);
    let before = clusters(&engine, "metadata").await;
    assert!(before.len() >= 2, "documents spread over clusters: {before:?}");
    assert_eq!(before.values().map(|(q, _)| *q as i64).sum::<i64>(), questions);
    assert!(
        before.values().all(|(q, v)| *q == 0 || *v == 1),
        "every cluster got its first summary"
    );
    // Topics from the data: √(questions / 2) of them, every question in one or two.
    let topics_before = clusters(&engine, "topic").await;
    assert_eq!(
        topics_before.len(),
        ((questions as f64 / 2.0).sqrt().round() as usize),
        "{topics_before:?}"
    );
    let memberships: i64 = topics_before.values().map(|(q, _)| *q as i64).sum();
    assert!(
        (questions..=2 * questions).contains(&memberships),
        "{memberships} memberships of {questions}"
    );
    assert!(topics_before.keys().all(|name| name.starts_with("topic_")));
    assert!(
        topics_before.values().all(|(q, v)| *q == 0 || *v == 1),
        "{topics_before:?}"
    );
    let summaries = engine
        .sql("SELECT summary FROM scifact_mk_clusters WHERE questions > 0")
        .await
        .unwrap();
    for summary in strings(&summaries, "summary") {
        assert!(
            summary.contains("Key concepts:") && summary.contains("Is it true that"),
            "{summary}"
        );
    }

    // Re-running the same batch replaces questions, it does not add them.
    ingest_slice(&engine, &first).await;
    assert_eq!(count("SELECT count(*) FROM scifact_mk_questions").await, questions);
    assert_eq!(
        clusters(&engine, "metadata").await,
        before,
        "nothing changed, nothing re-summarised"
    );
    // The same questions again are no change: no re-fit, the same topics and summaries.
    let versions = |topics: &HashMap<String, (u64, u64)>| {
        let mut v: Vec<(String, u64)> = topics.iter().map(|(n, (_, v))| (n.clone(), *v)).collect();
        v.sort();
        v
    };
    let topics_again = clusters(&engine, "topic").await;
    assert_eq!(versions(&topics_again), versions(&topics_before));

    // The second batch: clusters that grew by at least 25% get a new summary, others keep theirs.
    ingest_slice(&engine, &second).await;
    assert_eq!(count("SELECT count(*) FROM scifact_mk").await, 100);
    let questions_after = count("SELECT count(*) FROM scifact_mk_questions").await;
    // Half as many new questions as fitted ones: the topics were fitted again, more of them,
    // and a topic that stayed kept its name.
    let topics_after = clusters(&engine, "topic").await;
    assert_eq!(
        topics_after.len(),
        ((questions_after as f64 / 2.0).sqrt().round() as usize)
    );
    assert!(
        topics_after.keys().any(|name| topics_before.contains_key(name)),
        "{topics_before:?} → {topics_after:?}"
    );
    assert!(
        topics_after.values().all(|(q, v)| *q == 0 || *v >= 1),
        "{topics_after:?}"
    );
    let after = clusters(&engine, "metadata").await;
    let mut rewritten = 0;
    for (name, (questions_after, version_after)) in &after {
        let (questions_before, version_before) = before.get(name).copied().unwrap_or((0, 0));
        let grew = *questions_after as f64 >= 1.25 * questions_before as f64 && questions_after > &questions_before;
        let expected = if grew { version_before + 1 } else { version_before };
        assert_eq!(
            *version_after, expected,
            "cluster {name}: {questions_before} → {questions_after} questions"
        );
        rewritten += usize::from(grew);
    }
    assert!(
        rewritten >= 1,
        "some cluster grew enough to be re-summarised: {after:?}"
    );

    // The aggregate writes the same kind of summary from SQL.
    let by_sql = engine
        .sql(
            "SELECT cluster_name, mk_summary(question, cluster_name) AS s FROM scifact_mk_questions GROUP BY cluster_name",
        )
        .await
        .unwrap();
    assert_eq!(row_count(&by_sql), after.values().filter(|(q, _)| *q > 0).count());
    assert!(strings(&by_sql, "s").iter().all(|s| s.contains("Key concepts:")));

    // A deleted document takes its questions along.
    let doc = strings(
        &engine.sql("SELECT doc_id FROM scifact_mk LIMIT 1").await.unwrap(),
        "doc_id",
    )
    .remove(0);
    let own = engine
        .sql(&format!(
            "SELECT count(*) FROM scifact_mk_questions WHERE doc_id = '{doc}'"
        ))
        .await
        .unwrap();
    assert!(single_int(&own) > 0);
    let memberships = |topics: &HashMap<String, (u64, u64)>| topics.values().map(|(q, _)| *q).sum::<u64>();
    let before_delete = memberships(&clusters(&engine, "topic").await);
    engine
        .sql(&format!("DELETE FROM scifact_mk WHERE doc_id = '{doc}'"))
        .await
        .unwrap();
    assert!(
        memberships(&clusters(&engine, "topic").await) < before_delete,
        "its questions left their topics"
    );
    let topics_kept = versions(&clusters(&engine, "topic").await);
    let own = engine
        .sql(&format!(
            "SELECT count(*) FROM scifact_mk_questions WHERE doc_id = '{doc}'"
        ))
        .await
        .unwrap();
    assert_eq!(single_int(&own), 0);

    // The metadata clusters were kept by the commits (adds, a replay, a delete) alone: they
    // match the rows exactly, and the centroids a full scan computes on reopening.
    let incremental = metadata_shapes(&engine).await;
    let documents_per_cluster = engine
        .sql("SELECT cluster_name, count(*) AS n FROM scifact_mk WHERE cluster_name IS NOT NULL GROUP BY cluster_name")
        .await
        .unwrap();
    let questions_per_cluster = engine
        .sql("SELECT coalesce(cluster_name, '') AS cluster_name, count(*) AS n FROM scifact_mk_questions GROUP BY 1")
        .await
        .unwrap();
    for (batches, which) in [(&documents_per_cluster, 0), (&questions_per_cluster, 1)] {
        let counted: HashMap<String, i64> = strings(batches, "cluster_name")
            .into_iter()
            .zip(batches.iter().flat_map(|b| {
                let n = b
                    .column_by_name("n")
                    .unwrap()
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
                n.values().to_vec()
            }))
            .collect();
        let kept: HashMap<String, i64> = incremental
            .iter()
            .map(|(name, shape)| (name.clone(), [shape.0, shape.1][which] as i64))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(kept, counted, "{}", ["documents", "questions"][which]);
    }

    // Reopened from disk, the questions and clusters are still there.
    drop(engine);
    let engine = common::engine(&dir.path().join("data")).await;
    let rescanned = metadata_shapes(&engine).await;
    assert_eq!(rescanned.len(), incremental.len());
    for (name, (documents, questions, centroid)) in &incremental {
        let (d, q, c) = &rescanned[name];
        assert_eq!((documents, questions), (d, q), "{name}");
        let cosine: f32 = centroid.iter().zip(c).map(|(a, b)| a * b).sum();
        assert!(
            centroid.is_empty() && c.is_empty() || cosine > 0.9999,
            "{name}: {cosine}"
        );
    }
    let reopened = clusters(&engine, "metadata").await;
    assert_eq!(
        reopened.values().map(|(_, v)| *v).collect::<Vec<_>>().len(),
        after.len()
    );
    assert_eq!(
        versions(&clusters(&engine, "topic").await),
        topics_kept,
        "topics read back"
    );
    assert!(count_rows(&engine, "SELECT * FROM scifact_mk_questions").await > 0);
}

/// Metadata cluster → (documents, questions, centroid).
async fn metadata_shapes(engine: &Engine) -> HashMap<String, (u64, u64, Vec<f32>)> {
    let batches = engine
        .sql("SELECT cluster_name, documents, questions, centroid FROM scifact_mk_clusters WHERE kind = 'metadata'")
        .await
        .unwrap();
    let centroids = batches.iter().flat_map(|b| {
        let column = b.column_by_name("centroid").unwrap();
        let values = mkflow_index::vector_values(column);
        let dims = values.len() / column.len().max(1);
        (0..column.len())
            .map(|i| match column.is_null(i) {
                true => Vec::new(),
                false => values[i * dims..(i + 1) * dims].to_vec(),
            })
            .collect::<Vec<_>>()
    });
    let names = strings(&batches, "cluster_name");
    let sizes = u64s(&batches, "documents").into_iter().zip(u64s(&batches, "questions"));
    names
        .into_iter()
        .zip(sizes.zip(centroids))
        .map(|(n, ((d, q), c))| (n, (d, q, c)))
        .collect()
}

async fn count_rows(engine: &Engine, sql: &str) -> usize {
    row_count(&engine.sql(sql).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qa_search_and_mk_search_find_documents_with_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_slice(dir.path(), "docs.jsonl", 0, 80);
    let engine = engine(&dir.path().join("data")).await;
    ingest_slice(&engine, &corpus).await;

    let docs = engine
        .sql("SELECT doc_id, title FROM scifact_mk ORDER BY doc_id LIMIT 20")
        .await
        .unwrap();
    let (ids, titles) = (strings(&docs, "doc_id"), strings(&docs, "title"));
    let mut qa_found = 0;
    let mut mk_found = 0;
    for (id, title) in ids.iter().zip(&titles) {
        let title = title.replace('\'', "''");
        let qa = engine
            .sql(&format!(
                "SELECT doc_id, question, answer, score FROM qa_search(scifact_mk, '{title}', 10)"
            ))
            .await
            .unwrap();
        qa_found += usize::from(strings(&qa, "doc_id").contains(id));
        let mk = engine
            .sql(&format!(
                "SELECT doc_id, question, answer, cluster_name, score, routed_clusters, sub_queries, matched_by, title \
                 FROM mk_search(scifact_mk, '{title}', 10)"
            ))
            .await
            .unwrap();
        mk_found += usize::from(strings(&mk, "doc_id").contains(id));
        let batch = &mk[0];
        assert_eq!(batch.num_rows(), 10);
        let sub_queries = batch.column_by_name("sub_queries").unwrap().as_list::<i32>();
        let first: Vec<String> = strings(
            &[RecordBatch::try_from_iter(vec![("q", sub_queries.value(0))]).unwrap()],
            "q",
        );
        assert_eq!(
            first[0],
            title.replace("''", "'").trim(),
            "the original query is the first sub-query"
        );
        assert!(first.len() >= 2, "the embedded generator adds sub-queries: {first:?}");
        let matched = batch.column_by_name("matched_by").unwrap().as_list::<i32>();
        let routed = batch.column_by_name("routed_clusters").unwrap().as_list::<i32>();
        for row in 0..batch.num_rows() {
            let m = matched.value(row);
            assert!(
                !m.is_empty() && m.len() <= first.len(),
                "matched_by names used sub-queries"
            );
            // Every cluster within the routing margin of the nearest, at most route_clusters (3).
            let clusters = routed.value(row).len();
            assert!((1..=3).contains(&clusters), "{clusters} clusters routed");
        }
        assert!(
            batch.column_by_name("title").unwrap().null_count() == 0,
            "document columns are joined"
        );
    }
    assert!(
        qa_found >= 16,
        "qa_search finds the document by its title: {qa_found}/20"
    );
    assert!(
        mk_found >= 16,
        "mk_search finds the document by its title: {mk_found}/20"
    );

    // Routing is by topics by default; every QA pair shows its topics. Strictly routed, every
    // pair is in a routed topic; routed by metadata, the routes are metadata clusters.
    let query = titles[2].replace('\'', "''");
    let routed_by_topics = engine
        .sql(&format!(
            "SELECT routed_clusters, topics FROM mk_search(scifact_mk, '{query}', 10)"
        ))
        .await
        .unwrap();
    assert!(
        string_lists(&routed_by_topics, "routed_clusters")[0]
            .iter()
            .all(|c| c.starts_with("topic_"))
    );
    assert!(
        string_lists(&routed_by_topics, "topics")
            .iter()
            .all(|t| (1..=2).contains(&t.len()))
    );
    engine.sql("SET mkflow.strict_routing = true").await.unwrap();
    let strict = engine
        .sql(&format!(
            "SELECT routed_clusters, topics FROM mk_search(scifact_mk, '{query}', 10)"
        ))
        .await
        .unwrap();
    engine.sql("SET mkflow.strict_routing = false").await.unwrap();
    for (routed, topics) in string_lists(&strict, "routed_clusters")
        .iter()
        .zip(string_lists(&strict, "topics"))
    {
        assert!(
            topics.iter().any(|t| routed.contains(t)),
            "{topics:?} outside {routed:?}"
        );
    }
    engine.sql("SET mkflow.route_by = 'metadata'").await.unwrap();
    let by_metadata = engine
        .sql(&format!(
            "SELECT routed_clusters FROM mk_search(scifact_mk, '{query}', 10)"
        ))
        .await
        .unwrap();
    engine.sql("SET mkflow.route_by = 'topics'").await.unwrap();
    let metadata_routes = &string_lists(&by_metadata, "routed_clusters")[0];
    assert!(!metadata_routes.is_empty() && metadata_routes.iter().all(|c| !c.starts_with("topic_")));
    let refused = engine
        .sql("SET mkflow.route_by = 'galaxies'")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("'topics' or 'metadata'"), "{refused}");

    // Fusing by document: each document once, scored at least as high as any of its questions
    // fused alone (in each ranking a document stands no lower than its best question; the same
    // k, so the same pools).
    let query = titles[1].replace('\'', "''");
    let per_question = engine
        .sql(&format!(
            "SELECT doc_id, score FROM mk_search(scifact_mk, '{query}', 30)"
        ))
        .await
        .unwrap();
    engine.sql("SET mkflow.fuse_documents = true").await.unwrap();
    let per_document = engine
        .sql(&format!(
            "SELECT doc_id, score FROM mk_search(scifact_mk, '{query}', 30)"
        ))
        .await
        .unwrap();
    engine.sql("SET mkflow.fuse_documents = false").await.unwrap();
    let documents = strings(&per_document, "doc_id");
    assert_eq!(documents.len(), 30);
    assert_eq!(documents.iter().collect::<HashSet<_>>().len(), 30, "{documents:?}");
    let scores = floats(&per_document, "score");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let question_scores = floats(&per_question, "score");
    for (doc, score) in strings(&per_question, "doc_id").iter().zip(question_scores) {
        if let Some(i) = documents.iter().position(|d| d == doc) {
            assert!(scores[i] >= score - 1e-6, "{doc}: {} < {score}", scores[i]);
        }
    }

    // Hybrid search on a Meta-Knowledge index fuses the questions too; without them it is
    // the documents' dense and BM25 searches alone.
    let query = titles[0].replace('\'', "''");
    let with = engine
        .sql(&format!(
            "SELECT doc_id, fused_score FROM hybrid_search(scifact_mk, '{query}', 10)"
        ))
        .await
        .unwrap();
    let fused = floats(&with, "fused_score");
    assert_eq!(strings(&with, "doc_id")[0], ids[0]);
    assert!(
        fused[0] > 2.0 / 61.0,
        "four searches agree on the first document: {}",
        fused[0]
    );
    let without = engine
        .sql(&format!(
            "SELECT doc_id FROM hybrid_search(scifact_mk, '{query}', 10, questions => false)"
        ))
        .await
        .unwrap();
    let explicit = engine
        .sql(&format!(
            "SELECT doc_id FROM rrf(vector_search(scifact_mk, '{query}'), text_search(scifact_mk, '{query}')) LIMIT 10"
        ))
        .await
        .unwrap();
    assert_eq!(strings(&without, "doc_id"), strings(&explicit, "doc_id"));
    let qa = engine
        .sql(&format!(
            "SELECT question_id, doc_id, question, fused_score FROM qa_hybrid_search(scifact_mk, '{query}', 5)"
        ))
        .await
        .unwrap();
    assert_eq!(strings(&qa, "question_id").len(), 5);

    // Read: mk_answer answers from mk_search's QA pairs (extractive with the embedded
    // generator), each quoted answer followed by its [n], the citations being those pairs.
    let search = engine
        .sql(&format!(
            "SELECT doc_id, question, answer FROM mk_search(scifact_mk, '{query}', 4)"
        ))
        .await
        .unwrap();
    let answered = engine
        .sql(&format!(
            "SELECT query, answer, citations, context, generator FROM mk_answer(scifact_mk, '{query}', 4)"
        ))
        .await
        .unwrap();
    assert_eq!(row_count(&answered), 1);
    let answer = &strings(&answered, "answer")[0];
    assert_eq!(strings(&answered, "generator"), vec!["embedded"]);
    let found_answers = strings(&search, "answer");
    assert!(
        answer.starts_with(&format!("{} [1]", found_answers[0].trim())),
        "the best answer comes first, cited: {answer}"
    );
    let context = &strings(&answered, "context")[0];
    for (n, (doc, question)) in strings(&search, "doc_id")
        .iter()
        .zip(strings(&search, "question"))
        .enumerate()
    {
        assert!(
            context.contains(&format!("[{}] ({doc}", n + 1)) && context.contains(&question),
            "context entry {} names {doc}: {context}",
            n + 1
        );
    }
    let citations = answered[0]
        .column_by_name("citations")
        .unwrap()
        .as_list::<i32>()
        .value(0);
    let citations = citations.as_struct();
    let cited_docs: Vec<String> = strings(
        &[RecordBatch::try_from_iter(vec![("d", citations.column(1).clone())]).unwrap()],
        "d",
    );
    assert_eq!(
        cited_docs,
        strings(&search, "doc_id"),
        "one citation per piece of evidence, in rank order"
    );
    let numbers = citations
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int32Type>();
    assert_eq!(numbers.values().to_vec(), vec![1, 2, 3, 4]);
    let error = engine
        .sql("SELECT * FROM mk_answer(scifact_mk, '')")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("mk_answer: the query must be a non-empty text"),
        "{error}"
    );

    let error = engine
        .sql("SELECT * FROM mk_search(nope, 'x')")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no knowledge index called 'nope'"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_generations_are_recorded_and_documents_still_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_slice(dir.path(), "docs.jsonl", 0, 5);
    let engine = engine(&dir.path().join("data")).await;
    // An endpoint that refuses connections (port 9 is discard; nothing listens on loopback).
    let script = mk_pipeline(&corpus).replace(
        "SET mkflow.generator = 'embedded';",
        "SET mkflow.llm_base_url = 'http://127.0.0.1:9/v1'; SET mkflow.llm_model = 'offline';
         SET mkflow.llm_max_retries = 0; SET mkflow.generator = 'openai';",
    );
    engine
        .run_script("test", &script, |_| {})
        .await
        .expect("the pipeline keeps going");
    let indexed = engine
        .sql("SELECT count(*) FROM scifact_mk WHERE metadata IS NULL AND qa IS NULL AND embedding IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(
        single_int(&indexed),
        5,
        "documents are indexed without metadata and questions"
    );
    let letters = engine
        .sql("SELECT source, error FROM dead_letters WHERE source LIKE 'mk_prepare%'")
        .await
        .unwrap();
    assert_eq!(row_count(&letters), 5);
    assert!(strings(&letters, "source")[0].contains("openai:offline"));
    assert!(
        strings(&letters, "error")[0].contains("cannot reach"),
        "{:?}",
        strings(&letters, "error")
    );

    let error = engine
        .sql("SET mkflow.generator = 'psychic'")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown generator 'psychic'"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personas_route_mk_search_among_their_clusters_with_their_summary_and_filter() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus_slice(dir.path(), "docs.jsonl", 0, 80);
    let engine = engine(&dir.path().join("data")).await;
    ingest_slice(&engine, &corpus).await;

    // A persona by description: routed to the topics nearest it, with a summary of its own.
    engine
        .sql("INSERT INTO scifact_mk_personas (name, description) VALUES ('immunologist', 'immune cells, T cells, inflammation and infection')")
        .await
        .unwrap();
    let shown = engine
        .sql("SELECT name, summary, summary_version, routed_clusters FROM scifact_mk_personas")
        .await
        .unwrap();
    assert_eq!(strings(&shown, "name"), vec!["immunologist"]);
    assert!(strings(&shown, "summary")[0].contains("Key concepts:"));
    assert_eq!(u64s(&shown, "summary_version"), vec![1]);
    let own = string_lists(&shown, "routed_clusters").remove(0);
    assert!(
        !own.is_empty() && own.iter().all(|c| c.starts_with("topic_")),
        "{own:?}"
    );
    let query = "Regulatory T cells suppress autoimmune inflammation";
    let searched = engine
        .sql(&format!(
            "SELECT doc_id, routed_clusters FROM mk_search(scifact_mk, '{query}', 10, persona => 'immunologist')"
        ))
        .await
        .unwrap();
    assert_eq!(row_count(&searched), 10);
    for routed in string_lists(&searched, "routed_clusters") {
        assert!(
            routed.iter().all(|c| own.contains(c)),
            "{routed:?} outside the persona's {own:?}"
        );
    }

    // A persona naming one cluster is routed there; an unknown cluster is refused by name.
    let topic = strings(
        &engine
            .sql("SELECT cluster_name FROM scifact_mk_clusters WHERE kind = 'topic' ORDER BY questions DESC LIMIT 1")
            .await
            .unwrap(),
        "cluster_name",
    )
    .remove(0);
    engine
        .sql(&format!(
            "INSERT INTO scifact_mk_personas (name, description, clusters) VALUES ('narrow', '', ['{topic}'])"
        ))
        .await
        .unwrap();
    let narrow = engine
        .sql(&format!(
            "SELECT routed_clusters FROM mk_search(scifact_mk, '{query}', 5, persona => 'narrow')"
        ))
        .await
        .unwrap();
    assert_eq!(string_lists(&narrow, "routed_clusters")[0], vec![topic.clone()]);
    let refused = engine
        .sql("INSERT INTO scifact_mk_personas (name, clusters) VALUES ('lost', ['topic_999'])")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("'topic_999'") && refused.contains(&topic), "{refused}");

    // A persona's filter confines its searches to the question rows it accepts.
    let study = strings(
        &engine
            .sql("SELECT metadata['study_type'] AS s FROM scifact_mk_questions GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
            .await
            .unwrap(),
        "s",
    )
    .remove(0);
    engine
        .sql(&format!(
            "INSERT INTO scifact_mk_personas (name, description, filter) VALUES ('strict', 'evidence', 'metadata[''study_type''] = ''{study}''')"
        ))
        .await
        .unwrap();
    let allowed: HashSet<String> = strings(
        &engine
            .sql(&format!(
                "SELECT DISTINCT doc_id FROM scifact_mk_questions WHERE metadata['study_type'] = '{study}'"
            ))
            .await
            .unwrap(),
        "doc_id",
    )
    .into_iter()
    .collect();
    let filtered = engine
        .sql(&format!(
            "SELECT doc_id FROM mk_search(scifact_mk, '{query}', 10, persona => 'strict')"
        ))
        .await
        .unwrap();
    let found = strings(&filtered, "doc_id");
    assert!(!found.is_empty());
    assert!(found.iter().all(|d| allowed.contains(d)), "{found:?} not all {study}");
    let bad = engine
        .sql("INSERT INTO scifact_mk_personas (name, description, filter) VALUES ('broken', 'x', 'no_such_column = 1')")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        bad.contains("persona 'broken'") && bad.contains("no_such_column"),
        "{bad}"
    );
    // A stored filter runs in every later search: nothing in it may grow a value without bound.
    let greedy = engine
        .sql("INSERT INTO scifact_mk_personas (name, description, filter) VALUES ('greedy', 'x', 'length(repeat(question, 1000000000)) > 0')")
        .await
        .unwrap_err()
        .to_string();
    assert!(greedy.contains("is not allowed in a stored filter"), "{greedy}");
    let unknown = engine
        .sql(&format!(
            "SELECT * FROM mk_search(scifact_mk, '{query}', 5, persona => 'nobody')"
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("'nobody'") && unknown.contains("immunologist"),
        "{unknown}"
    );

    // Re-inserted unchanged, a persona keeps its summary; DELETE removes; all of it persists.
    engine
        .sql("INSERT INTO scifact_mk_personas (name, description) VALUES ('immunologist', 'immune cells, T cells, inflammation and infection')")
        .await
        .unwrap();
    engine
        .sql("DELETE FROM scifact_mk_personas WHERE name = 'narrow'")
        .await
        .unwrap();
    drop(engine);
    let engine = common::engine(&dir.path().join("data")).await;
    let kept = engine
        .sql("SELECT name, summary_version FROM scifact_mk_personas ORDER BY name")
        .await
        .unwrap();
    assert_eq!(strings(&kept, "name"), vec!["immunologist", "strict"]);
    assert_eq!(u64s(&kept, "summary_version"), vec![1, 1]);
}

/// Documents and their questions commit as one: the documents' manifest names the questions'
/// generation, after inserts and deletes alike. A crash after a batch's questions committed but
/// before its documents did (the on-disk state is recreated by putting the documents' manifest
/// of the batch before back) reopens as that batch before, whole: its documents and exactly
/// their questions; delivering the batch again then adds both. The questions table is
/// read-only: it commits only with the documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_and_their_questions_commit_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = corpus_slice(dir.path(), "first.jsonl", 0, 40);
    let second = corpus_slice(dir.path(), "second.jsonl", 40, 2);
    let data = dir.path().join("data");
    let kb = data.join("scifact_mk");
    // The last committed manifests, as opening would find them (the checkpoint in
    // manifest.json and the commit log after it).
    let latest = |dir: PathBuf| Manifest::read_latest(&dir).unwrap().unwrap();
    let named_matches_questions = || {
        let documents = latest(kb.clone());
        let questions = latest(kb.join("questions"));
        assert_eq!(documents.companions["questions"].generation, questions.generation);
    };
    let engine = engine(&data).await;
    ingest_slice(&engine, &first).await;
    named_matches_questions();
    let first_questions = count(&engine, "SELECT count(*) FROM scifact_mk_questions").await;
    for (sql, hint) in [
        (
            "INSERT INTO scifact_mk_questions SELECT * FROM scifact_mk_questions",
            "INSERT INTO scifact_mk instead",
        ),
        ("DELETE FROM scifact_mk_questions", "DELETE FROM scifact_mk instead"),
    ] {
        let err = engine.sql(sql).await.expect_err(sql).to_string();
        assert!(
            err.contains(hint) && err.contains("scifact_mk_questions"),
            "{sql}: {err}"
        );
    }
    assert_eq!(
        count(&engine, "SELECT count(*) FROM scifact_mk_questions").await,
        first_questions
    );

    let committed_files = [MANIFEST_FILE, LOG_FILE];
    let before_second = committed_files.map(|f| std::fs::read(kb.join(f)).unwrap());
    ingest_slice(&engine, &second).await;
    named_matches_questions();
    let all_questions = count(&engine, "SELECT count(*) FROM scifact_mk_questions").await;
    assert!(all_questions > first_questions);
    drop(engine);

    for (file, bytes) in committed_files.iter().zip(&before_second) {
        std::fs::write(kb.join(file), bytes).unwrap();
    }
    let engine = common::engine(&data).await;
    assert_eq!(count(&engine, "SELECT count(*) FROM scifact_mk").await, 40);
    assert_eq!(
        count(&engine, "SELECT count(*) FROM scifact_mk_questions").await,
        first_questions,
        "the questions of the batch whose documents never committed are gone"
    );
    assert_eq!(
        count(
            &engine,
            "SELECT count(*) FROM scifact_mk_questions q LEFT JOIN scifact_mk d ON q.doc_id = d.doc_id WHERE d.doc_id IS NULL"
        )
        .await,
        0
    );
    ingest_slice(&engine, &second).await;
    assert_eq!(count(&engine, "SELECT count(*) FROM scifact_mk").await, 42);
    assert_eq!(
        count(&engine, "SELECT count(*) FROM scifact_mk_questions").await,
        all_questions
    );

    let doc = strings(
        &engine.sql("SELECT doc_id FROM scifact_mk LIMIT 1").await.unwrap(),
        "doc_id",
    )
    .remove(0);
    engine
        .sql(&format!("DELETE FROM scifact_mk WHERE doc_id = '{doc}'"))
        .await
        .unwrap();
    named_matches_questions();
    assert!(count(&engine, "SELECT count(*) FROM scifact_mk_questions").await < all_questions);
}

async fn count(engine: &Engine, sql: &str) -> i64 {
    single_int(&engine.sql(sql).await.unwrap())
}
