//! `config.yaml` as written by the operator: strict serde types, read with line and column.
//!
//! This module only reads; [`crate::table`] validates the result and builds the routing table.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, Spanned};

/// One problem found in a config file, printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, or `<flags>` / `<built-in>` for problems that come from elsewhere.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

impl Diagnostic {
    /// A problem at a known place in a file.
    pub fn at(file: &str, location: Location, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_owned(),
            line: location.line(),
            column: location.column(),
            message: message.into(),
        }
    }

    /// A problem without a position (a command-line flag, a missing file).
    pub fn general(file: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_owned(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// The whole config file. Unknown keys anywhere are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Client API address.
    pub listen: Option<Spanned<String>>,
    /// Admin listener settings.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Backend used when a model names none.
    pub default_backend: Option<Spanned<String>>,
    /// Replace every request's model by this selector.
    pub force_model: Option<Spanned<String>>,
    /// `text` or `json` log lines.
    pub log_format: Option<LogFormat>,
    /// Backends by name.
    #[serde(default)]
    pub backends: BTreeMap<String, Spanned<BackendConfig>>,
    /// Outbound identity headers, for every backend unless a backend overrides them.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Proxy keys.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Sizes and timeouts.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `admin:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin API and `/metrics` address.
    pub listen: Option<Spanned<String>>,
}

/// `log_format:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One entry of `backends:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The plugin: `openrouter`, `openai` or `mock`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Upstream base URL (each plugin has a default).
    pub base_url: Option<String>,
    /// Environment variable holding the upstream key.
    pub api_key_env: Option<String>,
    /// Several environment variables, one key each, used in turn.
    pub api_keys_env: Option<Vec<String>>,
    /// Per-backend identity; wins over the global one, header by header.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Models to list in `/v1/models` besides what the upstream lists.
    #[serde(default)]
    pub models: Vec<String>,
    /// `mock` only: content events per streamed answer.
    pub stream_events: Option<u32>,
    /// `mock` only: delay before each streamed event.
    #[serde(default, deserialize_with = "opt_duration")]
    pub event_interval: Option<Duration>,
}

/// `identity:` (global or per backend).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `User-Agent`.
    pub user_agent: Option<IdentityRule>,
    /// `HTTP-Referer`.
    pub referer: Option<IdentityRule>,
    /// `X-Title` and `X-OpenRouter-Title`.
    pub title: Option<IdentityRule>,
}

/// How one outbound identity header is chosen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    /// `passthrough`, `override` or `default`.
    pub mode: IdentityMode,
    /// The value sent in `override` mode.
    pub override_value: Option<String>,
}

/// See [`IdentityRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// Forward the client's header (orproxy's default when the client sent none).
    Passthrough,
    /// Always send `override_value`.
    Override,
    /// Always send orproxy's own value.
    Default,
}

/// `auth:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Named proxy keys; none means auth is off.
    #[serde(default)]
    pub keys: Vec<Spanned<KeyConfig>>,
    /// Allow auth-off mode on a non-loopback address.
    #[serde(default)]
    pub allow_open: bool,
}

/// One proxy key, given by the environment variable holding it or by its SHA-256.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name recorded with each request.
    pub name: String,
    /// Environment variable holding the key.
    pub key_env: Option<String>,
    /// Hex SHA-256 of the key.
    pub key_sha256: Option<String>,
}

