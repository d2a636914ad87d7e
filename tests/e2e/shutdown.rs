//! SIGTERM drains: in-flight streams finish, then the daemon exits 0.

use orproxy_testkit::FakeOpenRouter;

use crate::harness::{chat, client, daemon_for, events};
use crate::streaming::wait_until;

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(&fake.base_url(), "");
    let mut response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/slow-100", "a b c d e", true))
        .send()
        .await
        .unwrap();
    let first = response.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    daemon.terminate();
    daemon.wait_log(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Shutting down"))
    });
    let (rest, error) = events(response).await;
    assert_eq!(error, None);
    assert_eq!(rest.last().unwrap().1, "data: [DONE]\n\n");
    assert!(daemon.wait_exit().success());
    // New connections are refused once the daemon is gone.
    assert!(client().get(daemon.url("/v1/models")).send().await.is_err());
}

#[tokio::test]
async fn streams_still_open_after_the_grace_end_with_an_error_event() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(&fake.base_url(), "limits:\n  shutdown_grace: 300ms\n");
    let mut response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/stall-after-2", "x", true))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap();
    daemon.terminate();
    let (rest, _) = events(response).await;
    let last = &rest.last().expect("an error event").1;
    assert!(last.contains("\"code\":\"shutting_down\""), "{rest:?}");
    assert!(daemon.wait_exit().success());
    wait_until(|| fake.requests().iter().any(|r| r.disconnected)).await;
}

#[tokio::test]
async fn a_plain_request_still_running_after_the_grace_gets_an_answer_and_its_record() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(&fake.base_url(), "limits:\n  shutdown_grace: 300ms\n");
    let url = daemon.url("/v1/chat/completions");
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .json(&chat("fake/hang", "x", false))
            .send()
            .await
    });
    wait_until(|| !fake.requests().is_empty()).await;
    daemon.terminate();
    let response = pending
        .await
        .unwrap()
        .expect("an answer, not a closed connection");
    assert_eq!(response.status(), 503);
    let id = response.headers()["x-orproxy-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down");
    let line = daemon.request_log(&id);
    assert_eq!(
        (line["status"].as_u64(), line["outcome"].as_str()),
        (Some(503), Some("timeout"))
    );
    assert!(
        line["attempts"].as_str().unwrap().ends_with("=shutdown"),
        "{line}"
    );
    assert!(daemon.wait_exit().success());
}

#[tokio::test]
async fn connections_that_never_sent_a_request_do_not_hold_up_the_drain() {
    let mut daemon = crate::harness::Daemon::start(crate::harness::Options::config(
        "limits:\n  client_timeout: 60s\n  shutdown_grace: 20s\n".to_owned(),
    ));
    let silent = std::net::TcpStream::connect(daemon.addr).unwrap();
    let silent_admin = std::net::TcpStream::connect(daemon.admin).unwrap();
    // Served once both are open: the accept loops have taken them.
    let models = client().get(daemon.url("/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 200);
    let started = std::time::Instant::now();
    daemon.terminate();
    assert!(daemon.wait_exit().success());
    // Waiting on them would have taken the whole grace (20 s).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop((silent, silent_admin));
}

/// A client that stopped reading its stream still gets a usage row and a log line when the
/// grace runs out: the relay, blocked on the client's full queue, hears the end of the grace
/// too (it used to wait there for `client_timeout`, and the daemon exited first).
// Several threads: the fake upstream runs on this test's runtime while the client blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_stopped_reading_is_recorded_when_the_grace_runs_out() {
    use std::io::{Read, Write};

    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(
        &fake.base_url(),
        "limits:\n  shutdown_grace: 300ms\n  client_timeout: 60s\n",
    );
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&daemon.addr.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    let body = chat("fake/events-100000", "x", true).to_string();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: orproxy\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The head, then nothing more is read.
    let (stream, head) = tokio::task::spawn_blocking(move || {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        (stream, String::from_utf8(head).unwrap())
    })
    .await
    .unwrap();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-orproxy-request-id: "))
        .expect("a request id")
        .to_owned();
    daemon.terminate();
    assert!(daemon.wait_exit().success());
    let line = daemon.request_log(&id);
    assert_eq!(line["outcome"], "midstream_error", "{line}");
    assert!(
        line["attempts"].as_str().unwrap().ends_with("=shutdown"),
        "{line}"
    );
    drop(stream);
}
