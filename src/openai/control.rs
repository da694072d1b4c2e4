//! Control-field validation, as FIRST does it: only `model`, `stream` and the endpoint's input
//! field (`messages`, `prompt` or `input`) are checked, FIRST's reserved fields are refused, and
//! every other byte of the body is forwarded as the client sent it.
//!
//! The body is scanned once into borrowed raw values (no tree is built), and the byte span of
//! `model` is kept so the gateway can swap in the backend's model name without re-serializing.

use super::ApiError;
use super::Endpoint;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
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
    /// Where the `stream_options` value sits, if the body has one.
    stream_options_span: Option<Range<usize>>,
    /// `stream_options.include_usage` is true: the client asked for the usage chunk.
    pub include_usage: bool,
    /// The most tokens the answer may have, as the client set it (`max_completion_tokens`,
    /// else `max_tokens`).
    pub max_tokens: Option<u64>,
    /// Where the prompt's leading fields sit, in prompt order (`system` then `messages` for
    /// the Messages API, `instructions` then `input` for Responses, else `messages` or
    /// `prompt`): the start of the prompt for prefix affinity.
    prompt_spans: [Option<Range<usize>>; 2],
}

impl ControlFields {
    /// A key for the start of the prompt: a hash of the first `budget` bytes of its leading
    /// fields' JSON text (ASCII white space skipped, so the client's formatting does not
    /// matter), or `None` when the request has no prompt. Prompts that start alike share it;
    /// the text itself is not kept.
    pub fn prefix_key(&self, body: &[u8], budget: usize) -> Option<u64> {
        let mut left = budget;
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
        let mut any = false;
        for span in self.prompt_spans.iter().flatten() {
            for &b in body.get(span.clone())? {
                if left == 0 {
                    break;
                }
                if b.is_ascii_whitespace() {
                    continue;
                }
                hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                left -= 1;
                any = true;
            }
            // Fields are kept apart: `system: "ab"` and `messages` starting "c" differ from
            // `system: "a"` and "bc".
            hash = (hash ^ 0xff).wrapping_mul(0x100_0000_01b3);
        }
        any.then_some(hash)
    }

    /// The body with `model` replaced (if `name` is given) and, with `ask_usage`,
    /// `stream_options.include_usage` set to true (the member added to the client's
    /// `stream_options`, or `"stream_options":{"include_usage":true}` added in front); every
    /// other byte unchanged.
    pub fn rewrite(&self, body: &Bytes, name: Option<&str>, ask_usage: bool) -> Bytes {
        const USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;
        let mut edits: Vec<(Range<usize>, Cow<'_, [u8]>)> = Vec::with_capacity(2);
        if let Some(n) = name {
            let quoted = serde_json::to_vec(n).expect("a string serializes");
            edits.push((self.model_span.clone(), Cow::Owned(quoted)));
        }
        if ask_usage {
            match &self.stream_options_span {
                Some(span) => {
                    let mut options: serde_json::Value =
                        serde_json::from_slice(&body[span.clone()]).unwrap_or_default();
                    if !options.is_object() {
                        options = serde_json::json!({});
                    }
                    options["include_usage"] = true.into();
                    let bytes = serde_json::to_vec(&options).expect("a value serializes");
                    edits.push((span.clone(), Cow::Owned(bytes)));
                }
                None => {
                    // The object has members (`model` at least), so a trailing comma is right.
                    let at = body.iter().position(|b| *b == b'{').map_or(0, |b| b + 1);
                    edits.push((at..at, Cow::Borrowed(USAGE)));
                }
            }
        }
        edits.sort_by_key(|(span, _)| span.start);
        let mut out = BytesMut::with_capacity(body.len() + USAGE.len() + 64);
        let mut at = 0;
        for (span, bytes) in edits {
            out.extend_from_slice(&body[at..span.start]);
            out.extend_from_slice(&bytes);
            at = span.end;
        }
        out.extend_from_slice(&body[at..]);
        out.freeze()
    }
}

/// The top-level members the gateway reads.
const READ_FIELDS: [&str; 11] = [
    "model",
    "stream",
    "stream_options",
    "messages",
    "prompt",
    "input",
    "system",
    "instructions",
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
];

/// The members of [`READ_FIELDS`] as borrowed raw JSON, and the FIRST-reserved ones present;
/// read in one pass, every other member skipped (still checked to be valid JSON). A member
/// given twice counts as its last value.
#[derive(Default)]
struct TopLevel<'a> {
    values: [Option<&'a RawValue>; READ_FIELDS.len()],
    /// Bit `i`: `RESERVED_FIELDS[i]` is present.
    reserved: u8,
}

impl<'a> TopLevel<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        READ_FIELDS
            .iter()
            .position(|f| *f == name)
            .and_then(|i| self.values[i])
    }
}

