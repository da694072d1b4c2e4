//! Usage records in PostgreSQL (`usage.store: postgres://...`), shared by replicas: the schema
//! and the one statement that differs from SQLite's (the batch insert, as arrays). Used from
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
    // 2: hourly rollups, as in SQLite's step 6 (`usage/rollup.rs`). Rows already there, and
    // rows a replica of the previous version writes during the upgrade, are not rolled up
    // yet: the writers add them in batches.
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS rolled BOOLEAN NOT NULL DEFAULT false;
    CREATE INDEX IF NOT EXISTS usage_unrolled ON usage (time_ms) WHERE NOT rolled;
    CREATE INDEX IF NOT EXISTS usage_time ON usage (time_ms);
    CREATE TABLE IF NOT EXISTS usage_hourly (
        hour_ms BIGINT NOT NULL,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status_class BIGINT NOT NULL,
        loadtest BIGINT NOT NULL,
        batch BIGINT NOT NULL,
        requests BIGINT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        total_tokens BIGINT NOT NULL,
        failed BIGINT NOT NULL,
        cancelled BIGINT NOT NULL,
        tokens_unknown BIGINT NOT NULL,
        duration_ms BIGINT NOT NULL,
        ttft_ms BIGINT NOT NULL,
        ttft_count BIGINT NOT NULL,
        bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL,
        PRIMARY KEY (hour_ms, username, cluster, framework, model, endpoint, status_class,
                     loadtest, batch)
    );
    CREATE TABLE IF NOT EXISTS usage_state (name TEXT PRIMARY KEY, value BIGINT NOT NULL);",
];

/// Inserts `records` in one statement (columns as arrays), in the writer's transaction; the
/// indexes of those it inserted (a record already there, from a retried batch whose commit was
/// not acknowledged, is skipped).
pub fn insert(
    tx: &mut postgres::Transaction<'_>,
    records: &[UsageRecord],
) -> Result<Vec<usize>, postgres::Error> {
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
    let rows = tx.query(
        "INSERT INTO usage (request_id, time_ms, user_id, username, cluster, \
                 framework, model, endpoint, route, status, prompt_tokens, completion_tokens, \
                 total_tokens, ttft_ms, duration_ms, bytes_in, bytes_out, instance, cancelled, \
                 failed, tokens_unknown, trace_id, loadtest, batch_id, rolled) \
                 SELECT u.*, TRUE FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int4[], \
                 $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], \
                 $17::int8[], $18::text[], $19::bool[], $20::bool[], $21::bool[], $22::text[], \
                 $23::bool[], $24::text[]) AS u ON CONFLICT (request_id) DO NOTHING \
                 RETURNING request_id",
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
    )?;
    let at: std::collections::HashMap<&str, usize> = request_id
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i))
        .collect();
    Ok(rows
        .iter()
        .filter_map(|r| at.get(r.get::<_, &str>(0)).copied())
        .collect())
}

/// A connection to the usage database (the writer's, or one for reading the records back),
/// made on first use with the schema brought up to date.
pub fn open(url: &str, password: Option<String>) -> anyhow::Result<Db> {
    PgConnection::new(url, password, "usage", MIGRATIONS)
        .map(|pg| Db::Postgres(Box::new(pg)))
        .map_err(|e| anyhow::anyhow!("usage.store: {e}"))
}
