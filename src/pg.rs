//! One blocking connection to PostgreSQL, made when first needed and again after a failure,
//! with the schema of its user brought up to date on connect. The `postgres` crate is the
//! blocking face of `tokio-postgres`: call this from threads and the blocking pool, never from
//! the async workers (nothing on the request path talks to PostgreSQL).

use postgres::{Client, NoTls};
use std::str::FromStr;
use std::time::Duration;

/// A connection to one database for one part of the gateway (`usage`, `batch`), whose
/// schema steps are applied when it connects.
pub struct PgConnection {
    config: postgres::Config,
    client: Option<Client>,
    /// The part's name in `firstgate_schema`, and its steps (one per version).
    schema: &'static str,
    steps: &'static [&'static str],
}

impl PgConnection {
    /// Reads the URL (the password comes separately, never in it); connects on first use.
    pub fn new(
        url: &str,
        password: Option<String>,
        schema: &'static str,
        steps: &'static [&'static str],
    ) -> anyhow::Result<PgConnection> {
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| anyhow::anyhow!("not a PostgreSQL URL: {e}"))?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("firstgate");
        Ok(PgConnection {
            config,
            client: None,
            schema,
            steps,
        })
    }

    /// Runs `f` on the connection (made, and the schema migrated, if there is none); a failure
    /// drops the connection, so the next call connects again.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, postgres::Error> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                let mut c = self.config.connect(NoTls)?;
                migrate(&mut c, self.schema, self.steps)?;
                self.client.insert(c)
            }
        };
        let result = f(client);
        if result.is_err() {
            self.client = None;
        }
        result
    }

    /// Ends a transaction begun through [`with`](Self::with) (`COMMIT` or `ROLLBACK`), if the
    /// connection it began on is still there: a failure drops it, and the transaction with it.
    pub fn end_transaction(&mut self, sql: &str) -> Result<(), postgres::Error> {
        match self.client {
            Some(_) => self.with(|c| c.batch_execute(sql)),
            None => Ok(()),
        }
    }
}

/// Applies the steps of `schema` the database has not had, in one transaction under an
/// advisory lock, so replicas starting together migrate once. Steps only add, so replicas of
/// the previous version keep working during a rolling upgrade.
fn migrate(client: &mut Client, schema: &str, steps: &[&str]) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('firstgate_schema'))",
        &[],
    )?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS firstgate_schema (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    )?;
    let version: i32 = tx
        .query_opt(
            "SELECT version FROM firstgate_schema WHERE name = $1",
            &[&schema],
        )?
        .map_or(0, |r| r.get(0));
    for step in steps.iter().skip(version.max(0) as usize) {
        tx.batch_execute(step)?;
    }
    tx.execute(
        "INSERT INTO firstgate_schema (name, version) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET version = GREATEST(firstgate_schema.version, $2)",
        &[&schema, &(steps.len() as i32)],
    )?;
    tx.commit()
}
