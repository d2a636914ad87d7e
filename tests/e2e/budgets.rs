//! Budgets: worst-case reservations under concurrency, spend that survives restarts,
//! fallback past the cap, and refusal when a price is unknown.

use std::time::{Duration, Instant};

use orproxy_testkit::{FAKE_API_KEY, FakeOpenAi, FakeOpenRouter};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::harness::{Daemon, Options, chat, client, openrouter_config, temp_dir};
use crate::ledger::{billed_nanos, default_db, flushed_rows, post, request_id, row_of, rows};

/// The fake's price of every `fake/...` model, as `pricing:` (USD 1 / 2 per million tokens).
const FAKE_PRICING: &str = "pricing:\n  - { match: \"^openrouter:fake/\", input_usd_per_mtok: 1, output_usd_per_mtok: 2 }\n";

/// `messages` exactly as sent: the daemon estimates the prompt from these bytes.
const MESSAGES: &str = r#"[{"role":"user","content":"spend some money"}]"#;

/// A non-streamed request body with `max_tokens`, serialized by hand so its bytes are known.
fn body(model: &str, max_tokens: u64) -> String {
    format!(r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":{MESSAGES}}}"#)
}

/// The daemon's worst case for [`body`]: `messages` bytes / 4 prompt tokens and `max_tokens`
/// answer tokens, at per-million prices in nano-dollars, rounded half up.
fn worst_case(prompt_per_mtok: i64, completion_per_mtok: i64, max_tokens: u64) -> i64 {
    worst_case_of_choices(prompt_per_mtok, completion_per_mtok, max_tokens, 1)
}

/// [`worst_case`] of a request asking for `n` choices: each may be `max_tokens` long.
fn worst_case_of_choices(
    prompt_per_mtok: i64,
    completion_per_mtok: i64,
    max_tokens: u64,
    n: u64,
) -> i64 {
    let prompt = (MESSAGES.len() / 4) as i64;
    (prompt * prompt_per_mtok + (max_tokens * n) as i64 * completion_per_mtok + 500_000) / 1_000_000
}

/// A daemon in front of `fake` with [`FAKE_PRICING`] and `budgets` (the YAML list's items).
fn with_budgets(fake: &FakeOpenRouter, budgets: &str) -> Daemon {
    Daemon::start(
        Options::config(openrouter_config(
            &fake.base_url(),
            &format!("{FAKE_PRICING}budgets:\n{budgets}"),
        ))
        .env("FAKE_OR_KEY", FAKE_API_KEY),
    )
}

/// POSTs a raw JSON body.
async fn post_raw(http: &reqwest::Client, daemon: &Daemon, body: String) -> reqwest::Response {
    post_to(http.clone(), daemon.url("/v1/chat/completions"), body).await
}

/// POSTs a raw JSON body to `url` (owning its arguments, for spawned tasks).
async fn post_to(http: reqwest::Client, url: String, body: String) -> reqwest::Response {
    http.post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// `GET /admin/budgets`: the entry named `name`.
async fn budget(daemon: &Daemon, name: &str) -> Value {
    let all = daemon.admin_json("/admin/budgets").await;
    all["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no budget {name}: {all:#}"))
}

/// Waits until no request holds a reservation in `name`; returns its figures then.
pub async fn settled(daemon: &Daemon, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = budget(daemon, name).await;
        if b["reserved_nanos"] == 0 {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "reservations never released: {b:#}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the daemon's first fetch of `backend`'s price list (polling: the fake upstream
/// runs on this test's runtime, which a blocking wait would stall).
async fn wait_prices(daemon: &Daemon, backend: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let fetched = |line: &String| {
        serde_json::from_str::<Value>(line)
            .is_ok_and(|v| v["message"] == "Prices fetched." && v["backend"] == backend)
    };
    while !daemon.logs().iter().any(fetched) {
        assert!(
            Instant::now() < deadline,
            "prices of {backend} never fetched:\n{}",
            daemon.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The error object of a refused request.
async fn error_of(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.unwrap();
    body["error"].clone()
}

fn nanos(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// 64 concurrent requests against a small global cap: some are served, the rest refused
/// with 402 before reaching the upstream, and the spend (exactly the upstream's bill) passes
/// the cap by at most one request's worst case; afterwards nothing stays reserved.
#[tokio::test]
async fn concurrent_requests_overspend_by_at_most_one_worst_case() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let limit: i64 = 100_000; // USD 0.0001
    let daemon = with_budgets(
        &fake,
        "  - { name: cap, scope: global, limit_usd: 0.0001, period: total }\n",
    );
    assert_eq!(nanos(&budget(&daemon, "cap").await["limit_nanos"]), limit);
    let max_tokens = 16;
    let worst = worst_case(1_000_000_000, 2_000_000_000, max_tokens);
    // Each request takes 100 ms upstream, so the 64 overlap.
    let model = "fake/first-byte-100";
    let http = client();
    let mut set = JoinSet::new();
    for _ in 0..64 {
        let (http, daemon_url) = (http.clone(), daemon.url("/v1/chat/completions"));
        let text = body(model, max_tokens);
        set.spawn(async move {
            let response = http
                .post(daemon_url)
                .header("content-type", "application/json")
                .body(text)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let id = request_id(&response);
            let answer: Value = response.json().await.unwrap();
            (status, id, answer)
        });
    }
    let (mut served, mut refused) = (0, Vec::new());
    while let Some(done) = set.join_next().await {
        let (status, id, answer) = done.unwrap();
        match status {
            200 => served += 1,
            402 => {
                assert_eq!(answer["error"]["code"], "budget_exceeded", "{answer}");
                refused.push(id);
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    assert!(served >= 1, "nothing was served");
    assert!(!refused.is_empty(), "the cap refused nothing");
    let after_burst = settled(&daemon, "cap").await;
    assert!(
        nanos(&after_burst["spent_nanos"]) <= limit + worst,
        "{after_burst:#}"
    );

    // Then one at a time until refused with nothing in flight: the cap is really reached.
    let mut last = None;
    for _ in 0..30 {
        settled(&daemon, "cap").await;
        let response = post_raw(&http, &daemon, body(model, max_tokens)).await;
        let status = response.status().as_u16();
        if status == 402 {
            refused.push(request_id(&response));
            last = Some(error_of(response).await);
            break;
        }
        assert_eq!(status, 200);
        served += 1;
    }
    assert_eq!(last.unwrap()["code"], "budget_exceeded");
    let status = settled(&daemon, "cap").await;
    let spent = nanos(&status["spent_nanos"]);
    let billing = fake.billing();
    assert_eq!(
        billing.len(),
        served,
        "only admitted requests reach the upstream"
    );
    let chats = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(chats, served);
    let billed: i64 = billing.iter().map(billed_nanos).sum();
    assert_eq!(spent, billed, "spend is the upstream's bill: {status:#}");
    assert!(spent >= limit, "refused below the cap: {status:#}");
    assert!(
        spent <= limit + worst,
        "spent {spent} > limit {limit} + worst case {worst}"
    );
    assert_eq!(status["remaining_usd"], "0.000000000", "{status:#}");

    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    assert_eq!(stored.len(), served + refused.len());
    for id in &refused {
        let row = row_of(&stored, id);
        assert_eq!((row.outcome.as_str(), row.status), ("budget_exceeded", 402));
        assert_eq!(row.cost_nanos, 0);
    }
}

/// A request asking for `n` choices reserves `n` answers of `max_tokens` (`n` from the body or
/// from the selector's parameters): while one such request is in flight, a cap it fills
/// refuses 31 concurrent ones that single-answer reservations would all have let through, so
/// the spend can pass the cap by one request's worst case at most.
#[tokio::test]
async fn a_reservation_counts_every_choice() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let limit: i64 = 10_000_000; // USD 0.01
    let daemon = with_budgets(
        &fake,
        "  - { name: cap, scope: global, limit_usd: 0.01, period: total }\n",
    );
    let (max_tokens, n) = (100, 100);
    let one_answer = worst_case(1_000_000_000, 2_000_000_000, max_tokens);
    let every_answer = worst_case_of_choices(1_000_000_000, 2_000_000_000, max_tokens, n);
    assert!(32 * one_answer < limit && every_answer >= limit);
    let http = client();
    for (held_model, n_field) in [("fake/hang", ",\"n\":100"), ("fake/hang?n=100", "")] {
        // A request the upstream never answers holds its reservation until it is dropped.
        let text = format!(
            r#"{{"model":"{held_model}","max_tokens":{max_tokens}{n_field},"messages":{MESSAGES}}}"#
        );
        let held = tokio::spawn(
            http.post(daemon.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(text)
                .send(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let reserved = loop {
            let b = budget(&daemon, "cap").await;
            if b["reserved_nanos"] != 0 {
                break nanos(&b["reserved_nanos"]);
            }
            assert!(Instant::now() < deadline, "never reserved: {b:#}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(reserved, every_answer, "{held_model}");

        let mut set = JoinSet::new();
        for _ in 0..31 {
            let text = format!(
                r#"{{"model":"fake/first-byte-100","n":{n},"max_tokens":{max_tokens},"messages":{MESSAGES}}}"#
            );
            set.spawn(post_to(
                http.clone(),
                daemon.url("/v1/chat/completions"),
                text,
            ));
        }
        while let Some(done) = set.join_next().await {
            let response = done.unwrap();
            assert_eq!(response.status(), 402, "admitted past a full cap");
            assert_eq!(error_of(response).await["code"], "budget_exceeded");
        }
        held.abort();
        let status = settled(&daemon, "cap").await;
        assert_eq!(nanos(&status["spent_nanos"]), 0, "{status:#}");
    }
    let refused_reached_upstream = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .any(|r| String::from_utf8_lossy(&r.body).contains("fake/first-byte-100"));
    assert!(
        !refused_reached_upstream,
        "a refused request reached the upstream"
    );
}

/// Spend is rebuilt from the database at start: after a restart (with the upstream gone, so
/// the cached price list is all there is, and the request rows pruned) the budgets show the
/// same spend and an exhausted cap still refuses.
// Several threads: the daemon fetches prices from the in-process fake before it is ready,
// while this test blocks on that readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_and_prices_survive_a_restart() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let dir = temp_dir();
    let db = dir.join("usage.db");
    let config = openrouter_config(
        &fake.base_url(),
        "budgets:\n  - { name: total-cap, scope: global, limit_usd: 0.0001, period: total }\n  - { name: daily, scope: model, match: \"^openai/\", limit_usd: 100, period: day }\n",
    );
    let options = Options::config(config)
        .env("FAKE_OR_KEY", FAKE_API_KEY)
        .arg("--db")
        .arg(db.to_str().unwrap());
    let mut first = Daemon::start(options.clone());
    wait_prices(&first, "openrouter").await;
    let http = client();
    let mut refused = false;
    for _ in 0..20 {
        let response = post_raw(&http, &first, body("openai/gpt-4o", 16)).await;
        if response.status() == 402 {
            assert_eq!(error_of(response).await["code"], "budget_exceeded");
            refused = true;
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        settled(&first, "total-cap").await;
    }
    assert!(refused, "the cap was never reached");
    let before = settled(&first, "total-cap").await;
    let spent = nanos(&before["spent_nanos"]);
    let billed: i64 = fake.billing().iter().map(billed_nanos).sum();
    assert_eq!(spent, billed);
    assert!(spent >= 100_000);
    assert_eq!(nanos(&budget(&first, "daily").await["spent_nanos"]), spent);
    first.terminate();
    assert!(first.wait_exit().success());
    drop(fake);
    // Pruning old rows, as an operator may, keeps the spend: it is summed per day apart.
    let conn = orproxy_ledger::connect(&db).unwrap();
    assert!(conn.execute("DELETE FROM requests", []).unwrap() > 0);
    drop(conn);

    let second = Daemon::start(options);
    let after = budget(&second, "total-cap").await;
    assert_eq!(nanos(&after["spent_nanos"]), spent, "{after:#}");
    assert_eq!(after["reserved_nanos"], 0);
    assert_eq!(
        nanos(&budget(&second, "daily").await["spent_nanos"]),
        spent,
        "today's spend lands in today's window"
    );
    let response = post_raw(&http, &second, body("openai/gpt-4o", 16)).await;
    assert_eq!(response.status(), 402);
    let error = error_of(response).await;
    assert_eq!(error["code"], "budget_exceeded", "{error}");
    assert!(error["message"].as_str().unwrap().contains("total-cap"));
    drop((first, second));
    let _ = std::fs::remove_dir_all(dir);
}

/// `POST /admin/prices/refresh` says which lists it fetched and which it could not (502): an
/// operator's script sees the failure instead of an empty success.
#[tokio::test]
async fn a_price_refresh_names_the_lists_it_could_not_fetch() {
    let fake = FakeOpenRouter::start().await.unwrap();
    // A port nobody listens on: bound, then released.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    api_key_env: FAKE_OR_KEY\n  \
         gone:\n    type: openrouter\n    base_url: http://{gone}/api/v1\n    api_key_env: FAKE_OR_KEY\n\
         default_backend: openrouter\n",
        fake.base_url()
    );
    let daemon = Daemon::start(Options::config(config).env("FAKE_OR_KEY", FAKE_API_KEY));
    let response = client()
        .post(daemon.admin_url("/admin/prices/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    // The built-in `mock` backend publishes its one model too.
    let fetched = body["fetched"].as_array().unwrap();
    let openrouter = fetched.iter().find(|f| f["backend"] == "openrouter");
    assert!(
        openrouter.is_some_and(|f| f["models"].as_u64().is_some_and(|n| n > 0)),
        "{body:#}"
    );
    assert_eq!(body["failed"].as_array().unwrap().len(), 1, "{body:#}");
    assert_eq!(body["failed"][0]["backend"], "gone");
    let error = body["failed"][0]["error"].as_str().unwrap();
    assert!(error.contains("gone"), "{error}");
    assert!(!error.contains(FAKE_API_KEY), "{error}");
}

/// A budget counts every target of a chain, not only the first: once the `fake/echo` cap is
/// reached, a chain that ends on it goes without it (its first target's failure reaches the
/// client) instead of spending past the cap through a failover.
#[tokio::test]
async fn a_capped_model_later_in_a_chain_is_not_served() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = with_budgets(
        &fake,
        "  - { name: echo-cap, scope: model, match: \"echo\", limit_usd: 0.00002, period: day }\n",
    );
    let http = client();
    let mut capped = false;
    for _ in 0..20 {
        settled(&daemon, "echo-cap").await;
        let response = post_raw(&http, &daemon, body("fake/echo", 16)).await;
        if response.status() == 402 {
            capped = true;
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert!(capped, "the cap was never reached");
    let spent = nanos(&settled(&daemon, "echo-cap").await["spent_nanos"]);
    let served = fake.billing().len();

    let response = post_raw(&http, &daemon, body("fake/status-500|fake/echo", 16)).await;
    assert_eq!(
        response.status(),
        500,
        "the chain went on to the capped model"
    );
    response.bytes().await.unwrap();
    // Chains that do not end on the capped model, or start on an uncapped one, are served.
    let response = post_raw(&http, &daemon, body("fake/fail-first-1|fake/events-3", 16)).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(fake.billing().len(), served + 1);
    assert_eq!(
        nanos(&settled(&daemon, "echo-cap").await["spent_nanos"]),
        spent
    );
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains(r#"orproxy_budget_rejections_total{budget="echo-cap",action="skip"} 1"#),
        "{metrics}"
    );
    // `/admin/explain` applies the budgets as they stand, and counts nothing.
    let explain = |model: &'static str| {
        let url = daemon.admin_url("/admin/explain");
        let http = http.clone();
        async move {
            http.post(url)
                .body(body(model, 16))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let refused = explain("fake/echo").await;
    assert_eq!(refused["status"], 402, "{refused:#}");
    assert_eq!(refused["error"]["code"], "budget_exceeded", "{refused:#}");
    let skipped = explain("fake/status-500|fake/echo").await;
    assert_eq!(skipped["status"], 200, "{skipped:#}");
    assert_eq!(
        skipped["attempts"],
        serde_json::json!(["openrouter:fake/status-500"]),
        "{skipped:#}"
    );
    let rejections = |text: &str| {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("orproxy_budget_rejections_total{"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(rejections(&daemon.metrics().await), rejections(&metrics));
}

/// Failed attempts whose upstream bills them are held in the budget as they happen: once they
/// use it up, the chain stops instead of paying for one failure after another.
#[tokio::test]
async fn billed_failures_stop_a_chain_once_the_budget_is_used_up() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = with_budgets(
        &fake,
        "  - { name: cap, scope: global, limit_usd: 0.00002, period: day }\n",
    );
    let failure = "fake/billed-error-after-0";
    let chain = format!("{}fake/echo", format!("{failure}|").repeat(10));
    let response = post_raw(&client(), &daemon, body(&chain, 16)).await;
    let status = response.status();
    let id = request_id(&response);
    let error = error_of(response).await;
    let billing = fake.billing();
    let each = billing.iter().map(billed_nanos).max().unwrap_or(0);
    assert!(each > 0, "{billing:?}");
    let spent = nanos(&settled(&daemon, "cap").await["spent_nanos"]);
    assert_eq!(spent, billing.iter().map(billed_nanos).sum::<i64>());
    // The cap (20,000) plus at most the one attempt that used it up.
    assert!(
        spent <= 20_000 + each,
        "spent {spent} in {} attempts",
        billing.len()
    );
    assert!(billing.len() < 11, "every target was tried: {status}");
    // The client and the row learn which budget stopped the chain, and what was left untried.
    assert_eq!(status, 502, "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            r#"fake/echo: not tried: the failed attempts' billed cost left budget `cap` no room"#
        ),
        "{message}"
    );
    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let attempts = row_of(&stored, &id).attempts.to_string();
    assert!(
        attempts.contains("openrouter:fake/echo") && attempts.contains("budget_exceeded"),
        "{attempts}"
    );
}

/// What a failed attempt's upstream billed counts in the budgets of the target that billed it,
/// not of the one that served, in memory and, after a restart, from the per-day summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billed_failure_counts_for_the_target_that_billed_it() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let dir = temp_dir();
    let options = Options::config(openrouter_config(
        &fake.base_url(),
        &format!(
            "{FAKE_PRICING}budgets:\n  - {{ name: billed, scope: model, match: \"billed\", limit_usd: 1, period: day }}\n  - {{ name: echo, scope: model, match: \"echo\", limit_usd: 1, period: day }}\n"
        ),
    ))
    .env("FAKE_OR_KEY", FAKE_API_KEY)
    .arg("--db")
    .arg(dir.join("usage.db").to_str().unwrap());
    let mut first = Daemon::start(options.clone());
    let response = post_raw(
        &client(),
        &first,
        body("fake/billed-error-after-0|fake/echo", 16),
    )
    .await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let billing = fake.billing();
    let by_model = |model: &str| -> i64 {
        billing
            .iter()
            .filter(|b| b.model.contains(model))
            .map(billed_nanos)
            .sum()
    };
    let (billed, echo) = (by_model("billed"), by_model("echo"));
    assert!(billed > 0 && echo > 0, "{billing:?}");
    let spent = |b: Value| nanos(&b["spent_nanos"]);
    assert_eq!(spent(settled(&first, "billed").await), billed);
    assert_eq!(spent(settled(&first, "echo").await), echo);
    first.terminate();
    assert!(first.wait_exit().success());
    let second = Daemon::start(options);
    assert_eq!(spent(budget(&second, "billed").await), billed);
    assert_eq!(spent(budget(&second, "echo").await), echo);
    drop(second);
    let _ = std::fs::remove_dir_all(dir);
}

/// Budgets that fall back on each other refuse once the fallbacks come back to a route already
/// refused, instead of serving the capped model; and a target of a chain that no budget counts
/// needs no price.
#[tokio::test]
async fn fallbacks_that_loop_refuse_and_uncounted_targets_need_no_price() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = with_budgets(
        &fake,
        "  - { name: cy1, scope: model, match: \"^fake/echo$\", limit_usd: 0.00002, period: day, action: fallback, fallback: \"fake/events-3\" }\n  - { name: cy2, scope: model, match: \"^fake/events-3$\", limit_usd: 0.00002, period: day, action: fallback, fallback: \"fake/echo\" }\n",
    );
    let http = client();
    // `mock:unpriced` has no price, and no budget counts it.
    let response = post_raw(&http, &daemon, body("fake/echo|mock:unpriced", 16)).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    let mut refused = None;
    for _ in 0..40 {
        settled(&daemon, "cy1").await;
        settled(&daemon, "cy2").await;
        let response = post_raw(&http, &daemon, body("fake/echo", 16)).await;
        if response.status() == 402 {
            refused = Some(error_of(response).await);
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let error = refused.expect("the capped models kept being served");
    assert_eq!(error["code"], "budget_exceeded", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("cy2"),
        "{error}"
    );
}

/// A budget with `action: fallback` sends requests to its fallback once its cap is reached.
#[tokio::test]
async fn an_exhausted_budget_falls_back_to_its_selector() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = with_budgets(
        &fake,
        "  - { name: or-cap, scope: backend, match: \"^openrouter$\", limit_usd: 0.00002, period: month, action: fallback, fallback: \"mock:mock\" }\n",
    );
    let route_of =
        |r: &reqwest::Response| r.headers()["x-orproxy-route"].to_str().unwrap().to_owned();
    let mut upstream = 0;
    let mut fallback_id = None;
    for _ in 0..20 {
        settled(&daemon, "or-cap").await;
        let response = post(&daemon, &chat("fake/echo", "hello there", false)).await;
        assert_eq!(response.status(), 200);
        let route = route_of(&response);
        let id = request_id(&response);
        let answer: Value = response.json().await.unwrap();
        if route.starts_with("mock:") {
            assert_eq!(route, "mock:mock");
            assert_eq!(answer["choices"][0]["message"]["content"], "hello there");
            fallback_id = Some(id);
            break;
        }
        assert_eq!(route, "openrouter:fake/echo");
        upstream += 1;
    }
    let fallback_id = fallback_id.expect("never fell back");
    assert!(upstream >= 1);
    // It stays on the fallback.
    let again = post(&daemon, &chat("fake/echo", "and again", true)).await;
    assert_eq!(route_of(&again), "mock:mock");
    again.bytes().await.unwrap();
    assert_eq!(fake.billing().len(), upstream);

    let status = settled(&daemon, "or-cap").await;
    let billed: i64 = fake.billing().iter().map(billed_nanos).sum();
    assert_eq!(nanos(&status["spent_nanos"]), billed, "{status:#}");
    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&stored, &fallback_id);
    assert_eq!(row.outcome, "ok");
    assert_eq!(row.backend.as_deref(), Some("mock"));
    assert!(row.cost_nanos > 0, "the mock's cost is recorded: {row:?}");
}

/// Under a budget, a route with no known price is refused (402 `price_unknown`, naming the
/// route and the budget) without reaching the upstream; a `pricing:` entry lets it through
/// and prices its row.
#[tokio::test]
async fn an_unpriced_route_under_a_budget_is_refused_until_priced() {
    let fake = FakeOpenAi::start().await.unwrap();
    let config = format!(
        "backends:\n  local:\n    type: openai\n    base_url: {}\ndefault_backend: local\nbudgets:\n  - {{ name: local-cap, scope: backend, match: \"^local$\", limit_usd: 1, period: month }}\n",
        fake.base_url()
    );
    let unpriced = Daemon::start(Options::config(config.clone()));
    let response = post(&unpriced, &chat("llama3", "how much", false)).await;
    assert_eq!(response.status(), 402);
    let id = request_id(&response);
    let error = error_of(response).await;
    assert_eq!(error["code"], "price_unknown", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("local:llama3") && message.contains("local-cap"),
        "{message}"
    );
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/chat/completions")),
        "nothing was sent upstream"
    );
    let stored = flushed_rows(&unpriced, &default_db(&unpriced)).await;
    assert_eq!(row_of(&stored, &id).status, 402);
    drop(unpriced);

    let priced = Daemon::start(Options::config(format!(
        "{config}pricing:\n  - {{ match: \"^local:\", input_usd_per_mtok: 1, output_usd_per_mtok: 2 }}\n"
    )));
    let response = post(&priced, &chat("llama3", "how much", false)).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    response.bytes().await.unwrap();
    let bill = fake.billing().pop().unwrap();
    let expected = bill.prompt_tokens as i64 * 1_000 + bill.completion_tokens as i64 * 2_000;
    let stored = flushed_rows(&priced, &default_db(&priced)).await;
    let row = row_of(&stored, &id);
    assert_eq!(row.cost_source, "pricing", "{row:?}");
    assert_eq!(row.cost_nanos, expected, "{row:?}");
    let status = settled(&priced, "local-cap").await;
    assert_eq!(nanos(&status["spent_nanos"]), expected);
    assert_eq!(rows(&default_db(&priced)).len(), 1);
}

/// The 402 of a daily budget names the budget and when it resets (the next UTC midnight);
/// models outside the budget are not affected.
#[tokio::test]
async fn a_daily_budget_says_when_it_resets() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = with_budgets(
        &fake,
        "  - { name: daily-cap, scope: model, match: \"^fake/echo$\", limit_usd: 0.00001, period: day }\n",
    );
    let mut refusal = None;
    for _ in 0..10 {
        settled(&daemon, "daily-cap").await;
        let response = post(&daemon, &chat("fake/echo", "hi", false)).await;
        if response.status() == 402 {
            refusal = Some((request_id(&response), error_of(response).await));
            break;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let (id, error) = refusal.expect("the daily cap was never reached");
    assert_eq!(error["code"], "budget_exceeded");
    let status = budget(&daemon, "daily-cap").await;
    let end = status["window_end"].as_str().unwrap();
    assert!(end.ends_with("T00:00:00Z"), "{status:#}");
    assert!(
        status["window_start"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("daily-cap"), "{message}");
    assert!(message.contains(&format!("resets at {end}")), "{message}");

    // Outside the budget's match nothing is capped (and no price is needed).
    let other = post(&daemon, &chat("openai/gpt-4o", "hi", false)).await;
    assert_eq!(other.status(), 200);
    let stored = flushed_rows(&daemon, &default_db(&daemon)).await;
    let row = row_of(&stored, &id);
    assert_eq!((row.outcome.as_str(), row.status), ("budget_exceeded", 402));
}
