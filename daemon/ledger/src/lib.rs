//! orproxy's usage database (SQLite, WAL): one row per request, exact costs, reports.
//!
//! The daemon hands finished requests to a [`Writer`], which batches them into transactions on
//! its own thread, off the request path. Reports, spend totals and the price cache read through
//! their own connections ([`open_reader`]); WAL lets them run while the writer writes.

mod migrate;
mod packed;
mod prices;
mod report;
mod row;
mod spend;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use migrate::{MIGRATIONS, migrate, version};
pub use prices::{StoredPrice, load_prices, store_prices};
pub use report::{Group, GroupBy, Report, UsageQuery, usage};
pub use row::{Attempt, CostSource, Row};
pub use spend::{DAY_MS, SpendGroup, spend_between};
pub use writer::{COMMIT_EVERY, MAX_QUEUED, Writer, WriterStats};

/// Why the usage database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The directory holding the database cannot be created.
    #[error("{path}: cannot create the directory: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite refused to open, read or migrate the file.
    #[error("{path}: {message}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said, with a hint where one helps.
        message: String,
    },
    /// The file was written by a newer orproxy.
    #[error(
        "{path}: schema version {found} is newer than this orproxy knows ({known}); upgrade orproxy"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// The newest migration known.
        known: u32,
    },
}

/// The SQLite error type of queries.
pub use rusqlite::Error as SqlError;

impl LedgerError {
    /// An SQLite failure on `path`, with a hint for the common causes.
    pub fn sqlite(path: &Path, error: &rusqlite::Error) -> LedgerError {
        let hint = match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => {
                " (the file is not an SQLite database, or it is corrupt: move it away to start a new one)"
            }
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
                " (the database is corrupt: move it away to start a new one)"
            }
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                " (another process holds a lock on it)"
            }
            Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::PermissionDenied) => {
                " (no permission to write it)"
            }
            _ => "",
        };
        LedgerError::Sqlite {
            path: path.to_owned(),
            message: format!("{error}{hint}"),
        }
    }
}

/// Refuses a path that names something other than a regular file: SQLite would block
/// opening a FIFO until something writes to it, and cannot use a device or a directory.
fn regular_or_absent(path: &Path) -> Result<(), LedgerError> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(LedgerError::Sqlite {
            path: path.to_owned(),
            message: "not a regular file".to_owned(),
        }),
        _ => Ok(()),
    }
}

/// How long a statement waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the database at `path`, takes its write lock once and applies
/// pending migrations. The returned connection is the writer's.
pub fn open(path: &Path) -> Result<Connection, LedgerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::Directory {
            path: dir.to_owned(),
            source,
        })?;
    }
    let err = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
    regular_or_absent(path)?;
    let mut conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // WAL survives a killed process; NORMAL syncs at checkpoints, which is what WAL needs to
    // stay consistent after a crash (only an OS crash can lose the last commits).
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    // A database another process keeps locked would only show when the first row fails to
    // commit: take the write lock once now, so that the start fails with the reason instead.
    conn.execute_batch("BEGIN IMMEDIATE; COMMIT").map_err(err)?;
    migrate(&mut conn).map_err(|e| match e {
        migrate::MigrateError::Sqlite(e) => err(e),
        migrate::MigrateError::TooNew { found, known } => LedgerError::TooNew {
            path: path.to_owned(),
            found,
            known,
        },
    })?;
    Ok(conn)
}

/// Reads every page of the database looking for damage (`PRAGMA quick_check`). It takes
/// seconds per gigabyte, so the daemon runs it beside its work rather than before it; [`open`]
/// only finds a file that is not a database, or whose header or schema is damaged.
pub fn check(path: &Path) -> Result<(), LedgerError> {
    let conn = open_reader(path)?;
    // The first three problems are enough to name the damage on one line.
    let check: String = conn
        .query_row("PRAGMA quick_check(3)", [], |r| r.get(0))
        .map_err(|e| LedgerError::sqlite(path, &e))?;
    if check != "ok" {
        let found = check.lines().collect::<Vec<_>>().join("; ");
        return Err(LedgerError::Sqlite {
            path: path.to_owned(),
            message: format!(
                "integrity check failed: {found} (the database is corrupt: stop orproxy and move it away to start a new one)"
            ),
        });
    }
    Ok(())
}

/// A plain read-write connection to a database [`open`] prepared (for the price cache).
pub fn connect(path: &Path) -> Result<Connection, LedgerError> {
    regular_or_absent(path)?;
    let conn = Connection::open(path).map_err(|e| LedgerError::sqlite(path, &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| LedgerError::sqlite(path, &e))?;
    Ok(conn)
}

/// A read-only connection for reports and totals (never blocks the writer under WAL).
pub fn open_reader(path: &Path) -> Result<Connection, LedgerError> {
    let err = |e: rusqlite::Error| LedgerError::sqlite(path, &e);
    regular_or_absent(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let found = version(&conn).map_err(err)?;
    if found > migrate::latest() {
        return Err(LedgerError::TooNew {
            path: path.to_owned(),
            found,
            known: migrate::latest(),
        });
    }
    Ok(conn)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testutil {
    use super::*;

    /// A fresh database in a temporary directory that lives as long as the returned guard.
    pub fn temp_db(name: &str) -> (TempDir, PathBuf) {
        let dir = TempDir::new(name);
        let path = dir.0.join("usage.db");
        (dir, path)
    }

    /// Removes its directory when dropped.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "orproxy-ledger-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testutil::temp_db;
    use super::*;

    #[test]
    fn a_file_that_is_not_a_database_is_named_with_a_hint() {
        let (_dir, path) = temp_db("garbage");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let error = open(&path).unwrap_err().to_string();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        assert!(error.contains("not an SQLite database"), "{error}");
    }

    #[test]
    fn a_database_locked_by_another_process_is_named_with_a_hint() {
        let (_dir, path) = temp_db("locked");
        drop(open(&path).unwrap());
        let holder = connect(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = std::time::Instant::now();
        let error = open(&path).unwrap_err().to_string();
        assert!(
            started.elapsed() >= BUSY_TIMEOUT,
            "gave up before the busy timeout"
        );
        assert!(error.contains("another process holds a lock"), "{error}");
        holder.execute_batch("COMMIT").unwrap();
        assert!(open(&path).is_ok());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let (_dir, path) = temp_db("newer");
        let conn = open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let error = open(&path).unwrap_err();
        assert!(
            matches!(error, LedgerError::TooNew { found: 999, .. }),
            "{error}"
        );
        assert!(open_reader(&path).is_err());
    }
}
