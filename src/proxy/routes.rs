//! Which route a request is for: FIRST's `/resource_server/...` layout, the federated
//! OpenAI `/v1/...` layout (also under FIRST's `/resource_server/v1/...`), and the read-only
//! listings. Trailing slashes are not accepted (FIRST does not redirect either).

use crate::compute::relay::RelayKind;
use crate::openai::{Endpoint, Envelope};
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
    /// A browser's CORS preflight (`OPTIONS`) for a path served with `allow`.
    Preflight { allow: &'static str },
    /// A cold stream's lines posted back by FIRST's inference function:
    /// `POST /resource_server/api/streaming/{data,error,done}/` (FIRST's trailing slash).
    Relay(RelayKind),
    /// The OpenAI Files and Batch APIs.
    Batch(BatchCall),
}

impl Route {
    /// The error envelope of this route's clients: the endpoint's on inference routes, FIRST's
    /// on FIRST's own batch and relay routes, OpenAI's elsewhere.
    pub fn envelope(&self) -> Envelope {
        match self {
            Route::Inference { endpoint, .. } => endpoint.envelope(),
            Route::Relay(_)
            | Route::Batch(
                BatchCall::FirstCreate { .. }
                | BatchCall::FirstList
                | BatchCall::FirstStatus(_)
                | BatchCall::FirstResult(_),
            ) => Envelope::First,
            _ => Envelope::OpenAi,
        }
    }
}

/// A call of the OpenAI Files and Batch APIs (served under `/v1` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchCall {
    /// `GET /v1/files`
    ListFiles,
    /// `POST /v1/files` (multipart)
    Upload,
    /// `GET /v1/files/{id}`
    File(String),
    /// `DELETE /v1/files/{id}`
    DeleteFile(String),
    /// `GET /v1/files/{id}/content`
    Content(String),
    /// `GET /v1/batches`
    ListBatches,
    /// `POST /v1/batches`
    Create,
    /// `GET /v1/batches/{id}`
    Batch(String),
    /// `POST /v1/batches/{id}/cancel`
    Cancel(String),
    /// `files` or `batches` under a FIRST-layout base: answered with the `/v1` base to use.
    Elsewhere,
    /// FIRST's `POST /resource_server/{cluster}/{framework}/v1/batches`.
    FirstCreate { cluster: String, framework: String },
    /// FIRST's `GET /resource_server/v1/batches`.
    FirstList,
    /// FIRST's `GET /resource_server/v1/batches/{id}`.
    FirstStatus(String),
    /// FIRST's `GET /resource_server/v1/batches/{id}/result`.
    FirstResult(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// `GET /v1/models`, `GET /resource_server/v1/models`, and under a FIRST-layout base
    /// `GET /resource_server/{cluster}/{framework}/v1/models` (then only that framework's).
    Models { scope: Option<Scope> },
    /// `GET {base}/models/{id}` under the same bases; the id may contain `/`.
    Model { scope: Option<Scope>, id: String },
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

/// A cluster and framework named in a FIRST-layout path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub cluster: String,
    pub framework: String,
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
    // Most requests: an OpenAI endpoint at `/v1/...` (no Files or Batch path is one).
    let direct = path.strip_prefix("/v1/").and_then(Endpoint::from_path);
    let found = direct.map(|endpoint| {
        let route = Route::Inference {
            cluster: None,
            framework: None,
            endpoint,
        };
        (Method::POST, route)
    });
    if let Some(call) = found.is_none().then(|| batch_call(method, path)).flatten() {
        return match call {
            Ok(call) => Ok(Route::Batch(call)),
            Err(allow) if *method == Method::OPTIONS => Ok(Route::Preflight { allow }),
            Err(allow) => Err(RouteError::MethodNotAllowed { allow }),
        };
    }
    let (expected, route) = found
        .or_else(|| match_path(path))
        .ok_or(RouteError::NotFound)?;
    let allow = if expected == Method::GET {
        "GET"
    } else {
        "POST"
    };
    if *method == expected {
        Ok(route)
    } else if *method == Method::OPTIONS {
        Ok(Route::Preflight { allow })
    } else {
        Err(RouteError::MethodNotAllowed { allow })
    }
}

