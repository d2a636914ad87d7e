//! orproxy's backend plugins, one module each, all behind [`orproxy_plugin::Backend`].
//!
//! # Layout
//!
//! - [`openrouter`]: OpenRouter, with its attribution headers and body extensions.
//! - [`openai`]: any OpenAI-compatible server (vLLM, Ollama, llama.cpp, OpenAI).
//! - [`anthropic`]: Anthropic's native Messages API, translated both ways or passed through.
//! - [`mock`]: a deterministic local echo so that the daemon works with no key at all.
//!
//! [`build`] is the only place that names every plugin.

use std::sync::Arc;
use std::time::Duration;

use orproxy_plugin::Backend;

pub mod anthropic;
pub mod mock;
pub mod openai;
pub mod openrouter;

/// Plugin-specific settings from a backend's config entry.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Upstream base URL; each plugin has a default.
    pub base_url: Option<String>,
    /// `mock` only: the number of content events of a streamed answer (default: one per word).
    pub stream_events: Option<u32>,
    /// `mock` only: the delay before each streamed event.
    pub event_interval: Option<Duration>,
}

/// Why a backend could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `type:` names no plugin.
    #[error("unknown backend type `{0}` (known: {known})", known = KINDS.join(", "))]
    UnknownKind(String),
    /// A setting does not apply to this plugin.
    #[error("`{setting}` does not apply to backends of type `{kind}`")]
    NotApplicable {
        /// The plugin.
        kind: &'static str,
        /// The setting.
        setting: &'static str,
    },
    /// The base URL is not an absolute http(s) URL.
    #[error("base_url `{0}` must be an absolute http:// or https:// URL")]
    BadBaseUrl(String),
}

/// Every plugin name accepted by `type:`.
pub const KINDS: &[&str] = &[openrouter::KIND, openai::KIND, anthropic::KIND, mock::KIND];

/// The environment variable holding a plugin's key when config names none.
pub fn default_key_env(kind: &str) -> Option<&'static str> {
    match kind {
        openrouter::KIND => Some("OPENROUTER_API_KEY"),
        anthropic::KIND => Some("ANTHROPIC_API_KEY"),
        _ => None,
    }
}

/// Whether a plugin refuses to work without a key.
pub fn requires_key(kind: &str) -> bool {
    kind == openrouter::KIND || kind == anthropic::KIND
}

/// Instantiates the plugin named by `kind`.
pub fn build(kind: &str, settings: &Settings) -> Result<Arc<dyn Backend>, BuildError> {
    if let Some(url) = &settings.base_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(BuildError::BadBaseUrl(url.clone()));
    }
    let mock_only = |kind: &'static str| -> Result<(), BuildError> {
        if settings.stream_events.is_some() {
            return Err(BuildError::NotApplicable {
                kind,
                setting: "stream_events",
            });
        }
        if settings.event_interval.is_some() {
            return Err(BuildError::NotApplicable {
                kind,
                setting: "event_interval",
            });
        }
        Ok(())
    };
    Ok(match kind {
        openrouter::KIND => {
            mock_only(openrouter::KIND)?;
            let bad = |_| BuildError::BadBaseUrl(settings.base_url.clone().unwrap_or_default());
            Arc::new(openrouter::OpenRouter::new(settings.base_url.clone()).map_err(bad)?)
        }
        openai::KIND => {
            mock_only(openai::KIND)?;
            let bad = |_| BuildError::BadBaseUrl(settings.base_url.clone().unwrap_or_default());
            Arc::new(openai::OpenAi::new(settings.base_url.clone()).map_err(bad)?)
        }
        anthropic::KIND => {
            mock_only(anthropic::KIND)?;
            let bad = |_| BuildError::BadBaseUrl(settings.base_url.clone().unwrap_or_default());
            Arc::new(anthropic::Anthropic::new(settings.base_url.clone()).map_err(bad)?)
        }
        mock::KIND => {
            if settings.base_url.is_some() {
                return Err(BuildError::NotApplicable {
                    kind: mock::KIND,
                    setting: "base_url",
                });
            }
            Arc::new(mock::Mock::new(
                settings.stream_events,
                settings.event_interval,
            ))
        }
        other => return Err(BuildError::UnknownKind(other.to_owned())),
    })
}
