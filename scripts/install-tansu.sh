#!/usr/bin/env bash
# Installs the tansu Kafka-compatible broker (used by the streaming tests and benchmarks) into
# the mkflow home, unless it is already there (or `$MKFLOW_TANSU` names a tansu binary, which the
# tests and benchmarks then use). Idempotent; ~18 min on 2 cores the first time.
#
# Safe to run concurrently: under the lock <home>/locks/tansu.lock (flock) it builds into a staging
# directory beside <home>/tansu and renames it into place when complete; a second run waits on
# the lock, then finds tansu and does nothing. What a killed run left is removed by the next.
set -euo pipefail
VERSION=0.6.0
if [ -n "${MKFLOW_TANSU:-}" ]; then
    exit 0
fi
HOME_DIR="${MKFLOW_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mkflow}"
ROOT="$HOME_DIR/tansu"
if [ -x "$ROOT/bin/tansu" ]; then
    exit 0
fi
mkdir -p "$HOME_DIR/locks"
LOCK="$HOME_DIR/locks/tansu.lock"
exec 9>>"$LOCK"
if ! flock -n 9; then
    echo "waiting for another installer of tansu (lock $LOCK)…"
    flock 9
fi
if [ -x "$ROOT/bin/tansu" ]; then
    echo "tansu was installed meanwhile by another installer in $ROOT"
    exit 0
fi
# Only the lock holder stages, so any staging directory found now is from a killed installer.
rm -rf "$HOME_DIR"/.tansu.partial-*
STAGE="$HOME_DIR/.tansu.partial-$$"
trap 'rm -rf "$STAGE"' EXIT
echo "installing tansu $VERSION into $ROOT (once)"
# The build directory survives a killed run (the next one resumes the build) and goes once done.
CARGO_TARGET_DIR="$HOME_DIR/tansu-build" cargo install "tansu@$VERSION" --locked --features dynostore --root "$STAGE"
sync "$STAGE/bin/tansu" "$STAGE/bin" "$STAGE"
rm -rf "$ROOT" # incomplete (no bin/tansu), or it would have been found above
mv -T "$STAGE" "$ROOT"
sync "$HOME_DIR"
rm -rf "$HOME_DIR/tansu-build"
