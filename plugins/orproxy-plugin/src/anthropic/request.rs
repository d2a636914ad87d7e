//! Messages request → chat-completions request, and the rough token count of a request.

use serde::Serialize;
use serde_json::{Map, Value};

use super::{ANTHROPIC_REASONING_FORMAT, TranslateError};
use crate::body::JsonObject;

/// An Anthropic Messages request body → the equivalent OpenAI chat-completions body.
///
/// Fields with no OpenAI meaning (`service_tier`, `container`, ...) are dropped; anything that
/// would change the answer and cannot be expressed (server tools, file sources) is an error.
pub fn request_to_openai(body: &[u8]) -> Result<JsonObject, TranslateError> {
    let request = parse_object(body)?;
    let mut out = JsonObject::default();
    match request.get("model") {
        Some(model @ Value::String(_)) => out.set("model", model),
        Some(_) => return Err(invalid("model", "must be a string")),
        None => return Err(invalid("model", "required")),
    }
    out.set("messages", &messages(&request)?);
    sampling(&request, &mut out)?;
    tools(&request, &mut out)?;
    reasoning(&request, &mut out)?;
    output_format(&request, &mut out)?;
    if let Some(stream) = present(&request, "stream") {
        let stream = stream
            .as_bool()
            .ok_or_else(|| invalid("stream", "must be a boolean"))?;
        out.set("stream", &stream);
        if stream {
            // Without it OpenAI streams carry no usage, and the client's bill would read zero.
            out.set(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            );
        }
    }
    Ok(out)
}

/// A rough input-token count for `POST /v1/messages/count_tokens`: one token per 4 bytes of
/// JSON over `system`, `messages` and `tools`, except that a base64 image counts as 1,600
/// tokens (its bytes say little about its cost, and would overstate it a hundredfold).
pub fn count_tokens_estimate(body: &[u8]) -> Result<u64, TranslateError> {
    let mut request = parse_object(body)?;
    if !request.get("messages").is_some_and(Value::is_array) {
        return Err(invalid("messages", "required, an array of messages"));
    }
    let mut images = 0;
    let mut counter = ByteCounter(0);
    for key in ["system", "messages", "tools"] {
        if let Some(value) = request.get_mut(key) {
            images += strip_base64_images(value);
            // Writing into a counter cannot fail.
            let _ = serde_json::to_writer(&mut counter, value);
        }
    }
    Ok(counter.0.div_ceil(4) + images * IMAGE_TOKENS)
}

/// What one image costs at most: Anthropic bills about width × height / 750 tokens and
/// downsizes anything above about 1.15 megapixels.
const IMAGE_TOKENS: u64 = 1_600;

/// Block types that exist in the Messages API but only make sense with Anthropic's own servers.
const SERVER_BLOCKS: &[&str] = &[
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
    "container_upload",
];

/// One OpenAI chat message.
#[derive(Serialize)]
struct OutMessage {
    role: &'static str,
    /// `null` only for an assistant message that just calls tools.
    content: Option<Content>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    /// An assistant turn's signed thinking, in OpenRouter's form, for the Anthropic model that
    /// wrote it to read back (it requires it between tool calls).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasoning_details: Vec<Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text {
        text: String,
        /// Kept for OpenRouter, which forwards it to providers with prompt caching.
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<Value>,
    },
    ImageUrl {
        image_url: Url,
    },
    File {
        file: FileData,
    },
}

#[derive(Serialize)]
struct Url {
    url: String,
}

#[derive(Serialize)]
struct FileData {
    filename: String,
    file_data: String,
}

#[derive(Serialize)]
struct ToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall,
}

#[derive(Serialize)]
struct FunctionCall {
    name: String,
    arguments: String,
}

#[derive(Serialize)]
struct Tool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Serialize)]
struct Function<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

/// Counts the bytes written through it.
struct ByteCounter(u64);

// === impl OutMessage ===

impl OutMessage {
    fn new(role: &'static str, content: Option<Content>) -> OutMessage {
        OutMessage {
            role,
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning_details: Vec::new(),
        }
    }
}

// === impl ByteCounter ===

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === messages ===

