//! Any OpenAI-compatible server: vLLM, Ollama, llama.cpp, LM Studio, or OpenAI itself.

use http::Uri;
use orproxy_plugin::openai::{self, endpoint};
use orproxy_plugin::{Backend, Call, PrepareError, Prepared, StreamMapper};

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
        // OpenAI-compatible servers report a stream's usage only when asked: always ask, so
        // that every stream is priced (the chunk is stripped if the client did not ask).
        if call.stream && !openai::asks_for_usage(call.body) {
            let body = openai::requesting_usage(call.body);
            let call = Call {
                body: &body,
                ..*call
            };
            return Ok(Prepared::Http(openai::json_post(
                self.chat_url.clone(),
                &call,
            )?));
        }
        Ok(Prepared::Http(openai::json_post(
            self.chat_url.clone(),
            call,
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

#[cfg(test)]
mod tests {
    use super::*;
    use orproxy_plugin::{Identity, JsonObject};

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
}
