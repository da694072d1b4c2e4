#!/usr/bin/env python3
"""Checks a running demo with the official OpenAI Python SDK (pip install openai 'httpx[http2]').

Usage: scripts/smoke_openai.py [http://127.0.0.1:8080] [https://127.0.0.1:8443 CA_FILE]
Exercises both URL layouts (models list and retrieve, streamed and non-streamed chat,
completions, embeddings, responses, the NotFoundError an unknown model must raise), the Batch
API (upload, create, poll, download; under the FIRST layout a NotFoundError naming /v1), and the demo users: demo-alice
succeeds, demo-bob and demo-mallory get PermissionDeniedError, demo-expired, a made-up token
and no token get AuthenticationError. Exits non-zero on failure.
"""
import json
import sys
import time
import urllib.error
import urllib.request

import openai
from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
https_base = sys.argv[2] if len(sys.argv) > 2 else "https://127.0.0.1:8443"
ca_file = sys.argv[3] if len(sys.argv) > 3 else "/tmp/firstgate-demo-tls/ca.pem"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"
MESSAGES = [{"role": "user", "content": "Hello from the OpenAI SDK"}]


def check(name, cond):
    print(("ok   " if cond else "FAIL ") + name)
    if not cond:
        sys.exit(1)


EMBEDDING = "Salesforce/SFR-Embedding-Mistral"
for url in (f"{base}/resource_server/sophia/vllm/v1", f"{base}/v1"):
    client = OpenAI(base_url=url, api_key="demo-alice", max_retries=0)
    ids = [m.id for m in client.models.list()]
    check(f"{url}: models list", LLAMA in ids and EMBEDDING in ids)
    check(f"{url}: models retrieve", client.models.retrieve(LLAMA).id == LLAMA)
    emb = client.embeddings.create(model=EMBEDDING, input=["a", "b"])
    check(f"{url}: embeddings", len(emb.data) == 2 and len(emb.data[0].embedding) > 0)
    answer = client.responses.create(model=LLAMA, input="Hello", max_output_tokens=8)
    check(f"{url}: responses", bool(answer.output_text) and answer.usage.output_tokens == 8)
    resp = client.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=8)
    check(f"{url}: chat", bool(resp.choices[0].message.content) and resp.usage.completion_tokens == 8)

    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=8, stream=True)
        if c.choices
    ]
    check(f"{url}: streamed chat ({len(pieces)} chunks)", len(pieces) >= 8 and "".join(pieces).strip())

    comp = client.completions.create(model="llama-3.1-8b", prompt="Once upon a time", max_tokens=4)
    check(f"{url}: completions via alias", comp.choices[0].text.count("tok") == 4)

    try:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        check(f"{url}: unknown model raises NotFoundError", False)
    except openai.NotFoundError as e:
        check(f"{url}: unknown model raises NotFoundError ({e.code})", "no-such-model" in str(e))

client = OpenAI(base_url=f"{base}/v1", api_key="demo-alice", max_retries=0)
ids = [m.id for m in client.models.list()]
check(f"models list on /v1 has every cluster's {ids}", LLAMA in ids and "gpt-oss-120b" in ids)
metis = OpenAI(base_url=f"{base}/resource_server/metis/api/v1", api_key="demo-alice", max_retries=0)
out = metis.chat.completions.create(model="gpt-oss-120b", messages=MESSAGES, max_tokens=3)
check("metis direct API behind its own key", out.choices[0].message.content.count("tok") == 3)


def refused(name, api_key, model, error):
    client = OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)
    try:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        check(f"{name} raises {error.__name__}", False)
    except error as e:
        check(f"{name} raises {error.__name__} ({e.status_code})", True)


