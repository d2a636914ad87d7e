//! Non-streamed chat completions, models, flags.

use orproxy_testkit::{FAKE_API_KEY, FakeOpenRouter, FakeOptions};
use serde_json::{Value, json};

use crate::harness::{Daemon, Options, chat, client, daemon_for, openrouter_config};

#[tokio::test]
async fn with_no_config_and_no_key_the_mock_answers() {
    let daemon = Daemon::start(Options::default());
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("serving the built-in mock backend"))
    );
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("mock", "ping pong", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-orproxy-route"], "mock:mock");
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "ping pong");
    assert!(body["usage"]["cost"].as_f64().unwrap() > 0.0);
    let log = daemon.request_log(&id);
    assert_eq!(log["outcome"], "ok");
    assert_eq!(log["status"], 200);
}

#[tokio::test]
async fn openrouter_requests_pass_through_untouched_with_key_and_attribution() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        "identity:\n  referer: { mode: override, override_value: \"https://example.org\" }\n  title: { mode: override, override_value: \"MyApp\" }\n",
    );
    let body = json!({
        "model": "openai/gpt-4o",
        "messages": [{"role": "user", "content": "hello world"}],
        "provider": {"order": ["openai"], "allow_fallbacks": false},
        "transforms": ["middle-out"],
        "reasoning": {"effort": "low"},
        "x_custom_field": {"nested": [1, 2.50, "three"]},
    });
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .header("authorization", "Bearer client-key-that-must-not-leak")
        .header("user-agent", "OpenAI/Python 3.54.0")
        .header("x-session-id", "sess-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:openai/gpt-4o"
    );
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo: hello world"
    );
    assert!(answer["id"].as_str().unwrap().starts_with("gen-"));

    let received = fake.requests().pop().unwrap();
    assert_eq!(received.path, "/api/v1/chat/completions");
    assert_eq!(
        received.json(),
        body,
        "every body field reaches the upstream unchanged"
    );
    assert_eq!(
        received.header("authorization"),
        Some(format!("Bearer {FAKE_API_KEY}").as_str())
    );
    assert_eq!(received.header("user-agent"), Some("OpenAI/Python 3.54.0"));
    assert_eq!(received.header("http-referer"), Some("https://example.org"));
    assert_eq!(received.header("x-title"), Some("MyApp"));
    assert_eq!(received.header("x-openrouter-title"), Some("MyApp"));
    assert_eq!(received.header("x-session-id"), Some("sess-1"));

    let log = daemon.request_log(&id);
    let billed = fake.billing().pop().unwrap();
    assert_eq!(log["tokens_in"], billed.prompt_tokens);
    assert_eq!(log["tokens_out"], billed.completion_tokens);
    assert_eq!(
        log["cost_nanos"].as_i64(),
        orproxy_plugin::usage::usd_to_nanos(&billed.cost)
    );
    assert!(
        !daemon
            .logs()
            .join("\n")
            .contains("client-key-that-must-not-leak")
    );
    assert!(!daemon.logs().join("\n").contains(FAKE_API_KEY));
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let http = client();
    // Streams too: the relay ends at `[DONE]`, before it has read the body's end.
    for stream in [false, true, false, true, true, false] {
        let response = http
            .post(daemon.url("/v1/chat/completions"))
            .json(&chat("openai/gpt-4o", "hi", stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert_eq!(fake.connections(), 1);
}

/// Over TLS the daemon takes HTTP/2 when the upstream offers it (ALPN): one connection per
/// worker carries requests sent together; an upstream that offers only HTTP/1.1 gets
/// kept-alive HTTP/1.1.
#[tokio::test]
async fn https_upstreams_get_http2_when_they_offer_it() {
    for (offered, version) in [
        (&[&b"h2"[..], b"http/1.1"][..], http::Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], http::Version::HTTP_11),
    ] {
        let fake = FakeOpenRouter::start_with(FakeOptions {
            tls: Some(orproxy_testkit::tls::server_config(offered)),
            ..FakeOptions::default()
        })
        .await
        .unwrap();
        assert!(fake.base_url().starts_with("https://127.0.0.1:"));
        let daemon = Daemon::start(
            Options::config(openrouter_config(&fake.base_url(), ""))
                .env("FAKE_OR_KEY", FAKE_API_KEY)
                .env("SSL_CERT_FILE", orproxy_testkit::tls::CA_FILE),
        );
        let http = client();
        let call = |stream: bool| {
            let request = http.post(daemon.url("/v1/chat/completions")).json(&chat(
                "openai/gpt-4o",
                "hi",
                stream,
            ));
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 200);
                response.text().await.unwrap()
            }
        };
        assert!(call(false).await.contains("\"choices\""));
        // Together, once the connection is open: HTTP/2 sends them on it side by side,
        // HTTP/1.1 needs a connection each.
        let (_, streamed, _) = tokio::join!(call(false), call(true), call(false));
        assert!(streamed.ends_with("data: [DONE]\n\n"), "{streamed}");
        for _ in 0..3 {
            call(true).await;
        }
        let requests = fake.requests();
        assert_eq!(requests.len(), 7);
        assert!(requests.iter().all(|r| r.version == version), "{version:?}");
        // Each worker of the daemon (one per core) keeps its own connections.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let most = match version {
            http::Version::HTTP_2 => workers,
            _ => 3 * workers,
        };
        assert!(fake.connections() <= most, "{}", fake.connections());
    }
}

