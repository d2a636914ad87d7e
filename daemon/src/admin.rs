//! The admin listener: health now; status, reload, routes, usage and metrics as they land.

use std::sync::Arc;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use serde_json::json;

use crate::app::App;

/// The admin router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(app)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 404 in the OpenAI error shape, for any unknown path.
pub async fn not_found(uri: http::Uri) -> Response {
    let body = json!({"error": {"message": format!("no route for {}", uri.path()), "type": "invalid_request_error", "param": null, "code": "not_found"}});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
