//! Cool-downs: a backend+model that keeps failing, or that asked us to wait (`Retry-After`),
//! is skipped while cooling and probed again after.
//!
//! This is runtime state, kept across reloads (it describes upstreams, not configuration).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use orproxy_plugin::{Failure, FailureKind};
use tokio::time::Instant;

use crate::config::Trigger;

/// Consecutive failures that put a target into cool-down.
pub const FAILURES_BEFORE_COOLDOWN: u32 = 3;
/// How long a repeatedly failing target rests.
pub const COOLDOWN: Duration = Duration::from_secs(30);
/// The longest `Retry-After` honoured (a bigger one is capped, not ignored).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Targets tracked before those not cooling are forgotten (clients choose model names, so the
/// book must not grow without bound).
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Default)]
struct State {
    failures: u32,
    cooling_until: Option<Instant>,
    /// What put the target to rest, and whether the upstream asked for it (`Retry-After`).
    rest_cause: Option<(Trigger, bool)>,
    last_failure: String,
}

/// A target's rest: how long is left, what caused it, and whether the upstream asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rest {
    /// Time left.
    pub left: Duration,
    /// The kind of failure that started it.
    pub cause: Trigger,
    /// The upstream asked for the pause (429 with `Retry-After`): calling it before the end
    /// only earns another 429.
    pub asked: bool,
}

/// One target's state, for `/admin/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetHealth {
    /// `backend:model`.
    pub target: String,
    /// Consecutive failures.
    pub failures: u32,
    /// Seconds of cool-down left (0 when usable).
    pub cooling_secs: f64,
    /// The last failure's reason.
    pub last_failure: String,
}

/// Health of every target that has failed recently.
#[derive(Debug, Default)]
pub struct HealthBook {
    targets: Mutex<HashMap<String, State>>,
}

impl HealthBook {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, State>) -> T) -> T {
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut targets)
    }

    /// The rest `target` is in, if any.
    pub fn cooling(&self, target: &str) -> Option<Rest> {
        let now = Instant::now();
        self.with(|t| {
            let state = t.get(target)?;
            let until = state.cooling_until.filter(|until| *until > now)?;
            let (cause, asked) = state.rest_cause?;
            Some(Rest {
                left: until - now,
                cause,
                asked,
            })
        })
    }

    /// Notes a failed attempt of kind `cause`; `Retry-After` (429) or repeated failures start
    /// a cool-down.
    pub fn failed(&self, target: &str, reason: &str, failure: Option<&Failure>, cause: Trigger) {
        let now = Instant::now();
        self.with(|t| {
            if t.len() >= MAX_TRACKED && !t.contains_key(target) {
                t.retain(|_, s| s.cooling_until.is_some_and(|until| until > now));
            }
            let state = t.entry(target.to_owned()).or_default();
            state.failures = state.failures.saturating_add(1);
            state.last_failure = reason.to_owned();
            let asked = failure
                .filter(|f| f.kind == FailureKind::RateLimited)
                .and_then(|f| f.retry_after)
                .map(|d| d.min(MAX_RETRY_AFTER));
            let pause = match asked {
                Some(pause) => Some(pause),
                None if state.failures >= FAILURES_BEFORE_COOLDOWN => Some(COOLDOWN),
                None => None,
            };
            if let Some(pause) = pause {
                let until = now + pause;
                if state.cooling_until.is_none_or(|u| u <= until) {
                    state.cooling_until = Some(until);
                    state.rest_cause = Some((cause, asked.is_some()));
                }
            }
        });
    }

    /// Notes a success: the target is healthy again.
    pub fn succeeded(&self, target: &str) {
        self.with(|t| {
            // Most requests succeed on a healthy target: avoid allocating for those.
            if t.contains_key(target) {
                t.remove(target);
            }
        });
    }

    /// Every target with a recent failure.
    pub fn snapshot(&self) -> Vec<TargetHealth> {
        let now = Instant::now();
        let mut list: Vec<TargetHealth> = self.with(|t| {
            t.iter()
                .map(|(target, s)| TargetHealth {
                    target: target.clone(),
                    failures: s.failures,
                    cooling_secs: s
                        .cooling_until
                        .filter(|u| *u > now)
                        .map_or(0.0, |u| (u - now).as_secs_f64()),
                    last_failure: s.last_failure.clone(),
                })
                .collect()
        });
        list.sort_by(|a, b| a.target.cmp(&b.target));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind, retry_after: Option<u64>) -> Failure {
        Failure {
            kind,
            status: 429,
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_cools_at_once_and_expires() {
        let book = HealthBook::default();
        book.failed(
            "a:m",
            "429",
            Some(&failure(FailureKind::RateLimited, Some(5))),
            Trigger::RateLimited,
        );
        let rest = book.cooling("a:m").unwrap();
        assert_eq!((rest.cause, rest.asked), (Trigger::RateLimited, true));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(book.cooling("a:m").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_cool_and_success_heals() {
        let book = HealthBook::default();
        for _ in 0..FAILURES_BEFORE_COOLDOWN - 1 {
            book.failed(
                "a:m",
                "503",
                Some(&failure(FailureKind::Server, None)),
                Trigger::ServerError,
            );
        }
        assert!(book.cooling("a:m").is_none());
        book.failed("a:m", "503", None, Trigger::ServerError);
        assert_eq!(
            book.cooling("a:m"),
            Some(Rest {
                left: COOLDOWN,
                cause: Trigger::ServerError,
                asked: false
            })
        );
        assert_eq!(book.snapshot()[0].failures, FAILURES_BEFORE_COOLDOWN);
        book.succeeded("a:m");
        assert!(book.cooling("a:m").is_none());
        assert!(book.snapshot().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_book_forgets_targets_that_are_not_cooling_when_full() {
        let book = HealthBook::default();
        let limited = Failure {
            kind: FailureKind::RateLimited,
            status: 429,
            message: String::new(),
            retry_after: Some(Duration::from_secs(60)),
        };
        book.failed("cooling:m", "429", Some(&limited), Trigger::RateLimited);
        for i in 0..MAX_TRACKED {
            book.failed(&format!("b:model-{i}"), "503", None, Trigger::ServerError);
        }
        let tracked = book.snapshot().len();
        assert!(tracked <= MAX_TRACKED, "{tracked}");
        assert!(book.cooling("cooling:m").is_some());
    }
}
