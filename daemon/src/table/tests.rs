use std::collections::HashMap;

use super::*;
use crate::config::parse;

pub(crate) struct FakeEnv(pub HashMap<&'static str, &'static str>);

impl Env for FakeEnv {
    fn var(&self, name: &str) -> Result<String, EnvError> {
        match self.0.get(name) {
            None => Err(EnvError::NotSet),
            Some(&"") => Err(EnvError::Empty),
            Some(v) => Ok(v.to_string()),
        }
    }
}

fn env(vars: &[(&'static str, &'static str)]) -> FakeEnv {
    FakeEnv(vars.iter().copied().collect())
}

/// Builds a table from one YAML file named `c.yaml`.
pub(crate) fn build(
    yaml: &str,
    overrides: Overrides,
    vars: &[(&'static str, &'static str)],
) -> Result<RoutingTable, Vec<Diagnostic>> {
    let mut config = Config::default();
    let mut errors = Vec::new();
    config.merge("c.yaml", parse("c.yaml", yaml)?, &mut errors);
    assert!(errors.is_empty());
    RoutingTable::build(&config, None, &overrides, &env(vars))
}

#[test]
fn nothing_configured_means_mock() {
    let table = build("", Overrides::default(), &[]).unwrap();
    assert_eq!(table.default_backend, MOCK_BACKEND);
    assert_eq!(table.warnings.len(), 1);
    assert!(table.backend(OPENROUTER_BACKEND).is_none());
    assert_eq!(table.restart_only.listen.to_string(), DEFAULT_LISTEN);
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
    assert_eq!(entry.next_key().unwrap().secret.expose(), "sk-or-v1-x");
    assert_eq!(
        format!("{:?}", entry.next_key().unwrap().secret),
        "Secret(***)"
    );
}

#[test]
fn keys_that_cannot_be_sent_in_a_header_are_refused_by_variable_name() {
    let yaml = "backends:\n  a:\n    type: openai\n    api_keys_env: [GOOD, NEWLINE]\nadmin:\n  token_env: SPACED\nauth:\n  keys:\n    - { name: k, key_env: CONTROL }\n";
    let errors = build(
        yaml,
        Overrides::default(),
        &[
            ("GOOD", "sk-good"),
            ("NEWLINE", "sk-first\nsk-second"),
            ("SPACED", "admin-token\n"),
            ("CONTROL", "sk-\u{7}bell"),
        ],
    )
    .err()
    .unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(
        text[0].starts_with("c.yaml:3:5: backend `a`: environment variable NEWLINE holds a character that cannot be sent in an HTTP header"),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("auth key `k`: environment variable CONTROL holds")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.contains(
            "admin.token_env: environment variable SPACED starts or ends with whitespace"
        )),
        "{text:#?}"
    );
    assert!(
        !text
            .iter()
            .any(|t| t.contains("sk-") || t.contains("admin-token"))
    );

    let errors = build(
        "",
        Overrides::default(),
        &[("OPENROUTER_API_KEY", "sk\r\n")],
    )
    .err()
    .unwrap();
    assert!(
        errors[0].message.contains("OPENROUTER_API_KEY"),
        "{errors:?}"
    );
}

#[test]
fn an_override_needs_a_value_that_fits_a_header() {
    let yaml = "identity:\n  user_agent: { mode: override }\n  title: { mode: default }\nbackends:\n  a:\n    type: openai\n    identity:\n      referer: { mode: override, override_value: \"\" }\n      title: { mode: override, override_value: \"x\\ny\" }\n";
    let errors = build(yaml, Overrides::default(), &[]).err().unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "c.yaml:2:15: identity.user_agent: mode override needs a non-empty override_value",
            "c.yaml:8:16: backends.a.identity.referer: mode override needs a non-empty override_value",
            "c.yaml:9:14: backends.a.identity.title: override_value holds a character that cannot be sent in an HTTP header",
        ]
    );
}

