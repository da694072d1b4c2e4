//! The error envelopes: OpenAI's `{"error": {"message", "type", "code", "param"}}`; on the
//! Anthropic Messages API, Anthropic's `{"type": "error", "error": {"type", "message"}}`; on
//! FIRST's own batch and relay routes, FIRST's `{"error": {"code", "message", "info"}}`. One
//! typed error, one rendering per envelope.
//!
//! OpenAI SDKs pick their exception from the HTTP status (400 `BadRequestError`, 401
//! `AuthenticationError`, 403 `PermissionDeniedError`, 404 `NotFoundError`, 422
//! `UnprocessableEntityError`, 429 `RateLimitError`, 5xx `InternalServerError`), and show
//! `message`; `code` carries FIRST's error codes so existing FIRST clients keep working.

use bytes::Bytes;
use serde_json::json;

/// An error answered to the client. Messages say what to fix and never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// Methods for an `Allow` header (405).
    pub allow: Option<&'static str>,
    /// The limit a 429 hit, for an `x-firstgate-limit` header (load tests report it).
    pub limit: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            allow: None,
            limit: None,
        }
    }

    /// 400 for a request the client must change.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request", message)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 405 for a path served with another method.
    pub fn method_not_allowed(allow: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(405, "method_not_allowed", message)
        }
    }

    /// The OpenAI `type` for this status.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "code": self.code,
                "param": self.param,
            }
        });
        Bytes::from(v.to_string())
    }

    /// The JSON body in the envelope of the API the client speaks.
    pub fn body_for(&self, envelope: super::Envelope) -> Bytes {
        match envelope {
            super::Envelope::OpenAi => self.body(),
            super::Envelope::Anthropic => self.anthropic_body(),
            super::Envelope::First => {
                let v = json!({"error": {"code": self.code, "message": self.message, "info": {}}});
                Bytes::from(v.to_string())
            }
        }
    }

    /// Anthropic's envelope. The `anthropic` SDKs pick their exception from the status (400
    /// `BadRequestError`, 401 `AuthenticationError`, 403 `PermissionDeniedError`, 404
    /// `NotFoundError`, 413, 429 `RateLimitError`, 5xx `InternalServerError`); the `type` is
    /// Anthropic's for that status. FIRST's code stays readable in `error.code`.
    fn anthropic_body(&self) -> Bytes {
        let kind = match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        };
        let v = json!({
            "type": "error",
            "error": {"type": kind, "message": self.message, "code": self.code},
        });
        Bytes::from(v.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_the_four_fields() {
        let e = ApiError::new(404, "endpoint_not_found", "no such model").with_param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "no such model");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "endpoint_not_found");
        assert_eq!(v["error"]["param"], "model");
    }
}
