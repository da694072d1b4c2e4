//! Usage: one record per request (exact tokens from the backend's `usage`), written off the
//! request path; per-user totals for `GET /resource_server/usage`; rate limits.

mod access_log;
mod limits;
mod record;
mod scan;
pub mod sink;

pub use access_log::AccessLog;
pub use limits::{
    InFlightPermit, LimitSettings, Limited, Limits, MemoryLimits, RequestCaps, TokenReservation,
};
pub use record::{Ending, Meter, UsageRecord};
pub use scan::{Tokens, UsageScanner};
pub use sink::{MemorySink, SqliteSink, Totals, UsageSink};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Requests and tokens per user and model since the store began (loaded at start, then kept
/// up to date in memory, so answering a user never touches the database).
#[derive(Default)]
pub struct UsageTotals(Mutex<HashMap<String, HashMap<String, Totals>>>);

impl UsageTotals {
    pub fn load(rows: Vec<Totals>) -> Self {
        let mut map: HashMap<String, HashMap<String, Totals>> = HashMap::new();
        for t in rows {
            map.entry(t.username.clone())
                .or_default()
                .insert(t.model.clone(), t);
        }
        UsageTotals(Mutex::new(map))
    }

    pub fn add(&self, r: &UsageRecord) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed by user, then model: a known pair is found without building a key.
        let t = match map.get_mut(&r.username) {
            Some(models) => models,
            None => map.entry(r.username.clone()).or_default(),
        };
        let t = match t.get_mut(&r.model) {
            Some(t) => t,
            None => t.entry(r.model.clone()).or_insert_with(|| Totals {
                username: r.username.clone(),
                model: r.model.clone(),
                ..Totals::default()
            }),
        };
        // Every request counts, with or without tokens; absurd counts saturate.
        t.requests += 1;
        t.prompt_tokens = t.prompt_tokens.saturating_add(r.prompt_tokens);
        t.completion_tokens = t.completion_tokens.saturating_add(r.completion_tokens);
        t.total_tokens = t.total_tokens.saturating_add(r.total_tokens);
    }

    /// One user's totals per model.
    pub fn of(&self, username: &str) -> Vec<Totals> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Totals> = map
            .get(username)
            .map(|models| models.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

/// Everything the request path needs for usage: the sink, the totals, the limits and the
/// access log.
pub struct Accounting {
    pub sink: Option<std::sync::Arc<dyn UsageSink>>,
    pub totals: UsageTotals,
    pub limits: Box<dyn Limits>,
    /// The largest body and the token estimate of a request without `max_tokens`.
    pub caps: RequestCaps,
    /// The access log, when enabled.
    pub access_log: Option<AccessLog>,
    /// Request bodies go into the access log too.
    pub log_prompts: bool,
}

/// One access-log line: the record's fields, the client's address, and the body if asked.
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    #[serde(flatten)]
    record: &'a UsageRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_body: Option<std::borrow::Cow<'a, str>>,
}

impl Accounting {
    /// Records a finished request: totals, the sink, the access log (which also names the
    /// client's address, as resolved behind trusted proxies).
    pub fn finish(&self, r: UsageRecord, prompt: Option<&[u8]>, client: Option<IpAddr>) {
        self.totals.add(&r);
        if let Some(log) = &self.access_log {
            let line = AccessLine {
                record: &r,
                client,
                request_body: prompt
                    .filter(|_| self.log_prompts)
                    .map(String::from_utf8_lossy),
            };
            log.write_json(&line);
        }
        if let Some(sink) = &self.sink {
            sink.record(r);
        }
    }

    /// Writes the records and access-log lines handed over so far; waits at most `limit` for
    /// each.
    pub fn flush(&self, limit: std::time::Duration) {
        if let Some(sink) = &self.sink {
            sink.flush(limit);
        }
        if let Some(log) = &self.access_log {
            log.flush(limit);
        }
    }
}
