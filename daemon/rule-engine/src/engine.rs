//! The one place every Rhai limit is set, and the helpers scripts may call.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regex::Regex;
use rhai::{Dynamic, Engine, Map};

use crate::request;

/// Limits of one script run.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    /// Rhai operations per hook call (a loop iteration, a call, an operator... each count).
    pub max_operations: u64,
    /// Wall-clock time per hook call, checked as operations run.
    pub deadline: Duration,
    /// Nested function calls.
    pub max_call_levels: usize,
    /// Nesting of expressions (global, in functions).
    pub max_expr_depth: usize,
    /// Longest string a script may build, in bytes.
    pub max_string_size: usize,
    /// Largest array or map.
    pub max_collection_size: usize,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            max_operations: 100_000,
            deadline: Duration::from_millis(50),
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 64 * 1024,
            max_collection_size: 10_000,
        }
    }
}

/// What scripts may ask the daemon (spend so far, budgets left).
pub trait Host: Send + Sync {
    /// USD spent in a scope (`global`, `key`, `backend`, `model`) over a period (`day`,
    /// `month`, `total`), for the current request's key, backend or model.
    fn spent_usd(&self, scope: &str, period: &str) -> f64;
    /// USD left in the named budget ([`UNLIMITED`] when the budget does not exist).
    fn budget_left(&self, name: &str) -> f64;
    /// A host answering for one request's key, backend and model; `None`: this one does.
    fn for_request(
        &self,
        _key: Option<&str>,
        _backend: &str,
        _model: &str,
    ) -> Option<Arc<dyn Host>> {
        None
    }
}

/// What `budget_left` answers for a budget that does not exist. Finite on purpose: Rhai's
/// float comparisons do not order infinity.
pub const UNLIMITED: f64 = 1.0e15;

/// A host that knows of no spending: every budget is untouched.
pub struct NoLedger;

impl Host for NoLedger {
    fn spent_usd(&self, _scope: &str, _period: &str) -> f64 {
        0.0
    }

    fn budget_left(&self, _name: &str) -> f64 {
        UNLIMITED
    }
}

thread_local! {
    /// The host of the run in progress on this thread (scripts run synchronously).
    static HOST: RefCell<Option<Arc<dyn Host>>> = const { RefCell::new(None) };
    /// The wall-clock limit of the hook running on this thread.
    static DEADLINE: Cell<Deadline> = const { Cell::new(Deadline::None) };
    /// The clock scripts see (tests pin it).
    static CLOCK: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Sets the host and clock for the duration of `f` on this thread ([`start_deadline`] before
/// each script).
pub fn with_run<T>(host: Arc<dyn Host>, clock: Option<i64>, f: impl FnOnce() -> T) -> T {
    HOST.with(|h| *h.borrow_mut() = Some(host));
    CLOCK.with(|c| c.set(clock));
    let out = f();
    HOST.with(|h| *h.borrow_mut() = None);
    DEADLINE.with(|d| d.set(Deadline::None));
    CLOCK.with(|c| c.set(None));
    out
}

fn host<T>(f: impl FnOnce(&dyn Host) -> T, default: T) -> T {
    HOST.with(|h| h.borrow().as_deref().map(f))
        .unwrap_or(default)
}

/// A hook's wall-clock limit. The clock is first read at the first check, after
/// [`DEADLINE_CHECK_EVERY`] operations: most hooks end before that and never read it, and the
/// few microseconds those operations take are nothing against a limit in milliseconds.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    None,
    After(Duration),
    At(Instant),
}

/// Gives the script about to run `limit` of wall-clock time.
pub fn start_deadline(limit: Duration) {
    DEADLINE.with(|d| d.set(Deadline::After(limit)));
}

/// Whether the running hook is past its deadline (starting the clock at the first look).
fn past_deadline() -> bool {
    DEADLINE.with(|d| match d.get() {
        Deadline::None => false,
        Deadline::After(limit) => {
            d.set(Deadline::At(Instant::now() + limit));
            false
        }
        Deadline::At(deadline) => Instant::now() >= deadline,
    })
}

/// How many operations run between two looks at the clock.
const DEADLINE_CHECK_EVERY: u64 = 256;

/// Fails the running hook if it is past its deadline. Helpers that can take long in one call
/// (regex work on a long string) look before they run: a few hundred such calls fit inside the
/// operation count between two [`DEADLINE_CHECK_EVERY`] checks.
fn check_deadline() -> Result<(), Box<rhai::EvalAltResult>> {
    if past_deadline() {
        Err(rhai::EvalAltResult::ErrorTerminated("deadline".into(), rhai::Position::NONE).into())
    } else {
        Ok(())
    }
}

/// The largest compiled regex a script may build. A counted repetition of a Unicode class
/// (`\w{100}`) compiles to megabytes, takes tens of milliseconds to build and as long to search
/// with a cold cache; at this size a build takes a few milliseconds and a search of the longest
/// string a script can hold well under one.
const REGEX_SIZE_LIMIT: usize = 1024 * 1024;

/// Builds an engine with every limit set, no modules, no `eval`, and the script API registered.
pub fn harden(limits: &Sandbox) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_levels);
    engine.set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_collection_size);
    engine.set_max_map_size(limits.max_collection_size);
    engine.set_max_variables(1_000);
    engine.set_max_functions(1_000);
    // `eval` would let a script compile code past every check made at load time.
    engine.disable_symbol("eval");
    engine.set_strict_variables(true);
    engine.on_progress(|operations| {
        // Reading the clock on every operation would cost a fifth of a typical run; a few
        // hundred operations take microseconds, far inside any deadline.
        if operations % DEADLINE_CHECK_EVERY != 0 {
            return None;
        }
        past_deadline().then(|| Dynamic::from("deadline"))
    });
    // Scripts have no stdout: `print` and `debug` would only be noise in the daemon's output.
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    request::register(&mut engine);
    register_helpers(&mut engine);
    engine
}

