//! Chat-completion chunks → Messages stream events.
//!
//! # Block order
//!
//! Anthropic content blocks never interleave: a block is started, receives deltas, and is
//! stopped before the next one starts, and a stopped block cannot be reopened. OpenAI deltas
//! carry no such promise: any tool call may receive argument pieces until the stream ends,
//! interleaved with other tool calls or with text.
//!
//! So content is kept as *segments* in the order their first piece arrived, and only the front
//! segment is ever open:
//!
//! - a text or thinking segment streams live and is stopped as soon as any later segment exists
//!   (more text after that goes to a new segment, which is a new block);
//! - a tool segment streams live once its name is known, but is stopped only when the stream
//!   ends, because its arguments may still grow; everything behind it is buffered until then.
//!
//! For the usual upstream (text, then tool calls one after the other) this streams the text and
//! the first tool call live, and emits each later tool call whole at the end of the stream.

use std::borrow::Cow;
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{
    ANTHROPIC_REASONING_FORMAT, AnswerContext, Finish, claude_signs, error_event, push_event,
    usage_to_anthropic,
};
use crate::failure::Failure;
use crate::usage::Usage;

/// OpenAI chat-completion chunks → Anthropic stream events; one per stream, stateful.
#[derive(Debug)]
pub struct StreamTranslator {
    message_id: String,
    /// The model named in `message_start`: the upstream's, once its first chunk names it.
    model: String,
    /// The request's single stop sequence, if it had one.
    stop_sequence: Option<String>,
    /// `message_start` was emitted.
    started: bool,
    /// `message_stop` (or `error`) was emitted: everything else is ignored.
    finished: bool,
    /// Content in order of first appearance; only the front one may be open.
    segments: VecDeque<Segment>,
    /// The Anthropic index of the next block to start.
    next_index: u32,
    /// Tool calls seen so far, to name the ones that come without an id.
    tools_seen: u32,
    finish: Finish,
    usage: Option<Usage>,
}

#[derive(Debug)]
struct Segment {
    kind: Kind,
    /// The Anthropic block index, once `content_block_start` was emitted.
    index: Option<u32>,
    /// Text or argument pieces received and not yet emitted (a redacted block's data).
    pending: String,
    /// A thinking block's signature, received and not yet emitted.
    signature: String,
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Text,
    /// Thinking; pieces with another OpenRouter `reasoning_details` index are another block.
    Thinking(Option<u64>),
    /// Anthropic's redacted thinking, whole in its `content_block_start`.
    Redacted,
    Tool(ToolCall),
}

#[derive(Debug, PartialEq, Eq)]
struct ToolCall {
    /// The OpenAI `tool_calls[].index`, when the upstream sent one.
    key: Option<u64>,
    id: String,
    /// False while `id` is one we made up, in case the upstream sends its own later.
    id_given: bool,
    name: Option<String>,
}

// === impl StreamTranslator ===

impl StreamTranslator {
    /// A translator for one stream; `message_id` is like `msg_<...>`.
    pub fn new(message_id: &str, context: &AnswerContext) -> Self {
        StreamTranslator {
            message_id: message_id.to_owned(),
            model: context.model.clone(),
            stop_sequence: context.stop_sequence.clone(),
            started: false,
            finished: false,
            segments: VecDeque::new(),
            next_index: 0,
            tools_seen: 0,
            finish: Finish::default(),
            usage: None,
        }
    }

