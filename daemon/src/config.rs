//! The configuration as written: `config.yaml` plus every `*.yaml` of the rules directory.
//!
//! Each file is read on its own with strict serde types (unknown keys are errors with line and
//! column), then the files are merged in order: `backends` merge by name, every other top-level
//! key may be defined by one file only (a second definition is an error naming both files).
//! [`crate::table`] validates the merged [`Config`] and builds the routing table.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, Spanned};

mod keys;

/// One problem found in a config file, printed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, or `--flag` / `<built-in>` for problems that come from elsewhere.
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

/// One config file. Every key is optional so that rules-directory fragments parse alone.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "orproxy configuration",
    description = "config.yaml merged with the *.yaml files of the rules directory"
)]
pub struct ConfigFile {
    /// Client API address (IP:PORT). Restart-only.
    #[schemars(with = "Option<String>")]
    pub listen: Option<Spanned<String>>,
    /// Admin listener. Restart-only.
    #[schemars(with = "Option<AdminConfig>")]
    pub admin: Option<Spanned<AdminConfig>>,
    /// Watched directory of `*.rhai` and `*.yaml` (main config only).
    #[schemars(with = "Option<String>")]
    pub rules_dir: Option<Spanned<String>>,
    /// Backend used when a model names none.
    #[schemars(with = "Option<String>")]
    pub default_backend: Option<Spanned<String>>,
    /// Replace every request's model by this selector.
    #[schemars(with = "Option<String>")]
    pub force_model: Option<Spanned<String>>,
    /// `text` or `json` log lines. Restart-only.
    #[schemars(with = "Option<LogFormat>")]
    pub log_format: Option<Spanned<LogFormat>>,
    /// Backends by name; names merge across files.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, BackendConfig>")]
    pub backends: BTreeMap<BackendName, Spanned<BackendConfig>>,
    /// Regex rewrites of the requested model, first match wins, one pass.
    #[schemars(with = "Option<Vec<AliasConfig>>")]
    pub model_aliases: Option<Spanned<Vec<Spanned<AliasConfig>>>>,
    /// Ordered failover chains per model pattern.
    #[schemars(with = "Option<Vec<FailoverConfig>>")]
    pub failover: Option<Spanned<Vec<Spanned<FailoverConfig>>>>,
    /// Outbound identity headers for every backend (a backend's own `identity` wins).
    #[schemars(with = "Option<IdentityConfig>")]
    pub identity: Option<Spanned<IdentityConfig>>,
    /// Proxy keys.
    #[schemars(with = "Option<AuthConfig>")]
    pub auth: Option<Spanned<AuthConfig>>,
    /// Sizes and timeouts.
    #[schemars(with = "Option<LimitsConfig>")]
    pub limits: Option<Spanned<LimitsConfig>>,
    /// The usage database (main config only; `ledger:` is accepted as another name).
    #[serde(alias = "ledger")]
    #[schemars(with = "Option<DatabaseConfig>")]
    pub database: Option<Spanned<DatabaseConfig>>,
    /// Prices per model pattern, used when the upstream reports no cost.
    #[schemars(with = "Option<Vec<PricingConfig>>")]
    pub pricing: Option<Spanned<Vec<Spanned<PricingConfig>>>>,
    /// Spend caps.
    #[schemars(with = "Option<Vec<BudgetConfig>>")]
    pub budgets: Option<Spanned<Vec<Spanned<BudgetConfig>>>>,
}

/// `database:`.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// SQLite file (`--db` wins) [default: $STATE_DIRECTORY/usage.db, else ./orproxy-data/usage.db]. Restart-only.
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// Refuse to start when the database cannot be opened (default true); when false the daemon
    /// proxies without recording usage.
    pub required: Option<bool>,
    /// Record usage at all (default true). Off: no database; budgets then count from zero at
    /// every start. Restart-only.
    #[schemars(with = "Option<bool>")]
    pub enabled: Option<Spanned<bool>>,
    /// How often model prices are fetched from upstreams that publish them (default 24h).
    pub price_refresh: Option<Dur>,
    /// Delete request rows older than this (at least 1d; default: keep every row). The
    /// spend summary behind budgets is kept.
    pub retention: Option<Dur>,
}

