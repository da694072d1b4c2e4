//! Cold streams by FIRST's protocol (`compute::relay`): the routes FIRST's inference function
//! posts a stream's lines to, and the client's answer built from what they deliver, as it
//! arrives.

use super::cold::{
    completion, error_event, waiting_comment, write_stream_head, ColdPath, StreamAnswer,
};
use super::serve::Outcome;
use super::{body, errors, Gateway};
use crate::catalog::Deployment;
use crate::compute::relay::{RelayEvent, RelayKind, RelayTicket};
use crate::openai::{completion_events, ApiError};
use crate::usage::{Tokens, UsageScanner};
use bytes::Bytes;
use pingora::proxy::Session;
use std::time::Duration;
use tokio::time::Instant;

/// How long lines may still come after the task reported its end (its posts and its result
/// race), as FIRST's own reader waits 5 s for new chunks.
const AFTER_RESULT: Duration = Duration::from_secs(5);

impl Gateway {
    /// A post of FIRST's inference function to `/resource_server/api/streaming/{kind}/`:
    /// checked with the shared secret and the task's token, then handed to the waiting client.
    pub(super) async fn relay_post(
        &self,
        session: &mut Session,
        kind: RelayKind,
    ) -> Result<Outcome, ApiError> {
        let Some((relay, _)) = self.cold.as_ref().and_then(|c| c.streaming.as_ref()) else {
            return Err(errors::relay_off());
        };
        let headers = &session.req_header().headers;
        if !relay.secret_matches(headers.get("x-internal-secret").map(|v| v.as_bytes())) {
            return Err(errors::relay(crate::compute::relay::RelayRefusal::Secret));
        }
        let token = headers
            .get("x-stream-task-token")
            .map(|v| v.as_bytes().to_vec());
        let body = body::read_body(session, kind.max_body(), self.edge.client_read_timeout).await?;
        relay
            .deliver(kind, token.as_deref(), &body)
            .await
            .map_err(errors::relay)?;
        Ok(Outcome::Answer(Bytes::from_static(br#"{"status":"ok"}"#)))
    }
}

/// Answers a cold stream from the lines its task posts back: each batch is sent on as it
/// arrives; `done` ends the stream, `error` ends it with an error event. Keep-alive comments
/// run until the first line. When the task's result comes with no line delivered (its posts
/// failed, or the function answered whole), the result is replayed or the failure told.
pub(super) async fn answer_relayed(
    session: &mut Session,
    cold: &ColdPath,
    d: &Deployment,
    a: StreamAnswer<'_>,
    mut ticket: RelayTicket,
) -> pingora::Result<Tokens> {
    write_stream_head(session, &a).await?;
    // The usage chunk was asked for on the client's behalf: hidden unless it asked too.
    let strip = !a.include_usage && a.endpoint.usage_on_request();
    let mut scanner = UsageScanner::new(true, strip);
    let result = completion(cold, d, a.task);
    tokio::pin!(result);
    let mut tick = tokio::time::interval(cold.keepalive);
    tick.tick().await;
    let mut got_data = false;
    let mut result_done = false;
    let mut last_call: Option<Instant> = None;
    let mut whole: Option<Tokens> = None;
    let end = loop {
        tokio::select! {
            event = ticket.events.recv() => match event {
                Some(RelayEvent::Data(lines)) => {
                    got_data = true;
                    let chunk = Bytes::from(sse_of(&lines));
                    let out = scanner.feed(&chunk, false).unwrap_or(chunk);
                    if !out.is_empty() {
                        session.write_response_body(Some(out), false).await?;
                    }
                }
                Some(RelayEvent::Done) | None => break a.endpoint.stream_end().to_string(),
                Some(RelayEvent::Error(message)) => {
                    break error_event(a.endpoint, &errors::compute_stream(&message, d))
                }
            },
            r = &mut result, if !result_done => {
                result_done = true;
                match r {
                    Err(e) => break error_event(a.endpoint, &e),
                    // The function answered whole (it did not stream): replay it.
                    Ok(c) if !got_data && c.get("streaming").is_none() => {
                        whole = Some(Tokens::of_completion(&c));
                        break completion_events(&c, a.endpoint, a.include_usage);
                    }
                    Ok(_) => last_call = Some(Instant::now() + AFTER_RESULT),
                }
            }
            _ = tokio::time::sleep_until(last_call.unwrap_or_else(Instant::now)), if last_call.is_some() => {
                break if got_data {
                    a.endpoint.stream_end().to_string()
                } else {
                    let message = "the task ended but none of its lines reached the gateway";
                    error_event(a.endpoint, &errors::compute_stream(message, d))
                };
            }
            _ = tick.tick(), if !got_data => {
                // An error here means the client left: stop waiting.
                session.write_response_body(Some(waiting_comment(d, a.task)), false).await?;
            }
        }
    };
    // What the scanner still holds (a finishing chunk waiting for the usage chunk) goes first.
    let held = scanner.feed(&Bytes::new(), true).unwrap_or_default();
    let end = [held, Bytes::from(end)].concat();
    session
        .write_response_body(Some(Bytes::from(end)), true)
        .await?;
    Ok(whole.unwrap_or_else(|| scanner.tokens()))
}

/// Relayed lines (vLLM's SSE lines without their blank lines, joined by `\n`) as SSE events
/// again: each `data:` line closes an event (with the `event:` line before it, on a Responses
/// stream). vLLM's own `[DONE]` is left out: the gateway ends the stream on `done`.
fn sse_of(lines: &str) -> String {
    let mut out = String::with_capacity(lines.len() + lines.len() / 4);
    for line in lines.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.is_empty() || line == "data: [DONE]" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if line.starts_with("data:") {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::sse_of;

    #[test]
    fn relayed_lines_become_events_again() {
        assert_eq!(
            sse_of("data: {\"a\":1}\ndata: {\"b\":2}\r\ndata: [DONE]"),
            "data: {\"a\":1}\n\ndata: {\"b\":2}\n\n"
        );
        assert_eq!(
            sse_of("event: response.created\ndata: {}\n\nevent: response.completed\ndata: {}"),
            "event: response.created\ndata: {}\n\nevent: response.completed\ndata: {}\n\n"
        );
    }
}
