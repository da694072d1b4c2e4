//! Verdicts on disk, so a restart or an upgrade does not send every active user's token to the
//! identity provider again (an "introspection storm"). One format for this file and any shared
//! store of verdicts: the token's SHA-256 → the identity and the time it stops holding, or the
//! refusal and its time. A token itself is never written.
//!
//! The file is replaced whole (written beside it, then renamed) and readable by its owner
//! only; a file that cannot be read is ignored with a warning (the cache just starts empty).

use super::cache::{Cached, TokenKey, Verdict};
use super::{AuthError, Authenticator, Identity};
use crate::metrics::Metrics;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One verdict as stored.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredVerdict {
    /// SHA-256 of the token, hex.
    pub key: String,
    /// Unix time the verdict stops holding.
    pub until: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What was decided.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Outcome {
    Admitted { identity: StoredIdentity },
    Refused { refusal: Refusal },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoredIdentity {
    id: String,
    username: String,
    name: Option<String>,
    domain: String,
    idp_id: Option<String>,
    idp_name: Option<String>,
    groups: Vec<String>,
    service_account: bool,
    expires_at: u64,
    auth_service: String,
}

/// Why a token was refused (refusals that are cached).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Refusal {
    InvalidToken,
    Expired,
    WrongAudience { why: String },
    Forbidden { rule: String, message: String },
}

/// The rules a refusal can name (kept as static names in memory).
const RULES: [&str; 7] = [
    "allowed_domains",
    "allowed_groups",
    "policies",
    "groups_per_domain",
    "groups",
    "username",
    "service_accounts",
];

const AUTH_SERVICES: [&str; 3] = ["globus", "jwt", "none"];

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    verdicts: Vec<StoredVerdict>,
}

impl StoredVerdict {
    pub fn of(key: &TokenKey, c: &Cached) -> Option<StoredVerdict> {
        let outcome = match &c.verdict {
            Verdict::Admitted(id) => Outcome::Admitted {
                identity: StoredIdentity {
                    id: id.id.clone(),
                    username: id.username.clone(),
                    name: id.name.clone(),
                    domain: id.domain.clone(),
                    idp_id: id.idp_id.clone(),
                    idp_name: id.idp_name.clone(),
                    groups: id.groups.clone(),
                    service_account: id.service_account,
                    expires_at: id.expires_at,
                    auth_service: id.auth_service.to_string(),
                },
            },
            Verdict::Refused(e) => Outcome::Refused {
                refusal: match e {
                    AuthError::InvalidToken => Refusal::InvalidToken,
                    AuthError::Expired => Refusal::Expired,
                    AuthError::WrongAudience(why) => Refusal::WrongAudience { why: why.clone() },
                    AuthError::Forbidden { rule, message } => Refusal::Forbidden {
                        rule: rule.to_string(),
                        message: message.clone(),
                    },
                    // Not cached: nothing to keep.
                    _ => return None,
                },
            },
        };
        Some(StoredVerdict {
            key: hex::encode(key),
            until: c.until,
            outcome,
        })
    }

    /// Back to a cache entry; `None` for one this version cannot use.
    pub fn into_cached(self) -> Option<(TokenKey, Cached)> {
        let key: TokenKey = hex::decode(&self.key).ok()?.try_into().ok()?;
        let verdict = match self.outcome {
            Outcome::Admitted { identity: i } => Verdict::Admitted(Arc::new(Identity {
                id: i.id,
                username: i.username,
                name: i.name,
                domain: i.domain,
                idp_id: i.idp_id,
                idp_name: i.idp_name,
                groups: i.groups,
                service_account: i.service_account,
                expires_at: i.expires_at,
                auth_service: AUTH_SERVICES.into_iter().find(|s| *s == i.auth_service)?,
            })),
            Outcome::Refused { refusal } => Verdict::Refused(match refusal {
                Refusal::InvalidToken => AuthError::InvalidToken,
                Refusal::Expired => AuthError::Expired,
                Refusal::WrongAudience { why } => AuthError::WrongAudience(why),
                Refusal::Forbidden { rule, message } => AuthError::Forbidden {
                    rule: RULES.into_iter().find(|r| *r == rule)?,
                    message,
                },
            }),
        };
        Some((
            key,
            Cached {
                verdict,
                until: self.until,
            },
        ))
    }
}

