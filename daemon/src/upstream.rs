//! Upstream connection pools, and answers read the same way whether they come from the
//! network or from a local plugin.

mod pool;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use orproxy_plugin::{LocalBody, Prepared};
use tokio::time::{Instant, sleep, timeout_at};

use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{ConfigBuilderExt, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use pool::{Lease, Pool, SendError};

use crate::error::{TimeoutKind, UpstreamAnswer};

/// Why one attempt produced no usable answer.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection (refused, DNS, TLS).
    Connect(String),
    /// A limit was exceeded.
    Timeout(TimeoutKind),
    /// The connection broke while reading the answer.
    Broken(String),
    /// The answer is larger than `limits.max_response_bytes`.
    TooLarge(usize),
}

/// An HTTP client: a keep-alive pool, HTTP/2 where the upstream offers it (ALPN), rustls.
///
/// Each worker thread has its own ([`UpstreamClient::for_this_thread`]): a pooled connection
/// is driven by a task of the runtime that opened it, so sharing one pool between workers
/// would bounce every request across cores.
///
/// hyper's connections are used directly rather than through reqwest: reqwest parsed each URL
/// several times per request (5 % of the daemon's CPU in a profile) for features a relay does
/// not want (redirects, retries, proxies).
#[derive(Clone)]
pub struct UpstreamClient {
    pool: Arc<Pool>,
}

/// The TLS settings every pool starts from, built once: building them reads and parses the
/// system's CA certificates, which each worker's first request used to pay for (10 ms here).
/// Clones share the verifier and the session cache.
fn shared_tls() -> std::io::Result<rustls::ClientConfig> {
    static TLS: OnceLock<rustls::ClientConfig> = OnceLock::new();
    if let Some(config) = TLS.get() {
        return Ok(config.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.try_with_platform_verifier())
        .map_err(std::io::Error::other)?
        .with_no_client_auth();
    Ok(TLS.get_or_init(|| config).clone())
}

thread_local! {
    static THREAD_CLIENT: std::cell::OnceCell<UpstreamClient> = const { std::cell::OnceCell::new() };
}

impl UpstreamClient {
    /// This thread's client (built on first use, with the settings checked at startup).
    pub fn for_this_thread(connect_timeout: Duration) -> UpstreamClient {
        THREAD_CLIENT.with(|cell| {
            cell.get_or_init(|| {
                UpstreamClient::new(connect_timeout)
                    .expect("the same client settings were built successfully at startup")
            })
            .clone()
        })
    }

    /// Builds the pool; `connect_timeout` bounds the TCP connect.
    pub fn new(connect_timeout: Duration) -> std::io::Result<Self> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(Duration::from_secs(30)));
        tcp.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(shared_tls()?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        Ok(UpstreamClient {
            pool: Arc::new(Pool::new(https)),
        })
    }

    /// Sends a prepared request and waits for the answer's head until `first_byte`.
    pub async fn send(
        &self,
        prepared: Prepared,
        first_byte: Instant,
    ) -> Result<UpstreamResponse, AttemptError> {
        let request = match prepared {
            Prepared::Local(reply) => {
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
                let body = match reply.body {
                    LocalBody::Full(bytes) => Body::Full(Some(bytes)),
                    LocalBody::Events { events, interval } => Body::Events {
                        events: events.into(),
                        interval,
                    },
                };
                return Ok(UpstreamResponse {
                    status: reply.status,
                    headers,
                    body,
                });
            }
            Prepared::Http(request) => request,
        };
        let mut outbound = http::Request::new(Full::new(request.body));
        *outbound.method_mut() = request.method;
        *outbound.uri_mut() = request.url;
        *outbound.headers_mut() = request.headers;
        // Boxed: its HTTP/1.1 and HTTP/2 paths make a future of kilobytes, which would be
        // copied whole each time the request's task is spawned or moved.
        let sending = Box::pin(self.pool.send(outbound));
        let (response, lease) = match timeout_at(first_byte, sending).await {
            Err(_) => return Err(AttemptError::Timeout(TimeoutKind::FirstByte)),
            Ok(Err(e)) => return Err(classify_send_error(e)),
            Ok(Ok(sent)) => sent,
        };
        let (head, body) = response.into_parts();
        Ok(UpstreamResponse {
            status: head.status,
            headers: head.headers,
            body: Body::Http(body, lease),
        })
    }
}

fn classify_send_error(e: SendError) -> AttemptError {
    let cause = match e {
        SendError::Broken(e) => return AttemptError::Broken(error_chain(&e)),
        SendError::Connect(cause) => cause,
    };
    let reason = error_chain(&*cause);
    if timed_out(&*cause, &reason) {
        AttemptError::Timeout(TimeoutKind::Connect)
    } else {
        AttemptError::Connect(reason)
    }
}