    /// Feeds the data payload of one OpenAI SSE event (a chunk, or `[DONE]`) and appends the
    /// complete Anthropic events it yields to `out`. Malformed chunks are ignored.
    pub fn push(&mut self, data: &[u8], out: &mut BytesMut) {
        if self.finished {
            return;
        }
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.close(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
            return;
        };
        if let Some(error) = chunk.error {
            let failure = Failure::from_error_object(error);
            out.extend_from_slice(&error_event(failure.status, &failure.message));
            self.finished = true;
            return;
        }
        if let Some(usage) = chunk.usage.and_then(Usage::from_openai_json) {
            self.usage = Some(usage);
        }
        if !self.started
            && let Some(model) = chunk.model.filter(|model| !model.is_empty())
        {
            self.model = model.into_owned();
        }
        self.start(out);
        // Only the first choice is translated: Messages has no `n`.
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index.unwrap_or(0) == 0 {
                self.take_choice(choice);
            }
        }
        self.pump(out);
    }

    /// Ends the stream (the upstream stopped without `[DONE]`, or orproxy stops it): emits
    /// whatever is still buffered, then `message_delta` and `message_stop`, unless finished.
    pub fn finish(&mut self, out: &mut BytesMut) {
        if !self.finished {
            self.close(out);
        }
    }

    /// True once `message_stop` (or an `error` event) has been emitted.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// A `ping` event, to keep an idle stream alive.
    pub fn ping() -> Bytes {
        Bytes::from_static(b"event: ping\ndata: {\"type\":\"ping\"}\n\n")
    }

    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let usage = usage_to_anthropic(&self.usage.clone().unwrap_or_default());
        emit(
            out,
            &Event::MessageStart {
                message: MessageHead {
                    id: &self.message_id,
                    kind: "message",
                    role: "assistant",
                    model: &self.model,
                    content: &[],
                    stop_reason: None,
                    stop_sequence: None,
                    usage,
                },
            },
        );
    }

    fn take_choice(&mut self, choice: ChunkChoice<'_>) {
        if let Some(delta) = choice.delta {
            let details = delta.reasoning_details.unwrap_or_default();
            // OpenRouter sends the text twice, plain and in `reasoning_details`: the latter
            // tells the blocks apart and carries their signatures.
            if !details.iter().any(ReasoningDelta::has_text) {
                let reasoning = delta.reasoning.or(delta.reasoning_content);
                self.add_thinking(None, reasoning.as_deref().unwrap_or_default());
            }
            for detail in details {
                self.add_reasoning(detail);
            }
            self.add_text(Kind::Text, delta.content.as_deref().unwrap_or_default());
            for call in delta.tool_calls.unwrap_or_default() {
                self.add_tool(call);
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.finish.reason = Some(reason.into_owned());
        }
        if let Some(native) = choice.native_finish_reason {
            self.finish.native = Some(native.into_owned());
        }
        if let Some(Value::String(matched)) = choice.stop_reason {
            self.finish.matched = Some(matched);
        }
    }

    fn add_text(&mut self, kind: Kind, piece: &str) {
        if piece.is_empty() {
            return;
        }
        match self.segments.back_mut() {
            Some(last) if last.kind == kind => last.pending.push_str(piece),
            _ => self
                .segments
                .push_back(Segment::new(kind, piece.to_owned())),
        }
    }

    /// One `reasoning_details` entry: thinking text, its signature (which Anthropic sends last
    /// in the block), or redacted thinking. Other providers' encrypted reasoning has no Messages
    /// form and is left out.
    fn add_reasoning(&mut self, detail: ReasoningDelta<'_>) {
        match &*detail.kind {
            "reasoning.text" | "reasoning.summary" => {
                let text = detail.text.as_deref().or(detail.summary.as_deref());
                self.add_thinking(detail.index, text.unwrap_or_default());
                let claude = claude_signs(detail.format.as_deref());
                if let Some(signature) = detail.signature.filter(|s| claude && !s.is_empty()) {
                    self.thinking_segment(detail.index).signature = signature.into_owned();
                }
            }
            "reasoning.encrypted"
                if detail.format.as_deref() == Some(ANTHROPIC_REASONING_FORMAT) =>
            {
                if let Some(data) = detail.data.filter(|data| !data.is_empty()) {
                    self.segments
                        .push_back(Segment::new(Kind::Redacted, data.into_owned()));
                }
            }
            _ => {}
        }
    }

    fn add_thinking(&mut self, key: Option<u64>, piece: &str) {
        if !piece.is_empty() {
            self.thinking_segment(key).pending.push_str(piece);
        }
    }

    /// The thinking segment a piece with OpenRouter's detail `key` belongs to: the last segment
    /// if it is thinking and neither key names another block (plain `reasoning` text has none),
    /// else a new one.
    fn thinking_segment(&mut self, key: Option<u64>) -> &mut Segment {
        let continues = matches!(
            self.segments.back(),
            Some(Segment { kind: Kind::Thinking(last), .. })
                if last.is_none() || key.is_none() || *last == key
        );
        if !continues {
            self.segments
                .push_back(Segment::new(Kind::Thinking(key), String::new()));
        }
        let last = self.segments.len() - 1;
        let segment = &mut self.segments[last];
        if let (Kind::Thinking(last @ None), Some(_)) = (&mut segment.kind, key) {
            *last = key;
        }
        segment
    }

    fn add_tool(&mut self, delta: ToolDelta<'_>) {
        let id = delta.id.filter(|id| !id.is_empty());
        let function = delta.function.unwrap_or_default();
        let at = match self.find_tool(delta.index, id.as_deref()) {
            Some(at) => at,
            None => self.new_tool(delta.index),
        };
        let segment = &mut self.segments[at];
        if let Kind::Tool(call) = &mut segment.kind {
            // Some backends repeat the id and name in every delta: the first ones stand.
            if let Some(id) = id
                && !call.id_given
                && segment.index.is_none()
            {
                call.id = id.into_owned();
                call.id_given = true;
            }
            if call.name.is_none()
                && let Some(name) = function.name.filter(|name| !name.is_empty())
            {
                call.name = Some(name.into_owned());
            }
        }
        segment
            .pending
            .push_str(function.arguments.as_deref().unwrap_or_default());
    }

    /// The segment of the call a delta continues: the latest with its index (or, without one,
    /// with its id, or else the latest call), unless the delta names another id.
    fn find_tool(&self, key: Option<u64>, id: Option<&str>) -> Option<usize> {
        let at = self
            .segments
            .iter()
            .rposition(|segment| match &segment.kind {
                Kind::Tool(call) => match (key, id) {
                    (Some(key), _) => call.key == Some(key),
                    (None, Some(id)) => call.id == id,
                    (None, None) => true,
                },
                _ => false,
            })?;
        // A known index with a different id is a new call (some backends number every call 0).
        match (&self.segments[at].kind, id) {
            (Kind::Tool(call), Some(id)) if call.id_given && call.id != id => None,
            _ => Some(at),
        }
    }

    fn new_tool(&mut self, key: Option<u64>) -> usize {
        self.tools_seen += 1;
        let id = format!(
            "toolu_{}_{}",
            self.message_id.trim_start_matches("msg_"),
            self.tools_seen
        );
        self.segments.push_back(Segment::new(
            Kind::Tool(ToolCall {
                key,
                id,
                id_given: false,
                name: None,
            }),
            String::new(),
        ));
        self.segments.len() - 1
    }

    /// Emits what may be emitted now (see the module doc).
    fn pump(&mut self, out: &mut BytesMut) {
        while let Some(front) = self.segments.front_mut() {
            if front.index.is_none() {
                // A tool cannot be renamed once started: wait for its name.
                if matches!(&front.kind, Kind::Tool(call) if call.name.is_none()) {
                    return;
                }
                front.open(&mut self.next_index, out);
            }
            front.drain(out);
            let more_may_come = matches!(front.kind, Kind::Tool(_)) || self.segments.len() == 1;
            if more_may_come {
                return;
            }
            if let Some(done) = self.segments.pop_front() {
                done.stop(out);
            }
        }
    }

    /// Emits every segment whole, then `message_delta` and `message_stop`.
    fn close(&mut self, out: &mut BytesMut) {
        self.start(out);
        let called_tools = self.tools_seen > 0;
        while let Some(mut segment) = self.segments.pop_front() {
            if segment.index.is_none() {
                segment.open(&mut self.next_index, out);
            }
            segment.drain(out);
            segment.stop(out);
        }
        let (stop_reason, stop_sequence) = self
            .finish
            .to_anthropic(called_tools, self.stop_sequence.as_deref());
        let usage = usage_to_anthropic(&self.usage.clone().unwrap_or_default());
        emit(
            out,
            &Event::MessageDelta {
                delta: StopDelta {
                    stop_reason,
                    stop_sequence: stop_sequence.as_deref(),
                },
                usage,
            },
        );
        emit(out, &Event::MessageStop);
        self.finished = true;
    }
}

