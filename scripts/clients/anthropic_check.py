#!/usr/bin/env python3
"""The official Anthropic Python SDK (PyPI `anthropic` 2) against a running demo, with both base
URLs (`BASE`, to which the SDK adds /v1/messages, and FIRST's `BASE/resource_server/sophia/vllm`):
messages.create, both ways of streaming (the messages.stream helper and create(stream=True)),
count_tokens, the three ways a client sends its token (api_key and auth_token, both sent by this
SDK as `Authorization: Bearer`, and the `x-api-key` header of older clients), and the errors an
application maps: each status with its exception class and Anthropic's error envelope.

Also compares the answers (JSON and streamed) with those of vLLM reached directly.

Usage: scripts/clients/anthropic_check.py [BASE [VLLM_URL]]  (run by scripts/clients.sh; BASE
defaults to the demo's http://127.0.0.1:8080 and VLLM_URL then to its sophia instance)
"""
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

# The clients get only what this script passes: no key, token, base URL, headers or profile
# from the environment or from ~/.config/anthropic (an empty home: ANTHROPIC_CONFIG_DIR would
# make a missing profile an error).
for name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
    del os.environ[name]
os.environ["HOME"] = os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="anthropic-check-")

import anthropic  # noqa: E402
from anthropic import Anthropic  # noqa: E402

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
# vLLM itself, to compare answers with: the demo's sophia instance unless told otherwise ("" skips).
direct = sys.argv[2] if len(sys.argv) > 2 else ("http://127.0.0.1:18001" if len(sys.argv) < 2 else "")
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"
RESTRICTED = "gpt-oss-120b"  # on metis; demo-bob is not in the group it needs
MESSAGES = [{"role": "user", "content": "Hello from the Anthropic SDK"}]
# Anthropic's error envelope: {"type": "error", "error": {"type": ..., "message": ...}}.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
STREAM_ORDER = ["message_start", "content_block_start", "content_block_delta",
                "content_block_stop", "message_delta", "message_stop"]


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + "anthropic: " + name + ("" if cond or not detail else f" ({detail})"))
    if not cond:
        sys.exit(1)


def client(url, **credentials):
    return Anthropic(base_url=url, max_retries=0, **credentials)


def envelope_of(status, body):
    """Whether `body` is Anthropic's error envelope with the type of `status`."""
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and body.get("type") == "error"
            and error.get("type") == ERROR_TYPES.get(status)
            and isinstance(error.get("message"), str) and error["message"] != "")


def raises(name, error, call, says=None):
    """`call` raises `error` with Anthropic's envelope, its message in the exception's."""
    time.sleep(0.1)  # the demo users' limit is 10 requests per second (burst 10)
    try:
        call()
    except anthropic.APIStatusError as e:
        said = e.body["error"]["message"] if envelope_of(e.status_code, e.body) else None
        check(f"{name} raises {error.__name__} ({e.status_code} {ERROR_TYPES.get(e.status_code)})",
              isinstance(e, error) and said is not None and said in e.message
              and (says is None or says in said),
              f"{type(e).__name__}: {e.message}; body {e.body!r}")
        return e
    except anthropic.AnthropicError as e:
        check(f"{name} raises {error.__name__}", False, f"{type(e).__name__}: {e}")
    check(f"{name} raises {error.__name__}", False, "no error")


