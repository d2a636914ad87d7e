//! The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`):
//! translated to and from OpenAI backends, passed through to Anthropic backends, with
//! Anthropic-shaped errors and one ledger row per request; and OpenAI clients served by an
//! Anthropic backend.

use orproxy_testkit::{
    FAKE_ANTHROPIC_KEY, FAKE_ANTHROPIC_MODEL, FAKE_API_KEY, FakeAnthropic, FakeOpenRouter,
    RecordedRequest,
};
use serde_json::{Value, json};

use crate::harness::{Daemon, Options, chat, client, events, openrouter_config};
use crate::ledger::{billed_nanos, default_db, flushed_rows, post, request_id, row_of};

// === helpers ===

/// A config with the fake OpenRouter (default backend) and the fake Anthropic as `claude`.
fn both_config(openrouter: &str, anthropic: &str, extra: &str) -> String {
    format!(
        "backends:\n  openrouter:\n    type: openrouter\n    base_url: {openrouter}\n    api_key_env: FAKE_OR_KEY\n  claude:\n    type: anthropic\n    base_url: {anthropic}\n    api_key_env: FAKE_ANT_KEY\ndefault_backend: openrouter\n{extra}"
    )
}

/// A daemon in front of both fakes.
fn daemon_for_both(or: &FakeOpenRouter, ant: &FakeAnthropic, extra: &str) -> Daemon {
    Daemon::start(
        Options::config(both_config(&or.base_url(), &ant.base_url(), extra))
            .env("FAKE_OR_KEY", FAKE_API_KEY)
            .env("FAKE_ANT_KEY", FAKE_ANTHROPIC_KEY),
    )
}

/// A daemon in front of the fake OpenRouter only.
fn daemon_for_openrouter(or: &FakeOpenRouter, extra: &str) -> Daemon {
    Daemon::start(
        Options::config(openrouter_config(&or.base_url(), extra)).env("FAKE_OR_KEY", FAKE_API_KEY),
    )
}

/// A daemon whose only (default) backend is the fake Anthropic, named `claude`.
fn daemon_for_anthropic(ant: &FakeAnthropic, extra: &str) -> Daemon {
    Daemon::start(
        Options::config(format!(
            "backends:\n  claude:\n    type: anthropic\n    base_url: {}\n    api_key_env: FAKE_ANT_KEY\ndefault_backend: claude\n{extra}",
            ant.base_url()
        ))
        .env("FAKE_ANT_KEY", FAKE_ANTHROPIC_KEY),
    )
}

/// A plain Messages request body.
fn message(model: &str, text: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "stream": stream,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": text}],
    })
}

/// POSTs `body` to `/v1/messages`.
async fn post_messages(daemon: &Daemon, body: &Value) -> reqwest::Response {
    client()
        .post(daemon.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The chat-completion requests the fake OpenRouter received.
fn chat_requests(fake: &FakeOpenRouter) -> Vec<RecordedRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .collect()
}

/// The requests the fake Anthropic received at `path` (model-list fetches left out).
fn anthropic_requests(fake: &FakeAnthropic, path: &str) -> Vec<RecordedRequest> {
    fake.requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

/// One SSE event of an Anthropic stream.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    name: String,
    data: Value,
}

/// Reads a Messages stream into its events; comments (keep-alives) are left out. Panics on
/// a transport error or an event that is not `event: NAME` + `data: JSON`.
async fn sse(response: reqwest::Response) -> Vec<Sse> {
    let (raw, error) = events(response).await;
    assert_eq!(error, None, "the stream broke: {raw:?}");
    parse_sse(raw.iter().map(|(_, e)| e.as_str()))
}

fn parse_sse<'a>(raw: impl Iterator<Item = &'a str>) -> Vec<Sse> {
    let mut out = Vec::new();
    for event in raw {
        let mut name = None;
        let mut data = String::new();
        for line in event.lines() {
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            } else {
                panic!("unexpected SSE line {line:?} in {event:?}");
            }
        }
        if name.is_none() && data.is_empty() {
            continue; // a comment-only event
        }
        let name = name.unwrap_or_else(|| panic!("an event without `event:`: {event:?}"));
        let data: Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {event:?}"));
        out.push(Sse { name, data });
    }
    out
}

/// One content block of a checked stream.
#[derive(Debug, Default)]
struct Block {
    kind: String,
    start: Value,
    text: String,
    thinking: String,
    partial_json: String,
    signature: String,
}

/// A stream that follows Anthropic's event grammar.
#[derive(Debug)]
struct Checked {
    message: Value,
    blocks: Vec<Block>,
    stop_reason: Option<String>,
    final_usage: Value,
    error: Option<Value>,
}

