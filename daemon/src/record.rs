//! The record of one request: written exactly once, whatever path the request took.
//!
//! A [`Record`] travels with the request (into the stream task for streams). If it is dropped
//! without [`Record::finish`] (the client went away and the request future was cancelled), the
//! drop writes it with outcome `client_disconnected`, so no request goes unrecorded.
//!
//! Writing prices the request (the upstream's cost, else a known price, else nothing), settles
//! its budget reservation, and hands the row to the ledger writer; nothing here waits on disk.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use orproxy_ledger::{CostSource, Row};
use orproxy_plugin::{Nanos, Usage};

use crate::budget::{Reservation, Subject};
use crate::ledger::Accounts;
use crate::metrics;
use crate::pricing;
use crate::table::RoutingTable;
use tokio::time::Instant;

/// How a request ended (the `outcome` of SPEC §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer was delivered completely.
    Ok,
    /// The upstream answered with an error (or could not be reached).
    UpstreamError,
    /// A stream broke after content reached the client.
    MidstreamError,
    /// The client went away first.
    ClientDisconnected,
    /// orproxy refused the request (auth, bad input, unknown backend, a rule).
    Rejected,
    /// A budget's cap was reached.
    BudgetExceeded,
    /// A limit's timeout fired.
    Timeout,
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::MidstreamError => "midstream_error",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::Rejected => "rejected",
            Outcome::BudgetExceeded => "budget_exceeded",
            Outcome::Timeout => "timeout",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use orproxy_ledger::Attempt;

/// Everything recorded about one request.
pub struct Record {
    /// orproxy's request id.
    pub id: String,
    /// The proxy key's name, when auth is on.
    pub key: Option<String>,
    /// The `model` the client sent.
    pub model_requested: Option<String>,
    /// The selector after `--force-model` and aliases, when it changed.
    pub rewritten: Option<String>,
    /// `backend:model` that served (or was last tried).
    pub route: Option<String>,
    /// The model the upstream says served.
    pub model_served: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// How it ended.
    pub outcome: Outcome,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Upstream usage, when reported.
    pub usage: Option<Usage>,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Short reason for a failure.
    pub error: Option<String>,
    /// Tags set by rules.
    pub tags: std::collections::BTreeMap<String, serde_json::Value>,
    /// What the rules changed, compact (`script:field,field;...`).
    pub rules: Option<String>,
    /// When the request arrived.
    pub started: Instant,
    /// When the first byte of the answer went to the client.
    pub first_byte: Option<Instant>,
    /// Time spent waiting on upstreams (sending to answer complete), all attempts.
    pub upstream: Duration,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// Estimated prompt tokens (for pricing a stream the client cut short).
    pub prompt_estimate: u64,
    /// Content events relayed to the client (about one token each).
    pub relayed_events: u64,
    /// Worst-case costs held in budgets until the request ends.
    pub reservation: Reservation,
    /// Cost reported by upstreams for attempts that failed (billed on top).
    pub failed_cost: Nanos,
    /// An attempt to `route` was sent and its result is not noted yet.
    pub attempt_open: bool,
    /// Arrival, Unix milliseconds.
    ts_ms: i64,
    table: Arc<RoutingTable>,
    accounts: Arc<Accounts>,
    _inflight: metrics::Inflight,
    finished: bool,
}

impl Record {
    /// Starts the record of a request served on `table`.
    pub fn new(
        id: String,
        started: Instant,
        table: Arc<RoutingTable>,
        accounts: Arc<Accounts>,
    ) -> Self {
        Record {
            id,
            key: None,
            model_requested: None,
            rewritten: None,
            route: None,
            model_served: None,
            status: 0,
            outcome: Outcome::ClientDisconnected,
            stream: false,
            usage: None,
            attempts: Vec::new(),
            error: None,
            tags: std::collections::BTreeMap::new(),
            rules: None,
            started,
            first_byte: None,
            upstream: Duration::ZERO,
            client_ip: None,
            prompt_estimate: 0,
            relayed_events: 0,
            reservation: Reservation::default(),
            failed_cost: 0,
            attempt_open: false,
            ts_ms: crate::budget::now_ms(),
            table,
            accounts,
            _inflight: metrics::Inflight::start(),
            finished: false,
        }
    }

    /// Notes `result` for the attempt in flight, if one is (a request abandoned midway).
    pub fn close_attempt(&mut self, result: &str) {
        if self.attempt_open
            && let Some(route) = self.route.clone()
        {
            self.attempt(&route, result);
        }
    }

    /// Notes an attempt's result.
    pub fn attempt(&mut self, route: &str, result: impl Into<String>) {
        self.attempt_open = false;
        self.attempts.push(Attempt {
            route: route.to_owned(),
            result: result.into(),
        });
    }

    /// Closes the record with the final status and outcome, and writes it.
    pub fn finish(mut self, status: u16, outcome: Outcome) {
        self.status = status;
        self.outcome = outcome;
        self.write();
    }

    /// The route's backend and model, split.
    fn subject(&self) -> Option<Subject> {
        let (backend, model) = self.route.as_deref()?.split_once(':')?;
        Some(Subject {
            key: self.key.clone(),
            backend: backend.to_owned(),
            model: model.to_owned(),
        })
    }

