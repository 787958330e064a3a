//! End-to-end retrieval through SQL with the real embedding model.

mod common;

use common::*;

/// Rows in `kb`.
async fn count_rows(engine: &mkflow::Engine) -> i64 {
    single_int(&engine.sql("SELECT count(*) FROM kb").await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn title_queries_find_their_documents() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    ingest(&engine, &sample_corpus()).await;
    let docs = engine
        .sql("SELECT doc_id, title FROM kb ORDER BY doc_id")
        .await
        .unwrap();
    let ids = strings(&docs, "doc_id");
    let titles = strings(&docs, "title");
    assert_eq!(ids.len(), 400);
    let mut found = 0;
    for (id, title) in ids.iter().zip(&titles) {
        let hits = engine
            .sql(&format!("SELECT doc_id FROM vector_search(kb, {}, 3)", quoted(title)))
            .await
            .unwrap();
        if strings(&hits, "doc_id").contains(id) {
            found += 1;
        }
    }
    let rate = found as f64 / ids.len() as f64;
    eprintln!(
        "known-item retrieval by title: {found}/{} in top 3 ({rate:.3})",
        ids.len()
    );
    assert!(rate >= 0.9, "only {rate:.3} of titles find their document in the top 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_same_answers_and_upsert_delete_work() {
    let dir = tempfile::tempdir().unwrap();
    let queries = [
        "Vitamin D deficiency and disease risk",
        "tumor suppressor genes in cancer",
        "antibiotic resistance in bacteria",
    ];
    let mut before = Vec::new();
    {
        let engine = engine(dir.path()).await;
        ingest(&engine, &sample_corpus()).await;
        for q in queries {
            let batches = engine
                .sql(&format!(
                    "SELECT doc_id, score FROM vector_search(kb, {}, 5)",
                    quoted(q)
                ))
                .await
                .unwrap();
            before.push((strings(&batches, "doc_id"), floats(&batches, "score")));
        }
    }
    // A new engine finds the index in the data directory by itself.
    let engine = engine(dir.path()).await;
    for (q, (ids, scores)) in queries.iter().zip(&before) {
        let batches = engine
            .sql(&format!(
                "SELECT doc_id, score FROM vector_search(kb, {}, 5)",
                quoted(q)
            ))
            .await
            .unwrap();
        assert_eq!(&strings(&batches, "doc_id"), ids);
        assert_eq!(&floats(&batches, "score"), scores);
    }

    // Upsert: a row with an existing doc_id replaces it (count unchanged, new content found).
    let target = &before[0].0[0];
    assert_eq!(count_rows(&engine).await, 400);
    engine
        .sql(&format!(
            "INSERT INTO kb VALUES ({}, 'Penguins', 'Emperor penguins huddle to survive the Antarctic winter.', \
             embed('Emperor penguins huddle to survive the Antarctic winter.'))",
            quoted(target)
        ))
        .await
        .unwrap();
    assert_eq!(count_rows(&engine).await, 400);
    let hits = engine
        .sql("SELECT doc_id, title FROM vector_search(kb, 'how do penguins survive the cold', 1)")
        .await
        .unwrap();
    assert_eq!(strings(&hits, "doc_id"), vec![target.clone()]);
    assert_eq!(strings(&hits, "title"), vec!["Penguins".to_string()]);

    // Delete: gone from scans and searches, durably.
    let deleted = engine
        .sql(&format!("DELETE FROM kb WHERE doc_id = {}", quoted(target)))
        .await
        .unwrap();
    assert_eq!(single_int(&deleted), 1);
    assert_eq!(count_rows(&engine).await, 399);
    let hits = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'how do penguins survive the cold', 10)")
        .await
        .unwrap();
    assert!(!strings(&hits, "doc_id").contains(target));
    drop(engine);
    let engine = common::engine(dir.path()).await;
    assert_eq!(count_rows(&engine).await, 399);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_spice_signature_and_embed_in_queries() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    ingest(&engine, &sample_corpus()).await;

    // A filter matching few rows still yields k rows, all matching.
    let matching = single_int(
        &engine
            .sql("SELECT count(*) FROM kb WHERE title ILIKE '%cell%'")
            .await
            .unwrap(),
    );
    assert!(matching >= 5, "sample has {matching} titles with 'cell'");
    let hits = engine
        .sql("SELECT doc_id, title, score FROM vector_search(kb, 'immune response', 5) WHERE title ILIKE '%cell%'")
        .await
        .unwrap();
    assert_eq!(row_count(&hits), 5);
    assert!(
        strings(&hits, "title")
            .iter()
            .all(|t| t.to_lowercase().contains("cell"))
    );
    let scores = floats(&hits, "score");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));

    // Spice.ai's signature: (table, query, column, limit) and (table, query).
    let spice = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'immune response', 'body', 4)")
        .await
        .unwrap();
    assert_eq!(row_count(&spice), 4);
    let default_k = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'immune response')")
        .await
        .unwrap();
    assert_eq!(row_count(&default_k), 10);

    // The same ranking by brute force in plain SQL with embed().
    let ann = engine
        .sql("SELECT doc_id FROM vector_search(kb, 'immune response', 5)")
        .await
        .unwrap();
    let exact = engine
        .sql(
            "SELECT doc_id FROM kb \
             ORDER BY cosine_distance(embedding, embed('immune response')) ASC LIMIT 5",
        )
        .await
        .unwrap();
    assert_eq!(strings(&ann, "doc_id"), strings(&exact, "doc_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_handles_null_empty_long_and_scalar_text() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let long = "word ".repeat(5000);
    let batches = engine
        .sql(&format!(
            "SELECT embed(t) IS NULL AS missing, t IS NULL AS null_text FROM (VALUES ('hello world'), (''), ('   '), (NULL), ('{long}')) AS v(t)"
        ))
        .await
        .unwrap();
    let missing = datafusion::arrow::array::AsArray::as_boolean(batches[0].column(0)).clone();
    let expected = [false, true, true, true, false];
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(missing.value(i), *e, "row {i}");
    }
    // Unit length, 384 dimensions, identical text gives identical vectors.
    let batches = engine
        .sql("SELECT round(1 - cosine_distance(embed('a cat'), embed('a cat')), 4) AS same, \
              round(1 - cosine_distance(embed('a cat sat on the mat'), embed('a kitten on a rug')), 4) AS near, \
              round(1 - cosine_distance(embed('a cat sat on the mat'), embed('interest rates rose sharply')), 4) AS far, \
              array_length(embed('a cat')) AS dims")
        .await
        .unwrap();
    let b = &batches[0];
    let value = |i: usize| {
        datafusion::arrow::compute::cast(b.column(i), &datafusion::arrow::datatypes::DataType::Float64)
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
            .value(0)
    };
    use datafusion::arrow::array::AsArray;
    assert!((value(0) - 1.0).abs() < 1e-3);
    assert!(value(1) > value(2) + 0.2, "near {} vs far {}", value(1), value(2));
    assert_eq!(value(3), 384.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    ingest(&engine, &sample_corpus()).await;

    // Wrong vector dimension into the index.
    let err = sql_error(&engine, "INSERT INTO kb VALUES ('x', 't', 'b', [1.0, 2.0, 3.0])").await;
    assert!(err.to_lowercase().contains("dimension") || err.contains("384"), "{err}");
    // Wrong query vector dimension.
    let err = sql_error(&engine, "SELECT * FROM vector_search(kb, [0.1, 0.2], 3)").await;
    assert!(err.contains("dimension mismatch"), "{err}");
    // Unknown index, bad k, bad SQL.
    let err = sql_error(&engine, "SELECT * FROM vector_search(nope, 'q', 3)").await;
    assert!(err.contains("no knowledge index called 'nope'"), "{err}");
    let err = sql_error(&engine, "SELECT * FROM vector_search(kb, 'q', 0)").await;
    assert!(err.contains("positive integer"), "{err}");
    assert!(engine.sql("SELEC * FROM kb").await.is_err());

    // A malformed JSON line fails the INSERT and leaves the index as it was.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"doc_id\": \"n1\", \"title\": \"ok\", \"body\": \"fine\"}\n{\"doc_id\": \"n2\", \"title\": oops}\n",
    )
    .unwrap();
    let err = engine
        .run_script(
            "test",
            &format!(
                "CREATE EXTERNAL TABLE bad_docs (doc_id VARCHAR, title VARCHAR, body VARCHAR) STORED AS JSON LOCATION '{}';
                 INSERT INTO kb SELECT doc_id, title, body, embed(body) FROM bad_docs;",
                bad.display()
            ),
            |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("json"), "{err}");
    assert_eq!(single_int(&engine.sql("SELECT count(*) FROM kb").await.unwrap()), 400);
    assert_eq!(
        row_count(&engine.sql("SELECT * FROM kb WHERE doc_id = 'n1'").await.unwrap()),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_are_tables_of_the_default_schema_in_every_session() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = engine(dir.path()).await;
        engine
            .sql(
                "CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, body VARCHAR) STORED AS KB LOCATION 'kb' \
                 OPTIONS ('meta_knowledge' 'true'); \
                 CREATE EXTERNAL TABLE vecs (doc_id VARCHAR NOT NULL) STORED AS KB LOCATION 'vecs' \
                 OPTIONS ('dimensions' '2'); \
                 INSERT INTO vecs VALUES ('a', [1.0, 0.0]), ('b', [0.0, 1.0])",
            )
            .await
            .unwrap();
    }
    // A later session finds both indexes (and the Meta-Knowledge index's own tables) the
    // standard ways: SHOW TABLES, information_schema, qualified names.
    let engine = engine(dir.path()).await;
    let shown = strings(&engine.sql("SHOW TABLES").await.unwrap(), "table_name");
    for table in [
        "kb",
        "kb_questions",
        "kb_clusters",
        "kb_personas",
        "vecs",
        "dead_letters",
    ] {
        assert!(shown.contains(&table.to_string()), "{table} missing from {shown:?}");
    }
    let listed = strings(
        &engine
            .sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name")
            .await
            .unwrap(),
        "table_name",
    );
    assert_eq!(
        listed,
        vec![
            "dead_letters",
            "kb",
            "kb_clusters",
            "kb_personas",
            "kb_questions",
            "vecs"
        ]
    );
    let qualified = engine.sql("SELECT count(*) FROM datafusion.public.vecs").await.unwrap();
    assert_eq!(single_int(&qualified), 2);
    let nearest = engine
        .sql("SELECT doc_id FROM vector_search(vecs, [0.9, 0.1], 1)")
        .await
        .unwrap();
    assert_eq!(strings(&nearest, "doc_id"), vec!["a"]);
    // A column that cannot hold what the vectors were computed from is refused, by name.
    let refused = sql_error(&engine, "SELECT * FROM vector_search(kb, 'x', 'embedding_typo', 3)").await;
    assert!(refused.contains("no column 'embedding_typo'"), "{refused}");
    // DROP TABLE forgets the index for the session; its files stay for the next one.
    engine.sql("DROP TABLE vecs").await.unwrap();
    let error = sql_error(&engine, "SELECT * FROM vecs").await;
    assert!(error.contains("vecs"), "{error}");
    assert!(dir.path().join("vecs/manifest.json").is_file());
}
