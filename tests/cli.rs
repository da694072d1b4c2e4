//! `firstgate check`: the shipped configurations pass, mistakes are reported with file, line
//! and field, and the exit status says which.

use std::process::Command;

fn check(path: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_firstgate"))
        .args(["check", "--config", path])
        .output()
        .expect("run firstgate");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn shipped_configurations_are_valid() {
    for path in ["conf/gateway.yaml", "conf/demo.yaml"] {
        let (ok, text) = check(path);
        assert!(ok, "{path}: {text}");
        assert!(text.contains("OK"), "{text}");
    }
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

    let (ok, text) = check(dir.path().join("missing.yaml").to_str().unwrap());
    assert!(!ok);
    assert!(
        text.contains("missing.yaml") && text.contains("cannot read"),
        "{text}"
    );
}
