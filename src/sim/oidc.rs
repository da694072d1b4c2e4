//! An OIDC provider's key publication: `GET /.well-known/jwks.json` serves a key set that a
//! test can replace (key rotation), counting fetches. Tokens are signed by the test itself.

use super::Listening;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

struct Shared {
    jwks: RwLock<Value>,
    fetches: AtomicU64,
}

/// A running JWKS endpoint.
pub struct JwksSim {
    shared: Arc<Shared>,
    listening: Listening,
}

impl JwksSim {
    pub async fn start(addr: SocketAddr, jwks: Value) -> std::io::Result<JwksSim> {
        let shared = Arc::new(Shared {
            jwks: RwLock::new(jwks),
            fetches: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/.well-known/jwks.json", get(serve_jwks))
            .with_state(shared.clone());
        let listening = Listening::bind(addr, router).await?;
        Ok(JwksSim { shared, listening })
    }

    /// The URL to configure as `jwt.jwks_url`.
    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.listening.addr())
    }

    /// Publishes a new key set (rotation).
    pub fn set_jwks(&self, jwks: Value) {
        *self.shared.jwks.write().unwrap() = jwks;
    }

    /// How many times the key set was fetched.
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(s): State<Arc<Shared>>) -> Json<Value> {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    Json(s.jwks.read().unwrap().clone())
}
