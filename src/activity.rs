//! What happened recently, for the operator's page on the admin listener: the last refusals
//! and errors the gateway answered (with their request ids), counts by kind since the start,
//! and the scale actions the policy took and why. Bounded rings; recording is a short lock and
//! happens only for refusals, errors and scale actions, never for a request that succeeds.

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// How many of each kind of event are kept.
const KEPT: usize = 50;

/// A request the gateway refused or failed itself.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// Unix seconds.
    pub at: u64,
    pub status: u16,
    /// The error code (`rate_limit_exceeded`, `model_not_found`, ...), or the limit's name
    /// for a 429.
    pub code: String,
    pub request_id: String,
    /// The username, once known.
    pub user: String,
    pub path: String,
}

/// A scale action the policy took.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    pub at: u64,
    pub model: String,
    /// `start 1 on sophia`, `stop host:port`.
    pub action: String,
    /// The policy's inputs that led to it (demand, waiting requests, instances).
    pub why: String,
}

/// The recent events.
#[derive(Default)]
pub struct Activity {
    refusals: Mutex<VecDeque<Refusal>>,
    by_kind: Mutex<BTreeMap<String, u64>>,
    scale: Mutex<VecDeque<ScaleEvent>>,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn push<T>(ring: &Mutex<VecDeque<T>>, item: T) {
    let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
    if ring.len() == KEPT {
        ring.pop_front();
    }
    ring.push_back(item);
}

impl Activity {
    pub fn refused(&self, r: Refusal) {
        *self
            .by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(r.code.clone())
            .or_default() += 1;
        push(&self.refusals, r);
    }

    pub fn scaled(&self, e: ScaleEvent) {
        push(&self.scale, e);
    }

    /// The recent refusals, newest first, and the counts by kind since the start.
    pub fn refusals(&self) -> (Vec<Refusal>, BTreeMap<String, u64>) {
        let recent = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let kinds = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().rev().cloned().collect(), kinds.clone())
    }

    /// The recent scale actions, newest first.
    pub fn scale_actions(&self) -> Vec<ScaleEvent> {
        let ring = self.scale.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().cloned().collect()
    }
}
