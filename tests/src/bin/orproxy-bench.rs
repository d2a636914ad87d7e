//! `orproxy-bench`: what orproxy adds to a call, measured against the same call made directly
//! to the fake OpenRouter, side by side in one run.
//!
//! The fake upstream, the daemon and this load generator are separate processes on the same
//! machine and share its cores. That is deliberate, so that the numbers include the CPU the
//! relay takes from its neighbours, and the report says so. BENCHMARKS.md describes the
//! method and holds the latest results.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
use hyper_util::rt::TokioExecutor;
use memchr::memmem;
use orproxy_testkit::FAKE_API_KEY;
use serde_json::Value;

const USAGE: &str = "usage: orproxy-bench [--requests N] [--duration SECS] [--concurrency C] \
[--rate R] [--no-ledger | --ledger-only] [--writer-cpu N] [--baseline PATH] [--no-nginx] \
[--markdown PATH]

  --requests N      requests per path at concurrency 1, per mode (default 2000)
  --duration SECS   measured seconds per path under load, per mode (default 10)
  --concurrency C   connections under load (default 64)
  --rate R          the daemon with and without its usage database are also compared
                    at fixed rates: non-stream calls at R and R/2 per second, streams at
                    R/2 and R/4 (default 20000)
  --no-ledger       run orproxy without its usage database (database.enabled: false);
                    the comparisons of the daemon with and without it are then skipped
  --ledger-only     measure only those comparisons (the daemon with and without its
                    usage database, and a second one without it as the control,
                    saturated and at fixed rates)
  --writer-cpu N    give the daemons' usage writers CPU N to themselves and keep everything
                    else (this bench, the fake, the daemons' other threads) off it: the
                    ledger's cost when it has a core to spare (needs `taskset`)
  --baseline PATH   another orproxy binary (an earlier build, say), measured at
                    concurrency 1 beside this one's, in the same blocks
  --no-nginx        skip the reference path through nginx, measured at concurrency 1
                    when an `nginx` binary is found (PATH, /usr/sbin)
  --markdown PATH   also write the results (Markdown) to PATH";

/// Calls per path before anything is measured: connections, pools and caches are then warm.
const WARMUP_REQUESTS: usize = 200;
/// Sequential calls are made in blocks of this size, alternating paths, so that machine noise
/// (another process, a frequency change) lands on every path alike.
const BLOCK: usize = 200;
const LOAD_WARMUP: Duration = Duration::from_secs(1);
/// Unmeasured calls at the start of each turn under load ([`palindrome`]): a daemon that has
/// just sat idle starts slower than one that serves a second turn in a row.
const TURN_WARMUP: Duration = Duration::from_millis(500);
/// How long a child may take to become ready before the run is abandoned.
const PATIENCE: Duration = Duration::from_secs(30);
/// `Ready.` is an info line of `orproxy::daemon`, and readiness is read from it, with the usage
/// database's check of `orproxy::ledger`; those targets log only at startup and shutdown at
/// `info`, so this is `warn` for everything a request does.
const QUIET_LOG: &str = "warn,orproxy::daemon=info,orproxy::ledger=info";
/// The concurrency-1 rows of `--baseline`, of the measured daemon with idle polling off, and
/// of nginx.
const BASELINE_LABEL: &str = "baseline orproxy (RUST_LOG=warn)";
const SLEEPER_LABEL: &str = "orproxy, idle polling off (RUST_LOG=warn)";
const NGINX_LABEL: &str = "nginx reverse proxy (reference)";
const SSE_DONE: &[u8] = b"data: [DONE]";

const WHOLE_BODY: &str =
    r#"{"model":"fake/fast","messages":[{"role":"user","content":"Say something short."}]}"#;
const STREAM_BODY: &str = r#"{"model":"fake/fast","stream":true,"messages":[{"role":"user","content":"Say something short."}]}"#;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// Attaches what was being done to an error, keeping its whole cause chain in the message
/// (hyper's top-level errors alone say little more than "client error").
trait Context<T> {
    fn context(self, what: impl Display) -> Result<T>;
}

impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|e| {
            let mut msg = format!("{what}: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                msg.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            msg.into()
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Display) -> Result<T> {
        self.ok_or_else(|| what.to_string().into())
    }
}

struct Args {
    requests: usize,
    duration: Duration,
    concurrency: usize,
    markdown: Option<PathBuf>,
    ledger: bool,
    rate: usize,
    baseline: Option<PathBuf>,
    nginx: bool,
    ledger_only: bool,
    writer_cpu: Option<usize>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        requests: 2000,
        duration: Duration::from_secs(10),
        concurrency: 64,
        markdown: None,
        ledger: true,
        rate: 20_000,
        baseline: None,
        nginx: true,
        ledger_only: false,
        writer_cpu: None,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let positive = |name: &str, text: String| match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name} wants a positive integer, not {text:?}")),
        };
        match arg.as_str() {
            "--requests" => parsed.requests = positive("--requests", value("--requests")?)?,
            "--duration" => {
                let text = value("--duration")?;
                parsed.duration = match text.parse::<f64>() {
                    Ok(secs) if secs > 0.0 && secs.is_finite() => Duration::from_secs_f64(secs),
                    _ => return Err(format!("--duration wants seconds, not {text:?}")),
                };
            }
            "--concurrency" => {
                parsed.concurrency = positive("--concurrency", value("--concurrency")?)?;
            }
            "--markdown" => parsed.markdown = Some(PathBuf::from(value("--markdown")?)),
            "--rate" => parsed.rate = positive("--rate", value("--rate")?)?,
            "--no-ledger" => parsed.ledger = false,
            "--baseline" => parsed.baseline = Some(PathBuf::from(value("--baseline")?)),
            "--no-nginx" => parsed.nginx = false,
            "--ledger-only" => parsed.ledger_only = true,
            "--writer-cpu" => {
                let text = value("--writer-cpu")?;
                let cpu = text
                    .parse()
                    .map_err(|_| format!("--writer-cpu wants a CPU number, not {text:?}"))?;
                parsed.writer_cpu = Some(cpu);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if parsed.ledger_only && !parsed.ledger {
        return Err("--ledger-only and --no-ledger exclude each other".into());
    }
    if parsed.writer_cpu.is_some() && !parsed.ledger {
        return Err("--writer-cpu and --no-ledger exclude each other".into());
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, killed when dropped, whose output is read line by line by a thread for as
/// long as it runs: a full pipe would otherwise stall it, which at `info` logging happens
/// within seconds.
struct Proc {
    name: &'static str,
    child: Child,
    /// Output lines until the process is ready; dropped then, so they do not pile up.
    lines: Option<mpsc::Receiver<String>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Kept open only so the fake sees EOF, and exits, if this process dies without cleanup.
    _stdin: Option<ChildStdin>,
}

impl Proc {
    /// Spawns `cmd`, reading the output stream that `pick` takes from the child.
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        pick: impl FnOnce(&mut Child) -> Option<Box<dyn Read + Send>>,
    ) -> Result<Proc> {
        let mut child = cmd.spawn().context(format_args!("cannot start {name}"))?;
        let stdin = child.stdin.take();
        let output = pick(&mut child).context(format_args!("{name}: output is not piped"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let lines = drain_lines(output, Arc::clone(&tail));
        Ok(Proc {
            name,
            child,
            lines: Some(lines),
            tail,
            _stdin: stdin,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first output line for which `ready` returns a value; once only.
    fn wait_ready<T>(&mut self, mut ready: impl FnMut(&str) -> Option<T>) -> Result<T> {
        let lines = self
            .lines
            .take()
            .context(format_args!("{} was already waited for", self.name))?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(value) = ready(&line) {
                        return Ok(value);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(self.failure(format_args!("not ready after {PATIENCE:?}")));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(self.failure("exited before it was ready"));
                }
            }
        }
    }

    /// Waits until `addr` accepts connections, for a process that says nothing when ready.
    fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failure(format_args!("exited ({status}) before it listened")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(format_args!("not listening after {PATIENCE:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn failure(&self, what: impl Display) -> BoxError {
        let tail = self
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        format!("{} {what}; its last output:\n{tail}", self.name).into()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `output` to its end on a thread, keeping the last lines for error messages and
/// passing every line on for as long as someone listens.
fn drain_lines(
    output: Box<dyn Read + Send>,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
            }
            let _ = tx.send(line);
        }
    });
    rx
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        return Err(format!(
            "{} not found (it must sit next to orproxy-bench); build it with \
             `cargo build --release -p orproxy -p orproxy-testkit`",
            path.display()
        )
        .into());
    }
    Ok(path)
}

/// Starts the fake OpenRouter and returns it with its base URL.
fn start_fake(bin: &Path) -> Result<(Proc, String)> {
    let mut cmd = Command::new(bin);
    cmd.arg("--no-record")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut fake = Proc::spawn("fake-upstream", cmd, |c| {
        c.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>)
    })?;
    let base_url = fake.wait_ready(|line| {
        let event: Value = serde_json::from_str(line).ok()?;
        event["base_url"].as_str().map(str::to_owned)
    })?;
    Ok((fake, base_url))
}

/// Starts orproxy in front of the fake; `rust_log` of `None` is the default (`info`) logging.
/// With a usage database (`ledger`), it is ready once the database's check after the start has
/// finished too, so that the idle memory read next is not that check's.
fn start_orproxy(
    bin: &Path,
    config: &Path,
    rust_log: Option<&str>,
    state_dir: &Path,
    ledger: bool,
) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json"])
        .env("FAKE_OR_KEY", FAKE_API_KEY)
        // The usage database (written for every request, as in production) goes to a
        // scratch directory of its own, not the working directory.
        .env("STATE_DIRECTORY", state_dir)
        .env_remove("OPENROUTER_API_KEY")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut daemon = Proc::spawn("orproxy", cmd, |c| {
        c.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>)
    })?;
    let (mut listen, mut checked) = (None, !ledger);
    let listen = daemon.wait_ready(|line| {
        let event: Value = serde_json::from_str(line).ok()?;
        match event["message"].as_str()? {
            "Ready." => listen = event["listen"].as_str()?.parse::<SocketAddr>().ok(),
            message => checked |= message.starts_with("Usage database checked"),
        }
        listen.filter(|_| checked)
    })?;
    Ok((daemon, listen))
}

/// nginx as a reverse proxy in front of the fake (keep-alive to it, no buffering, no access
/// log): what a conventional proxy written in C adds on this machine, in the same blocks as
/// orproxy. One process (`master_process off`), as one orproxy worker serves one connection.
fn start_nginx(base_url: &str, dir: &Path) -> Result<Option<(Proc, SocketAddr, String)>> {
    let Some(bin) = ["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"]
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .map(|dir| dir.join("nginx"))
        .find(|path| path.is_file())
    else {
        return Ok(None);
    };
    let upstream = base_url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(authority, _)| authority)
        .context(format_args!("unexpected fake URL {base_url:?}"))?;
    // A port the kernel just handed out and took back: nginx cannot report one of its own.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for nginx")?;
    std::fs::create_dir_all(dir).context(format_args!("cannot create {}", dir.display()))?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream fake {{ server {upstream}; keepalive 16; }}\n  server {{\n    \
         listen {addr};\n    location /v1/ {{\n      proxy_pass http://fake/api/v1/;\n      \
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
         proxy_set_header Authorization \"Bearer {FAKE_API_KEY}\";\n      \
         proxy_buffering off;\n    }}\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)
        .context(format_args!("cannot write {}", conf_path.display()))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut nginx = Proc::spawn("nginx", cmd, |c| {
        c.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>)
    })?;
    nginx.wait_listening(addr)?;
    // `nginx -v` writes "nginx version: nginx/1.22.1" to stderr.
    let version = Command::new(&bin)
        .arg("-v")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
        .ok()
        .and_then(|text| text.rsplit_once(' ').map(|(_, v)| v.to_owned()))
        .unwrap_or_else(|| "nginx".to_owned());
    Ok(Some((nginx, addr, version)))
}

/// The daemons' state directories (their usage databases), removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("orproxy-bench-state-{}", std::process::id()));
        std::fs::create_dir_all(&path).context(format_args!("cannot create {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon's config file, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    /// With `polling` false, the workers never poll for their next event
    /// (`limits.idle_poll: 0`).
    fn write(base_url: &str, ledger: bool, polling: bool) -> Result<ConfigFile> {
        let name = format!(
            "orproxy-bench-{}-{}{}.yaml",
            std::process::id(),
            if ledger { "ledger" } else { "no-ledger" },
            if polling { "" } else { "-no-polling" }
        );
        let path = std::env::temp_dir().join(name);
        // A JSON string is a valid YAML scalar, so the URL needs no YAML quoting rules.
        let yaml = format!(
            "backends:\n  openrouter:\n    type: openrouter\n    base_url: {}\n    \
             api_key_env: FAKE_OR_KEY\ndefault_backend: openrouter\ndatabase:\n  enabled: {ledger}\n\
             {}",
            Value::from(base_url),
            if polling {
                ""
            } else {
                "limits:\n  idle_poll: 0\n"
            }
        );
        std::fs::write(&path, yaml).context(format_args!("cannot write {}", path.display()))?;
        Ok(ConfigFile(path))
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings

#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).context(format_args!("cannot read {path}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .context(format_args!("no {name} in {path}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// `--writer-cpu`: one CPU for the daemons' usage writers, the others for everything else.
struct Pinning {
    cpu: usize,
    /// The CPUs left to everything else, as `taskset` lists them.
    others: String,
}

/// Moves this process (so every thread and child it makes from now on) off `cpu`.
fn keep_off_cpu(cpu: usize) -> Result<Pinning> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(|list| cpu_list(list.trim()))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    if !allowed.contains(&cpu) || allowed.len() < 2 {
        let why = format!("this process may use CPUs {allowed:?}; it needs that one and another");
        return Err(format!("--writer-cpu {cpu}: {why}").into());
    }
    let others: Vec<String> = allowed
        .iter()
        .filter(|c| **c != cpu)
        .map(usize::to_string)
        .collect();
    let pinning = Pinning {
        cpu,
        others: others.join(","),
    };
    taskset(&[
        "-a",
        "-p",
        "-c",
        &pinning.others,
        &std::process::id().to_string(),
    ])?;
    Ok(pinning)
}

/// `0-2,5` → `[0, 1, 2, 5]`.
fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .filter_map(|range| match range.split_once('-') {
            Some((from, to)) => Some((from.parse().ok()?..=to.parse().ok()?).collect::<Vec<_>>()),
            None => range.parse().ok().map(|cpu| vec![cpu]),
        })
        .flatten()
        .collect()
}

fn taskset(args: &[&str]) -> Result<()> {
    let output = Command::new("taskset")
        .args(args)
        .output()
        .context("--writer-cpu needs `taskset` (util-linux)")?;
    if !output.status.success() {
        return Err(format!(
            "taskset {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(())
}

impl Pinning {
    /// Puts daemon `pid`'s usage writer (its thread `orproxy-ledger`) on the reserved CPU.
    fn move_writer(&self, pid: u32) -> Result<()> {
        let dir = format!("/proc/{pid}/task");
        let mut moved = false;
        for task in std::fs::read_dir(&dir).context(format_args!("cannot list {dir}"))? {
            let task = task.context(format_args!("cannot list {dir}"))?.path();
            if std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|c| c.trim_end() == "orproxy-ledger")
            {
                let tid = task
                    .file_name()
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                taskset(&["-p", "-c", &self.cpu.to_string(), &tid])?;
                moved = true;
            }
        }
        if moved {
            Ok(())
        } else {
            Err(format!("daemon {pid} has no `orproxy-ledger` thread to move").into())
        }
    }

    fn describe(&self) -> String {
        format!(
            "The daemons' usage writers (threads `orproxy-ledger`) run alone on CPU {}; \
             everything else (the bench, the fake, the daemons' other threads) on CPUs {}.",
            self.cpu, self.others
        )
    }
}

/// CPU time a process (`None`: this one) has used so far, summed over its live threads, and
/// the part of it spent by the daemon's usage writer (its thread `orproxy-ledger`).
/// `schedstat` counts nanoseconds, where `stat` counts 10 ms ticks: too coarse for one block
/// of sequential calls.
fn cpu_time(pid: Option<u32>) -> Result<(Duration, Duration)> {
    let dir = pid.map_or("/proc/self/task".to_owned(), |p| format!("/proc/{p}/task"));
    let (mut total, mut writer) = (0u64, 0u64);
    for task in std::fs::read_dir(&dir).context(format_args!("cannot list {dir}"))? {
        let task = task.context(format_args!("cannot list {dir}"))?.path();
        let path = task.join("schedstat");
        // A thread may end between the listing and the read; its time is then lost, which
        // only threads of the blocking pool do, rarely.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns = stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .context(format_args!("unexpected format of {}", path.display()))?;
        total += ns;
        if std::fs::read_to_string(task.join("comm"))
            .is_ok_and(|c| c.trim_end() == "orproxy-ledger")
        {
            writer += ns;
        }
    }
    Ok((Duration::from_nanos(total), Duration::from_nanos(writer)))
}

/// CPU time used by each process over one measurement.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    bench: Duration,
    fake: Duration,
    proxy: Duration,
    /// The part of `proxy` spent by its usage writer.
    writer: Duration,
}

impl CpuUse {
    /// CPU time used so far by this process, the fake, and the daemon `proxy` if any.
    fn now(fake: u32, proxy: Option<u32>) -> Result<CpuUse> {
        let (proxy, writer) = proxy
            .map(|p| cpu_time(Some(p)))
            .transpose()?
            .unwrap_or_default();
        Ok(CpuUse {
            bench: cpu_time(None)?.0,
            fake: cpu_time(Some(fake))?.0,
            proxy,
            writer,
        })
    }
}

impl std::ops::Sub for CpuUse {
    type Output = CpuUse;
    fn sub(self, earlier: CpuUse) -> CpuUse {
        CpuUse {
            bench: self.bench.saturating_sub(earlier.bench),
            fake: self.fake.saturating_sub(earlier.fake),
            proxy: self.proxy.saturating_sub(earlier.proxy),
            writer: self.writer.saturating_sub(earlier.writer),
        }
    }
}

impl std::ops::AddAssign for CpuUse {
    fn add_assign(&mut self, other: CpuUse) {
        self.bench += other.bench;
        self.fake += other.fake;
        self.proxy += other.proxy;
        self.writer += other.writer;
    }
}

/// `/proc/stat` and `/proc/PID/stat` count in USER_HZ ticks, which Linux fixes at 100.
const TICK_MS: u64 = 10;

/// Interrupt and stolen time of the whole machine so far, from `/proc/stat`.
#[derive(Clone, Copy)]
struct MachineCpu {
    /// Mostly the kernel delivering the benchmark's own loopback TCP.
    interrupts: Duration,
    /// Taken by the hypervisor for other guests.
    steal: Duration,
}

fn machine_cpu() -> Result<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(|f| f.parse::<u64>().context("unexpected format of /proc/stat"))
        .collect::<Result<Vec<_>>>()?;
    let sum = |fields: &[usize]| {
        let total: u64 = fields
            .iter()
            .map(|&i| ticks.get(i).copied().unwrap_or(0))
            .sum();
        Duration::from_millis(total * TICK_MS)
    };
    // Fields: user nice system idle iowait irq softirq steal.
    Ok(MachineCpu {
        interrupts: sum(&[5, 6]),
        steal: sum(&[7]),
    })
}

/// CPU ticks of every process now running, keyed by pid: its own time plus that of the
/// children it reaped, so that short-lived processes (a compiler run) are counted too, in
/// their parent. `ksoftirqd` is left out: it mostly delivers the benchmark's own packets.
fn process_ticks() -> Result<HashMap<u32, u64>> {
    let mut ticks = HashMap::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        // Processes end at any time; one that is gone is simply not counted.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name (field 2) may hold spaces; after its closing parenthesis come
        // field 3 onwards, so utime, stime, cutime and cstime (14 to 17) are at 11 to 14.
        let Some((name, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if name.contains("(ksoftirqd/") {
            continue;
        }
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse().ok())
            .collect();
        ticks.insert(pid, fields.iter().sum());
    }
    Ok(ticks)
}

/// CPU time used between two `process_ticks` readings by processes not in `ours`.
fn others_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>, ours: &[u32]) -> Duration {
    let ticks: u64 = after
        .iter()
        .filter(|(pid, _)| !ours.contains(pid))
        .map(|(pid, now)| now.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    Duration::from_millis(ticks * TICK_MS)
}

/// How much else the machine did during the run: numbers from a busy machine are not worth
/// publishing, and this says whether they came from one.
struct Noise {
    wall: Duration,
    others: Duration,
    interrupts: Duration,
    steal: Duration,
}

impl Noise {
    /// Watches the machine while `work` runs; `ours` are the run's own processes.
    fn watch<T>(ours: &[u32], work: impl FnOnce() -> Result<T>) -> Result<(T, Noise)> {
        let (machine, processes, start) = (machine_cpu()?, process_ticks()?, Instant::now());
        let value = work()?;
        let wall = start.elapsed();
        let machine_after = machine_cpu()?;
        let others = others_between(&processes, &process_ticks()?, ours);
        Ok((
            value,
            Noise {
                wall,
                others,
                interrupts: machine_after.interrupts.saturating_sub(machine.interrupts),
                steal: machine_after.steal.saturating_sub(machine.steal),
            },
        ))
    }

    /// Other processes' CPU use, in % of one core.
    fn others_percent(&self) -> f64 {
        100.0 * self.others.as_secs_f64() / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn describe(&self) -> String {
        format!(
            "During the measurements ({wall:.0} s), other processes (kernel threads \
             included) used {others:.1} s of CPU ({pct:.1}% of one core), interrupts {irq:.1} s \
             (mostly the benchmark's loopback TCP), and the hypervisor stole {steal:.1} s.",
            wall = self.wall.as_secs_f64(),
            others = self.others.as_secs_f64(),
            pct = self.others_percent(),
            irq = self.interrupts.as_secs_f64(),
            steal = self.steal.as_secs_f64(),
        )
    }
}

/// CPU time per completed call, in µs.
fn per_call(cpu: Duration, calls: usize) -> String {
    format!("{:.1}", cpu.as_secs_f64() * 1e6 / calls.max(1) as f64)
}

// ---------------------------------------------------------------------------------------------
// One call

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    // Both servers set it too; without it, Nagle plus delayed ACKs can add tens of ms.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Where requests go: the fake itself, or an orproxy in front of it.
#[derive(Clone)]
struct Target {
    label: &'static str,
    uri: Uri,
    auth: Option<HeaderValue>,
    /// The fake's process, and the daemon's when the path goes through one, for CPU use.
    fake_pid: u32,
    proxy_pid: Option<u32>,
}

impl Target {
    fn direct(base_url: &str, fake_pid: u32) -> Result<Target> {
        let uri = format!("{base_url}/chat/completions");
        Ok(Target {
            label: "direct to the fake",
            uri: uri.parse().context(format_args!("bad fake URL {uri:?}"))?,
            auth: Some(
                HeaderValue::from_str(&format!("Bearer {FAKE_API_KEY}")).context("bad fake key")?,
            ),
            fake_pid,
            proxy_pid: None,
        })
    }

    fn proxy(label: &'static str, addr: SocketAddr, fake: &Proc, proxy: &Proc) -> Result<Target> {
        let uri = format!("http://{addr}/v1/chat/completions");
        Ok(Target {
            label,
            uri: uri
                .parse()
                .context(format_args!("bad orproxy URL {uri:?}"))?,
            // Auth is off on loopback, and the daemon sends its own key upstream.
            auth: None,
            fake_pid: fake.pid(),
            proxy_pid: Some(proxy.pid()),
        })
    }
}

/// One call as the client saw it, times counted from just before the request is sent.
struct Timing {
    /// Until the first SSE event with non-empty `content` (streams only).
    first_content: Option<Duration>,
    /// Until the last byte of the body.
    end: Duration,
    /// Identifies the connection, to show that keep-alive held.
    local: Option<SocketAddr>,
}

async fn call(client: &HttpClient, target: &Target, body: &Bytes, stream: bool) -> Result<Timing> {
    let mut req = Request::post(target.uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))
        .context("cannot build the request")?;
    if let Some(auth) = &target.auth {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    let start = Instant::now();
    let resp = client
        .request(req)
        .await
        .context(format_args!("POST {} ({})", target.uri, target.label))?;
    let status = resp.status();
    let local = resp
        .extensions()
        .get::<HttpInfo>()
        .map(HttpInfo::local_addr);
    let mut incoming = resp.into_body();
    let mut seen = Vec::new();
    let mut first_content = None;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.context(format_args!("reading the answer of {}", target.label))?;
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
            if stream && first_content.is_none() && has_content(&seen) {
                first_content = Some(start.elapsed());
            }
        }
    }
    let end = start.elapsed();
    check_answer(target, status, &seen, stream, first_content.is_some())?;
    Ok(Timing {
        first_content,
        end,
        local,
    })
}

/// A benchmark of wrong answers is worthless, so every answer is checked, cheaply.
fn check_answer(
    target: &Target,
    status: StatusCode,
    body: &[u8],
    stream: bool,
    had_content: bool,
) -> Result<()> {
    let complete = if stream {
        had_content && memmem::rfind(body, SSE_DONE).is_some()
    } else {
        body.starts_with(b"{") && memmem::find(body, b"\"content\":\"").is_some()
    };
    if status == StatusCode::OK && complete {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(600)]);
    Err(format!(
        "{} answered {status} with an unexpected body: {text}",
        target.label
    )
    .into())
}

/// Whether an SSE event carrying non-empty `content` has arrived; the first event of a
/// stream (the role) carries an empty one.
fn has_content(seen: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":\"";
    memmem::find_iter(seen, KEY).any(|at| seen.get(at + KEY.len()).is_some_and(|&b| b != b'"'))
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Sequential (concurrency 1) samples of one path.
struct Sequential {
    label: &'static str,
    end: Vec<Duration>,
    first_content: Vec<Duration>,
    connections: HashSet<SocketAddr>,
    cpu: CpuUse,
}

impl Sequential {
    fn record(&mut self, t: Timing) {
        self.end.push(t.end);
        self.first_content.extend(t.first_content);
        self.connections.extend(t.local);
    }
}

/// `n` calls per target, one at a time on a kept-alive connection, in alternating blocks.
async fn sequential(
    client: &HttpClient,
    targets: &[Target],
    body: &Bytes,
    stream: bool,
    n: usize,
) -> Result<Vec<Sequential>> {
    for target in targets {
        for _ in 0..WARMUP_REQUESTS {
            call(client, target, body, stream).await?;
        }
    }
    let mut samples: Vec<Sequential> = targets
        .iter()
        .map(|t| Sequential {
            label: t.label,
            end: Vec::with_capacity(n),
            first_content: Vec::with_capacity(n),
            connections: HashSet::new(),
            cpu: CpuUse::default(),
        })
        .collect();
    let mut done = 0;
    while done < n {
        let block = BLOCK.min(n - done);
        for (target, sample) in targets.iter().zip(&mut samples) {
            let before = CpuUse::now(target.fake_pid, target.proxy_pid)?;
            for _ in 0..block {
                sample.record(call(client, target, body, stream).await?);
            }
            sample.cpu += CpuUse::now(target.fake_pid, target.proxy_pid)? - before;
        }
        done += block;
    }
    Ok(samples)
}

/// Calls made by `concurrency` tasks in a loop for a while, each task on its own connection.
#[derive(Default)]
struct Load {
    completed: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    connections: HashSet<SocketAddr>,
    cpu: CpuUse,
    /// Paced runs: calls sent more than [`LATE`] after their time.
    late: usize,
}

impl Load {
    fn merge(&mut self, other: Load) {
        self.late += other.late;
        self.completed += other.completed;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.connections.extend(other.connections);
        self.cpu += other.cpu;
    }

    fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

async fn saturate(
    client: &HttpClient,
    target: &Target,
    body: &Bytes,
    stream: bool,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    let cpu_before = CpuUse::now(target.fake_pid, target.proxy_pid)?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut connections = HashSet::new();
            while Instant::now() < deadline {
                let timing = call(&client, &target, &body, stream).await?;
                latencies.push(timing.end);
                connections.extend(timing.local);
            }
            Ok::<_, BoxError>((latencies, connections))
        });
    }
    let mut load = Load::default();
    while let Some(joined) = tasks.join_next().await {
        let (latencies, connections) = joined.context("a load task failed")??;
        load.completed += latencies.len();
        load.latencies.extend(latencies);
        load.connections.extend(connections);
    }
    // Calls in flight at the deadline are waited for and counted, so the time is until the
    // last of them ended, not the nominal duration.
    load.elapsed = start.elapsed();
    load.cpu = CpuUse::now(target.fake_pid, target.proxy_pid)? - cpu_before;
    Ok(load)
}

/// How late a paced call may be sent before it counts as late: the runtime's timer ticks
/// every millisecond.
const LATE: Duration = Duration::from_millis(2);

/// Calls at a fixed total `rate` per second, spread evenly over `concurrency` tasks on their
/// own connections: an open loop, where a slow answer delays no call of another connection.
/// Each latency is from sending to the last byte, as in [`saturate`].
async fn pace(
    client: &HttpClient,
    target: &Target,
    body: &Bytes,
    stream: bool,
    concurrency: usize,
    rate: f64,
    duration: Duration,
) -> Result<Load> {
    let cpu_before = CpuUse::now(target.fake_pid, target.proxy_pid)?;
    let start = Instant::now();
    let every = Duration::from_secs_f64(concurrency as f64 / rate);
    let calls = (duration.as_secs_f64() / every.as_secs_f64()).floor() as u32;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let (client, target, body) = (client.clone(), target.clone(), body.clone());
        // Task i starts i/concurrency of a period after the first, so that calls interleave.
        let first = start + every.mul_f64(task as f64 / concurrency as f64);
        tasks.spawn(async move {
            let (mut latencies, mut connections, mut late) = (Vec::new(), HashSet::new(), 0);
            for k in 0..calls {
                let due = first + every * k;
                tokio::time::sleep_until(due.into()).await;
                late += usize::from(due.elapsed() > LATE);
                let timing = call(&client, &target, &body, stream).await?;
                latencies.push(timing.end);
                connections.extend(timing.local);
            }
            Ok::<_, BoxError>((latencies, connections, late))
        });
    }
    let mut load = Load::default();
    while let Some(joined) = tasks.join_next().await {
        let (latencies, connections, late) = joined.context("a paced task failed")??;
        load.completed += latencies.len();
        load.latencies.extend(latencies);
        load.connections.extend(connections);
        load.late += late;
    }
    load.elapsed = start.elapsed();
    load.cpu = CpuUse::now(target.fake_pid, target.proxy_pid)? - cpu_before;
    Ok(load)
}

