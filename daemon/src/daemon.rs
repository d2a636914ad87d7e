//! Startup: read and validate everything before binding a port, then serve until a signal.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::sync::watch;

use crate::app::App;
use crate::cli::{CheckArgs, Cli, Command, ServeArgs};
use crate::config::{self, ConfigFile, Diagnostic};
use crate::logging;
use crate::server;
use crate::table::{Overrides, ProcessEnv, RoutingTable};
use crate::upstream::UpstreamClient;

/// Default client API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default admin address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8001";

/// Runs a parsed command line and returns the process exit code (SPEC §2).
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

/// Everything `serve` needs, validated.
struct Startup {
    table: RoutingTable,
    listen: SocketAddr,
    admin_listen: SocketAddr,
}

/// Reads the config and builds the first table; the name is used in diagnostics.
fn load(
    config_path: Option<&std::path::Path>,
    overrides: &Overrides,
) -> (
    Option<ConfigFile>,
    Result<RoutingTable, Vec<Diagnostic>>,
    String,
) {
    let path = config::resolve_path(config_path);
    let name = path
        .as_ref()
        .map_or_else(|| "<built-in>".to_owned(), |p| p.display().to_string());
    let file = match &path {
        Some(path) => match config::load(path) {
            Ok(file) => file,
            Err(diagnostic) => return (None, Err(vec![diagnostic]), name),
        },
        None => ConfigFile::default(),
    };
    let table = RoutingTable::build(&name, &file, overrides, &ProcessEnv);
    (Some(file), table, name)
}

fn check(args: &CheckArgs) -> ExitCode {
    let (_, table, name) = load(args.config.as_deref(), &Overrides::default());
    match table {
        Ok(table) => {
            for warning in &table.warnings {
                eprintln!("{name}: warning: {warning}");
            }
            println!("{name}: ok");
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

fn validate(
    args: &ServeArgs,
    file: Option<&ConfigFile>,
    table: RoutingTable,
    name: &str,
) -> Result<Startup, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut address = |flag: &Option<String>,
                       key: Option<&serde_saphyr::Spanned<String>>,
                       default: &str,
                       what: &str| {
        let (text, origin) = match (flag, key) {
            (Some(flag), _) => (flag.clone(), Diagnostic::general(&format!("--{what}"), "")),
            (None, Some(key)) => (key.value.clone(), Diagnostic::at(name, key.referenced, "")),
            (None, None) => (default.to_owned(), Diagnostic::general("<built-in>", "")),
        };
        match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(Diagnostic {
                    message: format!(
                        "{what}: `{text}` is not an address (expected IP:PORT, e.g. 127.0.0.1:8000)"
                    ),
                    ..origin
                });
                None
            }
        }
    };
    let listen = address(
        &args.listen,
        file.and_then(|f| f.listen.as_ref()),
        DEFAULT_LISTEN,
        "listen",
    );
    let admin_listen = address(
        &args.admin_listen,
        file.and_then(|f| f.admin.listen.as_ref()),
        DEFAULT_ADMIN_LISTEN,
        "admin-listen",
    );
    let (Some(listen), Some(admin_listen)) = (listen, admin_listen) else {
        return Err(errors);
    };
    if table.auth.is_open() && !server::is_loopback(&listen) && !table.auth.allow_open {
        errors.push(Diagnostic::general(
            name,
            format!("refusing to serve {listen} without auth: configure auth.keys, listen on a loopback address, or set auth.allow_open: true"),
        ));
    }
    if !server::is_loopback(&admin_listen) {
        errors.push(Diagnostic::general(
            name,
            format!("refusing to serve the admin API on {admin_listen} without a token: use a loopback address"),
        ));
    }
    if errors.is_empty() {
        Ok(Startup {
            table,
            listen,
            admin_listen,
        })
    } else {
        Err(errors)
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        default_backend: args.default_backend.clone(),
        force_model: args.force_model.clone(),
    };
    let (file, table, name) = load(args.config.as_deref(), &overrides);
    logging::init(
        args.log_format
            .or_else(|| file.as_ref().and_then(|f| f.log_format)),
    );
    let startup = table.and_then(|table| validate(&args, file.as_ref(), table, &name));
    let startup = match startup {
        Ok(startup) => startup,
        Err(errors) => {
            for error in &errors {
                tracing::error!(message = "Invalid configuration.", error = %error);
                eprintln!("{error}");
            }
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orproxy: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(startup)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(message = "Fatal error.", error = %error);
            eprintln!("orproxy: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(startup: Startup) -> std::io::Result<()> {
    let Startup {
        table,
        listen,
        admin_listen,
    } = startup;
    for warning in &table.warnings {
        tracing::warn!(message = %warning);
    }
    let limits = table.limits;
    let default_backend = table.default_backend.clone();
    let client = UpstreamClient::new(limits.connect_timeout).map_err(std::io::Error::other)?;
    let (hard_stop_tx, hard_stop_rx) = watch::channel(false);
    let app = App::new(table, client, hard_stop_rx);
    let api = server::bind(&listen.to_string(), "client API").await?;
    let admin = server::bind(&admin_listen.to_string(), "admin API").await?;
    tracing::info!(
        message = "Ready.",
        listen = %api.local_addr()?,
        admin_listen = %admin.local_addr()?,
        default_backend = %default_backend,
        version = env!("CARGO_PKG_VERSION"),
    );
    server::serve(
        app,
        api,
        admin,
        server::shutdown_signal(),
        limits.shutdown_grace,
        hard_stop_tx,
    )
    .await?;
    tracing::info!(message = "Stopped.");
    Ok(())
}
