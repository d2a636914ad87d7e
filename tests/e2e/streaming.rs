//! Streamed chat completions: a true relay, held until content, never silently truncated.

use std::time::Duration;

use orproxy_testkit::{FAKE_API_KEY, FakeOpenRouter};
use serde_json::Value;

use crate::harness::{Daemon, chat, client, daemon_for, events};

/// The data events' JSON with the per-generation fields removed, so two runs compare equal.
fn normalized(events: &[(std::time::Instant, String)]) -> Vec<Value> {
    events
        .iter()
        .filter(|(_, e)| e.starts_with("data: {"))
        .map(|(_, e)| {
            let mut v: Value = serde_json::from_str(e.trim_start_matches("data: ").trim()).unwrap();
            if let Some(obj) = v.as_object_mut() {
                obj.remove("id");
                obj.remove("created");
                if let Some(usage) = obj.get_mut("usage").and_then(Value::as_object_mut) {
                    usage.remove("cost");
                }
            }
            v
        })
        .collect()
}

#[tokio::test]
async fn events_are_relayed_unchanged_and_in_order() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let http = client();
    let body = chat("openai/gpt-4o", "one two three four five", true);
    let proxied = http
        .post(daemon.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    assert_eq!(proxied.headers()["content-type"], "text/event-stream");
    assert_eq!(
        proxied.headers()["x-orproxy-route"],
        "openrouter:openai/gpt-4o"
    );
    let id = proxied.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (via_proxy, error) = events(proxied).await;
    assert_eq!(error, None);
    let direct = http
        .post(format!("{}/chat/completions", fake.base_url()))
        .bearer_auth(FAKE_API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (direct, _) = events(direct).await;

    // The upstream's keep-alives came before content: they are not forwarded.
    assert!(direct[0].1.starts_with(": OPENROUTER PROCESSING"));
    assert!(
        via_proxy.iter().all(|(_, e)| !e.starts_with(':')),
        "{via_proxy:?}"
    );
    // Every data event arrives, unchanged, in order: preamble, content, finish, usage, [DONE].
    assert_eq!(normalized(&via_proxy), normalized(&direct));
    assert_eq!(via_proxy.last().unwrap().1, "data: [DONE]\n\n");
    let usage_chunk = &normalized(&via_proxy)[normalized(&via_proxy).len() - 1];
    assert_eq!(usage_chunk["choices"], serde_json::json!([]));
    assert!(usage_chunk["usage"]["total_tokens"].as_u64().unwrap() > 0);
    // Bytes, not just JSON: each event is exactly `data: <json>\n\n` as the upstream wrote it.
    for (_, e) in &via_proxy {
        assert!(
            e.starts_with("data: ") && e.ends_with("\n\n") && !e.contains("\r"),
            "{e:?}"
        );
    }
    let log = daemon.request_log(&id);
    assert_eq!(log["outcome"], "ok");
    assert_eq!(log["stream"], true);
    assert_eq!(
        log["cost_nanos"].as_i64(),
        orproxy_plugin::usage::usd_to_nanos(&fake.billing().pop().unwrap().cost)
    );
}

#[tokio::test]
async fn events_are_forwarded_while_the_upstream_is_still_busy() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  idle_timeout: 60s\n");
    // The upstream sends three content events and then goes silent: a buffering proxy would
    // deliver nothing, a true relay delivers all three at once.
    let mut response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/stall-after-3", "x", true))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while content_events(&seen) < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("events held back")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!seen.contains("[DONE]"));
}

#[tokio::test]
async fn a_slow_upstream_is_relayed_event_by_event() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/slow-150", "a b c d", true))
        .send()
        .await
        .unwrap();
    let (got, error) = events(response).await;
    assert_eq!(error, None);
    let data: Vec<_> = got
        .iter()
        .filter(|(_, e)| e.contains("\"content\":\""))
        .collect();
    assert!(data.len() >= 4, "{got:?}");
    // Each event is delayed 150 ms upstream; had orproxy buffered, they would arrive together.
    let spread = data.last().unwrap().0 - data.first().unwrap().0;
    assert!(
        spread >= Duration::from_millis(300),
        "events arrived together: {spread:?}"
    );
}

