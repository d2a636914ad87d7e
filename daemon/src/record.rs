//! The record of one request: written exactly once, whatever path the request took.
//!
//! A [`Record`] travels with the request (into the stream task for streams). If it is dropped
//! without [`Record::finish`] (the client went away and the request future was cancelled), the
//! drop writes it with outcome `client_disconnected`, so no request goes unrecorded.
//!
//! Closing a record prices the request (the upstream's cost, else a known price, else nothing;
//! an answer whose upstream reported no usage is estimated), settles its budget reservation,
//! counts it in the metrics and hands its row to the ledger writer, all before the answer
//! leaves; its log line follows once the answer is on its way. Nothing here waits on disk.

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

/// What a request cost and how that is known, kept together so that no row carries a cost
/// without its source: a cost from `none` is always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    nanos: Nanos,
    source: CostSource,
}

impl Cost {
    /// Nothing known, nothing counted.
    pub const NONE: Cost = Cost {
        nanos: 0,
        source: CostSource::None,
    };

    /// `nanos` as `source` gives it (a known source: `none` has no amount).
    pub fn new(nanos: Nanos, source: CostSource) -> Cost {
        debug_assert!(
            source != CostSource::None,
            "a cost of {nanos} without a source"
        );
        Cost { nanos, source }
    }

    /// Adds what failed attempts reported (always an upstream's own figure): with nothing else
    /// known, the cost is theirs and so is its source.
    pub fn plus_failed(self, failed: Nanos) -> Cost {
        match (failed, self.source) {
            (0, _) => self,
            (_, CostSource::None) => Cost::new(failed, CostSource::Upstream),
            (_, source) => Cost::new(self.nanos.saturating_add(failed), source),
        }
    }

    /// Nano-dollars.
    pub fn nanos(self) -> Nanos {
        self.nanos
    }