#[test]
fn every_error_is_reported_with_its_place() {
    let errs = build(
        "backends:\n  a:\n    type: nope\n  b:\n    type: openai\n    api_key_env: MISSING_KEY\ndefault_backend: c\nmodel_aliases:\n  - { pattern: \"(\", replacement: x }\n",
        Overrides::default(),
        &[],
    )
    .err()
    .unwrap();
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 4, "{text:?}");
    assert!(
        text[0].starts_with("c.yaml:3:5: backend `a`: unknown backend type `nope`"),
        "{text:?}"
    );
    assert!(text[1].contains("MISSING_KEY is not set"), "{text:?}");
    let empty = build(
        "backends:\n  b:\n    type: openai\n    api_key_env: EMPTY_KEY\n",
        Overrides::default(),
        &[("EMPTY_KEY", "")],
    )
    .err()
    .unwrap();
    assert!(
        empty[0].to_string().contains("EMPTY_KEY is set but empty"),
        "{empty:?}"
    );
    assert!(
        text[2].starts_with("c.yaml:7:18: default_backend: unknown backend `c`"),
        "{text:?}"
    );
    assert!(
        text[3].starts_with("c.yaml:9:5: model_aliases: invalid pattern `(`"),
        "{text:?}"
    );
}

#[test]
fn flags_win_over_config() {
    let table = build(
        "backends:\n  local:\n    type: openai\n    base_url: http://127.0.0.1:1/v1\ndefault_backend: mock\nforce_model: a\nlisten: 127.0.0.1:9\n",
        Overrides { default_backend: Some("local".into()), force_model: Some("b".into()), listen: Some("127.0.0.1:0".into()), ..Overrides::default() },
        &[],
    )
    .unwrap();
    assert_eq!(table.default_backend, "local");
    assert_eq!(table.force_model.as_deref(), Some("b"));
    assert_eq!(table.restart_only.listen.to_string(), "127.0.0.1:0");
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
    let errs = build(
        "",
        Overrides {
            force_model: Some("m?temperature=9".into()),
            ..Overrides::default()
        },
        &[],
    )
    .err()
    .unwrap();
    assert!(
        errs[0]
            .to_string()
            .starts_with("--force-model: invalid model selector"),
        "{}",
        errs[0]
    );
    let errs = build(
        "backends:\n  x:\n    type: mock\nforce_model: \"zzz:foo\"\n",
        Overrides::default(),
        &[],
    )
    .err()
    .unwrap();
    assert!(
        errs[0]
            .to_string()
            .starts_with("c.yaml:4:14: force_model: unknown backend `zzz`"),
        "{}",
        errs[0]
    );
}

#[test]
fn keys_rotate_and_rest_alone() {
    let table = build(
        "backends:\n  or:\n    type: openrouter\n    api_keys_env: [K1, K2]\n",
        Overrides::default(),
        &[("K1", "one"), ("K2", "two")],
    )
    .unwrap();
    let entry = table.backend("or").unwrap();
    let seen: Vec<&str> = (0..3)
        .map(|_| entry.next_key().unwrap().secret.expose())
        .collect();
    assert_eq!(seen, ["one", "two", "one"]);
    let first = entry.next_key().unwrap();
    entry.cool_key(first.index, Duration::from_secs(60));
    assert_eq!(entry.ready_keys(), 1);
    for _ in 0..4 {
        assert_ne!(entry.next_key().unwrap().index, first.index);
    }
}

#[test]
fn aliases_rewrite_with_backreferences() {
    let table = build(
        "model_aliases:\n  - pattern: \"^gpt-(.*)\"\n    replacement: \"openrouter:openai/gpt-\\\\1\"\n",
        Overrides::default(),
        &[],
    )
    .unwrap();
    assert_eq!(
        table.aliases[0].apply("gpt-4o").as_deref(),
        Some("openrouter:openai/gpt-4o")
    );
    assert_eq!(table.aliases[0].apply("claude"), None);
    let replacement = replacement_syntax(r"a\1b\12\\c$2$$x${n}é$");
    assert_eq!(replacement.syntax, "a${1}b${12}\\c$2$$x${n}é$");
    assert_eq!(
        replacement.refs,
        [
            (r"\1", GroupRef::Number(1)),
            (r"\12", GroupRef::Number(12)),
            ("$2", GroupRef::Number(2)),
            ("${n}", GroupRef::Name("n")),
        ]
    );
}

