//! Which requests the admin listener answers: its routes drain the gateway, switch
//! maintenance on and name users, so a web page must not be able to steer them through an
//! operator's browser.
//!
//! - **Host**: a page that makes its own name resolve to 127.0.0.1 (DNS rebinding) sends
//!   requests that the browser treats as same-origin, with `Host: evil.example`. Every route but
//!   the probes' (`/health`, `/ready`) and Prometheus' (`/metrics`) answers only requests
//!   addressed to the listener's own address, the address the connection arrived on,
//!   `localhost`, `127.0.0.1`, `[::1]` or a name in `admin.allowed_hosts`.
//! - **Origin**: when a browser says which page sent the request, that page must be served by
//!   one of those hosts too (`Origin: null` is refused).
//! - **Changes** (`/drain`, `/maintenance`, `/reload`): `Content-Type: application/json` or an
//!   `X-Firstgate-Admin` header (a browser sends neither cross-site without a CORS preflight,
//!   which this listener never approves), not marked cross-site by `Sec-Fetch-Site`, and, with
//!   `admin.token_env`, `Authorization: Bearer <that token>`.

use http::{Response, StatusCode};
use pingora::http::RequestHeader;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};

/// The header that marks a request as not coming from a browser form.
pub const ADMIN_HEADER: &str = "x-firstgate-admin";

/// The admin listener's checks, built once from the configuration.
pub struct AdminGuard {
    /// Host names (lowercase, IPv6 in brackets) requests may be addressed to.
    hosts: Vec<String>,
    /// SHA-256 of the bearer token that routes changing state require, if any.
    token: Option<[u8; 32]>,
}

/// Routes answered whatever the `Host`: probes and Prometheus reach the listener by names the
/// gateway cannot know (a Service's DNS name, a pod IP), and these name no user and change
/// nothing.
const OPEN_ROUTES: [&str; 3] = ["/health", "/ready", "/metrics"];

