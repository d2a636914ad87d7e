//! The [`Backend`] trait every plugin implements, and the values that cross it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

use crate::body::JsonObject;
use crate::failure::Failure;
use crate::openai;
use crate::sse::SseEvent;
use crate::usage::{Nanos, Usage};

/// A backend plugin: pure translation between orproxy's OpenAI-shaped calls and one upstream API.
///
/// The daemon drives each attempt through these phases and does all I/O itself:
///
/// ```text
/// prepare ──► [daemon sends, or plays a LocalReply]
///         ├─ 2xx JSON ─► map_response
///         ├─ 2xx SSE ──► stream_mapper(..).map(event) for every event
///         └─ other ────► classify ─► retry elsewhere or answer the client
/// ```
///
/// Only `kind` and `prepare` are required; the defaults speak the OpenAI wire format.
pub trait Backend: Send + Sync + 'static {
    /// The plugin name used in config `type:` and in logs.
    fn kind(&self) -> &'static str;

    /// Builds the upstream request for one attempt, or answers locally.
    fn prepare(&self, call: &Call<'_>) -> Result<Prepared, PrepareError>;

    /// Reads a successful non-streaming answer: usage, served model, or an error hidden in a 200.
    fn map_response(&self, body: &Bytes) -> MappedResponse {
        openai::map_response(body)
    }

    /// A fresh per-stream event mapper; `client_asked_usage` tells whether the client's own
    /// request asked for the usage chunk (a plugin that asks on its behalf strips it).
    fn stream_mapper(&self, _client_asked_usage: bool) -> Box<dyn StreamMapper> {
        Box::new(openai::ChunkMapper::default())
    }

    /// Classifies a non-2xx upstream answer.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Failure {
        Failure::from_openai_error(status, headers, body)
    }

    /// Whether the upstream speaks the Anthropic Messages API itself: requests that arrive in
    /// that format are then passed through untranslated ([`Backend::prepare_messages`]).
    fn speaks_messages(&self) -> bool {
        false
    }

    /// Builds the upstream request for an Anthropic Messages body passed through as it is
    /// (`call.body` is that body, `model` already replaced). Only called when
    /// [`Backend::speaks_messages`].
    fn prepare_messages(&self, _call: &Call<'_>) -> Result<Prepared, PrepareError> {
        Err(PrepareError::Unsupported(
            "this backend does not speak the Anthropic Messages API".into(),
        ))
    }

    /// Reads usage and the served model from a passed-through Messages answer.
    fn map_messages_response(&self, _body: &Bytes) -> MappedResponse {
        MappedResponse::default()
    }

    /// Classifies the events of a passed-through Messages stream, relaying them unchanged.
    fn messages_stream_mapper(&self) -> Box<dyn StreamMapper> {
        Box::new(openai::ChunkMapper::default())
    }

    /// The upstream's own `count_tokens` request for a Messages body, if it has one.
    fn count_tokens(&self, _call: &Call<'_>) -> Option<Prepared> {
        None
    }

    /// The request that lists the upstream's models, if it can list them.
    fn list_models(&self, _api_key: Option<&str>) -> Option<Prepared> {
        None
    }

    /// Reads the answer to [`Backend::list_models`].
    fn map_models(&self, body: &[u8]) -> Result<Vec<ModelInfo>, MapError> {
        openai::map_models(body)
    }
}

/// Everything a plugin needs to build one upstream attempt.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// orproxy's id for the client request (for upstream tracing headers, never required).
    pub request_id: &'a str,
    /// The client's body with the daemon's rewrites applied (`model` is already the upstream model).
    pub body: &'a JsonObject,
    /// The upstream model name.
    pub model: &'a str,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The upstream key chosen for this attempt.
    pub api_key: Option<&'a str>,
    /// Outbound identity, already resolved from config and the client's headers.
    pub identity: Identity<'a>,
    /// Extra outbound headers (forwarded client headers, rule-set headers).
    pub headers: &'a [(HeaderName, HeaderValue)],
}

/// Outbound identity values; `None` means "send nothing" for that header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// `HTTP-Referer` (OpenRouter's app URL).
    pub referer: Option<&'a str>,
    /// `X-Title` / `X-OpenRouter-Title` (OpenRouter's app name).
    pub title: Option<&'a str>,
}

/// The outcome of [`Backend::prepare`].
#[derive(Debug)]
pub enum Prepared {
    /// Send this request upstream.
    Http(UpstreamRequest),
    /// No network: the plugin answers itself (the built-in `mock` backend).
    Local(LocalReply),
}

/// A fully built upstream HTTP request.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// HTTP method.
    pub method: Method,
    /// Absolute URL, parsed once when the plugin was built.
    pub url: Uri,
    /// Headers, including authentication.
    pub headers: HeaderMap,
    /// Body bytes (empty for GET).
    pub body: Bytes,
}

/// An answer produced without network I/O; the daemon relays it like an upstream's.
#[derive(Debug, Clone)]
pub struct LocalReply {
    /// Status code.
    pub status: StatusCode,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body, whole or as timed events.
    pub body: LocalBody,
}