#[test]
fn alias_references_to_groups_the_pattern_lacks_are_refused() {
    let yaml = "model_aliases:\n  - { pattern: \"^gpt(-.*)\", replacement: \"mock:\\\\9\" }\n  - { pattern: \"^gpt(-.*)\", replacement: \"mock:$name\" }\n  - { pattern: \"^gpt(-.*)\", replacement: \"mock:${name}\" }\n  - { pattern: \"^gpt(-.*)\", replacement: \"mock:$1a\" }\n  - { pattern: \"^gpt(?P<rest>-.*)\", replacement: \"mock:$rest${rest}\\\\1$1${1}$0$$9\" }\n";
    let errors = build(yaml, Overrides::default(), &[]).err().unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "c.yaml:2:5: model_aliases: replacement `mock:\\9`: `\\9` refers to group 9, but the pattern has 1 group",
            "c.yaml:3:5: model_aliases: replacement `mock:$name`: `$name` refers to a group named `name`, which the pattern does not define",
            "c.yaml:4:5: model_aliases: replacement `mock:${name}`: `${name}` refers to a group named `name`, which the pattern does not define",
            "c.yaml:5:5: model_aliases: replacement `mock:$1a`: `$1a` refers to a group named `1a`, which the pattern does not define (for group 1 followed by `a`, write `${1}a`)",
        ]
    );
}

#[test]
fn backend_names_are_restricted_and_located_at_the_name() {
    let yaml = "backends:\n  \"a\\nb\":\n    type: openai\n  'q\"x':\n    type: openai\n  my model:\n    type: openai\n  a:b:\n    type: openai\n  \"\":\n    type: openai\n  ok_name-1.v2:\n    type: openai\n";
    let errors = build(yaml, Overrides::default(), &[]).err().unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "c.yaml:10:3: backend name `` must not be empty",
            "c.yaml:2:3: backend name `a\\nb` may hold only ASCII letters, digits, `_`, `-` and `.`",
            "c.yaml:8:3: backend name `a:b` may hold only ASCII letters, digits, `_`, `-` and `.`",
            "c.yaml:6:3: backend name `my model` may hold only ASCII letters, digits, `_`, `-` and `.`",
            "c.yaml:4:3: backend name `q\\\"x` may hold only ASCII letters, digits, `_`, `-` and `.`",
        ]
    );
}

#[test]
fn a_failover_chain_longer_than_a_request_may_try_is_refused() {
    let chain = |n: usize| {
        let targets: Vec<String> = (0..n).map(|i| format!("\"mock:m{i}\"")).collect();
        format!(
            "failover:\n  - match: x\n    chain: [{}]\n",
            targets.join(", ")
        )
    };
    assert!(build(&chain(MAX_TARGETS - 1), Overrides::default(), &[]).is_ok());
    // A target written twice is tried once.
    let repeated = chain(MAX_TARGETS - 1).replace("]", ", \"mock:m0\", \"m1\"]");
    assert!(build(&repeated, Overrides::default(), &[]).is_ok());
    let errors = build(&chain(MAX_TARGETS), Overrides::default(), &[])
        .err()
        .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        errors[0].to_string(),
        format!(
            "c.yaml:2:5: failover: the chain has {MAX_TARGETS} targets; with the request's own that is more than the {MAX_TARGETS} one request may try"
        )
    );
}

