//! Hot reload: the rules directory and config file are watched; SIGHUP and the admin API take
//! the same path; an invalid table is never served (SPEC §6).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Daemon, Options, chat, client, temp_dir};

/// A fragment that routes the model `probe` to `mock:<name>`: the route header tells which
/// version of the rules served a request.
fn version(name: &str) -> String {
    format!("model_aliases:\n  - pattern: \"^probe$\"\n    replacement: \"mock:{name}\"\n")
}

/// The same fragment with an unknown key: the whole file is refused.
fn invalid(name: &str) -> String {
    format!("{}bogus_key: 1\n", version(name))
}

async fn probe(daemon: &Daemon) -> String {
    let response = client()
        .post(daemon.url("/v1/chat/completions"))
        .json(&chat("probe", "x", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-orproxy-route"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// Waits until `n` reloads have ended since the daemon started, refused or not.
async fn reloads(daemon: &Daemon, n: usize) {
    wait_until(daemon, n, "reloads", outcomes).await;
}

/// Waits until `count` reaches `n`: log lines reach the test a moment after the daemon wrote them.
async fn wait_until(daemon: &Daemon, n: usize, what: &str, count: fn(&Daemon) -> usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = count(daemon);
        if done >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {n} {what}; logs:\n{}",
            daemon.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reloads ended so far: one refused reload logs one line per error, so they are counted by
/// their outcome lines.
fn outcomes(daemon: &Daemon) -> usize {
    daemon
        .logs()
        .iter()
        .filter(|l| {
            l.contains("\"Routing table reloaded.\"")
                || l.contains("\"Reload refused; the running table is kept.\"")
        })
        .count()
}

fn ok_reloads(daemon: &Daemon) -> usize {
    daemon
        .logs()
        .iter()
        .filter(|l| l.contains("\"Routing table reloaded.\""))
        .count()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn start_with_rules(dir: &Path) -> Daemon {
    Daemon::start(
        Options::default()
            .arg("--rules-dir")
            .arg(&dir.display().to_string()),
    )
}

#[tokio::test]
async fn a_changed_fragment_is_served_and_an_invalid_one_never_is() {
    let dir = temp_dir();
    write(&dir.join("10-route.yaml"), &version("v1"));
    let daemon = start_with_rules(&dir);
    assert_eq!(probe(&daemon).await, "mock:v1");

    write(&dir.join("10-route.yaml"), &version("v2"));
    reloads(&daemon, 1).await;
    assert_eq!(probe(&daemon).await, "mock:v2");
    assert_eq!(daemon.status().await["table_version"], 2);

    write(&dir.join("10-route.yaml"), &invalid("bad"));
    reloads(&daemon, 2).await;
    assert_eq!(
        probe(&daemon).await,
        "mock:v2",
        "the old table keeps serving"
    );
    let status = daemon.status().await;
    assert_eq!(status["last_reload"]["result"], "error");
    assert_eq!(status["table_version"], 2);
    let error = status["last_reload"]["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{}:4:1: ", dir.join("10-route.yaml").display())),
        "{error}"
    );
    assert!(error.contains("bogus_key"), "{error}");
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains("orproxy_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("orproxy_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_key_defined_in_two_files_names_both() {
    let dir = temp_dir();
    write(&dir.join("10-a.yaml"), &version("a"));
    write(&dir.join("20-b.yaml"), &version("b"));
    let output = crate::harness::command()
        .arg("check")
        .arg("--rules-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:2:3: `model_aliases` is already defined in {}:2;",
            dir.join("20-b.yaml").display(),
            dir.join("10-a.yaml").display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn editors_bursts_and_partial_writes_end_in_one_reload_of_the_final_content() {
    let dir = temp_dir();
    write(&dir.join("10-route.yaml"), &version("start"));
    let daemon = start_with_rules(&dir);

    // vim: swap file, backup by rename, write the new file, delete the backup.
    let target = dir.join("10-route.yaml");
    write(&dir.join(".10-route.yaml.swp"), "swap");
    std::fs::rename(&target, dir.join("10-route.yaml~")).unwrap();
    write(&target, &version("vim"));
    std::fs::remove_file(dir.join("10-route.yaml~")).unwrap();
    std::fs::remove_file(dir.join(".10-route.yaml.swp")).unwrap();
    reloads(&daemon, 1).await;
    assert_eq!(probe(&daemon).await, "mock:vim");

    // Write to a temporary name, then rename over the file (atomic save).
    write(&dir.join("10-route.yaml.tmp"), &version("rename"));
    std::fs::rename(dir.join("10-route.yaml.tmp"), &target).unwrap();
    reloads(&daemon, 2).await;
    assert_eq!(probe(&daemon).await, "mock:rename");

    // A burst of 100 writes.
    for i in 0..100 {
        write(&target, &version(&format!("burst{i}")));
    }
    reloads(&daemon, 3).await;
    assert_eq!(probe(&daemon).await, "mock:burst99");

    // A partial write: half a file, then the rest.
    let text = version("partial");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&target)
        .unwrap();
    file.write_all(&text.as_bytes()[..text.len() / 2]).unwrap();
    file.flush().unwrap();
    file.write_all(&text.as_bytes()[text.len() / 2..]).unwrap();
    drop(file);
    reloads(&daemon, 4).await;
    assert_eq!(probe(&daemon).await, "mock:partial");

    // Proving that nothing else follows takes a quiet period: one explicit reload after it
    // must be the fifth, not the sixth.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let response = client()
        .post(daemon.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The answer comes after the swap, but its log line may still be on its way to the test.
    wait_until(&daemon, 5, "successful reloads", ok_reloads).await;
    assert_eq!(ok_reloads(&daemon), 5, "each edit was exactly one reload");
}

/// A FIFO or a device among the rules is refused with its name: reading one would block the
/// reload (and with it every later reload and the shutdown) or never end.
#[tokio::test]
async fn a_fifo_or_a_device_in_the_rules_directory_is_refused_not_read() {
    let dir = temp_dir();
    write(&dir.join("10-route.yaml"), &version("v1"));
    let mut daemon = start_with_rules(&dir);
    let fifo = dir.join("zz.rhai");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let zero = dir.join("20-zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    // The fragments are read first, then the scripts.
    for (name, remove) in [("20-zero.yaml", &zero), ("zz.rhai", &fifo)] {
        let outcome = daemon.reload().await;
        assert_eq!(outcome["result"], "error", "{outcome}");
        let errors = outcome["errors"].to_string();
        assert!(
            errors.contains(&format!("{name}: cannot read: not a regular file")),
            "{errors}"
        );
        assert_eq!(probe(&daemon).await, "mock:v1");
        std::fs::remove_file(remove).unwrap();
    }

    // Once they are gone, reloads work again, and SIGTERM still ends the daemon.
    write(&dir.join("10-route.yaml"), &version("v2"));
    wait_until(&daemon, 1, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:v2");
    daemon.terminate();
    assert!(daemon.wait_exit().success());
}

#[tokio::test]
async fn sighup_and_the_admin_api_reload_the_config_file() {
    let dir = temp_dir();
    let config = dir.join("config.yaml");
    write(&config, &version("first"));
    let daemon = Daemon::start(
        Options::default()
            .arg("--config")
            .arg(&config.display().to_string())
            .arg("--rules-dir")
            .arg(&temp_dir().display().to_string()),
    );
    assert_eq!(probe(&daemon).await, "mock:first");

    write(&config, &version("watched"));
    reloads(&daemon, 1).await;
    assert_eq!(probe(&daemon).await, "mock:watched");

    daemon.signal("HUP");
    reloads(&daemon, 2).await;
    assert!(
        daemon
            .logs()
            .iter()
            .any(|l| l.contains("SIGHUP: reloading."))
    );

    let response = client()
        .post(daemon.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(outcome["result"], "ok");
    assert_eq!(outcome["reason"], "admin");
    assert_eq!(outcome["version"], 4);
}

#[tokio::test]
async fn a_config_named_relative_to_the_working_directory_is_watched() {
    let dir = temp_dir();
    write(&dir.join("config.yaml"), &version("first"));
    let daemon = Daemon::start(
        Options::default()
            .cwd(&dir)
            .arg("--config")
            .arg("config.yaml")
            .arg("--rules-dir")
            .arg(&temp_dir().display().to_string()),
    );
    assert_eq!(probe(&daemon).await, "mock:first");
    write(&dir.join("config.yaml"), &version("watched"));
    reloads(&daemon, 1).await;
    assert_eq!(probe(&daemon).await, "mock:watched");
}

#[tokio::test]
async fn restart_only_settings_are_refused_with_a_clear_message() {
    let dir = temp_dir();
    let config = dir.join("config.yaml");
    write(&config, "limits:\n  connect_timeout: 5s\n");
    let daemon = Daemon::start(
        Options::default()
            .arg("--config")
            .arg(&config.display().to_string()),
    );
    write(&config, "limits:\n  connect_timeout: 9s\n");
    let response = client()
        .post(daemon.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let outcome: Value = response.json().await.unwrap();
    let error = outcome["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "{}:2:20: limits.connect_timeout cannot change at runtime: restart orproxy to apply",
            config.display()
        )),
        "{error}"
    );

    // The watcher is set up once: a new rules directory needs a restart too.
    let rules = temp_dir();
    write(
        &config,
        &format!(
            "limits:\n  connect_timeout: 5s\nrules_dir: {}\n",
            rules.display()
        ),
    );
    let response = client()
        .post(daemon.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let outcome: Value = response.json().await.unwrap();
    let error = outcome["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{}:3:12: rules_dir (", config.display()))
            && error.contains("cannot change at runtime"),
        "{error}"
    );
}

/// 200 requests per second for 10 seconds while the rules are rewritten 20 times, half of the
/// versions invalid: no request fails, every valid version serves, no invalid one ever does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing() {
    let dir = temp_dir();
    let target = dir.join("10-route.yaml");
    write(&target, &version("v0"));
    let daemon = start_with_rules(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let url = daemon.url("/v1/chat/completions");
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let http = client();
            let mut ticker = tokio::time::interval(Duration::from_millis(5));
            let mut inflight = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let request = http.post(&url).json(&chat("probe", "x", false)).send();
                inflight.spawn(async move {
                    let response = request.await.map_err(|e| e.to_string())?;
                    if response.status() != 200 {
                        return Err(format!("status {}", response.status()));
                    }
                    Ok(response.headers()["x-orproxy-route"]
                        .to_str()
                        .unwrap_or_default()
                        .to_owned())
                });
            }
            inflight.join_all().await
        })
    };
    let started = std::time::Instant::now();
    let mut expected_reloads = 0;
    for round in 1..=20 {
        expected_reloads += 1;
        if round % 2 == 0 {
            write(&target, &invalid(&format!("bad{round}")));
            reloads(&daemon, expected_reloads).await;
        } else {
            write(&target, &version(&format!("v{round}")));
            reloads(&daemon, expected_reloads).await;
            // Keep this version until the load has seen it.
            let wanted = format!("mock:v{round}");
            while probe(&daemon).await != wanted {
                tokio::task::yield_now().await;
            }
        }
        // Spread the 20 rewrites over about ten seconds of load.
        let due = Duration::from_millis(500 * round);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let results = load.await.unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(results.len() >= 1500, "only {} requests", results.len());
    let routes: std::collections::HashSet<&str> =
        results.iter().filter_map(|r| r.as_deref().ok()).collect();
    for round in (1..=20).step_by(2) {
        assert!(
            routes.contains(format!("mock:v{round}").as_str()),
            "v{round} never served: {routes:?}"
        );
    }
    assert!(
        routes.iter().all(|r| !r.contains("bad")),
        "an invalid version served: {routes:?}"
    );
}

/// Starts a daemon on `config` with an empty rules directory of its own.
fn start_with_config(config: &Path) -> Daemon {
    Daemon::start(
        Options::default()
            .arg("--config")
            .arg(&config.display().to_string())
            .arg("--rules-dir")
            .arg(&temp_dir().display().to_string()),
    )
}

#[cfg(unix)]
#[tokio::test]
async fn a_config_linked_from_another_directory_is_watched_through_the_link() {
    use std::os::unix::fs::symlink;
    let (here, there) = (temp_dir(), temp_dir());
    write(&there.join("real.yaml"), &version("first"));
    let config = here.join("config.yaml");
    symlink(there.join("real.yaml"), &config).unwrap();
    let daemon = start_with_config(&config);
    assert_eq!(probe(&daemon).await, "mock:first");

    // Edited in place, then saved by rename, in the target's directory.
    write(&there.join("real.yaml"), &version("edited"));
    wait_until(&daemon, 1, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:edited");
    write(&there.join("real.yaml.tmp"), &version("renamed"));
    std::fs::rename(there.join("real.yaml.tmp"), there.join("real.yaml")).unwrap();
    wait_until(&daemon, 2, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:renamed");

    // The link re-pointed to a file in a third directory: that one is watched from then on.
    let third = temp_dir();
    write(&third.join("other.yaml"), &version("relinked"));
    symlink(third.join("other.yaml"), here.join("config.yaml.new")).unwrap();
    std::fs::rename(here.join("config.yaml.new"), &config).unwrap();
    wait_until(&daemon, 3, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:relinked");
    write(&third.join("other.yaml"), &version("third"));
    wait_until(&daemon, 4, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:third");
}

/// Writes a new ConfigMap version the way the kubelet does: a fresh directory, a new `..data`
/// link renamed over the old one, then the old directory removed.
#[cfg(unix)]
fn configmap_update(mount: &Path, old: &str, new: &str, text: &str) {
    let dir = mount.join(new);
    std::fs::create_dir(&dir).unwrap();
    write(&dir.join("config.yaml"), text);
    std::os::unix::fs::symlink(new, mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join(old)).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_configmap_update_is_one_reload() {
    use std::os::unix::fs::symlink;
    let mount = temp_dir();
    std::fs::create_dir(mount.join("..2026_11_24_v1")).unwrap();
    write(
        &mount.join("..2026_11_24_v1/config.yaml"),
        &version("first"),
    );
    symlink("..2026_11_24_v1", mount.join("..data")).unwrap();
    symlink("..data/config.yaml", mount.join("config.yaml")).unwrap();
    let daemon = start_with_config(&mount.join("config.yaml"));
    assert_eq!(probe(&daemon).await, "mock:first");

    configmap_update(
        &mount,
        "..2026_11_24_v1",
        "..2026_11_24_v2",
        &version("second"),
    );
    wait_until(&daemon, 1, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:second");

    // The new version's directory is followed: a second update is seen too.
    configmap_update(
        &mount,
        "..2026_11_24_v2",
        "..2026_11_24_v3",
        &version("third"),
    );
    wait_until(&daemon, 2, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:third");
    assert_eq!(outcomes(&daemon), 2, "each update is one reload");
}

/// A rule file linked from another directory (as configuration tools deploy them) is watched
/// where it lives: editing it there reloads.
#[cfg(unix)]
#[tokio::test]
async fn a_rules_file_linked_from_elsewhere_reloads_when_edited_there() {
    let rules = temp_dir();
    let elsewhere = temp_dir();
    write(&elsewhere.join("route.yaml"), &version("first"));
    std::os::unix::fs::symlink(elsewhere.join("route.yaml"), rules.join("10-route.yaml")).unwrap();
    let daemon = start_with_rules(&rules);
    assert_eq!(probe(&daemon).await, "mock:first");

    write(&elsewhere.join("route.yaml"), &version("edited"));
    wait_until(&daemon, 1, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:edited");
}

#[tokio::test]
async fn a_replaced_rules_directory_is_watched_again() {
    let parent = temp_dir();
    let rules = parent.join("rules");
    std::fs::create_dir(&rules).unwrap();
    write(&rules.join("10-route.yaml"), &version("first"));
    let daemon = start_with_rules(&rules);
    assert_eq!(probe(&daemon).await, "mock:first");

    // mv rules rules.old; mkdir rules; cp ...
    std::fs::rename(&rules, parent.join("rules.old")).unwrap();
    std::fs::create_dir(&rules).unwrap();
    write(&rules.join("10-route.yaml"), &version("replaced"));
    wait_until(&daemon, 1, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:replaced");

    // The new directory is the one watched now.
    write(&rules.join("10-route.yaml"), &version("edited"));
    wait_until(&daemon, 2, "successful reloads", ok_reloads).await;
    assert_eq!(probe(&daemon).await, "mock:edited");
}
