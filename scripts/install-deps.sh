#!/usr/bin/env bash
# Installs the system packages firstgate's build needs on Debian/Ubuntu:
#   cmake       – pingora-core builds zlib-ng through flate2
#   pkg-config, libssl-dev – found by -sys crates
#   build-essential – cc and make: SQLite (bundled) and jemalloc are built from source

# Idempotent and quiet when everything is already there; safe under CI (no stdin).
set -euo pipefail

need=()
for pkg in cmake pkg-config libssl-dev build-essential; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "install-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
