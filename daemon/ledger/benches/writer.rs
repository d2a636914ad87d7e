//! Ledger writer throughput: `cargo bench -p orproxy-ledger --bench writer`.
//!
//! Opens a fresh database in a temporary directory as the daemon does ([`orproxy_ledger::open`]:
//! WAL, `synchronous = NORMAL`, migrations) and starts the [`Writer`] on it. Two phases:
//!
//! 1. Burst: 8 threads send 200,000 rows ([`Row::example`], distinct request ids, stamped with
//!    the time they are sent) as fast as
//!    they can, holding back only while half of [`MAX_QUEUED`] rows wait (the writer logs rows
//!    past that limit instead of queueing them), so the rate measured is the writer's: rows
//!    committed per second from the first send until [`Writer::flush`] returns (every row
//!    committed). A sampler thread reads the `written` counter every 100 ms; the slowest whole
//!    500 ms window while rows were still queued is the sustained floor. Also: batches (count, mean, largest), the time from
//!    the last send to the last commit.
//! 2. Paced at the target: the same 8 threads send 20,000 rows/s in all (10 rows per thread
//!    every 4 ms) for 3 s, while the main thread calls [`Writer::flush`] every 50 ms: each
//!    flush returns when every row sent before it is committed, so its duration is how far the
//!    disk lags behind the requests at that moment.
//!
//! Then [`Writer::stop`] is timed, and the rows are counted and summed through a reader
//! connection, so a lost row fails the bench. `ORPROXY_LEDGER_BENCH_ROWS` overrides the burst's
//! row count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use orproxy_ledger::{MAX_QUEUED, Row, Writer};

const THREADS: usize = 8;
const DEFAULT_ROWS: usize = 200_000;
const SAMPLE: Duration = Duration::from_millis(100);
/// Samples per window of the sustained floor (500 ms).
const WINDOW: usize = 5;
/// The target of the design: rows committed per second, sustained.
const TARGET: f64 = 20_000.0;
/// Phase 2: each thread sends this many rows every [`PACE`].
const PACED_ROWS: usize = 10;
const PACE: Duration = Duration::from_millis(4);
const PACED_FOR: Duration = Duration::from_secs(3);
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("orproxy-ledger-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rows_wanted() -> usize {
    std::env::var("ORPROXY_LEDGER_BENCH_ROWS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_ROWS)
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// `VmHWM` (peak resident memory) of this process, MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn cost(n: usize) -> i64 {
    3_530_250 + (n % 1000) as i64
}

/// A row stamped with the time it is sent, as the daemon stamps a request's arrival: the
/// `ts_ms` index then grows at its end, as it does in production.
fn row(n: usize, tag: &str) -> Row {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64);
    Row::example(&format!("req-{tag}-{n}"), now_ms, cost(n))
}

/// `written` and `queued` every [`SAMPLE`] from `start`, until `done`.
fn sample(writer: Writer, start: Instant, done: Arc<AtomicBool>) -> Vec<(Duration, u64, u64)> {
    let mut samples = Vec::new();
    let mut next = start + SAMPLE;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += SAMPLE;
        let stats = writer.stats();
        samples.push((
            start.elapsed(),
            stats.written.load(Ordering::Relaxed),
            stats.queued.load(Ordering::Relaxed),
        ));
    }
    samples
}

fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() {
    let per_thread = rows_wanted().div_ceil(THREADS);
    let burst_rows = per_thread * THREADS;
    let dir = TempDir::new();
    let path = dir.0.join("usage.db");
    let conn = orproxy_ledger::open(&path).expect("open the database");
    let writer = Writer::start(conn, &path).expect("start the writer");

    // Phase 1: burst.
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let sampler = {
        let (writer, done) = (writer.clone(), Arc::clone(&done));
        std::thread::spawn(move || sample(writer, started, done))
    };
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let writer = writer.clone();
            s.spawn(move || {
                for i in 0..per_thread {
                    while writer.stats().queued.load(Ordering::Relaxed) >= MAX_QUEUED / 2 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    writer.send(row(t * per_thread + i, "burst"));
                }
            });
        }
    });
    let sent = started.elapsed();
    writer.flush();
    let committed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("the sampler thread");
    let burst_batches = writer.stats().batches.load(Ordering::Relaxed);
    let burst_max_batch = writer.stats().max_batch.load(Ordering::Relaxed);

    // The slowest whole window with rows still queued at its end.
    let floor = samples
        .windows(WINDOW + 1)
        .filter(|w| w[WINDOW].2 > 0)
        .map(|w| (w[WINDOW].1 - w[0].1) as f64 / (w[WINDOW].0 - w[0].0).as_secs_f64())
        .reduce(f64::min);

    // Phase 2: paced at the target, with flush probes.
    let batches_before = writer.stats().batches.load(Ordering::Relaxed);
    let paced_started = Instant::now();
    let mut probes: Vec<Duration> = Vec::new();
    let paced_rows: usize = std::thread::scope(|s| {
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let writer = writer.clone();
                s.spawn(move || {
                    let mut next = Instant::now();
                    let mut n = 0;
                    while paced_started.elapsed() < PACED_FOR {
                        for _ in 0..PACED_ROWS {
                            writer.send(row(burst_rows + t * 1_000_000 + n, "paced"));
                            n += 1;
                        }
                        next += PACE;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    n
                })
            })
            .collect();
        while paced_started.elapsed() < PACED_FOR {
            std::thread::sleep(PROBE_EVERY);
            let probe = Instant::now();
            writer.flush();
            probes.push(probe.elapsed());
        }
        senders
            .into_iter()
            .map(|h| h.join().expect("a sender"))
            .sum()
    });
    let paced_sent = paced_started.elapsed();
    let last_send = Instant::now();
    writer.flush();
    let paced_drain = last_send.elapsed();
    let paced_committed = paced_started.elapsed();
    let paced_batches = writer.stats().batches.load(Ordering::Relaxed) - batches_before;
    probes.sort();

    let stopping = Instant::now();
    writer.stop();
    let stop = stopping.elapsed();

    // Nothing lost, nothing changed.
    let stats = writer.stats();
    let total = burst_rows + paced_rows;
    let (written, errors, dropped) = (
        stats.written.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
    );
    let reader = orproxy_ledger::open_reader(&path).expect("open a reader");
    let count: i64 = reader
        .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
        .expect("count the rows");
    let paced_count: i64 = reader
        .query_row(
            "SELECT count(*) FROM requests WHERE request_id LIKE 'req-paced-%'",
            [],
            |r| r.get(0),
        )
        .expect("count the paced rows");
    assert_eq!(
        paced_count as usize, paced_rows,
        "every paced row is stored"
    );
    let burst_sum: i64 = (0..burst_rows).map(cost).sum();
    let stored_burst_sum: i64 = reader
        .query_row(
            "SELECT sum(cost_nanos) FROM requests WHERE request_id LIKE 'req-burst-%'",
            [],
            |r| r.get(0),
        )
        .expect("sum the burst");
    assert_eq!(count as usize, total, "every row sent is in the database");
    assert_eq!(stored_burst_sum, burst_sum, "every row is stored as sent");
    assert_eq!((written as usize, errors, dropped), (total, 0, 0));

    let rate = burst_rows as f64 / committed.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let db_mb = (file_size(&path) + file_size(&dir.0.join("usage.db-wal"))) as f64 / 1e6;
    let line = |label: &str, value: String| println!("| {label:<55} | {value:>14} |");
    println!(
        "Ledger writer: {burst_rows} rows from {THREADS} threads at full speed, then {paced_rows} rows paced at 20000 rows/s (measured \
         {:.0}); fresh database, {db_mb:.1} MB with its WAL at the end.",
        paced_rows as f64 / paced_sent.as_secs_f64()
    );
    println!();
    println!("| {:<55} | {:>14} |", "burst", "value");
    println!("| {:-<55} | {:->13}: |", "", "");
    line(
        "rows committed per second (first send to last commit)",
        format!("{rate:.0}"),
    );
    line(
        "slowest 500 ms window while rows were queued, rows/s",
        floor.map_or_else(|| "-".into(), |f| format!("{f:.0}")),
    );
    line(
        "rows sent per second (8 senders, held back at 50,000 queued)",
        format!("{:.0}", burst_rows as f64 / sent.as_secs_f64()),
    );
    line("all sent after, ms", format!("{:.1}", ms(sent)));
    line("all committed after, ms", format!("{:.1}", ms(committed)));
    line(
        "last send to committed, ms",
        format!("{:.1}", ms(committed - sent)),
    );
    line("batches (transactions)", burst_batches.to_string());
    line(
        "mean batch, rows",
        format!("{:.0}", burst_rows as f64 / burst_batches.max(1) as f64),
    );
    line(
        "largest batch, rows (writer.stats().max_batch)",
        burst_max_batch.to_string(),
    );
    println!();
    println!("| {:<55} | {:>14} |", "paced", "value");
    println!("| {:-<55} | {:->13}: |", "", "");
    line(
        "rows sent per second",
        format!("{:.0}", paced_rows as f64 / paced_sent.as_secs_f64()),
    );
    line(
        "rows committed per second",
        format!("{:.0}", paced_rows as f64 / paced_committed.as_secs_f64()),
    );
    line(
        "mean batch, rows",
        format!("{:.0}", paced_rows as f64 / paced_batches.max(1) as f64),
    );
    line(
        &format!("flush lag p50 / max over {} probes, ms", probes.len()),
        format!(
            "{:.2} / {:.2}",
            ms(nearest_rank(&probes, 0.5)),
            ms(nearest_rank(&probes, 1.0))
        ),
    );
    line(
        "last send to committed, ms",
        format!("{:.2}", ms(paced_drain)),
    );
    println!();
    line(
        "stop() after the last flush, ms",
        format!("{:.1}", ms(stop)),
    );
    line(
        "peak RSS of the bench (rows queued in memory), MB",
        peak_rss_mb().map_or_else(|| "-".into(), |m| format!("{m:.0}")),
    );
    println!();
    let verdict = if rate >= TARGET && floor.is_none_or(|f| f >= TARGET) {
        "met"
    } else {
        "NOT met"
    };
    println!("Target >= {TARGET:.0} rows/s sustained: {verdict}.");
}
