//! Every way a request can fail, and the one place that turns a failure into an HTTP answer.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use orproxy_plugin::{BodyError, Failure, PrepareError};
use serde_json::json;

use crate::auth::AuthError;
use crate::selector::SelectorError;

/// Which limit an upstream exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// `limits.connect_timeout`.
    Connect,
    /// `limits.first_byte_timeout`.
    FirstByte,
    /// `limits.idle_timeout`.
    Idle,
    /// `limits.total_timeout`.
    Total,
}

impl TimeoutKind {
    /// The config key of the limit, used as the error code.
    pub fn key(self) -> &'static str {
        match self {
            TimeoutKind::Connect => "connect_timeout",
            TimeoutKind::FirstByte => "first_byte_timeout",
            TimeoutKind::Idle => "idle_timeout",
            TimeoutKind::Total => "total_timeout",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            TimeoutKind::Connect => "could not connect to the upstream",
            TimeoutKind::FirstByte => "the upstream did not start answering",
            TimeoutKind::Idle => "the upstream went silent",
            TimeoutKind::Total => "the request did not complete",
        }
    }
}

/// An upstream's own error answer, relayed as it came (status, body, rate-limit headers).
#[derive(Debug, Clone)]
pub struct UpstreamAnswer {
    /// The upstream's status.
    pub status: StatusCode,
    /// The headers worth relaying (`Content-Type`, `Retry-After`, `X-RateLimit-*`).
    pub headers: HeaderMap,
    /// The upstream's body.
    pub body: Bytes,
}

impl UpstreamAnswer {
    /// An OpenAI-shaped answer for an upstream error that arrived inside a 200 (a stream's
    /// error event before content, or an error body): the client sees the error's own status.
    pub fn from_failure(failure: &Failure) -> Self {
        let status = StatusCode::from_u16(failure.status)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::BAD_GATEWAY);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = json!({"error": {"message": failure.message, "type": "upstream_error", "param": null, "code": failure.status}});
        UpstreamAnswer {
            status,
            headers,
            body: Bytes::from(body.to_string()),
        }
    }
}

