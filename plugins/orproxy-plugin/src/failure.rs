//! Upstream failures, classified once so the daemon can decide on failover without knowing the backend.

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

/// What went wrong with one upstream attempt, in terms the failover logic understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 429, or a rate-limit error inside a stream.
    RateLimited,
    /// 402: the upstream account or key is out of credit.
    PaymentRequired,
    /// 401 or 403 about the upstream key.
    Unauthorized,
    /// 408, or an upstream-reported timeout.
    Timeout,
    /// 5xx, or an error reported inside a 200 answer.
    Server,
    /// The prompt does not fit the model: another model in the chain may take it.
    ContextLength,
    /// Anything else the request itself caused (bad parameters, content policy, unknown model).
    BadRequest,
}

/// One classified upstream failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The class of failure.
    pub kind: FailureKind,
    /// The upstream's status code (or the `error.code` of an in-stream error).
    pub status: u16,
    /// The upstream's human-readable reason, without secrets.
    pub message: String,
    /// Seconds the upstream asked us to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl FailureKind {
    /// Whether another attempt (next key, next backend or model in the chain) may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, FailureKind::BadRequest)
    }
}

impl Failure {
    /// Classifies an OpenAI-compatible error answer (status, headers, JSON body).
    pub fn from_openai_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Failure {
        let detail = ErrorDetail::read(body);
        let kind = kind_for(
            status.as_u16(),
            detail.error_type.as_deref(),
            &detail.message,
        );
        Failure {
            kind,
            status: status.as_u16(),
            message: detail.message,
            retry_after: retry_after(headers),
        }
    }

    /// Classifies the `error` object of a stream chunk or of a 200 body (`{"code":502,"message":...}`).
    pub fn from_error_object(raw: &RawValue) -> Failure {
        let detail = ErrorDetail::from_object(raw);
        // A string code ("server_error") carries no status: treat it as a server failure.
        let status = detail.code.unwrap_or(502);
        Failure {
            kind: kind_for(status, detail.error_type.as_deref(), &detail.message),
            status,
            message: detail.message,
            retry_after: None,
        }
    }
}

fn kind_for(status: u16, error_type: Option<&str>, message: &str) -> FailureKind {
    match (status, error_type) {
        (_, Some("context_length_exceeded" | "max_tokens_exceeded" | "token_limit_exceeded")) => {
            FailureKind::ContextLength
        }
        (400 | 413, _) if mentions_context_length(message) => FailureKind::ContextLength,
        (401 | 403, _) => FailureKind::Unauthorized,
        (402, _) => FailureKind::PaymentRequired,
        (408, _) => FailureKind::Timeout,
        (429, _) => FailureKind::RateLimited,
        (500..=599, _) => FailureKind::Server,
        _ => FailureKind::BadRequest,
    }
}

fn mentions_context_length(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("context length")
        || lower.contains("context_length")
        || lower.contains("context window")
        || lower.contains("maximum context")
}

/// `Retry-After` as a wait: seconds, or an HTTP-date (RFC 9110) counted from now; at most a day.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs.min(86_400.0)),
        Ok(_) => return None,
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(Duration::from_secs(86_400)))
}

#[derive(Default)]
struct ErrorDetail {
    code: Option<u16>,
    message: String,
    error_type: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    metadata: Option<WireMetadata>,
}

#[derive(Deserialize)]
struct WireMetadata {
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    raw: Option<serde_json::Value>,
}

impl ErrorDetail {
    fn read(body: &[u8]) -> ErrorDetail {
        match serde_json::from_slice::<Envelope<'_>>(body) {
            Ok(Envelope { error: Some(raw) }) => ErrorDetail::from_object(raw),
            _ => ErrorDetail {
                message: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                ..ErrorDetail::default()
            },
        }
    }

    fn from_object(raw: &RawValue) -> ErrorDetail {
        let Ok(wire) = serde_json::from_str::<WireError>(raw.get()) else {
            return ErrorDetail {
                message: raw.get().chars().take(512).collect(),
                ..ErrorDetail::default()
            };
        };
        let code = wire.code.as_ref().and_then(|c| match c {
            serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        let metadata_type = wire.metadata.as_ref().and_then(|m| m.error_type.clone());
        // OpenRouter hides the provider's reason in `metadata.raw`; it is the useful part.
        let raw_reason = wire.metadata.and_then(|m| match m.raw {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other @ serde_json::Value::Object(_)) => Some(other.to_string()),
            _ => None,
        });
        let mut message = wire.message.unwrap_or_default();
        if let Some(reason) = raw_reason {
            if message.is_empty() {
                message = reason;
            } else {
                message = format!("{message}: {reason}");
            }
        }
        let error_type = metadata_type.or(wire.error_type).or(wire.kind);
        ErrorDetail {
            code,
            message,
            error_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str) -> Failure {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("7"),
        );
        Failure::from_openai_error(
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    #[test]
    fn statuses_map_to_kinds() {
        let f = classify(
            429,
            r#"{"error":{"message":"Rate limit exceeded","code":429}}"#,
        );
        assert_eq!(f.kind, FailureKind::RateLimited);
        assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
        let in_a_minute =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let mut dated = HeaderMap::new();
        dated.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_str(&in_a_minute).unwrap(),
        );
        let wait = retry_after(&dated).unwrap();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        dated.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&dated), Some(Duration::ZERO));
        assert_eq!(classify(402, "{}").kind, FailureKind::PaymentRequired);
        assert_eq!(classify(503, "oops").kind, FailureKind::Server);
        assert_eq!(classify(503, "oops").message, "oops");
        assert_eq!(classify(408, "").kind, FailureKind::Timeout);
        assert_eq!(classify(401, "").kind, FailureKind::Unauthorized);
        assert!(
            !classify(400, r#"{"error":{"message":"bad"}}"#)
                .kind
                .is_retryable()
        );
    }

    #[test]
    fn typed_openrouter_errors_are_recognised() {
        let f = classify(
            400,
            r#"{"error":{"code":400,"message":"too long","metadata":{"error_type":"context_length_exceeded"}}}"#,
        );
        assert_eq!(f.kind, FailureKind::ContextLength);
        let f = classify(
            400,
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens"}}"#,
        );
        assert_eq!(f.kind, FailureKind::ContextLength);
        let f = classify(
            400,
            r#"{"error":{"code":400,"message":"flagged","metadata":{"error_type":"content_policy_violation"}}}"#,
        );
        assert_eq!(f.kind, FailureKind::BadRequest);
    }

    #[test]
    fn metadata_raw_is_appended_to_the_message() {
        let f = classify(
            502,
            r#"{"error":{"message":"Provider returned error","code":502,"metadata":{"raw":"upstream exploded","provider_name":"X"}}}"#,
        );
        assert_eq!(f.message, "Provider returned error: upstream exploded");
    }

    #[test]
    fn in_stream_errors_accept_string_and_numeric_codes() {
        let raw = RawValue::from_string(r#"{"code":429,"message":"slow down"}"#.into()).unwrap();
        assert_eq!(
            Failure::from_error_object(&raw).kind,
            FailureKind::RateLimited
        );
        let raw = RawValue::from_string(r#"{"code":"server_error","message":"x"}"#.into()).unwrap();
        let f = Failure::from_error_object(&raw);
        assert_eq!((f.kind, f.status), (FailureKind::Server, 502));
    }
}
