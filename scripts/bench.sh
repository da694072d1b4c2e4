#!/usr/bin/env bash
# The side-by-side benchmark: builds release, installs nginx (Debian package) if missing, and
# runs firstgate-bench: the simulator directly, nginx, the bare Pingora proxy, firstgate with
# auth and usage off, firstgate with everything on, and the same with its per-user limits in
# a Redis started here on loopback (firstgate-redis; the Redis calls' p99 is printed at the
# end), all on loopback. Arguments go to firstgate-bench (see --help),
# e.g. `scripts/bench.sh --duration 2s --rates 1000 --streams 100` for a quick run.
# Prints a table; JSON goes to target/bench/results.json.
#
# `scripts/bench.sh --light` measures with a light generator instead (wrk and h2load from
# Debian, one thread; nginx, the bare Pingora proxy and firstgate each on one thread, in front
# of a static nginx backend): CPU per 1,000 requests, and streams' time to first byte and
# memory; JSON to target/bench/light.json. E.g. `scripts/bench.sh --light --streams 1000,5000`.
# `--light-rates 8000` adds runs at that offered rate (every proxy with time to spare),
# `--light-new-connections` a closed loop with a new connection per request;
# `--light --callgrind --streams 0` runs the proxies under valgrind (Debian's) and reports the
# instructions per request, steady enough to compare two builds where CPU time is not.
#
# `scripts/bench.sh --prefix [--rate R --requests N --slack S ...]` compares routing policies
# on a prefix-sharing workload instead (scripts/bench-prefix.py; Poisson arrivals, 20/s).
#
# `scripts/bench.sh --soak [RECORDS RATE RETENTION_SECS]` runs the usage store's retention soak
# instead (examples/usage_soak.rs; default 2,000,000 records at 20,000/s, 20 s retention): file
# size every 5 s, then rollup totals against what was sent, and drops (must be 0).
#
# `scripts/bench.sh --replay [REQUESTS]` times `firstgate policy replay` instead
# (examples/replay_bench.rs; default a week of 1,000,000 requests, live and candidate policies).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--soak" ]; then
    shift
    exec cargo run --release --example usage_soak -- "$@"
fi
if [ "${1:-}" = "--replay" ]; then
    shift
    scripts/install-deps.sh
    exec cargo run --release --example replay_bench -- "$@"
fi
if [ "${1:-}" = "--prefix" ]; then
    # Prefix affinity against least-in-flight and the SGLang router's cache_aware policy
    # (`pip install sglang-router`; skipped when missing) on 4 simulators with prefix caches
    # (scripts/bench-prefix.py --help). FG_BIN_DIR: use binaries built elsewhere.
    shift
    if [ -z "${FG_BIN_DIR:-}" ]; then
        cargo build --release --bin firstgate --bin firstgate-sim
        FG_BIN_DIR=target/release
    fi
    exec python3 scripts/bench-prefix.py "$FG_BIN_DIR" "$@"
fi
scripts/install-deps.sh --servers
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q nginx-light || $SUDO apt-get install -y -q nginx
fi
# The light generator (--light): Debian's wrk and h2load.
if [[ " $* " == *" --light "* ]] && ! { command -v wrk && command -v h2load; } >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q wrk nghttp2-client
fi
if [[ " $* " == *" --callgrind "* ]] && ! command -v valgrind >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q valgrind
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --bins --example bare-proxy --example bare-proxy-tuned
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
state=target/bench/state
mkdir -p target/bench
trap 'scripts/state-servers.sh stop "$state"' EXIT
# A port nothing listens on.
port=$(shuf -i 20000-60000 -n 1)
while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$(shuf -i 20000-60000 -n 1); done
redis=$(scripts/state-servers.sh start "$state" "$port")
target/release/firstgate-bench --nginx "$NGINX" --redis "$redis" "$@"
