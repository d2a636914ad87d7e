//! `GET /v1/models`: the union of every backend's model list, fetched in parallel and cached.
//!
//! Ids of the default backend are listed as they are; others carry their `backend:` prefix so
//! that each listed id is a selector that routes back to where it came from.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use orproxy_plugin::ModelInfo;
use serde_json::json;
use tokio::time::{Instant, timeout_at};

use crate::app::App;
use crate::table::BackendEntry;

/// How long a fetched list is served from cache.
const TTL: Duration = Duration::from_secs(300);
/// How long one backend may take to list its models.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend's model list and when it was fetched.
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

    fn store(&self, backend: &str, models: Arc<Vec<ModelInfo>>) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.insert(backend.to_owned(), (Instant::now(), models));
    }
}

/// `GET /v1/models`.
pub async fn list(State(app): State<Arc<App>>) -> Response {
    let table = app.table.load_full();
    let lists = join_all(
        table
            .backends
            .values()
            .map(|backend| models_of(&app, backend)),
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
    let data: Vec<_> = ids
        .into_iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// One backend's list: fresh from cache, else fetched; a failed fetch serves the stale copy.
async fn models_of(app: &App, backend: &BackendEntry) -> Arc<Vec<ModelInfo>> {
    let cached = app.models.cached(&backend.name);
    if let Some((at, models)) = &cached
        && at.elapsed() < TTL
    {
        return Arc::clone(models);
    }
    let stale = cached.map(|(_, models)| models).unwrap_or_default();
    let Some(prepared) = backend
        .plugin
        .list_models(backend.any_key().map(|k| k.expose()))
    else {
        return stale;
    };
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let fetched = async {
        let mut response = app.client().send(prepared, deadline).await.ok()?;
        let body = timeout_at(
            deadline,
            response.collect(16 << 20, FETCH_TIMEOUT, deadline),
        )
        .await
        .ok()?
        .ok()?;
        if !response.status.is_success() {
            return None;
        }
        backend.plugin.map_models(&body).ok()
    }
    .await;
    match fetched {
        Some(models) => {
            let models = Arc::new(models);
            app.models.store(&backend.name, Arc::clone(&models));
            models
        }
        None => {
            tracing::warn!(message = "Could not list models.", backend = %backend.name);
            stale
        }
    }
}
