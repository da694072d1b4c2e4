//! Reading token usage out of a response as it passes: the `usage` object of a JSON answer, or
//! of the stream's usage event (an OpenAI chunk with `usage`, or `/v1/responses`'
//! `response.completed`). When the gateway asked for usage on a client's behalf, the usage-only
//! chunk is removed from what that client receives; every other event is passed on as soon as
//! its blank line arrives.
//!
//! Bounded and linear: each byte is looked at once, and at most one incomplete event is held.
//! An event over [`MAX_EVENT`] (no usage chunk is that large) stops the reading: the rest of
//! the stream passes through unread and the record's tokens are unknown.

use crate::openai::sse::{field, lines, Piece, SseSplitter};
use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::LazyLock;

/// Largest JSON answer kept to read its usage (bigger ones are passed on, not parsed).
const MAX_JSON: usize = 4 * 1024 * 1024;
/// Largest SSE event held while waiting for its end.
pub const MAX_EVENT: usize = 1024 * 1024;

/// Token counts of one response. Arithmetic on them saturates: a backend's absurd numbers
/// cannot wrap a total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Tokens {
    /// The `usage` of a whole completion (missing counts are 0).
    pub fn of_completion(completion: &Value) -> Tokens {
        counts_of(&completion["usage"]).tokens().unwrap_or_default()
    }
}

/// Follows one response body.
#[derive(Debug, Default)]
pub struct UsageScanner {
    stream: bool,
    /// Remove the usage-only chunk (the client did not ask for it).
    strip_usage: bool,
    sse: SseSplitter,
    /// The JSON body so far.
    json: BytesMut,
    usage: Option<Tokens>,
    /// Chunks that carried generated content (an estimate of tokens when usage never came).
    content_chunks: u64,
    /// The body ended (the backend finished it).
    ended: bool,
    /// The body was too large to read: passed through unread.
    unscanned: bool,
    /// The last event was passed on (not the hidden usage chunk).
    kept_last: bool,
    /// The stream's end marker passed (`[DONE]`, `response.completed`, `message_stop`): a
    /// client that leaves now got everything.
    completed: bool,
    /// While the usage chunk is hidden: the chunk that finished a choice, held until the next
    /// event shows whether it is the usage chunk, whose `system_fingerprint` (vLLM moves it
    /// there when usage is asked for) then goes onto the held chunk.
    held: Option<BytesMut>,
    /// The `system_fingerprint` of the hidden usage chunk.
    fingerprint: Option<String>,
}

impl UsageScanner {
    pub fn new(stream: bool, strip_usage: bool) -> Self {
        UsageScanner {
            stream,
            strip_usage,
            ..UsageScanner::default()
        }
    }