    /// What the request cost and how that is known.
    fn cost(&self, subject: Option<&Subject>) -> (Nanos, CostSource, Option<Usage>) {
        let quote = || {
            let s = subject?;
            pricing::quote(
                &self.accounts.prices,
                &self.table.pricing,
                &s.backend,
                &s.model,
            )
        };
        match &self.usage {
            Some(u) => match u.cost_nanos {
                Some(cost) => (cost, CostSource::Upstream, Some(u.clone())),
                None => match quote() {
                    Some(q) => (
                        pricing::cost(&q.price, u),
                        CostSource::Pricing,
                        Some(u.clone()),
                    ),
                    None => (0, CostSource::None, Some(u.clone())),
                },
            },
            // A stream cut short (by the client, a broken or stalled upstream, or shutdown) that
            // reported no usage: what was relayed, priced, so that budgets count it.
            None if matches!(
                self.outcome,
                Outcome::ClientDisconnected | Outcome::MidstreamError
            ) && self.relayed_events > 0 =>
            {
                let relayed = Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: self.relayed_events,
                    ..Usage::default()
                };
                match quote() {
                    Some(q) => (
                        pricing::cost(&q.price, &relayed),
                        CostSource::Estimate,
                        Some(relayed),
                    ),
                    None => (0, CostSource::None, Some(relayed)),
                }
            }
            None => (0, CostSource::None, None),
        }
    }

    fn write(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let latency = self.started.elapsed();
        let subject = self.subject();
        let (cost, source, usage) = self.cost(subject.as_ref());
        let cost = cost.saturating_add(self.failed_cost);
        let reservation = std::mem::take(&mut self.reservation);
        self.accounts
            .budgets
            .settle(reservation, subject.as_ref(), cost, self.ts_ms);

        let (backend, model) = subject
            .as_ref()
            .map_or(("none", "none"), |s| (s.backend.as_str(), s.model.as_str()));
        let label = if self.table.known_models.contains(model) {
            model
        } else {
            "other"
        };
        metrics::request(backend, label, self.status, latency, self.upstream);
        if let Some(u) = &usage {
            metrics::usage(backend, label, u.prompt_tokens, u.completion_tokens, cost);
        }
        let ttfb = self.first_byte.map(|t| t.duration_since(self.started));
        tracing::info!(
            target: "orproxy::request",
            message = "Request finished.",
            request_id = %self.id,
            key = self.key.as_deref().unwrap_or("-"),
            model = self.model_requested.as_deref().unwrap_or("-"),
            rewritten = self.rewritten.as_deref(),
            route = self.route.as_deref().unwrap_or("-"),
            served = self.model_served.as_deref().unwrap_or("-"),
            status = self.status,
            outcome = %self.outcome,
            stream = self.stream,
            latency_ms = millis(latency),
            ttfb_ms = ttfb.map(millis),
            tokens_in = usage.as_ref().map(|u| u.prompt_tokens),
            tokens_out = usage.as_ref().map(|u| u.completion_tokens),
            cost_nanos = cost,
            cost_source = source.as_str(),
            attempts = %Attempts(&self.attempts),
            error = self.error.as_deref(),
            tags = (!self.tags.is_empty()).then(|| serde_json::to_string(&self.tags).unwrap_or_default()),
            rules = self.rules.as_deref(),
        );
        let Some(writer) = &self.accounts.writer else {
            return;
        };
        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let (key, backend, model) = match subject {
            Some(s) => (s.key, Some(s.backend), Some(s.model)),
            None => (self.key.take(), None, None),
        };
        writer.send(Row {
            ts_ms: self.ts_ms,
            request_id: std::mem::take(&mut self.id),
            key,
            client_ip: self.client_ip.map(|ip| ip.to_string()),
            backend,
            model,
            model_requested: self.model_requested.take(),
            model_served: self.model_served.take(),
            status: self.status,
            outcome: self.outcome.as_str(),
            stream: self.stream,
            prompt_tokens: usage.as_ref().map(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().map(|u| u.completion_tokens),
            cached_tokens: usage.as_ref().and_then(|u| u.cached_tokens),
            reasoning_tokens: usage.as_ref().and_then(|u| u.reasoning_tokens),
            cost_nanos: cost,
            cost_source: source,
            latency_us: micros(latency),
            ttfb_us: ttfb.map(micros),
            upstream_us: (!self.upstream.is_zero()).then(|| micros(self.upstream)),
            attempts: std::mem::take(&mut self.attempts),
            tags: std::mem::take(&mut self.tags),
            rules: self.rules.take(),
            error: self.error.take(),
        });
    }
}

/// `route=result,route=result`, written straight into the log line (nothing is built when
/// the line is filtered out).
struct Attempts<'a>(&'a [Attempt]);

impl fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", a.route, a.result)?;
        }
        Ok(())
    }
}

pub(crate) fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped mid-flight: the client went away and hyper cancelled the request.
            self.outcome = Outcome::ClientDisconnected;
            self.close_attempt("client_disconnected");
            if self.status == 0 {
                self.status = 499;
            }
            self.write();
        }
    }
}