#[test]
fn failover_rules_compile_and_check_their_backends() {
    let table = build(
        "failover:\n  - match: \"^mock:\"\n    chain: [\"mock:b|mock:c\"]\n    triggers: [rate_limited]\n",
        Overrides::default(),
        &[],
    )
    .unwrap();
    assert_eq!(table.failover[0].chain.len(), 2);
    assert!(table.failover[0].triggers.contains(&Trigger::RateLimited));
    assert!(!table.failover[0].triggers.contains(&Trigger::Connect));
    let errs = build(
        "failover:\n  - match: x\n    chain: [\"ghost:m\"]\n",
        Overrides::default(),
        &[],
    )
    .err()
    .unwrap();
    assert!(
        errs[0]
            .to_string()
            .starts_with("c.yaml:2:5: failover: unknown backend `ghost`"),
        "{}",
        errs[0]
    );
}

#[test]
fn unsafe_listeners_are_refused() {
    let errs = build("listen: 0.0.0.0:8000\n", Overrides::default(), &[])
        .err()
        .unwrap();
    assert!(
        errs[0]
            .to_string()
            .contains("refusing to serve 0.0.0.0:8000 without auth"),
        "{}",
        errs[0]
    );
    assert!(
        build(
            "listen: 0.0.0.0:8000\nauth:\n  allow_open: true\n",
            Overrides::default(),
            &[]
        )
        .is_ok()
    );
    let errs = build(
        "admin:\n  listen: 0.0.0.0:8001\n",
        Overrides::default(),
        &[],
    )
    .err()
    .unwrap();
    assert!(
        errs[0]
            .to_string()
            .contains("admin API on 0.0.0.0:8001 without a token"),
        "{}",
        errs[0]
    );
    assert!(
        build(
            "admin:\n  listen: 0.0.0.0:8001\n  token_env: T\n",
            Overrides::default(),
            &[("T", "tok")]
        )
        .is_ok()
    );
    let errs = build("listen: localhost\n", Overrides::default(), &[])
        .err()
        .unwrap();
    assert!(
        errs[0]
            .to_string()
            .starts_with("c.yaml:1:9: listen: `localhost` is not an address"),
        "{}",
        errs[0]
    );
}

#[test]
fn the_client_and_admin_apis_need_different_addresses() {
    let errs = build(
        "listen: 127.0.0.1:8100\nadmin:\n  listen: 127.0.0.1:8100\n",
        Overrides::default(),
        &[],
    )
    .err()
    .unwrap();
    assert_eq!(
        errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "c.yaml:3:11: admin.listen 127.0.0.1:8100 and listen 127.0.0.1:8100 cannot both be bound: give the admin API and the client API different addresses"
        ]
    );
    // The effective addresses count: a flag, a default, a wildcard that covers the other.
    let flag = |listen: Option<&str>, admin: Option<&str>| Overrides {
        listen: listen.map(str::to_owned),
        admin_listen: admin.map(str::to_owned),
        ..Overrides::default()
    };
    let cases = [
        ("", flag(None, Some("127.0.0.1:8000")), "--admin-listen: "),
        ("", flag(Some("127.0.0.1:8001"), None), "--listen: "),
        ("listen: 127.0.0.1:8001\n", flag(None, None), "c.yaml:1:9: "),
        (
            "listen: 127.0.0.1:8200\nauth:\n  allow_open: true\n",
            flag(None, Some("[::]:8200")),
            "--admin-listen: ",
        ),
    ];
    for (yaml, overrides, start) in cases {
        let errs = build(yaml, overrides, &[("T", "tok")]).err().unwrap();
        assert!(
            errs.iter()
                .any(|e| e.to_string().starts_with(start)
                    && e.message.contains("cannot both be bound")),
            "{yaml}: {errs:?}"
        );
    }
    // Port 0 picks a free port for each; different IPs on one port are two listeners.
    assert!(build("", flag(Some("127.0.0.1:0"), Some("127.0.0.1:0")), &[]).is_ok());
    assert!(
        build(
            "",
            flag(Some("127.0.0.1:8300"), Some("127.0.0.2:8300")),
            &[]
        )
        .is_ok()
    );
}

