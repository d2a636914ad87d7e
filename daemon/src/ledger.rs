//! The usage ledger as the daemon keeps it: the database writer, the price lists and the
//! budget book, opened at start and shared by every request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use orproxy_ledger::{DAY_MS, LedgerError, StoredPrice, Writer};
use orproxy_plugin::ModelInfo;

use crate::app::App;
use crate::budget::{self, BudgetBook, Subject};
use crate::config::BudgetPeriod;
use crate::pricing::{Listed, PriceLists};

/// Where the database lives when neither `--db` nor `database.path` says.
pub fn default_path() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd may pass several directories separated by `:`; the first is ours.
        Some(dirs) => {
            let dirs = dirs.to_string_lossy().into_owned();
            let first = dirs.split(':').next().unwrap_or_default().to_owned();
            PathBuf::from(first).join("usage.db")
        }
        None => PathBuf::from("orproxy-data").join("usage.db"),
    }
}

/// Money state shared by all requests.
#[derive(Default)]
pub struct Accounts {
    /// The database writer; `None` when running without a database.
    pub writer: Option<Writer>,
    /// The database file.
    pub path: Option<PathBuf>,
    /// Spend and reservations.
    pub budgets: Arc<BudgetBook>,
    /// Fetched model prices.
    pub prices: PriceLists,
    /// The result of the database's integrity check, once it has run.
    pub integrity: Arc<OnceLock<Result<(), String>>>,
}

impl Accounts {
    /// Opens the database at `path`, loads the price cache and rebuilds the spend.
    pub fn open(path: &Path) -> Result<Accounts, LedgerError> {
        let conn = orproxy_ledger::open(path)?;
        let sql = |e: orproxy_ledger::SqlError| LedgerError::sqlite(path, &e);
        let prices = PriceLists::default();
        let mut by_backend: HashMap<String, (HashMap<String, Listed>, i64)> = HashMap::new();
        for p in orproxy_ledger::load_prices(&conn).map_err(sql)? {
            let entry = by_backend.entry(p.backend.clone()).or_default();
            entry.1 = entry.1.max(p.fetched_ms);
            // Lists cached before negative prices were refused may still hold some.
            if let Some(listed) = listed(&p) {
                entry.0.insert(p.model.clone(), listed);
            }
        }
        for (backend, (list, fetched)) in by_backend {
            prices.set(&backend, list, fetched);
        }
        let budgets = Arc::new(BudgetBook::default());
        // Disjoint ranges of days (every window starts at a UTC midnight), so each sum lands
        // in the windows it belongs to. Days after today (a clock that was ahead, an imported
        // database) count in `total` budgets only.
        let now = budget::now_ms();
        let (month, _) = budget::window(BudgetPeriod::Month, now);
        let (day, _) = budget::window(BudgetPeriod::Day, now);
        let (month_day, today) = (month / DAY_MS, day / DAY_MS);
        for (from, to, at) in [
            (i64::MIN, month_day, 0),
            (month_day, today, month),
            (today, today + 1, now),
            (today + 1, i64::MAX, 0),
        ] {
            let groups = orproxy_ledger::spend_between(&conn, from, to).map_err(|e| {
                LedgerError::Sqlite {
                    path: path.to_owned(),
                    message: format!(
                        "cannot read the budgets' spend summary (table spend_days): {e}; to rebuild it from the request rows, stop orproxy and run: sqlite3 '{}' 'DROP TABLE IF EXISTS spend_days; PRAGMA user_version = 2'",
                        path.display()
                    ),
                }
            })?;
            for g in groups {
                let subject = Subject {
                    key: g.key,
                    backend: g.backend.unwrap_or_default(),
                    model: g.model.unwrap_or_default(),
                };
                budgets.preload(subject, g.cost_nanos, at);
            }
        }
        let writer = Writer::start(conn, path).map_err(|e| LedgerError::Sqlite {
            path: path.to_owned(),
            message: format!("cannot start the writer thread: {e}"),
        })?;
        Ok(Accounts {
            writer: Some(writer),
            path: Some(path.to_owned()),
            budgets,
            prices,
            integrity: check_in_background(path),
        })
    }

    /// Replaces `backend`'s fetched prices, in memory and in the database.
    pub fn store_prices(&self, backend: &str, models: &[ModelInfo], fetched_ms: i64) -> usize {
        let stored: Vec<StoredPrice> = models
            .iter()
            .filter_map(|m| {
                let p = m.price?.chargeable()?;
                Some(StoredPrice {
                    backend: backend.to_owned(),
                    model: m.id.clone(),
                    prompt_per_mtok: p.prompt_per_mtok,
                    completion_per_mtok: p.completion_per_mtok,
                    cached_prompt_per_mtok: p.cached_prompt_per_mtok,
                    cache_write_per_mtok: p.cache_write_prompt_per_mtok,
                    cache_write_1h_per_mtok: p.cache_write_1h_prompt_per_mtok,
                    request_nanos: p.request,
                    max_output_tokens: m.max_output_tokens.and_then(|n| i64::try_from(n).ok()),
                    fetched_ms,
                })
            })
            .collect();
        if stored.is_empty() {
            return 0;
        }
        let list = stored
            .iter()
            .filter_map(|p| Some((p.model.clone(), listed(p)?)))
            .collect();
        self.prices.set(backend, list, fetched_ms);
        if let Some(path) = &self.path {
            let saved = orproxy_ledger::connect(path)
                .map_err(|e| e.to_string())
                .and_then(|mut conn| {
                    orproxy_ledger::store_prices(&mut conn, backend, &stored)
                        .map_err(|e| e.to_string())
                });
            if let Err(error) = saved {
                tracing::warn!(message = "Cannot keep fetched prices in the database.", backend, %error);
            }
        }
        stored.len()
    }

