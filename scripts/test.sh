#!/usr/bin/env bash
# The README's test command: installs the build's system packages if missing, then runs
# every test (unit and integration against the simulators, all on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets "$@"
