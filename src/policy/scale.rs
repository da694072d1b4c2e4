//! The scale hook's input and actions. The background service that asks the scale policy about
//! every model periodically hands the actions to a `ScaleActuator` (Globus Compute's start and
//! stop functions, `compute::ScaleExecutor`); without one they are logged and counted.

use serde::{Deserialize, Serialize};

/// Demand and instances of one model, as the scale policy sees them.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleInput {
    pub model: String,
    /// Clusters serving the model, in configuration order.
    pub clusters: Vec<String>,
    pub requests_per_minute: f64,
    /// Approximate prompt tokens per minute (request bytes / 4).
    pub tokens_per_minute: f64,
    /// Requests waiting for a free slot on a running instance now.
    pub waiting: i64,
    /// Requests running through Globus Compute now (no instance was hot).
    pub cold_waiting: i64,
    pub in_flight: i64,
    /// Requests waiting in the hot instances' own queues, and running there, as vLLM last
    /// reported them (`/metrics`; includes requests that did not come through this gateway).
    pub backend_waiting: i64,
    pub backend_running: i64,
    pub min_instances: i64,
    pub max_instances: i64,
    /// Seconds a started instance runs (its job's walltime).
    pub keep_hot: i64,
    /// Seconds an idle instance is kept before it may be released.
    pub idle_release: i64,
    /// Instances being started.
    pub starting: i64,
    pub instances: Vec<ScaleInstance>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleInstance {
    pub id: String,
    pub cluster: String,
    /// Seconds since the instance appeared.
    pub age: i64,
    /// Seconds since it last finished a request (0 while busy).
    pub idle: i64,
    /// Seconds until its job ends; absent for static backends.
    pub ends_in: Option<i64>,
    pub healthy: bool,
}

/// What the scale policy asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum ScaleAction {
    Start { cluster: String, count: u32 },
    Stop { instance: String },
}