/// Validates `events` against the Messages stream grammar: `message_start` first; blocks
/// started, given deltas of their own type, and stopped, with consecutive indices and never
/// two open; pings anywhere; one `message_delta` with a `stop_reason` after the last block;
/// `message_stop` last. With `ends_in_error`, the stream must instead end with an `error`
/// event (a block may still be open then).
fn check_grammar(events: &[Sse], ends_in_error: bool) -> Result<Checked, String> {
    let mut checked = Checked {
        message: Value::Null,
        blocks: Vec::new(),
        stop_reason: None,
        final_usage: Value::Null,
        error: None,
    };
    let mut open: Option<usize> = None;
    let mut delta_seen = false;
    let mut stopped = false;
    let last = events.len().checked_sub(1).ok_or("the stream is empty")?;
    for (i, event) in events.iter().enumerate() {
        let at = format!("event {i} ({}): {}", event.name, event.data);
        if event.data["type"] != event.name.as_str() {
            return Err(format!("{at}: data.type differs from the event name"));
        }
        if stopped {
            return Err(format!("{at}: after message_stop"));
        }
        if i == 0 && event.name != "message_start" {
            return Err(format!("{at}: the first event must be message_start"));
        }
        let index = || event.data["index"].as_u64().map(|i| i as usize);
        match event.name.as_str() {
            "message_start" => {
                if i != 0 {
                    return Err(format!("{at}: a second message_start"));
                }
                let message = &event.data["message"];
                if message["type"] != "message"
                    || message["role"] != "assistant"
                    || message["content"] != json!([])
                    || !message["id"].is_string()
                    || !message["model"].is_string()
                {
                    return Err(format!("{at}: malformed message"));
                }
                checked.message = message.clone();
            }
            "ping" => {}
            "content_block_start" => {
                if delta_seen {
                    return Err(format!("{at}: a block after message_delta"));
                }
                if let Some(open) = open {
                    return Err(format!("{at}: block {open} is still open"));
                }
                if index() != Some(checked.blocks.len()) {
                    return Err(format!("{at}: expected index {}", checked.blocks.len()));
                }
                let block = &event.data["content_block"];
                let kind = block["type"].as_str().unwrap_or_default().to_owned();
                let well_formed = match kind.as_str() {
                    "text" => block["text"] == "",
                    "thinking" => block["thinking"] == "",
                    "tool_use" => {
                        block["id"].is_string()
                            && block["name"].as_str().is_some_and(|n| !n.is_empty())
                            && block["input"] == json!({})
                    }
                    _ => false,
                };
                if !well_formed {
                    return Err(format!("{at}: malformed or unknown block start"));
                }
                open = Some(checked.blocks.len());
                checked.blocks.push(Block {
                    kind,
                    start: block.clone(),
                    ..Block::default()
                });
            }
            "content_block_delta" => {
                if open.is_none() || index() != open {
                    return Err(format!(
                        "{at}: a delta for a block that is not open ({open:?})"
                    ));
                }
                let block = checked.blocks.last_mut().ok_or("no block")?;
                let delta = &event.data["delta"];
                let piece = |key: &str| {
                    delta[key]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{at}: `{key}` is not a string"))
                };
                match (
                    block.kind.as_str(),
                    delta["type"].as_str().unwrap_or_default(),
                ) {
                    ("text", "text_delta") => block.text.push_str(&piece("text")?),
                    ("thinking", "thinking_delta") => {
                        block.thinking.push_str(&piece("thinking")?);
                    }
                    ("thinking", "signature_delta") => {
                        block.signature.push_str(&piece("signature")?);
                    }
                    ("tool_use", "input_json_delta") => {
                        block.partial_json.push_str(&piece("partial_json")?);
                    }
                    (kind, other) => {
                        return Err(format!("{at}: a `{other}` delta in a `{kind}` block"));
                    }
                }
            }
            "content_block_stop" => {
                if open.is_none() || index() != open {
                    return Err(format!("{at}: stops a block that is not open ({open:?})"));
                }
                open = None;
            }
            "message_delta" => {
                if delta_seen {
                    return Err(format!("{at}: a second message_delta"));
                }
                if let Some(open) = open {
                    return Err(format!("{at}: block {open} is still open"));
                }
                let reason = event.data["delta"]["stop_reason"]
                    .as_str()
                    .ok_or_else(|| format!("{at}: no stop_reason"))?;
                checked.stop_reason = Some(reason.to_owned());
                checked.final_usage = event.data["usage"].clone();
                delta_seen = true;
            }
            "message_stop" => {
                if ends_in_error {
                    return Err(format!("{at}: a clean end where an error was expected"));
                }
                if !delta_seen {
                    return Err(format!("{at}: message_stop before message_delta"));
                }
                if i != last {
                    return Err(format!("{at}: message_stop is not the last event"));
                }
                stopped = true;
            }
            "error" => {
                if !ends_in_error || i != last {
                    return Err(format!("{at}: an unexpected error event"));
                }
                if !event.data["error"]["type"].is_string()
                    || !event.data["error"]["message"].is_string()
                {
                    return Err(format!("{at}: malformed error"));
                }
                checked.error = Some(event.data["error"].clone());
            }
            _ => return Err(format!("{at}: unknown event")),
        }
    }
    if ends_in_error && checked.error.is_none() {
        return Err("the stream did not end with an error event".into());
    }
    if !ends_in_error && !stopped {
        return Err("the stream did not end with message_stop".into());
    }
    Ok(checked)
}

/// [`check_grammar`] that panics with the whole stream on a violation.
fn valid(events: &[Sse]) -> Checked {
    check_grammar(events, false).unwrap_or_else(|e| panic!("{e}\nstream: {events:#?}"))
}

/// The tool definitions of a Claude-Code-like request.
fn tools() -> Value {
    json!([
        {
            "name": "Grep",
            "description": "Searches file contents.",
            "input_schema": {
                "type": "object",
                "properties": {"q": {"type": "string"}},
                "required": ["q"],
                "additionalProperties": false,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        },
        {
            "name": "Read",
            "description": "Reads a file.",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            "cache_control": {"type": "ephemeral"},
        },
    ])
}

/// The last user turn of [`claude_code_request`], as the fake reads its text (parts joined
/// by a space).
const CC_USER_TEXT: &str = "<system-reminder>today is a day</system-reminder> find the config file";

/// A request shaped like Claude Code's: system blocks with cache breakpoints, tools,
/// extended thinking, a stream, and the user id in `metadata`.
fn claude_code_request(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 32000,
        "temperature": 1,
        "stream": true,
        "metadata": {"user_id": "user_0123abcd_account_42_session_7f"},
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "You are an interactive CLI tool that helps users.",
             "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>today is a day</system-reminder>"},
                {"type": "text", "text": "find the config file", "cache_control": {"type": "ephemeral"}},
            ],
        }],
        "tools": tools(),
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    })
}

// === 1. Messages client, OpenAI backend, not streamed ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_request_is_translated_for_openrouter_and_answered_in_messages_shape() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = post_messages(
        &daemon,
        &message("anthropic/claude-3-5-sonnet", "hello there", false),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:anthropic/claude-3-5-sonnet"
    );
    assert!(!request_id(&response).is_empty());
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["type"], "message", "{answer:#}");
    assert_eq!(answer["role"], "assistant");
    assert!(
        answer["id"].as_str().unwrap().starts_with("msg_"),
        "{answer:#}"
    );
    assert_eq!(answer["model"], "anthropic/claude-3-5-sonnet");
    assert_eq!(
        answer["content"],
        json!([{"type": "text", "text": "echo: hello there"}]),
        "{answer:#}"
    );
    assert_eq!(answer["stop_reason"], "end_turn");
    assert!(answer["stop_sequence"].is_null());
    assert!(
        answer["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "{answer:#}"
    );
    assert!(
        answer["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{answer:#}"
    );
    assert!(answer.get("choices").is_none());

    let sent = chat_requests(&fake);
    assert_eq!(sent.len(), 1);
    let body = sent[0].json();
    assert_eq!(body["model"], "anthropic/claude-3-5-sonnet");
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(body["stream"], false);
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello there"},
        ]),
        "{body:#}"
    );
    assert!(body.get("system").is_none(), "{body:#}");
    assert_eq!(
        sent[0].header("authorization"),
        Some(format!("Bearer {FAKE_API_KEY}").as_str())
    );
}

