use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("output is JSON")
}

fn translate(request: &Value) -> Result<Value, TranslateError> {
    let body = serde_json::to_vec(request).expect("serializable");
    request_to_openai(&body).map(|out| parse(&out.to_bytes()))
}

/// The context of a request for `model` without stop sequences.
pub(super) fn context(model: &str) -> AnswerContext {
    AnswerContext {
        model: model.to_owned(),
        stop_sequence: None,
    }
}

fn request_error(request: Value) -> String {
    translate(&request).expect_err("must fail").to_string()
}

/// A Claude Code–style turn: cached system blocks, tools, a picture, thinking, and two rounds
/// of tool calls in the history.
const AGENT_REQUEST: &str = r#"{
  "model": "anthropic/claude-sonnet-4",
  "max_tokens": 1024,
  "system": [
    {"type": "text", "text": "You are a helpful agent."},
    {"type": "text", "text": "Long instructions.", "cache_control": {"type": "ephemeral"}}
  ],
  "messages": [
    {"role": "user", "content": [
      {"type": "text", "text": "What is in this picture, and what is the weather in Paris?"},
      {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    ]},
    {"role": "assistant", "content": [
      {"type": "thinking", "thinking": "The user wants two things.", "signature": "EqQBCgIYAhIM"},
      {"type": "text", "text": "A cat. Let me check the weather."},
      {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}}
    ]},
    {"role": "user", "content": [
      {"type": "tool_result", "tool_use_id": "toolu_01A",
       "content": [{"type": "text", "text": "18°C"}, {"type": "text", "text": "sunny"}],
       "cache_control": {"type": "ephemeral"}},
      {"type": "text", "text": "And in Rome? Here is the map."},
      {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}}
    ]},
    {"role": "assistant", "content": [
      {"type": "redacted_thinking", "data": "abc"},
      {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"city": "Rome"}}
    ]},
    {"role": "user", "content": [
      {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "22°C"}
    ]}
  ],
  "tools": [
    {"name": "get_weather", "description": "Current weather",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
     "cache_control": {"type": "ephemeral"}}
  ],
  "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
  "thinking": {"type": "enabled", "budget_tokens": 2048},
  "stop_sequences": ["</answer>"],
  "temperature": 1,
  "top_k": 40,
  "metadata": {"user_id": "user-42"},
  "service_tier": "auto",
  "stream": true
}"#;

const AGENT_REQUEST_OPENAI: &str = r#"{
  "model": "anthropic/claude-sonnet-4",
  "messages": [
    {"role": "system", "content": [
      {"type": "text", "text": "You are a helpful agent."},
      {"type": "text", "text": "Long instructions.", "cache_control": {"type": "ephemeral"}}
    ]},
    {"role": "user", "content": [
      {"type": "text", "text": "What is in this picture, and what is the weather in Paris?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ]},
    {"role": "assistant", "content": "A cat. Let me check the weather.", "tool_calls": [
      {"id": "toolu_01A", "type": "function",
       "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"unit\":\"c\"}"}}
    ], "reasoning_details": [
      {"type": "reasoning.text", "text": "The user wants two things.", "signature": "EqQBCgIYAhIM",
       "format": "anthropic-claude-v1", "index": 0}
    ]},
    {"role": "tool", "tool_call_id": "toolu_01A", "content": [
      {"type": "text", "text": "18°C"},
      {"type": "text", "text": "sunny", "cache_control": {"type": "ephemeral"}}
    ]},
    {"role": "user", "content": [
      {"type": "text", "text": "And in Rome? Here is the map."},
      {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}}
    ]},
    {"role": "assistant", "content": null, "tool_calls": [
      {"id": "toolu_01B", "type": "function",
       "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}
    ], "reasoning_details": [
      {"type": "reasoning.encrypted", "data": "abc", "format": "anthropic-claude-v1", "index": 0}
    ]},
    {"role": "tool", "tool_call_id": "toolu_01B", "content": "22°C"}
  ],
  "max_tokens": 1024,
  "stop": ["</answer>"],
  "temperature": 1,
  "top_k": 40,
  "user": "user-42",
  "tools": [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
  ],
  "tool_choice": "auto",
  "parallel_tool_calls": false,
  "reasoning": {"max_tokens": 2048},
  "stream": true,
  "stream_options": {"include_usage": true}
}"#;

#[test]
fn agent_request_translates_to_the_recorded_openai_body() {
    let out = request_to_openai(AGENT_REQUEST.as_bytes()).expect("translates");
    assert_eq!(
        parse(&out.to_bytes()),
        parse(AGENT_REQUEST_OPENAI.as_bytes())
    );
    let keys: Vec<&str> = out.iter().map(|(key, _)| key).collect();
    assert_eq!(keys[..2], ["model", "messages"]);
}

#[test]
fn plain_requests_stay_plain() {
    let out = translate(&json!({
        "model": "m",
        "max_tokens": 10,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
            {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        ],
        "stream": false,
    }))
    .expect("translates");
    assert_eq!(
        out,
        json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello\nthere"},
                {"role": "user", "content": "Bye"},
            ],
            "max_tokens": 10,
            "stream": false,
        })
    );
}