/// Reads from `stream` into `seen` until a request's head is complete: where its body starts,
/// and its `content-length`.
async fn read_head(
    stream: &mut tokio::net::TcpStream,
    seen: &mut Vec<u8>,
) -> Option<(usize, usize)> {
    let head_end = loop {
        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(stream, seen).await?;
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((head_end, length))
}

/// Reads from `stream` until `seen` holds `end` bytes.
async fn read_body(
    stream: &mut tokio::net::TcpStream,
    seen: &mut Vec<u8>,
    end: usize,
) -> Option<()> {
    while seen.len() < end {
        read_more(stream, seen).await?;
    }
    Some(())
}

async fn read_more(stream: &mut tokio::net::TcpStream, seen: &mut Vec<u8>) -> Option<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0; 65536];
    match stream.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            seen.extend_from_slice(&buf[..n]);
            Some(())
        }
    }
}

/// A kept-alive chat completion answering `content`, as an upstream writes it.
fn raw_answer(content: &str) -> String {
    let body = json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
    .to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
}

/// An upstream that closes each connection after one answer, though it said keep-alive: the
/// closed connection is not used again, and every request gets an answer.
#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_used_again() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                // The head and the body of one request, then one answer, then closed.
                let mut seen = Vec::new();
                let Some((head_end, length)) = read_head(&mut stream, &mut seen).await else {
                    return;
                };
                if read_body(&mut stream, &mut seen, head_end + length)
                    .await
                    .is_none()
                {
                    return;
                }
                let _ = stream.write_all(raw_answer("once").as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let daemon = Daemon::start(Options::config(format!(
        "backends:\n  closing:\n    type: openai\n    base_url: http://127.0.0.1:{port}/v1\ndefault_backend: closing\n"
    )));
    let http = client();
    for _ in 0..4 {
        let response = http
            .post(daemon.url("/v1/chat/completions"))
            .json(&chat("m", "hi", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("once"));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
}

/// An upstream that answers a large request at once without reading its body, and then reads
/// nothing more on that connection: the connection, still sending, is not waited on by the
/// next request, which goes out on a new one.
#[tokio::test]
async fn a_connection_still_sending_is_not_waited_on() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let held_tx = held_tx.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let Some((head_end, length)) = read_head(&mut stream, &mut seen).await else {
                    return;
                };
                let large = length > 1 << 20;
                if !large
                    && read_body(&mut stream, &mut seen, head_end + length)
                        .await
                        .is_none()
                {
                    return;
                }
                let _ = stream.write_all(raw_answer("early").as_bytes()).await;
                if large {
                    // Kept open and never read again, until the test ends.
                    let _ = held_tx.send(stream);
                }
            });
        }
    });
    let daemon = Daemon::start(Options::config(format!(
        "backends:\n  early:\n    type: openai\n    base_url: http://127.0.0.1:{port}/v1\ndefault_backend: early\nlimits:\n  first_byte_timeout: 5s\n"
    )));
    let http = client();
    let large = http
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("m", &"x".repeat(24 << 20), false))
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 200);
    assert!(large.text().await.unwrap().contains("early"));
    let held = held_rx.recv().await.unwrap();
    let response = http
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("m", "hi", false))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    drop(held);
}

