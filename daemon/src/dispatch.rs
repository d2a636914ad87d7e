//! Dispatch: try the route's targets in order, building each attempt with its backend's plugin,
//! and (for plain JSON answers) relay the first good answer. Streams continue in
//! [`crate::relay`], which shares the [`Plan`] that decides what comes next after a failure.

use std::collections::VecDeque;
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use orproxy_plugin::anthropic::AnswerContext;
use orproxy_plugin::{Call, Failure, FailureKind, JsonObject, Prepared};
use tokio::time::Instant;

use crate::app::App;
use crate::config::{Trigger, Triggers};
use crate::error::{ProxyError, TimeoutKind, UpstreamAnswer};
use crate::front::{self, Api, MessagesRequest};
use crate::health::HealthBook;
use crate::metrics;
use crate::record::{Outcome, Record};
use crate::route::{Route, Target};
use crate::table::{BackendEntry, RoutingTable};
use crate::upstream::{AttemptError, UpstreamResponse};

/// An admitted request: authenticated, parsed and routed.
pub struct Exchange {
    /// The client's body as received; each attempt writes its model and parameters into a copy.
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
    /// The API the client speaks.
    pub api: Api,
    /// For a Messages request: the client's own body and model.
    pub messages: Option<MessagesRequest>,
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
                || n == "anthropic-version"
                || n == "x-anthropic-beta"
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// One attempt's upstream request and the key it uses.
pub struct Attempt {
    /// What to send.
    pub prepared: Prepared,
    /// The key's position in the backend, to rest it if the upstream refuses it.
    pub key: Option<usize>,
    /// The client's Messages body goes through untranslated (the backend speaks Messages).
    pub native: bool,
}

/// Builds one attempt: the body with this target's model and parameters, through the plugin.
pub fn prepare(
    backend: &BackendEntry,
    exchange: &Exchange,
    target: &Target,
    request_id: &str,
) -> Result<Attempt, ProxyError> {
    // A Messages client and a backend that speaks Messages: the client's body as it came.
    let native = exchange
        .messages
        .as_ref()
        .filter(|_| backend.plugin.speaks_messages());
    let mut body = native.map_or(&exchange.body, |m| &m.body).clone();
    body.set("model", &target.model);
    for name in &target.unset {
        body.remove(name);
    }
    for (name, value) in &target.params {
        body.set(name, value);
    }
    let key = backend.next_key();
    let call = Call {
        request_id,
        body: &body,
        model: &target.model,
        stream: exchange.stream,
        api_key: key.map(|k| k.secret.expose()),
        identity: backend.identity.resolve(&exchange.client_headers),
        headers: &exchange.forward,
    };
    let prepared = match native {
        Some(_) => backend.plugin.prepare_messages(&call),
        None => backend.plugin.prepare(&call),
    };
    let mut prepared = prepared.map_err(|source| ProxyError::Prepare {
        backend: backend.name.clone(),
        source,
    })?;
    // Headers set by rules win over identity and plugin defaults.
    if let Prepared::Http(request) = &mut prepared {
        for (name, value) in &exchange.route.headers {
            request.headers.insert(name.clone(), value.clone());
        }
    }
    Ok(Attempt {
        prepared,
        key: key.map(|k| k.index),
        native: native.is_some(),
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

/// A short reason for the attempt log (`429 RateLimited`).
pub fn failure_reason(failure: &Failure) -> String {
    format!("{} {:?}", failure.status, failure.kind)
}

/// The outcome recorded for a request that ended with `error`.
pub fn outcome_of(error: &ProxyError) -> Outcome {
    match error {
        // The shutdown grace is a limit too: the request ran out of it.
        ProxyError::Timeout { .. } | ProxyError::ShuttingDown => Outcome::Timeout,
        ProxyError::Upstream { .. }
        | ProxyError::Unreachable { .. }
        | ProxyError::Prepare {
            source: orproxy_plugin::PrepareError::MissingKey,
            ..
        }
        | ProxyError::AllAttemptsFailed { .. }
        | ProxyError::AllRateLimited { .. } => Outcome::UpstreamError,
        ProxyError::BudgetExceeded { .. } | ProxyError::NoPrice { .. } => Outcome::BudgetExceeded,
        ProxyError::ClientLeft => Outcome::ClientDisconnected,
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

/// Why an attempt failed, as far as failover cares.
#[derive(Clone, Copy)]
pub enum Cause<'a> {
    /// No connection, a reset, or an unreadable answer.
    Unreachable,
    /// A limit ran out.
    Timeout(TimeoutKind),
    /// Anything else orproxy itself refused.
    Other,
    /// The upstream answered with an error.
    Upstream(&'a Failure),
    /// A stream broke or reported an error before its first content event.
    Stream(Option<&'a Failure>),
}

impl Cause<'static> {
    /// The cause behind an attempt that produced no answer.
    pub fn of(error: &ProxyError) -> Self {
        match error {
            ProxyError::Timeout { kind, .. } => Cause::Timeout(*kind),
            ProxyError::Unreachable { .. } => Cause::Unreachable,
            _ => Cause::Other,
        }
    }
}

/// The trigger a failure falls under; `None` for failures the request itself caused.
fn trigger(cause: &Cause<'_>) -> Option<Trigger> {
    let from_kind = |kind: FailureKind| match kind {
        FailureKind::RateLimited => Some(Trigger::RateLimited),
        FailureKind::PaymentRequired => Some(Trigger::PaymentRequired),
        FailureKind::Unauthorized => Some(Trigger::Unauthorized),
        FailureKind::Timeout => Some(Trigger::Timeout),
        FailureKind::Server => Some(Trigger::ServerError),
        FailureKind::ContextLength => Some(Trigger::ContextLength),
        FailureKind::BadRequest => None,
    };
    match cause {
        Cause::Timeout(TimeoutKind::Connect) | Cause::Unreachable => Some(Trigger::Connect),
        Cause::Timeout(_) => Some(Trigger::Timeout),
        Cause::Other => None,
        Cause::Upstream(failure) => from_kind(failure.kind),
        Cause::Stream(_) => Some(Trigger::Stream),
    }
}

/// A failed attempt, as the final error lists it.
struct FailedAttempt {
    label: String,
    why: String,
    retry_after: Option<Duration>,
    rate_limited: bool,
}

/// The order of attempts for one request, and what happens after each failure.
pub struct Plan {
    queue: VecDeque<Target>,
    triggers: Triggers,
    failures: Vec<FailedAttempt>,
    last: Option<ProxyError>,
    key_retries: usize,
}

impl Plan {
    /// Orders the route's targets. A resting target is skipped when the failure that put it to
    /// rest is one of the route's failover triggers (skipping it is failing over); otherwise it
    /// is tried like any other. When every target is skipped: if all of them rest because their
    /// upstream asked (429 with `Retry-After`), the request is answered 429 at once with the
    /// shortest wait left, without calling them; else they are all probed. A skipped target
    /// counts as a failed attempt (in the record and the final error): the client learns of
    /// the earliest wait, and of every target the request did not get.
    pub fn new(route: &Route, health: &HealthBook, record: &mut Record) -> Plan {
        let plan = Plan::order(route, health);
        for skipped in &plan.failures {
            record.attempt(&skipped.label, "resting");
        }
        plan
    }

    /// [`Plan::new`] without the record: the skipped targets are the plan's first failures.
    fn order(route: &Route, health: &HealthBook) -> Plan {
        let mut ready = VecDeque::new();
        let mut skipped = Vec::new();
        for target in &route.targets {
            let label = target.label();
            match health
                .cooling(&label)
                .filter(|rest| route.triggers.contains(&rest.cause))
            {
                Some(rest) => skipped.push((target.clone(), label, rest)),
                None => ready.push_back(target.clone()),
            }
        }
        let mut plan = Plan {
            queue: VecDeque::new(),
            triggers: route.triggers,
            failures: Vec::new(),
            last: None,
            key_retries: 0,
        };
        if ready.is_empty() && !skipped.iter().all(|(_, _, rest)| rest.asked) {
            plan.queue = skipped.into_iter().map(|(target, ..)| target).collect();
            return plan;
        }
        for (_, label, rest) in skipped {
            let left = rest.left.as_secs_f64().ceil();
            let why = if rest.asked {
                format!("resting: the upstream asked to wait, {left} s left")
            } else {
                format!("resting after repeated failures, {left} s left")
            };
            plan.failures.push(FailedAttempt {
                label,
                why,
                retry_after: rest.asked.then_some(rest.left),
                rate_limited: rest.asked,
            });
        }
        if ready.is_empty() {
            // Every target rests at its upstream's request: answered at once, calling none.
            plan.last = Some(plan.aggregate());
        }
        plan.queue = ready;
        plan
    }

    /// The next target to try.
    pub fn next_target(&mut self) -> Option<Target> {
        self.queue.pop_front()
    }

    /// Notes that an attempt failed with `error`; returns whether another attempt follows.
    #[allow(clippy::too_many_arguments)]
    pub fn failed(
        &mut self,
        app: &App,
        backend: &BackendEntry,
        target: &Target,
        key: Option<usize>,
        cause: Cause<'_>,
        error: ProxyError,
        record: &mut Record,
    ) -> bool {
        let label = target.label();
        let failure = match &cause {
            Cause::Upstream(f) => Some(*f),
            Cause::Stream(f) => *f,
            _ => None,
        };
        let reason = match (failure, &cause) {
            // An unreadable answer reaches the client as `upstream_unreachable`: named so.
            (Some(_), _) if matches!(error, ProxyError::Unreachable { .. }) => {
                error.code().to_owned()
            }
            (Some(f), _) => failure_reason(f),
            // Named as its failover trigger is; how it broke is in the error listed with it.
            (None, Cause::Stream(_)) => "stream".to_owned(),
            (None, _) => error.code().to_owned(),
        };
        record.attempt(&label, &reason);
        let trigger = trigger(&cause);
        tracing::info!(message = "Attempt failed.", request_id = %record.id, route = %label, reason = %reason);
        // A prompt too long for a model says nothing of the target's health: resting it would
        // send the short prompts that follow to the next model of the chain.
        let health_trigger = trigger.filter(|t| *t != Trigger::ContextLength);

        // A key the upstream refused rests alone; the same target is tried with another key.
        let key_problem = failure.is_some_and(|f| {
            matches!(
                f.kind,
                FailureKind::Unauthorized | FailureKind::PaymentRequired | FailureKind::RateLimited
            )
        });
        if let (true, Some(index)) = (key_problem, key)
            && backend.key_count() > 1
        {
            let pause = failure
                .and_then(|f| f.retry_after)
                .unwrap_or(Duration::from_secs(60));
            backend.cool_key(index, pause.min(crate::health::MAX_RETRY_AFTER));
            if backend.ready_keys() > 0 && self.key_retries < backend.key_count() {
                self.key_retries += 1;
                self.queue.push_front(target.clone());
                self.last = Some(error);
                return true;
            }
            // Every key rests: so does the target, or each request would call it again.
            if let Some(cause) = health_trigger {
                app.health.failed(&label, &reason, failure, cause);
            }
        } else if let Some(cause) = health_trigger {
            app.health.failed(&label, &reason, failure, cause);
        }

        self.failures.push(FailedAttempt {
            label,
            why: error.to_string(),
            retry_after: failure.and_then(|f| f.retry_after),
            rate_limited: failure.is_some_and(|f| f.kind == FailureKind::RateLimited),
        });
        self.last = Some(error);
        // What this attempt's upstream billed is held in the budgets now: it may leave no room
        // for another attempt.
        let unheld = record.failed_cost.saturating_sub(record.failed_cost_held);
        record.failed_cost_held = record.failed_cost;
        let full = if unheld == 0 {
            None
        } else {
            let now = crate::budget::now_ms();
            let budgets = &app.accounts.budgets;
            budgets
                .hold_failed_cost(&mut record.reservation, unheld, now)
                .err()
        };
        let fails_over =
            trigger.is_some_and(|t| self.triggers.contains(&t)) && !self.queue.is_empty();
        if let (true, Some(budget)) = (fails_over, full) {
            // The targets left are not tried: each is named with the budget that stopped the
            // chain, as a resting target is, in the client's error and on the row.
            tracing::info!(message = "No failover: the failed attempts' billed cost used up a budget.", request_id = %record.id, budget = %budget);
            for skipped in self.queue.drain(..) {
                let label = skipped.label();
                record.attempt(&label, "budget_exceeded");
                self.failures.push(FailedAttempt {
                    label,
                    why: format!(
                        "not tried: the failed attempts' billed cost left budget `{budget}` no room for another attempt"
                    ),
                    retry_after: None,
                    rate_limited: false,
                });
            }
            return false;
        }
        if fails_over {
            metrics::failover();
        }
        fails_over
    }

    /// The client-facing error once no attempt is left (SPEC §7): with one attempt, its own
    /// error; with several, 429 if all were rate-limited, else 502 listing every attempt.
    pub fn into_error(self) -> ProxyError {
        if self.failures.len() > 1 {
            return self.aggregate();
        }
        // A route is never empty, so the first attempt (or skip) set `last`.
        self.last.unwrap_or(ProxyError::ShuttingDown)
    }

    /// The error of several failed (or skipped) attempts: 429 with the earliest wait if all
    /// were rate-limited, else 502 listing each.
    fn aggregate(&self) -> ProxyError {
        let attempts: Vec<String> = self
            .failures
            .iter()
            .map(|f| format!("{}: {}", f.label, f.why))
            .collect();
        if self.failures.iter().all(|f| f.rate_limited) {
            let retry_after = self.failures.iter().filter_map(|f| f.retry_after).min();
            return ProxyError::AllRateLimited {
                retry_after,
                attempts,
            };
        }
        ProxyError::AllAttemptsFailed { attempts }
    }
}

/// Tries the route's targets in order and relays the first successful non-streamed answer.
pub async fn json(
    app: &App,
    table: &RoutingTable,
    exchange: &Exchange,
    record: &mut Record,
) -> Result<(Response, Outcome), ProxyError> {
    let limits = table.limits;
    let mut plan = Plan::new(&exchange.route, &app.health, record);
    while let Some(target) = plan.next_target() {
        let Some(backend) = table.backend(&target.backend) else {
            continue;
        };
        let label = target.label();
        record.route = Some(label.clone());
        let attempt = prepare(backend, exchange, &target, &record.id)?;
        let first_byte = exchange
            .deadline
            .min(Instant::now() + limits.first_byte_timeout);
        record.attempt_open = true;
        record.upstream_wait(true);
        let answer = match app.client().send(attempt.prepared, first_byte).await {
            Ok(mut response) => {
                crate::idle_poll::event(Instant::now(), limits.idle_poll);
                response
                    .collect(
                        limits.max_response_bytes,
                        limits.idle_timeout,
                        exchange.deadline,
                    )
                    .await
                    .map(|body| (response, body))
            }
            Err(e) => Err(e),
        };
        record.upstream_wait(false);
        let (response, body) = match answer {
            Ok(answer) => answer,
            Err(error) => {
                let error = attempt_error(&backend.name, table, error, exchange.deadline);
                if !plan.failed(
                    app,
                    backend,
                    &target,
                    attempt.key,
                    Cause::of(&error),
                    error,
                    record,
                ) {
                    break;
                }
                continue;
            }
        };
        let failure = if response.status.is_success() {
            let mut mapped = if attempt.native {
                backend.plugin.map_messages_response(&body)
            } else {
                backend.plugin.map_response(&body)
            };
            let failure = mapped.failure.take().or_else(|| {
                lost_in_translation(
                    exchange,
                    attempt.native,
                    &label,
                    &mut mapped.partial,
                    &mut mapped.usage,
                    record,
                )
            });
            match failure {
                None => {
                    app.health.succeeded(&label);
                    // The failed attempts keep their reasons in the attempt list.
                    record.error = None;
                    record.usage = mapped.usage;
                    record.model_served = mapped.model;
                    let outcome = served(record, &label, mapped.partial, mapped.answer_bytes);
                    let body = client_body(
                        exchange,
                        attempt.native,
                        mapped.body.unwrap_or(body),
                        &backend.name,
                        &target.model,
                    )?;
                    return Ok((success(response, body), outcome));
                }
                Some(failure) => {
                    record.bill_failed(&label, mapped.usage.take());
                    failure
                }
            }
        } else {
            backend
                .plugin
                .classify(response.status, &response.headers, &body)
        };
        record.error = Some(failure.message.clone());
        let error = upstream_error(&backend.name, response, body, &failure);
        if !plan.failed(
            app,
            backend,
            &target,
            attempt.key,
            Cause::Upstream(&failure),
            error,
            record,
        ) {
            break;
        }
    }
    Err(plan.into_error())
}

/// The error a failed attempt answers with: the upstream's own answer, or, for an error hidden
/// in a 200, one with the error's own status.
pub fn upstream_error(
    backend: &str,
    response: UpstreamResponse,
    body: Bytes,
    failure: &Failure,
) -> ProxyError {
    if response.status.is_success()
        && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err()
    {
        // A success status over something that is no JSON at all: no answer reached us.
        return ProxyError::Unreachable {
            backend: backend.to_owned(),
            reason: failure.message.clone(),
        };
    }
    let mut answer = response.into_answer(body);
    if answer.status.is_success() {
        answer = UpstreamAnswer::from_failure(failure);
    }
    ProxyError::Upstream {
        backend: backend.to_owned(),
        answer: Box::new(answer),
    }
}

/// Notes the request's final error in its record. A chain's summary replaces the last
/// attempt's own error, so that the row says what the client was told.
pub fn note_error(record: &mut Record, error: &ProxyError) {
    match error {
        ProxyError::AllAttemptsFailed { .. } | ProxyError::AllRateLimited { .. } => {
            record.error = Some(error.to_string());
        }
        _ => {
            record.error.get_or_insert_with(|| error.to_string());
        }
    }
}

/// The failure of an answer cut short (`partial`) when the client speaks Messages and the answer
/// must be translated: Anthropic's format has no stop reason for "the provider failed", and a
/// translated answer would read as complete. The attempt then fails like one that answered an
/// error (the chain may go on; alone, the client gets the error), and the cost the upstream
/// reported for it is billed as a failed attempt's. `None` (nothing taken) otherwise: an OpenAI
/// client gets the answer with its `finish_reason: "error"` as it came.
pub fn lost_in_translation(
    exchange: &Exchange,
    native: bool,
    target: &str,
    partial: &mut Option<Failure>,
    usage: &mut Option<orproxy_plugin::Usage>,
    record: &mut Record,
) -> Option<Failure> {
    if exchange.messages.is_none() || native {
        return None;
    }
    let failure = partial.take()?;
    record.bill_failed(target, usage.take());
    Some(failure)
}

/// Notes the attempt that served a whole answer of `answer_bytes` (of its messages' JSON) and
/// returns the request's outcome: `midstream_error` when the upstream cut the answer short.
pub fn served(
    record: &mut Record,
    label: &str,
    partial: Option<Failure>,
    answer_bytes: usize,
) -> Outcome {
    record.relayed_tokens = answer_bytes as u64 / 4;
    match partial {
        Some(failure) => {
            record.attempt(label, format!("midstream_error: {}", failure.message));
            record.error = Some(failure.message);
            Outcome::MidstreamError
        }
        None => {
            record.attempt(label, "ok");
            Outcome::Ok
        }
    }
}

/// A successful answer's body as the client's API wants it: translated back for a Messages
/// client whose backend answered in the pipeline's format, naming `model` (the target's) when
/// the answer names none.
pub fn client_body(
    exchange: &Exchange,
    native: bool,
    body: Bytes,
    backend: &str,
    model: &str,
) -> Result<Bytes, ProxyError> {
    match &exchange.messages {
        Some(_) if !native => {
            let context = AnswerContext::new(model, &exchange.body);
            front::messages_answer(&body, &context, backend)
        }
        _ => Ok(body),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(targets: &[&str], triggers: &[Trigger]) -> Route {
        Route {
            requested: None,
            rewritten: None,
            targets: targets
                .iter()
                .map(|t| {
                    let (backend, model) = t.split_once(':').unwrap_or(("b", t));
                    Target {
                        backend: backend.into(),
                        model: model.into(),
                        params: Vec::new(),
                        unset: Vec::new(),
                    }
                })
                .collect(),
            triggers: triggers.iter().copied().collect(),
            headers: Vec::new(),
            tags: Default::default(),
            trace: Vec::new(),
        }
    }

    fn limited(secs: u64) -> Failure {
        Failure {
            kind: FailureKind::RateLimited,
            status: 429,
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    fn order(mut plan: Plan) -> Vec<String> {
        std::iter::from_fn(|| plan.next_target().map(|t| t.label())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_resting_for_a_failover_trigger_is_skipped_else_tried() {
        let health = HealthBook::default();
        health.failed("a:m", "429", Some(&limited(5)), Trigger::RateLimited);
        let all = Trigger::ALL;
        assert_eq!(
            order(Plan::order(&route(&["a:m", "b:m"], &all), &health)),
            ["b:m"]
        );
        // 429s are no trigger of this chain: skipping `a` would be failing over on one.
        let no_429 = [Trigger::Connect, Trigger::ServerError];
        assert_eq!(
            order(Plan::order(&route(&["a:m", "b:m"], &no_429), &health)),
            ["a:m", "b:m"]
        );
        for _ in 0..crate::health::FAILURES_BEFORE_COOLDOWN {
            health.failed("c:m", "503", None, Trigger::ServerError);
        }
        assert_eq!(
            order(Plan::order(
                &route(&["c:m", "b:m"], &[Trigger::Connect]),
                &health
            )),
            ["c:m", "b:m"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_skipped_target_counts_in_the_final_error() {
        let health = HealthBook::default();
        health.failed("a:m", "429", Some(&limited(10)), Trigger::RateLimited);
        let failed_with = |status: u16, retry_after: Option<u64>| {
            let mut plan = Plan::order(&route(&["a:m", "b:m"], &Trigger::ALL), &health);
            assert_eq!(
                plan.next_target().map(|t| t.label()).as_deref(),
                Some("b:m")
            );
            plan.failures.push(FailedAttempt {
                label: "b:m".into(),
                why: format!("status {status}"),
                retry_after: retry_after.map(Duration::from_secs),
                rate_limited: status == 429,
            });
            plan.into_error()
        };
        // Both rate-limited: the earliest wait is the resting target's, not the one just asked.
        let error = failed_with(429, Some(60));
        assert_eq!(error.status(), 429);
        assert_eq!(error.retry_after().unwrap(), "10");
        let error = failed_with(503, None);
        assert_eq!(error.status(), 502);
        assert!(
            error
                .to_string()
                .contains("a:m: resting: the upstream asked to wait"),
            "{error}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_target_was_asked_to_wait_none_is_called() {
        let health = HealthBook::default();
        health.failed("a:m", "429", Some(&limited(7)), Trigger::RateLimited);
        health.failed("b:m", "429", Some(&limited(4)), Trigger::RateLimited);
        let mut plan = Plan::order(&route(&["a:m", "b:m"], &Trigger::ALL), &health);
        assert!(plan.next_target().is_none());
        let error = plan.into_error();
        assert_eq!(error.status(), 429);
        assert_eq!(error.retry_after().unwrap(), "4");
        // Resting after errors rather than at the upstream's request: probed anyway.
        for _ in 0..crate::health::FAILURES_BEFORE_COOLDOWN {
            health.failed("c:m", "503", None, Trigger::ServerError);
        }
        assert_eq!(
            order(Plan::order(&route(&["a:m", "c:m"], &Trigger::ALL), &health)),
            ["a:m", "c:m"]
        );
    }
}
