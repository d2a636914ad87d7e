//! The routing table: one immutable, validated snapshot of everything a request needs.
//!
//! Built off the request path from the merged config, the command-line overrides and the
//! environment; every problem is collected (not only the first). Requests load it once and
//! finish on it, so a reload never changes a request half-way.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName};
use orproxy_backends::Settings;
use orproxy_plugin::{Backend, Identity};
use regex::Regex;
use serde_saphyr::{Location, Spanned};

use crate::auth::Auth;
use crate::config::{
    Config, Diagnostic, IdentityConfig, IdentityMode, IdentityRule, LogFormat, Sourced, Trigger,
    Triggers,
};
use crate::route::MAX_TARGETS;
use crate::selector::{self, Selector};

/// The backend that always exists and needs nothing.
pub const MOCK_BACKEND: &str = "mock";
/// The backend implied by `OPENROUTER_API_KEY` when config defines none of that name.
pub const OPENROUTER_BACKEND: &str = "openrouter";
/// Default client API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default admin address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8001";
/// How often price lists are fetched by default.
pub const DEFAULT_PRICE_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// The shortest `database.retention`: rows of the current day are what reports read most.
const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The longest `limits.idle_poll` accepted.
const MAX_IDLE_POLL: Duration = Duration::from_millis(1);

