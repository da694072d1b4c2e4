//! Reading token usage out of a response as it passes: the `usage` object of a JSON answer,
//! or of the final SSE chunk of a stream. When the gateway injected `include_usage` for a
//! client that did not ask, the usage-only chunk is removed from what the client receives.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Largest JSON answer kept to read its usage (bigger ones are passed on, not parsed).
const MAX_JSON: usize = 4 * 1024 * 1024;

/// Token counts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

impl Tokens {
    /// The `usage` of a whole completion (missing counts are 0).
    pub fn of_completion(completion: &Value) -> Tokens {
        let u = &completion["usage"];
        let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
        let completion = u["completion_tokens"].as_u64().unwrap_or(0);
        Tokens {
            prompt,
            completion,
            total: u["total_tokens"].as_u64().unwrap_or(prompt + completion),
        }
    }
}

/// Follows one response body.
#[derive(Debug, Default)]
pub struct UsageScanner {
    stream: bool,
    /// Remove the usage-only chunk (the client did not ask for it).
    strip_usage: bool,
    /// Unparsed tail of the SSE text, or the JSON body so far.
    pending: BytesMut,
    usage: Option<Tokens>,
    /// Chunks that carried generated content (an estimate of tokens when usage never came).
    content_chunks: u64,
    /// `data: [DONE]` seen, or the JSON body ended.
    pub finished: bool,
}

impl UsageScanner {
    pub fn new(stream: bool, strip_usage: bool) -> Self {
        UsageScanner {
            stream,
            strip_usage,
            ..UsageScanner::default()
        }
    }

    /// Feeds one body chunk; returns what to send to the client instead of it.
    pub fn feed(&mut self, chunk: &Bytes, end: bool) -> Option<Bytes> {
        if !self.stream {
            if self.pending.len() + chunk.len() <= MAX_JSON {
                self.pending.extend_from_slice(chunk);
            }
            if end {
                self.finished = true;
                if let Ok(v) = serde_json::from_slice::<Value>(&self.pending) {
                    self.usage = tokens_of(&v["usage"]);
                }
                self.pending.clear();
            }
            return None;
        }
        self.pending.extend_from_slice(chunk);
        // Complete events end with a blank line. Without stripping, the chunk goes on
        // unchanged and only complete events are read; with stripping, complete events are
        // sent (minus the usage-only one) and an incomplete tail waits for the next chunk.
        let mut out = self.strip_usage.then(BytesMut::new);
        let mut consumed = 0;
        while let Some(at) = find(&self.pending[consumed..], b"\n\n") {
            let event = self.pending[consumed..consumed + at + 2].to_vec();
            let keep = self.event(&event);
            if let (Some(o), true) = (out.as_mut(), keep) {
                o.extend_from_slice(&event);
            }
            consumed += at + 2;
        }
        let _ = self.pending.split_to(consumed);
        if end {
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(&self.pending);
            }
            self.pending.clear();
        }
        out.map(BytesMut::freeze)
    }

    /// Reads one event; false when it is to be dropped.
    fn event(&mut self, event: &[u8]) -> bool {
        let text = String::from_utf8_lossy(event);
        let Some(data) = text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
        else {
            return true;
        };
        if data == "[DONE]" {
            self.finished = true;
            return true;
        }
        // Most events are content chunks: recognise them without parsing the JSON.
        if !data.contains("\"usage\"") {
            let empty = data.contains("\"content\":\"\"") || data.contains("\"text\":\"\"");
            let content = data.contains("\"content\":\"") || data.contains("\"text\":\"");
            if content && !empty {
                self.content_chunks += 1;
            }
            return true;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return true;
        };
        if let Some(t) = tokens_of(&v["usage"]) {
            self.usage = Some(t);
            let usage_only = v["choices"].as_array().is_none_or(Vec::is_empty);
            if usage_only && self.strip_usage {
                return false;
            }
        }
        let has_content = v["choices"].as_array().into_iter().flatten().any(|c| {
            c["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
                || c["text"].as_str().is_some_and(|s| !s.is_empty())
        });
        if has_content {
            self.content_chunks += 1;
        }
        true
    }

    /// The usage reported, or for a stream cut short, the content chunks counted so far.
    pub fn tokens(&self) -> Tokens {
        self.usage.unwrap_or(Tokens {
            prompt: 0,
            completion: self.content_chunks,
            total: self.content_chunks,
        })
    }

    /// Whether the usage chunk is removed (the body changes length).
    pub fn strips(&self) -> bool {
        self.stream && self.strip_usage
    }
}

fn tokens_of(v: &Value) -> Option<Tokens> {
    let prompt = v["prompt_tokens"].as_u64()?;
    let completion = v["completion_tokens"].as_u64().unwrap_or(0);
    Some(Tokens {
        prompt,
        completion,
        total: v["total_tokens"].as_u64().unwrap_or(prompt + completion),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
