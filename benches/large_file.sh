#!/usr/bin/env bash
# Memory of a large JSON Lines ingest (not run by CI; ~10 minutes here at 2 GB): writes a file
# of random-word documents (~3 KB each), inserts it into an index with a BM25 text index and no
# embedding, and samples the process's anonymous and file-backed RSS every second.
#
# Usage: benches/large_file.sh [GIB]   (default 2; the file and index go to $TMPDIR)
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/docs.jsonl" "$gib" <<'PY'
import json, random, sys
random.seed(2)
words = [f"w{i}" for i in range(50000)]
limit = float(sys.argv[2]) * 1024**3
with open(sys.argv[1], "w") as f:
    i = 0
    while f.tell() < limit:
        f.write(json.dumps({"doc_id": f"d{i}", "title": " ".join(random.choices(words, k=8)),
                            "body": " ".join(random.choices(words, k=450))}) + "\n")
        i += 1
PY
cat > "$work/ingest.sql" <<SQL
CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS JSONL LOCATION '$work/docs.jsonl';
CREATE EXTERNAL TABLE kb (doc_id VARCHAR NOT NULL, title VARCHAR, body VARCHAR) STORED AS KB LOCATION 'kb';
INSERT INTO kb SELECT doc_id, title, body, NULL FROM docs;
SQL
cargo build --quiet
target_dir=${CARGO_TARGET_DIR:-target}
started=$(date +%s)
"$target_dir/debug/mkflow" --data-dir "$work/data" run "$work/ingest.sql" &
pid=$!
peak_anon=0 peak_file=0 peak_sum=0
while kill -0 "$pid" 2>/dev/null; do
  read -r anon file < <(awk '/RssAnon/{a=$2} /RssFile/{f=$2} END{print a+0, f+0}' "/proc/$pid/status" 2>/dev/null || echo "0 0")
  (( anon > peak_anon )) && peak_anon=$anon
  (( file > peak_file )) && peak_file=$file
  (( anon + file > peak_sum )) && peak_sum=$((anon + file))
  sleep 1
done
wait "$pid"
echo "large file: $(du -h "$work/docs.jsonl" | cut -f1) in $(( $(date +%s) - started )) s;" \
  "peak RSS: anonymous $((peak_anon / 1024)) MiB, file-backed $((peak_file / 1024)) MiB, sum $((peak_sum / 1024)) MiB"
