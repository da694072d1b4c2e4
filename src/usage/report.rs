//! Reports over the usage store, on SQLite or PostgreSQL alike: totals per user and model
//! (`firstgate usage`, the totals loaded at start and read back by replicas), and the summary
//! of a time window for the operator's page. Inside the raw records' retention they read the
//! records; beyond it, the hourly rollups (`Source` says which). Blocking: never on the
//! request path.

use super::Totals;
use crate::sql::{Cols, Db, Result, Val};
use serde_json::{json, Value};

/// Where a report's numbers come from: raw records inside the retention window, hourly
/// rollups beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Source {
    /// The start of the period read (rounded down to the hour when rollups are read).
    pub since_ms: i64,
    /// Before this time the numbers come from hourly rollups; from it on, from raw records.
    /// Equal to `since_ms` when only raw records were read.
    pub raw_from_ms: i64,
}

impl Source {
    /// Whether any of the period was read from rollups.
    pub fn uses_rollups(&self) -> bool {
        self.raw_from_ms > self.since_ms
    }

    /// What was read, in words, for a report's footer.
    pub fn describe(&self) -> String {
        let at = |ms: i64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
        };
        if self.uses_rollups() {
            format!(
                "read from hourly rollups from {} and from raw records since {}",
                at(self.since_ms),
                at(self.raw_from_ms)
            )
        } else {
            "read from raw records".to_string()
        }
    }
}

/// Decides how to read the period since `since_ms`: raw records alone when they are all still
/// there (after `retention::raw_since`), otherwise the rollups of whole hours up to the first
/// hour whose raw records are complete, and raw records from then on.
pub fn plan(db: &mut Db, since_ms: i64) -> Result<Source> {
    let complete_from = super::retention::raw_since(db).map_err(|e| {
        // A store written by a gateway from before retention has no rollup tables yet: the
        // gateway adds them when it opens the store (reports only read it).
        crate::sql::StoreError::new(format!(
            "{e}; if an older gateway wrote this store, start the new gateway once: it adds \
             the rollup tables"
        ))
    })?;
    if since_ms >= complete_from {
        return Ok(Source {
            since_ms,
            raw_from_ms: since_ms,
        });
    }
    let since_hour = super::rollup::hour_of(since_ms);
    let raw_from = super::rollup::hour_of(complete_from + super::rollup::HOUR_MS - 1);
    Ok(Source {
        since_ms: since_hour,
        raw_from_ms: raw_from,
    })
}

/// The rows of a period as one relation `src (t, username, model, requests, prompt_tokens,
/// completion_tokens, total_tokens)`: rollups of the hours in [?5, ?6), raw rows of those hours
/// the rollups do not have yet (being backfilled), and raw rows from ?6 on (and ?1 on). ?2 to
/// ?4 filter by user, model and load test as in [`totals`].
const PERIOD: &str = "(SELECT time_ms AS t, username, model, 1 AS requests, prompt_tokens, \
     completion_tokens, total_tokens FROM usage WHERE time_ms >= ?1 AND time_ms >= ?6 \
     AND (CAST(?2 AS TEXT) IS NULL OR username = ?2) AND (CAST(?3 AS TEXT) IS NULL OR model = ?3) \
     AND (CAST(?4 AS BIGINT) IS NULL OR loadtest = (?4 = 1)) \
     UNION ALL SELECT hour_ms, username, model, requests, prompt_tokens, completion_tokens, \
     total_tokens FROM usage_hourly WHERE hour_ms >= ?5 AND hour_ms < ?6 \
     AND (CAST(?2 AS TEXT) IS NULL OR username = ?2) AND (CAST(?3 AS TEXT) IS NULL OR model = ?3) \
     AND (CAST(?4 AS BIGINT) IS NULL OR loadtest = ?4) \
     UNION ALL SELECT time_ms, username, model, 1, prompt_tokens, completion_tokens, \
     total_tokens FROM usage WHERE NOT rolled AND time_ms >= ?5 AND time_ms < ?6 \
     AND (CAST(?2 AS TEXT) IS NULL OR username = ?2) AND (CAST(?3 AS TEXT) IS NULL OR model = ?3) \
     AND (CAST(?4 AS BIGINT) IS NULL OR loadtest = (?4 = 1))) AS src";

/// The parameters of [`PERIOD`].
fn period_params(
    source: &Source,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
    loadtest: Option<bool>,
) -> Vec<Val> {
    vec![
        since_ms.into(),
        user.into(),
        model.into(),
        loadtest.map(i64::from).into(),
        source.since_ms.into(),
        source.raw_from_ms.into(),
    ]
}

