//! Control-field validation, as FIRST does it: only `model`, `stream` and the endpoint's input
//! field (`messages`, `prompt` or `input`) are checked, FIRST's reserved fields are refused, and
//! every other byte of the body is forwarded as the client sent it.
//!
//! The body is scanned once into borrowed raw values (no tree is built), and the byte span of
//! `model` is kept so the gateway can swap in the backend's model name without re-serializing.

use super::ApiError;
use crate::config::Endpoint;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

/// Top-level fields FIRST uses internally; a client may not set them (422).
pub const RESERVED_FIELDS: [&str; 8] = [
    "api_port",
    "cache_salt",
    "openai_endpoint",
    "stream_task_id",
    "stream_task_token",
    "streaming_server_host",
    "streaming_server_port",
    "streaming_server_protocol",
];

/// What the gateway needs to know about a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlFields {
    /// The model name as the client wrote it.
    pub model: String,
    /// `"stream": true`.
    pub stream: bool,
    /// Where the `model` value (with its quotes) sits in the body.
    model_span: Range<usize>,
    /// The body has a top-level `stream_options`.
    pub has_stream_options: bool,
    /// `stream_options.include_usage` is true.
    pub include_usage: bool,
}

impl ControlFields {
    /// The body with `model` replaced (if `name` is given) and, if `inject_usage`,
    /// `"stream_options":{"include_usage":true}` added as the first member; every other byte
    /// unchanged.
    pub fn rewrite(&self, body: &Bytes, name: Option<&str>, inject_usage: bool) -> Bytes {
        const USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;
        let quoted = name.map(|n| serde_json::to_string(n).expect("a string serializes"));
        let mut out = BytesMut::with_capacity(body.len() + USAGE.len() + 64);
        let mut at = 0;
        if inject_usage {
            // The object has members (`model` at least), so a trailing comma is right.
            let brace = body.iter().position(|b| *b == b'{').unwrap_or(0);
            out.extend_from_slice(&body[..=brace]);
            out.extend_from_slice(USAGE);
            at = brace + 1;
        }
        match &quoted {
            Some(q) => {
                out.extend_from_slice(&body[at..self.model_span.start]);
                out.extend_from_slice(q.as_bytes());
                out.extend_from_slice(&body[self.model_span.end..]);
            }
            None => out.extend_from_slice(&body[at..]),
        }
        out.freeze()
    }
}

#[derive(Deserialize)]
#[serde(transparent)]
struct TopLevel<'a>(#[serde(borrow)] HashMap<Cow<'a, str>, &'a RawValue>);

/// Checks the control fields of a request body for `endpoint`.
pub fn parse_control_fields(body: &[u8], endpoint: Endpoint) -> Result<ControlFields, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(
            "The request body is empty; send a JSON object such as \
             {\"model\": \"...\", \"messages\": [...]}.",
        ));
    }
    let fields = match serde_json::from_slice::<TopLevel>(body) {
        Ok(f) => f.0,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return Err(ApiError::invalid_request(
                "The request body must be a JSON object.",
            ))
        }
        Err(e) => {
            return Err(ApiError::invalid_request(format!(
                "The request body is not valid JSON ({e}). Check quoting and commas."
            )))
        }
    };

    let mut reserved: Vec<&str> = RESERVED_FIELDS
        .iter()
        .copied()
        .filter(|f| fields.contains_key(*f))
        .collect();
    if !reserved.is_empty() {
        reserved.sort_unstable();
        return Err(ApiError::new(
            422,
            "invalid_request",
            format!(
                "FIRST-reserved request fields are not accepted: {}. Remove them from the body.",
                reserved.join(", ")
            ),
        )
        .with_param(reserved[0]));
    }

    let raw_model = fields.get("model").ok_or_else(|| {
        ApiError::invalid_request("The request has no `model`; say which model to use.")
            .with_param("model")
    })?;
    let model: String = serde_json::from_str(raw_model.get())
        .ok()
        .filter(|m: &String| !m.trim().is_empty())
        .ok_or_else(|| {
            ApiError::invalid_request("`model` must be a non-empty string.").with_param("model")
        })?;
    let start = raw_model.get().as_ptr() as usize - body.as_ptr() as usize;
    let model_span = start..start + raw_model.get().len();

    let stream = match fields.get("stream").map(|v| v.get().trim()) {
        None | Some("null") | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(
                ApiError::invalid_request("`stream` must be true, false or null.")
                    .with_param("stream"),
            )
        }
    };

    match endpoint {
        Endpoint::ChatCompletions => check_messages(fields.get("messages").copied())?,
        Endpoint::Completions => check_prompt("prompt", fields.get("prompt").copied())?,
        Endpoint::Embeddings => {
            check_prompt("input", fields.get("input").copied())?;
            if stream {
                return Err(ApiError::invalid_request(
                    "Embeddings cannot be streamed; set `stream` to false or leave it out.",
                )
                .with_param("stream"));
            }
        }
    }

    let stream_options = fields.get("stream_options");
    let include_usage = stream_options
        .and_then(|v| serde_json::from_str::<serde_json::Value>(v.get()).ok())
        .is_some_and(|v| v["include_usage"] == true);
    Ok(ControlFields {
        model,
        stream,
        model_span,
        has_stream_options: stream_options.is_some(),
        include_usage,
    })
}

