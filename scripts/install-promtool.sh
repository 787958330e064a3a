#!/usr/bin/env bash
# Installs promtool (Debian's `prometheus` package), which the streaming tests use to lint the
# /metrics output, unless it is already on PATH. Idempotent; needs root (or sudo) for apt-get.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "installing promtool (Debian's prometheus package)"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
command -v promtool >/dev/null 2>&1 || { echo "the prometheus package did not install promtool" >&2; exit 1; }
