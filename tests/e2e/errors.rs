//! Errors: OpenAI-shaped, with the statuses of SPEC §7; upstream errors relayed as they came.

use orproxy_testkit::FakeOpenRouter;
use serde_json::Value;

use crate::harness::{Daemon, Options, chat, client, daemon_for};

async fn post_raw(daemon: &Daemon, body: &'static str) -> (u16, Value) {
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-orproxy-request-id"));
    assert!(response.headers().contains_key("x-orproxy-route"));
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn bad_requests_are_400_naming_the_fault() {
    let daemon = Daemon::start(Options::default());
    let (status, body) = post_raw(&daemon, "{\"model\": \"mock\", \"messages\": [").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1 column"),
        "{body}"
    );

    let (status, body) = post_raw(&daemon, "{\"messages\": []}").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("missing_model"))
    );

    let (status, body) = post_raw(&daemon, "{\"model\": \"mock:\"}").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_model"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`mock:`"),
        "{body}"
    );

    let (status, body) = post_raw(&daemon, "{\"model\": \"mock\", \"stream\": \"yes\"}").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`stream`"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_backends_are_404() {
    let daemon = Daemon::start(Options::default());
    let (status, body) = post_raw(&daemon, "{\"model\": \"nowhere:gpt-4o\"}").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "unknown_backend");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("known backends: mock"),
        "{body}"
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let daemon = Daemon::start(Options::config("limits:\n  max_body_bytes: 1000\n"));
    let big = chat("mock", &"x".repeat(2000), false);
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");
    // The daemon keeps serving.
    let ok = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("mock", "small", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn upstream_errors_keep_status_body_and_rate_limit_headers() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let http = client();
    for (model, status) in [
        ("fake/status-402", 402),
        ("fake/status-429-retry-3", 429),
        ("fake/status-502", 502),
        ("fake/status-503", 503),
        ("fake/content-policy", 400),
    ] {
        let via = http
            .post(daemon.url("/v1/chat/completions"))
            .json(&chat(model, "x", false))
            .send()
            .await
            .unwrap();
        let direct = http
            .post(format!("{}/chat/completions", fake.base_url()))
            .bearer_auth(orproxy_testkit::FAKE_API_KEY)
            .json(&chat(model, "x", false))
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), status, "{model}");
        assert_eq!(
            via.headers().get("retry-after"),
            direct.headers().get("retry-after"),
            "{model}"
        );
        assert_eq!(
            via.headers().get("x-ratelimit-limit"),
            direct.headers().get("x-ratelimit-limit"),
            "{model}"
        );
        let via_body: Value = via.json().await.unwrap();
        let direct_body: Value = direct.json().await.unwrap();
        assert_eq!(
            via_body["error"]["message"], direct_body["error"]["message"],
            "{model}"
        );
        assert_eq!(via_body["error"]["code"], status, "{model}");
    }
}

#[tokio::test]
async fn an_error_inside_a_200_is_relayed_as_an_error() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/200-error", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let daemon = daemon_for(&format!("http://127.0.0.1:{port}/api/v1"), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("openai/gpt-4o", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn a_reset_connection_is_502() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/reset", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
}

#[tokio::test]
async fn each_timeout_names_its_limit() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  first_byte_timeout: 300ms\n");
    let started = std::time::Instant::now();
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/hang", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "first_byte_timeout");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.first_byte_timeout (300ms)"),
        "{body}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    let daemon = daemon_for(&fake.base_url(), "limits:\n  total_timeout: 400ms\n");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/hang", "x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "total_timeout");

    let daemon = daemon_for(&fake.base_url(), "limits:\n  first_byte_timeout: 300ms\n");
    // Keep-alives are not content: a stream that only sends them times out too.
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/keepalive-5000", "x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
}

/// A listener whose accept queue is full, with the connections that fill it: further SYNs
/// are dropped and a connect hangs until its timeout.
async fn unreachable() -> (
    tokio::net::TcpListener,
    std::net::SocketAddr,
    Vec<tokio::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..3 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    (listener, addr, fillers)
}

#[tokio::test]
async fn a_connect_timeout_is_its_own_error() {
    let (listener, addr, _fillers) = unreachable().await;
    let daemon = daemon_for(
        &format!("http://{addr}/api/v1"),
        "limits:\n  connect_timeout: 200ms\n",
    );
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("openai/gpt-4o", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "connect_timeout", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.connect_timeout (200ms)"),
        "{body}"
    );
    drop(listener);
}

