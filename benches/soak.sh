#!/usr/bin/env bash
# The soak (not run by CI; about 20 minutes here with the defaults): Kafka ingest into a
# Meta-Knowledge index with full text, SIGKILLed 20 times (half of them during background
# compactions when one comes), then 10 minutes of streaming ingest with 8 query clients.
# Prints documents lost and duplicated, dead letters, query p50/p99 during compactions vs not,
# and RSS (written every second to target/soak/rss.csv). See benches/soak.rs.
#
# Knobs: MKFLOW_SOAK_DOCS (2000), MKFLOW_SOAK_KILLS (20), MKFLOW_SOAK_SECONDS (600),
#        MKFLOW_SOAK_RATE (5 docs/s), MKFLOW_SOAK_CLIENTS (8).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --profile dev --bench soak
