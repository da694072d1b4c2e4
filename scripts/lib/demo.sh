# Sourced by scripts that need a running gateway (clients.sh, admin-page.sh): the caller
# defines `up` (is a gateway answering?); `start_demo_unless_up NAME LOG` starts
# `firstgate demo` when it is not, waits for it (2 minutes at most), and stops it on exit.
start_demo_unless_up() {
  up && return 0
  echo "$1: no gateway answers; starting firstgate demo (log: $2)" >&2
  cargo build --quiet --bin firstgate
  target/debug/firstgate demo > "$2" 2>&1 &
  demo=$!
  trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null || true' EXIT
  local deadline=$((SECONDS + 120))
  until up; do
    if ! kill -0 "$demo" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      echo "$1: the demo did not come up:" >&2
      tail -20 "$2" >&2
      exit 1
    fi
    sleep 0.5
  done
}