fn messages(request: &Map<String, Value>) -> Result<Vec<OutMessage>, TranslateError> {
    let list = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages", "required, an array of messages"))?;
    let mut out = Vec::with_capacity(list.len() + 1);
    if let Some(system) = present(request, "system") {
        out.extend(system_message(system)?);
    }
    let tool_loop = tool_loop_start(request, list);
    for (i, message) in list.iter().enumerate() {
        let keep_thinking = tool_loop.is_some_and(|start| i >= start);
        translate_message(message, &format!("messages[{i}]"), keep_thinking, &mut out)?;
    }
    Ok(out)
}

/// Where the tool loop the request continues begins, when thinking is on: the messages after
/// the last user turn that answers no tool call. Anthropic requires the signed thinking of that
/// loop's assistant turns back, and only of those; earlier thinking, perhaps signed by another
/// provider, stays out, as does all of it when thinking is off (Anthropic refuses it then).
fn tool_loop_start(request: &Map<String, Value>, messages: &[Value]) -> Option<usize> {
    let kind = request.get("thinking").and_then(|t| t.get("type"));
    if !matches!(kind.and_then(Value::as_str), Some("enabled" | "adaptive")) {
        return None;
    }
    let answers_tools = |message: &Value| {
        message["content"]
            .as_array()
            .is_some_and(|blocks| blocks.iter().any(|b| b["type"] == "tool_result"))
    };
    let start = messages
        .iter()
        .rposition(|m| m["role"] == "user" && !answers_tools(m))
        .map_or(0, |i| i + 1);
    Some(start)
}

/// `system` → a first `system` message; `None` when it is empty.
fn system_message(system: &Value) -> Result<Option<OutMessage>, TranslateError> {
    let content = match system {
        Value::String(text) => Content::Text(text.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.iter().enumerate() {
                let path = format!("system[{i}]");
                let block = as_object(block, &path)?;
                match block_type(block, &path)? {
                    "text" => parts.push(text_part(block, &path)?),
                    other => {
                        let message = format!("must be a text block, not `{other}`");
                        return Err(invalid(path, message));
                    }
                }
            }
            collapse(parts)
        }
        _ => {
            let message = "must be a string or an array of text blocks";
            return Err(invalid("system", message));
        }
    };
    let empty = matches!(&content, Content::Text(text) if text.is_empty());
    Ok((!empty).then(|| OutMessage::new("system", Some(content))))
}

fn translate_message(
    message: &Value,
    path: &str,
    keep_thinking: bool,
    out: &mut Vec<OutMessage>,
) -> Result<(), TranslateError> {
    let message = as_object(message, path)?;
    let role = match str_field(message, "role", path)? {
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(invalid(
                format!("{path}.role"),
                format!("must be `user` or `assistant`, not `{other}`"),
            ));
        }
    };
    match message.get("content") {
        Some(Value::String(text)) => {
            // An empty assistant turn says nothing; OpenAI backends may reject it.
            if role == "user" || !text.is_empty() {
                out.push(OutMessage::new(role, Some(Content::Text(text.clone()))));
            }
            Ok(())
        }
        Some(Value::Array(blocks)) if role == "user" => user_message(blocks, path, out),
        Some(Value::Array(blocks)) => assistant_message(blocks, path, keep_thinking, out),
        Some(_) => Err(invalid(
            format!("{path}.content"),
            "must be a string or an array of content blocks",
        )),
        None => Err(invalid(format!("{path}.content"), "required")),
    }
}

fn user_message(
    blocks: &[Value],
    path: &str,
    out: &mut Vec<OutMessage>,
) -> Result<(), TranslateError> {
    let mut parts = Vec::with_capacity(blocks.len());
    let mut results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        let block = as_object(block, &path)?;
        match block_type(block, &path)? {
            "text" => parts.push(text_part(block, &path)?),
            "image" => parts.push(image_part(block, &path)?),
            "document" => parts.push(document_part(block, &path)?),
            // OpenAI wants each tool answer as its own message right after the assistant's calls,
            // so they go before whatever else the user said.
            "tool_result" => results.push(tool_message(block, &path, &mut parts)?),
            "thinking" | "redacted_thinking" => {}
            other => return Err(misplaced(other, "user", path)),
        }
    }
    let answered_tools = !results.is_empty();
    out.append(&mut results);
    if !parts.is_empty() || !answered_tools {
        out.push(OutMessage::new("user", Some(collapse(parts))));
    }
    Ok(())
}

