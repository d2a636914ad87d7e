//! Every metric orproxy exports, in one place (prefix `orproxy_`, units in names).
//!
//! The Prometheus recorder is installed once per process; `/metrics` on the admin listener
//! renders it. Labels stay low-cardinality: models outside the routing table count as `other`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::formatting::{sanitize_label_value, write_type_line};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use orproxy_plugin::usage::format_usd;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets in seconds: 1 ms to 5 min.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Installs the recorder (first call only) and returns its handle.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            builder.install_recorder().ok()
        })
        .as_ref()
}

/// The Prometheus text exposition.
pub fn render() -> String {
    let mut text = install().map(PrometheusHandle::render).unwrap_or_default();
    render_costs(&mut text);
    render_idle_poll(&mut text);
    text
}

/// One series of `orproxy_cost_usd_total`: nano-dollars spent on a backend and model.
struct CostSeries {
    backend: Box<str>,
    model: Box<str>,
    nanos: Arc<AtomicU64>,
}

/// `orproxy_cost_usd_total`. The `metrics` facade's counters are integers, so this counter
/// is kept here and rendered beside the recorder's output: a counter (not a gauge), exact.
static COSTS: Mutex<Vec<CostSeries>> = Mutex::new(Vec::new());

/// The cost counter of one backend and model, made on first use.
fn cost_counter(backend: &str, model: &str) -> Arc<AtomicU64> {
    let mut costs = COSTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(series) = costs
        .iter()
        .find(|s| &*s.backend == backend && &*s.model == model)
    {
        return Arc::clone(&series.nanos);
    }
    let nanos = Arc::new(AtomicU64::new(0));
    costs.push(CostSeries {
        backend: backend.into(),
        model: model.into(),
        nanos: Arc::clone(&nanos),
    });
    nanos
}

/// Ends the text's last line, if it has one unended, before more lines are appended.
fn start_line(text: &mut String) {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
}

fn render_costs(text: &mut String) {
    let costs = COSTS.lock().unwrap_or_else(|p| p.into_inner());
    if costs.is_empty() {
        return;
    }
    start_line(text);
    write_type_line(text, "orproxy_cost_usd_total", None, None, "counter");
    for series in costs.iter() {
        let nanos = series.nanos.load(Ordering::Relaxed);
        let _ = writeln!(
            text,
            "orproxy_cost_usd_total{{backend=\"{}\",model=\"{}\"}} {}",
            sanitize_label_value(&series.backend),
            sanitize_label_value(&series.model),
            format_usd(i64::try_from(nanos).unwrap_or(i64::MAX)),
        );
    }
}

/// `orproxy_idle_poll_seconds_total`: the time workers spent polling for their next event
/// instead of sleeping (the registry's counters hold integers only).
fn render_idle_poll(text: &mut String) {
    start_line(text);
    write_type_line(
        text,
        "orproxy_idle_poll_seconds_total",
        None,
        None,
        "counter",
    );
    let _ = writeln!(
        text,
        "orproxy_idle_poll_seconds_total {}",
        crate::idle_poll::polled().as_secs_f64()
    );
}

/// Handles of the metrics every request touches. The recorder's registry is a map from a
/// name and its labels to a handle: looking one up costs a hash, a comparison and, for labels,
/// owned copies, so each worker thread keeps the handles it has used. (The recorder has no idle
/// timeout, so the registry never drops a metric a kept handle points to.)
struct Handles {
    request_duration: Histogram,
    upstream_duration: Histogram,
    overhead: Histogram,
    inflight: Gauge,
    tokens_in: Counter,
    tokens_out: Counter,
    /// `orproxy_requests_total` by backend, model and status.
    requests: ByRoute<HashMap<u16, Counter>>,
    /// `orproxy_cost_usd_total` by backend and model.
    cost: ByRoute<Arc<AtomicU64>>,
}

impl Handles {
    fn new() -> Handles {
        Handles {
            request_duration: histogram!("orproxy_request_duration_seconds"),
            upstream_duration: histogram!("orproxy_upstream_duration_seconds"),
            overhead: histogram!("orproxy_overhead_seconds"),
            inflight: gauge!("orproxy_inflight_requests"),
            tokens_in: counter!("orproxy_tokens_total", "direction" => "in"),
            tokens_out: counter!("orproxy_tokens_total", "direction" => "out"),
            requests: HashMap::new(),
            cost: HashMap::new(),
        }
    }
}

/// Values by backend, then model; looked up with borrowed names, so a hit allocates nothing.
/// Hashed with foldhash: label values are the routing table's own names, and SipHash's
/// flooding resistance cost more than the counting on every request.
type ByRoute<T> = HashMap<Box<str>, HashMap<Box<str>, T>>;

fn by_route<'a, T>(
    map: &'a mut ByRoute<T>,
    backend: &str,
    model: &str,
    make: impl FnOnce() -> T,
) -> &'a mut T {
    if !map.contains_key(backend) {
        map.insert(backend.into(), HashMap::new());
    }
    let models = map.get_mut(backend).expect("inserted above");
    if !models.contains_key(model) {
        models.insert(model.into(), make());
    }
    models.get_mut(model).expect("inserted above")
}

