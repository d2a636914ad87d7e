//! The built-in `mock` backend: a deterministic echo with token counts and a fixed price.
//!
//! It answers without network I/O, in the OpenRouter wire format (usage with `cost`, a usage
//! chunk with `choices: []`, `[DONE]`), so a newcomer can try orproxy with no key at all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use orproxy_plugin::sse::data_event;
use orproxy_plugin::{Backend, Call, LocalBody, LocalReply, Nanos, PrepareError, Prepared};
use serde::Deserialize;
use serde_json::json;

/// The plugin name.
pub const KIND: &str = "mock";
/// The model the mock lists.
pub const MODEL: &str = "mock";
/// Fixed price: USD 1 per million input tokens.
pub const PROMPT_NANOS_PER_TOKEN: Nanos = 1_000;
/// Fixed price: USD 2 per million output tokens.
pub const COMPLETION_NANOS_PER_TOKEN: Nanos = 2_000;

/// The mock backend.
#[derive(Debug)]
pub struct Mock {
    stream_events: Option<u32>,
    event_interval: Duration,
}

impl Mock {
    /// A mock streaming `stream_events` content events (default one per word), `event_interval` apart.
    pub fn new(stream_events: Option<u32>, event_interval: Option<Duration>) -> Self {
        Mock {
            stream_events,
            event_interval: event_interval.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
            Content::Other(_) => String::new(),
        }
    }
}

/// Whitespace-insensitive token estimate used by the mock: one token per four characters.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Backend for Mock {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn prepare(&self, call: &Call<'_>) -> Result<Prepared, PrepareError> {
        let messages: Vec<Message> = match call.body.get("messages") {
            Some(raw) => serde_json::from_str(raw.get()).map_err(|e| {
                PrepareError::Unsupported(format!(
                    "mock: `messages` is not a list of messages: {e}"
                ))
            })?,
            None => Vec::new(),
        };
        let texts: Vec<(String, String)> = messages
            .iter()
            .map(|m| {
                (
                    m.role.clone(),
                    m.content.as_ref().map(Content::text).unwrap_or_default(),
                )
            })
            .collect();
        let answer = texts
            .iter()
            .rev()
            .find(|(role, _)| role == "user")
            .map(|(_, text)| text.clone())
            .unwrap_or_default();
        // Three tokens of framing per message, as OpenAI's chat format roughly costs.
        let prompt_tokens: u64 = texts.iter().map(|(_, t)| estimate_tokens(t) + 3).sum();
        let completion_tokens = estimate_tokens(&answer);
        let cost = prompt_tokens as Nanos * PROMPT_NANOS_PER_TOKEN
            + completion_tokens as Nanos * COMPLETION_NANOS_PER_TOKEN;
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            // A float, as OpenRouter sends it: the shortest form of a whole number of
            // nano-dollars reads back exactly.
            "cost": cost as f64 / 1e9,
            "is_byok": false,
        });
        let id = format!("mock-{}", call.request_id);
        let created = unix_now();
        let model = call.model;

        if !call.stream {
            let body = json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "provider": "orproxy-mock",
                "choices": [{
                    "index": 0, "logprobs": null, "finish_reason": "stop", "native_finish_reason": "stop",
                    "message": {"role": "assistant", "content": answer, "refusal": null},
                }],
                "usage": usage,
            });
            return Ok(Prepared::Local(LocalReply {
                status: StatusCode::OK,
                content_type: "application/json",
                body: LocalBody::Full(Bytes::from(body.to_string())),
            }));
        }

        let chunk = |delta: serde_json::Value, finish: Option<&str>| {
            data_event(
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "provider": "orproxy-mock",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": finish}],
                })
                .to_string()
                .as_bytes(),
            )
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        for piece in split(&answer, self.stream_events) {
            events.push(chunk(json!({"role": "assistant", "content": piece}), None));
        }
        events.push(chunk(
            json!({"role": "assistant", "content": ""}),
            Some("stop"),
        ));
        events.push(data_event(
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "provider": "orproxy-mock", "choices": [], "usage": usage,
            })
            .to_string()
            .as_bytes(),
        ));
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        Ok(Prepared::Local(LocalReply {
            status: StatusCode::OK,
            content_type: "text/event-stream",
            body: LocalBody::Events {
                events,
                interval: self.event_interval,
            },
        }))
    }

    fn list_models(&self, _api_key: Option<&str>) -> Option<Prepared> {
        // Prices in OpenRouter's shape (USD per token) so that budgets can reserve against them.
        let per_token = |nanos: Nanos| format!("{}", nanos as f64 / 1e9);
        let body = json!({"object": "list", "data": [{
            "id": MODEL, "object": "model", "created": 0, "owned_by": "orproxy",
            "pricing": {"prompt": per_token(PROMPT_NANOS_PER_TOKEN), "completion": per_token(COMPLETION_NANOS_PER_TOKEN)},
        }]});
        Some(Prepared::Local(LocalReply {
            status: StatusCode::OK,
            content_type: "application/json",
            body: LocalBody::Full(Bytes::from(body.to_string())),
        }))
    }
}

