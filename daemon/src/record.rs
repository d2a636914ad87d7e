//! The record of one request: written exactly once, whatever path the request took.
//!
//! A [`Record`] travels with the request (into the stream task for streams). If it is dropped
//! without [`Record::finish`] (the client went away and the request future was cancelled), the
//! drop writes it with outcome `client_disconnected`, so no request goes unrecorded.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use orproxy_plugin::Usage;

use crate::metrics;
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
    /// orproxy refused the request (auth, bad input, unknown backend).
    Rejected,
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
            Outcome::Timeout => "timeout",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One upstream attempt and how it ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// `backend:model`.
    pub route: String,
    /// `ok`, or why it failed.
    pub result: String,
}

/// Everything recorded about one request.
#[derive(Debug)]
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
    /// Models that may appear as metric labels (others count as `other`).
    pub known_models: Arc<HashSet<String>>,
    _inflight: metrics::Inflight,
    finished: bool,
}

impl Record {
    /// Starts the record of a request.
    pub fn new(id: String, started: Instant) -> Self {
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
            known_models: Arc::default(),
            _inflight: metrics::Inflight::start(),
            finished: false,
        }
    }

    /// Notes an attempt's result.
    pub fn attempt(&mut self, route: &str, result: impl Into<String>) {
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

    fn write(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let latency = self.started.elapsed();
        let (backend, model) = self
            .route
            .as_deref()
            .and_then(|r| r.split_once(':'))
            .unwrap_or(("none", "none"));
        let model = if self.known_models.contains(model) {
            model
        } else {
            "other"
        };
        metrics::request(backend, model, self.status, latency);
        let ttfb = self.first_byte.map(|t| t.duration_since(self.started));
        let (tokens_in, tokens_out, cost) = match &self.usage {
            Some(u) => (
                Some(u.prompt_tokens),
                Some(u.completion_tokens),
                u.cost_nanos,
            ),
            None => (None, None, None),
        };
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
            tokens_in,
            tokens_out,
            cost_nanos = cost,
            attempts = %Attempts(&self.attempts),
            error = self.error.as_deref(),
            tags = (!self.tags.is_empty()).then(|| serde_json::to_string(&self.tags).unwrap_or_default()),
            rules = self.rules.as_deref(),
        );
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

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped mid-flight: the client went away and hyper cancelled the request.
            self.outcome = Outcome::ClientDisconnected;
            if self.status == 0 {
                self.status = 499;
            }
            self.write();
        }
    }
}