/// One entry of `pricing:`; prices are USD per million tokens (written as numbers or strings).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// Regex matched anywhere in the route, written `backend:model`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// USD per million input tokens.
    pub input_usd_per_mtok: Usd,
    /// USD per million output tokens.
    pub output_usd_per_mtok: Usd,
    /// USD per million cached input tokens (default: the input price).
    pub cached_input_usd_per_mtok: Option<Usd>,
    /// USD per million input tokens written to the prompt cache (default: the input price).
    pub cache_write_usd_per_mtok: Option<Usd>,
    /// USD per million input tokens written to the prompt cache for an hour (default: the
    /// cache-write price).
    pub cache_write_1h_usd_per_mtok: Option<Usd>,
    /// USD per request.
    pub request_usd: Option<Usd>,
    /// The model's largest answer, used for budget reservations when a request sets no
    /// `max_tokens`.
    pub max_output_tokens: Option<u64>,
}

/// A USD amount, exact: a YAML number or a decimal string, converted to nano-dollars from
/// its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usd(pub orproxy_plugin::Nanos);

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Num(f64),
            Text(String),
        }
        // A YAML float is read as f64; its shortest round-trip text is the decimal as written
        // for any amount with up to 15 significant digits.
        let text = match Raw::deserialize(d)? {
            Raw::Int(n) => n.to_string(),
            Raw::Num(f) => f.to_string(),
            Raw::Text(t) => t,
        };
        match orproxy_plugin::usage::usd_to_nanos(&text) {
            Some(n) if n >= 0 => Ok(Usd(n)),
            None if orproxy_plugin::usage::beyond_nanos(&text).is_some() => {
                Err(serde::de::Error::custom(format!(
                    "`{text}` USD is too large (at most 9,223,372,036 USD)"
                )))
            }
            _ => Err(serde::de::Error::custom(format!(
                "`{text}` is not a non-negative USD amount"
            ))),
        }
    }
}

impl JsonSchema for Usd {
    fn schema_name() -> Cow<'static, str> {
        "Usd".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A USD amount: a non-negative number, or a decimal string.",
            "oneOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": "^\\s*[0-9]*(\\.[0-9]+)?([eE][-+]?[0-9]+)?\\s*$"}
            ]
        })
    }
}

/// One entry of `budgets:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Unique name (in errors, `/admin/budgets` and `budget_left(name)`).
    pub name: String,
    /// What the cap counts: all requests, or those of matching keys, backends or models.
    pub scope: BudgetScope,
    /// Regex matched anywhere in the key name, backend or model (not for `global`; default: all).
    #[serde(rename = "match")]
    pub pattern: Option<String>,
    /// The cap, in USD.
    pub limit_usd: Usd,
    /// The window: a UTC day, a UTC month, or all time.
    pub period: BudgetPeriod,
    /// What happens to a request once the cap is reached (default `reject`).
    #[serde(default)]
    pub action: BudgetAction,
    /// With `action: fallback`: the selector the request is sent to instead.
    pub fallback: Option<String>,
}

/// See [`BudgetConfig::scope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// Every request.
    Global,
    /// Requests of matching proxy keys (each key has its own cap).
    Key,
    /// Requests served by matching backends (together).
    Backend,
    /// Requests for matching models (together).
    Model,
}

/// See [`BudgetConfig::period`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
    /// Since the ledger began.
    Total,
}

/// See [`BudgetConfig::action`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// 402 `budget_exceeded`.
    #[default]
    Reject,
    /// Send the request to `fallback` instead.
    Fallback,
}

/// `admin:`.
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin API and `/metrics` address (IP:PORT).
    #[schemars(with = "Option<String>")]
    pub listen: Option<Spanned<String>>,
    /// Environment variable holding the admin bearer token; without one the admin API must be on loopback.
    pub token_env: Option<String>,
}

/// `log_format:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A backend's name as written, with its place; compared and ordered by the name alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct BackendName(pub Spanned<String>);

impl PartialEq for BackendName {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl Eq for BackendName {}

impl PartialOrd for BackendName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BackendName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.value.cmp(&other.0.value)
    }
}

impl std::borrow::Borrow<str> for BackendName {
    fn borrow(&self) -> &str {
        &self.0.value
    }
}

/// One entry of `backends:`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The plugin: `openrouter`, `openai`, `anthropic` or `mock`.
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
    pub event_interval: Option<Dur>,
}

/// One entry of `model_aliases:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    /// Regex matched anywhere in the requested model (anchor with `^`/`$`).
    pub pattern: String,
    /// Replacement of the match; `\1` (or `$1`) refers to a capture group.
    pub replacement: String,
}

