//! Globus Compute: the client (token, submit, coalesced polling, rate limit), the byte formats,
//! and the cluster lifecycle that turns status reports into instances and scale actions into
//! start and stop tasks. Used only for what needs it: cold models, starting and stopping
//! instances, and status. Hot models are proxied directly.

mod client;
pub mod failure;
mod lifecycle;
mod pickle;
pub mod relay;
pub mod relay_redis;
pub mod serialize;

pub use client::{submit_body, uuid, uuid_from_bits, ComputeClient, ComputeError, EndpointStatus};
pub use lifecycle::{ClusterLifecycle, ScaleExecutor, TaskPoller};
