//! `fake-upstream`: the fake OpenRouter (or OpenAI, or Anthropic) upstream as a standalone process, for the
//! Python SDK tests and the benchmark harness.
//!
//! Prints one line `{"base_url":"...","addr":"..."}` once listening, then serves until
//! SIGTERM/SIGINT or until its stdin reaches EOF, so a parent that dies does not leak it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use orproxy_testkit::{FAKE_ANTHROPIC_KEY, FakeAnthropic, FakeOpenAi, FakeOpenRouter, FakeOptions};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

const USAGE: &str = "usage: fake-upstream [--dialect openrouter|openai|anthropic] [--listen ADDR:PORT] \
[--no-record] [--keepalives N] [--api-key KEY]... [--any-key] [--threads N] [--ignore-stdin]";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    OpenRouter,
    OpenAi,
    /// The Anthropic Messages API; it takes only `--api-key` (default its own test key).
    Anthropic,
}

struct Args {
    dialect: Dialect,
    opts: FakeOptions,
    threads: Option<usize>,
    watch_stdin: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut dialect = Dialect::OpenRouter;
    let (mut listen, mut record, mut keepalives) = (None, true, None);
    let (mut keys, mut any_key, mut threads, mut watch_stdin) = (Vec::new(), false, None, true);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--dialect" => {
                dialect = match value("--dialect")?.as_str() {
                    "openrouter" => Dialect::OpenRouter,
                    "openai" => Dialect::OpenAi,
                    "anthropic" => Dialect::Anthropic,
                    other => return Err(format!("unknown dialect {other:?}")),
                }
            }
            "--listen" => {
                let text = value("--listen")?;
                listen = Some(
                    text.parse::<SocketAddr>()
                        .map_err(|e| format!("bad --listen {text:?}: {e}"))?,
                );
            }
            "--no-record" => record = false,
            "--keepalives" => {
                let text = value("--keepalives")?;
                keepalives = Some(
                    text.parse()
                        .map_err(|_| format!("bad --keepalives {text:?}"))?,
                );
            }
            "--api-key" => keys.push(value("--api-key")?),
            "--any-key" => any_key = true,
            "--threads" => {
                let text = value("--threads")?;
                let n: usize = text
                    .parse()
                    .map_err(|_| format!("bad --threads {text:?}"))?;
                threads = Some(n.max(1));
            }
            "--ignore-stdin" => watch_stdin = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mut opts = match dialect {
        Dialect::OpenRouter | Dialect::Anthropic => FakeOptions::default(),
        Dialect::OpenAi => FakeOpenAi::default_options(),
    };
    if dialect == Dialect::Anthropic {
        opts.api_keys = vec![FAKE_ANTHROPIC_KEY.to_owned()];
    }
    opts.record = record;
    if let Some(listen) = listen {
        opts.listen = listen;
    }
    if let Some(n) = keepalives {
        opts.keepalives = n;
    }
    if any_key {
        opts.api_keys.clear();
    } else if !keys.is_empty() {
        opts.api_keys = keys;
    }
    Ok(Args {
        dialect,
        opts,
        threads,
        watch_stdin,
    })
}

/// A parent that started us with stdin on /dev/null cannot signal EOF meaningfully (it is
/// at EOF from the start), so only pipes, sockets and terminals are watched.
fn stdin_is_watchable() -> bool {
    std::fs::read_link("/proc/self/fd/0").map_or(true, |target| target.as_os_str() != "/dev/null")
}

/// Resolves when stdin reaches EOF; a blocking thread because tokio's stdin needs a feature
/// the workspace does not enable, and blocking reads are what stdin does anyway.
fn stdin_eof() -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 512];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = tx.send(());
    });
    rx
}

enum Running {
    OpenRouter(FakeOpenRouter),
    OpenAi(FakeOpenAi),
    Anthropic(FakeAnthropic),
}

async fn run(args: Args) -> std::io::Result<()> {
    let running = match args.dialect {
        Dialect::OpenRouter => Running::OpenRouter(FakeOpenRouter::start_with(args.opts).await?),
        Dialect::OpenAi => Running::OpenAi(FakeOpenAi::start_with(args.opts).await?),
        Dialect::Anthropic => {
            let key = args.opts.api_keys.first().cloned().unwrap_or_default();
            Running::Anthropic(FakeAnthropic::start_with_key(key).await?)
        }
    };
    let (base_url, addr) = match &running {
        Running::OpenRouter(f) => (f.base_url(), f.addr()),
        Running::OpenAi(f) => (f.base_url(), f.addr()),
        Running::Anthropic(f) => (f.base_url(), f.addr()),
    };
    let line = format!(
        "{{\"base_url\":{},\"addr\":{}}}",
        serde_json::Value::from(base_url),
        serde_json::Value::from(addr.to_string())
    );
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stdin_closed = async {
        if args.watch_stdin && stdin_is_watchable() {
            let _ = stdin_eof().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = stdin_closed => {}
    }
    drop(running);
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("fake-upstream: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-upstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}