refused("demo-bob on the restricted gpt-oss-120b", "demo-bob", "gpt-oss-120b", openai.PermissionDeniedError)
bob = OpenAI(base_url=f"{base}/v1", api_key="demo-bob", max_retries=0)
check("demo-bob may use Llama", bool(bob.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=2).choices))
refused("demo-mallory (domain not allowed)", "demo-mallory", LLAMA, openai.PermissionDeniedError)
refused("demo-expired", "demo-expired", LLAMA, openai.AuthenticationError)
refused("a made-up token", "made-up-token", LLAMA, openai.AuthenticationError)
# The SDK insists on an api_key; send the request without any Authorization header instead.
req = urllib.request.Request(
    f"{base}/v1/chat/completions",
    data=json.dumps({"model": LLAMA, "messages": MESSAGES}).encode(),
    headers={"Content-Type": "application/json"},
)
try:
    urllib.request.urlopen(req)
    check("no token gets 401", False)
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    check(f"no token gets 401 ({e.code})", e.code == 401 and body["error"]["type"] == "authentication_error")
# The cold model: answered through Globus Compute until its instance is up, then directly.
alice = OpenAI(base_url=f"{base}/v1", api_key="demo-alice", max_retries=0, timeout=120)
routes = []
deadline = time.time() + 60
while time.time() < deadline:
    raw = alice.chat.completions.with_raw_response.create(
        model="llama-3.3-70b", messages=MESSAGES, max_tokens=3, stream=bool(len(routes) % 2))
    routes.append(raw.headers.get("x-firstgate-route"))
    raw.parse()
    if routes[-1] == "direct":
        break
    time.sleep(0.5)
check(f"cold model served via {' -> '.join(routes)}", routes and routes[-1] == "direct")

# The OpenAI Batch API: upload, create, poll until completed, download the output.
import io  # noqa: E402

lines = [json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": LLAMA, "max_tokens": 4,
                              "messages": [{"role": "user", "content": f"batch line {i}"}]}})
         for i in range(8)]
upload = alice.files.create(file=("input.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
deadline = time.time() + 60
while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
    time.sleep(0.5)
    batch = alice.batches.retrieve(batch.id)
check(f"batch {batch.id} completed ({batch.request_counts})",
      batch.status == "completed" and batch.request_counts.completed == 8)
output = [json.loads(line) for line in alice.files.content(batch.output_file_id).text.splitlines()]
check("one output line per input line, by custom_id",
      sorted(o["custom_id"] for o in output) == sorted(f"line-{i}" for i in range(8))
      and all(o["response"]["status_code"] == 200 for o in output))
check("the batch is listed", any(b.id == batch.id for b in alice.batches.list()))
try:
    OpenAI(base_url=f"{base}/resource_server/sophia/vllm/v1", api_key="demo-alice",
           max_retries=0).files.list()
    check("files under a FIRST-layout base raise NotFoundError", False)
except openai.NotFoundError as e:
    check("files under a FIRST-layout base raise NotFoundError naming /v1", "/v1 base URL" in str(e))

# HTTPS with HTTP/2 (ALPN), and HTTP/1.1 for clients without it; the demo CA must be trusted.
import httpx  # noqa: E402  (the OpenAI SDK's own HTTP client)

for http2, version in ((True, "HTTP/2"), (False, "HTTP/1.1")):
    tls = OpenAI(base_url=f"{https_base}/v1", api_key="demo-alice", max_retries=0,
                 http_client=httpx.Client(http2=http2, verify=ca_file))
    raw = tls.chat.completions.with_raw_response.create(model=LLAMA, messages=MESSAGES, max_tokens=4)
    got = raw.http_response.http_version
    check(f"{https_base}: chat over {got}", got == version and raw.parse().usage.completion_tokens == 4)
    pieces = [c.choices[0].delta.content or ""
              for c in tls.chat.completions.create(model=LLAMA, messages=MESSAGES, max_tokens=6, stream=True)
              if c.choices]
    check(f"{https_base}: streamed chat over {version} ({len(pieces)} chunks)", len(pieces) >= 6)
try:
    OpenAI(base_url=f"{https_base}/v1", api_key="demo-alice", max_retries=0).models.list()
    check("a client that does not trust the demo CA is refused", False)
except openai.APIConnectionError:
    check("a client that does not trust the demo CA is refused", True)
print("all OpenAI SDK checks passed")
