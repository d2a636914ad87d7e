//! Reading the ledger: `GET /admin/usage`, `GET /admin/budgets`, `POST /admin/prices/refresh`
//! and `orproxy report` (the same report, offline, from the database file).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, StatusCode};
use orproxy_ledger::{GroupBy, Report, UsageQuery};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::budget::{days_from_civil, now_ms};
use crate::cli::{ReportArgs, ReportFormat};
use crate::models::PriceFetch;

/// Where the systemd unit's database is (`StateDirectory=orproxy`).
const SERVICE_DATABASE: &str = "/var/lib/orproxy/usage.db";

/// Query string of `GET /admin/usage`.
#[derive(Debug, Deserialize)]
pub struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    format: Option<String>,
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` (UTC) or Unix seconds into Unix milliseconds.
/// A date that does not exist (`2026-02-30`) is refused, not rolled into the next month.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let bad =
        || format!("`{text}` is not a time (use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds)");
    if let Ok(secs) = text.parse::<i64>() {
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let mut parts = date.splitn(3, '-').map(str::parse::<u32>);
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(d))) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    // Four-digit years keep the arithmetic below far from overflowing.
    if y > 9999 || !(1..=12).contains(&m) || d == 0 {
        return Err(bad());
    }
    let month_days = days_in_month(y, m);
    if d > month_days {
        return Err(format!(
            "`{text}` is not a date: {y:04}-{m:02} has {month_days} days"
        ));
    }
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let mut hms = time.splitn(3, ':').map(str::parse::<i64>);
    let (Some(Ok(h)), Some(Ok(min)), Some(Ok(s))) = (hms.next(), hms.next(), hms.next()) else {
        return Err(bad());
    };
    if h > 23 || min > 59 || s > 60 {
        return Err(bad());
    }
    Ok((days_from_civil(i64::from(y), m, d) * 86_400 + h * 3600 + min * 60 + s) * 1000)
}

/// Days of month `m` (1–12) of year `y`, Gregorian.
fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The report's parameters from the optional texts; defaults: all time, grouped by model.
fn query(
    from: Option<&str>,
    to: Option<&str>,
    group_by: Option<&str>,
) -> Result<UsageQuery, String> {
    let from_ms = from.map(parse_time).transpose()?;
    let to_ms = to.map(parse_time).transpose()?;
    check_range(from_ms, to_ms)?;
    Ok(UsageQuery {
        from_ms: from_ms.unwrap_or(i64::MIN),
        to_ms: to_ms.unwrap_or(i64::MAX),
        group_by: GroupBy::parse(group_by.unwrap_or("model"))?,
    })
}

/// A range that ends before it starts is a mistake, not an empty report.
fn check_range(from_ms: Option<i64>, to_ms: Option<i64>) -> Result<(), String> {
    match (from_ms, to_ms) {
        (Some(from), Some(to)) if from > to => {
            Err("`from` is after `to` (`to` is the end of the range, exclusive)".to_owned())
        }
        _ => Ok(()),
    }
}

fn read_report(path: &Path, query: &UsageQuery) -> Result<Report, String> {
    let conn = orproxy_ledger::open_reader(path).map_err(|e| e.to_string())?;
    orproxy_ledger::usage(&conn, query).map_err(|e| format!("{}: {e}", path.display()))
}

fn bad_request(message: String) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_query"}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// How long a report waits for the rows still queued (a healthy writer needs milliseconds).
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// On a report that leaves out rows the database refused: how many.
const ROWS_PENDING: HeaderName = HeaderName::from_static("x-orproxy-rows-pending");

/// `GET /admin/usage?from=&to=&group_by=&format=json|csv`.
pub async fn usage(
    State(app): State<Arc<App>>,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => return bad_request(format!("query string: {}", rejection.body_text())),
    };
    let query = match query(
        params.from.as_deref(),
        params.to.as_deref(),
        params.group_by.as_deref(),
    ) {
        Ok(q) => q,
        Err(message) => return bad_request(message),
    };
    let csv = match params.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return bad_request(format!("format `{other}` is not json or csv")),
    };
    // A report reads every row of its range (seconds over millions of rows): one runs at a
    // time, so that dashboards polling this route cannot take every core from the proxy.
    static RUNNING: Semaphore = Semaphore::const_new(1);
    let Ok(turn) = RUNNING.acquire().await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let accounts = Arc::clone(&app.accounts);
    let report = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let path = accounts
            .path
            .as_deref()
            .ok_or("no usage database is open")?;
        // Rows of requests already answered may still be queued: include them, unless the
        // database refuses them; the report then says how many it leaves out.
        let pending = match &accounts.writer {
            Some(writer) if !writer.flush_within(FLUSH_WAIT) => writer
                .stats()
                .queued
                .load(std::sync::atomic::Ordering::Relaxed),
            _ => 0,
        };
        read_report(path, &query).map(|report| (report, pending))
    })
    .await;
    match report {
        Ok(Ok((report, pending))) => {
            let mut response = if csv {
                ([(CONTENT_TYPE, "text/csv; charset=utf-8")], report.to_csv()).into_response()
            } else if pending > 0 {
                let mut body = serde_json::to_value(&report).unwrap_or_default();
                body["rows_pending"] = json!(pending);
                body["warning"] = json!(format!(
                    "{pending} rows of answered requests are still waiting to be written to the usage database and are not counted here (see ledger in /admin/status)"
                ));
                Json(body).into_response()
            } else {
                Json(report).into_response()
            };
            if pending > 0 {
                response
                    .headers_mut()
                    .insert(ROWS_PENDING, HeaderValue::from(pending));
            }
            response
        }
        Ok(Err(message)) => {
            let body = json!({"error": {"message": message, "type": "server_error", "code": "ledger_unavailable"}});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /admin/budgets`.
