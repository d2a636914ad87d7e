//! The request pipeline, in the order every chat completion goes through it:
//!
//! ```text
//! accept ─► authenticate ─► read body ─► route ─► budget ─► dispatch ─► relay ─► record
//!  (axum)     auth.rs        (limits)    route.rs  budget.rs  dispatch.rs  relay.rs  record.rs
//! ```
//!
//! `POST /v1/chat/completions` and `POST /v1/messages` share it; a Messages request is
//! translated to the OpenAI format after the body is read and its answer translated back
//! ([`crate::front`]).
//!
//! The routing table is loaded once at accept and the request finishes on that snapshot, even
//! if a reload swaps it meanwhile. Failures before dispatch are `rejected` (or
//! `budget_exceeded`); errors map to HTTP in one place, [`ProxyError`]'s `IntoResponse`, shaped
//! for the client's API by [`Api::error_response`].

use std::sync::Arc;

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use orproxy_plugin::JsonObject;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::App;
use crate::budget;
use crate::dispatch::{self, Exchange, forwarded_headers, outcome_of};
use crate::error::ProxyError;
use crate::front::{self, Api};
use crate::record::Record;
use crate::relay;
use crate::route;
use crate::table::{Limits, RoutingTable};

/// orproxy's id of the request, on every response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-orproxy-request-id");
/// The `backend:model` that served (or was last tried), on every response.
pub const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-orproxy-route");

/// The path of the chat completions API.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// `POST /v1/chat/completions`, as the server hands it over without the router.
pub async fn chat_completions_request(
    app: Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response {
    let (parts, body) = request.into_parts();
    handle(app, peer, parts.headers, Body::new(body), Api::Chat).await
}

/// `POST /v1/chat/completions` through the router, which the server bypasses for it
/// ([`chat_completions_request`]); the route keeps the router whole (a `GET` there is a 405).
pub async fn chat_completions(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, peer, headers, body, Api::Chat).await
}

/// `POST /v1/messages` (Anthropic Messages): the same pipeline, translated at its edges
/// ([`crate::front`]).
pub async fn messages(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, peer, headers, body, Api::Messages).await
}

async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    headers: HeaderMap,
    body: Body,
    api: Api,
) -> Response {
    let started = Instant::now();
    let table = app.table.load_full();
    crate::idle_poll::event(started, table.limits.idle_poll);
    let mut record = Record::new(
        app.ids.next(),
        started,
        Arc::clone(&table),
        Arc::clone(&app.accounts),
    );
    let request_id = HeaderValue::try_from(record.id.as_str()).ok();

    let response = match admit(&app, &table, headers, body, peer, api, &mut record).await {
        Err(error) => {
            let status = error.status().as_u16();
            record.error = Some(error.to_string());
            let route = record.route.clone();
            let outcome = outcome_of(&error);
            if outcome == crate::record::Outcome::ClientDisconnected {
                // The client left while sending its body: no answer reached it.
                record.finish(status, outcome);
            } else {
                record.answered(status, outcome);
            }
            with_route(api.error_response(error), route.as_deref())
        }
        Ok(exchange) if exchange.stream => {
            relay::stream(Arc::clone(&app), table, exchange, record).await
        }
        Ok(exchange) => match answer_or_stop(&app, &table, &exchange, &mut record).await {
            Ok((response, outcome)) => {
                let status = response.status().as_u16();
                let route = record.route.clone();
                record.answered(status, outcome);
                with_route(response, route.as_deref())
            }
            Err(error) => {
                let status = error.status().as_u16();
                let route = record.route.clone();
                crate::dispatch::note_error(&mut record, &error);
                record.answered(status, outcome_of(&error));
                with_route(api.error_response(error), route.as_deref())
            }
        },
    };
    stamp(response, request_id)
}

/// [`dispatch::json`], unless the daemon's shutdown grace runs out first: the client then gets
/// a 503 and the request its record, instead of a connection closed with neither.
async fn answer_or_stop(
    app: &App,
    table: &RoutingTable,
    exchange: &Exchange,
    record: &mut Record,
) -> Result<(Response, crate::record::Outcome), ProxyError> {
    let mut hard_stop = app.hard_stop.clone();
    let answered = tokio::select! {
        biased;
        answer = dispatch::json(app, table, exchange, record) => Some(answer),
        _ = hard_stop.wait_for(|stop| *stop) => None,
    };
    answered.unwrap_or_else(|| {
        record.close_attempt("shutdown");
        Err(ProxyError::ShuttingDown)
    })
}

/// Authenticates, reads and parses the body, routes and reserves budget: everything before the
/// first upstream byte.
async fn admit(
    app: &App,
    table: &RoutingTable,
    headers: HeaderMap,
    body: Body,
    peer: SocketAddr,
    api: Api,
    record: &mut Record,
) -> Result<Exchange, ProxyError> {
    record.key = table.auth.authenticate(&headers)?.map(str::to_owned);
    record.client_ip = Some(peer.ip());
    let bytes = read_body(body, &table.limits, &app.hard_stop).await?;
    let body = JsonObject::parse(&bytes)?;
    let (body, messages) = match api {
        Api::Chat => (body, None),
        Api::Messages => {
            let (openai, request) = front::messages_to_openai(&bytes, body)?;
            (openai, Some(request))
        }
    };
    let stream = body.get_bool("stream")?.unwrap_or(false);
    record.stream = stream;
    record.model_requested = body.get_str("model")?;
    let cx = route::Context {
        key: record.key.clone(),
        client_ip: Some(peer.ip()),
        host: Arc::clone(&app.spending),
        clock: None,
    };
    let mut route = route::resolve(table, &body, &cx)?;
    record.tags = route.tags.clone();
    record.rules = compact_trace(&route.trace);
    record.route = route.targets.first().map(route::Target::label);
    record.rewritten = route.rewritten.clone();
    budget::admit(table, &app.accounts, &body, &mut route, record)?;
    Ok(Exchange {
        body,
        stream,
        route,
        forward: forwarded_headers(&headers),
        client_headers: headers,
        deadline: record.started + table.limits.total_timeout,
        api,
        messages,
    })
}

