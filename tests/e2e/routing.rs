//! Selectors, aliases, identity and failover through the real binary (SPEC §3, §4, §8).

use std::time::Duration;

use orproxy_testkit::{FAKE_API_KEY, FakeOpenRouter, FakeOptions};
use serde_json::{Value, json};

use crate::harness::{Daemon, Options, chat, client, daemon_for, events};

async fn ask(daemon: &Daemon, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat(model, "hi there", stream))
        .send()
        .await
        .unwrap()
}

fn route_of(response: &reqwest::Response) -> String {
    response.headers()["x-orproxy-route"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// The `Retry-After` seconds of a response.
fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn models_asked(fake: &FakeOpenRouter) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .map(|r| r.json()["model"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn the_seed_alias_and_uri_parameters_work_as_written() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = Daemon::start(
        Options::config(format!(
            "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    api_key_env: FAKE_OR_KEY\ndefault_backend: mock\nmodel_aliases:\n  - pattern: \"^gpt-(.*)\"\n    replacement: \"openrouter:openai/gpt-\\\\1\"\n",
            fake.base_url()
        ))
        .env("FAKE_OR_KEY", FAKE_API_KEY),
    );
    let response = ask(&daemon, "gpt-4o", false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(route_of(&response), "openrouter:openai/gpt-4o");
    assert_eq!(models_asked(&fake), ["openai/gpt-4o"]);

    let mut body = chat(
        "openrouter:anthropic/claude-3-5-sonnet?temperature=0.7&top_p=0.9&custom=yes",
        "hi",
        false,
    );
    body["temperature"] = json!(1.5);
    body["max_tokens"] = json!(64);
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = fake.requests().pop().unwrap().json();
    assert_eq!(sent["model"], "anthropic/claude-3-5-sonnet");
    assert_eq!(sent["temperature"], 0.7, "URI parameters override the body");
    assert_eq!(sent["top_p"], 0.9);
    assert_eq!(sent["custom"], "yes", "unknown parameters pass through");
    assert_eq!(sent["max_tokens"], 64, "other body fields are untouched");
}

#[tokio::test]
async fn bad_selectors_are_400_naming_the_part() {
    let daemon = Daemon::start(Options::default());
    for (model, part) in [
        ("mock?temperature=hot", "`temperature=hot` is not a number"),
        ("mock?top_p=2", "`top_p=2` is out of range"),
        ("mock?a=%zz", "bad percent encoding in `%zz`"),
        ("mock?a=1?b=2", "a second `?`"),
        ("mock||mock", "chain element 2"),
    ] {
        let response = ask(&daemon, model, false).await;
        assert_eq!(response.status(), 400, "{model}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_model");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(part),
            "{model}: {body}"
        );
    }
}

#[tokio::test]
async fn identity_headers_in_each_mode() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = Daemon::start(
        Options::config(format!(
            r#"
identity:
  user_agent: {{ mode: override, override_value: "MyApp/1.0.0" }}
  referer: {{ mode: passthrough }}
  title: {{ mode: default }}
backends:
  openrouter:
    type: openrouter
    base_url: {base}
    api_key_env: FAKE_OR_KEY
  plain:
    type: openrouter
    base_url: {base}
    api_key_env: FAKE_OR_KEY
    identity:
      user_agent: {{ mode: passthrough }}
      referer: {{ mode: override, override_value: "https://example.org" }}
      title: {{ mode: override, override_value: "MyApp" }}
default_backend: openrouter
"#,
            base = fake.base_url()
        ))
        .env("FAKE_OR_KEY", FAKE_API_KEY),
    );
    let http = client();
    let send = |model: &'static str| {
        http.post(daemon.url("/v1/chat/completions"))
            .header("user-agent", "OpenAI/Python 3.54.0")
            .header("http-referer", "https://client.example")
            .header("x-title", "ClientApp")
            .json(&chat(model, "x", false))
            .send()
    };
    assert_eq!(send("openai/gpt-4o").await.unwrap().status(), 200);
    let global = fake.requests().pop().unwrap();
    assert_eq!(global.header("user-agent"), Some("MyApp/1.0.0"), "override");
    assert_eq!(
        global.header("http-referer"),
        Some("https://client.example"),
        "passthrough forwards the client's"
    );
    assert_eq!(global.header("x-title"), Some("orproxy"), "default");
    assert_eq!(global.header("x-openrouter-title"), Some("orproxy"));

    assert_eq!(send("plain:openai/gpt-4o").await.unwrap().status(), 200);
    let own = fake.requests().pop().unwrap();
    assert_eq!(
        own.header("user-agent"),
        Some("OpenAI/Python 3.54.0"),
        "per-backend passthrough wins"
    );
    assert_eq!(own.header("http-referer"), Some("https://example.org"));
    assert_eq!(own.header("x-title"), Some("MyApp"));
    assert_eq!(own.header("x-openrouter-title"), Some("MyApp"));
    // The client's proxy credentials never travel upstream.
    assert_eq!(
        own.header("authorization"),
        Some(format!("Bearer {FAKE_API_KEY}").as_str())
    );
}

#[tokio::test]
async fn failover_moves_on_for_each_trigger_and_says_which_attempt_served() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  first_byte_timeout: 500ms\n");
    for (primary, stream) in [
        ("fake/status-429-noretry", false),
        ("fake/status-503", false),
        ("fake/status-502", true),
        ("fake/status-402", false),
        ("fake/reset", false),
        ("fake/hang", false),
        ("fake/hang", true),
        ("fake/keepalive-3000", true),
        ("fake/context-length", false),
        ("fake/midstream-error-after-0", true),
        ("fake/cut-after-0", true),
    ] {
        let response = ask(&daemon, &format!("{primary}|openrouter:fake/echo"), stream).await;
        assert_eq!(response.status(), 200, "{primary} stream={stream}");
        assert_eq!(
            route_of(&response),
            "openrouter:fake/echo",
            "{primary} stream={stream}"
        );
        let id = response.headers()["x-orproxy-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let text = if stream {
            let (got, error) = events(response).await;
            assert_eq!(error, None);
            assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n", "{primary}");
            got.iter().map(|(_, e)| e.clone()).collect::<String>()
        } else {
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["model"], "fake/echo",
                "the response names the model that served"
            );
            body.to_string()
        };
        assert!(text.contains("echo"), "{primary}: {text}");
        let log = daemon.request_log(&id);
        let attempts = log["attempts"].as_str().unwrap();
        assert!(
            attempts.starts_with(&format!("openrouter:{primary}=")),
            "{attempts}"
        );
        assert!(attempts.ends_with("openrouter:fake/echo=ok"), "{attempts}");
    }
}