#[test]
fn restart_only_changes_are_named() {
    let a = build("", Overrides::default(), &[]).unwrap();
    let b = build(
        "listen: 127.0.0.1:9000\nlimits:\n  connect_timeout: 1s\n",
        Overrides::default(),
        &[],
    )
    .unwrap();
    let changes: Vec<(&str, String)> = b
        .restart_only
        .changes_from(&a.restart_only)
        .into_iter()
        .map(|c| (c.key, c.description))
        .collect();
    assert_eq!(
        changes,
        [
            (
                "listen",
                "listen (127.0.0.1:8000 → 127.0.0.1:9000)".to_owned()
            ),
            (
                "limits.connect_timeout",
                "limits.connect_timeout".to_owned()
            )
        ]
    );
    assert!(a.restart_only.changes_from(&a.restart_only).is_empty());
    let place = |key: &str| {
        let origin = &b.restart_origins[key];
        (origin.at.line(), origin.at.column())
    };
    assert_eq!(place("listen"), (1, 9));
    assert_eq!(place("limits.connect_timeout"), (3, 20));
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

#[test]
fn a_fallback_to_an_unknown_backend_is_located_at_its_budget() {
    let yaml = "budgets:\n  - { name: a, scope: global, limit_usd: 1, period: day }\n  - { name: b, scope: global, limit_usd: 1, period: month }\n  - { name: c, scope: global, limit_usd: 1, period: total, action: fallback, fallback: \"nosuch:x\" }\n";
    let errors = build(yaml, Overrides::default(), &[]).err().unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        ["c.yaml:4:5: budget `c`: fallback names unknown backend `nosuch`"]
    );
}

#[test]
fn budgets_and_pricing_are_validated_where_written() {
    let yaml = r#"
pricing:
  - { match: "(", input_usd_per_mtok: 1, output_usd_per_mtok: "0.000001" }
budgets:
  - { name: a, scope: global, match: x, limit_usd: 1, period: day }
  - { name: b, scope: model, match: "[", limit_usd: 1, period: day }
  - { name: c, scope: key, limit_usd: 1, period: month, action: fallback }
  - { name: d, scope: backend, limit_usd: 1, period: total, action: fallback, fallback: "ghost:m" }
  - { name: d, scope: global, limit_usd: 2, period: total }
"#;
    let errors = build(yaml, Overrides::default(), &[]).err().unwrap();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for line in &text {
        assert!(!line.contains('\n'), "one line per error: {line:?}");
    }
    let all = text.join("\n");
    for expected in [
        "c.yaml:3:5: pricing.match: invalid regex",
        "c.yaml:5:5: budget `a`: a global budget takes no `match`",
        "c.yaml:6:5: budget `b`: invalid regex",
        "c.yaml:7:5: budget `c`: action fallback needs a `fallback` selector",
        "c.yaml:9:5: budget `d` is already defined on line 8",
        "c.yaml:8:5: budget `d`: fallback names unknown backend `ghost`",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in\n{all}");
    }
    let ok = build(
        "budgets:\n  - { name: m, scope: global, limit_usd: 0.5, period: day }\npricing:\n  - { match: mock, input_usd_per_mtok: 0.15, output_usd_per_mtok: \"0.6\" }\n",
        Overrides::default(),
        &[],
    )
    .unwrap();
    assert_eq!(ok.budgets[0].limit, 500_000_000);
    assert_eq!(ok.pricing[0].price.prompt_per_mtok, 150_000_000);
    assert_eq!(ok.pricing[0].price.completion_per_mtok, 600_000_000);
}

#[test]
fn a_retention_without_a_database_is_a_warning() {
    let yaml = "default_backend: mock\ndatabase:\n  enabled: false\n  retention: 30d\n";
    let table = build(yaml, Overrides::default(), &[]).unwrap();
    assert!(
        table
            .warnings
            .iter()
            .any(|w| w.contains("database.retention has no effect")),
        "{:?}",
        table.warnings
    );
}
