//! Simulators of the outside world that speak the real wire formats, for tests, benchmarks and
//! the demo. The gateway never imports them; they stand where vLLM and Globus would.

pub mod certs;
pub mod globus;
mod listener;
pub mod oidc;
pub mod vllm;

pub use listener::Listening;
