//! systemd integration: readiness, reload and stop notifications, status line, watchdog.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is not set (not started by systemd), so the
//! daemon behaves the same everywhere else.

use std::time::Duration;

use sd_notify::NotifyState;

/// `READY=1` with a status line: sent once both listeners are bound and the table is loaded,
/// and again after each reload.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with the monotonic timestamp systemd asks for) before a reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("Reloading the routing table."),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1` when the drain starts.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("Draining in-flight requests."),
    ]);
}

/// Pings the watchdog at half its period, if `WatchdogSec` is set, for as long as the runtime
/// keeps this task running (a stuck runtime stops the pings, and systemd restarts us).
pub async fn watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut ticker = tokio::time::interval((period / 2).max(Duration::from_millis(100)));
    loop {
        ticker.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(message = "Cannot notify systemd.", %error);
    }
}
