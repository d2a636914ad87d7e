//! The daemon's shared state: the current routing table, the upstream pool, request ids.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::models::ModelCatalog;
use crate::table::RoutingTable;
use crate::upstream::UpstreamClient;

/// State shared by every request handler.
pub struct App {
    /// The routing table; swapped whole, loaded once per request.
    pub table: ArcSwap<RoutingTable>,
    /// The upstream connection pool.
    pub client: UpstreamClient,
    /// Request id source.
    pub ids: RequestIds,
    /// `/v1/models` cache.
    pub models: ModelCatalog,
    /// Turns true when the shutdown grace has run out: open streams end with an error event.
    pub hard_stop: watch::Receiver<bool>,
}

impl App {
    /// Builds the state around a first table.
    pub fn new(
        table: RoutingTable,
        client: UpstreamClient,
        hard_stop: watch::Receiver<bool>,
    ) -> Arc<App> {
        Arc::new(App {
            table: ArcSwap::from_pointee(table),
            client,
            ids: RequestIds::new(),
            models: ModelCatalog::default(),
            hard_stop,
        })
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
        format!("req-{:08x}-{:012x}", self.prefix, n)
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
    }
}