/// Writes `entries` to `path`, replacing it whole.
pub fn save(path: &Path, entries: &[(TokenKey, Cached)]) -> std::io::Result<()> {
    let file = File {
        version: 1,
        verdicts: entries
            .iter()
            .filter_map(|(k, c)| StoredVerdict::of(k, c))
            .collect(),
    };
    let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads the verdicts of `path` (none if it does not exist).
pub fn load(path: &Path) -> std::io::Result<Vec<(TokenKey, Cached)>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: File = serde_json::from_slice(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(file
        .verdicts
        .into_iter()
        .filter_map(StoredVerdict::into_cached)
        .collect())
}

/// Keeps the verdict file: reads it when the process starts serving, writes it every
/// `interval`, on SIGQUIT (hand-over to a new process) and at shutdown. After an upgrade the old
/// process writes its verdicts as the new one starts, so for its first half minute the new one
/// also reads the file again whenever another process changed it.
pub struct VerdictKeeper {
    pub auth: Arc<Authenticator>,
    pub path: PathBuf,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
}

/// How long after start a change to the file by another process is read.
const HAND_OVER_WATCH: Duration = Duration::from_secs(30);

impl VerdictKeeper {
    fn modified(&self) -> Option<std::time::SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    async fn restore(&self) {
        match self.auth.restore_verdicts(&self.path).await {
            Ok(0) => {}
            Ok(n) => log::info!("auth cache: {n} verdicts read from {}", self.path.display()),
            Err(e) => log::warn!(
                "auth cache: cannot read {}: {e}; the cache keeps what it has",
                self.path.display()
            ),
        }
    }

    async fn save(&self, failing: &mut bool) {
        let (auth, path) = (self.auth.clone(), self.path.clone());
        let saved = tokio::task::spawn_blocking(move || auth.save_verdicts(&path)).await;
        match saved {
            Ok(Ok(n)) if std::mem::take(failing) => {
                log::info!(
                    "auth cache: {n} verdicts written to {} again",
                    self.path.display()
                );
            }
            Ok(Err(e)) if !*failing => {
                *failing = true;
                log::error!(
                    "auth cache: cannot write {}: {e} (retried every {}; verdicts stay in memory)",
                    self.path.display(),
                    humantime::format_duration(self.interval)
                );
            }
            _ => {}
        }
        self.metrics
            .background_runs
            .with_label_values(&["auth_cache_save"])
            .inc();
    }
}

#[async_trait]
impl BackgroundService for VerdictKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let started = tokio::time::Instant::now();
        self.restore().await;
        let mut seen = self.modified();
        let mut quit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut save_at = started + self.interval;
        let mut failing = false;
        loop {
            let mut save = false;
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = async { quit.as_mut()?.recv().await } => save = true,
                _ = tick.tick() => {}
            }
            if started.elapsed() < HAND_OVER_WATCH && self.modified() != seen {
                self.restore().await;
                seen = self.modified();
            }
            if save || tokio::time::Instant::now() >= save_at {
                self.save(&mut failing).await;
                seen = self.modified();
                save_at = tokio::time::Instant::now() + self.interval;
            }
        }
        self.save(&mut failing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_survive_the_file_and_the_token_is_not_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        let mut alice = Identity::anonymous();
        alice.username = "alice@anl.gov".into();
        alice.auth_service = "globus";
        let until = super::super::cache::unix_now() + 60;
        let entries = vec![
            (
                super::super::token_key("secret-token-a"),
                Cached {
                    verdict: Verdict::Admitted(Arc::new(alice.clone())),
                    until,
                },
            ),
            (
                super::super::token_key("secret-token-b"),
                Cached {
                    verdict: Verdict::Refused(AuthError::forbidden("groups", "not a member")),
                    until,
                },
            ),
        ];
        save(&path, &entries).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("secret-token"));
        let back = load(&path).unwrap();
        assert_eq!(back.len(), 2);
        match &back[0].1.verdict {
            Verdict::Admitted(id) => assert_eq!(**id, alice),
            other => panic!("{other:?}"),
        }
        match &back[1].1.verdict {
            Verdict::Refused(e) => assert_eq!(*e, AuthError::forbidden("groups", "not a member")),
            other => panic!("{other:?}"),
        }
        assert!(load(&dir.path().join("absent.json")).unwrap().is_empty());
    }
}
