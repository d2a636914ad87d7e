//! `GET /v1/models`: the union of every backend's model list, fetched in parallel and cached.
//!
//! Ids of the default backend are listed as they are; others carry their `backend:` prefix so
//! that each listed id is a selector that routes back to where it came from.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use http::HeaderMap;
use orproxy_plugin::ModelInfo;
use serde_json::json;
use tokio::time::{Instant, timeout_at};

use crate::app::App;
use crate::table::BackendEntry;

/// How long a fetched list is served from cache.
const TTL: Duration = Duration::from_secs(300);
/// How long after a failed fetch the last list (or none) is served before trying again: a
/// backend that does not answer must not make every listing wait [`FETCH_TIMEOUT`].
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// How long one backend may take to list its models.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend's model list and until when it is served without asking the backend again.
type Cached = (Instant, Arc<Vec<ModelInfo>>);

/// Cached model lists per backend.
#[derive(Default)]
pub struct ModelCatalog {
    cache: Mutex<HashMap<String, Cached>>,
}

impl ModelCatalog {
    fn cached(&self, backend: &str) -> Option<Cached> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.get(backend).cloned()
    }

    fn store(&self, backend: &str, models: Arc<Vec<ModelInfo>>, fresh_for: Duration) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.insert(backend.to_owned(), (Instant::now() + fresh_for, models));
    }
}

/// `GET /v1/models`: needs a proxy key like every client route when auth is on (listing makes
/// orproxy call each backend with its own keys).
pub async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    const REQUEST: &str = "GET /v1/models";
    let started = std::time::Instant::now();
    let response = match listed(&app, &headers).await {
        Ok(models) => {
            let data: Vec<_> = models
                .iter()
                .map(|(id, owner)| model_object(id, owner))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(response) => response,
    };
    crate::server::stamped(&app, REQUEST, started, response)
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): one entry of [`list`], or 404
/// `model_not_found`. Ids hold slashes (`openai/gpt-4o`), so the rest of the path is the id.
pub async fn retrieve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    uri: http::Uri,
    headers: HeaderMap,
) -> Response {
    let started = std::time::Instant::now();
    let request = format!("GET {}", uri.path());
    let response = match listed(&app, &headers).await {
        Ok(models) => match models.iter().find(|(listed, _)| *listed == id) {
            Some((id, owner)) => Json(model_object(id, owner)).into_response(),
            None => crate::admin::error(
                http::StatusCode::NOT_FOUND,
                "model_not_found",
                &format!(
                    "the model `{id}` is not listed by any backend (GET /v1/models lists them)"
                ),
            ),
        },
        Err(response) => response,
    };
    crate::server::stamped(&app, &request, started, response)
}

fn model_object(id: &str, owner: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
}

/// Every listed model as `(id, backend)`, ids prefixed `backend:` for non-default backends;
/// or the 401 of a request without a valid key.
async fn listed(app: &App, headers: &HeaderMap) -> Result<BTreeSet<(String, String)>, Response> {
    let table = app.table.load_full();
    if let Err(error) = table.auth.authenticate(headers) {
        return Err(crate::error::ProxyError::from(error).into_response());
    }
    let lists = join_all(
        table
            .backends
            .values()
            .map(|backend| models_of(app, backend)),
    )
    .await;
    let mut ids = BTreeSet::new();
    for (backend, models) in table.backends.values().zip(lists) {
        let prefix = |id: &str| {
            if backend.name == table.default_backend {
                id.to_owned()
            } else {
                format!("{}:{id}", backend.name)
            }
        };
        for model in models.iter() {
            ids.insert((prefix(&model.id), backend.name.clone()));
        }
        for id in &backend.models {
            ids.insert((prefix(id), backend.name.clone()));
        }
    }
    Ok(ids)
}

/// One backend's list: fresh from cache, else fetched; a failed fetch serves the stale copy
/// (and is not retried for [`RETRY_AFTER_FAILURE`]).
async fn models_of(app: &App, backend: &BackendEntry) -> Arc<Vec<ModelInfo>> {
    let cached = app.models.cached(&backend.name);
    if let Some((fresh_until, models)) = &cached
        && Instant::now() < *fresh_until
    {
        return Arc::clone(models);
    }
    let stale = cached.map(|(_, models)| models).unwrap_or_default();
    match fetch(app, backend).await {
        Some(Ok(models)) => models,
        None | Some(Err(_)) => {
            app.models
                .store(&backend.name, Arc::clone(&stale), RETRY_AFTER_FAILURE);
            stale
        }
    }
}

