//! Globus Compute's serialization, byte for byte (`shared/reference/globus-api.md` §4.4):
//! JSONData buffers (`11\n` + Python-style `json.dumps`), packed buffers (`<len>\n<buf>`, length
//! in characters), and decoding of results by their header (`11\n` JSON, `13\n` packed
//! strategies, `00\n` base64 pickle of plain values).

use base64::Engine as _;
use serde::Serialize;
use serde_json::ser::Formatter;
use serde_json::Value;
use std::io;

/// `json.dumps(value)` with Python's defaults: `", "` and `": "` separators, non-ASCII
/// escaped as `\uXXXX` (so the character count equals the byte count).
pub fn python_json(value: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value
        .serialize(&mut ser)
        .expect("serializing a Value cannot fail");
    String::from_utf8(out).expect("ASCII output")
}

struct PythonFormatter;

/// Python's item separator, before every item but the first.
fn separator<W: ?Sized + io::Write>(w: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        separator(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// `pack_buffers`: each buffer prefixed with its length in characters and `\n`.
pub fn pack(buffers: &[String]) -> String {
    buffers
        .iter()
        .map(|b| format!("{}\n{b}", b.chars().count()))
        .collect()
}

/// `unpack_buffers`, the inverse of [`pack`].
pub fn unpack(mut packed: &str) -> Result<Vec<&str>, DecodeError> {
    let mut out = Vec::new();
    while !packed.is_empty() {
        let (len, rest) = packed.split_once('\n').ok_or(DecodeError::Malformed(
            "a packed buffer without a length line",
        ))?;
        let len: usize = len
            .parse()
            .map_err(|_| DecodeError::Malformed("a packed buffer length that is not a number"))?;
        let end = rest.char_indices().nth(len).map_or(rest.len(), |(i, _)| i);
        if rest[..end].chars().count() != len {
            return Err(DecodeError::Malformed(
                "a packed buffer shorter than its length",
            ));
        }
        out.push(&rest[..end]);
        packed = &rest[end..];
    }
    Ok(out)
}

/// A task payload calling `f(*args)` with no keyword arguments, in JSONData.
pub fn task_payload(args: &[Value]) -> String {
    let args = format!("11\n{}", python_json(&Value::Array(args.to_vec())));
    let kwargs = "11\n{}".to_string();
    pack(&[args, kwargs])
}

/// Why a result could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable result: {0}")]
    Malformed(&'static str),
    #[error("undecodable result: unknown serialization header {0:?}")]
    UnknownHeader(String),
    #[error("undecodable result: {0}")]
    Invalid(String),
}

/// Largest task result decoded (the encoded string).
pub const MAX_RESULT_BYTES: usize = 16 * 1024 * 1024;

/// Decodes a task's `result` string by its header into JSON. A result is outside input:
/// its size is bounded, JSON nesting by serde_json's limit, pickles by `pickle`'s.
pub fn decode_result(result: &str) -> Result<Value, DecodeError> {
    if result.len() > MAX_RESULT_BYTES {
        return Err(DecodeError::Invalid(format!(
            "a result of {} bytes is over the {} MiB the gateway reads",
            result.len(),
            MAX_RESULT_BYTES / (1024 * 1024)
        )));
    }
    let (header, body) = split_header(result)?;
    if header == "13\n" {
        // All strategies: the JSON buffer if there is one, else the first (not nested again).
        let parts = unpack(body)?;
        let part = parts
            .iter()
            .find(|p| p.starts_with("11\n"))
            .or(parts.first())
            .ok_or(DecodeError::Malformed(
                "no buffer in an all-strategies result",
            ))?;
        let (header, body) = split_header(part)?;
        return decode_single(header, body);
    }
    decode_single(header, body)
}

fn split_header(s: &str) -> Result<(&str, &str), DecodeError> {
    s.split_at_checked(3)
        .ok_or(DecodeError::Malformed("shorter than a header"))
}

/// One buffer: JSONData (`11\n`) or a base64 pickle (`00\n`).
fn decode_single(header: &str, body: &str) -> Result<Value, DecodeError> {
    match header {
        "11\n" => serde_json::from_str(body).map_err(|e| DecodeError::Invalid(e.to_string())),
        "00\n" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(|e| DecodeError::Invalid(format!("base64: {e}")))?;
            super::pickle::decode(&bytes)
        }
        other => Err(DecodeError::UnknownHeader(other.trim_end().to_string())),
    }
}

/// The completion a FIRST inference function returned: it returns `json.dumps(...)`, a
/// string holding JSON, so unwrap one level when the decoded value is a string.
pub fn unwrap_json_string(v: Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_payload_matches_the_reference_bytes() {
        let params = json!({"model_params": {"openai_endpoint": "chat/completions", "api_port": 8001,
            "model": "m", "messages": [{"role": "user", "content": "hi"}]}});
        let expected = "143\n11\n[{\"model_params\": {\"openai_endpoint\": \"chat/completions\", \"api_port\": 8001, \"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}}]5\n11\n{}";
        assert_eq!(task_payload(&[params]), expected);
    }

    #[test]
    fn non_ascii_is_escaped_like_python() {
        assert_eq!(
            python_json(&json!({"t": "ü😀"})),
            r#"{"t": "\u00fc\ud83d\ude00"}"#
        );
        let packed = pack(&["11\n\"\u{fc}\"".to_string()]);
        assert_eq!(unpack(&packed).unwrap(), ["11\n\"\u{fc}\""]);
    }

    #[test]
    fn every_result_header_decodes() {
        let inner =
            r#"{"id": "x", "choices": [{"message": {"role": "assistant", "content": "Hello"}}]}"#;
        let as_string = format!("11\n{}", serde_json::to_string(inner).unwrap());
        let v = unwrap_json_string(decode_result(&as_string).unwrap());
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(decode_result("11\n{\"a\": 1}").unwrap(), json!({"a": 1}));
        let all = format!("13\n{}", pack(&["11\n[1, 2]".into(), "00\nxxxx\n".into()]));
        assert_eq!(decode_result(&all).unwrap(), json!([1, 2]));
        // The reference's pickles: "hello" and {"a": 1}, protocol 4, as dill writes them.
        let b64 = |hexs: &str| {
            let bytes: Vec<u8> = (0..hexs.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hexs[i..i + 2], 16).unwrap())
                .collect();
            format!(
                "00\n{}\n",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            )
        };
        assert_eq!(
            decode_result(&b64("80049509000000000000008c0568656c6c6f942e")).unwrap(),
            json!("hello")
        );
        assert_eq!(
            decode_result(&b64("8004950a000000000000007d948c0161944b01732e")).unwrap(),
            json!({"a": 1})
        );
        let reference = "00\ngASVVAAAAAAAAACMUHsiaWQiOiAieCIsICJjaG9pY2VzIjogW3sibWVzc2FnZSI6IHsicm9sZSI6\nICJhc3Npc3RhbnQiLCAiY29udGVudCI6ICJIZWxsbyJ9fV19lC4=\n";
        let v = unwrap_json_string(decode_result(reference).unwrap());
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert!(matches!(
            decode_result("01\nabc"),
            Err(DecodeError::UnknownHeader(_))
        ));
        assert!(decode_result("11").is_err());
    }
}
