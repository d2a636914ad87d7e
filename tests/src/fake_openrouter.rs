//! A fake OpenRouter that reproduces the wire format of real captures (see
//! `shared/OPENROUTER.md`), with failure behaviours chosen by `fake/...` model names.
//!
//! Model names understood (N, MS, S, CODE are integers):
//!
//! | model | behaviour |
//! |---|---|
//! | any non-`fake/` id, `fake/echo` | success; answer `"echo: " + <last user message text>`, or a tool call / reasoning (below) |
//! | `fake/two-tools` | as `fake/echo`, but a tool-call answer calls the first two tools; streamed, their argument pieces interleave by index (0, 1, 0, 1, ...) |
//! | `fake/fast` | precomputed answer (10 content events when streamed), for benchmarks |
//! | `fake/status-CODE[-retry-S \| -noretry]` | HTTP CODE (400..=599) with OpenRouter's body for it |
//! | `fake/context-length`, `fake/content-policy` | 400 with the typed `metadata.error_type` |
//! | `fake/bad-model`, unknown `fake/...` | 400 `<model> is not a valid model ID` |
//! | `fake/fail-first-N` | 503 for the first N requests naming this model, then success |
//! | `fake/midstream-error[-after-N]` | N (3) content events then an in-band error chunk |
//! | `fake/billed-error-after-N` | as `midstream-error-after-N`, but the error's usage is charged at the model's price instead of OpenRouter's zero-completion `cost: 0` (what a provider without that insurance, or a BYOK key, reports) |
//! | `fake/cut-after-N`, `fake/stall-after-N` | N content events then abort / silence |
//! | `fake/events-N` | answer `w1 w2 ... wN` |
//! | `fake/slow-MS`, `fake/keepalive-MS`, `fake/first-byte-MS` | delays (see [`FakeOptions`]) |
//! | `fake/hang`, `fake/reset` | never answer / close without answering |
//! | `fake/malformed`, `fake/no-done`, `fake/200-error`, `fake/usage-variant` | wire anomalies |
//! | `fake/ignore-stream` | as `fake/echo`, but a stream request gets the JSON answer (`application/json`) |
//! | `fake/no-usage` | a complete echo answer without usage: no `usage` in the JSON body; streamed, content, finish chunk and `[DONE]` but no usage chunk even when `stream_options.include_usage` asked for it (as OpenAI-compatible servers that ignore it do); nothing is billed |
//!
//! The request shapes the answer of the echo-like behaviours (the first two rows, the delays,
//! the wire anomalies, `no-usage`; not `fast`, `events-N`, `midstream-error`,
//! `billed-error-after-N`, `cut-after-N`,
//! `stall-after-N`), in both stream and non-stream form:
//!
//! * **Tool calls**: with a non-empty `tools` array of function tools, `tool_choice` other
//!   than `"none"` and a last message that is not `role: "tool"`, the answer calls the first
//!   tool (or the one `tool_choice: {"type":"function","function":{"name"}}` names; one call
//!   only). Message: `content: ""`, `tool_calls: [{id: "call_<24 alnum>", index, type:
//!   "function", function: {name, arguments: "{\"q\":<last user text>}"}}]`,
//!   `finish_reason` and `native_finish_reason` `"tool_calls"`. Streamed: each call's head
//!   (`index, id, type, function: {name, arguments: ""}`), then its arguments in 3 pieces
//!   (`index` and `function.arguments` only), next to `content: null` as OpenRouter sends it.
//!   `parallel_tool_calls: false` keeps `fake/two-tools` to one call.
//! * **Structured outputs**: with `response_format: {"type": "json_schema", "json_schema":
//!   {"schema"}}` and no tool call, the answer text is compact JSON the schema accepts: every
//!   property of an object, strings set to the last user text, integers 1, numbers 1.5,
//!   booleans true, one item per array, the first of an `enum` or `anyOf`, `$ref`s followed.
//! * **Tool results**: when the last message is `role: "tool"`, the answer is the text
//!   `"tool said: " + <that message's content text>`.
//! * **Reasoning**: `reasoning` with `effort`, `max_tokens` or `enabled: true` (and not
//!   `enabled: false` or `effort: "none"`), `reasoning_effort`, or `include_reasoning: true`
//!   makes the model think `"Thinking about: " + <last user text>` before answering:
//!   `message.reasoning` plus one `reasoning.text` entry in `reasoning_details`, or, streamed,
//!   2 chunks with `delta.reasoning` / `delta.reasoning_details` before the answer. With
//!   `exclude: true` the reasoning is billed but not sent (`{"exclude": true}` alone asks for
//!   none). `anthropic/...` models sign it, as Claude behind OpenRouter does: the detail's
//!   `format` is `anthropic-claude-v1` and carries a `signature` (streamed, in a detail of its
//!   own after the text); a request to such a model is refused with Anthropic's 400 when an
//!   assistant message's `reasoning.text` detail comes back with another signature, or when,
//!   with reasoning on, it answers tool calls whose assistant message has no
//!   `reasoning_details` of that format (tool messages followed by a user message count: to
//!   Anthropic they are one turn). Catalog models without reasoning (`openai/gpt-4o`, `openai/gpt-4o-mini`,
//!   `anthropic/claude-3-5-sonnet`, the `:free` Llama) ignore it, as OpenRouter ignores
//!   unsupported parameters; the OpenAI dialect never returns reasoning.
//!
//! Token counts: `prompt_tokens = ceil(chars of all message texts / 4) + 3 * messages`;
//! `completion_tokens` = number of whitespace-separated words of the answer text, plus
//! `ceil(characters of all tool-call arguments / 4)`, plus the words of the reasoning (also
//! reported as `completion_tokens_details.reasoning_tokens` and in `/generation`);
//! `max_tokens` / `max_completion_tokens` cut the answer text (not reasoning or tool calls)
//! to that many words with `finish_reason: "length"`.
//! Cost is `prompt_tokens * price.prompt + completion_tokens * price.completion` from the
//! `/models` catalog (unlisted models: $1/M prompt, $2/M completion; `:free`: 0), so
//! reasoning is priced as completion.

