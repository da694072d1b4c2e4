//! The gateway at the facility edge: HTTPS with HTTP/2 and HTTP/1.1, h2c, mutual TLS to a
//! backend, the maintenance switch, forwarded headers and header limits, and operations that
//! must drop nothing: SIGHUP reloads, graceful upgrade, draining on SIGTERM.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::certs::{Issued, TestCa};
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn trusting(ca: &Path) -> reqwest::ClientBuilder {
    let pem = std::fs::read(ca).expect("CA file");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
}

/// A streamed chat request that lasts `tokens` inter-token gaps of the simulator.
fn long_stream(tokens: u32) -> Value {
    json!({
        "model": LLAMA,
        "stream": true,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "tell me a long story"}],
    })
}

/// Sends a streamed chat and reads it to the end: `Ok` when it ended with `[DONE]` and no
/// error event, `Err(why)` otherwise.
async fn stream_to_end(client: &reqwest::Client, url: &str, body: &Value) -> Result<(), String> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|ev| ev.trim().strip_prefix("data: "))
        .collect();
    if events.last() != Some(&"[DONE]") || text.contains("\"error\"") {
        return Err(format!("stream ended badly: {}", text.len()));
    }
    Ok(())
}

/// The certificate a TLS server presents on a new handshake (DER).
async fn presented_certificate(port: u16, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in firstgate::pem::read_certificates(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The configuration's HTTPS listener on `port` with `issued` as its certificate.
fn tls_section(port: u16, issued: &Issued) -> String {
    format!(
        "tls:\n  listen: 127.0.0.1:{port}\n  cert: {}\n  key: {}\n",
        issued.cert.display(),
        issued.key.display()
    )
}

fn pem_der(path: &Path) -> Vec<u8> {
    firstgate::pem::read_certificates(path).unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_http2_and_http1_and_the_plain_listener_h2c() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path(), "test CA").unwrap();
    let cert = ca.server("gateway").unwrap();
    let chat = sim(&[LLAMA], |_| {}).await;
    let tls_port = free_port();
    let gw = Gateway::start(&format!(
        "{}{}",
        tls_section(tls_port, &cert),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let https = format!("https://127.0.0.1:{tls_port}/v1/chat/completions");

    let h2 = trusting(&ca.ca_path()).build().unwrap();
    let h1 = trusting(&ca.ca_path()).http1_only().build().unwrap();
    for (client, version) in [(&h2, http::Version::HTTP_2), (&h1, http::Version::HTTP_11)] {
        let r = client
            .post(&https)
            .json(&chat_body(LLAMA, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), version);
        let events = sse_events(r).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        // The backend is told the client came over HTTPS.
        let headers = chat.last_request_headers().unwrap();
        assert_eq!(headers["x-forwarded-proto"], "https");
    }

    // A client that does not trust the certificate gets no answer.
    let untrusting = reqwest::Client::new()
        .post(&https)
        .json(&chat_body(LLAMA, false))
        .send()
        .await;
    assert!(untrusting.is_err());

    // HTTP/2 without TLS (prior knowledge) on the plain listener.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(LLAMA, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(
        chat.last_request_headers().unwrap()["x-forwarded-proto"],
        "http"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_used_while_streams_continue() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path(), "test CA").unwrap();
    let live = ca.server("live").unwrap();
    let chat = sim(&[LLAMA], |c| c.itl = Duration::from_millis(50)).await;
    let tls_port = free_port();
    let gw = Gateway::start(&format!(
        "{}{}",
        tls_section(tls_port, &live),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let first = pem_der(&live.cert);
    assert_eq!(presented_certificate(tls_port, &ca.ca_path()).await, first);

    // A stream over HTTP/2 is under way when the files are renewed; no signal is sent.
    let client = trusting(&ca.ca_path()).build().unwrap();
    let url = format!("https://127.0.0.1:{tls_port}/v1/chat/completions");
    let stream = tokio::spawn({
        let client = client.clone();
        async move { stream_to_end(&client, &url, &long_stream(40)).await }
    });
    wait_for("the stream to start", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    let renewed = ca.server("renewed").unwrap();
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&renewed.key, &live.key).unwrap();
    let second = pem_der(&renewed.cert);
    wait_for(
        "new handshakes to present the renewed certificate",
        || async { (presented_certificate(tls_port, &ca.ca_path()).await == second).then_some(()) },
    )
    .await;
    assert!(gw.log().contains("TLS certificate files changed: reloaded"));
    assert_eq!(stream.await.unwrap(), Ok(()));

    // A broken pair is refused and the renewed certificate stays in use.
    std::fs::write(&live.key, "not a key").unwrap();
    wait_for("the refusal to be logged", || async {
        gw.log()
            .contains("the previous certificate stays in use")
            .then_some(())
    })
    .await;
    assert_eq!(presented_certificate(tls_port, &ca.ca_path()).await, second);

    // SIGHUP reads the files whether or not they look changed.
    let third = ca.server("third").unwrap();
    std::fs::copy(&third.cert, &live.cert).unwrap();
    std::fs::copy(&third.key, &live.key).unwrap();
    gw.signal("HUP");
    wait_for("the SIGHUP reload to be logged", || async {
        gw.log().contains("TLS certificate reloaded").then_some(())
    })
    .await;
    assert_eq!(
        presented_certificate(tls_port, &ca.ca_path()).await,
        pem_der(&third.cert)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_behind_mutual_tls_are_reached_with_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path(), "backend CA").unwrap();
    let server = ca.server("backend").unwrap();
    let client = ca.client("gateway").unwrap();
    let tls = ca.server_config(&server, true).unwrap();
    let backend = sim(&[LLAMA], |c| c.tls = Some(tls)).await;
    let url = format!("https://127.0.0.1:{}/v1", backend.addr().port());
    let gw = Gateway::start(&format!(
        "clusters:\n  metis:\n    frameworks:\n      api:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: [\"{url}\"]\n\
         \x20           tls_ca: {ca}\n            tls_client_cert: {cert}\n            tls_client_key: {key}\n\
         \x20         - name: no-client-certificate\n            backend_model: {LLAMA}\n\
         \x20           backends: [\"{url}\"]\n            tls_ca: {ca}\n",
        ca = ca.ca_path().display(),
        cert = client.cert.display(),
        key = client.key.display(),
    ))
    .await;
    let http = reqwest::Client::new();
    for stream in [false, true] {
        let r = http
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body(LLAMA, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "stream={stream}");
        let text = r.text().await.unwrap();
        assert!(text.contains("chat.completion"), "{text}");
    }
    // Without the client certificate the backend refuses the handshake: a server error, and
    // no request reaches it.
    let before = backend.stats().requests.load(Ordering::Relaxed);
    let r = http
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("no-client-certificate", false))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    assert_eq!(backend.stats().requests.load(Ordering::Relaxed), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_switches_on_and_off_globally_and_per_cluster() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let other = sim(&["other-model"], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("maintenance_on");
    let gw = Gateway::start(&format!(
        "edge:\n  maintenance_file: {}\n\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: [{}]\n\
         \x20 polaris:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: other-model\n            backends: [{}]\n",
        switch.display(),
        chat.addr(),
        other.addr()
    ))
    .await;
    let http = reqwest::Client::new();
    let ask = |path: &'static str, model: &'static str| {
        let http = http.clone();
        let url = gw.url(path);
        async move {
            let r = http
                .post(url)
                .json(&chat_body(model, false))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or_default();
            (status, v)
        }
    };
    let sophia = "/resource_server/sophia/vllm/v1/chat/completions";
    let polaris = "/resource_server/polaris/vllm/v1/chat/completions";
    assert_eq!(ask(sophia, LLAMA).await.0, 200);

    // The file: everything, with the file's text as the message.
    std::fs::write(&switch, "Back at 14:00 UTC.").unwrap();
    let v = wait_for("the file to switch maintenance on", || async {
        let (status, v) = ask(polaris, "other-model").await;
        (status == 503).then_some(v)
    })
    .await;
    assert_eq!(v["error"]["code"], "cluster_under_maintenance");
    assert_eq!(v["error"]["message"], "Back at 14:00 UTC.");
    std::fs::remove_file(&switch).unwrap();
    wait_for("the file's removal to switch it off", || async {
        (ask(polaris, "other-model").await.0 == 200).then_some(())
    })
    .await;

    // The admin listener: one cluster, through both URL layouts; the other is served.
    let admin = |method: reqwest::Method, query: &str| {
        http.request(method, gw.admin_url(&format!("/maintenance{query}")))
            .header("x-firstgate-admin", "test")
    };
    let r = admin(reqwest::Method::PUT, "")
        .json(&json!({"cluster": "sophia", "message": "Sophia is being upgraded."}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for path in [sophia, "/v1/chat/completions"] {
        let (status, v) = ask(path, LLAMA).await;
        assert_eq!(status, 503, "{path}");
        assert_eq!(v["error"]["message"], "Sophia is being upgraded.");
    }
    assert_eq!(ask(polaris, "other-model").await.0, 200);
    let r = admin(reqwest::Method::PUT, "")
        .json(&json!({"cluster": "sophiaa"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a misspelt cluster is refused");
    let r = admin(reqwest::Method::DELETE, "?cluster=sophia")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(ask(sophia, LLAMA).await.0, 200);

    // The configuration's notices, re-read on SIGHUP.
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    let edited = config.replace(
        "edge:\n",
        "edge:\n  maintenance:\n    polaris: Polaris is down for the weekend.\n",
    );
    std::fs::write(gw.config_path(), edited).unwrap();
    gw.signal("HUP");
    let v = wait_for("SIGHUP to apply the notice", || async {
        let (status, v) = ask(polaris, "other-model").await;
        (status == 503).then_some(v)
    })
    .await;
    assert_eq!(v["error"]["message"], "Polaris is down for the weekend.");
    assert_eq!(ask(sophia, LLAMA).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let model = one_model("sophia", "vllm", LLAMA, &[chat.addr()]);
    let http = reqwest::Client::new();
    let send = |gw: &Gateway, xff: &str| {
        http.post(gw.url("/v1/chat/completions"))
            .header("x-forwarded-for", xff)
            .header("x-forwarded-proto", "https")
            .header("x-real-ip", "6.6.6.6")
            .json(&chat_body(LLAMA, false))
            .send()
    };

    // Nobody trusted: the claims are replaced by what the gateway saw...
    let untrusted = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 1\n  ip_burst: 3\n{model}"
    ))
    .await;
    assert_eq!(send(&untrusted, "6.6.6.6").await.unwrap().status(), 200);
    let headers = chat.last_request_headers().unwrap();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers.get("x-real-ip").is_none());
    // ...and a new claimed address per request does not escape the per-address limit.
    let statuses: Vec<u16> =
        join_all((1..=6).map(|i| send(&untrusted, &format!("198.51.100.{i}"))))
            .await
            .into_iter()
            .map(|r| r.unwrap().status().as_u16())
            .collect();
    assert!(statuses.contains(&429), "{statuses:?}");

    // Loopback trusted (a proxy on this host): the hop before it is the client.
    let trusted = Gateway::start(&format!(
        "edge:\n  trusted_proxies: [127.0.0.1/32]\n\
         limits:\n  ip_requests_per_second: 1\n  ip_burst: 3\n{model}"
    ))
    .await;
    assert_eq!(
        send(&trusted, "6.6.6.6, 198.51.100.7")
            .await
            .unwrap()
            .status(),
        200
    );
    let headers = chat.last_request_headers().unwrap();
    assert_eq!(headers["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "https");
    // Each vouched-for client has its own budget.
    let statuses: Vec<u16> = join_all((1..=6).map(|i| send(&trusted, &format!("198.51.100.{i}"))))
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "edge:\n  max_header_bytes: 4096\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-padding", "a".repeat(5000))
        .json(&chat_body(LLAMA, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 4096 bytes"));
    // HTTP/2 (h2c) gets the same JSON answer, not HTTP/2's bare 431.
    let r = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(gw.url("/v1/chat/completions"))
        .header("x-padding", "a".repeat(5000))
        .json(&chat_body(LLAMA, false))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.version(), r.status().as_u16()),
        (reqwest::Version::HTTP_2, 431)
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_header_fields_too_large", "{v}");
    assert_eq!(chat.stats().requests.load(Ordering::Relaxed), 0);
}

/// Streams `workers` concurrent streamed requests in a loop until `stop` is set; returns
/// how many finished and the errors.
async fn steady_load(
    url: String,
    workers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (usize, Vec<String>) {
    let client = reqwest::Client::new();
    let results = join_all((0..workers).map(|_| {
        let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
        async move {
            let mut done = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match stream_to_end(&client, &url, &long_stream(10)).await {
                    Ok(()) => done += 1,
                    Err(e) => errors.push(e),
                }
            }
            (done, errors)
        }
    }))
    .await;
    results
        .into_iter()
        .fold((0, Vec::new()), |(n, mut errs), (d, e)| {
            errs.extend(e);
            (n + d, errs)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_under_streaming_load_lose_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("route.rhai");
    std::fs::write(
        &policy,
        "fn route(req, candidates) { direct(candidates.requested(req).hot()) }",
    )
    .unwrap();
    let chat = sim(&[LLAMA], |c| c.itl = Duration::from_millis(20)).await;
    let gw = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\npolicies:\n  route: {}\n  watch_interval: 1h\n{}",
        policy.display(),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(steady_load(
        gw.url("/v1/chat/completions"),
        16,
        stop.clone(),
    ));
    for round in 1..=5u32 {
        wait_for("more streams to finish", || async {
            (chat.stats().requests.load(Ordering::Relaxed) >= u64::from(round) * 20).then_some(())
        })
        .await;
        std::fs::write(
            &policy,
            format!(
                "// version {round}\nfn route(req, candidates) {{ direct(candidates.requested(req).hot()) }}"
            ),
        )
        .unwrap();
        gw.signal("HUP");
        wait_for("the reload", || async {
            gw.log()
                .contains(&format!("route policy reloaded (version {})", round + 1))
                .then_some(())
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (done, errors) = load.await.unwrap();
    assert!(errors.is_empty(), "{} errors: {errors:?}", errors.len());
    assert!(done >= 100, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_200_streams_completes_them_all_and_hands_over_new_requests() {
    let chat = sim(&[LLAMA], |c| c.itl = Duration::from_millis(100)).await;
    let mut old = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\nshutdown:\n  grace_period: 60s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let url = old.url("/v1/chat/completions");

    // 200 streams of about 3 s each, all on the old process.
    let client = reqwest::Client::new();
    let streams: Vec<_> = (0..200)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { stream_to_end(&client, &url, &long_stream(30)).await })
        })
        .collect();
    wait_for("200 streams in flight", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 200).then_some(())
    })
    .await;

    // Meanwhile new requests keep arriving, in turn on a kept-alive connection (as SDKs do)
    // and on a new connection.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arrivals = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        async move {
            let kept_alive = reqwest::Client::new();
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let fresh = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap();
                for client in [&kept_alive, &fresh] {
                    outcomes.push(stream_to_end(client, &url, &long_stream(2)).await);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        }
    });

    let new = old.start_successor();
    old.signal("QUIT");
    wait_for("the old process to finish its streams and exit", || {
        let exited = old.exited();
        async move { exited.then_some(()) }
    })
    .await;
    for (i, s) in join_all(streams).await.into_iter().enumerate() {
        assert_eq!(s.unwrap(), Ok(()), "stream {i}");
    }
    // The old process is gone: what answers now is the new one.
    let after = reqwest::Client::new();
    stream_to_end(&after, &url, &long_stream(2))
        .await
        .expect("the new process serves");
    stop.store(true, Ordering::Relaxed);
    let outcomes = arrivals.await.unwrap();
    let errors: Vec<_> = outcomes.iter().filter(|o| o.is_err()).collect();
    assert!(
        errors.is_empty(),
        "{} of {}: {errors:?}",
        errors.len(),
        outcomes.len()
    );
    let metrics = reqwest::get(old.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("firstgate_requests_total{cluster=\"sophia\""),
        "the new process counted requests:\n{}",
        new.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_then_exits_without_waiting_out_the_grace_period() {
    let chat = sim(&[LLAMA], |c| c.itl = Duration::from_millis(50)).await;
    // A grace period longer than any wait of this test: the process must leave on its own
    // once the stream is done.
    let mut gw = Gateway::start(&format!(
        "shutdown:\n  grace_period: 300s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(gw.admin_url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stream = tokio::spawn({
        let (http, url) = (http.clone(), gw.url("/v1/chat/completions"));
        async move { stream_to_end(&http, &url, &long_stream(40)).await }
    });
    wait_for("the stream to start", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    // A preStop hook turns readiness off first.
    let r = http
        .post(gw.admin_url("/drain"))
        .header("x-firstgate-admin", "test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        http.get(gw.admin_url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    gw.signal("TERM");
    wait_for("the drained gateway to exit", || {
        let exited = gw.exited();
        async move { exited.then_some(()) }
    })
    .await;
    assert_eq!(stream.await.unwrap(), Ok(()));
    assert!(
        gw.log().contains("drained: no request in flight"),
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_daemon_detaches_writes_its_pid_file_and_refuses_a_broken_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let pid_file = dir.path().join("firstgate.pid");
    let write_config = |name: &str, store: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:{api}\nadmin_listen: 127.0.0.1:{admin}\nauth: {{mode: none}}\n\
                 usage: {{store: {store}}}\n\
                 server:\n  pid_file: {}\n  upgrade_sock: {}/upgrade.sock\n",
                pid_file.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        path
    };
    let serve = |args: &[&str], config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .arg("serve")
            .args(args)
            .arg("--config")
            .arg(config)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    };
    // The command returns once the gateway runs in the background.
    let config = write_config("gateway.yaml", "usage.db");
    assert!(serve(&["--daemon"], &config).success());
    let pid: u32 = wait_for("the pid file", || async {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .await;
    wait_for("the daemon to be ready", || async {
        let r = reqwest::get(format!("http://127.0.0.1:{admin}/ready"))
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;

    // An upgrade whose new process cannot start (its usage store cannot be opened) fails in the
    // foreground, before anyone would send SIGQUIT, and leaves the pid file naming the old one.
    let broken = write_config("broken.yaml", "/nonexistent/usage.db");
    assert!(!serve(&["--upgrade", "--daemon"], &broken).success());
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    let r = reqwest::get(format!("http://127.0.0.1:{admin}/ready"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    signal(pid, "TERM");
    wait_for("the daemon to exit", || async {
        std::net::TcpStream::connect(("127.0.0.1", admin))
            .is_err()
            .then_some(())
    })
    .await;
}