/// `limits:`. Durations are `250ms`, `10s`, `2m`, `1h`, or a number of seconds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body.
    pub max_body_bytes: Option<u64>,
    /// Largest non-streamed upstream answer.
    pub max_response_bytes: Option<u64>,
    /// TCP (and TLS) connect to an upstream.
    #[serde(default, deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Until the upstream's answer starts (for streams: its first content event).
    #[serde(default, deserialize_with = "opt_duration")]
    pub first_byte_timeout: Option<Duration>,
    /// Longest silence between two events of a stream.
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// Whole request, all attempts included.
    #[serde(default, deserialize_with = "opt_duration")]
    pub total_timeout: Option<Duration>,
    /// How long a stream is held back waiting for content before orproxy commits a 200.
    #[serde(default, deserialize_with = "opt_duration")]
    pub commit_after: Option<Duration>,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(default, deserialize_with = "opt_duration")]
    pub shutdown_grace: Option<Duration>,
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(s)) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(Raw::Secs(s)) => Err(serde::de::Error::custom(format!(
            "duration must be a non-negative number of seconds, got {s}"
        ))),
        Some(Raw::Text(t)) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Parses `250ms`, `10s`, `1.5s`, `2m`, `1h` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration `{text}` (examples: 250ms, 10s, 2m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{text}` (use ms, s, m or h)"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Reads and parses a config file; every problem comes back as a [`Diagnostic`].
pub fn load(path: &Path) -> Result<ConfigFile, Diagnostic> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Diagnostic::general(&name, format!("cannot read config: {e}")))?;
    parse(&name, &text)
}

/// Parses config text; `name` is used in diagnostics.
pub fn parse(name: &str, text: &str) -> Result<ConfigFile, Diagnostic> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_saphyr::from_str::<ConfigFile>(text).map_err(|err| {
        let message = err.without_snippet().to_string();
        // The plain message may still end with "at line X column Y": keep only the reason.
        let message = match message.find(" at line ") {
            Some(at) => message[..at].to_owned(),
            None => message,
        };
        match err.location() {
            Some(location) => Diagnostic::at(name, location, message),
            None => Diagnostic::general(name, message),
        }
    })
}

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/orproxy/config.yaml";

/// The config file to read: the flag, else the default path if it exists, else none.
pub fn resolve_path(flag: Option<&Path>) -> Option<PathBuf> {
    match flag {
        Some(path) => Some(path.to_owned()),
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            default.exists().then(|| default.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_example_parses() {
        let cfg = parse(
            "config.yaml",
            r#"
backends:
  openrouter:
    type: openrouter
    api_key_env: OPENROUTER_API_KEY
    base_url: https://openrouter.ai/api/v1
  local:
    type: openai
    base_url: http://127.0.0.1:11434/v1
default_backend: openrouter
identity:
  user_agent: { mode: override, override_value: "MyApp/1.0.0" }
  referer:    { mode: override, override_value: "https://example.org" }
  title:      { mode: override, override_value: "MyApp" }
limits:
  commit_after: 250ms
  total_timeout: 2m
"#,
        )
        .unwrap();
        assert_eq!(cfg.backends.len(), 2);
        assert_eq!(cfg.backends["local"].value.kind, "openai");
        assert_eq!(cfg.default_backend.unwrap().value, "openrouter");
        assert_eq!(cfg.limits.commit_after, Some(Duration::from_millis(250)));
        assert_eq!(cfg.limits.total_timeout, Some(Duration::from_secs(120)));
        let ua = cfg.identity.user_agent.unwrap();
        assert_eq!(ua.mode, IdentityMode::Override);
        assert_eq!(ua.override_value.as_deref(), Some("MyApp/1.0.0"));
    }

    #[test]
    fn unknown_keys_are_errors_with_their_position() {
        let err = parse(
            "c.yaml",
            "backends:\n  local:\n    type: openai\n    base_ulr: http://x\n",
        )
        .unwrap_err();
        assert_eq!((err.line, err.column), (4, 5), "{err}");
        assert!(err.message.contains("base_ulr"), "{err}");
        assert!(err.to_string().starts_with("c.yaml:4:5: "), "{err}");
    }

    #[test]
    fn broken_yaml_is_located() {
        let err = parse("c.yaml", "listen: [\n").unwrap_err();
        assert_eq!(err.file, "c.yaml");
        assert!(err.line >= 1, "{err}");
    }

    #[test]
    fn durations_accept_units_and_numbers() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("10 parsecs").is_err());
        let cfg = parse("c", "limits:\n  idle_timeout: 5\n").unwrap();
        assert_eq!(cfg.limits.idle_timeout, Some(Duration::from_secs(5)));
        let err = parse("c", "limits:\n  idle_timeout: soon\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn empty_files_are_the_defaults() {
        let cfg = parse("c", "\n# nothing\n").unwrap();
        assert!(cfg.backends.is_empty());
    }
}
