//! Service discovery for a deployment: resolves the configured host names (asynchronously,
//! never on the request path) into backends, keeping each instance's live counters across
//! re-resolutions.

use super::pool::Instance;
use crate::config::BackendAddr;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub(super) struct ResolvingDiscovery {
    addrs: Vec<BackendAddr>,
    /// Instances reported at run time (jobs started through the cluster lifecycle).
    dynamic: Arc<Mutex<Vec<BackendAddr>>>,
    released: Arc<Notify>,
    /// Instances by resolved address; reused so in-flight counts survive a refresh.
    known: Mutex<HashMap<SocketAddr, Arc<Instance>>>,
}

impl ResolvingDiscovery {
    pub fn new(
        addrs: Vec<BackendAddr>,
        dynamic: Arc<Mutex<Vec<BackendAddr>>>,
        released: Arc<Notify>,
    ) -> Self {
        ResolvingDiscovery {
            addrs,
            dynamic,
            released,
            known: Mutex::new(HashMap::new()),
        }
    }

    async fn resolve(addr: &BackendAddr) -> Vec<SocketAddr> {
        if let Ok(ip) = addr.host.parse::<IpAddr>() {
            return vec![SocketAddr::new(ip, addr.port)];
        }
        match tokio::net::lookup_host((addr.host.as_str(), addr.port)).await {
            Ok(found) => found.collect(),
            Err(e) => {
                log::warn!("cannot resolve backend {addr}: {e}");
                Vec::new()
            }
        }
    }
}

#[async_trait]
impl ServiceDiscovery for ResolvingDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let dynamic = self
            .dynamic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut resolved = Vec::with_capacity(self.addrs.len() + dynamic.len());
        for (addr, is_static) in self
            .addrs
            .iter()
            .map(|a| (a, true))
            .chain(dynamic.iter().map(|a| (a, false)))
        {
            for socket in Self::resolve(addr).await {
                resolved.push((addr, socket, is_static));
            }
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut set = BTreeSet::new();
        known.retain(|s, _| resolved.iter().any(|(_, r, _)| r == s));
        for (addr, socket, is_static) in resolved {
            let instance = known
                .entry(socket)
                .or_insert_with(|| {
                    // Configured backends serve at once (their health decides); reported ones
                    // only after a health check has passed.
                    Arc::new(Instance::new(
                        addr.clone(),
                        socket,
                        self.released.clone(),
                        is_static,
                    ))
                })
                .clone();
            let mut backend = Backend::new(&socket.to_string())?;
            backend.ext.insert(instance);
            set.insert(backend);
        }
        Ok((set, HashMap::new()))
    }
}
