//! Route: from the request's `model` to the ordered targets to try.
//!
//! Order (SPEC §4): `--force-model` → `model_aliases` (first match, one pass) → parse the
//! selector (first element → primary target, the rest → its failover chain) → `failover:`
//! config chains appended → each backend checked.

use std::collections::HashSet;

use orproxy_plugin::JsonObject;
use serde_json::Value;

use crate::config::Trigger;
use crate::error::ProxyError;
use crate::selector::{self, Selector};
use crate::table::RoutingTable;

/// One upstream target: a configured backend, the model to ask it for, and URI parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Backend name (a key of the routing table).
    pub backend: String,
    /// Upstream model name.
    pub model: String,
    /// Parameters that override the body's values for this target.
    pub params: Vec<(String, Value)>,
}

impl Target {
    /// `backend:model`, as shown in `x-orproxy-route` and logs.
    pub fn label(&self) -> String {
        format!("{}:{}", self.backend, self.model)
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
    pub triggers: HashSet<Trigger>,
}

/// Decides the route of a request body.
pub fn resolve(table: &RoutingTable, body: &JsonObject) -> Result<Route, ProxyError> {
    let requested = body.get_str("model")?;
    let mut text = match (&table.force_model, &requested) {
        (Some(forced), _) => forced.clone(),
        (None, Some(model)) => model.clone(),
        (None, None) => return Err(ProxyError::MissingModel),
    };
    if let Some(rewritten) = table.aliases.iter().find_map(|alias| alias.apply(&text)) {
        text = rewritten;
    }
    let chain = selector::parse_chain(&text)?;
    let mut targets = chain
        .into_iter()
        .map(|s| target(table, s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut triggers: HashSet<Trigger> = Trigger::ALL.into_iter().collect();
    let first = targets.first().map(Target::label).unwrap_or_default();
    if let Some(rule) = table
        .failover
        .iter()
        .find(|rule| rule.regex.is_match(&first))
    {
        triggers = rule.triggers.clone();
        for selector in &rule.chain {
            let extra = target(table, selector.clone())?;
            if !targets.iter().any(|t| t.label() == extra.label()) {
                targets.push(extra);
            }
        }
    }
    Ok(Route {
        rewritten: (requested.as_deref() != Some(text.as_str())).then_some(text),
        requested,
        targets,
        triggers,
    })
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn route(table: &RoutingTable, body: &str) -> Result<Route, ProxyError> {
        resolve(table, &JsonObject::parse(body.as_bytes()).unwrap())
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
