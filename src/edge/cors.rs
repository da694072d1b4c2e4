//! Cross-origin requests from browsers (CORS): which origins may call the API from a web page,
//! the answer to a browser's preflight `OPTIONS`, and the headers every answer then carries.
//!
//! Tokens travel in the `Authorization` header, never in cookies, so allowing every origin
//! (`*`, FIRST's and OpenAI's choice) lets no page act with a user's credentials that it does
//! not already hold.

use crate::config::CorsConfig;
use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;
use std::time::Duration;

/// Headers a page may read from an answer (besides the CORS-safelisted ones).
pub const EXPOSED_HEADERS: &str =
    "x-request-id, traceparent, retry-after, x-firstgate-route, x-firstgate-task";

/// Request headers a preflight may ask for when it does not list its own.
const ALLOWED_HEADERS: &str = "authorization, content-type, traceparent, x-request-id";

/// The CORS policy of the API listeners.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Origins,
    max_age: Duration,
}

#[derive(Debug, Clone)]
enum Origins {
    Any,
    /// Exact `scheme://host[:port]` values, as browsers send them.
    Listed(Vec<String>),
}

/// What a preflight gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Preflight {
    /// 204 with these headers.
    Allowed(Vec<(HeaderName, HeaderValue)>),
    /// The origin is not allowed (or there is no `Origin`).
    Refused,
}

impl Cors {
    /// `None` when no origin is allowed (CORS off: preflights get 405 as before).
    pub fn new(config: &CorsConfig) -> Option<Cors> {
        let origins = if config.allowed_origins.iter().any(|o| o == "*") {
            Origins::Any
        } else if config.allowed_origins.is_empty() {
            return None;
        } else {
            Origins::Listed(
                config
                    .allowed_origins
                    .iter()
                    .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                    .collect(),
            )
        };
        Some(Cors {
            origins,
            max_age: config.max_age,
        })
    }

    /// What an answer to a request from this `Origin` carries, if the origin is allowed.
    pub fn allow_origin(&self, headers: &HeaderMap) -> Option<AllowedOrigin> {
        let origin = headers.get(http::header::ORIGIN)?;
        let value = match &self.origins {
            Origins::Any => HeaderValue::from_static("*"),
            Origins::Listed(list) => {
                let asked = origin.to_str().ok()?.to_ascii_lowercase();
                if !list.contains(&asked) {
                    return None;
                }
                origin.clone()
            }
        };
        Some(AllowedOrigin {
            value,
            varies: matches!(self.origins, Origins::Listed(_)),
        })
    }

    /// The answer to a preflight for a path served with `allow` (the path's own methods).
    pub fn preflight(&self, headers: &HeaderMap, allow: &'static str) -> Preflight {
        let Some(allowed) = self.allow_origin(headers) else {
            return Preflight::Refused;
        };
        let asked_headers = headers
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or(HeaderValue::from_static(ALLOWED_HEADERS));
        let mut out = vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed.value),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(allow),
            ),
            (header::ACCESS_CONTROL_ALLOW_HEADERS, asked_headers),
            (
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from(self.max_age.as_secs()),
            ),
        ];
        if allowed.varies {
            out.push((header::VARY, HeaderValue::from_static("Origin")));
        }
        Preflight::Allowed(out)
    }
}

/// The CORS headers of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin {
    value: HeaderValue,
    /// The value depends on the request's `Origin` (a list, not `*`): caches must know.
    varies: bool,
}

impl AllowedOrigin {
    /// `(name, value)` pairs to add to the answer.
    pub fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let vary = self
            .varies
            .then(|| (header::VARY, HeaderValue::from_static("Origin")));
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, self.value.clone()),
            (
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED_HEADERS),
            ),
        ]
        .into_iter()
        .chain(vary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Option<Cors> {
        Cors::new(&CorsConfig {
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            max_age: Duration::from_secs(600),
        })
    }

    fn from(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        h
    }

    #[test]
    fn any_origin_is_star_and_listed_origins_are_echoed() {
        let any = cors(&["*"]).unwrap();
        let value = |a: Option<AllowedOrigin>| a.map(|a| a.value);
        assert_eq!(
            value(any.allow_origin(&from("https://x.org"))).unwrap(),
            "*"
        );
        assert!(any.allow_origin(&HeaderMap::new()).is_none());
        let listed = cors(&["https://chat.alcf.anl.gov/"]).unwrap();
        let allowed = listed.allow_origin(&from("https://chat.alcf.anl.gov"));
        assert_eq!(value(allowed.clone()).unwrap(), "https://chat.alcf.anl.gov");
        assert!(allowed
            .unwrap()
            .headers()
            .any(|(n, v)| n == "vary" && v == "Origin"));
        assert!(listed.allow_origin(&from("https://evil.example")).is_none());
        assert!(cors(&[]).is_none());
    }

    #[test]
    fn preflight_names_methods_headers_and_age() {
        let any = cors(&["*"]).unwrap();
        let mut h = from("https://x.org");
        h.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization, content-type".parse().unwrap(),
        );
        let Preflight::Allowed(headers) = any.preflight(&h, "POST") else {
            panic!("refused")
        };
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("access-control-allow-methods").unwrap(), "POST");
        assert_eq!(
            get("access-control-allow-headers").unwrap(),
            "authorization, content-type"
        );
        assert_eq!(get("access-control-max-age").unwrap(), "600");
        let listed = cors(&["https://a.org"]).unwrap();
        assert_eq!(
            listed.preflight(&from("https://b.org"), "GET"),
            Preflight::Refused
        );
    }
}
