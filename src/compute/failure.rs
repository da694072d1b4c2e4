//! What a failed task's `exception` text says, in words a user can act on.
//!
//! The endpoint reports a function's failure as the Python traceback text (globus-compute
//! endpoint, `exception_handling.get_error_string`). FIRST's inference function
//! (`vllm_register_function_with_streaming.py`) raises, when vLLM refuses a request,
//! `Exception("API request failed with status code: N\nResponse text: {vLLM's body}\nResponse
//! headers: {...}")`, and its outer handler wraps that as `"Unexpected error of type Exception:
//! ...\nResponse time: 0.07"`. So the traceback's last line is the response time, and the part
//! worth showing is vLLM's own status and message in the middle. Everything else (frames, file
//! paths, hosts, vLLM's headers) stays in the gateway's log.

use serde_json::Value;

/// Most characters of a backend's message passed on.
const MAX_MESSAGE: usize = 1000;

const FAILED_AT: &str = "API request failed with status code:";
const TEXT_AT: &str = "Response text:";
/// What FIRST's function appends after vLLM's body.
const AFTER_TEXT: [&str; 2] = ["\nResponse headers:", "\nResponse time:"];

/// The model server's refusal, as FIRST's function reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRefusal {
    /// vLLM's HTTP status.
    pub status: u16,
    /// vLLM's own message (`error.message`, or `message` of its older error shape), or its
    /// body when that is not JSON.
    pub message: String,
}

/// vLLM's status and message when `exception` is FIRST's "API request failed" report.
pub fn backend_refusal(exception: &str) -> Option<BackendRefusal> {
    let at = exception.find(FAILED_AT)?;
    let rest = &exception[at + FAILED_AT.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let status: u16 = digits.parse().ok()?;
    let message = rest
        .find(TEXT_AT)
        .map(|t| {
            let text = &rest[t + TEXT_AT.len()..];
            let end = AFTER_TEXT
                .iter()
                .filter_map(|m| text.find(m))
                .min()
                .unwrap_or(text.len());
            said(text[..end].trim())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("the model's server answered HTTP {status}"));
    Some(BackendRefusal { status, message })
}

/// The message inside a backend's error body: OpenAI's `{"error": {"message"}}`, vLLM's older
/// `{"object": "error", "message"}`, FastAPI's `{"detail"}`; else the text itself.
fn said(body: &str) -> String {
    let text = match serde_json::from_str::<Value>(body) {
        Ok(v) => {
            let found = [&v["error"]["message"], &v["message"], &v["detail"]]
                .into_iter()
                .find(|m| !m.is_null());
            match found {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => body.to_string(),
            }
        }
        Err(_) => body.to_string(),
    };
    let text = text.trim();
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// The exception's class and first line, without the traceback: what follows the last frame
/// line of the traceback (frames are indented), e.g. `WorkerLost` or `ValueError: no job 7`.
/// The message is kept only when short and naming no host, address or path.
pub fn exception_summary(exception: &str) -> String {
    let lines: Vec<&str> = exception.lines().collect();
    let after_frames = lines
        .iter()
        .rposition(|l| l.starts_with(' ') || l.starts_with('\t'))
        .map_or(0, |i| i + 1);
    let line = lines[after_frames.min(lines.len())..]
        .iter()
        .find(|l| !l.trim().is_empty())
        .or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()))
        .copied()
        .unwrap_or("unknown error");
    let (class, rest) = line.split_once(':').unwrap_or((line, ""));
    let class = class.rsplit('.').next().unwrap_or(class).trim();
    let rest = rest.trim();
    let revealing = [" on host ", "host=", "://", "/", "\\", "@"]
        .iter()
        .any(|m| rest.contains(m));
    if rest.is_empty() || rest.len() > 120 || revealing {
        class.to_string()
    } else {
        format!("{class}: {rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the endpoint reports when FIRST's function gets a 400 from vLLM.
    const FIRST_400: &str = "Traceback (most recent call last):\n  File \"/home/svc/fn.py\", line 271, in vllm_inference_function\n    return handle_non_streaming_request(\n  File \"/home/svc/fn.py\", line 152, in handle_non_streaming_request\n    raise Exception(error_msg)\nException: Unexpected error of type Exception: API request failed with status code: 400\nResponse text: {\"object\":\"error\",\"message\":\"max_tokens must be at least 1, got 0.\",\"type\":\"BadRequestError\",\"param\":null,\"code\":400}\nResponse headers: {'date': 'Mon, 01 Dec 2026 10:00:00 GMT', 'server': 'uvicorn'}\nResponse time: 0.0712";

    #[test]
    fn vllms_status_and_message_are_read_from_firsts_report() {
        assert_eq!(
            backend_refusal(FIRST_400),
            Some(BackendRefusal {
                status: 400,
                message: "max_tokens must be at least 1, got 0.".into()
            })
        );
        // The streamed form (no headers, no time) and OpenAI's newer error shape.
        let streamed = "API request failed with status code: 400\nResponse text: {\"error\": {\"message\": \"This model's maximum context length is 4096 tokens.\", \"type\": \"BadRequestError\", \"code\": 400}}";
        assert_eq!(
            backend_refusal(streamed).unwrap().message,
            "This model's maximum context length is 4096 tokens."
        );
        let plain = "Exception: API request failed with status code: 503\nResponse text: Service Unavailable\nResponse time: 1.2";
        assert_eq!(
            backend_refusal(plain),
            Some(BackendRefusal {
                status: 503,
                message: "Service Unavailable".into()
            })
        );
        assert_eq!(backend_refusal("ValueError: no job 7"), None);
    }

    #[test]
    fn other_exceptions_are_summarized_without_the_traceback() {
        let lost = "Traceback (most recent call last):\n  File \"/x.py\"\nparsl.executors.high_throughput.errors.WorkerLost: Task failure due to loss of worker 0 on host x3005c0s13b0n0";
        assert_eq!(exception_summary(lost), "WorkerLost");
        assert_eq!(
            exception_summary("Traceback\n  File \"a\"\nValueError: no job 7\nmore text"),
            "ValueError: no job 7"
        );
        assert_eq!(
            exception_summary("MaxResultSizeExceeded(10485761, 10485760)"),
            "MaxResultSizeExceeded(10485761, 10485760)"
        );
        // Paths, hosts and addresses stay with the operators.
        for revealing in [
            "FileNotFoundError: [Errno 2] No such file: '/home/svc/models/x'",
            "ConnectionError: HTTPConnectionPool(host='10.1.2.3', port=8000)",
            "RuntimeError: cannot reach http://node17:8000",
        ] {
            let class = revealing.split(':').next().unwrap();
            assert_eq!(exception_summary(revealing), class, "{revealing}");
        }
    }
}
