//! Anthropic: the native Messages API (`/v1/messages`), translated from and to orproxy's OpenAI
//! chat format, or passed through untranslated for clients that speak Messages themselves.
//!
//! - `prepare` rebuilds an OpenAI chat request as a Messages request ([`to_messages_body`]).
//! - `map_response` and `stream_mapper` rebuild the answer as a chat completion and its chunks.
//! - The `*_messages` hooks and `count_tokens` relay Messages bodies and events unchanged, and
//!   only read usage, the served model and errors from them.
//!
//! Anthropic reports tokens but no cost: `cost_nanos` stays `None` and the daemon prices the call.
//! OpenAI fields without a Messages equivalent (penalties, `seed`, `logit_bias`, OpenAI's
//! `metadata`, ...) are dropped, because Anthropic refuses unknown fields; the ones whose loss
//! would change the answer's meaning (`n > 1`, `logprobs`, a JSON `response_format`) are refused.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::ACCEPT;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use orproxy_plugin::anthropic::ANTHROPIC_REASONING_FORMAT;
use orproxy_plugin::openai::{self, endpoint, header_value};
use orproxy_plugin::sse::data_event;
use orproxy_plugin::{
    Backend, Call, EventKind, Failure, FailureKind, JsonObject, MapError, MappedEvent,
    MappedResponse, ModelInfo, Output, PrepareError, Prepared, SseEvent, StreamMapper,
    UpstreamRequest, Usage,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The plugin name.
pub const KIND: &str = "anthropic";
/// Where Anthropic's API lives (endpoints are `{base}/v1/...`).
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` sent unless the client's request names one.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when the client sets none: OpenAI makes it optional, Anthropic requires it.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
/// The smallest thinking budget Anthropic accepts.
pub const MIN_THINKING_BUDGET: u64 = 1024;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// The Anthropic backend.
#[derive(Debug)]
pub struct Anthropic {
    messages_url: Uri,
    count_tokens_url: Uri,
    models_url: Uri,
}

/// Translates an Anthropic event stream into OpenAI `chat.completion.chunk` events.
#[derive(Debug)]
pub struct ChunkTranslator {
    include_usage: bool,
    created: u64,
    id: String,
    model: String,
    usage: WireUsage,
    /// Content-block index of each tool call, in tool-call order (OpenAI numbers tool calls,
    /// Anthropic numbers blocks).
    tool_blocks: Vec<usize>,
    complete: bool,
}

/// Classifies the events of a passed-through Messages stream and relays them unchanged.
#[derive(Debug, Default)]
pub struct MessagesEvents {
    model: Option<String>,
    usage: WireUsage,
    content_seen: bool,
    complete: bool,
}

// === impl Anthropic ===

impl Anthropic {
    /// A backend at `base_url` (default [`DEFAULT_BASE_URL`]); fails on a malformed URL.
    pub fn new(base_url: Option<String>) -> Result<Self, http::uri::InvalidUri> {
        let base = base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Ok(Anthropic {
            messages_url: endpoint(base, "v1/messages")?,
            count_tokens_url: endpoint(base, "v1/messages/count_tokens")?,
            // The list is paged (20 by default): one page of the maximum size holds every model.
            models_url: endpoint(base, "v1/models?limit=1000")?,
        })
    }

    /// A JSON POST with Anthropic's authentication, version and beta headers.
    fn post(
        &self,
        url: &Uri,
        call: &Call<'_>,
        body: Bytes,
    ) -> Result<UpstreamRequest, PrepareError> {
        let key = call.api_key.ok_or(PrepareError::MissingKey)?;
        let mut headers = openai::json_headers(call, 8)?;
        insert_auth(&mut headers, key)?;
        // Only Anthropic's own headers: the others forwarded by the daemon (OpenRouter's) mean
        // nothing here. Beta flags may come as several headers, so they are appended.
        for (name, value) in call.headers {
            if *name == ANTHROPIC_VERSION {
                headers.insert(ANTHROPIC_VERSION, value.clone());
            } else if *name == ANTHROPIC_BETA || name.as_str() == "x-anthropic-beta" {
                headers.append(ANTHROPIC_BETA, value.clone());
            }
        }
        Ok(UpstreamRequest {
            method: Method::POST,
            url: url.clone(),
            headers,
            body,
        })
    }
}

/// Adds `x-api-key` (marked sensitive, so it never shows in debug output) and `anthropic-version`.
fn insert_auth(headers: &mut HeaderMap, key: &str) -> Result<(), PrepareError> {
    let mut key = header_value(key, "x-api-key")?;
    key.set_sensitive(true);
    headers.insert(X_API_KEY, key);
    headers.insert(ANTHROPIC_VERSION, HeaderValue::from_static(API_VERSION));
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Backend for Anthropic {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn prepare(&self, call: &Call<'_>) -> Result<Prepared, PrepareError> {
        if call.api_key.is_none() {
            return Err(PrepareError::MissingKey);
        }
        let body = to_messages_body(call)?;
        Ok(Prepared::Http(self.post(
            &self.messages_url,
            call,
            body.to_bytes(),
        )?))
    }

    fn map_response(&self, body: &Bytes) -> MappedResponse {
        to_completion(body, unix_now())
    }

    fn stream_mapper(&self, client_asked_usage: bool) -> Box<dyn StreamMapper> {
        Box::new(ChunkTranslator::new(client_asked_usage, unix_now()))
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Failure {
        // The generic reader already finds `error.message` and `Retry-After`; only the kind
        // needs Anthropic's error types (529 overloaded, "prompt is too long").
        let mut failure = Failure::from_openai_error(status, headers, body);
        let error_type = serde_json::from_slice::<ErrorEnvelope>(body)
            .map(|e| e.error.kind)
            .unwrap_or_default();
        failure.kind = failure_kind(status.as_u16(), &error_type, &failure.message);
        failure
    }

    fn speaks_messages(&self) -> bool {
        true
    }

    fn prepare_messages(&self, call: &Call<'_>) -> Result<Prepared, PrepareError> {
        Ok(Prepared::Http(self.post(
            &self.messages_url,
            call,
            call.body.to_bytes(),
        )?))
    }

    fn map_messages_response(&self, body: &Bytes) -> MappedResponse {
        let Ok(message) = serde_json::from_slice::<WireMessage>(body) else {
            return MappedResponse::default();
        };
        MappedResponse {
            body: None,
            failure: message.failure(),
            answer_bytes: message.answer_bytes(),
            usage: message.usage.map(WireUsage::to_usage),
            model: message.model,
            ..MappedResponse::default()
        }
    }

    fn messages_stream_mapper(&self) -> Box<dyn StreamMapper> {
        Box::new(MessagesEvents::default())
    }

    fn count_tokens(&self, call: &Call<'_>) -> Option<Prepared> {
        let call = Call {
            stream: false,
            ..*call
        };
        self.post(&self.count_tokens_url, &call, call.body.to_bytes())
            .ok()
            .map(Prepared::Http)
    }

    fn list_models(&self, api_key: Option<&str>) -> Option<Prepared> {
        // Anthropic lists models only to a key holder.
        let mut headers = HeaderMap::with_capacity(4);
        insert_auth(&mut headers, api_key?).ok()?;
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        Some(Prepared::Http(UpstreamRequest {
            method: Method::GET,
            url: self.models_url.clone(),
            headers,
            body: Bytes::new(),
        }))
    }

    fn map_models(&self, body: &[u8]) -> Result<Vec<ModelInfo>, MapError> {
        // `{"data":[{"id":...}]}` like OpenAI's list, with no prices (the daemon's table has them).
        openai::map_models(body)
    }
}

// === Request: OpenAI chat -> Anthropic Messages ===

/// Rebuilds an OpenAI chat-completion body as an Anthropic Messages body for `call.model`.
pub fn to_messages_body(call: &Call<'_>) -> Result<JsonObject, PrepareError> {
    let body = call.body;
    refuse_unrepresentable(body)?;
    let messages: Vec<ChatMessage> =
        field(body, "messages")?.ok_or_else(|| unsupported("`messages` is required"))?;
    let thinking = thinking(body)?;
    let (system, messages) = convert_messages(&messages, !matches!(thinking, Thinking::Off))?;
    let tools = convert_tools(body)?;
    let tool_choice = convert_tool_choice(body, tools.is_some())?;
    let max_tokens = max_tokens(body, thinking.budget())?;

    let mut out = JsonObject::default();
    out.set("model", call.model);
    out.set("max_tokens", &max_tokens);
    if let Some(system) = system {
        out.set("system", &system);
    }
    out.set("messages", &messages);
    if let Some(tools) = tools {
        out.set("tools", &tools);
    }
    if let Some(choice) = tool_choice {
        out.set("tool_choice", &choice);
    }
    if let Some(stop) = field::<Stop>(body, "stop")? {
        let sequences = match stop {
            Stop::One(s) => vec![s],
            Stop::Many(list) => list,
        };
        if !sequences.is_empty() {
            out.set("stop_sequences", &sequences);
        }
    } else if let Some(raw) = body.get("stop_sequences") {
        out.set_raw("stop_sequences", raw.to_owned());
    }
    for name in ["temperature", "top_p", "top_k"] {
        if let Some(raw) = body.get(name).filter(|r| r.get() != "null") {
            out.set_raw(name, raw.to_owned());
        }
    }
    if let Some(user) = field::<String>(body, "user")? {
        out.set("metadata", &json!({ "user_id": user }));
    }
    if let Some(thinking) = thinking.into_value(max_tokens) {
        out.set("thinking", &thinking);
    }
    if call.stream {
        out.set("stream", &true);
    }
    Ok(out)
}

fn unsupported(message: impl Into<String>) -> PrepareError {
    PrepareError::Unsupported(format!("anthropic: {}", message.into()))
}

/// A top-level field read as `T`; `Ok(None)` when absent or `null`.
fn field<T: DeserializeOwned>(body: &JsonObject, name: &str) -> Result<Option<T>, PrepareError> {
    match body.get(name) {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Option<T>>(raw.get())
            .map_err(|e| unsupported(format!("`{name}` has an unexpected shape: {e}"))),
    }
}

/// Refuses what Anthropic cannot do and dropping would silently change the answer.
fn refuse_unrepresentable(body: &JsonObject) -> Result<(), PrepareError> {
    if field::<u64>(body, "n")?.is_some_and(|n| n > 1) {
        return Err(unsupported(
            "Anthropic returns one choice per request: `n` must be 1",
        ));
    }
    if field::<bool>(body, "logprobs")? == Some(true) || body.has("top_logprobs") {
        return Err(unsupported("Anthropic does not return log probabilities"));
    }
    if let Some(format) = field::<Value>(body, "response_format")? {
        match format.get("type").and_then(Value::as_str) {
            None | Some("text") => {}
            Some(other) => {
                return Err(unsupported(format!(
                    "`response_format` of type `{other}` is not supported; describe the \
                     format in the prompt or ask for a tool call"
                )));
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<ChatToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    /// A Claude model's thinking as OpenRouter carries it (and as this backend answers it).
    #[serde(default)]
    reasoning_details: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct ChatToolCall {
    id: String,
    function: ChatFunctionCall,
}

#[derive(Deserialize)]
struct ChatFunctionCall {
    name: String,
    #[serde(default)]
    arguments: Value,
}

/// Splits the chat into the top-level `system` and Anthropic messages. Consecutive messages of
/// one role are merged, so that tool results land in one user turn right after the tool calls.
/// With `thinking` on, the assistant turns of the tool loop the chat continues get their signed
/// thinking back (see [`tool_loop_start`]).
fn convert_messages(
    messages: &[ChatMessage],
    thinking: bool,
) -> Result<(Option<Value>, Vec<Value>), PrepareError> {
    let tool_loop = tool_loop_start(messages);
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (at, message) in messages.iter().enumerate() {
        let (role, blocks) = match message.role.as_str() {
            "system" | "developer" => {
                for block in content_blocks(&message.content)? {
                    if block["type"] != "text" {
                        return Err(unsupported(format!(
                            "messages[{at}]: system messages may hold text only"
                        )));
                    }
                    system.push(block);
                }
                continue;
            }
            "user" => ("user", content_blocks(&message.content)?),
            "assistant" => {
                let keep_thinking = thinking && at >= tool_loop;
                ("assistant", assistant_blocks(message, keep_thinking)?)
            }
            "tool" => ("user", vec![tool_result(at, message)?]),
            other => {
                return Err(unsupported(format!(
                    "messages[{at}]: role `{other}` is not supported"
                )));
            }
        };
        if blocks.is_empty() {
            // Anthropic refuses empty turns (an assistant message with `content: ""`).
            continue;
        }
        match turns.last_mut() {
            Some((last, merged)) if *last == role => merged.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let system = match system.as_slice() {
        [] => None,
        [only] if is_plain_text(only) => Some(only["text"].clone()),
        _ => Some(Value::Array(system)),
    };
    let turns = turns
        .into_iter()
        .map(|(role, blocks)| json!({ "role": role, "content": collapse(blocks) }))
        .collect();
    Ok((system, turns))
}

/// Where the tool loop the chat continues begins: after the last user message that answers no
/// tool call (one after `tool` messages joins their turn). Anthropic requires the signed
/// thinking of that loop's assistant turns, and refuses it when thinking is off; thinking from
/// before it, perhaps signed by another server, stays out.
fn tool_loop_start(messages: &[ChatMessage]) -> usize {
    let mut start = 0;
    let mut answered = false;
    for (at, message) in messages.iter().enumerate() {
        match message.role.as_str() {
            "assistant" => answered = false,
            "tool" => answered = true,
            "user" if !answered => start = at + 1,
            _ => {}
        }
    }
    start
}

/// A text block with nothing else (no `cache_control`): it can be written as a plain string.
fn is_plain_text(block: &Value) -> bool {
    block["type"] == "text" && block.as_object().is_some_and(|o| o.len() == 2)
}

/// One plain text block becomes a string, as most clients write it.
fn collapse(blocks: Vec<Value>) -> Value {
    match blocks.as_slice() {
        [only] if is_plain_text(only) => only["text"].clone(),
        _ => Value::Array(blocks),
    }
}

/// OpenAI message content (a string, parts, or `null`) as Anthropic content blocks.
fn content_blocks(content: &Value) -> Result<Vec<Value>, PrepareError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(vec![json!({ "type": "text", "text": text })]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for part in parts {
                if let Some(block) = content_part(part)? {
                    blocks.push(block);
                }
            }
            Ok(blocks)
        }
        _ => Err(unsupported(
            "message content must be a string or a list of parts",
        )),
    }
}

/// One OpenAI content part; `None` for an empty text part (Anthropic refuses empty text blocks).
fn content_part(part: &Value) -> Result<Option<Value>, PrepareError> {
    let kind = part["type"].as_str().unwrap_or("");
    let mut block = match kind {
        "text" | "refusal" => {
            let text = part[kind].as_str().unwrap_or("");
            if text.is_empty() {
                return Ok(None);
            }
            json!({ "type": "text", "text": text })
        }
        "image_url" => {
            // `image_url` is `{"url": ...}`, or a bare string in some clients.
            let url = part["image_url"]["url"]
                .as_str()
                .or_else(|| part["image_url"].as_str())
                .unwrap_or("");
            json!({ "type": "image", "source": media_source(url, "image")? })
        }
        "file" => {
            let data = part["file"]["file_data"].as_str().unwrap_or("");
            json!({ "type": "document", "source": media_source(data, "file")? })
        }
        other => {
            return Err(unsupported(format!(
                "content parts of type `{other}` are not supported"
            )));
        }
    };
    // Prompt caching hints (OpenRouter's convention) keep their place on the block.
    if let (Some(cache), Some(object)) = (part.get("cache_control"), block.as_object_mut()) {
        object.insert("cache_control".into(), cache.clone());
    }
    Ok(Some(block))
}

/// An image or document source: a `data:` URL becomes base64, an http(s) URL a `url` source.
fn media_source(url: &str, what: &str) -> Result<Value, PrepareError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((media_type, data)) = rest.split_once(";base64,") else {
            return Err(unsupported(format!("{what} data URLs must be base64")));
        };
        return Ok(json!({ "type": "base64", "media_type": media_type, "data": data }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "url", "url": url }));
    }
    Err(unsupported(format!(
        "{what} parts need a data: or http(s) URL"
    )))
}

/// An assistant turn: its text, then one `tool_use` block per tool call.
fn assistant_blocks(
    message: &ChatMessage,
    keep_thinking: bool,
) -> Result<Vec<Value>, PrepareError> {
    // Anthropic wants the turn's thinking first, as it wrote it.
    let details = message.reasoning_details.as_deref().unwrap_or_default();
    let mut blocks = if keep_thinking {
        thinking_blocks(details)
    } else {
        Vec::new()
    };
    blocks.extend(content_blocks(&message.content)?);
    for call in message.tool_calls.iter().flatten() {
        let input = match &call.function.arguments {
            Value::String(text) if text.trim().is_empty() => json!({}),
            Value::String(text) => serde_json::from_str::<Value>(text).map_err(|_| {
                unsupported(format!(
                    "tool call `{}` has arguments that are not JSON",
                    call.id
                ))
            })?,
            Value::Null => json!({}),
            other => other.clone(),
        };
        if !input.is_object() {
            return Err(unsupported(format!(
                "tool call `{}` must have a JSON object as arguments",
                call.id
            )));
        }
        blocks.push(json!({
            "type": "tool_use", "id": call.id, "name": call.function.name, "input": input,
        }));
    }
    Ok(blocks)
}

/// `reasoning_details` of a Claude model (format `anthropic-claude-v1`) → the signed `thinking`
/// and `redacted_thinking` blocks Anthropic requires back in a tool loop with thinking on. Pieces
/// of one block (one `index`, as a client may keep a stream's deltas) are joined; thinking
/// without a signature, which Anthropic would refuse, and other providers' details are left out.
fn thinking_blocks(details: &[Value]) -> Vec<Value> {
    let mut blocks: Vec<(Option<u64>, Value)> = Vec::new();
    for detail in details {
        if detail["format"] != ANTHROPIC_REASONING_FORMAT {
            continue;
        }
        let index = detail["index"].as_u64();
        match detail["type"].as_str() {
            Some("reasoning.text") => {
                let text = detail["text"].as_str().unwrap_or_default();
                let signature = detail["signature"].as_str().unwrap_or_default();
                match blocks.last_mut() {
                    Some((last, block))
                        if index.is_some() && *last == index && block["type"] == "thinking" =>
                    {
                        if let Some(Value::String(thinking)) = block.get_mut("thinking") {
                            thinking.push_str(text);
                        }
                        if !signature.is_empty() {
                            block["signature"] = signature.into();
                        }
                    }
                    _ => blocks.push((
                        index,
                        json!({"type": "thinking", "thinking": text, "signature": signature}),
                    )),
                }
            }
            Some("reasoning.encrypted") => {
                if let Some(data) = detail["data"].as_str() {
                    blocks.push((index, json!({"type": "redacted_thinking", "data": data})));
                }
            }
            _ => {}
        }
    }
    blocks
        .into_iter()
        .map(|(_, block)| block)
        .filter(|block| block["type"] != "thinking" || block["signature"] != "")
        .collect()
}

/// A `role: tool` message as a `tool_result` block.
fn tool_result(at: usize, message: &ChatMessage) -> Result<Value, PrepareError> {
    let Some(id) = &message.tool_call_id else {
        return Err(unsupported(format!(
            "messages[{at}]: a tool message needs `tool_call_id`"
        )));
    };
    let mut block = json!({ "type": "tool_result", "tool_use_id": id });
    let content = content_blocks(&message.content)?;
    if !content.is_empty()
        && let Some(object) = block.as_object_mut()
    {
        object.insert("content".into(), collapse(content));
    }
    Ok(block)
}

/// OpenAI function tools as Anthropic tools; `None` when the request has none.
fn convert_tools(body: &JsonObject) -> Result<Option<Vec<Value>>, PrepareError> {
    let Some(tools) = field::<Vec<Value>>(body, "tools")? else {
        return Ok(None);
    };
    if tools.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(tools.len());
    for tool in tools {
        if tool["type"] != "function" {
            return Err(unsupported(format!(
                "tools of type {} are not supported; only function tools are",
                tool["type"]
            )));
        }
        let function = &tool["function"];
        let Some(name) = function["name"].as_str() else {
            return Err(unsupported("every function tool needs a `name`"));
        };
        let mut converted = Map::new();
        converted.insert("name".into(), name.into());
        if let Some(description) = function.get("description").filter(|d| !d.is_null()) {
            converted.insert("description".into(), description.clone());
        }
        let schema = match function.get("parameters") {
            Some(schema) if schema.is_object() => schema.clone(),
            // Anthropic requires a schema; a tool without parameters takes an empty object.
            _ => json!({ "type": "object", "properties": {} }),
        };
        converted.insert("input_schema".into(), schema);
        if let Some(cache) = tool.get("cache_control") {
            converted.insert("cache_control".into(), cache.clone());
        }
        out.push(Value::Object(converted));
    }
    Ok(Some(out))
}

/// `tool_choice` (and `parallel_tool_calls: false`) in Anthropic's shape.
fn convert_tool_choice(body: &JsonObject, has_tools: bool) -> Result<Option<Value>, PrepareError> {
    if !has_tools {
        // Anthropic refuses a tool_choice without tools; OpenAI ignores it.
        return Ok(None);
    }
    let mut choice = match field::<Value>(body, "tool_choice")? {
        None => None,
        Some(Value::String(mode)) => Some(match mode.as_str() {
            "auto" => json!({ "type": "auto" }),
            "required" => json!({ "type": "any" }),
            "none" => json!({ "type": "none" }),
            other => {
                return Err(unsupported(format!(
                    "tool_choice `{other}` is not supported"
                )));
            }
        }),
        Some(object) => match object["function"]["name"].as_str() {
            Some(name) => Some(json!({ "type": "tool", "name": name })),
            None => return Err(unsupported("tool_choice must name a function")),
        },
    };
    if field::<bool>(body, "parallel_tool_calls")? == Some(false) {
        let choice = choice.get_or_insert_with(|| json!({ "type": "auto" }));
        if choice["type"] != "none"
            && let Some(object) = choice.as_object_mut()
        {
            object.insert("disable_parallel_tool_use".into(), true.into());
        }
    }
    Ok(choice)
}

/// A thinking budget and whether the client set its size itself (then it must fit as given).
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: u64,
    explicit: bool,
}

/// What the request asks for in thinking.
enum Thinking {
    Off,
    /// A native `thinking` object, sent as given.
    Native(Value, Option<Budget>),
    /// From `reasoning` or `reasoning_effort`.
    Derived(Budget),
}

impl Thinking {
    fn budget(&self) -> Option<Budget> {
        match self {
            Thinking::Off => None,
            Thinking::Native(_, budget) => *budget,
            Thinking::Derived(budget) => Some(*budget),
        }
    }

    /// The `thinking` field for a request of `max_tokens`; an effort's budget shrinks to fit.
    fn into_value(self, max_tokens: u64) -> Option<Value> {
        match self {
            Thinking::Off => None,
            Thinking::Native(value, _) => Some(value),
            Thinking::Derived(budget) => {
                let tokens = if budget.explicit {
                    budget.tokens
                } else {
                    budget.tokens.min(max_tokens.saturating_sub(1))
                };
                Some(json!({ "type": "enabled", "budget_tokens": tokens }))
            }
        }
    }
}

/// Thinking from a native `thinking` object, `reasoning: {max_tokens | effort | enabled}` or
/// `reasoning_effort` (OpenRouter's and OpenAI's spellings).
fn thinking(body: &JsonObject) -> Result<Thinking, PrepareError> {
    if let Some(native) = field::<Value>(body, "thinking")? {
        let budget = native["budget_tokens"].as_u64().map(|tokens| Budget {
            tokens,
            explicit: true,
        });
        return Ok(Thinking::Native(native, budget));
    }
    let reasoning = field::<Value>(body, "reasoning")?.unwrap_or(Value::Null);
    if reasoning["enabled"] == Value::Bool(false) {
        return Ok(Thinking::Off);
    }
    let budget = if let Some(tokens) = reasoning["max_tokens"].as_u64() {
        Some(Budget {
            tokens: tokens.max(MIN_THINKING_BUDGET),
            explicit: true,
        })
    } else if let Some(effort) = reasoning["effort"].as_str() {
        effort_budget(effort)?
    } else if let Some(effort) = field::<String>(body, "reasoning_effort")? {
        effort_budget(&effort)?
    } else if reasoning["enabled"] == Value::Bool(true) {
        effort_budget("medium")?
    } else {
        None
    };
    Ok(budget.map_or(Thinking::Off, Thinking::Derived))
}

fn effort_budget(effort: &str) -> Result<Option<Budget>, PrepareError> {
    let tokens = match effort {
        "none" => return Ok(None),
        "minimal" | "low" => 1024,
        "medium" => 4096,
        "high" => 16384,
        other => {
            return Err(unsupported(format!(
                "reasoning effort `{other}` is not one of none, minimal, low, medium, high"
            )));
        }
    };
    Ok(Some(Budget {
        tokens,
        explicit: false,
    }))
}

/// `max_tokens`, which Anthropic requires and which counts thinking too: room is made for the
/// budget when the client set no limit; an explicit budget that does not fit is refused.
fn max_tokens(body: &JsonObject, budget: Option<Budget>) -> Result<u64, PrepareError> {
    let requested = match field::<u64>(body, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => field::<u64>(body, "max_tokens")?,
    };
    match (requested, budget) {
        (Some(max), Some(b)) if max <= b.tokens && (b.explicit || max <= MIN_THINKING_BUDGET) => {
            Err(unsupported(format!(
                "max_tokens ({max}) must exceed the reasoning budget ({}): Anthropic counts \
                 thinking within max_tokens",
                b.tokens
            )))
        }
        (Some(max), _) => Ok(max),
        (None, Some(b)) => Ok(b.tokens + DEFAULT_MAX_TOKENS),
        (None, None) => Ok(DEFAULT_MAX_TOKENS),
    }
}

// === Response: Anthropic message -> OpenAI chat completion ===

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    id: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

impl WireMessage {
    /// The answer's size (text, thinking, tool inputs), for an estimate when an upstream
    /// reports no usage (Anthropic always does; servers that speak its API may not).
    fn answer_bytes(&self) -> usize {
        self.content
            .iter()
            .map(|block| match block {
                WireBlock::Text { text } => text.len(),
                WireBlock::Thinking { thinking, .. } => thinking.len(),
                WireBlock::ToolUse { name, input, .. } => name.len() + input.to_string().len(),
                WireBlock::RedactedThinking { .. } | WireBlock::Other => 0,
            })
            .sum()
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: String,
    },
    RedactedThinking {
        #[serde(default)]
        data: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Server tools and future blocks: nothing OpenAI can show.
    #[serde(other)]
    Other,
}

/// Anthropic's usage object; every field may be missing from a `message_delta`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    /// The cache writes by how long they are kept.
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
}

/// `usage.cache_creation`: of the tokens written to the prompt cache, those kept an hour
/// (priced apart from the five-minute ones).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct WireError {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: WireError,
}

impl WireMessage {
    /// The error a 200 may carry instead of a message.
    fn failure(&self) -> Option<Failure> {
        if self.kind != "error" {
            return None;
        }
        let error = self.error.as_ref();
        let kind = error.map_or("", |e| e.kind.as_str());
        let message = error.map(|e| e.message.clone()).unwrap_or_default();
        Some(error_failure(kind, message))
    }
}

impl WireUsage {
    /// Takes what a later event reports over what an earlier one did.
    fn merge(&mut self, later: &WireUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation = later.cache_creation.or(self.cache_creation);
    }

    /// Anthropic's `input_tokens` excludes cached and cache-written tokens: the prompt is all three.
    fn to_usage(self) -> Usage {
        Usage {
            prompt_tokens: self.input_tokens.unwrap_or(0)
                + self.cache_creation_input_tokens.unwrap_or(0)
                + self.cache_read_input_tokens.unwrap_or(0),
            completion_tokens: self.output_tokens.unwrap_or(0),
            cached_tokens: self.cache_read_input_tokens,
            cache_write_tokens: self.cache_creation_input_tokens,
            cache_write_1h_tokens: self
                .cache_creation
                .and_then(|by_ttl| by_ttl.ephemeral_1h_input_tokens),
            reasoning_tokens: None,
            cost_nanos: None,
        }
    }

    fn to_openai(self) -> OpenAiUsage {
        let usage = self.to_usage();
        OpenAiUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details: PromptDetails {
                cached_tokens: usage.cached_tokens.unwrap_or(0),
                cache_write_tokens: usage.cache_write_tokens.unwrap_or(0),
            },
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct CompletionChoice {
    index: u32,
    message: CompletionMessage,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct CompletionMessage {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<String>,
    /// The thinking blocks with their signatures, as OpenRouter carries a Claude model's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasoning_details: Vec<ReasoningDetail<'static>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut>,
}

#[derive(Serialize)]
struct ToolCallOut {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut,
}

#[derive(Serialize)]
struct FunctionOut {
    name: String,
    arguments: String,
}

#[derive(Debug, Serialize)]
struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
}

#[derive(Debug, Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    /// OpenRouter's name for tokens written to the prompt cache (Anthropic bills them higher).
    #[serde(skip_serializing_if = "is_zero")]
    cache_write_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn
        _ => "stop",
    }
}

/// Rebuilds an Anthropic message as an OpenAI chat completion stamped `created`.
fn to_completion(body: &[u8], created: u64) -> MappedResponse {
    let message = match serde_json::from_slice::<WireMessage>(body) {
        Ok(message) => message,
        Err(e) => {
            return MappedResponse {
                failure: Some(Failure {
                    kind: FailureKind::Server,
                    status: 502,
                    message: format!("unreadable Anthropic answer: {e}"),
                    retry_after: None,
                }),
                ..MappedResponse::default()
            };
        }
    };
    if let Some(failure) = message.failure() {
        return MappedResponse {
            failure: Some(failure),
            ..MappedResponse::default()
        };
    }
    let answer_bytes = message.answer_bytes();
    let mut text = String::new();
    let mut reasoning: Option<String> = None;
    let mut reasoning_details = Vec::new();
    let mut tool_calls = Vec::new();
    for (index, block) in message.content.into_iter().enumerate() {
        match block {
            WireBlock::Text { text: t } => text.push_str(&t),
            WireBlock::Thinking {
                thinking,
                signature,
            } => {
                reasoning.get_or_insert_default().push_str(&thinking);
                reasoning_details.push(ReasoningDetail::text(thinking, signature, index));
            }
            WireBlock::RedactedThinking { data } => {
                reasoning_details.push(ReasoningDetail::redacted(data, index));
            }
            WireBlock::ToolUse { id, name, input } => tool_calls.push(ToolCallOut {
                id,
                kind: "function",
                function: FunctionOut {
                    name,
                    arguments: input.to_string(),
                },
            }),
            WireBlock::Other => {}
        }
    }
    let usage = message.usage.unwrap_or_default();
    let model = message.model.unwrap_or_default();
    let completion = Completion {
        id: &message.id,
        object: "chat.completion",
        created,
        model: &model,
        choices: [CompletionChoice {
            index: 0,
            message: CompletionMessage {
                role: "assistant",
                // OpenAI's convention: no text next to tool calls is `null`, not "".
                content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                reasoning,
                reasoning_details,
                tool_calls,
            },
            finish_reason: message.stop_reason.as_deref().map(finish_reason),
        }],
        usage: usage.to_openai(),
    };
    MappedResponse {
        body: Some(Bytes::from(
            serde_json::to_vec(&completion).unwrap_or_default(),
        )),
        usage: message.usage.map(WireUsage::to_usage),
        model: (!model.is_empty()).then_some(model),
        answer_bytes,
        ..MappedResponse::default()
    }
}

// === Errors ===

/// The status Anthropic uses for an error type (for errors inside a 200 or a stream).
fn status_for(error_type: &str) -> u16 {
    match error_type {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

fn failure_kind(status: u16, error_type: &str, message: &str) -> FailureKind {
    match error_type {
        "rate_limit_error" => FailureKind::RateLimited,
        "overloaded_error" | "api_error" => FailureKind::Server,
        "timeout_error" => FailureKind::Timeout,
        "billing_error" => FailureKind::PaymentRequired,
        "authentication_error" | "permission_error" => FailureKind::Unauthorized,
        _ if is_context_length(message) => FailureKind::ContextLength,
        _ => match status {
            401 | 403 => FailureKind::Unauthorized,
            402 => FailureKind::PaymentRequired,
            408 => FailureKind::Timeout,
            429 => FailureKind::RateLimited,
            500..=599 => FailureKind::Server,
            _ => FailureKind::BadRequest,
        },
    }
}

/// Anthropic's wordings for a prompt that does not fit the model.
fn is_context_length(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("prompt is too long")
        || lower.contains("exceed context limit")
        || lower.contains("context window")
        || lower.contains("context length")
}

fn error_failure(error_type: &str, message: String) -> Failure {
    let status = status_for(error_type);
    Failure {
        kind: failure_kind(status, error_type, &message),
        status,
        message,
        retry_after: None,
    }
}

// === Streams ===

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: WireBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: WireDelta,
    },
    ContentBlockStop,
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        #[serde(default)]
        error: WireError,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    ThinkingDelta {
        #[serde(default)]
        thinking: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    SignatureDelta {
        #[serde(default)]
        signature: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// The event's data as a [`StreamEvent`]; `None` for a comment, no data, or unreadable JSON.
fn parse_event(event: &SseEvent) -> Option<StreamEvent> {
    serde_json::from_slice(&event.data()?).ok()
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<OpenAiUsage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
}

#[derive(Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_details: Option<[ReasoningDetail<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

/// One entry of OpenRouter's `reasoning_details`, the form a Claude model's thinking takes in
/// the OpenAI format: signed text, or redacted thinking's encrypted data. `index` is the block's.
#[derive(Serialize)]
struct ReasoningDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Cow<'a, str>>,
    format: &'static str,
    index: usize,
}

impl<'a> ReasoningDetail<'a> {
    fn text(
        text: impl Into<Cow<'a, str>>,
        signature: impl Into<Cow<'a, str>>,
        index: usize,
    ) -> Self {
        let signature = signature.into();
        ReasoningDetail {
            kind: "reasoning.text",
            text: Some(text.into()),
            signature: (!signature.is_empty()).then_some(signature),
            data: None,
            format: ANTHROPIC_REASONING_FORMAT,
            index,
        }
    }

    fn redacted(data: impl Into<Cow<'a, str>>, index: usize) -> Self {
        ReasoningDetail {
            kind: "reasoning.encrypted",
            text: None,
            signature: None,
            data: Some(data.into()),
            format: ANTHROPIC_REASONING_FORMAT,
            index,
        }
    }
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// A `data: {json}\n\n` event.
fn json_event<T: Serialize>(value: &T) -> Bytes {
    // These are plain structs of strings and numbers: serializing them cannot fail.
    data_event(&serde_json::to_vec(value).unwrap_or_default())
}

const DONE: &[u8] = b"data: [DONE]\n\n";
const PING: &[u8] = b": ping\n\n";

impl ChunkTranslator {
    /// A translator for one stream; `include_usage` emits the final usage chunk (the client
    /// asked with `stream_options.include_usage`); chunks are stamped `created`.
    pub fn new(include_usage: bool, created: u64) -> Self {
        ChunkTranslator {
            include_usage,
            created,
            id: String::new(),
            model: String::new(),
            usage: WireUsage::default(),
            tool_blocks: Vec::new(),
            complete: false,
        }
    }

    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&'static str>) -> Bytes {
        json_event(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &[ChunkChoice {
                index: 0,
                delta,
                finish_reason,
            }],
            usage: None,
        })
    }

    fn usage_chunk(&self) -> Bytes {
        json_event(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(self.usage.to_openai()),
        })
    }

    fn tool_chunk(&self, tool: ToolCallDelta<'_>) -> Bytes {
        self.chunk(
            Delta {
                tool_calls: Some([tool]),
                ..Delta::default()
            },
            None,
        )
    }

    /// A chunk carrying answer text.
    fn text_chunk(&self, text: &str) -> Bytes {
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        self.chunk(delta, None)
    }

    /// A chunk carrying reasoning text, plain and as a detail of its block.
    fn reasoning_chunk(&self, index: usize, thinking: &str) -> Bytes {
        let delta = Delta {
            reasoning: Some(thinking),
            reasoning_details: Some([ReasoningDetail::text(thinking, "", index)]),
            ..Delta::default()
        };
        self.chunk(delta, None)
    }

    /// A chunk carrying only a detail: a thinking block's signature, or redacted thinking.
    fn detail_chunk(&self, detail: ReasoningDetail<'_>) -> Bytes {
        let delta = Delta {
            reasoning_details: Some([detail]),
            ..Delta::default()
        };
        self.chunk(delta, None)
    }

    /// The chunk for a block's opening, if it carries anything.
    fn block_start(&mut self, index: usize, block: &WireBlock) -> Option<Bytes> {
        match block {
            WireBlock::Text { text } if !text.is_empty() => Some(self.text_chunk(text)),
            WireBlock::Thinking { thinking, .. } if !thinking.is_empty() => {
                Some(self.reasoning_chunk(index, thinking))
            }
            WireBlock::RedactedThinking { data } => {
                Some(self.detail_chunk(ReasoningDetail::redacted(data.as_str(), index)))
            }
            WireBlock::ToolUse { id, name, .. } => {
                self.tool_blocks.push(index);
                Some(self.tool_chunk(ToolCallDelta {
                    index: self.tool_blocks.len() - 1,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(name),
                        arguments: "",
                    },
                }))
            }
            _ => None,
        }
    }

    /// The chunk for a block's delta, if it carries anything.
    fn block_delta(&self, index: usize, delta: &WireDelta) -> Option<Bytes> {
        match delta {
            WireDelta::TextDelta { text } if !text.is_empty() => Some(self.text_chunk(text)),
            WireDelta::ThinkingDelta { thinking } if !thinking.is_empty() => {
                Some(self.reasoning_chunk(index, thinking))
            }
            WireDelta::SignatureDelta { signature } if !signature.is_empty() => {
                Some(self.detail_chunk(ReasoningDetail::text("", signature.as_str(), index)))
            }
            WireDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                let tool = self.tool_blocks.iter().position(|b| *b == index)?;
                Some(self.tool_chunk(ToolCallDelta {
                    index: tool,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: partial_json,
                    },
                }))
            }
            _ => None,
        }
    }

    fn translate(&mut self, event: StreamEvent) -> MappedEvent {
        let content = |out: Option<Bytes>| match out {
            Some(bytes) => (EventKind::Content, Output::One(bytes)),
            // Nothing for the client (an empty block opening): not content.
            None => (EventKind::Preamble, Output::Nothing),
        };
        let mut usage = None;
        let (kind, out) = match event {
            StreamEvent::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                if let Some(reported) = &message.usage {
                    self.usage.merge(reported);
                }
                usage = Some(self.usage.to_usage());
                let role = self.chunk(
                    Delta {
                        role: Some("assistant"),
                        content: Some(""),
                        ..Delta::default()
                    },
                    None,
                );
                (EventKind::Preamble, Output::One(role))
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => content(self.block_start(index, &content_block)),
            StreamEvent::ContentBlockDelta { index, delta } => {
                content(self.block_delta(index, &delta))
            }
            StreamEvent::ContentBlockStop => (EventKind::Preamble, Output::Nothing),
            StreamEvent::MessageDelta {
                delta,
                usage: reported,
            } => {
                if let Some(reported) = &reported {
                    self.usage.merge(reported);
                }
                usage = Some(self.usage.to_usage());
                let mut out = Vec::with_capacity(2);
                if let Some(stop) = &delta.stop_reason {
                    self.complete = true;
                    out.push(self.chunk(Delta::default(), Some(finish_reason(stop))));
                }
                if self.include_usage {
                    out.push(self.usage_chunk());
                }
                let kind = if delta.stop_reason.is_some() {
                    EventKind::Content
                } else {
                    EventKind::Usage
                };
                (kind, Output::Many(out))
            }
            StreamEvent::MessageStop => {
                self.complete = true;
                (EventKind::Done, Output::One(Bytes::from_static(DONE)))
            }
            StreamEvent::Ping => (EventKind::KeepAlive, Output::One(Bytes::from_static(PING))),
            StreamEvent::Error { error } => {
                let failure = error_failure(&error.kind, error.message);
                // OpenAI-shaped, as the relay passes an error event after content unchanged.
                let out = json_event(&json!({ "error": {
                    "message": failure.message, "type": error.kind, "code": failure.status,
                }}));
                (EventKind::Failed(failure), Output::One(out))
            }
            StreamEvent::Other => (EventKind::Unknown, Output::Nothing),
        };
        MappedEvent { kind, usage, out }
    }
}

impl StreamMapper for ChunkTranslator {
    fn map(&mut self, event: SseEvent) -> MappedEvent {
        if event.is_comment() {
            return MappedEvent {
                kind: EventKind::KeepAlive,
                usage: None,
                out: Output::Nothing,
            };
        }
        match parse_event(&event) {
            Some(parsed) => self.translate(parsed),
            // Anthropic data an OpenAI client cannot read: never forwarded.
            None => MappedEvent {
                kind: EventKind::Unknown,
                usage: None,
                out: Output::Nothing,
            },
        }
    }

    fn is_complete(&self) -> bool {
        self.complete
    }

    fn served_model(&self) -> Option<&str> {
        (!self.model.is_empty()).then_some(self.model.as_str())
    }
}

impl MessagesEvents {
    fn classify(&mut self, event: StreamEvent) -> (EventKind, Option<Usage>) {
        let mut usage = None;
        let kind = match event {
            StreamEvent::MessageStart { message } => {
                if let Some(reported) = &message.usage {
                    self.usage.merge(reported);
                }
                usage = Some(self.usage.to_usage());
                if !message.model.is_empty() {
                    self.model = Some(message.model);
                }
                EventKind::Preamble
            }
            StreamEvent::ContentBlockStart { content_block, .. } => match content_block {
                WireBlock::Text { text } if text.is_empty() => self.structural(),
                WireBlock::Thinking { thinking, .. } if thinking.is_empty() => self.structural(),
                _ => self.content(),
            },
            StreamEvent::ContentBlockDelta { .. } => self.content(),
            StreamEvent::ContentBlockStop => self.structural(),
            StreamEvent::MessageDelta {
                delta,
                usage: reported,
            } => {
                if let Some(reported) = &reported {
                    self.usage.merge(reported);
                }
                usage = Some(self.usage.to_usage());
                if delta.stop_reason.is_some() {
                    self.complete = true;
                    self.content()
                } else {
                    EventKind::Usage
                }
            }
            StreamEvent::MessageStop => {
                self.complete = true;
                EventKind::Done
            }
            StreamEvent::Ping => EventKind::KeepAlive,
            StreamEvent::Error { error } => {
                EventKind::Failed(error_failure(&error.kind, error.message))
            }
            StreamEvent::Other => EventKind::Unknown,
        };
        (kind, usage)
    }

    fn content(&mut self) -> EventKind {
        self.content_seen = true;
        EventKind::Content
    }

    /// Framing without content: held back with the preamble until content shows up.
    fn structural(&self) -> EventKind {
        if self.content_seen {
            EventKind::Content
        } else {
            EventKind::Preamble
        }
    }
}

impl StreamMapper for MessagesEvents {
    fn map(&mut self, event: SseEvent) -> MappedEvent {
        let (kind, usage) = if event.is_comment() {
            (EventKind::KeepAlive, None)
        } else {
            match parse_event(&event) {
                Some(parsed) => self.classify(parsed),
                None => (EventKind::Unknown, None),
            }
        };
        MappedEvent {
            kind,
            usage,
            out: Output::One(event.raw().clone()),
        }
    }

    fn is_complete(&self) -> bool {
        self.complete
    }

    fn served_model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orproxy_plugin::Identity;

    const KEY: &str = "sk-ant-api03-test";

    /// A recorded-style stream: thinking with a signature, text, a tool call whose input
    /// arrives in pieces, cache reads, and the final usage in `message_delta`.
    const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":100,\"output_tokens\":2,\"service_tier\":\"standard\"}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"The user wants the weather.\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me check\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\" the weather.\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\": \\\"San Fra\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"ncisco, CA\\\"}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    /// A recorded-style non-stream answer with thinking, text and a tool call.
    const MESSAGE: &str = r#"{"id":"msg_01Aq9w938a90dw8q","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"thinking","thinking":"Need the weather tool.","signature":"EqQBCgIYAh"},{"type":"text","text":"I'll look that up."},{"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"get_weather","input":{"location":"San Francisco, CA","unit":"celsius"}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":1000,"cache_read_input_tokens":500,"output_tokens":503,"service_tier":"standard"}}"#;

    fn backend() -> Anthropic {
        Anthropic::new(None).unwrap()
    }

    fn chat_call<'a>(body: &'a JsonObject, stream: bool) -> Call<'a> {
        Call {
            request_id: "r1",
            body,
            model: "claude-sonnet-4-5",
            stream,
            api_key: Some(KEY),
            identity: Identity {
                user_agent: Some("MyApp/1.0.0"),
                referer: Some("https://example.org"),
                title: Some("MyApp"),
            },
            headers: &[],
        }
    }

    fn http(prepared: Prepared) -> UpstreamRequest {
        match prepared {
            Prepared::Http(request) => request,
            Prepared::Local(_) => panic!("anthropic answers over HTTP"),
        }
    }

    /// The Messages body `prepare` builds for an OpenAI body.
    fn translate(openai: Value) -> Value {
        let body = JsonObject::parse(openai.to_string().as_bytes()).unwrap();
        let stream = openai["stream"] == true;
        let request = http(backend().prepare(&chat_call(&body, stream)).unwrap());
        serde_json::from_slice(&request.body).unwrap()
    }

    fn refusal(openai: Value) -> String {
        let body = JsonObject::parse(openai.to_string().as_bytes()).unwrap();
        match backend().prepare(&chat_call(&body, false)) {
            Err(PrepareError::Unsupported(message)) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn events(transcript: &str) -> Vec<SseEvent> {
        let mut framer = orproxy_plugin::SseFramer::new();
        framer.push(transcript.as_bytes());
        std::iter::from_fn(|| framer.next_event()).collect()
    }

    fn outputs(out: Output) -> Vec<Bytes> {
        match out {
            Output::One(bytes) => vec![bytes],
            Output::Many(list) => list,
            Output::Nothing => Vec::new(),
        }
    }

    /// What the client sees: data payloads as JSON (`[DONE]` and comments as strings).
    fn client_view(bytes: &[Bytes]) -> Vec<Value> {
        bytes
            .iter()
            .map(|b| {
                let text = std::str::from_utf8(b).unwrap();
                let payload = text.strip_prefix("data: ").unwrap_or(text).trim_end();
                serde_json::from_str(payload).unwrap_or_else(|_| Value::String(payload.to_owned()))
            })
            .collect()
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "claude-sonnet-4-5-20250929",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    }

    #[test]
    fn a_conversation_with_tools_and_images_is_translated() {
        let got = translate(json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.org/map.jpg", "detail": "high"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
                {"role": "user", "content": "Thanks, and tomorrow?"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
                {"type": "function", "function": {"name": "get_time"}},
            ],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "max_completion_tokens": 300,
            "stop": "\n\nHuman:",
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "user": "user-42",
            "frequency_penalty": 0.5,
            "seed": 7,
            "stream": true,
            "stream_options": {"include_usage": true},
        }));
        assert_eq!(
            got,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 300,
                "system": [
                    {"type": "text", "text": "You are terse."},
                    {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}},
                ],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Weather here?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.org/map.jpg"}},
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, cloudy"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "14:05"},
                        {"type": "text", "text": "Thanks, and tomorrow?"},
                    ]},
                ],
                "tools": [
                    {"name": "get_weather", "description": "Weather by city",
                        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}},
                    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
                ],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "stop_sequences": ["\n\nHuman:"],
                "temperature": 0.2,
                "top_p": 0.9,
                "top_k": 40,
                "metadata": {"user_id": "user-42"},
                "stream": true,
            })
        );
    }

    #[test]
    fn plain_chats_stay_plain_and_get_the_default_max_tokens() {
        let got = translate(json!({
            "model": "x",
            "messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": ""}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Bye"}],
            "max_tokens": null,
            "stop": ["a", "b"],
        }));
        assert_eq!(
            got,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": DEFAULT_MAX_TOKENS,
                "system": "Be nice.",
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"},
                ],
                "stop_sequences": ["a", "b"],
            })
        );
    }

    #[test]
    fn tool_choices_map_to_anthropic_modes() {
        let with = |choice: Value| {
            translate(json!({
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                "tool_choice": choice,
            }))["tool_choice"]
                .clone()
        };
        assert_eq!(with(json!("auto")), json!({"type": "auto"}));
        assert_eq!(with(json!("none")), json!({"type": "none"}));
        assert_eq!(
            with(json!({"type": "function", "function": {"name": "f"}})),
            json!({"type": "tool", "name": "f"})
        );
        // Without tools Anthropic refuses a tool_choice, so none is sent.
        let got = translate(
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}),
        );
        assert!(got.get("tool_choice").is_none(), "{got}");
    }

    #[test]
    fn reasoning_becomes_a_thinking_budget_that_fits_max_tokens() {
        let thinking = |extra: Value| {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let got = translate(body);
            (got["thinking"].clone(), got["max_tokens"].clone())
        };
        let enabled = |n: u64| json!({"type": "enabled", "budget_tokens": n});
        assert_eq!(
            thinking(json!({"reasoning_effort": "low"})),
            (enabled(1024), json!(1024 + DEFAULT_MAX_TOKENS))
        );
        assert_eq!(
            thinking(json!({"reasoning": {"effort": "high"}})),
            (enabled(16384), json!(16384 + DEFAULT_MAX_TOKENS))
        );
        assert_eq!(
            thinking(json!({"reasoning_effort": "medium", "max_tokens": 20000})),
            (enabled(4096), json!(20000))
        );
        // An effort's budget shrinks to fit an explicit max_tokens.
        assert_eq!(
            thinking(json!({"reasoning_effort": "high", "max_tokens": 3000})),
            (enabled(2999), json!(3000))
        );
        assert_eq!(
            thinking(json!({"reasoning": {"max_tokens": 2000}, "max_tokens": 8000})),
            (enabled(2000), json!(8000))
        );
        assert_eq!(
            thinking(json!({"reasoning": {"max_tokens": 10}})),
            (enabled(1024), json!(1024 + DEFAULT_MAX_TOKENS))
        );
        assert_eq!(
            thinking(json!({"reasoning": {"effort": "high", "enabled": false}})),
            (Value::Null, json!(DEFAULT_MAX_TOKENS))
        );
        assert_eq!(
            thinking(json!({"reasoning_effort": "none"})),
            (Value::Null, json!(DEFAULT_MAX_TOKENS))
        );
        let message = refusal(json!({
            "messages": [{"role": "user", "content": "x"}],
            "reasoning": {"max_tokens": 5000}, "max_tokens": 4000,
        }));
        assert!(
            message.contains("must exceed the reasoning budget"),
            "{message}"
        );
    }

    #[test]
    fn requests_anthropic_cannot_honour_are_refused_clearly() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (body, expected) in [
            (json!({"messages": user, "n": 2}), "`n` must be 1"),
            (
                json!({"messages": user, "logprobs": true}),
                "log probabilities",
            ),
            (
                json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {}}}),
                "`response_format` of type `json_schema`",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
                "`input_audio` are not supported",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
                "not JSON",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "needs `tool_call_id`",
            ),
            (json!({"model": "x"}), "`messages` is required"),
        ] {
            let message = refusal(body);
            assert!(message.starts_with("anthropic: "), "{message}");
            assert!(message.contains(expected), "{message} lacks {expected}");
        }
        let ok = translate(json!({"messages": user, "n": 1, "response_format": {"type": "text"}}));
        assert!(ok.get("n").is_none() && ok.get("response_format").is_none());
    }

    #[test]
    fn requests_carry_anthropic_headers_and_only_anthropic_extras() {
        let body = JsonObject::parse(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap();
        let forwarded = [
            (
                HeaderName::from_static("anthropic-beta"),
                HeaderValue::from_static("prompt-caching-2024-07-31"),
            ),
            (
                HeaderName::from_static("anthropic-beta"),
                HeaderValue::from_static("output-128k-2025-02-19"),
            ),
            (
                HeaderName::from_static("x-openrouter-cache"),
                HeaderValue::from_static("1"),
            ),
        ];
        let call = Call {
            headers: &forwarded,
            ..chat_call(&body, true)
        };
        let request = http(backend().prepare(&call).unwrap());
        assert_eq!(request.method, Method::POST);
        assert_eq!(
            request.url.to_string(),
            "https://api.anthropic.com/v1/messages"
        );
        let h = |n: &str| {
            request
                .headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(h("x-api-key").as_deref(), Some(KEY));
        assert!(request.headers.get("x-api-key").unwrap().is_sensitive());
        assert_eq!(h("anthropic-version").as_deref(), Some(API_VERSION));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(h("accept").as_deref(), Some("text/event-stream"));
        assert_eq!(h("user-agent").as_deref(), Some("MyApp/1.0.0"));
        assert_eq!(request.headers.get_all("anthropic-beta").iter().count(), 2);
        assert_eq!(h("authorization"), None);
        assert_eq!(h("http-referer"), None);
        assert_eq!(h("x-openrouter-cache"), None);

        // A client's own version wins, and a pass-through body is sent as it came.
        let native =
            JsonObject::parse(br#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#)
                .unwrap();
        let version = [(ANTHROPIC_VERSION, HeaderValue::from_static("2024-01-01"))];
        let call = Call {
            headers: &version,
            ..chat_call(&native, false)
        };
        let request = http(backend().prepare_messages(&call).unwrap());
        assert_eq!(request.body, native.to_bytes());
        assert_eq!(request.headers["anthropic-version"], "2024-01-01");
        assert_eq!(request.headers["accept"], "application/json");

        let missing = Call {
            api_key: None,
            ..call
        };
        assert!(matches!(
            backend().prepare(&missing),
            Err(PrepareError::MissingKey)
        ));
    }

    #[test]
    fn count_tokens_and_models_go_to_their_endpoints() {
        let base = Anthropic::new(Some("http://127.0.0.1:9/".into())).unwrap();
        let body = JsonObject::parse(br#"{"model":"m","messages":[]}"#).unwrap();
        let request = http(base.count_tokens(&chat_call(&body, true)).unwrap());
        assert_eq!(
            request.url.to_string(),
            "http://127.0.0.1:9/v1/messages/count_tokens"
        );
        assert_eq!(request.body, body.to_bytes());
        assert_eq!(request.headers["accept"], "application/json");

        assert!(base.list_models(None).is_none());
        let request = http(base.list_models(Some(KEY)).unwrap());
        assert_eq!(request.method, Method::GET);
        assert_eq!(
            request.url.to_string(),
            "http://127.0.0.1:9/v1/models?limit=1000"
        );
        assert_eq!(request.headers["x-api-key"], KEY);
        assert_eq!(request.headers["anthropic-version"], API_VERSION);

        let models = base
            .map_models(br#"{"data":[{"type":"model","id":"claude-sonnet-4-5","display_name":"Claude Sonnet 4.5","created_at":"2025-09-29T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-5","last_id":"claude-sonnet-4-5"}"#)
            .unwrap();
        assert_eq!(
            models,
            vec![ModelInfo {
                id: "claude-sonnet-4-5".into(),
                price: None,
                max_output_tokens: None,
            }]
        );
    }

    #[test]
    fn a_message_becomes_a_chat_completion() {
        let mapped = to_completion(MESSAGE.as_bytes(), 1_700_000_000);
        assert!(mapped.failure.is_none());
        assert_eq!(mapped.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(
            mapped.usage,
            Some(Usage {
                prompt_tokens: 2095 + 1000 + 500,
                completion_tokens: 503,
                cached_tokens: Some(500),
                cache_write_tokens: Some(1000),
                cache_write_1h_tokens: None,
                reasoning_tokens: None,
                cost_nanos: None,
            })
        );
        let body: Value = serde_json::from_slice(&mapped.body.unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "id": "msg_01Aq9w938a90dw8q", "object": "chat.completion", "created": 1700000000,
                "model": "claude-sonnet-4-5-20250929",
                "choices": [{
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "I'll look that up.",
                        "reasoning": "Need the weather tool.",
                        "reasoning_details": [{"type": "reasoning.text", "text": "Need the weather tool.",
                            "signature": "EqQBCgIYAh", "format": "anthropic-claude-v1", "index": 0}],
                        "tool_calls": [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
                            "name": "get_weather", "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}",
                        }}],
                    },
                    "finish_reason": "tool_calls",
                }],
                "usage": {"prompt_tokens": 3595, "completion_tokens": 503, "total_tokens": 4098,
                          "prompt_tokens_details": {"cached_tokens": 500, "cache_write_tokens": 1000}},
            })
        );
    }

    #[test]
    fn hour_long_cache_writes_are_counted_apart() {
        let message = r#"{"id":"msg_1","type":"message","role":"assistant","model":"m",
            "content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",
            "usage":{"input_tokens":10,"cache_creation_input_tokens":300,"cache_read_input_tokens":0,
                     "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},
                     "output_tokens":1}}"#;
        let usage = to_completion(message.as_bytes(), 1).usage.unwrap();
        assert_eq!(
            (usage.cache_write_tokens, usage.cache_write_1h_tokens),
            (Some(300), Some(200))
        );
    }

    #[test]
    fn thinking_goes_out_and_comes_back_as_reasoning_details() {
        let message = r#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[
            {"type":"thinking","thinking":"Hm.","signature":"sig-0"},
            {"type":"redacted_thinking","data":"secret"},
            {"type":"tool_use","id":"t1","name":"f","input":{}}],"stop_reason":"tool_use"}"#;
        let mapped = to_completion(message.as_bytes(), 1);
        let body: Value = serde_json::from_slice(&mapped.body.unwrap()).unwrap();
        let details = &body["choices"][0]["message"]["reasoning_details"];
        assert_eq!(
            details,
            &json!([
                {"type": "reasoning.text", "text": "Hm.", "signature": "sig-0",
                 "format": "anthropic-claude-v1", "index": 0},
                {"type": "reasoning.encrypted", "data": "secret",
                 "format": "anthropic-claude-v1", "index": 1}
            ])
        );

        // The client sends the turn back as it got it, or as a stream's pieces; another
        // provider's details and unsigned thinking stay out.
        let mut pieces = details.as_array().unwrap().clone();
        pieces.insert(
            0,
            json!({"type": "reasoning.text", "text": "H",
            "format": "anthropic-claude-v1", "index": 0}),
        );
        pieces[1]["text"] = "m.".into();
        pieces.push(json!({"type": "reasoning.text", "text": "unsigned",
            "format": "anthropic-claude-v1", "index": 2}));
        pieces.push(json!({"type": "reasoning.encrypted", "data": "gAAA",
            "format": "openai-responses-v1", "index": 3}));
        let request = |details: &Value, effort: &str, then: &[Value]| {
            let mut messages = vec![
                json!({"role": "user", "content": "q"}),
                json!({"role": "assistant", "content": null, "reasoning_details": details,
                       "tool_calls": [{"id": "t1", "type": "function",
                                       "function": {"name": "f", "arguments": "{}"}}]}),
                json!({"role": "tool", "tool_call_id": "t1", "content": "r"}),
            ];
            messages.extend_from_slice(then);
            let request = json!({"model": "m", "messages": messages, "reasoning_effort": effort});
            translate(request)["messages"][1]["content"].clone()
        };
        for details in [details.clone(), Value::Array(pieces)] {
            // A user message after the tool results joins their turn: still the same loop.
            for then in [vec![], vec![json!({"role": "user", "content": "and?"})]] {
                assert_eq!(
                    request(&details, "low", &then),
                    json!([
                        {"type": "thinking", "thinking": "Hm.", "signature": "sig-0"},
                        {"type": "redacted_thinking", "data": "secret"},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
                    ])
                );
            }
        }
        // Thinking off, or a loop that ended before the user's next turn: no thinking back.
        let bare = json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]);
        assert_eq!(request(details, "none", &[]), bare);
        let over = [
            json!({"role": "assistant", "content": "Done."}),
            json!({"role": "user", "content": "Thanks."}),
        ];
        assert_eq!(request(details, "low", &over), bare);
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            let body = format!(
                r#"{{"id":"m","type":"message","model":"c","content":[],"stop_reason":"{stop}","usage":{{"input_tokens":1,"output_tokens":0}}}}"#
            );
            let mapped = to_completion(body.as_bytes(), 0);
            let v: Value = serde_json::from_slice(&mapped.body.unwrap()).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], finish, "{stop}");
            // No text and no tool calls: an empty string, never a missing answer.
            assert_eq!(v["choices"][0]["message"]["content"], "");
        }
    }

    #[test]
    fn errors_inside_a_200_are_failures() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
        for mapped in [
            to_completion(body, 0),
            backend().map_messages_response(&Bytes::from_static(body)),
        ] {
            let failure = mapped.failure.unwrap();
            assert_eq!(
                (failure.kind, failure.status, failure.message.as_str()),
                (FailureKind::Server, 529, "Overloaded")
            );
            assert!(mapped.body.is_none());
        }
        let garbage = to_completion(b"<html>", 0).failure.unwrap();
        assert_eq!(garbage.kind, FailureKind::Server);
    }

    #[test]
    fn passed_through_answers_report_usage_and_model_only() {
        let mapped = backend().map_messages_response(&Bytes::from_static(MESSAGE.as_bytes()));
        assert!(mapped.body.is_none() && mapped.failure.is_none());
        assert_eq!(mapped.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        let usage = mapped.usage.unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens
            ),
            (3595, 503, Some(500))
        );
    }

    #[test]
    fn an_answer_without_usage_has_its_size_for_an_estimate() {
        let body = Bytes::from_static(
            br#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"hello from anthropic"},{"type":"tool_use","id":"t","name":"f","input":{"a":1}}],"stop_reason":"end_turn"}"#,
        );
        let expected = "hello from anthropic".len() + "f".len() + r#"{"a":1}"#.len();
        let passed = backend().map_messages_response(&body);
        assert!(passed.usage.is_none());
        assert_eq!(passed.answer_bytes, expected);
        assert_eq!(backend().map_response(&body).answer_bytes, expected);
    }

    #[test]
    fn error_answers_are_classified() {
        let classify = |status: u16, retry: Option<&'static str>, body: &str| {
            let mut headers = HeaderMap::new();
            if let Some(secs) = retry {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static(secs));
            }
            backend().classify(
                StatusCode::from_u16(status).unwrap(),
                &headers,
                body.as_bytes(),
            )
        };
        let error = |kind: &str, message: &str| {
            json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})
                .to_string()
        };
        let f = classify(
            429,
            Some("12"),
            &error(
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
            ),
        );
        assert_eq!(f.kind, FailureKind::RateLimited);
        assert_eq!(f.retry_after, Some(std::time::Duration::from_secs(12)));
        assert!(f.message.starts_with("Number of request tokens"));
        let f = classify(529, None, &error("overloaded_error", "Overloaded"));
        assert_eq!((f.kind, f.status), (FailureKind::Server, 529));
        assert!(f.kind.is_retryable());
        let f = classify(
            400,
            None,
            &error(
                "invalid_request_error",
                "prompt is too long: 215000 tokens > 200000 maximum",
            ),
        );
        assert_eq!(f.kind, FailureKind::ContextLength);
        let f = classify(
            400,
            None,
            &error("invalid_request_error", "max_tokens: Field required"),
        );
        assert_eq!(f.kind, FailureKind::BadRequest);
        assert!(!f.kind.is_retryable());
        assert_eq!(
            classify(
                401,
                None,
                &error("authentication_error", "invalid x-api-key")
            )
            .kind,
            FailureKind::Unauthorized
        );
        assert_eq!(
            classify(403, None, &error("permission_error", "no access")).kind,
            FailureKind::Unauthorized
        );
        assert_eq!(
            classify(404, None, &error("not_found_error", "model: claude-x")).kind,
            FailureKind::BadRequest
        );
        assert_eq!(
            classify(
                413,
                None,
                &error(
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes"
                )
            )
            .kind,
            FailureKind::BadRequest
        );
        assert_eq!(
            classify(500, None, &error("api_error", "Internal server error")).kind,
            FailureKind::Server
        );
        // A body from something in front of Anthropic: the status decides.
        assert_eq!(
            classify(502, None, "<html>Bad Gateway</html>").kind,
            FailureKind::Server
        );
    }

    #[test]
    fn a_stream_becomes_openai_chunks_with_usage() {
        let mut mapper = ChunkTranslator::new(true, 1_700_000_000);
        let mut kinds = Vec::new();
        let mut sent = Vec::new();
        let mut usages = Vec::new();
        for event in events(STREAM) {
            let mapped = mapper.map(event);
            kinds.push(mapped.kind);
            usages.extend(mapped.usage);
            sent.extend(outputs(mapped.out));
        }
        use EventKind::{Content, Done, KeepAlive, Preamble};
        assert_eq!(
            kinds,
            vec![
                Preamble, Preamble, KeepAlive, Content, Content, Preamble, Preamble, Content,
                Content, Preamble, Content, Preamble, Content, Content, Preamble, Content, Done
            ]
        );
        let tool = |delta: Value| chunk(json!({"tool_calls": [delta]}), Value::Null);
        assert_eq!(
            client_view(&sent),
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                json!(": ping"),
                chunk(
                    json!({"reasoning": "The user wants the weather.", "reasoning_details": [
                        {"type": "reasoning.text", "text": "The user wants the weather.",
                         "format": "anthropic-claude-v1", "index": 0}]}),
                    Value::Null
                ),
                chunk(
                    json!({"reasoning_details": [{"type": "reasoning.text", "text": "",
                        "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds",
                        "format": "anthropic-claude-v1", "index": 0}]}),
                    Value::Null
                ),
                chunk(json!({"content": "Let me check"}), Value::Null),
                chunk(json!({"content": " the weather."}), Value::Null),
                tool(
                    json!({"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}})
                ),
                tool(json!({"index": 0, "function": {"arguments": "{\"location\": \"San Fra"}})),
                tool(json!({"index": 0, "function": {"arguments": "ncisco, CA\"}"}})),
                chunk(json!({}), json!("tool_calls")),
                json!({
                    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "object": "chat.completion.chunk", "created": 1700000000,
                    "model": "claude-sonnet-4-5-20250929", "choices": [],
                    "usage": {"prompt_tokens": 572, "completion_tokens": 89, "total_tokens": 661,
                              "prompt_tokens_details": {"cached_tokens": 100}},
                }),
                json!("[DONE]"),
            ]
        );
        // The start reports the prompt (so a cut stream is still billed), the delta the whole.
        let expected = |completion| Usage {
            prompt_tokens: 572,
            completion_tokens: completion,
            cached_tokens: Some(100),
            cache_write_tokens: Some(0),
            cache_write_1h_tokens: None,
            reasoning_tokens: None,
            cost_nanos: None,
        };
        assert_eq!(usages, vec![expected(2), expected(89)]);
        assert!(mapper.is_complete());
        assert_eq!(mapper.served_model(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(&sent.last().unwrap()[..], DONE);
    }

    #[test]
    fn the_usage_chunk_is_sent_only_when_the_client_asked() {
        let mut mapper = ChunkTranslator::new(false, 1_700_000_000);
        let sent: Vec<Bytes> = events(STREAM)
            .into_iter()
            .flat_map(|e| outputs(mapper.map(e).out))
            .collect();
        let view = client_view(&sent);
        assert!(view.iter().all(|v| v.get("usage").is_none()), "{view:?}");
        assert_eq!(view[view.len() - 2], chunk(json!({}), json!("tool_calls")));
    }

    #[test]
    fn a_stream_without_its_end_is_not_complete() {
        let mut mapper = ChunkTranslator::new(true, 0);
        let cut = STREAM.split("event: message_delta").next().unwrap();
        for event in events(cut) {
            mapper.map(event);
        }
        assert!(!mapper.is_complete());
    }

    #[test]
    fn a_midstream_error_fails_with_an_openai_error_event() {
        let transcript = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
            "event: error\n",
            "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        let mut mapper = ChunkTranslator::new(false, 0);
        let last = events(transcript)
            .into_iter()
            .map(|e| mapper.map(e))
            .last()
            .unwrap();
        let EventKind::Failed(failure) = last.kind else {
            panic!("expected a failure, got {:?}", last.kind);
        };
        assert_eq!((failure.kind, failure.status), (FailureKind::Server, 529));
        assert_eq!(
            client_view(&outputs(last.out)),
            vec![
                json!({"error": {"message": "Overloaded", "type": "overloaded_error", "code": 529}})
            ]
        );
        assert!(!mapper.is_complete());
    }

    #[test]
    fn passed_through_streams_are_relayed_unchanged_and_classified() {
        let mut mapper = backend().messages_stream_mapper();
        let mut kinds = Vec::new();
        let mut usage = None;
        for event in events(STREAM) {
            let raw = event.raw().clone();
            let mapped = mapper.map(event);
            match mapped.out {
                Output::One(out) => assert_eq!(out, raw),
                other => panic!("pass-through relays each event as it is, got {other:?}"),
            }
            kinds.push(mapped.kind);
            usage = mapped.usage.or(usage);
        }
        use EventKind::{Content, Done, KeepAlive, Preamble};
        assert_eq!(
            kinds,
            vec![
                Preamble, Preamble, KeepAlive, Content, Content, Content, Content, Content,
                Content, Content, Content, Content, Content, Content, Content, Content, Done
            ]
        );
        assert_eq!(
            usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((572, 89))
        );
        assert!(mapper.is_complete());
        assert_eq!(mapper.served_model(), Some("claude-sonnet-4-5-20250929"));

        let mut mapper = backend().messages_stream_mapper();
        let error = mapper.map(SseEvent::new(Bytes::from_static(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow down\"}}\n\n",
        )));
        assert!(matches!(error.kind, EventKind::Failed(f) if f.kind == FailureKind::RateLimited));
        let junk = mapper.map(SseEvent::new(Bytes::from_static(b"data: {nope\n\n")));
        assert_eq!(junk.kind, EventKind::Unknown);
    }

    #[test]
    fn the_plugin_is_registered() {
        let plugin = crate::build(KIND, &crate::Settings::default()).unwrap();
        assert_eq!(plugin.kind(), KIND);
        assert!(plugin.speaks_messages());
        assert!(crate::KINDS.contains(&KIND));
        assert_eq!(crate::default_key_env(KIND), Some("ANTHROPIC_API_KEY"));
        assert!(crate::requires_key(KIND));
    }
}