fn assistant_message(
    blocks: &[Value],
    path: &str,
    keep_thinking: bool,
    out: &mut Vec<OutMessage>,
) -> Result<(), TranslateError> {
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    let mut reasoning = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        let block = as_object(block, &path)?;
        match block_type(block, &path)? {
            "text" => parts.push(text_part(block, &path)?),
            "tool_use" => calls.push(ToolCall {
                id: str_field(block, "id", &path)?.to_owned(),
                kind: "function",
                function: FunctionCall {
                    name: str_field(block, "name", &path)?.to_owned(),
                    arguments: present(block, "input")
                        .map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            }),
            "thinking" | "redacted_thinking" if keep_thinking => {
                reasoning.extend(reasoning_detail(block, reasoning.len()));
            }
            "thinking" | "redacted_thinking" => {}
            other => return Err(misplaced(other, "assistant", path)),
        }
    }
    if parts.is_empty() && calls.is_empty() {
        return Ok(());
    }
    let mut message = OutMessage::new("assistant", (!parts.is_empty()).then(|| collapse(parts)));
    message.tool_calls = calls;
    message.reasoning_details = reasoning;
    out.push(message);
    Ok(())
}

/// A signed `thinking` or a `redacted_thinking` block → an entry of OpenRouter's
/// `reasoning_details`, which OpenRouter hands back to Anthropic as the block it was; `None` for
/// thinking without a signature (from another provider) or a block missing its text or data,
/// which Anthropic would refuse.
fn reasoning_detail(block: &Map<String, Value>, index: usize) -> Option<Value> {
    let text = |key: &str| block.get(key).and_then(Value::as_str);
    if text("type") == Some("redacted_thinking") {
        return Some(serde_json::json!({
            "type": "reasoning.encrypted",
            "data": text("data")?,
            "format": ANTHROPIC_REASONING_FORMAT,
            "index": index,
        }));
    }
    let signature = text("signature").filter(|s| !s.is_empty())?;
    Some(serde_json::json!({
        "type": "reasoning.text",
        "text": text("thinking")?,
        "signature": signature,
        "format": ANTHROPIC_REASONING_FORMAT,
        "index": index,
    }))
}

/// A `tool_result` block → a `tool` message. Its images and documents cannot ride in a tool
/// message, so they are appended to `spill`, the user message that follows.
fn tool_message(
    block: &Map<String, Value>,
    path: &str,
    spill: &mut Vec<Part>,
) -> Result<OutMessage, TranslateError> {
    let id = str_field(block, "tool_use_id", path)?.to_owned();
    let mut texts = Vec::new();
    match present(block, "content") {
        None => {}
        Some(Value::String(text)) => texts.push(Part::Text {
            text: text.clone(),
            cache_control: None,
        }),
        Some(Value::Array(items)) => {
            for (k, item) in items.iter().enumerate() {
                let path = format!("{path}.content[{k}]");
                let item = as_object(item, &path)?;
                match block_type(item, &path)? {
                    "text" => texts.push(text_part(item, &path)?),
                    "image" => spill.push(image_part(item, &path)?),
                    "document" => spill.push(document_part(item, &path)?),
                    other => return Err(misplaced(other, "tool_result", path)),
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                format!("{path}.content"),
                "must be a string or an array of content blocks",
            ));
        }
    }
    // Agents put their cache breakpoint on the latest tool result: keep it where OpenRouter looks.
    if let Some(cache) = present(block, "cache_control")
        && let Some(Part::Text { cache_control, .. }) = texts.last_mut()
    {
        *cache_control = Some(cache.clone());
    }
    let mut message = OutMessage::new("tool", Some(collapse(texts)));
    message.tool_call_id = Some(id);
    Ok(message)
}

