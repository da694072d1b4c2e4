//! Property tests of everything that reads outside input: the control-field parser, the SSE
//! usage scanner, the forwarded-header parser, the configuration loader and the Compute result
//! decoder. None may panic on any input, and the scanner must not care how a stream is cut.
//! Bounded: `PROPTEST_CASES` (default 256 here) cases per property, so CI stays fast.

use bytes::Bytes;
use firstgate::compute::serialize::decode_result;
use firstgate::edge::TrustedProxies;
use firstgate::openai::parse_control_fields;
use firstgate::openai::Endpoint;
use firstgate::usage::UsageScanner;
use proptest::prelude::*;
use std::net::IpAddr;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

/// A stream as a backend could send it: chunks with content (the last one finishing the
/// choice), maybe a usage chunk, `[DONE]`, with one kind of line end; and the usage chunk's
/// event (empty without one).
fn sse_stream() -> impl Strategy<Value = (Vec<u8>, u64, String)> {
    (
        prop::collection::vec("[a-z ]{0,12}", 0..20),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
        any::<bool>(),
        1u64..1000,
    )
        .prop_map(|(texts, end, with_usage, prompt)| {
            let event = |v: serde_json::Value| format!("data: {v}{end}{end}");
            let mut out = String::new();
            for (i, t) in texts.iter().enumerate() {
                let finish = (i + 1 == texts.len()).then_some("stop");
                out.push_str(&event(serde_json::json!({"choices": [{"index": 0,
                    "delta": {"content": t}, "finish_reason": finish}]})));
            }
            let usage = if with_usage {
                event(serde_json::json!({"choices": [], "usage": {"prompt_tokens": prompt,
                    "completion_tokens": texts.len(), "total_tokens": prompt + texts.len() as u64}}))
            } else {
                String::new()
            };
            out.push_str(&usage);
            out.push_str(&format!("data: [DONE]{end}{end}"));
            (out.into_bytes(), prompt, usage)
        })
}

/// Feeds `stream` cut at `cuts`; returns what the client got and the tokens read.
fn scan(stream: &[u8], cuts: &[usize], strip: bool) -> (Vec<u8>, firstgate::usage::Tokens) {
    let mut scanner = UsageScanner::new(true, strip);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.sort_unstable();
    points.push(stream.len());
    let mut out = Vec::new();
    let mut at = 0;
    for (i, &p) in points.iter().enumerate() {
        let chunk = Bytes::copy_from_slice(&stream[at..p]);
        let end = i == points.len() - 1;
        match scanner.feed(&chunk, end) {
            Some(replaced) => out.extend_from_slice(&replaced),
            None => out.extend_from_slice(&chunk),
        }
        at = p;
    }
    (out, scanner.tokens())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_scanner_gives_the_same_output_and_usage_however_the_stream_is_cut(
        (stream, prompt, usage) in sse_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..30),
        strip in any::<bool>(),
    ) {
        let (whole, tokens) = scan(&stream, &[], strip);
        let (cut, cut_tokens) = scan(&stream, &cuts, strip);
        prop_assert_eq!(&whole, &cut);
        prop_assert_eq!(tokens, cut_tokens);
        if !usage.is_empty() {
            prop_assert_eq!(tokens.prompt, prompt);
        }
        // Without stripping the client gets the stream byte for byte; with it, all but the
        // usage chunk.
        if !strip {
            prop_assert_eq!(&whole, &stream);
        } else {
            let stream = String::from_utf8(stream).unwrap();
            prop_assert_eq!(String::from_utf8(whole).unwrap(), stream.replacen(&usage, "", 1));
        }
    }

    #[test]
    fn the_scanner_survives_any_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
        strip in any::<bool>(),
    ) {
        let (out, _) = scan(&bytes, &cuts, strip);
        if !strip {
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn control_fields_never_panic_and_a_rewrite_keeps_other_bytes(
        body in prop::collection::vec(any::<u8>(), 0..512),
        model in "[a-zA-Z0-9/._-]{1,20}",
        extra in "[a-z_]{1,8}",
        value in "[0-9a-z\"\\[\\]{}:, ]{0,20}",
    ) {
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
            let _ = parse_control_fields(&body, endpoint);
        }
        let json = format!(
            r#"{{"{extra}": {value:?}, "model": {model:?}, "stream": true, "messages": []}}"#
        );
        let body = Bytes::from(json);
        if let Ok(c) = parse_control_fields(&body, Endpoint::ChatCompletions) {
            prop_assert_eq!(c.rewrite(&body, None, false), body.clone());
            let renamed = c.rewrite(&body, Some("other"), true);
            let v: serde_json::Value = serde_json::from_slice(&renamed).unwrap();
            prop_assert_eq!(&v["model"], "other");
            prop_assert_eq!(&v["stream_options"]["include_usage"], true);
        }
    }

    #[test]
    fn forwarded_headers_never_name_an_address_nobody_vouched_for(
        lines in prop::collection::vec("[0-9a-f.:, ]{0,40}", 0..4),
        protos in prop::collection::vec("[a-zA-Z, ]{0,10}", 0..3),
        peer in prop::sample::select(vec!["10.0.0.2", "203.0.113.9", "::1"]),
    ) {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut headers = http::HeaderMap::new();
        for l in &lines {
            headers.append("x-forwarded-for", l.parse().unwrap());
        }
        for p in &protos {
            headers.append("x-forwarded-proto", p.parse().unwrap());
        }
        let peer: IpAddr = peer.parse().unwrap();
        let c = trusted.client(peer, false, &headers);
        if !trusted.trusts(&peer) {
            prop_assert_eq!(c.ip, peer);
        }
        prop_assert!(c.forwarded_for.ends_with(&peer.to_string()));
        prop_assert!(c.proto == "http" || c.proto == "https");
    }

    #[test]
    fn the_configuration_loader_never_panics(text in "[ -~\n]{0,400}") {
        let _ = firstgate::config::parse(std::path::Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn compute_results_never_panic(
        header in prop::sample::select(vec!["11\n", "13\n", "00\n", "zz\n", ""]),
        body in prop::collection::vec(any::<u8>(), 0..512),
        as_base64 in any::<bool>(),
    ) {
        use base64::Engine as _;
        let body = if as_base64 {
            base64::engine::general_purpose::STANDARD.encode(&body)
        } else {
            String::from_utf8_lossy(&body).into_owned()
        };
        let _ = decode_result(&format!("{header}{body}"));
    }
}
