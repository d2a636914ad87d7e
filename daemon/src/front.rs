//! The client-facing APIs: OpenAI chat completions and Anthropic Messages.
//!
//! Both go through the one pipeline, whose internal format is OpenAI's. A Messages request is
//! translated to it at the edge and its answer translated back (errors too), except for
//! backends that speak Messages themselves: those get the client's body as it came and their
//! answer goes back untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use orproxy_plugin::anthropic::{self, AnswerContext, StreamTranslator};
use orproxy_plugin::{Call, JsonObject, Output, SseFramer};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::App;
use crate::error::ProxyError;
use crate::pipeline::{stamp, with_route};
use crate::route;

/// Which API the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/messages`.
    Messages,
}

impl Api {
    /// The error answer in this API's shape (same status and `Retry-After`).
    pub fn error_response(self, error: ProxyError) -> Response {
        match self {
            Api::Chat => error.into_response(),
            Api::Messages => {
                let status = error.status();
                let message = client_message(&error);
                let retry_after = error.retry_after();
                let mut response =
                    (status, anthropic::error_body(status.as_u16(), &message)).into_response();
                let headers = response.headers_mut();
                // An upstream's rate-limit headers tell the client as much in either shape.
                if let ProxyError::Upstream { answer, .. } = &error {
                    for (name, value) in &answer.headers {
                        if name.as_str().starts_with("x-ratelimit-") {
                            headers.insert(name.clone(), value.clone());
                        }
                    }
                }
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                if let Some(value) = retry_after {
                    headers.insert(RETRY_AFTER, value);
                }
                response
            }
        }
    }

    /// The SSE event that ends a committed stream with `error`.
    pub fn error_event(self, error: &ProxyError) -> Bytes {
        match self {
            Api::Chat => {
                let payload = serde_json::json!({"error": {"message": error.to_string(), "type": "upstream_error", "code": error.code()}});
                orproxy_plugin::sse::data_event(payload.to_string().as_bytes())
            }
            Api::Messages => {
                anthropic::error_event(error.status().as_u16(), &client_message(error))
            }
        }
    }
}

/// The message a client should read: an upstream's own error message when it sent one.
fn client_message(error: &ProxyError) -> String {
    if let ProxyError::Upstream { answer, .. } = error
        && let Ok(body) = serde_json::from_slice::<Value>(&answer.body)
        && let Some(message) = body["error"]["message"].as_str()
    {
        return message.to_owned();
    }
    error.to_string()
}

/// What a Messages request keeps beside its OpenAI translation.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    /// The body as the client sent it (for backends that speak Messages).
    pub body: JsonObject,
}

/// Translates a Messages body; `Err` is a 400 naming the field.
pub fn messages_to_openai(
    bytes: &[u8],
    body: JsonObject,
) -> Result<(JsonObject, MessagesRequest), ProxyError> {
    let openai =
        anthropic::request_to_openai(bytes).map_err(|e| ProxyError::Translate(e.to_string()))?;
    Ok((openai, MessagesRequest { body }))
}

/// A successful OpenAI answer body for a Messages client.
pub fn messages_answer(
    body: &Bytes,
    context: &AnswerContext,
    backend: &str,
) -> Result<Bytes, ProxyError> {
    anthropic::response_from_openai(body, context).map_err(|e| ProxyError::Unreachable {
        backend: backend.to_owned(),
        reason: format!("cannot translate the answer to the Messages format: {e}"),
    })
}

/// A complete answer, already in the client's API, as the stream the client asked for (an
/// upstream that ignored `stream: true` answered one JSON body); `include_usage` is whether a
/// chat client asked for the usage chunk.
pub fn answer_as_stream(
    api: Api,
    body: &[u8],
    include_usage: bool,
    backend: &str,
) -> Result<Bytes, ProxyError> {
    let events = match api {
        Api::Chat => orproxy_plugin::openai::completion_events(body, include_usage)
            .map_err(|e| e.to_string()),
        Api::Messages => anthropic::message_events(body).map_err(|e| e.to_string()),
    };
    events.map_err(|e| ProxyError::Unreachable {
        backend: backend.to_owned(),
        reason: format!("cannot replay the answer as a stream: {e}"),
    })
}

