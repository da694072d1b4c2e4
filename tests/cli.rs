//! `firstgate check`: the shipped configurations pass, mistakes are reported with file, line
//! and field, and the exit status says which.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::firstgate;

fn check(path: &str) -> (bool, String) {
    let (ok, stdout, stderr) = firstgate(&["check", "--config", path]);
    (ok, format!("{stdout}{stderr}"))
}

#[test]
fn shipped_configurations_are_valid() {
    for path in ["conf/gateway.yaml", "conf/demo.yaml"] {
        let (ok, text) = check(path);
        assert!(ok, "{path}: {text}");
        assert!(text.contains("OK"), "{text}");
    }
}

/// The Kubernetes configuration names the TLS Secret's mount; a certificate made here stands in.
#[test]
fn the_kubernetes_configuration_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = firstgate::sim::certs::TestCa::create(dir.path(), "test CA").unwrap();
    let issued = ca.server("gateway").unwrap();
    let text = std::fs::read_to_string("deploy/kubernetes/gateway.yaml")
        .unwrap()
        .replace("/etc/firstgate/tls/tls.crt", issued.cert.to_str().unwrap())
        .replace("/etc/firstgate/tls/tls.key", issued.key.to_str().unwrap());
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).unwrap();
    let (ok, text) = check(path.to_str().unwrap());
    assert!(ok, "deploy/kubernetes/gateway.yaml: {text}");
    assert!(text.contains("OK (2 clusters, 2 models)"), "{text}");
}

#[test]
fn mistakes_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "auth: {mode: none}\nclusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n          - name: m\n            backends: [\"node1\"]\n",
    )
    .unwrap();
    let (ok, text) = check(path.to_str().unwrap());
    assert!(!ok);
    let expected = format!(
        "{}:8: clusters.sophia.frameworks.vllm.models[0].backends[0]",
        path.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(text.contains("no port"), "{text}");

    std::fs::write(&path, "clusters: {}\n").unwrap();
    let (ok, text) = check(path.to_str().unwrap());
    assert!(!ok);
    assert!(text.contains("missing field `auth`"), "{text}");

    // A duplicated key is reported at the duplicate, not where its block starts.
    std::fs::write(
        &path,
        "auth: {mode: none}\nedge:\n  max_connections: 10\n  keepalive_timeout: 5s\n  max_connections: 20\nclusters: {}\n",
    )
    .unwrap();
    let (ok, text) = check(path.to_str().unwrap());
    assert!(!ok);
    assert!(
        text.contains(&format!("{}:5:", path.display())) && text.contains("max_connections"),
        "{text}"
    );

    let (ok, text) = check(dir.path().join("missing.yaml").to_str().unwrap());
    assert!(!ok);
    assert!(
        text.contains("missing.yaml") && text.contains("cannot read"),
        "{text}"
    );
}
