//! Listeners, routers, worker threads and the shutdown sequence.
//!
//! The client API runs one single-threaded tokio runtime per core, each accepting on its own
//! `SO_REUSEPORT` socket: a request, its upstream connection and its stream relay then stay on
//! one thread, with no wake-ups across cores (they cost more than the relaying itself). The
//! admin API, reloads and signals run on the main thread's runtime.
//!
//! SIGTERM/SIGINT stop the accept loops, in-flight requests and streams get
//! `limits.shutdown_grace` to finish (a second signal cuts it short), then open streams end with
//! an error event and the daemon exits.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::routing::{get, post};
use futures_util::FutureExt;
use futures_util::future::Either;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tower::ServiceExt;

use crate::admin;
use crate::app::App;
use crate::front;
use crate::models;
use crate::pipeline;
use crate::service;
use crate::stall::WriteStall;

/// How long open streams get to write their final error event after the grace ran out.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// Which API a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Routes {
    /// The client API: chat completions bypass the router ([`serve_connections`]).
    Api,
    Admin,
}

/// The client API router.
pub fn api_router(app: Arc<App>) -> Router {
    Router::new()
        .route(pipeline::CHAT_COMPLETIONS, post(pipeline::chat_completions))
        .route("/v1/messages", post(pipeline::messages))
        .route("/v1/messages/count_tokens", post(front::count_tokens))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .fallback(
            |State(app): State<Arc<App>>, method: http::Method, uri: http::Uri| async move {
                let request = format!("{method} {}", uri.path());
                let started = std::time::Instant::now();
                stamped(&app, &request, started, admin::not_found(uri).await)
            },
        )
        .method_not_allowed_fallback(
            |State(app): State<Arc<App>>, method: http::Method, uri: http::Uri| async move {
                let request = format!("{method} {}", uri.path());
                let started = std::time::Instant::now();
                stamped(
                    &app,
                    &request,
                    started,
                    admin::method_not_allowed(method, uri).await,
                )
            },
        )
        .with_state(app)
}

/// A response made outside the pipeline (unknown path, wrong method, the model list), with a
/// request id and `x-orproxy-route: none` like every other client API response, and its log
/// line (no usage row: nothing was routed).
pub fn stamped(
    app: &App,
    request: &str,
    started: std::time::Instant,
    response: axum::response::Response,
) -> axum::response::Response {
    let id = app.ids.next();
    tracing::info!(
        target: "orproxy::request",
        message = "Request finished.",
        request_id = %id,
        request,
        route = "none",
        status = response.status().as_u16(),
        latency_ms = crate::record::millis(started.elapsed()),
    );
    pipeline::stamp(response, http::HeaderValue::try_from(id).ok())
}

/// How many client API workers to run: one per core.
pub fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `count` sockets sharing `addr` (`SO_REUSEPORT`, so the kernel spreads connections),
/// naming the address in any error. Port 0 picks one free port for all of them.
pub fn bind_api(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let fail = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (client API): {e}"),
        )
    };
    // SO_REUSEPORT would let a second orproxy share the port silently: a plain bind first
    // fails loudly if anything listens there already (and picks the port when asked for 0).
    let mut addr = std::net::TcpListener::bind(addr)
        .and_then(|probe| probe.local_addr())
        .map_err(fail)?;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
        socket.set_reuse_address(true).map_err(fail)?;
        socket.set_reuse_port(true).map_err(fail)?;
        socket.set_nonblocking(true).map_err(fail)?;
        socket.bind(&addr.into()).map_err(fail)?;
        socket.listen(1024).map_err(fail)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr().map_err(fail)?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds the admin listener, naming the address in the error.
pub async fn bind_admin(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (admin API): {e}"),
        )
    })
}

/// How much unsent data a client connection's kernel buffer may hold. The socket then reports
/// itself writable each time the client has read about half of it, so a write blocked for
/// `limits.client_timeout` means a client that stopped reading, not one reading steadily
/// through a send buffer the kernel grew to megabytes (writable again only once a third of it
/// drained). It also keeps queued events in orproxy rather than in the kernel.
const UNSENT_LOW_WATER: u32 = 64 << 10;

fn tune(tcp: &tokio::net::TcpStream) {
    // Small SSE events must leave at once, not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(UNSENT_LOW_WATER);
}

async fn drained(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|draining| *draining).await;
}

