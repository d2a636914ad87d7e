//! One worker's upstream connections: kept-alive HTTP/1.1 connections, and one HTTP/2
//! connection per origin that offers it (ALPN), opened through rustls.
//!
//! hyper-util's pooled client did this before, for 9,700 instructions a request, a third of
//! them hashing its pool key with SipHash under a lock shared with a background task. A worker
//! talks to a handful of origins, each from its own thread: a short list scanned under an
//! uncontended lock is all the bookkeeping needed.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tower::ServiceExt;

/// How long an unused connection is kept.
const IDLE_FOR: Duration = Duration::from_secs(90);
/// How long a kept-alive connection that is not ready yet may take to become so before
/// another is used.
const BUSY_FOR: Duration = Duration::from_millis(100);
/// How often an HTTP/2 connection is pinged, and how long an answer may take before the
/// connection is closed.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: refused, DNS, TLS, or the handshake failed.
    #[error("{}", super::error_chain(&**.0))]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection broke while sending or before the answer's head.
    #[error("{}", super::error_chain(.0))]
    Broken(hyper::Error),
}

/// The connections of one worker thread.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    origins: Mutex<Vec<Origin>>,
}

/// Which upstream a connection reaches: scheme and authority.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    https: bool,
    authority: Authority,
}

impl Key {
    /// The key of an absolute http(s) URL.
    fn of(url: &Uri) -> Option<Key> {
        let https = match url.scheme() {
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            Some(scheme) if *scheme == Scheme::HTTP => false,
            _ => return None,
        };
        let authority = url.authority()?.clone();
        Some(Key { https, authority })
    }
}

/// An upstream and its connections not in use.
struct Origin {
    key: Key,
    /// What its last new connection negotiated.
    protocol: Protocol,
    /// Most recently returned last: taken from the end, expired from the front.
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    /// Shared by every request to this origin while it stays open.
    h2: Option<http2::SendRequest<Body>>,
    /// A connection being opened while the protocol is unknown or HTTP/2: requests that
    /// arrive meanwhile wait for it rather than open one each.
    connecting: Option<Arc<Opening>>,
    /// The last connection opened for others to share failed: until one succeeds, each
    /// request opens its own, so that an unreachable upstream fails them all within one
    /// connect timeout instead of one after the other.
    failing: bool,
}

/// A connection being opened for the requests waiting on it.
#[derive(Default)]
struct Opening {
    done: Notify,
    /// Set before `done` is notified: a waiter that registers late sees it.
    finished: AtomicBool,
    /// Why it could not be opened: the waiting requests fail with it too, rather than each
    /// spend another connect timeout on the same upstream.
    failed: OnceLock<(io::ErrorKind, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

impl Origin {
    fn new(key: Key) -> Origin {
        Origin {
            key,
            protocol: Protocol::Unknown,
            idle: Vec::new(),
            h2: None,
            connecting: None,
            failing: false,
        }
    }
}

/// The origin's entry, added if new.
fn origin<'a>(origins: &'a mut Vec<Origin>, key: &Key) -> &'a mut Origin {
    let found = origins.iter().position(|o| o.key == *key);
    let i = found.unwrap_or_else(|| {
        origins.push(Origin::new(key.clone()));
        origins.len() - 1
    });
    &mut origins[i]
}

/// An HTTP/1.1 connection lent for one request: given back with [`Lease::give_back`] once
/// the answer's body has ended, dropped (and closed) otherwise.
pub struct Lease {
    pool: Arc<Pool>,
    key: Key,
    sender: http1::SendRequest<Body>,
}

impl Lease {
    /// Returns the connection to the pool for the next request.
    pub fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut origins = self.pool.lock();
        let origin = origin(&mut origins, &self.key);
        let now = Instant::now();
        let expired = origin
            .idle
            .iter()
            .take_while(|(_, since)| now.duration_since(*since) > IDLE_FOR)
            .count();
        origin.idle.drain(..expired);
        origin.idle.push((self.sender, now));
    }
}

/// A connection ready for one request.
enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// What a request finds in the pool.
enum Found {
    Conn(Conn),
    /// Open a connection; with a claim when others wait for it.
    Connect(Option<Claim>),
}

/// What one look at the pool found.
enum Look {
    Found(Found),
    /// An idle HTTP/1.1 connection, to be checked.
    Idle(http1::SendRequest<Body>),
    /// Another request is opening the connection this one may share.
    Wait(Arc<Opening>),
}