    /// Feeds one body chunk; returns what to send to the client instead of it (`None`: the
    /// chunk unchanged).
    pub fn feed(&mut self, chunk: &Bytes, end: bool) -> Option<Bytes> {
        self.ended |= end;
        if !self.stream {
            self.feed_json(chunk, end);
            return None;
        }
        if self.unscanned {
            return None;
        }
        // Whether the chunk starts at an event's start, as backends write them: then, while
        // every event of it passes unchanged, it is passed on as it came (no copy).
        let mut whole = self.sse.pending() == 0 && self.held.is_none();
        self.sse.push(chunk);
        let Some(mut out) = self.strip_usage.then(BytesMut::new) else {
            // Passed on unchanged: only read.
            while let Some(piece) = self.sse.next_piece() {
                if let Piece::Event(event) = piece {
                    self.event(&event);
                }
            }
            if end || self.sse.pending() > MAX_EVENT {
                self.unscanned |= !end;
                self.sse.take_rest();
            }
            return None;
        };
        // With `whole`, what passed so far is `chunk[..passed]`, not yet copied to `out`.
        let mut passed = 0;
        while let Some(piece) = self.sse.next_piece() {
            let (verbatim, hold) = match &piece {
                Piece::Event(event) => {
                    self.kept_last = self.event(event);
                    let hold = self.kept_last && has(event, &FINISH_REASON);
                    (self.kept_last && !hold && self.held.is_none(), hold)
                }
                Piece::EndOfPrevious(_) => (self.kept_last && self.held.is_none(), false),
            };
            if whole {
                if verbatim {
                    passed += piece.bytes().len();
                    continue;
                }
                whole = false;
                out.extend_from_slice(&chunk[..passed]);
            }
            match piece {
                Piece::Event(event) => {
                    self.release(&mut out);
                    if hold {
                        self.held = Some(BytesMut::from(&event[..]));
                    } else if self.kept_last {
                        out.extend_from_slice(&event);
                    }
                }
                Piece::EndOfPrevious(lf) => match self.held.as_mut() {
                    Some(held) => held.extend_from_slice(&lf),
                    None if self.kept_last => out.extend_from_slice(&lf),
                    None => {}
                },
            }
        }
        if end || self.sse.pending() > MAX_EVENT {
            // The stream's end, or an event too large to be a usage chunk: let the rest go.
            self.unscanned |= !end;
            let rest = self.sse.take_rest();
            if whole && self.held.is_none() {
                passed += rest.len();
            } else {
                if whole {
                    whole = false;
                    out.extend_from_slice(&chunk[..passed]);
                }
                self.release(&mut out);
                out.extend_from_slice(&rest);
            }
        }
        if whole {
            if passed == chunk.len() {
                return None;
            }
            // The chunk's last event is incomplete: held back until its end arrives.
            return Some(chunk.slice(..passed));
        }
        Some(out.freeze())
    }

    /// Sends on the held chunk, with the hidden usage chunk's `system_fingerprint` if it had
    /// one.
    fn release(&mut self, out: &mut BytesMut) {
        let Some(mut held) = self.held.take() else {
            return;
        };
        if let Some(fingerprint) = self.fingerprint.take() {
            // Into the chunk's JSON object: before its last `}`.
            if let Some(at) = held.iter().rposition(|b| *b == b'}') {
                let member = format!(
                    ",\"system_fingerprint\":{}",
                    serde_json::Value::String(fingerprint)
                );
                let tail = held.split_off(at);
                held.extend_from_slice(member.as_bytes());
                held.extend_from_slice(&tail);
            }
        }
        out.extend_from_slice(&held);
    }

    fn feed_json(&mut self, chunk: &Bytes, end: bool) {
        if self.unscanned {
            return;
        }
        if self.json.len() + chunk.len() > MAX_JSON {
            self.unscanned = true;
            self.json = BytesMut::new();
            return;
        }
        if end && self.json.is_empty() {
            // The whole answer in one piece (the usual case): read it where it is.
            self.usage = usage_of_answer(chunk);
            return;
        }
        self.json.extend_from_slice(chunk);
        if end {
            self.usage = usage_of_answer(&self.json);
            self.json = BytesMut::new();
        }
    }

    /// Reads one event; false when it is to be dropped.
    fn event(&mut self, event: &[u8]) -> bool {
        let mut data = lines(event).filter_map(|l| field(l, b"data"));
        // The usual event has one `data:` line: read it without gathering the lines.
        let (Some(first), None) = (data.next(), data.next()) else {
            return self.data_lines(event);
        };
        self.payload(first)
    }

    /// An event with several `data:` lines, or none.
    fn data_lines(&mut self, event: &[u8]) -> bool {
        let mut data: Vec<&[u8]> = lines(event).filter_map(|l| field(l, b"data")).collect();
        if data.len() > 1 {
            // Several `data:` lines make one payload; relayed streams may also pack several
            // events' lines into one: read each line when the joined payload is not JSON.
            let joined = data.join(&b'\n');
            if serde_json::from_slice::<Value>(&joined).is_ok() {
                return self.payload(&joined);
            }
        }
        let mut keep = true;
        for d in data.drain(..) {
            keep &= self.payload(d);
        }
        keep
    }

