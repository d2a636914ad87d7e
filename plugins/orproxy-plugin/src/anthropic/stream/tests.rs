use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::super::tests::context;
use super::*;
use crate::sse::SseFramer;

/// Cuts translator output into `(event name, data)` pairs, checking the framing.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(bytes).expect("UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "unterminated: {text:?}"
    );
    text.split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event
                .strip_prefix("event: ")
                .and_then(|rest| rest.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("malformed event {event:?}"));
            let data: Value = serde_json::from_str(data).expect("data is JSON");
            assert_eq!(data["type"], name, "type matches the event name");
            (name.to_owned(), data)
        })
        .collect()
}

/// Feeds an OpenAI SSE transcript through the translator, as the daemon does.
fn translate(transcript: &str) -> BytesMut {
    let mut framer = SseFramer::new();
    framer.push(transcript.as_bytes());
    let mut translator = StreamTranslator::new("msg_test", &context("gpt-4.1"));
    let mut out = BytesMut::new();
    while let Some(event) = framer.next_event() {
        if let Some(data) = event.data().filter(|_| !event.is_comment()) {
            translator.push(&data, &mut out);
        }
    }
    assert!(translator.is_finished());
    out
}

/// OpenRouter relaying a model that calls two tools at once, their argument deltas interleaved.
const INTERLEAVED_TOOLS: &str = r#": OPENROUTER PROCESSING

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":"Checking"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":" both.\n"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"get_time","arguments":""}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

: OPENROUTER PROCESSING

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"type":"function","function":{"arguments":"{\"city\":"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":1,"type":"function","function":{"arguments":"{\"tz\":"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"type":"function","function":{"arguments":"\"Paris\"}"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":1,"type":"function","function":{"arguments":"\"CET\"}"}}]},"finish_reason":null,"native_finish_reason":null,"logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls","native_finish_reason":"tool_calls","logprobs":null}]}

data: {"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4.1","object":"chat.completion.chunk","created":1,"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":30,"total_tokens":80,"cost":0.0001,"is_byok":false,"prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":0}}}

data: [DONE]

"#;

#[test]
fn interleaved_tool_calls_become_whole_blocks_in_order() {
    let got = events(&translate(INTERLEAVED_TOOLS));
    let zero = json!({"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
    let expected = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_test", "type": "message", "role": "assistant", "model": "openai/gpt-4.1", "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": zero}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " both.\n"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"tz\":\"CET\"}"}}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"input_tokens": 42, "output_tokens": 30, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let expected: Vec<(String, Value)> = expected
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
    assert_eq!(got, expected);
    assert!(check(&translate(INTERLEAVED_TOOLS)).is_ok());
}

fn run(chunks: &[Value]) -> (StreamTranslator, BytesMut) {
    let mut translator = StreamTranslator::new("msg_t", &context("m"));
    let mut out = BytesMut::new();
    for chunk in chunks {
        translator.push(chunk.to_string().as_bytes(), &mut out);
    }
    (translator, out)
}

fn delta(delta: Value) -> Value {
    json!({"choices": [{"index": 0, "delta": delta}]})
}

fn names(out: &[u8]) -> Vec<String> {
    events(out).into_iter().map(|(name, _)| name).collect()
}

#[test]
fn reasoning_then_text_are_two_blocks_and_stop_sequences_are_reported() {
    let (mut translator, mut out) = run(&[
        delta(json!({"reasoning": "Hmm"})),
        delta(json!({"reasoning_content": ", yes."})),
        delta(json!({"content": "42"})),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "</a>"}]}),
    ]);
    translator.finish(&mut out);
    let got = events(&out);
    assert_eq!(
        got[1].1["content_block"],
        json!({"type": "thinking", "thinking": "", "signature": ""})
    );
    assert_eq!(
        got[3].1["delta"],
        json!({"type": "thinking_delta", "thinking": ", yes."})
    );
    assert_eq!(got[5].1["content_block"]["type"], "text");
    assert_eq!(got[5].1["index"], 1);
    let message_delta = &got[got.len() - 2].1;
    assert_eq!(
        message_delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "</a>"})
    );
    check(&out).expect("valid");
}