/// Parts → the simplest content that says the same: plain text parts become one string (every
/// backend takes a string), anything richer stays a list of parts.
fn collapse(parts: Vec<Part>) -> Content {
    let plain = parts.iter().all(|part| {
        matches!(
            part,
            Part::Text {
                cache_control: None,
                ..
            }
        )
    });
    if !plain {
        return Content::Parts(parts);
    }
    let texts: Vec<String> = parts
        .into_iter()
        .filter_map(|part| match part {
            Part::Text { text, .. } => Some(text),
            _ => None,
        })
        .collect();
    Content::Text(texts.join("\n"))
}

fn text_part(block: &Map<String, Value>, path: &str) -> Result<Part, TranslateError> {
    Ok(Part::Text {
        text: str_field(block, "text", path)?.to_owned(),
        cache_control: present(block, "cache_control").cloned(),
    })
}

/// A base64 `source` as the `data:` URL OpenAI-style parts carry.
fn data_url(source: &Map<String, Value>, path: &str) -> Result<String, TranslateError> {
    Ok(format!(
        "data:{};base64,{}",
        str_field(source, "media_type", path)?,
        str_field(source, "data", path)?
    ))
}

fn image_part(block: &Map<String, Value>, path: &str) -> Result<Part, TranslateError> {
    let path = format!("{path}.source");
    let source = as_object(block.get("source").unwrap_or(&Value::Null), &path)?;
    let url = match str_field(source, "type", &path)? {
        "base64" => data_url(source, &path)?,
        "url" => str_field(source, "url", &path)?.to_owned(),
        other => return Err(unsupported_source(other, &path)),
    };
    Ok(Part::ImageUrl {
        image_url: Url { url },
    })
}

fn document_part(block: &Map<String, Value>, path: &str) -> Result<Part, TranslateError> {
    let filename = present(block, "title")
        .and_then(Value::as_str)
        .unwrap_or("document.pdf")
        .to_owned();
    let path = format!("{path}.source");
    let source = as_object(block.get("source").unwrap_or(&Value::Null), &path)?;
    let file_data = match str_field(source, "type", &path)? {
        "text" => {
            return Ok(Part::Text {
                text: str_field(source, "data", &path)?.to_owned(),
                cache_control: None,
            });
        }
        "base64" => data_url(source, &path)?,
        // OpenRouter fetches PDF URLs given as file data.
        "url" => str_field(source, "url", &path)?.to_owned(),
        other => return Err(unsupported_source(other, &path)),
    };
    Ok(Part::File {
        file: FileData {
            filename,
            file_data,
        },
    })
}

fn unsupported_source(kind: &str, path: &str) -> TranslateError {
    let path = format!("{path}.type");
    match kind {
        "file" => invalid(
            path,
            "`file` sources live in Anthropic's Files API and cannot be sent to this backend",
        ),
        other => invalid(path, format!("unsupported source type `{other}`")),
    }
}

/// The error for a block type that does not belong in `container`, or that is not known at all.
fn misplaced(kind: &str, container: &str, path: String) -> TranslateError {
    let message = match kind {
        "text" | "image" | "document" | "tool_use" | "tool_result" | "thinking"
        | "redacted_thinking" => format!("`{kind}` blocks are not allowed in {container} content"),
        _ if SERVER_BLOCKS.contains(&kind) => {
            format!("block type `{kind}` needs Anthropic's servers and has no OpenAI equivalent")
        }
        _ => format!("unknown block type `{kind}`"),
    };
    invalid(path, message)
}

// === other fields ===

/// `max_tokens`, `stop_sequences`, sampling parameters and `metadata.user_id`.
fn sampling(request: &Map<String, Value>, out: &mut JsonObject) -> Result<(), TranslateError> {
    // Required by Anthropic, but count_tokens bodies come without it and OpenAI does not need it.
    if let Some(max) = present(request, "max_tokens") {
        let max = max
            .as_u64()
            .ok_or_else(|| invalid("max_tokens", "must be a non-negative integer"))?;
        out.set("max_tokens", &max);
    }
    if let Some(stops) = present(request, "stop_sequences") {
        let stops = stops
            .as_array()
            .filter(|list| list.iter().all(Value::is_string))
            .ok_or_else(|| invalid("stop_sequences", "must be an array of strings"))?;
        if !stops.is_empty() {
            out.set("stop", stops);
        }
    }
    for key in ["temperature", "top_p", "top_k"] {
        if let Some(value) = present(request, key) {
            if !value.is_number() {
                return Err(invalid(key, "must be a number"));
            }
            out.set(key, value);
        }
    }
    if let Some(metadata) = present(request, "metadata") {
        let metadata = as_object(metadata, "metadata")?;
        match present(metadata, "user_id") {
            None => {}
            Some(user @ Value::String(_)) => out.set("user", user),
            Some(_) => return Err(invalid("metadata.user_id", "must be a string")),
        }
    }
    Ok(())
}