#[tokio::test]
async fn orproxy_commits_with_its_own_keepalives_when_content_is_slow() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  commit_after: 200ms\n");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/keepalive-800", "hi", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (got, error) = events(response).await;
    assert_eq!(error, None);
    let first_data = got
        .iter()
        .position(|(_, e)| e.starts_with("data:"))
        .unwrap();
    assert!(first_data >= 1, "{got:?}");
    for (_, e) in &got[..first_data] {
        assert_eq!(
            e, ": keep-alive\n\n",
            "only orproxy's own keep-alives before content"
        );
    }
    assert_eq!(got.last().unwrap().1, "data: [DONE]\n\n");
}

#[tokio::test]
async fn an_upstream_error_event_after_content_reaches_the_client() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/midstream-error-after-2", "x", true))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (got, _) = events(response).await;
    let error = got
        .iter()
        .find(|(_, e)| e.contains("\"error\""))
        .expect("error event");
    assert!(error.1.contains("\"code\":502"), "{error:?}");
    assert_eq!(daemon.request_log(&id)["outcome"], "midstream_error");
}

#[tokio::test]
async fn a_cut_stream_ends_with_an_error_event_not_done() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/cut-after-3", "x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (got, _) = events(response).await;
    let last = &got.last().unwrap().1;
    assert!(last.starts_with("data: {\"error\""), "{got:?}");
    assert!(last.contains("upstream_unreachable"), "{last}");
    assert!(got.iter().all(|(_, e)| !e.contains("[DONE]")));
    let all: String = got.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(content_events(&all), 3);
    let log = daemon.request_log(&id);
    assert_eq!(log["outcome"], "midstream_error");
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_idle_timeout_event() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  idle_timeout: 300ms\n");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/stall-after-2", "x", true))
        .send()
        .await
        .unwrap();
    let (got, _) = events(response).await;
    let last = &got.last().unwrap().1;
    assert!(last.contains("\"code\":\"idle_timeout\""), "{got:?}");
    // The stalled upstream request is cancelled, not left hanging.
    wait_until(|| fake.requests().iter().any(|r| r.disconnected)).await;
}

#[tokio::test]
async fn a_finished_answer_without_done_is_complete() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/no-done", "a b", true))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (got, error) = events(response).await;
    assert_eq!(error, None);
    assert!(got.iter().all(|(_, e)| !e.contains("\"error\"")), "{got:?}");
    assert_eq!(daemon.request_log(&id)["outcome"], "ok");
}

#[tokio::test]
async fn errors_before_content_are_plain_json_with_the_upstream_status() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/status-429-retry-4", "x", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "4");
    assert_eq!(
        response.headers()["x-orproxy-route"],
        "openrouter:fake/status-429-retry-4"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], 429);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstream_stream() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let mut response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/stall-after-2", "x", true))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.chunk().await.unwrap();
    drop(response);
    wait_until(|| fake.requests().iter().any(|r| r.disconnected)).await;
    assert_eq!(daemon.request_log(&id)["outcome"], "client_disconnected");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_a_plain_request() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "");
    let pending = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/hang", "x", false))
        .send();
    // Give up as soon as the upstream has the request: that is the disconnect under test.
    let upstream_has_it = async {
        wait_until(|| !fake.requests().is_empty()).await;
    };
    tokio::select! {
        _ = pending => panic!("a hanging upstream cannot answer"),
        _ = upstream_has_it => {}
    }
    wait_until(|| fake.requests().iter().any(|r| r.disconnected)).await;
    let log = daemon
        .wait_log(|v| v["message"] == "Request finished." && v["outcome"] == "client_disconnected");
    // The attempt in flight is listed with why it ended.
    assert_eq!(
        log["attempts"], "openrouter:fake/hang=client_disconnected",
        "{log}"
    );
    assert_eq!(log["status"], 499, "{log}");
}

/// How many chunks in `sse` carry non-empty text content.
fn content_events(sse: &str) -> usize {
    sse.matches("\"content\":\"").count() - sse.matches("\"content\":\"\"").count()
}