// === 2. A Claude-Code-style stream through OpenRouter ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_stream_is_translated_with_thinking_and_a_tool_call() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = client()
        .post(daemon.url("/v1/messages"))
        .header("x-api-key", "sk-ant-ignored-when-auth-is-off")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "interleaved-thinking-2025-05-14")
        .json(&claude_code_request("fake/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/echo"
    );
    let events = sse(response).await;
    let checked = valid(&events);
    assert_eq!(checked.message["model"], "fake/echo");
    let kinds: Vec<&str> = checked.blocks.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(kinds, ["thinking", "tool_use"], "{events:#?}");
    assert_eq!(
        checked.blocks[0].thinking,
        format!("Thinking about: {CC_USER_TEXT}")
    );
    let tool = &checked.blocks[1];
    assert_eq!(tool.start["name"], "Grep");
    assert!(tool.start["id"].as_str().unwrap().len() > 5);
    let input: Value = serde_json::from_str(&tool.partial_json)
        .unwrap_or_else(|e| panic!("partial_json pieces do not add up ({e}): {events:#?}"));
    assert_eq!(input, json!({"q": CC_USER_TEXT}));
    assert_eq!(checked.stop_reason.as_deref(), Some("tool_use"));
    assert!(
        checked.final_usage["output_tokens"].as_u64().unwrap() > 0,
        "{events:#?}"
    );

    let sent = chat_requests(&fake);
    assert_eq!(sent.len(), 1);
    let body = sent[0].json();
    assert_eq!(body["model"], "fake/echo");
    assert_eq!(body["stream"], true);
    assert_eq!(body["reasoning"]["max_tokens"], 1024, "{body:#}");
    assert_eq!(body["tools"][0]["type"], "function", "{body:#}");
    assert_eq!(body["tools"][0]["function"]["name"], "Grep");
    assert_eq!(body["tools"][1]["function"]["name"], "Read");
    assert_eq!(
        body["tools"][0]["function"]["parameters"]["required"],
        json!(["q"])
    );
    assert_eq!(body["user"], "user_0123abcd_account_42_session_7f");
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 32000);
    assert_eq!(body["messages"][0]["role"], "system", "{body:#}");
    assert_eq!(body["messages"][1]["role"], "user", "{body:#}");
    assert!(body.get("thinking").is_none() && body.get("metadata").is_none());
}

/// A Claude model through OpenRouter signs its thinking, and refuses a tool result whose turn
/// lost that thinking or changed it: the signature must survive both translations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_tool_loop_through_openrouter_sends_its_signed_thinking_back() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let first = claude_code_request("anthropic/claude-sonnet-4");
    let response = post_messages(&daemon, &first).await;
    assert_eq!(response.status(), 200);
    let events = sse(response).await;
    let checked = valid(&events);
    let kinds: Vec<&str> = checked.blocks.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(kinds, ["thinking", "tool_use"], "{events:#?}");
    let (thinking, tool) = (&checked.blocks[0], &checked.blocks[1]);
    assert!(thinking.signature.starts_with("fakesig"), "{events:#?}");

    let next_turn = |signature: &str, stream: bool| {
        let mut body = first.clone();
        body["stream"] = stream.into();
        let messages = body["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": thinking.thinking, "signature": signature},
            {"type": "tool_use", "id": tool.start["id"], "name": tool.start["name"],
             "input": serde_json::from_str::<Value>(&tool.partial_json).unwrap()},
        ]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool.start["id"], "content": "config.yaml"},
        ]}));
        body
    };
    let response = post_messages(&daemon, &next_turn(&thinking.signature, false)).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["content"][1]["text"], "tool said: config.yaml",
        "{answer:#}"
    );
    let sent = chat_requests(&fake);
    assert_eq!(
        sent[1].json()["messages"][2]["reasoning_details"][0]["signature"],
        thinking.signature.as_str()
    );

    // A changed signature reaches the upstream as sent, which refuses it; so does a turn whose
    // thinking was dropped (an unsigned block is not sent), as the daemon did before.
    for (signature, refusal) in [
        ("fakesig-forged", "Invalid `signature`"),
        ("", "must start with a thinking block"),
    ] {
        let response = post_messages(&daemon, &next_turn(signature, true)).await;
        let message = pipeline_error(response, 400, "invalid_request_error").await;
        assert!(message.contains(refusal), "{message}");
    }
}

// === 3. Parallel tool calls whose argument pieces interleave ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_parallel_tool_calls_become_two_whole_tool_use_blocks() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let body = json!({
        "model": "fake/two-tools",
        "max_tokens": 1000,
        "stream": true,
        "tools": tools(),
        "messages": [{"role": "user", "content": "look everywhere"}],
    });
    let response = post_messages(&daemon, &body).await;
    assert_eq!(response.status(), 200);
    let events = sse(response).await;
    let checked = valid(&events);
    let kinds: Vec<&str> = checked.blocks.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(kinds, ["tool_use", "tool_use"], "{events:#?}");
    let names: Vec<&Value> = checked.blocks.iter().map(|b| &b.start["name"]).collect();
    assert_eq!(names, [&json!("Grep"), &json!("Read")]);
    assert_ne!(checked.blocks[0].start["id"], checked.blocks[1].start["id"]);
    for block in &checked.blocks {
        let input: Value = serde_json::from_str(&block.partial_json).unwrap_or_else(|e| {
            panic!(
                "input of {} is not JSON ({e}): {:?}\n{events:#?}",
                block.start["name"], block.partial_json
            )
        });
        assert_eq!(input, json!({"q": "look everywhere"}));
    }
    assert_eq!(checked.stop_reason.as_deref(), Some("tool_use"));
    let sent = chat_requests(&fake);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["tools"].as_array().unwrap().len(), 2);
}

// === 4. Errors in Anthropic's shape ===

/// Asserts an Anthropic error answer and returns its message.
async fn anthropic_error(response: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(response.status(), status);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body:#}");
    assert_eq!(body["error"]["type"], kind, "{body:#}");
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body:#}"))
        .to_owned()
}

