//! One usage record per request, and the measurements it is made of.

use super::{Tokens, UsageScanner};
use serde::{Deserialize, Serialize};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What one request used. Never holds the token, the prompt or the completion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub request_id: String,
    /// The W3C trace the request was part of (32 hex digits).
    #[serde(default)]
    pub trace_id: String,
    /// Unix time of arrival, in milliseconds.
    pub time_ms: i64,
    pub user_id: String,
    pub username: String,
    pub cluster: String,
    pub framework: String,
    pub model: String,
    /// `chat/completions`, `completions` or `embeddings`.
    pub endpoint: String,
    /// `direct` or `compute`.
    pub route: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Time to the first response byte, in milliseconds (absent if none came).
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `host:port` of the backend instance (direct route).
    pub instance: String,
    /// The client went away before the end of the answer.
    pub cancelled: bool,
    /// The backend (or the gateway) broke the answer off.
    #[serde(default)]
    pub failed: bool,
    /// The tokens are not the backend's own count: it reported none, or its answer was too
    /// large to read (then they are an estimate, or 0).
    #[serde(default)]
    pub tokens_unknown: bool,
    /// Sent by a load test (`x-firstgate-loadtest`); `firstgate usage` leaves it out by default.
    #[serde(default)]
    pub loadtest: bool,
    /// The batch this request was a line of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
}

impl UsageRecord {
    /// Writes the record as serde would (`{"request_id":...}`), without its closing brace, so
    /// that the access log can add fields. By hand because it runs once per request: the keys
    /// are constants and the values rarely need escaping, where serde_json checked every byte
    /// of both (half of a line's 7,500 instructions, docs/benchmarks.md). A unit test holds it
    /// to serde's output.
    pub(super) fn write_json_open(&self, out: &mut Vec<u8>) {
        let mut w = JsonFields(out);
        w.string("{\"request_id\":", &self.request_id);
        w.string(",\"trace_id\":", &self.trace_id);
        w.int(",\"time_ms\":", self.time_ms);
        w.string(",\"user_id\":", &self.user_id);
        w.string(",\"username\":", &self.username);
        w.string(",\"cluster\":", &self.cluster);
        w.string(",\"framework\":", &self.framework);
        w.string(",\"model\":", &self.model);
        w.string(",\"endpoint\":", &self.endpoint);
        w.string(",\"route\":", &self.route);
        w.int(",\"status\":", self.status);
        w.int(",\"prompt_tokens\":", self.prompt_tokens);
        w.int(",\"completion_tokens\":", self.completion_tokens);
        w.int(",\"total_tokens\":", self.total_tokens);
        match self.ttft_ms {
            Some(t) => w.int(",\"ttft_ms\":", t),
            None => w.raw(",\"ttft_ms\":null"),
        }
        w.int(",\"duration_ms\":", self.duration_ms);
        w.int(",\"bytes_in\":", self.bytes_in);
        w.int(",\"bytes_out\":", self.bytes_out);
        w.string(",\"instance\":", &self.instance);
        w.bool(",\"cancelled\":", self.cancelled);
        w.bool(",\"failed\":", self.failed);
        w.bool(",\"tokens_unknown\":", self.tokens_unknown);
        w.bool(",\"loadtest\":", self.loadtest);
        if let Some(batch) = &self.batch_id {
            w.string(",\"batch_id\":", batch);
        }
    }
}

/// JSON members written into a line: each call writes its key (given with its separator) and
/// value.
struct JsonFields<'a>(&'a mut Vec<u8>);

impl JsonFields<'_> {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    fn string(&mut self, key: &str, value: &str) {
        self.raw(key);
        // What JSON requires escaped: control characters, the quote and the backslash.
        let plain = value
            .bytes()
            .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
        if plain {
            self.0.push(b'"');
            self.raw(value);
            self.0.push(b'"');
        } else {
            serde_json::to_writer(&mut *self.0, value).expect("a string serialises");
        }
    }

    fn int(&mut self, key: &str, value: impl itoa::Integer) {
        self.raw(key);
        self.raw(itoa::Buffer::new().format(value));
    }

    fn bool(&mut self, key: &str, value: bool) {
        self.raw(key);
        self.raw(if value { "true" } else { "false" });
    }
}

/// Marks a request as part of a load test (`firstgate loadtest` sends it): its usage record is
/// tagged, and `firstgate usage` leaves it out unless asked.
pub const LOADTEST_HEADER: http::HeaderName = http::HeaderName::from_static("x-firstgate-loadtest");

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The answer was delivered whole (whatever its status).
    Complete,
    /// The client went away before the end of the answer.
    ClientLeft,
    /// The backend, or the gateway, broke the answer off.
    Failed,
}

/// What one request used, measured while it runs: the part of its record that is not who asked
/// and where it went.
#[derive(Debug)]
pub struct Meter {
    pub started: Instant,
    /// Unix time of arrival, in milliseconds.
    pub arrived_ms: i64,
    pub first_byte: Option<Instant>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Reads the usage of a proxied response as it passes.
    pub scanner: Option<UsageScanner>,
    /// Usage of an answer the gateway wrote itself (through Globus Compute).
    pub answered: Option<Tokens>,
    /// The client went away while the gateway wrote its answer itself.
    pub client_left: bool,
}

impl Meter {
    /// Starts measuring a request that arrived now.
    pub fn start() -> Self {
        Meter {
            started: Instant::now(),
            arrived_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            first_byte: None,
            bytes_in: 0,
            bytes_out: 0,
            scanner: None,
            answered: None,
            client_left: false,
        }
    }

    /// The request's tokens: its answer's own usage, or what the scanner read of the response.
    pub fn tokens(&self) -> Tokens {
        self.answered
            .or_else(|| self.scanner.as_ref().map(UsageScanner::tokens))
            .unwrap_or_default()
    }

    /// Whether the tokens are the backend's own count.
    pub fn tokens_known(&self) -> bool {
        self.answered.is_some() || self.scanner.as_ref().is_some_and(|s| s.tokens_known())
    }

    /// Time to the first response byte, in milliseconds.
    pub fn ttft_ms(&self) -> Option<u64> {
        self.first_byte
            .map(|f| (f - self.started).as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access log's writer gives serde's bytes, whatever the record holds.
    #[test]
    fn a_record_is_written_as_serde_writes_it() {
        let full = UsageRecord {
            request_id: "01a24fe2-fec9-7b91-8ba6-2563462c8065".into(),
            trace_id: "baef99eef0859ffeb31aa3d300d5260f".into(),
            time_ms: -1,
            user_id: "\u{7f} tab\t nul\u{0} quote\" backslash\\".into(),
            username: "zoë@anl.gov 日本".into(),
            cluster: "sophia".into(),
            framework: "vllm".into(),
            model: "meta-llama/Llama-3.3-70B-Instruct".into(),
            endpoint: "chat/completions".into(),
            route: "direct".into(),
            status: 503,
            prompt_tokens: u64::MAX,
            completion_tokens: 5,
            total_tokens: 17,
            ttft_ms: Some(299),
            duration_ms: 300,
            bytes_in: 115,
            bytes_out: 287,
            instance: "127.0.0.1:8000".into(),
            cancelled: true,
            failed: true,
            tokens_unknown: true,
            loadtest: true,
            batch_id: Some("batch_1\n".into()),
        };
        for record in [full, UsageRecord::default()] {
            let mut out = Vec::new();
            record.write_json_open(&mut out);
            out.push(b'}');
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&record).unwrap()
            );
        }
    }
}
