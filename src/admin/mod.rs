//! Answers the gateway gives without a backend: model and endpoint listings on the API
//! listener, and health, readiness, metrics
//! and the maintenance switch on the admin listener.

pub mod listings;
mod service;

pub use service::{AdminApp, ADMIN_HEADER};