fn unix_now() -> i64 {
    CLOCK.with(Cell::get).unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    })
}

/// `now()`: the current UTC time as `#{unix, year, month, day, hour, minute, weekday}`
/// (`weekday` 1 = Monday … 7 = Sunday).
fn now() -> Map {
    let unix = unix_now();
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) + 1;
    let mut map = Map::new();
    map.insert("unix".into(), Dynamic::from(unix));
    map.insert("year".into(), Dynamic::from(year));
    map.insert("month".into(), Dynamic::from(month));
    map.insert("day".into(), Dynamic::from(day));
    map.insert("hour".into(), Dynamic::from(secs / 3600));
    map.insert("minute".into(), Dynamic::from(secs % 3600 / 60));
    map.insert("weekday".into(), Dynamic::from(weekday));
    map
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// How many compiled regexes are kept. Scripts use a few constant patterns; one building
/// patterns from input must not grow the cache (each entry can be a megabyte).
const REGEX_CACHE_ENTRIES: usize = 128;

/// Compiled regexes, shared by all scripts (patterns in scripts are usually constants). Checks
/// the hook's deadline first: every regex helper goes through here. The regex is shared, not
/// cloned: a clone starts with empty search caches, and rebuilding them is most of a search's
/// cost for a large pattern.
fn regex(pattern: &str) -> Result<Arc<Regex>, Box<rhai::EvalAltResult>> {
    check_deadline()?;
    static CACHE: Mutex<Option<HashMap<String, Arc<Regex>>>> = Mutex::new(None);
    if let Some(re) = CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|cache| cache.get(pattern))
    {
        return Ok(Arc::clone(re));
    }
    // Built outside the lock: other scripts' lookups do not wait for a large pattern.
    let re = regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(Arc::new)
        .map_err(|e| format!("invalid regex `{pattern}`: {}", one_line(&e.to_string())))?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() < REGEX_CACHE_ENTRIES {
        cache.insert(pattern.to_owned(), Arc::clone(&re));
    }
    Ok(re)
}

/// The regex crate's messages draw a caret diagram over several lines; errors here are one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

fn register_helpers(engine: &mut Engine) {
    engine.register_fn("now", now);
    engine.register_fn("spent_usd", |scope: &str, period: &str| {
        host(|h| h.spent_usd(scope, period), 0.0)
    });
    engine.register_fn("budget_left", |name: &str| {
        host(|h| h.budget_left(name), UNLIMITED)
    });
    // A search cannot be interrupted: each helper also looks at the clock after it, so that a
    // search that overran the deadline fails the hook instead of letting it carry on.
    engine.register_fn(
        "matches",
        |text: &str, pattern: &str| -> Result<bool, Box<rhai::EvalAltResult>> {
            let found = regex(pattern)?.is_match(text);
            check_deadline()?;
            Ok(found)
        },
    );
    engine.register_fn(
        "regex_replace",
        |text: &str,
         pattern: &str,
         replacement: &str|
         -> Result<String, Box<rhai::EvalAltResult>> {
            let replaced = regex(pattern)?.replace_all(text, replacement).into_owned();
            check_deadline()?;
            Ok(replaced)
        },
    );
    engine.register_fn(
        "captures",
        |text: &str, pattern: &str| -> Result<rhai::Array, Box<rhai::EvalAltResult>> {
            let re = regex(pattern)?;
            let groups = re
                .captures(text)
                .map(|c| {
                    c.iter()
                        .map(|m| Dynamic::from(m.map_or(String::new(), |m| m.as_str().to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            check_deadline()?;
            Ok(groups)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-11-23 is day 20_780.
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn now_has_the_fields_scripts_use() {
        let map = with_run(Arc::new(NoLedger), Some(1_795_478_400), now);
        // 2026-11-24T00:00:00Z, a Tuesday.
        assert_eq!(map["hour"].as_int().unwrap(), 0);
        assert_eq!(map["weekday"].as_int().unwrap(), 2);
        assert_eq!(map["day"].as_int().unwrap(), 24);
    }
}
