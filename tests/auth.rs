//! Who gets in: Globus introspection against the stand-in, FIRST's rules in order, the token
//! cache, failing closed when Globus is down, JWT mode, and tokens kept out of the logs.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::globus::{FakeClient, FakeGroup, FakeUser, GlobusSim, Seed};
use firstgate::sim::oidc::JwksSim;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

const RESTRICTED: &str = "gpt-oss-120b";
const GROUP: &str = "0a1b2c3d-0000-4000-8000-000000000001";
const CLIENT: &str = "gateway-client-id";
const SECRET: &str = "gateway-client-secret";
const POLICY: &str = "ha-policy-id";
const SERVICE: &str = "a-service-client@clients.auth.globus.org";

fn user(token: &str, username: &str, groups: &[&str]) -> FakeUser {
    FakeUser {
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..FakeUser::new(token, username)
    }
}

/// The stand-in with users for every rule.
async fn globus() -> GlobusSim {
    let mut hasty = user("tok-hasty-policy-fails", "hasty@anl.gov", &[GROUP]);
    hasty.policies.insert(POLICY.into(), false);
    let mut wrong_scope = user("tok-wrong-scope", "scope@anl.gov", &[]);
    wrong_scope.scope = Some("urn:globus:auth:scope:transfer.api.globus.org:all".into());
    let mut wrong_aud = user("tok-wrong-aud", "aud@anl.gov", &[]);
    wrong_aud.aud = Some(vec!["another-service".into()]);
    let mut expired = user("tok-expired-carol", "carol@anl.gov", &[GROUP]);
    expired.expires_in = -60;
    let seed = Seed {
        clients: vec![FakeClient {
            id: CLIENT.into(),
            secret: SECRET.into(),
        }],
        groups: vec![FakeGroup {
            id: GROUP.into(),
            name: "inference-users".into(),
        }],
        users: vec![
            user("tok-alice-secret", "alice@anl.gov", &["inference-users"]),
            user("tok-bob-secret", "bob@anl.gov", &[]),
            user("tok-mallory-secret", "mallory@example.com", &[GROUP]),
            user("tok-service-account", SERVICE, &[]),
            hasty,
            wrong_scope,
            wrong_aud,
            expired,
        ],
        ..Seed::default()
    };
    GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .expect("Globus stand-in starts")
}

/// Cluster `sophia` (open) serving Llama and the group-restricted model, and cluster `anl`
/// open only to anl.gov users.
fn clusters(chat: &VllmSimAddr) -> String {
    format!(
        "clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: [{a}]\n\
         \x20         - name: {RESTRICTED}\n            backends: [{a}]\n            allowed_groups: [{GROUP}]\n\
         \x20 anl:\n    allowed_domains: [anl.gov]\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: [{a}]\n",
        a = chat.0
    )
}

struct VllmSimAddr(std::net::SocketAddr);

async fn start(globus: &GlobusSim, chat: &VllmSimAddr, extra_globus: &str, rules: &str) -> Gateway {
    // Rate limits are tested elsewhere; 1,000 requests of one user must pass here.
    Gateway::start_with(
        &globus_auth(&globus.url(), CLIENT, extra_globus, rules),
        &format!(
            "limits:\n  requests_per_second: 0\n  ip_requests_per_second: 0\n{}",
            clusters(chat)
        ),
        &[(GLOBUS_SECRET_ENV, SECRET), ("RUST_LOG", "debug")],
    )
    .await
}

async fn chat_as(gw: &Gateway, token: Option<&str>, path: &str, model: &str) -> (u16, Value) {
    status_json(post_chat(gw, path, token, model, false).await).await
}

async fn get_as(gw: &Gateway, token: &str, path: &str) -> (u16, Value) {
    let resp = gw.get(path).bearer_auth(token).send().await;
    status_json(resp.expect("request")).await
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_default()
}