/// A member's name, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
#[serde(transparent)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Members<'a> {
            type Value = TopLevel<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut top = TopLevel::default();
                while let Some(Key(name)) = map.next_key()? {
                    let name = name.as_ref();
                    if let Some(i) = READ_FIELDS.iter().position(|f| *f == name) {
                        top.values[i] = Some(map.next_value()?);
                        continue;
                    }
                    if let Some(i) = RESERVED_FIELDS.iter().position(|r| *r == name) {
                        top.reserved |= 1 << i;
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(top)
            }
        }
        d.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// Checks the control fields of a request body for `endpoint`.
pub fn parse_control_fields(body: &[u8], endpoint: Endpoint) -> Result<ControlFields, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(
            "The request body is empty; send a JSON object such as \
             {\"model\": \"...\", \"messages\": [...]}.",
        ));
    }
    let fields = match serde_json::from_slice::<TopLevel>(body) {
        Ok(f) => f,
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

    if fields.reserved != 0 {
        let mut reserved: Vec<&str> = (0..RESERVED_FIELDS.len())
            .filter(|i| fields.reserved & (1 << i) != 0)
            .map(|i| RESERVED_FIELDS[i])
            .collect();
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
    // A name without escapes is its raw text between the quotes (serde reads the rest).
    let raw = raw_model.get();
    let model = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(text) if !text.contains('\\') => Some(text.to_owned()),
        _ => serde_json::from_str::<String>(raw).ok(),
    };
    let model: String = model
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
        Endpoint::ChatCompletions => check_messages(fields.get("messages"))?,
        Endpoint::Completions => check_prompt("prompt", fields.get("prompt"))?,
        Endpoint::Responses => check_response_input(fields.get("input"))?,
        Endpoint::Embeddings => check_prompt("input", fields.get("input"))?,
        Endpoint::Messages => {
            check_messages(fields.get("messages"))?;
            check_max_tokens(fields.get("max_tokens"))?;
        }
        Endpoint::CountTokens => check_messages(fields.get("messages"))?,
    }
    if stream && endpoint.framing() == super::Framing::None {
        return Err(ApiError::invalid_request(format!(
            "/v1/{} cannot be streamed; set `stream` to false or leave it out.",
            endpoint.path()
        ))
        .with_param("stream"));
    }

    let span_of = |raw: &RawValue| {
        let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
        start..start + raw.get().len()
    };
    let stream_options = fields.get("stream_options");
    let include_usage = stream_options
        .and_then(|v| serde_json::from_str::<serde_json::Value>(v.get()).ok())
        .is_some_and(|v| v["include_usage"] == true);
    let max_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| fields.get(f)?.get().parse::<u64>().ok());
    let prompt_fields: [&str; 2] = match endpoint {
        Endpoint::ChatCompletions => ["messages", ""],
        Endpoint::Completions => ["prompt", ""],
        Endpoint::Messages => ["system", "messages"],
        Endpoint::Responses => ["instructions", "input"],
        Endpoint::Embeddings | Endpoint::CountTokens => ["", ""],
    };
    let prompt_spans = prompt_fields.map(|f| fields.get(f).map(span_of));
    Ok(ControlFields {
        model,
        stream,
        model_span,
        stream_options_span: stream_options.map(span_of),
        include_usage,
        max_tokens,
        prompt_spans,
    })
}

/// `input` of the Responses API: a string, or a list of input items (objects).
fn check_response_input(raw: Option<&RawValue>) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid_request(
            "`input` must be a string or a list of input items, e.g. \
             [{\"role\": \"user\", \"content\": \"Hello\"}].",
        )
        .with_param("input")
    };
    let raw = raw.ok_or_else(bad)?.get();
    if raw.starts_with('"') {
        return Ok(());
    }
    match serde_json::from_str(raw) {
        Ok(ObjectList(true)) => Ok(()),
        _ => Err(bad()),
    }
}

/// `max_tokens` of the Messages API: required (FIRST checks it too), a whole number of at
/// least 1.
fn check_max_tokens(raw: Option<&RawValue>) -> Result<(), ApiError> {
    match raw.map(|r| r.get().parse::<u64>()) {
        Some(Ok(n)) if n >= 1 => Ok(()),
        None => Err(ApiError::invalid_request(
            "`max_tokens` is required by the Messages API: the most tokens to generate, e.g. 1024.",
        )
        .with_param("max_tokens")),
        Some(_) => Err(ApiError::invalid_request(
            "`max_tokens` must be a whole number of at least 1.",
        )
        .with_param("max_tokens")),
    }
}

fn check_messages(raw: Option<&RawValue>) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid_request(
            "`messages` must be a list of message objects, e.g. \
             [{\"role\": \"user\", \"content\": \"Hello\"}].",
        )
        .with_param("messages")
    };
    match serde_json::from_str(raw.ok_or_else(bad)?.get()) {
        Ok(ObjectList(true)) => Ok(()),
        _ => Err(bad()),
    }
}

