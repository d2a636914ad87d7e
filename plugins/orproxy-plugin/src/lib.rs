//! The contract between the orproxy daemon and its backend plugins.
//!
//! A plugin turns one routed call into an upstream request and reads the answer back: it never
//! opens a socket, so every plugin is testable from recorded fixtures.
//!
//! # Layout
//!
//! - [`backend`]: the [`Backend`] trait, its phases, and the values that cross it.
//! - [`openai`]: the OpenAI wire format, the default of every phase.
//! - [`anthropic`]: the Anthropic Messages API translated to and from the OpenAI format.
//! - [`body`]: request bodies as top-level fields over raw JSON text.
//! - [`sse`]: server-sent event framing.
//! - [`failure`]: upstream failures, classified for failover.
//! - [`usage`]: token counts and exact nano-dollar money.

pub mod anthropic;
pub mod backend;
pub mod body;
pub mod failure;
pub mod openai;
pub mod sse;
pub mod usage;

pub use backend::{
    Backend, Call, EventKind, Identity, LocalBody, LocalReply, MapError, MappedEvent,
    MappedResponse, ModelInfo, Output, PrepareError, Prepared, Price, StreamMapper,
    UpstreamRequest,
};
pub use body::{BodyError, JsonObject};
pub use failure::{Failure, FailureKind};
pub use sse::{SseEvent, SseFramer};
pub use usage::{Nanos, Usage};
