//! OpenAI protocol pieces the gateway needs: the error envelope every client-visible error uses,
//! and validation of the few control fields the gateway reads from a request body (everything
//! else is forwarded verbatim).

mod control;
mod error;

pub use control::{parse_control_fields, ControlFields, RESERVED_FIELDS};
pub use error::ApiError;
