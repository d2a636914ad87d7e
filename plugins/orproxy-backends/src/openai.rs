//! Any OpenAI-compatible server: vLLM, Ollama, llama.cpp, LM Studio, or OpenAI itself.

use http::Uri;
use orproxy_plugin::openai::{self, endpoint};
use orproxy_plugin::{Backend, Call, JsonObject, PrepareError, Prepared, StreamMapper};
use serde_json::Value;

/// The plugin name.
pub const KIND: &str = "openai";
/// OpenAI's own API, used when `base_url` is not set.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// An OpenAI-compatible backend; the key is optional (local servers rarely want one).
#[derive(Debug)]
pub struct OpenAi {
    chat_url: Uri,
    models_url: Uri,
}

impl OpenAi {
    /// A backend at `base_url` (default [`DEFAULT_BASE_URL`]); fails on a malformed URL.
    pub fn new(base_url: Option<String>) -> Result<Self, http::uri::InvalidUri> {
        let base = base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Ok(OpenAi {
            chat_url: endpoint(base, "chat/completions")?,
            models_url: endpoint(base, "models")?,
        })
    }
}

impl Backend for OpenAi {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn prepare(&self, call: &Call<'_>) -> Result<Prepared, PrepareError> {
        let stripped = without_cache_control(call.body);
        let body = stripped.as_ref().unwrap_or(call.body);
        // OpenAI-compatible servers report a stream's usage only when asked: always ask, so
        // that every stream is priced (the chunk is stripped if the client did not ask).
        let asking =
            (call.stream && !openai::asks_for_usage(body)).then(|| openai::requesting_usage(body));
        let call = Call {
            body: asking.as_ref().unwrap_or(body),
            ..*call
        };
        Ok(Prepared::Http(openai::json_post(
            self.chat_url.clone(),
            &call,
        )?))
    }

    fn stream_mapper(&self, client_asked_usage: bool) -> Box<dyn StreamMapper> {
        Box::new(if client_asked_usage {
            openai::ChunkMapper::default()
        } else {
            openai::ChunkMapper::stripping_usage()
        })
    }

    fn list_models(&self, api_key: Option<&str>) -> Option<Prepared> {
        openai::get(self.models_url.clone(), api_key)
            .ok()
            .map(Prepared::Http)
    }
}

/// The body without `cache_control` marks in its messages, when it has any. A request that came
/// in Anthropic's format keeps them on text parts for OpenRouter, which hands them to the
/// providers that cache; an OpenAI-compatible server knows no such field, and strict ones
/// refuse the whole request over it.
fn without_cache_control(body: &JsonObject) -> Option<JsonObject> {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(fields) => {
                fields.remove("cache_control");
                fields.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let raw = body.get("messages")?;
    if !raw.get().contains("\"cache_control\"") {
        return None;
    }
    let mut messages: Value = serde_json::from_str(raw.get()).ok()?;
    strip(&mut messages);
    let mut body = body.clone();
    body.set("messages", &messages);
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orproxy_plugin::Identity;

    #[test]
    fn keyless_requests_go_to_the_configured_server() {
        let body = JsonObject::parse(br#"{"model":"llama3","messages":[]}"#).unwrap();
        let call = Call {
            request_id: "r1",
            body: &body,
            model: "llama3",
            stream: false,
            api_key: None,
            identity: Identity::default(),
            headers: &[],
        };
        let Prepared::Http(req) = OpenAi::new(Some("http://127.0.0.1:11434/v1/".into()))
            .unwrap()
            .prepare(&call)
            .unwrap()
        else {
            panic!("openai answers over HTTP");
        };
        assert_eq!(
            req.url.to_string(),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("http-referer").is_none());
    }

    #[test]
    fn cache_control_marks_stay_with_openrouter() {
        let body = JsonObject::parse(
            br#"{"model":"m","messages":[{"role":"system","content":[{"type":"text","text":"be brief","cache_control":{"type":"ephemeral"}}]},{"role":"user","content":"say \"cache_control\""}]}"#,
        )
        .unwrap();
        let call = Call {
            request_id: "r1",
            body: &body,
            model: "m",
            stream: false,
            api_key: None,
            identity: Identity::default(),
            headers: &[],
        };
        let Prepared::Http(req) = OpenAi::new(None).unwrap().prepare(&call).unwrap() else {
            panic!("openai answers over HTTP");
        };
        let sent: Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(
            sent["messages"],
            serde_json::json!([
                {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "say \"cache_control\""}
            ])
        );
    }
}
