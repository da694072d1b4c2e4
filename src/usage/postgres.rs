//! Usage records in PostgreSQL (`usage.store: postgres://...`), shared by replicas. Used from
//! the writer thread and the blocking pool only: nothing here runs on the request path. A lost
//! connection is made again on the next call, so the writer's retries with back-off also
//! reconnect.

use super::UsageRecord;
use crate::pg::PgConnection;
use crate::sql::Db;

/// The schema, one step per version (the `firstgate_schema` row says where a database is);
/// steps only add, so replicas of the previous version keep working during an upgrade.
const MIGRATIONS: &[&str] = &[
    // 1: the records, with every column SQLite's store has gathered over its versions.
    "CREATE TABLE IF NOT EXISTS usage (
        request_id TEXT PRIMARY KEY,
        time_ms BIGINT NOT NULL,
        user_id TEXT NOT NULL,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        total_tokens BIGINT NOT NULL,
        ttft_ms BIGINT,
        duration_ms BIGINT NOT NULL,
        bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL,
        instance TEXT NOT NULL,
        cancelled BOOLEAN NOT NULL,
        failed BOOLEAN NOT NULL DEFAULT false,
        tokens_unknown BOOLEAN NOT NULL DEFAULT false,
        trace_id TEXT NOT NULL DEFAULT '',
        loadtest BOOLEAN NOT NULL DEFAULT false,
        batch_id TEXT
    );
    CREATE INDEX IF NOT EXISTS usage_user_time ON usage (username, time_ms);
    CREATE INDEX IF NOT EXISTS usage_model_time ON usage (model, time_ms);",
];

/// The usage database.
pub struct Postgres(PgConnection);

impl Postgres {
    /// Reads the URL (and the password, kept out of it); connects on first use.
    pub fn new(url: &str, password: Option<String>) -> anyhow::Result<Postgres> {
        PgConnection::new(url, password, "usage", MIGRATIONS)
            .map(Postgres)
            .map_err(|e| anyhow::anyhow!("usage.store: {e}"))
    }

    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, postgres::Error> {
        self.0.with(f)
    }

    /// Connects and brings the schema up to date now (start-up), rather than on first use.
    pub fn check(&mut self) -> Result<(), postgres::Error> {
        self.with(|_| Ok(()))
    }

    /// Inserts `records` in one statement (columns as arrays); a record already there (a
    /// retried batch whose commit was not acknowledged) is skipped.
    pub fn insert(&mut self, records: &[UsageRecord]) -> Result<(), postgres::Error> {
        let col = |f: fn(&UsageRecord) -> &str| records.iter().map(f).collect::<Vec<_>>();
        let num = |f: fn(&UsageRecord) -> u64| {
            records
                .iter()
                .map(|r| i64::try_from(f(r)).unwrap_or(i64::MAX))
                .collect::<Vec<_>>()
        };
        let flag = |f: fn(&UsageRecord) -> bool| records.iter().map(f).collect::<Vec<_>>();
        let (request_id, user_id, username) = (
            col(|r| r.request_id.as_str()),
            col(|r| r.user_id.as_str()),
            col(|r| r.username.as_str()),
        );
        let (cluster, framework, model) = (
            col(|r| r.cluster.as_str()),
            col(|r| r.framework.as_str()),
            col(|r| r.model.as_str()),
        );
        let (endpoint, route, instance, trace_id) = (
            col(|r| r.endpoint.as_str()),
            col(|r| r.route.as_str()),
            col(|r| r.instance.as_str()),
            col(|r| r.trace_id.as_str()),
        );
        let time_ms: Vec<i64> = records.iter().map(|r| r.time_ms).collect();
        let status: Vec<i32> = records.iter().map(|r| i32::from(r.status)).collect();
        let (prompt, completion, total) = (
            num(|r| r.prompt_tokens),
            num(|r| r.completion_tokens),
            num(|r| r.total_tokens),
        );
        let ttft_ms: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.ttft_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)))
            .collect();
        let (duration_ms, bytes_in, bytes_out) = (
            num(|r| r.duration_ms),
            num(|r| r.bytes_in),
            num(|r| r.bytes_out),
        );
        let (cancelled, failed, tokens_unknown, loadtest) = (
            flag(|r| r.cancelled),
            flag(|r| r.failed),
            flag(|r| r.tokens_unknown),
            flag(|r| r.loadtest),
        );
        let batch_id: Vec<Option<&str>> = records.iter().map(|r| r.batch_id.as_deref()).collect();
        self.with(|c| {
            c.execute(
                "INSERT INTO usage (request_id, time_ms, user_id, username, cluster, \
                 framework, model, endpoint, route, status, prompt_tokens, completion_tokens, \
                 total_tokens, ttft_ms, duration_ms, bytes_in, bytes_out, instance, cancelled, \
                 failed, tokens_unknown, trace_id, loadtest, batch_id) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int4[], \
                 $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], \
                 $17::int8[], $18::text[], $19::bool[], $20::bool[], $21::bool[], $22::text[], \
                 $23::bool[], $24::text[]) ON CONFLICT (request_id) DO NOTHING",
                &[
                    &request_id,
                    &time_ms,
                    &user_id,
                    &username,
                    &cluster,
                    &framework,
                    &model,
                    &endpoint,
                    &route,
                    &status,
                    &prompt,
                    &completion,
                    &total,
                    &ttft_ms,
                    &duration_ms,
                    &bytes_in,
                    &bytes_out,
                    &instance,
                    &cancelled,
                    &failed,
                    &tokens_unknown,
                    &trace_id,
                    &loadtest,
                    &batch_id,
                ],
            )
            .map(|_| ())
        })
    }
}

/// A connection for reading the records back (reports, totals), on the same schema.
pub fn reader(url: &str, password: Option<String>) -> anyhow::Result<Db> {
    PgConnection::new(url, password, "usage", MIGRATIONS)
        .map(|pg| Db::Postgres(Box::new(pg)))
        .map_err(|e| anyhow::anyhow!("usage.store: {e}"))
}