/// Sums the records since `since_ms`, optionally for one user or model; `loadtest` keeps only
/// load-test requests (`Some(true)`), only the others (`Some(false)`), or all. Beyond the raw
/// records' retention the sums come from hourly rollups (see [`totals_from`]).
pub fn totals(
    db: &mut Db,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
    loadtest: Option<bool>,
) -> Result<Vec<Totals>> {
    Ok(totals_from(db, since_ms, user, model, loadtest)?.0)
}

/// [`totals`], and where they were read from.
pub fn totals_from(
    db: &mut Db,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
    loadtest: Option<bool>,
) -> Result<(Vec<Totals>, Source)> {
    let source = plan(db, since_ms)?;
    let rows = db.query(
        &format!(
            "SELECT username, model, CAST(COALESCE(SUM(requests), 0) AS BIGINT), \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) \
             FROM {PERIOD} GROUP BY username, model ORDER BY username, model"
        ),
        &period_params(&source, since_ms, user, model, loadtest),
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
    )?;
    Ok((rows, source))
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
/// duration percentiles, and requests and tokens per `bucket_ms` (oldest first). Beyond the
/// raw records' retention the sums come from hourly rollups (`source` says from when), and the
/// percentiles from the raw records alone.
pub fn summary(db: &mut Db, since_ms: i64, bucket_ms: i64) -> Result<Value> {
    let source = plan(db, since_ms)?;
    let period = period_params(&source, since_ms, None, None, None);
    let total = db
        .query_opt(
            &format!(
                "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), COUNT(DISTINCT username) \
                 FROM {PERIOD}"
            ),
            &period,
            |r| {
                Ok(json!({"requests": r.int(0)?, "prompt_tokens": r.int(1)?,
                          "completion_tokens": r.int(2)?, "users": r.int(3)?}))
            },
        )?
        .unwrap_or_default();
    let top = |db: &mut Db, column: &str, name: &str| -> Result<Vec<Value>> {
        let sql = format!(
            "SELECT {column}, CAST(SUM(requests) AS BIGINT), \
             CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT), \
             COUNT(DISTINCT username) FROM {PERIOD} \
             GROUP BY {column} ORDER BY 2 DESC LIMIT 20"
        );
        let rows = db.query(&sql, &period, |r: &dyn Cols| {
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
    let mut bucketed = period.clone();
    bucketed.push(bucket_ms.into());
    let series = db.query(
        &format!(
            "SELECT (t / ?7) * ?7, CAST(SUM(requests) AS BIGINT), \
             CAST(COALESCE(SUM(total_tokens), 0) AS BIGINT) FROM {PERIOD} GROUP BY 1 ORDER BY 1"
        ),
        &bucketed,
        |r| Ok(json!({"t": r.int(0)?, "requests": r.int(1)?, "tokens": r.int(2)?})),
    )?;
    // Rollups keep sums, not distributions: percentiles are of the raw records read.
    let raw_since = since_ms.max(source.raw_from_ms);
    let mut percentiles = |column: &str| -> Result<Value> {
        Ok(json!({
            "p50": quantile(db, column, raw_since, 0.5)?,
            "p95": quantile(db, column, raw_since, 0.95)?,
        }))
    };
    let ttft = percentiles("ttft_ms")?;
    let duration = percentiles("duration_ms")?;
    Ok(json!({
        "since_ms": since_ms, "bucket_ms": bucket_ms, "total": total, "models": models,
        "users": users, "series": series, "ttft_ms": ttft, "duration_ms": duration,
        "source": source,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report for one user or model reads the period's part of the records through the time
    /// index, never the whole table (the store has no user or model index for it to miss).
    #[test]
    fn a_report_for_one_user_or_model_reads_only_its_period() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::usage::sink::open(&dir.path().join("usage.db")).unwrap();
        let sql = format!("EXPLAIN QUERY PLAN SELECT username, model, SUM(requests) FROM {PERIOD}");
        for (user, model) in [(Some("alice"), None), (None, Some("llama")), (None, None)] {
            let params = rusqlite::params![0, user, model, Option::<i64>::None, 0, 0];
            let mut stmt = conn.prepare(&sql).unwrap();
            let steps: Vec<String> = stmt
                .query_map(params, |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let reads: Vec<_> = steps.iter().filter(|s| s.contains(" usage ")).collect();
            assert_eq!(reads.len(), 2, "{steps:?}");
            for read in reads {
                assert!(
                    read.starts_with("SEARCH usage USING INDEX") && read.contains("time_ms>"),
                    "{user:?} {model:?}: {steps:?}"
                );
            }
        }
    }
}