    /// Where the amount comes from.
    pub fn source(self) -> CostSource {
        self.source
    }
}

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
    /// When the client could first read the answer (its `ttfb`): a stream's first content or
    /// error event, the head of any other response (which carries the whole answer). orproxy's
    /// keep-alives do not count.
    pub first_answer: Option<Instant>,
    /// Time spent waiting on upstreams (sending to answer complete), all attempts.
    pub upstream: Duration,
    /// When the wait on the upstream in flight began (see [`Record::upstream_wait`]).
    waiting_since: Option<Instant>,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// Estimated prompt tokens (for pricing an answer whose upstream reported no usage).
    pub prompt_estimate: u64,
    /// Completion tokens relayed to the client, estimated: one per content event of a stream,
    /// four bytes of JSON per token of a whole answer's messages.
    pub relayed_tokens: u64,
    /// Worst-case costs held in budgets until the request ends.
    pub reservation: Reservation,
    /// Cost reported by upstreams for attempts that failed (billed on top).
    pub failed_cost: Nanos,
    /// The part of `failed_cost` already held in the request's budgets.
    pub failed_cost_held: Nanos,
    /// `failed_cost` by the target (`backend:model`) that billed it: its budgets count it.
    failed_by_target: Vec<(String, Nanos)>,
    /// An attempt to `route` was sent and its result is not noted yet.
    pub attempt_open: bool,
    /// Arrival, Unix milliseconds.
    ts_ms: i64,
    table: Arc<RoutingTable>,
    accounts: Arc<Accounts>,
    /// Counted in `orproxy_inflight_requests` until settled.
    inflight: Option<metrics::Inflight>,
    /// The request's row as settled, until [`Record::publish`] logs it.
    settled: Option<Row>,
    /// Published: the log line is out.
    published: bool,
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
            first_answer: None,
            upstream: Duration::ZERO,
            waiting_since: None,
            client_ip: None,
            prompt_estimate: 0,
            relayed_tokens: 0,
            reservation: Reservation::default(),
            failed_cost: 0,
            failed_cost_held: 0,
            failed_by_target: Vec::new(),
            attempt_open: false,
            ts_ms: crate::budget::now_ms(),
            table,
            accounts,
            inflight: Some(metrics::Inflight::start()),
            settled: None,
            published: false,
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

    /// Bills the cost an upstream reported for a failed attempt on `target` (`backend:model`):
    /// only the attempt that served is billed, plus what a failed one reported (SPEC §9), each
    /// in the budgets of the target that billed it.
    pub fn bill_failed(&mut self, target: &str, usage: Option<Usage>) {
        if let Some(cost) = usage.and_then(|u| u.cost_nanos).filter(|c| *c != 0) {
            self.failed_cost = self.failed_cost.saturating_add(cost);
            self.failed_by_target.push((target.to_owned(), cost));
        }
    }

    /// Notes that the client can now read the answer; the first time is the one kept.
    pub fn answer_reached_client(&mut self) {
        self.first_answer.get_or_insert_with(Instant::now);
    }

    /// Starts (`true`) or ends (`false`) a wait on an upstream. A wait still running when the
    /// record is written (the client left, the daemon stopped) counts up to then.
    pub fn upstream_wait(&mut self, waiting: bool) {
        if let Some(since) = self.waiting_since.take() {
            self.upstream += since.elapsed();
        }
        if waiting {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// Closes the record of a request answered with one whole response (status, headers and
    /// body together): the client can read it from its head.
    pub fn answered(mut self, status: u16, outcome: Outcome) {
        self.answer_reached_client();
        self.finish(status, outcome);
    }

    /// Closes the record with the final status and outcome: settles it now, and writes its
    /// log line once the answer is on its way (see [`publish_after_the_answer`]).
    pub fn finish(mut self, status: u16, outcome: Outcome) {
        self.status = status;
        self.outcome = outcome;
        self.settle();
        publish_after_the_answer(self);
    }

    /// The route's backend and model, split.
    fn subject(&self) -> Option<Subject> {
        self.subject_of(self.route.as_deref()?)
    }

    /// The request's key with a target's backend and model (`backend:model`).
    fn subject_of(&self, target: &str) -> Option<Subject> {
        let (backend, model) = target.split_once(':')?;
        Some(Subject {
            key: self.key.clone(),
            backend: backend.to_owned(),
            model: model.to_owned(),
        })
    }

    /// What the request cost and how that is known, with the usage it was priced from.
    fn cost(&self, subject: Option<&Subject>) -> (Cost, Option<Usage>) {
        let priced = |usage: &Usage, source: CostSource| {
            subject
                .and_then(|s| {
                    pricing::quote(
                        &self.accounts.prices,
                        &self.table.pricing,
                        &s.backend,
                        &s.model,
                    )
                })
                .map_or(Cost::NONE, |q| {
                    Cost::new(pricing::cost(&q.price, usage), source)
                })
        };
        match &self.usage {
            Some(u) => match u.cost_nanos {
                Some(cost) => (Cost::new(cost, CostSource::Upstream), Some(u.clone())),
                None => (priced(u, CostSource::Pricing), Some(u.clone())),
            },
            // An answer that reached the client, whole or cut short after content, whose
            // upstream reported no usage: the prompt and what was relayed, priced, so that
            // budgets count it.
            None if self.delivered() => {
                let relayed = Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: self.relayed_tokens,
                    ..Usage::default()
                };
                (priced(&relayed, CostSource::Estimate), Some(relayed))
            }
            None => (Cost::NONE, None),
        }
    }

    /// Whether an answer reached the client: a complete one, or content before a break.
    fn delivered(&self) -> bool {
        match self.outcome {
            Outcome::Ok => true,
            Outcome::ClientDisconnected | Outcome::MidstreamError => self.relayed_tokens > 0,
            _ => false,
        }
    }

    /// Closes the request's accounts before the client sees the answer, so that whatever
    /// is read after it counts the request: prices it, settles its budgets, counts it in the
    /// metrics and hands its row to the ledger writer. Only the log line is left for
    /// [`Record::publish`].
    fn settle(&mut self) {
        if self.settled.is_some() || self.published {
            return;
        }
        self.upstream_wait(false);
        let latency = self.started.elapsed();
        let subject = self.subject();
        let (served, usage) = self.cost(subject.as_ref());
        let cost = served.plus_failed(self.failed_cost);
        let reservation = std::mem::take(&mut self.reservation);
        let budgets = &self.accounts.budgets;
        budgets.settle(reservation, subject.as_ref(), served.nanos(), self.ts_ms);
        let billed_failures: Vec<(Subject, Nanos)> = self
            .failed_by_target
            .iter()
            .filter_map(|(target, nanos)| Some((self.subject_of(target)?, *nanos)))
            .collect();
        for (failed, nanos) in &billed_failures {
            budgets.settle(Reservation::default(), Some(failed), *nanos, self.ts_ms);
        }

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
            metrics::usage(
                backend,
                label,
                u.prompt_tokens,
                u.completion_tokens,
                cost.nanos(),
            );
        }
        self.inflight = None;

        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let (key, backend, model) = match subject {
            Some(s) => (s.key, Some(s.backend), Some(s.model)),
            None => (self.key.take(), None, None),
        };
        let row = Row {
            ts_ms: self.ts_ms,
            request_id: std::mem::take(&mut self.id),
            key,
            client_ip: self.client_ip,
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
            cost_nanos: cost.nanos(),
            cost_source: cost.source(),
            latency_us: micros(latency),
            ttfb_us: self
                .first_answer
                .map(|t| micros(t.duration_since(self.started))),
            upstream_us: (!self.upstream.is_zero()).then(|| micros(self.upstream)),
            attempts: std::mem::take(&mut self.attempts),
            tags: std::mem::take(&mut self.tags),
            rules: self.rules.take(),
            error: self.error.take(),
            billed_failures: billed_failures
                .into_iter()
                .map(|(s, nanos)| (s.backend, s.model, nanos))
                .collect(),
        };
        if let Some(writer) = &self.accounts.writer {
            writer.send(&row);
        }
        self.settled = Some(row);
    }

    /// Writes the request's log line, once.
    fn publish(&mut self) {
        if self.published {
            return;
        }
        self.published = true;
        let Some(row) = self.settled.take() else {
            return;
        };
        tracing::info!(
            target: "orproxy::request",
            message = "Request finished.",
            request_id = %row.request_id,
            key = row.key.as_deref().unwrap_or("-"),
            model = row.model_requested.as_deref().unwrap_or("-"),
            rewritten = self.rewritten.as_deref(),
            route = self.route.as_deref().unwrap_or("-"),
            served = row.model_served.as_deref().unwrap_or("-"),
            status = row.status,
            outcome = row.outcome,
            stream = row.stream,
            latency_ms = micros_to_millis(row.latency_us),
            ttfb_ms = row.ttfb_us.map(micros_to_millis),
            tokens_in = row.prompt_tokens,
            tokens_out = row.completion_tokens,
            cost_nanos = row.cost_nanos,
            cost_source = row.cost_source.as_str(),
            attempts = %Attempts(&row.attempts),
            error = row.error.as_deref(),
            tags = (!row.tags.is_empty()).then(|| serde_json::to_string(&row.tags).unwrap_or_default()),
            rules = row.rules.as_deref(),
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

/// Milliseconds with three decimals, for log lines.
pub(crate) fn millis(d: Duration) -> f64 {
    // Whole microseconds, as the usage row stores them, so that the two agree.
    d.as_micros() as f64 / 1e3
}

/// A row's whole microseconds as [`millis`] writes them.
fn micros_to_millis(us: i64) -> f64 {
    us as f64 / 1e3
}

/// Writes `record`'s log line from a task of its own: the worker runs it once the task at
/// hand (hyper's connection, or the relay) has passed the answer on, so the client does not
/// wait on formatting and writing the line. A task that never runs (the runtime stopped) drops
/// the record, which writes the line too.
fn publish_after_the_answer(mut record: Record) {
    // No line to write (the filter leaves request lines out): nothing to wait for.
    if !tracing::enabled!(target: "orproxy::request", tracing::Level::INFO) {
        record.publish();
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(async move { record.publish() })),
        Err(_) => record.publish(),
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if self.settled.is_none() {
            // Dropped mid-flight: the client went away and hyper cancelled the request.
            self.outcome = Outcome::ClientDisconnected;
            self.close_attempt("client_disconnected");
            if self.status == 0 {
                self.status = 499;
            }
            self.settle();
        }
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Overrides;

    /// Accounts on a fresh database, and a record of a request served by the mock backend.
    fn accounts_and_record(name: &str) -> (std::path::PathBuf, Arc<Accounts>, Record) {
        let dir =
            std::env::temp_dir().join(format!("orproxy-record-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let accounts = Arc::new(Accounts::open(&dir.join("usage.db")).unwrap());
        let table = crate::table::tests::build("", Overrides::default(), &[]).unwrap();
        let mut record = Record::new(
            "req-1".into(),
            Instant::now(),
            Arc::new(table),
            Arc::clone(&accounts),
        );
        record.route = Some("mock:echo".into());
        (dir, accounts, record)
    }

    /// Rows committed: (status, outcome).
    fn rows(accounts: &Accounts) -> Vec<(i64, String)> {
        assert!(accounts.writer.as_ref().unwrap().flush());
        let path = accounts.path.as_ref().unwrap();
        let conn = orproxy_ledger::open_reader(path).unwrap();
        let mut select = conn
            .prepare("SELECT status, outcome FROM requests")
            .unwrap();
        select
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn a_records_row_is_sent_before_its_answer_leaves_and_stored_once() {
        // Request lines enabled, as in production, so that the line waits for its task.
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || SharedBuffer(Arc::clone(&sink)))
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let written = || {
            let text = lines.lock().map(|l| l.clone()).unwrap_or_default();
            String::from_utf8_lossy(&text)
                .matches("Request finished.")
                .count()
        };
        let (dir, accounts, record) = accounts_and_record("before");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            record.answered(200, Outcome::Ok);
            // A report read right after the answer finds the request's row; only the log
            // line waits for the task that follows the answer.
            assert_eq!(rows(&accounts), [(200, "ok".to_owned())]);
            assert_eq!(written(), 0);
        });
        // The runtime stops with that task still queued, as a worker's does at shutdown: the
        // record it held writes the line as it is dropped.
        drop(runtime);
        assert_eq!(rows(&accounts), [(200, "ok".to_owned())]);
        assert_eq!(written(), 1);
        accounts.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A log writer into a buffer the test reads.
    struct SharedBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut buffer) = self.0.lock() {
                buffer.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_attempts_cost_is_the_upstreams_when_nothing_else_is_known() {
        assert_eq!(Cost::NONE.plus_failed(0), Cost::NONE);
        let failed = Cost::NONE.plus_failed(500_000_000);
        assert_eq!(
            (failed.nanos(), failed.source()),
            (500_000_000, CostSource::Upstream)
        );
        let served = Cost::new(7, CostSource::Pricing).plus_failed(3);
        assert_eq!((served.nanos(), served.source()), (10, CostSource::Pricing));
    }
}
