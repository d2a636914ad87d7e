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

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http_body::Frame;
use orproxy_plugin::anthropic::AnswerContext;
use orproxy_plugin::{
    EventKind, Failure, MappedEvent, MappedResponse, Output, Prepared, SseFramer,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::app::App;
use crate::dispatch::{
    Cause, Exchange, Plan, attempt_error, client_body, lost_in_translation, prepare, served,
    upstream_error,
};
use crate::error::{ProxyError, TimeoutKind, UpstreamAnswer};
use crate::front::{self, StreamOut};
use crate::pipeline::with_route;
use crate::record::{Outcome, Record};
use crate::route::Target;
use crate::table::{BackendEntry, RoutingTable};
use crate::upstream::{AttemptError, UpstreamResponse};

/// Writes buffered between the relay task and the client connection.
const CHANNEL_DEPTH: usize = 64;
/// The most output gathered into one write: with [`CHANNEL_DEPTH`], what a client that reads
/// slowly can make orproxy hold (4 MiB, plus the socket's buffers), however fast the upstream.
const MAX_WRITE: usize = 64 << 10;

/// What the handler answers with: the stream, or a complete response (before commit).
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
    let aborted = Arc::new(AtomicBool::new(false));
    let relay = Relay {
        aborted: Arc::clone(&aborted),
        app,
        table,
        exchange,
        record,
        commit: Some(commit_tx),
        events: events_tx,
        hard_stop,
        content_started: false,
        pending: BytesMut::new(),
        translator: None,
    };
    tokio::spawn(relay.run());
    match commit_rx.await {
        Ok(Commit::Response(response)) => response,
        Ok(Commit::Stream { route }) => {
            let body = futures_util::stream::poll_fn(move |cx| {
                events_rx.poll_recv(cx).map(|next| match next {
                    Some(bytes) => Some(Ok(Frame::data(bytes))),
                    // An error makes hyper cut the connection instead of ending the body.
                    None if aborted.load(Ordering::Relaxed) => Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    ))),
                    None => None,
                })
            });
            let mut response = Response::new(Body::new(http_body_util::StreamBody::new(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Reverse proxies in front of orproxy must not buffer the stream either.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            with_route(response, Some(&route))
        }
        // The relay task ended without deciding: only a panic does that.
        Err(_) => ProxyError::ShuttingDown.into_response(),
    }
}

/// How an attempt that failed before content failed.
enum How {
    /// No answer at all (connect, timeout before the head, broken body).
    NoAnswer,
    /// The upstream answered with an error status (or an error in a 200 body).
    Upstream,
    /// The stream broke, stalled or reported an error before content.
    Stream,
}

/// Why an attempt was abandoned midway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The client went away.
    ClientGone,
    /// The daemon's `limits.shutdown_grace` ran out.
    Shutdown,
    /// The client stopped reading: the channel to it stayed full for `limits.client_timeout`,
    /// or until the request's `limits.total_timeout`.
    ClientStalled,
}

/// How one attempt ended.
enum AttemptEnd {
    /// Failed before content: the plan decides whether another target follows.
    Failed {
        error: ProxyError,
        failure: Option<Failure>,
        how: How,
    },
    /// The client left or the daemon ran out of grace: stop everything.
    Stop(Stop),
    /// The answer went through (possibly ending in an upstream error after content).
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
    /// Output of the current upstream read, sent in one piece by [`Relay::flush`].
    pending: BytesMut,
    /// For a Messages client on a backend answering in the pipeline's format: the attempt's
    /// events translated back.
    translator: Option<StreamOut>,
    /// Set when the client's stream must end with its connection cut, not a clean end.
    aborted: Arc<AtomicBool>,
}

/// What interrupted [`Relay::wait`].
enum Woke<T> {
    Done(T),
    Gone,
    Stop,
    Tick,
}

