#!/usr/bin/env bash
# Runs a private Redis and PostgreSQL on loopback for the scale-out tests (and for trying
# replicas by hand), from Debian's packages (scripts/install-deps.sh --servers installs them).
# Everything lives under DIR; nothing touches the system's own instances.
#
#   scripts/state-servers.sh start DIR REDIS_PORT [PG_PORT] # both (Redis alone without a
#                                                           # PostgreSQL port); prints the URLs
#   scripts/state-servers.sh stop DIR                       # both
#   scripts/state-servers.sh stop-redis DIR                 # Redis only (an outage)
#   scripts/state-servers.sh start-redis DIR                # Redis again, same port
#
# PostgreSQL refuses to run as root: as root, its files belong to the `postgres` user that the
# package creates, and its commands run as that user.
set -euo pipefail

cmd=${1:?usage: $0 start|stop|stop-redis|start-redis DIR [REDIS_PORT PG_PORT]}
dir=${2:?the directory to keep the servers in}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)   # absolute: the servers change directory

pg_bin() {
  local v
  v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
  [ -n "$v" ] || { echo "state-servers: PostgreSQL is not installed; run scripts/install-deps.sh --servers" >&2; exit 1; }
  echo "/usr/lib/postgresql/$v/bin"
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_until() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 200); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "state-servers: $what did not come up within 10 s" >&2
  return 1
}

start_redis() {
  command -v redis-server >/dev/null || { echo "state-servers: redis-server is not installed; run scripts/install-deps.sh --servers" >&2; exit 1; }
  local port
  port=$(cat "$dir/redis.port")
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$dir/redis.pid" --dir "$dir" --logfile "$dir/redis.log"
  wait_until "Redis on port $port" redis-cli -p "$port" ping
}

stop_redis() {
  [ -f "$dir/redis.port" ] || return 0
  redis-cli -p "$(cat "$dir/redis.port")" shutdown nosave >/dev/null 2>&1 || true
  # Gone when the port no longer answers.
  for _ in $(seq 1 200); do
    redis-cli -p "$(cat "$dir/redis.port")" ping >/dev/null 2>&1 || return 0
    sleep 0.05
  done
}

start_pg() {
  local bin port
  bin=$(pg_bin)
  port=$(cat "$dir/pg.port")
  mkdir -p "$dir/pg"
  if [ "$(id -u)" -eq 0 ]; then
    chmod 755 "$dir"
    chown postgres: "$dir/pg"
  fi
  as_pg "$bin/initdb" -D "$dir/pg/data" -U firstgate --auth=trust -E UTF8 --no-sync >"$dir/pg/initdb.log" 2>&1 \
    || { cat "$dir/pg/initdb.log" >&2; exit 1; }
  as_pg "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 20 \
    -o "-p $port -k $dir/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null \
    || { cat "$dir/pg/server.log" >&2; exit 1; }
  wait_until "PostgreSQL on port $port" "$bin/pg_isready" -h 127.0.0.1 -p "$port"
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U firstgate firstgate
}

stop_pg() {
  [ -d "$dir/pg/data" ] || return 0
  as_pg "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
}

case "$cmd" in
  start)
    echo "${3:?the Redis port}" >"$dir/redis.port"
    start_redis
    echo "redis://127.0.0.1:$3/0"
    if [ -n "${4:-}" ]; then
      echo "$4" >"$dir/pg.port"
      start_pg
      echo "postgres://firstgate@127.0.0.1:$4/firstgate"
    fi
    ;;
  stop) stop_redis; stop_pg ;;
  stop-redis) stop_redis ;;
  start-redis) start_redis ;;
  *) echo "usage: $0 start|stop|stop-redis|start-redis DIR [REDIS_PORT [PG_PORT]]" >&2; exit 2 ;;
esac
