#!/usr/bin/env bash
# Checks the OpenAI and Anthropic clients people use against a gateway, with both base URLs
# (`/v1` and FIRST's `/resource_server/sophia/vllm/v1`): the official OpenAI Python SDK
# (scripts/smoke_openai.py), the official OpenAI JS SDK (scripts/clients/openai-js.mjs),
# LangChain's ChatOpenAI (scripts/clients/langchain_check.py), and the Messages API
# (`/v1/messages`, `/v1/messages/count_tokens`) through the official Anthropic Python SDK
# (scripts/clients/anthropic_check.py) and JS SDK (scripts/clients/anthropic-js.mjs), whose base
# URLs are the same without `/v1` (the SDKs add it). The clients are installed from PyPI and npm
# into target/clients/.
#
# Usage: scripts/clients.sh [BASE_URL]
# BASE_URL defaults to http://127.0.0.1:8080. When no gateway answers there, the script starts
# `firstgate demo` (whose users and models the checks expect) and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --clients
base="${1:-http://127.0.0.1:8080}"
dir="$PWD/target/clients"
mkdir -p "$dir"

echo "clients: installing the OpenAI and Anthropic SDKs (Python, JS) and langchain-openai" >&2
[ -x "$dir/venv/bin/python" ] || python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q --disable-pip-version-check \
  "openai>=1.66,<4" "httpx[http2]" "langchain-openai>=0.3,<2" "anthropic>=2,<3"
[ -f "$dir/package.json" ] || echo '{"private": true}' > "$dir/package.json"
(cd "$dir" && npm install --silent --no-audit --no-fund "openai@6" "@anthropic-ai/sdk@1")

up() { curl -sf -o /dev/null "$base/resource_server/health"; }
source scripts/lib/demo.sh
start_demo_unless_up clients "$dir/demo.log"

"$dir/venv/bin/python" scripts/smoke_openai.py "$base"
# Run from beside its node_modules: ES modules resolve packages from the script's directory.
cp scripts/clients/openai-js.mjs "$dir/"
node "$dir/openai-js.mjs" "$base"
"$dir/venv/bin/python" scripts/clients/langchain_check.py "$base"
# Against the demo, the answers are also compared with its sophia instance's (vLLM direct).
direct=""
[ "$base" = "http://127.0.0.1:8080" ] && direct="http://127.0.0.1:18001"
"$dir/venv/bin/python" scripts/clients/anthropic_check.py "$base" "$direct"
cp scripts/clients/anthropic-js.mjs "$dir/"
node "$dir/anthropic-js.mjs" "$base"
echo "clients: every client passed with both base URLs"
