#!/usr/bin/env bash
# Checks the operator's page (GET / on the admin listener) in a real browser: Debian's
# headless Chromium driven through chromium-driver by python3-selenium (installed by
# scripts/install-deps.sh --browser). Starts the demo when no gateway answers; saves a
# screenshot to target/admin-page.png.
#   scripts/admin-page.sh [ADMIN_URL [API_URL]]   (default http://127.0.0.1:9090, :8080)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --browser
admin="${1:-http://127.0.0.1:9090}"
api="${2:-http://127.0.0.1:8080}"
mkdir -p target

up() { curl -sf -o /dev/null "$admin/health" && curl -sf -o /dev/null "$api/resource_server/health"; }
source scripts/lib/demo.sh
start_demo_unless_up admin-page target/admin-page-demo.log
# Debian's Python, which has python3-selenium (a pyenv or venv python would not).
/usr/bin/python3 scripts/admin_page_check.py "$admin" "$api" "$PWD/target/admin-page.png"
