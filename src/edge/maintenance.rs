//! The maintenance switch: 503 for everything, or for one cluster, with a message.
//!
//! Three sources, any of which can switch it on: a file (FIRST's nginx `maintenance_on`,
//! re-checked every second), the configuration's per-cluster notices (FIRST's
//! `MAINTENANCE_ERROR_NOTICES`, re-read on SIGHUP), and calls to the admin listener (kept in
//! memory until the process ends). Requests read one precomputed snapshot.

use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The message when no other is given (FIRST's nginx wording).
pub const DEFAULT_MESSAGE: &str = "Service is temporarily down for maintenance.";

/// What is under maintenance, and the message each gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Notices {
    /// Every API request (health and admin aside).
    pub global: Option<String>,
    /// Requests served by these clusters.
    pub clusters: BTreeMap<String, String>,
}

impl Notices {
    fn merge(&mut self, other: &Notices) {
        if self.global.is_none() {
            self.global.clone_from(&other.global);
        }
        for (cluster, message) in &other.clusters {
            self.clusters
                .entry(cluster.clone())
                .or_insert_with(|| message.clone());
        }
    }
}

#[derive(Default)]
struct Sources {
    file: Option<String>,
    configured: BTreeMap<String, String>,
    admin: Notices,
}

/// The maintenance switch.
pub struct Maintenance {
    file: Option<PathBuf>,
    sources: Mutex<Sources>,
    current: ArcSwap<Notices>,
}

impl Maintenance {
    pub fn new(file: Option<PathBuf>, configured: BTreeMap<String, String>) -> Self {
        let m = Maintenance {
            file,
            sources: Mutex::new(Sources {
                configured,
                ..Sources::default()
            }),
            current: ArcSwap::default(),
        };
        m.check_file();
        m.update(|_| {});
        m
    }

    /// The message a request for `cluster` (if known yet) is refused with, if any.
    pub fn refusal(&self, cluster: Option<&str>) -> Option<String> {
        let now = self.current.load();
        if let Some(message) = &now.global {
            return Some(message.clone());
        }
        cluster.and_then(|c| now.clusters.get(c).cloned())
    }

    /// Everything under maintenance now.
    pub fn notices(&self) -> Notices {
        Notices::clone(&self.current.load())
    }

    /// Switches maintenance on (admin call): for `cluster`, or everything.
    pub fn set(&self, cluster: Option<String>, message: Option<String>) {
        let message = message.unwrap_or_else(|| DEFAULT_MESSAGE.to_string());
        self.update(|s| match cluster {
            Some(c) => {
                s.admin.clusters.insert(c, message);
            }
            None => s.admin.global = Some(message),
        });
    }

    /// Switches off what the admin listener switched on: for `cluster`, or everything.
    pub fn clear(&self, cluster: Option<&str>) {
        self.update(|s| match cluster {
            Some(c) => {
                s.admin.clusters.remove(c);
            }
            None => s.admin = Notices::default(),
        });
    }

    /// Replaces the configuration's notices (SIGHUP).
    pub fn set_configured(&self, configured: BTreeMap<String, String>) {
        self.update(|s| s.configured = configured);
    }

    /// Looks at the maintenance file; returns whether the state changed.
    pub fn check_file(&self) -> bool {
        let Some(path) = &self.file else {
            return false;
        };
        let file = std::fs::read_to_string(path).ok().map(|text| {
            let text = text.trim();
            if text.is_empty() {
                DEFAULT_MESSAGE.to_string()
            } else {
                text.to_string()
            }
        });
        let mut changed = false;
        self.update(|s| {
            changed = s.file != file;
            s.file = file;
        });
        changed
    }

    fn update(&self, change: impl FnOnce(&mut Sources)) {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut s);
        let mut notices = Notices {
            global: s.file.clone(),
            clusters: s.configured.clone(),
        };
        notices.merge(&s.admin);
        self.current.store(Arc::new(notices));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_source_switches_it_on_and_each_switches_off_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("maintenance_on");
        let configured = BTreeMap::from([("metis".to_string(), "Metis is down.".to_string())]);
        let m = Maintenance::new(Some(file.clone()), configured);
        assert_eq!(m.refusal(None), None);
        assert_eq!(m.refusal(Some("sophia")), None);
        assert_eq!(m.refusal(Some("metis")).as_deref(), Some("Metis is down."));

        m.set(Some("sophia".into()), None);
        assert_eq!(m.refusal(Some("sophia")).as_deref(), Some(DEFAULT_MESSAGE));
        m.clear(Some("sophia"));
        assert_eq!(m.refusal(Some("sophia")), None);

        std::fs::write(&file, "Back at 14:00 UTC.\n").unwrap();
        assert!(m.check_file());
        assert_eq!(m.refusal(None).as_deref(), Some("Back at 14:00 UTC."));
        std::fs::remove_file(&file).unwrap();
        assert!(m.check_file());
        assert_eq!(m.refusal(Some("sophia")), None);

        m.set_configured(BTreeMap::new());
        assert_eq!(m.refusal(Some("metis")), None);
    }
}