    /// Commits every row sent so far, then stops the writer (at shutdown).
    pub fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.stop();
        }
    }
}

/// How often rows past `database.retention` are looked for (a reload applies a changed
/// retention at once).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Has the writer delete rows past `database.retention` at start and every [`PRUNE_EVERY`];
/// the retention is read from the table in force each time.
pub async fn enforce_retention(app: Arc<App>) {
    let Some(writer) = app.accounts.writer.clone() else {
        return;
    };
    let mut every = tokio::time::interval(PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(retention) = app.table.load().retention {
            prune_past(&writer, retention);
        }
    }
}

/// Applies a reloaded `database.retention` at once, `before` being the previous one: a
/// deletion under way takes the new cutoff, or stops if the retention was removed, so that
/// rows the new setting keeps are not deleted meanwhile.
pub fn retention_reloaded(app: &App, before: Option<Duration>) {
    let Some(writer) = &app.accounts.writer else {
        return;
    };
    match app.table.load().retention {
        now if now == before => {}
        Some(retention) => prune_past(writer, retention),
        None => writer.stop_pruning(),
    }
}

fn prune_past(writer: &Writer, retention: Duration) {
    let age = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let before = budget::now_ms().saturating_sub(age);
    writer.prune(before, budget::rfc3339(before));
}

/// Checks every page of the database on a thread of its own: on a large file that takes
/// seconds per gigabyte, which must not hold up the start.
fn check_in_background(path: &Path) -> Arc<OnceLock<Result<(), String>>> {
    let result = Arc::new(OnceLock::new());
    let (done, path) = (Arc::clone(&result), path.to_owned());
    let spawned = std::thread::Builder::new()
        .name("ledger-check".into())
        .spawn(move || {
            let started = Instant::now();
            let checked = orproxy_ledger::check(&path).map_err(|e| e.to_string());
            match &checked {
                Ok(()) => tracing::info!(
                    message = "Usage database checked: no damage found.",
                    path = %path.display(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                ),
                Err(error) => tracing::error!(message = "The usage database is damaged.", %error),
            }
            let _ = done.set(checked);
        });
    if let Err(error) = spawned {
        tracing::warn!(message = "Cannot start the usage database check.", %error);
        let _ = result.set(Err(format!("the check could not run: {error}")));
    }
    result
}

fn listed(p: &StoredPrice) -> Option<Listed> {
    let price = orproxy_plugin::Price {
        prompt_per_mtok: p.prompt_per_mtok,
        completion_per_mtok: p.completion_per_mtok,
        cached_prompt_per_mtok: p.cached_prompt_per_mtok,
        cache_write_prompt_per_mtok: p.cache_write_per_mtok,
        cache_write_1h_prompt_per_mtok: p.cache_write_1h_per_mtok,
        request: p.request_nanos,
    }
    .chargeable()?;
    Some(Listed {
        price,
        max_output_tokens: p.max_output_tokens.and_then(|n| u64::try_from(n).ok()),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use orproxy_rules::Host;

    #[test]
    fn restored_spend_lands_in_the_windows_of_its_days() {
        let dir = std::env::temp_dir().join(format!("orproxy-accounts-{}", std::process::id()));
        let path = dir.join("usage.db");
        let today = budget::now_ms() / DAY_MS;
        {
            let conn = orproxy_ledger::open(&path).unwrap();
            // Today; an earlier month; tomorrow and a far future day (a clock that was ahead).
            for (day, cost) in [
                (today, 1),
                (today - 40, 10),
                (today + 1, 100),
                (today + 30_000, 1000),
            ] {
                conn.execute(
                    "INSERT INTO spend_days VALUES (?1, '', 'b', 'm', ?2)",
                    [day, cost],
                )
                .unwrap();
            }
        }
        let accounts = Accounts::open(&path).unwrap();
        let spend = budget::SpendHost::new(Arc::clone(&accounts.budgets));
        assert_eq!(spend.spent_usd("global", "day"), 1e-9);
        assert_eq!(spend.spent_usd("global", "month"), 1e-9);
        assert_eq!(spend.spent_usd("global", "total"), 1111e-9);
        accounts.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn negative_prices_cached_by_an_older_version_are_not_loaded() {
        let dir = std::env::temp_dir().join(format!("orproxy-prices-{}", std::process::id()));
        let path = dir.join("usage.db");
        {
            let mut conn = orproxy_ledger::open(&path).unwrap();
            let price = |model: &str, per_mtok: i64| StoredPrice {
                backend: "openrouter".into(),
                model: model.into(),
                prompt_per_mtok: per_mtok,
                completion_per_mtok: per_mtok,
                cached_prompt_per_mtok: None,
                cache_write_per_mtok: None,
                cache_write_1h_per_mtok: None,
                request_nanos: 0,
                max_output_tokens: None,
                fetched_ms: 1,
            };
            let stored = [
                price("openrouter/auto", -1_000_000_000_000_000),
                price("cheap", 1_000),
            ];
            orproxy_ledger::store_prices(&mut conn, "openrouter", &stored).unwrap();
        }
        let accounts = Accounts::open(&path).unwrap();
        assert!(
            accounts
                .prices
                .get("openrouter", "openrouter/auto")
                .is_none()
        );
        let cheap = accounts.prices.get("openrouter", "cheap").unwrap();
        assert_eq!(cheap.price.prompt_per_mtok, 1_000);
        accounts.close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
