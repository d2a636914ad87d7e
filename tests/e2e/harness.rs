//! Starts the real `orproxy` binary on ephemeral ports and talks to it.
//!
//! Readiness is the daemon's own `Ready.` log line (JSON), never a sleep.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;

/// How long a daemon may take to start or stop before the test fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running daemon; killed when dropped.
pub struct Daemon {
    child: Child,
    /// Client API address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    config: Option<PathBuf>,
    /// `$STATE_DIRECTORY` of the daemon (its default database is `usage.db` in it).
    pub state_dir: PathBuf,
}

/// How to start a daemon.
#[derive(Default, Clone)]
pub struct Options {
    /// Config file text, written to a temporary file and passed with `--config`.
    pub config: Option<String>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The working directory (the test's own when `None`).
    pub cwd: Option<PathBuf>,
}

impl Options {
    pub fn config(yaml: impl Into<String>) -> Self {
        Options {
            config: Some(yaml.into()),
            ..Options::default()
        }
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_owned());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

static CONFIGS: AtomicUsize = AtomicUsize::new(0);

/// This test process's scratch directory, `$TMPDIR/orproxy-e2e-<pid>`: every file and
/// directory the tests write goes under it. A test binary has no hook to run at its exit, so
/// the first use removes the directories of earlier runs whose process is gone: what a run
/// leaves behind lasts until the next one.
fn scratch() -> &'static Path {
    static SCRATCH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SCRATCH.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let pid = name.to_str().and_then(|n| n.strip_prefix("orproxy-e2e-"));
                let gone = pid
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if gone {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let path = tmp.join(format!("orproxy-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the tests' scratch directory");
        path
    })
}

/// Writes `text` to a fresh temporary file.
pub fn temp_file(text: &str, suffix: &str) -> PathBuf {
    let n = CONFIGS.fetch_add(1, Ordering::Relaxed);
    let path = scratch().join(format!("file-{n}{suffix}"));
    let mut file = std::fs::File::create(&path).expect("create temp file");
    file.write_all(text.as_bytes()).expect("write temp file");
    path
}

/// A fresh empty temporary directory.
pub fn temp_dir() -> PathBuf {
    let n = CONFIGS.fetch_add(1, Ordering::Relaxed);
    let path = scratch().join(format!("dir-{n}"));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("create temp dir");
    path
}

/// The `orproxy` binary cargo built for this test run.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_orproxy")
}

/// A command for the binary with a clean, predictable environment.
pub fn command() -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_remove("OPENROUTER_API_KEY")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        // A daemon started this way keeps its usage database out of the source tree.
        .env("STATE_DIRECTORY", scratch().join("state"));
    cmd
}

impl Daemon {
    /// Starts a daemon and waits until it is ready.
    pub fn start(options: Options) -> Daemon {
        Self::try_start(options).unwrap_or_else(|logs| panic!("daemon did not start:\n{logs}"))
    }

    /// Starts a daemon; `Err` carries its output if it exited or never became ready.
    pub fn try_start(options: Options) -> Result<Daemon, String> {
        let config = options
            .config
            .as_deref()
            .map(|yaml| temp_file(yaml, ".yaml"));
        let mut cmd = command();
        for (flag, default) in [
            ("--listen", "127.0.0.1:0"),
            ("--admin-listen", "127.0.0.1:0"),
            ("--log-format", "json"),
        ] {
            if !options.args.iter().any(|a| a == flag) {
                cmd.args([flag, default]);
            }
        }
        if let Some(path) = &config {
            cmd.arg("--config").arg(path);
        }
        cmd.args(&options.args);
        // Each daemon keeps its usage database in its own directory (`$STATE_DIRECTORY`, as
        // under systemd) unless the test says where.
        let state_dir = temp_dir();
        cmd.env("STATE_DIRECTORY", &state_dir);
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &options.cwd {
            cmd.current_dir(dir);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn orproxy");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    let Ok(event) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if event["message"] == "Ready." {
                        let addr = event["listen"]
                            .as_str()
                            .and_then(|a| a.parse().ok())
                            .expect("listen address");
                        let admin = event["admin_listen"]
                            .as_str()
                            .and_then(|a| a.parse().ok())
                            .expect("admin address");
                        return Ok(Daemon {
                            child,
                            addr,
                            admin,
                            logs,
                            lines,
                            config,
                            state_dir,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(logs.lock().unwrap().join("\n"));
                }
            }
        }
    }

    /// `http://ADDR/PATH` on the client API.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://ADDR/PATH` on the admin API.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits for a JSON log line matching `pred` (including lines already seen).
    pub fn wait_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let parsed = |line: &str| serde_json::from_str::<Value>(line).ok();
        if let Some(found) = self
            .logs()
            .iter()
            .filter_map(|l| parsed(l))
            .find(|v| pred(v))
        {
            return found;
        }
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("log line not seen; logs:\n{}", self.logs().join("\n")));
            if let Some(v) = parsed(&line).filter(|v| pred(v)) {
                return v;
            }
        }
    }

    /// The `Request finished.` log record of the request with this id.
    pub fn request_log(&self, request_id: &str) -> Value {
        self.wait_log(|v| v["message"] == "Request finished." && v["request_id"] == request_id)
    }

    /// A call to the admin listener.
    async fn admin_call(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        client()
            .request(method, self.admin_url(path))
            .send()
            .await
            .unwrap()
    }

    /// `GET` of an admin route that answers JSON (the admin token sent when there is one).
    pub async fn admin_json(&self, path: &str) -> Value {
        let response = self.admin_call(reqwest::Method::GET, path).await;
        response.json().await.unwrap()
    }

    /// `GET /admin/status`.
    pub async fn status(&self) -> Value {
        self.admin_json("/admin/status").await
    }

    /// `POST /admin/reload`: the reload's outcome.
    pub async fn reload(&self) -> Value {
        let response = self
            .admin_call(reqwest::Method::POST, "/admin/reload")
            .await;
        response.json().await.unwrap()
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> String {
        let response = self.admin_call(reqwest::Method::GET, "/metrics").await;
        response.text().await.unwrap()
    }

    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "daemon did not exit; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.config {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// An HTTP client for tests (no pooling surprises: one client per test is fine).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().expect("client")
}

/// A config with one OpenRouter backend at `base_url` using the fake's key.
pub fn openrouter_config(base_url: &str, extra: &str) -> String {
    format!(
        "backends:\n  openrouter:\n    type: openrouter\n    base_url: {base_url}\n    api_key_env: FAKE_OR_KEY\ndefault_backend: openrouter\n{extra}"
    )
}

/// Starts a daemon in front of the fake OpenRouter at `base_url`.
pub fn daemon_for(base_url: &str, extra: &str) -> Daemon {
    Daemon::start(
        Options::config(openrouter_config(base_url, extra))
            .env("FAKE_OR_KEY", orproxy_testkit::FAKE_API_KEY),
    )
}

/// A chat request body.
pub fn chat(model: &str, text: &str, stream: bool) -> Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// Reads an SSE response into its raw events, each with the instant it arrived.
pub async fn events(
    mut response: reqwest::Response,
) -> (Vec<(std::time::Instant, String)>, Option<String>) {
    let mut buf = String::new();
    let mut out = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                buf.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    out.push((std::time::Instant::now(), event));
                }
            }
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}