/// Fetches a backend's list now (and caches it); `None` when the backend publishes none, the
/// reason (already logged) when the fetch failed.
pub async fn fetch(
    app: &App,
    backend: &BackendEntry,
) -> Option<Result<Arc<Vec<ModelInfo>>, String>> {
    let prepared = backend
        .plugin
        .list_models(backend.any_key().map(|k| k.expose()))?;
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let fetched = async {
        let table = app.table.load();
        let describe =
            |e| crate::dispatch::attempt_error(&backend.name, &table, e, deadline).to_string();
        let mut response = app
            .client()
            .send(prepared, deadline)
            .await
            .map_err(describe)?;
        let body = timeout_at(
            deadline,
            response.collect(16 << 20, FETCH_TIMEOUT, deadline),
        )
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
        .map_err(describe)?;
        if !response.status.is_success() {
            return Err(format!("status {}", response.status.as_u16()));
        }
        backend
            .plugin
            .map_models(&body)
            .map_err(|e| format!("unreadable list: {e}"))
    }
    .await;
    match fetched {
        Ok(models) => {
            let models = Arc::new(models);
            app.models.store(&backend.name, Arc::clone(&models), TTL);
            Some(Ok(models))
        }
        Err(error) => {
            tracing::warn!(message = "Could not list models.", backend = %backend.name, %error);
            Some(Err(error))
        }
    }
}

/// What a price refresh did for one backend.
#[derive(Debug, PartialEq, Eq)]
pub enum PriceFetch {
    /// The list was fetched; this many of its models had prices.
    Priced(usize),
    /// The list could not be fetched (the reason); the prices already known are kept.
    Failed(String),
}

/// Fetches the price lists of every backend that publishes one and keeps them (in memory and
/// in the database). With `force` false, lists younger than `price_refresh` are kept.
/// Returns what happened for each backend that publishes a list.
pub async fn refresh_prices(app: &App, force: bool) -> Vec<(String, PriceFetch)> {
    let table = app.table.load_full();
    let now = crate::budget::now_ms();
    let max_age = i64::try_from(table.price_refresh.as_millis()).unwrap_or(i64::MAX);
    let due: Vec<&BackendEntry> = table
        .backends
        .values()
        .filter(|b| {
            force
                || app
                    .accounts
                    .prices
                    .fetched_ms(&b.name)
                    .is_none_or(|at| now.saturating_sub(at) >= max_age)
        })
        .collect();
    let lists = join_all(due.iter().map(|b| fetch(app, b))).await;
    due.into_iter()
        .zip(lists)
        .filter_map(|(backend, fetched)| {
            let outcome = match fetched? {
                Ok(models) => {
                    PriceFetch::Priced(app.accounts.store_prices(&backend.name, &models, now))
                }
                Err(error) => PriceFetch::Failed(error),
            };
            Some((backend.name.clone(), outcome))
        })
        .collect()
}

/// Fetches the price lists that are missing or older than `price_refresh`, and logs what came
/// (failures are logged by the fetch itself).
pub async fn refresh_stale_prices(app: &App) {
    for (backend, outcome) in refresh_prices(app, false).await {
        if let PriceFetch::Priced(priced) = outcome
            && priced > 0
        {
            tracing::info!(message = "Prices fetched.", backend, models = priced);
        }
    }
}

/// Keeps price lists fresh while budgets need them (reservations are priced before any
/// upstream reports a cost): checked hourly (the daemon fetches once before it is ready),
/// fetched when older than `price_refresh`. Without budgets nothing is fetched unasked; `POST /admin/prices/refresh`
/// fetches at any time.
pub async fn keep_prices_fresh(app: Arc<App>) {
    loop {
        let every = app
            .table
            .load()
            .price_refresh
            .clamp(Duration::from_secs(60), Duration::from_secs(3600));
        tokio::time::sleep(every).await;
        if !app.table.load().budgets.is_empty() {
            refresh_stale_prices(&app).await;
        }
    }
}