/// The fixed-rate runs for `--rate R`: non-stream calls at R and R/2 per second, streams at R/2
/// and R/4 (a stream costs about twice a plain call).
fn paced_runs(rate: usize) -> [(bool, usize); 4] {
    [
        (false, rate),
        (false, rate / 2),
        (true, rate / 2),
        (true, rate / 4),
    ]
}

/// The order in which `n` targets take turns, half the duration each: forwards, then
/// backwards (A, B, B, A; A, B, C, C, B, A), so that a steady drift in machine speed during
/// the run weighs on every target alike.
fn palindrome(n: usize) -> impl Iterator<Item = usize> {
    (0..n).chain((0..n).rev())
}

/// [`compare_under_load`] at a fixed rate instead of as fast as answers come.
async fn compare_paced<const N: usize>(
    client: &HttpClient,
    targets: [&Target; N],
    body: &Bytes,
    stream: bool,
    rate: f64,
    args: &Args,
) -> Result<[Load; N]> {
    let half = args.duration / 2;
    let c = args.concurrency;
    for target in targets {
        pace(client, target, body, stream, c, rate, LOAD_WARMUP).await?;
    }
    let mut loads = std::array::from_fn(|_| Load::default());
    for i in palindrome(N) {
        pace(client, targets[i], body, stream, c, rate, TURN_WARMUP).await?;
        let load = pace(client, targets[i], body, stream, c, rate, half).await?;
        loads[i].merge(load);
    }
    Ok(loads)
}

