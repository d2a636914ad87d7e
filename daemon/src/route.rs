//! Route: from the request's `model` to the ordered list of upstream targets to try.
//!
//! Order (SPEC §4): `--force-model` → parse the selector → default backend → check the backend.

use orproxy_plugin::JsonObject;

use crate::error::ProxyError;
use crate::selector::Selector;
use crate::table::RoutingTable;

/// One upstream target: a configured backend and the model to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Backend name (a key of the routing table).
    pub backend: String,
    /// Upstream model name.
    pub model: String,
}

impl Target {
    /// `backend:model`, as shown in `x-orproxy-route` and logs.
    pub fn label(&self) -> String {
        format!("{}:{}", self.backend, self.model)
    }
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The model string the client sent.
    pub requested: Option<String>,
    /// Targets in the order they are tried.
    pub targets: Vec<Target>,
}

/// Decides the route of a request body.
pub fn resolve(table: &RoutingTable, body: &JsonObject) -> Result<Route, ProxyError> {
    let requested = body.get_str("model")?;
    let selector_text = match (&table.force_model, &requested) {
        (Some(forced), _) => forced.clone(),
        (None, Some(model)) => model.clone(),
        (None, None) => return Err(ProxyError::MissingModel),
    };
    let selector = Selector::parse(&selector_text)?;
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
    Ok(Route {
        requested,
        targets: vec![Target {
            backend,
            model: selector.model,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::table::{Env, Overrides};

    struct NoEnv;
    impl Env for NoEnv {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
    }

    fn table(force: Option<&str>) -> RoutingTable {
        let cfg = parse(
            "c",
            "backends:\n  local:\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n",
        )
        .unwrap();
        let overrides = Overrides {
            force_model: force.map(str::to_owned),
            ..Overrides::default()
        };
        RoutingTable::build("c", &cfg, &overrides, &NoEnv).unwrap()
    }

    fn route(table: &RoutingTable, body: &str) -> Result<Route, ProxyError> {
        resolve(table, &JsonObject::parse(body.as_bytes()).unwrap())
    }

    #[test]
    fn prefix_or_default_backend() {
        let t = table(None);
        let r = route(&t, r#"{"model":"local:llama3:8b"}"#).unwrap();
        assert_eq!(
            r.targets,
            vec![Target {
                backend: "local".into(),
                model: "llama3:8b".into()
            }]
        );
        let r = route(&t, r#"{"model":"qwen/qwen3-coder:free"}"#).unwrap();
        assert_eq!(r.targets[0].label(), "mock:qwen/qwen3-coder:free");
    }

    #[test]
    fn force_model_replaces_the_request_model() {
        let t = table(Some("local:forced"));
        let r = route(&t, r#"{"model":"anything"}"#).unwrap();
        assert_eq!(r.targets[0].label(), "local:forced");
        assert_eq!(r.requested.as_deref(), Some("anything"));
        assert!(route(&t, r#"{}"#).is_ok());
    }

    #[test]
    fn errors_name_the_problem() {
        let t = table(None);
        assert!(matches!(route(&t, r#"{}"#), Err(ProxyError::MissingModel)));
        assert!(matches!(
            route(&t, r#"{"model":7}"#),
            Err(ProxyError::BadBody(_))
        ));
        let err = route(&t, r#"{"model":"nope:x"}"#).unwrap_err();
        assert_eq!(err.status(), 404);
        assert_eq!(
            err.to_string(),
            "unknown backend `nope`; known backends: local, mock"
        );
        assert_eq!(
            route(&t, r#"{"model":"local:"}"#).unwrap_err().status(),
            400
        );
    }
}
