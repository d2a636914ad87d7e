//! The listener, the per-connection tasks and the state every request shares.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::request::Parts;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::chat::FastResponses;
use super::{BillingEntry, FakeOptions, RecordedRequest, routes};
use crate::serve::accept_loop;

/// Which upstream the engine imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenRouter,
    OpenAi,
}

impl Dialect {
    pub(crate) fn base_path(self) -> &'static str {
        match self {
            Dialect::OpenRouter => "/api/v1",
            Dialect::OpenAi => "/v1",
        }
    }
}

/// What `/generation?id=` reports about a past generation.
#[derive(Clone, Debug)]
pub(crate) struct GenerationRecord {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) provider: String,
    pub(crate) created: u64,
    pub(crate) api_type: &'static str,
    pub(crate) streamed: bool,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// The part of `completion_tokens` that was reasoning.
    pub(crate) reasoning_tokens: u64,
    pub(crate) cost_text: String,
    pub(crate) cost_pico: u128,
    pub(crate) finish_reason: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) http_referer: Option<String>,
}

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    billing: Vec<BillingEntry>,
    generations: HashMap<String, GenerationRecord>,
    attempts: HashMap<String, u64>,
    spent_pico: u128,
}

/// State shared by the listener, every connection and every streaming producer.
pub(crate) struct Shared {
    pub(crate) dialect: Dialect,
    pub(crate) opts: FakeOptions,
    pub(crate) fast: FastResponses,
    connections: AtomicUsize,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not take the fake down with it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a request and returns its index, or `None` when recording is off.
    pub(crate) fn record_request(&self, parts: &Parts, body: &Bytes) -> Option<usize> {
        if !self.opts.record {
            return None;
        }
        let mut inner = self.lock();
        inner
            .requests
            .push(RecordedRequest::from_parts(parts, body));
        Some(inner.requests.len() - 1)
    }

    pub(crate) fn mark_disconnected(&self, index: usize) {
        if let Some(req) = self.lock().requests.get_mut(index) {
            req.disconnected = true;
        }
    }

    /// Books a generation that reported usage (no-op when recording is off).
    pub(crate) fn record_generation(&self, record: GenerationRecord) {
        if !self.opts.record {
            return;
        }
        let mut inner = self.lock();
        inner.spent_pico += record.cost_pico;
        inner.billing.push(BillingEntry {
            id: record.id.clone(),
            model: record.model.clone(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            cost: record.cost_text.clone(),
        });
        inner.generations.insert(record.id.clone(), record);
    }

    pub(crate) fn generation(&self, id: &str) -> Option<GenerationRecord> {
        self.lock().generations.get(id).cloned()
    }

    /// Counts attempts per exact model string (1 for the first); kept even without recording
    /// because `fake/fail-first-N` depends on it.
    pub(crate) fn next_attempt(&self, model: &str) -> u64 {
        let mut inner = self.lock();
        let n = inner.attempts.entry(model.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    pub(crate) fn spent_pico(&self) -> u128 {
        self.lock().spent_pico
    }
}

/// A running fake: dropping it stops the listener and every open connection.
pub(crate) struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    // Never sent on: dropping it wakes every task waiting on the receivers.
    _shutdown: watch::Sender<()>,
}

impl Server {
    pub(crate) async fn start(dialect: Dialect, opts: FakeOptions) -> io::Result<Server> {
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            dialect,
            fast: FastResponses::new(dialect),
            opts,
            connections: AtomicUsize::new(0),
            inner: Mutex::new(Inner::default()),
        });
        let (tx, rx) = watch::channel(());
        let (counted, serving) = (Arc::clone(&shared), Arc::clone(&shared));
        tokio::spawn(accept_loop(
            listener,
            shared.opts.tls.clone(),
            rx,
            move || {
                counted.connections.fetch_add(1, Ordering::SeqCst);
            },
            move |req| routes::handle(Arc::clone(&serving), req),
        ));
        Ok(Server {
            addr,
            shared,
            _shutdown: tx,
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn base_url(&self) -> String {
        let scheme = match self.shared.opts.tls {
            Some(_) => "https",
            None => "http",
        };
        let path = self.shared.dialect.base_path();
        format!("{scheme}://{}{path}", self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    pub(crate) fn billing(&self) -> Vec<BillingEntry> {
        self.shared.lock().billing.clone()
    }

    pub(crate) fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}
