#!/usr/bin/env bash
# The Globus Compute contract, checked with the real SDK rather than our reading of it:
# globus-compute-sdk from PyPI (in a venv under target/compute-contract/) serializes task
# results as an endpoint does (00 dill base64, 11 JSON, 13 all strategies; dicts, JSON strings,
# 2 MB strings, unicode), the gateway decodes them (tests/compute_contract.rs) to the same
# values; then the task payloads and submit bodies the gateway really sent (a cold request, a
# relayed stream, a FIRST batch) are unpacked with the SDK's ComputeSerializer and checked
# against FIRST's `model_params` shape and the SDK's `Batch.prepare()`.
#
# Usage: scripts/compute-contract.sh      (run by .ci/run; a few seconds once the venv exists)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import ensurepip" 2>/dev/null || scripts/install-deps.sh --clients
dir="$PWD/target/compute-contract"
mkdir -p "$dir"
[ -x "$dir/venv/bin/python" ] || python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q --disable-pip-version-check "globus-compute-sdk==4.19.*"
echo "compute-contract: $("$dir/venv/bin/pip" show globus-compute-sdk | grep -i '^version')" >&2

work="$dir/run"
rm -rf "$work" && mkdir -p "$work"
"$dir/venv/bin/python" scripts/compute_contract.py results "$work/results"
FIRSTGATE_CONTRACT_DIR="$work" cargo test --quiet --test compute_contract
"$dir/venv/bin/python" scripts/compute_contract.py payloads "$work/payloads"
echo "compute-contract: the gateway and globus-compute-sdk agree"
