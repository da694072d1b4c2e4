//! The Rust half of the Compute contract check (`scripts/compute-contract.sh`): with
//! `FIRSTGATE_CONTRACT_DIR` set, decodes the results the real SDK serialized there (each must
//! equal the value the SDK was given), and writes the task payloads and submit bodies the
//! gateway really sends (a cold request, a relayed cold stream, a FIRST batch), captured on the
//! wire by the stand-in, for the SDK to check. Without the variable it does nothing.

#![cfg(feature = "sim")]

mod common;

use common::*;
use firstgate::compute::serialize::decode_result;
use firstgate::sim::globus::{
    ComputeSeed, FakeClient, FakeEndpoint, FakeFunction, FakeUser, GlobusSim, Seed,
};
use serde_json::{json, Value};
use std::path::PathBuf;

const EP: &str = "2b5f3c1a-7d4e-4f8a-9c0b-1e2d3c4b5a62";
const F_INFER: &str = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e62";
const F_BATCH: &str = "4e5f6a7b-8c9d-4e0f-9a1b-2c3d4e5f6a82";
const RELAY_SECRET: &str = "contract-relay-secret";

fn contract_dir() -> Option<PathBuf> {
    std::env::var_os("FIRSTGATE_CONTRACT_DIR").map(PathBuf::from)
}

#[test]
fn results_the_sdk_serialized_decode_to_the_same_value() {
    let Some(dir) = contract_dir() else { return };
    let results = dir.join("results");
    let mut checked = 0;
    for entry in std::fs::read_dir(&results).expect("results written by the SDK") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".txt") else {
            continue;
        };
        let case = stem.split('.').next().unwrap();
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(results.join(format!("{case}.json"))).unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let decoded = decode_result(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(decoded == expected, "{name} decoded to another value");
        checked += 1;
    }
    assert!(
        checked >= 15,
        "only {checked} results in {}",
        results.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_payloads_are_written_for_the_sdk() {
    let Some(dir) = contract_dir() else { return };
    let out = dir.join("payloads");
    std::fs::create_dir_all(&out).unwrap();
    let work = tempfile::tempdir().unwrap();
    let globus = GlobusSim::start(
        "127.0.0.1:0".parse().unwrap(),
        Seed {
            clients: vec![FakeClient {
                id: "gw".into(),
                secret: "gw-secret".into(),
            }],
            users: vec![FakeUser::new("tok-alice", "alice@anl.gov")],
            compute: ComputeSeed {
                endpoints: vec![FakeEndpoint {
                    id: EP.into(),
                    name: "sophia".into(),
                    cold: false,
                }],
                functions: vec![
                    FakeFunction {
                        id: F_INFER.into(),
                        kind: "inference".into(),
                    },
                    FakeFunction {
                        id: F_BATCH.into(),
                        kind: "batch".into(),
                    },
                ],
                streaming_secret: Some(RELAY_SECRET.into()),
                batch_results_dir: Some(work.path().to_path_buf()),
                ..ComputeSeed::default()
            },
            ..Seed::default()
        },
    )
    .await
    .unwrap();
    globus.start_job(LLAMA, 8001);
    let url = globus.url();
    let gw = Gateway::start_with(
        &globus_auth(&url, "gw", "", ""),
        &format!(
            "batch:\n  dir: batches\nlimits:\n  requests_per_second: 0\n\
             compute:\n  url: {url}\n  auth_url: {url}\n  client_id: gw\n  \
             client_secret_env: {GLOBUS_SECRET_ENV}\n  poll_interval: 100ms\n  \
             streaming:\n    advertise_host: 127.0.0.1\n    advertise_port: {{LISTEN_PORT}}\n    \
             protocol: http\n    secret_env: FG_TEST_RELAY_SECRET\n\
             clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
             \x20         - name: {LLAMA}\n            backends: []\n            compute:\n\
             \x20             endpoint: {EP}\n              function: {F_INFER}\n\
             \x20             api_port: 8001\n\
             \x20             batch_endpoint: {EP}\n              batch_function: {F_BATCH}\n"
        ),
        &[
            (GLOBUS_SECRET_ENV, "gw-secret"),
            ("FG_TEST_RELAY_SECRET", RELAY_SECRET),
        ],
    )
    .await;
    for stream in [false, true] {
        let resp = gw
            .post("/v1/chat/completions")
            .bearer_auth("tok-alice")
            .json(&chat_body(LLAMA, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let input = work.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"custom_id\": \"a\", \"body\": {\"max_tokens\": 2}}\n",
    )
    .unwrap();
    let resp = gw
        .post("/resource_server/sophia/vllm/v1/batches")
        .bearer_auth("tok-alice")
        .json(&json!({"model": LLAMA, "input_file": input.display().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    let stats = &globus.compute().stats;
    let payloads = stats.payloads.lock().unwrap().clone();
    for (i, p) in payloads.iter().enumerate() {
        let kind = if p.contains("stream_task_id") {
            "stream"
        } else if p.contains("batch_id") {
            "batch"
        } else {
            "inference"
        };
        std::fs::write(out.join(format!("{kind}.{i}.payload")), p).unwrap();
    }
    let bodies = stats.submit_bodies.lock().unwrap().clone();
    for (i, b) in bodies.iter().enumerate() {
        std::fs::write(out.join(format!("submit.{i}.body.json")), b.to_string()).unwrap();
    }
    assert_eq!(payloads.len(), 3, "a request, a stream and a batch");
}
