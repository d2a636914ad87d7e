//! `orproxy rules test [DIR]`: rule scripts tested like code.
//!
//! Every `*.test.yaml` beside the scripts is a list of cases: a request in, the expected route
//! out (or a rejection). Each case runs through the same routing code as a live request, with
//! a pinned clock and the spend figures the case gives; nothing is sent upstream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use orproxy_plugin::JsonObject;
use orproxy_rules::Host;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Diagnostic, Sources};
use crate::error::ProxyError;
use crate::reload;
use crate::route::{self, Context, Route};
use crate::table::{Env, EnvError, Overrides, ProcessEnv};

/// One test case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case checks, in words.
    pub name: String,
    /// The chat completion body.
    pub request: Value,
    /// The proxy key's name.
    #[serde(default)]
    pub key: Option<String>,
    /// The client's IP address.
    #[serde(default)]
    pub client_ip: Option<std::net::IpAddr>,
    /// `now()` during the case, as Unix seconds.
    #[serde(default)]
    pub now: Option<i64>,
    /// `budget_left(name)` answers.
    #[serde(default)]
    pub budgets: BTreeMap<String, f64>,
    /// `spent_usd(scope, period)` answers, keyed `scope/period`.
    #[serde(default)]
    pub spent: BTreeMap<String, f64>,
    /// What must come out.
    pub expect: Expect,
}

/// The expected route; fields left out are not checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Backend of the first attempt.
    pub backend: Option<String>,
    /// Model of the first attempt.
    pub model: Option<String>,
    /// Parameters sent with the first attempt (these keys must have these values).
    pub params: Option<BTreeMap<String, Value>>,
    /// Outbound headers set by rules, exactly (names in any case).
    pub headers: Option<BTreeMap<String, String>>,
    /// The rest of the chain, as `backend:model`, exactly.
    pub failover: Option<Vec<String>>,
    /// Tags (these keys must have these values).
    pub tags: Option<BTreeMap<String, Value>>,
    /// A rejection: its status and a part of its message.
    pub reject: Option<ExpectReject>,
}

/// An expected rejection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectReject {
    /// The status (403 unless the rule chose another).
    pub status: Option<u16>,
    /// A part of the message.
    pub message: Option<String>,
}

/// Spend figures from the case.
struct CaseHost {
    budgets: BTreeMap<String, f64>,
    spent: BTreeMap<String, f64>,
}

impl Host for CaseHost {
    fn spent_usd(&self, scope: &str, period: &str) -> f64 {
        self.spent
            .get(&format!("{scope}/{period}"))
            .copied()
            .unwrap_or(0.0)
    }

    fn budget_left(&self, name: &str) -> f64 {
        self.budgets
            .get(name)
            .copied()
            .unwrap_or(orproxy_rules::engine::UNLIMITED)
    }
}

/// Key variables are not needed to route: any unset one reads as a placeholder.
struct AnyKey;

impl Env for AnyKey {
    fn var(&self, name: &str) -> Result<String, EnvError> {
        Ok(ProcessEnv
            .var(name)
            .unwrap_or_else(|_| "rules-test-placeholder".to_owned()))
    }
}