/// The right to open the connection others wait for: dropped (connected, failed or
/// cancelled with its request), it wakes them.
struct Claim {
    pool: Arc<Pool>,
    key: Key,
    opening: Arc<Opening>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut origins = self.pool.lock();
        let origin = origin(&mut origins, &self.key);
        // A failure, not a cancelled request, makes the next requests connect on their own.
        if self.opening.failed.get().is_some() {
            origin.failing = true;
        }
        origin.connecting = None;
        self.opening.finished.store(true, Ordering::Release);
        self.opening.done.notify_waiters();
    }
}

impl Pool {
    /// An empty pool opening connections through `connector`.
    pub fn new(connector: HttpsConnector<HttpConnector>) -> Pool {
        Pool {
            connector,
            origins: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Origin>> {
        self.origins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` (an absolute URL) on a pooled connection, or a new one, and waits for
    /// the answer's head. The lease comes back for HTTP/1.1, to be given back at the body's end.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        let key = Key::of(request.uri()).ok_or_else(|| {
            SendError::Connect(format!("not an absolute http(s) URL: {}", request.uri()).into())
        })?;
        // A kept-alive connection the upstream has just closed fails before the request leaves:
        // the request comes back and goes out on the next connection, as the upstream never
        // saw it. A new connection that fails is an answer.
        loop {
            let (conn, reused) = match self.find(&key).await? {
                Found::Conn(conn) => (conn, true),
                Found::Connect(claim) => {
                    // Boxed: the TLS and HTTP/2 handshakes would make every request's future
                    // (moved whole into hyper's connection task) kilobytes larger.
                    let connecting = Box::pin(self.connect(request.uri(), &key));
                    match (connecting.await, &claim) {
                        (Ok(conn), _) => (conn, false),
                        (Err(e), Some(claim)) => {
                            let why = e.to_string();
                            let kind = match &e {
                                SendError::Connect(cause) if super::timed_out(&**cause, &why) => {
                                    io::ErrorKind::TimedOut
                                }
                                _ => io::ErrorKind::Other,
                            };
                            let _ = claim.opening.failed.set((kind, why));
                            return Err(e);
                        }
                        (Err(e), None) => return Err(e),
                    }
                }
            };
            match conn {
                Conn::H2(mut sender) => {
                    let result = match sender.ready().await {
                        Ok(()) => sender.try_send_request(request).await,
                        // Closed since it was found: the request never left.
                        Err(_) if reused => continue,
                        Err(e) => return Err(SendError::Connect(e.into())),
                    };
                    match result {
                        Ok(response) => return Ok((response, None)),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => request = unsent,
                            _ => return Err(SendError::Broken(e.into_error())),
                        },
                    }
                }
                Conn::H1(mut sender) => {
                    if request.uri().scheme().is_some() {
                        origin_form(&mut request);
                    }
                    if let Some(host) = host_header(&key.authority) {
                        request.headers_mut().entry(HOST).or_insert(host);
                    }
                    match sender.try_send_request(request).await {
                        Ok(response) => {
                            let lease = Lease {
                                pool: Arc::clone(self),
                                key,
                                sender,
                            };
                            return Ok((response, Some(lease)));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => {
                                request = unsent;
                                absolute_form(&mut request, &key);
                            }
                            _ => return Err(SendError::Broken(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// A pooled connection to the origin that can take a request now, or leave to open one;
    /// the error of the connection it waited for, if that failed.
    async fn find(self: &Arc<Self>, key: &Key) -> Result<Found, SendError> {
        loop {
            let mut sender = match self.look(key) {
                Look::Found(found) => return Ok(found),
                Look::Idle(sender) => sender,
                Look::Wait(opening) => {
                    let done = opening.done.notified();
                    if !opening.finished.load(Ordering::Acquire) {
                        done.await;
                    }
                    if let Some((kind, why)) = opening.failed.get() {
                        let error = io::Error::new(*kind, why.clone());
                        return Err(SendError::Connect(Box::new(error)));
                    }
                    continue;
                }
            };
            // Given back when its last answer ended: ready at once, or after its connection
            // task's next turn, unless it has closed since. One still busy (sending the body
            // of a request the upstream answered without reading it) is let go, not waited on.
            if sender.is_ready() {
                return Ok(Found::Conn(Conn::H1(sender)));
            }
            if let Ok(Ok(())) = tokio::time::timeout(BUSY_FOR, sender.ready()).await {
                return Ok(Found::Conn(Conn::H1(sender)));
            }
        }
    }

    /// One look at the origin's connections, under the lock.
    fn look(self: &Arc<Self>, key: &Key) -> Look {
        let mut origins = self.lock();
        let origin = origin(&mut origins, key);
        if let Some(h2) = &origin.h2 {
            if !h2.is_closed() {
                return Look::Found(Found::Conn(Conn::H2(h2.clone())));
            }
            origin.h2 = None;
        }
        match origin.idle.pop() {
            Some((sender, since)) if since.elapsed() <= IDLE_FOR => return Look::Idle(sender),
            // The older ones behind it have expired too.
            Some(_) => origin.idle.clear(),
            None => {}
        }
        if origin.protocol == Protocol::Http1 || origin.failing {
            return Look::Found(Found::Connect(None));
        }
        match &origin.connecting {
            Some(opening) => Look::Wait(Arc::clone(opening)),
            None => {
                let opening = Arc::new(Opening::default());
                origin.connecting = Some(Arc::clone(&opening));
                Look::Found(Found::Connect(Some(Claim {
                    pool: Arc::clone(self),
                    key: key.clone(),
                    opening,
                })))
            }
        }
    }

    /// Opens a connection (TCP, TLS with ALPN) and starts its task on this worker.
    async fn connect(&self, url: &Uri, key: &Key) -> Result<Conn, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(url.clone())
            .await
            .map_err(SendError::Connect)?;
        let conn = if io.connected().is_negotiated_h2() {
            // Pings find a connection that died silently (a NAT that forgot it), which would
            // otherwise hold every request to the origin until TCP gives up.
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_EVERY)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(connection);
            Conn::H2(sender)
        } else {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(connection);
            Conn::H1(sender)
        };
        let mut origins = self.lock();
        let origin = origin(&mut origins, key);
        origin.failing = false;
        match &conn {
            Conn::H2(sender) => {
                origin.protocol = Protocol::Http2;
                origin.h2 = Some(sender.clone());
            }
            Conn::H1(_) => origin.protocol = Protocol::Http1,
        }
        Ok(conn)
    }
}

/// HTTP/1.1 names the path only; the host travels in `Host`.
fn origin_form(request: &mut Request<Body>) {
    let path = request.uri().path_and_query().cloned();
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = path;
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

/// The `Host` of an HTTP/1.1 request: the authority without any `user:password@`.
fn host_header(authority: &Authority) -> Option<HeaderValue> {
    let host = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, host)| host);
    HeaderValue::from_str(host).ok()
}

/// Undoes [`origin_form`] (and its `Host`) for a request that goes out again on a new
/// connection, which may turn out to be HTTP/2.
fn absolute_form(request: &mut Request<Body>, key: &Key) {
    request.headers_mut().remove(HOST);
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if key.https {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    });
    parts.authority = Some(key.authority.clone());
    parts.path_and_query = request.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(url: &str) -> Key {
        Key::of(&url.parse().unwrap()).unwrap()
    }

    #[test]
    fn the_host_header_is_the_authority_without_credentials() {
        let host = |url: &str| host_header(&key(url).authority).unwrap();
        assert_eq!(host("http://127.0.0.1:8080/v1/x"), "127.0.0.1:8080");
        assert_eq!(host("https://example.com/v1"), "example.com");
        assert_eq!(host("http://user:pw@[::1]:9/v1"), "[::1]:9");
    }

    #[test]
    fn only_absolute_http_and_https_urls_have_an_origin() {
        let origin = |url: &str| Key::of(&url.parse().unwrap()).map(|key| key.https);
        assert_eq!(origin("https://openrouter.ai/api/v1"), Some(true));
        assert_eq!(origin("http://127.0.0.1:1/v1"), Some(false));
        assert_eq!(origin("/v1/chat/completions"), None);
        assert_eq!(origin("ftp://example.com/x"), None);
    }

    #[test]
    fn a_request_goes_out_in_origin_form_and_comes_back_whole_for_a_retry() {
        let url = "https://user:pw@example.com:8443/api/v1/chat?x=1";
        let mut request = Request::new(Body::default());
        *request.uri_mut() = url.parse().unwrap();
        origin_form(&mut request);
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("example.com:8443"));
        assert_eq!(request.uri(), "/api/v1/chat?x=1");
        absolute_form(&mut request, &key(url));
        assert_eq!(request.uri(), url);
        assert!(request.headers().get(HOST).is_none());
    }
}
