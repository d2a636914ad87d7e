//! End-to-end tests: the real `orproxy` binary against fake upstreams on loopback.
//!
//! One test binary with modules (each `tests/*.rs` file would otherwise be its own binary).

// Test helpers outside #[test] functions may unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod admin;
mod auth;
mod billing;
mod budgets;
mod chat;
mod cli;
mod errors;
mod install;
mod ledger;
mod ledger_rows;
mod messages;
mod reload;
mod routing;
mod rules;
mod service;
mod shutdown;
mod streaming;
