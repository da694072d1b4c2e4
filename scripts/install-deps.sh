#!/usr/bin/env bash
# Installs the system packages firstgate's build needs on Debian/Ubuntu:
#   cmake       – pingora-core builds zlib-ng through flate2
#   pkg-config, libssl-dev – found by -sys crates
#   build-essential – cc and make: SQLite (bundled) and jemalloc are built from source
# With --clients, also what scripts/clients.sh needs to run the OpenAI clients:
#   python3, python3-venv, nodejs, npm (each only when the command is missing), curl
# With --servers, also the servers the scale-out tests run on loopback (scripts/state-servers.sh):
#   redis-server, postgresql
# With --browser, also what scripts/admin-page.sh drives the operator's page with:
#   chromium, chromium-driver, python3-selenium (Debian's own; nothing is downloaded elsewhere)

# Idempotent and quiet when everything is already there; safe under CI (no stdin).
set -euo pipefail

need=()
for pkg in cmake pkg-config libssl-dev build-essential; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${1:-}" = "--servers" ]; then
  for pkg in redis-server postgresql; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
fi
if [ "${1:-}" = "--browser" ]; then
  for pkg in chromium chromium-driver python3-selenium curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
fi
if [ "${1:-}" = "--clients" ]; then
  # A Python or Node.js installed otherwise (pyenv, nvm, NodeSource) is used as it is.
  command -v python3 >/dev/null || need+=(python3)
  python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  command -v curl >/dev/null || need+=(curl)
fi
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "install-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