/// The body of a [`LocalReply`].
#[derive(Debug, Clone)]
pub enum LocalBody {
    /// One buffer.
    Full(Bytes),
    /// SSE events (each complete with its blank line), emitted `interval` apart.
    Events {
        /// The events in order.
        events: Vec<Bytes>,
        /// Delay before each event.
        interval: Duration,
    },
}

/// Why a plugin could not build a request.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The backend needs a key and none is configured.
    #[error("backend needs an API key and none is configured")]
    MissingKey,
    /// The request cannot be expressed for this backend.
    #[error("{0}")]
    Unsupported(String),
    /// A header value contained bytes HTTP does not allow.
    #[error("invalid header value for {0}")]
    InvalidHeader(&'static str),
}

/// Why an upstream answer could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable upstream answer: {0}")]
pub struct MapError(pub String);

/// What [`Backend::map_response`] found in a successful answer.
#[derive(Debug, Default)]
pub struct MappedResponse {
    /// A replacement body; `None` relays the upstream's bytes unchanged.
    pub body: Option<Bytes>,
    /// Usage, when reported.
    pub usage: Option<Usage>,
    /// The model that actually served, when reported.
    pub model: Option<String>,
    /// Set when the 200 carries an error instead of an answer.
    pub failure: Option<Failure>,
    /// Set when the answer is there but cut short by an upstream failure (OpenRouter's
    /// choice-level `error` with `finish_reason: "error"`): relayed, recorded as broken.
    pub partial: Option<Failure>,
    /// Bytes of JSON of the answer's messages (text, tool calls, reasoning): what an answer
    /// that reports no usage is estimated from, four bytes per token as the prompt is.
    pub answer_bytes: usize,
}

/// Maps one stream's events, keeping whatever state the translation needs.
pub trait StreamMapper: Send {
    /// Classifies (and, for translating plugins, rewrites) one upstream event.
    fn map(&mut self, event: SseEvent) -> MappedEvent;

    /// Events to emit when the upstream ends without its terminator; default none.
    fn finish(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    /// True once the upstream signalled that the answer is whole (a finish reason or usage), so
    /// an end of stream without a terminator is not a truncation.
    fn is_complete(&self) -> bool {
        false
    }

    /// The model named by the stream's chunks, once seen.
    fn served_model(&self) -> Option<&str> {
        None
    }
}

/// One mapped event.
#[derive(Debug)]
pub struct MappedEvent {
    /// What the event means for the relay.
    pub kind: EventKind,
    /// Usage carried by this event.
    pub usage: Option<Usage>,
    /// What to send the client for it.
    pub out: Output,
}

/// The meaning of an upstream event for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A comment: keeps the connection alive, carries nothing.
    KeepAlive,
    /// Data that is not yet answer content (role-only first chunk).
    Preamble,
    /// Answer content (text, tool calls, reasoning, or a finish reason).
    Content,
    /// A chunk with usage and no content.
    Usage,
    /// The stream's terminator.
    Done,
    /// An in-stream error.
    Failed(Failure),
    /// Data the relay cannot understand (malformed JSON); relayed, never interpreted.
    Unknown,
}

/// The client-side output for one event.
#[derive(Debug)]
pub enum Output {
    /// Send these bytes (usually the upstream event unchanged).
    One(Bytes),
    /// Send several events.
    Many(Vec<Bytes>),
    /// Send nothing.
    Nothing,
}

/// A model an upstream offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The upstream's model id.
    pub id: String,
    /// Its price, when the upstream publishes one.
    pub price: Option<Price>,
    /// The largest answer it gives, when published (OpenRouter's `top_provider.max_completion_tokens`).
    pub max_output_tokens: Option<u64>,
}

/// Prices in nano-dollars per million tokens (so fractions of a nano-dollar per token stay exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Per million input tokens.
    pub prompt_per_mtok: Nanos,
    /// Per million output tokens.
    pub completion_per_mtok: Nanos,
    /// Per million cached input tokens, when different from input.
    pub cached_prompt_per_mtok: Option<Nanos>,
    /// Per million input tokens written to the prompt cache, when different from input
    /// (Anthropic's models charge 1.25× input for a write).
    pub cache_write_prompt_per_mtok: Option<Nanos>,
    /// Per million input tokens written to be kept an hour, when different from the write
    /// price (Anthropic: 2× input).
    pub cache_write_1h_prompt_per_mtok: Option<Nanos>,
    /// Per request.
    pub request: Nanos,
}

impl Price {
    /// The price if it can be charged: a negative amount is no price (OpenRouter lists `"-1"`
    /// for routers whose price depends on the model they pick) and would lower a budget's spend.
    /// A negative cached-input or cache-write price alone falls back to the input price.
    pub fn chargeable(self) -> Option<Price> {
        if self.prompt_per_mtok < 0 || self.completion_per_mtok < 0 || self.request < 0 {
            return None;
        }
        Some(Price {
            cached_prompt_per_mtok: self.cached_prompt_per_mtok.filter(|n| *n >= 0),
            cache_write_prompt_per_mtok: self.cache_write_prompt_per_mtok.filter(|n| *n >= 0),
            cache_write_1h_prompt_per_mtok: self.cache_write_1h_prompt_per_mtok.filter(|n| *n >= 0),
            ..self
        })
    }
}