impl Relay {
    async fn run(mut self) {
        let table = Arc::clone(&self.table);
        let app = Arc::clone(&self.app);
        let mut plan = Plan::new(&self.exchange.route, &app.health, &mut self.record);
        let mut tick = self.record.started + table.limits.commit_after;
        while let Some(target) = plan.next_target() {
            let Some(backend) = table.backend(&target.backend) else {
                continue;
            };
            let label = target.label();
            self.record.route = Some(label.clone());
            let attempt = match prepare(backend, &self.exchange, &target, &self.record.id) {
                Ok(attempt) => attempt,
                Err(error) => return self.fail(error).await,
            };
            self.translator = match &self.exchange.messages {
                Some(_) if !attempt.native => {
                    let context = AnswerContext::new(&target.model, &self.exchange.body);
                    Some(StreamOut::new(&self.record.id, &context))
                }
                _ => None,
            };
            self.record.upstream_wait(true);
            let end = self
                .attempt(
                    backend,
                    &target,
                    &label,
                    attempt.prepared,
                    attempt.native,
                    &mut tick,
                )
                .await;
            self.record.upstream_wait(false);
            match end {
                AttemptEnd::Finished(outcome) => {
                    if outcome == Outcome::Ok {
                        app.health.succeeded(&label);
                    }
                    let status = if self.commit.is_none() { 200 } else { 502 };
                    return self.record.finish(status, outcome);
                }
                AttemptEnd::Stop(stop) => return self.stopped(stop, &label).await,
                AttemptEnd::Failed {
                    error,
                    failure,
                    how,
                } => {
                    // Only the attempt that served is billed, unless a failed one reported a cost.
                    let usage = self.record.usage.take();
                    self.record.bill_failed(&label, usage);
                    let cause = match (how, &failure) {
                        (How::Upstream, Some(f)) => Cause::Upstream(f),
                        (How::Stream, f) => Cause::Stream(f.as_ref()),
                        _ => Cause::of(&error),
                    };
                    if !plan.failed(
                        &app,
                        backend,
                        &target,
                        attempt.key,
                        cause,
                        error,
                        &mut self.record,
                    ) {
                        break;
                    }
                }
            }
        }
        let error = plan.into_error();
        self.fail(error).await;
    }

    /// Ends the request with `error`: a plain error answer, or an error event if committed.
    async fn fail(mut self, error: ProxyError) {
        let outcome = crate::dispatch::outcome_of(&error);
        crate::dispatch::note_error(&mut self.record, &error);
        match self.commit.take() {
            Some(commit) => {
                let status = error.status().as_u16();
                let response = self.exchange.api.error_response(error);
                let response = with_route(response, self.record.route.as_deref());
                let _ = commit.send(Commit::Response(response));
                self.record.answered(status, outcome);
            }
            None => {
                let event = self.exchange.api.error_event(&error);
                self.send_error_event(event).await;
                self.record.finish(200, outcome);
            }
        }
    }

    /// Ends a request whose attempt was abandoned: the client left, or the daemon shut down
    /// before the stream ended. The attempt is recorded with why; what was relayed is priced
    /// when the record is written.
    async fn stopped(mut self, stop: Stop, label: &str) {
        match stop {
            // A client that stopped reading is recorded as one that left, as when its blocked
            // socket is cut first.
            Stop::ClientGone | Stop::ClientStalled => {
                if stop == Stop::ClientStalled {
                    self.record.attempt(label, "client_timeout");
                    self.record.error = Some(
                        "the client stopped reading the stream (limits.client_timeout or limits.total_timeout ran out)"
                            .to_owned(),
                    );
                    // The client's stream must not end as if complete: its connection is cut.
                    self.aborted.store(true, Ordering::Relaxed);
                } else {
                    self.record.attempt(label, "client_disconnected");
                }
                // 499 only when the client left before the answer's head was sent (a client
                // can only stall after it: output is queued once the head is committed).
                let status = if self.commit.is_none() { 200 } else { 499 };
                self.record.finish(status, Outcome::ClientDisconnected);
            }
            Stop::Shutdown => {
                self.record.attempt(label, "shutdown");
                self.record.error = Some(format!(
                    "orproxy shut down before the answer was complete (limits.shutdown_grace of {:?} ran out)",
                    self.table.limits.shutdown_grace
                ));
                let status = match self.commit.take() {
                    None => {
                        let event = self.exchange.api.error_event(&ProxyError::ShuttingDown);
                        self.send_error_event(event).await;
                        200
                    }
                    Some(commit) => {
                        let error = ProxyError::ShuttingDown;
                        let status = error.status().as_u16();
                        let response = self.exchange.api.error_response(error);
                        let response = with_route(response, self.record.route.as_deref());
                        let _ = commit.send(Commit::Response(response));
                        self.record.answer_reached_client();
                        status
                    }
                };
                // Cut after content, the stream broke midway; before it, a limit ran out.
                let outcome = if self.content_started {
                    Outcome::MidstreamError
                } else {
                    Outcome::Timeout
                };
                self.record.finish(status, outcome);
            }
        }
    }

