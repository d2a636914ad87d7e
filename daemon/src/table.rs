//! The routing table: one immutable, validated snapshot of everything a request needs.
//!
//! Built off the request path from the config, the command-line overrides and the environment;
//! every problem is collected (not only the first). Requests load it once and finish on it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderMap;
use orproxy_backends::Settings;
use orproxy_plugin::{Backend, Identity};

use crate::auth::Auth;
use crate::config::{ConfigFile, Diagnostic, IdentityConfig, IdentityMode, IdentityRule};

/// The backend that always exists and needs nothing.
pub const MOCK_BACKEND: &str = "mock";
/// The backend implied by `OPENROUTER_API_KEY` when config defines none of that name.
pub const OPENROUTER_BACKEND: &str = "openrouter";

/// Settings given on the command line; each wins over its config key.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--default-backend`.
    pub default_backend: Option<String>,
    /// `--force-model`.
    pub force_model: Option<String>,
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

/// The snapshot.
pub struct RoutingTable {
    /// Backends by name.
    pub backends: BTreeMap<String, BackendEntry>,
    /// Backend for selectors without a `backend:` prefix.
    pub default_backend: String,
    /// Replaces every request's model.
    pub force_model: Option<String>,
    /// Proxy keys.
    pub auth: Auth,
    /// Sizes and timeouts.
    pub limits: Limits,
    /// Non-fatal findings (logged at load).
    pub warnings: Vec<String>,
}

/// One configured backend, ready to use.
pub struct BackendEntry {
    /// Its name in config and selectors.
    pub name: String,
    /// The plugin instance.
    pub plugin: Arc<dyn Backend>,
    /// Upstream keys, used in turn.
    keys: Vec<Secret>,
    next_key: AtomicUsize,
    /// Outbound identity.
    pub identity: IdentityPolicy,
    /// Models named in config for `/v1/models`.
    pub models: Vec<String>,
}

impl BackendEntry {
    /// The key for the next attempt (round-robin), if the backend has any.
    pub fn next_key(&self) -> Option<&Secret> {
        if self.keys.is_empty() {
            return None;
        }
        let at = self.next_key.fetch_add(1, Ordering::Relaxed) % self.keys.len();
        self.keys.get(at)
    }

    /// The first key, for background calls (model lists).
    pub fn any_key(&self) -> Option<&Secret> {
        self.keys.first()
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
    /// The client's header, else orproxy's default.
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
        let pick = |own: &Option<IdentityRule>, global: &Option<IdentityRule>| match own
            .as_ref()
            .or(global.as_ref())
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

    /// Resolves the identity for one request from the client's headers.
    pub fn resolve<'a>(&'a self, client: &'a HeaderMap) -> Identity<'a> {
        let header = |name: &str| client.get(name).and_then(|v| v.to_str().ok());
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
                header("user-agent"),
                Some(USER_AGENT),
                Some(USER_AGENT),
            ),
            referer: choose(
                &self.referer,
                header("http-referer").or(header("referer")),
                None,
                None,
            ),
            title: choose(
                &self.title,
                header("x-openrouter-title").or(header("x-title")),
                None,
                Some(DEFAULT_TITLE),
            ),
        }
    }
}

