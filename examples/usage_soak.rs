//! Soak of the usage store's retention (`scripts/bench.sh --soak`): records at a steady rate
//! into a SQLite store with a short `usage.retention`, the file's size sampled as the raw rows
//! past the window are deleted, then the hourly rollups checked against what was sent, to
//! the token. Not a test: a benchmark whose numbers go in docs/benchmarks.md.
//!
//! `cargo run --release --example usage_soak -- RECORDS RATE RETENTION_SECS`

use firstgate::metrics::Metrics;
use firstgate::usage::retention::Retention;
use firstgate::usage::{Batching, UsageRecord, UsageSink, WriterSink};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("RECORDS RATE RETENTION_SECS"))
        .collect();
    let records = args.first().copied().unwrap_or(2_000_000);
    let rate = args.get(1).copied().unwrap_or(20_000);
    let retention = Duration::from_secs(args.get(2).copied().unwrap_or(20));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("soak.db");
    let metrics = Arc::new(Metrics::new());
    let sink = WriterSink::sqlite(
        &path,
        Batching {
            queue: 100_000,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            retention: Retention {
                raw: Some(retention),
                rollups: None,
            },
        },
        metrics.clone(),
    )?;
    let size = || {
        let f = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        (f(path.clone()), f(path.with_extension("db-wal")))
    };
    let users = ["alice", "bob", "carol", "dave"];
    let models = ["llama-8b", "llama-70b", "mixtral"];
    let (mut sent_requests, mut sent_tokens) = (0i64, 0i64);
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    println!("seconds,records_sent,db_bytes,wal_bytes,rows_deleted");
    for i in 0..records {
        // Paced: record i is due at i / rate seconds.
        let due = Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        let (prompt, completion) = (20 + (i % 97), 5 + (i % 301));
        sent_requests += 1;
        sent_tokens += (prompt + completion) as i64;
        sink.record(UsageRecord {
            request_id: format!("soak-{i}"),
            trace_id: format!("{i:032x}"),
            time_ms: now_ms,
            user_id: "u".into(),
            username: users[i as usize % users.len()].into(),
            cluster: "sophia".into(),
            framework: "vllm".into(),
            model: models[i as usize % models.len()].into(),
            endpoint: "chat/completions".into(),
            route: "direct".into(),
            status: if i % 50 == 0 { 500 } else { 200 },
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            ttft_ms: Some(40),
            duration_ms: 900,
            bytes_in: 700,
            bytes_out: 2_000,
            instance: "10.0.0.1:8000".into(),
            ..UsageRecord::default()
        });
        if start.elapsed() >= next_sample {
            let (db, wal) = size();
            let deleted = metrics.usage_deleted.with_label_values(&["usage"]).get();
            println!("{},{i},{db},{wal},{deleted}", next_sample.as_secs());
            next_sample += Duration::from_secs(5);
        }
    }
    sink.flush(Duration::from_secs(60));
    let (db_bytes, wal_bytes) = size();
    let conn = rusqlite::Connection::open(&path)?;
    let (requests, tokens, rollup_rows): (i64, i64, i64) = conn.query_row(
        "SELECT SUM(requests), SUM(total_tokens), COUNT(*) FROM usage_hourly",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let raw: i64 = conn.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))?;
    let dropped = metrics.usage_dropped.get();
    println!(
        "sent {sent_requests} records ({sent_tokens} tokens) in {:.0}s; rollups: {requests} \
         requests, {tokens} tokens in {rollup_rows} rows; raw rows left {raw}; deleted {}; \
         dropped {dropped}; file {db_bytes} bytes + WAL {wal_bytes}",
        start.elapsed().as_secs_f64(),
        metrics.usage_deleted.with_label_values(&["usage"]).get()
    );
    anyhow::ensure!(
        requests == sent_requests && tokens == sent_tokens,
        "rollups differ"
    );
    anyhow::ensure!(dropped == 0, "records dropped");
    println!(
        "bytes per raw record {:.0}, per rollup row {:.0}",
        bytes_per_row(&conn, "usage")?,
        rollup_row_bytes(&path)?
    );
    Ok(())
}

/// Bytes per row of `table` with its indexes, from SQLite's `dbstat` (0 without rows).
fn bytes_per_row(conn: &rusqlite::Connection, table: &str) -> anyhow::Result<f64> {
    let rows: f64 = conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
        r.get::<_, i64>(0)
    })? as f64;
    let bytes: f64 = conn
        .query_row(
            "SELECT SUM(pgsize) FROM dbstat WHERE name = ?1 OR name IN \
         (SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1)",
            [table],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .unwrap_or(0) as f64;
    Ok(if rows > 0.0 { bytes / rows } else { 0.0 })
}

/// A rollup row's size, measured on 20,000 rows of distinct keys (the soak makes only a few):
/// the store's own schema in a scratch file next to the soak's, filled as the writer fills it.
fn rollup_row_bytes(soak: &std::path::Path) -> anyhow::Result<f64> {
    let scratch = soak.with_file_name("rollups.db");
    std::fs::copy(soak, &scratch)?;
    let mut conn = rusqlite::Connection::open(&scratch)?;
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM usage_hourly", [])?;
    for i in 0..20_000i64 {
        tx.execute(
            "INSERT INTO usage_hourly VALUES (?1, ?2, 'sophia', 'vllm', \
             'meta-llama/Meta-Llama-3.1-8B-Instruct', 'chat/completions', 2, 0, 0, \
             120, 9000, 30000, 39000, 1, 2, 0, 108000, 4800, 120, 84000, 240000)",
            rusqlite::params![(i / 40) * 3_600_000, format!("user{:04}@anl.gov", i % 40)],
        )?;
    }
    tx.commit()?;
    bytes_per_row(&conn, "usage_hourly")
}
