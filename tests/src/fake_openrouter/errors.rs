//! Error answers, described once and rendered in either dialect's envelope.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::scenario::RetryAfter;
use super::server::Dialect;
use super::wire::{FAKE_USER_ID, provider_for, unix_millis};

/// An HTTP error answer before any output was produced.
#[derive(Clone, Debug)]
pub(crate) struct ErrorSpec {
    pub(crate) status: u16,
    pub(crate) message: String,
    /// OpenRouter's `error.metadata`.
    pub(crate) metadata: Option<Value>,
    /// Whether the OpenRouter body carries the top-level `user_id` sibling.
    pub(crate) user_id: bool,
    /// OpenAI's string `error.code`.
    pub(crate) openai_code: Option<&'static str>,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl ErrorSpec {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> ErrorSpec {
        ErrorSpec {
            status,
            message: message.into(),
            metadata: None,
            user_id: false,
            openai_code: None,
            headers: Vec::new(),
        }
    }

    pub(crate) fn metadata(mut self, metadata: Value) -> ErrorSpec {
        self.metadata = Some(metadata);
        self
    }

    pub(crate) fn with_user_id(mut self) -> ErrorSpec {
        self.user_id = true;
        self
    }

    pub(crate) fn openai_code(mut self, code: &'static str) -> ErrorSpec {
        self.openai_code = Some(code);
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> ErrorSpec {
        self.headers.push((name, value.into()));
        self
    }

    /// OpenRouter does not fall back to the `models` list for account-level failures.
    pub(crate) fn allows_fallback(&self) -> bool {
        !matches!(self.status, 401 | 402)
    }

    pub(crate) fn body(&self, dialect: Dialect) -> Bytes {
        let value = match dialect {
            Dialect::OpenRouter => {
                let mut error = Map::new();
                error.insert("message".into(), Value::from(self.message.as_str()));
                error.insert("code".into(), Value::from(self.status));
                if let Some(metadata) = &self.metadata {
                    error.insert("metadata".into(), metadata.clone());
                }
                let mut body = Map::new();
                body.insert("error".into(), Value::Object(error));
                if self.user_id {
                    body.insert("user_id".into(), Value::from(FAKE_USER_ID));
                }
                Value::Object(body)
            }
            Dialect::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": openai_type(self.status),
                    "param": null,
                    "code": self.openai_code,
                }
            }),
        };
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }
}

fn openai_type(status: u16) -> &'static str {
    match status {
        402 => "insufficient_quota",
        403 => "permission_error",
        429 => "requests",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// `<model> is not a valid model ID`, OpenRouter's answer to an unknown model.
pub(crate) fn invalid_model(model: &str) -> ErrorSpec {
    ErrorSpec::new(400, format!("{model} is not a valid model ID"))
        .with_user_id()
        .openai_code("model_not_found")
}

/// What the request looked like, for the error texts that quote it.
pub(crate) struct Quote<'a> {
    pub(crate) model: &'a str,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) prompt_tokens: u64,
    pub(crate) user_text: &'a str,
}

