//! The input file of a batch: JSONL, one request per line, checked line by line when it is
//! uploaded (`{"custom_id", "method": "POST", "url", "body"}`, a known endpoint, a model the
//! uploader may use, no streaming, unique ids).

use crate::openai::Endpoint;
use serde_json::Value;
use std::collections::HashSet;

/// The endpoint a batch's `url` (`/v1/chat/completions`, ...) calls, if batches may call it.
pub fn endpoint_of(url: &str) -> Option<Endpoint> {
    url.strip_prefix("/v1/")
        .and_then(Endpoint::from_path)
        .filter(|e| e.batchable())
}

/// The `url`s batches may call, for messages.
pub fn urls() -> String {
    Endpoint::ALL
        .into_iter()
        .filter(|e| e.batchable())
        .map(|e| format!("/v1/{}", e.path()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    pub url: String,
    pub body: Value,
}

/// Parses and checks a whole input file; the error names the first bad line (1-based).
pub fn parse(
    text: &[u8],
    max_lines: usize,
    may_use: &dyn Fn(&str) -> bool,
) -> Result<Vec<Line>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "the file is not UTF-8 text".to_string())?;
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        if out.len() == max_lines {
            return Err(format!(
                "more than {max_lines} requests (batch.max_lines): split the file"
            ));
        }
        let line = parse_line(raw).map_err(|e| format!("line {n}: {e}"))?;
        let model = line.body["model"].as_str().unwrap_or_default();
        if !may_use(model) {
            return Err(format!(
                "line {n}: the model '{model}' does not exist or you may not use it; GET \
                 /v1/models lists yours"
            ));
        }
        if !ids.insert(line.custom_id.clone()) {
            return Err(format!(
                "line {n}: custom_id '{}' is used twice; each request needs its own",
                line.custom_id
            ));
        }
        out.push(line);
    }
    if out.is_empty() {
        return Err("the file has no requests: one JSON object per line".into());
    }
    Ok(out)
}

fn parse_line(raw: &str) -> Result<Line, String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(o) = v else {
        return Err("not a JSON object".into());
    };
    let custom_id = match o.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("\"custom_id\" must be a non-empty string".into()),
    };
    if o.get("method").and_then(Value::as_str) != Some("POST") {
        return Err("\"method\" must be \"POST\"".into());
    }
    let url = o.get("url").and_then(Value::as_str).unwrap_or_default();
    if endpoint_of(url).is_none() {
        return Err(format!("\"url\" '{url}' is not one of {}", urls()));
    }
    let body = match o.get("body") {
        Some(b @ Value::Object(_)) => b.clone(),
        _ => return Err("\"body\" must be a JSON object (the request)".into()),
    };
    if !body["model"].is_string() {
        return Err("\"body\" needs \"model\"".into());
    }
    if body["stream"] == Value::Bool(true) {
        return Err("batch requests are not streamed: remove \"stream\"".into());
    }
    Ok(Line {
        custom_id,
        url: url.to_string(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}"#;

    fn check(text: &str) -> Result<Vec<Line>, String> {
        parse(text.as_bytes(), 10, &|m| m == "m")
    }

    #[test]
    fn good_lines_parse_and_bad_ones_are_named() {
        assert_eq!(check(&format!("{OK}\n\n")).unwrap().len(), 1);
        let e = check(&format!("{OK}\n{OK}")).unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("twice"), "{e}");
        let e = check(&OK.replace("\"m\"", "\"secret\"")).unwrap_err();
        assert!(e.contains("may not use"), "{e}");
        let e = check(&OK.replace("/v1/chat/completions", "/v1/images")).unwrap_err();
        assert!(e.contains("is not one of"), "{e}");
        let e = check(&OK.replace("\"POST\"", "\"GET\"")).unwrap_err();
        assert!(e.contains("method"), "{e}");
        let e = check(&OK.replace("\"messages\": []", "\"stream\": true")).unwrap_err();
        assert!(e.contains("not streamed"), "{e}");
        assert!(check("").unwrap_err().contains("no requests"));
        let many: Vec<String> = (0..11)
            .map(|i| OK.replace("\"a\"", &format!("\"{i}\"")))
            .collect();
        assert!(check(&many.join("\n"))
            .unwrap_err()
            .contains("split the file"));
    }
}
