//! The one upstream connection pool, and answers read the same way whether they come from the
//! network or from a local plugin.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use orproxy_plugin::{LocalBody, Prepared};
use tokio::time::{Instant, sleep, timeout_at};

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

/// An HTTP client: a keep-alive pool, HTTP/2 where the upstream offers it (ALPN).
///
/// Each worker thread has its own ([`UpstreamClient::for_this_thread`]): a pooled connection
/// is driven by a task of the runtime that opened it, so sharing one pool between workers
/// would bounce every request across cores.
#[derive(Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
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

    /// Builds the pool; `connect_timeout` bounds TCP plus TLS setup.
    pub fn new(connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        // The ring provider must be the process default before rustls is first used; a second
        // install (tests build several clients) fails harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(30))
            // Redirects would re-send the key to wherever the upstream points.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(UpstreamClient { http })
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
        let url = reqwest::Url::parse(&request.url)
            .map_err(|e| AttemptError::Connect(format!("invalid upstream URL: {e}")))?;
        let mut outbound = reqwest::Request::new(request.method, url);
        *outbound.headers_mut() = request.headers;
        *outbound.body_mut() = Some(request.body.into());
        let response = match timeout_at(first_byte, self.http.execute(outbound)).await {
            Err(_) => return Err(AttemptError::Timeout(TimeoutKind::FirstByte)),
            Ok(Err(e)) => return Err(classify_reqwest(e)),
            Ok(Ok(response)) => response,
        };
        Ok(UpstreamResponse {
            status: response.status(),
            headers: response.headers().clone(),
            body: Body::Http(response),
        })
    }
}

fn classify_reqwest(e: reqwest::Error) -> AttemptError {
    let connect = e.is_connect();
    let timeout = e.is_timeout();
    // Never print the URL: a base_url could carry credentials.
    let e = e.without_url();
    let reason = error_chain(&e);
    match (connect, timeout) {
        (true, true) => AttemptError::Timeout(TimeoutKind::Connect),
        (true, false) => AttemptError::Connect(reason),
        _ => AttemptError::Broken(reason),
    }
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

/// An answer's head and its body, read chunk by chunk.
pub struct UpstreamResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    body: Body,
}

enum Body {
    Http(reqwest::Response),
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
            Body::Http(response) => response
                .chunk()
                .await
                .map_err(|e| AttemptError::Broken(error_chain(&e.without_url()))),
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