/// One entry of `failover:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// Regex matched against the first target, written `backend:model`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Selectors tried in order after it.
    pub chain: Vec<String>,
    /// Which failures move to the next target (default: all of them). Not called `on`: YAML 1.1
    /// readers take that key for the boolean `true`.
    pub triggers: Option<Vec<Trigger>>,
}

/// A class of failure that may move a request to the next target of its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The upstream could not be reached (refused, reset, DNS, TLS, connect timeout).
    Connect,
    /// No answer in time before the first byte, or an upstream 408.
    Timeout,
    /// 429.
    RateLimited,
    /// 5xx, or an error reported in a 200.
    ServerError,
    /// 402 from the upstream.
    PaymentRequired,
    /// 401 or 403: the upstream refused orproxy's key.
    Unauthorized,
    /// A stream that errors, breaks or stalls before its first content event.
    Stream,
    /// The prompt does not fit this model (another model of the chain may take it).
    ContextLength,
}

impl Trigger {
    /// The trigger's name as written in config (`rate_limited`), for display.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Connect => "connect",
            Trigger::Timeout => "timeout",
            Trigger::RateLimited => "rate_limited",
            Trigger::ServerError => "server_error",
            Trigger::PaymentRequired => "payment_required",
            Trigger::Unauthorized => "unauthorized",
            Trigger::Stream => "stream",
            Trigger::ContextLength => "context_length",
        }
    }

    /// Every trigger: the default of a chain.
    pub const ALL: [Trigger; 8] = [
        Trigger::Connect,
        Trigger::Timeout,
        Trigger::RateLimited,
        Trigger::ServerError,
        Trigger::PaymentRequired,
        Trigger::Unauthorized,
        Trigger::Stream,
        Trigger::ContextLength,
    ];
}

/// A set of [`Trigger`]s: a chain's failover triggers, copied into every request's route.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Triggers(u8);

impl Triggers {
    /// Every trigger: the default of a chain.
    pub const ALL: Triggers = Triggers(u8::MAX >> (8 - Trigger::ALL.len()));

    /// Whether `trigger` is in the set.
    pub fn contains(&self, trigger: &Trigger) -> bool {
        self.0 & Self::bit(*trigger) != 0
    }

    /// How many triggers the set holds.
    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The triggers in the set, in [`Trigger::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = Trigger> + '_ {
        Trigger::ALL.into_iter().filter(|t| self.contains(t))
    }

    fn bit(trigger: Trigger) -> u8 {
        1 << trigger as u8
    }
}

impl FromIterator<Trigger> for Triggers {
    fn from_iter<I: IntoIterator<Item = Trigger>>(triggers: I) -> Triggers {
        Triggers(
            triggers
                .into_iter()
                .fold(0, |set, t| set | Triggers::bit(t)),
        )
    }
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// `identity:` (global or per backend).
#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `User-Agent`.
    #[schemars(with = "Option<IdentityRule>")]
    pub user_agent: Option<Spanned<IdentityRule>>,
    /// `HTTP-Referer`.
    #[schemars(with = "Option<IdentityRule>")]
    pub referer: Option<Spanned<IdentityRule>>,
    /// `X-Title` and `X-OpenRouter-Title`.
    #[schemars(with = "Option<IdentityRule>")]
    pub title: Option<Spanned<IdentityRule>>,
}

impl IdentityConfig {
    /// Each header's rule with its name in config.
    pub fn rules(&self) -> [(&'static str, Option<&Spanned<IdentityRule>>); 3] {
        [
            ("user_agent", self.user_agent.as_ref()),
            ("referer", self.referer.as_ref()),
            ("title", self.title.as_ref()),
        ]
    }
}

/// How one outbound identity header is chosen.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    /// `passthrough`, `override` or `default`.
    pub mode: IdentityMode,
    /// The value sent in `override` mode.
    pub override_value: Option<String>,
}

/// See [`IdentityRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
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
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Named proxy keys; none means auth is off.
    #[serde(default)]
    #[schemars(with = "Vec<KeyConfig>")]
    pub keys: Vec<Spanned<KeyConfig>>,
    /// Allow auth-off mode on a non-loopback address.
    #[serde(default)]
    pub allow_open: bool,
}

/// One proxy key, given by the environment variable holding it or by its SHA-256.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Name recorded with each request.
    pub name: String,
    /// Environment variable holding the key.
    pub key_env: Option<String>,
    /// Hex SHA-256 of the key.
    pub key_sha256: Option<String>,
}

