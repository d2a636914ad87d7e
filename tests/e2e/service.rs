//! Running under systemd: the notify protocol, signals, journald-friendly logs.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use orproxy_testkit::FakeOpenRouter;

use crate::harness::{Daemon, Options, chat, client, command, daemon_for, events, temp_dir};

/// A socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notifications {
    socket: UnixDatagram,
    path: String,
}

impl Notifications {
    fn new() -> Self {
        let path = temp_dir().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Notifications {
            socket,
            path: path.display().to_string(),
        }
    }

    /// The next datagram, as text.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Skips watchdog pings until a datagram containing `what`.
    fn until(&self, what: &str) -> String {
        loop {
            let message = self.next();
            if message.contains(what) {
                return message;
            }
        }
    }
}

#[tokio::test]
async fn the_notify_protocol_is_spoken() {
    let notify = Notifications::new();
    let daemon = Daemon::start(
        Options::default()
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "400000"),
    );
    let ready = notify.until("READY=1");
    assert!(
        ready.contains(&format!("STATUS=Serving on {}", daemon.addr)),
        "{ready}"
    );
    assert!(ready.contains("table v1"), "{ready}");
    notify.until("WATCHDOG=1");

    daemon.signal("HUP");
    let reloading = notify.until("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = notify.until("READY=1");
    assert!(ready.contains("table v2"), "{ready}");

    daemon.terminate();
    notify.until("STOPPING=1");
}

#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let fake = FakeOpenRouter::start().await.unwrap();
    let mut daemon = daemon_for(&fake.base_url(), "limits:\n  shutdown_grace: 60s\n");
    let mut response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("fake/stall-after-2", "x", true))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap();
    daemon.terminate();
    daemon.wait_log(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Shutting down"))
    });
    let started = Instant::now();
    daemon.terminate();
    let (rest, _) = events(response).await;
    assert!(rest.last().unwrap().1.contains("shutting_down"), "{rest:?}");
    assert!(daemon.wait_exit().success());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn under_journald_text_lines_carry_no_timestamp() {
    use std::io::{BufRead, BufReader};
    let mut child = command()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "text",
        ])
        .env("JOURNAL_STREAM", "8:1234")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.contains("Ready."))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    let warning = lines
        .iter()
        .find(|l| l.contains("mock backend"))
        .expect("the mock warning");
    assert!(warning.trim_start().starts_with("WARN"), "{warning}");
}
