//! Building OpenAI streams: a finished completion as the server-sent events a streaming
//! backend would have sent (the cold path gets whole completions from Globus Compute).

use crate::config::Endpoint;
use serde_json::{json, Value};

/// The SSE events of `completion` (`chat.completion.chunk`s, or `text_completion`s), the usage
/// chunk last when `include_usage`; without the closing `data: [DONE]`.
pub fn completion_events(completion: &Value, endpoint: Endpoint, include_usage: bool) -> String {
    let c = completion;
    let chat = endpoint == Endpoint::ChatCompletions;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let base = |choices: Value| {
        json!({"id": c["id"], "object": object, "created": c["created"], "model": c["model"],
               "choices": choices})
    };
    let mut out = String::new();
    let mut push = |v: Value| out.push_str(&format!("data: {v}\n\n"));
    for (i, choice) in c["choices"].as_array().into_iter().flatten().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        if chat {
            let msg = &choice["message"];
            push(base(
                json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": null, "finish_reason": null}]),
            ));
            let mut delta = json!({"content": msg["content"]});
            if msg
                .get("tool_calls")
                .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
            {
                delta["tool_calls"] = msg["tool_calls"].clone();
            }
            push(base(
                json!([{"index": index, "delta": delta, "logprobs": null,
                              "finish_reason": choice["finish_reason"]}]),
            ));
        } else {
            push(base(
                json!([{"index": index, "text": choice["text"], "logprobs": null,
                              "finish_reason": choice["finish_reason"]}]),
            ));
        }
    }
    if include_usage && !c["usage"].is_null() {
        let mut last = base(json!([]));
        last["usage"] = c["usage"].clone();
        push(last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_becomes_chunks() {
        let c = json!({"id": "x", "created": 1, "model": "m", "usage": {"total_tokens": 3},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]});
        let sse = completion_events(&c, Endpoint::ChatCompletions, true);
        let events: Vec<Value> = sse
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[2]["usage"]["total_tokens"], 3);
    }
}