    /// Sends the error event that ends a committed stream: when nothing but keep-alives came
    /// before it, it is the answer the client reads first.
    async fn send_error_event(&mut self, event: Bytes) {
        if self.send(event).await.is_ok() {
            self.record.answer_reached_client();
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
                Woke::Gone => return Err(AttemptEnd::Stop(Stop::ClientGone)),
                Woke::Stop => return Err(AttemptEnd::Stop(Stop::Shutdown)),
                Woke::Tick => {
                    self.commit_stream();
                    self.send(Bytes::from_static(b": keep-alive\n\n")).await?;
                    *tick = Instant::now() + interval;
                }
            }
        }
    }

    /// Hands output to the client's connection. A client that does not read fills the channel;
    /// it then gets `limits.client_timeout` to make room (as a blocked socket write does), and
    /// no later than the request's total deadline if that is still ahead (a deadline already
    /// passed is the upstream's doing, not the client's).
    async fn send(&mut self, bytes: Bytes) -> Result<(), AttemptEnd> {
        let bytes = match self.events.try_send(bytes) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(AttemptEnd::Stop(Stop::ClientGone));
            }
            Err(mpsc::error::TrySendError::Full(bytes)) => bytes,
        };
        let now = Instant::now();
        let mut until = now + self.table.limits.client_timeout;
        if self.exchange.deadline > now {
            until = until.min(self.exchange.deadline);
        }
        // The end of the shutdown grace must reach a relay waiting here too: the daemon exits
        // shortly after, and a relay still waiting would never write its usage row.
        tokio::select! {
            biased;
            _ = self.hard_stop.wait_for(|stop| *stop) => Err(AttemptEnd::Stop(Stop::Shutdown)),
            sent = timeout_at(until, self.events.send(bytes)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(AttemptEnd::Stop(Stop::ClientGone)),
                Err(_) => Err(AttemptEnd::Stop(Stop::ClientStalled)),
            },
        }
    }

    /// Queues output for the client (translated for a Messages client); [`Relay::flush`]
    /// sends it.
    fn emit(&mut self, out: Output) {
        if let Some(translator) = &mut self.translator {
            translator.translate(out, &mut self.pending);
            return;
        }
        match out {
            Output::One(bytes) => self.pending.extend_from_slice(&bytes),
            Output::Many(list) => list.iter().for_each(|b| self.pending.extend_from_slice(b)),
            Output::Nothing => {}
        }
    }

    /// Sends what is queued as one write: the events of one upstream read go out together
    /// (one wake-up and one syscall instead of one per event), and nothing waits for the
    /// next read.
    async fn flush(&mut self) -> Result<(), AttemptEnd> {
        if !self.pending.is_empty() {
            let bytes = self.pending.split().freeze();
            self.send(bytes).await?;
        }
        // Committing after the first content is queued lets hyper write the head and the
        // first events together.
        if self.content_started {
            self.commit_stream();
        }
        Ok(())
    }

    /// One upstream attempt, from sending to the end of its stream.
    async fn attempt(
        &mut self,
        backend: &BackendEntry,
        target: &Target,
        label: &str,
        prepared: Prepared,
        native: bool,
        tick: &mut Instant,
    ) -> AttemptEnd {
        let limits = self.table.limits;
        let first_content = self
            .exchange
            .deadline
            .min(Instant::now() + limits.first_byte_timeout);
        // An owned pool handle (an Arc inside) so the send future does not borrow `self`.
        let client = self.app.client();
        let response = match self.wait(client.send(prepared, first_content), tick).await {
            Err(end) => return end,
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return self.no_answer(&backend.name, error),
        };
        crate::idle_poll::event(Instant::now(), limits.idle_poll);
        if !response.status.is_success() || !response.is_event_stream() {
            return self
                .plain_answer(backend, target, label, response, native, tick)
                .await;
        }

        let mut mapper = if native {
            backend.plugin.messages_stream_mapper()
        } else {
            backend
                .plugin
                .stream_mapper(orproxy_plugin::openai::asks_for_usage(&self.exchange.body))
        };
        let end = self
            .relay_events(backend, label, response, &mut *mapper, first_content, tick)
            .await;
        // Whatever ended a stream that served, the model the upstream named is the record's.
        if !matches!(end, AttemptEnd::Failed { .. })
            && let Some(model) = mapper.served_model()
        {
            self.record.model_served = Some(model.to_owned());
        }
        end
    }

    /// Relays an upstream event stream to the client until it ends, breaks or is abandoned.
    async fn relay_events(
        &mut self,
        backend: &BackendEntry,
        label: &str,
        mut response: UpstreamResponse,
        mapper: &mut dyn orproxy_plugin::StreamMapper,
        first_content: Instant,
        tick: &mut Instant,
    ) -> AttemptEnd {
        let limits = self.table.limits;
        let mut framer = SseFramer::new();
        let mut stream = StreamState::default();
        loop {
            let idle = Instant::now() + limits.idle_timeout;
            let until = if self.content_started {
                idle.min(self.exchange.deadline)
            } else {
                idle.min(first_content)
            };
            let mut read = match self.wait(timeout_at(until, response.chunk()), tick).await {
                Err(end) => return end,
                Ok(Err(_elapsed)) => {
                    let kind = if !self.content_started && Instant::now() >= first_content {
                        TimeoutKind::FirstByte
                    } else {
                        TimeoutKind::Idle
                    };
                    Err(AttemptError::Timeout(kind))
                }
                Ok(Ok(read)) => read,
            };
            // Every body chunk already received (an upstream writes one HTTP chunk per event,
            // and one read often brings many) is relayed in one write before the next wait.
            loop {
                match read {
                    Err(error) => return self.broken(&backend.name, label, error, &stream).await,
                    Ok(None) => {
                        return self
                            .stream_ended(
                                &backend.name,
                                label,
                                &mut framer,
                                &mut *mapper,
                                &mut stream,
                            )
                            .await;
                    }
                    Ok(Some(chunk)) => {
                        framer.push(&chunk);
                        while let Some(event) = framer.next_event() {
                            if let Some(end) =
                                self.on_event(mapper.map(event), &backend.name, &mut stream)
                            {
                                // The connection is kept once its body's end is read: mostly
                                // already here with `[DONE]`, else after the connection task's
                                // next turn, else soon after.
                                if !response.finish_now() {
                                    run_others_once().await;
                                    response.finish_later();
                                }
                                return self.ended(end, label).await;
                            }
                        }
                    }
                }
                // The first content goes out at once: batching is for what follows it.
                if (self.content_started && self.commit.is_some())
                    || self.pending.len() >= MAX_WRITE
                {
                    break;
                }
                read = match response.chunk().now_or_never() {
                    Some(next) => next,
                    None => {
                        // hyper hands a body over one chunk at a time from its connection
                        // task: let that task run once before deciding nothing is left.
                        run_others_once().await;
                        match response.chunk().now_or_never() {
                            Some(next) => next,
                            None => break,
                        }
                    }
                };
            }
            if let Err(end) = self.flush().await {
                return end;
            }
        }
    }

    /// The upstream body ended: complete if the answer was (a finish reason or usage came
    /// after content), else broken.
    async fn stream_ended(
        &mut self,
        backend: &str,
        label: &str,
        framer: &mut SseFramer,
        mapper: &mut dyn orproxy_plugin::StreamMapper,
        stream: &mut StreamState,
    ) -> AttemptEnd {
        if let Some(event) = framer.finish()
            && let Some(end) = self.on_event(mapper.map(event), backend, stream)
        {
            return self.ended(end, label).await;
        }
        if self.content_started && mapper.is_complete() {
            return self
                .ended(AttemptEnd::Finished(stream.outcome()), label)
                .await;
        }
        let error =
            AttemptError::Broken("the upstream stream ended before the answer was complete".into());
        self.broken(backend, label, error, stream).await
    }

    /// Closes an attempt: sends what is queued and notes how the answer ended.
    async fn ended(&mut self, end: AttemptEnd, label: &str) -> AttemptEnd {
        if let Some(translator) = &mut self.translator {
            translator.finish(&mut self.pending);
        }
        if let Err(stopped) = self.flush().await {
            return stopped;
        }
        match &end {
            AttemptEnd::Finished(Outcome::MidstreamError) => {
                let why = self.record.error.as_deref().unwrap_or("upstream error");
                let result = format!("midstream_error: {why}");
                self.record.attempt(label, result);
            }
            AttemptEnd::Finished(_) => self.record.attempt(label, "ok"),
            _ => {}
        }
        end
    }

    fn no_answer(&mut self, backend: &str, error: AttemptError) -> AttemptEnd {
        let error = attempt_error(backend, &self.table, error, self.exchange.deadline);
        AttemptEnd::Failed {
            error,
            failure: None,
            how: How::NoAnswer,
        }
    }

    /// Handles one mapped event; `Some` ends the attempt.
    fn on_event(
        &mut self,
        mapped: MappedEvent,
        backend: &str,
        stream: &mut StreamState,
    ) -> Option<AttemptEnd> {
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
                // This attempt serves: failed ones keep their reasons in the attempt list.
                self.record.error = None;
                self.record.relayed_tokens += u64::from(mapped.kind == EventKind::Content);
                self.record.answer_reached_client();
                let held = std::mem::take(&mut stream.held);
                self.emit(Output::Many(held));
                self.emit(mapped.out);
                if mapped.kind == EventKind::Done {
                    return Some(AttemptEnd::Finished(stream.outcome()));
                }
            }
            EventKind::Failed(failure) if !self.content_started => {
                self.record.error = Some(failure.message.clone());
                let error = ProxyError::Upstream {
                    backend: backend.to_owned(),
                    answer: Box::new(UpstreamAnswer::from_failure(&failure)),
                };
                return Some(AttemptEnd::Failed {
                    error,
                    failure: Some(failure),
                    how: How::Stream,
                });
            }
            EventKind::Failed(failure) => {
                // The upstream's own error event is already OpenAI-shaped: relay it as it is.
                stream.midstream_error = true;
                self.record.error = Some(failure.message);
                self.emit(mapped.out);
            }
            EventKind::Done => {
                self.emit(mapped.out);
                return Some(AttemptEnd::Finished(stream.outcome()));
            }
            EventKind::Content => {
                self.record.relayed_tokens += 1;
                self.emit(mapped.out);
            }
            _ => self.emit(mapped.out),
        }
        None
    }

    /// The upstream stream broke (timeout, reset, early end): before content the next target
    /// may take over; after content the client gets an explicit error event.
    async fn broken(
        &mut self,
        backend: &str,
        label: &str,
        error: AttemptError,
        stream: &StreamState,
    ) -> AttemptEnd {
        let error = attempt_error(backend, &self.table, error, self.exchange.deadline);
        if !self.content_started {
            return AttemptEnd::Failed {
                error,
                failure: None,
                how: How::Stream,
            };
        }
        self.record.error = Some(error.to_string());
        if let Err(stopped) = self.flush().await {
            return stopped;
        }
        self.record
            .attempt(label, format!("midstream_error: {error}"));
        if !stream.midstream_error {
            let event = self.exchange.api.error_event(&error);
            let _ = self.send(event).await;
        }
        AttemptEnd::Finished(Outcome::MidstreamError)
    }

    /// A non-stream answer to a stream request: an upstream error, or JSON instead of SSE,
    /// which the client gets as the stream it asked for.
    async fn plain_answer(
        &mut self,
        backend: &BackendEntry,
        target: &Target,
        label: &str,
        mut response: UpstreamResponse,
        native: bool,
        tick: &mut Instant,
    ) -> AttemptEnd {
        let limits = self.table.limits;
        let collect = response.collect(
            limits.max_response_bytes,
            limits.idle_timeout,
            self.exchange.deadline,
        );
        let body = match self.wait(collect, tick).await {
            Err(end) => return end,
            Ok(Err(error)) => return self.no_answer(&backend.name, error),
            Ok(Ok(body)) => body,
        };
        let failure = if response.status.is_success() {
            let mut mapped = if native {
                backend.plugin.map_messages_response(&body)
            } else {
                backend.plugin.map_response(&body)
            };
            let failure = mapped.failure.take().or_else(|| {
                lost_in_translation(
                    &self.exchange,
                    native,
                    label,
                    &mut mapped.partial,
                    &mut mapped.usage,
                    &mut self.record,
                )
            });
            match failure {
                None => {
                    return self
                        .replay(backend, target, label, native, mapped, body)
                        .await
                        .unwrap_or_else(|end| end);
                }
                Some(failure) => {
                    self.record.bill_failed(label, mapped.usage.take());
                    failure
                }
            }
        } else {
            backend
                .plugin
                .classify(response.status, &response.headers, &body)
        };
        self.record.error = Some(failure.message.clone());
        let error = upstream_error(&backend.name, response, body, &failure);
        AttemptEnd::Failed {
            error,
            failure: Some(failure),
            how: How::Upstream,
        }
    }

    /// Serves a complete answer (`body`, in the pipeline's format or the backend's own) as the
    /// stream the client asked for, whether or not the stream was already committed.
    async fn replay(
        &mut self,
        backend: &BackendEntry,
        target: &Target,
        label: &str,
        native: bool,
        mut mapped: MappedResponse,
        body: Bytes,
    ) -> Result<AttemptEnd, AttemptEnd> {
        let body = mapped.body.take().unwrap_or(body);
        let include_usage = orproxy_plugin::openai::asks_for_usage(&self.exchange.body);
        let events = client_body(&self.exchange, native, body, &backend.name, &target.model)
            .and_then(|body| {
                front::answer_as_stream(self.exchange.api, &body, include_usage, &backend.name)
            });
        let events = match events {
            Ok(events) => events,
            Err(error) => {
                self.record.error = Some(error.to_string());
                return Err(AttemptEnd::Failed {
                    error,
                    failure: None,
                    how: How::NoAnswer,
                });
            }
        };
        self.record.error = None;
        self.record.usage = mapped.usage;
        self.record.model_served = mapped.model;
        // The events are already in the client's API: no chunk translation applies.
        self.translator = None;
        self.content_started = true;
        self.pending.extend_from_slice(&events);
        self.flush().await?;
        self.record.answer_reached_client();
        let outcome = served(&mut self.record, label, mapped.partial, mapped.answer_bytes);
        Ok(AttemptEnd::Finished(outcome))
    }
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

async fn client_gone(commit: &mut Option<oneshot::Sender<Commit>>, events: &mpsc::Sender<Bytes>) {
    match commit {
        Some(commit) => commit.closed().await,
        None => events.closed().await,
    }
}

/// Lets every task already woken on this thread run once, then continues. Unlike
/// `tokio::task::yield_now`, which also polls the I/O driver (a syscall) before resuming, this
/// only requeues the task behind those already woken: hyper's connection task, woken when the
/// body was polled, decodes the next chunk it has already read.
async fn run_others_once() {
    let mut requeued = false;
    std::future::poll_fn(|cx| {
        if requeued {
            std::task::Poll::Ready(())
        } else {
            requeued = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}
