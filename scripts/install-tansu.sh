#!/usr/bin/env bash
# Installs the tansu Kafka-compatible broker (used by the streaming tests and benchmarks) into
# the mkflow home, unless it is already there. Idempotent; ~18 min on 2 cores the first time.
set -euo pipefail
VERSION=0.6.0
HOME_DIR="${MKFLOW_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mkflow}"
ROOT="$HOME_DIR/tansu"
if [ -x "$ROOT/bin/tansu" ]; then
    exit 0
fi
echo "installing tansu $VERSION into $ROOT (once)"
CARGO_TARGET_DIR="$HOME_DIR/tansu-build" cargo install "tansu@$VERSION" --locked --features dynostore --root "$ROOT"
rm -rf "$HOME_DIR/tansu-build"
