// The official Anthropic JS SDK (npm `@anthropic-ai/sdk` 1) against a running demo, with both base
// URLs (BASE, to which the SDK adds /v1/messages, and FIRST's BASE/resource_server/sophia/vllm):
// messages.create, both ways of streaming (messages.stream with on('text') and finalMessage(),
// and create({stream: true})), countTokens, the three ways a client sends its token (apiKey and
// authToken, both sent by this SDK as `Authorization: Bearer`, and the `x-api-key` header of
// older clients), and the errors an application maps: each status with its error class and
// Anthropic's error envelope.
// Usage: node scripts/clients/anthropic-js.mjs [http://127.0.0.1:8080]  (run by scripts/clients.sh)
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Anthropic from "@anthropic-ai/sdk";

// The clients get only what this script passes: no key, token, base URL, headers or profile
// from the environment or from ~/.config/anthropic (read when a client is made, not on import;
// an empty home, as ANTHROPIC_CONFIG_DIR would make a missing profile an error).
for (const name of Object.keys(process.env)) if (name.startsWith("ANTHROPIC_")) delete process.env[name];
process.env.HOME = process.env.XDG_CONFIG_HOME = mkdtempSync(join(tmpdir(), "anthropic-js-"));

const base = process.argv[2] ?? "http://127.0.0.1:8080";
const LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct";
const RESTRICTED = "gpt-oss-120b"; // on metis; demo-bob is not in the group it needs
const messages = [{ role: "user", content: "Hello from the Anthropic JS SDK" }];
// Anthropic's error envelope: {"type": "error", "error": {"type": ..., "message": ...}}.
const ERROR_TYPES = {
  400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
  404: "not_found_error", 429: "rate_limit_error",
};
const STREAM_ORDER = ["message_start", "content_block_start", "content_block_delta",
  "content_block_stop", "message_delta", "message_stop"];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} anthropic-js: ${name}${ok || !detail ? "" : ` (${detail})`}`);
  if (!ok) process.exit(1);
}

// A client that keeps the headers of its last request in `client.sent`.
function client(url, options) {
  const sent = {};
  const c = new Anthropic({
    baseURL: url, maxRetries: 0, ...options,
    fetch: (input, init) => {
      sent.headers = new Headers(init?.headers);
      return fetch(input, init);
    },
  });
  c.sent = sent;
  return c;
}
// Only the `x-api-key` header (no apiKey or authToken, none from the environment).
const xApiKey = (url, key) => client(url, {
  apiKey: null, authToken: null,
  defaultHeaders: { "x-api-key": key, "anthropic-version": "2023-06-01" },
});

function envelopeOf(status, body) {
  const error = body?.error;
  return body?.type === "error" && error?.type === ERROR_TYPES[status]
    && typeof error?.message === "string" && error.message !== "";
}

// `call` rejects with `errorClass`, Anthropic's envelope in e.error, its message in e.message.
async function raises(name, errorClass, call, says) {
  await sleep(100); // the demo users' limit is 10 requests per second (burst 10)
  try {
    await call();
  } catch (e) {
    const said = e instanceof Anthropic.APIError && envelopeOf(e.status, e.error) ? e.error.error.message : null;
    check(`${name} raises ${errorClass.name} (${e.status} ${ERROR_TYPES[e.status]})`,
      e instanceof errorClass && said !== null && e.message.includes(said)
      && (says === undefined || said.includes(says)),
      `${e.constructor.name}: ${e.message}; body ${JSON.stringify(e.error)}`);
    return e;
  }
  check(`${name} raises ${errorClass.name}`, false, "no error");
}

// POST without the SDK; [status, parsed body or text].
async function rawPost(url, body, headers) {
  const r = await fetch(url, {
    method: "POST", body: JSON.stringify(body),
    headers: { "content-type": "application/json", "anthropic-version": "2023-06-01", ...headers },
  });
  const text = await r.text();
  try { return [r.status, JSON.parse(text)]; } catch { return [r.status, text]; }
}

function isAnswer(msg, tokens) {
  return msg.type === "message" && msg.role === "assistant" && msg.content.length > 0
    && msg.content[0].type === "text" && msg.content[0].text !== ""
    && msg.stop_reason === "max_tokens"
    && msg.usage.input_tokens > 0 && msg.usage.output_tokens === tokens;
}

// What the demo offers where (FIRST's listing): sophia's vLLM serves the Messages API.
const listing = (await (await fetch(`${base}/resource_server/list-endpoints`, {
  headers: { Authorization: "Bearer demo-alice" },
})).json()).clusters;
const vllmEndpoints = listing.sophia.frameworks.vllm.endpoints;
check("list-endpoints: sophia/vllm offers /v1/messages", vllmEndpoints.includes("/v1/messages"),
  JSON.stringify(vllmEndpoints));
const metisOffers = (listing.metis?.frameworks?.api?.endpoints ?? []).includes("/v1/messages");

for (const url of [base, `${base}/resource_server/sophia/vllm`]) {
  const create = { model: LLAMA, max_tokens: 8, messages };
  // The credential three ways; each answer with the headers the SDK sent.
  const ways = [
    ["apiKey", client(url, { apiKey: "demo-alice" }), "authorization", "Bearer demo-alice"],
    ["authToken", client(url, { authToken: "demo-alice" }), "authorization", "Bearer demo-alice"],
    // Older SDKs and curl examples: `x-api-key` with anthropic-version 2023-06-01.
    ["x-api-key header", xApiKey(url, "demo-alice"), "x-api-key", "demo-alice"],
  ];
  let msg;
  for (const [way, c, header, value] of ways) {
    msg = await c.messages.create(create);
    const sent = c.sent.headers;
    const other = header === "authorization" ? "x-api-key" : "authorization";
    check(`${url}: messages.create with ${way} (sent ${header}, anthropic-version ${sent.get("anthropic-version")})`,
      sent.get(header) === value && !sent.has(other) && isAnswer(msg, 8), JSON.stringify(msg));
  }

  const alice = client(url, { apiKey: "demo-alice" });
  const aliased = await alice.messages.create({ ...create, model: "llama-3.1-8b", max_tokens: 4 });
  check(`${url}: messages.create via the alias llama-3.1-8b`, isAnswer(aliased, 4), JSON.stringify(aliased));

  const pieces = [];
  const final = await alice.messages.stream(create).on("text", (delta) => pieces.push(delta)).finalMessage();
  check(`${url}: messages.stream (${pieces.length} text pieces)`,
    pieces.length > 0 && isAnswer(final, 8) && pieces.join("") === final.content[0].text,
    `${JSON.stringify(pieces)} ${JSON.stringify(final)}`);

  const events = [];
  for await (const e of await alice.messages.create({ ...create, stream: true })) events.push(e);
  const kinds = events.map((e) => e.type);
  const order = kinds.filter((k, i) => i === 0 || k !== kinds[i - 1]);
  const start = events.find((e) => e.type === "message_start");
  const delta = events.find((e) => e.type === "message_delta");
  check(`${url}: create({stream: true}) events in order (${kinds.filter((k) => k === "content_block_delta").length} deltas)`,
    JSON.stringify(order) === JSON.stringify(STREAM_ORDER) && start.message.usage.input_tokens > 0
    && delta.usage.output_tokens === 8 && delta.delta.stop_reason === "max_tokens", JSON.stringify(kinds));

  const counted = await alice.messages.countTokens({ model: LLAMA, messages });
  check(`${url}: messages.countTokens (${counted.input_tokens} input tokens; create said ${msg.usage.input_tokens})`,
    counted.input_tokens > 0, JSON.stringify(counted));

  // 400: a body the API refuses (this SDK sends what it is given).
  await raises(`${url}: a request without max_tokens`, Anthropic.BadRequestError,
    () => alice.messages.create({ model: LLAMA, messages }), "max_tokens");
  await raises(`${url}: messages that are not a list`, Anthropic.BadRequestError,
    () => alice.messages.create({ ...create, messages: "Hello" }));
  await raises(`${url}: max_tokens 0`, Anthropic.BadRequestError,
    () => alice.messages.create({ ...create, max_tokens: 0 }), "max_tokens");
  let [status, body] = await rawPost(`${url}/v1/messages`, { model: LLAMA, messages },
    { Authorization: "Bearer demo-alice" });
  check(`${url}: without max_tokens (raw HTTP) 400 in Anthropic's envelope`,
    status === 400 && envelopeOf(400, body), `${status} ${JSON.stringify(body)}`);

  // 401: who are you.
  [status, body] = await rawPost(`${url}/v1/messages`, create, {});
  check(`${url}: no credentials (raw HTTP) 401 in Anthropic's envelope`,
    status === 401 && envelopeOf(401, body), `${status} ${JSON.stringify(body)}`);
  await raises(`${url}: a made-up apiKey`, Anthropic.AuthenticationError,
    () => client(url, { apiKey: "tok-nope" }).messages.create(create));
  await raises(`${url}: a made-up x-api-key`, Anthropic.AuthenticationError,
    () => xApiKey(url, "tok-nope").messages.create(create));
  await raises(`${url}: demo-expired as authToken`, Anthropic.AuthenticationError,
    () => client(url, { authToken: "demo-expired" }).messages.create(create));
  await raises(`${url}: demo-expired on countTokens`, Anthropic.AuthenticationError,
    () => client(url, { apiKey: "demo-expired" }).messages.countTokens({ model: LLAMA, messages }));

  // 403: you may not (example.com is not an allowed domain).
  await raises(`${url}: demo-mallory`, Anthropic.PermissionDeniedError,
    () => client(url, { apiKey: "demo-mallory" }).messages.create(create));

  // 404: no such model, also before a stream starts and when counting.
  const unknown = { ...create, model: "no-such-model" };
  await raises(`${url}: an unknown model`, Anthropic.NotFoundError,
    () => alice.messages.create(unknown), "no-such-model");
  await raises(`${url}: an unknown model, streamed`, Anthropic.NotFoundError,
    () => alice.messages.stream(unknown).finalMessage());
  await raises(`${url}: countTokens of an unknown model`, Anthropic.NotFoundError,
    () => alice.messages.countTokens({ model: "no-such-model", messages }));
}

