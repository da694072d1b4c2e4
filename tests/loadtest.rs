//! `firstgate loadtest` against a gateway on loopback: a short sweep prints the table and
//! writes valid JSON and an SVG chart, its counts agree with the gateway's usage store, a
//! user's rate limit shows as `429 requests_per_second`, and an exempt group is not limited.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::globus::{FakeClient, FakeGroup, FakeUser, GlobusSim, Seed};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const OPERATORS: &str = "7c0e5d2a-1b3f-4e8d-9a6c-2f4b8d0e1a35";

/// Runs a two-level streamed sweep as the holder of `token`; returns stdout and the JSON.
async fn sweep(gw: &Gateway, token: &str, dir: &Path, name: &str) -> (String, Value) {
    let args = vec![
        "loadtest".to_string(),
        "--url".into(),
        gw.url("/v1"),
        "--token-env".into(),
        "LOADTEST_TOKEN".into(),
        "--model".into(),
        LLAMA.into(),
        "--concurrency".into(),
        "1,4".into(),
        "--duration".into(),
        "1s".into(),
        "--stream".into(),
        "--max-tokens".into(),
        "4".into(),
        "--json".into(),
        dir.join(format!("{name}.json")).display().to_string(),
        "--plot".into(),
        dir.join(format!("{name}.svg")).display().to_string(),
    ];
    let token = token.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .args(&args)
            .env("LOADTEST_TOKEN", token)
            .output()
            .expect("run firstgate loadtest")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    (stdout, serde_json::from_str(&json).expect("valid JSON"))
}

fn succeeded(report: &Value) -> i64 {
    report["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["requests"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reports_what_the_gateway_recorded_and_exempt_groups_are_not_limited() {
    let seed = Seed {
        clients: vec![FakeClient {
            id: "gw".into(),
            secret: "gw-secret".into(),
        }],
        groups: vec![FakeGroup {
            id: OPERATORS.into(),
            name: "operators".into(),
        }],
        users: vec![
            FakeUser::new("tok-alice", "alice@anl.gov"),
            FakeUser {
                groups: vec![OPERATORS.into()],
                ..FakeUser::new("tok-ops", "ops@anl.gov")
            },
        ],
        ..Seed::default()
    };
    let globus = GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .unwrap();
    let backend = sim(&[LLAMA], |c| {
        c.ttft = Duration::from_millis(5);
        c.itl = Duration::from_millis(2);
    })
    .await;
    let gw = Gateway::start_with(
        &globus_auth(&globus.url(), "gw", "", ""),
        &format!(
            "limits:\n  requests_per_second: 5\n  ip_requests_per_second: 0\n  \
             exempt_groups: [{OPERATORS}]\n{}",
            one_model("sophia", "vllm", LLAMA, &[backend.addr()])
        ),
        &[(GLOBUS_SECRET_ENV, "gw-secret")],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();

    // A user at their limit: the 429s are reported by limit.
    let (table, report) = sweep(&gw, "tok-alice", dir.path(), "alice").await;
    assert!(
        table.starts_with("| model | concurrency | tokens/s | requests/s |"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(LLAMA)).count(),
        2,
        "{table}"
    );
    let levels = report["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    assert!(
        levels
            .iter()
            .any(|l| l["errors"]["429 requests_per_second"].as_u64() > Some(0)),
        "{report}"
    );
    let svg = std::fs::read_to_string(dir.path().join("alice.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );

    // What it counts as answered is what the gateway recorded; a user who is not exempt
    // cannot keep their requests out of the usage reports.
    let ok = succeeded(&report);
    assert!(ok > 0, "{report}");
    assert_recorded(&gw, "alice@anl.gov", 0, ok).await;

    // An exempt group's member is not limited, and their load test is tagged as one.
    let (_, report) = sweep(&gw, "tok-ops", dir.path(), "ops").await;
    for level in report["levels"].as_array().unwrap() {
        assert_eq!(level["errors"], serde_json::json!({}), "{report}");
        assert!(level["requests"].as_u64() > Some(5), "{report}");
    }
    let ok = succeeded(&report);
    assert_recorded(&gw, "ops@anl.gov", 1, ok).await;
    let (_, out, _) = firstgate(&["usage", "--config", &gw.config_path().display().to_string()]);
    assert!(
        out.contains(&format!("{ok} requests of load tests left out"))
            && out.contains("alice@anl.gov"),
        "{out}"
    );
}

/// Waits until the gateway's usage store holds `expected` answered requests of `user`, all
/// with this `loadtest` tag (the writer commits within a flush interval).
async fn assert_recorded(gw: &Gateway, user: &str, loadtest: i64, expected: i64) {
    let count = |tag: i64| {
        usage_store(gw)
            .query_row(
                "SELECT count(*) FROM usage WHERE status = 200 AND username = ?1 AND loadtest = ?2",
                rusqlite::params![user, tag],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
    };
    wait_for(
        &format!("{expected} records of {user} tagged {loadtest}"),
        || async { (count(loadtest) == expected && count(1 - loadtest) == 0).then_some(()) },
    )
    .await;
}
