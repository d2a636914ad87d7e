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
    /// The base URL is not an absolute http(s) URL (held with everything that could be
    /// credentials masked).
    #[error("base_url `{0}` must be an absolute http:// or https:// URL")]
    BadBaseUrl(String),
    /// The base URL holds a user name or password, which no plugin sends.
    #[error(
        "base_url must not hold a user name or password (they would not be sent): name the environment variable holding the key in api_key_env"
    )]
    BaseUrlCredentials,
    /// The base URL has a fragment, which is never sent and often hides a mistyped URL.
    #[error("base_url must not have a fragment (`#...`)")]
    BaseUrlFragment,
    /// The base URL's port is not a port number.
    #[error("base_url's port must be a number from 1 to 65535")]
    BaseUrlPort,
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

/// What replaces a secret in [`redact_url`].
const MASK: &str = "***";

/// A URL fit for display: the userinfo password masked (a lone user name too, since tokens
/// are often passed that way), every query value and any fragment masked.
///
/// Works on the text, so a malformed URL is masked as well as a valid one.
pub fn redact_url(url: &str) -> String {
    let (url, fragment) = match url.split_once('#') {
        Some((url, fragment)) => (url, Some(fragment)),
        None => (url, None),
    };
    let (url, query) = match url.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut out = String::with_capacity(url.len() + 8);
    out.push_str(scheme);
    match authority.rfind('@') {
        Some(at) => {
            match authority[..at].split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(MASK),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    out.push_str(path);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() => format!("{name}={MASK}"),
                // A bare item (`?TOKEN`) may be the secret itself.
                None if !pair.is_empty() => MASK.to_owned(),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        if !fragment.is_empty() {
            out.push_str(MASK);
        }
    }
    out
}

/// A URL that could not be parsed, fit for an error message: everything between `://` and
/// the last `@` is masked as well as what [`redact_url`] masks.
///
/// In a malformed URL the end of the userinfo cannot be told from the text (a password may
/// hold `/`, `?` or `#`), so anything before the last `@` may be part of a password.
fn redact_unparsed(url: &str) -> String {
    let start = url.find("://").map_or(0, |at| at + 3);
    match url.rfind('@') {
        Some(at) if at >= start => redact_url(&format!("{}{MASK}{}", &url[..start], &url[at..])),
        _ => redact_url(url),
    }
}

/// Checks what the plugins' own parsing lets through: a base URL must be an absolute
/// http(s) URL without credentials (never sent: the key has its own setting), without a
/// fragment, and with a port that exists (`http::Uri` accepts `:99999`).
fn check_base_url(url: &str) -> Result<(), BuildError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(BuildError::BadBaseUrl(redact_unparsed(url)));
    }
    // Before parsing: `http://u:pw#x@host` would otherwise parse with `u` as its host.
    if url.contains('#') {
        return Err(BuildError::BaseUrlFragment);
    }
    let authority = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.authority().cloned())
        .ok_or_else(|| BuildError::BadBaseUrl(redact_unparsed(url)))?;
    let authority = authority.as_str();
    if authority.contains('@') {
        return Err(BuildError::BaseUrlCredentials);
    }
    // An IPv6 host (`[::1]`) holds colons of its own: the port follows its bracket.
    let host_end = authority.rfind(']').map_or(0, |at| at + 1);
    if let Some(colon) = authority[host_end..].rfind(':') {
        let port = &authority[host_end + colon + 1..];
        // An empty port (`host:`) means the scheme's default, as the URL standard says.
        if !port.is_empty() && !port.parse::<u16>().is_ok_and(|p| p != 0) {
            return Err(BuildError::BaseUrlPort);
        }
    }
    Ok(())
}

