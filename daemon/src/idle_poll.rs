//! Idle polling: a worker that has just seen traffic keeps polling its sockets for a moment
//! (`limits.idle_poll`) before it sleeps, while its events keep coming that close together.
//!
//! A worker asleep in `epoll_wait` is woken by the kernel when its next event arrives, and on a
//! virtual machine the halted vCPU's wake-up costs tens of microseconds each time: twice per
//! request (the client's request, the upstream's answer) when the upstream is fast. A worker
//! that polls instead sees them at once. Polling gives its core away to any runnable thread at
//! every turn (`sched_yield`), so it costs CPU time only while the core would be idle.
//!
//! It pays only when the next event comes within the window, so each worker scores the gaps
//! between its events and polls only while most were shorter: behind upstreams that take
//! seconds, or with sparse traffic, workers sleep as before. Under a CPU quota (a cgroup's
//! `cpu.max` or `cpu.cfs_quota_us`) polling would spend the quota the work needs and get the
//! daemon throttled, so there the default is off.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// `limits.idle_poll` when the config leaves it out and no CPU quota applies.
const DEFAULT_WINDOW: Duration = Duration::from_micros(250);

/// `limits.idle_poll` when the config leaves it out: [`DEFAULT_WINDOW`], or off when the
/// daemon's cgroup (or one above it) sets a CPU quota. Looked up once.
pub fn default_window() -> Duration {
    static WINDOW: OnceLock<Duration> = OnceLock::new();
    *WINDOW.get_or_init(|| {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match cpu_quota(Path::new("/sys/fs/cgroup"), &cgroups) {
            Some(file) => {
                tracing::info!(
                    message = "A CPU quota applies: idle polling is off unless limits.idle_poll sets it.",
                    quota = %file.display(),
                );
                Duration::ZERO
            }
            None => DEFAULT_WINDOW,
        }
    })
}

/// The first quota file that limits the process whose `/proc/self/cgroup` is `cgroups`, with
/// the cgroup file systems mounted under `root`: cgroup v2's `cpu.max` (`max PERIOD` when
/// unlimited), else v1's `cpu.cfs_quota_us` (`-1`), from the process's own group up.
fn cpu_quota(root: &Path, cgroups: &str) -> Option<PathBuf> {
    cgroups.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (mounts, file, unlimited): (Vec<PathBuf>, _, &str) = if controllers.is_empty() {
            (
                vec![root.to_owned(), root.join("unified")],
                "cpu.max",
                "max",
            )
        } else if controllers.split(',').any(|c| c == "cpu") {
            let v1 = [controllers, "cpu,cpuacct", "cpu"].map(|dir| root.join(dir));
            (v1.into(), "cpu.cfs_quota_us", "-1")
        } else {
            return None;
        };
        mounts.iter().find_map(|mount| {
            let mut dir = mount.join(path.trim_start_matches('/'));
            loop {
                let quota = dir.join(file);
                if let Ok(text) = std::fs::read_to_string(&quota)
                    && text
                        .split_whitespace()
                        .next()
                        .is_some_and(|q| q != unlimited)
                {
                    return Some(quota);
                }
                if dir == *mount || !dir.pop() {
                    return None;
                }
            }
        })
    })
}

/// The score's ceiling: how many short gaps in a row it remembers.
const SCORE_MAX: u8 = 8;
/// Polling starts at this score: at least two short gaps for each long one of late.
const SCORE_POLL: u8 = 4;
/// What a long gap takes off the score (a short one adds 1).
const LONG_GAP_COST: u8 = 2;

/// What a worker knows of its recent events.
#[derive(Debug, Default)]
struct Gaps {
    last: Option<Instant>,
    window: Duration,
    score: u8,
    polling: bool,
}

impl Gaps {
    /// Takes an event at `now`; true when the worker should start polling.
    fn event(&mut self, now: Instant, window: Duration) -> bool {
        self.window = window;
        if let Some(last) = self.last.replace(now) {
            self.score = if now.saturating_duration_since(last) <= window {
                (self.score + 1).min(SCORE_MAX)
            } else {
                self.score.saturating_sub(LONG_GAP_COST)
            };
        }
        let start = !self.polling && !window.is_zero() && self.score >= SCORE_POLL;
        self.polling |= start;
        start
    }

    /// Whether polling goes on at `now`: until a window has passed without an event.
    fn keep_polling(&mut self, now: Instant) -> bool {
        let on = self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.window);
        self.polling = on;
        on
    }
}

/// Time all workers have spent polling, nanoseconds (`orproxy_idle_poll_seconds_total`).
static POLLED_NANOS: AtomicU64 = AtomicU64::new(0);

/// Time all workers have spent polling for their next event since the start.
pub fn polled() -> Duration {
    Duration::from_nanos(POLLED_NANOS.load(Ordering::Relaxed))
}