mod body;
mod chat;
mod errors;
mod reasoning;
mod routes;
mod scenario;
mod schema;
pub(crate) mod server;
mod tools;
mod wire;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use server::{Dialect, Server};

/// The bearer key a default [`FakeOpenRouter`] accepts.
pub const FAKE_API_KEY: &str =
    "sk-or-v1-fake-0000000000000000000000000000000000000000000000000000000000000000";

/// How a fake upstream behaves beyond what the model name selects.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Accepted bearer keys; empty accepts any key (and, for [`crate::FakeOpenAi`], no key).
    pub api_keys: Vec<String>,
    /// `: OPENROUTER PROCESSING` comments sent before the first data event of a stream.
    pub keepalives: usize,
    /// Keep [`RecordedRequest`]s, [`BillingEntry`]s and `/generation` records; benchmarks
    /// turn this off so memory stays flat.
    pub record: bool,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Serve HTTPS with these settings (see [`crate::tls`]) instead of plain HTTP and h2c.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for FakeOptions {
    fn default() -> FakeOptions {
        FakeOptions {
            api_keys: vec![FAKE_API_KEY.to_owned()],
            keepalives: 2,
            record: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: None,
        }
    }
}

/// One HTTP request as the fake received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// HTTP version the request came in (`HTTP/2.0` over TLS when the client chose h2).
    pub version: http::Version,
    /// Path including the query string.
    pub path: String,
    /// Header names are lowercase; repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    /// The request body as received.
    pub body: Bytes,
    /// The client went away before the response was complete (set after the fact; a cut or
    /// reset the fake did on purpose does not count).
    pub disconnected: bool,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request as it arrived (header names lowercase).
    pub(crate) fn from_parts(parts: &http::request::Parts, body: &Bytes) -> Self {
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        RecordedRequest {
            method: parts.method.as_str().to_owned(),
            version: parts.version,
            path,
            headers,
            body: body.clone(),
            disconnected: false,
        }
    }

    /// The body parsed as JSON, `Value::Null` if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A generation that reported usage, as OpenRouter would bill it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingEntry {
    /// Generation id (`gen-...`), as in the body and `X-Generation-Id`.
    pub id: String,
    /// The served model (after `models` fallback).
    pub model: String,
    /// `usage.prompt_tokens` as sent.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens` as sent.
    pub completion_tokens: u64,
    /// Exactly the text of `usage.cost` on the wire (empty for the OpenAI dialect).
    pub cost: String,
}

/// A fake `https://openrouter.ai/api/v1` on `127.0.0.1`; dropping it shuts it down.
pub struct FakeOpenRouter {
    server: Server,
}

impl FakeOpenRouter {
    /// Starts with [`FakeOptions::default`] on the current tokio runtime.
    pub async fn start() -> std::io::Result<FakeOpenRouter> {
        FakeOpenRouter::start_with(FakeOptions::default()).await
    }

    /// Starts with the given options on the current tokio runtime.
    pub async fn start_with(opts: FakeOptions) -> std::io::Result<FakeOpenRouter> {
        Ok(FakeOpenRouter {
            server: Server::start(Dialect::OpenRouter, opts).await?,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT/api/v1` (`https://` with [`FakeOptions::tls`]).
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.requests()
    }

    /// One entry per generation that reported usage, in the order usage was sent.
    pub fn billing(&self) -> Vec<BillingEntry> {
        self.server.billing()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }
}

impl std::fmt::Debug for FakeOpenRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeOpenRouter")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}
