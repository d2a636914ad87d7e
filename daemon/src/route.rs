//! Route: from the request's `model` to the ordered targets to try.
//!
//! Order (SPEC §4): `--force-model` → `model_aliases` (first match, one pass) → parse the
//! selector (first element → primary target, the rest → its failover chain) → `failover:`
//! config chains appended → rule scripts (which may rewrite all of it) → each backend checked.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use orproxy_plugin::JsonObject;
use orproxy_rules::{Change, Host, RouteRequest};
use serde_json::Value;

use crate::config::Triggers;
use crate::error::ProxyError;
use crate::selector::{self, NOT_PARAMS, Selector};
use crate::table::RoutingTable;

/// Who is asking, for rule scripts.
#[derive(Clone)]
pub struct Context {
    /// The proxy key's name.
    pub key: Option<String>,
    /// The client's address.
    pub client_ip: Option<IpAddr>,
    /// What `spent_usd` and `budget_left` read.
    pub host: Arc<dyn Host>,
    /// A pinned clock for `now()` (rule tests); `None` is the real time.
    pub clock: Option<i64>,
}

/// One upstream target: a configured backend, the model to ask it for, and URI parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Backend name (a key of the routing table).
    pub backend: String,
    /// Upstream model name.
    pub model: String,
    /// Parameters that override the body's values for this target.
    pub params: Vec<(String, Value)>,
    /// Body fields a rule removed for this target.
    pub unset: Vec<String>,
}

impl Target {
    /// `backend:model`, as shown in `x-orproxy-route` and logs.
    pub fn label(&self) -> String {
        let mut label = String::with_capacity(self.backend.len() + 1 + self.model.len());
        label.push_str(&self.backend);
        label.push(':');
        label.push_str(&self.model);
        label
    }
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The model string the client sent.
    pub requested: Option<String>,
    /// The selector after `--force-model` and aliases, when it differs from the request.
    pub rewritten: Option<String>,
    /// Targets in the order they are tried; never empty.
    pub targets: Vec<Target>,
    /// Failures that move on to the next target.
    pub triggers: Triggers,
    /// Outbound headers set by rules (they win over every other source).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Tags set by rules, stored with the request.
    pub tags: BTreeMap<String, Value>,
    /// What each rule script changed.
    pub trace: Vec<Change>,
}

/// Decides the route of a request body.
pub fn resolve(table: &RoutingTable, body: &JsonObject, cx: &Context) -> Result<Route, ProxyError> {
    let mut trace = Vec::new();
    let mut route = resolve_traced(table, body, cx, &mut trace)?;
    route.trace = trace;
    Ok(route)
}

/// The most targets one request may try (its selector's chain, the config's `failover:` chain
/// and the rules' changes together): one short request must not fan out into hundreds of
/// upstream calls.
pub const MAX_TARGETS: usize = 16;

/// [`resolve`], leaving what the rules changed in `trace` even when they reject the request
/// (for `/admin/explain`).
pub fn resolve_traced(
    table: &RoutingTable,
    body: &JsonObject,
    cx: &Context,
    trace: &mut Vec<Change>,
) -> Result<Route, ProxyError> {
    let requested = body.get_str("model")?;
    let mut text = match (&table.force_model, &requested) {
        (Some(forced), _) => forced.clone(),
        (None, Some(model)) => model.clone(),
        (None, None) => return Err(ProxyError::MissingModel),
    };
    if let Some(rewritten) = table.aliases.iter().find_map(|alias| alias.apply(&text)) {
        text = rewritten;
    }
    let (targets, triggers) = chain_of(table, &text)?;
    let mut route = Route {
        rewritten: (requested.as_deref() != Some(text.as_str())).then_some(text),
        requested,
        targets,
        triggers,
        headers: Vec::new(),
        tags: BTreeMap::new(),
        trace: Vec::new(),
    };
    if let Some(rules) = table.rules.as_deref().filter(|r| !r.is_empty()) {
        apply_rules(table, rules, body, cx, &mut route, trace)?;
    }
    if route.targets.len() > MAX_TARGETS {
        return Err(ProxyError::Selector(selector::SelectorError {
            selector: format!("{}|…", route.targets[0].label()),
            reason: format!(
                "the failover chain has {} targets, more than the {MAX_TARGETS} one request may try",
                route.targets.len()
            ),
        }));
    }
    Ok(route)
}

