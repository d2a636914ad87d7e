//! Startup: read and validate everything before binding a port, then serve until a signal.

use std::process::ExitCode;

use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use crate::app::App;
use crate::cli::{CheckArgs, Cli, Command, ExplainArgs, RulesCommand, ServeArgs};
use crate::config::{self, Sources};
use crate::ledger::Accounts;
use crate::logging;
use crate::reload::{self, Reason, Request};
use crate::server;
use crate::service;
use crate::table::Overrides;
use crate::upstream::UpstreamClient;
use crate::watch::{self as watcher, Watched};

/// Runs a parsed command line and returns the process exit code (SPEC §2).
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Explain(args)) => explain(&args),
        Some(Command::Rules(RulesCommand::Test(args))) => {
            let dir = match &args.dir {
                Some(dir) => Some(dir.clone()),
                // The rules directory named by the config: a config that does not load says why.
                None => match config::load(&Sources::resolve(args.config.as_deref(), None)) {
                    Ok((_, dir)) => dir,
                    Err(errors) => {
                        errors.iter().for_each(|e| eprintln!("{e}"));
                        return ExitCode::FAILURE;
                    }
                },
            };
            match dir {
                Some(dir) if crate::ruletest::run(args.config.as_deref(), &dir) => {
                    ExitCode::SUCCESS
                }
                Some(_) => ExitCode::FAILURE,
                None => {
                    eprintln!(
                        "orproxy rules test: no rules directory (give DIR, or rules_dir in the config)"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Report(args)) => crate::report::run(&args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let sources = Sources::resolve(args.config.as_deref(), args.rules_dir.as_deref());
    match reload::build(&sources, &Overrides::default()) {
        Ok(table) => {
            for warning in &table.warnings {
                eprintln!("warning: {warning}");
            }
            let files: Vec<String> = table
                .files
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            println!(
                "ok: {}",
                if files.is_empty() {
                    "built-in defaults".to_owned()
                } else {
                    files.join(", ")
                }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            ExitCode::FAILURE
        }
    }
}

fn explain(args: &ExplainArgs) -> ExitCode {
    let sources = Sources::resolve(args.config.as_deref(), args.rules_dir.as_deref());
    let table = match reload::build(&sources, &Overrides::default()) {
        Ok(table) => table,
        Err(errors) => {
            for error in &errors {
                eprintln!("{error}");
            }
            return ExitCode::FAILURE;
        }
    };
    let body = match args.file.as_deref().filter(|f| f.as_os_str() != "-") {
        Some(path) => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map(|_| buf)
                .map_err(|e| format!("stdin: {e}"))
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            eprintln!("orproxy explain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cx = crate::route::Context {
        key: args.key.clone(),
        client_ip: None,
        host: std::sync::Arc::new(orproxy_rules::NoLedger),
        clock: None,
    };
    // Offline, without the daemon's spend: budgets are not applied (README).
    let out = crate::explain::explain(&table, &body, &cx, None);
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    ExitCode::SUCCESS
}

fn serve(args: ServeArgs) -> ExitCode {
    let sources = Sources::resolve(args.config.as_deref(), args.rules_dir.as_deref());
    let overrides = Overrides {
        default_backend: args.default_backend.clone(),
        force_model: args.force_model.clone(),
        listen: args.listen.clone(),
        admin_listen: args.admin_listen.clone(),
        log_format: args.log_format,
        db: args.db.clone(),
    };
    let table = reload::build(&sources, &overrides);
    let format = table
        .as_ref()
        .ok()
        .and_then(|t| t.restart_only.log_format)
        .or(args.log_format);
    logging::init(format);
    let table = match table {
        Ok(table) => table,
        Err(errors) => {
            for error in &errors {
                tracing::error!(message = "Invalid configuration.", error = %error);
                eprintln!("{error}");
            }
            return ExitCode::FAILURE;
        }
    };
    // The main thread runs admin, reloads and signals; the client API gets its own worker
    // threads (see `server`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orproxy: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(table, sources, overrides)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(message = "Fatal error.", error = %error);
            eprintln!("orproxy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    table: crate::table::RoutingTable,
    sources: Sources,
    overrides: Overrides,
) -> std::io::Result<()> {
    for warning in &table.warnings {
        tracing::warn!(message = %warning);
    }
    crate::metrics::install();
    crate::metrics::register_event_counters();
    crate::metrics::register_budgets(&table.budgets);
    let limits = table.limits;
    let listen = table.restart_only.listen;
    let admin_listen = table.restart_only.admin_listen;
    let watched = Watched {
        config: sources.config.clone(),
        rules_dir: table.restart_only.rules_dir.clone(),
    };
    let default_backend = table.default_backend.clone();
    // Built once here so that a TLS setup failure stops the start, not a request.
    UpstreamClient::new(limits.connect_timeout).map_err(std::io::Error::other)?;
    let accounts = open_ledger(&table.restart_only)?;
    let (hard_stop_tx, hard_stop_rx) = watch::channel(false);
    let (reload_tx, reload_rx) = mpsc::channel(16);
    let app = App::new(
        table,
        limits.connect_timeout,
        hard_stop_rx,
        reload_tx.clone(),
        Arc::new(accounts),
    );

    let api = server::bind_api(listen, server::worker_count())?;
    let api_addr = api
        .first()
        .map(std::net::TcpListener::local_addr)
        .transpose()?
        .unwrap_or(listen);
    let admin = server::bind_admin(admin_listen).await?;
    tokio::spawn(reload::run(Arc::clone(&app), sources, overrides, reload_rx));
    // Keep the watcher alive for the daemon's lifetime; without it, reloads still come from
    // SIGHUP and the admin API.
    let _watcher = match watcher::start(watched, reload_tx.clone()) {
        Ok(w) => Some(w),
        Err(error) => {
            tracing::warn!(message = "Cannot watch the configuration; reload with SIGHUP or POST /admin/reload.", %error);
            None
        }
    };
    tokio::spawn(reload_on_sighup(reload_tx));
    if !app.table.load().budgets.is_empty() {
        // Budgets price every request before it is sent: have the prices before serving.
        crate::models::refresh_stale_prices(&app).await;
    }
    let _ = app.bound.set((api_addr, admin.local_addr()?));
    tokio::spawn(service::watchdog());
    tokio::spawn(crate::models::keep_prices_fresh(Arc::clone(&app)));
    tokio::spawn(crate::ledger::enforce_retention(Arc::clone(&app)));
    service::ready(&reload::status_line(&app));
    tracing::info!(
        message = "Ready.",
        listen = %api_addr,
        admin_listen = %admin.local_addr()?,
        default_backend = %default_backend,
        version = env!("CARGO_PKG_VERSION"),
    );
    let accounts = Arc::clone(&app.accounts);
    server::serve(app, api, admin, hard_stop_tx).await?;
    // Every request has ended (or been ended): commit the last usage rows.
    tokio::task::spawn_blocking(move || accounts.close())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!(message = "Stopped.");
    Ok(())
}

/// Opens the usage database; without it the daemon refuses to start unless
/// `database.required: false`, in which case it proxies without recording usage.
fn open_ledger(settings: &crate::table::RestartOnly) -> std::io::Result<Accounts> {
    let Some(path) = &settings.database else {
        tracing::info!(message = "Usage recording is off (database.enabled: false).");
        return Ok(Accounts::default());
    };
    match Accounts::open(path) {
        Ok(accounts) => {
            tracing::info!(message = "Usage database open.", path = %path.display());
            Ok(accounts)
        }
        Err(error) if settings.database_required => Err(std::io::Error::other(format!(
            "usage database {error} (set `database.required: false` to proxy without recording usage)"
        ))),
        Err(error) => {
            tracing::warn!(message = "Usage database unavailable: proxying without recording usage.", %error);
            Ok(Accounts::default())
        }
    }
}

async fn reload_on_sighup(reloads: mpsc::Sender<Request>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!(message = "Cannot listen for SIGHUP.");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(message = "SIGHUP: reloading.");
            if reloads
                .send(Request {
                    reason: Reason::Signal,
                    reply: None,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
