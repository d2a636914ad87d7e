//! A whole Messages response → the stream events that would have carried it, for a stream
//! request whose upstream answered with one JSON body.

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

use super::{TranslateError, push_event};

/// A Messages response (JSON) → `message_start`, `content_block_start`/`delta`/`stop` for each
/// block, `message_delta` (stop reason, stop sequence, usage) and `message_stop`.
pub fn message_events(body: &[u8]) -> Result<Bytes, TranslateError> {
    let mut message: Map<String, Value> =
        serde_json::from_slice(body).map_err(TranslateError::Json)?;
    // A stream's message starts empty and unfinished; the rest arrives in the events below.
    let blocks = match message.insert("content".into(), Value::Array(Vec::new())) {
        Some(Value::Array(blocks)) => blocks,
        _ => Vec::new(),
    };
    let stop_reason = message.insert("stop_reason".into(), Value::Null);
    let stop_sequence = message.insert("stop_sequence".into(), Value::Null);
    // SDKs read `usage.output_tokens` of both events: an answer that reported none still
    // carries the fields, at zero.
    let usage = match message.get("usage") {
        Some(Value::Object(usage)) => Value::Object(usage.clone()),
        _ => {
            let zero = json!({"input_tokens": 0, "output_tokens": 0});
            message.insert("usage".into(), zero.clone());
            zero
        }
    };
    let mut out = BytesMut::new();
    push_event(
        &mut out,
        "message_start",
        &json!({"type": "message_start", "message": message}),
    );
    for (index, block) in blocks.into_iter().enumerate() {
        let (start, deltas) = split(block);
        push_event(
            &mut out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        );
        for delta in deltas {
            push_event(
                &mut out,
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index, "delta": delta}),
            );
        }
        push_event(
            &mut out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }
    let delta = json!({
        "stop_reason": stop_reason.unwrap_or(Value::Null),
        "stop_sequence": stop_sequence.unwrap_or(Value::Null),
    });
    push_event(
        &mut out,
        "message_delta",
        &json!({"type": "message_delta", "delta": delta, "usage": usage}),
    );
    push_event(&mut out, "message_stop", &json!({"type": "message_stop"}));
    Ok(out.freeze())
}

/// A block → the block as `content_block_start` shows it, and the deltas that complete it.
/// Blocks that Anthropic never streams in pieces (tool results of server tools, redacted
/// thinking) start whole.
fn split(mut block: Value) -> (Value, Vec<Value>) {
    let kind = block
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(object) = block.as_object_mut() else {
        return (block, Vec::new());
    };
    let mut take = |key: &str, empty: Value| object.insert(key.into(), empty);
    let deltas = match kind.as_str() {
        "text" => match take("text", "".into()) {
            Some(text) => vec![json!({"type": "text_delta", "text": text})],
            None => Vec::new(),
        },
        "thinking" => {
            let mut deltas = Vec::new();
            if let Some(thinking) = take("thinking", "".into()) {
                deltas.push(json!({"type": "thinking_delta", "thinking": thinking}));
            }
            if let Some(signature) = take("signature", "".into()).filter(|s| s != "") {
                deltas.push(json!({"type": "signature_delta", "signature": signature}));
            }
            deltas
        }
        "tool_use" | "server_tool_use" | "mcp_tool_use" => {
            match take("input", Value::Object(Map::new())) {
                Some(input) => {
                    vec![json!({"type": "input_json_delta", "partial_json": input.to_string()})]
                }
                None => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    (block, deltas)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(event name, data)` pairs, checking that each data's `type` is its event's name.
    fn events(bytes: &[u8]) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(bytes).expect("UTF-8");
        text.split_terminator("\n\n")
            .map(|event| {
                let (name, data) = event
                    .strip_prefix("event: ")
                    .and_then(|rest| rest.split_once("\ndata: "))
                    .expect("event: NAME then data: JSON");
                let data: Value = serde_json::from_str(data).expect("JSON");
                assert_eq!(data["type"], name);
                (name.to_owned(), data)
            })
            .collect()
    }

    #[test]
    fn a_message_becomes_its_event_sequence() {
        let usage = json!({"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "openai/gpt-4o",
            "content": [
                {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
                {"type": "text", "text": "Hello."},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                {"type": "redacted_thinking", "data": "x"},
            ],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": usage,
        });
        let got = events(&message_events(message.to_string().as_bytes()).expect("JSON"));
        let names: Vec<&str> = got.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let start = &got[0].1["message"];
        assert_eq!(
            (&start["content"], &start["stop_reason"], &start["model"]),
            (&json!([]), &Value::Null, &json!("openai/gpt-4o"))
        );
        assert_eq!(
            got[1].1["content_block"],
            json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        assert_eq!(
            got[3].1["delta"],
            json!({"type": "signature_delta", "signature": "sig"})
        );
        assert_eq!(
            got[6].1["delta"],
            json!({"type": "text_delta", "text": "Hello."})
        );
        assert_eq!(got[6].1["index"], 1);
        assert_eq!(
            got[8].1["content_block"],
            json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}})
        );
        assert_eq!(
            got[9].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"a\":1}"})
        );
        assert_eq!(
            got[11].1["content_block"],
            json!({"type": "redacted_thinking", "data": "x"})
        );
        assert_eq!(
            got[13].1,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": usage})
        );
        assert!(message_events(b"not json").is_err());
    }

    #[test]
    fn an_answer_without_usage_still_carries_the_usage_fields() {
        let got = events(
            &message_events(br#"{"id":"m","type":"message","role":"assistant","model":"x","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null}"#)
                .unwrap(),
        );
        let zero = json!({"input_tokens": 0, "output_tokens": 0});
        assert_eq!(got[0].1["message"]["usage"], zero);
        let delta = got
            .iter()
            .find(|(name, _)| name == "message_delta")
            .unwrap();
        assert_eq!(delta.1["usage"], zero);
    }
}
