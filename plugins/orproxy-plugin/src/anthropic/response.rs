//! Chat completion (non-stream) → Messages response.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{
    ANTHROPIC_REASONING_FORMAT, AnswerContext, Finish, TranslateError, claude_signs,
    usage_to_anthropic,
};
use crate::usage::Usage;

/// An OpenAI chat-completion (non-stream) body → an Anthropic Messages response body, naming
/// the model the upstream says served (else `context.model`).
pub fn response_from_openai(body: &[u8], context: &AnswerContext) -> Result<Bytes, TranslateError> {
    let completion: Completion = serde_json::from_slice(body)
        .map_err(|e| TranslateError::Upstream(format!("unreadable JSON: {e}")))?;
    let id = message_id(completion.id.as_deref());
    let Some(choice) = completion
        .choices
        .into_iter()
        .min_by_key(|choice| choice.index.unwrap_or(0))
    else {
        return Err(TranslateError::Upstream(match completion.error {
            Some(error) => format!("the upstream reported an error: {error}"),
            None => "no choices".to_owned(),
        }));
    };
    let message = choice.message.unwrap_or_default();
    let called_tools = message.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
    let (content, refused) = blocks(message, &id);
    let finish = Finish {
        reason: choice.finish_reason,
        native: choice.native_finish_reason,
        matched: choice
            .stop_reason
            .and_then(|v| v.as_str().map(str::to_owned)),
    };
    let (mut stop_reason, stop_sequence) =
        finish.to_anthropic(called_tools, context.stop_sequence.as_deref());
    if refused {
        stop_reason = "refusal";
    }
    let usage = completion
        .usage
        .as_deref()
        .and_then(Usage::from_openai_json)
        .unwrap_or_default();
    let out = MessageOut {
        id,
        kind: "message",
        role: "assistant",
        model: completion
            .model
            .as_deref()
            .filter(|model| !model.is_empty())
            .unwrap_or(&context.model),
        content,
        stop_reason,
        stop_sequence,
        usage: usage_to_anthropic(&usage),
    };
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|e| TranslateError::Upstream(e.to_string()))
}

/// The message's reasoning, text (or refusal) and tool calls, in Anthropic's order; true when
/// the text is OpenAI's `refusal`.
fn blocks(message: Message, message_id: &str) -> (Vec<Block>, bool) {
    let mut content = thinking_blocks(message.reasoning_details.unwrap_or_default());
    if !content
        .iter()
        .any(|block| matches!(block, Block::Thinking { .. }))
        && let Some(thinking) = message
            .reasoning
            .or(message.reasoning_content)
            .filter(|text| !text.is_empty())
    {
        content.insert(
            0,
            Block::Thinking {
                thinking,
                signature: String::new(),
            },
        );
    }
    let text = message.content.as_ref().map(text_of).unwrap_or_default();
    let refusal = message.refusal.filter(|text| !text.is_empty());
    let refused = text.is_empty() && refusal.is_some();
    if let Some(text) = Some(text).filter(|text| !text.is_empty()).or(refusal) {
        content.push(Block::Text { text });
    }
    for (i, call) in message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let function = call.function.unwrap_or_default();
        content.push(Block::ToolUse {
            id: call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("toolu_{}_{i}", message_id.trim_start_matches("msg_"))),
            name: function.name.unwrap_or_default(),
            input: arguments_object(function.arguments),
        });
    }
    (content, refused)
}

/// OpenRouter's `reasoning_details` → thinking blocks: texts with their signatures (pieces of
/// one block, sharing an `index`, joined), summaries, and Anthropic's redacted thinking. Other
/// providers' encrypted reasoning has no Messages form and is left out.
fn thinking_blocks(details: Vec<ReasoningDetail>) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    // The index of the last block when it is thinking that later pieces may continue.
    let mut open = None;
    for detail in details {
        match detail.kind.as_str() {
            "reasoning.text" | "reasoning.summary" => {
                let text = detail.text.or(detail.summary).unwrap_or_default();
                let signature = (detail.signature)
                    .filter(|_| claude_signs(detail.format.as_deref()))
                    .unwrap_or_default();
                let continued = detail.index.is_some() && detail.index == open;
                match blocks.last_mut() {
                    Some(Block::Thinking {
                        thinking,
                        signature: signed,
                    }) if continued => {
                        thinking.push_str(&text);
                        if !signature.is_empty() {
                            *signed = signature;
                        }
                    }
                    _ if text.is_empty() && signature.is_empty() => continue,
                    _ => blocks.push(Block::Thinking {
                        thinking: text,
                        signature,
                    }),
                }
                open = detail.index;
            }
            "reasoning.encrypted"
                if detail.format.as_deref() == Some(ANTHROPIC_REASONING_FORMAT) =>
            {
                if let Some(data) = detail.data.filter(|data| !data.is_empty()) {
                    blocks.push(Block::RedactedThinking { data });
                    open = None;
                }
            }
            _ => {}
        }
    }
    blocks
}

/// `msg_` + the upstream id, unless it already is a Messages id.
pub(super) fn message_id(upstream: Option<&str>) -> String {
    match upstream {
        Some(id) if id.starts_with("msg_") => id.to_owned(),
        Some(id) if !id.is_empty() => format!("msg_{id}"),
        _ => "msg_orproxy".to_owned(),
    }
}

/// Tool arguments (a JSON string, or an object from lenient backends) → the `input` object;
/// `{}` when they do not parse to one, since Anthropic's `input` is always an object.
pub(super) fn arguments_object(arguments: Option<Value>) -> Value {
    let parsed = match arguments {
        Some(Value::String(text)) => serde_json::from_str(&text).ok(),
        other => other,
    };
    match parsed {
        Some(object @ Value::Object(_)) => object,
        _ => Value::Object(Map::new()),
    }
}

/// `message.content`: a string, or (from some backends) a list of text parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    native_finish_reason: Option<String>,
    /// vLLM: the stop string that matched (or a token id, which is of no use here).
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize, Default)]
struct Message {
    #[serde(default)]
    content: Option<Value>,
    /// OpenRouter's reasoning text.
    #[serde(default)]
    reasoning: Option<String>,
    /// DeepSeek's and vLLM's name for it.
    #[serde(default)]
    reasoning_content: Option<String>,
    /// OpenRouter's structured reasoning: signed thinking and redacted thinking.
    #[serde(default)]
    reasoning_details: Option<Vec<ReasoningDetail>>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

/// One entry of `reasoning_details` (`OPENROUTER.md` §4).
#[derive(Deserialize)]
struct ReasoningDetail {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    index: Option<u64>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block>,
    stop_reason: &'static str,
    stop_sequence: Option<String>,
    usage: Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Thinking {
        thinking: String,
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}
