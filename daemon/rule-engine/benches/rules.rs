//! Rule evaluation cost per request: `cargo bench -p orproxy-rules`.
//!
//! Runs the repository's example scripts (and a one-script set) on a typical request, many
//! times, and prints p50/p99/max per request. Compiled scripts are reused across requests, as
//! in the daemon. Beside each set, a busy loop calibrated to the set's median runs the same
//! number of times: its p99 is what the machine alone adds to a run that long (preemption,
//! a virtual CPU's steal), so the two tails can be read side by side.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orproxy_rules::{NoLedger, RouteRequest, RuleSet, Sandbox};
use serde_json::json;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 20_000;

fn request() -> RouteRequest {
    RouteRequest {
        model: "gpt-4o".into(),
        backend: "openrouter".into(),
        params: [
            ("temperature".to_owned(), json!(0.7)),
            ("max_tokens".to_owned(), json!(512)),
        ]
        .into_iter()
        .collect(),
        key: "team-a".into(),
        prompt_tokens: 300,
        max_tokens: 512,
        messages: 3,
        client_ip: "10.0.0.7".into(),
        ..RouteRequest::default()
    }
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99), at(1.0))
}

fn measure(name: &str, rules: &RuleSet) {
    let host = Arc::new(NoLedger);
    for _ in 0..1_000 {
        let _ = rules.run(request(), host.clone(), None);
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let input = request();
        let started = Instant::now();
        let out = rules.run(input, host.clone(), None);
        samples.push(started.elapsed());
        assert!(out.is_ok());
    }
    let (p50, p99, max) = percentiles(samples);
    let (_, spin_p99, _) = spin_like(Duration::from_secs_f64(p50 / 1e6));
    println!(
        "| {name} | {} | {p50:.1} | {p99:.1} | {max:.1} | {spin_p99:.1} |",
        rules.names().len(),
    );
}

/// Percentiles of a busy loop as long as `median`, run [`RUNS`] times.
fn spin_like(median: Duration) -> (f64, f64, f64) {
    let spin = |iterations: u64| {
        let mut x = 0u64;
        for i in 0..iterations {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        x
    };
    let mut iterations = 64u64;
    loop {
        let started = Instant::now();
        for _ in 0..100 {
            spin(iterations);
        }
        if started.elapsed() / 100 >= median {
            break;
        }
        iterations = iterations * 11 / 10 + 1;
    }
    let samples = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            spin(iterations);
            started.elapsed()
        })
        .collect();
    percentiles(samples)
}

fn main() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules");
    let mut sources: Vec<(String, String)> = std::fs::read_dir(&examples)
        .expect("the rules directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).expect("a script"),
            )
        })
        .collect();
    sources.sort();
    // Ten scripts: the seven examples and three more of the common kind (a tag, a header, a check).
    let extra = [
        (
            "80-tag.rhai",
            "fn on_request(req) { if req.stream { req.tags.streaming = true; } }",
        ),
        (
            "81-header.rhai",
            "fn on_request(req) { if req.backend == \"openrouter\" { req.headers[\"x-session-id\"] = req.key; } }",
        ),
        (
            "82-check.rhai",
            "fn on_request(req) { if req.messages > 500 { req.reject(400, \"too many messages\"); } }",
        ),
    ];
    let mut ten = sources.clone();
    ten.extend(
        extra
            .iter()
            .map(|(n, s)| ((*n).to_owned(), (*s).to_owned())),
    );
    let one = vec![sources[0].clone()];

    println!("Rule evaluation per request, {RUNS} runs after 1,000 warm-up runs (µs):\n");
    println!("| set | scripts | p50 | p99 | max | p99 of a busy loop as long as the p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    measure(
        "one script (10-gpt-via-openrouter)",
        &RuleSet::compile(&one, Sandbox::default()).expect("compiles"),
    );
    measure(
        "the seven examples",
        &RuleSet::compile(&sources, Sandbox::default()).expect("compiles"),
    );
    measure(
        "ten typical scripts",
        &RuleSet::compile(&ten, Sandbox::default()).expect("compiles"),
    );
}