thread_local! {
    static GAPS: Cell<Gaps> = Cell::default();
    static START: Arc<Notify> = Arc::new(Notify::new());
}

fn with_gaps<T>(f: impl FnOnce(&mut Gaps) -> T) -> T {
    GAPS.with(|cell| {
        let mut gaps = cell.take();
        let out = f(&mut gaps);
        cell.set(gaps);
        out
    })
}

/// Notes an event on this worker at `now` (a request arrived, an upstream answered), `window`
/// being the table's `limits.idle_poll`; wakes [`run`] when polling should start.
pub fn event(now: Instant, window: Duration) {
    if with_gaps(|gaps| gaps.event(now, window)) {
        START.with(|start| start.notify_one());
    }
}

/// The worker's polling task: spawned once on each worker's runtime, it polls while
/// [`event`]s come close together and waits otherwise.
pub async fn run() {
    let start = START.with(Arc::clone);
    loop {
        start.notified().await;
        let started = Instant::now();
        while with_gaps(|gaps| gaps.keep_polling(Instant::now())) {
            // A thread runnable on this core (the upstream, the client, the usage writer)
            // runs first; the runtime then polls its sockets without blocking (a yielding
            // task makes it `epoll_wait` with a zero timeout) and runs what they woke.
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
        let polled = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        POLLED_NANOS.fetch_add(polled, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(250);

    fn at(start: Instant, us: u64) -> Instant {
        start + Duration::from_micros(us)
    }

    #[test]
    fn cpu_quotas_are_found_from_the_own_group_up() {
        let root = std::env::temp_dir().join(format!("orproxy-cgroups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        // cgroup v2: unlimited in the own group, a quota on the slice above it.
        write("system.slice/orproxy.service/cpu.max", "max 100000\n");
        assert_eq!(cpu_quota(&root, "0::/system.slice/orproxy.service\n"), None);
        write("system.slice/cpu.max", "50000 100000\n");
        assert_eq!(
            cpu_quota(&root, "0::/system.slice/orproxy.service\n"),
            Some(root.join("system.slice/cpu.max"))
        );
        // cgroup v1, beside other controllers: -1 is no quota.
        let v1 = "4:memory:/box\n2:cpu,cpuacct:/box\n0::/\n";
        write("cpu,cpuacct/box/cpu.cfs_quota_us", "-1\n");
        assert_eq!(cpu_quota(&root, v1), None);
        write("cpu,cpuacct/box/cpu.cfs_quota_us", "200000\n");
        assert_eq!(
            cpu_quota(&root, v1),
            Some(root.join("cpu,cpuacct/box/cpu.cfs_quota_us"))
        );
        // Nothing mounted, nothing readable: no quota.
        assert_eq!(cpu_quota(&root.join("absent"), v1), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn close_events_start_polling_once() {
        let t = Instant::now();
        let mut gaps = Gaps::default();
        let starts: Vec<bool> = (0..8).map(|i| gaps.event(at(t, i * 100), WINDOW)).collect();
        // The first event has no gap; four short gaps reach the threshold; polling then runs.
        assert_eq!(
            starts,
            [false, false, false, false, true, false, false, false]
        );
        assert!(gaps.keep_polling(at(t, 700 + 249)));
        assert!(!gaps.keep_polling(at(t, 700 + 250)));
        // The next close event starts it again.
        assert!(gaps.event(at(t, 700 + 260), WINDOW));
    }

    #[test]
    fn slow_upstreams_never_start_it() {
        // Requests close together, each answered a second later: one short gap to a long one.
        let t = Instant::now();
        let mut gaps = Gaps::default();
        let mut now = 0;
        for _ in 0..100 {
            assert!(!gaps.event(at(t, now), WINDOW));
            now += 1_000_000;
            assert!(!gaps.event(at(t, now), WINDOW));
            now += 100;
        }
    }

    #[test]
    fn long_gaps_stop_it_and_zero_turns_it_off() {
        let t = Instant::now();
        let mut gaps = Gaps::default();
        for i in 0..10 {
            gaps.event(at(t, i * 100), WINDOW);
        }
        assert_eq!(gaps.score, SCORE_MAX);
        assert!(!gaps.keep_polling(at(t, 10_000)));
        // Traffic that comes back after a pause is polled for while the score holds; three
        // long gaps in a row bring it under the threshold.
        assert!(gaps.event(at(t, 20_000), WINDOW));
        assert!(!gaps.keep_polling(at(t, 20_300)));
        assert!(gaps.event(at(t, 30_000), WINDOW));
        assert!(!gaps.keep_polling(at(t, 30_300)));
        assert!(!gaps.event(at(t, 40_000), WINDOW));
        let mut off = Gaps::default();
        for i in 0..10 {
            assert!(!off.event(at(t, i * 10), Duration::ZERO));
        }
    }
}