#[tokio::test]
async fn default_backend_and_force_model_flags() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = Daemon::start(
        Options::default()
            .env("OPENROUTER_API_KEY", FAKE_API_KEY)
            .arg("--default-backend")
            .arg("openrouter")
            .arg("--force-model")
            .arg("anthropic/claude-3-5-sonnet")
            .arg("--config")
            .arg(
                &crate::harness::temp_file(
                    &format!(
                        "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n",
                        fake.base_url()
                    ),
                    ".yaml",
                )
                .display()
                .to_string(),
            ),
    );
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("gpt-4o", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:anthropic/claude-3-5-sonnet"
    );
    assert_eq!(
        fake.requests().pop().unwrap().json()["model"],
        "anthropic/claude-3-5-sonnet"
    );
}

#[tokio::test]
async fn backend_prefix_routes_to_another_backend() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("mock:anything", "routed", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-orproxy-route"], "mock:anything");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "routed");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn models_lists_every_backend() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let list: Value = client()
        .get(daemon.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"openai/gpt-4o"), "{ids:?}");
    assert!(ids.contains(&"mock:mock"), "{ids:?}");
    // The public model list is fetched without the key.
    let listing = fake
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/api/v1/models"))
        .unwrap();
    assert_eq!(listing.header("authorization"), None);
}

#[tokio::test]
async fn one_listed_model_is_retrieved_by_its_id() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    // SDKs send the id's slash percent-encoded; a raw slash works too.
    for (path, id) in [
        ("/v1/models/openai%2Fgpt-4o", "openai/gpt-4o"),
        ("/v1/models/openai/gpt-4o", "openai/gpt-4o"),
        ("/v1/models/mock:mock", "mock:mock"),
    ] {
        let response = client().get(daemon.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let model: Value = response.json().await.unwrap();
        assert_eq!(model["id"], id);
        assert_eq!(model["object"], "model");
    }
    let response = client()
        .get(daemon.url("/v1/models/no/such-model"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_backend_failing_to_list_its_models_is_not_asked_on_every_listing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A backend that takes connections and closes them unanswered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let daemon = Daemon::start(Options::config(format!(
        "backends:\n  broken:\n    type: openai\n    base_url: http://127.0.0.1:{port}/v1\n"
    )));
    for _ in 0..3 {
        let response = client().get(daemon.url("/v1/models")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    // One listing asked it (the client may retry a connection closed unanswered once).
    let asked = accepted.load(Ordering::SeqCst);
    assert!((1..=2).contains(&asked), "{asked} connections");
}

#[tokio::test]
async fn openai_compatible_backend() {
    let fake = orproxy_testkit::FakeOpenAi::start().await.unwrap();
    let daemon = Daemon::start(Options::config(format!(
        "backends:\n  local:\n    type: openai\n    base_url: {}\ndefault_backend: local\n",
        fake.base_url()
    )));
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("llama3", "over there", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: over there");
    let received = fake.requests().pop().unwrap();
    assert_eq!(received.path, "/v1/chat/completions");
    assert_eq!(received.header("authorization"), None);
}

#[tokio::test]
async fn the_admin_listener_answers_health_checks() {
    let daemon = Daemon::start(Options::default());
    let response = client()
        .get(daemon.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let missing = client()
        .get(daemon.admin_url("/admin/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