/// How often [`timer_heartbeat`] wakes: sooner than the request timers' defaults (the shortest,
/// `limits.commit_after`, is 10 s). Limits configured shorter only lose the saving.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`HEARTBEAT`] on the worker's runtime. Tokio wakes its driver
/// through an eventfd whenever a new timer is due before the driver's planned wake-up; with
/// an idle wheel that is every request's first timer: two syscalls per request on the hot
/// path, against one wake-up a second here.
async fn timer_heartbeat() {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// Accepts connections (client API or admin) until the drain starts, then waits for the open
/// ones to finish their requests (hyper closes idle keep-alive connections at once).
///
/// Clients speak HTTP/1.1 (every LLM SDK does; a proxy in front terminates anything else).
/// `limits.client_timeout` of the table serving at each accept bounds how long a connection
/// may take to send a request's head (from connect), how long it may stay idle between
/// requests, and how long a write to it may stay blocked ([`WriteStall`]): without it, a
/// client that opens connections and sends nothing, or a byte at a time, or stops reading,
/// holds each one, and a descriptor, forever. (HTTP/2 has no such bound in hyper: an idle h2
/// connection would be held forever, which is why it is not offered.)
async fn serve_connections(
    listener: TcpListener,
    router: Router,
    routes: Routes,
    app: Arc<App>,
    drain: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    let mut client_timeout = app.table.load().limits.client_timeout;
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout);
    let graceful = GracefulShutdown::new();
    let mut draining = std::pin::pin!(drained(drain));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or a connection reset before it was taken: the
                    // listener itself is fine. A pause lets descriptors free up.
                    tracing::warn!(message = "Cannot accept a connection.", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut draining => break,
        };
        tune(&tcp);
        let configured = app.table.load().limits.client_timeout;
        if configured != client_timeout {
            client_timeout = configured;
            builder.header_read_timeout(client_timeout);
        }
        let router = router.clone();
        let app = Arc::clone(&app);
        let service = service_fn(move |mut request: Request<Incoming>| {
            if routes == Routes::Api
                && request.method() == Method::POST
                && request.uri().path() == pipeline::CHAT_COMPLETIONS
            {
                // Nearly every request: straight into the pipeline. The router's matching,
                // extractors and response mapping cost it 5,000 instructions.
                let answer = pipeline::chat_completions_request(Arc::clone(&app), peer, request);
                Either::Left(answer.map(Ok::<_, Infallible>))
            } else {
                // Rules and the ledger see the client's address.
                request.extensions_mut().insert(ConnectInfo(peer));
                Either::Right(router.clone().oneshot(request))
            }
        });
        let connection =
            builder.serve_connection(TokioIo::new(WriteStall::new(tcp, client_timeout)), service);
        tokio::spawn(graceful.watch(connection));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Starts one worker thread per listener; each reports when its server has drained.
fn start_workers(
    app: &Arc<App>,
    api: Vec<std::net::TcpListener>,
    drain: &watch::Receiver<bool>,
) -> io::Result<Vec<oneshot::Receiver<io::Result<()>>>> {
    let mut done = Vec::with_capacity(api.len());
    for (i, listener) in api.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        let app = Arc::clone(app);
        let drain = drain.clone();
        std::thread::Builder::new()
            .name(format!("orproxy-worker-{i}"))
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            let listener = TcpListener::from_std(listener)?;
                            // This worker's upstream pool, built before the first request
                            // rather than inside it.
                            app.client();
                            tokio::spawn(timer_heartbeat());
                            tokio::spawn(crate::idle_poll::run());
                            let router = api_router(Arc::clone(&app));
                            serve_connections(listener, router, Routes::Api, app, drain).await
                        })
                    });
                let _ = tx.send(result);
            })?;
        done.push(rx);
    }
    Ok(done)
}

/// Serves the client API on worker threads and the admin API here until SIGTERM or SIGINT,
/// then drains for `limits.shutdown_grace` of the table serving then (a second signal ends the
/// drain at once).
pub async fn serve(
    app: Arc<App>,
    api: Vec<std::net::TcpListener>,
    admin_listener: TcpListener,
    hard_stop: watch::Sender<bool>,
) -> io::Result<()> {
    let mut signals = Signals::new()?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let workers = start_workers(&app, api, &drain_rx)?;
    let admin_task = tokio::spawn(serve_connections(
        admin_listener,
        admin::router(Arc::clone(&app)),
        Routes::Admin,
        Arc::clone(&app),
        drain_rx,
    ));
    let mut all = tokio::spawn(async move {
        let results = futures_util::future::join_all(workers).await;
        let admin = admin_task.await.map_err(io::Error::other).and_then(|r| r);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|_| Err(io::Error::other("a worker thread died"))))
            .chain(std::iter::once(admin))
            .collect::<io::Result<Vec<()>>>()
            .map(drop)
    });

    tokio::select! {
        _ = signals.next() => {}
        result = &mut all => return result.map_err(io::Error::other)?,
    }
    service::stopping();
    let grace = app.table.load().limits.shutdown_grace;
    tracing::info!(
        message = "Shutting down: no new connections, draining in-flight requests.",
        grace_ms = grace.as_millis() as u64
    );
    let _ = drain_tx.send(true);
    let drained = tokio::select! {
        result = tokio::time::timeout(grace, &mut all) => result.ok(),
        _ = signals.next() => {
            tracing::warn!(message = "Second signal: ending the remaining requests now.");
            None
        }
    };
    match drained {
        Some(result) => result.map_err(io::Error::other)?,
        None => {
            tracing::warn!(message = "Ending the remaining requests.");
            let _ = hard_stop.send(true);
            let _ = tokio::time::timeout(LAST_WORDS, &mut all).await;
            Ok(())
        }
    }
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
