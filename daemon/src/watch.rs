//! Watches the config file and the rules directory, and turns bursts of file events into one
//! reload once the files have been quiet for [`QUIET`].
//!
//! Directories are watched rather than files: editors replace files by renaming a temporary
//! over them, which would silently end a watch on the file itself. Which directories depends
//! on where the files really are, so it is worked out again after every relevant event:
//!
//! - the config file's own directory, and the directory of every symlink on the way to its
//!   target and of the target itself (a config linked from elsewhere, or a Kubernetes
//!   ConfigMap, where `config.yaml -> ..data/config.yaml` and an update swaps `..data`);
//! - the rules directory, and its parent, which sees the directory itself being replaced;
//! - for each rule file that is a symlink, the directories of the links on its way and of its
//!   target (a file linked from elsewhere and edited there, or a ConfigMap's `..data`).

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::reload::{Reason, Request};

/// How long the watched files must stay unchanged before a reload.
pub const QUIET: Duration = Duration::from_millis(300);

/// Symlinks followed when resolving a path, as the kernel's own limit (`ELOOP`).
const MAX_HOPS: usize = 40;

/// What to watch.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The main config file.
    pub config: Option<PathBuf>,
    /// The rules directory.
    pub rules_dir: Option<PathBuf>,
}

/// Where the watched paths lead now; worked out again after every relevant event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Layout {
    /// The config file as named, every symlink met on the way to its target, and the target:
    /// a change to any of them changes what the config says.
    config_paths: Vec<PathBuf>,
    /// The symlinks the rules directory's files resolve through (`..data`, or links
    /// elsewhere) and their targets: a change to any of them changes what a rule file says.
    rules_links: Vec<PathBuf>,
    /// The directories to watch (each non-recursively), most specific first.
    dirs: Vec<PathBuf>,
}

impl Layout {
    /// Resolves the watched paths as they are on disk now.
    fn resolve(watched: &Watched) -> Layout {
        let mut layout = Layout::default();
        if let Some(config) = &watched.config {
            let (links, target) = symlink_chain(config);
            push_unique(&mut layout.config_paths, config.clone());
            for path in links.into_iter().chain([target]) {
                push_unique(&mut layout.config_paths, path);
            }
            for path in &layout.config_paths {
                if let Some(dir) = path.parent() {
                    push_unique(&mut layout.dirs, dir.to_owned());
                }
            }
        }
        if let Some(rules) = &watched.rules_dir {
            push_unique(&mut layout.dirs, rules.clone());
            // The parent sees the rules directory itself being created, renamed or removed.
            if let Some(parent) = rules.parent().filter(|p| !p.as_os_str().is_empty()) {
                push_unique(&mut layout.dirs, parent.to_owned());
            }
            let entries = std::fs::read_dir(rules).into_iter().flatten().flatten();
            for entry in entries {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_symlink()) || !is_rules_file(&path) {
                    continue;
                }
                let (links, target) = symlink_chain(&path);
                for link in links.into_iter().chain([target]) {
                    if link != path {
                        if let Some(dir) = link.parent() {
                            push_unique(&mut layout.dirs, dir.to_owned());
                        }
                        push_unique(&mut layout.rules_links, link);
                    }
                }
            }
        }
        layout
    }

    /// Whether a changed path can affect the routing table.
    fn relevant(&self, watched: &Watched, path: &Path) -> bool {
        if self.config_paths.iter().any(|p| p == path) || self.rules_links.iter().any(|p| p == path)
        {
            return true;
        }
        let Some(rules) = &watched.rules_dir else {
            return false;
        };
        // The directory itself: replaced, renamed or removed.
        path == rules || (path.parent() == Some(rules.as_path()) && is_rules_file(path))
    }
}

fn push_unique(paths: &mut Vec<PathBuf>, path: PathBuf) {
    if !paths.contains(&path) {
        paths.push(path);
    }
}

/// Whether a file of the rules directory is one the table is built from.
fn is_rules_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.')
        && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".rhai"))
        && !name.ends_with(".test.yaml")
        && !name.ends_with(".test.yml")
}

/// The symlinks met while resolving the absolute `path` (each named by its own path) and the
/// path they lead to. Links in any component count, so `config.yaml -> ..data/config.yaml`
/// with `..data -> ..2026_11_24/` yields both links and `..2026_11_24/config.yaml`. A path that
/// does not exist resolves as far as it can.
fn symlink_chain(path: &Path) -> (Vec<PathBuf>, PathBuf) {
    let mut links = Vec::new();
    let mut current = path.to_owned();
    'hops: for _ in 0..MAX_HOPS {
        let components: Vec<Component<'_>> = current.components().collect();
        // Every prefix is free of symlinks when the next component is added, so `..` can be
        // applied to it as text.
        let mut prefix = PathBuf::new();
        for (i, component) in components.iter().enumerate() {
            match component {
                Component::ParentDir => {
                    prefix.pop();
                    continue;
                }
                Component::CurDir => continue,
                Component::Normal(_) => prefix.push(component),
                Component::RootDir | Component::Prefix(_) => {
                    prefix.push(component);
                    continue;
                }
            }
            if let Ok(target) = std::fs::read_link(&prefix) {
                links.push(prefix.clone());
                let mut next = prefix.parent().unwrap_or(Path::new("/")).join(target);
                next.extend(&components[i + 1..]);
                current = next;
                continue 'hops;
            }
        }
        return (links, prefix);
    }
    (links, current)
}

