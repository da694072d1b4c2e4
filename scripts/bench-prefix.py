#!/usr/bin/env python3
"""Prefix-affinity benchmark (issue 35): 4 simulated vLLM instances with a prefix cache each,
a workload of many users sharing a few long system prompts, routed by

  - firstgate, `routing: least_in_flight`
  - firstgate, `routing: prefix_affinity`
  - the SGLang router's `cache_aware` policy (PyPI `sglang-router`), if installed

each on fresh simulators. Prints, per router: the simulators' prefix-cache hit rate (their
`vllm:prefix_cache_hits/queries` counters), mean and p99 time to first token seen by the
client, and load spread (max / mean requests per instance). Run by `scripts/bench.sh --prefix`;
standard library only (threads and http.client).

Usage: bench-prefix.py BIN_DIR [--requests N] [--rate R] [--concurrency C] [--prompts P]
                        [--cache-blocks B] [--prefill-us U] [--slack S] [--no-sglang] [--out FILE]
"""

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path, deadline=30.0):
    end = time.time() + deadline
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}{path}")


def get_json(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    return json.loads(c.getresponse().read())


class Sims:
    """Four simulated vLLM instances with a small prefix cache and a prefill cost."""

    def __init__(self, bin_dir, n, blocks, prefill_us):
        self.ports = [free_port() for _ in range(n)]
        self.procs = [
            subprocess.Popen(
                [os.path.join(bin_dir, "firstgate-sim"), "vllm", "--listen", f"127.0.0.1:{p}",
                 "--model", MODEL, "--ttft-ms", "5", "--itl-ms", "2",
                 "--prefill-us-per-token", str(prefill_us),
                 "--prefix-cache-blocks", str(blocks)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in self.ports
        ]
        for p in self.ports:
            wait_http(p, "/health")

    def stats(self):
        return [get_json(p, "/_sim/stats") for p in self.ports]

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def start_gateway(bin_dir, sims, routing, workdir, slack):
    port, admin = free_port(), free_port()
    backends = ", ".join(f"127.0.0.1:{p}" for p in sims.ports)
    config = os.path.join(workdir, f"gateway-{routing}.yaml")
    with open(config, "w") as f:
        f.write(
            f"listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nthreads: 2\n"
            f"server:\n  upgrade_sock: {workdir}/{routing}.sock\n  pid_file: {workdir}/{routing}.pid\n"
            "auth:\n  mode: none\naccess_log:\n  enabled: false\n"
            "limits:\n  requests_per_second: 0\n  ip_requests_per_second: 0\n"
            f"upstream:\n  routing: {routing}\n  metrics_interval: 500ms\n"
            f"  affinity_slack: {slack}\n"
            "clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n"
            f"          - name: {MODEL}\n            backends: [{backends}]\n")
    proc = subprocess.Popen([os.path.join(bin_dir, "firstgate"), "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=open(config + ".log", "w"),
                            env={**os.environ, "RUST_LOG": "warn"})
    wait_http(admin, "/health")
    wait_http(port, "/resource_server/health")
    return proc, port


def start_sglang(sims):
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
           "--port", str(port), "--policy", "cache_aware", "--worker-urls"]
    cmd += [f"http://127.0.0.1:{p}" for p in sims.ports]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/health", deadline=60)
    except RuntimeError:
        proc.terminate()
        raise
    return proc, port


def workload(n, prompts, seed=1):
    """`n` chats from many users sharing `prompts` long system prompts (Zipf-like popularity)."""
    rng = random.Random(seed)
    systems = [
        " ".join(f"policy{p}-rule{i}" for i in range(1000)) for p in range(prompts)
    ]
    weights = [1.0 / (k + 1) for k in range(prompts)]
    out = []
    for i in range(n):
        s = rng.choices(range(prompts), weights)[0]
        user = " ".join(f"user{i}-word{j}" for j in range(30))
        out.append(json.dumps({
            "model": MODEL, "stream": True, "max_tokens": 4,
            "messages": [{"role": "system", "content": systems[s]},
                         {"role": "user", "content": user}],
        }))
    return out


def send(conn, body):
    """One streamed chat; returns (connection to reuse, when its first token came)."""
    try:
        conn.request("POST", "/v1/chat/completions", body,
                     {"content-type": "application/json", "authorization": "Bearer bench"})
        resp = conn.getresponse()
        first = None
        while True:
            line = resp.readline()
            if not line:
                break
            if first is None and b'"content":"tok' in line.replace(b" ", b""):
                first = time.perf_counter()
        if resp.status != 200 or first is None:
            raise RuntimeError(f"status {resp.status}")
        return conn, first
    except Exception:
        conn.close()
        raise


def run(port, bodies, concurrency, rate):
    """Sends the bodies and returns times to first token (s) and errors.

    With `rate` > 0 (open loop, the default) requests are due at Poisson arrival times of that
    many per second, and each time is counted from when its request was due, so waiting for a
    free client is not hidden; `concurrency` only caps the clients. With `rate` 0 (closed loop)
    `concurrency` clients send back to back, which keeps every instance saturated whatever the
    router.
    """
    ttfts, errors, lock = [], [], threading.Lock()
    rng = random.Random(2)
    due, t = [], 0.0
    for _ in bodies:
        due.append(t)
        if rate > 0:
            t += rng.expovariate(rate)
    queue = list(zip(due, bodies))
    origin = time.perf_counter() + 0.1

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if not queue:
                    return
                at, body = queue.pop(0)
            start = origin + at if rate > 0 else time.perf_counter()
            wait = start - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                conn, first = send(conn, body)
                with lock:
                    ttfts.append(first - start)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(e))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttfts, errors


def measure(name, start_router, args, bodies):
    sims = Sims(args.bin_dir, 4, args.cache_blocks, args.prefill_us)
    router = None
    try:
        router, port = start_router(sims)
        before = sims.stats()
        t0 = time.time()
        ttfts, errors = run(port, bodies, args.concurrency, args.rate)
        took = time.time() - t0
        after = sims.stats()
    finally:
        if router is not None:
            router.terminate()
            router.wait()
        sims.stop()
    d = lambda k: [a[k] - b[k] for a, b in zip(after, before)]  # noqa: E731
    queries, hits, reqs = sum(d("prefix_cache_queries")), sum(d("prefix_cache_hits")), d("chat_requests")
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else float("nan")
    return {
        "router": name, "requests": len(ttfts), "errors": len(errors),
        "hit_rate": hits / queries if queries else 0.0,
        "ttft_mean_ms": statistics.mean(ttfts) * 1000 if ttfts else float("nan"),
        "ttft_p99_ms": p99 * 1000,
        "spread": max(reqs) / statistics.mean(reqs) if sum(reqs) else float("nan"),
        "per_instance": reqs, "seconds": took,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin_dir")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64, help="clients (at most)")
    ap.add_argument("--rate", type=float, default=20.0,
                    help="requests per second, Poisson arrivals (0: closed loop)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--cache-blocks", type=int, default=160)
    ap.add_argument("--prefill-us", type=int, default=200)
    ap.add_argument("--slack", type=float, default=2.0, help="upstream.affinity_slack")
    ap.add_argument("--no-sglang", action="store_true")
    ap.add_argument("--out", default="target/bench/prefix.json")
    args = ap.parse_args()
    bodies = workload(args.requests, args.prompts)
    workdir = tempfile.mkdtemp(prefix="fg-prefix-bench-")
    results = []
    for routing in ["least_in_flight", "prefix_affinity"]:
        results.append(measure(f"firstgate {routing}",
                               lambda sims, r=routing: start_gateway(args.bin_dir, sims, r, workdir,
                                                                     args.slack),
                               args, bodies))
    try:
        if args.no_sglang:
            raise RuntimeError("--no-sglang")
        import sglang_router  # noqa: F401
        results.append(measure("sglang-router cache_aware", start_sglang, args, bodies))
    except Exception as e:  # noqa: BLE001 - the table says why it is missing
        print(f"sglang-router not measured: {e}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    load = f"{args.rate:g} requests/s (Poisson)" if args.rate > 0 else "closed loop"
    print(f"{args.requests} requests, {load}, {args.concurrency} clients, {args.prompts} system prompts "
          f"of ~1000 tokens, 4 instances of {args.cache_blocks} blocks, "
          f"{args.prefill_us} us prefill per uncached token, affinity_slack {args.slack}")
    print("| router | hit rate | TTFT mean | TTFT p99 | spread (max/mean) | errors |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['router']} | {r['hit_rate']:.1%} | {r['ttft_mean_ms']:.0f} ms | "
              f"{r['ttft_p99_ms']:.0f} ms | {r['spread']:.2f} {r['per_instance']} | {r['errors']} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