// The restricted model, federated and under its cluster's FIRST base URL: a model the user may
// not use is 403 before the gateway looks at the endpoint.
for (const url of [base, `${base}/resource_server/metis/api`]) {
  const create = { model: RESTRICTED, max_tokens: 8, messages };
  await raises(`${url}: demo-bob on ${RESTRICTED}`, Anthropic.PermissionDeniedError,
    () => client(url, { apiKey: "demo-bob" }).messages.create(create));
  if (metisOffers) {
    console.log(`skip anthropic-js: ${url}: ${RESTRICTED} offers /v1/messages, no endpoint refusal to check`);
  } else {
    // A model the user may use, on a framework without the Messages API: 400.
    await raises(`${url}: demo-alice on ${RESTRICTED} (no /v1/messages there)`, Anthropic.BadRequestError,
      () => client(url, { apiKey: "demo-alice" }).messages.create(create));
  }
}

// 429: demo-bob is not spared the per-user limit (10 requests per second, a burst of 10).
const bob = client(base, { apiKey: "demo-bob" });
let limited = null;
for (let i = 0; i < 40 && !limited; i++) {
  try {
    await bob.messages.countTokens({ model: LLAMA, messages });
  } catch (e) {
    if (!(e instanceof Anthropic.RateLimitError)) {
      check("demo-bob's countTokens before the rate limit", false, `${e.constructor.name}: ${e.message}`);
    }
    limited = e;
  }
}
const retryAfter = limited?.headers?.get("retry-after") ?? "";
check("demo-bob over the per-user rate raises RateLimitError (429 rate_limit_error) with retry-after",
  limited !== null && envelopeOf(429, limited.error) && /^\d+$/.test(retryAfter),
  limited === null ? "no 429 in 40 requests" : `${limited.message} retry-after: ${retryAfter}`);
await sleep(Number(retryAfter) * 1000); // leave demo-bob unlimited for what runs next
console.log("all Anthropic JS SDK checks passed");
