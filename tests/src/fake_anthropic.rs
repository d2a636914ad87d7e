//! A fake Anthropic Messages API (`https://api.anthropic.com`) that answers in the real wire
//! format, with failure behaviours chosen by `fake/...` model names like [`crate::FakeOpenRouter`].
//!
//! Routes: `POST /v1/messages`, `POST /v1/messages/count_tokens`, `GET /v1/models`. Each needs
//! `x-api-key` equal to the fake's key (else 401) and an `anthropic-version` header (else 400).
//!
//! | model | behaviour |
//! |---|---|
//! | any non-`fake/` id | success (below) |
//! | `fake/status-CODE` | HTTP CODE (400..=599) with Anthropic's error body (`429`: `retry-after: 1`; `529`: `overloaded_error`) |
//! | `fake/context-length` | 400 `prompt is too long: ...` |
//! | `fake/overloaded-midstream` | streamed: one text delta, then `event: error` (`overloaded_error`); else 529 |
//! | other `fake/...` | 404 `not_found_error` |
//!
//! Success answers: after a `tool_result` in the last user message, `"tool result: " + its
//! text`; else, when the request offers `tools`, a `tool_use` of the first tool with input
//! `{"q": <last user text>}` (`stop_reason: tool_use`); else `"echo: " + <last user text>`.
//! `max_tokens` cuts a text answer to that many words (`stop_reason: max_tokens`).
//! With `thinking` (`enabled` or `adaptive`) the answer starts with a thinking block,
//! `"Thinking about: " + <last user text>`, signed (streamed: `thinking_delta`, then
//! `signature_delta`). As Anthropic does, a request is refused (400) when a thinking block in an
//! assistant message comes back with another signature, or when, with thinking on, it answers
//! tool calls whose assistant message does not start with thinking.
//!
//! Tokens: the prompt is `ceil(chars of all system, text and tool-result text / 4)`, reported as
//! `input_tokens`; when any part of the request carries `cache_control`, half of it (rounded
//! down) is reported as `cache_creation_input_tokens` instead, so the three input fields always
//! add up to the same prompt, and `cache_creation` splits them by time to live (all
//! `ephemeral_1h_input_tokens` when a breakpoint asks for `"ttl": "1h"`, else all five-minute).
//! `cache_read_input_tokens` is 0. `output_tokens` is the number of
//! whitespace-separated words of the answer text (of the input JSON text for a tool call).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::serve::accept_loop;
use crate::{RecordedRequest, thinking_signature};

/// The `x-api-key` a [`FakeAnthropic::start`] fake accepts.
pub const FAKE_ANTHROPIC_KEY: &str = "sk-ant-api03-fake-000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000-AAAAAAAA";

/// The model `GET /v1/models` lists.
pub const FAKE_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

/// A fake `https://api.anthropic.com` on `127.0.0.1`; dropping it shuts it down.
pub struct FakeAnthropic {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Never sent on: dropping it wakes every task waiting on the receivers.
    _shutdown: watch::Sender<()>,
}

struct Shared {
    key: String,
    ids: AtomicU64,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A response body of whole frames (one per SSE event); marks its request as disconnected
/// when dropped before every frame was taken.
struct Frames {
    frames: VecDeque<Bytes>,
    exact: bool,
    owner: Option<(Arc<Shared>, usize)>,
}

/// What the model name asks the fake to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Answer,
    Status(u16),
    ContextLength,
    OverloadedMidstream,
    UnknownFake,
}

/// What the fake read from a request body.
#[derive(Debug, Default)]
struct Conversation {
    chars: usize,
    last_user_text: String,
    tool_result: Option<String>,
    first_tool: Option<String>,
    cache_control: bool,
    /// A cache breakpoint asks to keep the prefix an hour (`"ttl": "1h"`).
    cache_for_an_hour: bool,
    /// `thinking` is on: the answer starts with a signed thinking block.
    thinking: bool,
}

/// The answer's single content block.
#[derive(Debug)]
enum Answer {
    Text(String),
    Tool {
        id: String,
        name: String,
        input: Value,
    },
}

#[derive(Debug, Clone, Copy)]
struct Tokens {
    input: u64,
    cache_creation: u64,
    /// The cache writes are kept an hour, not five minutes.
    for_an_hour: bool,
    output: u64,
}