/// What a watched directory path named when it was watched: a replaced directory (same path,
/// another directory) must be watched again.
#[cfg(unix)]
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .filter(std::fs::Metadata::is_dir)
        .map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn identity(path: &Path) -> Option<(u64, u64)> {
    path.is_dir().then_some((0, 0))
}

/// The watcher and the directories it watches.
struct Watching {
    watcher: RecommendedWatcher,
    dirs: Vec<(PathBuf, (u64, u64))>,
}

impl Watching {
    /// Watches exactly `wanted` (those that exist), each directory once even when several
    /// paths name it: one inotify watch per directory, whatever the path.
    fn sync(&mut self, wanted: &[PathBuf]) -> Vec<notify::Error> {
        let mut errors = Vec::new();
        let watcher = &mut self.watcher;
        self.dirs.retain(|(dir, id)| {
            let keep = wanted.contains(dir) && identity(dir) == Some(*id);
            if !keep {
                // Already gone when the directory was removed or renamed: nothing to undo.
                let _ = watcher.unwatch(dir);
            }
            keep
        });
        let mut ids: HashSet<(u64, u64)> = self.dirs.iter().map(|(_, id)| *id).collect();
        for dir in wanted {
            if self.dirs.iter().any(|(d, _)| d == dir) {
                continue;
            }
            let Some(id) = identity(dir) else { continue };
            if !ids.insert(id) {
                continue;
            }
            match watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.dirs.push((dir.clone(), id)),
                Err(error) => errors.push(error),
            }
        }
        errors
    }
}

enum Message {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// Keeps the watch running; dropping it stops the watch.
pub struct Watch {
    stop: std_mpsc::Sender<Message>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
    }
}

/// Starts watching; the returned [`Watch`] must be kept alive.
pub fn start(watched: Watched, reloads: mpsc::Sender<Request>) -> notify::Result<Watch> {
    // notify reports paths below the directory watched: with absolute ones, a relative
    // `--config config.yaml` still matches the `./config.yaml` of an event.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let watched = Watched {
        config: watched.config.map(absolute),
        rules_dir: watched.rules_dir.map(absolute),
    };
    let (messages_tx, messages) = std_mpsc::channel();
    let events = messages_tx.clone();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = events.send(Message::Event(event));
    })?;
    let mut watching = Watching {
        watcher,
        dirs: Vec::new(),
    };
    let layout = Layout::resolve(&watched);
    if let Some(error) = watching.sync(&layout.dirs).into_iter().next() {
        return Err(error);
    }
    let (changes_tx, changes_rx) = mpsc::channel::<()>(1024);
    // Watches can only be changed outside notify's own event handler (it would wait on
    // itself), and resolving paths is blocking work: a thread of its own does both.
    std::thread::Builder::new()
        .name("orproxy-watch".into())
        .spawn(move || follow(&watched, layout, watching, &messages, &changes_tx))
        .map_err(notify::Error::io)?;
    tokio::spawn(debounce(changes_rx, reloads));
    Ok(Watch { stop: messages_tx })
}

/// Handles file events until stopped: a relevant one re-resolves the layout, moves the
/// watches where the files now are, and counts as a change.
fn follow(
    watched: &Watched,
    mut layout: Layout,
    mut watching: Watching,
    messages: &std_mpsc::Receiver<Message>,
    changes: &mpsc::Sender<()>,
) {
    while let Ok(Message::Event(event)) = messages.recv() {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(message = "File watcher error.", %error);
                continue;
            }
        };
        // After an event queue overflow anything may have changed.
        let relevant = event.need_rescan()
            || (changes_content(&event.kind)
                && event.paths.iter().any(|p| layout.relevant(watched, p)));
        if !relevant {
            continue;
        }
        tracing::debug!(message = "Watched file changed.", kind = ?event.kind, paths = ?event.paths);
        let resolved = Layout::resolve(watched);
        for error in watching.sync(&resolved.dirs) {
            tracing::warn!(message = "Cannot watch a configuration directory; reload with SIGHUP or POST /admin/reload.", %error);
        }
        layout = resolved;
        // A full channel already holds a pending reload: dropping this one loses nothing.
        let _ = changes.try_send(());
    }
}

