//! What a route policy sees: the request and the candidate deployments, as plain data the
//! gateway builds per request (or `firstgate policy test` reads from JSON).

use crate::catalog::affinity;
pub use crate::config::Routing;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The request, as the route policy sees it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteRequest {
    pub model: String,
    /// `chat/completions`, `completions` or `embeddings`.
    pub endpoint: String,
    pub stream: bool,
    /// The cluster and framework of FIRST's URL layout; empty on the federated `/v1` routes.
    pub cluster: String,
    pub framework: String,
    pub user: UserView,
    /// Size of the request body: a rough measure of the prompt.
    pub prompt_bytes: i64,
    /// A line of a batch (`/v1/batches`), run at background priority: a policy may send
    /// batch lines elsewhere than interactive requests, or refuse them.
    pub batch: bool,
    /// Request headers named `x-*` (lower-case), other than credentials.
    pub headers: BTreeMap<String, String>,
    /// A hash of the prompt's start (system prompt and leading messages, `upstream.prefix_tokens`
    /// tokens' worth): equal for prompts that start alike. Absent without a prompt.
    pub prefix: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub domain: String,
    pub groups: Vec<String>,
}

/// A deployment's state, as FIRST names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentState {
    /// At least one instance is healthy.
    Hot,
    /// An instance is being started (job running, model loading).
    Starting,
    /// An instance was requested and its job waits in the queue.
    Queued,
    /// Nothing is running, but it can be started.
    Cold,
    /// Nothing is running and nothing can be started.
    Offline,
    /// The cluster is in maintenance.
    Maintenance,
}

impl DeploymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Hot => "hot",
            DeploymentState::Starting => "starting",
            DeploymentState::Queued => "queued",
            DeploymentState::Cold => "cold",
            DeploymentState::Offline => "offline",
            DeploymentState::Maintenance => "maintenance",
        }
    }
}

/// One backend instance of a candidate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceView {
    /// `host:port`.
    pub id: String,
    #[serde(default = "healthy")]
    pub healthy: bool,
    #[serde(default)]
    pub in_flight: i64,
    /// Recent request duration in milliseconds (0: unknown).
    #[serde(default)]
    pub latency_ms: i64,
    /// Seconds until the instance's batch job ends; absent for static backends.
    #[serde(default)]
    pub ends_in: Option<i64>,
    /// What the instance itself last reported (vLLM's `/metrics`): requests in its queue and
    /// running, KV-cache use (0..1), prefix-cache hit rate (0..1), and how old the figures are
    /// in milliseconds (absent: never read).
    #[serde(default)]
    pub waiting: i64,
    #[serde(default)]
    pub running: i64,
    #[serde(default)]
    pub kv_cache: Option<f64>,
    #[serde(default)]
    pub prefix_hit_rate: Option<f64>,
    #[serde(default)]
    pub metrics_age_ms: Option<i64>,
    /// The address the gateway connects to (not in policy-test JSON).
    #[serde(skip)]
    pub socket: Option<SocketAddr>,
}

fn healthy() -> bool {
    true
}

impl Default for InstanceView {
    /// A healthy instance with nothing known about its load.
    fn default() -> Self {
        InstanceView {
            id: String::new(),
            healthy: true,
            in_flight: 0,
            latency_ms: 0,
            ends_in: None,
            waiting: 0,
            running: 0,
            kv_cache: None,
            prefix_hit_rate: None,
            metrics_age_ms: None,
            socket: None,
        }
    }
}

fn default_slack() -> f64 {
    0.5
}

/// One deployment of the requested model the user may use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub cluster: String,
    pub framework: String,
    pub state: DeploymentState,
    #[serde(default)]
    pub instances: Vec<InstanceView>,
    /// Whether the model can also run through Globus Compute on this cluster.
    #[serde(default)]
    pub compute: bool,
    /// How `direct(...)` spreads requests over its instances (`upstream.routing`).
    #[serde(default)]
    pub routing: Routing,
    /// Prefix affinity's load slack (`upstream.affinity_slack`).
    #[serde(default = "default_slack")]
    pub affinity_slack: f64,
    /// Position in the list the gateway built (not in policy-test JSON).
    #[serde(skip)]
    pub index: usize,
}

impl Candidate {
    pub fn healthy_instances(&self) -> impl Iterator<Item = &InstanceView> {
        self.instances.iter().filter(|i| i.healthy)
    }

    /// Requests in the healthy instances' own queues (as they last reported).
    pub fn waiting(&self) -> i64 {
        self.healthy_instances().map(|i| i.waiting).sum()
    }

    /// Requests the healthy instances run (as they last reported).
    pub fn running(&self) -> i64 {
        self.healthy_instances().map(|i| i.running).sum()
    }

    /// Mean KV-cache use of the healthy instances that report it.
    pub fn kv_cache(&self) -> Option<f64> {
        mean(self.healthy_instances().filter_map(|i| i.kv_cache))
    }

    /// Mean prefix-cache hit rate of the healthy instances that report one.
    pub fn prefix_hit_rate(&self) -> Option<f64> {
        mean(self.healthy_instances().filter_map(|i| i.prefix_hit_rate))
    }

