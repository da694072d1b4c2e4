//! OpenAI protocol pieces the gateway needs: the error envelope every client-visible error uses,
//! validation of the few control fields the gateway reads from a request body (everything
//! else is forwarded verbatim), server-sent events as they arrive, and streams built from whole
//! completions.

mod control;
mod endpoint;
mod error;
pub mod sse;
mod stream;

pub use control::{parse_control_fields, ControlFields, RESERVED_FIELDS};
pub use endpoint::{Endpoint, Envelope, Framing};
pub use error::ApiError;
pub use stream::{completion_events, END};
