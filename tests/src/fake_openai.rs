//! A plain OpenAI-compatible upstream: the same engine and `fake/...` behaviours as
//! [`crate::FakeOpenRouter`], in OpenAI's dialect (`chatcmpl-` ids, no `provider`, no `cost`,
//! usage chunk only with `stream_options.include_usage`, routes under `/v1`).

use std::net::SocketAddr;

use crate::fake_openrouter::server::{Dialect, Server};
use crate::{BillingEntry, FakeOptions, RecordedRequest};

/// A fake `https://api.openai.com/v1` on `127.0.0.1`; dropping it shuts it down.
pub struct FakeOpenAi {
    server: Server,
}

impl FakeOpenAi {
    /// Starts with no key required and no keep-alive comments.
    pub async fn start() -> std::io::Result<FakeOpenAi> {
        FakeOpenAi::start_with(FakeOpenAi::default_options()).await
    }

    /// Starts with the given options; an empty `api_keys` accepts any request.
    pub async fn start_with(opts: FakeOptions) -> std::io::Result<FakeOpenAi> {
        Ok(FakeOpenAi {
            server: Server::start(Dialect::OpenAi, opts).await?,
        })
    }

    /// The options [`FakeOpenAi::start`] uses: no keys, no keep-alives, recording on.
    pub fn default_options() -> FakeOptions {
        FakeOptions {
            api_keys: Vec::new(),
            keepalives: 0,
            ..FakeOptions::default()
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.server.requests()
    }

    /// One entry per generation that reported usage (`cost` is empty: OpenAI reports none).
    pub fn billing(&self) -> Vec<BillingEntry> {
        self.server.billing()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }
}

impl std::fmt::Debug for FakeOpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeOpenAi")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}