/// The targets under load, taking turns in [`palindrome`] order (half the duration each, after
/// [`TURN_WARMUP`]).
async fn compare_under_load<const N: usize>(
    client: &HttpClient,
    targets: [&Target; N],
    body: &Bytes,
    stream: bool,
    args: &Args,
) -> Result<[Load; N]> {
    let half = args.duration / 2;
    let c = args.concurrency;
    for target in targets {
        saturate(client, target, body, stream, c, LOAD_WARMUP).await?;
    }
    let mut loads = std::array::from_fn(|_| Load::default());
    for i in palindrome(N) {
        saturate(client, targets[i], body, stream, c, TURN_WARMUP).await?;
        let load = saturate(client, targets[i], body, stream, c, half).await?;
        loads[i].merge(load);
    }
    Ok(loads)
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

#[derive(Clone, Copy)]
struct Dist {
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

impl Dist {
    fn of(samples: &[Duration]) -> Dist {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Dist {
            p50: percentile(&sorted, 0.50),
            p90: percentile(&sorted, 0.90),
            p99: percentile(&sorted, 0.99),
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn added_us(proxy: Duration, direct: Duration) -> i64 {
    ((proxy.as_secs_f64() - direct.as_secs_f64()) * 1e6).round() as i64
}

fn ratio(a: Duration, b: Duration) -> String {
    format!(
        "{:.2}×",
        a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE)
    )
}

fn mb(kib: u64) -> String {
    format!("{:.1}", kib as f64 * 1024.0 / 1e6)
}

/// A Markdown table whose columns are padded, so it also reads well on a terminal.
struct Table {
    rows: Vec<Vec<String>>,
    numeric: Vec<bool>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
            // Every column but the first holds numbers, right-aligned.
            numeric: (0..header.len()).map(|i| i > 0).collect(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.numeric.len();
        let width = |c: usize| {
            self.rows
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
                .max(3)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        let pad = |c: usize, s: &str| {
            let fill = " ".repeat(widths[c].saturating_sub(s.chars().count()));
            if self.numeric[c] {
                format!("{fill}{s}")
            } else {
                format!("{s}{fill}")
            }
        };
        let mut out = String::new();
        for (i, row) in self.rows.iter().enumerate() {
            out.push_str(&line(
                (0..columns)
                    .map(|c| pad(c, row.get(c).map_or("", String::as_str)))
                    .collect(),
            ));
            if i == 0 {
                out.push_str(&line(
                    (0..columns)
                        .map(|c| {
                            let dashes = "-".repeat(widths[c] - usize::from(self.numeric[c]));
                            if self.numeric[c] {
                                format!("{dashes}:")
                            } else {
                                dashes
                            }
                        })
                        .collect(),
                ));
            }
        }
        out
    }
}

/// The ratio row of the tables of direct and proxied calls under load.
const PROXY_RATIO: &[(&str, usize, usize)] = &[("ratio orproxy / direct", 1, 0)];

/// Everything one run measured.
struct Results {
    whole: Vec<Sequential>,
    streamed: Vec<Sequential>,
    load_whole: [Load; 2],
    load_stream: [Load; 2],
    /// The measured daemon against one without a database.
    ledger: Option<Ledger>,
    idle: Memory,
    after_sequential: Memory,
    after_load: Memory,
    info_idle: Memory,
}

/// The daemon without its database (first), with it, and a second one without it (the
/// control: what two identical daemons differ by), taking turns.
struct Ledger {
    /// Under load: non-stream, stream.
    saturated: [[Load; 3]; 2],
    /// At fixed rates ([`paced_runs`]): the kind of call, its rate, the three loads.
    paced: Vec<(&'static str, usize, [Load; 3])>,
}

/// The rows of the ledger tables, in the order of [`Ledger`]'s loads.
const LEDGER_LABELS: [&str; 3] = [
    "orproxy, ledger off",
    "orproxy, ledger on",
    "control: ledger off, second daemon",
];

/// The ledger's cost, and the control's: what the same comparison shows with no difference.
const LEDGER_RATIOS: &[(&str, usize, usize)] =
    &[("ratio on / off", 1, 0), ("control: ratio off / off", 2, 0)];

impl Ledger {
    /// The sections "The ledger under load" and "The ledger at fixed rates".
    fn report(&self, args: &Args) -> String {
        let c = args.concurrency;
        let secs = args.duration.as_secs_f64();
        let table = |loads: &[Load]| load_table(loads, &LEDGER_LABELS, LEDGER_RATIOS);
        let [whole, stream] = &self.saturated;
        let paced: String = self
            .paced
            .iter()
            .map(|(kind, rate, loads)| {
                let calls: usize = loads.iter().map(|l| l.completed).sum();
                let late: usize = loads.iter().map(|l| l.late).sum();
                format!(
                    "{kind}, {rate} calls/s ({late} of {calls} calls sent more than {} ms \
                     late):\n\n{}\n",
                    LATE.as_millis(),
                    table(loads),
                )
            })
            .collect();
        format!(
            "### The ledger under load, on and off\n\n\
             The measured daemon (a row per request) and two more with \
             `database.enabled: false`, same logging, {c} connections, {secs:.0} s each \
             (two halves, in the order off, on, control, control, on, off). The control \
             row compares the two daemons without a database: how far apart two identical \
             daemons come out of the same comparison, against which the ledger's ratio is \
             read.\n\n\
             Non-stream:\n\n{}\nStream:\n\n{}\n\
             ### The ledger at fixed rates, on and off\n\n\
             The same three daemons at fixed rates instead of as fast as they answer, the \
             calls spread evenly over {c} connections (an open loop: a slow answer delays \
             no other connection's calls), {secs:.0} s each (same order). Latency \
             from sending to the last byte.\n\n{paced}",
            table(whole),
            table(stream),
        )
    }
}

/// A latency column of the concurrency-1 tables: its header, the samples it is computed
/// from, and which percentile.
type Metric = (
    &'static str,
    fn(&Sequential) -> &[Duration],
    fn(&Dist) -> Duration,
);

const WHOLE_METRICS: &[Metric] = &[
    ("p50 µs", |s| &s.end, |d| d.p50),
    ("p90 µs", |s| &s.end, |d| d.p90),
    ("p99 µs", |s| &s.end, |d| d.p99),
];

const STREAM_METRICS: &[Metric] = &[
    ("first content p50 µs", |s| &s.first_content, |d| d.p50),
    ("first content p99 µs", |s| &s.first_content, |d| d.p99),
    ("end p50 µs", |s| &s.end, |d| d.p50),
    ("end p99 µs", |s| &s.end, |d| d.p99),
];

/// One row per path, then what each proxied path adds to the direct one (first), in µs and
/// as a ratio.
fn sequential_table(samples: &[Sequential], metrics: &[Metric]) -> String {
    let mut header = vec!["path"];
    header.extend(metrics.iter().map(|m| m.0));
    header.extend(["connections", "proxy CPU µs/call", "fake CPU µs/call"]);
    let mut t = Table::new(&header);
    let values: Vec<Vec<Duration>> = samples
        .iter()
        .map(|s| {
            metrics
                .iter()
                .map(|(_, of, pick)| pick(&Dist::of(of(s))))
                .collect()
        })
        .collect();
    for (s, v) in samples.iter().zip(&values) {
        let mut row = vec![s.label.to_owned()];
        row.extend(v.iter().map(|d| us(*d)));
        row.push(s.connections.len().to_string());
        row.push(per_call(s.cpu.proxy, s.end.len()));
        row.push(per_call(s.cpu.fake, s.end.len()));
        t.row(row);
    }
    let direct = &values[0];
    for (s, v) in samples.iter().zip(&values).skip(1) {
        let mut row = vec![format!("added by {}", s.label)];
        row.extend(
            v.iter()
                .zip(direct)
                .map(|(p, d)| format!("{:+}", added_us(*p, *d))),
        );
        t.row(row);
    }
    for (s, v) in samples.iter().zip(&values).skip(1) {
        let mut row = vec![format!("ratio {} / direct", s.label)];
        row.extend(v.iter().zip(direct).map(|(p, d)| ratio(*p, *d)));
        t.row(row);
    }
    t.render()
}

/// One row per load, then one per ratio `(label, numerator, denominator)` of two of them.
fn load_table(loads: &[Load], labels: &[&str], ratios: &[(&str, usize, usize)]) -> String {
    let mut t = Table::new(&[
        "path",
        "req/s",
        "p50 ms",
        "p99 ms",
        "calls",
        "connections",
        "orproxy CPU µs/call",
        "of which writer",
        "fake CPU µs/call",
        "bench CPU µs/call",
    ]);
    for (load, &label) in loads.iter().zip(labels) {
        let d = Dist::of(&load.latencies);
        t.row(vec![
            label.to_owned(),
            format!("{:.0}", load.per_second()),
            ms(d.p50),
            ms(d.p99),
            load.completed.to_string(),
            load.connections.len().to_string(),
            per_call(load.cpu.proxy, load.completed),
            per_call(load.cpu.writer, load.completed),
            per_call(load.cpu.fake, load.completed),
            per_call(load.cpu.bench, load.completed),
        ]);
    }
    for &(label, top, bottom) in ratios {
        let (a, b) = (&loads[bottom], &loads[top]);
        let (da, db) = (Dist::of(&a.latencies), Dist::of(&b.latencies));
        t.row(vec![
            label.to_owned(),
            format!("{:.2}×", b.per_second() / a.per_second()),
            ratio(db.p50, da.p50),
            ratio(db.p99, da.p99),
        ]);
    }
    t.render()
}

fn memory_table(r: &Results) -> String {
    let mut t = Table::new(&["orproxy (RUST_LOG=warn)", "VmRSS MB", "VmHWM MB"]);
    for (when, m) in [
        ("idle, after Ready. and the database check", r.idle),
        ("after the concurrency-1 runs", r.after_sequential),
        ("after the load runs", r.after_load),
    ] {
        t.row(vec![when.to_owned(), mb(m.rss_kib), mb(m.hwm_kib)]);
    }
    t.row(vec![
        "info-logging instance, idle".to_owned(),
        mb(r.info_idle.rss_kib),
        mb(r.info_idle.hwm_kib),
    ]);
    t.render()
}

fn targets_table(r: &Results) -> String {
    let verdict = |ok: bool| if ok { "met" } else { "**NOT met**" }.to_owned();
    let mut t = Table::new(&["target", "measured", "verdict"]);
    let whole = (Dist::of(&r.whole[0].end), Dist::of(&r.whole[1].end));
    let first = (
        Dist::of(&r.streamed[0].first_content),
        Dist::of(&r.streamed[1].first_content),
    );
    let added = |pick: fn(&Dist) -> Duration, (direct, proxy): (Dist, Dist)| {
        added_us(pick(&proxy), pick(&direct))
    };
    for (name, value, limit) in [
        (
            "c=1 non-stream added p50 ≤ 100 µs",
            added(|d| d.p50, whole),
            100,
        ),
        (
            "c=1 non-stream added p99 ≤ 300 µs",
            added(|d| d.p99, whole),
            300,
        ),
        (
            "c=1 stream first content added p50 ≤ 100 µs",
            added(|d| d.p50, first),
            100,
        ),
        (
            "c=1 stream first content added p99 ≤ 300 µs",
            added(|d| d.p99, first),
            300,
        ),
    ] {
        t.row(vec![
            name.to_owned(),
            format!("{value:+} µs"),
            verdict(value <= limit),
        ]);
    }
    for (name, loads) in [
        ("c=N non-stream req/s ≥ 0.25× direct", &r.load_whole),
        ("c=N stream req/s ≥ 0.25× direct", &r.load_stream),
    ] {
        let share = loads[1].per_second() / loads[0].per_second();
        t.row(vec![
            name.to_owned(),
            format!("{share:.2}×"),
            verdict(share >= 0.25),
        ]);
    }
    let idle_bytes = r.idle.rss_kib * 1024;
    t.row(vec![
        "RSS idle ≤ 30 MB".to_owned(),
        format!("{} MB", mb(r.idle.rss_kib)),
        verdict(idle_bytes <= 30_000_000),
    ]);
    t.render()
}

/// The machine as the report names it; `cores` as `nproc` counted them before `--writer-cpu`.
fn machine(cores: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
    format!("{cores} cores (nproc), CPU {cpu}, Linux {kernel}")
}

fn report(
    args: &Args,
    r: &Results,
    noise: &Noise,
    (cores, threads): (usize, usize),
    about: &str,
) -> String {
    let n = args.requests;
    let c = args.concurrency;
    let secs = args.duration.as_secs_f64();
    let load_labels = ["direct to the fake", "orproxy (RUST_LOG=warn)"];
    format!(
        "## Results\n\n\
         Machine: {machine}. The fake upstream, orproxy and the load generator \
         ({threads} runtime threads) run on it together and share its cores. {noise} \
         orproxy's usage database: {ledger}.\n\n\
         ### Concurrency 1, non-stream\n\n\
         {n} calls per path on one kept-alive connection each, after {WARMUP_REQUESTS} \
         warm-up calls, interleaved in blocks of {BLOCK}; time until the last body byte. \
         {about}\n\n\
         {whole}\n\
         ### Concurrency 1, stream\n\n\
         Same, with `\"stream\": true` (14 SSE events, 10 with content). First content: the \
         first event with non-empty `content`; end: the last byte of the stream.\n\n\
         {streamed}\n\
         ### Concurrency {c}, non-stream\n\n\
         {c} tasks, each calling in a loop on its own kept-alive connection, {secs:.0} s per \
         path (two halves, in the order direct, orproxy, orproxy, direct), after {warm:.0} s \
         of warm-up each. CPU per call: user + system time of each process over the run, \
         divided by the calls completed.\n\n\
         {load_whole}\n\
         ### Concurrency {c}, stream\n\n\
         {load_stream}\n\
         {ledger_sections}\
         ### Memory\n\n\
         {memory}\n\
         ### Targets, this run\n\n\
         {targets}",
        ledger = if args.ledger {
            "on (a row per request, as in production)"
        } else {
            "off (`database.enabled: false`)"
        },
        machine = machine(cores),
        noise = noise.describe(),
        whole = sequential_table(&r.whole, WHOLE_METRICS),
        streamed = sequential_table(&r.streamed, STREAM_METRICS),
        warm = LOAD_WARMUP.as_secs_f64(),
        load_whole = load_table(&r.load_whole, &load_labels, PROXY_RATIO),
        load_stream = load_table(&r.load_stream, &load_labels, PROXY_RATIO),
        ledger_sections = r.ledger.as_ref().map_or(String::new(), |l| l.report(args)),
        memory = memory_table(r),
        targets = targets_table(r),
    )
}

// ---------------------------------------------------------------------------------------------

/// The running processes and where to reach them.
struct Setup {
    direct: Target,
    quiet: Target,
    chatty: Target,
    /// The same daemon as `quiet` without its database, twice (the second is the control),
    /// when `quiet` has one.
    unrecorded: Option<[Target; 2]>,
    /// Measured at concurrency 1 only, after the others: `--baseline`, nginx.
    references: Vec<Target>,
}

/// The daemon without its database, with it, and the control (`daemons`), saturated and at
/// fixed rates.
async fn measure_ledger(args: &Args, client: &HttpClient, daemons: [&Target; 3]) -> Result<Ledger> {
    let whole_body = Bytes::from_static(WHOLE_BODY.as_bytes());
    let stream_body = Bytes::from_static(STREAM_BODY.as_bytes());
    eprintln!(
        "orproxy-bench: concurrency {}, ledger on and off",
        args.concurrency
    );
    let saturated = [
        compare_under_load(client, daemons, &whole_body, false, args).await?,
        compare_under_load(client, daemons, &stream_body, true, args).await?,
    ];
    let mut paced = Vec::new();
    for (stream, rate) in paced_runs(args.rate) {
        let (kind, body) = match stream {
            false => ("non-stream", &whole_body),
            true => ("stream", &stream_body),
        };
        eprintln!("orproxy-bench: {kind} at {rate} calls/s, ledger on and off");
        let loads = compare_paced(client, daemons, body, stream, rate as f64, args).await?;
        paced.push((kind, rate, loads));
    }
    Ok(Ledger { saturated, paced })
}

async fn measure(args: &Args, setup: &Setup, idle: Memory, info_idle: Memory) -> Result<Results> {
    let client = http_client();
    let whole_body = Bytes::from_static(WHOLE_BODY.as_bytes());
    let stream_body = Bytes::from_static(STREAM_BODY.as_bytes());
    let mut all = vec![
        setup.direct.clone(),
        setup.quiet.clone(),
        setup.chatty.clone(),
    ];
    all.extend(setup.references.iter().cloned());
    let pair = [&setup.direct, &setup.quiet];
    let proxy_pid = setup
        .quiet
        .proxy_pid
        .context("the measured orproxy has no process")?;

    eprintln!("orproxy-bench: concurrency 1, non-stream");
    let whole = sequential(&client, &all, &whole_body, false, args.requests).await?;
    eprintln!("orproxy-bench: concurrency 1, stream");
    let streamed = sequential(&client, &all, &stream_body, true, args.requests).await?;
    let after_sequential = memory(proxy_pid)?;
    let c = args.concurrency;
    eprintln!("orproxy-bench: concurrency {c}, non-stream");
    let load_whole = compare_under_load(&client, pair, &whole_body, false, args).await?;
    eprintln!("orproxy-bench: concurrency {c}, stream");
    let load_stream = compare_under_load(&client, pair, &stream_body, true, args).await?;
    let ledger = match &setup.unrecorded {
        Some([off, control]) => {
            Some(measure_ledger(args, &client, [off, &setup.quiet, control]).await?)
        }
        None => None,
    };
    Ok(Results {
        whole,
        streamed,
        load_whole,
        load_stream,
        ledger,
        idle,
        after_sequential,
        after_load: memory(proxy_pid)?,
        info_idle,
    })
}

fn run(args: &Args) -> Result<String> {
    if cfg!(debug_assertions) {
        eprintln!("orproxy-bench: warning: this is a debug build; measure with --release");
    }
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    // Before any thread or child exists: they all inherit the main thread's CPUs.
    let pinning = args.writer_cpu.map(keep_off_cpu).transpose()?;
    let (fake, base_url) = start_fake(&sibling("fake-upstream")?)?;
    let config = ConfigFile::write(&base_url, args.ledger, true)?;
    let orproxy = sibling("orproxy")?;
    let state = ScratchDir::new()?;
    let (quiet, quiet_addr) = start_orproxy(
        &orproxy,
        &config.0,
        Some(QUIET_LOG),
        &state.0.join("quiet"),
        args.ledger,
    )?;
    let (chatty, chatty_addr) = start_orproxy(
        &orproxy,
        &config.0,
        None,
        &state.0.join("chatty"),
        args.ledger,
    )?;
    let unrecorded = if args.ledger {
        let config = ConfigFile::write(&base_url, false, true)?;
        let off = |name: &str| {
            start_orproxy(
                &orproxy,
                &config.0,
                Some(QUIET_LOG),
                &state.0.join(name),
                false,
            )
        };
        let started = [off("off")?, off("control")?];
        Some((config, started))
    } else {
        None
    };
    // The measured daemon with idle polling off, at concurrency 1 (among the references).
    let sleeper_config = ConfigFile::write(&base_url, args.ledger, false)?;
    let sleeper = start_orproxy(
        &orproxy,
        &sleeper_config.0,
        Some(QUIET_LOG),
        &state.0.join("sleeper"),
        args.ledger,
    )?;
    let baseline = match &args.baseline {
        Some(bin) => Some(start_orproxy(
            bin,
            &config.0,
            Some(QUIET_LOG),
            &state.0.join("baseline"),
            args.ledger,
        )?),
        None => None,
    };
    let nginx = if args.nginx {
        start_nginx(&base_url, &state.0.join("nginx"))?
    } else {
        None
    };
    if args.nginx && nginx.is_none() {
        eprintln!("orproxy-bench: no nginx binary found; the reference row is left out");
    }
    let idle = memory(quiet.pid())?;
    let info_idle = memory(chatty.pid())?;
    let mut references = vec![Target::proxy(SLEEPER_LABEL, sleeper.1, &fake, &sleeper.0)?];
    let mut about = vec![format!(
        "`{SLEEPER_LABEL}` is the measured daemon with `limits.idle_poll: 0`: its workers \
         sleep in `epoll_wait` as soon as they run out of work."
    )];
    if let Some((daemon, addr)) = &baseline {
        references.push(Target::proxy(BASELINE_LABEL, *addr, &fake, daemon)?);
    }
    if let (Some(bin), Some(_)) = (&args.baseline, &baseline) {
        about.push(format!(
            "`{BASELINE_LABEL}` is `{}`, started the same way as the measured daemon.",
            bin.display()
        ));
    }
    if let Some(pinning) = &pinning {
        let recorded = [quiet.pid(), chatty.pid(), sleeper.0.pid()];
        let baseline = baseline.as_ref().map(|(daemon, _)| daemon.pid());
        for pid in recorded.into_iter().chain(baseline) {
            pinning.move_writer(pid)?;
        }
        about.push(pinning.describe());
    }
    if let Some((nginx, addr, version)) = &nginx {
        references.push(Target::proxy(NGINX_LABEL, *addr, &fake, nginx)?);
        about.push(format!(
            "`{NGINX_LABEL}` is {version} in front of the same fake: one process, keep-alive \
             connections to the fake, no buffering, no access log; what a conventional proxy \
             written in C adds on this machine."
        ));
    }
    let setup = Setup {
        direct: Target::direct(&base_url, fake.pid())?,
        quiet: Target::proxy("orproxy (RUST_LOG=warn)", quiet_addr, &fake, &quiet)?,
        chatty: Target::proxy("orproxy (info logging)", chatty_addr, &fake, &chatty)?,
        unrecorded: match &unrecorded {
            Some((_, [(off, off_addr), (control, control_addr)])) => Some([
                Target::proxy(LEDGER_LABELS[0], *off_addr, &fake, off)?,
                Target::proxy(LEDGER_LABELS[2], *control_addr, &fake, control)?,
            ]),
            None => None,
        },
        references,
    };
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let mut pids = vec![std::process::id(), fake.pid(), quiet.pid(), chatty.pid()];
    if let Some((_, daemons)) = &unrecorded {
        pids.extend(daemons.iter().map(|(daemon, _)| daemon.pid()));
    }
    pids.push(sleeper.0.pid());
    pids.extend(baseline.as_ref().map(|(daemon, _)| daemon.pid()));
    pids.extend(nginx.as_ref().map(|(nginx, ..)| nginx.pid()));
    if args.ledger_only {
        let [off, control] = (setup.unrecorded.as_ref()).context("no daemon without a database")?;
        let daemons = [off, &setup.quiet, control];
        let (ledger, noise) = Noise::watch(&pids, || {
            runtime.block_on(measure_ledger(args, &http_client(), daemons))
        })?;
        let pinned = pinning.as_ref().map(Pinning::describe).unwrap_or_default();
        return Ok(format!(
            "## The ledger, on and off\n\nMachine: {}. {} {pinned}\n\n{}",
            machine(cores),
            noise.describe(),
            ledger.report(args)
        ));
    }
    let (results, noise) = Noise::watch(&pids, || {
        runtime.block_on(measure(args, &setup, idle, info_idle))
    })?;
    if noise.others_percent() > 5.0 {
        eprintln!(
            "orproxy-bench: warning: other processes were busy during the run; the numbers \
             are not representative. {}",
            noise.describe()
        );
    }
    Ok(report(
        args,
        &results,
        &noise,
        (cores, threads),
        &about.join(" "),
    ))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("orproxy-bench: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let markdown = match run(&args) {
        Ok(markdown) => markdown,
        Err(e) => {
            eprintln!("orproxy-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{markdown}");
    if let Some(path) = &args.markdown
        && let Err(e) = std::fs::write(path, &markdown)
    {
        eprintln!("orproxy-bench: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_as_taskset_writes_them() {
        assert_eq!(cpu_list("0-2,5"), [0, 1, 2, 5]);
        assert_eq!(cpu_list("3"), [3]);
        assert_eq!(cpu_list(""), Vec::<usize>::new());
    }

    #[test]
    fn the_writer_cpu_needs_a_ledger() {
        let args = |list: &[&str]| parse_args(list.iter().map(|a| a.to_string()));
        assert_eq!(
            args(&["--writer-cpu", "1"]).map(|a| a.writer_cpu),
            Ok(Some(1))
        );
        assert!(args(&["--writer-cpu", "1", "--no-ledger"]).is_err());
        assert!(args(&["--writer-cpu", "x"]).is_err());
    }
}
