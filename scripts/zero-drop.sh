#!/usr/bin/env bash
# Shows that reloads and upgrades drop nothing: runs a gateway in front of a simulated vLLM
# server, keeps streamed chat requests going from many clients, sends SIGHUP three times (with
# an edited policy), then upgrades the process (a new `firstgate serve --upgrade`, SIGQUIT to
# the old one), and reports every request that failed or was cut. Exits non-zero on any.
#
#   scripts/zero-drop.sh [WORKERS]     (default 50 concurrent streams)
#
# Uses ports 18080 (API), 19090 (admin) and 18001 (simulator) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${1:-50}
scripts/install-deps.sh
cargo build --bins
BIN=target/debug
DIR=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

cat > "$DIR/route.rhai" <<'EOF'
fn route(req, candidates) { direct(candidates.requested(req).hot()) }
EOF
cat > "$DIR/gateway.yaml" <<EOF
listen: 127.0.0.1:18080
admin_listen: 127.0.0.1:19090
auth: {mode: none}
limits: {ip_requests_per_second: 0}
usage: {store: null}
access_log: {enabled: false}
server: {upgrade_sock: $DIR/upgrade.sock, pid_file: $DIR/firstgate.pid}
shutdown: {grace_period: 60s}
policies: {route: route.rhai}
clusters:
  sophia:
    frameworks:
      vllm:
        models:
          - name: meta-llama/Meta-Llama-3.1-8B-Instruct
            backends: [127.0.0.1:18001]
EOF

wait_ready() {
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:19090/ready" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "zero-drop: the gateway did not become ready" >&2
    return 1
}

"$BIN/firstgate-sim" vllm --listen 127.0.0.1:18001 \
    --model meta-llama/Meta-Llama-3.1-8B-Instruct --ttft-ms 50 --itl-ms 20 2>"$DIR/sim.log" &
PIDS+=($!)
"$BIN/firstgate" serve --config "$DIR/gateway.yaml" 2>"$DIR/old.log" &
OLD=$!
PIDS+=($OLD)
wait_ready

# The load: each worker sends streamed requests (about 1 s each) until the stop file appears,
# half of them on one kept-alive connection (as SDKs do), half on a new connection each; a
# request counts as good only if it ends with `data: [DONE]`.
python3 - "$WORKERS" "$DIR/stop" "$DIR/result.json" <<'PY' &
import http.client, json, os, sys, threading
workers, stop, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = json.dumps({"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "stream": True,
                   "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]})
done, failures, lock = [0], [], threading.Lock()
def work(keepalive):
    c = None
    while not os.path.exists(stop):
        try:
            c = c or http.client.HTTPConnection("127.0.0.1", 18080, timeout=30)
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            text = r.read().decode()
            if not keepalive or r.getheader("connection", "").lower() == "close":
                c.close()
                c = None
            ok = r.status == 200 and text.rstrip().endswith("data: [DONE]")
            why = None if ok else f"status {r.status}, {len(text)} bytes"
        except Exception as e:  # refused, reset, cut: all count
            why = f"{type(e).__name__}: {e}"
            c = None
        with lock:
            if why: failures.append(why)
            else: done[0] += 1
threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(workers)]
[t.start() for t in threads]
[t.join() for t in threads]
json.dump({"completed": done[0], "failed": failures}, open(out, "w"))
PY
LOAD=$!

sleep 3
for round in 1 2 3; do
    printf '// edited %s\nfn route(req, candidates) { direct(candidates.requested(req).hot()) }\n' "$round" \
        > "$DIR/route.rhai"
    kill -HUP "$OLD"
    echo "zero-drop: SIGHUP $round sent"
    sleep 2
done

echo "zero-drop: upgrading (new process with --upgrade, SIGQUIT to $OLD)"
"$BIN/firstgate" serve --upgrade --config "$DIR/gateway.yaml" 2>"$DIR/new.log" &
NEW=$!
PIDS+=($NEW)
kill -QUIT "$OLD"
while kill -0 "$OLD" 2>/dev/null; do sleep 0.2; done
echo "zero-drop: the old process finished its streams and exited"
sleep 3
touch "$DIR/stop"
wait "$LOAD"

python3 - "$DIR/result.json" "$NEW" <<'PY'
import collections, json, sys
r = json.load(open(sys.argv[1]))
failed = r["failed"]
print(f"zero-drop: {r['completed']} streams completed, {len(failed)} failed "
      f"(3 reloads and an upgrade; now served by pid {sys.argv[2]})")
for why, n in collections.Counter(failed).most_common(10):
    print(f"  {n} x {why}")
sys.exit(1 if failed else 0)
PY
