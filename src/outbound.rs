//! Shared by the clients of other services (Globus Auth, Groups, Compute, JWKS).

/// A short description of a transport error. Tokens travel in bodies and headers, never in
/// URLs, so the text cannot hold one.
pub fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        e.to_string()
    }
}
