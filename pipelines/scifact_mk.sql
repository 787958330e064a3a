-- Meta-Knowledge preparation of the bundled SciFact sample, on the embedded generator (no LLM).
-- Run from the repository root:  mkflow run pipelines/scifact_mk.sql
-- Then query:
--   mkflow sql "SELECT doc_id, question, answer, score FROM qa_search(scifact_mk, 'vitamin D and bone health', 5)"
--   mkflow sql "SELECT doc_id, question, cluster_name, sub_queries FROM mk_search(scifact_mk, 'vitamin D and bone health', 5)"
--   mkflow sql "SELECT cluster_name, documents, questions, summary FROM scifact_mk_clusters"

-- 1. Generation settings of this pipeline (these are the defaults; see README "Meta-Knowledge").
SET mkflow.generator = 'embedded';
SET mkflow.max_questions = 6;

-- 2. The source: JSON Lines (bad records go to `dead_letters`).
CREATE EXTERNAL TABLE IF NOT EXISTS scifact_docs (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS JSONL
LOCATION 'data/sample/scifact-sample.jsonl';

-- 3. A knowledge index with a Meta-Knowledge side: `metadata`, `qa` and `cluster_name` columns are
--    appended to the declared ones, and every insert also fills the questions index
--    (`scifact_mk_questions`) and keeps the cluster summaries current (`scifact_mk_clusters`).
CREATE EXTERNAL TABLE IF NOT EXISTS scifact_mk (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS KB
LOCATION 'scifact_mk'
OPTIONS ('model' 'all-MiniLM-L6-v2', 'meta_knowledge' 'true');

-- 4. Prepare and upsert. mk_metadata and mk_qa share one generation per document (same
--    arguments); the document embedding is computed once for embed() and the classifier.
INSERT INTO scifact_mk
SELECT doc_id, title, body, metadata, qa, mk_cluster(metadata), embedding
FROM (
    SELECT doc_id, title, body,
           mk_metadata(title, body) AS metadata,
           mk_qa(title, body) AS qa,
           embed(concat_ws('. ', title, body)) AS embedding
    FROM scifact_docs
);

SELECT count(*) AS documents, sum(array_length(qa)) AS questions FROM scifact_mk;
