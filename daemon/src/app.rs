//! The daemon's shared state: the current routing table, the upstream pool, health, status.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::budget::SpendHost;
use crate::health::HealthBook;
use crate::ledger::Accounts;
use crate::models::ModelCatalog;
use crate::reload;
use crate::table::RoutingTable;
use crate::upstream::UpstreamClient;

/// State shared by every request handler.
pub struct App {
    /// The routing table; swapped whole, loaded once per request.
    pub table: ArcSwap<RoutingTable>,
    /// `limits.connect_timeout` of the pools (restart-only).
    connect_timeout: Duration,
    /// Request id source.
    pub ids: RequestIds,
    /// `/v1/models` cache.
    pub models: ModelCatalog,
    /// Cool-downs of failing targets (kept across reloads).
    pub health: HealthBook,
    /// Turns true when the shutdown grace has run out: open streams end with an error event.
    pub hard_stop: watch::Receiver<bool>,
    /// Where reload requests go (the one reload path).
    pub reloads: mpsc::Sender<reload::Request>,
    /// When the daemon started.
    pub started: Instant,
    /// The addresses actually bound (client API, admin), once listening.
    pub bound: OnceLock<(SocketAddr, SocketAddr)>,
    /// The usage database, prices and budgets.
    pub accounts: Arc<Accounts>,
    /// What rule scripts' `spent_usd` and `budget_left` read.
    pub spending: Arc<dyn orproxy_rules::Host>,
    version: AtomicU64,
    last_reload: Mutex<reload::Outcome>,
}

impl App {
    /// Builds the state around a first table.
    pub fn new(
        table: RoutingTable,
        connect_timeout: Duration,
        hard_stop: watch::Receiver<bool>,
        reloads: mpsc::Sender<reload::Request>,
        accounts: Arc<Accounts>,
    ) -> Arc<App> {
        let startup = reload::Outcome::startup(table.files.clone());
        accounts.budgets.set_rules(Arc::clone(&table.budgets));
        Arc::new(App {
            table: ArcSwap::from_pointee(table),
            connect_timeout,
            ids: RequestIds::new(),
            models: ModelCatalog::default(),
            health: HealthBook::default(),
            hard_stop,
            reloads,
            started: Instant::now(),
            bound: OnceLock::new(),
            spending: Arc::new(SpendHost::new(Arc::clone(&accounts.budgets))),
            accounts,
            version: AtomicU64::new(1),
            last_reload: Mutex::new(startup),
        })
    }

    /// The upstream pool of the calling worker thread.
    pub fn client(&self) -> UpstreamClient {
        UpstreamClient::for_this_thread(self.connect_timeout)
    }

    /// The version of the serving table (1 at startup, +1 per successful reload).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Counts a successful swap; returns the new version.
    pub fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The last reload's outcome.
    pub fn last_reload(&self) -> reload::Outcome {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a reload's outcome.
    pub fn set_last_reload(&self, outcome: reload::Outcome) {
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = outcome;
    }
}

/// Unique, cheap request ids: a random per-process prefix and a counter.
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    /// A new source with a random prefix (so ids do not repeat across restarts).
    pub fn new() -> Self {
        // RandomState is seeded from the OS: enough randomness for an id prefix, no extra crate.
        let prefix = RandomState::new().hash_one(std::process::id()) as u32;
        RequestIds {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    /// The next id, e.g. `req-5f3a9c01-000000000001`.
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Written by hand: `format!` with padding took 1,000 instructions a request.
        let mut id = String::with_capacity(32);
        id.push_str("req-");
        push_hex(&mut id, u64::from(self.prefix), 8);
        id.push('-');
        push_hex(&mut id, n, 12);
        id
    }
}

/// `value` in lowercase hex, zero-padded to `width` digits (more when it needs them), as
/// `{:0width$x}` writes it.
fn push_hex(out: &mut String, value: u64, width: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let needed = (u64::BITS - value.leading_zeros()).div_ceil(4) as usize;
    for i in (0..needed.max(width)).rev() {
        let nibble = u32::try_from(i * 4)
            .ok()
            .and_then(|shift| value.checked_shr(shift))
            .unwrap_or(0)
            & 0xf;
        out.push(char::from(DIGITS[nibble as usize]));
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), "req-".len() + 8 + 1 + 12);
        assert_eq!(a, format!("req-{:08x}-{:012x}", ids.prefix, 1));
    }

    proptest::proptest! {
        #[test]
        fn hex_is_written_as_format_writes_it(value: u64, width in 0usize..20) {
            let mut out = String::new();
            push_hex(&mut out, value, width);
            proptest::prop_assert_eq!(out, format!("{value:0width$x}"));
        }
    }
}