    /// Reads one event payload; false when its event is to be dropped.
    fn payload(&mut self, data: &[u8]) -> bool {
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.completed = true;
            return true;
        }
        // Most events are content chunks: recognise them without parsing the JSON.
        if !has(data, &USAGE) {
            if carries_text(data) {
                self.content_chunks = self.content_chunks.saturating_add(1);
            }
            // Anthropic's last event, `{"type":"message_stop"}`, is short.
            if data.len() < 64 && has(data, &MESSAGE_STOP) {
                self.completed = true;
            }
            return true;
        }
        let event = match serde_json::from_slice::<OpenAiUsageChunk>(data) {
            Ok(chunk) if chunk.kind.is_none() => chunk.read(),
            // Another shape (`/v1/responses`, Anthropic) or unexpected types: as any JSON.
            _ => match serde_json::from_slice::<Value>(data) {
                Ok(v) => UsageEvent::of(&v),
                Err(_) => return true,
            },
        };
        self.usage_event(event)
    }

    /// Takes what an event with a `usage` said; false when it is to be dropped.
    fn usage_event(&mut self, e: UsageEvent) -> bool {
        self.completed |= e.completed;
        let tokens = e.counts.tokens().or_else(|| {
            // A `message_delta` may carry only the output tokens; the input came first.
            let output = e.counts.output_tokens?;
            let prompt = self.usage.map_or(0, |u| u.prompt);
            Some(Tokens {
                prompt,
                completion: output,
                total: prompt.saturating_add(output),
            })
        });
        if let Some(t) = tokens {
            self.usage = Some(t);
            if e.usage_only && self.strip_usage {
                self.fingerprint = e.fingerprint;
                return false;
            }
        }
        if e.has_content {
            self.content_chunks = self.content_chunks.saturating_add(1);
        }
        true
    }

    /// The usage reported; when none came, the content chunks counted (an estimate).
    pub fn tokens(&self) -> Tokens {
        self.usage.unwrap_or(Tokens {
            prompt: 0,
            completion: self.content_chunks,
            total: self.content_chunks,
        })
    }

    /// The backend reported usage (and it was read): the tokens are exact.
    pub fn tokens_known(&self) -> bool {
        self.usage.is_some()
    }

    /// The body ended: the backend finished it.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The stream's end marker passed: a client that leaves after it got the whole answer.
    pub fn completed(&self) -> bool {
        self.completed
    }

    /// The body was too large to read and passed through unread.
    pub fn unscanned(&self) -> bool {
        self.unscanned
    }

    /// Whether the usage chunk is removed (the body changes length).
    pub fn strips(&self) -> bool {
        self.stream && self.strip_usage
    }
}

