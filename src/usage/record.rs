//! One usage record per request, and the measurements it is made of.

use super::{Tokens, UsageScanner};
use serde::{Deserialize, Serialize};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// What one request used. Never holds the token, the prompt or the completion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub request_id: String,
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
        }
    }

    /// The request's tokens: its answer's own usage, or what the scanner read of the response.
    pub fn tokens(&self) -> Tokens {
        self.answered
            .or_else(|| self.scanner.as_ref().map(UsageScanner::tokens))
            .unwrap_or_default()
    }

    /// Whether a 200 answer was cut short: by an error, or a stream that did not reach its end.
    pub fn cancelled(&self, status: u16, failed: bool, stream: bool) -> bool {
        let finished = self.scanner.as_ref().is_some_and(|s| s.finished);
        status == 200 && (failed || (stream && !finished))
    }

    /// Time to the first response byte, in milliseconds.
    pub fn ttft_ms(&self) -> Option<u64> {
        self.first_byte
            .map(|f| (f - self.started).as_millis() as u64)
    }
}
