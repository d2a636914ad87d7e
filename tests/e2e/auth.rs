//! Proxy keys and open mode.

use serde_json::Value;

use crate::harness::{Daemon, Options, chat, client, command};

const KEYS: &str = "auth:\n  keys:\n    - { name: team-a, key_env: TEAM_A_KEY }\n";

#[tokio::test]
async fn keys_are_checked_and_named_in_the_log() {
    let daemon = Daemon::start(Options::config(KEYS).env("TEAM_A_KEY", "sk-team-a-secret"));
    let http = client();
    let url = daemon.url("/v1/chat/completions");
    let missing = http
        .post(&url)
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    let wrong = http
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong: Value = wrong.json().await.unwrap();
    // A key outside ASCII was still sent: refused like any wrong key, not as missing.
    let non_ascii = http
        .post(&url)
        .header(
            "x-api-key",
            reqwest::header::HeaderValue::from_bytes("sk-t\u{e9}am".as_bytes()).unwrap(),
        )
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(non_ascii.status(), 401);
    let non_ascii: Value = non_ascii.json().await.unwrap();
    assert_ne!(wrong["error"]["code"], "missing_api_key");
    assert_eq!(non_ascii["error"], wrong["error"]);
    let bearer = http
        .post(&url)
        .bearer_auth("sk-team-a-secret")
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    let id = bearer.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let header = http
        .post(&url)
        .header("x-api-key", "sk-team-a-secret")
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(header.status(), 200);
    assert_eq!(daemon.request_log(&id)["key"], "team-a");
    let logs = daemon.logs().join("\n");
    assert!(!logs.contains("sk-team-a-secret") && !logs.contains("sk-wrong"));
}

#[tokio::test]
async fn every_client_route_needs_a_key_and_every_answer_is_stamped() {
    let daemon = Daemon::start(Options::config(KEYS).env("TEAM_A_KEY", "sk-team-a-secret"));
    let http = client();
    // Each has a request id, `x-orproxy-route: none` and its log line.
    let stamped = |response: &reqwest::Response| {
        let headers = response.headers();
        assert_eq!(headers["x-orproxy-route"], "none");
        let id = headers["x-orproxy-request-id"].to_str().unwrap();
        let line = daemon.request_log(id);
        assert_eq!(line["status"], response.status().as_u16(), "{line}");
        assert!(
            line["request"].as_str().unwrap().starts_with("GET /v1/"),
            "{line}"
        );
    };
    let anonymous = http.get(daemon.url("/v1/models")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    stamped(&anonymous);
    let listed = http
        .get(daemon.url("/v1/models"))
        .bearer_auth("sk-team-a-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    stamped(&listed);
    let unknown = http.get(daemon.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    stamped(&unknown);
    let wrong_method = http
        .get(daemon.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    stamped(&wrong_method);
    let body: Value = wrong_method.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[test]
fn open_mode_refuses_a_public_address_unless_allowed() {
    let output = command()
        .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:0 without auth"),
        "{stderr}"
    );

    let daemon = Daemon::start(
        Options::config("auth:\n  allow_open: true\n")
            .arg("--listen")
            .arg("0.0.0.0:0"),
    );
    assert!(daemon.addr.ip().is_unspecified());
}

#[test]
fn the_admin_api_stays_on_loopback_without_a_token() {
    let output = command()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("admin API"));
}
