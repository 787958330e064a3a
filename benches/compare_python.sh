#!/usr/bin/env bash
# Ingest throughput, side by side on the same machine and documents: mkflow's pipeline
# (`mkflow run`, whole process) vs the straightforward Python pipeline in python_baseline.py
# (onnxruntime + tokenizers + usearch from PyPI, whole process). Prints docs/s and the ratio.
#
#   benches/compare_python.sh [CORPUS.jsonl] [N]
# CORPUS: JSON Lines with doc_id/title/body (default: the bundled sample), or a BEIR corpus.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-data/sample/scifact-sample.jsonl}
n=${2:-400}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore onnxruntime==1.31.1 tokenizers usearch==2.26.6 numpy
cargo build -q --bin mkflow
"$CARGO_TARGET_DIR/debug/mkflow" models pull >/dev/null

# The same N documents for both, in mkflow's sample format.
python3 - "$corpus" "$n" "$work/docs.jsonl" <<'PY'
import json, sys
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(src) as f, open(dst, "w") as out:
    for line in f:
        if n == 0:
            break
        d = json.loads(line)
        out.write(json.dumps({"doc_id": str(d.get("doc_id", d.get("_id"))), "title": d.get("title", ""),
                              "body": d.get("body", d.get("text", ""))}) + "\n")
        n -= 1
PY
docs=$(wc -l < "$work/docs.jsonl")
sed "s|'data/sample/scifact-sample.jsonl'|'$work/docs.jsonl'|" pipelines/scifact_sample.sql > "$work/pipeline.sql"

now() { python3 -c 'import time; print(time.time())'; }
start=$(now)
"$CARGO_TARGET_DIR/debug/mkflow" --data-dir "$work/data" run "$work/pipeline.sql" >/dev/null 2>&1
middle=$(now)
python3 benches/python_baseline.py "$work/docs.jsonl" --out "$work/py.usearch" >/dev/null
end=$(now)
python3 - "$docs" "$start" "$middle" "$end" <<'PY'
import sys
docs, start, middle, end = int(sys.argv[1]), *map(float, sys.argv[2:])
m, p = middle - start, end - middle
print(f"{docs} documents: mkflow {docs/m:.1f} docs/s ({m:.1f}s) | python {docs/p:.1f} docs/s ({p:.1f}s) | mkflow/python {p/m:.2f}x")
PY