    /// Age of the oldest figures among the healthy instances (absent: none ever read).
    pub fn metrics_age_ms(&self) -> Option<i64> {
        self.healthy_instances()
            .filter_map(|i| i.metrics_age_ms)
            .max()
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

/// A list of candidates, cheap to clone and narrow in a script.
pub type Candidates = Arc<Vec<Arc<Candidate>>>;

/// Where the policy sends the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    /// Proxy to the deployment `index` of the candidates; to `instance` if it still has room.
    Direct {
        #[serde(skip)]
        index: usize,
        cluster: String,
        framework: String,
        instance: Option<String>,
        /// The instance was chosen by prefix affinity (else: fewest in flight).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        by_prefix: bool,
        /// The candidates (by index) the instance was chosen among, in order, so that a
        /// decision reused for a like request chooses again on the loads of its moment
        /// (`policy::memo`); empty where the choice was by prefix.
        #[serde(skip)]
        among: Vec<usize>,
    },
    /// Run through Globus Compute on this deployment's cluster.
    Compute {
        #[serde(skip)]
        index: usize,
        cluster: String,
        framework: String,
    },
    /// Refuse with this status and message.
    Reject { status: u16, message: String },
}

/// The healthy instance with the fewest requests in flight across `candidates` (ties: lower
/// recent latency, then list order), with its candidate.
pub fn least_in_flight<'a>(
    candidates: impl IntoIterator<Item = &'a Candidate>,
) -> Option<(&'a Candidate, &'a InstanceView)> {
    candidates
        .into_iter()
        .flat_map(|c| c.healthy_instances().map(move |i| (c, i)))
        .min_by_key(|(_, i)| (i.in_flight, i.latency_ms))
}

/// `direct(...)` over a list: its least-loaded healthy instance; with none healthy, the first
/// candidate (the gateway then answers 503 naming it); with no candidate, a 503 rejection.
pub fn direct(candidates: &[Arc<Candidate>], model: &str) -> Decision {
    direct_among(candidates.iter().map(|c| &**c), model)
}

/// [`direct`] over any selection of candidates.
pub fn direct_among<'a>(
    candidates: impl Iterator<Item = &'a Candidate> + Clone,
    model: &str,
) -> Decision {
    let among = || candidates.clone().map(|c| c.index).collect();
    if let Some((c, i)) = least_in_flight(candidates.clone()) {
        return Decision::Direct {
            index: c.index,
            cluster: c.cluster.clone(),
            framework: c.framework.clone(),
            instance: Some(i.id.clone()),
            by_prefix: false,
            among: among(),
        };
    }
    match candidates.clone().next() {
        Some(c) => Decision::Direct {
            index: c.index,
            cluster: c.cluster.clone(),
            framework: c.framework.clone(),
            instance: None,
            by_prefix: false,
            among: among(),
        },
        None => no_candidate(model),
    }
}

/// `direct(...)` as the candidates are configured: by prefix affinity when the first of them
/// uses it (`upstream.routing`) and the request has a prompt, else the least-loaded instance.
pub fn direct_routed<'a>(
    candidates: impl Iterator<Item = &'a Candidate> + Clone,
    model: &str,
    prefix: Option<u64>,
) -> Decision {
    let by_prefix = candidates
        .clone()
        .next()
        .is_some_and(|c| c.routing == Routing::PrefixAffinity);
    match prefix {
        Some(key) if by_prefix => direct_by_prefix(candidates, model, key),
        _ => direct_among(candidates, model),
    }
}

/// `direct_by_prefix(...)`: the healthy instance for the prompt key `key`: where the key was
/// placed, within bounded load (see `catalog::affinity`); when every instance is over a bound,
/// the least-loaded one.
pub fn direct_by_prefix<'a>(
    candidates: impl Iterator<Item = &'a Candidate> + Clone,
    model: &str,
    key: u64,
) -> Decision {
    let healthy: Vec<(&Candidate, &InstanceView)> = candidates
        .clone()
        .flat_map(|c| c.healthy_instances().map(move |i| (c, i)))
        .collect();
    let members: Vec<affinity::Member<'_>> = healthy
        .iter()
        .map(|(_, i)| affinity::Member {
            id: &i.id,
            in_flight: i.in_flight,
            waiting: i.waiting,
        })
        .collect();
    let slack = healthy.first().map_or(2.0, |(c, _)| c.affinity_slack);
    // Two models with the same prompt have their own homes.
    let key = model
        .bytes()
        .fold(key, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    match affinity::PLACEMENTS.pick(key, &members, slack) {
        Some(k) => {
            let (c, i) = healthy[k];
            Decision::Direct {
                index: c.index,
                cluster: c.cluster.clone(),
                framework: c.framework.clone(),
                instance: Some(i.id.clone()),
                by_prefix: true,
                among: Vec::new(),
            }
        }
        None => direct_among(candidates, model),
    }
}

/// `compute(...)` over a list: the first candidate that has a compute fallback.
pub fn compute(candidates: &[Arc<Candidate>], model: &str) -> Decision {
    compute_among(candidates.iter().map(|c| &**c), model)
}

/// [`compute`] over any selection of candidates.
pub fn compute_among<'a>(
    mut candidates: impl Iterator<Item = &'a Candidate>,
    model: &str,
) -> Decision {
    match candidates.find(|c| c.compute) {
        Some(c) => Decision::Compute {
            index: c.index,
            cluster: c.cluster.clone(),
            framework: c.framework.clone(),
        },
        None => Decision::Reject {
            status: 503,
            message: format!(
                "No running instance of {model} is available and none can be started through \
                 Globus Compute. Try again later."
            ),
        },
    }
}

fn no_candidate(model: &str) -> Decision {
    Decision::Reject {
        status: 503,
        message: format!("No instance of {model} is available to you right now. Try again later."),
    }
}
