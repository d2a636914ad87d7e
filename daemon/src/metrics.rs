//! Every metric orproxy exports, in one place (prefix `orproxy_`, units in names).
//!
//! The Prometheus recorder is installed once per process; `/metrics` on the admin listener
//! renders it. Labels stay low-cardinality: models outside the routing table count as `other`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// One finished request.
pub fn request(backend: &str, model: &str, status: u16, duration: Duration) {
    let labels = [
        ("backend", backend.to_owned()),
        ("model", model.to_owned()),
        ("status", status.to_string()),
    ];
    counter!("orproxy_requests_total", &labels).increment(1);
    histogram!("orproxy_request_duration_seconds").record(duration.as_secs_f64());
}

/// A request moved on to the next target of its chain.
pub fn failover() {
    counter!("orproxy_failovers_total").increment(1);
}

/// A rule script failed a request.
pub fn rule_error(script: &str) {
    counter!("orproxy_rule_errors_total", "script" => script.to_owned()).increment(1);
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
        gauge!("orproxy_inflight_requests").increment(1.0);
        Inflight(())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        gauge!("orproxy_inflight_requests").decrement(1.0);
    }
}
