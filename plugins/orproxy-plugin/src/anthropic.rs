//! The Anthropic Messages API in front of an OpenAI-compatible backend: pure translation.
//!
//! A client speaking Messages is served by the daemon's OpenAI pipeline: its request is
//! translated to a chat completion on the way in, the answer (or its stream) back on the way out.
//!
//! # Layout
//!
//! - `request`: Messages request → chat-completions request, and the token estimate.
//! - `response`: chat completion → Messages response.
//! - `stream`: chat-completion chunks → Messages stream events ([`StreamTranslator`]).
//! - `replay`: a whole Messages response → the stream events that would have carried it.
//! - here: errors, usage, the stop-reason mapping and the [`AnswerContext`] they share.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;

use crate::body::JsonObject;
use crate::usage::Usage;

mod replay;
mod request;
mod response;
mod stream;

pub use replay::message_events;
pub use request::{count_tokens_estimate, request_to_openai};
pub use response::response_from_openai;
pub use stream::StreamTranslator;

/// OpenRouter's `format` of `reasoning_details` entries written by Anthropic models: their
/// thinking, signed, or redacted (encrypted).
pub const ANTHROPIC_REASONING_FORMAT: &str = "anthropic-claude-v1";

/// Whether a `reasoning_details` entry's signature is one Anthropic checks against a thinking
/// block: Claude's format (or none named); another provider's signature means nothing to it.
fn claude_signs(format: Option<&str>) -> bool {
    format.is_none_or(|format| format == ANTHROPIC_REASONING_FORMAT)
}

