//! Answers the gateway gives without a backend: model and endpoint listings on the API
//! listener, and health, readiness, metrics, the maintenance switch and the operator's page
//! on the admin listener.

pub mod listings;
mod page;
mod service;

pub use page::OperatorPage;
pub use service::{AdminApp, ADMIN_HEADER};
