// The official OpenAI JS SDK (npm `openai` 6) against a running demo, with both base URLs:
// models list and retrieve, chat, a stream with usage, embeddings, responses, and the errors
// an application maps (404 model, 403 access, 401 token), and files.list (404 naming /v1
// under the FIRST layout).
// Usage: node scripts/clients/openai-js.mjs [http://127.0.0.1:8080]  (run by scripts/clients.sh)
import OpenAI from "openai";

const base = process.argv[2] ?? "http://127.0.0.1:8080";
const LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct";
const EMBEDDING = "Salesforce/SFR-Embedding-Mistral";
const messages = [{ role: "user", content: "Hello from the OpenAI JS SDK" }];

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} js: ${name}${ok || !detail ? "" : ` (${detail})`}`);
  if (!ok) process.exit(1);
}

async function raises(name, errorClass, call) {
  try {
    await call();
    check(`${name} raises ${errorClass.name}`, false, "no error");
  } catch (e) {
    check(`${name} raises ${errorClass.name} (${e.status})`, e instanceof errorClass, String(e));
    return e;
  }
}

for (const url of [`${base}/v1`, `${base}/resource_server/sophia/vllm/v1`]) {
  const client = new OpenAI({ baseURL: url, apiKey: "demo-alice", maxRetries: 0 });
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  check(`${url}: models.list`, ids.includes(LLAMA) && ids.includes(EMBEDDING), ids.join(", "));
  const one = await client.models.retrieve(LLAMA);
  check(`${url}: models.retrieve`, one.id === LLAMA, JSON.stringify(one));

  const chat = await client.chat.completions.create({ model: LLAMA, messages, max_tokens: 8 });
  check(`${url}: chat`, !!chat.choices[0].message.content && chat.usage.completion_tokens === 8);

  const stream = await client.chat.completions.create({
    model: LLAMA, messages, max_tokens: 8, stream: true, stream_options: { include_usage: true },
  });
  let text = "", chunks = 0, usage = null;
  for await (const c of stream) {
    if (c.choices.length) { text += c.choices[0].delta.content ?? ""; chunks += 1; }
    if (c.usage) usage = c.usage;
  }
  check(`${url}: stream with usage (${chunks} chunks)`,
    chunks >= 8 && text.trim() !== "" && usage?.completion_tokens === 8, JSON.stringify(usage));

  const emb = await client.embeddings.create({ model: EMBEDDING, input: ["a", "b"] });
  check(`${url}: embeddings`, emb.data.length === 2 && emb.data[0].embedding.length > 0);

  const resp = await client.responses.create({ model: LLAMA, input: "Hello", max_output_tokens: 8 });
  check(`${url}: responses`, resp.output_text.length > 0, JSON.stringify(resp));

  await raises(`${url}: an unknown model`, OpenAI.NotFoundError, () =>
    client.chat.completions.create({ model: "no-such-model", messages }));
  const mallory = new OpenAI({ baseURL: url, apiKey: "demo-mallory", maxRetries: 0 });
  await raises(`${url}: a user whose domain is not allowed`, OpenAI.PermissionDeniedError, () =>
    mallory.chat.completions.create({ model: LLAMA, messages }));
  const stranger = new OpenAI({ baseURL: url, apiKey: "made-up-token", maxRetries: 0 });
  await raises(`${url}: a made-up token`, OpenAI.AuthenticationError, () => stranger.models.list());
  if (url.endsWith("/resource_server/sophia/vllm/v1")) {
    const e = await raises(`${url}: files.list (served under /v1)`, OpenAI.NotFoundError, () =>
      client.files.list());
    check(`${url}: ...and the error names the /v1 base`, e.message.includes("/v1 base URL"), e.message);
  } else {
    const files = [];
    for await (const f of client.files.list()) files.push(f);
    check(`${url}: files.list`, Array.isArray(files));
  }
}
console.log("all OpenAI JS SDK checks passed");