/// A Claude model through OpenRouter: its thinking comes twice, as `reasoning` and in
/// `reasoning_details` by block, the block's signature last, redacted thinking as data.
fn claude_reasoning(text: &str, signature: &str, index: u64) -> Value {
    let detail = json!({"type": "reasoning.text", "text": text, "signature": signature,
                        "format": "anthropic-claude-v1", "index": index});
    delta(
        json!({"content": "", "reasoning": (!text.is_empty()).then_some(text),
                 "reasoning_details": [detail]}),
    )
}

#[test]
fn signed_and_redacted_thinking_from_openrouter_become_their_anthropic_blocks() {
    let (mut translator, mut out) = run(&[
        claude_reasoning("", "", 0),
        claude_reasoning("Let me ", "", 0),
        claude_reasoning("check.", "", 0),
        claude_reasoning("", "sig-0", 0),
        delta(
            json!({"content": "", "reasoning_details": [{"type": "reasoning.encrypted",
            "data": "secret", "format": "anthropic-claude-v1", "index": 1}]}),
        ),
        claude_reasoning("More.", "sig-2", 2),
        // Another provider's encrypted reasoning cannot be a Messages block.
        delta(
            json!({"reasoning_details": [{"type": "reasoning.encrypted", "data": "gAAA",
            "format": "openai-responses-v1", "index": 3}]}),
        ),
        delta(json!({"content": "Done."})),
    ]);
    translator.finish(&mut out);
    let got: Vec<Value> = events(&out)
        .into_iter()
        .filter(|(name, _)| name.starts_with("content_block_"))
        .map(|(_, data)| data)
        .collect();
    let expected = [
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "thinking_delta", "thinking": "check."}}),
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "signature_delta", "signature": "sig-0"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
               "content_block": {"type": "redacted_thinking", "data": "secret"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "content_block_start", "index": 2,
               "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        json!({"type": "content_block_delta", "index": 2,
               "delta": {"type": "thinking_delta", "thinking": "More."}}),
        json!({"type": "content_block_delta", "index": 2,
               "delta": {"type": "signature_delta", "signature": "sig-2"}}),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "content_block_start", "index": 3,
               "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 3,
               "delta": {"type": "text_delta", "text": "Done."}}),
        json!({"type": "content_block_stop", "index": 3}),
    ];
    assert_eq!(got, expected);
    check(&out).expect("valid");
}

#[test]
fn plain_and_detailed_pieces_of_one_thinking_block_stay_one_block() {
    let thinking = |chunks: &[Value]| {
        let (mut translator, mut out) = run(chunks);
        translator.finish(&mut out);
        check(&out).expect("valid");
        events(&out)
            .into_iter()
            .filter_map(|(_, data)| match data["delta"]["type"].as_str() {
                Some("thinking_delta") => Some(format!("t:{}", data["delta"]["thinking"])),
                Some("signature_delta") => Some(format!("s:{}", data["delta"]["signature"])),
                _ => (data["type"] == "content_block_start").then(|| "start".to_owned()),
            })
            .collect::<Vec<_>>()
    };
    let detail = |fields: Value| {
        let mut detail = json!({"type": "reasoning.text", "format": "anthropic-claude-v1"});
        detail
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        detail
    };
    // Text in `reasoning` next to a detail that carries only the signature.
    let signed_beside_text = [delta(json!({"reasoning": "check.",
        "reasoning_details": [detail(json!({"signature": "sig", "index": 0}))]}))];
    assert_eq!(
        thinking(&signed_beside_text),
        ["start", "t:\"check.\"", "s:\"sig\""]
    );
    // Plain text first, then indexed details, then a signature without an index.
    let mixed = [
        delta(json!({"reasoning": "Let me "})),
        delta(json!({"reasoning": "check.",
            "reasoning_details": [detail(json!({"text": "check.", "index": 0}))]})),
        delta(json!({"reasoning_details": [detail(json!({"text": "", "signature": "sig"}))]})),
    ];
    assert_eq!(
        thinking(&mixed),
        ["start", "t:\"Let me \"", "t:\"check.\"", "s:\"sig\""]
    );
}

#[test]
fn cache_writes_are_reported_as_cache_creation_at_start_and_end() {
    let usage: Value = serde_json::from_str(super::super::tests::CACHE_USAGE).expect("JSON");
    let expected = super::super::tests::cache_usage_anthropic();
    // Usage in the last chunk, as OpenAI-style streams send it: only `message_delta` has it.
    let (mut translator, mut out) = run(&[
        delta(json!({"content": "hi"})),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        json!({"choices": [], "usage": usage}),
    ]);
    translator.finish(&mut out);
    let got = events(&out);
    assert_eq!(got[got.len() - 2].1["usage"], expected);
    // Usage already in the first chunk (a JSON answer replayed as a stream): both have it.
    let (mut translator, mut out) = run(&[
        json!({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}], "usage": usage}),
    ]);
    translator.finish(&mut out);
    let got = events(&out);
    assert_eq!(got[0].1["message"]["usage"], expected);
    assert_eq!(got[got.len() - 2].1["usage"], expected);
}