/// [`anthropic_error`] for an answer of the request pipeline, which stamps every response
/// with the request id and route (SPEC §7).
async fn pipeline_error(response: reqwest::Response, status: u16, kind: &str) -> String {
    for header in ["x-orproxy-request-id", "x-orproxy-route"] {
        assert!(
            response.headers().contains_key(header),
            "no {header}: {:?}",
            response.headers()
        );
    }
    anthropic_error(response, status, kind).await
}

/// An answer the provider cut short (OpenRouter's `finish_reason: "error"` in a 200) cannot be
/// told from a complete one once translated: a Messages client gets the error (or the next
/// target of its chain), never a clean `end_turn`. An OpenAI client gets the answer as it came.
#[tokio::test]
async fn an_answer_cut_short_is_an_error_for_a_messages_client() {
    let or = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&or, "");
    let cut = "fake/midstream-error";
    let response = post_messages(&daemon, &message(cut, "hi", false)).await;
    let text = pipeline_error(response, 502, "api_error").await;
    assert!(text.contains("Provider returned error"), "{text}");
    let response = post_messages(&daemon, &message(&format!("{cut}|fake/echo"), "hi", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/echo"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["stop_reason"], "end_turn", "{body:#}");

    let response = post(&daemon, &chat(cut, "hi", false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "error", "{body:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_proxy_key_is_an_anthropic_authentication_error() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = Daemon::start(
        Options::config(openrouter_config(
            &fake.base_url(),
            "auth:\n  keys:\n    - { name: team-a, key_env: TEAM_A_KEY }\n",
        ))
        .env("FAKE_OR_KEY", FAKE_API_KEY)
        .env("TEAM_A_KEY", "sk-team-a-secret"),
    );
    let http = client();
    let body = message("fake/echo", "hi", false);
    for key in [Some("sk-wrong"), None] {
        let mut request = http
            .post(daemon.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let response = request.json(&body).send().await.unwrap();
        pipeline_error(response, 401, "authentication_error").await;
    }
    assert!(chat_requests(&fake).is_empty());
    // The right key, as Anthropic SDKs send it, is served.
    let served = http
        .post(daemon.url("/v1/messages"))
        .header("x-api-key", "sk-team-a-secret")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let answer: Value = served.json().await.unwrap();
    assert_eq!(answer["content"][0]["text"], "echo: hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_bodies_are_invalid_request_errors_naming_the_field() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let http = client();
    let raw = |body: &'static str| {
        http.post(daemon.url("/v1/messages"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    pipeline_error(
        raw(r#"{"model": "fake/echo", "messages": ["#)
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;

    let message = pipeline_error(
        raw(r#"{"model": "fake/echo", "max_tokens": 10}"#)
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;
    assert!(message.contains("messages"), "{message}");

    let unknown_block = json!({
        "model": "fake/echo", "max_tokens": 10,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "hologram", "data": "..."},
        ]}],
    });
    let message = pipeline_error(
        post_messages(&daemon, &unknown_block).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        message.contains("messages[0].content[1]") && message.contains("hologram"),
        "{message}"
    );

    let bad_type = json!({
        "model": "fake/echo", "max_tokens": "ten",
        "messages": [{"role": "user", "content": "hi"}],
    });
    let message = pipeline_error(
        post_messages(&daemon, &bad_type).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(message.contains("max_tokens"), "{message}");
    assert!(
        chat_requests(&fake).is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rate_limit_is_a_rate_limit_error_with_retry_after() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = post_messages(&daemon, &message("fake/status-429-retry-1", "hi", false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/status-429-retry-1"
    );
    let message = pipeline_error(response, 429, "rate_limit_error").await;
    assert!(!message.is_empty());
    assert_eq!(chat_requests(&fake).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_is_a_timeout_error() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "limits:\n  first_byte_timeout: 300ms\n");
    for stream in [false, true] {
        let response = post_messages(&daemon, &message("fake/hang", "hi", stream)).await;
        let message = pipeline_error(response, 504, "timeout_error").await;
        assert!(message.contains("first_byte_timeout"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exceeded_budget_is_a_billing_error() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(
        &fake,
        "pricing:\n  - { match: \"^openrouter:\", input_usd_per_mtok: 1, output_usd_per_mtok: 2 }\nbudgets:\n  - { name: tiny, scope: global, limit_usd: 0.000001, period: total }\n",
    );
    // The cap admits requests until it is spent (it may be passed by one request's worst
    // case, SPEC §9): the first request spends it.
    let first = post_messages(&daemon, &message("fake/echo", "spend it all", false)).await;
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    spent_at_least(&daemon, "tiny", 1_000).await;

    let response = post_messages(&daemon, &message("fake/echo", "one more", false)).await;
    let message = pipeline_error(response, 402, "billing_error").await;
    assert!(message.contains("tiny"), "{message}");
    assert_eq!(
        chat_requests(&fake).len(),
        1,
        "the refused request stayed home"
    );
}

/// Waits until budget `name` has settled at least `nanos` of spend and holds no reservation.
async fn spent_at_least(daemon: &Daemon, name: &str, nanos: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = daemon.admin_json("/admin/budgets").await;
        let budget = all["budgets"]
            .as_array()
            .and_then(|list| list.iter().find(|b| b["name"] == name))
            .unwrap_or_else(|| panic!("no budget {name}: {all:#}"))
            .clone();
        if budget["spent_nanos"].as_i64().unwrap_or(0) >= nanos && budget["reserved_nanos"] == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "budget never spent: {budget:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_midstream_error_ends_the_messages_stream_with_an_error_event() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = post_messages(
        &daemon,
        &message("fake/midstream-error", "one two three four", true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let events = sse(response).await;
    let checked =
        check_grammar(&events, true).unwrap_or_else(|e| panic!("{e}\nstream: {events:#?}"));
    assert_eq!(checked.blocks.len(), 1, "{events:#?}");
    assert_eq!(checked.blocks[0].kind, "text");
    assert!(!checked.blocks[0].text.is_empty(), "content came first");
    let error = checked.error.unwrap();
    assert_eq!(error["message"], "Provider returned error", "{error}");
    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&rows, &id);
    assert_eq!(row.outcome, "midstream_error", "{row:?}");
}

/// Translated streams end in the grammar whatever the upstream does: a stream without
/// `[DONE]` is closed properly, a cut one ends with an error event, never a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_streams_end_properly_when_the_upstream_does_not() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = post_messages(&daemon, &message("fake/no-done", "a b c", true)).await;
    assert_eq!(response.status(), 200);
    let events = sse(response).await;
    let checked = valid(&events);
    assert_eq!(checked.blocks[0].text, "echo: a b c");
    assert_eq!(checked.stop_reason.as_deref(), Some("end_turn"));

    let response = post_messages(&daemon, &message("fake/cut-after-3", "x", true)).await;
    assert_eq!(response.status(), 200);
    let events = sse(response).await;
    let checked =
        check_grammar(&events, true).unwrap_or_else(|e| panic!("{e}\nstream: {events:#?}"));
    assert!(!checked.blocks[0].text.is_empty(), "{events:#?}");
}

// === 5. Ledger rows ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_messages_request_is_one_ledger_row_with_the_upstream_cost() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let plain = post_messages(&daemon, &message("fake/echo", "count me in", false)).await;
    assert_eq!(plain.status(), 200);
    let plain_id = request_id(&plain);
    plain.bytes().await.unwrap();
    let streamed = post_messages(&daemon, &message("fake/echo", "count me too", true)).await;
    assert_eq!(streamed.status(), 200);
    let streamed_id = request_id(&streamed);
    valid(&sse(streamed).await);

    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(rows.len(), 2, "one row per request: {rows:#?}");
    let billing = fake.billing();
    assert_eq!(billing.len(), 2, "{billing:?}");
    for (id, stream, bill) in [
        (&plain_id, false, &billing[0]),
        (&streamed_id, true, &billing[1]),
    ] {
        let row = row_of(&rows, id);
        assert_eq!((row.status, row.outcome.as_str()), (200, "ok"), "{row:?}");
        assert_eq!(row.stream, stream, "{row:?}");
        assert_eq!(row.backend.as_deref(), Some("openrouter"), "{row:?}");
        assert_eq!(
            row.prompt_tokens,
            Some(bill.prompt_tokens as i64),
            "{row:?}"
        );
        assert_eq!(
            row.completion_tokens,
            Some(bill.completion_tokens as i64),
            "{row:?}"
        );
        assert!(row.prompt_tokens.unwrap() > 0 && row.completion_tokens.unwrap() > 0);
        assert_eq!(row.cost_source, "upstream", "{row:?}");
        assert_eq!(row.cost_nanos, billed_nanos(bill), "{row:?}");
        assert!(row.cost_nanos > 0);
    }
}

/// Anthropic reports no cost: a prompt partly written to its cache is priced from `pricing:`,
/// the written part at the cache-write price (the fake writes half the prompt when the request
/// marks a cache breakpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_cache_writes_are_priced_at_the_cache_write_price() {
    let fake = FakeAnthropic::start().await.unwrap();
    let daemon = daemon_for_anthropic(
        &fake,
        "pricing:\n  - { match: \"^claude:\", input_usd_per_mtok: 3, output_usd_per_mtok: 15, \
         cache_write_usd_per_mtok: 3.75, cache_write_1h_usd_per_mtok: 6 }\n",
    );
    // Kept five minutes (1.25× input here), then an hour (2×).
    for (cache_control, write_price) in [
        (json!({"type": "ephemeral"}), 3_750),
        (json!({"type": "ephemeral", "ttl": "1h"}), 6_000),
    ] {
        let mut body = message(FAKE_ANTHROPIC_MODEL, "a prompt worth caching", false);
        body["system"] = json!([{"type": "text", "text": "A long and stable system prompt.",
                                 "cache_control": cache_control}]);
        let response = post_messages(&daemon, &body).await;
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let answer: Value = response.json().await.unwrap();
        let written = answer["usage"]["cache_creation_input_tokens"]
            .as_i64()
            .unwrap();
        assert!(written > 0, "{answer:#}");
        let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
        let row = row_of(&rows, &id);
        let (prompt, output) = (row.prompt_tokens.unwrap(), row.completion_tokens.unwrap());
        assert_eq!(row.cost_source, "pricing", "{row:?}");
        assert_eq!(
            row.cost_nanos,
            (prompt - written) * 3_000 + written * write_price + output * 15_000,
            "{row:?}"
        );
    }
}

// === 6. OpenAI client, Anthropic backend ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_is_served_by_an_anthropic_backend() {
    let fake = FakeAnthropic::start().await.unwrap();
    let daemon = daemon_for_anthropic(
        &fake,
        "pricing:\n  - { match: \"^claude:\", input_usd_per_mtok: 3, output_usd_per_mtok: 15 }\n",
    );
    let http = client();
    let body = json!({
        "model": FAKE_ANTHROPIC_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello anthropic"},
        ],
    });
    let response = http
        .post(daemon.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        format!("claude:{FAKE_ANTHROPIC_MODEL}").as_str()
    );
    let plain_id = request_id(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer:#}");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "echo: hello anthropic",
        "{answer:#}"
    );
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let sent = anthropic_requests(&fake, "/v1/messages");
    assert_eq!(sent.len(), 1);
    let received = sent[0].json();
    assert_eq!(received["model"], FAKE_ANTHROPIC_MODEL);
    assert!(received["max_tokens"].as_u64().unwrap() > 0, "{received:#}");
    assert!(
        received["system"] == "Be brief." || received["system"][0]["text"] == "Be brief.",
        "{received:#}"
    );
    let roles: Vec<&Value> = received["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["role"])
        .collect();
    assert_eq!(roles, [&json!("user")], "{received:#}");
    assert_eq!(sent[0].header("x-api-key"), Some(FAKE_ANTHROPIC_KEY));
    assert!(sent[0].header("anthropic-version").is_some());
    assert!(sent[0].header("authorization").is_none());

    // Streamed.
    let mut streamed_body = chat(FAKE_ANTHROPIC_MODEL, "stream this please", true);
    streamed_body["stream_options"] = json!({"include_usage": true});
    let response = http
        .post(daemon.url("/v1/chat/completions"))
        .json(&streamed_body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let streamed_id = request_id(&response);
    let (got, error) = events(response).await;
    assert_eq!(error, None);
    assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n", "{got:?}");
    let chunks: Vec<Value> = got
        .iter()
        .filter(|(_, e)| e.starts_with("data: {"))
        .map(|(_, e)| serde_json::from_str(e.trim_start_matches("data: ").trim()).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{chunks:#?}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: stream this please");
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert!(content_chunks >= 2, "streamed in pieces: {chunks:#?}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop"),
        "{chunks:#?}"
    );
    assert!(
        chunks.iter().any(|c| c["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0)),
        "usage was asked for: {chunks:#?}"
    );
    let sent = anthropic_requests(&fake, "/v1/messages");
    assert_eq!(sent.len(), 2);
    let received = sent[1].json();
    assert_eq!(received["stream"], true);
    assert!(received["max_tokens"].as_u64().unwrap() > 0);
    assert!(received.get("stream_options").is_none(), "{received:#}");

    // Priced by `pricing:` (Anthropic reports no cost).
    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for id in [&plain_id, &streamed_id] {
        let row = row_of(&rows, id);
        assert_eq!((row.status, row.outcome.as_str()), (200, "ok"), "{row:?}");
        let (input, output) = (row.prompt_tokens.unwrap(), row.completion_tokens.unwrap());
        assert!(input > 0 && output > 0, "{row:?}");
        assert_eq!(row.cost_source, "pricing", "{row:?}");
        assert_eq!(row.cost_nanos, input * 3_000 + output * 15_000, "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_answer_without_a_price_costs_nothing_known() {
    let fake = FakeAnthropic::start().await.unwrap();
    let daemon = daemon_for_anthropic(&fake, "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat(FAKE_ANTHROPIC_MODEL, "what does it cost", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&rows, &id);
    assert!(row.prompt_tokens.unwrap() > 0 && row.completion_tokens.unwrap() > 0);
    assert_eq!(row.cost_source, "none", "{row:?}");
    assert_eq!(row.cost_nanos, 0, "{row:?}");
}

// === 7. Pass-through: Messages client, Anthropic backend ===

/// A Messages body with fields the translation would drop, to prove nothing is.
fn passthrough_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 300,
        "stream": stream,
        "system": [{"type": "text", "text": "Cached preamble.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "pass me through", "cache_control": {"type": "ephemeral"}}]},
        ],
        "metadata": {"user_id": "u-42"},
        "top_k": 5,
        "service_tier": "auto",
        "container": null,
        "x_future_field": {"nested": [1, 2.5, "three"]},
    })
}

/// POSTs `body` straight to the fake Anthropic.
async fn direct(fake: &FakeAnthropic, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/messages", fake.base_url()))
        .header("x-api-key", FAKE_ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Event data with the per-message id removed, pings left out.
fn comparable(events: &[Sse]) -> Vec<(String, Value)> {
    events
        .iter()
        .filter(|e| e.name != "ping")
        .map(|e| {
            let mut data = e.data.clone();
            if let Some(message) = data.get_mut("message").and_then(Value::as_object_mut) {
                message.remove("id");
            }
            (e.name.clone(), data)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_client_on_an_anthropic_backend_is_passed_through_untouched() {
    let ant = FakeAnthropic::start().await.unwrap();
    let or = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_both(&or, &ant, "");
    let http = client();
    let beta = "prompt-caching-2024-07-31,extended-cache-ttl-2025-04-11";
    let selector = format!("claude:{FAKE_ANTHROPIC_MODEL}");

    // Not streamed.
    let body = passthrough_body(&selector, false);
    let response = http
        .post(daemon.url("/v1/messages"))
        .header("x-api-key", "sk-client-key-not-forwarded")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", beta)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-orproxy-route"], selector.as_str());
    let plain_id = request_id(&response);
    let proxied: Value = response.json().await.unwrap();

    let mut expected = body.clone();
    expected["model"] = json!(FAKE_ANTHROPIC_MODEL);
    let sent = anthropic_requests(&ant, "/v1/messages");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].json(),
        expected,
        "the client's body reaches Anthropic unchanged but for the model"
    );
    assert_eq!(sent[0].header("anthropic-beta"), Some(beta));
    assert_eq!(sent[0].header("x-api-key"), Some(FAKE_ANTHROPIC_KEY));
    assert_eq!(sent[0].header("anthropic-version"), Some("2023-06-01"));

    let mut straight: Value = direct(&ant, &expected).await.json().await.unwrap();
    let mut proxied_cmp = proxied.clone();
    for v in [&mut straight, &mut proxied_cmp] {
        v.as_object_mut().unwrap().remove("id");
    }
    assert_eq!(
        proxied_cmp, straight,
        "the answer comes back as Anthropic sent it"
    );
    assert!(proxied["id"].as_str().unwrap().starts_with("msg_"));
    assert!(
        proxied["usage"]["cache_creation_input_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{proxied:#}"
    );

    // Streamed.
    let body = passthrough_body(&selector, true);
    let response = http
        .post(daemon.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", beta)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let streamed_id = request_id(&response);
    let proxied = sse(response).await;
    let checked = valid(&proxied);
    assert_eq!(checked.blocks[0].text, "echo: pass me through");

    let mut expected = body.clone();
    expected["model"] = json!(FAKE_ANTHROPIC_MODEL);
    let sent = anthropic_requests(&ant, "/v1/messages");
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[2].json(), expected);
    assert_eq!(sent[2].header("anthropic-beta"), Some(beta));
    let straight = sse(direct(&ant, &expected).await).await;
    assert_eq!(
        comparable(&proxied),
        comparable(&straight),
        "every event (pings aside) comes back as Anthropic sent it"
    );
    assert!(chat_requests(&or).is_empty(), "OpenRouter was not involved");

    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let plain = row_of(&rows, &plain_id);
    let usage = &proxied_cmp["usage"];
    let prompt = usage["input_tokens"].as_i64().unwrap()
        + usage["cache_creation_input_tokens"].as_i64().unwrap()
        + usage["cache_read_input_tokens"].as_i64().unwrap();
    assert_eq!(plain.prompt_tokens, Some(prompt), "{plain:?}");
    assert_eq!(
        plain.completion_tokens,
        usage["output_tokens"].as_i64(),
        "{plain:?}"
    );
    let streamed = row_of(&rows, &streamed_id);
    assert_eq!(
        (streamed.status, streamed.outcome.as_str(), streamed.stream),
        (200, "ok", true),
        "{streamed:?}"
    );
    assert_eq!(streamed.prompt_tokens, Some(prompt), "{streamed:?}");
    assert_eq!(
        streamed.completion_tokens,
        checked.final_usage["output_tokens"].as_i64(),
        "{streamed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_through_tool_call_stream_is_relayed_unchanged() {
    let ant = FakeAnthropic::start().await.unwrap();
    let daemon = daemon_for_anthropic(&ant, "");
    let mut body = claude_code_request(FAKE_ANTHROPIC_MODEL);
    // Anthropic refuses thinking with a forced tool; the fake does not care, the daemon must not either.
    body["tool_choice"] = json!({"type": "auto"});
    let response = post_messages(&daemon, &body).await;
    assert_eq!(response.status(), 200);
    let proxied = sse(response).await;
    let checked = valid(&proxied);
    let kinds: Vec<&str> = checked.blocks.iter().map(|b| b.kind.as_str()).collect();
    assert_eq!(kinds, ["thinking", "tool_use"]);
    assert!(checked.blocks[0].signature.starts_with("fakesig"));
    let input: Value = serde_json::from_str(&checked.blocks[1].partial_json).unwrap();
    assert_eq!(input, json!({"q": CC_USER_TEXT}));
    assert_eq!(checked.stop_reason.as_deref(), Some("tool_use"));
    let sent = anthropic_requests(&ant, "/v1/messages");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json(), body);
    let straight = sse(direct(&ant, &body).await).await;
    // Tool ids are per answer: compare everything else.
    let strip = |events: &[Sse]| {
        comparable(events)
            .into_iter()
            .map(|(name, mut data)| {
                if let Some(block) = data.get_mut("content_block").and_then(Value::as_object_mut) {
                    block.remove("id");
                }
                (name, data)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&proxied), strip(&straight));
}

/// Errors of an Anthropic backend reach a Messages client in Anthropic's own terms: a 529
/// stays `overloaded_error` (streamed or not, before content), and an error event after
/// content ends the relayed stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_anthropic_errors_reach_a_messages_client_in_anthropic_terms() {
    let ant = FakeAnthropic::start().await.unwrap();
    let daemon = daemon_for_anthropic(&ant, "");
    for stream in [false, true] {
        let response = post_messages(&daemon, &message("fake/status-529", "hi", stream)).await;
        let text = pipeline_error(response, 529, "overloaded_error").await;
        assert!(!text.is_empty());
    }
    let response = post_messages(&daemon, &message("fake/status-429", "hi", false)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    pipeline_error(response, 429, "rate_limit_error").await;

    let response = post_messages(
        &daemon,
        &message("fake/overloaded-midstream", "some words here", true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let events = sse(response).await;
    let checked =
        check_grammar(&events, true).unwrap_or_else(|e| panic!("{e}\nstream: {events:#?}"));
    assert!(!checked.blocks[0].text.is_empty(), "{events:#?}");
    assert_eq!(checked.error.unwrap()["type"], "overloaded_error");
    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(row_of(&rows, &id).outcome, "midstream_error");
}

// === 8. count_tokens ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_asks_anthropic_or_estimates() {
    let ant = FakeAnthropic::start().await.unwrap();
    let or = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_both(&or, &ant, "");
    let http = client();
    let body = json!({
        "model": format!("claude:{FAKE_ANTHROPIC_MODEL}"),
        "system": "abcd",
        "messages": [{"role": "user", "content": "12345678"}],
    });
    let response = http
        .post(daemon.url("/v1/messages/count_tokens"))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer: Value = response.json().await.unwrap();
    // The fake's count: ceil((4 + 8) / 4).
    assert_eq!(answer, json!({"input_tokens": 3}));
    let line =
        daemon.wait_log(|v| v["message"] == "Token count answered." && v["request_id"] == id);
    assert_eq!(line["route"], format!("claude:{FAKE_ANTHROPIC_MODEL}"));
    assert_eq!(line["status"], 200);
    let sent = anthropic_requests(&ant, "/v1/messages/count_tokens");
    assert_eq!(sent.len(), 1, "forwarded to Anthropic's count_tokens");
    let mut expected = body.clone();
    expected["model"] = json!(FAKE_ANTHROPIC_MODEL);
    assert_eq!(sent[0].json(), expected);
    assert_eq!(sent[0].header("x-api-key"), Some(FAKE_ANTHROPIC_KEY));
    assert!(sent[0].header("anthropic-version").is_some());

    // An OpenAI backend has no counter: orproxy estimates.
    let long = "a fairly long sentence to count ".repeat(20);
    let body = json!({
        "model": "fake/echo",
        "messages": [{"role": "user", "content": long}],
    });
    let response = http
        .post(daemon.url("/v1/messages/count_tokens"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let tokens = answer["input_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("{answer}"));
    assert!((100..1000).contains(&tokens), "{answer}");
    assert_eq!(answer.as_object().unwrap().len(), 1, "{answer}");
    assert!(fake_or_untouched(&or), "an estimate sends nothing upstream");
    assert_eq!(
        anthropic_requests(&ant, "/v1/messages/count_tokens").len(),
        1
    );

    // A bad body is an Anthropic error here too.
    let response = http
        .post(daemon.url("/v1/messages/count_tokens"))
        .json(&json!({"model": "fake/echo"}))
        .send()
        .await
        .unwrap();
    anthropic_error(response, 400, "invalid_request_error").await;
}

/// `count_tokens` is part of the client API: its answers carry the request id and the route
/// like every other response (SPEC §7), errors included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_answers_carry_the_request_id_and_route() {
    let ant = FakeAnthropic::start().await.unwrap();
    let or = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_both(&or, &ant, "");
    let http = client();
    let ask = |body: Value| {
        http.post(daemon.url("/v1/messages/count_tokens"))
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let cases = [
        (
            json!({"model": format!("claude:{FAKE_ANTHROPIC_MODEL}"), "messages": [{"role": "user", "content": "hi"}]}),
            200,
        ),
        (
            json!({"model": "fake/echo", "messages": [{"role": "user", "content": "hi"}]}),
            200,
        ),
        (json!({"model": "fake/echo"}), 400),
    ];
    for (body, status) in cases {
        let response = ask(body.clone()).await.unwrap();
        assert_eq!(response.status(), status, "{body}");
        for header in ["x-orproxy-request-id", "x-orproxy-route"] {
            assert!(
                response.headers().contains_key(header),
                "no {header} on the answer to {body}: {:?}",
                response.headers()
            );
        }
    }
}

fn fake_or_untouched(fake: &FakeOpenRouter) -> bool {
    chat_requests(fake).is_empty()
}

// === 9. Failover from Anthropic to OpenRouter ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_anthropic_target_fails_over_to_openrouter_with_a_translated_stream() {
    let ant = FakeAnthropic::start().await.unwrap();
    let or = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_both(&or, &ant, "");
    let body = message(
        "claude:fake/status-529|openrouter:fake/echo",
        "fail over",
        true,
    );
    let response = post_messages(&daemon, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/echo"
    );
    let id = request_id(&response);
    let events = sse(response).await;
    let checked = valid(&events);
    assert_eq!(checked.blocks.len(), 1, "{events:#?}");
    assert_eq!(checked.blocks[0].text, "echo: fail over");
    assert_eq!(checked.stop_reason.as_deref(), Some("end_turn"));

    let native = anthropic_requests(&ant, "/v1/messages");
    assert_eq!(native.len(), 1, "the native attempt was made");
    let mut expected = body.clone();
    expected["model"] = json!("fake/status-529");
    assert_eq!(native[0].json(), expected, "untranslated");
    let translated = chat_requests(&or);
    assert_eq!(translated.len(), 1);
    let sent = translated[0].json();
    assert_eq!(sent["model"], "fake/echo");
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let rows = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&rows, &id);
    assert_eq!((row.status, row.outcome.as_str()), (200, "ok"), "{row:?}");
    let attempts = row.attempts.as_array().unwrap_or_else(|| panic!("{row:?}"));
    assert_eq!(attempts.len(), 2, "{row:?}");
    assert_eq!(attempts[0]["route"], "claude:fake/status-529");
    assert_ne!(attempts[0]["result"], "ok");
    assert_eq!(attempts[1]["route"], "openrouter:fake/echo");
    assert_eq!(row.cost_source, "upstream", "{row:?}");

    // Not streamed, the same.
    let body = message(
        "claude:fake/status-529|openrouter:fake/echo",
        "again",
        false,
    );
    let response = post_messages(&daemon, &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["content"][0]["text"], "echo: again");
}

// === The validator itself ===

#[test]
fn the_grammar_check_catches_violations() {
    let ev = |name: &str, data: Value| Sse {
        name: name.into(),
        data,
    };
    let start = ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": []}}),
    );
    let block = |i: u64| {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
        )
    };
    let text = |i: u64| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": "x"}}),
        )
    };
    let json_delta = |i: u64| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": "{"}}),
        )
    };
    let stop = |i: u64| {
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        )
    };
    let delta = ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
    );
    let end = ev("message_stop", json!({"type": "message_stop"}));
    let ping = ev("ping", json!({"type": "ping"}));
    let good = vec![
        start.clone(),
        block(0),
        ping.clone(),
        text(0),
        stop(0),
        block(1),
        text(1),
        stop(1),
        delta.clone(),
        end.clone(),
    ];
    let checked = check_grammar(&good, false).unwrap();
    assert_eq!(checked.blocks.len(), 2);
    let bad: Vec<Vec<Sse>> = vec![
        vec![block(0), text(0), stop(0), delta.clone(), end.clone()],
        vec![
            start.clone(),
            block(0),
            block(1),
            stop(1),
            delta.clone(),
            end.clone(),
        ],
        vec![start.clone(), block(1), stop(1), delta.clone(), end.clone()],
        vec![
            start.clone(),
            block(0),
            json_delta(0),
            stop(0),
            delta.clone(),
            end.clone(),
        ],
        vec![start.clone(), block(0), text(0), delta.clone(), end.clone()],
        vec![start.clone(), block(0), stop(0), end.clone()],
        vec![start.clone(), block(0), stop(0), delta.clone()],
        vec![
            start.clone(),
            block(0),
            stop(0),
            delta.clone(),
            end.clone(),
            ping.clone(),
        ],
        vec![
            start.clone(),
            block(0),
            stop(0),
            delta.clone(),
            delta.clone(),
            end.clone(),
        ],
    ];
    for events in bad {
        assert!(check_grammar(&events, false).is_err(), "{events:#?}");
    }
    let error = ev(
        "error",
        json!({"type": "error", "error": {"type": "api_error", "message": "boom"}}),
    );
    let cut = vec![start, block(0), text(0), error];
    assert!(check_grammar(&cut, false).is_err());
    assert!(check_grammar(&cut, true).is_ok());
    assert!(check_grammar(&good, true).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_model_that_served_not_the_selector() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "limits:\n  first_byte_timeout: 500ms\n");
    for selector in [
        "openai/gpt-4o?temperature=0.3&max_tokens=7",
        "fake/hang|openai/gpt-4o",
        "openrouter:openai/gpt-4o",
    ] {
        let response = post_messages(&daemon, &message(selector, "hi", false)).await;
        assert_eq!(response.status(), 200, "{selector}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["model"], "openai/gpt-4o", "{selector}: {body:#}");
        let response = post_messages(&daemon, &message(selector, "hi", true)).await;
        let checked = valid(&sse(response).await);
        assert_eq!(checked.message["model"], "openai/gpt-4o", "{selector}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_to_a_stream_request_is_replayed_as_a_stream_naming_its_route() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for_openrouter(&fake, "");
    let response = post_messages(&daemon, &message("fake/ignore-stream", "one two", true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/ignore-stream"
    );
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let checked = valid(&sse(response).await);
    assert_eq!(checked.blocks.len(), 1, "{checked:#?}");
    assert_eq!(checked.blocks[0].text, "echo: one two");
    assert_eq!(checked.stop_reason.as_deref(), Some("end_turn"));
    assert!(checked.final_usage["output_tokens"].as_u64().unwrap() > 0);

    // Chat clients get the chunks, the usage chunk they asked for, and [DONE].
    let mut body = chat("fake/ignore-stream", "one two", true);
    body["stream_options"] = json!({"include_usage": true});
    let response = post(&daemon, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/ignore-stream"
    );
    let (raw, error) = events(response).await;
    assert_eq!(error, None);
    let data: Vec<&str> = raw
        .iter()
        .filter_map(|(_, e)| e.trim_end().strip_prefix("data: "))
        .collect();
    assert_eq!(data.len(), 3, "{raw:?}");
    let first: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["content"], "echo: one two");
    assert_eq!(first["choices"][0]["finish_reason"], "stop");
    let usage: Value = serde_json::from_str(data[1]).unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(data[2], "[DONE]");
}
