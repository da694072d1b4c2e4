//! Why a token was not accepted. Messages never contain the token.

/// An authentication or authorization failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing bearer token")]
    MissingToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("malformed Authorization header")]
    MalformedHeader,
    /// Unknown, revoked, or badly signed.
    #[error("token is not active or invalid")]
    InvalidToken,
    #[error("token expired")]
    Expired,
    /// The token is valid but not for this service (scope, audience, issuer).
    #[error("token not issued for this service: {0}")]
    WrongAudience(String),
    /// A valid user the facility's rules do not admit; `rule` names the rule.
    #[error("{message}")]
    Forbidden { rule: &'static str, message: String },
    /// The identity provider could not be asked (only for tokens not in the cache).
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
    /// More new tokens arrived than the gateway checks per second (`max_introspections_per_
    /// second`); not cached, the next request asks again.
    #[error("too many new tokens to check right now")]
    Throttled,
}

impl AuthError {
    pub fn forbidden(rule: &'static str, message: impl Into<String>) -> Self {
        AuthError::Forbidden {
            rule,
            message: message.into(),
        }
    }
}