/// The method a path is served with, and its route.
fn match_path(path: &str) -> Option<(Method, Route)> {
    if let Some(kind) = path
        .strip_prefix("/resource_server/api/streaming/")
        .and_then(|k| k.strip_suffix('/'))
        .and_then(RelayKind::from_segment)
    {
        return Some((Method::POST, Route::Relay(kind)));
    }
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
    let models = |scope: Option<Scope>, id: &[&str]| {
        let read = match id {
            [] => Read::Models { scope },
            id => Read::Model {
                scope,
                id: percent_decode(&id.join("/")),
            },
        };
        Some((Method::GET, Route::Read(read)))
    };
    match parts.as_slice() {
        ["v1", "models", id @ ..] | ["resource_server", "v1", "models", id @ ..] => {
            models(None, id)
        }
        ["v1", tail @ ..] | ["resource_server", "v1", tail @ ..] => inference(None, None, tail),
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
        ["resource_server", cluster, framework, "v1", "models", id @ ..] => {
            let scope = Scope {
                cluster: cluster.to_string(),
                framework: framework.to_string(),
            };
            models(Some(scope), id)
        }
        ["resource_server", cluster, framework, "v1", tail @ ..] => {
            inference(Some(cluster), Some(framework), tail)
        }
        _ => None,
    }
}

/// The Files and Batch APIs' paths, several methods each: the call, or the `Allow` header of
/// a path served with other methods.
fn batch_call(method: &Method, path: &str) -> Option<Result<BatchCall, &'static str>> {
    use BatchCall::*;
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let (get, post, delete) = (
        *method == Method::GET,
        *method == Method::POST,
        *method == Method::DELETE,
    );
    let id = |s: &str| s.to_string();
    // Under /resource_server, FIRST's batch API; the OpenAI one is under /v1 only.
    let tail = match parts.as_slice() {
        ["v1", tail @ ..] => tail,
        ["resource_server", c, f, "v1", "batches"] if post => {
            return Some(Ok(FirstCreate {
                cluster: id(c),
                framework: id(f),
            }))
        }
        ["resource_server", _, _, "v1", "batches"] if get => return Some(Ok(Elsewhere)),
        ["resource_server", _, _, "v1", "batches"] => return Some(Err("POST")),
        ["resource_server", "v1", "batches"] if get => return Some(Ok(FirstList)),
        ["resource_server", "v1", "batches", b] if get => return Some(Ok(FirstStatus(id(b)))),
        ["resource_server", "v1", "batches", b, "result"] if get => {
            return Some(Ok(FirstResult(id(b))))
        }
        ["resource_server", "v1", "batches"]
        | ["resource_server", "v1", "batches", _]
        | ["resource_server", "v1", "batches", _, "result"] => return Some(Err("GET")),
        ["resource_server", "v1", "files" | "batches", ..]
        | ["resource_server", _, _, "v1", "files" | "batches", ..] => return Some(Ok(Elsewhere)),
        _ => return None,
    };
    Some(match tail {
        ["files"] if get => Ok(ListFiles),
        ["files"] if post => Ok(Upload),
        ["files"] => Err("GET, POST"),
        ["files", f] if get => Ok(File(id(f))),
        ["files", f] if delete => Ok(DeleteFile(id(f))),
        ["files", _] => Err("GET, DELETE"),
        ["files", f, "content"] if get => Ok(Content(id(f))),
        ["files", _, "content"] => Err("GET"),
        ["batches"] if get => Ok(ListBatches),
        ["batches"] if post => Ok(Create),
        ["batches"] => Err("GET, POST"),
        ["batches", b] if get => Ok(Batch(id(b))),
        ["batches", _] => Err("GET"),
        ["batches", b, "cancel"] if post => Ok(Cancel(id(b))),
        ["batches", _, "cancel"] => Err("POST"),
        _ => return None,
    })
}

/// `%2F` and friends in a model id (SDKs may encode the `/` of `org/model`).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
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
            Ok(Route::Read(Read::Models { scope: None }))
        );
        assert!(matches!(
            match_route(&Method::POST, "/resource_server/v1/chat/completions"),
            Ok(Route::Inference {
                cluster: None,
                endpoint: Endpoint::ChatCompletions,
                ..
            })
        ));
        assert_eq!(
            match_route(&Method::GET, "/resource_server/v1/models"),
            Ok(Route::Read(Read::Models { scope: None }))
        );
        assert_eq!(
            match_route(&Method::GET, "/v1/models/meta-llama/Llama-3.1-8B"),
            Ok(Route::Read(Read::Model {
                scope: None,
                id: "meta-llama/Llama-3.1-8B".into()
            }))
        );
        assert_eq!(
            match_route(
                &Method::GET,
                "/resource_server/sophia/vllm/v1/models/org%2Fm"
            ),
            Ok(Route::Read(Read::Model {
                scope: Some(Scope {
                    cluster: "sophia".into(),
                    framework: "vllm".into()
                }),
                id: "org/m".into()
            }))
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