/// Reads an environment variable (a seam so tests need not mutate the process environment).
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl RoutingTable {
    /// Validates `config` and builds the table; `file` names the config in diagnostics.
    pub fn build(
        file: &str,
        config: &ConfigFile,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<RoutingTable, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut backends = BTreeMap::new();

        for (name, spanned) in &config.backends {
            let at = spanned.referenced;
            let cfg = &spanned.value;
            if name.is_empty() || name.contains([':', '/', '?', '|']) {
                errors.push(Diagnostic::at(
                    file,
                    at,
                    format!(
                        "backend name `{name}` must not be empty or contain `:`, `/`, `?` or `|`"
                    ),
                ));
                continue;
            }
            let settings = Settings {
                base_url: cfg.base_url.clone(),
                stream_events: cfg.stream_events,
                event_interval: cfg.event_interval,
            };
            let plugin = match orproxy_backends::build(&cfg.kind, &settings) {
                Ok(plugin) => plugin,
                Err(e) => {
                    errors.push(Diagnostic::at(file, at, format!("backend `{name}`: {e}")));
                    continue;
                }
            };
            let env_names: Vec<String> = match (&cfg.api_key_env, &cfg.api_keys_env) {
                (Some(_), Some(_)) => {
                    errors.push(Diagnostic::at(
                        file,
                        at,
                        format!(
                            "backend `{name}`: set either api_key_env or api_keys_env, not both"
                        ),
                    ));
                    continue;
                }
                (Some(one), None) => vec![one.clone()],
                (None, Some(many)) => many.clone(),
                (None, None) => orproxy_backends::default_key_env(&cfg.kind)
                    .map(|v| vec![v.to_owned()])
                    .unwrap_or_default(),
            };
            let mut keys = Vec::new();
            for var in &env_names {
                match env.var(var) {
                    Some(key) => keys.push(Secret::new(key)),
                    None => errors.push(Diagnostic::at(
                        file,
                        at,
                        format!("backend `{name}`: environment variable {var} is not set"),
                    )),
                }
            }
            if keys.is_empty() && orproxy_backends::requires_key(&cfg.kind) && env_names.is_empty()
            {
                errors.push(Diagnostic::at(
                    file,
                    at,
                    format!("backend `{name}` of type `{}` needs api_key_env", cfg.kind),
                ));
            }
            backends.insert(
                name.clone(),
                BackendEntry {
                    name: name.clone(),
                    plugin,
                    keys,
                    next_key: AtomicUsize::new(0),
                    identity: IdentityPolicy::from_config(&config.identity, &cfg.identity),
                    models: cfg.models.clone(),
                },
            );
        }

        let builtin = |name: &str, kind: &str, keys: Vec<Secret>| -> Option<BackendEntry> {
            let plugin = orproxy_backends::build(kind, &Settings::default()).ok()?;
            Some(BackendEntry {
                name: name.to_owned(),
                plugin,
                keys,
                next_key: AtomicUsize::new(0),
                identity: IdentityPolicy::from_config(&config.identity, &IdentityConfig::default()),
                models: Vec::new(),
            })
        };
        if !backends.contains_key(MOCK_BACKEND)
            && let Some(mock) = builtin(MOCK_BACKEND, orproxy_backends::mock::KIND, Vec::new())
        {
            backends.insert(MOCK_BACKEND.to_owned(), mock);
        }
        if !backends.contains_key(OPENROUTER_BACKEND)
            && let Some(key) = env.var("OPENROUTER_API_KEY")
            && let Some(openrouter) = builtin(
                OPENROUTER_BACKEND,
                orproxy_backends::openrouter::KIND,
                vec![Secret::new(key)],
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
            (None, Some(spanned)) => {
                if !backends.contains_key(&spanned.value) {
                    errors.push(Diagnostic::at(
                        file,
                        spanned.referenced,
                        format!(
                            "default_backend: {}",
                            unknown_backend_message(&spanned.value, &backends)
                        ),
                    ));
                }
                spanned.value.clone()
            }
            (None, None) if backends.contains_key(OPENROUTER_BACKEND) => {
                OPENROUTER_BACKEND.to_owned()
            }
            (None, None) => {
                warnings.push(
                    "No default backend configured and OPENROUTER_API_KEY is not set: \
                     serving the built-in mock backend."
                        .to_owned(),
                );
                MOCK_BACKEND.to_owned()
            }
        };

        let force_model = overrides
            .force_model
            .clone()
            .or_else(|| config.force_model.as_ref().map(|s| s.value.clone()));

        let auth = match Auth::from_config(file, &config.auth, env) {
            Ok(auth) => auth,
            Err(mut e) => {
                errors.append(&mut e);
                Auth::default()
            }
        };

        let l = &config.limits;
        let d = Limits::default();
        let limits = Limits {
            max_body_bytes: l.max_body_bytes.map_or(d.max_body_bytes, saturating_usize),
            max_response_bytes: l
                .max_response_bytes
                .map_or(d.max_response_bytes, saturating_usize),
            connect_timeout: l.connect_timeout.unwrap_or(d.connect_timeout),
            first_byte_timeout: l.first_byte_timeout.unwrap_or(d.first_byte_timeout),
            idle_timeout: l.idle_timeout.unwrap_or(d.idle_timeout),
            total_timeout: l.total_timeout.unwrap_or(d.total_timeout),
            commit_after: l.commit_after.unwrap_or(d.commit_after),
            shutdown_grace: l.shutdown_grace.unwrap_or(d.shutdown_grace),
        };

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RoutingTable {
            backends,
            default_backend,
            force_model,
            auth,
            limits,
            warnings,
        })
    }

    /// A backend by name.
    pub fn backend(&self, name: &str) -> Option<&BackendEntry> {
        self.backends.get(name)
    }
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
mod tests {
    use super::*;
    use crate::config::parse;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn env(vars: &[(&'static str, &'static str)]) -> FakeEnv {
        FakeEnv(vars.iter().copied().collect())
    }

