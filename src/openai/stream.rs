//! Building OpenAI streams: a finished completion as the server-sent events a streaming
//! backend would have sent (the cold path gets whole completions from Globus Compute).
//! Chat and completions streams end with `data: [DONE]`; a Responses stream ends with its
//! `response.completed` event, a Messages stream with `message_stop`, as vLLM's do.

use super::Endpoint;
use serde_json::{json, Value};

/// The SSE events of `completion` (`chat.completion.chunk`s, or `text_completion`s, the usage
/// chunk last when `include_usage`; or a response's typed events), with the stream's end.
pub fn completion_events(completion: &Value, endpoint: Endpoint, include_usage: bool) -> String {
    match endpoint {
        Endpoint::Responses => return response_events(completion),
        Endpoint::Messages => return message_events(completion),
        _ => {}
    }
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
    out.push_str(END);
    out
}

/// The end of a chat or completions stream.
pub const END: &str = "data: [DONE]\n\n";

/// A finished `/v1/responses` object as vLLM streams one: `response.created`, each output item
/// with its text parts (the whole text as one delta), then `response.completed` with the usage.
fn response_events(r: &Value) -> String {
    let mut out = String::new();
    let mut seq = 0u64;
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        out.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
    };
    let mut begun = r.clone();
    begun["status"] = json!("in_progress");
    begun["output"] = json!([]);
    begun["usage"] = Value::Null;
    begun["incomplete_details"] = Value::Null;
    push("response.created", json!({"response": begun}));
    for (i, item) in r["output"].as_array().into_iter().flatten().enumerate() {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        if added["content"].is_array() {
            added["content"] = json!([]);
        }
        push(
            "response.output_item.added",
            json!({"item": added, "output_index": i}),
        );
        for (j, part) in item["content"].as_array().into_iter().flatten().enumerate() {
            let text = part["text"].as_str().unwrap_or_default();
            let at = json!({"item_id": item["id"], "output_index": i, "content_index": j});
            let with = |extra: Value| {
                let mut v = at.clone();
                if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                    o.extend(e.clone());
                }
                v
            };
            let mut empty = part.clone();
            empty["text"] = json!("");
            push("response.content_part.added", with(json!({"part": empty})));
            if part["type"] == "output_text" {
                push("response.output_text.delta", with(json!({"delta": text})));
                push("response.output_text.done", with(json!({"text": text})));
            }
            push("response.content_part.done", with(json!({"part": part})));
        }
        push(
            "response.output_item.done",
            json!({"item": item, "output_index": i}),
        );
    }
    push("response.completed", json!({"response": r}));
    out
}

/// A finished Anthropic `message` as vLLM streams one: `message_start` (input tokens, no
/// content), each content block whole in one delta, `message_delta` with the stop reason and
/// the final usage, `message_stop`.
fn message_events(m: &Value) -> String {
    let mut out = String::new();
    let mut push = |kind: &str, data: Value| {
        // `type` first, as vLLM writes it.
        let mut event = json!({"type": kind});
        if let (Some(e), Some(d)) = (event.as_object_mut(), data.as_object()) {
            e.extend(d.clone());
        }
        out.push_str(&format!("event: {kind}\ndata: {event}\n\n"));
    };
    let usage = &m["usage"];
    let mut begun = m.clone();
    begun["content"] = json!([]);
    begun["stop_reason"] = Value::Null;
    begun["stop_sequence"] = Value::Null;
    begun["usage"] = json!({"input_tokens": usage["input_tokens"], "output_tokens": 0});
    push("message_start", json!({"message": begun}));
    for (i, block) in m["content"].as_array().into_iter().flatten().enumerate() {
        let (start, delta) = match block["type"].as_str() {
            Some("tool_use") => {
                let mut start = block.clone();
                start["input"] = json!({});
                let partial = block["input"].to_string();
                (
                    start,
                    json!({"type": "input_json_delta", "partial_json": partial}),
                )
            }
            Some("thinking") => (
                json!({"type": "thinking", "thinking": ""}),
                json!({"type": "thinking_delta", "thinking": block["thinking"]}),
            ),
            _ => (
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": block["text"]}),
            ),
        };
        push(
            "content_block_start",
            json!({"content_block": start, "index": i}),
        );
        push("content_block_delta", json!({"delta": delta, "index": i}));
        push("content_block_stop", json!({"index": i}));
    }
    push(
        "message_delta",
        json!({"delta": {"stop_reason": m["stop_reason"], "stop_sequence": m["stop_sequence"]},
               "usage": usage}),
    );
    push("message_stop", json!({}));
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
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert!(sse.ends_with(END));
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[2]["usage"]["total_tokens"], 3);
    }

    #[test]
    fn a_response_becomes_typed_events_ending_with_completed() {
        let r = json!({"id": "resp_1", "object": "response", "status": "completed",
            "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "hi there", "annotations": []}]}],
            "usage": {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}});
        let sse = completion_events(&r, Endpoint::Responses, false);
        let events: Vec<(&str, Value)> = sse
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (kind, data) = e.split_once('\n').unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                (kind.strip_prefix("event: ").unwrap(), data)
            })
            .collect();
        let kinds: Vec<&str> = events.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds[0], "response.created");
        assert!(kinds.contains(&"response.output_text.delta"));
        assert_eq!(*kinds.last().unwrap(), "response.completed");
        assert!(!sse.contains("[DONE]"));
        for (i, (kind, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], *kind);
            assert_eq!(data["sequence_number"], i);
        }
        assert_eq!(events[0].1["response"]["usage"], Value::Null);
        let delta = events
            .iter()
            .find(|(k, _)| *k == "response.output_text.delta")
            .unwrap();
        assert_eq!(delta.1["delta"], "hi there");
        assert_eq!(
            events.last().unwrap().1["response"]["usage"]["output_tokens"],
            2
        );
    }

    #[test]
    fn a_message_becomes_anthropic_events_ending_with_message_stop() {
        let m = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "hi there"}],
            "stop_reason": "max_tokens", "usage": {"input_tokens": 4, "output_tokens": 2}});
        let sse = completion_events(&m, Endpoint::Messages, false);
        let kinds: Vec<&str> = sse
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("event: ")?.split('\n').next())
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(
            sse.contains(r#""delta":{"type":"text_delta","text":"hi there"}"#),
            "{sse}"
        );
        assert!(
            sse.contains(r#""usage":{"input_tokens":4,"output_tokens":0}"#),
            "{sse}"
        );
        assert!(
            sse.ends_with("data: {\"type\":\"message_stop\"}\n\n"),
            "{sse}"
        );
    }
}
