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
        assert_eq!(version(&conn).unwrap(), 2);
        let cost: i64 = conn
            .query_row(
                "SELECT cost_nanos FROM requests WHERE request_id = 'req-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cost, 42);
        assert!(columns(&conn, "prices").contains(&"fetched_ms".to_owned()));
    }

    #[test]
    fn migration_files_are_numbered_in_order() {
        for (i, (name, _)) in MIGRATIONS.iter().enumerate() {
            assert!(name.starts_with(&format!("{:04}_", i + 1)), "{name}");
        }
    }
}
