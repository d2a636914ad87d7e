//! OpenRouter: the OpenAI wire format plus attribution headers; body extensions pass through.

use http::HeaderName;
use http::Uri;
use orproxy_plugin::openai::{self, endpoint, insert_opt};
use orproxy_plugin::{Backend, Call, PrepareError, Prepared};

/// The plugin name.
pub const KIND: &str = "openrouter";
/// Where OpenRouter's API lives.
pub const DEFAULT_BASE_URL: &str = "https://openrouter.ai/api/v1";

const HTTP_REFERER: HeaderName = HeaderName::from_static("http-referer");
const X_TITLE: HeaderName = HeaderName::from_static("x-title");
const X_OPENROUTER_TITLE: HeaderName = HeaderName::from_static("x-openrouter-title");

/// The OpenRouter backend.
#[derive(Debug)]
pub struct OpenRouter {
    chat_url: Uri,
    models_url: Uri,
}

impl OpenRouter {
    /// A backend at `base_url` (default [`DEFAULT_BASE_URL`]); fails on a malformed URL.
    pub fn new(base_url: Option<String>) -> Result<Self, http::uri::InvalidUri> {
        let base = base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        Ok(OpenRouter {
            chat_url: endpoint(base, "chat/completions")?,
            models_url: endpoint(base, "models")?,
        })
    }
}

impl Backend for OpenRouter {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn prepare(&self, call: &Call<'_>) -> Result<Prepared, PrepareError> {
        if call.api_key.is_none() {
            return Err(PrepareError::MissingKey);
        }
        // OpenRouter always reports usage (with cost) on streams: nothing to add to the body.
        let mut request = openai::json_post(self.chat_url.clone(), call)?;
        let headers = &mut request.headers;
        insert_opt(headers, HTTP_REFERER, call.identity.referer, "HTTP-Referer")?;
        // Both spellings: X-Title is the documented legacy one, still read by OpenRouter.
        insert_opt(headers, X_TITLE, call.identity.title, "X-Title")?;
        insert_opt(
            headers,
            X_OPENROUTER_TITLE,
            call.identity.title,
            "X-OpenRouter-Title",
        )?;
        Ok(Prepared::Http(request))
    }

    fn list_models(&self, _api_key: Option<&str>) -> Option<Prepared> {
        // The model list is public; sending the key would only widen its exposure.
        openai::get(self.models_url.clone(), None)
            .ok()
            .map(Prepared::Http)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orproxy_plugin::{Identity, JsonObject};

    #[test]
    fn requests_carry_key_attribution_and_untouched_extensions() {
        let body = JsonObject::parse(
            br#"{"model":"anthropic/claude-3-5-sonnet","messages":[],"provider":{"order":["anthropic"]},"transforms":["middle-out"],"models":["x/y"]}"#,
        )
        .unwrap();
        let call = Call {
            request_id: "r1",
            body: &body,
            model: "anthropic/claude-3-5-sonnet",
            stream: true,
            api_key: Some("sk-or-v1-secret"),
            identity: Identity {
                user_agent: Some("MyApp/1.0.0"),
                referer: Some("https://example.org"),
                title: Some("MyApp"),
            },
            headers: &[],
        };
        let Prepared::Http(req) = OpenRouter::new(None).unwrap().prepare(&call).unwrap() else {
            panic!("openrouter answers over HTTP");
        };
        assert_eq!(
            req.url.to_string(),
            "https://openrouter.ai/api/v1/chat/completions"
        );
        let h = |n: &str| req.headers.get(n).unwrap().to_str().unwrap().to_owned();
        assert_eq!(h("authorization"), "Bearer sk-or-v1-secret");
        assert!(req.headers.get("authorization").unwrap().is_sensitive());
        assert_eq!(h("user-agent"), "MyApp/1.0.0");
        assert_eq!(h("http-referer"), "https://example.org");
        assert_eq!(h("x-title"), "MyApp");
        assert_eq!(h("x-openrouter-title"), "MyApp");
        assert_eq!(h("accept"), "text/event-stream");
        assert_eq!(req.body, body.to_bytes());
    }

    #[test]
    fn a_missing_key_is_refused() {
        let body = JsonObject::parse(b"{}").unwrap();
        let call = Call {
            request_id: "r1",
            body: &body,
            model: "m",
            stream: false,
            api_key: None,
            identity: Identity::default(),
            headers: &[],
        };
        assert!(matches!(
            OpenRouter::new(None).unwrap().prepare(&call),
            Err(PrepareError::MissingKey)
        ));
    }
}