/// Why an Anthropic request (or an upstream answer) cannot be translated.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    /// The body is not JSON, or not a JSON object.
    #[error("body is not a JSON object: {0}")]
    Json(#[source] serde_json::Error),
    /// A field is missing, has the wrong type, or has no OpenAI equivalent; `path` names it
    /// (`messages[2].content[0]`).
    #[error("{path}: {message}")]
    Field {
        /// Where in the request, in JSON-path style.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The upstream's answer is not a chat completion.
    #[error("upstream answer is not a chat completion: {0}")]
    Upstream(String),
}

/// What translating an answer back needs to know besides the answer itself.
#[derive(Debug, Clone, Default)]
pub struct AnswerContext {
    /// The model reported when the upstream's answer names none: the target's, never the
    /// client's selector.
    pub model: String,
    /// The request's stop sequence when it gave exactly one, named in `stop_sequence` when the
    /// upstream says a stop sequence matched without saying which.
    pub stop_sequence: Option<String>,
}

impl AnswerContext {
    /// The context for an answer from `model` to `request`, a translated (OpenAI) body.
    pub fn new(model: &str, request: &JsonObject) -> AnswerContext {
        let stop = request
            .get("stop")
            .and_then(|raw| serde_json::from_str::<Vec<String>>(raw.get()).ok());
        AnswerContext {
            model: model.to_owned(),
            // With several, which one matched cannot be told: null, as the upstream left it.
            stop_sequence: stop
                .filter(|list| list.len() == 1)
                .and_then(|mut list| list.pop()),
        }
    }
}

/// Anthropic usage (`input_tokens`, `output_tokens`, `cache_creation_input_tokens`,
/// `cache_read_input_tokens`) → [`Usage`]; `None` unless it holds input or output tokens.
pub fn usage_from_anthropic(usage: &Value) -> Option<Usage> {
    let object = usage.as_object()?;
    let count = |key: &str| object.get(key).and_then(Value::as_u64);
    let (input, output) = (count("input_tokens"), count("output_tokens"));
    if input.is_none() && output.is_none() {
        return None;
    }
    let cache_read = count("cache_read_input_tokens");
    let cache_write = count("cache_creation_input_tokens");
    let cache_write_1h = object
        .get("cache_creation")
        .and_then(|by_ttl| by_ttl.get("ephemeral_1h_input_tokens"))
        .and_then(Value::as_u64);
    // Anthropic's input_tokens excludes both cache kinds; Usage counts every input token.
    let prompt_tokens = input
        .unwrap_or(0)
        .saturating_add(cache_write.unwrap_or(0))
        .saturating_add(cache_read.unwrap_or(0));
    Some(Usage {
        prompt_tokens,
        completion_tokens: output.unwrap_or(0),
        cached_tokens: cache_read,
        cache_write_tokens: cache_write,
        cache_write_1h_tokens: cache_write_1h,
        reasoning_tokens: None,
        cost_nanos: None,
    })
}

/// [`Usage`] → an Anthropic usage object; `input_tokens` excludes the tokens read from and
/// written to the prompt cache, which have their own fields.
pub fn usage_to_anthropic(u: &Usage) -> Value {
    let read = u.cached_tokens.unwrap_or(0);
    // Unreported writes are 0 rather than absent, so that client-side sums keep working.
    let written = u.cache_write_tokens.unwrap_or(0);
    serde_json::json!({
        "input_tokens": u.prompt_tokens.saturating_sub(read).saturating_sub(written),
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
    })
}

/// An Anthropic error body `{"type":"error","error":{"type":<kind>,"message":...}}`, the kind
/// following Anthropic's mapping from `status`.
pub fn error_body(status: u16, message: &str) -> Bytes {
    Bytes::from(error_json(status, message))
}

/// The same error as an SSE `event: error` event, for a stream already under way.
pub fn error_event(status: u16, message: &str) -> Bytes {
    let json = error_json(status, message);
    let mut out = Vec::with_capacity(json.len() + 24);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Appends the event `event: <name>\ndata: <json>\n\n`.
fn push_event(out: &mut BytesMut, name: &str, data: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Strings, numbers and maps of them: writing into memory cannot fail.
    let _ = serde_json::to_writer(out.writer(), data);
    out.extend_from_slice(b"\n\n");
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

fn error_json(status: u16, message: &str) -> Vec<u8> {
    let envelope = ErrorEnvelope {
        kind: "error",
        error: ErrorDetail {
            kind: error_kind(status),
            message,
        },
    };
    // Two static strings and one &str: serialization cannot fail.
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// Anthropic's error `type` for an HTTP status, as its error documentation lists them.
fn error_kind(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        500 => "api_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        // Other client errors are still the request's fault; everything else is ours or upstream's.
        405..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// How an OpenAI choice ended, as far as it says.
#[derive(Debug, Default, Clone)]
struct Finish {
    /// `finish_reason`.
    reason: Option<String>,
    /// OpenRouter's `native_finish_reason` (the provider's own word, `stop_sequence` for Claude).
    native: Option<String>,
    /// vLLM's `stop_reason`: the stop string that matched, when one did.
    matched: Option<String>,
}

impl Finish {
    /// Anthropic's `stop_reason` and `stop_sequence`. A reply that called tools reports
    /// `tool_use` even when the backend said `stop`, because agent loops key on it; `only` is
    /// the request's single stop sequence, if it had one.
    fn to_anthropic(
        &self,
        called_tools: bool,
        only: Option<&str>,
    ) -> (&'static str, Option<String>) {
        let natural = if called_tools { "tool_use" } else { "end_turn" };
        match self.reason.as_deref() {
            None | Some("stop" | "end_turn") => {
                if let Some(sequence) = &self.matched {
                    ("stop_sequence", Some(sequence.clone()))
                } else if self.native.as_deref() == Some("stop_sequence") {
                    ("stop_sequence", only.map(str::to_owned))
                } else {
                    (natural, None)
                }
            }
            Some("length" | "max_tokens") => ("max_tokens", None),
            Some("tool_calls" | "function_call" | "tool_use") => ("tool_use", None),
            Some("content_filter") => ("refusal", None),
            Some(_) => (natural, None),
        }
    }
}

#[cfg(test)]
mod tests;
