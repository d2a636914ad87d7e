//! Rule scripts through the real daemon: the repository's examples against the fake
//! OpenRouter, explain, `rules test`, and scripts that misbehave.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use orproxy_testkit::{FAKE_API_KEY, FakeOpenRouter};
use serde_json::{Value, json};

use crate::harness::{Daemon, Options, chat, client, command, temp_dir};

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rules")
        .display()
        .to_string()
}

/// The examples in front of the fake, with keys `team-a` and `intern`.
fn daemon_with_examples(fake: &FakeOpenRouter) -> Daemon {
    Daemon::start(
        Options::config(format!(
            "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    api_key_env: FAKE_OR_KEY\nauth:\n  keys:\n    - {{ name: team-a, key_env: TEAM_A }}\n    - {{ name: intern, key_env: INTERN }}\n",
            fake.base_url()
        ))
        .arg("--rules-dir")
        .arg(&examples())
        .env("FAKE_OR_KEY", FAKE_API_KEY)
        .env("TEAM_A", "sk-team-a")
        .env("INTERN", "sk-intern"),
    )
}

async fn ask(daemon: &Daemon, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(daemon.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_example_scripts_route_real_requests() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_with_examples(&fake);
    let scripts = daemon.status().await["scripts"].clone();
    assert_eq!(scripts[0], "10-gpt-via-openrouter.rhai");
    assert_eq!(scripts.as_array().unwrap().len(), 7, "{scripts}");

    // 10: gpt-* through OpenRouter; 50: the key's own app title.
    let response = ask(&daemon, "sk-team-a", &chat("gpt-4o", "hi", false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:openai/gpt-4o"
    );
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let sent = fake.requests().pop().unwrap();
    assert_eq!(sent.json()["model"], "openai/gpt-4o");
    assert_eq!(sent.header("x-title"), Some("orproxy/team-a"));
    assert_eq!(sent.header("x-openrouter-title"), Some("orproxy/team-a"));
    let log = daemon.request_log(&id);
    assert_eq!(log["tags"], r#"{"team":"team-a"}"#);
    assert_eq!(
        log["rules"],
        "10-gpt-via-openrouter.rhai:model;50-attribution.rhai:headers,tags"
    );

    // 20: a cheapest-first chain; its first model answers.
    let response = ask(&daemon, "sk-team-a", &chat("auto/cheap", "hi", true)).await;
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:meta-llama/llama-3.1-8b-instruct"
    );

    // 30: the intern key may not use gpt-4o.
    let response = ask(&daemon, "sk-intern", &chat("gpt-4o", "hi", false)).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rejected_by_rule");
    assert_eq!(
        body["error"]["message"],
        "key intern may not use openai/gpt-4o"
    );

    // 40: without a ledger every budget has money left: nothing is downgraded.
    let response = ask(
        &daemon,
        "sk-team-a",
        &chat("anthropic/claude-3-opus", "hi", false),
    )
    .await;
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:anthropic/claude-3-opus"
    );

    // 60: business hours or not, auto/support lands on one of its two models.
    let response = ask(&daemon, "sk-team-a", &chat("auto/support", "hi", false)).await;
    let route = response.headers()["x-orproxy-route"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        route == "openrouter:anthropic/claude-3-5-sonnet"
            || route == "openrouter:openai/gpt-4o-mini",
        "{route}"
    );

    // 70: a prompt over the limit is refused before anything is sent.
    let before = fake.requests().len();
    let response = ask(
        &daemon,
        "sk-team-a",
        &chat("openai/gpt-4o-mini", &"lorem ipsum ".repeat(900), false),
    )
    .await;
    assert_eq!(response.status(), 413);
    assert_eq!(fake.requests().len(), before);
}

#[tokio::test]
async fn explain_shows_the_route_and_what_each_script_changed() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_with_examples(&fake);
    let explained: Value = client()
        .post(daemon.admin_url("/admin/explain?key=team-a"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(explained["status"], 200);
    assert_eq!(explained["route"]["backend"], "openrouter");
    assert_eq!(explained["route"]["model"], "openai/gpt-4o");
    assert_eq!(explained["attempts"], json!(["openrouter:openai/gpt-4o"]));
    assert_eq!(explained["headers"]["x-title"], "orproxy/team-a");
    assert_eq!(
        explained["trace"][0],
        json!({"script": "10-gpt-via-openrouter.rhai", "field": "model", "before": "gpt-4o", "after": "openai/gpt-4o"})
    );
    assert!(fake.requests().is_empty(), "explain sends nothing upstream");

    let refused: Value = client()
        .post(daemon.admin_url("/admin/explain?key=intern"))
        .json(&chat("gpt-4o", "hi", false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refused["status"], 403);
    assert_eq!(
        refused["trace"].as_array().unwrap().last().unwrap()["field"],
        "rejection"
    );

    // The command line says the same, without a daemon.
    let file = crate::harness::temp_file(&chat("auto/cheap", "hi", false).to_string(), ".json");
    let output = command()
        .args(["explain", "--rules-dir", &examples()])
        .arg(&file)
        .env("OPENROUTER_API_KEY", "unused")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        cli["attempts"],
        json!([
            "openrouter:meta-llama/llama-3.1-8b-instruct",
            "openrouter:mistralai/mistral-small",
            "openrouter:openai/gpt-4o-mini"
        ])
    );
}

#[test]
fn rules_test_passes_on_the_examples_and_fails_with_a_diff() {
    let output = command()
        .args(["rules", "test", &examples()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("16 passed, 0 failed"), "{stdout}");

    let dir = temp_dir();
    std::fs::copy(
        Path::new(&examples()).join("10-gpt-via-openrouter.rhai"),
        dir.join("10.rhai"),
    )
    .unwrap();
    std::fs::write(dir.join("a.test.yaml"), "- name: wrong on purpose\n  request: { model: gpt-4o, messages: [] }\n  expect: { model: openai/gpt-5 }\n").unwrap();
    let output = command()
        .args(["rules", "test"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("model: expected openai/gpt-5, got openai/gpt-4o"),
        "{stdout}"
    );
}

/// Scripts that loop, recurse, grow a string, fail at run time: each fails only the requests
/// that reach it, quickly and by name, while a steady load of other requests sees no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_scripts_fail_only_their_requests() {
    let dir = temp_dir();
    std::fs::write(
        dir.join("10-evil.rhai"),
        r#"
fn deep(n) { deep(n + 1) }
fn on_request(req) {
    if req.model == "evil/loop" { loop { } }
    if req.model == "evil/recurse" { deep(0); }
    if req.model == "evil/string" { let s = "x"; loop { s += s; } }
    if req.model == "evil/type" {
        let n = 1;
        n = n + "one" * 2;
    }
}
"#,
    )
    .unwrap();
    let daemon = Daemon::start(
        Options::default()
            .arg("--rules-dir")
            .arg(&dir.display().to_string()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let url = daemon.url("/v1/chat/completions");
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let http = client();
            let mut ticker = tokio::time::interval(Duration::from_millis(5));
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let response = http
                    .post(&url)
                    .json(&chat("mock:fine", "x", false))
                    .send()
                    .await;
                results.push(response.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            results
        })
    };
    // Two seconds of bad requests alongside the load.
    let cases = [
        ("evil/loop", "exceeded 100000 operations", false),
        ("evil/recurse", "nested calls", false),
        ("evil/string", "exceeded its limit", false),
        ("evil/type", "at line", true),
    ];
    let mut rounds = 0;
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        rounds += 1;
        for (model, expect, line) in cases {
            let started = std::time::Instant::now();
            let response = client()
                .post(daemon.url("/v1/chat/completions"))
                .json(&chat(model, "x", false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 500, "{model}");
            let body: Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert_eq!(body["error"]["code"], "rule_failed");
            assert!(message.starts_with("rule 10-evil.rhai failed"), "{message}");
            assert!(message.contains(expect), "{model}: {message}");
            assert_eq!(message.contains("at line"), line, "{message}");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{model} took {:?}",
                started.elapsed()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let results = load.await.unwrap();
    assert!(results.len() > 200, "{}", results.len());
    assert!(
        results.iter().all(|s| *s == 200),
        "{:?}",
        results.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains(&format!(
            "orproxy_rule_errors_total{{script=\"10-evil.rhai\"}} {}",
            4 * rounds
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_script_that_does_not_compile_is_a_refused_reload() {
    let dir = temp_dir();
    std::fs::write(
        dir.join("10-ok.rhai"),
        "fn on_request(req) { req.tags.v = 1; }\n",
    )
    .unwrap();
    let daemon = Daemon::start(
        Options::default()
            .arg("--rules-dir")
            .arg(&dir.display().to_string()),
    );
    std::fs::write(
        dir.join("10-ok.rhai"),
        "fn on_request(req) {\n  req.tags.v = ;\n}\n",
    )
    .unwrap();
    let response = client()
        .post(daemon.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let outcome: Value = response.json().await.unwrap();
    let error = outcome["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{}:2:", dir.join("10-ok.rhai").display())),
        "{error}"
    );
    // The old scripts keep running.
    let explained: Value = client()
        .post(daemon.admin_url("/admin/explain"))
        .json(&chat("mock:m", "x", false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(explained["tags"]["v"], 1);
}
