//! orproxy: a routing daemon for LLM traffic.
//!
//! Clients speak the OpenAI API to it; for each request it picks the backend and model, relays
//! the answer (streamed or not) and records the call.
//!
//! # Layout
//!
//! Read [`pipeline`] first: it is the path of every request, and names the module of each step.
//!
//! - [`daemon`]: startup, validation before binding, exit codes. [`cli`]: the flags.
//! - [`config`]: `config.yaml` and rules-directory fragments as written. [`table`]: the
//!   validated routing table snapshot. [`reload`]: the one path that builds and swaps it, fed by
//!   [`watch`], SIGHUP and the admin API.
//! - [`server`]: listeners, routers, graceful shutdown. [`admin`]: the admin listener.
//!   [`service`]: systemd readiness, reload and watchdog notifications.
//! - [`pipeline`] → [`auth`] → [`route`] ([`selector`]) → [`budget`] → [`dispatch`]
//!   ([`upstream`]) → [`relay`] (streams) → [`record`] ([`pricing`], [`ledger`]).
//! - [`front`]: the Anthropic Messages API at the edges of the same pipeline.
//! - [`report`]: `GET /admin/usage`, `GET /admin/budgets`, `orproxy report`.
//! - [`error`]: every failure and its single mapping to HTTP.
//! - [`explain`]: a request's route and rule trace, nothing sent. [`ruletest`]: `orproxy rules test`.
//! - [`models`]: `GET /v1/models`. [`health`]: cool-downs. [`metrics`]: Prometheus.
//!
//! **Invariant:** plugins (`orproxy-plugin`, `orproxy-backends`) never do I/O; this crate does
//! all of it.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod error;
pub mod explain;
pub mod front;
pub mod health;
pub mod idle_poll;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod pricing;
pub mod record;
pub mod relay;
pub mod reload;
pub mod report;
pub mod route;
pub mod ruletest;
pub mod selector;
pub mod server;
pub mod service;
pub mod stall;
pub mod table;
pub mod upstream;
pub mod watch;
