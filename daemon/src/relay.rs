//! The stream relay: each upstream event goes to the client as it arrives.
//!
//! Before the first content event the answer is held (SPEC §8): upstream keep-alives are
//! dropped, role-only preamble chunks are kept back, and failover is still possible. After
//! `limits.commit_after` without content, orproxy commits `200 text/event-stream` and sends its
//! own keep-alives while it keeps trying. Once content flows, events pass through unchanged and
//! a broken upstream ends the client's stream with an explicit error event, never a clean end.
//!
//! The relay runs in its own task; the client's body is the receiving end of a channel, so a
//! client that goes away closes the channel and the task drops the upstream request.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http_body::Frame;
use orproxy_plugin::{EventKind, MappedEvent, Output, SseFramer, StreamMapper};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::app::App;
use crate::dispatch::{Exchange, attempt_error, failure_reason, prepare};
use crate::error::{ProxyError, TimeoutKind};
use crate::record::{Outcome, Record};
use crate::table::RoutingTable;
use crate::upstream::{AttemptError, UpstreamResponse};

/// Events buffered between the relay task and the client connection.
const CHANNEL_DEPTH: usize = 64;

/// What the handler answers with: the stream, or a complete response (an error before commit).
enum Commit {
    Stream { route: String },
    Response(Response),
}