fn assert_no_token_logged(gw: &Gateway, tokens: &[&str]) {
    let log = gw.log();
    assert!(!log.is_empty());
    for t in tokens {
        assert!(!log.contains(t), "the token {t} appears in the gateway log");
    }
    assert!(
        !log.contains(SECRET),
        "the client secret appears in the gateway log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firsts_rules_admit_and_refuse_in_order() {
    let globus = globus().await;
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        &format!(
            "    policies: [{POLICY}]\n    required_scope: https://auth.globus.org/scopes/{CLIENT}/action_all\n\
             \x20   audience: {CLIENT}\n"
        ),
        &format!(
            "    service_accounts: [{SERVICE}]\n    allowed_domains: [anl.gov]\n\
             \x20   group_names: {{{GROUP}: ALCF Inference users}}\n"
        ),
    )
    .await;
    let v1 = "/v1/chat/completions";

    // Admitted: an anl.gov user in the group may use everything.
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, RESTRICTED)
            .await
            .0,
        200
    );
    // 1. A listed service account skips the domain check.
    assert_eq!(
        chat_as(&gw, Some("tok-service-account"), v1, LLAMA).await.0,
        200
    );
    // 2. The session's identity provider must be an allowed domain.
    let (s, v) = chat_as(&gw, Some("tok-mallory-secret"), v1, LLAMA).await;
    assert_eq!(s, 403);
    assert!(
        message(&v).contains("anl.gov") && message(&v).contains("allowed_domains"),
        "{v}"
    );
    // 3. Every authentication policy must evaluate true.
    let (s, v) = chat_as(&gw, Some("tok-hasty-policy-fails"), v1, LLAMA).await;
    assert_eq!(s, 403);
    assert!(message(&v).contains("policies"), "{v}");
    // Per-model groups: bob may use Llama but not the restricted model, nor see it.
    assert_eq!(chat_as(&gw, Some("tok-bob-secret"), v1, LLAMA).await.0, 200);
    let (s, v) = chat_as(&gw, Some("tok-bob-secret"), v1, RESTRICTED).await;
    assert_eq!(
        (s, v["error"]["type"].as_str()),
        (403, Some("permission_error"))
    );
    assert!(
        message(&v).contains("allowed_groups")
            && message(&v).contains(&format!("ALCF Inference users ({GROUP})")),
        "{v}"
    );
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, models) = get_as(&gw, "tok-bob-secret", "/v1/models").await;
    assert_eq!(ids(&models), [LLAMA]);
    let (_, models) = get_as(&gw, "tok-alice-secret", "/v1/models").await;
    assert_eq!(ids(&models), [RESTRICTED, LLAMA]);
    let (_, endpoints) = get_as(&gw, "tok-bob-secret", "/resource_server/list-endpoints").await;
    assert_eq!(
        endpoints["clusters"]["sophia"]["frameworks"]["vllm"]["models"],
        json!([LLAMA])
    );

    // Scope and audience are checked too (FIRST does not).
    let (s, v) = chat_as(&gw, Some("tok-wrong-scope"), v1, LLAMA).await;
    assert_eq!(s, 401);
    assert!(message(&v).contains("scope"), "{v}");
    let (s, v) = chat_as(&gw, Some("tok-wrong-aud"), v1, LLAMA).await;
    assert_eq!(s, 401);
    assert!(message(&v).contains("audience"), "{v}");

    // 401s say how to get a fresh token.
    for token in [None, Some("tok-expired-carol"), Some("made-up-token-123")] {
        let (s, v) = chat_as(&gw, token, v1, LLAMA).await;
        assert_eq!(
            (s, v["error"]["type"].as_str()),
            (401, Some("authentication_error")),
            "{token:?}"
        );
        assert!(message(&v).contains("access token"), "{v}");
    }
    let resp = reqwest::Client::new()
        .get(gw.url("/v1/models"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // whoami, in FIRST's shape.
    let (s, who) = get_as(&gw, "tok-alice-secret", "/resource_server/whoami").await;
    assert_eq!(s, 200);
    assert_eq!(who["username"], "alice@anl.gov");
    assert_eq!(who["user_group_uuids"], json!([GROUP]));
    assert_eq!(who["auth_service"], "globus");

    assert_no_token_logged(
        &gw,
        &[
            "tok-alice-secret",
            "tok-bob-secret",
            "tok-mallory-secret",
            "tok-expired-carol",
            "made-up-token-123",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rules_per_domain_and_global_and_cluster_domains() {
    let globus = globus().await;
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let chat = VllmSimAddr(chat.addr());
    let v1 = "/v1/chat/completions";

    let gw = start(
        &globus,
        &chat,
        "",
        &format!("    groups_per_domain: {{anl.gov: [{GROUP}]}}\n"),
    )
    .await;
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let (s, v) = chat_as(&gw, Some("tok-bob-secret"), v1, LLAMA).await;
    assert_eq!(s, 403);
    assert!(message(&v).contains("groups_per_domain"), "{v}");
    // No group requirement for example.com, but cluster `anl` admits anl.gov only.
    let anl = "/resource_server/anl/vllm/v1/chat/completions";
    assert_eq!(
        chat_as(&gw, Some("tok-mallory-secret"), v1, LLAMA).await.0,
        200
    );
    let (s, v) = chat_as(&gw, Some("tok-mallory-secret"), anl, LLAMA).await;
    assert_eq!(s, 403);
    assert!(message(&v).contains("allowed_domains"), "{v}");
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), anl, LLAMA).await.0,
        200
    );
    drop(gw);

    let gw = start(&globus, &chat, "", &format!("    groups: [{GROUP}]\n")).await;
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let (s, v) = chat_as(&gw, Some("tok-bob-secret"), v1, LLAMA).await;
    assert_eq!(s, 403);
    assert!(message(&v).contains("(rule: groups)"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_makes_no_globus_call() {
    let globus = globus().await;
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        "",
        "    allowed_domains: [anl.gov]\n",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            chat_as(&gw, Some("tok-alice-secret"), "/v1/chat/completions", LLAMA)
                .await
                .0,
            200
        );
    }
    // Refusals are cached too.
    for _ in 0..3 {
        assert_eq!(
            chat_as(
                &gw,
                Some("made-up-token-123"),
                "/v1/chat/completions",
                LLAMA
            )
            .await
            .0,
            401
        );
    }
    let stats = globus.stats();
    assert_eq!(stats.introspect.load(Ordering::SeqCst), 2);
    // Memberships are fetched because a model restricts by group, once per token.
    assert_eq!(stats.dependent_token.load(Ordering::SeqCst), 1);
    assert_eq!(stats.my_groups.load(Ordering::SeqCst), 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("firstgate_auth_cache_lookups_total{outcome=\"hit\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_with_a_new_token_introspect_once() {
    let globus = globus().await;
    // Slow introspection, so that every request arrives while the first one is in flight.
    globus.faults().latency_ms.store(300, Ordering::SeqCst);
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        "",
        "    allowed_domains: [anl.gov]\n",
    )
    .await;
    let client = reqwest::Client::new();
    let url = gw.url("/v1/models");
    let requests = (0..1000).map(|_| {
        let req = client.get(&url).bearer_auth("tok-alice-secret");
        async move { req.send().await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{:?}",
        statuses.iter().find(|s| !matches!(s, Ok(200)))
    );
    assert_eq!(globus.stats().introspect.load(Ordering::SeqCst), 1);
    // The metric says the same: one miss; the requests that waited for it joined it.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("firstgate_auth_cache_lookups_total{outcome=\"miss\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("firstgate_auth_cache_lookups_total{outcome=\"joined\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_inside_the_cache_ttl_is_refused_at_expiry() {
    let globus = globus().await;
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        "",
        "    allowed_domains: [anl.gov]\n",
    )
    .await;
    let mut short = user("tok-short-lived", "dave@anl.gov", &[]);
    short.expires_in = 2;
    globus.add_user(short);
    let expires_at = unix_now() + 2;
    assert_eq!(get_as(&gw, "tok-short-lived", "/v1/models").await.0, 200);
    wait_for("the token to be refused", || async {
        (get_as(&gw, "tok-short-lived", "/v1/models").await.0 == 401).then_some(())
    })
    .await;
    // Refused no earlier than its expiry (whole seconds), not served until the cache TTL.
    assert!(unix_now() + 1 >= expires_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_globus_is_down_cached_users_are_served_and_new_tokens_get_503() {
    let mut globus = globus().await;
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        "    retries: 1\n",
        "    allowed_domains: [anl.gov]\n",
    )
    .await;
    let v1 = "/v1/chat/completions";
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );

    globus.stop_listening().await;
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let resp = reqwest::Client::new()
        .post(gw.url(v1))
        .bearer_auth("tok-bob-secret")
        .json(&chat_body(LLAMA, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "auth_unavailable");

    // A Globus 5xx is retried; the failure was not cached, so bob gets in once Globus is back.
    globus.resume_listening().await.unwrap();
    globus.faults().fail(503, Some(1));
    assert_eq!(chat_as(&gw, Some("tok-bob-secret"), v1, LLAMA).await.0, 200);
    assert!(gw.log().contains("retrying"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_tokens_cannot_drive_globus_and_real_users_keep_working() {
    let globus = globus().await;
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = start(
        &globus,
        &VllmSimAddr(chat.addr()),
        "    max_introspections_per_second: 10\n",
        "",
    )
    .await;
    let v1 = "/v1/chat/completions";
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let before = globus.stats().introspect.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    // 5,000 made-up tokens, a tenth of them not even shaped like one, 400 at a time.
    let statuses: Vec<(u16, bool)> = futures_util::stream::iter(0..5000)
        .map(|i| {
            let token = if i % 10 == 0 {
                format!("not{{a}}token%{i}")
            } else {
                format!("Ag{i:040}")
            };
            let req = gw
                .post(v1)
                .bearer_auth(token)
                .json(&chat_body(LLAMA, false));
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.headers().contains_key("retry-after"))
            }
        })
        .buffer_unordered(400)
        .collect()
        .await;
    // Meanwhile (and after) the real user is served from the cache.
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let introspected = globus.stats().introspect.load(Ordering::Relaxed) - before;
    let secs = started.elapsed().as_secs() + 2;
    assert!(
        introspected <= 10 * secs,
        "{introspected} introspections in about {secs} s at 10/s"
    );
    assert!(statuses
        .iter()
        .all(|(s, retry)| *s == 401 || (*s == 503 && *retry)));
    assert!(
        statuses.iter().any(|(s, _)| *s == 503),
        "the cap was reached"
    );
    assert!(gw
        .metrics()
        .await
        .contains("firstgate_rate_limited_total{limit=\"max_introspections_per_second\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_globus_answers_429_cached_users_are_served_and_new_ones_told_to_retry() {
    let globus = globus().await;
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = start(&globus, &VllmSimAddr(chat.addr()), "    retries: 0\n", "").await;
    let v1 = "/v1/chat/completions";
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    globus.faults().fail(429, None);
    assert_eq!(
        chat_as(&gw, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    let resp = post_chat(&gw, v1, Some("tok-bob-secret"), LLAMA, false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    globus.faults().heal();
    assert_eq!(chat_as(&gw, Some("tok-bob-secret"), v1, LLAMA).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_verdicts_so_users_are_not_introspected_again() {
    let globus = globus().await;
    let chat = sim(&[LLAMA], |_| {}).await;
    let mut old = start(&globus, &VllmSimAddr(chat.addr()), "", "").await;
    let v1 = "/v1/chat/completions";
    assert_eq!(
        chat_as(&old, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    assert_eq!(
        chat_as(&old, Some("tok-expired-carol"), v1, LLAMA).await.0,
        401
    );
    let introspected = globus.stats().introspect.load(Ordering::Relaxed);
    let new = old.start_successor();
    old.signal("QUIT");
    wait_for("the old process to exit", || {
        let exited = old.exited();
        async move { exited.then_some(()) }
    })
    .await;
    // The new process answers both from the verdicts the old one handed over: alice
    // admitted, carol's expired token refused, and Globus is not asked again.
    assert_eq!(
        chat_as(&old, Some("tok-alice-secret"), v1, LLAMA).await.0,
        200
    );
    assert_eq!(
        chat_as(&old, Some("tok-expired-carol"), v1, LLAMA).await.0,
        401
    );
    assert_eq!(
        globus.stats().introspect.load(Ordering::Relaxed),
        introspected,
        "{}",
        new.log()
    );
    let file = std::fs::read_to_string(
        old.config_path()
            .with_file_name("firstgate-auth-cache.json"),
    )
    .unwrap();
    assert!(!file.contains("tok-"), "a token was written");
}

// ---- JWT ----

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn jwt(key_pem: &str, kid: &str, claims: Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(fixture(key_pem).as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn claims(aud: &str, exp_offset: i64, n: u32) -> Value {
    json!({
        "iss": "https://idp.example.org", "aud": aud, "sub": "u-123",
        "preferred_username": "erin@anl.gov", "groups": [GROUP], "name": "Erin",
        "exp": (unix_now() as i64 + exp_offset), "iat": unix_now(), "jti": n,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_checks_signature_issuer_audience_and_expiry() {
    let jwks: Value = serde_json::from_str(&fixture("jwks-a.json")).unwrap();
    let idp = JwksSim::start("127.0.0.1:0".parse().unwrap(), jwks)
        .await
        .unwrap();
    let chat = sim(&[LLAMA, RESTRICTED], |_| {}).await;
    let auth = format!(
        "auth:\n  mode: jwt\n  jwt:\n    jwks_url: {}\n    issuer: https://idp.example.org\n    audience: firstgate\n\
         \x20   jwks_min_refresh: 1s\n  rules:\n    allowed_domains: [anl.gov]\n",
        idp.url()
    );
    let gw = Gateway::start_with(
        &auth,
        &clusters(&VllmSimAddr(chat.addr())),
        &[("RUST_LOG", "debug")],
    )
    .await;
    let v1 = "/v1/chat/completions";

    let good = jwt("jwt-key-a.pem", "key-a", claims("firstgate", 600, 1));
    assert_eq!(
        chat_as(&gw, Some(&good), v1, RESTRICTED).await.0,
        200,
        "groups come from the claim"
    );
    let (_, who) = get_as(&gw, &good, "/resource_server/whoami").await;
    assert_eq!(
        (who["username"].as_str(), who["auth_service"].as_str()),
        (Some("erin@anl.gov"), Some("jwt"))
    );

    let expired = jwt("jwt-key-a.pem", "key-a", claims("firstgate", -120, 2));
    let (s, v) = chat_as(&gw, Some(&expired), v1, LLAMA).await;
    assert_eq!(s, 401);
    assert!(message(&v).contains("expired"), "{v}");

    let wrong_aud = jwt("jwt-key-a.pem", "key-a", claims("someone-else", 600, 3));
    let (s, v) = chat_as(&gw, Some(&wrong_aud), v1, LLAMA).await;
    assert_eq!(s, 401);
    assert!(message(&v).contains("audience"), "{v}");

    // Signed with another key under the known kid.
    let forged = jwt("jwt-key-b.pem", "key-a", claims("firstgate", 600, 4));
    assert_eq!(chat_as(&gw, Some(&forged), v1, LLAMA).await.0, 401);

    let mut outsider = claims("firstgate", 600, 5);
    outsider["preferred_username"] = json!("eve@example.com");
    let outsider = jwt("jwt-key-a.pem", "key-a", outsider);
    assert_eq!(chat_as(&gw, Some(&outsider), v1, LLAMA).await.0, 403);

    // Key rotation: the provider now signs with key-b; an unknown kid triggers a fetch (at
    // most one per jwks_min_refresh), after which new tokens are accepted.
    let fetches_before = idp.fetches();
    idp.set_jwks(serde_json::from_str(&fixture("jwks-b.json")).unwrap());
    let mut n = 100;
    wait_for("a token signed with the rotated key to be accepted", || {
        n += 1;
        let token = jwt("jwt-key-b.pem", "key-b", claims("firstgate", 600, n));
        let gw = &gw;
        async move { (chat_as(gw, Some(&token), v1, LLAMA).await.0 == 200).then_some(()) }
    })
    .await;
    let fetched = idp.fetches() - fetches_before;
    assert!((1..=3).contains(&fetched), "{fetched} fetches");
    // The old key is gone from the set.
    let old = jwt("jwt-key-a.pem", "key-a", claims("firstgate", 600, 9999));
    assert_eq!(chat_as(&gw, Some(&old), v1, LLAMA).await.0, 401);

    assert_no_token_logged(&gw, &[&good, &expired, &wrong_aud, &forged]);
}