def raw_post(url, body, headers):
    """POST without the SDK (what it refuses to send); (status, parsed body or text)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def is_answer(msg, tokens):
    return (msg.type == "message" and msg.role == "assistant" and len(msg.content) > 0
            and msg.content[0].type == "text" and msg.content[0].text != ""
            and msg.stop_reason == "max_tokens"
            and msg.usage.input_tokens > 0 and msg.usage.output_tokens == tokens)


# What the demo offers where (FIRST's listing): sophia's vLLM serves the Messages API.
req = urllib.request.Request(f"{base}/resource_server/list-endpoints",
                             headers={"Authorization": "Bearer demo-alice"})
with urllib.request.urlopen(req, timeout=30) as r:
    listing = json.loads(r.read())["clusters"]
vllm = listing["sophia"]["frameworks"]["vllm"]
check("list-endpoints: sophia/vllm offers /v1/messages", "/v1/messages" in vllm["endpoints"],
      repr(vllm["endpoints"]))
metis_offers = "/v1/messages" in listing.get("metis", {}).get("frameworks", {}).get("api", {}).get("endpoints", [])

for url in (base, f"{base}/resource_server/sophia/vllm"):
    # The credential three ways; each answer with the headers the SDK sent.
    ways = [
        ("api_key", {"api_key": "demo-alice"}, "authorization", "Bearer demo-alice"),
        ("auth_token", {"auth_token": "demo-alice"}, "authorization", "Bearer demo-alice"),
        # Older SDKs and curl examples: `x-api-key` with anthropic-version 2023-06-01.
        ("x-api-key header", {"default_headers": {"x-api-key": "demo-alice",
                                                  "anthropic-version": "2023-06-01"}},
         "x-api-key", "demo-alice"),
    ]
    for way, credentials, header, value in ways:
        raw = client(url, **credentials).messages.with_raw_response.create(
            model=LLAMA, max_tokens=8, messages=MESSAGES)
        msg = raw.parse()
        sent = raw.http_request.headers
        other = "x-api-key" if header == "authorization" else "authorization"
        check(f"{url}: messages.create with {way} (sent {header}, anthropic-version {sent.get('anthropic-version')})",
              sent.get(header) == value and other not in sent and is_answer(msg, 8), repr(msg))

    alice = client(url, api_key="demo-alice")
    aliased = alice.messages.create(model="llama-3.1-8b", max_tokens=4, messages=MESSAGES)
    check(f"{url}: messages.create via the alias llama-3.1-8b", is_answer(aliased, 4), repr(aliased))

    with alice.messages.stream(model=LLAMA, max_tokens=8, messages=MESSAGES) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    check(f"{url}: messages.stream ({len(pieces)} text pieces)",
          len(pieces) > 0 and is_answer(final, 8) and "".join(pieces) == final.content[0].text,
          f"{pieces!r} {final!r}")

    events = list(alice.messages.create(model=LLAMA, max_tokens=8, messages=MESSAGES, stream=True))
    kinds = [e.type for e in events]
    order = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    start = next((e for e in events if e.type == "message_start"), None)
    delta = next((e for e in events if e.type == "message_delta"), None)
    check(f"{url}: create(stream=True) events in order ({kinds.count('content_block_delta')} deltas)",
          order == STREAM_ORDER and start.message.usage.input_tokens > 0
          and delta.usage.output_tokens == 8 and delta.delta.stop_reason == "max_tokens", repr(kinds))

    # The same answers as from vLLM directly (the demo's sophia instance; its text is
    # deterministic): the message, and the streamed events' kinds, text and usage.
    if direct:
        vllm_direct = client(direct, api_key="unused")
        ours = alice.messages.create(model=LLAMA, max_tokens=8, messages=MESSAGES)
        theirs = vllm_direct.messages.create(model=LLAMA, max_tokens=8, messages=MESSAGES)
        same = lambda m: (m.type, m.role, [b.model_dump() for b in m.content], m.stop_reason, m.usage.model_dump())  # noqa: E731
        check(f"{url}: messages.create answers as vLLM does directly", same(ours) == same(theirs),
              f"{same(ours)!r} != {same(theirs)!r}")
        flow = lambda evs: [(e.type, e.model_dump(exclude={"message": {"id"}})) for e in evs]  # noqa: E731
        ours = flow(alice.messages.create(model=LLAMA, max_tokens=8, messages=MESSAGES, stream=True))
        theirs = flow(vllm_direct.messages.create(model=LLAMA, max_tokens=8, messages=MESSAGES, stream=True))
        check(f"{url}: create(stream=True) streams the events vLLM streams directly", ours == theirs,
              f"{ours!r} != {theirs!r}")

    counted = alice.messages.count_tokens(model=LLAMA, messages=MESSAGES)
    check(f"{url}: messages.count_tokens ({counted.input_tokens} input tokens; create said "
          f"{msg.usage.input_tokens})", counted.input_tokens > 0, repr(counted))

    # 400: a body the API refuses. The SDK will not send a request without max_tokens (a
    # TypeError before any request), so post it through the client's own post().
    raises(f"{url}: a request without max_tokens", anthropic.BadRequestError,
           lambda: alice.post("/v1/messages", cast_to=anthropic.types.Message,
                              body={"model": LLAMA, "messages": MESSAGES}), says="max_tokens")
    raises(f"{url}: messages that are not a list", anthropic.BadRequestError,
           lambda: alice.post("/v1/messages", cast_to=anthropic.types.Message,
                              body={"model": LLAMA, "max_tokens": 8, "messages": "Hello"}))
    raises(f"{url}: max_tokens 0", anthropic.BadRequestError,
           lambda: alice.messages.create(model=LLAMA, max_tokens=0, messages=MESSAGES), says="max_tokens")
    status, body = raw_post(f"{url}/v1/messages", {"model": LLAMA, "messages": MESSAGES},
                            {"Authorization": "Bearer demo-alice"})
    check(f"{url}: without max_tokens (raw HTTP) 400 in Anthropic's envelope",
          status == 400 and envelope_of(400, body), f"{status} {body!r}")

    # 401: who are you.
    status, body = raw_post(f"{url}/v1/messages", {"model": LLAMA, "max_tokens": 8, "messages": MESSAGES}, {})
    check(f"{url}: no credentials (raw HTTP) 401 in Anthropic's envelope",
          status == 401 and envelope_of(401, body), f"{status} {body!r}")
    create = dict(model=LLAMA, max_tokens=8, messages=MESSAGES)
    raises(f"{url}: a made-up api_key", anthropic.AuthenticationError,
           lambda: client(url, api_key="tok-nope").messages.create(**create))
    raises(f"{url}: a made-up x-api-key", anthropic.AuthenticationError,
           lambda: client(url, default_headers={"x-api-key": "tok-nope"}).messages.create(**create))
    raises(f"{url}: demo-expired as auth_token", anthropic.AuthenticationError,
           lambda: client(url, auth_token="demo-expired").messages.create(**create))
    raises(f"{url}: demo-expired on count_tokens", anthropic.AuthenticationError,
           lambda: client(url, api_key="demo-expired").messages.count_tokens(model=LLAMA, messages=MESSAGES))

    # 403: you may not (example.com is not an allowed domain).
    raises(f"{url}: demo-mallory", anthropic.PermissionDeniedError,
           lambda: client(url, api_key="demo-mallory").messages.create(**create))

    # 404: no such model, also before a stream starts and when counting.
    raises(f"{url}: an unknown model", anthropic.NotFoundError,
           lambda: alice.messages.create(**{**create, "model": "no-such-model"}), says="no-such-model")

    def stream_unknown():
        with alice.messages.stream(**{**create, "model": "no-such-model"}) as s:
            s.until_done()
    raises(f"{url}: an unknown model, streamed", anthropic.NotFoundError, stream_unknown)
    raises(f"{url}: count_tokens of an unknown model", anthropic.NotFoundError,
           lambda: alice.messages.count_tokens(model="no-such-model", messages=MESSAGES))

# The restricted model, federated and under its cluster's FIRST base URL: a model the user may
# not use is 403 before the gateway looks at the endpoint.
for url in (base, f"{base}/resource_server/metis/api"):
    create = dict(model=RESTRICTED, max_tokens=8, messages=MESSAGES)
    raises(f"{url}: demo-bob on {RESTRICTED}", anthropic.PermissionDeniedError,
           lambda: client(url, api_key="demo-bob").messages.create(**create))
    if metis_offers:
        print(f"skip anthropic: {url}: {RESTRICTED} offers /v1/messages, no endpoint refusal to check")
    else:
        # A model the user may use, on a framework without the Messages API: 400.
        raises(f"{url}: demo-alice on {RESTRICTED} (no /v1/messages there)", anthropic.BadRequestError,
               lambda: client(url, api_key="demo-alice").messages.create(**create))

# 429: demo-bob is not spared the per-user limit (10 requests per second, a burst of 10).
bob = client(base, api_key="demo-bob")
limited = None
for _ in range(40):
    try:
        bob.messages.count_tokens(model=LLAMA, messages=MESSAGES)
    except anthropic.RateLimitError as e:
        limited = e
        break
    except anthropic.AnthropicError as e:
        check("demo-bob's count_tokens before the rate limit", False, f"{type(e).__name__}: {e}")
check("demo-bob over the per-user rate raises RateLimitError (429 rate_limit_error) with retry-after",
      limited is not None and envelope_of(429, limited.body)
      and limited.response.headers.get("retry-after", "").isdigit(),
      "no 429 in 40 requests" if limited is None else f"{limited.message} {dict(limited.response.headers)}")
time.sleep(int(limited.response.headers["retry-after"]))  # leave demo-bob unlimited for what runs next
print("all Anthropic Python SDK checks passed")
