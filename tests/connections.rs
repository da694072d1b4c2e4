//! Client connections at the edge: every way a client can stall is bounded, connection caps
//! hold, forwarded addresses cannot be varied to escape limits, and the admin routes that
//! change state are protected. Timeouts are short in these configurations so the suite stays
//! fast; every wait has a deadline.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::certs::TestCa;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Reads until the gateway closes the connection (or resets it); returns what it sent and how
/// long that took. Fails the test after the harness deadline.
async fn until_closed(conn: &mut TcpStream) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was still open after {DEADLINE:?}"),
        }
    }
}

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.addr).await.expect("connect")
}

/// A connection from another loopback address (the whole of 127/8 is this host).
async fn connect_from(ip: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.expect("connect")
}

/// A kept-alive HTTP/1.1 request on `conn`; returns the status (the body is read too).
async fn request_on(conn: &mut TcpStream, path: &str) -> u16 {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

/// Waits until the gateway holds no client connection (the harness's own have closed).
async fn no_connections(gw: &Gateway) {
    wait_for("the gateway to hold no client connection", || async {
        (count(&gw.metrics().await, "firstgate_client_connections") == 0).then_some(())
    })
    .await;
}

fn count(text: &str, series: &str) -> u64 {
    common::metric(text, series) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_before_their_request_is_read_are_closed() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "edge:\n  client_header_timeout: 1s\n  keepalive_timeout: 1s\n  client_read_timeout: 1s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;

    // A connection that sends nothing, and one that sends a partial head, are closed; the
    // partial one is told why.
    let mut idle = connect(&gw).await;
    let mut partial = connect(&gw).await;
    partial.write_all(b"POST ").await.unwrap();
    let (said, _) = until_closed(&mut idle).await;
    assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
    let (said, _) = until_closed(&mut partial).await;
    let said = String::from_utf8_lossy(&said);
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("\"code\":\"request_timeout\""), "{said}");

    // A head that drips in, a byte every 200 ms, is closed at the total time although no
    // single read waits long.
    let mut drip = connect(&gw).await;
    let head = b"GET /resource_server/health HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut closed_after = None;
    for b in head {
        if drip.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed_after = match closed_after {
        Some(t) => t,
        None => panic!(
            "the whole head dripped in over {:?} and was served",
            started.elapsed()
        ),
    };
    assert!(closed_after < Duration::from_secs(8), "{closed_after:?}");

    // The shortest real request, HTTP/1.0 without headers (18 bytes), is answered at once
    // although it is shorter than the HTTP/2 preface.
    let mut probe = connect(&gw).await;
    probe.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (said, took) = until_closed(&mut probe).await;
    let said = String::from_utf8_lossy(&said);
    assert!(said.starts_with("HTTP/1."), "{said}");
    assert!(said.contains(" 404 "), "{said}");
    assert!(
        took < Duration::from_secs(1),
        "answered only when the head timed out: {took:?}"
    );

    // A body that stalls after a few bytes gets 408.
    let mut upload = connect(&gw).await;
    upload
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
    let (said, _) = until_closed(&mut upload).await;
    let said = String::from_utf8_lossy(&said);
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");

    // An idle kept-alive connection is closed after keepalive_timeout.
    let mut kept = connect(&gw).await;
    assert_eq!(request_on(&mut kept, "/resource_server/health").await, 200);
    let (said, _) = until_closed(&mut kept).await;
    assert!(said.is_empty());

    let m = gw.metrics().await;
    assert!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"header_timeout\"}"
        ) >= 3,
        "{m}"
    );
    assert_eq!(chat.stats().requests.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_http2_connections_that_stall_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::create(dir.path(), "test CA").unwrap();
    let cert = ca.server("gateway").unwrap();
    let tls_port = free_port();
    let gw = Gateway::start(&format!(
        "edge:\n  client_header_timeout: 1s\n  tls_handshake_timeout: 1s\n  keepalive_timeout: 2s\n\
         tls:\n  listen: 127.0.0.1:{tls_port}\n  cert: {}\n  key: {}\n",
        cert.cert.display(),
        cert.key.display()
    ))
    .await;

    // A TLS connection that never sends its ClientHello.
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let (said, _) = until_closed(&mut silent).await;
    assert!(said.is_empty());

    // An h2c connection that sends the preface and SETTINGS, then nothing: idle, closed after
    // keepalive_timeout.
    let preface_and_settings: Vec<u8> = [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
    ]
    .concat();
    let mut idle_h2c = connect(&gw).await;
    idle_h2c.write_all(&preface_and_settings).await.unwrap();
    let (said, _) = until_closed(&mut idle_h2c).await;
    assert!(
        !said.is_empty(),
        "the gateway answered with its own SETTINGS"
    );

    // A header block that is never finished (HEADERS without END_HEADERS) is closed at
    // client_header_timeout, not kept alive.
    let mut stalled = connect(&gw).await;
    stalled.write_all(&preface_and_settings).await.unwrap();
    // HEADERS, 1 byte of header block (`:method: GET`), flags END_STREAM only, stream 1.
    stalled
        .write_all(&[0, 0, 1, 1, 0x1, 0, 0, 0, 1, 0x82])
        .await
        .unwrap();
    until_closed(&mut stalled).await;

    // A preface that stops half-way.
    let mut half = connect(&gw).await;
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (said, _) = until_closed(&mut half).await;
    assert!(said.is_empty(), "no HTTP/1 answer to an HTTP/2 client");

    let m = gw.metrics().await;
    assert_eq!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"tls_handshake_timeout\"}"
        ),
        1,
        "{m}"
    );
    assert!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"header_timeout\"}"
        ) >= 2,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_beyond_its_connection_share_is_refused_while_others_are_served() {
    let gw = Gateway::start("edge:\n  max_connections_per_ip: 2\n").await;
    no_connections(&gw).await;
    let mut held = vec![connect(&gw).await, connect(&gw).await];
    // The two held connections are served...
    for conn in &mut held {
        assert_eq!(request_on(conn, "/resource_server/health").await, 200);
    }
    // ...two more from the same address are closed as they arrive...
    for _ in 0..2 {
        let mut extra = connect(&gw).await;
        let _ = extra
            .write_all(b"GET /resource_server/health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await;
        let (said, _) = until_closed(&mut extra).await;
        assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
    }
    // ...while another address is served.
    let mut other = connect_from("127.0.0.2", gw.addr).await;
    assert_eq!(request_on(&mut other, "/resource_server/health").await, 200);
    // Closing one gives the address its slot back.
    drop(held.pop());
    wait_for("the address to get a slot back", || async {
        let mut again = connect(&gw).await;
        let _ = again
            .write_all(b"GET /resource_server/health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await;
        let mut buf = [0u8; 12];
        match again.read_exact(&mut buf).await {
            Ok(_) => (&buf[9..12] == b"200").then_some(()),
            Err(_) => None,
        }
    })
    .await;
    let m = gw.metrics().await;
    assert!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"max_connections_per_ip\"}"
        ) >= 2,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_new_clients_wait_and_idle_ones_make_room() {
    let chat = sim(&[LLAMA], |c| c.itl = Duration::from_millis(100)).await;
    let gw = Gateway::start(&format!(
        "edge:\n  max_connections: 2\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    no_connections(&gw).await;
    let stream_body = serde_json::json!({
        "model": LLAMA, "stream": true, "max_tokens": 15,
        "messages": [{"role": "user", "content": "a story"}],
    });
    // Two streams take both slots (each client has its own connection).
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let (url, body) = (gw.url("/v1/chat/completions"), stream_body.clone());
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.text().await.unwrap();
            })
        })
        .collect();
    wait_for("both streams to run", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 2).then_some(())
    })
    .await;
    // A third client waits for a slot rather than failing, and is served once a stream ends.
    let third = reqwest::Client::new()
        .get(gw.url("/resource_server/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 200);
    assert!(
        chat.stats().streams_completed.load(Ordering::Relaxed) >= 1,
        "the third client was served while both slots were busy"
    );
    drop(third);
    for s in futures_util::future::join_all(streams).await {
        s.unwrap();
    }
    no_connections(&gw).await;

    // Idle kept-alive connections make room: two of them hold the slots, a new client is
    // served and one of them is closed.
    let mut idle = vec![connect(&gw).await, connect(&gw).await];
    for conn in &mut idle {
        assert_eq!(request_on(conn, "/resource_server/health").await, 200);
    }
    let fresh = reqwest::Client::new()
        .get(gw.url("/resource_server/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 200);
    let m = gw.metrics().await;
    assert!(count(&m, "firstgate_accept_waits_total") >= 1, "{m}");
    assert!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"reclaimed_idle\"}"
        ) >= 1,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_send_a_byte_cannot_starve_a_real_client_at_the_cap() {
    let chat = sim(&[LLAMA], |_| {}).await;
    // A long header timeout: without reclaiming, the real client would wait for it (the silent
    // sockets closed 50 at a time, 6 times over).
    let gw = Gateway::start(&format!(
        "edge:\n  max_connections: 50\n  client_header_timeout: 20s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    no_connections(&gw).await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(connect(&gw).await);
    }
    wait_for("the gateway to hold 50 silent connections", || async {
        (count(&gw.metrics().await, "firstgate_client_connections") == 50).then_some(())
    })
    .await;
    let start = Instant::now();
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body(LLAMA, false))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(r.status(), 200);
    eprintln!("served in {waited:?} behind 300 silent sockets at a cap of 50");
    assert!(
        waited < Duration::from_secs(5),
        "a real client waited {waited:?} behind silent sockets (the header timeout is 20 s)"
    );
    let m = gw.metrics().await;
    assert!(
        count(
            &m,
            "firstgate_client_connections_closed_total{reason=\"reclaimed_silent\"}"
        ) >= 50,
        "{m}"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_lines_appended_by_a_proxy_cannot_be_varied_to_escape_the_address_limit() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "edge:\n  trusted_proxies: [127.0.0.1/32]\n\
         limits:\n  ip_requests_per_second: 1\n  ip_burst: 2\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 1..=8 {
        // The client writes a new address each time; the proxy (HAProxy's `option
        // forwardfor`) appends its own line with the real one.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            format!("198.51.100.{i}").parse().unwrap(),
        );
        headers.append("x-forwarded-for", "203.0.113.5".parse().unwrap());
        let r = http
            .post(gw.url("/v1/chat/completions"))
            .headers(headers)
            .json(&chat_body(LLAMA, false))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..2], &[200, 200], "{statuses:?}");
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(
        chat.last_request_headers().unwrap()["x-forwarded-for"],
        "203.0.113.5, 127.0.0.1"
    );
    // The access log names the same client.
    wait_for("the access log to name the client", || async {
        gw.log()
            .contains("\"client\":\"203.0.113.5\"")
            .then_some(())
    })
    .await;
    assert!(
        !gw.log().contains("198.51.100."),
        "a client-written address was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_can_be_undone_and_admin_changes_refuse_cross_site_requests() {
    let gw = Gateway::start_with(
        "auth:\n  mode: none\nadmin:\n  token_env: TEST_ADMIN_TOKEN\n",
        "",
        &[("TEST_ADMIN_TOKEN", "s3cret")],
    )
    .await;
    let http = reqwest::Client::new();
    let ready = || async {
        let r = http.get(gw.admin_url("/ready")).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);

    // A form a web page of another site could post, and a browser request marked cross-site,
    // are refused; readiness is untouched.
    let form = http
        .post(gw.admin_url("/drain"))
        .header("content-type", "application/x-www-form-urlencoded")
        .bearer_auth("s3cret")
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 403);
    let marked = http
        .post(gw.admin_url("/drain"))
        .header("content-type", "application/json")
        .header("sec-fetch-site", "cross-site")
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status(), 403);
    // Without the token: 401.
    let anonymous = http
        .post(gw.admin_url("/drain"))
        .header("x-firstgate-admin", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(ready().await.0, 200);

    // Drain, with the reason on /ready, then undo it.
    let drained = http
        .post(gw.admin_url("/drain"))
        .header("x-firstgate-admin", "1")
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 503);
    let (status, body) = ready().await;
    assert_eq!(status, 503);
    assert!(
        body["reason"].as_str().unwrap().contains("DELETE /drain"),
        "{body}"
    );
    let undone = http
        .delete(gw.admin_url("/drain"))
        .header("x-firstgate-admin", "1")
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(undone.status(), 200);
    assert_eq!(ready().await.0, 200);

    // `firstgate drain` sends what the listener requires.
    let drain = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .args(["drain", "--admin", &gw.admin.to_string()])
            .args(["--token-env", "TEST_ADMIN_TOKEN"])
            .args(extra)
            .env("TEST_ADMIN_TOKEN", "s3cret")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
    };
    drain(&[]);
    assert_eq!(ready().await.0, 503);
    drain(&["--undo"]);
    assert_eq!(ready().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_rebound_to_the_admin_listener_can_neither_switch_nor_read_it() {
    let gw = Gateway::start("").await;
    let http = reqwest::Client::new();
    let port = gw.admin.port();
    let rebound = format!("evil.example:{port}");
    // What a page of evil.example sends once its name resolves to 127.0.0.1: the browser
    // calls it same-origin and lets it send JSON.
    for (method, path) in [
        (reqwest::Method::POST, "/drain"),
        (reqwest::Method::PUT, "/maintenance"),
        (reqwest::Method::POST, "/reload"),
    ] {
        let r = http
            .request(method, gw.admin_url(path))
            .header("host", &rebound)
            .header("sec-fetch-site", "same-origin")
            .header("origin", format!("http://{rebound}"))
            .json(&serde_json::json!({"message": "pwned"}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(r).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("host_not_allowed")),
            "{path}: {body}"
        );
    }
    // Reads that name users, and the page itself.
    for path in ["/api/state", "/api/usage?window=1h", "/"] {
        let r = http
            .get(gw.admin_url(path))
            .header("host", &rebound)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    // A foreign Origin with the right Host (a page of another site posting to 127.0.0.1).
    let r = http
        .put(gw.admin_url("/maintenance"))
        .header("origin", "http://evil.example")
        .json(&serde_json::json!({"message": "pwned"}))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(r).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("origin_not_allowed")),
        "{body}"
    );
    // Nothing was switched: the API still serves, and the probes answer whatever the Host.
    let ready = http
        .get(gw.admin_url("/ready"))
        .header("host", &rebound)
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let maintenance: Value = http
        .get(gw.admin_url("/maintenance"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!maintenance.to_string().contains("pwned"), "{maintenance}");
    // The operator's own tools are served as before.
    let r = http
        .put(gw.admin_url("/maintenance"))
        .header("origin", format!("http://127.0.0.1:{port}"))
        .json(&serde_json::json!({"message": "back at 14:00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Runs `firstgate serve` with `yaml` and waits (at most 10 s) for it to exit; returns whether
/// it exited with success and what it printed.
fn serve_until_exit(yaml: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "{yaml}server:\n  upgrade_sock: {d}/upgrade.sock\n  pid_file: {d}/firstgate.pid\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_firstgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 10 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    (
        status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_listen_or_has_an_empty_admin_token_exits_at_once() {
    let running = Gateway::start("").await;
    let taken = running.addr;
    let admin = format!("127.0.0.1:{}", free_port());
    let (ok, out) = tokio::task::spawn_blocking(move || {
        serve_until_exit(
            &format!("listen: {taken}\nadmin_listen: {admin}\nauth:\n  mode: none\n"),
            &[],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("cannot listen on {taken} (listen)"))
            && out.contains("Address already in use"),
        "{out}"
    );
    // The running gateway is untouched.
    assert_eq!(
        reqwest::get(running.url("/resource_server/health"))
            .await
            .unwrap()
            .status(),
        200
    );

    let (listen, admin) = (free_port(), free_port());
    let (ok, out) = tokio::task::spawn_blocking(move || {
        serve_until_exit(
            &format!(
                "listen: 127.0.0.1:{listen}\nadmin_listen: 127.0.0.1:{admin}\n\
                 auth:\n  mode: none\nadmin:\n  token_env: FG_TEST_EMPTY_ADMIN_TOKEN\n"
            ),
            &[("FG_TEST_EMPTY_ADMIN_TOKEN", "")],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "admin.token_env: the environment variable FG_TEST_EMPTY_ADMIN_TOKEN is empty"
        ),
        "{out}"
    );
}