/// `tools` (custom tools only), then `tool_choice`.
fn tools(request: &Map<String, Value>, out: &mut JsonObject) -> Result<(), TranslateError> {
    if let Some(tools) = present(request, "tools") {
        let list = tools
            .as_array()
            .ok_or_else(|| invalid("tools", "must be an array"))?;
        let mut translated = Vec::with_capacity(list.len());
        for (i, tool) in list.iter().enumerate() {
            let path = format!("tools[{i}]");
            let tool = as_object(tool, &path)?;
            match present(tool, "type") {
                None => {}
                Some(Value::String(kind)) if kind == "custom" => {}
                Some(Value::String(kind)) => {
                    return Err(invalid(
                        path,
                        format!(
                            "tool type `{kind}` is defined by Anthropic (a server tool such as web search, or a client tool whose schema only Claude knows, such as bash or the text editor) and has no OpenAI equivalent; route it to an `anthropic` backend"
                        ),
                    ));
                }
                Some(_) => return Err(invalid(format!("{path}.type"), "must be a string")),
            }
            let parameters = tool
                .get("input_schema")
                .filter(|schema| schema.is_object())
                .ok_or_else(|| {
                    invalid(
                        format!("{path}.input_schema"),
                        "required, a JSON schema object",
                    )
                })?;
            let strict = match present(tool, "strict") {
                None => None,
                Some(Value::Bool(strict)) => Some(*strict),
                Some(_) => return Err(invalid(format!("{path}.strict"), "must be a boolean")),
            };
            translated.push(Tool {
                kind: "function",
                function: Function {
                    name: str_field(tool, "name", &path)?,
                    description: present(tool, "description").and_then(Value::as_str),
                    parameters,
                    strict,
                },
            });
        }
        if !translated.is_empty() {
            out.set("tools", &translated);
        }
    }
    tool_choice(request, out)
}

/// `tool_choice`, and `disable_parallel_tool_use` inside it.
fn tool_choice(request: &Map<String, Value>, out: &mut JsonObject) -> Result<(), TranslateError> {
    let Some(choice) = present(request, "tool_choice") else {
        return Ok(());
    };
    let choice = as_object(choice, "tool_choice")?;
    let translated = match str_field(choice, "type", "tool_choice")? {
        "auto" => Value::from("auto"),
        "any" => Value::from("required"),
        "none" => Value::from("none"),
        "tool" => serde_json::json!({
            "type": "function",
            "function": {"name": str_field(choice, "name", "tool_choice")?},
        }),
        other => {
            return Err(invalid(
                "tool_choice.type",
                format!("unknown tool choice `{other}`"),
            ));
        }
    };
    out.set("tool_choice", &translated);
    if present(choice, "disable_parallel_tool_use") == Some(&Value::Bool(true)) {
        out.set("parallel_tool_calls", &false);
    }
    Ok(())
}

/// `thinking` → OpenRouter's `reasoning`.
fn reasoning(request: &Map<String, Value>, out: &mut JsonObject) -> Result<(), TranslateError> {
    let Some(thinking) = present(request, "thinking") else {
        return Ok(());
    };
    let thinking = as_object(thinking, "thinking")?;
    let reasoning = match str_field(thinking, "type", "thinking")? {
        "enabled" => {
            let budget = present(thinking, "budget_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    invalid("thinking.budget_tokens", "required, a non-negative integer")
                })?;
            serde_json::json!({"max_tokens": budget})
        }
        // Adaptive thinking takes its depth from `output_config.effort`; OpenRouter's efforts
        // stop at `xhigh`.
        "adaptive" => match request
            .get("output_config")
            .and_then(|config| config.get("effort"))
            .and_then(Value::as_str)
        {
            Some("max") => serde_json::json!({"effort": "xhigh"}),
            Some(effort) => serde_json::json!({"effort": effort}),
            None => serde_json::json!({"enabled": true}),
        },
        "disabled" => return Ok(()),
        other => {
            return Err(invalid(
                "thinking.type",
                format!("unknown thinking type `{other}`"),
            ));
        }
    };
    out.set("reasoning", &reasoning);
    Ok(())
}