/// The error body OpenRouter sends for HTTP `code` (texts from real bodies where known).
pub(crate) fn status_error(code: u16, retry: RetryAfter, q: &Quote<'_>) -> ErrorSpec {
    let provider = provider_for(q.model);
    let mut spec = match code {
        400 => ErrorSpec::new(400, "Provider returned error")
            .metadata(json!({
                "raw": "{\"error\":{\"message\":\"Invalid request\",\"type\":\"invalid_request_error\"}}",
                "provider_name": provider,
                "is_byok": false,
            }))
            .with_user_id(),
        401 => ErrorSpec::new(401, "User not found.").openai_code("invalid_api_key"),
        402 => {
            let requested = q.max_tokens.unwrap_or(4096);
            ErrorSpec::new(
                402,
                format!(
                    "This request requires more credits, or fewer max_tokens. You requested up \
                     to {requested} tokens, but can only afford {}. To increase, visit \
                     https://openrouter.ai/settings/credits and upgrade to a paid account",
                    requested / 2
                ),
            )
            .metadata(json!({ "provider_name": null }))
            .with_user_id()
            .openai_code("insufficient_quota")
        }
        403 => {
            let flagged: String = q.user_text.chars().take(100).collect();
            ErrorSpec::new(
                403,
                format!(
                    "{} requires moderation on {provider}. Your input was flagged for \
                     \"harassment\". No credits were charged.",
                    q.model
                ),
            )
            .metadata(json!({
                "reasons": ["harassment"],
                "flagged_input": flagged,
                "provider_name": provider,
                "model_slug": q.model,
            }))
            .with_user_id()
        }
        404 => ErrorSpec::new(404, format!("No endpoints found for {}.", q.model))
            .with_user_id()
            .openai_code("model_not_found"),
        408 => ErrorSpec::new(408, "Operation timed out. Please try again later."),
        429 => ErrorSpec::new(
            429,
            "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free \
             model requests per day",
        )
        .with_user_id()
        .openai_code("rate_limit_exceeded"),
        500 => ErrorSpec::new(500, "Internal Server Error"),
        502 => ErrorSpec::new(502, "Provider returned error")
            .metadata(json!({
                "raw": "{\"error\":{\"message\":\"upstream connect error or disconnect/reset \
                        before headers. reset reason: connection termination\",\"type\":\"server_error\"}}",
                "provider_name": provider,
            }))
            .with_user_id(),
        503 => unavailable(),
        _ => ErrorSpec::new(
            code,
            http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Provider returned error"),
        ),
    };
    let retry_secs = match retry {
        RetryAfter::Default if code == 429 => Some(1),
        RetryAfter::Default | RetryAfter::Omit => None,
        RetryAfter::Secs(s) => Some(s),
    };
    if let Some(secs) = retry_secs {
        spec = spec.header("retry-after", secs.to_string());
    }
    if code == 429 {
        // Reset is epoch milliseconds in real bodies; without a Retry-After the fake points
        // at the next UTC midnight like the free-models-per-day limit does.
        let now = unix_millis();
        let reset = match retry_secs {
            Some(secs) => now + secs.saturating_mul(1000),
            None => (now / 86_400_000 + 1) * 86_400_000,
        };
        let reset = reset.to_string();
        spec = spec
            .header("x-ratelimit-limit", "50")
            .header("x-ratelimit-remaining", "0")
            .header("x-ratelimit-reset", reset.clone())
            .metadata(json!({
                "headers": {
                    "X-RateLimit-Limit": "50",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": reset,
                },
                "provider_name": null,
            }));
    }
    spec
}

/// 503 as OpenRouter words it when no provider can serve the request.
pub(crate) fn unavailable() -> ErrorSpec {
    ErrorSpec::new(503, "Service temporarily unavailable").with_user_id()
}

pub(crate) fn context_length(q: &Quote<'_>) -> ErrorSpec {
    let limit = 32_768u64;
    let output = q.max_tokens.unwrap_or(4_096);
    let input = limit + q.prompt_tokens;
    ErrorSpec::new(
        400,
        format!(
            "This endpoint's maximum context length is {limit} tokens. However, you requested \
             about {} tokens ({input} of text input, {output} in the output). Please reduce the \
             length of either one, or use the \"middle-out\" transform to compress your prompt \
             automatically.",
            input + output
        ),
    )
    .metadata(json!({
        "error_type": "context_length_exceeded",
        "provider_name": provider_for(q.model),
    }))
    .with_user_id()
    .openai_code("context_length_exceeded")
}

pub(crate) fn content_policy(q: &Quote<'_>) -> ErrorSpec {
    ErrorSpec::new(
        400,
        "Your request was rejected as a result of our safety system. Your prompt may contain \
         text that is not allowed by our safety system.",
    )
    .metadata(json!({
        "error_type": "content_policy_violation",
        "provider_name": provider_for(q.model),
    }))
    .with_user_id()
    .openai_code("content_policy_violation")
}