    fn build(
        yaml: &str,
        overrides: Overrides,
        vars: &[(&'static str, &'static str)],
    ) -> Result<RoutingTable, Vec<Diagnostic>> {
        let cfg = parse("c.yaml", yaml).unwrap();
        RoutingTable::build("c.yaml", &cfg, &overrides, &env(vars))
    }

    #[test]
    fn nothing_configured_means_mock() {
        let table = build("", Overrides::default(), &[]).unwrap();
        assert_eq!(table.default_backend, MOCK_BACKEND);
        assert_eq!(table.warnings.len(), 1);
        assert!(table.backend(OPENROUTER_BACKEND).is_none());
    }

    #[test]
    fn an_openrouter_key_implies_the_openrouter_backend() {
        let table = build(
            "",
            Overrides::default(),
            &[("OPENROUTER_API_KEY", "sk-or-v1-x")],
        )
        .unwrap();
        assert_eq!(table.default_backend, OPENROUTER_BACKEND);
        let entry = table.backend(OPENROUTER_BACKEND).unwrap();
        assert_eq!(entry.next_key().unwrap().expose(), "sk-or-v1-x");
        assert_eq!(format!("{:?}", entry.next_key().unwrap()), "Secret(***)");
    }

    #[test]
    fn every_error_is_reported_with_its_place() {
        let errs = build(
            "backends:\n  a:\n    type: nope\n  b:\n    type: openai\n    api_key_env: MISSING_KEY\ndefault_backend: c\n",
            Overrides::default(),
            &[],
        )
        .err()
        .unwrap();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("c.yaml:3:5: backend `a`: unknown backend type `nope`"),
            "{text:?}"
        );
        assert!(text[1].contains("MISSING_KEY is not set"), "{text:?}");
        assert!(
            text[2].starts_with("c.yaml:7:18: default_backend: unknown backend `c`"),
            "{text:?}"
        );
    }

    #[test]
    fn flags_win_over_config() {
        let table = build(
            "backends:\n  local:\n    type: openai\n    base_url: http://127.0.0.1:1/v1\ndefault_backend: mock\nforce_model: a\n",
            Overrides { default_backend: Some("local".into()), force_model: Some("b".into()) },
            &[],
        )
        .unwrap();
        assert_eq!(table.default_backend, "local");
        assert_eq!(table.force_model.as_deref(), Some("b"));
        let errs = build(
            "",
            Overrides {
                default_backend: Some("openrouter".into()),
                ..Overrides::default()
            },
            &[],
        )
        .err()
        .unwrap();
        assert!(
            errs[0].to_string().contains("set OPENROUTER_API_KEY"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn keys_rotate() {
        let table = build(
            "backends:\n  or:\n    type: openrouter\n    api_keys_env: [K1, K2]\n",
            Overrides::default(),
            &[("K1", "one"), ("K2", "two")],
        )
        .unwrap();
        let entry = table.backend("or").unwrap();
        let seen: Vec<&str> = (0..3).map(|_| entry.next_key().unwrap().expose()).collect();
        assert_eq!(seen, ["one", "two", "one"]);
    }

    #[test]
    fn identity_modes_resolve_per_backend() {
        let table = build(
            r#"
identity:
  user_agent: { mode: override, override_value: "MyApp/1.0.0" }
  title: { mode: default }
backends:
  local:
    type: openai
    base_url: http://127.0.0.1:1/v1
    identity:
      user_agent: { mode: passthrough }
"#,
            Overrides::default(),
            &[],
        )
        .unwrap();
        let mut client = HeaderMap::new();
        client.insert("user-agent", "OpenAI/Python 1.0".parse().unwrap());
        client.insert("http-referer", "https://client.example".parse().unwrap());
        let mock = table.backend("mock").unwrap().identity.resolve(&client);
        assert_eq!(mock.user_agent, Some("MyApp/1.0.0"));
        assert_eq!(mock.referer, Some("https://client.example"));
        assert_eq!(mock.title, Some(DEFAULT_TITLE));
        let local = table.backend("local").unwrap().identity.resolve(&client);
        assert_eq!(local.user_agent, Some("OpenAI/Python 1.0"));
        let empty = HeaderMap::new();
        let bare = table.backend("local").unwrap().identity.resolve(&empty);
        assert_eq!(bare.user_agent, Some(USER_AGENT));
    }
}
