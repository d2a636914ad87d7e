//! Watches the config file and the rules directory, and turns bursts of file events into one
//! reload once the files have been quiet for [`QUIET`].
//!
//! Directories are watched rather than files: editors replace files by renaming a temporary
//! over them, which would silently end a watch on the file itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::reload::{Reason, Request};

/// How long the watched files must stay unchanged before a reload.
pub const QUIET: Duration = Duration::from_millis(300);

/// What to watch.
#[derive(Debug, Clone)]
pub struct Watched {
    /// The main config file.
    pub config: Option<PathBuf>,
    /// The rules directory.
    pub rules_dir: Option<PathBuf>,
}

impl Watched {
    /// Whether a changed path can affect the routing table.
    fn relevant(&self, path: &Path) -> bool {
        if self.config.as_deref() == Some(path) {
            return true;
        }
        let in_rules = match (&self.rules_dir, path.parent()) {
            (Some(dir), Some(parent)) => parent == dir,
            _ => false,
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        in_rules
            && !name.starts_with('.')
            && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".rhai"))
            && !name.ends_with(".test.yaml")
            && !name.ends_with(".test.yml")
    }
}

/// Starts watching; the returned watcher must be kept alive.
pub fn start(
    watched: Watched,
    reloads: mpsc::Sender<Request>,
) -> notify::Result<RecommendedWatcher> {
    // notify reports paths below the directory watched: with absolute ones, a relative
    // `--config config.yaml` still matches the `./config.yaml` of an event.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let watched = Watched {
        config: watched.config.map(absolute),
        rules_dir: watched.rules_dir.map(absolute),
    };
    let (events_tx, events_rx) = mpsc::channel::<()>(1024);
    let filter = watched.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event)
                if changes_content(&event.kind)
                    && event.paths.iter().any(|p| filter.relevant(p)) =>
            {
                tracing::debug!(message = "Watched file changed.", kind = ?event.kind, paths = ?event.paths);
                // A full channel already holds a pending reload: dropping this event loses nothing.
                let _ = events_tx.try_send(());
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(message = "File watcher error.", %error),
        }
    })?;
    let mut dirs: Vec<PathBuf> = watched.rules_dir.iter().cloned().collect();
    if let Some(parent) = watched.config.as_deref().and_then(Path::parent)
        && !dirs.iter().any(|d| d == parent)
    {
        dirs.push(parent.to_owned());
    }
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tokio::spawn(debounce(events_rx, reloads));
    Ok(watcher)
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

    #[test]
    fn only_routing_files_are_relevant() {
        let w = Watched {
            config: Some("/etc/orproxy/config.yaml".into()),
            rules_dir: Some("/etc/orproxy/rules".into()),
        };
        assert!(w.relevant(Path::new("/etc/orproxy/config.yaml")));
        assert!(w.relevant(Path::new("/etc/orproxy/rules/10-team.yaml")));
        assert!(w.relevant(Path::new("/etc/orproxy/rules/route.rhai")));
        assert!(!w.relevant(Path::new("/etc/orproxy/rules/route.test.yaml")));
        assert!(!w.relevant(Path::new("/etc/orproxy/rules/.10-team.yaml.swp")));
        assert!(!w.relevant(Path::new("/etc/orproxy/env")));
        assert!(!w.relevant(Path::new("/etc/orproxy/rules/sub/x.yaml")));
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