/// Runs every case of every `*.test.yaml` in `dir`; prints a line per case and a diff for each
/// failure. Returns false when a case failed or nothing could run.
pub fn run(config: Option<&Path>, dir: &Path) -> bool {
    let sources = Sources {
        config: config.map(Path::to_owned),
        rules_dir_flag: Some(dir.to_owned()),
    };
    let table = match reload::build_with(&sources, &Overrides::default(), &AnyKey) {
        Ok(table) => table,
        Err(errors) => {
            for error in errors {
                eprintln!("{error}");
            }
            return false;
        }
    };
    let files = match test_files(dir) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", dir.display());
            return false;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file.display().to_string();
        let cases = match crate::config::read_source(file)
            .map_err(|e| Diagnostic::general(&name, format!("cannot read: {e}")))
            .and_then(|text| parse_cases(&name, &text))
        {
            Ok(cases) => cases,
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
                continue;
            }
        };
        for case in cases {
            let problems = check(&table, &case);
            if problems.is_empty() {
                passed += 1;
                println!("ok   {name}: {}", case.name);
            } else {
                failed += 1;
                println!("FAIL {name}: {}", case.name);
                for problem in problems {
                    println!("       {problem}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed ({} files)", files.len());
    failed == 0
}

fn test_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Parses a test file, locating errors.
pub fn parse_cases(name: &str, text: &str) -> Result<Vec<Case>, Diagnostic> {
    serde_saphyr::from_str::<Vec<Case>>(text).map_err(|err| {
        let message = err.without_snippet().to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_owned();
        match err.location() {
            Some(at) => Diagnostic::at(name, at, message),
            None => Diagnostic::general(name, message),
        }
    })
}

/// Runs one case; returns what differs from its expectation.
pub fn check(table: &crate::table::RoutingTable, case: &Case) -> Vec<String> {
    let body = match serde_json::to_vec(&case.request)
        .map_err(|e| e.to_string())
        .and_then(|b| JsonObject::parse(&b).map_err(|e| e.to_string()))
    {
        Ok(body) => body,
        Err(e) => return vec![format!("request: {e}")],
    };
    let cx = Context {
        key: case.key.clone(),
        client_ip: case.client_ip,
        host: Arc::new(CaseHost {
            budgets: case.budgets.clone(),
            spent: case.spent.clone(),
        }),
        clock: case.now,
    };
    let expect = &case.expect;
    match (route::resolve(table, &body, &cx), &expect.reject) {
        (Err(ProxyError::Rejected { status, message }), Some(want)) => {
            let mut problems = Vec::new();
            if let Some(s) = want.status.filter(|s| *s != status) {
                problems.push(format!("reject.status: expected {s}, got {status}"));
            }
            if let Some(m) = want.message.as_deref().filter(|m| !message.contains(m)) {
                problems.push(format!(
                    "reject.message: expected it to contain {m:?}, got {message:?}"
                ));
            }
            problems
        }
        (Err(error), _) => vec![format!(
            "the request failed: {} {error}",
            error.status().as_u16()
        )],
        (Ok(route), Some(_)) => vec![format!(
            "expected a rejection, got a route to {}",
            route.targets[0].label()
        )],
        (Ok(route), None) => differences(&route, expect),
    }
}

fn differences(route: &Route, expect: &Expect) -> Vec<String> {
    let mut problems = Vec::new();
    let first = &route.targets[0];
    let mut same = |field: &str, want: String, got: String| {
        if want != got {
            problems.push(format!("{field}: expected {want}, got {got}"));
        }
    };
    if let Some(backend) = &expect.backend {
        same("backend", backend.clone(), first.backend.clone());
    }
    if let Some(model) = &expect.model {
        same("model", model.clone(), first.model.clone());
    }
    if let Some(failover) = &expect.failover {
        let got: Vec<String> = route.targets[1..]
            .iter()
            .map(route::Target::label)
            .collect();
        same("failover", format!("{failover:?}"), format!("{got:?}"));
    }
    if let Some(params) = &expect.params {
        for (key, want) in params {
            let got = first
                .params
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.to_string());
            same(
                &format!("params.{key}"),
                want.to_string(),
                got.unwrap_or_else(|| "nothing".into()),
            );
        }
    }
    if let Some(headers) = &expect.headers {
        let want: BTreeMap<String, &str> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
            .collect();
        let got: BTreeMap<String, &str> = route
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("")))
            .collect();
        same("headers", format!("{want:?}"), format!("{got:?}"));
    }
    if let Some(tags) = &expect.tags {
        for (key, want) in tags {
            let got = route
                .tags
                .get(key)
                .map_or_else(|| "nothing".to_owned(), Value::to_string);
            same(&format!("tags.{key}"), want.to_string(), got);
        }
    }
    problems
}
