#!/usr/bin/env bash
# The benchmark suite, one command: every comparison runs its baseline in the same run.
#   benches/run_all.sh            (about 35 minutes on 2 cores)
# 1. embed() through SQL vs a bare ort loop; token-budget vs fixed-size batching
# 2. vector_search through SQL vs bare usearch on 100k vectors (p50/p99), plus filtered search,
#    commit cost, and search p99 while full commits run vs idle
# 3. ingest: mkflow vs a hand-written Python pipeline (onnxruntime + tokenizers + usearch)
# 4. streaming: Kafka vs file ingestion throughput, produce-to-visible freshness (needs tansu:
#    scripts/install-tansu.sh)
# 5. decoder: LaSER latent (K=3) vs plain (K=0) encode at batch 1/8/32, generation tokens/s
#    (SmolLM2-135M; pulled and exported on first use)
# 6. serve: text-query vector_search over HTTP, 1 vs 16 concurrent clients (QPS, p50/p99)
# 7. text_search through SQL vs bare tantivy on 100k documents; ingest with the text index on/off
# 8. chunked vs unchunked ingest of long documents (model tokens/s, share of the text embedded)
# 9. cluster: fan-out query latency over 3 workers vs one node (recall@10); ingest docs/s with
#    1, 2, 3 workers on a 6-partition topic
# 10. Meta-Knowledge prepare on the local LLM (Qwen2.5-0.5B, constrained decoding): valid answers,
#    docs/s and tokens/s, batch 4 vs batch 1 (12 documents here, ~8 min; the README's figures are
#    MKFLOW_BENCH_DOCS=50, ~30 min)
set -euo pipefail
cd "$(dirname "$0")/.."
# Dependencies are optimised in the dev profile (see Cargo.toml), so benchmarks reuse the test
# build instead of a separate release build.
MKFLOW_BENCH_DOCS="${MKFLOW_BENCH_DOCS:-400}" cargo bench --profile dev --bench embedding
cargo bench --profile dev --bench search
benches/compare_python.sh data/sample/scifact-sample.jsonl 400
bash scripts/install-tansu.sh
cargo bench --profile dev --bench streaming
cargo bench --profile dev --bench decoder
cargo bench --profile dev --bench serve
cargo bench --profile dev --bench text_search
cargo bench --profile dev --bench chunking
cargo bench --profile dev --bench cluster
cargo bench --profile dev --bench cluster_ingest
MKFLOW_BENCH_DOCS=12 MKFLOW_BENCH_BASELINE_DOCS=4 cargo bench --profile dev --bench local_prepare