/// Polls an observable condition (bounded): the fake records disconnects after the fact.
pub async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a stream request for `model` on a raw connection whose receive buffer is fixed at
/// `recv_buffer` bytes (the kernel would otherwise grow it to hold much of the stream).
async fn stream_request(daemon: &Daemon, model: &str, recv_buffer: u32) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(recv_buffer).unwrap();
    let mut socket = socket.connect(daemon.addr).await.unwrap();
    let body = serde_json::to_string(&chat(model, "x", true)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all((head + &body).as_bytes()).await.unwrap();
    socket
}

/// Sends a stream request for about 25 MB of events (far more than socket buffers hold) on a
/// connection with a small receive buffer, and reads nothing.
async fn unread_stream(daemon: &Daemon) -> tokio::net::TcpStream {
    stream_request(daemon, "fake/events-100000", 4096).await
}

/// Whether a log line so far contains `text` (checked without blocking: fake upstreams run on
/// the test's runtime).
fn logged(daemon: &Daemon, text: &str) -> bool {
    daemon.logs().iter().any(|l| l.contains(text))
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_client_timeout() {
    use tokio::io::AsyncReadExt;
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  client_timeout: 500ms\n");
    let mut socket = unread_stream(&daemon).await;
    let mut status = [0u8; 12];
    socket.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    // The client reads no more: the relay gives up (dropping the upstream request) and the
    // row says why. (The fake may well have written its whole answer into the kernel's
    // buffers by then, so its side of the disconnect is not a reliable sign.)
    wait_until(|| logged(&daemon, "\"outcome\":\"client_disconnected\"")).await;
    let log = daemon
        .wait_log(|v| v["message"] == "Request finished." && v["outcome"] == "client_disconnected");
    assert_eq!(log["status"], 200, "{log}");
    drop(socket);
}

#[tokio::test]
async fn a_stream_the_client_reads_too_slowly_ends_at_the_total_timeout_without_a_clean_end() {
    use tokio::io::AsyncReadExt;
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(
        &fake.base_url(),
        "limits:\n  client_timeout: 20s\n  total_timeout: 6s\n",
    );
    // The socket buffers fill within a second or two, well before the total timeout.
    let mut socket = unread_stream(&daemon).await;
    wait_until(|| logged(&daemon, "\"message\":\"Request finished.\"")).await;
    let log = daemon.wait_log(|v| v["message"] == "Request finished.");
    assert_eq!(log["outcome"], "client_disconnected", "{log}");
    assert_eq!(
        log["attempts"], "openrouter:fake/events-100000=client_timeout",
        "{log}"
    );
    // What the client can still read stops short: no last chunk, as a cut stream must.
    let mut received = Vec::new();
    let _ = socket.read_to_end(&mut received).await;
    assert!(received.starts_with(b"HTTP/1.1 200"));
    assert!(!received.ends_with(b"\r\n0\r\n\r\n"), "a clean end");
    assert!(!String::from_utf8_lossy(&received).contains("[DONE]"));
}

#[tokio::test]
async fn a_client_reading_a_large_stream_steadily_is_never_taken_for_a_stalled_one() {
    use tokio::io::AsyncReadExt;
    let fake = FakeOpenRouter::start().await.unwrap();
    let daemon = daemon_for(&fake.base_url(), "limits:\n  client_timeout: 500ms\n");
    // About 5.6 MB: more than orproxy's queue and the socket buffers together.
    let mut socket = stream_request(&daemon, "fake/events-20000", 64 << 10).await;
    // About 1 MB/s, never pausing longer than 20 ms: slow, but never 500 ms without reading.
    // (A kernel send buffer grown to megabytes is writable again only once a third of it has
    // drained: over a second at this pace.)
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
        if received.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(16)).await;
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.contains("data: [DONE]"),
        "cut after {} bytes",
        received.len()
    );
    let log = daemon.wait_log(|v| v["message"] == "Request finished.");
    assert_eq!(log["outcome"], "ok", "{log}");
}
