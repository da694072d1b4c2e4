//! Reports over the usage store, on SQLite or PostgreSQL alike: totals per user and model
//! (`firstgate usage`, the totals loaded at start and read back by replicas), and the summary
//! of a time window for the operator's page. Blocking: never on the request path.

use super::Totals;
use crate::sql::{Cols, Db, Result, Val};
use serde_json::{json, Value};

/// Sums the records since `since_ms`, optionally for one user or model; `loadtest` keeps only
/// load-test requests (`Some(true)`), only the others (`Some(false)`), or all.
pub fn totals(
    db: &mut Db,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
    loadtest: Option<bool>,
) -> Result<Vec<Totals>> {
    db.query(
        "SELECT username, model, COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
         CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) \
         FROM usage WHERE time_ms >= ?1 AND (CAST(?2 AS TEXT) IS NULL OR username = ?2) \
         AND (CAST(?3 AS TEXT) IS NULL OR model = ?3) AND (CAST(?4 AS BIGINT) IS NULL OR loadtest = (?4 = 1)) \
         GROUP BY username, model ORDER BY username, model",
        &[
            since_ms.into(),
            user.into(),
            model.into(),
            loadtest.map(i64::from).into(),
        ],
        |r| {
            Ok(Totals {
                username: r.text(0)?,
                model: r.text(1)?,
                requests: r.int(2)? as u64,
                prompt_tokens: r.int(3)? as u64,
                completion_tokens: r.int(4)? as u64,
                total_tokens: r.int(5)? as u64,
            })
        },
    )
}

/// The value at quantile `q` of `column` among the records since `since_ms` that have one.
fn quantile(db: &mut Db, column: &str, since_ms: i64, q: f64) -> Result<Option<i64>> {
    let filter = format!("FROM usage WHERE time_ms >= ?1 AND {column} IS NOT NULL");
    let n = db
        .query_opt(
            &format!("SELECT COUNT(*) {filter}"),
            &[since_ms.into()],
            |r| r.int(0),
        )?
        .unwrap_or(0);
    if n == 0 {
        return Ok(None);
    }
    let offset = ((n - 1) as f64 * q).round() as i64;
    db.query_opt(
        &format!("SELECT {column} {filter} ORDER BY {column} LIMIT 1 OFFSET ?2"),
        &[since_ms.into(), offset.into()],
        |r| r.int(0),
    )
}

/// The records since `since_ms`: totals, the top models and users, time to first token and
/// duration percentiles, and requests and tokens per `bucket_ms` (oldest first).
pub fn summary(db: &mut Db, since_ms: i64, bucket_ms: i64) -> Result<Value> {
    let since: &[Val] = &[since_ms.into()];
    let total = db
        .query_opt(
            "SELECT COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), COUNT(DISTINCT username) \
             FROM usage WHERE time_ms >= ?1",
            since,
            |r| {
                Ok(json!({"requests": r.int(0)?, "prompt_tokens": r.int(1)?,
                          "completion_tokens": r.int(2)?, "users": r.int(3)?}))
            },
        )?
        .unwrap_or_default();
    let top = |db: &mut Db, column: &str, name: &str| -> Result<Vec<Value>> {
        let sql = format!(
            "SELECT {column}, COUNT(*), CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT), \
             COUNT(DISTINCT username) FROM usage WHERE time_ms >= ?1 \
             GROUP BY {column} ORDER BY 2 DESC LIMIT 20"
        );
        let rows = db.query(&sql, since, |r: &dyn Cols| {
            Ok((r.text(0)?, r.int(1)?, r.int(2)?, r.int(3)?))
        })?;
        Ok(rows
            .into_iter()
            .map(|(key, requests, tokens, users)| {
                json!({name: key, "requests": requests, "tokens": tokens, "users": users})
            })
            .collect())
    };
    let models = top(db, "model", "model")?;
    let users = top(db, "username", "username")?;
    let series = db.query(
        "SELECT (time_ms / ?2) * ?2, COUNT(*), CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) \
         FROM usage WHERE time_ms >= ?1 GROUP BY 1 ORDER BY 1",
        &[since_ms.into(), bucket_ms.into()],
        |r| Ok(json!({"t": r.int(0)?, "requests": r.int(1)?, "tokens": r.int(2)?})),
    )?;
    let mut percentiles = |column: &str| -> Result<Value> {
        Ok(json!({
            "p50": quantile(db, column, since_ms, 0.5)?,
            "p95": quantile(db, column, since_ms, 0.95)?,
        }))
    };
    let ttft = percentiles("ttft_ms")?;
    let duration = percentiles("duration_ms")?;
    Ok(json!({
        "since_ms": since_ms, "bucket_ms": bucket_ms, "total": total, "models": models,
        "users": users, "series": series, "ttft_ms": ttft, "duration_ms": duration,
    }))
}