/// Starts relaying a streamed request and answers once the stream is committed (or failed).
pub async fn stream(
    app: Arc<App>,
    table: Arc<RoutingTable>,
    exchange: Exchange,
    record: Record,
) -> Response {
    let (commit_tx, commit_rx) = oneshot::channel();
    let (events_tx, mut events_rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
    let hard_stop = app.hard_stop.clone();
    let relay = Relay {
        app,
        table,
        exchange,
        record,
        commit: Some(commit_tx),
        events: events_tx,
        hard_stop,
        content_started: false,
    };
    tokio::spawn(relay.run());
    match commit_rx.await {
        Ok(Commit::Response(response)) => response,
        Ok(Commit::Stream { route }) => {
            let body = futures_util::stream::poll_fn(move |cx| {
                events_rx
                    .poll_recv(cx)
                    .map(|next| next.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))))
            });
            let mut response = Response::new(Body::new(http_body_util::StreamBody::new(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Reverse proxies in front of orproxy must not buffer the stream either.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            if let Ok(value) = HeaderValue::try_from(route) {
                headers.insert(crate::pipeline::ROUTE_HEADER, value);
            }
            response
        }
        // The relay task ended without deciding: only a panic does that.
        Err(_) => ProxyError::ShuttingDown.into_response(),
    }
}

/// Why an attempt ended without delivering a complete answer.
enum AttemptEnd {
    /// Failed before content: the next target may be tried.
    Retry(ProxyError, bool),
    /// The client is gone or the daemon is stopping: stop everything.
    Stop(Outcome),
    /// Done: the answer went through (possibly ending in a relayed upstream error).
    Finished(Outcome),
}

struct Relay {
    app: Arc<App>,
    table: Arc<RoutingTable>,
    exchange: Exchange,
    record: Record,
    commit: Option<oneshot::Sender<Commit>>,
    events: mpsc::Sender<Bytes>,
    hard_stop: watch::Receiver<bool>,
    content_started: bool,
}

impl Relay {
    async fn run(mut self) {
        let targets = self.exchange.route.targets.clone();
        let mut last_error = None;
        for (i, target) in targets.iter().enumerate() {
            let more = i + 1 < targets.len();
            let label = target.label();
            self.record.route = Some(label.clone());
            let end = match self.attempt(target, &label).await {
                Ok(end) => end,
                Err(error) => AttemptEnd::Retry(error, false),
            };
            match end {
                AttemptEnd::Finished(outcome) => {
                    let status = if self.commit.is_none() { 200 } else { 502 };
                    self.record.finish(status, outcome);
                    return;
                }
                AttemptEnd::Stop(outcome) => {
                    let status = if self.commit.is_none() { 200 } else { 499 };
                    self.record.finish(status, outcome);
                    return;
                }
                AttemptEnd::Retry(error, retryable) => {
                    last_error = Some(error);
                    if !(more && retryable) {
                        break;
                    }
                }
            }
        }
        let error = last_error.unwrap_or(ProxyError::MissingModel);
        self.fail(error).await;
    }

    /// Ends the request with `error`: a plain error answer, or an error event if committed.
    async fn fail(mut self, error: ProxyError) {
        let outcome = crate::dispatch::outcome_of(&error);
        self.record.error.get_or_insert_with(|| error.to_string());
        match self.commit.take() {
            Some(commit) => {
                let status = error.status().as_u16();
                let mut response = error.into_response();
                if let Some(route) = self
                    .record
                    .route
                    .as_deref()
                    .and_then(|r| HeaderValue::try_from(r).ok())
                {
                    response
                        .headers_mut()
                        .insert(crate::pipeline::ROUTE_HEADER, route);
                }
                let _ = commit.send(Commit::Response(response));
                self.record.finish(status, outcome);
            }
            None => {
                let _ = self.events.send(error_event(&error)).await;
                self.record.finish(200, outcome);
            }
        }
    }

    /// Sends the stream's head to the client (once).
    fn commit_stream(&mut self) {
        if let Some(commit) = self.commit.take() {
            let route = self.record.route.clone().unwrap_or_default();
            let _ = commit.send(Commit::Stream { route });
        }
    }

    /// Waits for `fut` while keeping the client informed (commit, keep-alives) and watching for
    /// its departure. `Err` means stop: the client left or the daemon is out of grace.
    async fn wait<F: Future>(
        &mut self,
        fut: F,
        tick: &mut Instant,
    ) -> Result<F::Output, AttemptEnd> {
        let mut fut = std::pin::pin!(fut);
        let interval = self.table.limits.commit_after;
        loop {
            let ticking = !self.content_started;
            let woke = tokio::select! {
                biased;
                _ = client_gone(&mut self.commit, &self.events) => Woke::Gone,
                _ = self.hard_stop.wait_for(|stop| *stop) => Woke::Stop,
                out = &mut fut => Woke::Done(out),
                _ = sleep_until(*tick), if ticking => Woke::Tick,
            };
            match woke {
                Woke::Done(out) => return Ok(out),
                Woke::Gone => return Err(AttemptEnd::Stop(Outcome::ClientDisconnected)),
                Woke::Stop => {
                    if self.commit.is_none() {
                        let _ = self
                            .events
                            .send(error_event(&ProxyError::ShuttingDown))
                            .await;
                    }
                    self.record.error = Some(ProxyError::ShuttingDown.to_string());
                    return Err(AttemptEnd::Stop(Outcome::UpstreamError));
                }
                Woke::Tick => {
                    self.commit_stream();
                    if self
                        .events
                        .send(Bytes::from_static(b": keep-alive\n\n"))
                        .await
                        .is_err()
                    {
                        return Err(AttemptEnd::Stop(Outcome::ClientDisconnected));
                    }
                    *tick = Instant::now() + interval;
                }
            }
        }
    }

    async fn send(&mut self, bytes: Bytes) -> Result<(), AttemptEnd> {
        self.events
            .send(bytes)
            .await
            .map_err(|_| AttemptEnd::Stop(Outcome::ClientDisconnected))
    }

    async fn emit(&mut self, out: Output) -> Result<(), AttemptEnd> {
        match out {
            Output::One(bytes) => self.send(bytes).await,
            Output::Many(list) => {
                for bytes in list {
                    self.send(bytes).await?;
                }
                Ok(())
            }
            Output::Nothing => Ok(()),
        }
    }

    /// One upstream attempt, from prepare to the end of its stream.
    async fn attempt(
        &mut self,
        target: &crate::route::Target,
        label: &str,
    ) -> Result<AttemptEnd, ProxyError> {
        let table = Arc::clone(&self.table);
        let limits = table.limits;
        let Some(backend) = table.backend(&target.backend) else {
            return Err(ProxyError::UnknownBackend {
                name: target.backend.clone(),
                known: String::new(),
            });
        };
        let prepared = prepare(backend, &mut self.exchange, target, &self.record.id)?;
        let started = Instant::now();
        let first_content = self
            .exchange
            .deadline
            .min(started + limits.first_byte_timeout);
        let mut tick = self.record.started + limits.commit_after;

        // A clone of the pool handle (an Arc inside) so the send future does not borrow `self`.
        let client = self.app.client.clone();
        let sent = client.send(prepared, first_content);
        let response = match self.wait(sent, &mut tick).await {
            Err(end) => return Ok(end),
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let error = attempt_error(&backend.name, &table, error, self.exchange.deadline);
                self.record.attempt(label, error.code());
                return Ok(AttemptEnd::Retry(error, true));
            }
        };

        if !response.status.is_success() || !response.is_event_stream() {
            return self.plain_answer(backend, label, response, &mut tick).await;
        }

        let mut response = response;
        let mut mapper = backend.plugin.stream_mapper();
        let mut framer = SseFramer::new();
        let mut stream = StreamState::default();
        loop {
            let idle = Instant::now() + limits.idle_timeout;
            let until = if self.content_started {
                idle.min(self.exchange.deadline)
            } else {
                idle.min(first_content)
            };
            let read = self
                .wait(timeout_at(until, response.chunk()), &mut tick)
                .await;
            let chunk = match read {
                Err(end) => return Ok(end),
                Ok(Err(_elapsed)) => {
                    let now = Instant::now();
                    let kind = if now >= self.exchange.deadline {
                        TimeoutKind::Total
                    } else if !self.content_started && now >= first_content {
                        TimeoutKind::FirstByte
                    } else {
                        TimeoutKind::Idle
                    };
                    return self
                        .broken(
                            &table,
                            &backend.name,
                            label,
                            AttemptError::Timeout(kind),
                            &stream,
                        )
                        .await;
                }
                Ok(Ok(Err(error))) => {
                    return self
                        .broken(&table, &backend.name, label, error, &stream)
                        .await;
                }
                Ok(Ok(Ok(None))) => {
                    if let Some(event) = framer.finish() {
                        let mapped = mapper.map(event);
                        match self
                            .on_event(mapped, &backend.name, label, &mut stream)
                            .await
                        {
                            Ok(Some(end)) | Err(end) => return Ok(end),
                            Ok(None) => {}
                        }
                    }
                    if self.content_started && mapper.is_complete() {
                        self.note_served(&*mapper, label);
                        return Ok(AttemptEnd::Finished(stream.outcome()));
                    }
                    let error = AttemptError::Broken(
                        "the upstream stream ended before the answer was complete".into(),
                    );
                    return self
                        .broken(&table, &backend.name, label, error, &stream)
                        .await;
                }
                Ok(Ok(Ok(Some(bytes)))) => bytes,
            };
            framer.push(&chunk);
            while let Some(event) = framer.next_event() {
                let mapped = mapper.map(event);
                match self
                    .on_event(mapped, &backend.name, label, &mut stream)
                    .await
                {
                    Ok(Some(end)) | Err(end) => {
                        if matches!(end, AttemptEnd::Finished(_)) {
                            self.note_served(&*mapper, label);
                        }
                        return Ok(end);
                    }
                    Ok(None) => {}
                }
            }
        }
    }

    fn note_served(&mut self, mapper: &dyn StreamMapper, label: &str) {
        self.record.model_served = mapper.served_model().map(str::to_owned);
        self.record.attempt(label, "ok");
    }

    /// Handles one mapped event; `Some` ends the attempt.
    async fn on_event(
        &mut self,
        mapped: MappedEvent,
        backend: &str,
        label: &str,
        stream: &mut StreamState,
    ) -> Result<Option<AttemptEnd>, AttemptEnd> {
        if let Some(usage) = mapped.usage {
            self.record.usage = Some(usage);
        }
        match mapped.kind {
            EventKind::KeepAlive if !self.content_started => {}
            EventKind::Preamble | EventKind::Usage | EventKind::Unknown
                if !self.content_started =>
            {
                stream.hold(mapped.out);
            }
            EventKind::Content | EventKind::Done if !self.content_started => {
                self.content_started = true;
                self.commit_stream();
                self.record.first_byte = Some(Instant::now());
                for held in std::mem::take(&mut stream.held) {
                    self.send(held).await?;
                }
                self.emit(mapped.out).await?;
                if mapped.kind == EventKind::Done {
                    return Ok(Some(AttemptEnd::Finished(stream.outcome())));
                }
            }
            EventKind::Failed(failure) if !self.content_started => {
                self.record.attempt(label, failure_reason(&failure));
                self.record.error = Some(failure.message.clone());
                let retryable = failure.kind.is_retryable();
                let error = ProxyError::Upstream {
                    backend: backend.to_owned(),
                    answer: Box::new(crate::error::UpstreamAnswer::from_failure(&failure)),
                };
                return Ok(Some(AttemptEnd::Retry(error, retryable)));
            }
            EventKind::Failed(failure) => {
                // The upstream's own error event is already OpenAI-shaped: relay it as it is.
                stream.midstream_error = true;
                self.record.error = Some(failure.message);
                self.emit(mapped.out).await?;
            }
            EventKind::Done => {
                self.emit(mapped.out).await?;
                return Ok(Some(AttemptEnd::Finished(stream.outcome())));
            }
            _ => self.emit(mapped.out).await?,
        }
        Ok(None)
    }

    /// The upstream stream broke (timeout, reset, early end): before content the next target
    /// may take over; after content the client gets an explicit error event.
    async fn broken(
        &mut self,
        table: &RoutingTable,
        backend: &str,
        label: &str,
        error: AttemptError,
        stream: &StreamState,
    ) -> Result<AttemptEnd, ProxyError> {
        let error = attempt_error(backend, table, error, self.exchange.deadline);
        self.record.attempt(label, error.code());
        if !self.content_started {
            return Ok(AttemptEnd::Retry(error, true));
        }
        self.record.error = Some(error.to_string());
        if !stream.midstream_error {
            let _ = self.events.send(error_event(&error)).await;
        }
        Ok(AttemptEnd::Finished(Outcome::MidstreamError))
    }

    /// A non-stream answer to a stream request: an upstream error, or JSON instead of SSE.
    async fn plain_answer(
        &mut self,
        backend: &crate::table::BackendEntry,
        label: &str,
        mut response: UpstreamResponse,
        tick: &mut Instant,
    ) -> Result<AttemptEnd, ProxyError> {
        let limits = self.table.limits;
        let deadline = self.exchange.deadline;
        let collect = response.collect(limits.max_response_bytes, limits.idle_timeout, deadline);
        let body = match self.wait(collect, tick).await {
            Err(end) => return Ok(end),
            Ok(Err(error)) => {
                let error =
                    attempt_error(&backend.name, &self.table, error, self.exchange.deadline);
                self.record.attempt(label, error.code());
                return Ok(AttemptEnd::Retry(error, true));
            }
            Ok(Ok(body)) => body,
        };
        let failure = if response.status.is_success() {
            let mapped = backend.plugin.map_response(&body);
            match mapped.failure {
                None if self.commit.is_some() => {
                    self.record.usage = mapped.usage;
                    self.record.model_served = mapped.model;
                    self.record.attempt(label, "ok");
                    if let Some(commit) = self.commit.take() {
                        let answer =
                            crate::dispatch::success(response, mapped.body.unwrap_or(body));
                        let _ = commit.send(Commit::Response(answer));
                    }
                    return Ok(AttemptEnd::Finished(Outcome::Ok));
                }
                None => orproxy_plugin::Failure {
                    kind: orproxy_plugin::FailureKind::Server,
                    status: 502,
                    message: "the upstream answered a stream request with a plain body".into(),
                    retry_after: None,
                },
                Some(failure) => failure,
            }
        } else {
            backend
                .plugin
                .classify(response.status, &response.headers, &body)
        };
        self.record.attempt(label, failure_reason(&failure));
        self.record.error = Some(failure.message.clone());
        let retryable = failure.kind.is_retryable();
        let mut answer = response.into_answer(body);
        if answer.status.is_success() {
            answer = crate::error::UpstreamAnswer::from_failure(&failure);
        }
        Ok(AttemptEnd::Retry(
            ProxyError::Upstream {
                backend: backend.name.clone(),
                answer: Box::new(answer),
            },
            retryable,
        ))
    }
}

/// What interrupted [`Relay::wait`].
enum Woke<T> {
    Done(T),
    Gone,
    Stop,
    Tick,
}

/// Per-attempt stream bookkeeping.
#[derive(Default)]
struct StreamState {
    /// Data events received before the first content event.
    held: Vec<Bytes>,
    /// An upstream error event was relayed after content.
    midstream_error: bool,
}

impl StreamState {
    fn hold(&mut self, out: Output) {
        match out {
            Output::One(bytes) => self.held.push(bytes),
            Output::Many(list) => self.held.extend(list),
            Output::Nothing => {}
        }
    }

    fn outcome(&self) -> Outcome {
        if self.midstream_error {
            Outcome::MidstreamError
        } else {
            Outcome::Ok
        }
    }
}

fn error_event(error: &ProxyError) -> Bytes {
    let payload = json!({"error": {"message": error.to_string(), "type": "upstream_error", "code": error.code()}});
    orproxy_plugin::sse::data_event(payload.to_string().as_bytes())
}

async fn client_gone(commit: &mut Option<oneshot::Sender<Commit>>, events: &mpsc::Sender<Bytes>) {
    match commit {
        Some(commit) => commit.closed().await,
        None => events.closed().await,
    }
}
