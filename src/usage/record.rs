//! One usage record per request.

use serde::{Deserialize, Serialize};

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