// === impl Segment ===

impl Segment {
    fn new(kind: Kind, pending: String) -> Segment {
        Segment {
            kind,
            index: None,
            pending,
            signature: String::new(),
        }
    }

    fn open(&mut self, next_index: &mut u32, out: &mut BytesMut) {
        let index = *next_index;
        *next_index += 1;
        self.index = Some(index);
        let data = match self.kind {
            Kind::Redacted => std::mem::take(&mut self.pending),
            _ => String::new(),
        };
        let content_block = match &self.kind {
            Kind::Text => BlockStart::Text { text: "" },
            Kind::Thinking(_) => BlockStart::Thinking {
                thinking: "",
                signature: "",
            },
            Kind::Redacted => BlockStart::RedactedThinking { data: &data },
            Kind::Tool(call) => BlockStart::ToolUse {
                id: &call.id,
                // Only a stream that ended before the name came gets here without one.
                name: call.name.as_deref().unwrap_or_default(),
                input: Map::new(),
            },
        };
        emit(
            out,
            &Event::ContentBlockStart {
                index,
                content_block,
            },
        );
    }

    fn drain(&mut self, out: &mut BytesMut) {
        let Some(index) = self.index else {
            return;
        };
        let delta = match self.kind {
            _ if self.pending.is_empty() => None,
            Kind::Text => Some(Delta::TextDelta {
                text: &self.pending,
            }),
            Kind::Thinking(_) => Some(Delta::ThinkingDelta {
                thinking: &self.pending,
            }),
            Kind::Tool(_) => Some(Delta::InputJsonDelta {
                partial_json: &self.pending,
            }),
            // Its data went out whole in the block's start.
            Kind::Redacted => None,
        };
        if let Some(delta) = delta {
            emit(out, &Event::ContentBlockDelta { index, delta });
            self.pending.clear();
        }
        if !self.signature.is_empty() {
            let delta = Delta::SignatureDelta {
                signature: &self.signature,
            };
            emit(out, &Event::ContentBlockDelta { index, delta });
            self.signature.clear();
        }
    }