#[test]
fn the_upstreams_model_and_the_only_stop_sequence_are_named() {
    let context = AnswerContext {
        model: "openai/gpt-4o".to_owned(),
        stop_sequence: Some("</a>".to_owned()),
    };
    let mut translator = StreamTranslator::new("msg_t", &context);
    let mut out = BytesMut::new();
    for chunk in [
        json!({"model": "openai/gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"content": "42"}}]}),
        json!({"model": "other", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "native_finish_reason": "stop_sequence"}]}),
    ] {
        translator.push(chunk.to_string().as_bytes(), &mut out);
    }
    translator.finish(&mut out);
    let got = events(&out);
    assert_eq!(got[0].1["message"]["model"], "openai/gpt-4o-2024-08-06");
    assert_eq!(
        got[got.len() - 2].1["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "</a>"})
    );
    // An upstream that names no model: the target's.
    let (_, out) = run(&[delta(json!({"content": "hi"}))]);
    assert_eq!(events(&out)[0].1["message"]["model"], "m");
}

#[test]
fn an_error_chunk_ends_the_stream() {
    let (mut translator, mut out) = run(&[
        delta(json!({"content": "Hel"})),
        json!({"error": {"code": 429, "message": "Rate limit exceeded"}, "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}),
        delta(json!({"content": "lo"})),
    ]);
    assert!(translator.is_finished());
    translator.finish(&mut out);
    translator.push(b"[DONE]", &mut out);
    let got = events(&out);
    assert_eq!(
        names(&out),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        got[3].1["error"],
        json!({"type": "rate_limit_error", "message": "Rate limit exceeded"})
    );
    check(&out).expect("valid");
}

#[test]
fn finish_closes_whatever_is_open() {
    let mut translator = StreamTranslator::new("msg_t", &context("m"));
    let mut out = BytesMut::new();
    translator.finish(&mut out);
    assert_eq!(
        names(&out),
        ["message_start", "message_delta", "message_stop"]
    );
    assert!(translator.is_finished());

    let (mut translator, mut out) = run(&[delta(
        json!({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{\"a\""}}]}),
    )]);
    translator.finish(&mut out);
    let summary = check(&out).expect("valid");
    assert_eq!(summary.tools, [("c".to_owned(), "{\"a\"".to_owned())]);
    assert_eq!(events(&out)[4].1["delta"]["stop_reason"], "tool_use");
}

#[test]
fn tools_wait_for_their_name_and_reused_indexes_with_new_ids_are_new_calls() {
    let (mut translator, mut out) = run(&[
        delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]})),
        delta(json!({"content": "later"})),
        delta(
            json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "}"}}]}),
        ),
        delta(
            json!({"tool_calls": [{"index": 0, "id": "c2", "function": {"name": "g", "arguments": "[]"}}]}),
        ),
    ]);
    // The first call got its name: it streams; the text and the second call wait behind it.
    assert_eq!(
        names(&out),
        [
            "message_start",
            "content_block_start",
            "content_block_delta"
        ]
    );
    translator.push(b"[DONE]", &mut out);
    let summary = check(&out).expect("valid");
    assert_eq!(
        summary.tools,
        [
            ("c1".to_owned(), "{}".to_owned()),
            ("c2".to_owned(), "[]".to_owned())
        ]
    );
    assert_eq!(summary.text, "later");
    assert_eq!(events(&out)[4].1["content_block"]["type"], "text");
}

#[test]
fn ping_is_an_event() {
    assert_eq!(names(&StreamTranslator::ping()), ["ping"]);
}

// === the grammar of a Messages stream ===

/// What a valid stream carried.
#[derive(Debug, Default)]
struct Summary {
    /// `(id, concatenated partial_json)` per tool block, in order.
    tools: Vec<(String, String)>,
    text: String,
    thinking: String,
    errored: bool,
    /// Ended by `message_stop` or `error`.
    complete: bool,
}

