//! The command line: exit codes, `check`, and validation before binding.

use std::path::Path;
use std::process::Output;

use crate::harness::{Daemon, Options, command, temp_file};

/// `orproxy check --config CONFIG`.
fn check(config: &Path) -> Output {
    command()
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn check_prints_every_error_with_its_place() {
    let config = temp_file(
        "backends:\n  a:\n    type: nope\n  b:\n    type: openai\n    api_key_env: ORPROXY_E2E_UNSET\ndefault_backend: zzz\n",
        ".yaml",
    );
    let output = check(&config);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = config.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "{name}:3:5: backend `a`: unknown backend type `nope`"
        )),
        "{stderr}"
    );
    assert!(
        lines[1].contains("ORPROXY_E2E_UNSET is not set"),
        "{stderr}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{name}:7:18: default_backend: unknown backend `zzz`"
        )),
        "{stderr}"
    );
}

#[test]
fn check_accepts_a_good_config_and_the_seed_example() {
    let config = temp_file(
        "backends:\n  local:\n    type: openai\n    base_url: http://127.0.0.1:11434/v1\ndefault_backend: local\nidentity:\n  user_agent: { mode: override, override_value: \"MyApp/1.0.0\" }\n",
        ".yaml",
    );
    let output = check(&config);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn unknown_keys_and_broken_yaml_stop_the_daemon_before_it_binds() {
    let config = temp_file("listen: 127.0.0.1:0\nlimts:\n  idle_timeout: 1s\n", ".yaml");
    let output = command().arg("--config").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:2:1:", config.display())),
        "{stderr}"
    );
    assert!(stderr.contains("limts"), "{stderr}");
    assert!(!stderr.contains("Ready."));

    let broken = temp_file("backends: [\n", ".yaml");
    let output = check(&broken);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&broken.display().to_string()));
}