/// `limits:`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: Option<u64>,
    /// Largest non-streamed upstream answer, in bytes.
    pub max_response_bytes: Option<u64>,
    /// TCP (and TLS) connect to an upstream. Restart-only.
    #[schemars(with = "Option<Dur>")]
    pub connect_timeout: Option<Spanned<Dur>>,
    /// Until the upstream's answer starts (for streams: its first content event).
    pub first_byte_timeout: Option<Dur>,
    /// Longest silence between two events of a stream.
    pub idle_timeout: Option<Dur>,
    /// Whole request, all attempts included.
    pub total_timeout: Option<Dur>,
    /// How long a stream is held back waiting for content before orproxy commits a 200.
    pub commit_after: Option<Dur>,
    /// How long SIGTERM waits for in-flight requests.
    pub shutdown_grace: Option<Dur>,
    /// How long a client may stay silent: before its request's head is complete, between two
    /// parts of its request body, not reading its answer, and idle between two requests.
    pub client_timeout: Option<Dur>,
    /// How long a worker that has just seen traffic keeps polling for its next event before it
    /// sleeps, while its events come that close together (0: never; at most 1ms; default 250us,
    /// 0 under a CPU quota).
    pub idle_poll: Option<Dur>,
}

/// A duration: `250us`, `250ms`, `10s`, `1.5s`, `2m`, `1h`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => seconds(s, &s.to_string()),
            Raw::Text(t) => parse_duration(&t),
        }
        .map(Dur)
        .map_err(serde::de::Error::custom)
    }
}

/// The longest duration accepted: longer ones are typos, and would overflow the clock
/// arithmetic of deadlines.
const MAX_DURATION_SECS: f64 = 100.0 * 365.0 * 86_400.0;

fn seconds(secs: f64, text: &str) -> Result<Duration, String> {
    if secs.is_nan() || secs < 0.0 {
        return Err(format!(
            "duration must be a non-negative number of seconds, got {text}"
        ));
    }
    if secs > MAX_DURATION_SECS {
        return Err(format!("duration `{text}` is too long (at most 36500d)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl JsonSchema for Dur {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: 250us, 250ms, 10s, 1.5s, 2m, 1h, 90d, or a number of seconds (at most 36500d).",
            "oneOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION_SECS},
                {"type": "string", "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*(us|ms|s|m|h|d)?\\s*$"}
            ]
        })
    }
}