/// A `usage` object read into plain counters (no map).
#[derive(serde::Deserialize, Default, Debug, PartialEq)]
struct Counts {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl Counts {
    fn tokens(&self) -> Option<Tokens> {
        let prompt = self.prompt_tokens.or(self.input_tokens)?;
        let completion = self.completion_tokens.or(self.output_tokens).unwrap_or(0);
        Some(Tokens {
            prompt,
            completion,
            total: self
                .total_tokens
                .unwrap_or(prompt.saturating_add(completion)),
        })
    }
}

/// The `usage` of a whole JSON answer. Where it is the answer's last member, as vLLM and OpenAI
/// write it, it is read from the end without going over the generated text before it;
/// otherwise the answer is read once, only `usage` built (the rest skipped without being
/// copied). A `usage` whose counts are not all unsigned integers is read again as any JSON, as
/// a stream's usage event is.
fn usage_of_answer(body: &[u8]) -> Option<Tokens> {
    #[derive(serde::Deserialize)]
    struct Answer<U> {
        usage: Option<U>,
    }
    if let Some(counts) = usage_at_end(body) {
        return counts.tokens();
    }
    match serde_json::from_slice::<Answer<Counts>>(body) {
        Ok(answer) => answer.usage?.tokens(),
        Err(_) => counts_of(&serde_json::from_slice::<Answer<Value>>(body).ok()?.usage?).tokens(),
    }
}

/// The counts of `..., "usage": {...}}` at the end of `body`. The last `"usage"` there is a
/// key (a string's own quotes are escaped, so its opening quote must not be, and a `:` must
/// follow), and only the object's closing brace may come after its value: then it is the
/// outermost object's last member.
fn usage_at_end(body: &[u8]) -> Option<Counts> {
    const KEY: &[u8] = b"\"usage\"";
    let inner = body.trim_ascii_end().strip_suffix(b"}")?;
    // Back from the end, quote by quote (a `memmem` searcher costs more to set up than the
    // few quotes after `usage` take to pass).
    let mut end = inner.len();
    let at = loop {
        let quote = memchr::memrchr(b'"', &inner[..end])?;
        if inner[quote..].starts_with(KEY) {
            break quote;
        }
        end = quote;
    };
    let backslashes = inner[..at]
        .iter()
        .rev()
        .take_while(|b| **b == b'\\')
        .count();
    let value = inner[at + KEY.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?;
    if backslashes % 2 == 1 {
        return None;
    }
    // Nothing but white space may follow the value (both readers check).
    flat_counts(value).or_else(|| serde_json::from_slice(value).ok())
}

/// The counts of a flat `usage` object, as vLLM and OpenAI write it (names without escapes,
/// values unsigned integers or `null`), read without serde (a fifth of the instructions);
/// `None` for any other shape, which serde then reads.
fn flat_counts(value: &[u8]) -> Option<Counts> {
    let mut counts = Counts::default();
    let mut rest = value.trim_ascii().strip_prefix(b"{")?.trim_ascii_start();
    if rest == b"}" {
        return Some(counts);
    }
    loop {
        rest = rest.strip_prefix(b"\"")?;
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        let name = &rest[..end];
        rest = rest[end..].strip_prefix(b"\"")?;
        rest = rest
            .trim_ascii_start()
            .strip_prefix(b":")?
            .trim_ascii_start();
        let digits = rest
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(rest.len());
        let n = match digits {
            0 => {
                rest = rest.strip_prefix(b"null")?;
                None
            }
            // JSON has no leading zeros.
            _ if rest[0] == b'0' && digits > 1 => return None,
            _ => {
                let mut n: u64 = 0;
                for &d in &rest[..digits] {
                    n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                }
                rest = &rest[digits..];
                Some(n)
            }
        };
        let slot = match name {
            b"prompt_tokens" => &mut counts.prompt_tokens,
            b"input_tokens" => &mut counts.input_tokens,
            b"completion_tokens" => &mut counts.completion_tokens,
            b"output_tokens" => &mut counts.output_tokens,
            b"total_tokens" => &mut counts.total_tokens,
            _ => &mut None,
        };
        *slot = n;
        rest = rest.trim_ascii_start();
        match rest.split_first()? {
            (b',', more) => rest = more.trim_ascii_start(),
            (b'}', more) => return more.is_empty().then_some(counts),
            _ => return None,
        }
    }
}

/// OpenAI's `prompt_tokens`/`completion_tokens`, or `/v1/responses`' `input_tokens`/
/// `output_tokens`, of any JSON `usage` (counts that are not unsigned integers are missing).
fn counts_of(v: &Value) -> Counts {
    Counts {
        prompt_tokens: v["prompt_tokens"].as_u64(),
        input_tokens: v["input_tokens"].as_u64(),
        completion_tokens: v["completion_tokens"].as_u64(),
        output_tokens: v["output_tokens"].as_u64(),
        total_tokens: v["total_tokens"].as_u64(),
    }
}

/// What a streamed event with a `usage` says.
#[derive(Debug, PartialEq)]
struct UsageEvent {
    counts: Counts,
    /// `/v1/responses`' `response.completed`.
    completed: bool,
    /// Its `choices` is an empty list: the usage-only chunk.
    usage_only: bool,
    fingerprint: Option<String>,
    /// A choice with generated text.
    has_content: bool,
}

impl UsageEvent {
    /// Any event, read as JSON: `/v1/responses`' usage is the completed response's,
    /// Anthropic's the message's at `message_start`, then the final counts in `message_delta`.
    fn of(v: &Value) -> UsageEvent {
        let kind = v["type"].as_str().unwrap_or_default();
        let usage = match kind {
            t if t.starts_with("response.") => &v["response"]["usage"],
            "message_start" => &v["message"]["usage"],
            _ => &v["usage"],
        };
        let choices = v["choices"].as_array();
        UsageEvent {
            counts: counts_of(usage),
            completed: kind == "response.completed",
            usage_only: choices.is_some_and(Vec::is_empty),
            fingerprint: v["system_fingerprint"].as_str().map(str::to_owned),
            has_content: choices.into_iter().flatten().any(|c| {
                c["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
                    || c["text"].as_str().is_some_and(|s| !s.is_empty())
            }),
        }
    }
}

/// An OpenAI chunk with `usage` (a stream's usage chunk, the usual event with one), read
/// without building the JSON tree [`UsageEvent::of`] reads: a tenth of the instructions. An
/// event with a `type`, or with a member of another type than these, is read as any JSON.
#[derive(serde::Deserialize)]
struct OpenAiUsageChunk<'a> {
    #[serde(rename = "type")]
    kind: Option<serde::de::IgnoredAny>,
    usage: Option<Counts>,
    #[serde(borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(borrow)]
    system_fingerprint: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow)]
    delta: Option<ChunkDelta<'a>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

impl OpenAiUsageChunk<'_> {
    fn read(self) -> UsageEvent {
        let nonempty = |s: &Option<Cow<str>>| s.as_deref().is_some_and(|s| !s.is_empty());
        UsageEvent {
            counts: self.usage.unwrap_or_default(),
            completed: false,
            usage_only: self.choices.as_ref().is_some_and(Vec::is_empty),
            fingerprint: self.system_fingerprint.map(Cow::into_owned),
            has_content: self.choices.iter().flatten().any(|c| {
                c.delta.as_ref().is_some_and(|d| nonempty(&d.content)) || nonempty(&c.text)
            }),
        }
    }
}

