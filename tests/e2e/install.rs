//! The install script stages a complete service; the unit verifies; uninstall cleans up.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{binary, temp_dir};

fn install(destdir: &Path, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(root.join("systemd/install.sh"))
        .args(args)
        .env("DESTDIR", destdir)
        .env("ORPROXY_BIN", binary())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn install_verify_and_uninstall() {
    let dest = temp_dir();
    install(&dest, &[]);
    let unit = dest.join("usr/lib/systemd/system/orproxy.service");
    assert_eq!(mode(&dest.join("usr/bin/orproxy")), 0o755);
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(
        mode(&dest.join("etc/orproxy/env")),
        0o600,
        "keys readable by root only"
    );
    assert_eq!(mode(&dest.join("etc/orproxy/config.yaml")), 0o640);
    assert!(dest.join("etc/orproxy/rules").is_dir());
    assert!(dest.join("usr/lib/sysusers.d/orproxy.conf").is_file());
    assert!(dest.join("usr/share/orproxy/config.schema.json").is_file());
    assert!(
        dest.join("usr/share/orproxy/examples/rules/10-gpt-via-openrouter.rhai")
            .is_file()
    );

    // The unit as systemd would read it, pointed at the staged binary.
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=kill -HUP $MAINPID",
        "StateDirectory=orproxy",
        "ConfigurationDirectory=orproxy",
        "User=orproxy",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}");
    }
    let verify_dir = temp_dir();
    let staged = verify_dir.join("orproxy.service");
    std::fs::write(
        &staged,
        text.replace(
            "/usr/bin/orproxy",
            &dest.join("usr/bin/orproxy").display().to_string(),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&staged)
        .output()
        .expect("systemd-analyze is needed to verify the unit (.ci/run installs it)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The shipped config is valid as installed.
    let check = Command::new(dest.join("usr/bin/orproxy"))
        .args(["check", "--config"])
        .arg(dest.join("etc/orproxy/config.yaml"))
        .args(["--rules-dir"])
        .arg(dest.join("etc/orproxy/rules"))
        .env_remove("OPENROUTER_API_KEY")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // A second install keeps the operator's config.
    std::fs::write(
        dest.join("etc/orproxy/config.yaml"),
        "listen: 127.0.0.1:9999\n",
    )
    .unwrap();
    install(&dest, &[]);
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/orproxy/config.yaml")).unwrap(),
        "listen: 127.0.0.1:9999\n"
    );

    install(&dest, &["--uninstall"]);
    assert!(!dest.join("usr/bin/orproxy").exists() && !unit.exists());
    assert!(
        dest.join("etc/orproxy/config.yaml").exists(),
        "configuration is kept"
    );
    install(&dest, &["--uninstall", "--purge"]);
    assert!(!dest.join("etc/orproxy").exists());
}
