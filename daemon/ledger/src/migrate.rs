//! Numbered schema migrations (`schemas/migrations/NNNN_*.sql`), tracked in `PRAGMA user_version`.

use rusqlite::Connection;

/// Every migration in order; migration `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_requests.sql",
        include_str!("../../../schemas/migrations/0001_requests.sql"),
    ),
    (
        "0002_prices.sql",
        include_str!("../../../schemas/migrations/0002_prices.sql"),
    ),
    (
        "0003_spend_days.sql",
        include_str!("../../../schemas/migrations/0003_spend_days.sql"),
    ),
    (
        "0004_cache_write_prices.sql",
        include_str!("../../../schemas/migrations/0004_cache_write_prices.sql"),
    ),
];

/// The schema version this build writes.
pub fn latest() -> u32 {
    MIGRATIONS.len() as u32
}

/// Why migrating failed.
#[derive(Debug)]
pub enum MigrateError {
    /// SQLite failed.
    Sqlite(rusqlite::Error),
    /// The file is from a newer orproxy.
    TooNew {
        /// Its version.
        found: u32,
        /// Ours.
        known: u32,
    },
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

/// The schema version of an open database (0 for an empty one).
pub fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Applies every migration above the database's version, each in its own transaction with
/// its version bump, so a crash mid-way leaves a consistent earlier version.
pub fn migrate(conn: &mut Connection) -> Result<u32, MigrateError> {
    let found = version(conn)?;
    if found > latest() {
        return Err(MigrateError::TooNew {
            found,
            known: latest(),
        });
    }
    if found > 0 && found < latest() {
        // Some migrations go over every row once: say why a large database takes a while.
        tracing::info!(
            message = "Upgrading the usage database schema.",
            from = found,
            to = latest()
        );
    }
    for (index, (_, sql)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as u32 + 1)?;
        tx.commit()?;
    }
    Ok(latest())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn columns(conn: &Connection, table: &str) -> Vec<String> {
        let mut stmt = conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn an_empty_database_gets_every_migration() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), latest());
        assert_eq!(version(&conn).unwrap(), latest());
        assert!(columns(&conn, "requests").contains(&"cost_source".to_owned()));
        assert!(columns(&conn, "prices").contains(&"prompt_per_mtok".to_owned()));
        // Running again is a no-op.
        assert_eq!(migrate(&mut conn).unwrap(), latest());
    }

    #[test]
    fn the_previous_version_is_upgraded_and_keeps_its_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0].1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO requests (ts_ms, request_id, status, outcome, stream, cost_nanos, cost_source, latency_us, attempts)
             VALUES (1, 'req-1', 200, 'ok', 0, 42, 'upstream', 10, '[]')",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), latest());
        let cost: i64 = conn
            .query_row(
                "SELECT cost_nanos FROM requests WHERE request_id = 'req-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cost, 42);
        assert!(columns(&conn, "prices").contains(&"fetched_ms".to_owned()));
        assert!(columns(&conn, "prices").contains(&"cache_write_per_mtok".to_owned()));
    }

    #[test]
    fn stored_prices_are_kept_and_fetched_again_for_their_cache_write_price() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (_, sql) in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO prices (backend, model, prompt_per_mtok, completion_per_mtok, fetched_ms)
             VALUES ('openrouter', 'm', 1, 2, 3)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let prices = crate::load_prices(&conn).unwrap();
        let kept = &prices[0];
        assert_eq!(
            (prices.len(), kept.cache_write_per_mtok, kept.fetched_ms),
            (1, None, 0),
            "kept, and due for a fetch that brings the new price"
        );
    }

    #[test]
    fn the_spend_summary_is_built_from_the_rows_already_there() {
        let mut conn = Connection::open_in_memory().unwrap();
        for (_, sql) in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        let day = 86_400_000;
        for (i, (ts, key, cost)) in [
            (5, Some("a"), 10),
            (day - 1, Some("a"), 5),
            (day, Some("a"), 7),
            (day + 5, None, 3),
            (day + 6, None, 0),
        ]
        .into_iter()
        .enumerate()
        {
            conn.execute(
                "INSERT INTO requests (ts_ms, request_id, key, backend, model, status, outcome, stream, cost_nanos, cost_source, latency_us, attempts)
                 VALUES (?1, ?2, ?3, 'b', 'm', 200, 'ok', 0, ?4, 'upstream', 10, '[]')",
                rusqlite::params![ts, format!("req-{i}"), key, cost],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let mut stmt = conn
            .prepare("SELECT day, key, cost_nanos FROM spend_days ORDER BY day, key")
            .unwrap();
        let days: Vec<(i64, String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            days,
            [
                (0, "a".to_owned(), 15),
                (1, String::new(), 3),
                (1, "a".to_owned(), 7)
            ]
        );
    }

    #[test]
    fn migration_files_are_numbered_in_order() {
        for (i, (name, _)) in MIGRATIONS.iter().enumerate() {
            assert!(name.starts_with(&format!("{:04}_", i + 1)), "{name}");
        }
    }
}