#[test]
fn usage_errors_exit_2() {
    let output = command().arg("--no-such-flag").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = command().args(["--log-format", "xml"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    for (flag, value) in [
        ("--listen", "nonsense"),
        ("--listen", "127.0.0.1:99999"),
        ("--admin-listen", "bad"),
        ("--force-model", "mock:x?temperature=7"),
    ] {
        let output = command().args([flag, value]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{stderr}");
        assert!(stderr.contains("invalid value"), "{stderr}");
    }
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let output = command()
        .args(["--config", "/nonexistent/orproxy.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("/nonexistent/orproxy.yaml: cannot read config")
    );
}

#[test]
fn a_busy_port_is_a_runtime_error() {
    let daemon = Daemon::start(Options::default());
    let output = command()
        .args([
            "--listen",
            &daemon.addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains(&format!("cannot listen on {}", daemon.addr))
    );
}

/// Script errors are reported with the YAML's, not only once the YAML is fixed.
#[test]
fn check_prints_every_unknown_key_of_every_file_and_every_script_error() {
    let config = temp_file(
        "lisen: 127.0.0.1:0\nbackends:\n  a:\n    type: mock\n    modles: [x]\nlimits:\n  idle_timeout: 1s\n  idel: 2s\n",
        ".yaml",
    );
    let rules = crate::harness::temp_dir();
    std::fs::write(
        rules.join("10-a.yaml"),
        "model_aliases:\n  - pattern: x\n    replacment: y\nbogus: 1\n",
    )
    .unwrap();
    std::fs::write(
        rules.join("20-broken.rhai"),
        "fn on_request(req) {\n    let x = ;\n}\n",
    )
    .unwrap();
    let output = command()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .arg("--rules-dir")
        .arg(&rules)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let (name, fragment) = (
        config.display().to_string(),
        rules.join("10-a.yaml").display().to_string(),
    );
    let expected = [
        format!("{name}:1:1: unknown field `lisen`"),
        format!("{name}:5:5: unknown field `modles`"),
        format!("{name}:8:3: unknown field `idel`"),
        format!("{fragment}:3:5: unknown field `replacment`"),
        format!("{fragment}:4:1: unknown field `bogus`"),
        format!("{}:2:13: ", rules.join("20-broken.rhai").display()),
    ];
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, start) in lines.iter().zip(&expected) {
        assert!(line.starts_with(start.as_str()), "{stderr}");
    }
}

#[test]
fn a_key_that_cannot_be_sent_in_a_header_is_refused_at_load() {
    let config = temp_file(
        "backends:\n  up:\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n    api_key_env: ORPROXY_E2E_BAD_KEY\ndefault_backend: up\n",
        ".yaml",
    );
    // `check`, start and reload all validate through the same build.
    let output = command()
        .args(["check", "--config"])
        .arg(&config)
        .env("ORPROXY_E2E_BAD_KEY", "sk-upstream-secret\ntrailing")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:3:5: backend `up`: environment variable ORPROXY_E2E_BAD_KEY holds a character that cannot be sent in an HTTP header",
            config.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-upstream-secret"), "{stderr}");
}

#[test]
fn a_retention_shorter_than_a_day_or_a_duration_past_a_century_is_refused() {
    // A bare number is seconds: 90 would delete every row older than a minute and a half.
    for (yaml, expected) in [
        (
            "database:\n  retention: 90\n",
            "2:3: database.retention: 90s is too short (at least 1d",
        ),
        (
            "limits:\n  idle_timeout: 1e30\n",
            "too long (at most 36500d)",
        ),
    ] {
        let output = check(&temp_file(yaml, ".yaml"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// Each of these limits at 0 would fail every request.
#[test]
fn a_zero_limit_is_refused_at_its_place() {
    for key in [
        "max_body_bytes",
        "max_response_bytes",
        "connect_timeout",
        "first_byte_timeout",
        "idle_timeout",
        "total_timeout",
        "client_timeout",
    ] {
        let config = temp_file(&format!("limits:\n  {key}: 0\n"), ".yaml");
        let output = check(&config);
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!(
                "{}:2:3: limits.{key}: must be more than 0",
                config.display()
            )),
            "{stderr}"
        );
    }
}

/// Polling longer than the wake-ups it saves is refused; 0 turns it off.
#[test]
fn idle_poll_is_bounded() {
    let (code, stderr) = check_with("limits:\n  idle_poll: 5ms\n", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(".yaml:2:3: limits.idle_poll: at most 1ms (0 turns it off)"),
        "{stderr}"
    );
    for ok in ["0", "1ms", "250us"] {
        let (code, stderr) = check_with(&format!("limits:\n  idle_poll: {ok}\n"), &[]);
        assert_eq!(code, Some(0), "{ok}: {stderr}");
    }
}

/// `orproxy check` on `yaml`, with `vars` set: its exit code and stderr.
fn check_with(yaml: &str, vars: &[(&str, &std::ffi::OsStr)]) -> (Option<i32>, String) {
    let mut cmd = command();
    cmd.arg("check")
        .arg("--config")
        .arg(temp_file(yaml, ".yaml"));
    for (name, value) in vars {
        cmd.env(name, value);
    }
    let output = cmd.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn base_url_credentials_are_refused_and_never_echoed() {
    for (base_url, expected) in [
        (
            "http://user:SEC/RETPW@a b/",
            "base_url `http://***@a b/` must be",
        ),
        (
            "http://u:SEC?RETPW@a b/",
            "base_url `http://***@a b/` must be",
        ),
        (
            "http://user:SECRETPW@127.0.0.1:1/v1",
            "3:5: backend `a`: base_url must not hold a user name or password (they would not be sent): name the environment variable holding the key in api_key_env",
        ),
        (
            "http://u:SEC#RETPW@127.0.0.1:1/api/v1",
            "backend `a`: base_url must not have a fragment",
        ),
        (
            "http://127.0.0.1:99999/v1",
            "backend `a`: base_url's port must be a number from 1 to 65535",
        ),
    ] {
        let yaml = format!("backends:\n  a:\n    type: openai\n    base_url: \"{base_url}\"\n");
        let (code, stderr) = check_with(&yaml, &[]);
        assert_eq!(code, Some(1), "{base_url}: {stderr}");
        assert!(stderr.contains(expected), "{base_url}: {stderr}");
        assert!(!stderr.contains("SEC"), "{base_url}: {stderr}");
        assert!(!stderr.contains("RETPW"), "{base_url}: {stderr}");
    }
}

#[test]
fn keys_and_tokens_outside_visible_ascii_are_refused_by_variable_name() {
    use std::os::unix::ffi::OsStrExt;

    let non_ascii = std::ffi::OsStr::new("k\u{e9}y-SECRET");
    let not_utf8 = std::ffi::OsStr::from_bytes(b"k\xffy-SECRET");
    for (yaml, value, expected) in [
        (
            "auth:\n  keys: [{name: t, key_env: KK}]\n",
            non_ascii,
            "auth key `t`: environment variable KK holds a character that cannot be sent in an HTTP header",
        ),
        (
            "admin:\n  token_env: KK\n",
            non_ascii,
            "admin.token_env: environment variable KK holds a character that cannot be sent in an HTTP header",
        ),
        (
            "backends:\n  a:\n    type: openai\n    api_key_env: KK\n",
            non_ascii,
            "backend `a`: environment variable KK holds a character that cannot be sent in an HTTP header",
        ),
        (
            "auth:\n  keys: [{name: t, key_env: KK}]\n",
            not_utf8,
            "auth key `t`: environment variable KK is not valid UTF-8",
        ),
    ] {
        let (code, stderr) = check_with(yaml, &[("KK", value)]);
        assert_eq!(code, Some(1), "{yaml}: {stderr}");
        assert!(stderr.contains(expected), "{yaml}: {stderr}");
        assert!(!stderr.contains("SECRET"), "{yaml}: {stderr}");
    }
}

#[test]
fn configs_that_would_fail_every_request_or_the_start_are_refused_at_load() {
    let chain: Vec<String> = (0..21).map(|i| format!("mock:m{i}")).collect();
    for (yaml, expected) in [
        (
            "backends:\n  \"my\\\"model\\n\":\n    type: openai\n".to_owned(),
            "2:3: backend name `my\\\"model\\n` may hold only ASCII letters, digits, `_`, `-` and `.`".to_owned(),
        ),
        (
            "listen: 127.0.0.1:8100\nadmin:\n  listen: 127.0.0.1:8100\n".to_owned(),
            "3:11: admin.listen 127.0.0.1:8100 and listen 127.0.0.1:8100 cannot both be bound".to_owned(),
        ),
        (
            format!("failover:\n  - match: x\n    chain: [{}]\n", chain.join(", ")),
            "2:5: failover: the chain has 21 targets; with the request's own that is more than the 16 one request may try".to_owned(),
        ),
        (
            "model_aliases:\n  - { pattern: \"^gpt(-.*)\", replacement: \"mock:$1a\" }\n".to_owned(),
            "2:5: model_aliases: replacement `mock:$1a`: `$1a` refers to a group named `1a`".to_owned(),
        ),
    ] {
        let (code, stderr) = check_with(&yaml, &[]);
        assert_eq!(code, Some(1), "{yaml}: {stderr}");
        assert!(stderr.contains(&expected), "{yaml}: {stderr}");
    }
}