impl AdminGuard {
    /// `listen` is the admin listener's address; `allowed_hosts` the configured extra names.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], token: Option<&str>) -> Self {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(String::from)
            .chain(allowed_hosts.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        if !listen.ip().is_unspecified() {
            hosts.push(ip_host(listen.ip()));
        }
        AdminGuard {
            hosts,
            token: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// The refusal for this request, if any. `local` is the address the connection arrived
    /// on; `changes` says whether the route changes state.
    pub fn refuse(
        &self,
        req: &RequestHeader,
        local: Option<IpAddr>,
        changes: bool,
    ) -> Option<Response<Vec<u8>>> {
        if !OPEN_ROUTES.contains(&req.uri.path()) {
            if let Some(refusal) = self.refuse_foreign(req, local) {
                return Some(refusal);
            }
        }
        if changes {
            return self.refuse_change(req);
        }
        None
    }

    fn allows(&self, host: &str, local: Option<IpAddr>) -> bool {
        let host = host.to_ascii_lowercase();
        self.hosts.contains(&host) || local.is_some_and(|ip| ip_host(ip) == host)
    }

    /// A request addressed to another name (DNS rebinding) or sent by another site's page.
    fn refuse_foreign(
        &self,
        req: &RequestHeader,
        local: Option<IpAddr>,
    ) -> Option<Response<Vec<u8>>> {
        let header = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
        // HTTP/2 carries the host in the URI's authority, HTTP/1.1 in `Host`. No host at all
        // is no browser's request.
        let host = req.uri.host().map(String::from).or_else(|| {
            header(http::header::HOST.as_str()).map(|h| {
                h.parse::<http::uri::Authority>()
                    .map_or(h.to_string(), |a| a.host().to_string())
            })
        });
        if let Some(host) = host.filter(|h| !self.allows(h, local)) {
            return Some(super::service::error(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                &format!(
                    "The admin listener answers requests addressed to {}; this one was addressed \
                     to '{host}'. If operators reach it by that name, add it to \
                     admin.allowed_hosts.",
                    self.hosts.join(", ")
                ),
            ));
        }
        let origin = header("origin")?;
        let origin_host = origin
            .split_once("://")
            .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
            .and_then(|(_, rest)| rest.parse::<http::uri::Authority>().ok());
        match origin_host {
            Some(a) if self.allows(a.host(), local) => None,
            _ => Some(super::service::error(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                &format!(
                    "The admin listener does not answer pages of other sites (Origin: \
                     {origin}); open the operator's page from the listener itself."
                ),
            )),
        }
    }

    /// Refuses a request that changes state unless it comes from a tool (not a browser page of
    /// another site) holding the token, when one is configured.
    fn refuse_change(&self, req: &RequestHeader) -> Option<Response<Vec<u8>>> {
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let json = header("content-type").is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        let cross_site =
            header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none");
        if cross_site || !(json || req.headers.contains_key(ADMIN_HEADER)) {
            return Some(super::service::error(
                StatusCode::FORBIDDEN,
                "cross_site_request",
                "Requests that change state need Content-Type: application/json or an \
                 X-Firstgate-Admin header, and are refused from browser pages of other sites.",
            ));
        }
        let expected = self.token.as_ref()?;
        let given = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        // Digests compared, so the comparison's time says nothing about the token.
        if given.as_ref() == Some(expected) {
            return None;
        }
        Some(super::service::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "This admin route needs Authorization: Bearer <the token in the variable \
             admin.token_env names>.",
        ))
    }
}

/// An address as it appears in a `Host` header (IPv6 in brackets).
fn ip_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            req.insert_header(k.to_string(), *v).unwrap();
        }
        req
    }

    fn guard() -> AdminGuard {
        AdminGuard::new(
            "127.0.0.1:9090".parse().unwrap(),
            &["gw-admin.alcf.anl.gov".into()],
            None,
        )
    }

    fn code(r: Option<Response<Vec<u8>>>) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(r?.body()).unwrap();
        Some(body["error"]["code"].as_str().unwrap().to_string())
    }

    #[test]
    fn a_rebound_name_is_refused_even_when_the_browser_calls_it_same_origin() {
        let g = guard();
        let json = ("content-type", "application/json");
        let rebound = request(
            "POST",
            "/drain",
            &[
                ("host", "evil.example:9090"),
                ("sec-fetch-site", "same-origin"),
                json,
            ],
        );
        assert_eq!(
            code(g.refuse(&rebound, None, true)).as_deref(),
            Some("host_not_allowed")
        );
        // Reads that name users too; the probes' and Prometheus' routes stay open.
        let state = request("GET", "/api/state", &[("host", "evil.example")]);
        assert_eq!(
            code(g.refuse(&state, None, false)).as_deref(),
            Some("host_not_allowed")
        );
        let metrics = request("GET", "/metrics", &[("host", "prometheus-target.svc")]);
        assert_eq!(code(g.refuse(&metrics, None, false)), None);
    }

    #[test]
    fn own_names_the_arrival_address_and_configured_names_are_served() {
        let g = guard();
        let json = ("content-type", "application/json");
        for host in [
            "127.0.0.1:9090",
            "localhost",
            "LOCALHOST:9090",
            "[::1]:9090",
            "gw-admin.alcf.anl.gov",
        ] {
            let r = request("POST", "/drain", &[("host", host), json]);
            assert_eq!(code(g.refuse(&r, None, true)), None, "{host}");
        }
        let pod = request("PUT", "/maintenance", &[("host", "10.1.2.3:9090"), json]);
        assert_eq!(
            code(g.refuse(&pod, Some("10.1.2.3".parse().unwrap()), true)),
            None
        );
        // A listener on every address still knows its usual names.
        let any = AdminGuard::new("0.0.0.0:9090".parse().unwrap(), &[], None);
        let r = request("GET", "/api/state", &[("host", "localhost:9090")]);
        assert_eq!(code(any.refuse(&r, None, false)), None);
    }

    #[test]
    fn a_foreign_origin_is_refused() {
        let g = guard();
        let json = ("content-type", "application/json");
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1.evil.example",
        ] {
            let r = request(
                "PUT",
                "/maintenance",
                &[("host", "127.0.0.1:9090"), ("origin", origin), json],
            );
            assert_eq!(
                code(g.refuse(&r, None, true)).as_deref(),
                Some("origin_not_allowed"),
                "{origin}"
            );
        }
        let own = request(
            "PUT",
            "/maintenance",
            &[
                ("host", "127.0.0.1:9090"),
                ("origin", "http://127.0.0.1:9090"),
                json,
            ],
        );
        assert_eq!(code(g.refuse(&own, None, true)), None);
    }

    #[test]
    fn changes_need_a_tool_marker_and_the_token_when_one_is_set() {
        let g = AdminGuard::new("127.0.0.1:9090".parse().unwrap(), &[], Some("s3cret"));
        let host = ("host", "127.0.0.1:9090");
        let form = request(
            "POST",
            "/drain",
            &[host, ("content-type", "application/x-www-form-urlencoded")],
        );
        assert_eq!(
            code(g.refuse(&form, None, true)).as_deref(),
            Some("cross_site_request")
        );
        let anonymous = request("POST", "/drain", &[host, (ADMIN_HEADER, "1")]);
        assert_eq!(
            code(g.refuse(&anonymous, None, true)).as_deref(),
            Some("unauthorized")
        );
        let holder = request(
            "POST",
            "/drain",
            &[
                host,
                (ADMIN_HEADER, "1"),
                ("authorization", "Bearer s3cret"),
            ],
        );
        assert_eq!(code(g.refuse(&holder, None, true)), None);
    }
}
