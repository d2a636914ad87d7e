//! orproxy's rule engine: Rhai scripts that decide routes, sandboxed, tested like code.
//!
//! Pure by design: no HTTP, no tokio, no database. The daemon builds a [`RouteRequest`] from a
//! request, [`RuleSet::run`] lets each script's `fn on_request(req)` read and change it, and
//! the daemon applies the result. What scripts may ask about spending goes through [`Host`].
//!
//! # Layout
//!
//! - [`engine`]: `harden`, the one place every limit is set, and the helpers scripts call.
//! - [`request`]: the request scripts see and the shared handle they change it through.
//! - [`ruleset`]: compiling a directory of scripts and running them with a change trace.

#![forbid(unsafe_code)]

pub mod engine;
pub mod request;
pub mod ruleset;

pub use engine::{Host, NoLedger, Sandbox, UNLIMITED};
pub use request::{Rejection, RouteRequest, Snapshot};
pub use ruleset::{Change, HOOK, RuleFailure, RuleSet, ScriptError};

#[cfg(test)]
mod tests;