/// Whether a JSON list's items are all objects (each read as raw JSON, none collected).
struct ObjectList(bool);

impl<'de> Deserialize<'de> for ObjectList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Items;
        impl<'de> serde::de::Visitor<'de> for Items {
            type Value = ObjectList;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON list")
            }

            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                mut seq: S,
            ) -> Result<ObjectList, S::Error> {
                let mut objects = true;
                while let Some(item) = seq.next_element::<&RawValue>()? {
                    objects &= item.get().starts_with('{');
                }
                Ok(ObjectList(objects))
            }
        }
        d.deserialize_seq(Items)
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

    fn key(body: &str, endpoint: Endpoint, budget: usize) -> Option<u64> {
        parse_control_fields(body.as_bytes(), endpoint)
            .unwrap()
            .prefix_key(body.as_bytes(), budget)
    }

    #[test]
    fn prompts_that_start_alike_share_a_prefix_key() {
        let system = r#"{"role":"system","content":"You are a careful assistant."}"#;
        let a = format!(r#"{{"model":"m","messages":[{system},{{"role":"user","content":"a"}}]}}"#);
        let b = format!(
            "{{\"messages\": [ {system},\n {{\"role\": \"user\", \"content\": \"b\"}}], \"model\": \"x\"}}"
        );
        let chat = Endpoint::ChatCompletions;
        // The first 60 bytes are the system message: same key whatever follows, the model,
        // field order and the client's white space.
        assert_eq!(key(&a, chat, 60), key(&b, chat, 60));
        assert!(key(&a, chat, 60).is_some());
        // With the whole prompt in the key they differ.
        assert_ne!(key(&a, chat, 10_000), key(&b, chat, 10_000));
        // The Messages API: `system` and then `messages`, kept apart.
        let m = |system: &str, first: &str| {
            format!(
                r#"{{"model":"m","max_tokens":5,"system":"{system}","messages":[{{"role":"user","content":"{first}"}}]}}"#
            )
        };
        let messages = Endpoint::Messages;
        assert_eq!(
            key(&m("s", "x"), messages, 8),
            key(&m("s", "y"), messages, 8)
        );
        assert_ne!(
            key(&m("ab", "c"), messages, 100),
            key(&m("a", "bc"), messages, 100)
        );
        // No prompt, no key.
        let e = r#"{"model":"m","input":"text"}"#;
        assert_eq!(key(e, Endpoint::Embeddings, 100), None);
    }

    #[test]
    fn reads_model_and_stream() {
        let c = chat(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .unwrap();
        assert_eq!((c.model.as_str(), c.stream), ("m", true));
        let c = chat(r#"{"model":"m","stream":null,"messages":[]}"#).unwrap();
        assert!(!c.stream);
        // Escapes are read as JSON has them.
        let c = chat(r#"{"model":"a\"b\u00e9","messages":[]}"#).unwrap();
        assert_eq!(c.model, "a\"bé");
        assert!(chat(r#"{"model":"  ","messages":[]}"#).is_err());
        assert!(chat(r#"{"model":7,"messages":[]}"#).is_err());
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
        assert!(!c.include_usage);
    }

    #[test]
    fn asks_for_usage_inside_the_clients_own_stream_options() {
        for (options, expected) in [
            (r#"{"include_usage": false}"#, r#"{"include_usage":true}"#),
            ("{}", r#"{"include_usage":true}"#),
            (
                r#"{"continuous_usage_stats":true}"#,
                r#"{"continuous_usage_stats":true,"include_usage":true}"#,
            ),
            ("null", r#"{"include_usage":true}"#),
        ] {
            let body = Bytes::from(format!(
                r#"{{"model":"m","stream":true,"stream_options":{options},"messages":[]}}"#
            ));
            let c = parse_control_fields(&body, Endpoint::ChatCompletions).unwrap();
            assert!(!c.include_usage, "{options}");
            let out = c.rewrite(&body, Some("backend-m"), true);
            assert_eq!(
                String::from_utf8(out.to_vec()).unwrap(),
                format!(
                    r#"{{"model":"backend-m","stream":true,"stream_options":{expected},"messages":[]}}"#
                )
            );
        }
    }

    #[test]
    fn reads_the_answers_token_cap() {
        let c = chat(r#"{"model":"m","max_tokens":100,"messages":[]}"#).unwrap();
        assert_eq!(c.max_tokens, Some(100));
        let c = chat(r#"{"model":"m","max_tokens":100,"max_completion_tokens":7,"messages":[]}"#)
            .unwrap();
        assert_eq!(c.max_tokens, Some(7));
        assert_eq!(
            chat(r#"{"model":"m","messages":[]}"#).unwrap().max_tokens,
            None
        );
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