/// Whether an event can change what a file says. Opens and reads are not changes: counting
/// them would make every reload (which reads the files) trigger the next one.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// One reload per quiet period, however many events came before it.
async fn debounce(mut events: mpsc::Receiver<()>, reloads: mpsc::Sender<Request>) {
    while events.recv().await.is_some() {
        loop {
            match tokio::time::timeout(QUIET, events.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_quiet) => break,
            }
        }
        if reloads
            .send(Request {
                reason: Reason::Watch,
                reply: None,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("orproxy-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_routing_files_are_relevant() {
        let w = Watched {
            config: Some("/etc/orproxy/config.yaml".into()),
            rules_dir: Some("/etc/orproxy/rules".into()),
        };
        let layout = Layout::resolve(&w);
        let relevant = |p: &str| layout.relevant(&w, Path::new(p));
        assert!(relevant("/etc/orproxy/config.yaml"));
        assert!(relevant("/etc/orproxy/rules/10-team.yaml"));
        assert!(relevant("/etc/orproxy/rules/route.rhai"));
        assert!(relevant("/etc/orproxy/rules"), "the directory replaced");
        assert!(!relevant("/etc/orproxy/rules/route.test.yaml"));
        assert!(!relevant("/etc/orproxy/rules/.10-team.yaml.swp"));
        assert!(!relevant("/etc/orproxy/env"));
        assert!(!relevant("/etc/orproxy/rules/sub/x.yaml"));
        assert_eq!(
            layout.dirs,
            [PathBuf::from("/etc/orproxy"), "/etc/orproxy/rules".into(),]
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_followed_to_the_directories_that_hold_the_targets() {
        use std::os::unix::fs::symlink;
        let root = scratch("chain");
        // A ConfigMap: config.yaml -> ..data/config.yaml, ..data -> ..v1/.
        let mount = root.join("mount");
        std::fs::create_dir_all(mount.join("..v1")).unwrap();
        std::fs::write(mount.join("..v1/config.yaml"), "").unwrap();
        symlink("..v1", mount.join("..data")).unwrap();
        symlink("..data/config.yaml", mount.join("config.yaml")).unwrap();
        // Rules from a ConfigMap too, and a config linked from another directory.
        let rules = root.join("rules");
        std::fs::create_dir_all(rules.join("..r1")).unwrap();
        std::fs::write(rules.join("..r1/10.yaml"), "").unwrap();
        symlink("..r1", rules.join("..data")).unwrap();
        symlink("..data/10.yaml", rules.join("10.yaml")).unwrap();

        let w = Watched {
            config: Some(mount.join("config.yaml")),
            rules_dir: Some(rules.clone()),
        };
        let layout = Layout::resolve(&w);
        assert_eq!(
            layout.config_paths,
            [
                mount.join("config.yaml"),
                mount.join("..data"),
                mount.join("..v1/config.yaml"),
            ]
        );
        assert_eq!(
            layout.rules_links,
            [rules.join("..data"), rules.join("..r1/10.yaml")]
        );
        assert_eq!(
            layout.dirs,
            [
                mount.clone(),
                mount.join("..v1"),
                rules.clone(),
                root.clone(),
                rules.join("..r1"),
            ]
        );
        assert!(layout.relevant(&w, &rules.join("..r1/10.yaml")));
        assert!(layout.relevant(&w, &mount.join("..data")));
        assert!(layout.relevant(&w, &rules.join("..data")));
        assert!(!layout.relevant(&w, &mount.join("..data_tmp")));

        // The update swaps `..data`: the target moves to `..v2`.
        std::fs::create_dir_all(mount.join("..v2")).unwrap();
        std::fs::write(mount.join("..v2/config.yaml"), "").unwrap();
        symlink("..v2", mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        let layout = Layout::resolve(&w);
        assert_eq!(layout.config_paths[2], mount.join("..v2/config.yaml"));
        assert!(layout.dirs.contains(&mount.join("..v2")));

        // An absolute link elsewhere, through `..` in the link text.
        let elsewhere = root.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("real.yaml"), "").unwrap();
        symlink("../elsewhere/real.yaml", mount.join("linked.yaml")).unwrap();
        let (links, target) = symlink_chain(&mount.join("linked.yaml"));
        assert_eq!(links, [mount.join("linked.yaml")]);
        assert_eq!(target, elsewhere.join("real.yaml"));

        // A loop ends.
        symlink("loop-b", root.join("loop-a")).unwrap();
        symlink("loop-a", root.join("loop-b")).unwrap();
        let (links, _) = symlink_chain(&root.join("loop-a"));
        assert_eq!(links.len(), MAX_HOPS);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_events_is_one_reload() {
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (reload_tx, mut reload_rx) = mpsc::channel(8);
        tokio::spawn(debounce(events_rx, reload_tx));
        for _ in 0..100 {
            events_tx.send(()).await.unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(
            reload_rx.try_recv().is_err(),
            "no reload while events keep coming"
        );
        tokio::time::advance(QUIET).await;
        assert_eq!(reload_rx.recv().await.unwrap().reason, Reason::Watch);
        tokio::time::advance(QUIET * 3).await;
        assert!(reload_rx.try_recv().is_err(), "exactly one reload");
    }
}