/// The targets of a selector chain (`a|b|c`) with the `failover:` chain the config gives its
/// first target appended, and the triggers that move along it (no aliases, no rules).
fn chain_of(table: &RoutingTable, text: &str) -> Result<(Vec<Target>, Triggers), ProxyError> {
    let mut targets = selector::parse_chain(text)?
        .into_iter()
        .map(|s| target(table, s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut triggers = Triggers::ALL;
    let first = targets.first().map(Target::label).unwrap_or_default();
    if let Some(rule) = table
        .failover
        .iter()
        .find(|rule| rule.regex.is_match(&first))
    {
        triggers = rule.triggers;
        for selector in &rule.chain {
            let extra = target(table, selector.clone())?;
            if !targets.iter().any(|t| t.label() == extra.label()) {
                targets.push(extra);
            }
        }
    }
    Ok((targets, triggers))
}

/// The targets and triggers of `selector` (a budget's fallback), routed as a client's model
/// is: its alias, its chain and the config's `failover:` chain for it (rules have run already).
pub fn fallback_chain(
    table: &RoutingTable,
    selector: &str,
) -> Result<(Vec<Target>, Triggers), ProxyError> {
    let text = table
        .aliases
        .iter()
        .find_map(|alias| alias.apply(selector))
        .unwrap_or_else(|| selector.to_owned());
    chain_of(table, &text)
}

/// Body fields the upstream reads as prompt input (and bills as such): the conversation, and
/// the tool and output schemas that are rendered into the prompt.
const PROMPT_FIELDS: &[&str] = &[
    "messages",
    "prompt",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "response_format",
];

/// A rough prompt size without tokenizing: four bytes of JSON per token, over every field
/// that is prompt input.
pub fn prompt_estimate(body: &JsonObject) -> u64 {
    let bytes: usize = PROMPT_FIELDS
        .iter()
        .filter_map(|field| body.get(field))
        .map(|raw| raw.get().len())
        .sum();
    bytes as u64 / 4
}

fn target(table: &RoutingTable, selector: Selector) -> Result<Target, ProxyError> {
    let backend = selector
        .backend
        .unwrap_or_else(|| table.default_backend.clone());
    if table.backend(&backend).is_none() {
        return Err(ProxyError::UnknownBackend {
            name: backend,
            known: table
                .backends
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(Target {
        backend,
        model: selector.model,
        params: selector.params,
        unset: Vec::new(),
    })
}

/// The facts and decisions scripts see, from the body and the route so far.
fn route_request(body: &JsonObject, route: &Route, cx: &Context) -> RouteRequest {
    let first = &route.targets[0];
    let mut params: BTreeMap<String, Value> = body
        .iter()
        .filter(|(k, _)| !NOT_PARAMS.contains(k))
        .filter_map(|(k, raw)| Some((k.to_owned(), serde_json::from_str(raw.get()).ok()?)))
        .collect();
    params.extend(first.params.iter().cloned());
    let messages = body.get("messages");
    let count = messages
        .and_then(|raw| serde_json::from_str::<Vec<serde::de::IgnoredAny>>(raw.get()).ok())
        .map_or(0, |m| m.len());
    let prompt_tokens = prompt_estimate(body);
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| params.get(*k).and_then(Value::as_i64))
        .unwrap_or(0);
    RouteRequest {
        model: first.model.clone(),
        backend: first.backend.clone(),
        params,
        headers: BTreeMap::new(),
        failover: route.targets[1..].iter().map(selector_text).collect(),
        tags: BTreeMap::new(),
        key: cx.key.clone().unwrap_or_default(),
        prompt_tokens: i64::try_from(prompt_tokens).unwrap_or(i64::MAX),
        max_tokens,
        stream: body.get_bool("stream").ok().flatten().unwrap_or(false),
        messages: i64::try_from(count).unwrap_or(i64::MAX),
        client_ip: cx.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        rejection: None,
    }
}

/// A target written back as a selector (for `req.failover`).
fn selector_text(target: &Target) -> String {
    Selector {
        backend: Some(target.backend.clone()),
        model: target.model.clone(),
        params: target.params.clone(),
    }
    .to_string()
}

/// Runs the rule scripts and applies what they decided.
fn apply_rules(
    table: &RoutingTable,
    rules: &orproxy_rules::RuleSet,
    body: &JsonObject,
    cx: &Context,
    route: &mut Route,
    trace_out: &mut Vec<Change>,
) -> Result<(), ProxyError> {
    let before = route_request(body, route, cx);
    let original_params = before.params.clone();
    let original_failover = before.failover.clone();
    let host = cx
        .host
        .for_request(cx.key.as_deref(), &before.backend, &before.model)
        .unwrap_or_else(|| Arc::clone(&cx.host));
    let (after, trace) = rules.run(before, host, cx.clock).map_err(|failure| {
        crate::metrics::rule_error(&failure.name);
        ProxyError::Rule(failure)
    })?;
    *trace_out = trace;
    if let Some(rejection) = after.rejection {
        return Err(ProxyError::Rejected {
            status: rejection.status,
            message: rejection.message,
        });
    }
    // The chain after the first target: the scripts' `failover` if they changed it.
    let original_rest = route.targets.split_off(1);
    let mut rest: Vec<Target> = if after.failover == original_failover {
        original_rest
    } else {
        let mut rest = Vec::with_capacity(after.failover.len());
        for text in &after.failover {
            let chain = selector::parse_chain(text).map_err(|e| {
                ProxyError::Rule(rule_fault(
                    trace_out,
                    &["failover"],
                    format!("failover: {e}"),
                ))
            })?;
            for s in chain {
                rest.push(target(table, s)?);
            }
        }
        rest
    };
    // Held to the client's rules: a control character could not travel in a header or a log line.
    if after.model.contains(char::is_control) || after.backend.contains(char::is_control) {
        return Err(ProxyError::Rule(rule_fault(
            trace_out,
            &["model", "backend"],
            "the model or backend it set has a control character".to_owned(),
        )));
    }
    // A model with a backend prefix, parameters or a chain is a full selector: parse it again;
    // its own chain comes before the rest. One too long to be a selector is parsed too, so
    // that it fails as one.
    let rewritten = after.model.contains(['?', '|'])
        || after.model.len() > selector::MAX_SELECTOR_BYTES
        || selector::parse_chain(&after.model).is_ok_and(|c| c[0].backend.is_some());
    let mut first = if rewritten {
        let mut chain = selector::parse_chain(&after.model)
            .map_err(|e| {
                ProxyError::Rule(rule_fault(trace_out, &["model"], format!("model: {e}")))
            })?
            .into_iter();
        let head = chain
            .next()
            .map(|s| target(table, s))
            .transpose()?
            .ok_or(ProxyError::MissingModel)?;
        let extra: Vec<Target> = chain.map(|s| target(table, s)).collect::<Result<_, _>>()?;
        rest.splice(0..0, extra);
        head
    } else {
        target(
            table,
            Selector {
                backend: Some(after.backend.clone()),
                model: after.model.clone(),
                params: Vec::new(),
            },
        )?
    };
    // Parameters: the body plus URI parameters as the scripts left them; parameters of a
    // selector the scripts wrote come last, so they win.
    if let Some(name) = after
        .params
        .keys()
        .find(|k| NOT_PARAMS.contains(&k.as_str()))
    {
        return Err(ProxyError::Rule(rule_fault(
            trace_out,
            &["params"],
            format!(
                "it set `params.{name}`, which is the request itself, not a parameter (routing is set through req.model and req.backend)"
            ),
        )));
    }
    let selector_params = std::mem::take(&mut first.params);
    for (key, value) in &after.params {
        if original_params.get(key) != Some(value)
            || route.targets[0].params.iter().any(|(k, _)| k == key)
        {
            first.params.push((key.clone(), value.clone()));
        }
    }
    first.params.extend(selector_params);
    first.unset = original_params
        .keys()
        .filter(|k| !after.params.contains_key(*k))
        .cloned()
        .collect();
    route.targets[0] = first;
    route.targets.extend(rest);
    for (name, value) in &after.headers {
        let invalid = |name: &str| {
            ProxyError::Rule(rule_fault(
                trace_out,
                &["headers"],
                format!("header `{name}` is not a valid HTTP header"),
            ))
        };
        let name = HeaderName::try_from(name.as_str()).map_err(|_| invalid(name))?;
        let value = HeaderValue::try_from(value.as_str()).map_err(|_| invalid(name.as_str()))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(ProxyError::Rule(rule_fault(
                trace_out,
                &["headers"],
                format!("header `{name}` is set by orproxy, not by rules"),
            )));
        }
        route.headers.push((name, value));
    }
    route.tags = after.tags;
    Ok(())
}

/// Headers a rule may not set: the ones that frame the message (a wrong `content-length`
/// hangs or corrupts the upstream exchange), address it, or carry the backend's credentials
/// (those come from the config's key variables, never from a script).
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "authorization",
    "proxy-authorization",
    "x-api-key",
];

/// A failure of the rules found after they ran, blamed on the last script that changed one of
/// `fields`.
fn rule_fault(trace: &[Change], fields: &[&str], message: String) -> orproxy_rules::RuleFailure {
    let script = trace
        .iter()
        .rev()
        .find(|c| fields.contains(&c.field))
        .map_or_else(String::new, |c| c.script.to_string());
    crate::metrics::rule_error(&script);
    orproxy_rules::RuleFailure {
        name: script,
        line: 0,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Trigger;
    use crate::table::Overrides;
    use serde_json::json;

    fn table(yaml: &str, force: Option<&str>) -> RoutingTable {
        let overrides = Overrides {
            force_model: force.map(str::to_owned),
            ..Overrides::default()
        };
        crate::table::tests::build(
            &format!("backends:\n  local:\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n  openrouter:\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n{yaml}"),
            overrides,
            &[],
        )
        .unwrap()
    }

    fn cx() -> Context {
        Context {
            key: Some("team-a".into()),
            client_ip: Some([10, 1, 2, 3].into()),
            host: Arc::new(orproxy_rules::NoLedger),
            clock: None,
        }
    }

    fn route(table: &RoutingTable, body: &str) -> Result<Route, ProxyError> {
        resolve(table, &JsonObject::parse(body.as_bytes()).unwrap(), &cx())
    }

    fn with_rules(table: &mut RoutingTable, source: &str) {
        let rules = orproxy_rules::RuleSet::compile(
            &[("r.rhai".to_owned(), source.to_owned())],
            orproxy_rules::Sandbox::default(),
        )
        .unwrap();
        table.rules = Some(Arc::new(rules));
    }

    #[test]
    fn rules_rewrite_the_route() {
        let mut t = table("", None);
        with_rules(
            &mut t,
            r#"fn on_request(req) {
                req.model = "openrouter:big?temperature=0.1|local:small";
                req.params.top_p = 0.5;
                req.params.remove("seed");
                req.headers["x-team"] = req.key;
                req.tags.ip = req.client_ip;
            }"#,
        );
        let r = route(&t, r#"{"model":"mock:m?seed=4","seed":3,"messages":[]}"#).unwrap();
        assert_eq!(labels(&r), ["openrouter:big", "local:small"]);
        let params: Vec<(&str, Value)> = r.targets[0]
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        assert_eq!(
            params,
            [
                ("top_p", serde_json::json!(0.5)),
                ("temperature", serde_json::json!(0.1))
            ]
        );
        assert_eq!(r.targets[0].unset, ["seed"]);
        assert_eq!(r.headers[0].0, "x-team");
        assert_eq!(r.headers[0].1, "team-a");
        assert_eq!(r.tags["ip"], "10.1.2.3");
        assert_eq!(
            crate::pipeline::compact_trace(&r.trace).as_deref(),
            Some("r.rhai:model,params,headers,tags")
        );
    }

    #[test]
    fn a_rule_setting_the_model_through_params_fails_naming_the_script() {
        let mut t = table("", None);
        with_rules(
            &mut t,
            r#"fn on_request(req) { req.params.model = "sneaky/model"; }"#,
        );
        let err = route(&t, r#"{"model":"mock:m","messages":[]}"#).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("r.rhai"), "{message}");
        assert!(message.contains("`params.model`"), "{message}");
    }

    #[test]
    fn a_bad_chain_or_model_from_a_rule_is_the_rule_s_failure() {
        for script in [
            r#"fn on_request(req) { req.failover = [()]; }"#,
            r#"fn on_request(req) { req.failover = [42]; }"#,
            r#"fn on_request(req) { req.failover = ["a||b"]; }"#,
            r#"fn on_request(req) { req.model = "mock:m?temperature=9"; }"#,
            r#"fn on_request(req) { let m = "mock:"; while m.len() <= 8192 { m += "aaaaaaaa"; } req.model = m; }"#,
        ] {
            let mut t = table("", None);
            with_rules(&mut t, script);
            let err = route(&t, r#"{"model":"mock:m","messages":[]}"#).unwrap_err();
            assert!(matches!(err, ProxyError::Rule(_)), "{script}: {err:?}");
            assert!(err.to_string().contains("r.rhai"), "{script}: {err}");
        }
    }

    #[test]
    fn rules_set_the_chain_and_reject() {
        let mut t = table("", None);
        with_rules(
            &mut t,
            r#"fn on_request(req) { req.failover = ["local:a", "mock:b"]; if req.model == "no" { req.reject(451, "not here"); } }"#,
        );
        assert_eq!(
            labels(&route(&t, r#"{"model":"mock:x|mock:y"}"#).unwrap()),
            ["mock:x", "local:a", "mock:b"]
        );
        let err = route(&t, r#"{"model":"no"}"#).unwrap_err();
        assert_eq!(
            (err.status().as_u16(), err.code()),
            (451, "rejected_by_rule")
        );
        with_rules(&mut t, r#"fn on_request(req) { req.backend = "ghost"; }"#);
        assert_eq!(route(&t, r#"{"model":"x"}"#).unwrap_err().status(), 404);
        with_rules(&mut t, r#"fn on_request(req) { loop {} }"#);
        let err = route(&t, r#"{"model":"x"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (500, "rule_failed"));
        assert!(err.to_string().starts_with("rule r.rhai failed"), "{err}");
    }

    #[test]
    fn rules_cannot_set_framing_or_credential_headers() {
        let mut t = table("", None);
        for (name, value) in [
            ("Content-Length", "5"),
            ("host", "evil.example"),
            ("Authorization", "Bearer stolen"),
            ("transfer-encoding", "chunked"),
            ("bad name", "x"),
        ] {
            with_rules(
                &mut t,
                &format!(r#"fn on_request(req) {{ req.headers["{name}"] = "{value}"; }}"#),
            );
            let err = route(&t, r#"{"model":"x"}"#).unwrap_err();
            assert_eq!((err.status().as_u16(), err.code()), (500, "rule_failed"));
            let message = err.to_string();
            assert!(
                message.starts_with("rule r.rhai failed")
                    && message.contains(&format!("`{}`", name.to_ascii_lowercase())),
                "{message}"
            );
        }
    }

    #[test]
    fn a_chain_longer_than_the_limit_is_refused_whoever_built_it() {
        let t = table("", None);
        let chain = |n: usize| (0..n).map(|i| format!("local:m{i}")).collect::<Vec<_>>();
        let body = |n: usize| format!(r#"{{"model":"{}"}}"#, chain(n).join("|"));
        assert_eq!(
            route(&t, &body(MAX_TARGETS)).unwrap().targets.len(),
            MAX_TARGETS
        );
        let err = route(&t, &body(MAX_TARGETS + 1)).unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (400, "invalid_model"));
        assert!(err.to_string().contains("17 targets"), "{err}");
        let mut t = table("", None);
        with_rules(
            &mut t,
            &format!(
                "fn on_request(req) {{ req.failover = {:?}; }}",
                chain(MAX_TARGETS)
            ),
        );
        assert_eq!(route(&t, &body(1)).unwrap_err().status(), 400);
    }

    #[test]
    fn a_model_set_by_a_rule_is_held_to_the_clients_rules() {
        let mut t = table("", None);
        with_rules(
            &mut t,
            r#"fn on_request(req) { req.model = "fake/ec\nho"; }"#,
        );
        let err = route(&t, r#"{"model":"x"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (500, "rule_failed"));
        assert!(err.to_string().starts_with("rule r.rhai failed"), "{err}");
    }

    #[test]
    fn the_readme_claude_code_aliases_map_claude_codes_model_names() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Use Claude Code").unwrap()..];
        let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
        let aliases = &section[start..start + section[start..].find("```").unwrap()];
        let t = table(aliases, None);
        for (name, expected) in [
            (
                "claude-sonnet-4-5-20250929",
                "openrouter:anthropic/claude-sonnet-4.5",
            ),
            (
                "claude-opus-4-1-20250805",
                "openrouter:anthropic/claude-opus-4.1",
            ),
            (
                "claude-haiku-4-5-20251001",
                "openrouter:anthropic/claude-haiku-4.5",
            ),
            (
                "claude-sonnet-4-20250514",
                "openrouter:anthropic/claude-sonnet-4",
            ),
            (
                "claude-opus-4-20250514",
                "openrouter:anthropic/claude-opus-4",
            ),
            (
                "claude-3-5-haiku-20241022",
                "openrouter:anthropic/claude-3.5-haiku",
            ),
            (
                "claude-3-7-sonnet-20250219",
                "openrouter:anthropic/claude-3.7-sonnet",
            ),
        ] {
            let r = route(&t, &format!(r#"{{"model":"{name}"}}"#)).unwrap();
            assert_eq!(labels(&r), [expected], "{name}");
        }
    }

    fn labels(route: &Route) -> Vec<String> {
        route.targets.iter().map(Target::label).collect()
    }

    #[test]
    fn prefix_or_default_backend() {
        let t = table("", None);
        let r = route(&t, r#"{"model":"local:llama3:8b"}"#).unwrap();
        assert_eq!(labels(&r), ["local:llama3:8b"]);
        let r = route(&t, r#"{"model":"qwen/qwen3-coder:free"}"#).unwrap();
        assert_eq!(labels(&r), ["openrouter:qwen/qwen3-coder:free"]);
    }

    #[test]
    fn force_model_replaces_the_request_model() {
        let t = table("", Some("local:forced"));
        let r = route(&t, r#"{"model":"anything"}"#).unwrap();
        assert_eq!(labels(&r), ["local:forced"]);
        assert_eq!(r.requested.as_deref(), Some("anything"));
        assert_eq!(r.rewritten.as_deref(), Some("local:forced"));
        assert!(route(&t, r#"{}"#).is_ok());
    }

    #[test]
    fn the_seed_alias_rewrites_before_parsing() {
        let t = table(
            "model_aliases:\n  - pattern: \"^gpt-(.*)\"\n    replacement: \"openrouter:openai/gpt-\\\\1\"\n  - pattern: \"openai\"\n    replacement: \"never-applied\"\n",
            None,
        );
        let r = route(&t, r#"{"model":"gpt-4o?temperature=0.2"}"#).unwrap();
        assert_eq!(labels(&r), ["openrouter:openai/gpt-4o"]);
        assert_eq!(
            r.targets[0].params,
            vec![("temperature".to_owned(), json!(0.2))]
        );
        // Aliases run after --force-model, on the forced selector.
        let t = table(
            "model_aliases:\n  - pattern: \"^gpt-(.*)\"\n    replacement: \"local:\\\\1\"\n",
            Some("gpt-x"),
        );
        assert_eq!(labels(&route(&t, r#"{"model":"m"}"#).unwrap()), ["local:x"]);
    }

    #[test]
    fn chains_and_config_failover_append_in_order() {
        let t = table(
            "failover:\n  - match: \"^local:\"\n    chain: [\"openrouter:big\", \"local:a\"]\n    triggers: [connect]\n",
            None,
        );
        let r = route(&t, r#"{"model":"local:a|mock:m"}"#).unwrap();
        assert_eq!(labels(&r), ["local:a", "mock:m", "openrouter:big"]);
        assert_eq!(r.triggers, [Trigger::Connect].into_iter().collect());
        let r = route(&t, r#"{"model":"mock:m"}"#).unwrap();
        assert_eq!(r.triggers.len(), Trigger::ALL.len());
    }

    #[test]
    fn a_budget_fallback_is_routed_with_its_alias_and_config_chain() {
        let t = table(
            "model_aliases:\n  - { pattern: \"^cheap$\", replacement: \"local:a\" }\nfailover:\n  - match: \"^local:\"\n    chain: [\"mock:m\"]\n    triggers: [server_error]\n",
            None,
        );
        let (targets, triggers) = fallback_chain(&t, "cheap").unwrap();
        let labels: Vec<String> = targets.iter().map(Target::label).collect();
        assert_eq!(labels, ["local:a", "mock:m"]);
        assert_eq!(triggers, [Trigger::ServerError].into_iter().collect());
    }

    #[test]
    fn the_prompt_estimate_counts_tools_and_schemas_too() {
        let messages = r#"[{"role":"user","content":"what is the weather"}]"#;
        let tools = r#"[{"type":"function","function":{"name":"weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]"#;
        let schema =
            r#"{"type":"json_schema","json_schema":{"name":"answer","schema":{"type":"object"}}}"#;
        let estimate = |body: String| prompt_estimate(&JsonObject::parse(body.as_bytes()).unwrap());
        assert_eq!(
            estimate(format!(
                r#"{{"model":"m","messages":{messages},"max_tokens":5}}"#
            )),
            messages.len() as u64 / 4
        );
        assert_eq!(
            estimate(format!(
                r#"{{"model":"m","messages":{messages},"tools":{tools},"tool_choice":"auto","response_format":{schema}}}"#
            )),
            (messages.len() + tools.len() + r#""auto""#.len() + schema.len()) as u64 / 4
        );
        assert_eq!(
            estimate(format!(
                r#"{{"model":"m","messages":[],"functions":{tools}}}"#
            )),
            (2 + tools.len()) as u64 / 4
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let t = table("", None);
        assert!(matches!(route(&t, r#"{}"#), Err(ProxyError::MissingModel)));
        assert!(matches!(
            route(&t, r#"{"model":7}"#),
            Err(ProxyError::BadBody(_))
        ));
        let err = route(&t, r#"{"model":"nope:x"}"#).unwrap_err();
        assert_eq!(err.status(), 404);
        assert_eq!(
            err.to_string(),
            "unknown backend `nope`; known backends: local, mock, openrouter"
        );
        assert_eq!(
            route(&t, r#"{"model":"local:"}"#).unwrap_err().status(),
            400
        );
        assert_eq!(
            route(&t, r#"{"model":"local:a|ghost:b"}"#)
                .unwrap_err()
                .status(),
            404
        );
        let err = route(&t, r#"{"model":"m?temperature=hot"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.code()), (400, "invalid_model"));
    }
}