/// Instantiates the plugin named by `kind`.
pub fn build(kind: &str, settings: &Settings) -> Result<Arc<dyn Backend>, BuildError> {
    if let Some(url) = &settings.base_url {
        check_base_url(url)?;
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
    let bad = |_: http::uri::InvalidUri| {
        BuildError::BadBaseUrl(redact_unparsed(
            settings.base_url.as_deref().unwrap_or_default(),
        ))
    };
    Ok(match kind {
        openrouter::KIND => {
            mock_only(openrouter::KIND)?;
            Arc::new(openrouter::OpenRouter::new(settings.base_url.clone()).map_err(bad)?)
        }
        openai::KIND => {
            mock_only(openai::KIND)?;
            Arc::new(openai::OpenAi::new(settings.base_url.clone()).map_err(bad)?)
        }
        anthropic::KIND => {
            mock_only(anthropic::KIND)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_credentials() {
        let cases = [
            (
                "https://openrouter.ai/api/v1",
                "https://openrouter.ai/api/v1",
            ),
            (
                "http://user:SECRET@127.0.0.1:8080/api/v1",
                "http://user:***@127.0.0.1:8080/api/v1",
            ),
            ("http://TOKEN@host/v1", "http://***@host/v1"),
            ("http://user:@host", "http://user:***@host"),
            (
                "http://127.0.0.1:1/v1?api_key=SECRET&x=&y=2",
                "http://127.0.0.1:1/v1?api_key=***&x=&y=***",
            ),
            ("http://h/v1?TOKEN", "http://h/v1?***"),
            ("http://h/v1#frag", "http://h/v1#***"),
            ("http://a:b@h?k=v#f", "http://a:***@h?k=***#***"),
            // Malformed (no scheme): masked all the same.
            ("user:pw@host/v1?key=v", "user:***@host/v1?key=***"),
            // `@` in the path is not userinfo.
            ("http://h/p@x", "http://h/p@x"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn a_bad_base_url_error_masks_credentials() {
        let settings = Settings {
            base_url: Some("ftp://user:SECRET@h/?key=SECRET2".into()),
            ..Settings::default()
        };
        let Err(error) = build(openai::KIND, &settings) else {
            panic!("a non-http base_url is refused");
        };
        let text = error.to_string();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("ftp://***@h/?key=***"), "{text}");
    }

    fn refusal(url: &str) -> String {
        let settings = Settings {
            base_url: Some(url.into()),
            ..Settings::default()
        };
        match build(openai::KIND, &settings) {
            Ok(_) => panic!("{url} is accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn an_unparseable_base_url_is_shown_without_anything_before_its_last_at() {
        // A password holding `/`, `?` or `#` ends the authority early for `redact_url`.
        for (url, shown) in [
            ("http://user:SEC/RETPW@a b/", "http://***@a b/"),
            ("http://u:SEC?RETPW@a b/", "http://***@a b/"),
            ("http://u:SEC/RET@PW@a b/?k=SECRET", "http://***@a b/?k=***"),
            ("user:SEC/RETPW@a b/", "***@a b/"),
        ] {
            let text = refusal(url);
            assert!(!text.contains("SEC"), "{url}: {text}");
            assert!(!text.contains("RET"), "{url}: {text}");
            assert!(text.contains(&format!("`{shown}`")), "{url}: {text}");
        }
    }

    #[test]
    fn base_urls_with_credentials_a_fragment_or_no_real_port_are_refused() {
        for url in [
            "http://user:SECRETPW@127.0.0.1:1/v1",
            "http://SECRETPW@127.0.0.1:1/v1",
            "https://user:@host/v1",
        ] {
            let text = refusal(url);
            assert!(text.contains("api_key_env"), "{url}: {text}");
            assert!(!text.contains("SECRET"), "{url}: {text}");
        }
        for url in ["http://u:SEC#RETPW@127.0.0.1:1/api/v1", "http://h/v1#x"] {
            let text = refusal(url);
            assert!(text.contains("fragment"), "{url}: {text}");
            assert!(!text.contains("SEC"), "{url}: {text}");
        }
        for url in [
            "http://127.0.0.1:99999/v1",
            "http://127.0.0.1:65536",
            "http://[::1]:0/v1",
            "http://h:0/v1",
        ] {
            assert!(refusal(url).contains("port"), "{url}");
        }
        for url in [
            "http://127.0.0.1:65535/v1",
            "http://[::1]/v1",
            "http://[::1]:8080/v1?api-version=1",
            "https://openrouter.ai/api/v1",
        ] {
            let settings = Settings {
                base_url: Some(url.into()),
                ..Settings::default()
            };
            assert!(build(openai::KIND, &settings).is_ok(), "{url}");
        }
    }
}
