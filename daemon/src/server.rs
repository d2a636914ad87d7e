//! Listeners, routers and the shutdown sequence.
//!
//! SIGTERM/SIGINT stop the accept loops, in-flight requests and streams get
//! `limits.shutdown_grace` to finish, then open streams end with an error event and the
//! daemon exits.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::app::App;
use crate::models;
use crate::pipeline;
use crate::service;

/// How long open streams get to write their final error event after the grace ran out.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// The client API router.
pub fn api_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(pipeline::chat_completions))
        .route("/v1/models", get(models::list))
        .fallback(admin::not_found)
        .with_state(app)
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: &str, what: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
}

/// Serves both listeners until SIGTERM or SIGINT, then drains for `grace` (a second signal
/// ends the drain at once).
pub async fn serve(
    app: Arc<App>,
    api: TcpListener,
    admin_listener: TcpListener,
    grace: Duration,
    hard_stop: watch::Sender<bool>,
) -> io::Result<()> {
    let mut signals = Signals::new()?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let drained = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|draining| *draining).await;
    };
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        // Small SSE events must leave at once, not wait for Nagle.
        let _ = tcp.set_nodelay(true);
    };
    let api_server = axum::serve(api.tap_io(nodelay), api_router(Arc::clone(&app)))
        .with_graceful_shutdown(drained(drain_rx.clone()));
    let admin_server = axum::serve(
        admin_listener.tap_io(nodelay),
        admin::router(Arc::clone(&app)),
    )
    .with_graceful_shutdown(drained(drain_rx));
    let mut api_task = tokio::spawn(async move { api_server.await });
    let mut admin_task = tokio::spawn(async move { admin_server.await });

    tokio::select! {
        _ = signals.next() => {}
        result = &mut api_task => return flatten(result),
        result = &mut admin_task => return flatten(result),
    }
    service::stopping();
    tracing::info!(
        message = "Shutting down: no new connections, draining in-flight requests.",
        grace_ms = grace.as_millis() as u64
    );
    let _ = drain_tx.send(true);
    let both = async {
        let (a, b) = tokio::join!(&mut api_task, &mut admin_task);
        flatten(a).and(flatten(b))
    };
    let mut both = std::pin::pin!(both);
    let drained = tokio::select! {
        result = tokio::time::timeout(grace, &mut both) => result.ok(),
        _ = signals.next() => {
            tracing::warn!(message = "Second signal: ending the remaining requests now.");
            None
        }
    };
    match drained {
        Some(result) => result,
        None => {
            tracing::warn!(message = "Ending the remaining requests.");
            let _ = hard_stop.send(true);
            let _ = tokio::time::timeout(LAST_WORDS, &mut both).await;
            Ok(())
        }
    }
}

fn flatten(result: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    result.map_err(io::Error::other)?
}

/// SIGTERM and SIGINT, as one stream of shutdown requests.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
