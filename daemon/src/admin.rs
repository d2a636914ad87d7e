//! The admin listener: health, metrics, status, reload and the effective routing table.
//!
//! `/healthz` and `/metrics` are open; every `/admin/*` route needs `Authorization: Bearer
//! <token>` when `admin.token_env` is set (without a token the listener must be loopback).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde_json::{Value, json};
use sha2::Digest;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::app::App;
use crate::metrics;
use crate::reload::{Reason, Request as ReloadRequest};

/// The admin router.
pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/admin/status", get(status))
        .route("/admin/reload", post(reload))
        .route("/admin/routes", get(routes))
        .route("/admin/explain", post(explain))
        .route("/admin/usage", get(crate::report::usage))
        .route("/admin/budgets", get(crate::report::budgets))
        .route("/admin/prices/refresh", post(crate::report::refresh_prices))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/metrics",
            get(|State(app): State<Arc<App>>| async move {
                if let Some(writer) = &app.accounts.writer {
                    metrics::ledger(writer.stats());
                }
                metrics::render()
            }),
        )
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 404 in the OpenAI error shape, for any unknown path.
pub async fn not_found(uri: http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no route for {}", uri.path()),
    )
}

/// 405 in the OpenAI error shape, for a known path asked with the wrong method.
pub async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not allowed on {}", uri.path()),
    )
}

/// An error in the OpenAI shape.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let table = app.table.load();
    if let Some(token) = &table.admin_token {
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        // Digests of equal length, so the comparison time says nothing about the token's length.
        let digest = |text: &str| sha2::Sha256::digest(text.as_bytes());
        if !bool::from(digest(presented).ct_eq(&digest(token.expose()))) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "admin API: send `Authorization: Bearer <admin token>`",
            );
        }
    }
    next.run(request).await
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let table = app.table.load();
    let keys: BTreeMap<&str, Value> = table
        .backends
        .values()
        .filter(|b| b.key_count() > 0)
        .map(|b| {
            (
                b.name.as_str(),
                json!({"total": b.key_count(), "ready": b.ready_keys()}),
            )
        })
        .collect();
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": app.started.elapsed().as_secs(),
        "table_version": app.version(),
        "files": table.files,
        "rules_dir": table.restart_only.rules_dir,
        "scripts": table.rules.as_deref().map(orproxy_rules::RuleSet::names).unwrap_or_default(),
        "default_backend": table.default_backend,
        "last_reload": app.last_reload(),
        "cooldowns": app.health.snapshot(),
        "keys": keys,
        "ledger": ledger_status(&app),
    }))
    .into_response()
}

/// The usage database: where it is and how its writer is doing (`null` when off).
fn ledger_status(app: &App) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let (Some(path), Some(writer)) = (&app.accounts.path, &app.accounts.writer) else {
        return Value::Null;
    };
    let stats = writer.stats();
    json!({
        "path": path,
        "rows_written": stats.written.load(Relaxed),
        "rows_queued": stats.queued.load(Relaxed),
        "write_errors": stats.errors.load(Relaxed),
        "rows_dropped": stats.dropped.load(Relaxed),
        "rows_pruned": stats.pruned.load(Relaxed),
        "integrity": match app.accounts.integrity.get() {
            None => json!("checking"),
            Some(Ok(())) => json!("ok"),
            Some(Err(error)) => json!(error),
        },
        "prices": app.accounts.prices.fetched_backends(),
    })
}

async fn reload(State(app): State<Arc<App>>) -> Response {
    let (reply, result) = oneshot::channel();
    if app
        .reloads
        .send(ReloadRequest {
            reason: Reason::Admin,
            reply: Some(reply),
        })
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "orproxy is shutting down",
        );
    }
    match result.await {
        Ok(outcome) => {
            let status = if outcome.result == "ok" {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (status, axum::Json(outcome)).into_response()
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "orproxy is shutting down",
        ),
    }
}

/// Who `/admin/explain` pretends the request comes from, as sent (checked by [`explain`]).
#[derive(Debug, Default, serde::Deserialize)]
struct ExplainQuery {
    key: Option<String>,
    client_ip: Option<String>,
}

/// 400 in the admin API's error shape, naming the query parameter at fault.
fn bad_parameter(param: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": "invalid_query"}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// `POST /admin/explain`: a chat request in; its route, attempts and rule trace out.
async fn explain(
    State(app): State<Arc<App>>,
    who: Result<Query<ExplainQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let who = match who {
        Ok(Query(who)) => who,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                &format!("query string: {}", rejection.body_text()),
            );
        }
    };
    let client_ip = match who.client_ip.as_deref().map(str::parse) {
        None => None,
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => {
            let text = who.client_ip.as_deref().unwrap_or_default();
            return bad_parameter(
                "client_ip",
                &format!(
                    "client_ip: `{text}` is not an IP address (e.g. 203.0.113.7 or 2001:db8::1)"
                ),
            );
        }
    };
    let table = app.table.load();
    let cx = crate::route::Context {
        key: who.key,
        client_ip,
        host: Arc::clone(&app.spending),
        clock: None,
    };
    axum::Json(crate::explain::explain(
        &table,
        &body,
        &cx,
        Some(&app.accounts),
    ))
    .into_response()
}

/// The effective routing table, secrets redacted (keys appear as their variable names).
async fn routes(State(app): State<Arc<App>>) -> Response {
    let table = app.table.load();
    let backends: BTreeMap<&str, Value> = table
        .backends
        .values()
        .map(|b| {
            (
                b.name.as_str(),
                json!({
                    "type": b.kind,
                    "base_url": b.base_url,
                    "keys": {"count": b.key_count(), "from_env": b.key_envs},
                    "identity": b.identity.describe(),
                    "models": b.models,
                }),
            )
        })
        .collect();
    let failover: Vec<Value> = table
        .failover
        .iter()
        .map(|rule| {
            let mut triggers: Vec<&str> = rule.triggers.iter().map(|t| t.name()).collect();
            triggers.sort();
            json!({"match": rule.regex.as_str(), "chain": rule.chain.iter().map(ToString::to_string).collect::<Vec<_>>(), "triggers": triggers})
        })
        .collect();
    let l = &table.limits;
    axum::Json(json!({
        "table_version": app.version(),
        "default_backend": table.default_backend,
        "force_model": table.force_model,
        "backends": backends,
        "model_aliases": table.aliases.iter().map(|a| a.written.clone()).collect::<Vec<_>>(),
        "rules": table.rules.as_deref().map(orproxy_rules::RuleSet::names).unwrap_or_default(),
        "failover": failover,
        "auth": {"open": table.auth.is_open(), "keys": table.auth.names()},
        "limits": {
            "max_body_bytes": l.max_body_bytes,
            "max_response_bytes": l.max_response_bytes,
            "connect_timeout_ms": l.connect_timeout.as_millis() as u64,
            "first_byte_timeout_ms": l.first_byte_timeout.as_millis() as u64,
            "idle_timeout_ms": l.idle_timeout.as_millis() as u64,
            "total_timeout_ms": l.total_timeout.as_millis() as u64,
            "commit_after_ms": l.commit_after.as_millis() as u64,
            "shutdown_grace_ms": l.shutdown_grace.as_millis() as u64,
            "client_timeout_ms": l.client_timeout.as_millis() as u64,
            "idle_poll_us": l.idle_poll.as_micros() as u64,
        },
    }))
    .into_response()
}
