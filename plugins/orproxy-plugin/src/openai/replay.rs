//! A chat completion replayed as the stream it would have been, for a stream request whose
//! upstream answered with one JSON body.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value};

use crate::sse::data_event;

/// A chat completion (JSON) → the SSE events of the same answer streamed: per choice, one chunk
/// whose delta is the whole message and which carries its finish reason; then, with
/// `include_usage`, the usage chunk (`choices: []`); then `data: [DONE]`. Each chunk repeats
/// the completion's other fields (id, model, created, provider), as streamed chunks do.
pub fn completion_events(body: &[u8], include_usage: bool) -> Result<Bytes, serde_json::Error> {
    let mut head: Map<String, Value> = serde_json::from_slice(body)?;
    let choices = match head.remove("choices") {
        Some(Value::Array(choices)) => choices,
        _ => Vec::new(),
    };
    let usage = head.remove("usage").filter(|usage| !usage.is_null());
    head.insert("object".into(), "chat.completion.chunk".into());
    let mut out = BytesMut::new();
    let mut push = |choices: Vec<Value>, usage: Option<Value>| {
        let mut chunk = head.clone();
        chunk.insert("choices".into(), Value::Array(choices));
        if let Some(usage) = usage {
            chunk.insert("usage".into(), usage);
        }
        // A map of JSON values always serializes.
        let json = serde_json::to_vec(&chunk).unwrap_or_default();
        out.extend_from_slice(&data_event(&json));
    };
    for choice in choices {
        if let Value::Object(choice) = choice {
            push(vec![Value::Object(as_delta(choice))], None);
        }
    }
    if include_usage && let Some(usage) = usage {
        push(Vec::new(), Some(usage));
    }
    out.extend_from_slice(&data_event(b"[DONE]"));
    Ok(out.freeze())
}

/// A completion choice → a chunk choice: `message` becomes `delta`, and each tool call gets
/// the `index` that streamed tool-call pieces are matched by.
fn as_delta(mut choice: Map<String, Value>) -> Map<String, Value> {
    let mut delta = match choice.remove("message") {
        Some(Value::Object(message)) => message,
        _ => Map::new(),
    };
    if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
        for (index, call) in calls.iter_mut().enumerate() {
            if let Value::Object(call) = call {
                call.entry("index").or_insert(Value::from(index));
            }
        }
    }
    choice.insert("delta".into(), Value::Object(delta));
    choice
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::sse::SseFramer;

    fn data(events: &[u8]) -> Vec<String> {
        let mut framer = SseFramer::new();
        framer.push(events);
        std::iter::from_fn(|| framer.next_event())
            .filter_map(|event| {
                event
                    .data()
                    .map(|data| String::from_utf8_lossy(&data).into_owned())
            })
            .collect()
    }

    #[test]
    fn a_completion_becomes_a_chunk_per_choice_usage_and_done() {
        let completion = json!({
            "id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o", "object": "chat.completion", "created": 7,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "native_finish_reason": "tool_calls", "logprobs": null,
                "message": {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let events = completion_events(completion.to_string().as_bytes(), true).expect("JSON");
        let got = data(&events);
        let chunk = |choices: Value| json!({"id": "gen-1", "provider": "OpenAI", "model": "openai/gpt-4o", "object": "chat.completion.chunk", "created": 7, "choices": choices});
        assert_eq!(got.len(), 3, "{got:?}");
        let first: Value = serde_json::from_str(&got[0]).expect("JSON");
        assert_eq!(
            first,
            chunk(
                json!([{"index": 0, "finish_reason": "tool_calls", "native_finish_reason": "tool_calls", "logprobs": null,
                "delta": {"role": "assistant", "content": "", "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}])
            )
        );
        let mut usage = chunk(json!([]));
        usage["usage"] = completion["usage"].clone();
        assert_eq!(serde_json::from_str::<Value>(&got[1]).expect("JSON"), usage);
        assert_eq!(got[2], "[DONE]");
        // Without include_usage the usage chunk stays away, as when streamed.
        let events = completion_events(completion.to_string().as_bytes(), false).expect("JSON");
        assert_eq!(data(&events).len(), 2);
        assert!(completion_events(b"[1]", true).is_err());
    }
}
