//! Reload: the one path from configuration files to a serving routing table.
//!
//! Startup, the file watcher, SIGHUP and `POST /admin/reload` all go through [`build`]; the
//! reload loop builds the new table off the request path, refuses it if it is invalid or
//! changes a restart-only setting, and otherwise swaps it in atomically. In-flight requests
//! finish on the table they started with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::config::{self, Diagnostic, Sources};
use crate::metrics;
use crate::service;
use orproxy_rules::{RuleSet, Sandbox};

use crate::table::{Env, Overrides, ProcessEnv, RoutingTable};

/// Reads every source and builds a table (or every problem found).
pub fn build(sources: &Sources, overrides: &Overrides) -> Result<RoutingTable, Vec<Diagnostic>> {
    build_with(sources, overrides, &ProcessEnv)
}

/// [`build`] with another environment (rule tests accept any key variable).
pub fn build_with(
    sources: &Sources,
    overrides: &Overrides,
    env: &dyn Env,
) -> Result<RoutingTable, Vec<Diagnostic>> {
    // Scripts are compiled even when the YAML has errors: one run reports both.
    let (config, rules_dir) = config::load_parts(sources);
    let rules = match &rules_dir {
        Some(dir) => config::rule_scripts(dir).and_then(|sources| {
            RuleSet::compile(&sources, Sandbox::default())
                .map(Some)
                .map_err(|errors| {
                    errors
                        .into_iter()
                        .map(|e| Diagnostic {
                            file: e.file,
                            line: e.line as u64,
                            column: e.column as u64,
                            message: e.message,
                        })
                        .collect::<Vec<_>>()
                })
        }),
        None => Ok(None),
    };
    let table = config.and_then(|config| RoutingTable::build(&config, rules_dir, overrides, env));
    match (table, rules) {
        (Ok(mut table), Ok(rules)) => {
            table.rules = rules.map(Arc::new);
            Ok(table)
        }
        (Err(mut a), Err(b)) => {
            a.extend(b);
            Err(a)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The first table.
    Startup,
    /// A watched file changed.
    Watch,
    /// SIGHUP.
    Signal,
    /// `POST /admin/reload`.
    Admin,
}

impl Reason {
    /// The name logs use, as `/admin/status` does.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Watch => "watch",
            Reason::Signal => "signal",
            Reason::Admin => "admin",
        }
    }
}

/// A reload request, with an optional channel for its result.
pub struct Request {
    /// Why.
    pub reason: Reason,
    /// Where to send the result.
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// The result of one reload.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// When it finished (seconds since the Unix epoch).
    pub at: u64,
    /// What asked for it.
    pub reason: Reason,
    /// `ok` or `error`.
    pub result: &'static str,
    /// The table version serving after it.
    pub version: u64,
    /// Every problem, as `file:line:col: message`.
    pub errors: Vec<String>,
    /// The files of the table serving after it.
    pub files: Vec<PathBuf>,
}

impl Outcome {
    /// The outcome of the startup load.
    pub fn startup(files: Vec<PathBuf>) -> Self {
        Outcome {
            at: unix_now(),
            reason: Reason::Startup,
            result: "ok",
            version: 1,
            errors: Vec::new(),
            files,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves reload requests one at a time until every sender is gone.
pub async fn run(
    app: Arc<App>,
    sources: Sources,
    overrides: Overrides,
    mut requests: mpsc::Receiver<Request>,
) {
    while let Some(request) = requests.recv().await {
        service::reloading();
        let (s, o) = (sources.clone(), overrides.clone());
        // Reading files and compiling regexes is blocking work: keep it off the async workers.
        let built = tokio::task::spawn_blocking(move || build(&s, &o))
            .await
            .unwrap_or_else(|e| {
                Err(vec![Diagnostic::general(
                    "<reload>",
                    format!("reload task failed: {e}"),
                )])
            });
        let outcome = apply(&app, request.reason, built);
        service::ready(&status_line(&app));
        if let Some(reply) = request.reply {
            let _ = reply.send(outcome);
        }
    }
}

/// The one-line status systemd shows (`systemctl status`).
pub fn status_line(app: &App) -> String {
    let table = app.table.load();
    let last = app.last_reload();
    let tail = if last.result == "ok" {
        String::new()
    } else {
        match last.errors.len() {
            1 => "; last reload refused (1 error)".to_owned(),
            n => format!("; last reload refused ({n} errors)"),
        }
    };
    let (listen, admin) = app
        .bound
        .get()
        .copied()
        .unwrap_or((table.restart_only.listen, table.restart_only.admin_listen));
    format!(
        "Serving on {listen} (admin {admin}), table v{}, default backend {}{tail}",
        app.version(),
        table.default_backend
    )
}

/// Swaps in a valid table, or keeps the old one and records why.
fn apply(app: &Arc<App>, reason: Reason, built: Result<RoutingTable, Vec<Diagnostic>>) -> Outcome {
    let current = app.table.load();
    let built = built.and_then(|table| {
        let changes = table.restart_only.changes_from(&current.restart_only);
        if changes.is_empty() {
            return Ok(table);
        }
        Err(changes
            .into_iter()
            .map(|change| {
                let message = format!(
                    "{} cannot change at runtime: restart orproxy to apply (the running table is kept)",
                    change.description
                );
                // Where the new value is written; a key that was removed has no place left,
                // so the file that held it is named.
                match (
                    table.restart_origins.get(change.key),
                    current.restart_origins.get(change.key),
                ) {
                    (Some(origin), _) => origin.error(message),
                    (None, Some(was)) => Diagnostic::general(&was.file, message),
                    (None, None) => Diagnostic::general("<reload>", message),
                }
            })
            .collect())
    });
    let outcome = match built {
        Ok(table) => {
            let files = table.files.clone();
            app.accounts.budgets.set_rules(Arc::clone(&table.budgets));
            metrics::register_budgets(&table.budgets);
            let priced = !table.budgets.is_empty();
            let retention = app.table.load().retention;
            app.table.store(Arc::new(table));
            crate::ledger::retention_reloaded(app, retention);
            if priced {
                // Budgets may be new: fetch the price lists they need (only those missing or stale).
                let app = Arc::clone(app);
                tokio::spawn(async move {
                    crate::models::refresh_stale_prices(&app).await;
                });
            }
            let version = app.next_version();
            tracing::info!(
                message = "Routing table reloaded.",
                reason = reason.as_str(),
                version,
                files = files.len()
            );
            Outcome {
                at: unix_now(),
                reason,
                result: "ok",
                version,
                errors: Vec::new(),
                files,
            }
        }
        Err(errors) => {
            for error in &errors {
                tracing::error!(message = "Reload refused; the running table is kept.", reason = reason.as_str(), error = %error);
            }
            Outcome {
                at: unix_now(),
                reason,
                result: "error",
                version: app.version(),
                errors: errors.iter().map(ToString::to_string).collect(),
                files: current.files.clone(),
            }
        }
    };
    metrics::reload(outcome.result == "ok");
    app.set_last_reload(outcome.clone());
    outcome
}
