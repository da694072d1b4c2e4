#!/usr/bin/env bash
# The README's test command: installs the build's system packages (and Redis and PostgreSQL,
# which the scale-out tests start on loopback) if missing, then runs every test (unit and
# integration against the simulators and those servers, all on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --servers
cargo test --all-targets "$@"
