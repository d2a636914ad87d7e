//! Explain: what the daemon would do with a request, without sending anything upstream.
//!
//! Served by `POST /admin/explain` and `orproxy explain`: the final route, the attempts in
//! order, the headers and tags rules set, and which script changed what.

use std::collections::BTreeMap;

use orproxy_plugin::JsonObject;
use serde_json::{Value, json};

use crate::error::ProxyError;
use crate::ledger::Accounts;
use crate::route::{self, Context, Target};
use crate::table::RoutingTable;

fn target_json(target: &Target) -> Value {
    let params: BTreeMap<&str, &Value> =
        target.params.iter().map(|(k, v)| (k.as_str(), v)).collect();
    json!({"backend": target.backend, "model": target.model, "params": params, "unset": target.unset})
}

/// The explanation of one request body. With `accounts` (the running daemon's), budgets are
/// applied as they stand now (a fallback or a refusal shows), holding nothing.
pub fn explain(
    table: &RoutingTable,
    body: &[u8],
    cx: &Context,
    accounts: Option<&Accounts>,
) -> Value {
    let body = match JsonObject::parse(body) {
        Ok(body) => body,
        Err(e) => return outcome(&ProxyError::BadBody(e), Vec::new()),
    };
    let mut trace = Vec::new();
    let route = route::resolve_traced(table, &body, cx, &mut trace).and_then(|mut route| {
        if let Some(accounts) = accounts {
            crate::budget::preview(table, accounts, &cx.key, &body, &mut route)?;
        }
        Ok(route)
    });
    match route {
        Err(error) => outcome(&error, trace),
        Ok(route) => {
            let headers: BTreeMap<&str, &str> = route
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("")))
                .collect();
            let mut triggers: Vec<&str> = route
                .triggers
                .iter()
                .map(crate::config::Trigger::name)
                .collect();
            triggers.sort();
            json!({
                "status": 200,
                "requested": route.requested,
                "rewritten": route.rewritten,
                "route": target_json(&route.targets[0]),
                "attempts": route.targets.iter().map(Target::label).collect::<Vec<_>>(),
                "failover_triggers": triggers,
                "headers": headers,
                "tags": route.tags,
                "trace": trace,
            })
        }
    }
}

fn outcome(error: &ProxyError, trace: Vec<orproxy_rules::Change>) -> Value {
    let body: Value = serde_json::from_slice(&error.body()).unwrap_or(Value::Null);
    json!({"status": error.status().as_u16(), "error": body["error"], "trace": trace})
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::table::tests::build;

    #[test]
    fn failover_triggers_are_shown_by_their_config_names() {
        let table = build(
            "failover:\n  - match: \"^mock:\"\n    chain: [\"mock:b\"]\n    triggers: [server_error, rate_limited]\n",
            Default::default(),
            &[],
        )
        .unwrap();
        let cx = Context {
            key: None,
            client_ip: None,
            host: Arc::new(orproxy_rules::NoLedger),
            clock: None,
        };
        let out = explain(&table, br#"{"model": "mock:a", "messages": []}"#, &cx, None);
        assert_eq!(
            out["failover_triggers"],
            json!(["rate_limited", "server_error"]),
            "{out}"
        );
    }
}
