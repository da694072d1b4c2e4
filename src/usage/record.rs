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