/// Requests that arrive while another opens the connection they would share wait for it; when
/// it cannot be opened they fail with its error at once, not after a connect timeout each.
#[tokio::test]
async fn requests_waiting_on_a_connection_that_cannot_open_fail_with_it() {
    let (listener, addr, _fillers) = unreachable().await;
    // Waiting for a first connect timeout and then spending another would pass the first-byte
    // limit: a request that did so would fail with `first_byte_timeout`.
    let daemon = daemon_for(
        &format!("http://{addr}/api/v1"),
        "limits:\n  connect_timeout: 300ms\n  first_byte_timeout: 500ms\n",
    );
    let http = client();
    let call = || {
        let request =
            http.post(daemon.url("/v1/chat/completions"))
                .json(&chat("openai/gpt-4o", "x", false));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert_eq!(status, 504, "{body}");
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let codes = tokio::join!(call(), call(), call(), call(), call(), call());
    for code in [codes.0, codes.1, codes.2, codes.3, codes.4, codes.5] {
        assert_eq!(code, "connect_timeout");
    }
    drop(listener);
}

/// Reads from `socket` until the daemon closes it; how long that took since `started`.
fn closed_after(
    mut socket: std::net::TcpStream,
    started: std::time::Instant,
) -> std::time::Duration {
    use std::io::Read;
    // Far longer than the configured timeout: a socket still open then fails the test.
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
}

#[tokio::test]
async fn clients_silent_before_or_within_a_request_are_cut_off_after_the_client_timeout() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let daemon = Daemon::start(Options::config(
        "limits:\n  client_timeout: 500ms\n".to_owned(),
    ));
    let timeout = std::time::Duration::from_millis(500);
    let cases: [(&str, std::net::SocketAddr, &[u8]); 5] = [
        ("nothing", daemon.addr, b""),
        // The start of an HTTP/2 preface (not offered: a head that never ends).
        ("a preface's start", daemon.addr, b"PRI * HT"),
        (
            "half a head",
            daemon.addr,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        ),
        ("nothing, admin", daemon.admin, b""),
        (
            "half a head, admin",
            daemon.admin,
            b"GET /healthz HTTP/1.1\r\n",
        ),
    ];
    let waits: Vec<_> = cases
        .iter()
        .map(|&(what, addr, sent)| {
            // Taken before the connection exists, so the daemon's clock cannot start earlier.
            let started = std::time::Instant::now();
            let mut socket = TcpStream::connect(addr).unwrap();
            socket.write_all(sent).unwrap();
            std::thread::spawn(move || (what, closed_after(socket, started)))
        })
        .collect();
    for wait in waits {
        let (what, after) = wait.join().unwrap();
        assert!(
            after >= timeout - std::time::Duration::from_millis(100),
            "{what}: {after:?}"
        );
    }

    // A request sent at once is served; the connection then closes once idle for as long.
    let mut socket = TcpStream::connect(daemon.addr).unwrap();
    let body = r#"{"model":"mock","messages":[{"role":"user","content":"hi"}]}"#;
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = [0u8; 12];
    socket.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    closed_after(socket, std::time::Instant::now());

    // A client that stops in the middle of its body gets a 408 naming the limit.
    let mut socket = TcpStream::connect(daemon.addr).unwrap();
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        .unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let started = std::time::Instant::now();
    let _ = socket.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(started.elapsed() >= timeout - std::time::Duration::from_millis(100));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("x-orproxy-request-id"), "{answer}");
    assert!(answer.contains("\"code\":\"client_timeout\""), "{answer}");
    assert!(answer.contains("limits.client_timeout"), "{answer}");

    // The daemon still serves new connections.
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("mock", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_client_that_leaves_while_sending_its_body_is_recorded_as_gone_not_as_a_bad_request() {
    use std::io::Write;
    let daemon = Daemon::start(Options::default());
    let mut socket = std::net::TcpStream::connect(daemon.addr).unwrap();
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        .unwrap();
    drop(socket);
    let log = daemon.wait_log(|v| v["message"] == "Request finished.");
    assert_eq!(log["status"], 499, "{log}");
    assert_eq!(log["outcome"], "client_disconnected", "{log}");
    // Nothing reached it: no time to first answer.
    assert!(log["ttfb_ms"].is_null(), "{log}");
}
