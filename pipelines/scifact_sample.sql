-- Ingest the bundled SciFact sample (JSON Lines) into the knowledge index `scifact`.
-- Run from the repository root:  mkflow run pipelines/scifact_sample.sql
-- Then query:  mkflow sql "SELECT doc_id, title, score FROM vector_search(scifact, 'vitamin D and bone health', 5)"

-- 1. The source: JSON Lines, one document per line. Records that do not fit the declared
--    columns (bad JSON, wrong types, no doc_id) go to the `dead_letters` table; the rest load.
CREATE EXTERNAL TABLE IF NOT EXISTS scifact_docs (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS JSONL
LOCATION 'data/sample/scifact-sample.jsonl';

-- 2. The knowledge index (created in the data directory on first run, reopened after).
--    An `embedding` column sized for the model is appended to the declared columns.
CREATE EXTERNAL TABLE IF NOT EXISTS scifact (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS KB
LOCATION 'scifact'
OPTIONS ('model' 'all-MiniLM-L6-v2', 'quantization' 'f32');

-- 3. Embed title + abstract and upsert by doc_id (re-running replaces, never duplicates).
INSERT INTO scifact
SELECT doc_id, title, body, embed(concat_ws('. ', title, body))
FROM scifact_docs;

SELECT count(*) AS documents FROM scifact;
