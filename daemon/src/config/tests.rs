use super::*;

fn merged(files: &[(&str, &str)]) -> Result<Config, Vec<Diagnostic>> {
    let mut config = Config::default();
    let mut errors = Vec::new();
    for (name, text) in files {
        match parse(name, text) {
            Ok(file) => config.merge(name, file, &mut errors),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

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
model_aliases:
  - pattern: "^gpt-(.*)"
    replacement: "openrouter:openai/gpt-\\1"
identity:
  user_agent: { mode: override, override_value: "MyApp/1.0.0" }
  referer:    { mode: override, override_value: "https://example.org" }
  title:      { mode: override, override_value: "MyApp" }
failover:
  - match: "^openrouter:openai/"
    chain: ["local:llama3"]
    triggers: [connect, rate_limited, server_error]
limits:
  commit_after: 250ms
  total_timeout: 2m
"#,
    )
    .unwrap();
    assert_eq!(cfg.backends.len(), 2);
    assert_eq!(cfg.backends["local"].value.kind, "openai");
    assert_eq!(cfg.default_backend.unwrap().value, "openrouter");
    let limits = cfg.limits.unwrap().value;
    assert_eq!(limits.commit_after, Some(Dur(Duration::from_millis(250))));
    assert_eq!(limits.total_timeout, Some(Dur(Duration::from_secs(120))));
    let identity = cfg.identity.unwrap().value;
    let ua = identity.user_agent.unwrap().value;
    assert_eq!(ua.mode, IdentityMode::Override);
    assert_eq!(ua.override_value.as_deref(), Some("MyApp/1.0.0"));
    let aliases = cfg.model_aliases.unwrap().value;
    assert_eq!(aliases[0].value.replacement, "openrouter:openai/gpt-\\1");
    let failover = cfg.failover.unwrap().value;
    assert_eq!(
        failover[0].value.triggers.as_deref(),
        Some(&[Trigger::Connect, Trigger::RateLimited, Trigger::ServerError][..])
    );
}

#[test]
fn unknown_keys_are_errors_with_their_position() {
    let errors = parse(
        "c.yaml",
        "backends:\n  local:\n    type: openai\n    base_ulr: http://x\n",
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let err = &errors[0];
    assert_eq!((err.line, err.column), (4, 5), "{err}");
    assert!(err.message.contains("base_ulr"), "{err}");
    assert!(err.to_string().starts_with("c.yaml:4:5: "), "{err}");
}

#[test]
fn every_unknown_key_is_reported_in_order() {
    let text = "\
listen: 127.0.0.1:8000
lisen: x
backends:
  a:
    type: openai
    base_ulr: http://x
    models: [m]
budgets:
  - name: b
    scope: global
    limit_usd: 1
    period: day
    actoin: reject
identity:
  user_agent: { mode: override, overide_value: x }
ledger:
  path: /tmp/u.db
";
    let errors = parse("c.yaml", text).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let places: Vec<(u64, u64)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(places, [(2, 1), (6, 5), (13, 5), (15, 33)], "{shown:#?}");
    for (error, key) in errors
        .iter()
        .zip(["lisen", "base_ulr", "actoin", "overide_value"])
    {
        assert!(
            error
                .message
                .starts_with(&format!("unknown field `{key}`, expected one of ")),
            "{error}"
        );
    }
    // `ledger` is a serde alias of `database`: not unknown.
    assert!(!shown.iter().any(|e| e.contains("ledger")), "{shown:#?}");
}

#[test]
fn a_type_error_is_reported_with_the_unknown_keys() {
    let errors = parse(
        "c.yaml",
        "limits:\n  idle_timeout: soon\nbogus: 1\nbackends:\n  a: {type: mock, nope: 1}\n",
    )
    .unwrap_err();
    let places: Vec<(u64, u64)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(places, [(2, 17), (3, 1), (5, 19)], "{errors:?}");
}

#[test]
fn yaml_reader_messages_speak_of_the_file() {
    let message = |text: &str| {
        let errors = parse("c.yaml", text).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].to_string()
    };
    assert_eq!(
        message("listen: a\nlisten: b\n"),
        "c.yaml:2:1: duplicate key `listen`: each key may appear once in a mapping"
    );
    let two = message("listen: a\n---\nlisten: b\n");
    assert!(
        two.contains("the file must hold one YAML document"),
        "{two}"
    );
    assert!(!two.contains("from_str"), "{two}");
    let big = format!(
        "backends:\n  a:\n    type: mock\n    models: [{}]\n",
        ["m"; 250_001].join(", ")
    );
    let big = message(&big);
    assert!(
        big.contains("the file is too large or too complex: more than 250000 YAML nodes"),
        "{big}"
    );
    assert!(!big.contains("Nodes {"), "{big}");
}

#[test]
fn trigger_names_are_the_config_names() {
    for trigger in Trigger::ALL {
        let text = format!(
            "failover:\n  - match: x\n    chain: [y]\n    triggers: [{}]\n",
            trigger.name()
        );
        let cfg = parse("c", &text).unwrap();
        let parsed = cfg.failover.unwrap().value[0]
            .value
            .triggers
            .clone()
            .unwrap();
        assert_eq!(parsed, [trigger]);
    }
}

#[test]
fn broken_yaml_is_located() {
    let err = parse("c.yaml", "listen: [\n").unwrap_err().remove(0);
    assert_eq!(err.file, "c.yaml");
    assert!(err.line >= 1, "{err}");
}

#[test]
fn durations_accept_units_and_numbers() {
    assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
    assert!(parse_duration("10 parsecs").is_err());
    // Too long to be meant, and past what deadline arithmetic can hold.
    let long = parse_duration("99999999999999999999999h").unwrap_err();
    assert!(long.contains("too long"), "{long}");
    let errors = parse("c.yaml", "limits:\n  idle_timeout: 1e30\n").unwrap_err();
    assert!(errors[0].to_string().contains("too long"), "{}", errors[0]);
    let cfg = parse("c", "limits:\n  idle_timeout: 5\n").unwrap();
    assert_eq!(
        cfg.limits.unwrap().value.idle_timeout,
        Some(Dur(Duration::from_secs(5)))
    );
    let err = parse("c", "limits:\n  idle_timeout: soon\n")
        .unwrap_err()
        .remove(0);
    assert_eq!(err.line, 2, "{err}");
}

#[test]
fn empty_and_comment_only_files_are_empty_configs() {
    assert!(parse("c", "\n# nothing\n").unwrap().backends.is_empty());
    assert!(parse("c", "").unwrap().listen.is_none());
    assert!(
        parse("c", "---\n# nothing yet\n...\n")
            .unwrap()
            .listen
            .is_none()
    );
}

#[test]
fn fragments_merge_backends_and_refuse_a_key_defined_twice() {
    let config = merged(&[
        (
            "main.yaml",
            "backends:\n  a:\n    type: mock\nlimits:\n  idle_timeout: 1s\n",
        ),
        (
            "rules/10-b.yaml",
            "backends:\n  b:\n    type: mock\nmodel_aliases: []\n",
        ),
    ])
    .unwrap();
    assert_eq!(config.backends.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(&*config.backends["b"].file, "rules/10-b.yaml");

    let errors = merged(&[
        (
            "main.yaml",
            "limits:\n  idle_timeout: 1s\nbackends:\n  a:\n    type: mock\n",
        ),
        (
            "rules/20-x.yaml",
            "\nlimits:\n  idle_timeout: 2s\nbackends:\n  a:\n    type: mock\n",
        ),
    ])
    .unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(
        text.iter()
            .any(|t| t
                .starts_with("rules/20-x.yaml:3:3: `limits` is already defined in main.yaml:2")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("`backends.a` is already defined in main.yaml:5")),
        "{text:?}"
    );
}

#[test]
fn only_real_fragments_are_read() {
    let dir = std::env::temp_dir().join(format!("orproxy-frag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "b.yaml",
        "a.yml",
        "c.test.yaml",
        ".hidden.yaml",
        "d.rhai",
        "e.yaml~",
    ] {
        std::fs::write(dir.join(name), "").unwrap();
    }
    let names: Vec<String> = yaml_fragments(&dir)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.yml", "b.yaml"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_relative_rules_dir_is_taken_from_the_config_files_directory() {
    let dir = std::env::temp_dir().join(format!("orproxy-relative-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(dir.join("config.yaml"), "rules_dir: rules\n").unwrap();
    std::fs::write(dir.join("rules/extra.yaml"), "default_backend: mock\n").unwrap();
    let sources = Sources {
        config: Some(dir.join("config.yaml")),
        rules_dir_flag: None,
    };
    let (config, rules_dir) = load(&sources).unwrap();
    assert_eq!(rules_dir, Some(dir.join("rules")));
    assert_eq!(config.default_backend.unwrap().value, "mock");
    // A main config inside its own rules directory is not merged a second time.
    std::fs::write(dir.join("rules/main.yaml"), "listen: 127.0.0.1:9\n").unwrap();
    let sources = Sources {
        config: Some(dir.join("rules/main.yaml")),
        rules_dir_flag: Some(dir.join("rules")),
    };
    assert!(load(&sources).is_ok());
    // A rules directory that cannot be read is reported where the config names it.
    std::fs::write(dir.join("config.yaml"), "rules_dir: nowhere\n").unwrap();
    let sources = Sources {
        config: Some(dir.join("config.yaml")),
        rules_dir_flag: None,
    };
    let errors = load(&sources).unwrap_err();
    let shown = errors[0].to_string();
    assert!(
        shown.contains("config.yaml:1:12: cannot read the rules directory"),
        "{shown}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The committed schema matches the config types; `UPDATE_SCHEMAS=1 cargo test` rewrites it.
#[test]
fn the_committed_schema_is_current() {
    let schema = serde_json::to_string_pretty(&schemars::schema_for!(ConfigFile)).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/config.schema.json");
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &schema).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == schema,
        "schemas/config.schema.json is stale: run `UPDATE_SCHEMAS=1 cargo test -p orproxy --lib config`"
    );
}

/// Every example config in the repository parses.
#[test]
fn the_examples_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut examples = vec![root.join("schemas/config.example.yaml")];
    examples.extend(yaml_fragments(&root.join("rules")).unwrap());
    for path in examples {
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = parse(&path.display().to_string(), &text) {
            panic!("{e:?}");
        }
    }
}

#[test]
fn a_trigger_set_holds_what_it_was_built_from() {
    assert!(Triggers::ALL.iter().eq(Trigger::ALL));
    let set: Triggers = [Trigger::Stream, Trigger::Connect].into_iter().collect();
    assert!(set.iter().eq([Trigger::Connect, Trigger::Stream]));
    assert!(set.contains(&Trigger::Stream) && !set.contains(&Trigger::Timeout));
    assert_eq!((set.len(), Triggers::ALL.len()), (2, 8));
    assert!(std::iter::empty().collect::<Triggers>().is_empty());
}