#[tokio::test]
async fn request_errors_do_not_fail_over() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = ask(&daemon, "fake/content-policy|openrouter:fake/echo", false).await;
    assert_eq!(response.status(), 400);
    assert_eq!(route_of(&response), "openrouter:fake/content-policy");
    assert!(!models_asked(&fake).contains(&"fake/echo".to_owned()));
}

#[tokio::test]
async fn content_already_sent_is_never_replaced_or_presented_as_complete() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  idle_timeout: 300ms\n");
    for primary in ["fake/cut-after-40", "fake/stall-after-2"] {
        let response = ask(&daemon, &format!("{primary}|openrouter:fake/echo"), true).await;
        assert_eq!(route_of(&response), format!("openrouter:{primary}"));
        let (got, _) = events(response).await;
        let last = &got.last().unwrap().1;
        assert!(last.starts_with("data: {\"error\""), "{primary}: {last}");
        assert!(got.iter().all(|(_, e)| !e.contains("[DONE]")));
    }
    assert!(!models_asked(&fake).contains(&"fake/echo".to_owned()));
}

#[tokio::test]
async fn malformed_and_unterminated_streams() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let (got, error) = events(ask(&daemon, "fake/malformed", true).await).await;
    assert_eq!(error, None);
    assert!(
        got.iter().any(|(_, e)| e.contains("{not json")),
        "a malformed event is relayed, not interpreted"
    );
    assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n");

    // A whole answer that is no JSON is no answer: 502 alone, the next target in a chain.
    let response = ask(&daemon, "fake/malformed", false).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreadable answer"),
        "{body}"
    );
    let response = ask(&daemon, "fake/malformed|openrouter:fake/echo", false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(route_of(&response), "openrouter:fake/echo");
}

#[tokio::test]
async fn when_every_attempt_fails_the_client_hears_about_each() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = ask(&daemon, "fake/status-503|openrouter:fake/reset", false).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "all_attempts_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("openrouter:fake/status-503") && message.contains("openrouter:fake/reset"),
        "{message}"
    );

    let response = ask(
        &daemon,
        "fake/status-429-retry-9|openrouter:fake/status-429-retry-4",
        true,
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["retry-after"],
        "4",
        "the earliest Retry-After"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn a_rate_limited_target_cools_down_and_a_flaky_one_is_used_again() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let chain = "fake/status-429-retry-30|openrouter:fake/echo";
    assert_eq!(
        route_of(&ask(&daemon, chain, false).await),
        "openrouter:fake/echo"
    );
    assert_eq!(
        route_of(&ask(&daemon, chain, false).await),
        "openrouter:fake/echo"
    );
    let asked = models_asked(&fake);
    assert_eq!(
        asked
            .iter()
            .filter(|m| *m == "fake/status-429-retry-30")
            .count(),
        1,
        "skipped while cooling: {asked:?}"
    );
    let status = daemon.status().await;
    let cooling = &status["cooldowns"][0];
    assert_eq!(cooling["target"], "openrouter:fake/status-429-retry-30");
    assert!(cooling["cooling_secs"].as_f64().unwrap() > 20.0, "{status}");

    // A primary that failed once recovers and is used again at once.
    let flaky = "fake/fail-first-1|openrouter:fake/echo";
    assert_eq!(
        route_of(&ask(&daemon, flaky, false).await),
        "openrouter:fake/echo"
    );
    assert_eq!(
        route_of(&ask(&daemon, flaky, false).await),
        "openrouter:fake/fail-first-1"
    );
}