#[derive(Debug, PartialEq)]
enum Phase {
    BeforeStart,
    Content,
    Delivered,
    Done,
}

/// Checks `bytes` against the Messages stream grammar: `message_start`, then blocks
/// (`content_block_start(i)`, matching deltas for `i`, `content_block_stop(i)`, with `i` = 0, 1, 2…
/// and never two open), then at most one `message_delta`, then `message_stop`; `ping` anywhere
/// after `message_start`; an `error` ends the stream wherever it comes. A prefix is valid too.
fn check(bytes: &[u8]) -> Result<Summary, String> {
    let mut summary = Summary::default();
    let mut phase = Phase::BeforeStart;
    let mut open: Option<(u64, String)> = None;
    let mut next = 0u64;
    for (n, (name, data)) in events(bytes).into_iter().enumerate() {
        let at = |what: &str| format!("event {n} `{name}`: {what}");
        if phase == Phase::Done {
            return Err(at("after the end"));
        }
        match name.as_str() {
            "error" => {
                if !data["error"]["type"].is_string() || !data["error"]["message"].is_string() {
                    return Err(at("bad error object"));
                }
                summary.errored = true;
                phase = Phase::Done;
            }
            "ping" if phase != Phase::BeforeStart => {}
            "message_start" if phase == Phase::BeforeStart => {
                let message = &data["message"];
                if message["content"] != json!([])
                    || message["role"] != "assistant"
                    || message["type"] != "message"
                {
                    return Err(at("bad message"));
                }
                phase = Phase::Content;
            }
            "content_block_start" if phase == Phase::Content && open.is_none() => {
                if data["index"] != next {
                    return Err(at("index out of order"));
                }
                let block = &data["content_block"];
                let kind = block["type"].as_str().unwrap_or_default().to_owned();
                match kind.as_str() {
                    "text" | "thinking" => {}
                    "redacted_thinking" if block["data"].is_string() => {}
                    "tool_use"
                        if block["id"].is_string()
                            && block["name"].is_string()
                            && block["input"] == json!({}) =>
                    {
                        summary.tools.push((
                            block["id"].as_str().unwrap_or_default().to_owned(),
                            String::new(),
                        ));
                    }
                    _ => return Err(at("bad block")),
                }
                open = Some((next, kind));
            }
            "content_block_delta" => {
                let Some((index, kind)) = &open else {
                    return Err(at("no open block"));
                };
                if data["index"] != *index {
                    return Err(at("wrong index"));
                }
                let delta = &data["delta"];
                let piece = |key: &str| {
                    delta[key]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| at("no piece"))
                };
                match (kind.as_str(), delta["type"].as_str()) {
                    ("text", Some("text_delta")) => summary.text += &piece("text")?,
                    ("thinking", Some("thinking_delta")) => summary.thinking += &piece("thinking")?,
                    ("thinking", Some("signature_delta")) => {}
                    ("tool_use", Some("input_json_delta")) => {
                        let json = piece("partial_json")?;
                        if let Some(tool) = summary.tools.last_mut() {
                            tool.1 += &json;
                        }
                    }
                    _ => return Err(at("delta does not match the block")),
                }
            }
            "content_block_stop" => match &open {
                Some((index, _)) if data["index"] == *index => {
                    open = None;
                    next += 1;
                }
                _ => return Err(at("stops a block that is not open")),
            },
            "message_delta" if phase == Phase::Content && open.is_none() => {
                let stop = data["delta"]["stop_reason"].as_str().unwrap_or_default();
                if ![
                    "end_turn",
                    "max_tokens",
                    "stop_sequence",
                    "tool_use",
                    "refusal",
                    "pause_turn",
                ]
                .contains(&stop)
                    || !data["usage"]["output_tokens"].is_u64()
                {
                    return Err(at("bad delta"));
                }
                phase = Phase::Delivered;
            }
            "message_stop" if phase == Phase::Delivered => phase = Phase::Done,
            _ => return Err(at("not allowed here")),
        }
    }
    summary.complete = phase == Phase::Done;
    Ok(summary)
}

// === property: any chunk sequence yields a valid stream ===

