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
//! seconds, or with sparse traffic, workers sleep as before.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

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

/// Notes an event on this worker (a request arrived, an upstream answered), `window` being the
/// table's `limits.idle_poll`; wakes [`run`] when polling should start.
pub fn event(window: Duration) {
    if with_gaps(|gaps| gaps.event(Instant::now(), window)) {
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