fn check_messages(raw: Option<&RawValue>) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid_request(
            "`messages` must be a list of message objects, e.g. \
             [{\"role\": \"user\", \"content\": \"Hello\"}].",
        )
        .with_param("messages")
    };
    let items: Vec<&RawValue> =
        serde_json::from_str(raw.ok_or_else(bad)?.get()).map_err(|_| bad())?;
    if items.iter().all(|m| m.get().starts_with('{')) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `prompt` / `input`: a string, a list of strings, a list of token ids, or a list of lists
/// of token ids.
fn check_prompt(field: &'static str, raw: Option<&RawValue>) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid_request(format!(
            "`{field}` must be a string, a list of strings, a list of token ids or a list of \
             lists of token ids."
        ))
        .with_param(field)
    };
    let raw = raw.ok_or_else(bad)?.get();
    if raw.starts_with('"') {
        return Ok(());
    }
    let items: Vec<&RawValue> = serde_json::from_str(raw).map_err(|_| bad())?;
    let is_str = |v: &&RawValue| v.get().starts_with('"');
    let is_int = |v: &&RawValue| v.get().parse::<i64>().is_ok();
    let is_int_list = |v: &&RawValue| serde_json::from_str::<Vec<i64>>(v.get()).is_ok();
    if items.iter().all(is_str) || items.iter().all(is_int) || items.iter().all(is_int_list) {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ControlFields, ApiError> {
        parse_control_fields(body.as_bytes(), Endpoint::ChatCompletions)
    }

    #[test]
    fn reads_model_and_stream() {
        let c = chat(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap();
        assert_eq!((c.model.as_str(), c.stream), ("m", true));
        let c = chat(r#"{"model":"m","stream":null,"messages":[]}"#).unwrap();
        assert!(!c.stream);
    }

    #[test]
    fn rewrites_only_the_model_bytes() {
        let body = Bytes::from_static(
            br#"{ "temperature" : 0.70, "model" :  "Llama" , "messages":[{"content":"model"}]}"#,
        );
        let c = parse_control_fields(&body, Endpoint::ChatCompletions).unwrap();
        let out = c.rewrite(&body, Some("meta/llama \"8b\""), false);
        assert_eq!(
            &out[..],
            &br#"{ "temperature" : 0.70, "model" :  "meta/llama \"8b\"" , "messages":[{"content":"model"}]}"#[..]
        );
        // Asking for usage adds one member in front; the rest is unchanged.
        let out = c.rewrite(&body, None, true);
        assert_eq!(
            &out[..],
            &br#"{"stream_options":{"include_usage":true}, "temperature" : 0.70, "model" :  "Llama" , "messages":[{"content":"model"}]}"#[..]
        );
        assert!(!c.has_stream_options && !c.include_usage);
    }

    #[test]
    fn explains_bad_bodies() {
        assert_eq!(chat("").unwrap_err().status, 400);
        assert!(chat("{").unwrap_err().message.contains("not valid JSON"));
        assert!(chat("[1]").unwrap_err().message.contains("JSON object"));
        let e = chat(r#"{"messages":[]}"#).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("model")));
        assert_eq!(
            chat(r#"{"model":"","messages":[]}"#).unwrap_err().status,
            400
        );
        assert_eq!(
            chat(r#"{"model":3,"messages":[]}"#).unwrap_err().status,
            400
        );
        let e = chat(r#"{"model":"m","stream":"yes","messages":[]}"#).unwrap_err();
        assert_eq!(e.param, Some("stream"));
        let e = chat(r#"{"model":"m","messages":["hi"]}"#).unwrap_err();
        assert_eq!(e.param, Some("messages"));
    }

    #[test]
    fn reserved_fields_are_422() {
        let e = chat(r#"{"model":"m","messages":[],"api_port":1,"cache_salt":"x"}"#).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.message.contains("api_port, cache_salt"), "{}", e.message);
    }

    #[test]
    fn prompts_and_inputs() {
        let ok = |ep, b: &str| parse_control_fields(b.as_bytes(), ep).is_ok();
        assert!(ok(Endpoint::Completions, r#"{"model":"m","prompt":"hi"}"#));
        assert!(ok(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[1,2,3]}"#
        ));
        assert!(ok(
            Endpoint::Embeddings,
            r#"{"model":"m","input":[[1,2],[3]]}"#
        ));
        assert!(ok(
            Endpoint::Embeddings,
            r#"{"model":"m","input":["a","b"]}"#
        ));
        assert!(!ok(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[1,"a"]}"#
        ));
        assert!(!ok(Endpoint::Completions, r#"{"model":"m"}"#));
        let e = parse_control_fields(
            br#"{"model":"m","input":"x","stream":true}"#,
            Endpoint::Embeddings,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("stream"));
    }
}