/// Turns a translated attempt's OpenAI stream into Messages events, event by event.
pub struct StreamOut {
    translator: StreamTranslator,
    framer: SseFramer,
}

impl StreamOut {
    /// A translator for one attempt's stream.
    pub fn new(request_id: &str, context: &AnswerContext) -> StreamOut {
        StreamOut {
            translator: StreamTranslator::new(&format!("msg_{request_id}"), context),
            framer: SseFramer::new(),
        }
    }

    /// Translates the OpenAI events in `out` into `into`; comments (keep-alives) pass as they are.
    pub fn translate(&mut self, out: Output, into: &mut BytesMut) {
        let mut feed = |bytes: &Bytes| {
            self.framer.push(bytes);
            while let Some(event) = self.framer.next_event() {
                if event.is_comment() {
                    into.extend_from_slice(event.raw());
                } else if let Some(data) = event.data() {
                    self.translator.push(&data, into);
                }
            }
        };
        match out {
            Output::One(bytes) => feed(&bytes),
            Output::Many(list) => list.iter().for_each(feed),
            Output::Nothing => {}
        }
    }

    /// Closes the Messages stream if the upstream ended without its terminator.
    pub fn finish(&mut self, into: &mut BytesMut) {
        self.translator.finish(into);
    }
}

/// `POST /v1/messages/count_tokens`: the backend's own count when it speaks Messages and has
/// one, else an estimate (four bytes of JSON per token).
pub async fn count_tokens(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let id = app.ids.next();
    let mut route = None;
    let (response, error) = match count(&app, peer, headers, body, &mut route).await {
        Ok(response) => (response, None),
        Err(error) => {
            let reason = error.to_string();
            (Api::Messages.error_response(error), Some(reason))
        }
    };
    // Not a model call (nothing is billed, so no usage row), but still one log line per request.
    tracing::info!(
        target: "orproxy::request",
        message = "Token count answered.",
        request_id = %id,
        route = route.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        latency_ms = crate::record::millis(started.elapsed()),
        error = error.as_deref(),
    );
    stamp(
        with_route(response, route.as_deref()),
        HeaderValue::try_from(id).ok(),
    )
}

async fn count(
    app: &App,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
    route_label: &mut Option<String>,
) -> Result<Response, ProxyError> {
    let table = app.table.load_full();
    let key = table.auth.authenticate(&headers)?.map(str::to_owned);
    let bytes = crate::pipeline::read_body(body, &table.limits, &app.hard_stop).await?;
    let parsed = JsonObject::parse(&bytes)?;
    let (openai, request) = messages_to_openai(&bytes, parsed)?;
    let cx = route::Context {
        key,
        client_ip: Some(peer.ip()),
        host: Arc::clone(&app.spending),
        clock: None,
    };
    let route = route::resolve(&table, &openai, &cx)?;
    let target = &route.targets[0];
    *route_label = Some(target.label());
    if let Some(backend) = table
        .backend(&target.backend)
        .filter(|b| b.plugin.speaks_messages())
    {
        let mut body = request.body.clone();
        body.set("model", &target.model);
        let forward = crate::dispatch::forwarded_headers(&headers);
        let api_key = backend.next_key();
        let call = Call {
            request_id: "count_tokens",
            body: &body,
            model: &target.model,
            stream: false,
            api_key: api_key.map(|k| k.secret.expose()),
            identity: backend.identity.resolve(&headers),
            headers: &forward,
        };
        if let Some(prepared) = backend.plugin.count_tokens(&call) {
            let deadline = Instant::now() + table.limits.first_byte_timeout;
            let fail =
                |error| crate::dispatch::attempt_error(&backend.name, &table, error, deadline);
            let mut response = app.client().send(prepared, deadline).await.map_err(fail)?;
            let answer = response
                .collect(
                    table.limits.max_response_bytes,
                    table.limits.idle_timeout,
                    deadline,
                )
                .await
                .map_err(fail)?;
            let mut out = Response::new(Body::from(answer));
            *out.status_mut() = response.status;
            out.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(out);
        }
    }
    let tokens = anthropic::count_tokens_estimate(&bytes)
        .map_err(|e| ProxyError::Translate(e.to_string()))?;
    Ok(Json(serde_json::json!({ "input_tokens": tokens })).into_response())
}