/// An Anthropic error answer.
struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
}

// === impl FakeAnthropic ===

impl FakeAnthropic {
    /// Starts on the current tokio runtime, accepting [`FAKE_ANTHROPIC_KEY`].
    pub async fn start() -> io::Result<FakeAnthropic> {
        FakeAnthropic::start_with_key(FAKE_ANTHROPIC_KEY).await
    }

    /// Starts on the current tokio runtime, accepting only `key`.
    pub async fn start_with_key(key: impl Into<String>) -> io::Result<FakeAnthropic> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            key: key.into(),
            ids: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let (tx, rx) = watch::channel(());
        let serving = Arc::clone(&shared);
        tokio::spawn(accept_loop(
            listener,
            None,
            rx,
            || {},
            move |req| handle(Arc::clone(&serving), req),
        ));
        Ok(FakeAnthropic {
            addr,
            shared,
            _shutdown: tx,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the `base_url` of an `anthropic` backend (routes are under `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The key the fake accepts.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().clone()
    }
}

impl std::fmt::Debug for FakeAnthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAnthropic")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panicking test thread must not take the fake down with it.
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, parts: &Parts, body: &Bytes) -> usize {
        let mut requests = self.lock();
        requests.push(RecordedRequest::from_parts(parts, body));
        requests.len() - 1
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}_01Fake{n:020}")
    }
}

// === Routing ===

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Frames>, Infallible> {
    let (parts, incoming) = req.into_parts();
    let body = match incoming.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let index = shared.record(&parts, &body);
    let owner = Some((Arc::clone(&shared), index));
    let request_id = shared.next_id("req");
    let answer = route(&shared, &parts, &body);
    let mut response = match answer {
        Ok(Reply::Json(value)) => json_response(200, &value, owner),
        Ok(Reply::Events(events)) => {
            let mut response = Response::new(Frames::new(events, false, owner));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => error_response(&error, &request_id, owner),
    };
    if let Ok(value) = HeaderValue::try_from(request_id) {
        response.headers_mut().insert("request-id", value);
    }
    Ok(response)
}

enum Reply {
    Json(Value),
    Events(Vec<Bytes>),
}

fn route(shared: &Shared, parts: &Parts, body: &[u8]) -> Result<Reply, ApiError> {
    let path = parts.uri.path();
    let known = matches!(
        path,
        "/v1/messages" | "/v1/messages/count_tokens" | "/v1/models"
    );
    let allowed = match path {
        "/v1/models" => parts.method == Method::GET,
        _ => parts.method == Method::POST,
    };
    if !known {
        return Err(ApiError::new(404, "not_found_error", "Not Found"));
    }
    if !allowed {
        return Err(ApiError::new(
            405,
            "invalid_request_error",
            "Method Not Allowed",
        ));
    }
    check_headers(shared, &parts.headers)?;
    match path {
        "/v1/models" => Ok(Reply::Json(models())),
        "/v1/messages/count_tokens" => {
            let request = read_request(body, false)?;
            let tokens = Conversation::read(&request).prompt_tokens();
            Ok(Reply::Json(json!({ "input_tokens": tokens })))
        }
        _ => messages(shared, body),
    }
}

/// Anthropic checks the key first, then the version.
fn check_headers(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get("x-api-key").map(HeaderValue::as_bytes) {
        None => {
            return Err(ApiError::new(
                401,
                "authentication_error",
                "x-api-key header is required",
            ));
        }
        Some(key) if key != shared.key.as_bytes() => {
            return Err(ApiError::new(
                401,
                "authentication_error",
                "invalid x-api-key",
            ));
        }
        Some(_) => {}
    }
    if !headers.contains_key("anthropic-version") {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    Ok(())
}

/// The body as a JSON object with the fields Anthropic requires.
fn read_request(body: &[u8], needs_max_tokens: bool) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            format!("There was an error parsing the body of your request: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "Input should be an object",
        ));
    }
    let mut required = vec![
        ("model", value["model"].is_string()),
        ("messages", value["messages"].is_array()),
    ];
    if needs_max_tokens {
        required.push(("max_tokens", value["max_tokens"].is_u64()));
    }
    for (name, present) in required {
        if !present {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                format!("{name}: Field required"),
            ));
        }
    }
    Ok(value)
}

fn models() -> Value {
    json!({
        "data": [{
            "type": "model", "id": FAKE_ANTHROPIC_MODEL, "display_name": "Claude Sonnet 4.5",
            "created_at": "2025-09-29T00:00:00Z",
        }],
        "has_more": false, "first_id": FAKE_ANTHROPIC_MODEL, "last_id": FAKE_ANTHROPIC_MODEL,
    })
}

// === Messages ===

fn messages(shared: &Shared, body: &[u8]) -> Result<Reply, ApiError> {
    let request = read_request(body, true)?;
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let stream = request["stream"] == true;
    let scenario = Scenario::parse(&model);
    match scenario {
        Scenario::Answer | Scenario::OverloadedMidstream => {}
        Scenario::Status(code) => return Err(ApiError::for_status(code)),
        Scenario::ContextLength => {
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                "prompt is too long: 215000 tokens > 200000 maximum",
            ));
        }
        Scenario::UnknownFake => {
            return Err(ApiError::new(
                404,
                "not_found_error",
                format!("model: {model}"),
            ));
        }
    }
    if scenario == Scenario::OverloadedMidstream && !stream {
        return Err(ApiError::for_status(529));
    }
    let conversation = Conversation::read(&request);
    check_thinking(&request["messages"], conversation.thinking)?;
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let (answer, stop_reason) = conversation.answer(max_tokens, shared);
    let thought = conversation
        .thinking
        .then(|| format!("Thinking about: {}", conversation.last_user_text));
    let prompt = conversation.prompt_tokens();
    // Half the prompt is "written to the cache" when the client marks a cache breakpoint.
    let cache_creation = if conversation.cache_control {
        prompt / 2
    } else {
        0
    };
    let tokens = Tokens {
        input: prompt - cache_creation,
        cache_creation,
        for_an_hour: conversation.cache_for_an_hour,
        output: answer.words() + thought.as_deref().map_or(0, words),
    };
    let id = shared.next_id("msg");
    let thinking_block = |text: &str, signature: &str| json!({"type": "thinking", "thinking": text, "signature": signature});
    if !stream {
        let mut content: Vec<Value> = thought
            .iter()
            .map(|text| thinking_block(text, &thinking_signature(text)))
            .collect();
        content.push(answer.block());
        return Ok(Reply::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason, "stop_sequence": null,
            "usage": tokens.usage(tokens.output),
        })));
    }
    let mut events = vec![event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": tokens.usage(1),
        }}),
    )];
    let delta = |index: usize, delta: Value| {
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    };
    let stop = |index: usize| {
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        )
    };
    let start = |index: usize, block: Value| {
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        )
    };
    if let Some(text) = &thought {
        events.push(start(0, thinking_block("", "")));
        events.push(delta(
            0,
            json!({"type": "thinking_delta", "thinking": text}),
        ));
        events.push(delta(
            0,
            json!({"type": "signature_delta", "signature": thinking_signature(text)}),
        ));
        events.push(stop(0));
    }
    let index = usize::from(thought.is_some());
    events.push(start(index, answer.empty_block()));
    // Anthropic pings right after the first block's start.
    events.insert(2, event("ping", &json!({"type": "ping"})));
    let deltas: Vec<Bytes> = answer
        .deltas()
        .into_iter()
        .map(|piece| delta(index, piece))
        .collect();
    if scenario == Scenario::OverloadedMidstream {
        events.extend(deltas.into_iter().take(1));
        events.push(event(
            "error",
            &json!({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded",
            }}),
        ));
        return Ok(Reply::Events(events));
    }
    events.extend(deltas);
    events.push(stop(index));
    events.push(event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": tokens.output},
        }),
    ));
    events.push(event("message_stop", &json!({"type": "message_stop"})));
    Ok(Reply::Events(events))
}

/// Anthropic's checks of the thinking a request sends back: a thinking block must carry its
/// own signature, and with thinking on, a turn answering tool calls must keep the thinking the
/// assistant message started with.
fn check_thinking(messages: &Value, thinking_on: bool) -> Result<(), ApiError> {
    let messages = messages.as_array().map(Vec::as_slice).unwrap_or_default();
    let refuse = |message: String| ApiError::new(400, "invalid_request_error", message);
    for (i, message) in messages.iter().enumerate() {
        let blocks = message["content"].as_array().into_iter().flatten();
        for (j, block) in blocks.enumerate() {
            if block["type"] == "thinking"
                && block["signature"].as_str()
                    != Some(&thinking_signature(
                        block["thinking"].as_str().unwrap_or_default(),
                    ))
            {
                return Err(refuse(format!(
                    "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                )));
            }
        }
    }
    let answers_tools = messages
        .last()
        .is_some_and(|last| tool_results(&last["content"]).next().is_some());
    if let (true, true, [.., assistant, _]) = (thinking_on, answers_tools, messages) {
        let first = assistant["content"][0]["type"].as_str().unwrap_or("text");
        if first != "thinking" && first != "redacted_thinking" {
            let i = messages.len() - 2;
            return Err(refuse(format!(
                "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but \
                 found `{first}`. When `thinking` is enabled, a final `assistant` message must \
                 start with a thinking block"
            )));
        }
    }
    Ok(())
}

/// `event: NAME\ndata: JSON\n\n`.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

// === impl Scenario ===

impl Scenario {
    fn parse(model: &str) -> Scenario {
        let Some(name) = model.strip_prefix("fake/") else {
            return Scenario::Answer;
        };
        if let Some(code) = name.strip_prefix("status-") {
            return match code.parse::<u16>() {
                Ok(code) if (400..=599).contains(&code) => Scenario::Status(code),
                _ => Scenario::UnknownFake,
            };
        }
        match name {
            "context-length" => Scenario::ContextLength,
            "overloaded-midstream" => Scenario::OverloadedMidstream,
            _ => Scenario::UnknownFake,
        }
    }
}

// === impl Conversation ===

impl Conversation {
    fn read(request: &Value) -> Conversation {
        let mut conversation = Conversation {
            cache_control: has_cache_control(request),
            cache_for_an_hour: request.to_string().contains(r#""ttl":"1h""#),
            first_tool: request["tools"][0]["name"].as_str().map(str::to_owned),
            thinking: matches!(
                request["thinking"]["type"].as_str(),
                Some("enabled" | "adaptive")
            ),
            ..Conversation::default()
        };
        conversation.chars += text_of(&request["system"]).chars().count();
        let messages = request["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for message in messages {
            let content = &message["content"];
            conversation.chars += text_of(content).chars().count();
            for result in tool_results(content) {
                conversation.chars += text_of(&result["content"]).chars().count();
            }
        }
        if let Some(last) = messages.iter().rev().find(|m| m["role"] == "user") {
            conversation.last_user_text = text_of(&last["content"]);
            let results: Vec<String> = tool_results(&last["content"])
                .map(|r| text_of(&r["content"]))
                .collect();
            if !results.is_empty() {
                conversation.tool_result = Some(results.join(" "));
            }
        }
        conversation
    }

    fn prompt_tokens(&self) -> u64 {
        (self.chars as u64).div_ceil(4)
    }

    /// The answer and its `stop_reason`.
    fn answer(&self, max_tokens: u64, shared: &Shared) -> (Answer, &'static str) {
        let text = match (&self.tool_result, &self.first_tool) {
            (Some(result), _) => format!("tool result: {result}"),
            (None, Some(name)) => {
                let tool = Answer::Tool {
                    id: shared.next_id("toolu"),
                    name: name.clone(),
                    input: json!({ "q": self.last_user_text }),
                };
                return (tool, "tool_use");
            }
            (None, None) => format!("echo: {}", self.last_user_text),
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        match usize::try_from(max_tokens) {
            Ok(max) if max < words.len() => (Answer::Text(words[..max].join(" ")), "max_tokens"),
            _ => (Answer::Text(text), "end_turn"),
        }
    }
}

/// The text of a content value: a string, or the `text` of its text blocks joined by spaces.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn tool_results(content: &Value) -> impl Iterator<Item = &Value> {
    content
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "tool_result")
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn has_cache_control(value: &Value) -> bool {
    match value {
        Value::Object(map) => {
            map.contains_key("cache_control") || map.values().any(has_cache_control)
        }
        Value::Array(items) => items.iter().any(has_cache_control),
        _ => false,
    }
}

// === impl Answer ===

impl Answer {
    fn block(&self) -> Value {
        match self {
            Answer::Text(text) => json!({"type": "text", "text": text}),
            Answer::Tool { id, name, input } => json!({
                "type": "tool_use", "id": id, "name": name, "input": input,
            }),
        }
    }

    /// The block as `content_block_start` opens it: empty text, or a tool with empty input.
    fn empty_block(&self) -> Value {
        match self {
            Answer::Text(_) => json!({"type": "text", "text": ""}),
            Answer::Tool { id, name, .. } => json!({
                "type": "tool_use", "id": id, "name": name, "input": {},
            }),
        }
    }

    /// One `text_delta` per word, or `input_json_delta` pieces (the first one empty, as
    /// Anthropic sends it) of at most eight characters.
    fn deltas(&self) -> Vec<Value> {
        match self {
            Answer::Text(text) => text
                .split_inclusive(' ')
                .map(|word| json!({"type": "text_delta", "text": word}))
                .collect(),
            Answer::Tool { input, .. } => {
                let json_text = input.to_string();
                let chars: Vec<char> = json_text.chars().collect();
                std::iter::once(String::new())
                    .chain(chars.chunks(8).map(|c| c.iter().collect()))
                    .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
                    .collect()
            }
        }
    }

    fn words(&self) -> u64 {
        match self {
            Answer::Text(text) => words(text),
            Answer::Tool { input, .. } => words(&input.to_string()),
        }
    }
}

// === impl Tokens ===

impl Tokens {
    fn usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_creation": {
                "ephemeral_5m_input_tokens": if self.for_an_hour { 0 } else { self.cache_creation },
                "ephemeral_1h_input_tokens": if self.for_an_hour { self.cache_creation } else { 0 },
            },
            "cache_read_input_tokens": 0,
            "output_tokens": output,
            "service_tier": "standard",
        })
    }
}

// === impl ApiError ===

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// The error Anthropic answers with for a status, in its own words.
    fn for_status(status: u16) -> ApiError {
        let (kind, message) = match status {
            400 => ("invalid_request_error", "Invalid request"),
            401 => ("authentication_error", "invalid x-api-key"),
            402 => (
                "billing_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            403 => (
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
            404 => (
                "not_found_error",
                "The requested resource could not be found.",
            ),
            413 => (
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
            ),
            429 => (
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
            ),
            504 => ("timeout_error", "Request timed out"),
            529 => ("overloaded_error", "Overloaded"),
            500..=599 => ("api_error", "Internal server error"),
            _ => ("invalid_request_error", "Invalid request"),
        };
        ApiError::new(status, kind, message)
    }
}

fn json_response(
    status: u16,
    value: &Value,
    owner: Option<(Arc<Shared>, usize)>,
) -> Response<Frames> {
    let body = Bytes::from(value.to_string());
    let mut response = Response::new(Frames::new(vec![body], true, owner));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(
    error: &ApiError,
    request_id: &str,
    owner: Option<(Arc<Shared>, usize)>,
) -> Response<Frames> {
    let body = json!({
        "type": "error",
        "error": {"type": error.kind, "message": error.message},
        "request_id": request_id,
    });
    let mut response = json_response(error.status, &body, owner);
    if error.status == 429 {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

// === impl Frames ===

impl Frames {
    fn new(frames: Vec<Bytes>, exact: bool, owner: Option<(Arc<Shared>, usize)>) -> Frames {
        Frames {
            frames: frames.into(),
            exact,
            owner,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .frames
                .pop_front()
                .map(|b| Ok(Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // A whole JSON body goes with Content-Length; events go chunked, one chunk each.
        if self.exact {
            SizeHint::with_exact(self.frames.iter().map(|b| b.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        if let (false, Some((shared, index))) = (self.frames.is_empty(), &self.owner)
            && let Some(request) = shared.lock().get_mut(*index)
        {
            request.disconnected = true;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    struct Answered {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answered {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        /// `(event name, data)` of each SSE event.
        fn events(&self) -> Vec<(String, Value)> {
            std::str::from_utf8(&self.body)
                .unwrap()
                .split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| {
                    let (name, data) = e.split_once('\n').unwrap();
                    let name = name.strip_prefix("event: ").unwrap().to_owned();
                    (
                        name,
                        serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                    )
                })
                .collect()
        }
    }

    async fn send(
        fake: &FakeAnthropic,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answered {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", fake.base_url()));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let response = client
            .request(request.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        Answered {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    const AUTH: [(&str, &str); 2] = [
        ("x-api-key", FAKE_ANTHROPIC_KEY),
        ("anthropic-version", "2023-06-01"),
    ];

    async fn post(fake: &FakeAnthropic, body: Value) -> Answered {
        send(fake, Method::POST, "/v1/messages", &AUTH, Some(body)).await
    }

    #[tokio::test]
    async fn answers_with_an_echo_and_records_the_request() {
        let fake = FakeAnthropic::start().await.unwrap();
        let answer = post(&fake, json!({
            "model": "claude-sonnet-4-5", "max_tokens": 100, "system": "Be terse.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        }))
        .await;
        assert_eq!(answer.status, 200);
        assert!(
            answer.headers["request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_")
        );
        let body = answer.json();
        assert_eq!(body["type"], "message");
        assert_eq!(body["model"], "claude-sonnet-4-5");
        assert_eq!(
            body["content"],
            json!([{"type": "text", "text": "echo: hello there"}])
        );
        assert_eq!(body["stop_reason"], "end_turn");
        // "Be terse." + "hello there" = 20 chars = 5 tokens; "echo: hello there" = 3 words.
        assert_eq!(body["usage"]["input_tokens"], 5);
        assert_eq!(body["usage"]["cache_creation_input_tokens"], 0);
        assert_eq!(body["usage"]["cache_read_input_tokens"], 0);
        assert_eq!(body["usage"]["output_tokens"], 3);

        let recorded = fake.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(
            (recorded[0].method.as_str(), recorded[0].path.as_str()),
            ("POST", "/v1/messages")
        );
        assert_eq!(recorded[0].header("x-api-key"), Some(FAKE_ANTHROPIC_KEY));
        assert_eq!(recorded[0].json()["system"], "Be terse.");
        assert!(!recorded[0].disconnected);
    }

    #[tokio::test]
    async fn tools_get_a_call_and_then_the_result_is_echoed() {
        let fake = FakeAnthropic::start().await.unwrap();
        let tools = json!([{"name": "search", "input_schema": {"type": "object"}}]);
        let body = post(
            &fake,
            json!({
                "model": "m", "max_tokens": 100, "tools": tools,
                "messages": [{"role": "user", "content": "rust books"}],
            }),
        )
        .await
        .json();
        assert_eq!(body["stop_reason"], "tool_use");
        let call = &body["content"][0];
        assert_eq!(
            (call["type"].as_str(), call["name"].as_str()),
            (Some("tool_use"), Some("search"))
        );
        assert_eq!(call["input"], json!({"q": "rust books"}));
        let body = post(&fake, json!({
            "model": "m", "max_tokens": 100, "tools": tools,
            "messages": [
                {"role": "user", "content": "rust books"},
                {"role": "assistant", "content": [call]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "The Book"}]},
            ],
        }))
        .await
        .json();
        assert_eq!(body["stop_reason"], "end_turn");
        assert_eq!(body["content"][0]["text"], "tool result: The Book");
    }

    #[tokio::test]
    async fn thinking_is_signed_and_checked_when_it_comes_back() {
        let fake = FakeAnthropic::start().await.unwrap();
        let tools = json!([{"name": "search", "input_schema": {"type": "object"}}]);
        let ask = |extra: Value| {
            let mut body = json!({
                "model": "m", "max_tokens": 2000, "tools": tools,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
                "messages": [{"role": "user", "content": "rust books"}],
            });
            if let Value::Array(more) = extra {
                body["messages"].as_array_mut().unwrap().extend(more);
            }
            body
        };
        let first = post(&fake, ask(Value::Null)).await.json();
        let (thinking, call) = (&first["content"][0], &first["content"][1]);
        assert_eq!(thinking["thinking"], "Thinking about: rust books");
        assert_eq!(
            thinking["signature"].as_str(),
            Some(thinking_signature("Thinking about: rust books").as_str())
        );
        let result = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call["id"], "content": "The Book"}]});
        let back = post(
            &fake,
            ask(json!([
            {"role": "assistant", "content": [thinking, call]}, result])),
        )
        .await;
        assert_eq!(back.status, 200);
        assert_eq!(back.json()["content"][1]["text"], "tool result: The Book");

        let mut forged = thinking.clone();
        forged["signature"] = "fakesig0".into();
        for (content, refusal) in [
            (json!([forged, call]), "Invalid `signature`"),
            (json!([call]), "must start with a thinking block"),
        ] {
            let refused = post(
                &fake,
                ask(json!([
                {"role": "assistant", "content": content}, result])),
            )
            .await;
            assert_eq!(refused.status, 400);
            let message = refused.json()["error"]["message"].to_string();
            assert!(message.contains(refusal), "{message}");
        }

        // Streamed: the thinking block first, its signature last, the answer's block after it.
        let mut streamed = ask(Value::Null);
        streamed["stream"] = true.into();
        let events = post(&fake, streamed).await.events();
        let deltas: Vec<&Value> = events
            .iter()
            .filter(|(name, _)| name == "content_block_delta")
            .map(|(_, data)| &data["delta"])
            .collect();
        assert_eq!(deltas[0]["thinking"], "Thinking about: rust books");
        assert_eq!(deltas[1]["type"], "signature_delta");
        assert_eq!(events[1].0, "content_block_start");
        assert_eq!(events[2].0, "ping");
    }

    #[tokio::test]
    async fn streams_follow_the_event_grammar() {
        let fake = FakeAnthropic::start().await.unwrap();
        let answer = post(
            &fake,
            json!({
                "model": "m", "max_tokens": 100, "stream": true,
                "messages": [{"role": "user", "content": "one two"}],
            }),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert!(
            answer.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = answer.events();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert!(
            events
                .iter()
                .all(|(name, data)| data["type"] == name.as_str())
        );
        let text: String = events[3..6]
            .iter()
            .map(|(_, d)| d["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "echo: one two");
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 2);
        assert_eq!(events[7].1["delta"]["stop_reason"], "end_turn");
        assert_eq!(events[7].1["usage"]["output_tokens"], 3);

        // A tool call streams its input as JSON pieces that add up to the input.
        let answer = post(
            &fake,
            json!({
                "model": "m", "max_tokens": 100, "stream": true,
                "tools": [{"name": "search", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "a longer query"}],
            }),
        )
        .await;
        let events = answer.events();
        assert_eq!(events[1].1["content_block"]["type"], "tool_use");
        let pieces: Vec<&str> = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap())
            .collect();
        assert!(pieces.len() > 2 && pieces[0].is_empty());
        let input: Value = serde_json::from_str(&pieces.concat()).unwrap();
        assert_eq!(input, json!({"q": "a longer query"}));
    }

    #[tokio::test]
    async fn keys_versions_and_required_fields_are_checked() {
        let fake = FakeAnthropic::start_with_key("sk-ant-own").await.unwrap();
        assert_eq!(fake.key(), "sk-ant-own");
        let body = json!({"model": "m", "max_tokens": 5, "messages": []});
        let missing = send(
            &fake,
            Method::POST,
            "/v1/messages",
            &[("anthropic-version", "2023-06-01")],
            Some(body.clone()),
        )
        .await;
        assert_eq!(missing.status, 401);
        assert_eq!(missing.json()["error"]["type"], "authentication_error");
        assert_eq!(missing.json()["type"], "error");
        let wrong = send(
            &fake,
            Method::POST,
            "/v1/messages",
            &AUTH,
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (wrong.status, wrong.json()["error"]["message"].as_str()),
            (401, Some("invalid x-api-key"))
        );
        let no_version = send(
            &fake,
            Method::POST,
            "/v1/messages",
            &[("x-api-key", "sk-ant-own")],
            Some(body),
        )
        .await;
        assert_eq!(no_version.status, 400);
        assert_eq!(
            no_version.json()["error"]["message"],
            "anthropic-version: header is required"
        );
        let headers = [
            ("x-api-key", "sk-ant-own"),
            ("anthropic-version", "2023-06-01"),
        ];
        let no_max = send(
            &fake,
            Method::POST,
            "/v1/messages",
            &headers,
            Some(json!({"model": "m", "messages": []})),
        )
        .await;
        assert_eq!(
            (no_max.status, no_max.json()["error"]["message"].as_str()),
            (400, Some("max_tokens: Field required"))
        );
    }

    #[tokio::test]
    async fn model_names_choose_failures() {
        let fake = FakeAnthropic::start().await.unwrap();
        let ask = |model: &str, stream: bool| {
            json!({
                "model": model, "max_tokens": 10, "stream": stream,
                "messages": [{"role": "user", "content": "hi there"}],
            })
        };
        let limited = post(&fake, ask("fake/status-429", false)).await;
        assert_eq!(limited.status, 429);
        assert_eq!(limited.headers["retry-after"], "1");
        assert_eq!(limited.json()["error"]["type"], "rate_limit_error");
        let overloaded = post(&fake, ask("fake/status-529", true)).await;
        assert_eq!(
            (
                overloaded.status,
                overloaded.json()["error"]["type"].as_str()
            ),
            (529, Some("overloaded_error"))
        );
        let long = post(&fake, ask("fake/context-length", false)).await;
        assert!(
            long.json()["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("prompt is too long")
        );
        assert_eq!(post(&fake, ask("fake/nonsense", false)).await.status, 404);

        let midstream = post(&fake, ask("fake/overloaded-midstream", true)).await;
        assert_eq!(midstream.status, 200);
        let events = midstream.events();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "error"
            ]
        );
        assert_eq!(events[4].1["error"]["type"], "overloaded_error");
        assert_eq!(
            post(&fake, ask("fake/overloaded-midstream", false))
                .await
                .status,
            529
        );
    }

    #[tokio::test]
    async fn cache_breakpoints_report_cache_writes() {
        let fake = FakeAnthropic::start().await.unwrap();
        let body = post(&fake, json!({
            "model": "m", "max_tokens": 10,
            "system": [{"type": "text", "text": "a long shared preamble", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .await
        .json();
        // 22 + 2 chars = 6 tokens, half of them written to the cache.
        assert_eq!(body["usage"]["cache_creation_input_tokens"], 3);
        assert_eq!(body["usage"]["input_tokens"], 3);
        assert_eq!(body["usage"]["cache_read_input_tokens"], 0);
        assert_eq!(
            body["usage"]["cache_creation"]["ephemeral_5m_input_tokens"],
            3
        );
        let body = post(
            &fake,
            json!({
                "model": "m", "max_tokens": 10,
                "system": [{"type": "text", "text": "a long shared preamble",
                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                "messages": [{"role": "user", "content": "hi"}],
            }),
        )
        .await
        .json();
        assert_eq!(
            body["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
            3
        );
        assert_eq!(
            body["usage"]["cache_creation"]["ephemeral_5m_input_tokens"],
            0
        );
    }

    #[tokio::test]
    async fn token_counts_and_models_are_served() {
        let fake = FakeAnthropic::start().await.unwrap();
        let count = send(
            &fake,
            Method::POST,
            "/v1/messages/count_tokens",
            &AUTH,
            Some(json!({
                "model": "m", "messages": [{"role": "user", "content": "12345678"}],
            })),
        )
        .await;
        assert_eq!(
            (count.status, count.json()),
            (200, json!({"input_tokens": 2}))
        );
        let models = send(&fake, Method::GET, "/v1/models?limit=1000", &AUTH, None).await;
        assert_eq!(models.status, 200);
        assert_eq!(models.json()["data"][0]["id"], FAKE_ANTHROPIC_MODEL);
        assert_eq!(models.json()["has_more"], false);
        assert_eq!(
            send(&fake, Method::GET, "/v1/messages", &AUTH, None)
                .await
                .status,
            405
        );
        assert_eq!(
            send(&fake, Method::GET, "/v2/nothing", &AUTH, None)
                .await
                .status,
            404
        );
        let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                "/v1/messages/count_tokens",
                "/v1/models?limit=1000",
                "/v1/messages",
                "/v2/nothing"
            ]
        );
    }
}
