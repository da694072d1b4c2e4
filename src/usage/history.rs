//! The recorded requests of a period, one row each, for `firstgate policy replay`. Only raw
//! records carry arrivals; where retention has left only hourly rollups the period is cut to
//! where raw records are complete, and the caller is told. Blocking: never on the request path.

use crate::sql::{Cols, Db, Result, Val};

/// One recorded request, as replay needs it (no token, prompt or completion is ever stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Unix time of arrival, in milliseconds.
    pub time_ms: i64,
    pub username: String,
    pub cluster: String,
    pub framework: String,
    pub model: String,
    pub endpoint: String,
    /// `direct`, `compute` or `local` (answered by the gateway itself).
    pub route: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub ttft_ms: Option<u64>,
    pub duration_ms: u64,
    /// `host:port` of the instance that served it (direct route).
    pub instance: String,
    pub batch: bool,
}

/// The requests recorded in `[from_ms, to_ms)`, in arrival order, leaving out load tests; and
/// from when raw records are complete (`retention::raw_since`): before it, only rollups.
pub fn requests_between(
    db: &mut Db,
    from_ms: i64,
    to_ms: i64,
) -> Result<(Vec<RecordedRequest>, i64)> {
    let raw_since = super::retention::raw_since(db)?;
    let rows = db.query(
        "SELECT time_ms, username, cluster, framework, model, endpoint, route, status, \
         prompt_tokens, completion_tokens, ttft_ms, duration_ms, instance, batch_id \
         FROM usage WHERE time_ms >= ?1 AND time_ms < ?2 AND NOT loadtest ORDER BY time_ms",
        &[Val::Int(from_ms.max(raw_since)), Val::Int(to_ms)],
        read,
    )?;
    Ok((rows, raw_since))
}

fn read(r: &dyn Cols) -> Result<RecordedRequest> {
    let count = |i: usize| r.int(i).map(|n| n.max(0) as u64);
    Ok(RecordedRequest {
        time_ms: r.int(0)?,
        username: r.text(1)?,
        cluster: r.text(2)?,
        framework: r.text(3)?,
        model: r.text(4)?,
        endpoint: r.text(5)?,
        route: r.text(6)?,
        status: u16::try_from(r.int(7)?).unwrap_or(0),
        prompt_tokens: count(8)?,
        completion_tokens: count(9)?,
        ttft_ms: r.opt_int(10)?.map(|n| n.max(0) as u64),
        duration_ms: count(11)?,
        instance: r.text(12)?,
        batch: r.opt_text(13)?.is_some(),
    })
}
