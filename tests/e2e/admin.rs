//! The admin API: token, status, routes without secrets, metrics.

use serde_json::Value;

use crate::harness::{Daemon, Options, chat, client};

#[tokio::test]
async fn admin_routes_need_the_token_and_never_show_secrets() {
    let daemon = Daemon::start(
        Options::config(
            "admin:\n  token_env: ADMIN_TOKEN\nbackends:\n  openrouter:\n    type: openrouter\n    api_keys_env: [K1, K2]\nauth:\n  keys:\n    - { name: team-a, key_env: TEAM_KEY }\n",
        )
        .env("ADMIN_TOKEN", "admin-secret-token")
        .env("K1", "sk-or-v1-first-secret")
        .env("K2", "sk-or-v1-second-secret")
        .env("TEAM_KEY", "sk-team-secret"),
    );
    let http = client();
    for path in ["/admin/status", "/admin/routes"] {
        assert_eq!(
            http.get(daemon.admin_url(path))
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{path}"
        );
        assert_eq!(
            http.get(daemon.admin_url(path))
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap()
                .status(),
            401,
            "{path}"
        );
    }
    assert_eq!(
        http.post(daemon.admin_url("/admin/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        http.get(daemon.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(daemon.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let routes = http
        .get(daemon.admin_url("/admin/routes"))
        .bearer_auth("admin-secret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(routes.status(), 200);
    let text = routes.text().await.unwrap();
    for secret in [
        "sk-or-v1-first-secret",
        "sk-or-v1-second-secret",
        "sk-team-secret",
        "admin-secret-token",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let routes: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        routes["backends"]["openrouter"]["keys"]["from_env"],
        serde_json::json!(["K1", "K2"])
    );
    assert_eq!(routes["auth"]["keys"], serde_json::json!(["team-a"]));
    let status: Value = http
        .get(daemon.admin_url("/admin/status"))
        .bearer_auth("admin-secret-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["table_version"], 1);
    assert_eq!(status["last_reload"]["result"], "ok");
    let db = daemon.state_dir.join("usage.db");
    assert_eq!(status["ledger"]["path"], db.display().to_string());
    assert_eq!(status["ledger"]["write_errors"], 0);
    assert!(!daemon.logs().join("\n").contains("secret"));
}

#[tokio::test]
async fn metrics_count_requests() {
    let daemon = Daemon::start(Options::default());
    let http = client();
    for _ in 0..3 {
        http.post(daemon.url("/v1/chat/completions"))
            .json(&chat("mock", "x", false))
            .send()
            .await
            .unwrap();
    }
    let text = daemon.metrics().await;
    assert!(
        text.contains("orproxy_requests_total{backend=\"mock\",model=\"other\",status=\"200\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("orproxy_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("orproxy_overhead_seconds_count 3"), "{text}");
    assert!(
        text.contains("orproxy_tokens_total{direction=\"out\"}"),
        "{text}"
    );
    // The cost is a counter in exact decimal USD: the ledger's total for the same requests.
    let usage = crate::ledger::usage(&daemon, "").await;
    let cost = usage["total"]["cost_usd"].as_str().unwrap();
    assert!(
        text.contains("# TYPE orproxy_cost_usd_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "orproxy_cost_usd_total{{backend=\"mock\",model=\"other\"}} {cost}\n"
        )),
        "{cost} {text}"
    );
    assert!(text.contains("orproxy_inflight_requests 0"), "{text}");
}

#[tokio::test]
async fn credentials_in_base_urls_are_masked_wherever_they_are_shown() {
    // Nothing listens on port 1: requests to either backend fail to connect, and say so.
    // (Credentials in the userinfo are refused at load: see the `check` below.)
    let config = "backends:\n  withtoken:\n    type: openai\n    base_url: http://127.0.0.1:1/api/v1?SECRETPASSWORD99\n  withquery:\n    type: openai\n    base_url: http://127.0.0.1:1/v1?api_key=SECRETQUERY77\ndefault_backend: withquery\n";
    let daemon = Daemon::start(Options::config(config));
    let http = client();
    let secrets = ["SECRETPASSWORD99", "SECRETQUERY77"];
    let mut shown = Vec::new();
    for model in ["withtoken:m", "withquery:m"] {
        let response = http
            .post(daemon.url("/v1/chat/completions"))
            .json(&chat(model, "x", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502, "{model}");
        let id = response.headers()["x-orproxy-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        shown.push(response.text().await.unwrap());
        daemon.request_log(&id);
    }
    let routes = http
        .get(daemon.admin_url("/admin/routes"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let parsed: Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(
        parsed["backends"]["withtoken"]["base_url"],
        "http://127.0.0.1:1/api/v1?***"
    );
    assert_eq!(
        parsed["backends"]["withquery"]["base_url"],
        "http://127.0.0.1:1/v1?api_key=***"
    );
    shown.push(routes);
    for (method, path) in [("GET", "/admin/status"), ("POST", "/admin/explain")] {
        let request = match method {
            "GET" => http.get(daemon.admin_url(path)),
            _ => http
                .post(daemon.admin_url(path))
                .json(&chat("withtoken:m", "x", false)),
        };
        shown.push(request.send().await.unwrap().text().await.unwrap());
    }
    shown.push(daemon.logs().join("\n"));
    for text in &shown {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }

    // `check` names a refused base URL without its credentials, and refuses credentials.
    for (base_url, expected) in [
        (
            "ftp://user:SECRETPASSWORD99@h/v1?key=SECRETQUERY77",
            "base_url `ftp://***@h/v1?key=***` must be",
        ),
        (
            "http://user:SECRETPASSWORD99@127.0.0.1:1/api/v1?key=SECRETQUERY77",
            "base_url must not hold a user name or password",
        ),
    ] {
        let config = crate::harness::temp_file(
            &format!("backends:\n  a:\n    type: openai\n    base_url: {base_url}\n"),
            ".yaml",
        );
        let output = crate::harness::command()
            .arg("check")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        for secret in secrets {
            assert!(!stderr.contains(secret), "{stderr}");
        }
    }
}

#[tokio::test]
async fn explain_refuses_a_bad_query_in_the_admin_error_shape() {
    let daemon = Daemon::start(Options::default());
    let http = client();
    let response = http
        .post(daemon.admin_url("/admin/explain?client_ip=notanip"))
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    assert_eq!(body["error"]["param"], "client_ip", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("client_ip") && message.contains("notanip"),
        "{body}"
    );

    let response = http
        .post(daemon.admin_url("/admin/explain?client_ip=2001:db8::1&key=k"))
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], 200, "{body}");
}

#[tokio::test]
async fn event_counters_are_exported_at_zero_from_the_start() {
    let daemon = Daemon::start(Options::config(
        "budgets:\n  - { name: cap, scope: global, limit_usd: 10, period: day }\n  - { name: spill, scope: model, limit_usd: 1, period: month, action: fallback, fallback: \"mock:cheap\" }\n",
    ));
    let text = daemon.metrics().await;
    for line in [
        "orproxy_reloads_total{result=\"ok\"} 0",
        "orproxy_reloads_total{result=\"error\"} 0",
        "orproxy_failovers_total 0",
        "orproxy_budget_rejections_total{budget=\"cap\",action=\"reject\"} 0",
        "orproxy_budget_rejections_total{budget=\"spill\",action=\"fallback\"} 0",
        "orproxy_budget_rejections_total{budget=\"spill\",action=\"reject\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
}

/// Requests in quick succession make the worker poll for the next one instead of sleeping
/// (`limits.idle_poll`), and `/metrics` says for how long; `0` turns it off.
#[tokio::test]
async fn close_requests_are_polled_for_unless_idle_poll_is_zero() {
    async fn polled(idle_poll: &str, shown_us: u64) -> f64 {
        let daemon = Daemon::start(Options::config(format!(
            "limits:\n  idle_poll: {idle_poll}\ndatabase:\n  enabled: false\n"
        )));
        let http = client();
        for _ in 0..400 {
            let response = http
                .post(daemon.url("/v1/chat/completions"))
                .json(&chat("mock", "x", false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
        let routes = daemon.admin_json("/admin/routes").await;
        assert_eq!(routes["limits"]["idle_poll_us"], shown_us, "{routes}");
        let text = daemon.metrics().await;
        let line = text
            .lines()
            .find(|l| l.starts_with("orproxy_idle_poll_seconds_total "))
            .unwrap_or_else(|| panic!("{text}"));
        line["orproxy_idle_poll_seconds_total ".len()..]
            .parse()
            .unwrap()
    }
    // The longest window: a debug build's requests come that close (about every 0.5 ms here)
    // often enough even on a loaded machine.
    assert!(polled("1ms", 1000).await > 0.0);
    assert_eq!(polled("0", 0).await, 0.0);
}