#[tokio::test]
async fn config_chains_and_triggers() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        "failover:\n  - match: \"^openrouter:fake/status-\"\n    chain: [\"openrouter:fake/echo\"]\n    triggers: [server_error]\n",
    );
    assert_eq!(
        route_of(&ask(&daemon, "fake/status-503", false).await),
        "openrouter:fake/echo"
    );
    let refused = ask(&daemon, "fake/status-429-noretry", false).await;
    assert_eq!(
        refused.status(),
        429,
        "429 is not among this chain's triggers"
    );
}

#[tokio::test]
async fn a_refused_key_rests_while_the_next_one_serves() {
    let fake = FakeOpenRouter::start_with(FakeOptions {
        api_keys: vec!["sk-good".into()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let daemon = Daemon::start(
        Options::config(format!(
            "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    api_keys_env: [KEY_BAD, KEY_GOOD]\n",
            fake.base_url()
        ))
        .env("KEY_BAD", "sk-bad")
        .env("KEY_GOOD", "sk-good"),
    );
    for _ in 0..4 {
        let response = ask(&daemon, "openai/gpt-4o", false).await;
        assert_eq!(response.status(), 200);
    }
    let keys: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_owned))
        .collect();
    assert_eq!(
        keys.iter().filter(|k| k.ends_with("sk-bad")).count(),
        1,
        "the bad key is tried once, then rests: {keys:?}"
    );
    let status: Value = client()
        .get(daemon.admin_url("/admin/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["keys"]["openrouter"],
        json!({"total": 2, "ready": 1})
    );
    assert!(!daemon.logs().join("\n").contains("sk-bad"));
}

#[tokio::test]
async fn a_target_whose_every_key_was_asked_to_wait_is_not_called_until_the_wait_is_over() {
    let fake = FakeOpenRouter::start_with(FakeOptions {
        api_keys: vec!["sk-one".into(), "sk-two".into()],
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let daemon = Daemon::start(
        Options::config(format!(
            "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    api_keys_env: [K1, K2]\n",
            fake.base_url()
        ))
        .env("K1", "sk-one")
        .env("K2", "sk-two"),
    );
    let limited = "fake/status-429-retry-30";
    let calls = || models_asked(&fake).iter().filter(|m| *m == limited).count();
    let chain = format!("{limited}|openrouter:fake/echo");
    // Both keys asked to wait: the chain's next target serves.
    assert_eq!(
        route_of(&ask(&daemon, &chain, false).await),
        "openrouter:fake/echo"
    );
    assert_eq!(calls(), 2);
    // The next request goes straight to it.
    assert_eq!(
        route_of(&ask(&daemon, &chain, false).await),
        "openrouter:fake/echo"
    );
    assert_eq!(calls(), 2);
    // Alone, the resting target is answered for: 429 with the wait left, no call.
    let response = ask(&daemon, limited, false).await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=30).contains(&wait), "{wait}");
    assert_eq!(calls(), 2);
}

/// A target skipped because it rests is part of the answer: a chain whose other targets fail
/// gets 429 with the resting target's earlier wait, or 502 naming the skip, not the last
/// target's error as if it had been the only one.
#[tokio::test]
async fn a_resting_target_skipped_in_a_chain_is_named_in_its_error() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let resting = "fake/status-429-retry-10";
    assert_eq!(ask(&daemon, resting, false).await.status(), 429);

    let response = ask(
        &daemon,
        &format!("{resting}|fake/status-429-retry-60"),
        false,
    )
    .await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=10).contains(&wait), "{wait}");

    let response = ask(&daemon, &format!("{resting}|fake/status-503"), false).await;
    assert_eq!(response.status(), 502);
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let error: Value = response.json().await.unwrap();
    // The log line (and the row) say what the client was told, not the last upstream's words.
    assert_eq!(daemon.request_log(&id)["error"], error["error"]["message"]);
    assert_eq!(error["error"]["code"], "all_attempts_failed");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("openrouter:{resting}: resting")),
        "{message}"
    );
    // Skipped, not called again.
    assert_eq!(
        models_asked(&fake).iter().filter(|m| *m == resting).count(),
        1
    );
}

/// A context-length error moves the request on without resting the model: the next, shorter
/// prompt is still sent to it.
#[tokio::test]
async fn context_length_errors_do_not_rest_the_model() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let chain = "fake/context-length|fake/echo";
    // One more than the failures in a row that rest a target (3).
    let rounds = 4;
    for _ in 0..rounds {
        let response = ask(&daemon, chain, false).await;
        assert_eq!(route_of(&response), "openrouter:fake/echo");
    }
    let asked = models_asked(&fake)
        .iter()
        .filter(|m| *m == "fake/context-length")
        .count();
    assert_eq!(asked, rounds);
}

#[tokio::test]
async fn failover_is_bounded_in_time() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        "limits:\n  first_byte_timeout: 300ms\n  total_timeout: 2s\n",
    );
    let started = std::time::Instant::now();
    let response = ask(
        &daemon,
        "fake/hang|openrouter:fake/hang|openrouter:fake/hang",
        true,
    )
    .await;
    assert!(response.status().is_server_error());
    assert!(started.elapsed() < Duration::from_secs(5));
}
