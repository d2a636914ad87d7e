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
    let text = http
        .get(daemon.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    assert!(
        text.contains("orproxy_cost_usd_total{backend=\"mock\",model=\"other\"}"),
        "{text}"
    );
    assert!(text.contains("orproxy_inflight_requests 0"), "{text}");
}
