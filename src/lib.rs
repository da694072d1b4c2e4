//! firstgate: an OpenAI-compatible inference gateway for HPC facilities, built on Pingora.
//!
//! Reading order: `config` (what operators write) → `auth` (who the request is from,
//! may they) → `catalog` (what exists and its live
//! state) → `openai` (protocol pieces) → `policy` (where a request goes) → `proxy` (one
//! request's trip through Pingora's phases) → `admin` (listings, health, metrics) → `server`
//! (how the services are assembled) → `demo` and `sim` (everything on one machine).

pub mod admin;
pub mod auth;
pub mod catalog;
pub mod compute;
pub mod config;
#[cfg(feature = "sim")]
pub mod demo;
pub mod edge;
pub mod metrics;
pub mod model_name;
pub mod openai;
pub mod outbound;
pub mod pem;
pub mod policy;
pub mod proxy;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod usage;