/// Parses `250us`, `250ms`, `10s`, `1.5s`, `2m`, `1h`, `90d` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration `{text}` (examples: 250ms, 10s, 2m, 1h, 90d)"))?;
    let secs = match unit.trim() {
        "us" => value / 1_000_000.0,
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{text}` (use us, ms, s, m, h or d)"
            ));
        }
    };
    seconds(secs, text)
}

/// Parses one file's text; `name` is used in diagnostics.
///
/// serde reports only the first error; when there is one, every unknown key of the file is
/// reported with it (see [`keys`]).
pub fn parse(name: &str, text: &str) -> Result<ConfigFile, Vec<Diagnostic>> {
    // An empty document (blank, comments, document markers only) is the defaults.
    let empty = |line: &str| {
        let line = line.trim();
        line.is_empty() || line.starts_with('#') || line == "---" || line == "..."
    };
    if text.lines().all(empty) {
        return Ok(ConfigFile::default());
    }
    let error = match serde_saphyr::from_str::<ConfigFile>(text) {
        Ok(file) => return Ok(file),
        Err(error) => error,
    };
    let first = match error.location() {
        Some(location) => Diagnostic::at(name, location, yaml_message(&error)),
        None => Diagnostic::general(name, yaml_message(&error)),
    };
    let mut errors = keys::unknown(name, text);
    if !errors
        .iter()
        .any(|e| (e.line, e.column) == (first.line, first.column))
    {
        errors.push(first);
    }
    errors.sort_by_key(|e| (e.line, e.column));
    Err(errors)
}

/// The YAML reader's message for `error`, in the terms of a config file: without the
/// reader's own API advice, on one line, and without the "at line X column Y" the
/// diagnostic already carries.
fn yaml_message(error: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error;
    use serde_saphyr::budget::BudgetBreach;
    let mut error = error.without_snippet();
    while let Error::AliasError { error: inner, .. } = error {
        error = inner.without_snippet();
    }
    let limits = serde_saphyr::Budget::default();
    let too_large = |what: &str, limit: usize| {
        format!("the file is too large or too complex: more than {limit} {what}")
    };
    let message = match error {
        Error::DuplicateMappingKey { key: Some(key), .. } => {
            format!("duplicate key `{key}`: each key may appear once in a mapping")
        }
        Error::DuplicateMappingKey { key: None, .. } => {
            "duplicate key: each key may appear once in a mapping".to_owned()
        }
        Error::MultipleDocuments { .. } => {
            "the file must hold one YAML document (found a second `---` document)".to_owned()
        }
        Error::Budget { breach, .. } => match breach {
            BudgetBreach::Nodes { .. } => too_large("YAML nodes", limits.max_nodes),
            BudgetBreach::Events { .. } => too_large("YAML events", limits.max_events),
            BudgetBreach::Depth { .. } => too_large("levels of nesting", limits.max_depth),
            BudgetBreach::Aliases { .. } => too_large("aliases", limits.max_aliases),
            BudgetBreach::Anchors { .. } => too_large("anchors", limits.max_anchors),
            BudgetBreach::Documents { .. } => too_large("documents", limits.max_documents),
            BudgetBreach::ScalarBytes { .. } => {
                too_large("bytes of values", limits.max_total_scalar_bytes)
            }
            BudgetBreach::MergeKeys { .. } => too_large("merge keys", limits.max_merge_keys),
            _ => "the file is too large or too complex".to_owned(),
        },
        other => other.to_string(),
    };
    // The plain message may still end with "at line X column Y": keep only the reason.
    let message = match message.find(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    };
    one_line(&message)
}

/// `text` on one line: lines joined by a space, runs of whitespace collapsed. Diagnostics are
/// printed one per line, and some library messages (regex errors) draw multi-line diagrams.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A value together with the file and place that defined it.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    /// The file.
    pub file: Arc<str>,
    /// Where in the file.
    pub at: Location,
    /// The value.
    pub value: T,
}

impl<T> Sourced<T> {
    /// A path written in this value's file. A relative one is taken from that file's directory
    /// (as Prometheus does with its rule files): the config means the same whatever the working
    /// directory, which under systemd is `/`.
    pub fn path_from_file(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match Path::new(&*self.file).parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    /// A diagnostic pointing at this value.
    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.file, self.at, message)
    }

    /// A diagnostic pointing at a nested place of the same file.
    pub fn error_at(&self, at: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.file, at, message)
    }
}

/// The merged configuration of all files.
#[derive(Debug, Default)]
pub struct Config {
    /// Files read, in merge order.
    pub files: Vec<PathBuf>,
    /// See [`ConfigFile`].
    pub listen: Option<Sourced<String>>,
    /// See [`ConfigFile`].
    pub admin: Option<Sourced<AdminConfig>>,
    /// See [`ConfigFile`].
    pub rules_dir: Option<Sourced<String>>,
    /// See [`ConfigFile`].
    pub default_backend: Option<Sourced<String>>,
    /// See [`ConfigFile`].
    pub force_model: Option<Sourced<String>>,
    /// See [`ConfigFile`].
    pub log_format: Option<Sourced<LogFormat>>,
    /// See [`ConfigFile`].
    pub backends: BTreeMap<String, Sourced<BackendConfig>>,
    /// Where each backend's name is written, in the file of its entry.
    pub backend_names: BTreeMap<String, Location>,
    /// See [`ConfigFile`].
    pub model_aliases: Option<Sourced<Vec<Spanned<AliasConfig>>>>,
    /// See [`ConfigFile`].
    pub failover: Option<Sourced<Vec<Spanned<FailoverConfig>>>>,
    /// See [`ConfigFile`].
    pub identity: Option<Sourced<IdentityConfig>>,
    /// See [`ConfigFile`].
    pub auth: Option<Sourced<AuthConfig>>,
    /// See [`ConfigFile`].
    pub limits: Option<Sourced<LimitsConfig>>,
    /// See [`ConfigFile`].
    pub database: Option<Sourced<DatabaseConfig>>,
    /// See [`ConfigFile`].
    pub pricing: Option<Sourced<Vec<Spanned<PricingConfig>>>>,
    /// See [`ConfigFile`].
    pub budgets: Option<Sourced<Vec<Spanned<BudgetConfig>>>>,
}

impl Config {
    /// Merges `file` (named `name`) into the document; conflicts become diagnostics.
    pub fn merge(&mut self, name: &str, file: ConfigFile, errors: &mut Vec<Diagnostic>) {
        let name: Arc<str> = Arc::from(name);
        fn take<T>(
            slot: &mut Option<Sourced<T>>,
            incoming: Option<Spanned<T>>,
            name: &Arc<str>,
            key: &str,
            errors: &mut Vec<Diagnostic>,
        ) {
            let Some(spanned) = incoming else { return };
            match slot {
                Some(previous) => errors.push(Diagnostic::at(
                    name,
                    spanned.referenced,
                    format!(
                        "`{key}` is already defined in {}:{}; a key may be defined by one file only",
                        previous.file,
                        previous.at.line()
                    ),
                )),
                None => {
                    *slot = Some(Sourced {
                        file: Arc::clone(name),
                        at: spanned.referenced,
                        value: spanned.value,
                    })
                }
            }
        }
        take(&mut self.listen, file.listen, &name, "listen", errors);
        take(&mut self.admin, file.admin, &name, "admin", errors);
        take(
            &mut self.rules_dir,
            file.rules_dir,
            &name,
            "rules_dir",
            errors,
        );
        take(
            &mut self.default_backend,
            file.default_backend,
            &name,
            "default_backend",
            errors,
        );
        take(
            &mut self.force_model,
            file.force_model,
            &name,
            "force_model",
            errors,
        );
        take(
            &mut self.log_format,
            file.log_format,
            &name,
            "log_format",
            errors,
        );
        take(
            &mut self.model_aliases,
            file.model_aliases,
            &name,
            "model_aliases",
            errors,
        );
        take(&mut self.failover, file.failover, &name, "failover", errors);
        take(&mut self.identity, file.identity, &name, "identity", errors);
        take(&mut self.auth, file.auth, &name, "auth", errors);
        take(&mut self.limits, file.limits, &name, "limits", errors);
        take(&mut self.database, file.database, &name, "database", errors);
        take(&mut self.pricing, file.pricing, &name, "pricing", errors);
        take(&mut self.budgets, file.budgets, &name, "budgets", errors);
        for (BackendName(backend), spanned) in file.backends {
            let mut slot = self.backends.remove(&backend.value);
            let defined_here = slot.is_none();
            take(
                &mut slot,
                Some(spanned),
                &name,
                &format!("backends.{}", backend.value),
                errors,
            );
            if defined_here {
                self.backend_names
                    .insert(backend.value.clone(), backend.referenced);
            }
            if let Some(value) = slot {
                self.backends.insert(backend.value, value);
            }
        }
    }
}

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/orproxy/config.yaml";
/// The rules directory used when neither `--rules-dir` nor `rules_dir` names one, if it exists.
pub const DEFAULT_RULES_DIR: &str = "/etc/orproxy/rules";

/// Where the configuration comes from; fixed at startup, read again at every reload.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The main config file, if any.
    pub config: Option<PathBuf>,
    /// `--rules-dir`, which wins over `rules_dir` in the config.
    pub rules_dir_flag: Option<PathBuf>,
}

impl Sources {
    /// `--config` or the default path if it exists; `--rules-dir` as given.
    pub fn resolve(config_flag: Option<&Path>, rules_dir_flag: Option<&Path>) -> Sources {
        let config = match config_flag {
            Some(path) => Some(path.to_owned()),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                default.exists().then(|| default.to_owned())
            }
        };
        Sources {
            config,
            rules_dir_flag: rules_dir_flag.map(Path::to_owned),
        }
    }
}

/// The largest config file, YAML fragment, rule script or rule test read (far more than any
/// real one): a mistaken path to a huge file must not take the daemon's memory.
const MAX_SOURCE_BYTES: u64 = 4 << 20;

/// Reads a config file, fragment, script or test as text. Only regular files are read: a
/// FIFO would block the reload (and with it the shutdown) until something writes to it, and a
/// device such as `/dev/zero` never ends.
pub fn read_source(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO returns at once and is then refused.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_SOURCE_BYTES {
        return Err(too_large());
    }
    let mut text = String::new();
    file.take(MAX_SOURCE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SOURCE_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

fn too_large() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("larger than {} MiB", MAX_SOURCE_BYTES >> 20),
    )
}

/// The rules directory's `*.rhai` scripts, read in file-name order (hidden files skipped).
pub fn rule_scripts(dir: &Path) -> Result<Vec<(String, String)>, Vec<Diagnostic>> {
    let name = dir.display().to_string();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| vec![Diagnostic::general(&name, format!("cannot read: {e}"))])?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "rhai")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut sources = Vec::with_capacity(paths.len());
    let mut errors = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        match read_source(&path) {
            Ok(text) => sources.push((name, text)),
            Err(e) => errors.push(Diagnostic::general(&name, format!("cannot read: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(errors)
    }
}

/// Reads the main config and the rules directory's YAML fragments, in file-name order.
///
/// Returns the merged document and the rules directory actually used (to watch it), or every
/// problem found.
pub fn load(sources: &Sources) -> Result<(Config, Option<PathBuf>), Vec<Diagnostic>> {
    let (config, rules_dir) = load_parts(sources);
    config.map(|config| (config, rules_dir))
}

/// [`load`], with the rules directory known even when the YAML has errors: its scripts can
/// still be checked, so that one run reports every problem.
pub fn load_parts(sources: &Sources) -> (Result<Config, Vec<Diagnostic>>, Option<PathBuf>) {
    let mut errors = Vec::new();
    let mut config = Config::default();
    if let Some(path) = &sources.config {
        let name = path.display().to_string();
        match read_source(path) {
            Err(e) => errors.push(Diagnostic::general(
                &name,
                format!("cannot read config: {e}"),
            )),
            Ok(text) => match parse(&name, &text) {
                Ok(file) => {
                    config.files.push(path.clone());
                    config.merge(&name, file, &mut errors);
                }
                Err(mut e) => errors.append(&mut e),
            },
        }
    }
    let rules_dir = match (&sources.rules_dir_flag, &config.rules_dir) {
        (Some(flag), _) => Some(flag.clone()),
        (None, Some(key)) => Some(key.path_from_file(&key.value)),
        (None, None) => {
            let default = Path::new(DEFAULT_RULES_DIR);
            default.is_dir().then(|| default.to_owned())
        }
    };
    if let Some(dir) = &rules_dir {
        match yaml_fragments(dir) {
            // Located at the `rules_dir` key when the config names the directory.
            Err(e) => errors.push(match (&sources.rules_dir_flag, &config.rules_dir) {
                (None, Some(key)) => key.error(format!(
                    "cannot read the rules directory {}: {e}",
                    dir.display()
                )),
                _ => Diagnostic::general(
                    &dir.display().to_string(),
                    format!("cannot read the rules directory: {e}"),
                ),
            }),
            Ok(paths) => {
                // A main config kept inside its own rules directory is read once, as the main one.
                let main = sources
                    .config
                    .as_deref()
                    .and_then(|p| p.canonicalize().ok());
                for path in paths {
                    if main.is_some() && path.canonicalize().ok() == main {
                        continue;
                    }
                    let name = path.display().to_string();
                    let parsed = read_source(&path)
                        .map_err(|e| vec![Diagnostic::general(&name, format!("cannot read: {e}"))])
                        .and_then(|text| parse(&name, &text));
                    match parsed {
                        Ok(mut file) => {
                            if let Some(key) = file.rules_dir.take() {
                                errors.push(Diagnostic::at(&name, key.referenced, "`rules_dir` belongs in the main config, not in the rules directory"));
                            }
                            if let Some(key) = file.database.take() {
                                errors.push(Diagnostic::at(&name, key.referenced, "`database` (or its other name `ledger`) belongs in the main config, not in the rules directory"));
                            }
                            config.files.push(path.clone());
                            config.merge(&name, file, &mut errors);
                        }
                        Err(mut e) => errors.append(&mut e),
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        (Ok(config), rules_dir)
    } else {
        (Err(errors), rules_dir)
    }
}

/// The `*.yaml` / `*.yml` files of `dir` that are config fragments (not `*.test.yaml` rule
/// tests, not editor temporaries), sorted by name.
pub fn yaml_fragments(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| is_fragment(path))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Whether a path in the rules directory is a YAML config fragment.
pub fn is_fragment(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
    let test = name.ends_with(".test.yaml") || name.ends_with(".test.yml");
    // Editors write `.name.swp`, `name~` or `.#name`; hidden files are never fragments.
    // Anything else named `*.yaml` is read, so that a directory or a FIFO of that name is
    // reported rather than silently skipped.
    yaml && !test && !name.starts_with('.')
}

#[cfg(test)]
mod tests;