/// Searches built once for the constant strings the scanner looks for in every chunk
/// (memchr's one-off `find` builds its searcher on each call: over a third of a chunk's scan).
macro_rules! needles {
    ($($name:ident = $text:expr;)*) => {
        $(static $name: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new($text));)*
    };
}

needles! {
    FINISH_REASON = br#""finish_reason":""#;
    USAGE = br#""usage""#;
    CONTENT = br#""content":""#;
    TEXT = br#""text":""#;
    DELTA = br#""delta":""#;
    MESSAGE_STOP = br#""message_stop""#;
}

/// Whether a chunk's text member (`content`, `text`, or a string `delta`) holds text, judged
/// at the first of each found: one search per member, no second one for the empty forms
/// (vLLM's role chunk has `"content":""`).
fn carries_text(data: &[u8]) -> bool {
    [&CONTENT, &TEXT, &DELTA].into_iter().any(|member| {
        member
            .find(data)
            .is_some_and(|at| data.get(at + member.needle().len()) != Some(&b'"'))
    })
}

/// Whether `hay` contains the needle.
fn has(hay: &[u8], needle: &LazyLock<Finder<'static>>) -> bool {
    needle.find(hay).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_usage_reads_as_serde_reads_it_and_other_shapes_go_to_serde() {
        let flat = [
            r#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}"#,
            r#" { "prompt_tokens" : 12 , "total_tokens":17,"prompt_tokens_details":null } "#,
            r#"{"input_tokens":3,"output_tokens":0,"other":7}"#,
            r#"{}"#,
            r#"{"prompt_tokens":18446744073709551615}"#,
        ];
        for text in flat {
            let serde: Counts = serde_json::from_str(text).unwrap();
            assert_eq!(flat_counts(text.as_bytes()), Some(serde), "{text}");
        }
        let other = [
            r#"{"prompt_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}"#,
            r#"{"prompt_tokens":1.5}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":012}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt\u005ftokens":3}"#,
            r#"{"prompt_tokens":3,}"#,
            r#"{"prompt_tokens":3} x"#,
            r#"{"prompt_tokens":nul}"#,
            r#"{"prompt_tokens" 3}"#,
            r#"[1]"#,
            "",
        ];
        for text in other {
            assert_eq!(flat_counts(text.as_bytes()), None, "{text}");
        }
    }

    #[test]
    fn an_openai_usage_chunk_reads_as_any_json_reads_it() {
        let events = [
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":14,"total_tokens":20,"completion_tokens":6},"system_fingerprint":"vllm-0.32.0"}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"hi \"x\""}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":""}},{"index":1,"text":"t"}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{}}],"usage":{"output_tokens":4,"prompt_tokens_details":{"cached_tokens":0}}}"#,
            r#"{"usage":{"input_tokens":2,"output_tokens":3}}"#,
            r#"{"choices":null,"usage":{"prompt_tokens":1},"system_fingerprint":null}"#,
        ];
        for text in events {
            let chunk: OpenAiUsageChunk = serde_json::from_str(text).unwrap();
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(chunk.read(), UsageEvent::of(&v), "{text}");
        }
        // Other shapes and types are left to the JSON reading.
        for text in [
            r#"{"type":"response.completed","response":{"usage":{"input_tokens":1}}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1.5}}"#,
            r#"{"choices":{},"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"text":5}],"usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
        ] {
            let typed = serde_json::from_str::<OpenAiUsageChunk>(text);
            assert!(typed.is_err() || typed.unwrap().kind.is_some(), "{text}");
        }
    }

    /// A real vLLM stream with usage asked for (shared/reference/vllm-transcripts): however it
    /// is cut, the client gets it byte for byte less the usage chunk, whose fingerprint moves
    /// onto the chunk that finished the choice, and the usage is read.
    #[test]
    fn a_real_vllm_stream_reaches_the_client_less_its_usage_chunk_however_it_is_cut() {
        let stream: &[u8] = include_bytes!("../../tests/fixtures/vllm-chat-stream-usage.body");
        let text = std::str::from_utf8(stream).unwrap();
        let usage_event = text
            .split_inclusive("\n\n")
            .find(|e| e.contains("\"choices\":[]"))
            .unwrap();
        let finish = text
            .split_inclusive("\n\n")
            .find(|e| e.contains("\"finish_reason\":\"length\""))
            .unwrap();
        let at = finish.rfind('}').unwrap();
        let finish_with_fingerprint = format!(
            "{},\"system_fingerprint\":\"vllm-0.32.0-31c91eae\"{}",
            &finish[..at],
            &finish[at..]
        );
        let expected =
            text.replacen(usage_event, "", 1)
                .replacen(finish, &finish_with_fingerprint, 1);
        let scan = |cuts: &[usize]| {
            let mut scanner = UsageScanner::new(true, true);
            let mut out = Vec::new();
            let mut from = 0;
            for (i, &to) in cuts.iter().chain([&stream.len()]).enumerate() {
                let chunk = Bytes::copy_from_slice(&stream[from..to]);
                let sent = scanner.feed(&chunk, i == cuts.len());
                out.extend_from_slice(&sent.unwrap_or(chunk));
                from = to;
            }
            (String::from_utf8(out).unwrap(), scanner.tokens())
        };
        let tokens = Tokens {
            prompt: 14,
            completion: 6,
            total: 20,
        };
        assert_eq!(scan(&[]), (expected.clone(), tokens));
        for cut in 0..=stream.len() {
            assert_eq!(scan(&[cut]), (expected.clone(), tokens), "cut at {cut}");
        }
        let every_byte: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(scan(&every_byte), (expected, tokens));
    }

    /// Without a usage chunk the tokens are estimated from the chunks that carried text: in a
    /// real vLLM stream four of seven (the role chunk and two more have `"content":""`), and
    /// in the Responses API's events the text deltas, not the empty part announced first.
    #[test]
    fn without_usage_the_chunks_that_carried_text_are_counted() {
        let estimate = |body: &str| {
            let mut s = UsageScanner::new(true, true);
            assert_eq!(feed_all(&mut s, body), body);
            assert!(!s.tokens_known() && s.completed());
            s.tokens()
        };
        let vllm = include_str!("../../tests/fixtures/vllm-chat-stream.body");
        let four = Tokens {
            prompt: 0,
            completion: 4,
            total: 4,
        };
        assert_eq!(estimate(vllm), four);
        let responses = concat!(
            "event: response.content_part.added\ndata: {\"type\":\"response.content_part.added\",\"part\":{\"type\":\"output_text\",\"text\":\"\"}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hel\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"lo\"}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(estimate(responses).completion, 2);
    }

    fn feed_all(scanner: &mut UsageScanner, body: &str) -> String {
        let mut out = Vec::new();
        let parts: Vec<&str> = body.split_inclusive("\n\n").collect();
        for (i, part) in parts.iter().enumerate() {
            let chunk = Bytes::copy_from_slice(part.as_bytes());
            let sent = scanner.feed(&chunk, i + 1 == parts.len());
            out.extend_from_slice(&sent.unwrap_or(chunk));
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_hidden_usage_chunks_fingerprint_moves_onto_the_last_chunk_the_client_gets() {
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5},\"system_fingerprint\":\"vllm-0.32.0\"}\n\n",
            "data: [DONE]\n\n",
        );
        let mut s = UsageScanner::new(true, true);
        let out = feed_all(&mut s, body);
        assert!(!out.contains("usage"), "{out}");
        assert!(
            out.contains("\"finish_reason\":\"length\"}],\"system_fingerprint\":\"vllm-0.32.0\"}"),
            "{out}"
        );
        assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
        assert_eq!(s.tokens().total, 5);
        assert!(s.completed());
    }

    #[test]
    fn a_json_answers_usage_is_read_whatever_form_its_counts_take() {
        let tokens = |body: &'static str| {
            let mut s = UsageScanner::new(false, false);
            s.feed(&Bytes::from_static(body.as_bytes()), true);
            s.tokens_known().then(|| s.tokens())
        };
        let t = |prompt, completion, total| {
            Some(Tokens {
                prompt,
                completion,
                total,
            })
        };
        let chat = r#"{"choices":[{"message":{"content":"\"usage\": 1"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":null}}"#;
        assert_eq!(tokens(chat), t(12, 5, 17));
        assert_eq!(
            tokens(r#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
            t(3, 4, 7)
        );
        // Only the outermost object's `usage` counts, wherever it stands.
        let first = r#"{"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":9}}}"#;
        assert_eq!(tokens(first), t(1, 0, 1));
        let last = r#"{"x":{"usage":{"prompt_tokens":9}},"usage":{"prompt_tokens":1}} "#;
        assert_eq!(tokens(last), t(1, 0, 1));
        assert_eq!(tokens(r#"{"x":{"usage":{"prompt_tokens":9}}}"#), None);
        // A count that is no whole number is read as missing, as in a stream's usage event.
        assert_eq!(
            tokens(r#"{"usage":{"prompt_tokens":2,"completion_tokens":1.5}}"#),
            t(2, 0, 2)
        );
        assert_eq!(tokens(r#"{"usage":{"prompt_tokens":-1}}"#), None);
        assert_eq!(tokens(r#"{"usage":null,"choices":[]}"#), None);
        assert_eq!(tokens(r#"{"choices":[]}"#), None);
    }

    #[test]
    fn anthropic_streams_give_their_usage_and_end() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":38,\"output_tokens\":0}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"},\"index\":0}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":20}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let mut s = UsageScanner::new(true, false);
        let out = feed_all(&mut s, body);
        assert_eq!(out, body, "passed through unchanged");
        assert_eq!(
            s.tokens(),
            Tokens {
                prompt: 38,
                completion: 20,
                total: 58
            }
        );
        assert!(s.tokens_known() && s.completed());
        // A whole message's usage.
        let mut s = UsageScanner::new(false, false);
        let json = Bytes::from_static(
            br#"{"type":"message","content":[],"usage":{"input_tokens":4,"output_tokens":2}}"#,
        );
        s.feed(&json, true);
        assert_eq!(s.tokens().total, 6);
    }
}
