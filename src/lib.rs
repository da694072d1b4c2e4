//! firstgate: an OpenAI-compatible inference gateway for HPC facilities, built on Pingora.
//!
//! The modules, in the order a request meets them:
//!
//! - `edge`: the client connection from accept to its request (admission, TLS, deadlines),
//!   who the client is behind trusted proxies, maintenance, draining.
//! - `proxy`: one request's trip through Pingora's phases; calls into everything below.
//! - `auth`: who the request is from (Globus introspection or JWT, cached) and whether the
//!   facility's rules let them in.
//! - `openai`: the protocol pieces: the control fields of a body, the error envelope, streams.
//! - `catalog`: the clusters, frameworks, models and their deployments with live state, and
//!   `model_name`, how model names are matched.
//! - `policy`: the Rhai route and scale policies that decide where a request goes.
//! - `compute`: Globus Compute, for cold models and the clusters' instance lifecycle.
//! - `usage`: token usage, records and their store, rate limits, the access log.
//! - `metrics`: the Prometheus registry every module reports to.
//! - `admin`: listings for the API and the admin listener (health, readiness, metrics).
//!
//! Around them: `config` (the YAML, parsed and checked once), `server` (the services
//! assembled), `pem` and `outbound` (shared by clients of other services), and with the `sim`
//! feature, `sim` (simulators of vLLM and Globus) and `demo` (everything on one machine).

pub mod activity;
pub mod admin;
pub mod auth;
pub mod batch;
pub mod catalog;
pub mod compute;
pub mod config;
#[cfg(feature = "sim")]
pub mod demo;
pub mod edge;
pub mod loadtest;
pub mod logging;
pub mod metrics;
pub mod model_name;
pub mod openai;
pub mod outbound;
pub mod pem;
pub mod pg;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod sql;
pub mod state;
pub mod svg;
pub mod trace_context;
pub mod usage;
