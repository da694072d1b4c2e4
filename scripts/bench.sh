#!/usr/bin/env bash
# The side-by-side benchmark: builds release, installs nginx (Debian package) if missing, and
# runs firstgate-bench: the simulator directly, nginx, firstgate with auth and usage off, and
# firstgate with everything on, on loopback. Arguments go to firstgate-bench (see --help),
# e.g. `scripts/bench.sh --duration 2s --rates 1000 --streams 100` for a quick run.
# Prints a table; JSON goes to target/bench/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q nginx-light || $SUDO apt-get install -y -q nginx
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --bins --example bare-proxy --example bare-proxy-tuned
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec target/release/firstgate-bench --nginx "$NGINX" "$@"