/// `script:field,field;script:field`, the rules trace as it is kept with the request.
pub fn compact_trace(trace: &[orproxy_rules::Change]) -> Option<String> {
    if trace.is_empty() {
        return None;
    }
    let mut out = String::new();
    let mut script: Option<&str> = None;
    for change in trace {
        if script == Some(&*change.script) {
            out.push(',');
        } else {
            if script.is_some() {
                out.push(';');
            }
            script = Some(&change.script);
            out.push_str(&change.script);
            out.push(':');
        }
        out.push_str(change.field);
    }
    Some(out)
}

/// Reads the request body, refusing more than `limits.max_body_bytes` (before buffering them)
/// and a client silent for `limits.client_timeout` between two parts of it (hyper's timer
/// covers the head only: a client stopping mid-body would hold its connection forever).
pub(crate) async fn read_body(
    body: Body,
    limits: &Limits,
    hard_stop: &watch::Receiver<bool>,
) -> Result<Bytes, ProxyError> {
    let limit = limits.max_body_bytes;
    let mut body = Limited::new(body, limit);
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    loop {
        // A body already received is taken without a timer (making one costs a clock read
        // and, when dropped, the timer driver's lock).
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                // A client still sending when the shutdown grace runs out gets its 503 (and
                // its row) now, rather than holding the worker past the daemon's exit.
                let mut hard_stop = hard_stop.clone();
                tokio::select! {
                    frame = tokio::time::timeout(limits.client_timeout, body.frame()) => {
                        frame.map_err(|_| ProxyError::ClientTimeout {
                            limit: limits.client_timeout,
                        })?
                    }
                    Ok(_) = hard_stop.wait_for(|stop| *stop) => return Err(ProxyError::ShuttingDown),
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(e)) if e.is::<LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            Some(Err(e)) if client_left(&*e) => return Err(ProxyError::ClientLeft),
            Some(Err(e)) => return Err(ProxyError::ClientBody(e.to_string())),
        };
        // Most bodies come in one piece: kept as it came, not copied.
        if first.is_none() && more.is_empty() {
            first = Some(data);
        } else {
            if let Some(first) = first.take() {
                more.extend_from_slice(&first);
            }
            more.extend_from_slice(&data);
        }
    }
    Ok(first.unwrap_or_else(|| more.freeze()))
}

/// Whether a body read failed because the client closed or reset its connection (rather than
/// sending something hyper could not decode).
fn client_left(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<hyper::Error>()
            && e.is_incomplete_message()
        {
            return true;
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cause = e.source();
    }
    false
}

/// Sets `x-orproxy-route` to the route decided, if any.
pub fn with_route(mut response: Response, route: Option<&str>) -> Response {
    if let Some(value) = route.and_then(|r| HeaderValue::try_from(r).ok()) {
        response.headers_mut().insert(ROUTE_HEADER, value);
    }
    response
}

/// Adds the request id, and a route header where none was decided.
pub fn stamp(mut response: Response, request_id: Option<HeaderValue>) -> Response {
    let headers = response.headers_mut();
    if let Some(id) = request_id {
        headers.insert(REQUEST_ID_HEADER, id);
    }
    if !headers.contains_key(ROUTE_HEADER) {
        headers.insert(ROUTE_HEADER, HeaderValue::from_static("none"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    fn limits(max_body_bytes: usize) -> Limits {
        Limits {
            max_body_bytes,
            ..Limits::default()
        }
    }

    /// A shutdown signal that never comes: its sender is gone, which reading the body takes
    /// as no signal.
    fn running() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    fn body_of(parts: &[&'static str]) -> Body {
        let parts: Vec<Result<Bytes, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect();
        Body::from_stream(futures_util::stream::iter(parts))
    }

    #[tokio::test]
    async fn a_body_in_parts_is_read_whole_and_its_size_checked() {
        let read = read_body(body_of(&["{\"a\":", "1", "}"]), &limits(100), &running()).await;
        assert_eq!(read.unwrap(), Bytes::from_static(b"{\"a\":1}"));
        let read = read_body(body_of(&["{}"]), &limits(100), &running()).await;
        assert_eq!(read.unwrap(), Bytes::from_static(b"{}"));
        assert_eq!(
            read_body(body_of(&[]), &limits(100), &running())
                .await
                .unwrap(),
            ""
        );
        let read = read_body(
            body_of(&["0123456789", "0123456789"]),
            &limits(15),
            &running(),
        )
        .await;
        assert!(matches!(read, Err(ProxyError::BodyTooLarge { limit: 15 })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_times_out() {
        let parts = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))])
            .chain(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        let read = read_body(Body::from_stream(parts), &limits(100), &running()).await;
        assert!(matches!(read, Err(ProxyError::ClientTimeout { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_still_coming_when_the_grace_runs_out_ends_at_once() {
        let parts = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))])
            .chain(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        let (stop, stopped) = watch::channel(false);
        let started = tokio::time::Instant::now();
        let limits = limits(100);
        let (read, ()) = tokio::join!(
            read_body(Body::from_stream(parts), &limits, &stopped),
            async {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let _ = stop.send(true);
            }
        );
        assert!(matches!(read, Err(ProxyError::ShuttingDown)));
        assert!(started.elapsed() < limits.client_timeout);
    }
}