#[test]
fn tool_result_images_follow_the_tool_message() {
    let out = translate(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "is_error": true, "content": [
                {"type": "text", "text": "screenshot:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
            ]},
        ]}],
    }))
    .expect("translates");
    assert_eq!(
        out["messages"],
        json!([
            {"role": "tool", "tool_call_id": "t1", "content": "screenshot:"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
            ]},
        ])
    );
}

#[test]
fn choices_documents_and_adaptive_thinking_translate() {
    let out = translate(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "document", "title": "spec.pdf",
             "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
        ]}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "max"},
    }))
    .expect("translates");
    assert_eq!(
        out["messages"][0]["content"],
        json!([
            {"type": "file", "file": {"filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
            {"type": "text", "text": "notes"},
        ])
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(out["reasoning"], json!({"effort": "xhigh"}));
    for (anthropic, openai) in [("any", "required"), ("none", "none"), ("auto", "auto")] {
        let out =
            translate(&json!({"model": "m", "messages": [], "tool_choice": {"type": anthropic}}))
                .expect("translates");
        assert_eq!(out["tool_choice"], openai);
        assert_eq!(out.get("parallel_tool_calls"), None);
    }
}

/// The schema the `anthropic` SDK sends for `messages.parse(output_format=Person)`.
fn person_schema() -> Value {
    json!({"type": "object", "title": "Person", "additionalProperties": false,
           "properties": {"name": {"type": "string", "title": "Name"}, "age": {"type": "integer", "title": "Age"}},
           "required": ["name", "age"]})
}

#[test]
fn structured_outputs_and_strict_tools_translate() {
    let expected = json!({
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": person_schema(), "strict": true},
    });
    let format = json!({"type": "json_schema", "schema": person_schema()});
    let base = json!({"model": "m", "messages": [{"role": "user", "content": "Ann, 31"}]});
    let with = |key: &str, value: &Value| {
        let mut request = base.clone();
        request[key] = value.clone();
        request
    };
    for request in [
        with("output_config", &json!({"format": format, "effort": "low"})),
        with("output_format", &format),
    ] {
        let out = translate(&request).expect("translates");
        assert_eq!(out["response_format"], expected, "{request}");
    }
    // A schema without a usable title still needs a name on the OpenAI side.
    let untitled =
        json!({"type": "json_schema", "schema": {"type": "object", "title": "a person"}});
    let out = translate(&with("output_config", &json!({"format": untitled}))).expect("translates");
    assert_eq!(out["response_format"]["json_schema"]["name"], "output");
    let tool = |strict: Value| {
        with(
            "tools",
            &json!([{"name": "f", "input_schema": person_schema(), "strict": strict}]),
        )
    };
    let out = translate(&tool(json!(true))).expect("translates");
    assert_eq!(out["tools"][0]["function"]["strict"], true);
    let out = translate(&tool(Value::Null)).expect("translates");
    assert_eq!(out["tools"][0]["function"].get("strict"), None);
}

#[test]
fn untranslatable_requests_name_the_field() {
    let user = |content: Value| json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": content}]});
    assert_eq!(
        request_error(user(json!([{"type": "foo"}]))),
        "messages[2].content[0]: unknown block type `foo`"
    );
    assert_eq!(
        request_error(user(
            json!([{"type": "text", "text": "a"}, {"type": "tool_use", "id": "t", "name": "n", "input": {}}])
        )),
        "messages[2].content[1]: `tool_use` blocks are not allowed in user content"
    );
    assert_eq!(
        request_error(user(json!([{"type": "text"}]))),
        "messages[2].content[0].text: required"
    );
    assert!(
        request_error(user(
            json!([{"type": "image", "source": {"type": "file", "file_id": "f"}}])
        ))
        .starts_with("messages[2].content[0].source.type: `file` sources")
    );
    assert!(
        request_error(user(json!([{"type": "web_search_tool_result"}])))
            .contains("no OpenAI equivalent")
    );
    assert_eq!(
        request_error(json!({"model": "m", "messages": [{"role": "system", "content": "x"}]})),
        "messages[0].role: must be `user` or `assistant`, not `system`"
    );
    assert_eq!(
        request_error(json!({"model": "m"})),
        "messages: required, an array of messages"
    );
    assert_eq!(request_error(json!({"messages": []})), "model: required");
    assert!(
        request_error(json!({"model": "m", "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}))
            .starts_with("tools[0]: tool type `web_search_20250305` is defined by Anthropic")
    );
    assert_eq!(
        request_error(json!({"model": "m", "messages": [], "thinking": {"type": "enabled"}})),
        "thinking.budget_tokens: required, a non-negative integer"
    );
    assert_eq!(
        request_error(json!({"model": "m", "messages": [], "temperature": "hot"})),
        "temperature: must be a number"
    );
    let format = json!({"type": "json_schema", "schema": {"type": "object"}});
    assert_eq!(
        request_error(
            json!({"model": "m", "messages": [], "output_config": {"format": format}, "output_format": format})
        ),
        "output_format: give either this or `output_config.format`, not both"
    );
    assert!(
        request_error(
            json!({"model": "m", "messages": [], "output_config": {"format": {"type": "grammar", "schema": {}}}})
        )
        .starts_with("output_config.format.type: unsupported format `grammar`")
    );
    assert_eq!(
        request_error(
            json!({"model": "m", "messages": [], "output_format": {"type": "json_schema"}})
        ),
        "output_format.schema: required, a JSON schema object"
    );
    assert_eq!(
        request_error(json!({"model": "m", "messages": [], "output_config": {"task_budget": 5}})),
        "output_config.task_budget: has no OpenAI equivalent"
    );
    assert_eq!(
        request_error(
            json!({"model": "m", "messages": [], "tools": [{"name": "f", "input_schema": {}, "strict": "yes"}]})
        ),
        "tools[0].strict: must be a boolean"
    );
    assert!(matches!(
        request_to_openai(b"{\"model\":"),
        Err(TranslateError::Json(_))
    ));
    assert_eq!(
        request_to_openai(b"[]")
            .expect_err("not an object")
            .to_string(),
        "body: must be a JSON object"
    );
}

/// An OpenRouter answer with reasoning, text and two tool calls (one with broken arguments).
const TOOL_RESPONSE: &str = r#"{
  "id": "gen-1747-abc", "provider": "Anthropic", "model": "anthropic/claude-sonnet-4",
  "object": "chat.completion", "created": 1747000000,
  "choices": [{
    "index": 0, "logprobs": null, "finish_reason": "tool_calls", "native_finish_reason": "tool_use",
    "message": {
      "role": "assistant", "content": "Let me look that up.", "refusal": null, "reasoning": "Need weather.",
      "tool_calls": [
        {"id": "toolu_01X", "index": 0, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "toolu_01Y", "index": 1, "type": "function", "function": {"name": "get_time", "arguments": "not json"}}
      ]
    }
  }],
  "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160, "cost": 0.0012,
            "prompt_tokens_details": {"cached_tokens": 100}, "completion_tokens_details": {"reasoning_tokens": 12}}
}"#;

const TOOL_RESPONSE_ANTHROPIC: &str = r#"{
  "id": "msg_gen-1747-abc", "type": "message", "role": "assistant", "model": "anthropic/claude-sonnet-4",
  "content": [
    {"type": "thinking", "thinking": "Need weather.", "signature": ""},
    {"type": "text", "text": "Let me look that up."},
    {"type": "tool_use", "id": "toolu_01X", "name": "get_weather", "input": {"city": "Paris"}},
    {"type": "tool_use", "id": "toolu_01Y", "name": "get_time", "input": {}}
  ],
  "stop_reason": "tool_use", "stop_sequence": null,
  "usage": {"input_tokens": 20, "output_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100}
}"#;

#[test]
fn tool_response_translates_to_the_recorded_anthropic_body() {
    let out = response_from_openai(TOOL_RESPONSE.as_bytes(), &context("claude-sonnet-4-5"))
        .expect("translates");
    assert_eq!(parse(&out), parse(TOOL_RESPONSE_ANTHROPIC.as_bytes()));
    assert!(out.starts_with(br#"{"id":"msg_gen-1747-abc","type":"message","role":"assistant""#));
}

#[test]
fn reasoning_details_become_thinking_and_go_back_only_within_a_tool_loop_with_thinking_on() {
    let message = json!({
        "role": "assistant", "content": "Sunny.", "reasoning": "Need weather.",
        "reasoning_details": [
            {"type": "reasoning.text", "text": "Need ", "format": "anthropic-claude-v1", "index": 0},
            {"type": "reasoning.text", "text": "weather.", "signature": "sig-0",
             "format": "anthropic-claude-v1", "index": 0},
            {"type": "reasoning.encrypted", "data": "secret", "format": "anthropic-claude-v1", "index": 1},
            {"type": "reasoning.encrypted", "data": "gAAA", "format": "openai-responses-v1", "index": 2},
            {"type": "reasoning.text", "text": " Hm.", "signature": "gem", "format": "google-gemini-v1", "index": 3}
        ]
    });
    let out = answer(json!({"index": 0, "message": message, "finish_reason": "stop"}));
    assert_eq!(
        out["content"],
        json!([
            {"type": "thinking", "thinking": "Need weather.", "signature": "sig-0"},
            {"type": "redacted_thinking", "data": "secret"},
            // Another provider's signature means nothing to Anthropic: not kept.
            {"type": "thinking", "thinking": " Hm.", "signature": ""},
            {"type": "text", "text": "Sunny."}
        ])
    );

    // The next turn answers a tool call with thinking on: the turn's signed thinking goes back;
    // thinking without a signature (another provider's) stays out, Anthropic would refuse it.
    let mut history = out["content"].as_array().cloned().unwrap_or_default();
    history.insert(
        0,
        json!({"type": "thinking", "thinking": "Earlier.", "signature": ""}),
    );
    history.push(json!({"type": "tool_use", "id": "t1", "name": "f", "input": {}}));
    let request = |thinking: &str, then: Vec<Value>| {
        let mut messages = vec![
            json!({"role": "user", "content": "Weather?"}),
            json!({"role": "assistant", "content": history}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "sun"}]}),
        ];
        messages.extend(then);
        let request = json!({"model": "m", "max_tokens": 2000, "messages": messages,
                             "thinking": {"type": thinking, "budget_tokens": 1024}});
        let body = request_to_openai(request.to_string().as_bytes()).expect("translates");
        parse(&body.to_bytes())["messages"][1].clone()
    };
    assert_eq!(
        request("enabled", vec![])["reasoning_details"],
        json!([
            {"type": "reasoning.text", "text": "Need weather.", "signature": "sig-0",
             "format": "anthropic-claude-v1", "index": 0},
            {"type": "reasoning.encrypted", "data": "secret", "format": "anthropic-claude-v1", "index": 1}
        ])
    );
    // Thinking off, or a tool loop already over (a user turn after it): no thinking goes back.
    let over = vec![
        json!({"role": "assistant", "content": "Done."}),
        json!({"role": "user", "content": "Thanks."}),
    ];
    assert!(
        request("disabled", vec![])
            .get("reasoning_details")
            .is_none()
    );
    assert!(request("enabled", over).get("reasoning_details").is_none());
}

#[test]
fn pieces_join_only_the_thinking_block_they_continue() {
    let detail = |text: &str, signature: &str, index: u64| {
        json!({"type": "reasoning.text", "text": text, "signature": signature,
               "format": "anthropic-claude-v1", "index": index})
    };
    let message = json!({"role": "assistant", "content": "ok", "reasoning_details": [
        detail("A", "s0", 0), detail("", "", 1), detail("B", "s1", 1), detail("C", "", 1)
    ]});
    let out = answer(json!({"index": 0, "message": message, "finish_reason": "stop"}));
    assert_eq!(
        out["content"],
        json!([
            {"type": "thinking", "thinking": "A", "signature": "s0"},
            {"type": "thinking", "thinking": "BC", "signature": "s1"},
            {"type": "text", "text": "ok"}
        ])
    );
}

fn answer(choice: Value) -> Value {
    let body = json!({"id": "msg_01", "choices": [choice]});
    parse(&response_from_openai(body.to_string().as_bytes(), &context("m")).expect("translates"))
}

#[test]
fn finish_reasons_map_to_stop_reasons() {
    let message = json!({"role": "assistant", "content": "hi"});
    for (finish, stop) in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        ("error", "end_turn"),
    ] {
        let out = answer(json!({"index": 0, "finish_reason": finish, "message": message}));
        assert_eq!(out["stop_reason"], stop, "{finish}");
        assert_eq!(out["id"], "msg_01");
        assert_eq!(out["usage"]["input_tokens"], 0);
    }
    let vllm =
        answer(json!({"finish_reason": "stop", "stop_reason": "</answer>", "message": message}));
    assert_eq!(
        (&vllm["stop_reason"], &vllm["stop_sequence"]),
        (&json!("stop_sequence"), &json!("</answer>"))
    );
    let claude = answer(
        json!({"finish_reason": "stop", "native_finish_reason": "stop_sequence", "message": message}),
    );
    assert_eq!(
        (&claude["stop_reason"], &claude["stop_sequence"]),
        (&json!("stop_sequence"), &Value::Null)
    );
    // With the request's only stop sequence known, it is the one that matched.
    let body = json!({"choices": [{"finish_reason": "stop", "native_finish_reason": "stop_sequence", "message": message}]});
    let request = JsonObject::parse(br#"{"model":"m","stop":["</answer>"]}"#).expect("JSON");
    let out = response_from_openai(
        body.to_string().as_bytes(),
        &AnswerContext::new("m", &request),
    );
    let out = parse(&out.expect("translates"));
    assert_eq!(
        (&out["stop_reason"], &out["stop_sequence"]),
        (&json!("stop_sequence"), &json!("</answer>"))
    );
    // With several, which one matched is unknown.
    let request = JsonObject::parse(br#"{"model":"m","stop":["a","b"]}"#).expect("JSON");
    assert_eq!(AnswerContext::new("m", &request).stop_sequence, None);
    assert_eq!(
        AnswerContext::new("m", &JsonObject::default()).stop_sequence,
        None
    );
    let lenient = answer(
        json!({"finish_reason": "stop", "message": {"content": null, "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]}}),
    );
    assert_eq!(lenient["stop_reason"], "tool_use");
    assert_eq!(
        lenient["content"],
        json!([{"type": "tool_use", "id": "toolu_01_0", "name": "f", "input": {"a": 1}}])
    );
    let refusal =
        answer(json!({"finish_reason": "stop", "message": {"content": null, "refusal": "No."}}));
    assert_eq!(
        (&refusal["stop_reason"], &refusal["content"][0]["text"]),
        (&json!("refusal"), &json!("No."))
    );
}

#[test]
fn the_model_named_is_the_upstreams_else_the_targets() {
    let choice = json!({"finish_reason": "stop", "message": {"content": "hi"}});
    let named = json!({"model": "openai/gpt-4o-2024-08-06", "choices": [choice]});
    let out = response_from_openai(named.to_string().as_bytes(), &context("openai/gpt-4o"));
    assert_eq!(
        parse(&out.expect("translates"))["model"],
        "openai/gpt-4o-2024-08-06"
    );
    for unnamed in [
        json!({"choices": [choice]}),
        json!({"model": "", "choices": [choice]}),
    ] {
        let out = response_from_openai(unnamed.to_string().as_bytes(), &context("gpt-4o"));
        assert_eq!(parse(&out.expect("translates"))["model"], "gpt-4o");
    }
}

#[test]
fn answers_without_choices_are_upstream_errors() {
    let err = response_from_openai(br#"{"error":{"message":"boom","code":500}}"#, &context("m"))
        .expect_err("no choices");
    assert!(err.to_string().contains("boom"), "{err}");
    assert!(matches!(
        response_from_openai(b"<html>", &context("m")),
        Err(TranslateError::Upstream(_))
    ));
}

#[test]
fn errors_follow_anthropic_types() {
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
        (405, "invalid_request_error"),
        (422, "invalid_request_error"),
        (529, "overloaded_error"),
    ] {
        assert_eq!(
            parse(&error_body(status, "why \"quoted\"")),
            json!({"type": "error", "error": {"type": kind, "message": "why \"quoted\""}})
        );
    }
    assert_eq!(
        &error_event(429, "slow")[..],
        b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow\"}}\n\n"
    );
}

#[test]
fn anthropic_usage_counts_cache_tokens_as_input() {
    let usage = usage_from_anthropic(&json!({
        "input_tokens": 10, "output_tokens": 5,
        "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60},
    }))
    .expect("usage");
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 1110,
            completion_tokens: 5,
            cached_tokens: Some(1000),
            cache_write_tokens: Some(100),
            cache_write_1h_tokens: Some(60),
            reasoning_tokens: None,
            cost_nanos: None,
        }
    );
    // message_delta carries output tokens only.
    assert_eq!(
        usage_from_anthropic(&json!({"output_tokens": 7})).map(|u| u.completion_tokens),
        Some(7)
    );
    assert_eq!(usage_from_anthropic(&json!({"server_tool_use": {}})), None);
    assert_eq!(usage_from_anthropic(&Value::Null), None);
}

/// OpenRouter's usage for a prompt of 100 tokens: 80 read from the cache, 10 written to it.
pub(super) const CACHE_USAGE: &str = r#"{"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
    "prompt_tokens_details": {"cached_tokens": 80, "cache_write_tokens": 10, "audio_tokens": 0}}"#;

/// [`CACHE_USAGE`] in Anthropic's terms: each input token counted in exactly one field.
pub(super) fn cache_usage_anthropic() -> Value {
    json!({"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 80})
}

#[test]
fn cache_writes_are_reported_as_cache_creation() {
    let body = format!(
        r#"{{"id": "gen-1", "choices": [{{"index": 0, "finish_reason": "stop", "message": {{"content": "hi"}}}}], "usage": {CACHE_USAGE}}}"#
    );
    let out = parse(&response_from_openai(body.as_bytes(), &context("m")).expect("translates"));
    assert_eq!(out["usage"], cache_usage_anthropic());
}

#[test]
fn token_estimate_counts_json_bytes_and_images_flat() {
    let text =
        json!({"model": "m", "system": "abcd", "messages": [{"role": "user", "content": "hello"}]});
    let bytes = "\"abcd\"".len() + r#"[{"content":"hello","role":"user"}]"#.len();
    assert_eq!(
        count_tokens_estimate(text.to_string().as_bytes()).expect("counts"),
        bytes.div_ceil(4) as u64
    );
    let image = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(4_000_000)}},
    ]}]});
    let estimate = count_tokens_estimate(image.to_string().as_bytes()).expect("counts");
    assert!((1_600..1_700).contains(&estimate), "{estimate}");
    assert!(count_tokens_estimate(b"{}").is_err());
}

proptest! {
    #[test]
    fn usage_survives_a_round_trip(prompt in 0u64..1 << 40, completion in 0u64..1 << 40, cached in 0u64..1 << 40, written in 0u64..1 << 40) {
        let usage = Usage {
            prompt_tokens: prompt.max(cached + written),
            completion_tokens: completion,
            cached_tokens: Some(cached),
            cache_write_tokens: Some(written),
            ..Usage::default()
        };
        prop_assert_eq!(usage_from_anthropic(&usage_to_anthropic(&usage)), Some(usage));
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in "\\PC{0,200}") {
        let _ = request_to_openai(body.as_bytes());
        let _ = response_from_openai(body.as_bytes(), &context("m"));
        let _ = count_tokens_estimate(body.as_bytes());
    }
}
