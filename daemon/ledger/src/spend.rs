//! Spend totals for budgets, rebuilt from the ledger at start.

use rusqlite::Connection;

/// Spend of one (key, backend, model) since some time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendGroup {
    /// Proxy key name.
    pub key: Option<String>,
    /// Backend.
    pub backend: Option<String>,
    /// Upstream model.
    pub model: Option<String>,
    /// Nano-dollars.
    pub cost_nanos: i64,
}

/// Spend per (key, backend, model) of the rows in `[from_ms, to_ms)`.
pub fn spend_between(
    conn: &Connection,
    from_ms: i64,
    to_ms: i64,
) -> rusqlite::Result<Vec<SpendGroup>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, backend, model, sum(cost_nanos) FROM requests
         WHERE ts_ms >= ?1 AND ts_ms < ?2 AND cost_nanos != 0 GROUP BY key, backend, model",
    )?;
    stmt.query_map([from_ms, to_ms], |r| {
        Ok(SpendGroup {
            key: r.get(0)?,
            backend: r.get(1)?,
            model: r.get(2)?,
            cost_nanos: r.get(3)?,
        })
    })?
    .collect()
}
