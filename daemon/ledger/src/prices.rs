//! The price cache: model lists fetched from upstreams, kept across restarts.

use rusqlite::{Connection, params};

/// One model's price as stored (nano-dollars per million tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrice {
    /// Backend name.
    pub backend: String,
    /// Upstream model id.
    pub model: String,
    /// Per million input tokens.
    pub prompt_per_mtok: i64,
    /// Per million output tokens.
    pub completion_per_mtok: i64,
    /// Per million cached input tokens, when different.
    pub cached_prompt_per_mtok: Option<i64>,
    /// Per million input tokens written to the prompt cache, when different.
    pub cache_write_per_mtok: Option<i64>,
    /// Per million input tokens written to the prompt cache for an hour, when different.
    pub cache_write_1h_per_mtok: Option<i64>,
    /// Per request.
    pub request_nanos: i64,
    /// The model's largest answer, when published.
    pub max_output_tokens: Option<i64>,
    /// When the list was fetched, Unix milliseconds.
    pub fetched_ms: i64,
}

/// Replaces `backend`'s stored prices with `prices`, in one transaction.
pub fn store_prices(
    conn: &mut Connection,
    backend: &str,
    prices: &[StoredPrice],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM prices WHERE backend = ?1", [backend])?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO prices (backend, model, prompt_per_mtok, completion_per_mtok,
             cached_prompt_per_mtok, request_nanos, max_output_tokens, fetched_ms,
             cache_write_per_mtok, cache_write_1h_per_mtok)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for p in prices {
            stmt.execute(params![
                backend,
                p.model,
                p.prompt_per_mtok,
                p.completion_per_mtok,
                p.cached_prompt_per_mtok,
                p.request_nanos,
                p.max_output_tokens,
                p.fetched_ms,
                p.cache_write_per_mtok,
                p.cache_write_1h_per_mtok,
            ])?;
        }
    }
    tx.commit()
}

/// Every stored price.
pub fn load_prices(conn: &Connection) -> rusqlite::Result<Vec<StoredPrice>> {
    let mut stmt = conn.prepare(
        "SELECT backend, model, prompt_per_mtok, completion_per_mtok, cached_prompt_per_mtok,
         request_nanos, max_output_tokens, fetched_ms, cache_write_per_mtok, cache_write_1h_per_mtok
         FROM prices",
    )?;
    stmt.query_map([], |r| {
        Ok(StoredPrice {
            backend: r.get(0)?,
            model: r.get(1)?,
            prompt_per_mtok: r.get(2)?,
            completion_per_mtok: r.get(3)?,
            cached_prompt_per_mtok: r.get(4)?,
            request_nanos: r.get(5)?,
            max_output_tokens: r.get(6)?,
            fetched_ms: r.get(7)?,
            cache_write_per_mtok: r.get(8)?,
            cache_write_1h_per_mtok: r.get(9)?,
        })
    })?
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prices_round_trip_and_replace_per_backend() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::migrate(&mut conn).unwrap();
        let price = |model: &str| StoredPrice {
            backend: "openrouter".into(),
            model: model.into(),
            prompt_per_mtok: 2_500_000_000,
            completion_per_mtok: 10_000_000_000,
            cached_prompt_per_mtok: Some(37_500_000),
            cache_write_per_mtok: Some(3_125_000_000),
            cache_write_1h_per_mtok: Some(5_000_000_000),
            request_nanos: 0,
            max_output_tokens: Some(16_384),
            fetched_ms: 1,
        };
        store_prices(&mut conn, "openrouter", &[price("a"), price("b")]).unwrap();
        store_prices(&mut conn, "openrouter", &[price("c")]).unwrap();
        assert_eq!(load_prices(&conn).unwrap(), vec![price("c")]);
    }
}
