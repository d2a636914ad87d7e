//! Log setup: `RUST_LOG` levels, text on a terminal, JSON lines otherwise; no timestamps of
//! our own under journald.

mod json;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(format: Option<LogFormat>) {
    // The platform verifier logs each refused certificate as an error of its own, without the
    // request it belongs to: the request's line already names the certificate problem.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rustls_platform_verifier=off"));
    let stderr_is_tty = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if stderr_is_tty {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // journald stamps every line itself: a second timestamp is noise there.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = match (format, journald) {
        (LogFormat::Json, _) => builder.event_format(json::JsonLines).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().try_init(),
        (LogFormat::Text, false) => builder.with_ansi(stderr_is_tty).try_init(),
    };
}
