//! A compiled set of rule scripts, run in file-name order on every request.

use std::path::Path;
use std::sync::Arc;

use rhai::{AST, CallFnOptions, Engine, EvalAltResult, Position, Scope};
use serde::Serialize;

use crate::engine::{self, Host, Sandbox};
use crate::request::{RequestHandle, RouteRequest, Snapshot};

/// The hook every script may define.
pub const HOOK: &str = "on_request";

/// A problem in a script, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ScriptError {
    /// The script's path (or name).
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What went wrong.
    pub message: String,
}

impl ScriptError {
    fn at(file: &str, position: Position, message: String) -> Self {
        ScriptError {
            file: file.to_owned(),
            line: position.line().unwrap_or(0),
            column: position.position().unwrap_or(0),
            message,
        }
    }
}

/// Why running the rules failed a request (the daemon answers 500 naming the script).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {name} failed{}: {message}", if *.line > 0 { format!(" at line {}", .line) } else { String::new() })]
pub struct RuleFailure {
    /// The script's file name.
    pub name: String,
    /// The line where it failed (0 when unknown).
    pub line: usize,
    /// Why: a runtime error or an exceeded limit.
    pub message: String,
}

/// One field a script changed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The script's file name.
    pub script: Arc<str>,
    /// `model`, `backend`, `params`, `headers`, `failover`, `tags` or `rejection`.
    pub field: &'static str,
    /// The value before the script ran.
    pub before: Snapshot,
    /// The value after.
    pub after: Snapshot,
}

struct Script {
    name: Arc<str>,
    ast: AST,
    /// Whether it defines the hook (scripts may hold only helpers or constants).
    has_hook: bool,
}

/// The compiled scripts of a rules directory.
pub struct RuleSet {
    engine: Engine,
    scripts: Vec<Script>,
    limits: Sandbox,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("scripts", &self.names())
            .finish()
    }
}

impl RuleSet {
    /// Compiles `(name, source)` pairs in the given order; every error is reported.
    pub fn compile(
        sources: &[(String, String)],
        limits: Sandbox,
    ) -> Result<RuleSet, Vec<ScriptError>> {
        let engine = engine::harden(&limits);
        let mut scripts = Vec::with_capacity(sources.len());
        let mut errors = Vec::new();
        for (name, source) in sources {
            match engine.compile(source) {
                Ok(ast) => {
                    let hook = ast.iter_functions().find(|f| f.name == HOOK);
                    match hook {
                        Some(f) if f.params.len() != 1 => errors.push(ScriptError {
                            file: name.clone(),
                            line: 0,
                            column: 0,
                            message: format!(
                                "`fn {HOOK}` must take one parameter (the request), not {}",
                                f.params.len()
                            ),
                        }),
                        hook => scripts.push(Script {
                            name: Path::new(name).file_name().map_or_else(
                                || name.as_str().into(),
                                |n| n.to_string_lossy().into(),
                            ),
                            has_hook: hook.is_some(),
                            ast,
                        }),
                    }
                }
                Err(e) => errors.push(ScriptError::at(
                    name,
                    e.position(),
                    e.err_type().to_string(),
                )),
            }
        }
        if errors.is_empty() {
            Ok(RuleSet {
                engine,
                scripts,
                limits,
            })
        } else {
            Err(errors)
        }
    }

    /// The script names, in run order.
    pub fn names(&self) -> Vec<&str> {
        self.scripts.iter().map(|s| &*s.name).collect()
    }

    /// True when no script is loaded.
    pub fn is_empty(&self) -> bool {
        self.scripts.is_empty()
    }

    /// Runs every script's hook on `request`, in order, stopping at a rejection. Returns the
    /// request as the scripts left it and what each script changed.
    pub fn run(
        &self,
        request: RouteRequest,
        host: Arc<dyn Host>,
        clock: Option<i64>,
    ) -> Result<(RouteRequest, Vec<Change>), RuleFailure> {
        let handle = RequestHandle::new(request);
        let mut trace = Vec::new();
        let outcome = engine::with_run(host, clock, || {
            // One scope for every hook call: it is emptied after each, and keeps its storage.
            let mut scope = Scope::new();
            for script in self.scripts.iter().filter(|s| s.has_hook) {
                engine::start_deadline(self.limits.deadline);
                let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
                let result = self.engine.call_fn_with_options::<rhai::Dynamic>(
                    options,
                    &mut scope,
                    &script.ast,
                    HOOK,
                    (handle.clone(),),
                );
                if let Err(error) = result {
                    return Err(failure(&script.name, &error, &self.limits));
                }
                let mut shared = handle.lock();
                let written = std::mem::take(&mut shared.written);
                for (field, before) in written {
                    let after = shared.request.snapshot(field);
                    if after != before {
                        trace.push(Change {
                            script: Arc::clone(&script.name),
                            field,
                            before,
                            after,
                        });
                    }
                }
                if shared.request.rejection.is_some() {
                    break;
                }
            }
            Ok(())
        });
        outcome?;
        Ok((handle.into_request(), trace))
    }
}

fn failure(name: &str, error: &EvalAltResult, limits: &Sandbox) -> RuleFailure {
    let message = match error.unwrap_inner() {
        EvalAltResult::ErrorTerminated(..) => format!(
            "ran longer than its {} ms deadline",
            limits.deadline.as_millis()
        ),
        EvalAltResult::ErrorTooManyOperations(..) => {
            format!("exceeded {} operations", limits.max_operations)
        }
        EvalAltResult::ErrorStackOverflow(..) => {
            format!("exceeded {} nested calls", limits.max_call_levels)
        }
        EvalAltResult::ErrorDataTooLarge(what, ..) => format!("{what} exceeded its limit"),
        other => {
            // Rhai appends " (line L, position P)" itself; the line is reported separately.
            let text = other.to_string();
            match text.rfind(" (line ") {
                Some(at) => text[..at].to_owned(),
                None => text,
            }
        }
    };
    // Errors inside script functions are wrapped: the innermost one knows the line.
    let line = error
        .unwrap_inner()
        .position()
        .line()
        .or_else(|| error.position().line())
        .unwrap_or(0);
    RuleFailure {
        name: name.to_owned(),
        line,
        message,
    }
}