/// Whether a connection failed for want of time (`reason` is its text).
fn timed_out(cause: &(dyn std::error::Error + 'static), reason: &str) -> bool {
    std::iter::successors(Some(cause), |c| c.source())
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::TimedOut)
        || reason.contains("timed out")
        || reason.contains("timeout")
}

/// The error and its causes on one line ("error sending request: connection reset by peer").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How long a complete answer's connection waits for its body's end to be kept.
const FINISH_WITHIN: Duration = Duration::from_secs(1);

/// An answer's head and its body, read chunk by chunk.
pub struct UpstreamResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    body: Body,
}

enum Body {
    /// With the HTTP/1.1 connection it came on, given back to the pool at the body's end.
    Http(Incoming, Option<Lease>),
    Full(Option<Bytes>),
    Events {
        events: VecDeque<Bytes>,
        interval: Duration,
    },
}

impl UpstreamResponse {
    /// True when the answer is a server-sent event stream.
    pub fn is_event_stream(&self) -> bool {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"))
    }

    /// The next body chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, AttemptError> {
        match &mut self.body {
            Body::Http(body, lease) => loop {
                match body.frame().await {
                    None => {
                        if let Some(lease) = lease.take() {
                            lease.give_back();
                        }
                        return Ok(None);
                    }
                    Some(Err(e)) => {
                        // Its connection is not given back, whatever a later read says.
                        lease.take();
                        return Err(AttemptError::Broken(error_chain(&e)));
                    }
                    // Trailers carry nothing a relay needs.
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            return Ok(Some(data));
                        }
                    }
                }
            },
            Body::Full(bytes) => Ok(bytes.take()),
            Body::Events { events, interval } => {
                if events.is_empty() {
                    return Ok(None);
                }
                if !interval.is_zero() {
                    sleep(*interval).await;
                }
                Ok(events.pop_front())
            }
        }
    }

    /// True when the body has ended, its end read now if already received (which gives a
    /// kept-alive connection back to the pool); false when more is, or may be, coming. For
    /// answers already complete: a chunk read instead is dropped.
    pub fn finish_now(&mut self) -> bool {
        match self.body {
            Body::Http(..) => matches!(self.chunk().now_or_never(), Some(Ok(None))),
            // No connection behind it.
            Body::Full(_) | Body::Events { .. } => true,
        }
    }

    /// For an answer that is complete though its body's end has not been read yet: a task
    /// waits a moment for that end to keep the connection, which is closed otherwise.
    pub fn finish_later(mut self) {
        if self.finish_now() {
            return;
        }
        if let Body::Http(mut body, Some(lease)) = self.body {
            tokio::spawn(async move {
                let end = tokio::time::timeout(FINISH_WITHIN, body.frame()).await;
                if let Ok(None) = end {
                    lease.give_back();
                }
            });
        }
    }

    /// Reads the whole body, bounded in size and by `deadline` (total) and `idle` between chunks.
    pub async fn collect(
        &mut self,
        max: usize,
        idle: Duration,
        deadline: Instant,
    ) -> Result<Bytes, AttemptError> {
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        loop {
            let until = deadline.min(Instant::now() + idle);
            let chunk = match timeout_at(until, self.chunk()).await {
                Err(_) if Instant::now() >= deadline => {
                    return Err(AttemptError::Timeout(TimeoutKind::Total));
                }
                Err(_) => return Err(AttemptError::Timeout(TimeoutKind::Idle)),
                Ok(chunk) => chunk?,
            };
            let Some(chunk) = chunk else { break };
            let len = first.as_ref().map_or(0, Bytes::len) + rest.len() + chunk.len();
            if len > max {
                return Err(AttemptError::TooLarge(max));
            }
            // Most answers arrive in one chunk: keep it without copying.
            match &first {
                None => first = Some(chunk),
                Some(head) => {
                    if rest.is_empty() {
                        rest.extend_from_slice(head);
                    }
                    rest.extend_from_slice(&chunk);
                }
            }
        }
        Ok(if rest.is_empty() {
            first.unwrap_or_default()
        } else {
            Bytes::from(rest)
        })
    }

    /// Turns an error answer into what the client receives with a single attempt.
    pub fn into_answer(self, body: Bytes) -> UpstreamAnswer {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let keep = name == CONTENT_TYPE
                || name == RETRY_AFTER
                || name.as_str().starts_with("x-ratelimit-");
            if keep {
                headers.append(name.clone(), value.clone());
            }
        }
        UpstreamAnswer {
            status: self.status,
            headers,
            body,
        }
    }
}