/// Settings given on the command line; each wins over its config key.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--default-backend`.
    pub default_backend: Option<String>,
    /// `--force-model`.
    pub force_model: Option<String>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--db`.
    pub db: Option<PathBuf>,
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Settings that only take effect at startup; a reload that changes one is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartOnly {
    /// Client API address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Log format (`None`: decided by the terminal).
    pub log_format: Option<LogFormat>,
    /// Upstream connect timeout (the connection pool is built once).
    pub connect_timeout: Duration,
    /// The rules directory in use (the watcher is set up once).
    pub rules_dir: Option<PathBuf>,
    /// The usage database (`--db`, else `database.path`, else the default); `None` when
    /// `database.enabled: false`.
    pub database: Option<PathBuf>,
    /// Whether the daemon refuses to start without its database.
    pub database_required: bool,
}

/// A restart-only setting that differs from the running table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartChange {
    /// The config key (`limits.connect_timeout`): see [`RoutingTable::restart_origins`].
    pub key: &'static str,
    /// What changed, for the message.
    pub description: String,
}

/// Where a setting is written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: Arc<str>,
    /// The place of the value in it.
    pub at: Location,
}

impl Origin {
    /// The place of a whole top-level key's value.
    fn of<T>(sourced: &Sourced<T>) -> Origin {
        Origin {
            file: Arc::clone(&sourced.file),
            at: sourced.at,
        }
    }

    /// The place of a value nested in `sourced`.
    fn within<T, U>(sourced: &Sourced<T>, spanned: &Spanned<U>) -> Origin {
        Origin {
            file: Arc::clone(&sourced.file),
            at: spanned.referenced,
        }
    }

    /// A diagnostic pointing here.
    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(&self.file, self.at, message)
    }
}

impl RestartOnly {
    /// Describes what differs from `running`, if anything.
    pub fn changes_from(&self, running: &RestartOnly) -> Vec<RestartChange> {
        let mut changes = Vec::new();
        let mut changed = |key: &'static str, description: String| {
            changes.push(RestartChange { key, description })
        };
        if self.listen != running.listen {
            changed(
                "listen",
                format!("listen ({} → {})", running.listen, self.listen),
            );
        }
        if self.admin_listen != running.admin_listen {
            changed(
                "admin.listen",
                format!(
                    "admin.listen ({} → {})",
                    running.admin_listen, self.admin_listen
                ),
            );
        }
        if self.log_format != running.log_format {
            changed("log_format", "log_format".to_owned());
        }
        if self.connect_timeout != running.connect_timeout {
            changed(
                "limits.connect_timeout",
                "limits.connect_timeout".to_owned(),
            );
        }
        if self.rules_dir != running.rules_dir {
            let shown = |dir: &Option<PathBuf>| {
                dir.as_deref()
                    .map_or_else(|| "none".to_owned(), |d| d.display().to_string())
            };
            changed(
                "rules_dir",
                format!(
                    "rules_dir ({} → {})",
                    shown(&running.rules_dir),
                    shown(&self.rules_dir)
                ),
            );
        }
        if self.database != running.database {
            let shown = |db: &Option<PathBuf>| {
                db.as_deref()
                    .map_or_else(|| "disabled".to_owned(), |d| d.display().to_string())
            };
            changed(
                "database",
                format!(
                    "database ({} → {})",
                    shown(&running.database),
                    shown(&self.database)
                ),
            );
        }
        changes
    }
}

/// The snapshot.
pub struct RoutingTable {
    /// Backends by name.
    pub backends: BTreeMap<String, BackendEntry>,
    /// Backend for selectors without a `backend:` prefix.
    pub default_backend: String,
    /// Replaces every request's model.
    pub force_model: Option<String>,
    /// `model_aliases`, in order.
    pub aliases: Vec<Alias>,
    /// `failover`, in order.
    pub failover: Vec<FailoverRule>,
    /// Proxy keys.
    pub auth: Auth,
    /// Admin bearer token.
    pub admin_token: Option<Secret>,
    /// Sizes and timeouts.
    pub limits: Limits,
    /// Startup-only settings.
    pub restart_only: RestartOnly,
    /// Where each restart-only setting taken from the config is written, by the key of its
    /// [`RestartChange`]; settings from a flag or a default have none.
    pub restart_origins: BTreeMap<&'static str, Origin>,
    /// Files the table was built from, in merge order.
    pub files: Vec<PathBuf>,
    /// Non-fatal findings (logged at load).
    pub warnings: Vec<String>,
    /// Models named anywhere in the config: the only ones used as metric labels.
    pub known_models: Arc<HashSet<String>>,
    /// The rules directory's compiled scripts.
    pub rules: Option<Arc<orproxy_rules::RuleSet>>,
    /// `pricing:`, in order.
    pub pricing: Vec<crate::pricing::PriceRule>,
    /// `budgets:`.
    pub budgets: Arc<Vec<crate::budget::BudgetRule>>,
    /// How often backends' price lists are fetched.
    pub price_refresh: Duration,
    /// Age past which request rows are deleted (`database.retention`).
    pub retention: Option<Duration>,
}

/// One `model_aliases` entry, compiled.
#[derive(Debug)]
pub struct Alias {
    /// The pattern.
    pub regex: Regex,
    /// The replacement in `regex` syntax (`\1` already turned into `${1}`).
    pub replacement: String,
    /// As written, for `/admin/routes`.
    pub written: String,
}

impl Alias {
    /// Rewrites `model` if the pattern matches (first match only).
    pub fn apply(&self, model: &str) -> Option<String> {
        self.regex.is_match(model).then(|| {
            self.regex
                .replace(model, self.replacement.as_str())
                .into_owned()
        })
    }
}

/// One `failover` entry, compiled.
#[derive(Debug)]
pub struct FailoverRule {
    /// Matched against the first target's `backend:model`.
    pub regex: Regex,
    /// Targets appended after the request's own.
    pub chain: Vec<Selector>,
    /// Failures that move on.
    pub triggers: Triggers,
}

/// One configured backend, ready to use.
pub struct BackendEntry {
    /// Its name in config and selectors.
    pub name: String,
    /// The plugin kind (`openrouter`, `openai`, `mock`).
    pub kind: &'static str,
    /// The base URL with its credentials masked ([`orproxy_backends::redact_url`]): the only
    /// form kept for display, so that no view of the table can show them.
    pub base_url: Option<String>,
    /// The plugin instance.
    pub plugin: Arc<dyn Backend>,
    /// Upstream keys, used in turn.
    keys: Vec<KeySlot>,
    next_key: AtomicUsize,
    /// Environment variable names of the keys (shown instead of the keys).
    pub key_envs: Vec<String>,
    /// Outbound identity.
    pub identity: IdentityPolicy,
    /// Models named in config for `/v1/models`.
    pub models: Vec<String>,
}

struct KeySlot {
    secret: Secret,
    /// Milliseconds since [`epoch`] until which the key rests (after a 401/402/429).
    cooling_until: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A key picked for one attempt.
#[derive(Clone, Copy)]
pub struct PickedKey<'a> {
    /// Its position, to cool it down if the upstream refuses it.
    pub index: usize,
    /// The key.
    pub secret: &'a Secret,
}

impl BackendEntry {
    /// The key for the next attempt: round-robin over the keys that are not cooling down (the
    /// one that recovers first when all are).
    pub fn next_key(&self) -> Option<PickedKey<'_>> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.next_key.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let index = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.keys[i].cooling_until.load(Ordering::Relaxed) <= now)
            .unwrap_or_else(|| {
                (0..n)
                    .min_by_key(|&i| self.keys[i].cooling_until.load(Ordering::Relaxed))
                    .unwrap_or(0)
            });
        Some(PickedKey {
            index,
            secret: &self.keys[index].secret,
        })
    }

    /// Rests key `index` for `pause`.
    pub fn cool_key(&self, index: usize, pause: Duration) {
        if let Some(slot) = self.keys.get(index) {
            let until =
                now_ms().saturating_add(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX));
            slot.cooling_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Keys usable now.
    pub fn ready_keys(&self) -> usize {
        let now = now_ms();
        self.keys
            .iter()
            .filter(|k| k.cooling_until.load(Ordering::Relaxed) <= now)
            .count()
    }

    /// The first key, for background calls (model lists).
    pub fn any_key(&self) -> Option<&Secret> {
        self.keys.first().map(|k| &k.secret)
    }

    /// How many keys the backend has (never the keys themselves).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

/// Sizes and timeouts, with defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest non-streamed answer.
    pub max_response_bytes: usize,
    /// Upstream connect.
    pub connect_timeout: Duration,
    /// Until the answer starts (streams: until first content).
    pub first_byte_timeout: Duration,
    /// Between two stream events.
    pub idle_timeout: Duration,
    /// Whole request.
    pub total_timeout: Duration,
    /// Hold a stream back this long before committing a 200.
    pub commit_after: Duration,
    /// SIGTERM drain.
    pub shutdown_grace: Duration,
    /// A client's silence: before its request's head is complete, within its body, between
    /// its requests.
    pub client_timeout: Duration,
    /// How long a worker polls for its next event before it sleeps ([`crate::idle_poll`]).
    pub idle_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            max_response_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(600),
            commit_after: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            client_timeout: Duration::from_secs(30),
            idle_poll: crate::idle_poll::default_window(),
        }
    }
}

/// How each outbound identity header is chosen for one backend.
#[derive(Debug, Clone, Default)]
pub struct IdentityPolicy {
    user_agent: Choice,
    referer: Choice,
    title: Choice,
}

#[derive(Debug, Clone, Default)]
enum Choice {
    /// The client's header, else a fallback.
    #[default]
    Passthrough,
    Override(String),
    Default,
}

/// orproxy's own `User-Agent`.
pub const USER_AGENT: &str = concat!("orproxy/", env!("CARGO_PKG_VERSION"));
/// orproxy's own app title (OpenRouter attribution) in `default` mode.
pub const DEFAULT_TITLE: &str = "orproxy";

impl IdentityPolicy {
    fn from_config(global: &IdentityConfig, own: &IdentityConfig) -> Self {
        let pick =
            |own: &Option<Spanned<IdentityRule>>, global: &Option<Spanned<IdentityRule>>| match own
                .as_ref()
                .or(global.as_ref())
                .map(|rule| &rule.value)
            {
                None => Choice::Passthrough,
                Some(rule) => match rule.mode {
                    IdentityMode::Passthrough => Choice::Passthrough,
                    IdentityMode::Default => Choice::Default,
                    IdentityMode::Override => {
                        Choice::Override(rule.override_value.clone().unwrap_or_default())
                    }
                },
            };
        IdentityPolicy {
            user_agent: pick(&own.user_agent, &global.user_agent),
            referer: pick(&own.referer, &global.referer),
            title: pick(&own.title, &global.title),
        }
    }

    /// `passthrough`, `override` or `default` for each header, for `/admin/routes`.
    pub fn describe(&self) -> serde_json::Value {
        let mode = |c: &Choice| match c {
            Choice::Passthrough => serde_json::json!({"mode": "passthrough"}),
            Choice::Override(v) => serde_json::json!({"mode": "override", "override_value": v}),
            Choice::Default => serde_json::json!({"mode": "default"}),
        };
        serde_json::json!({"user_agent": mode(&self.user_agent), "referer": mode(&self.referer), "title": mode(&self.title)})
    }

    /// Resolves the identity for one request from the client's headers.
    pub fn resolve<'a>(&'a self, client: &'a HeaderMap) -> Identity<'a> {
        // Names as constants: a lookup by `&str` parses the name first, each time.
        const HTTP_REFERER: HeaderName = HeaderName::from_static("http-referer");
        const X_OPENROUTER_TITLE: HeaderName = HeaderName::from_static("x-openrouter-title");
        const X_TITLE: HeaderName = HeaderName::from_static("x-title");
        let header = |name: &HeaderName| client.get(name).and_then(|v| v.to_str().ok());
        // `passthrough` falls back to `fallback` when the client sent nothing; `default` sends
        // orproxy's own value. A title is never invented for passthrough: it would attribute
        // the client's traffic to orproxy.
        let choose = |choice: &'a Choice, passed: Option<&'a str>, fallback, default| match choice {
            Choice::Passthrough => passed.or(fallback),
            Choice::Override(value) => Some(value.as_str()),
            Choice::Default => default,
        };
        Identity {
            user_agent: choose(
                &self.user_agent,
                header(&http::header::USER_AGENT),
                Some(USER_AGENT),
                Some(USER_AGENT),
            ),
            referer: choose(
                &self.referer,
                header(&HTTP_REFERER).or(header(&http::header::REFERER)),
                None,
                None,
            ),
            title: choose(
                &self.title,
                header(&X_OPENROUTER_TITLE).or(header(&X_TITLE)),
                None,
                Some(DEFAULT_TITLE),
            ),
        }
    }
}

/// Why an environment variable gives no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvError {
    /// Not set.
    NotSet,
    /// Set to the empty string (an `EnvironmentFile` line with no value, usually).
    Empty,
    /// Set, but not valid UTF-8.
    NotUnicode,
}

/// Reads an environment variable (a seam so tests need not mutate the process environment).
pub trait Env {
    /// The variable's value, if set, not empty and valid UTF-8.
    fn var(&self, name: &str) -> Result<String, EnvError>;
}

/// Why a secret read from the environment variable `var` cannot be sent in, or compared with,
/// an HTTP header, if it cannot. Checked at load: otherwise every request would fail, blaming
/// the client (or, for a proxy key, the key could never match, since clients send headers in
/// ASCII). The message names the variable, never the value.
pub fn header_problem(var: &str, value: &str) -> Option<String> {
    if value.trim() != value {
        return Some(format!(
            "environment variable {var} starts or ends with whitespace (often a stray newline), which HTTP does not carry"
        ));
    }
    (!value.bytes().all(|b| b.is_ascii_graphic())).then(|| {
        format!(
            "environment variable {var} holds a character that cannot be sent in an HTTP header (only visible ASCII is allowed: no space, control character such as a newline, or non-ASCII character)"
        )
    })
}

/// The secret held by the environment variable `var`, checked by [`header_problem`]; the
/// error names the variable, never the value.
pub fn secret_var(env: &dyn Env, var: &str) -> Result<String, String> {
    let value = env.var(var).map_err(|e| match e {
        EnvError::NotSet => format!("environment variable {var} is not set"),
        EnvError::Empty => format!("environment variable {var} is set but empty"),
        EnvError::NotUnicode => format!("environment variable {var} is not valid UTF-8"),
    })?;
    match header_problem(var, &value) {
        None => Ok(value),
        Some(problem) => Err(problem),
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Result<String, EnvError> {
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => Ok(value),
            Ok(_) => Err(EnvError::Empty),
            Err(std::env::VarError::NotPresent) => Err(EnvError::NotSet),
            Err(std::env::VarError::NotUnicode(_)) => Err(EnvError::NotUnicode),
        }
    }
}

/// A group reference in an alias replacement, as the regex crate reads it.
#[derive(Debug, PartialEq, Eq)]
enum GroupRef<'a> {
    /// `\1`, `$1`, `${1}`.
    Number(usize),
    /// `$name`, `${name}`; also `$1a`, which the regex crate reads as the name `1a`.
    Name(&'a str),
}

impl<'a> GroupRef<'a> {
    /// A number if the text is one (as the regex crate decides), else a name.
    fn of(text: &'a str) -> Self {
        text.parse().map_or(GroupRef::Name(text), GroupRef::Number)
    }
}

/// An alias replacement in regex syntax, with every group reference it makes.
struct Replacement<'a> {
    /// `\1` already turned into `${1}`.
    syntax: String,
    /// Each reference as written, and what it refers to.
    refs: Vec<(&'a str, GroupRef<'a>)>,
}

/// Turns `\1` backreferences into the `${1}` the regex crate expects (`$1` also works as is),
/// collecting every reference so that one to a group the pattern lacks is refused at load
/// (the regex crate expands it to nothing).
fn replacement_syntax(written: &str) -> Replacement<'_> {
    let bytes = written.as_bytes();
    let mut syntax = String::with_capacity(written.len() + 4);
    let mut refs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        match rest {
            [b'\\', d, ..] if d.is_ascii_digit() => {
                let digits = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
                let number = &written[i + 1..i + 1 + digits];
                syntax.push_str(&format!("${{{number}}}"));
                refs.push((&written[i..i + 1 + digits], GroupRef::of(number)));
                i += 1 + digits;
            }
            [b'\\', b'\\', ..] => {
                syntax.push('\\');
                i += 2;
            }
            [b'$', b'$', ..] => {
                syntax.push_str("$$");
                i += 2;
            }
            // The regex crate's rules: `${` up to the next `}`, else the longest run of
            // letters, digits and `_`; a `$` followed by neither is a literal `$`.
            [b'$', b'{', ..] => match rest.iter().position(|&b| b == b'}') {
                Some(close) => {
                    let text = &written[i..i + close + 1];
                    syntax.push_str(text);
                    refs.push((text, GroupRef::of(&written[i + 2..i + close])));
                    i += close + 1;
                }
                None => {
                    syntax.push('$');
                    i += 1;
                }
            },
            [b'$', ..] => {
                let len = rest[1..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                    .count();
                let text = &written[i..i + 1 + len];
                syntax.push_str(text);
                if len > 0 {
                    refs.push((text, GroupRef::of(&text[1..])));
                }
                i += 1 + len;
            }
            _ => {
                // Up to the next `\` or `$` (both ASCII, so this splits on a char boundary).
                let len = rest[1..]
                    .iter()
                    .position(|&b| b == b'\\' || b == b'$')
                    .map_or(rest.len(), |at| at + 1);
                syntax.push_str(&written[i..i + len]);
                i += len;
            }
        }
    }
    Replacement { syntax, refs }
}

/// Why a reference of an alias replacement names no group of `regex`, if it does not.
fn group_ref_problem(regex: &Regex, written: &str, group: &GroupRef<'_>) -> Option<String> {
    match *group {
        GroupRef::Number(n) if n >= regex.captures_len() => Some(format!(
            "`{written}` refers to group {n}, but the pattern has {} group{}",
            regex.captures_len() - 1,
            if regex.captures_len() == 2 { "" } else { "s" }
        )),
        GroupRef::Name(name) if !regex.capture_names().flatten().any(|n| n == name) => {
            let hint = match name.find(|c: char| !c.is_ascii_digit()) {
                Some(at) if at > 0 => format!(
                    " (for group {} followed by `{}`, write `${{{}}}{}`)",
                    &name[..at],
                    &name[at..],
                    &name[..at],
                    &name[at..]
                ),
                _ => String::new(),
            };
            Some(format!(
                "`{written}` refers to a group named `{name}`, which the pattern does not define{hint}"
            ))
        }
        _ => None,
    }
}

/// Why `name` cannot name a backend, if it cannot: selectors split on `:`, `/`, `?` and `|`,
/// and the name is sent back in `x-orproxy-route`, a header.
fn backend_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("must not be empty");
    }
    (!name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    .then_some("may hold only ASCII letters, digits, `_`, `-` and `.`")
}

/// Whether two listeners cannot both bind: the same port (not 0, which picks a free one) on
/// the same address, or on a wildcard address that covers the other (`[::]` covers IPv4 too
/// on a dual-stack system).
fn same_listener(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

impl RoutingTable {
    /// Validates the merged `config` and builds the table.
    pub fn build(
        config: &Config,
        rules_dir: Option<PathBuf>,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<RoutingTable, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let global_identity = config
            .identity
            .as_ref()
            .map(|s| s.value.clone())
            .unwrap_or_default();

        if let Some(identity) = &config.identity {
            check_identity(&identity.file, "", &identity.value, &mut errors);
        }
        let mut backends = BTreeMap::new();
        for (name, sourced) in &config.backends {
            let cfg = &sourced.value;
            check_identity(
                &sourced.file,
                &format!("backends.{name}."),
                &cfg.identity,
                &mut errors,
            );
            if let Some(problem) = backend_name_problem(name) {
                let at = config
                    .backend_names
                    .get(name)
                    .copied()
                    .unwrap_or(sourced.at);
                errors.push(sourced.error_at(
                    at,
                    format!("backend name `{}` {problem}", name.escape_debug()),
                ));
                continue;
            }
            let settings = Settings {
                base_url: cfg.base_url.clone(),
                stream_events: cfg.stream_events,
                event_interval: cfg.event_interval.map(|d| d.0),
            };
            let plugin = match orproxy_backends::build(&cfg.kind, &settings) {
                Ok(plugin) => plugin,
                Err(e) => {
                    errors.push(sourced.error(format!("backend `{name}`: {e}")));
                    continue;
                }
            };
            let key_envs: Vec<String> = match (&cfg.api_key_env, &cfg.api_keys_env) {
                (Some(_), Some(_)) => {
                    errors.push(sourced.error(format!(
                        "backend `{name}`: set either api_key_env or api_keys_env, not both"
                    )));
                    continue;
                }
                (Some(one), None) => vec![one.clone()],
                (None, Some(many)) => many.clone(),
                (None, None) => orproxy_backends::default_key_env(&cfg.kind)
                    .map(|v| vec![v.to_owned()])
                    .unwrap_or_default(),
            };
            let mut keys = Vec::new();
            for var in &key_envs {
                match secret_var(env, var) {
                    Ok(key) => keys.push(Secret::new(key)),
                    Err(problem) => {
                        errors.push(sourced.error(format!("backend `{name}`: {problem}")))
                    }
                }
            }
            if key_envs.is_empty() && orproxy_backends::requires_key(&cfg.kind) {
                errors.push(sourced.error(format!(
                    "backend `{name}` of type `{}` needs api_key_env",
                    cfg.kind
                )));
            }
            backends.insert(
                name.clone(),
                BackendEntry::new(
                    name,
                    plugin,
                    cfg.base_url.as_deref().map(orproxy_backends::redact_url),
                    keys,
                    key_envs,
                    IdentityPolicy::from_config(&global_identity, &cfg.identity),
                    cfg.models.clone(),
                ),
            );
        }
        let builtin = |name: &str,
                       kind: &str,
                       keys: Vec<Secret>,
                       key_envs: Vec<String>|
         -> Option<BackendEntry> {
            let plugin = orproxy_backends::build(kind, &Settings::default()).ok()?;
            Some(BackendEntry::new(
                name,
                plugin,
                None,
                keys,
                key_envs,
                IdentityPolicy::from_config(&global_identity, &IdentityConfig::default()),
                Vec::new(),
            ))
        };
        if !backends.contains_key(MOCK_BACKEND)
            && let Some(mock) = builtin(
                MOCK_BACKEND,
                orproxy_backends::mock::KIND,
                Vec::new(),
                Vec::new(),
            )
        {
            backends.insert(MOCK_BACKEND.to_owned(), mock);
        }
        let implied_key = match secret_var(env, "OPENROUTER_API_KEY") {
            Ok(key) => Some(key),
            Err(_)
                if matches!(
                    env.var("OPENROUTER_API_KEY"),
                    Err(EnvError::NotSet | EnvError::Empty)
                ) =>
            {
                None
            }
            // Only a problem when the key is used: for the implied backend.
            Err(problem) => {
                if !backends.contains_key(OPENROUTER_BACKEND) {
                    errors.push(Diagnostic::general(
                        "<environment>",
                        format!("backend `{OPENROUTER_BACKEND}`: {problem}"),
                    ));
                }
                None
            }
        };
        if !backends.contains_key(OPENROUTER_BACKEND)
            && let Some(key) = implied_key
            && let Some(openrouter) = builtin(
                OPENROUTER_BACKEND,
                orproxy_backends::openrouter::KIND,
                vec![Secret::new(key)],
                vec!["OPENROUTER_API_KEY".to_owned()],
            )
        {
            backends.insert(OPENROUTER_BACKEND.to_owned(), openrouter);
        }

        let default_backend = match (&overrides.default_backend, &config.default_backend) {
            (Some(flag), _) => {
                if !backends.contains_key(flag) {
                    errors.push(Diagnostic::general(
                        "--default-backend",
                        unknown_backend_message(flag, &backends),
                    ));
                }
                flag.clone()
            }
            (None, Some(key)) => {
                if !backends.contains_key(&key.value) {
                    errors.push(key.error(format!(
                        "default_backend: {}",
                        unknown_backend_message(&key.value, &backends)
                    )));
                }
                key.value.clone()
            }
            (None, None) if backends.contains_key(OPENROUTER_BACKEND) => {
                OPENROUTER_BACKEND.to_owned()
            }
            (None, None) => {
                warnings.push("No default backend configured and OPENROUTER_API_KEY is not set: serving the built-in mock backend.".to_owned());
                MOCK_BACKEND.to_owned()
            }
        };

        let force_model = match (&overrides.force_model, &config.force_model) {
            (Some(flag), _) => {
                if let Err(e) = selector::parse_chain(flag) {
                    errors.push(Diagnostic::general("--force-model", e.to_string()));
                }
                Some(flag.clone())
            }
            (None, Some(key)) => {
                if let Err(e) = selector::parse_chain(&key.value) {
                    errors.push(key.error(format!("force_model: {e}")));
                }
                Some(key.value.clone())
            }
            (None, None) => None,
        };

        let mut aliases = Vec::new();
        if let Some(list) = &config.model_aliases {
            for entry in &list.value {
                match Regex::new(&entry.value.pattern) {
                    Ok(regex) => {
                        let replacement = replacement_syntax(&entry.value.replacement);
                        for (written, group) in &replacement.refs {
                            if let Some(problem) = group_ref_problem(&regex, written, group) {
                                errors.push(list.error_at(
                                    entry.referenced,
                                    format!(
                                        "model_aliases: replacement `{}`: {problem}",
                                        entry.value.replacement
                                    ),
                                ));
                            }
                        }
                        aliases.push(Alias {
                            regex,
                            replacement: replacement.syntax,
                            written: format!(
                                "{} → {}",
                                entry.value.pattern, entry.value.replacement
                            ),
                        });
                    }
                    Err(e) => errors.push(list.error_at(
                        entry.referenced,
                        format!(
                            "model_aliases: invalid pattern `{}`: {}",
                            entry.value.pattern,
                            crate::config::one_line(&e.to_string())
                        ),
                    )),
                }
            }
        }

        let mut failover = Vec::new();
        if let Some(list) = &config.failover {
            for entry in &list.value {
                let rule = &entry.value;
                let regex = match Regex::new(&rule.pattern) {
                    Ok(regex) => regex,
                    Err(e) => {
                        errors.push(list.error_at(
                            entry.referenced,
                            format!(
                                "failover: invalid match `{}`: {}",
                                rule.pattern,
                                crate::config::one_line(&e.to_string())
                            ),
                        ));
                        continue;
                    }
                };
                let mut chain = Vec::new();
                for text in &rule.chain {
                    match selector::parse_chain(text) {
                        Ok(selectors) => {
                            for s in &selectors {
                                if let Some(b) = &s.backend
                                    && !backends.contains_key(b)
                                {
                                    errors.push(list.error_at(
                                        entry.referenced,
                                        format!(
                                            "failover: {}",
                                            unknown_backend_message(b, &backends)
                                        ),
                                    ));
                                }
                            }
                            chain.extend(selectors);
                        }
                        Err(e) => {
                            errors.push(list.error_at(entry.referenced, format!("failover: {e}")))
                        }
                    }
                }
                // Checked here, not only per request: a longer chain would make every request
                // it matches a 400 that blames the client. Repeated targets are tried once.
                let distinct: HashSet<String> = chain
                    .iter()
                    .map(|s| {
                        let backend = s.backend.as_deref().unwrap_or(&default_backend);
                        format!("{backend}:{}", s.model)
                    })
                    .collect();
                if distinct.len() + 1 > MAX_TARGETS {
                    errors.push(list.error_at(
                        entry.referenced,
                        format!(
                            "failover: the chain has {} targets; with the request's own that is more than the {MAX_TARGETS} one request may try",
                            distinct.len()
                        ),
                    ));
                }
                let triggers = rule
                    .triggers
                    .as_deref()
                    .unwrap_or(&Trigger::ALL)
                    .iter()
                    .copied()
                    .collect();
                failover.push(FailoverRule {
                    regex,
                    chain,
                    triggers,
                });
            }
        }

        let auth = match &config.auth {
            Some(sourced) => {
                Auth::from_config(&sourced.file, &sourced.value, env).unwrap_or_else(|mut e| {
                    errors.append(&mut e);
                    Auth::default()
                })
            }
            None => Auth::default(),
        };
        let admin = config.admin.as_ref();
        let admin_token = admin.and_then(|a| {
            let var = a.value.token_env.as_ref()?;
            match secret_var(env, var) {
                Ok(token) => Some(Secret::new(token)),
                Err(problem) => {
                    errors.push(a.error(format!("admin.token_env: {problem}")));
                    None
                }
            }
        });

        let limits = build_limits(config.limits.as_ref());
        if let Some(l) = &config.limits {
            // Each of these at 0 fails every request (hyper would close every client
            // connection before its first request).
            let zero = [
                ("max_body_bytes", limits.max_body_bytes == 0),
                ("max_response_bytes", limits.max_response_bytes == 0),
                ("connect_timeout", limits.connect_timeout.is_zero()),
                ("first_byte_timeout", limits.first_byte_timeout.is_zero()),
                ("idle_timeout", limits.idle_timeout.is_zero()),
                ("total_timeout", limits.total_timeout.is_zero()),
                ("client_timeout", limits.client_timeout.is_zero()),
            ];
            for (key, _) in zero.iter().filter(|(_, is_zero)| *is_zero) {
                errors.push(l.error(format!("limits.{key}: must be more than 0")));
            }
            // Polling pays for the wake-ups it saves only when the next event is that close.
            if limits.idle_poll > MAX_IDLE_POLL {
                errors.push(l.error(format!(
                    "limits.idle_poll: at most {MAX_IDLE_POLL:?} (0 turns it off)"
                )));
            }
        }
        let pricing = crate::pricing::build_rules(config.pricing.as_ref(), &mut errors);
        let budgets = crate::budget::build_rules(config.budgets.as_ref(), &mut errors);
        // Checked against the config entries, not the compiled rules, to point at the entry.
        if let Some(list) = &config.budgets {
            for entry in &list.value {
                let budget = &entry.value;
                let chain = budget.fallback.as_deref().map(selector::parse_chain);
                // An invalid selector is reported by `budget::build_rules`.
                for selector in chain.into_iter().flatten().flatten() {
                    let backend = selector.backend.as_deref().unwrap_or(&default_backend);
                    if !backends.contains_key(backend) {
                        errors.push(list.error_at(
                            entry.referenced,
                            format!(
                                "budget `{}`: fallback names unknown backend `{backend}`",
                                budget.name
                            ),
                        ));
                    }
                }
            }
        }
        // A forced model naming no backend would fail every request with 404.
        if let Some(Ok(chain)) = force_model.as_deref().map(selector::parse_chain) {
            for selector in chain {
                let backend = selector.backend.as_deref().unwrap_or(&default_backend);
                if backends.contains_key(backend) {
                    continue;
                }
                let message = format!(
                    "force_model: {}",
                    unknown_backend_message(backend, &backends)
                );
                match (&overrides.force_model, &config.force_model) {
                    (Some(_), _) => errors.push(Diagnostic::general("--force-model", message)),
                    (None, Some(key)) => errors.push(key.error(message)),
                    (None, None) => {}
                }
            }
        }
        let database = config.database.as_ref().map(|d| &d.value);
        let retention = database.and_then(|d| d.retention).map(|d| d.0);
        if let (Some(retention), Some(d)) = (retention, &config.database)
            && retention < MIN_RETENTION
        {
            // A bare number is seconds: `retention: 90` would empty the table.
            errors.push(d.error(format!(
                "database.retention: {retention:?} is too short (at least 1d; write e.g. 90d)"
            )));
        }
        if retention.is_some()
            && database
                .and_then(|d| d.enabled.as_ref())
                .is_some_and(|e| !e.value)
        {
            warnings.push("database.retention has no effect: database.enabled is false".to_owned());
        }
        let mut restart_origins = BTreeMap::new();
        let listen_key = config
            .listen
            .as_ref()
            .map(|s| (Origin::of(s), s.value.as_str()));
        let admin_listen_key = admin.and_then(|a| {
            let listen = a.value.listen.as_ref()?;
            Some((Origin::within(a, listen), listen.value.as_str()))
        });
        if overrides.listen.is_none()
            && let Some((origin, _)) = &listen_key
        {
            restart_origins.insert("listen", origin.clone());
        }
        if overrides.admin_listen.is_none()
            && let Some((origin, _)) = &admin_listen_key
        {
            restart_origins.insert("admin.listen", origin.clone());
        }
        if overrides.log_format.is_none()
            && let Some(key) = &config.log_format
        {
            restart_origins.insert("log_format", Origin::of(key));
        }
        if let Some(limits) = &config.limits
            && let Some(timeout) = &limits.value.connect_timeout
        {
            restart_origins.insert("limits.connect_timeout", Origin::within(limits, timeout));
        }
        if let Some(key) = &config.rules_dir {
            restart_origins.insert("rules_dir", Origin::of(key));
        }
        if overrides.db.is_none()
            && let Some(sourced) = &config.database
        {
            // Turning recording off is the change when it is off; else the path.
            let d = &sourced.value;
            let origin = match (&d.enabled, &d.path) {
                (Some(enabled), _) if !enabled.value => Origin::within(sourced, enabled),
                (_, Some(path)) => Origin::within(sourced, path),
                _ => Origin::of(sourced),
            };
            restart_origins.insert("database", origin);
        }
        let admin_origin = match (&overrides.admin_listen, &admin_listen_key) {
            (Some(_), _) => None,
            (None, key) => key.as_ref().map(|(origin, _)| origin.clone()),
        };
        let listen_origin = match (&overrides.listen, &listen_key) {
            (Some(_), _) => None,
            (None, key) => key.as_ref().map(|(origin, _)| origin.clone()),
        };
        let listen = address(
            overrides.listen.as_deref(),
            "--listen",
            listen_key,
            DEFAULT_LISTEN,
            "listen",
            &mut errors,
        );
        let admin_listen = address(
            overrides.admin_listen.as_deref(),
            "--admin-listen",
            admin_listen_key,
            DEFAULT_ADMIN_LISTEN,
            "admin.listen",
            &mut errors,
        );
        if let Some(listen) = listen
            && auth.is_open()
            && !listen.ip().is_loopback()
            && !auth.allow_open
        {
            errors.push(Diagnostic::general(
                &origin_name(overrides.listen.is_some(), "--listen", config.listen.as_ref()),
                format!("refusing to serve {listen} without auth: configure auth.keys, listen on a loopback address, or set auth.allow_open: true"),
            ));
        }
        if let Some(admin_listen) = admin_listen
            && admin_token.is_none()
            && !admin_listen.ip().is_loopback()
        {
            errors.push(Diagnostic::general(
                &origin_name(overrides.admin_listen.is_some(), "--admin-listen", admin),
                format!("refusing to serve the admin API on {admin_listen} without a token: set admin.token_env or use a loopback address"),
            ));
        }

        let (Some(listen), Some(admin_listen)) = (listen, admin_listen) else {
            return Err(errors);
        };
        if same_listener(listen, admin_listen) {
            // Pointed at the admin address where it is written, else at the client one.
            let message = format!(
                "admin.listen {admin_listen} and listen {listen} cannot both be bound: give the admin API and the client API different addresses"
            );
            errors.push(
                match (&overrides.admin_listen, admin_origin, listen_origin) {
                    (Some(_), _, _) => Diagnostic::general("--admin-listen", message),
                    (None, Some(origin), _) => origin.error(message),
                    (None, None, _) if overrides.listen.is_some() => {
                        Diagnostic::general("--listen", message)
                    }
                    (None, None, Some(origin)) => origin.error(message),
                    (None, None, None) => Diagnostic::general("<built-in>", message),
                },
            );
        }
        let mut known_models: HashSet<String> = backends
            .values()
            .flat_map(|b| b.models.iter().cloned())
            .collect();
        known_models.extend(
            failover
                .iter()
                .flat_map(|r| r.chain.iter().map(|s| s.model.clone())),
        );
        if let Some(Ok(chain)) = force_model.as_deref().map(selector::parse_chain) {
            known_models.extend(chain.into_iter().map(|s| s.model));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RoutingTable {
            backends,
            default_backend,
            force_model,
            aliases,
            failover,
            auth,
            admin_token,
            restart_only: RestartOnly {
                listen,
                admin_listen,
                log_format: overrides
                    .log_format
                    .or(config.log_format.as_ref().map(|s| s.value)),
                connect_timeout: limits.connect_timeout,
                rules_dir,
                database: database
                    .and_then(|d| d.enabled.as_ref())
                    .is_none_or(|e| e.value)
                    .then(|| {
                        overrides
                            .db
                            .clone()
                            .or_else(|| {
                                let sourced = config.database.as_ref()?;
                                let path = sourced.value.path.as_ref()?;
                                Some(sourced.path_from_file(&path.value))
                            })
                            .unwrap_or_else(crate::ledger::default_path)
                    }),
                database_required: database.and_then(|d| d.required).unwrap_or(true),
            },
            restart_origins,
            limits,
            files: config.files.clone(),
            warnings,
            known_models: Arc::new(known_models),
            rules: None,
            pricing,
            budgets: Arc::new(budgets),
            price_refresh: database
                .and_then(|d| d.price_refresh)
                .map_or(DEFAULT_PRICE_REFRESH, |d| d.0),
            retention,
        })
    }

    /// A backend by name.
    pub fn backend(&self, name: &str) -> Option<&BackendEntry> {
        self.backends.get(name)
    }
}

impl BackendEntry {
    fn new(
        name: &str,
        plugin: Arc<dyn Backend>,
        base_url: Option<String>,
        keys: Vec<Secret>,
        key_envs: Vec<String>,
        identity: IdentityPolicy,
        models: Vec<String>,
    ) -> Self {
        BackendEntry {
            name: name.to_owned(),
            kind: plugin.kind(),
            base_url,
            plugin,
            keys: keys
                .into_iter()
                .map(|secret| KeySlot {
                    secret,
                    cooling_until: AtomicU64::new(0),
                })
                .collect(),
            next_key: AtomicUsize::new(0),
            key_envs,
            identity,
            models,
        }
    }
}

/// An `override` needs a value, and one that can be sent as a header: otherwise every
/// request would carry an empty or broken header.
fn check_identity(
    file: &str,
    prefix: &str,
    identity: &IdentityConfig,
    errors: &mut Vec<Diagnostic>,
) {
    for (header, rule) in identity.rules() {
        let Some(rule) = rule else { continue };
        if rule.value.mode != IdentityMode::Override {
            continue;
        }
        let problem = match rule.value.override_value.as_deref() {
            None | Some("") => "mode override needs a non-empty override_value",
            Some(value) if http::HeaderValue::from_str(value).is_err() => {
                "override_value holds a character that cannot be sent in an HTTP header"
            }
            Some(_) => continue,
        };
        errors.push(Diagnostic::at(
            file,
            rule.referenced,
            format!("{prefix}identity.{header}: {problem}"),
        ));
    }
}

fn build_limits(limits: Option<&Sourced<crate::config::LimitsConfig>>) -> Limits {
    let d = Limits::default();
    let Some(l) = limits.map(|s| &s.value) else {
        return d;
    };
    let dur = |v: Option<crate::config::Dur>, default: Duration| v.map_or(default, |d| d.0);
    Limits {
        max_body_bytes: l.max_body_bytes.map_or(d.max_body_bytes, saturating_usize),
        max_response_bytes: l
            .max_response_bytes
            .map_or(d.max_response_bytes, saturating_usize),
        connect_timeout: dur(
            l.connect_timeout.as_ref().map(|s| s.value),
            d.connect_timeout,
        ),
        first_byte_timeout: dur(l.first_byte_timeout, d.first_byte_timeout),
        idle_timeout: dur(l.idle_timeout, d.idle_timeout),
        total_timeout: dur(l.total_timeout, d.total_timeout),
        commit_after: dur(l.commit_after, d.commit_after),
        shutdown_grace: dur(l.shutdown_grace, d.shutdown_grace),
        client_timeout: dur(l.client_timeout, d.client_timeout),
        idle_poll: dur(l.idle_poll, d.idle_poll),
    }
}

fn origin_name<T>(from_flag: bool, flag: &str, key: Option<&Sourced<T>>) -> String {
    match (from_flag, key) {
        (true, _) => flag.to_owned(),
        (false, Some(key)) => format!("{}:{}:{}", key.file, key.at.line(), key.at.column()),
        (false, None) => "<built-in>".to_owned(),
    }
}

/// An address from its flag, its config key, or its default.
fn address(
    flag: Option<&str>,
    flag_name: &str,
    key: Option<(Origin, &str)>,
    default: &str,
    what: &str,
    errors: &mut Vec<Diagnostic>,
) -> Option<SocketAddr> {
    let text = flag
        .or(key.as_ref().map(|(_, text)| *text))
        .unwrap_or(default);
    text.parse::<SocketAddr>()
        .map_err(|_| {
            let message = format!(
                "{what}: `{text}` is not an address (expected IP:PORT, e.g. 127.0.0.1:8000)"
            );
            errors.push(match (flag, key) {
                (Some(_), _) => Diagnostic::general(flag_name, message),
                (None, Some((origin, _))) => origin.error(message),
                (None, None) => Diagnostic::general("<built-in>", message),
            });
        })
        .ok()
}

fn saturating_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn unknown_backend_message(name: &str, backends: &BTreeMap<String, BackendEntry>) -> String {
    let known: Vec<&str> = backends.keys().map(String::as_str).collect();
    let hint = if name == OPENROUTER_BACKEND {
        " (set OPENROUTER_API_KEY, or define it under backends:)"
    } else {
        ""
    };
    format!(
        "unknown backend `{name}`{hint}; known: {}",
        known.join(", ")
    )
}

#[cfg(test)]
pub(crate) mod tests;