/// Splits `text` into `n` pieces (default: one per word, spaces kept) whose concatenation is `text`.
fn split(text: &str, n: Option<u32>) -> Vec<String> {
    match n {
        None => text.split_inclusive(' ').map(str::to_owned).collect(),
        Some(n) => {
            let chars: Vec<char> = text.chars().collect();
            let n = (n.max(1) as usize).min(chars.len().max(1));
            let per = chars.len().div_ceil(n).max(1);
            let mut pieces: Vec<String> = chars.chunks(per).map(|c| c.iter().collect()).collect();
            // Short answers still produce the requested number of events.
            while pieces.len() < n {
                pieces.push(String::new());
            }
            pieces
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orproxy_plugin::{Identity, JsonObject};

    fn run(body: &str, stream: bool, events: Option<u32>) -> LocalReply {
        let body = JsonObject::parse(body.as_bytes()).unwrap();
        let call = Call {
            request_id: "abc",
            body: &body,
            model: "mock",
            stream,
            api_key: None,
            identity: Identity::default(),
            headers: &[],
        };
        match Mock::new(events, None).prepare(&call).unwrap() {
            Prepared::Local(reply) => reply,
            Prepared::Http(_) => panic!("mock never goes to the network"),
        }
    }

    #[test]
    fn echoes_the_last_user_message_with_usage_and_cost() {
        let reply = run(
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}]}"#,
            false,
            None,
        );
        let LocalBody::Full(body) = reply.body else {
            panic!("non-stream is one body")
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "hello there");
        // "be brief" = 2 + 3, "hello there" = 3 + 3 prompt tokens; 3 completion tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 11);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let cost = v["usage"]["cost"].to_string();
        assert_eq!(
            orproxy_plugin::usage::usd_to_nanos(&cost),
            Some(17_000),
            "{cost}"
        );
    }

    #[test]
    fn streams_the_requested_number_of_content_events() {
        let reply = run(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"}]}]}"#,
            true,
            Some(4),
        );
        let LocalBody::Events { events, .. } = reply.body else {
            panic!("stream is events")
        };
        // preamble + 4 content + finish + usage + [DONE]
        assert_eq!(events.len(), 8);
        let text: String = events[1..5]
            .iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_slice(&e[6..]).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(text, "abcdefgh");
        assert_eq!(&events[7][..], b"data: [DONE]\n\n");
    }

    #[test]
    fn split_keeps_the_text() {
        assert_eq!(split("a b c", None), vec!["a ", "b ", "c"]);
        assert_eq!(split("ab", Some(4)).concat(), "ab");
        assert_eq!(split("ab", Some(4)).len(), 2);
        assert_eq!(split("", Some(3)), vec![String::new()]);
    }
}