/// A request failure.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// 401.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 400: the body is not a usable JSON object.
    #[error("{0}")]
    BadBody(#[from] BodyError),
    /// 400: a Messages request that cannot be expressed in the pipeline's format.
    #[error("{0}")]
    Translate(String),
    /// 400: no `model` and no `--force-model`.
    #[error("the request has no `model`")]
    MissingModel,
    /// 400.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// 413.
    #[error("request body is larger than limits.max_body_bytes ({limit} bytes)")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// 400: the body could not be read from the client.
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    /// 499 (nginx's "client closed request"): the client left while sending its body.
    #[error("the client closed the connection before its request body was complete")]
    ClientLeft,
    /// 408: the client stopped sending its body.
    #[error(
        "the client sent nothing more of the request body for {} (limits.client_timeout)",
        fmt_duration(*limit)
    )]
    ClientTimeout {
        /// The limit.
        limit: Duration,
    },
    /// 404.
    #[error("unknown backend `{name}`; known backends: {known}")]
    UnknownBackend {
        /// The name in the selector.
        name: String,
        /// Configured backends, comma-separated.
        known: String,
    },
    /// The plugin could not build the request: 500 for a missing key (configuration), 400 for
    /// a request the backend cannot express.
    #[error("backend `{backend}` cannot send this request: {source}")]
    Prepare {
        /// The backend.
        backend: String,
        /// Why.
        #[source]
        source: PrepareError,
    },
    /// 502: no connection, a reset, or an unreadable answer.
    #[error("backend `{backend}` failed: {reason}")]
    Unreachable {
        /// The backend.
        backend: String,
        /// What happened, without secrets.
        reason: String,
    },
    /// 504.
    #[error("backend `{backend}`: {} within limits.{} ({})", .kind.explain(), .kind.key(), fmt_duration(*.limit))]
    Timeout {
        /// The backend.
        backend: String,
        /// Which limit.
        kind: TimeoutKind,
        /// Its value.
        limit: Duration,
    },
    /// The upstream answered with an error: relayed with its own status.
    #[error("backend `{backend}` answered {}", .answer.status)]
    Upstream {
        /// The backend.
        backend: String,
        /// The answer (boxed: it is large and errors travel by value).
        answer: Box<UpstreamAnswer>,
    },
    /// 502: every attempt of a failover chain failed.
    #[error("{}", every_attempt(.attempts, "failed", "failed"))]
    AllAttemptsFailed {
        /// `target: reason`, in order.
        attempts: Vec<String>,
    },
    /// 429: every attempt of a failover chain was rate-limited.
    #[error("{}", every_attempt(.attempts, "were rate-limited", "was rate-limited"))]
    AllRateLimited {
        /// The earliest `Retry-After` among them.
        retry_after: Option<Duration>,
        /// `target: reason`, in order.
        attempts: Vec<String>,
    },
    /// 500: a rule script failed (runtime error or exceeded limit); names the script.
    #[error(transparent)]
    Rule(#[from] orproxy_rules::RuleFailure),
    /// A rule refused the request (`req.reject`), with the rule's status (403 by default).
    #[error("{message}")]
    Rejected {
        /// The status the rule chose.
        status: u16,
        /// The rule's message.
        message: String,
    },
    /// 402: a budget's cap is reached.
    #[error("budget `{budget}` is exhausted ({limit_usd} USD {period}){}", .resets.as_ref().map(|r| format!("; it resets at {r}")).unwrap_or_default())]
    BudgetExceeded {
        /// The budget's name.
        budget: String,
        /// Its cap, USD.
        limit_usd: String,
        /// `per day`, `per month` or `in total`.
        period: &'static str,
        /// When its window starts again (RFC 3339).
        resets: Option<String>,
    },
    /// 402: a budget applies and the route's price is unknown, so it cannot be enforced.
    #[error("budget `{budget}` applies to {route}, whose price is unknown: add it to `pricing:`")]
    NoPrice {
        /// The budget.
        budget: String,
        /// `backend:model`.
        route: String,
    },
    /// 503: the daemon is shutting down.
    #[error("orproxy is shutting down")]
    ShuttingDown,
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// "all 3 targets failed: a: why; b: why; c: why", or for a lone target (its rest answered for
/// it) "its only target was ...". Targets, not attempts: a resting target, or one a budget left
/// untried, is listed with why it was not called.
fn every_attempt(attempts: &[String], plural: &str, singular: &str) -> String {
    match attempts {
        [one] => format!("its only target {singular}: {one}"),
        all => format!("all {} targets {plural}: {}", all.len(), all.join("; ")),
    }
}

impl ProxyError {
    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Auth(_) => StatusCode::UNAUTHORIZED,
            ProxyError::BadBody(_)
            | ProxyError::Translate(_)
            | ProxyError::MissingModel
            | ProxyError::Selector(_)
            | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ClientLeft => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ProxyError::UnknownBackend { .. } => StatusCode::NOT_FOUND,
            // The backend cannot express this request (a client matter); a missing key is ours.
            ProxyError::Prepare {
                source: PrepareError::MissingKey,
                ..
            } => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Prepare { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { answer, .. } => answer.status,
            ProxyError::AllAttemptsFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Rule(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Rejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN)
            }
            ProxyError::AllRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BudgetExceeded { .. } | ProxyError::NoPrice { .. } => {
                StatusCode::PAYMENT_REQUIRED
            }
            ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI error `code` (also the low-cardinality kind used in logs).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Auth(AuthError::Missing) => "missing_api_key",
            ProxyError::Auth(AuthError::Invalid) => "invalid_api_key",
            ProxyError::BadBody(_) => "invalid_json",
            ProxyError::Translate(_) => "invalid_request",
            ProxyError::MissingModel => "missing_model",
            ProxyError::Selector(_) => "invalid_model",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "invalid_body",
            ProxyError::ClientTimeout { .. } => "client_timeout",
            ProxyError::ClientLeft => "client_disconnected",
            ProxyError::UnknownBackend { .. } => "unknown_backend",
            ProxyError::Prepare {
                source: PrepareError::MissingKey,
                ..
            } => "backend_misconfigured",
            ProxyError::Prepare { .. } => "invalid_request",
            ProxyError::Unreachable { .. } => "upstream_unreachable",
            ProxyError::Timeout { kind, .. } => kind.key(),
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::AllAttemptsFailed { .. } => "all_attempts_failed",
            ProxyError::Rule(_) => "rule_failed",
            ProxyError::Rejected { .. } => "rejected_by_rule",
            ProxyError::AllRateLimited { .. } => "rate_limited",
            ProxyError::BudgetExceeded { .. } => "budget_exceeded",
            ProxyError::NoPrice { .. } => "price_unknown",
            ProxyError::ShuttingDown => "shutting_down",
        }
    }

    fn error_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            500 => "server_error",
            _ => "upstream_error",
        }
    }

    /// The `Retry-After` the client should see: the upstream's, the earliest of a rate-limited
    /// chain (whole seconds, rounded up), or a second while shutting down.
    pub fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            ProxyError::Upstream { answer, .. } => answer.headers.get(RETRY_AFTER).cloned(),
            ProxyError::AllRateLimited {
                retry_after: Some(after),
                ..
            } => Some(HeaderValue::from(
                after.as_secs() + u64::from(after.subsec_nanos() > 0),
            )),
            ProxyError::ShuttingDown => Some(HeaderValue::from_static("1")),
            _ => None,
        }
    }

    /// The OpenAI-shaped JSON body.
    pub fn body(&self) -> Bytes {
        Bytes::from(
            json!({"error": {"message": self.to_string(), "type": self.error_type(), "param": null, "code": self.code()}})
                .to_string(),
        )
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if let ProxyError::Upstream { answer, .. } = self {
            let UpstreamAnswer {
                status,
                headers,
                body,
            } = *answer;
            let mut response = Response::new(axum::body::Body::from(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            return response;
        }
        let retry_after = self.retry_after();
        let mut response = (self.status(), self.body()).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let err = ProxyError::Timeout {
            backend: "openrouter".into(),
            kind: TimeoutKind::FirstByte,
            limit: Duration::from_millis(1500),
        };
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["error"]["code"], "first_byte_timeout");
        assert_eq!(v["error"]["type"], "upstream_error");
        assert_eq!(
            v["error"]["message"],
            "backend `openrouter`: the upstream did not start answering within limits.first_byte_timeout (1500ms)"
        );
    }

    #[test]
    fn upstream_answers_keep_their_status_body_and_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        let err = ProxyError::Upstream {
            backend: "openrouter".into(),
            answer: Box::new(UpstreamAnswer {
                status: StatusCode::TOO_MANY_REQUESTS,
                headers,
                body: Bytes::from_static(b"{\"error\":{}}"),
            }),
        };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "3");
    }
}