#[derive(Debug, Clone)]
enum Step {
    Role,
    Text(String),
    Reasoning(String),
    Tool {
        index: u64,
        id: bool,
        name: bool,
        args: String,
    },
    Finish(&'static str),
    Usage,
    Error,
    Malformed,
    Done,
}

fn step() -> impl Strategy<Value = Step> {
    // Ends (errors, [DONE]) are rare so that many streams run long before they end.
    prop_oneof![
        2 => Just(Step::Role),
        12 => "[a-z \n\"é]{0,6}".prop_map(Step::Text),
        8 => "[a-z ]{0,6}".prop_map(Step::Reasoning),
        24 => (0u64..3, any::<bool>(), any::<bool>(), "[a-z{}\":,\\\\]{0,5}")
            .prop_map(|(index, id, name, args)| Step::Tool { index, id, name, args }),
        3 => prop::sample::select(vec!["stop", "length", "tool_calls", "content_filter", "error"])
            .prop_map(Step::Finish),
        2 => Just(Step::Usage),
        2 => Just(Step::Malformed),
        1 => Just(Step::Error),
        1 => Just(Step::Done),
    ]
}

/// The chunk for a step; `seen` makes sure every call's first delta carries its id, as OpenAI's do.
fn chunk(step: &Step, seen: &mut BTreeSet<u64>) -> Vec<u8> {
    let value = match step {
        Step::Role => delta(json!({"role": "assistant", "content": ""})),
        Step::Text(text) => delta(json!({"content": text})),
        Step::Reasoning(text) => delta(json!({"reasoning": text})),
        Step::Tool {
            index,
            id,
            name,
            args,
        } => {
            let mut call =
                json!({"index": index, "type": "function", "function": {"arguments": args}});
            if *id || seen.insert(*index) {
                call["id"] = json!(format!("call_{index}"));
            }
            if *name {
                call["function"]["name"] = json!(format!("fn_{index}"));
            }
            delta(json!({"tool_calls": [call]}))
        }
        Step::Finish(reason) => {
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        }
        Step::Usage => {
            json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
        }
        Step::Error => json!({"error": {"code": 502, "message": "provider died"}}),
        Step::Malformed => return b"{\"choices\": [ oops".to_vec(),
        Step::Done => return b"[DONE]".to_vec(),
    };
    value.to_string().into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_chunk_sequence_makes_a_valid_stream(
        steps in prop::collection::vec(step(), 0..40),
        call_finish in any::<bool>(),
    ) {
        let mut translator = StreamTranslator::new("msg_p", &context("m"));
        let mut out = BytesMut::new();
        let mut seen = BTreeSet::new();
        // What reached the translator before the stream ended.
        let mut args: BTreeMap<u64, String> = BTreeMap::new();
        let (mut text, mut thinking) = (String::new(), String::new());
        let mut ended = false;
        for step in &steps {
            let bytes = chunk(step, &mut seen);
            translator.push(&bytes, &mut out);
            if ended {
                continue;
            }
            match step {
                Step::Text(piece) => text += piece,
                Step::Reasoning(piece) => thinking += piece,
                Step::Tool { index, args: piece, .. } => args.entry(*index).or_default().push_str(piece),
                Step::Done | Step::Error => ended = true,
                _ => {}
            }
            prop_assert_eq!(translator.is_finished(), ended);
            let prefix = check(&out);
            prop_assert!(prefix.is_ok(), "{:?}\n{}", prefix, String::from_utf8_lossy(&out));
        }
        if call_finish {
            translator.finish(&mut out);
            translator.finish(&mut out);
            prop_assert!(translator.is_finished());
        }
        let summary = check(&out);
        prop_assert!(summary.is_ok(), "{:?}\n{}", summary, String::from_utf8_lossy(&out));
        let summary = summary.unwrap_or_default();
        prop_assert_eq!(summary.complete, translator.is_finished());
        let expected: Vec<(String, String)> =
            args.iter().map(|(index, json)| (format!("call_{index}"), json.clone())).collect();
        let mut got = summary.tools.clone();
        got.sort();
        if summary.errored {
            // An error cuts the stream short: what did go out is a prefix of what came in.
            for (id, json) in &got {
                let whole = expected.iter().find(|(want, _)| want == id).map(|(_, j)| j.as_str());
                prop_assert!(whole.is_some_and(|whole| whole.starts_with(json.as_str())), "{} {}", id, json);
            }
            prop_assert!(text.starts_with(&summary.text) && thinking.starts_with(&summary.thinking));
        } else if summary.complete {
            prop_assert_eq!(got, expected);
            prop_assert_eq!(summary.text, text);
            prop_assert_eq!(summary.thinking, thinking);
        }
    }
}