    fn stop(self, out: &mut BytesMut) {
        if let Some(index) = self.index {
            emit(out, &Event::ContentBlockStop { index });
        }
    }
}

// === events ===

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: MessageHead<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: BlockStart<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: Delta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta<'a>,
        usage: Value,
    },
    MessageStop,
}

#[derive(Serialize)]
struct MessageHead<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: &'a [Value],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockStart<'a> {
    Text {
        text: &'a str,
    },
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    RedactedThinking {
        data: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Map<String, Value>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)] // The names are Anthropic's.
enum Delta<'a> {
    TextDelta { text: &'a str },
    ThinkingDelta { thinking: &'a str },
    SignatureDelta { signature: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct StopDelta<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        }
    }
}

fn emit(out: &mut BytesMut, event: &Event<'_>) {
    push_event(out, event.name(), event);
}

// === chunks ===

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    delta: Option<ChunkDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    native_finish_reason: Option<Cow<'a, str>>,
    /// vLLM: the stop string that matched (or a token id).
    #[serde(default)]
    stop_reason: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    /// OpenRouter's reasoning text.
    #[serde(default, borrow)]
    reasoning: Option<Cow<'a, str>>,
    /// DeepSeek's and vLLM's name for it.
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    /// OpenRouter's structured reasoning: thinking by block, signatures, redacted thinking.
    #[serde(default, borrow)]
    reasoning_details: Option<Vec<ReasoningDelta<'a>>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolDelta<'a>>>,
}

/// One entry of `delta.reasoning_details` (`OPENROUTER.md` §5).
#[derive(Deserialize)]
struct ReasoningDelta<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    summary: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    signature: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    format: Option<Cow<'a, str>>,
    #[serde(default)]
    index: Option<u64>,
}

impl ReasoningDelta<'_> {
    /// Carries thinking text (or a summary of it), not only a signature or encrypted data.
    fn has_text(&self) -> bool {
        matches!(&*self.kind, "reasoning.text" | "reasoning.summary")
            && [&self.text, &self.summary]
                .into_iter()
                .any(|text| text.as_deref().is_some_and(|t| !t.is_empty()))
    }
}

#[derive(Deserialize)]
struct ToolDelta<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize, Default)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests;
