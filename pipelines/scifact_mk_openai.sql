-- Meta-Knowledge preparation of the bundled SciFact sample with an LLM behind any
-- OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's llama-server, Ollama).
--
-- Point it at your endpoint, then run:  mkflow run pipelines/scifact_mk_openai.sql
--   local llama-server:  MKFLOW_LLM_BASE_URL=http://127.0.0.1:8080/v1 MKFLOW_LLM_MODEL=smollm2
--   OpenAI:              OPENAI_API_KEY=sk-… MKFLOW_LLM_MODEL=gpt-4o-mini
-- (environment variables MKFLOW_<SETTING> set the defaults; SET statements override them).
-- Answers are cached in <data-dir>/cache/generations.jsonl: a re-run costs no requests.
-- Documents whose answer stays invalid after one corrective retry are still indexed, with
-- null metadata and no questions; the error is in the `dead_letters` table.

SET mkflow.llm_concurrency = 4;
SET mkflow.llm_timeout_secs = 120;
SET mkflow.llm_max_retries = 3;
SET mkflow.max_questions = 5;
SET mkflow.generator = 'openai';

CREATE EXTERNAL TABLE IF NOT EXISTS scifact_docs (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS JSONL
LOCATION 'data/sample/scifact-sample.jsonl';

CREATE EXTERNAL TABLE IF NOT EXISTS scifact_llm (
    doc_id VARCHAR NOT NULL,
    title  VARCHAR,
    body   VARCHAR
)
STORED AS KB
LOCATION 'scifact_llm'
OPTIONS ('model' 'all-MiniLM-L6-v2', 'meta_knowledge' 'true');

INSERT INTO scifact_llm
SELECT doc_id, title, body, metadata, qa, mk_cluster(metadata), embedding
FROM (
    SELECT doc_id, title, body,
           mk_metadata(title, body) AS metadata,
           mk_qa(title, body) AS qa,
           embed(concat_ws('. ', title, body)) AS embedding
    FROM scifact_docs
);

SELECT count(*) AS documents, sum(array_length(qa)) AS questions FROM scifact_llm;
