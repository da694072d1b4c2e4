//! Usage: one record per request (exact tokens from the backend's `usage`), written off the
//! request path; per-user totals for `GET /resource_server/usage`; rate limits.

mod access_log;
pub mod history;
mod limits;
mod postgres;
mod record;
pub mod report;
pub mod retention;
pub mod rollup;
mod scan;
mod shared_limits;
pub mod sink;

pub use access_log::AccessLog;
pub use limits::{Exemptions, LimitSettings, Limited, MemoryLimits, RequestCaps};
pub use record::{Ending, Meter, UsageRecord, LOADTEST_HEADER};
pub use scan::{Tokens, UsageScanner};
pub use shared_limits::{InFlightPermit, Limiter, TokenReservation, UNAVAILABLE};
pub use sink::{Batching, MemorySink, Totals, UsageSink, WriterSink};

use crate::config::{self, Config, UsageStore};
use crate::metrics::Metrics;
use anyhow::Context;
use arc_swap::{ArcSwap, Guard};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Requests and tokens per user and model since the store began (loaded at start, then kept
/// up to date in memory, so answering a user never touches the database).
#[derive(Default)]
pub struct UsageTotals(Mutex<HashMap<String, HashMap<String, Totals>>>);

impl UsageTotals {
    pub fn load(rows: Vec<Totals>) -> Self {
        let totals = UsageTotals::default();
        totals.replace(rows);
        totals
    }

    /// Forgets the totals kept so far for `rows` (another store's).
    pub fn replace(&self, rows: Vec<Totals>) {
        let mut map: HashMap<String, HashMap<String, Totals>> = HashMap::new();
        for t in rows {
            map.entry(t.username.clone())
                .or_default()
                .insert(t.model.clone(), t);
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Counts one request of `username` on `model`.
    pub fn add(&self, username: &str, model: &str, tokens: Tokens) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed by user, then model: a known pair is found without building a key.
        let t = match map.get_mut(username) {
            Some(models) => models,
            None => map.entry(username.to_owned()).or_default(),
        };
        let t = match t.get_mut(model) {
            Some(t) => t,
            None => t.entry(model.to_owned()).or_insert_with(|| Totals {
                username: username.to_owned(),
                model: model.to_owned(),
                ..Totals::default()
            }),
        };
        // Every request counts, with or without tokens; absurd counts saturate.
        t.requests += 1;
        t.prompt_tokens = t.prompt_tokens.saturating_add(tokens.prompt);
        t.completion_tokens = t.completion_tokens.saturating_add(tokens.completion);
        t.total_tokens = t.total_tokens.saturating_add(tokens.total);
    }

    /// One user's totals per model.
    pub fn of(&self, username: &str) -> Vec<Totals> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Totals> = map
            .get(username)
            .map(|models| models.values().cloned().collect())
            .unwrap_or_default();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }
}

/// Where finished requests are written. A reload swaps the whole set (keeping the parts whose
/// settings did not change); a replaced sink or log writes what it was given, then closes.
#[derive(Clone, Default)]
pub struct Outputs {
    /// The usage store, when there is one.
    pub sink: Option<Arc<dyn UsageSink>>,
    /// The access log, when enabled.
    pub access_log: Option<Arc<AccessLog>>,
    /// Request bodies go into the access log too.
    pub log_prompts: bool,
}

impl Outputs {
    /// Opens the usage store and the access log `config` names; also returns the totals the
    /// store holds.
    pub fn open(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<(Outputs, Vec<Totals>)> {
        let (sink, totals) = open_sink(&config.usage, metrics)?.unzip();
        let outputs = Outputs {
            sink,
            access_log: open_access_log(&config.access_log, metrics)?,
            log_prompts: config.access_log.log_prompts,
        };
        Ok((outputs, totals.unwrap_or_default()))
    }

    /// The outputs of `new`, reusing this set's sink and log where their settings are the same
    /// as in `old`; with another store, also the totals it holds.
    pub fn reopen(
        &self,
        old: &Config,
        new: &Config,
        metrics: &Arc<Metrics>,
    ) -> anyhow::Result<(Outputs, Option<Vec<Totals>>)> {
        let (sink, totals) = if config::same(&old.usage, &new.usage) {
            (self.sink.clone(), None)
        } else {
            let (sink, rows) = open_sink(&new.usage, metrics)?.unzip();
            // The same file keeps its totals (counted in memory meanwhile); no store keeps them.
            let totals = rows.filter(|_| old.usage.store != new.usage.store);
            (sink, totals)
        };
        let log = (&old.access_log.enabled, &old.access_log.path);
        let access_log = if log == (&new.access_log.enabled, &new.access_log.path) {
            self.access_log.clone()
        } else {
            open_access_log(&new.access_log, metrics)?
        };
        let outputs = Outputs {
            sink,
            access_log,
            log_prompts: new.access_log.log_prompts,
        };
        Ok((outputs, totals))
    }
}

/// An opened usage store: its sink and the totals it holds.
type OpenedStore = (Arc<dyn UsageSink>, Vec<Totals>);

fn open_sink(
    u: &config::UsageConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<OpenedStore>> {
    let batching = Batching {
        queue: u.queue,
        batch: u.batch,
        flush_interval: u.flush_interval,
        retention: retention::Retention {
            raw: Some(u.retention).filter(|d| !d.is_zero()),
            rollups: u.rollup_retention.filter(|d| !d.is_zero()),
        },
    };
    match &u.store {
        None => Ok(None),
        Some(UsageStore::File(path)) => {
            let sink = WriterSink::sqlite(path, batching, metrics.clone())?;
            let totals = sink::open(path)
                .map_err(crate::sql::StoreError::from)
                .and_then(|c| {
                    crate::sql::Db::Sqlite(c).snapshot(|db| report::totals(db, 0, None, None, None))
                })
                .with_context(|| format!("usage.store {}", path.display()))?;
            Ok(Some((sink as Arc<dyn UsageSink>, totals)))
        }
        Some(UsageStore::Postgres(url)) => {
            let sink = WriterSink::postgres(url, store_password(u)?, batching, metrics.clone())?;
            // Unreachable at start: the totals fill in at the first refresh that reaches it.
            let totals = sink
                .shared_totals()
                .and_then(Result::ok)
                .unwrap_or_default();
            Ok(Some((sink as Arc<dyn UsageSink>, totals)))
        }
    }
}

/// The PostgreSQL password from the variable `usage.password_env` names.
pub fn store_password(u: &config::UsageConfig) -> anyhow::Result<Option<String>> {
    let Some(var) = &u.password_env else {
        return Ok(None);
    };
    std::env::var(var).map(Some).map_err(|_| {
        anyhow::anyhow!(
            "usage.password_env: the environment variable {var} is not set; export the \
             PostgreSQL password in it"
        )
    })
}

/// Totals per user and model from the store `u` names (for `firstgate usage`): records since
/// `since_ms`, optionally of one user or model; `loadtest` as in `report::totals`. Also says
/// whether they were read from raw records or, beyond the retention, from hourly rollups.
pub fn read_totals(
    u: &config::UsageConfig,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
    loadtest: Option<bool>,
) -> anyhow::Result<(Vec<Totals>, report::Source)> {
    read_snapshot(u, |db| {
        report::totals_from(db, since_ms, user, model, loadtest)
    })
}

/// The requests recorded in `[from_ms, to_ms)` in the store `u` names (for
/// `firstgate policy replay`), and from when its raw records are complete.
pub fn read_requests(
    u: &config::UsageConfig,
    from_ms: i64,
    to_ms: i64,
) -> anyhow::Result<(Vec<history::RecordedRequest>, i64)> {
    read_snapshot(u, |db| history::requests_between(db, from_ms, to_ms))
}

/// Runs `f` on one snapshot of the store `u` names, with errors naming the store.
fn read_snapshot<T>(
    u: &config::UsageConfig,
    f: impl FnOnce(&mut crate::sql::Db) -> crate::sql::Result<T>,
) -> anyhow::Result<T> {
    let (mut db, name) = read_store(u)?;
    db.snapshot(f)
        .map_err(|e| anyhow::anyhow!("usage.store {name}: {e}"))
}

/// A connection for reading the store `u` names (a SQLite file read-only), and its name.
fn read_store(u: &config::UsageConfig) -> anyhow::Result<(crate::sql::Db, String)> {
    match &u.store {
        None => anyhow::bail!("usage.store is null: no records are kept"),
        Some(UsageStore::File(path)) => {
            if !path.exists() {
                anyhow::bail!(
                    "{}: no usage store yet (the gateway creates it when it starts)",
                    path.display()
                );
            }
            let conn = rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            Ok((crate::sql::Db::Sqlite(conn), path.display().to_string()))
        }
        Some(UsageStore::Postgres(url)) => {
            Ok((postgres::open(url, store_password(u)?)?, url.clone()))
        }
    }
}

/// Gives the space retention freed back to the file system (`firstgate usage --vacuum`): a
/// SQLite file from before `auto_vacuum=incremental` is rebuilt with it (the writer waits
/// meanwhile; no record is lost), a newer one is trimmed, and its write-ahead log emptied;
/// PostgreSQL's tables are vacuumed. Returns what was done, in words.
pub fn vacuum_store(u: &config::UsageConfig) -> anyhow::Result<String> {
    match &u.store {
        None => anyhow::bail!("usage.store is null: no records are kept"),
        Some(UsageStore::File(path)) => {
            let size = || {
                std::fs::metadata(path).map_or(0, |m| m.len())
                    + std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len())
            };
            let before = size();
            let conn = sink::open(path).with_context(|| path.display().to_string())?;
            // A rebuild waits for the writer's transactions for as long as it takes.
            conn.busy_timeout(std::time::Duration::from_secs(60))?;
            let auto_vacuum = |c: &rusqlite::Connection| -> rusqlite::Result<i64> {
                c.pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            };
            let mode = auto_vacuum(&conn)?;
            if mode == 2 {
                conn.execute_batch("PRAGMA incremental_vacuum;")?;
            } else {
                conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
            }
            conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
            // Said as it is after the rebuild (a rebuild that could not convert says so).
            let rebuilt = match (mode, auto_vacuum(&conn)?) {
                (2, _) => "",
                (_, 2) => " (rebuilt with auto_vacuum=incremental)",
                _ => " (rebuilt; auto_vacuum could not be turned on)",
            };
            Ok(format!(
                "{}: {} -> {} bytes{rebuilt}",
                path.display(),
                before,
                size()
            ))
        }
        Some(UsageStore::Postgres(url)) => {
            let mut db = postgres::open(url, store_password(u)?)?;
            for table in ["usage", "usage_hourly"] {
                db.execute(&format!("VACUUM {table}"), &[])
                    .map_err(|e| anyhow::anyhow!("usage.store {url}: {e}"))?;
            }
            Ok(format!("{url}: usage and usage_hourly vacuumed"))
        }
    }
}

fn open_access_log(
    a: &config::AccessLog,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<AccessLog>>> {
    if !a.enabled {
        return Ok(None);
    }
    let log = AccessLog::start(a.path.clone(), metrics.access_log_dropped.clone())
        .context("access_log.path")?;
    Ok(Some(Arc::new(log)))
}

/// Everything the request path needs for usage: the outputs, the totals, the limits and the
/// request caps.
pub struct Accounting {
    outputs: ArcSwap<Outputs>,
    pub totals: UsageTotals,
    pub limits: Limiter,
    /// The largest body and the token estimate of a request without `max_tokens`.
    pub caps: RequestCaps,
    /// Who the per-user limits do not apply to.
    exempt: ArcSwap<Exemptions>,
}

/// Writes one access-log line: the record's fields, then the client's address and the body if
/// asked, in the record's object.
fn access_line(
    out: &mut Vec<u8>,
    record: &UsageRecord,
    client: Option<IpAddr>,
    request_body: Option<std::borrow::Cow<'_, str>>,
) {
    record.write_json_open(out);
    if let Some(client) = client {
        // An address has nothing to escape.
        out.extend_from_slice(b",\"client\":\"");
        match client {
            // By hand: `Display` goes through the formatter's padding (1,000 instructions).
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    out.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
                }
            }
            IpAddr::V6(v6) => {
                std::io::Write::write_fmt(out, format_args!("{v6}")).expect("a Vec takes it")
            }
        }
        out.push(b'"');
    }
    if let Some(body) = request_body {
        out.extend_from_slice(b",\"request_body\":");
        serde_json::to_writer(&mut *out, &body).expect("a string serialises");
    }
    out.push(b'}');
}

impl Accounting {
    pub fn new(outputs: Outputs, totals: UsageTotals, limits: Limiter, caps: RequestCaps) -> Self {
        Accounting {
            outputs: ArcSwap::from_pointee(outputs),
            totals,
            limits,
            caps,
            exempt: ArcSwap::default(),
        }
    }

    /// Whether the per-user limits spare this user.
    pub fn is_exempt(&self, username: &str, groups: &[String]) -> bool {
        self.exempt.load().covers(username, groups)
    }

    /// Puts new exemptions in force (start-up and reloads).
    pub fn set_exemptions(&self, exempt: Exemptions) {
        self.exempt.store(Arc::new(exempt));
    }

    /// The outputs in force.
    pub fn outputs(&self) -> Guard<Arc<Outputs>> {
        self.outputs.load()
    }

    /// Puts `outputs` in force for the next request; with `totals`, those replace the ones
    /// kept (another store).
    pub fn set_outputs(&self, outputs: Outputs, totals: Option<Vec<Totals>>) {
        self.outputs.store(Arc::new(outputs));
        if let Some(rows) = totals {
            self.totals.replace(rows);
        }
    }

    /// Records a finished request of `username` on `model`: its totals; and its record, built
    /// only when something keeps it, for the sink and the access log (which also names the
    /// client's address, as resolved behind trusted proxies).
    pub fn finish(
        &self,
        (username, model, tokens): (&str, &str, Tokens),
        record: impl FnOnce() -> UsageRecord,
        prompt: Option<&[u8]>,
        client: Option<IpAddr>,
    ) {
        self.totals.add(username, model, tokens);
        let out = self.outputs.load();
        if out.access_log.is_none() && out.sink.is_none() {
            return;
        }
        let r = record();
        if let Some(log) = &out.access_log {
            let body = prompt
                .filter(|_| out.log_prompts)
                .map(String::from_utf8_lossy);
            log.write(|line| access_line(line, &r, client, body));
        }
        if let Some(sink) = &out.sink {
            sink.record(r);
        }
    }

    /// Writes the records and access-log lines handed over so far; waits at most `limit` for
    /// each.
    pub fn flush(&self, limit: std::time::Duration) {
        let out = self.outputs.load();
        if let Some(sink) = &out.sink {
            sink.flush(limit);
        }
        if let Some(log) = &out.access_log {
            log.flush(limit);
        }
    }
}

/// Keeps what replicas share current: renews this replica's request-in-flight slots in Redis,
/// and every `refresh` reads the per-user totals back from a store several replicas write to,
/// so that `/resource_server/usage` counts every replica's requests (within `refresh` plus the
/// store's `flush_interval`).
pub struct SharedUpkeep {
    pub accounting: Arc<Accounting>,
    pub refresh: std::time::Duration,
    pub metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for SharedUpkeep {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let renew = self.accounting.limits.renew_slots(shutdown.clone());
        let refresh = async {
            let mut tick = tokio::time::interval(self.refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let Some(sink) = self.accounting.outputs().sink.clone() else {
                    continue;
                };
                let read = tokio::task::spawn_blocking(move || sink.shared_totals()).await;
                match read {
                    Ok(Some(Ok(rows))) => {
                        self.accounting.totals.replace(rows);
                        self.metrics
                            .background_runs
                            .with_label_values(&["usage_totals"])
                            .inc();
                    }
                    Ok(Some(Err(e))) => log::warn!("usage totals not refreshed: {e:#}"),
                    Ok(None) | Err(_) => {}
                }
            }
        };
        tokio::join!(renew, refresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_line_is_the_record_with_the_client_and_body_added() {
        let record = UsageRecord {
            request_id: "r1".into(),
            username: "ada@anl.gov".into(),
            prompt_tokens: 7,
            batch_id: Some("batch_1".into()),
            ..UsageRecord::default()
        };
        let line = |client, body: Option<&str>| {
            let mut out = Vec::new();
            access_line(&mut out, &record, client, body.map(Into::into));
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        let bare = line(None, None);
        assert_eq!(bare, serde_json::to_value(&record).unwrap());
        let full = line(
            Some("203.0.113.5".parse().unwrap()),
            Some("{\"q\": \"a \\\"b\\\"\"}"),
        );
        let mut expected = serde_json::to_value(&record).unwrap();
        expected["client"] = "203.0.113.5".into();
        expected["request_body"] = "{\"q\": \"a \\\"b\\\"\"}".into();
        assert_eq!(full, expected);
        // Still the record, read back as one.
        assert_eq!(serde_json::from_value::<UsageRecord>(full).unwrap(), record);
        for client in ["10.0.0.255", "0.0.0.0", "2001:db8::1", "::ffff:192.0.2.1"] {
            let ip: IpAddr = client.parse().unwrap();
            assert_eq!(line(Some(ip), None)["client"], ip.to_string(), "{client}");
        }
    }
}
