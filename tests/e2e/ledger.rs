//! The usage ledger: one row per request with the upstream's exact cost, flushed on SIGTERM,
//! intact after SIGKILL, reported by `/admin/usage` and `orproxy report`.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use orproxy_plugin::usage::usd_to_nanos;
use orproxy_testkit::{BillingEntry, FakeOpenRouter};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::harness::{
    Daemon, Options, chat, client, command, daemon_for, events, temp_dir, temp_file,
};
use crate::streaming::wait_until;

/// One row of `requests`, as the tests look at it.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub request_id: String,
    pub key: Option<String>,
    pub backend: Option<String>,
    pub model: Option<String>,
    pub status: i64,
    pub outcome: String,
    pub stream: bool,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cost_nanos: i64,
    pub cost_source: String,
    pub attempts: Value,
    pub error: Option<String>,
    pub model_served: Option<String>,
}

/// Every row of the database at `db`, in insertion order.
pub fn rows(db: &Path) -> Vec<StoredRow> {
    let conn = orproxy_ledger::open_reader(db)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", db.display()));
    let mut stmt = conn
        .prepare(
            "SELECT request_id, key, backend, model, status, outcome, stream, prompt_tokens,
             completion_tokens, cost_nanos, cost_source, attempts, error, model_served
             FROM requests ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let attempts: String = r.get(11)?;
        Ok(StoredRow {
            request_id: r.get(0)?,
            key: r.get(1)?,
            backend: r.get(2)?,
            model: r.get(3)?,
            status: r.get(4)?,
            outcome: r.get(5)?,
            stream: r.get::<_, i64>(6)? != 0,
            prompt_tokens: r.get(7)?,
            completion_tokens: r.get(8)?,
            cost_nanos: r.get(9)?,
            cost_source: r.get(10)?,
            attempts: serde_json::from_str(&attempts).unwrap_or(Value::Null),
            error: r.get(12)?,
            model_served: r.get(13)?,
        })
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

/// The daemon's default database (in its `$STATE_DIRECTORY`).
pub fn default_db(daemon: &Daemon) -> PathBuf {
    daemon.state_dir.join("usage.db")
}

/// `GET /admin/usage?QUERY` as JSON (the daemon flushes its writer first).
pub async fn usage(daemon: &Daemon, query: &str) -> Value {
    let response = client()
        .get(daemon.admin_url(&format!("/admin/usage?{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Rows of a running daemon's database at `db`, after its writer has flushed.
pub async fn flushed_rows(daemon: &Daemon, db: &Path) -> Vec<StoredRow> {
    usage(daemon, "group_by=model").await;
    rows(db)
}

/// The row of request `id`.
pub fn row_of<'a>(rows: &'a [StoredRow], id: &str) -> &'a StoredRow {
    rows.iter()
        .find(|r| r.request_id == id)
        .unwrap_or_else(|| panic!("no row for request {id}: {rows:#?}"))
}

/// The `x-orproxy-request-id` of a response.
pub fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// POSTs a chat completion to the daemon.
pub async fn post(daemon: &Daemon, body: &Value) -> reqwest::Response {
    client()
        .post(daemon.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Waits until request `id` has its "Request finished." log line. Polled, not waited on:
/// the fake upstreams of these tests run on the test's own runtime.
pub async fn request_finished(daemon: &Daemon, id: &str) {
    let finished = format!("\"request_id\":\"{id}\"");
    wait_until(|| {
        daemon
            .logs()
            .iter()
            .any(|l| l.contains(&finished) && l.contains("Request finished."))
    })
    .await;
}

/// Nano-dollars of a billing entry.
pub fn billed_nanos(entry: &BillingEntry) -> i64 {
    usd_to_nanos(&entry.cost).unwrap_or_else(|| panic!("unparsable cost {entry:?}"))
}

/// Runs `cmd` to completion (failing the test after 30 s); returns its status, stdout, stderr.
pub fn run(cmd: &mut Command) -> (ExitStatus, String, String) {
    let dir = temp_dir();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .expect("spawn orproxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command did not exit: {cmd:?}\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let result = (status, read(&out), read(&err));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `orproxy report --db DB ARGS...`.
pub fn report(db: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    run(command().arg("report").arg("--db").arg(db).args(args))
}

/// `orproxy report --db DB --format json --group-by GROUP`, parsed; the command must succeed.
pub fn report_json(db: &Path, group_by: &str) -> Value {
    let (status, stdout, stderr) = report(db, &["--format", "json", "--group-by", group_by]);
    assert!(status.success(), "orproxy report failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A fresh directory for a database the test controls (the daemon's own goes with it).
fn db_in_temp_dir() -> (PathBuf, PathBuf) {
    let dir = temp_dir();
    let db = dir.join("usage.db");
    (dir, db)
}

/// Sends `n` mock requests, `parallel` at a time; returns their request ids and the instant
/// the last answer arrived.
async fn mock_burst(daemon: &Daemon, n: usize, parallel: usize) -> (Vec<String>, Instant) {
    let http = client();
    let url = daemon.url("/v1/chat/completions");
    let mut ids = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    for i in 0..n {
        if set.len() >= parallel {
            ids.push(set.join_next().await.unwrap().unwrap());
        }
        let (http, url) = (http.clone(), url.clone());
        set.spawn(async move {
            let response = http
                .post(url)
                .json(&chat("mock", &format!("request {i}"), i % 2 == 0))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let id = request_id(&response);
            // Read the whole answer: the request counts as answered once the body is in.
            response.bytes().await.unwrap();
            id
        });
    }
    while let Some(id) = set.join_next().await {
        ids.push(id.unwrap());
    }
    (ids, Instant::now())
}

/// Streamed and non-streamed answers are recorded with the upstream's cost, exactly: the
/// usage report's totals equal the fake OpenRouter's billing log to the nano-dollar.
#[tokio::test]
async fn usage_totals_equal_the_upstream_bill_exactly() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let asks = [
        ("openai/gpt-4o", "hello world", false),
        ("anthropic/claude-3-5-sonnet", "what does it cost", false),
        ("fake/echo", "one two three four five", false),
        ("openai/gpt-4o", "streamed answer please", true),
        ("google/gemini-2.5-flash", "another stream", true),
    ];
    let mut ids = Vec::new();
    for (model, text, stream) in asks {
        let response = post(&daemon, &chat(model, text, stream)).await;
        assert_eq!(response.status(), 200, "{model}");
        ids.push(request_id(&response));
        if stream {
            let (got, error) = events(response).await;
            assert_eq!(error, None);
            assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n");
        } else {
            response.bytes().await.unwrap();
        }
    }
    let billing = fake.billing();
    assert_eq!(billing.len(), asks.len(), "{billing:?}");
    let billed: i64 = billing.iter().map(billed_nanos).sum();
    assert!(billed > 0);

    let report = usage(&daemon, "group_by=model&format=json").await;
    let total = &report["total"];
    assert_eq!(report["group_by"], "model");
    assert_eq!(total["requests"], 5);
    assert_eq!(total["errors"], 0);
    assert_eq!(total["cost_nanos"].as_i64(), Some(billed), "{report:#}");
    assert_eq!(
        total["cost_usd"],
        orproxy_plugin::usage::format_usd(billed),
        "{report:#}"
    );
    let tokens_in: u64 = billing.iter().map(|b| b.prompt_tokens).sum();
    let tokens_out: u64 = billing.iter().map(|b| b.completion_tokens).sum();
    assert_eq!(total["tokens_in"], tokens_in);
    assert_eq!(total["tokens_out"], tokens_out);
    // Per model, too.
    let gpt = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "openai/gpt-4o")
        .unwrap_or_else(|| panic!("{report:#}"));
    let gpt_billed: i64 = billing
        .iter()
        .filter(|b| b.model == "openai/gpt-4o")
        .map(billed_nanos)
        .sum();
    assert_eq!(gpt["requests"], 2);
    assert_eq!(gpt["cost_nanos"].as_i64(), Some(gpt_billed));
    assert_eq!(report["groups"].as_array().unwrap().len(), 4);

    // Row by row: the upstream's cost, the tokens it reported, outcome ok.
    let stored = rows(&default_db(&daemon));
    assert_eq!(stored.len(), asks.len(), "{stored:#?}");
    for (id, (model, _, stream)) in ids.iter().zip(asks) {
        let row = row_of(&stored, id);
        assert_eq!(row.outcome, "ok", "{row:?}");
        assert_eq!(row.status, 200);
        assert_eq!(row.stream, stream);
        assert_eq!(row.backend.as_deref(), Some("openrouter"));
        assert_eq!(row.model.as_deref(), Some(model));
        assert_eq!(row.cost_source, "upstream", "{row:?}");
        let bill = billing
            .iter()
            .find(|b| {
                b.model == model
                    && Some(b.prompt_tokens as i64) == row.prompt_tokens
                    && Some(b.completion_tokens as i64) == row.completion_tokens
                    && billed_nanos(b) == row.cost_nanos
            })
            .unwrap_or_else(|| panic!("no billing entry matches {row:?} in {billing:?}"));
        assert!(bill.id.starts_with("gen-"));
    }
}

/// Failed requests are rows too, each with its outcome and the status the client got: a
/// stream broken by an in-band error, an upstream 429 and an upstream 402.
#[tokio::test]
async fn failures_are_recorded_with_their_outcome_and_status() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");

    let midstream = post(&daemon, &chat("fake/midstream-error", "a b c d e f", true)).await;
    assert_eq!(midstream.status(), 200);
    let midstream_id = request_id(&midstream);
    let (got, _) = events(midstream).await;
    assert!(got.iter().any(|(_, e)| e.contains("error")), "{got:?}");

    let limited = post(&daemon, &chat("fake/status-429-retry-1", "x", false)).await;
    assert_eq!(limited.status(), 429);
    let limited_id = request_id(&limited);
    let payment = post(&daemon, &chat("fake/status-402", "x", false)).await;
    assert_eq!(payment.status(), 402);
    let payment_id = request_id(&payment);
    let fine = post(&daemon, &chat("fake/echo", "x", false)).await;
    assert_eq!(fine.status(), 200);
    let fine_id = request_id(&fine);

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(stored.len(), 4, "one row per request: {stored:#?}");
    let row = row_of(&stored, &midstream_id);
    assert_eq!(
        (row.outcome.as_str(), row.status, row.stream),
        ("midstream_error", 200, true),
        "{row:?}"
    );
    assert_eq!(row.model.as_deref(), Some("fake/midstream-error"));
    let row = row_of(&stored, &limited_id);
    assert_eq!(
        (row.outcome.as_str(), row.status),
        ("upstream_error", 429),
        "{row:?}"
    );
    assert!(!row.stream);
    assert_eq!(row.cost_nanos, 0, "nothing was billed: {row:?}");
    assert!(row.error.is_some(), "the failure is described: {row:?}");
    let row = row_of(&stored, &payment_id);
    assert_eq!(
        (row.outcome.as_str(), row.status),
        ("upstream_error", 402),
        "{row:?}"
    );
    assert_eq!(row.attempts.as_array().map(Vec::len), Some(1), "{row:?}");
    let row = row_of(&stored, &fine_id);
    assert_eq!((row.outcome.as_str(), row.status), ("ok", 200));

    let report = usage(&daemon, "group_by=backend").await;
    assert_eq!(report["total"]["requests"], 4);
    assert_eq!(report["total"]["errors"], 3, "{report:#}");
}

/// `pricing:` for the fake's `fake/...` models (USD 1 / 2 per million tokens), so that what a
/// cut stream relayed can be priced.
const FAKE_PRICING: &str = "pricing:\n  - { match: \"^openrouter:fake/\", input_usd_per_mtok: 1, output_usd_per_mtok: 2 }\n";

/// Starts a stream of `model` and reads until its first content arrived; returns the response
/// (to read on or drop), its request id and the estimate of its prompt the daemon makes.
async fn stream_until_content(daemon: &Daemon, model: &str) -> (reqwest::Response, String, i64) {
    let body = chat(model, "one two three four five six seven eight", true);
    let prompt = (serde_json::to_string(&body["messages"]).unwrap().len() / 4) as i64;
    let mut response = post(daemon, &body).await;
    assert_eq!(response.status(), 200, "{model}");
    let id = request_id(&response);
    let mut seen = String::new();
    let has_content = |sse: &str| {
        sse.split("\"content\":\"")
            .skip(1)
            .any(|rest| !rest.starts_with('"'))
    };
    while !has_content(&seen) {
        let chunk = response
            .chunk()
            .await
            .unwrap()
            .expect("content before the end");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (response, id, prompt)
}

/// The row of a stream cut short after `relayed` content events: committed (200), the attempt
/// that served listed with `result`, the served model named, and what was relayed priced
/// (the prompt estimate and one token per content event) as an estimate.
fn assert_cut_short(row: &StoredRow, route: &str, result: &str, prompt: i64, relayed: i64) {
    assert_eq!(row.status, 200, "{row:?}");
    let attempts = row.attempts.as_array().unwrap_or_else(|| panic!("{row:?}"));
    assert_eq!(attempts.len(), 1, "{row:?}");
    assert_eq!(attempts[0]["route"], route, "{row:?}");
    let got = attempts[0]["result"].as_str().unwrap_or_default();
    assert!(got.starts_with(result), "{result} expected: {row:?}");
    assert!(row.model_served.is_some(), "{row:?}");
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (Some(prompt), Some(relayed)),
        "{row:?}"
    );
    assert_eq!(row.cost_source, "estimate", "{row:?}");
    assert_eq!(row.cost_nanos, prompt * 1_000 + relayed * 2_000, "{row:?}");
}

/// A stream that ends abnormally after content is recorded like any other: the attempt that
/// served and how it ended, the model served, and the tokens relayed priced as an estimate
/// (so budgets count them) — whether the upstream cut it, stalled, or the client left.
#[tokio::test]
async fn a_stream_cut_short_keeps_its_attempt_and_its_estimated_cost() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        &format!("{FAKE_PRICING}limits:\n  idle_timeout: 500ms\n"),
    );
    let (cut, cut_id, prompt) = stream_until_content(&daemon, "fake/cut-after-2").await;
    let (got, _) = events(cut).await;
    assert!(got.last().unwrap().1.contains("\"error\""), "{got:?}");
    let (stalled, stalled_id, _) = stream_until_content(&daemon, "fake/stall-after-2").await;
    let (got, _) = events(stalled).await;
    assert!(got.last().unwrap().1.contains("idle_timeout"), "{got:?}");
    let (left, left_id, _) = stream_until_content(&daemon, "fake/slow-100").await;
    drop(left);
    request_finished(&daemon, &left_id).await;

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&stored, &cut_id);
    assert_eq!(row.outcome, "midstream_error", "{row:?}");
    assert_cut_short(
        row,
        "openrouter:fake/cut-after-2",
        "midstream_error: ",
        prompt,
        2,
    );
    let row = row_of(&stored, &stalled_id);
    assert_eq!(row.outcome, "midstream_error", "{row:?}");
    assert_cut_short(
        row,
        "openrouter:fake/stall-after-2",
        "midstream_error: ",
        prompt,
        2,
    );
    assert!(
        row.error.as_deref().is_some_and(|e| e.contains("idle")),
        "{row:?}"
    );
    let row = row_of(&stored, &left_id);
    assert_eq!(row.outcome, "client_disconnected", "{row:?}");
    let relayed = row.completion_tokens.unwrap_or(0);
    assert!(relayed >= 1, "{row:?}");
    assert_cut_short(
        row,
        "openrouter:fake/slow-100",
        "client_disconnected",
        prompt,
        relayed,
    );
}

/// A stream still open when SIGTERM's grace runs out is a `midstream_error` saying the daemon
/// shut down, with its attempt and the tokens relayed priced as an estimate.
#[tokio::test]
async fn a_stream_ended_by_shutdown_keeps_its_attempt_and_its_estimated_cost() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(
        &fake.base_url(),
        &format!("{FAKE_PRICING}limits:\n  shutdown_grace: 300ms\n"),
    );
    let (response, id, prompt) = stream_until_content(&daemon, "fake/stall-after-2").await;
    daemon.terminate();
    let (got, _) = events(response).await;
    assert!(got.last().unwrap().1.contains("shutting_down"), "{got:?}");
    assert!(daemon.wait_exit().success());
    let stored = rows(&default_db(&daemon));
    let row = row_of(&stored, &id);
    assert_eq!(row.outcome, "midstream_error", "{row:?}");
    assert!(
        row.error
            .as_deref()
            .is_some_and(|e| e.contains("shut down")),
        "{row:?}"
    );
    assert_cut_short(row, "openrouter:fake/stall-after-2", "shutdown", prompt, 2);
}

/// A failover is one row listing both attempts, and it costs only what the attempt that
/// served was billed.
#[tokio::test]
async fn a_failover_is_one_row_with_both_attempts_and_the_served_cost() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = post(
        &daemon,
        &chat(
            "openrouter:fake/status-503|openrouter:fake/echo",
            "fail over",
            false,
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/echo"
    );
    let id = request_id(&response);
    response.bytes().await.unwrap();

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(stored.len(), 1, "{stored:#?}");
    let row = row_of(&stored, &id);
    assert_eq!(row.outcome, "ok");
    assert_eq!(row.model.as_deref(), Some("fake/echo"));
    let attempts = row.attempts.as_array().unwrap_or_else(|| panic!("{row:?}"));
    assert_eq!(attempts.len(), 2, "{row:?}");
    assert_eq!(attempts[0]["route"], "openrouter:fake/status-503");
    assert_ne!(attempts[0]["result"], "ok");
    assert_eq!(attempts[1]["route"], "openrouter:fake/echo");
    assert_eq!(attempts[1]["result"], "ok");
    let billing = fake.billing();
    assert_eq!(billing.len(), 1, "{billing:?}");
    assert_eq!(billing[0].model, "fake/echo");
    assert_eq!(row.cost_nanos, billed_nanos(&billing[0]));
    assert_eq!(row.cost_source, "upstream");
}

/// SIGTERM right after the last answer of a burst: every row is committed before exit.
#[tokio::test]
async fn sigterm_commits_every_row_before_exit() {
    let (dir, db) = db_in_temp_dir();
    let mut daemon = Daemon::start(Options::default().arg("--db").arg(db.to_str().unwrap()));
    let (ids, _) = mock_burst(&daemon, 200, 16).await;
    daemon.terminate();
    assert!(daemon.wait_exit().success());

    let report = report_json(&db, "model");
    assert_eq!(report["total"]["requests"], 200, "{report:#}");
    assert_eq!(report["total"]["errors"], 0);
    let stored = rows(&db);
    assert_eq!(stored.len(), 200);
    for id in &ids {
        assert_eq!(row_of(&stored, id).outcome, "ok");
    }
    assert!(stored.iter().any(|r| r.stream) && stored.iter().any(|r| !r.stream));
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGKILL does not corrupt the database, and every request answered 300 ms before the kill
/// is in it.
#[tokio::test]
async fn sigkill_keeps_the_database_sound_and_the_answered_rows() {
    let (dir, db) = db_in_temp_dir();
    let mut daemon = Daemon::start(Options::default().arg("--db").arg(db.to_str().unwrap()));
    let (ids, last) = mock_burst(&daemon, 60, 8).await;
    // The property under test: what was answered 300 ms ago is on disk.
    tokio::time::sleep_until((last + Duration::from_millis(300)).into()).await;
    daemon.signal("KILL");
    let status = daemon.wait_exit();
    assert!(!status.success());

    let report = report_json(&db, "day");
    assert_eq!(report["total"]["requests"], 60, "{report:#}");
    let stored = rows(&db);
    for id in &ids {
        row_of(&stored, id);
    }
    // The killed database opens for writing again: a new daemon starts on it and adds rows.
    let restarted = Daemon::start(Options::default().arg("--db").arg(db.to_str().unwrap()));
    let response = post(&restarted, &chat("mock", "after the crash", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(flushed_rows(&restarted, &db).await.len(), 61);
    drop((daemon, restarted));
    let _ = std::fs::remove_dir_all(dir);
}

/// A database that refuses rows (here another process holds its write lock, as a full disk
/// would refuse them): a report says how many rows it leaves out, and SIGTERM is not held up:
/// after a few quick tries the daemon logs every row it could not store, whole, and exits.
#[tokio::test]
async fn sigterm_with_a_database_refusing_rows_logs_them_and_exits() {
    let (dir, db) = db_in_temp_dir();
    let mut daemon = Daemon::start(Options::default().arg("--db").arg(db.to_str().unwrap()));
    let holder = orproxy_ledger::connect(&db).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (ids, _) = mock_burst(&daemon, 20, 4).await;
    // A report meanwhile answers without those rows, and says so.
    let response = client()
        .get(daemon.admin_url("/admin/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-orproxy-rows-pending"], "20");
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["rows_pending"], 20, "{report:#}");
    assert_eq!(report["total"]["requests"], 0, "{report:#}");
    let asked = Instant::now();
    daemon.terminate();
    assert!(daemon.wait_exit().success());
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(15), "exit took {took:?}");
    let logs = daemon.logs().join("\n");
    for id in &ids {
        assert!(
            logs.lines()
                .any(|l| l.contains("Usage row not stored.") && l.contains(id.as_str())),
            "{id} is not in the log: {logs}"
        );
    }
    drop(holder);
    let _ = std::fs::remove_dir_all(dir);
}

/// A file that is not a database stops the start with exit status 1 and a message naming
/// it; with `database.required: false` the daemon proxies anyway and leaves the file alone.
#[tokio::test]
async fn a_corrupt_database_stops_the_start_unless_not_required() {
    let garbage: String = (0..4096)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let bad = temp_file(&garbage, ".db");
    let state = temp_dir();
    let (status, _, stderr) = run(command()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(&bad)
        .env("STATE_DIRECTORY", &state));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(bad.to_str().unwrap()), "{stderr}");
    assert!(
        stderr.contains("not a database")
            || stderr.contains("not an SQLite database")
            || stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!stderr.contains("Ready."), "{stderr}");

    let daemon = Daemon::start(
        Options::config("database:\n  required: false\n")
            .arg("--db")
            .arg(bad.to_str().unwrap()),
    );
    assert!(
        daemon.logs().join("\n").contains(bad.to_str().unwrap()),
        "the warning names the file: {:?}",
        daemon.logs()
    );
    let response = post(&daemon, &chat("mock", "still proxying", false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "still proxying");
    // No database to report from, said as such.
    let response = client()
        .get(daemon.admin_url("/admin/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        std::fs::read_to_string(&bad).unwrap(),
        garbage,
        "the file is left as it was"
    );
    drop(daemon);
    let _ = std::fs::remove_file(&bad);
    let _ = std::fs::remove_dir_all(&state);
}

/// Damage past the file's header does not hold up the start (finding it means reading every
/// page, seconds per gigabyte): the check runs beside the daemon's work and reports it in the
/// log and in `/admin/status`.
#[tokio::test]
async fn damage_inside_the_database_is_reported_after_a_prompt_start() {
    let (dir, db) = db_in_temp_dir();
    let (page_size, root) = {
        let conn = orproxy_ledger::open(&db).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000)
             INSERT INTO requests (ts_ms, request_id, status, outcome, stream, cost_source, latency_us, attempts)
             SELECT i, 'req-' || i, 200, 'ok', 0, 'none', 10, '[]' FROM c",
        )
        .unwrap();
        let get = |sql| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64;
        (
            get("PRAGMA page_size"),
            get("SELECT rootpage FROM sqlite_master WHERE name = 'requests'"),
        )
    };
    // The table's root page (the page every row hangs from), overwritten.
    let mut file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.seek(SeekFrom::Start((root - 1) * page_size)).unwrap();
    file.write_all(&vec![0xA5; page_size as usize]).unwrap();
    drop(file);

    let daemon = Daemon::start(Options::default().arg("--db").arg(db.to_str().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let integrity = loop {
        let status = daemon.status().await;
        let integrity = status["ledger"]["integrity"].as_str().unwrap().to_owned();
        if integrity != "checking" || Instant::now() > deadline {
            break integrity;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(integrity.contains(db.to_str().unwrap()), "{integrity}");
    assert!(integrity.contains("corrupt"), "{integrity}");
    let logs = daemon.logs().join("\n");
    assert!(logs.contains("The usage database is damaged."), "{logs}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}

/// `database.retention` deletes the rows older than it at start, a few thousand per
/// transaction, keeps the newer rows (and those written meanwhile) and the budgets' spend
/// summary, and says so in the log, `/admin/status` and `/metrics`.
#[tokio::test]
async fn retention_deletes_the_old_rows_and_keeps_the_spend() {
    let (dir, db) = db_in_temp_dir();
    let (day, now) = (orproxy_ledger::DAY_MS, now_ms());
    {
        let conn = orproxy_ledger::open(&db).unwrap();
        // 12,000 rows of 40 days ago (more than two deletions' worth), 100 of 10 days ago,
        // each costing one nano-dollar, with their spend summary.
        for (prefix, ago, n) in [("old", 40, 12_000), ("recent", 10, 100)] {
            let at = now - ago * day;
            conn.execute_batch(&format!(
                "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n})
                 INSERT INTO requests (ts_ms, request_id, backend, model, status, outcome, stream,
                                       cost_nanos, cost_source, latency_us, attempts)
                 SELECT {at} + i, '{prefix}-' || i, 'b', 'm', 200, 'ok', 0, 1, 'upstream', 10, '[]'
                 FROM c;
                 INSERT INTO spend_days VALUES ({day_of}, '', 'b', 'm', {n});",
                day_of = at / day,
            ))
            .unwrap();
        }
    }
    let config = format!("database:\n  path: {}\n  retention: 30d\n", db.display());
    let daemon = Daemon::start(Options::config(config));
    let line = daemon.wait_log(|v| v["message"] == "Usage rows past the retention deleted.");
    assert_eq!(line["rows"], 12_000, "{line}");
    mock_burst(&daemon, 3, 3).await;
    let status = daemon.status().await;
    assert_eq!(status["ledger"]["rows_pruned"], 12_000, "{status}");
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("orproxy_ledger_rows_pruned_total 12000"),
        "{metrics}"
    );
    daemon.terminate();
    let mut daemon = daemon;
    assert!(daemon.wait_exit().success());

    let left = rows(&db);
    assert_eq!(left.len(), 103);
    assert!(left.iter().all(|r| !r.request_id.starts_with("old-")));
    let conn = orproxy_ledger::open_reader(&db).unwrap();
    let spent: i64 = conn
        .query_row(
            "SELECT sum(cost_nanos) FROM spend_days WHERE backend = 'b'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(spent, 12_100);
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload that removes the retention stops a deletion under way at once: the rows the new
/// setting keeps are not deleted meanwhile.
#[tokio::test]
async fn a_reload_without_retention_stops_the_deletion_under_way() {
    let (dir, db) = db_in_temp_dir();
    let (day, now) = (orproxy_ledger::DAY_MS, now_ms());
    {
        let conn = orproxy_ledger::open(&db).unwrap();
        // A hundred deletions' worth: seconds of work.
        conn.execute_batch(&format!(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 200000)
             INSERT INTO requests (ts_ms, request_id, status, outcome, stream, cost_source,
                                   latency_us, attempts)
             SELECT {} + i, 'old-' || i, 200, 'ok', 0, 'none', 10, '[]' FROM c",
            now - 40 * day
        ))
        .unwrap();
    }
    let config = dir.join("config.yaml");
    let database = format!("database:\n  path: {}\n", db.display());
    std::fs::write(&config, format!("{database}  retention: 30d\n")).unwrap();
    let daemon = Daemon::start(
        Options::default()
            .arg("--config")
            .arg(config.to_str().unwrap()),
    );
    // Once the deletion is under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.status().await["ledger"]["rows_pruned"] == 0 {
        assert!(Instant::now() < deadline, "no deletion started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(&config, &database).unwrap();
    let reloaded: Value = daemon.reload().await;
    assert_eq!(reloaded["result"], "ok", "{reloaded}");
    let line = daemon.wait_log(|v| v["message"] == "Usage rows past the retention deleted.");
    assert_eq!(line["end"], "stopped: the retention was removed", "{line}");
    let deleted = line["rows"].as_u64().unwrap();
    assert!(deleted < 200_000, "{line}");
    // Nothing more is deleted afterwards.
    let status = daemon.status().await;
    assert_eq!(status["ledger"]["rows_pruned"], deleted, "{status}");
    assert_eq!(rows(&db).len() as u64, 200_000 - deleted);
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}

/// `orproxy report --format csv --group-by key` prints the header, a line per key and a total
/// line (the same text as `/admin/usage?format=csv`); an unknown grouping or a date that does
/// not exist is refused.
#[tokio::test]
async fn report_prints_csv_per_key_and_refuses_an_unknown_grouping() {
    let (dir, db) = db_in_temp_dir();
    let mut daemon = Daemon::start(
        Options::config(
            "auth:\n  keys:\n    - { name: team-a, key_env: TEAM_A_KEY }\n    - { name: team-b, key_env: TEAM_B_KEY }\n",
        )
        .env("TEAM_A_KEY", "sk-team-a")
        .env("TEAM_B_KEY", "sk-team-b")
        .arg("--db")
        .arg(db.to_str().unwrap()),
    );
    let http = client();
    for key in [
        "sk-team-a",
        "sk-team-a",
        "sk-team-a",
        "sk-team-b",
        "sk-team-b",
    ] {
        let response = http
            .post(daemon.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("mock", "count me", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let anonymous = post(&daemon, &chat("mock", "no key", false)).await;
    assert_eq!(anonymous.status(), 401);
    let admin_csv = client()
        .get(daemon.admin_url("/admin/usage?group_by=key&format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_csv.status(), 200);
    assert!(
        admin_csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let admin_csv = admin_csv.text().await.unwrap();
    // A date that does not exist is refused, not rolled into the next month.
    let impossible = client()
        .get(daemon.admin_url("/admin/usage?from=2026-02-30"))
        .send()
        .await
        .unwrap();
    assert_eq!(impossible.status(), 400);
    let error: Value = impossible.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2026-02-30")),
        "{error}"
    );
    daemon.terminate();
    assert!(daemon.wait_exit().success());

    let (status, csv, stderr) = report(&db, &["--format", "csv", "--group-by", "key"]);
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "group,requests,errors,tokens_in,tokens_out,cached_tokens,reasoning_tokens,cost_usd,latency_p50_ms,latency_p95_ms"
    );
    let line = |group: &str| {
        lines
            .iter()
            .find(|l| l.split(',').next() == Some(group))
            .unwrap_or_else(|| panic!("no `{group}` line in:\n{csv}"))
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<String>>()
    };
    assert_eq!(&line("team-a")[1..3], ["3", "0"], "{csv}");
    assert_eq!(&line("team-b")[1..3], ["2", "0"], "{csv}");
    assert_eq!(
        &line("")[1..3],
        ["1", "1"],
        "the refused request, without a key: {csv}"
    );
    let total = lines.last().unwrap().split(',').collect::<Vec<_>>();
    assert_eq!(total[..3], ["total", "6", "1"], "{csv}");
    assert_eq!(lines.len(), 5, "{csv}");
    assert_eq!(csv, admin_csv, "the CLI and the admin API report alike");
    let stored = rows(&db);
    let keyed = |name: &str| {
        stored
            .iter()
            .filter(|r| r.key.as_deref() == Some(name))
            .count()
    };
    assert_eq!((keyed("team-a"), keyed("team-b")), (3, 2));

    // Bad values on the command line are usage errors (exit status 2), naming the value.
    let (status, stdout, stderr) = report(&db, &["--group-by", "bogus"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("bogus") && stderr.contains("model, backend, key, day"),
        "{stderr}"
    );
    let (status, stdout, stderr) = report(&db, &["--from", "2026-02-30"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("2026-02-30"), "{stderr}");
    drop(daemon);
    let _ = std::fs::remove_dir_all(dir);
}
