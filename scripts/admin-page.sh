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
if ! up; then
  echo "admin-page: no gateway at $admin; starting firstgate demo (log: target/admin-page-demo.log)" >&2
  cargo build --quiet --bin firstgate
  target/debug/firstgate demo > target/admin-page-demo.log 2>&1 &
  demo=$!
  trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
  deadline=$((SECONDS + 120))
  until up; do
    if ! kill -0 "$demo" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      echo "admin-page: the demo did not come up:" >&2
      tail -20 target/admin-page-demo.log >&2
      exit 1
    fi
    sleep 0.5
  done
fi
# Debian's Python, which has python3-selenium (a pyenv or venv python would not).
/usr/bin/python3 scripts/admin_page_check.py "$admin" "$api" "$PWD/target/admin-page.png"
