//! Which route a request is for: FIRST's `/resource_server/...` layout, the federated
//! OpenAI `/v1/...` layout, and the read-only listings. Trailing slashes are not accepted
//! (FIRST does not redirect either).

use crate::config::Endpoint;
use http::Method;

/// A matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An inference request. `cluster`/`framework` are absent on federated `/v1/...` routes.
    Inference {
        cluster: Option<String>,
        framework: Option<String>,
        endpoint: Endpoint,
    },
    /// A read answered by the gateway itself.
    Read(Read),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// `GET /v1/models`
    Models,
    /// `GET /resource_server/list-endpoints`
    ListEndpoints,
    /// `GET /resource_server/{cluster}/models`
    ClusterModels { cluster: String },
    /// `GET /resource_server/health` (no authentication)
    Health,
    /// `GET /resource_server/whoami`
    Whoami,
    /// `GET /resource_server/{cluster}/jobs`
    Jobs { cluster: String },
    /// `GET /resource_server/usage`: the caller's own totals.
    Usage,
}

/// Why no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path exists for another method; the value is the `Allow` header.
    MethodNotAllowed {
        allow: &'static str,
    },
}

/// Matches a request line.
pub fn match_route(method: &Method, path: &str) -> Result<Route, RouteError> {
    let (expected, route) = match_path(path).ok_or(RouteError::NotFound)?;
    if *method == expected {
        Ok(route)
    } else {
        let allow = if expected == Method::GET {
            "GET"
        } else {
            "POST"
        };
        Err(RouteError::MethodNotAllowed { allow })
    }
}

/// The method a path is served with, and its route.
fn match_path(path: &str) -> Option<(Method, Route)> {
    let rest = path.strip_prefix('/')?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let inference = |cluster: Option<&str>, framework: Option<&str>, tail: &[&str]| {
        Endpoint::from_path(&tail.join("/")).map(|endpoint| {
            (
                Method::POST,
                Route::Inference {
                    cluster: cluster.map(str::to_owned),
                    framework: framework.map(str::to_owned),
                    endpoint,
                },
            )
        })
    };
    match parts.as_slice() {
        ["v1", "models"] => Some((Method::GET, Route::Read(Read::Models))),
        ["v1", tail @ ..] => inference(None, None, tail),
        ["resource_server", "list-endpoints"] => {
            Some((Method::GET, Route::Read(Read::ListEndpoints)))
        }
        ["resource_server", "health"] => Some((Method::GET, Route::Read(Read::Health))),
        ["resource_server", "whoami"] => Some((Method::GET, Route::Read(Read::Whoami))),
        ["resource_server", "usage"] => Some((Method::GET, Route::Read(Read::Usage))),
        ["resource_server", cluster, "jobs"] => Some((
            Method::GET,
            Route::Read(Read::Jobs {
                cluster: cluster.to_string(),
            }),
        )),
        ["resource_server", cluster, "models"] => Some((
            Method::GET,
            Route::Read(Read::ClusterModels {
                cluster: cluster.to_string(),
            }),
        )),
        ["resource_server", cluster, framework, "v1", tail @ ..] => {
            inference(Some(cluster), Some(framework), tail)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_layout() {
        let r = match_route(
            &Method::POST,
            "/resource_server/sophia/vllm/v1/chat/completions",
        )
        .unwrap();
        assert_eq!(
            r,
            Route::Inference {
                cluster: Some("sophia".into()),
                framework: Some("vllm".into()),
                endpoint: Endpoint::ChatCompletions
            }
        );
    }

    #[test]
    fn federated_and_reads() {
        assert!(matches!(
            match_route(&Method::POST, "/v1/embeddings"),
            Ok(Route::Inference {
                cluster: None,
                endpoint: Endpoint::Embeddings,
                ..
            })
        ));
        assert_eq!(
            match_route(&Method::GET, "/v1/models"),
            Ok(Route::Read(Read::Models))
        );
        assert_eq!(
            match_route(&Method::GET, "/resource_server/metis/models"),
            Ok(Route::Read(Read::ClusterModels {
                cluster: "metis".into()
            }))
        );
    }

    #[test]
    fn wrong_method_and_unknown_paths() {
        assert_eq!(
            match_route(&Method::GET, "/v1/chat/completions"),
            Err(RouteError::MethodNotAllowed { allow: "POST" })
        );
        assert_eq!(
            match_route(&Method::POST, "/v1/models"),
            Err(RouteError::MethodNotAllowed { allow: "GET" })
        );
        for p in [
            "/",
            "/v1/chat",
            "/v1/chat/completions/",
            "/resource_server//vllm/v1/completions",
            "/nope",
        ] {
            assert_eq!(
                match_route(&Method::POST, p),
                Err(RouteError::NotFound),
                "{p}"
            );
        }
    }
}