thread_local! {
    static HANDLES: RefCell<Option<Handles>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's handles; they are made on first use after [`install`], so a
/// handle is never a no-op one fetched before the recorder existed.
fn with_handles<T>(f: impl FnOnce(&mut Handles) -> T) -> T {
    HANDLES.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() && HANDLE.get().is_some() {
            *slot = Some(Handles::new());
        }
        match slot.as_mut() {
            Some(handles) => f(handles),
            None => f(&mut Handles::new()),
        }
    })
}

/// One finished request: its whole duration, the part spent waiting on upstreams, and the
/// rest (time inside orproxy).
pub fn request(backend: &str, model: &str, status: u16, duration: Duration, upstream: Duration) {
    with_handles(|h| {
        // Label values are bounded (backends and models of the table, `other`, statuses), so
        // the map stays small.
        by_route(&mut h.requests, backend, model, HashMap::new)
            .entry(status)
            .or_insert_with(|| {
                let labels = [
                    ("backend", backend.to_owned()),
                    ("model", model.to_owned()),
                    ("status", status.to_string()),
                ];
                counter!("orproxy_requests_total", &labels)
            })
            .increment(1);
        h.request_duration.record(duration.as_secs_f64());
        if !upstream.is_zero() {
            h.upstream_duration.record(upstream.as_secs_f64());
        }
        h.overhead
            .record(duration.saturating_sub(upstream).as_secs_f64());
    });
}

/// Tokens and cost of one request (model labels already bounded by the caller).
pub fn usage(backend: &str, model: &str, tokens_in: u64, tokens_out: u64, cost_nanos: i64) {
    with_handles(|h| {
        h.tokens_in.increment(tokens_in);
        h.tokens_out.increment(tokens_out);
        if cost_nanos > 0 {
            // Saturating: a counter that wrapped would read as a reset to Prometheus.
            let _ = by_route(&mut h.cost, backend, model, || cost_counter(backend, model))
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(cost_nanos.unsigned_abs()))
                });
        }
    });
}

/// The ledger writer's counters, read at scrape time.
pub fn ledger(stats: &orproxy_ledger::WriterStats) {
    use std::sync::atomic::Ordering::Relaxed;
    gauge!("orproxy_ledger_queue_rows").set(stats.queued.load(Relaxed) as f64);
    counter!("orproxy_ledger_rows_written_total").absolute(stats.written.load(Relaxed));
    counter!("orproxy_ledger_batches_total").absolute(stats.batches.load(Relaxed));
    gauge!("orproxy_ledger_batch_rows_max").set(stats.max_batch.load(Relaxed) as f64);
    counter!("orproxy_ledger_write_errors_total").absolute(stats.errors.load(Relaxed));
    counter!("orproxy_ledger_rows_dropped_total").absolute(stats.dropped.load(Relaxed));
    counter!("orproxy_ledger_rows_pruned_total").absolute(stats.pruned.load(Relaxed));
}

/// A request refused (or sent to its fallback) by a budget.
pub fn budget_rejection(budget: &str, action: &'static str) {
    counter!("orproxy_budget_rejections_total", "budget" => budget.to_owned(), "action" => action)
        .increment(1);
}

/// A request moved on to the next target of its chain.
pub fn failover() {
    counter!("orproxy_failovers_total").increment(1);
}

/// A rule script failed a request.
pub fn rule_error(script: &str) {
    counter!("orproxy_rule_errors_total", "script" => script.to_owned()).increment(1);
}

/// Exports the counters that only move on events at 0 from the start, so that they exist
/// (for rates and alerts) before their first event.
pub fn register_event_counters() {
    for result in ["ok", "error"] {
        counter!("orproxy_reloads_total", "result" => result).increment(0);
    }
    counter!("orproxy_failovers_total").increment(0);
}

/// Exports `orproxy_budget_rejections_total` at 0 for each budget and each action it can
/// take (a fallback budget rejects once its fallbacks are exhausted).
pub fn register_budgets(rules: &[crate::budget::BudgetRule]) {
    for rule in rules {
        let actions: &[&'static str] = match rule.action {
            crate::config::BudgetAction::Reject => &["reject", "skip"],
            crate::config::BudgetAction::Fallback => &["fallback", "reject", "skip"],
        };
        for action in actions {
            counter!("orproxy_budget_rejections_total", "budget" => rule.name.clone(), "action" => *action)
                .increment(0);
        }
    }
}

/// A reload finished.
pub fn reload(ok: bool) {
    counter!("orproxy_reloads_total", "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct Inflight(());

impl Inflight {
    /// Starts counting.
    pub fn start() -> Inflight {
        with_handles(|h| h.inflight.increment(1.0));
        Inflight(())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        with_handles(|h| h.inflight.decrement(1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_an_exact_counter_with_escaped_labels() {
        usage("cost-test", "odd\"model\\", 1, 1, 1_500_000_001);
        usage("cost-test", "odd\"model\\", 1, 1, 1_500_000_001);
        usage("cost-test", "free", 1, 1, 0);
        let mut text = String::from("orproxy_other 1");
        render_costs(&mut text);
        assert!(
            text.contains("\n# TYPE orproxy_cost_usd_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "orproxy_cost_usd_total{backend=\"cost-test\",model=\"odd\\\"model\\\\\"} 3.000000002\n"
            ),
            "{text}"
        );
        assert!(!text.contains("model=\"free\""), "{text}");
    }
}
