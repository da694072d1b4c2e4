//! The one table of what each inference endpoint is: its path, the body field that carries the
//! input, how its streams are framed and where their usage arrives, which error envelope its
//! clients expect, and whether batches and load tests can use it. Routing, validation, the
//! usage scanner, the cold path, the batch API and `firstgate loadtest` read this table, so a
//! new endpoint is a row here (plus its usage parser, if its shapes are new).

use serde::Deserialize;

/// The inference endpoints the gateway serves (`endpoints:` of a framework in the YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum Endpoint {
    #[serde(rename = "chat/completions")]
    ChatCompletions,
    #[serde(rename = "completions")]
    Completions,
    #[serde(rename = "embeddings")]
    Embeddings,
    /// The OpenAI Responses API (vLLM serves it); offered only where listed.
    #[serde(rename = "responses")]
    Responses,
    /// The Anthropic Messages API (vLLM serves it since 0.11; coding agents use it).
    #[serde(rename = "messages")]
    Messages,
    /// Anthropic's token counting for a Messages request, where the backend serves it.
    #[serde(rename = "messages/count_tokens")]
    CountTokens,
}

/// Which API's clients call an endpoint: their SDKs read errors in that API's envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// `{"error": {"message", "type", "code", "param"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
    /// FIRST's own routes (its batch API, the relay of cold streams):
    /// `{"error": {"code", "message", "info"}}`
    First,
}

/// How an endpoint's server-sent events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `data:` chunks ending with `data: [DONE]`; usage in a last chunk only when
    /// `stream_options.include_usage` asks for it.
    OpenAiChunks,
    /// Typed events (`event:` lines) ending with a final event that carries the usage
    /// (`response.completed`, `message_stop` after `message_delta`); nothing to ask for.
    TypedEvents,
    /// Never streamed.
    None,
}

/// One row of the table.
struct Row {
    endpoint: Endpoint,
    /// The path after `/v1/`.
    path: &'static str,
    /// The body field that carries the input (validated by `parse_control_fields`).
    input: &'static str,
    framing: Framing,
    envelope: Envelope,
    /// Allowed as a line's `url` in the OpenAI Batch API.
    batchable: bool,
    /// `firstgate loadtest --endpoint` can drive it.
    load_testable: bool,
    /// Its answers report token usage (counting tokens generates none and reports none).
    reports_usage: bool,
}

const TABLE: [Row; 6] = [
    Row {
        endpoint: Endpoint::ChatCompletions,
        path: "chat/completions",
        input: "messages",
        framing: Framing::OpenAiChunks,
        envelope: Envelope::OpenAi,
        batchable: true,
        load_testable: true,
        reports_usage: true,
    },
    Row {
        endpoint: Endpoint::Completions,
        path: "completions",
        input: "prompt",
        framing: Framing::OpenAiChunks,
        envelope: Envelope::OpenAi,
        batchable: true,
        load_testable: true,
        reports_usage: true,
    },
    Row {
        endpoint: Endpoint::Embeddings,
        path: "embeddings",
        input: "input",
        framing: Framing::None,
        envelope: Envelope::OpenAi,
        batchable: true,
        load_testable: true,
        reports_usage: true,
    },
    Row {
        endpoint: Endpoint::Responses,
        path: "responses",
        input: "input",
        framing: Framing::TypedEvents,
        envelope: Envelope::OpenAi,
        batchable: true,
        load_testable: false,
        reports_usage: true,
    },
    Row {
        endpoint: Endpoint::Messages,
        path: "messages",
        input: "messages",
        framing: Framing::TypedEvents,
        envelope: Envelope::Anthropic,
        batchable: false,
        load_testable: true,
        reports_usage: true,
    },
    Row {
        endpoint: Endpoint::CountTokens,
        path: "messages/count_tokens",
        input: "messages",
        framing: Framing::None,
        envelope: Envelope::Anthropic,
        batchable: false,
        load_testable: false,
        reports_usage: false,
    },
];

impl Endpoint {
    /// Every endpoint, in the table's order.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    /// Offered by a framework that does not list its endpoints.
    pub const DEFAULT: [Endpoint; 3] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ];

    fn row(self) -> &'static Row {
        &TABLE[self as usize]
    }

    /// The path after `/v1/`.
    pub fn path(self) -> &'static str {
        self.row().path
    }

    /// Parses the path after `/v1/`.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        TABLE.iter().find(|r| r.path == path).map(|r| r.endpoint)
    }

    /// The body field that carries the input.
    pub fn input_field(self) -> &'static str {
        self.row().input
    }

    pub fn framing(self) -> Framing {
        self.row().framing
    }

    /// Whether its streams report usage only when `stream_options.include_usage` asks (the
    /// gateway then asks on the client's behalf and hides the usage chunk).
    pub fn usage_on_request(self) -> bool {
        self.framing() == Framing::OpenAiChunks
    }

    pub fn envelope(self) -> Envelope {
        self.row().envelope
    }

    pub fn batchable(self) -> bool {
        self.row().batchable
    }

    pub fn load_testable(self) -> bool {
        self.row().load_testable
    }

    /// Whether its answers report token usage (a record without it has tokens unknown).
    pub fn reports_usage(self) -> bool {
        self.row().reports_usage
    }

    /// What ends a finished stream after its last event (`data: [DONE]`, or nothing where the
    /// last typed event is the end).
    pub fn stream_end(self) -> &'static str {
        match self.framing() {
            Framing::OpenAiChunks => super::END,
            Framing::TypedEvents | Framing::None => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_the_enums_order_and_paths_round_trip() {
        for (i, e) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(TABLE[i].endpoint, e);
            assert_eq!(Endpoint::from_path(e.path()), Some(e));
            // The YAML name is the path.
            let yaml: Endpoint = serde_yaml_ng::from_str(e.path()).unwrap();
            assert_eq!(yaml, e);
        }
        assert_eq!(Endpoint::from_path("images"), None);
    }
}