/// `output_config.format`, or the top-level `output_format` of the structured-outputs beta,
/// → `response_format`; any other `output_config` field but `effort` (read by [`reasoning`]) is
/// refused, since dropping it would change the answer unseen.
fn output_format(request: &Map<String, Value>, out: &mut JsonObject) -> Result<(), TranslateError> {
    let config = match present(request, "output_config") {
        Some(config) => Some(as_object(config, "output_config")?),
        None => None,
    };
    if let Some(key) = config
        .into_iter()
        .flat_map(Map::keys)
        .find(|key| !matches!(key.as_str(), "effort" | "format"))
    {
        let message = "has no OpenAI equivalent";
        return Err(invalid(format!("output_config.{key}"), message));
    }
    let nested = config.and_then(|config| present(config, "format"));
    let (format, path) = match (nested, present(request, "output_format")) {
        (Some(_), Some(_)) => {
            let message = "give either this or `output_config.format`, not both";
            return Err(invalid("output_format", message));
        }
        (Some(format), None) => (format, "output_config.format"),
        (None, Some(format)) => (format, "output_format"),
        (None, None) => return Ok(()),
    };
    let format = as_object(format, path)?;
    match str_field(format, "type", path)? {
        "json_schema" => {}
        other => {
            let message = format!("unsupported format `{other}`, only `json_schema` translates");
            return Err(invalid(format!("{path}.type"), message));
        }
    }
    let schema = format
        .get("schema")
        .filter(|schema| schema.is_object())
        .ok_or_else(|| invalid(format!("{path}.schema"), "required, a JSON schema object"))?;
    out.set(
        "response_format",
        &serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": schema_name(schema), "schema": schema, "strict": true},
        }),
    );
    Ok(())
}

/// OpenAI requires a schema name (`[a-zA-Z0-9_-]{1,64}`) where Anthropic has none: the schema's
/// `title` (Pydantic's model name) when it fits, else a fixed one.
fn schema_name(schema: &Value) -> &str {
    schema
        .get("title")
        .and_then(Value::as_str)
        .filter(|title| {
            (1..=64).contains(&title.len())
                && title
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .unwrap_or("output")
}

// === helpers ===

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, TranslateError> {
    match serde_json::from_slice(body).map_err(TranslateError::Json)? {
        Value::Object(object) => Ok(object),
        _ => Err(invalid("body", "must be a JSON object")),
    }
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> TranslateError {
    TranslateError::Field {
        path: path.into(),
        message: message.into(),
    }
}

/// A field that is there and not `null` (clients send `null` for "not set").
fn present<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

fn as_object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, TranslateError> {
    value
        .as_object()
        .ok_or_else(|| invalid(path, "must be an object"))
}

fn str_field<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, TranslateError> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text),
        Some(Value::Null) | None => Err(invalid(format!("{path}.{key}"), "required")),
        Some(_) => Err(invalid(format!("{path}.{key}"), "must be a string")),
    }
}

fn block_type<'a>(block: &'a Map<String, Value>, path: &str) -> Result<&'a str, TranslateError> {
    str_field(block, "type", path)
}

/// Empties the `data` of base64 image sources under `value`; returns how many there were.
fn strip_base64_images(value: &mut Value) -> u64 {
    match value {
        Value::Array(items) => items.iter_mut().map(strip_base64_images).sum(),
        Value::Object(object) => {
            if object.get("type").and_then(Value::as_str) == Some("image")
                && let Some(Value::Object(source)) = object.get_mut("source")
                && source.get("type").and_then(Value::as_str) == Some("base64")
                && let Some(data) = source.get_mut("data")
            {
                *data = Value::Null;
                return 1;
            }
            object.values_mut().map(strip_base64_images).sum()
        }
        _ => 0,
    }
}
