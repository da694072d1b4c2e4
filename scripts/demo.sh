#!/usr/bin/env bash
# The README's demo command: installs the build's system packages if missing, then runs
# `firstgate demo` (gateway on 127.0.0.1:8080, admin on 127.0.0.1:9090). Extra arguments go
# to `firstgate demo`, e.g. scripts/demo.sh --listen 127.0.0.1:8000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --bin firstgate -- demo "$@"
