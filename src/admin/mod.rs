//! Answers the gateway gives without a backend: model and endpoint listings on the API
//! listener, and health, readiness, metrics, the maintenance switch and the operator's page
//! on the admin listener.

mod guard;
pub mod listings;
mod page;
mod service;

pub use guard::{AdminGuard, ADMIN_HEADER};
pub use page::OperatorPage;
pub use service::AdminApp;