pub async fn budgets(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "budgets": app.accounts.budgets.status(now_ms()) })).into_response()
}

/// `POST /admin/prices/refresh`: fetches every backend's price list now. 502 when any list could
/// not be fetched (the body names each and why; the prices known before are kept).
pub async fn refresh_prices(State(app): State<Arc<App>>) -> Response {
    let mut fetched = Vec::new();
    let mut failed = Vec::new();
    for (backend, outcome) in crate::models::refresh_prices(&app, true).await {
        match outcome {
            PriceFetch::Priced(models) => {
                fetched.push(json!({"backend": backend, "models": models}))
            }
            PriceFetch::Failed(error) => failed.push(json!({"backend": backend, "error": error})),
        }
    }
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    (
        status,
        Json(json!({ "fetched": fetched, "failed": failed })),
    )
        .into_response()
}

/// `orproxy report`: the usage report from the database file, offline.
pub fn run(args: &ReportArgs) -> ExitCode {
    let path = args.db.clone().unwrap_or_else(|| {
        let sources = crate::config::Sources::resolve(args.config.as_deref(), None);
        crate::config::load(&sources)
            .ok()
            .and_then(|(config, _)| config.database?.value.path.map(|p| p.value.into()))
            .unwrap_or_else(|| {
                // An operator's shell has no $STATE_DIRECTORY: find the service's database.
                let default = crate::ledger::default_path();
                let service = std::path::Path::new(SERVICE_DATABASE);
                if !default.exists() && service.exists() {
                    service.to_owned()
                } else {
                    default
                }
            })
    });
    if let Err(message) = check_range(args.from, args.to) {
        eprintln!("orproxy report: {message}");
        return ExitCode::from(2);
    }
    let query = UsageQuery {
        from_ms: args.from.unwrap_or(i64::MIN),
        to_ms: args.to.unwrap_or(i64::MAX),
        group_by: args.group_by.clone(),
    };
    let report = read_report(&path, &query);
    match report {
        Ok(report) => {
            let text = match args.format {
                ReportFormat::Table => report.to_table(),
                ReportFormat::Csv => report.to_csv(),
                ReportFormat::Json => {
                    serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
                }
            };
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("orproxy report: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_that_ends_before_it_starts_is_refused() {
        let error = query(Some("2026-11-25"), Some("2026-11-24"), None).unwrap_err();
        assert!(error.contains("`from` is after `to`"), "{error}");
        assert!(query(Some("2026-11-24"), Some("2026-11-24"), None).is_ok());
        assert!(query(Some("2026-11-25"), None, None).is_ok());
    }

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_time("2025-11-24T01:02:03Z"), Ok(1_763_946_123_000));
        assert_eq!(parse_time("1763946123"), Ok(1_763_946_123_000));
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").unwrap_err().contains("YYYY-MM-DD"));
    }

    #[test]
    fn dates_that_do_not_exist_are_refused() {
        for text in [
            "2026-02-30",
            "2026-04-31",
            "2025-02-29",
            "1900-02-29",
            "2026-02-29T00:00:00Z",
            "2026-01-00",
            "2026-01-32",
        ] {
            let error = parse_time(text).unwrap_err();
            assert!(error.contains(&format!("`{text}`")), "{error}");
        }
        assert!(
            parse_time("2026-02-30")
                .unwrap_err()
                .contains("has 28 days")
        );
        // The last day of each month, leap days included, still parses.
        assert_eq!(parse_time("2024-02-29"), Ok(1_709_164_800_000));
        assert_eq!(parse_time("2000-02-29"), Ok(951_782_400_000));
        assert_eq!(parse_time("2026-04-30"), Ok(1_777_507_200_000));
        assert_eq!(parse_time("2026-12-31T23:59:59Z"), Ok(1_798_761_599_000));
        assert!(parse_time("99999-01-01").is_err());
    }
}
