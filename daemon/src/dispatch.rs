//! Dispatch: build each attempt with its backend's plugin, send it, and (for plain JSON answers)
//! relay the first good answer. Streams continue in [`crate::relay`].

use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use orproxy_plugin::{Call, Failure, JsonObject, Prepared};
use tokio::time::Instant;

use crate::app::App;
use crate::error::{ProxyError, TimeoutKind};
use crate::record::{Outcome, Record};
use crate::route::{Route, Target};
use crate::table::{BackendEntry, RoutingTable};
use crate::upstream::{AttemptError, UpstreamResponse};

/// An admitted request: authenticated, parsed and routed.
pub struct Exchange {
    /// The client's body; `model` is rewritten per attempt.
    pub body: JsonObject,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Where to send it.
    pub route: Route,
    /// The client's headers (identity passthrough reads them).
    pub client_headers: HeaderMap,
    /// Client headers forwarded upstream as they are.
    pub forward: Vec<(HeaderName, HeaderValue)>,
    /// `limits.total_timeout` from arrival.
    pub deadline: Instant,
}

/// Client headers that carry meaning for upstreams and are safe to forward.
pub fn forwarded_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            // Titles are identity headers: `identity.title` decides them.
            (n.starts_with("x-openrouter-") && n != "x-openrouter-title")
                || n == "x-session-id"
                || n == "anthropic-beta"
                || n == "x-anthropic-beta"
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Builds one attempt's upstream request.
pub fn prepare(
    backend: &BackendEntry,
    exchange: &mut Exchange,
    target: &Target,
    request_id: &str,
) -> Result<Prepared, ProxyError> {
    exchange.body.set("model", &target.model);
    let call = Call {
        request_id,
        body: &exchange.body,
        model: &target.model,
        stream: exchange.stream,
        api_key: backend.next_key().map(|k| k.expose()),
        identity: backend.identity.resolve(&exchange.client_headers),
        headers: &exchange.forward,
    };
    backend
        .plugin
        .prepare(&call)
        .map_err(|source| ProxyError::Prepare {
            backend: backend.name.clone(),
            source,
        })
}

/// Maps an attempt that produced no answer to the client-facing error. A timeout that fired
/// at the request's `deadline` is reported as the total timeout, whatever timer noticed it.
pub fn attempt_error(
    backend: &str,
    table: &RoutingTable,
    error: AttemptError,
    deadline: Instant,
) -> ProxyError {
    let limits = &table.limits;
    let error = match error {
        AttemptError::Timeout(_) if Instant::now() >= deadline => {
            AttemptError::Timeout(TimeoutKind::Total)
        }
        other => other,
    };
    match error {
        AttemptError::Connect(reason) | AttemptError::Broken(reason) => ProxyError::Unreachable {
            backend: backend.to_owned(),
            reason,
        },
        AttemptError::TooLarge(max) => ProxyError::Unreachable {
            backend: backend.to_owned(),
            reason: format!("answer larger than limits.max_response_bytes ({max} bytes)"),
        },
        AttemptError::Timeout(kind) => ProxyError::Timeout {
            backend: backend.to_owned(),
            kind,
            limit: match kind {
                TimeoutKind::Connect => limits.connect_timeout,
                TimeoutKind::FirstByte => limits.first_byte_timeout,
                TimeoutKind::Idle => limits.idle_timeout,
                TimeoutKind::Total => limits.total_timeout,
            },
        },
    }
}

/// A short reason for the attempt log (`429 rate_limited`, `connect`, `first_byte_timeout`).
pub fn failure_reason(failure: &Failure) -> String {
    format!("{} {:?}", failure.status, failure.kind)
}

/// The outcome recorded for a request that ended with `error`.
pub fn outcome_of(error: &ProxyError) -> Outcome {
    match error {
        ProxyError::Timeout { .. } => Outcome::Timeout,
        ProxyError::Upstream { .. }
        | ProxyError::Unreachable { .. }
        | ProxyError::Prepare { .. } => Outcome::UpstreamError,
        _ => Outcome::Rejected,
    }
}

/// Upstream response headers that must not be relayed (hop-by-hop, or recomputed by orproxy).
pub fn relayable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "set-cookie"
            | "date"
            | "server"
            | "alt-svc"
    )
}

/// Tries the route's targets in order and relays the first successful non-streamed answer.
pub async fn json(
    app: &App,
    table: &RoutingTable,
    exchange: &mut Exchange,
    record: &mut Record,
) -> Result<Response, ProxyError> {
    let limits = table.limits;
    let targets = exchange.route.targets.clone();
    let mut last_error = None;
    for (i, target) in targets.iter().enumerate() {
        let more = i + 1 < targets.len();
        let Some(backend) = table.backend(&target.backend) else {
            continue;
        };
        let label = target.label();
        record.route = Some(label.clone());
        let prepared = prepare(backend, exchange, target, &record.id)?;
        let first_byte = exchange
            .deadline
            .min(Instant::now() + limits.first_byte_timeout);
        let result = match app.client.send(prepared, first_byte).await {
            Ok(mut response) => {
                match response
                    .collect(
                        limits.max_response_bytes,
                        limits.idle_timeout,
                        exchange.deadline,
                    )
                    .await
                {
                    Ok(body) => Ok((response, body)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let (response, body) = match result {
            Ok(answer) => answer,
            Err(error) => {
                let error = attempt_error(&backend.name, table, error, exchange.deadline);
                record.attempt(&label, error.code());
                last_error = Some(error);
                if more {
                    continue;
                }
                break;
            }
        };
        let status = response.status;
        let failure = if status.is_success() {
            let mapped = backend.plugin.map_response(&body);
            match mapped.failure {
                None => {
                    record.usage = mapped.usage;
                    record.model_served = mapped.model;
                    record.attempt(&label, "ok");
                    return Ok(success(response, mapped.body.unwrap_or(body)));
                }
                Some(failure) => failure,
            }
        } else {
            backend.plugin.classify(status, &response.headers, &body)
        };
        record.attempt(&label, failure_reason(&failure));
        record.error = Some(failure.message.clone());
        let mut answer = response.into_answer(body);
        if answer.status.is_success() {
            // An error hidden in a 200 is relayed with the error's own status.
            answer = crate::error::UpstreamAnswer::from_failure(&failure);
        }
        last_error = Some(ProxyError::Upstream {
            backend: backend.name.clone(),
            answer: Box::new(answer),
        });
        if !(more && failure.kind.is_retryable()) {
            break;
        }
    }
    // `route::resolve` never returns an empty route, so some attempt set the error.
    Err(last_error.unwrap_or(ProxyError::MissingModel))
}

/// A successful answer with the upstream's relayable headers.
pub fn success(response: UpstreamResponse, body: Bytes) -> Response {
    let mut out = Response::new(axum::body::Body::from(body));
    *out.status_mut() = response.status;
    let headers = out.headers_mut();
    for (name, value) in &response.headers {
        if relayable(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    out
}
