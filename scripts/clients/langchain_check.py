#!/usr/bin/env python3
"""LangChain's ChatOpenAI and OpenAIEmbeddings (langchain-openai) against a running demo, with
both base URLs: chat, a stream with usage, embeddings, and the errors LangChain passes through.

Usage: scripts/clients/langchain_check.py [http://127.0.0.1:8080]  (run by scripts/clients.sh)
"""
import sys

import openai
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"
EMBEDDING = "Salesforce/SFR-Embedding-Mistral"


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + "langchain: " + name + ("" if cond or not detail else f" ({detail})"))
    if not cond:
        sys.exit(1)


def raises(name, error, call):
    try:
        call()
        check(f"{name} raises {error.__name__}", False, "no error")
    except error as e:
        check(f"{name} raises {error.__name__} ({e.status_code})", True)


for url in (f"{base}/v1", f"{base}/resource_server/sophia/vllm/v1"):
    llm = ChatOpenAI(base_url=url, api_key="demo-alice", model=LLAMA, max_tokens=8, max_retries=0)
    msg = llm.invoke("Hello from LangChain")
    check(f"{url}: invoke", bool(msg.content) and msg.usage_metadata["output_tokens"] == 8, repr(msg))

    streaming = ChatOpenAI(base_url=url, api_key="demo-alice", model=LLAMA, max_tokens=8,
                           max_retries=0, stream_usage=True)
    chunks = list(streaming.stream("Hello from LangChain"))
    text = "".join(c.content for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    check(f"{url}: stream with usage ({len(chunks)} chunks)",
          len(chunks) >= 8 and text.strip() != "" and usage and usage[-1]["output_tokens"] == 8, repr(usage))

    # Without the context-length check, which would fetch a tiktoken vocabulary from the internet.
    emb = OpenAIEmbeddings(base_url=url, api_key="demo-alice", model=EMBEDDING,
                           check_embedding_ctx_length=False, max_retries=0)
    vectors = emb.embed_documents(["a", "b"])
    check(f"{url}: embed_documents", len(vectors) == 2 and len(vectors[0]) > 0)

    unknown = ChatOpenAI(base_url=url, api_key="demo-alice", model="no-such-model", max_retries=0)
    raises(f"{url}: an unknown model", openai.NotFoundError, lambda: unknown.invoke("Hello"))
    mallory = ChatOpenAI(base_url=url, api_key="demo-mallory", model=LLAMA, max_retries=0)
    raises(f"{url}: a user whose domain is not allowed", openai.PermissionDeniedError,
           lambda: mallory.invoke("Hello"))
print("all LangChain checks passed")
