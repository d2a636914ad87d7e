//! The one writer: rows arrive on a channel and are committed in batches on a dedicated
//! thread, so a request never waits for SQLite.
//!
//! A batch gathers rows for [`COMMIT_EVERY`] (a flush or a stop commits at once) and is
//! written in one transaction, so batches grow with the load instead of the queue blocking
//! anyone. A row is on disk (in the WAL) at most [`COMMIT_EVERY`] plus a commit's time after
//! it was sent, which bounds what a killed process loses.
//!
//! A database that refuses rows (disk full, locked, damaged) keeps them queued, up to
//! [`MAX_QUEUED`], and is tried again every few seconds in ever smaller transactions; rows past
//! that limit, and rows still refused at stop, are logged whole rather than lost silently.
//!
//! Rows older than the retention are deleted by the same thread, a piece at a time between
//! batches, so that pruning never competes with the rows for the write lock.
//!
//! Before each commit the writer checks that its path still names the file it has open: a
//! database deleted or replaced under a running daemon would otherwise swallow rows into an
//! unlinked file. It then says so, counts it as a write error and opens the database at the
//! path again.

use std::borrow::Borrow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::packed::{Packed, View};
use crate::row::{Row, insert_rows};

/// Rows per transaction at most (a transaction holds the WAL lock; keep it short); a larger
/// batch is committed in several.
const MAX_BATCH: usize = 8192;
/// How long a batch gathers rows before it is committed: what a killed process can lose.
/// Each commit costs a few syscalls whatever its size: 10 ms batches (a hundred commits a
/// second) showed in the p99 of single requests, 50 ms do not.
pub const COMMIT_EVERY: Duration = Duration::from_millis(50);
/// Rows waiting for the database at most. The writer is ten times faster than the daemon can
/// serve, so only a database that cannot be written (disk full, locked, damaged) fills this;
/// rows beyond it are logged whole instead of growing the process until it is killed
/// (a few hundred bytes a row, packed: some 40 MB).
pub const MAX_QUEUED: u64 = 100_000;
/// Rows inserted between two offers of the core to the request threads (about 100 µs of
/// work). A batch is milliseconds of one core: run in one go, it held up the requests of the
/// worker it displaced for a whole scheduler slice, which showed in their p99 under load.
const YIELD_EVERY: usize = 32;
/// Rows per transaction at least when retrying refused rows in smaller transactions.
const MIN_PIECE: usize = 256;
/// How long rows SQLite refused wait before the next try while running.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// Rows deleted per transaction when pruning: about 10 ms each on the benchmark machine,
/// taken out of the next batch's gathering time.
const PRUNE_PIECE: usize = 2000;
/// How long a commit waits for another process's lock. Refused rows are tried again every
/// [`RETRY_EVERY`] anyway; a longer wait would only hold up a stop that arrives meanwhile
/// (SQLite's wait cannot be interrupted).
const COMMIT_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a deletion piece waits for another process's lock before giving up until the
/// next pass.
const PRUNE_BUSY_TIMEOUT: Duration = Duration::from_millis(100);
/// Waits between the last tries of rows SQLite refuses at shutdown.
const RETRY: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_secs(1),
];

enum Message {
    Row(Packed),
    /// Answered with whether every row sent before it is committed.
    Flush(SyncSender<bool>),
    /// Delete the rows that arrived before `before_ms`, named `cutoff` in the log.
    Prune {
        before_ms: i64,
        cutoff: String,
    },
    /// Stop the deletion under way (the retention was removed).
    StopPruning,
    Stop,
}

/// A deletion of old rows under way.
struct Pruning {
    before_ms: i64,
    cutoff: String,
    deleted: u64,
    started: Instant,
}

impl Pruning {
    /// Logs what the deletion removed, if anything, and how it ended.
    fn report(&self, end: &str) {
        if self.deleted > 0 {
            tracing::info!(
                message = "Usage rows past the retention deleted.",
                rows = self.deleted,
                older_than = %self.cutoff,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                end,
            );
        }
    }
}

/// Counters of the writer, read by `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Rows sent and not yet committed.
    pub queued: AtomicU64,
    /// Rows committed.
    pub written: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// The largest batch so far.
    pub max_batch: AtomicU64,
    /// Failed attempts to commit a batch (each retried), and times the database file was found
    /// deleted or replaced (and opened again).
    pub errors: AtomicU64,
    /// Rows given up on, each logged whole: at shutdown, or past [`MAX_QUEUED`].
    pub dropped: AtomicU64,
    /// Rows deleted as older than the retention.
    pub pruned: AtomicU64,
}

/// A handle to the writer thread; clones share it.
#[derive(Clone)]
pub struct Writer {
    tx: Sender<Message>,
    stats: Arc<WriterStats>,
    /// Set by [`Writer::stop`]: seen each round, ahead of the rows still queued.
    stopping: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    max_queued: u64,
}

impl Writer {
    /// Starts the writer thread on an open (migrated) connection to the database at `path`.
    pub fn start(conn: Connection, path: &Path) -> std::io::Result<Writer> {
        Writer::with_limit(conn, path, MAX_QUEUED)
    }

    fn with_limit(conn: Connection, path: &Path, max_queued: u64) -> std::io::Result<Writer> {
        conn.busy_timeout(COMMIT_BUSY_TIMEOUT)
            .map_err(std::io::Error::other)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriterStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            conn: Some(conn),
            file: FileId::of(path)?,
            wal: FileId::of(&wal_path(path)).ok(),
            path: path.to_owned(),
            rx,
            stats: Arc::clone(&stats),
            stopping: Arc::clone(&stopping),
            piece: usize::MAX,
            pruning: None,
        };
        let thread = std::thread::Builder::new()
            .name("orproxy-ledger".into())
            .spawn(move || worker.run())?;
        Ok(Writer {
            tx,
            stats,
            stopping,
            thread: Arc::new(Mutex::new(Some(thread))),
            max_queued,
        })
    }

    /// Queues a copy of `row`, packed into one block ([`Packed`]); never blocks. After
    /// [`Writer::stop`], or with [`MAX_QUEUED`] rows already waiting, the row is logged instead.
    pub fn send(&self, row: impl Borrow<Row>) {
        let packed = Packed::new(row.borrow());
        if self.stats.queued.load(Ordering::Relaxed) >= self.max_queued {
            lost(
                &self.stats,
                &packed,
                "too many rows are waiting for the usage database (it cannot be written)",
            );
            return;
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(Message::Row(packed))) = self.tx.send(Message::Row(packed)) {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            lost(&self.stats, &packed, "the usage writer has stopped");
        }
    }

    /// Waits until every row sent before this call is committed (true), or the writer has
    /// tried and failed to commit them (false: they stay queued).
    pub fn flush(&self) -> bool {
        self.flush_within(Duration::MAX)
    }

    /// [`Writer::flush`], waiting at most `limit` (false if the rows were not committed by
    /// then): a database that refuses rows answers only after its busy timeout.
    pub fn flush_within(&self, limit: Duration) -> bool {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if self.tx.send(Message::Flush(done_tx)).is_err() {
            return false;
        }
        done_rx.recv_timeout(limit).unwrap_or(false)
    }

    /// Deletes the rows that arrived before `before_ms` (Unix milliseconds), a few thousand
    /// per transaction between batches; `cutoff` names that time in the log line that reports
    /// the deletion. The budgets' spend summary keeps what those rows cost.
    /// A deletion under way takes the new cutoff at once.
    pub fn prune(&self, before_ms: i64, cutoff: String) {
        let _ = self.tx.send(Message::Prune { before_ms, cutoff });
    }

    /// Stops the deletion under way, if any (the retention was removed).
    pub fn stop_pruning(&self) {
        let _ = self.tx.send(Message::StopPruning);
    }

    /// Commits everything queued, then ends the thread. A database that cannot be written gets
    /// a few seconds; the rows it refuses are then logged whole. Idempotent.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Message::Stop);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            // Cuts short the pause of a batch gathering rows.
            thread.thread().unpark();
            let _ = thread.join();
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

/// Which file a path names: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

struct Worker {
    /// `None` after the database was found moved, until it is opened again.
    conn: Option<Connection>,
    path: PathBuf,
    /// The file `conn` has open, as it was when opened.
    file: FileId,
    /// Its write-ahead log, as it was when opened.
    wal: Option<FileId>,
    rx: Receiver<Message>,
    stats: Arc<WriterStats>,
    stopping: Arc<AtomicBool>,
    /// Rows per transaction: all of a batch, until SQLite refuses one.
    piece: usize,
    pruning: Option<Pruning>,
}

impl Worker {
    fn run(mut self) {
        let mut batch: Vec<Packed> = Vec::new();
        let mut waiting: Vec<SyncSender<bool>> = Vec::new();
        let mut behind = false;
        // Time the last round spent deleting old rows, which the next batch gathers less.
        let mut pruned_for = Duration::ZERO;
        loop {
            // Block for the first message, then take whatever else is already queued.
            let first = if !batch.is_empty() {
                // The last commit failed and kept its rows: try again after a pause (which a
                // stop cuts short), whether or not more rows came.
                std::thread::park_timeout(RETRY_EVERY);
                self.rx.try_recv()
            } else if self.pruning.is_some() {
                self.rx.try_recv()
            } else {
                self.rx.recv().map_err(|_| TryRecvError::Disconnected)
            };
            let mut stop = match first {
                Ok(message) => self.take(message, &mut batch, &mut waiting),
                Err(TryRecvError::Empty) => false,
                Err(TryRecvError::Disconnected) => true,
            };
            // Let rows gather for COMMIT_EVERY: each transaction rewrites the same few pages and
            // takes the WAL locks, so one commit per row would cost far more than the rows.
            // Pausing rather than waiting on the channel matters as much: a waiting receiver
            // is woken (a futex call and a context switch) by every single send.
            // A full last batch means rows arrive faster than batches fill: no pause then.
            if !stop && waiting.is_empty() && !behind {
                std::thread::park_timeout(COMMIT_EVERY.saturating_sub(pruned_for));
            }
            // Everything queued joins the batch (committed MAX_BATCH rows per transaction), so
            // a flush or a stop behind many rows is seen in this round.
            while !stop {
                match self.rx.try_recv() {
                    Ok(message) => stop = self.take(message, &mut batch, &mut waiting),
                    Err(_) => break,
                }
            }
            behind = batch.len() >= MAX_BATCH;
            // A stop is seen here even with rows queued ahead of its message.
            stop |= self.stopping.load(Ordering::Relaxed);
            if !stop {
                if !batch.is_empty() {
                    self.commit(&mut batch, false);
                }
                // Flushes wait for the rows sent before them, which are now committed, or were
                // tried and refused (a report then shows what the database holds).
                for done in waiting.drain(..) {
                    let _ = done.send(batch.is_empty());
                }
                // Not while the database refuses rows: they come first.
                pruned_for = Duration::ZERO;
                if batch.is_empty() && self.pruning.is_some() {
                    let started = Instant::now();
                    self.prune_piece();
                    pruned_for = started.elapsed();
                }
            }
            if stop || self.stopping.load(Ordering::Relaxed) {
                // Everything sent before the stop, including rows queued behind a failing
                // database, gets one last try.
                let dropped = self.stats.dropped.load(Ordering::Relaxed);
                while let Ok(message) = self.rx.recv_timeout(Duration::ZERO) {
                    match message {
                        Message::Row(row) => batch.push(row),
                        Message::Flush(done) => waiting.push(done),
                        Message::Prune { .. } | Message::StopPruning | Message::Stop => {}
                    }
                }
                if let Some(pruning) = self.pruning.take() {
                    pruning.report("stopped by the shutdown");
                }
                if !batch.is_empty() {
                    self.commit(&mut batch, true);
                }
                // Refused rows were logged, not committed.
                let committed = self.stats.dropped.load(Ordering::Relaxed) == dropped;
                for done in waiting.drain(..) {
                    let _ = done.send(committed);
                }
                return;
            }
        }
    }

    /// Files one message; true on Stop.
    fn take(
        &mut self,
        message: Message,
        batch: &mut Vec<Packed>,
        waiting: &mut Vec<SyncSender<bool>>,
    ) -> bool {
        match message {
            Message::Row(row) => batch.push(row),
            Message::Flush(done) => waiting.push(done),
            Message::Prune { before_ms, cutoff } => match &mut self.pruning {
                // A later cutoff takes over the deletion under way.
                Some(p) => (p.before_ms, p.cutoff) = (before_ms, cutoff),
                None => {
                    self.pruning = Some(Pruning {
                        before_ms,
                        cutoff,
                        deleted: 0,
                        started: Instant::now(),
                    });
                }
            },
            Message::StopPruning => {
                if let Some(pruning) = self.pruning.take() {
                    pruning.report("stopped: the retention was removed");
                }
            }
            Message::Stop => return true,
        }
        false
    }

    /// Deletes one piece of the rows older than the cutoff under way, and ends the deletion
    /// when none are left.
    fn prune_piece(&mut self) {
        let Some(before_ms) = self.pruning.as_ref().map(|p| p.before_ms) else {
            return;
        };
        let result = self
            .connection()
            .and_then(|conn| delete_before(conn, before_ms).map_err(|e| e.to_string()));
        let Some(pruning) = &mut self.pruning else {
            return;
        };
        match result {
            Ok(deleted) => {
                self.stats.pruned.fetch_add(deleted, Ordering::Relaxed);
                pruning.deleted += deleted;
                if deleted < PRUNE_PIECE as u64 {
                    pruning.report("done");
                    self.pruning = None;
                }
            }
            Err(error) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    message = "Cannot delete usage rows past the retention; trying again at the next pass.",
                    database = %self.path.display(),
                    older_than = %pruning.cutoff,
                    %error,
                );
                pruning.report("stopped by the error");
                self.pruning = None;
            }
        }
    }

    /// Commits `batch`. While running, rows SQLite refuses stay in `batch` for the next round
    /// (a few seconds later), and each failed round commits in transactions an eighth as
    /// large, so that a little freed disk space lets rows through. At stop, a refusing database
    /// gets a few quick tries, then the rows are logged whole, so that nothing is lost silently.
    fn commit(&mut self, batch: &mut Vec<Packed>, stopping: bool) {
        let mut pauses = if stopping { &RETRY[..] } else { &[][..] }.iter();
        loop {
            let error = match self.write_pieces(batch, self.piece) {
                Ok(()) => {
                    self.piece = usize::MAX;
                    return;
                }
                Err(error) => error,
            };
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                message = "Cannot write usage rows; retrying.",
                database = %self.path.display(),
                rows = batch.len(),
                %error,
            );
            // Not below MIN_PIECE rows: each transaction writes whole pages to the log, so
            // single rows would spend kilobytes of freed disk each.
            self.piece = (self.piece.min(batch.len()) / 8).max(MIN_PIECE);
            match pauses.next() {
                Some(pause) => std::thread::sleep(*pause),
                None if !stopping => return,
                None => {
                    for packed in batch.drain(..) {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        lost(&self.stats, &packed, &error);
                    }
                    return;
                }
            }
        }
    }

    /// Commits `batch` in transactions of `piece` rows (at most [`MAX_BATCH`]) and removes
    /// what was committed from it.
    fn write_pieces(&mut self, batch: &mut Vec<Packed>, piece: usize) -> Result<(), String> {
        let mut done = 0;
        let stats = Arc::clone(&self.stats);
        let written = loop {
            let n = piece.min(MAX_BATCH).min(batch.len() - done);
            if n == 0 {
                break Ok(());
            }
            let rows = &batch[done..done + n];
            if let Err(error) = self
                .connection()
                .and_then(|conn| write_batch(conn, rows, &stats).map_err(|e| e.to_string()))
            {
                break Err(error);
            }
            let n64 = n as u64;
            self.stats.queued.fetch_sub(n64, Ordering::Relaxed);
            self.stats.written.fetch_add(n64, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.max_batch.fetch_max(n64, Ordering::Relaxed);
            done += n;
        };
        batch.drain(..done);
        written
    }
}

impl Worker {
    /// The connection to commit on. When the path no longer names the file that is open
    /// (deleted, or replaced by another file), rows committed to it would vanish with it: the
    /// database at the path is opened (created if need be) again instead.
    fn connection(&mut self) -> Result<&mut Connection, String> {
        let moved = match FileId::of(&self.path) {
            Ok(id) => id != self.file,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if moved && let Some(old) = self.conn.take() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                message = "The usage database was deleted or replaced while in use; opening it again.",
                database = %self.path.display(),
            );
            self.retire(old);
        }
        if self.conn.is_none() {
            let conn = crate::open(&self.path).map_err(|e| e.to_string())?;
            conn.busy_timeout(COMMIT_BUSY_TIMEOUT)
                .map_err(|e| e.to_string())?;
            self.file =
                FileId::of(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
            self.wal = FileId::of(&wal_path(&self.path)).ok();
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| format!("{}: not open", self.path.display()))
    }

    /// Closes the connection to a database that is no longer at the path, so that the one
    /// opened there next does not take the old write-ahead log for its own. SQLite skips the
    /// checkpoint on close for a moved file and leaves the log at `<path>-wal`, where the next
    /// database would replay it: it is checkpointed (into the old file, wherever that is now)
    /// and emptied here, or removed if that cannot be done.
    fn retire(&mut self, old: Connection) {
        // A reader of the old file would hold the checkpoint up for the whole busy timeout;
        // the log is removed instead then.
        let _ = old.busy_timeout(Duration::ZERO);
        let emptied = old
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|busy| busy == 0);
        drop(old);
        let wal = wal_path(&self.path);
        if !emptied && self.wal.is_some() && FileId::of(&wal).ok() == self.wal {
            for file in [wal, shm_path(&self.path)] {
                if let Err(error) = std::fs::remove_file(&file)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::error!(
                        message = "Cannot remove the write-ahead log of a replaced usage database.",
                        file = %file.display(),
                        %error,
                    );
                }
            }
        }
    }
}

/// `<path>-wal`, SQLite's write-ahead log of the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// `<path>-shm`, the shared-memory index of that log.
fn shm_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-shm");
    PathBuf::from(name)
}

fn write_batch(
    conn: &mut Connection,
    batch: &[Packed],
    stats: &WriterStats,
) -> rusqlite::Result<()> {
    let views: Vec<View<'_>> = batch
        .iter()
        .filter_map(|packed| {
            let view = packed.view();
            if view.is_none() {
                // Every block comes from `Packed::new`, which `view` reads back whole.
                lost(stats, packed, "unreadable");
            }
            view
        })
        .collect();
    let tx = conn.transaction()?;
    let mut offered = 0;
    insert_rows(&tx, &views, |inserted| {
        if inserted - offered >= YIELD_EVERY {
            offered = inserted;
            std::thread::yield_now();
        }
    })?;
    crate::spend::add_spend(&tx, &views)?;
    tx.commit()
}

/// Deletes up to [`PRUNE_PIECE`] of the oldest rows that arrived before `before_ms`, in one
/// transaction (the `ts_ms` index finds them).
fn delete_before(conn: &mut Connection, before_ms: i64) -> rusqlite::Result<u64> {
    // Another process holding the lock gets a short wait, not the rows' busy timeout: the
    // deletion can wait for its next pass, and rows (or a stop) queue behind it meanwhile.
    conn.busy_timeout(PRUNE_BUSY_TIMEOUT)?;
    let deleted = conn
        .prepare_cached(
            "DELETE FROM requests WHERE id IN \
             (SELECT id FROM requests WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
        )
        .and_then(|mut stmt| stmt.execute(rusqlite::params![before_ms, PRUNE_PIECE as i64]));
    conn.busy_timeout(COMMIT_BUSY_TIMEOUT)?;
    Ok(deleted? as u64)
}

/// A row that cannot be stored goes to the log whole, so it can still be recovered.
fn lost(stats: &WriterStats, packed: &Packed, why: &str) {
    stats.dropped.fetch_add(1, Ordering::Relaxed);
    let Some(row) = packed.view() else {
        tracing::error!(message = "Usage row not stored (and unreadable).", why);
        return;
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let opt = |bytes: Option<&[u8]>| bytes.map(text);
    let mut attempts = Vec::new();
    row.attempts_json(&mut attempts);
    let tags = if row.tags.is_empty() { b"{}" } else { row.tags };
    tracing::error!(
        message = "Usage row not stored.",
        why,
        request_id = %String::from_utf8_lossy(row.request_id),
        ts_ms = row.ts_ms,
        key = opt(row.key),
        client_ip = row.client_ip.map(tracing::field::display),
        backend = opt(row.backend),
        model = opt(row.model),
        model_requested = opt(row.model_requested),
        model_served = opt(row.model_served),
        status = row.status,
        outcome = text(row.outcome),
        stream = row.stream,
        prompt_tokens = row.prompt_tokens,
        completion_tokens = row.completion_tokens,
        cached_tokens = row.cached_tokens,
        reasoning_tokens = row.reasoning_tokens,
        cost_nanos = row.cost_nanos,
        cost_source = row.cost_source.as_str(),
        latency_us = row.latency_us,
        ttfb_us = row.ttfb_us,
        upstream_us = row.upstream_us,
        attempts = text(&attempts),
        tags = text(tags),
        rules = opt(row.rules),
        error = opt(row.error),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::temp_db;

    fn count(path: &Path) -> i64 {
        let conn = crate::open_reader(path).unwrap();
        conn.query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn rows_from_many_threads_are_all_committed_and_stop_flushes() {
        let (_dir, path) = temp_db("writer");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let writer = writer.clone();
                s.spawn(move || {
                    for i in 0..500 {
                        writer.send(Row::example(&format!("req-{t}-{i}"), i, 7));
                    }
                });
            }
        });
        writer.stop();
        assert_eq!(count(&path), 4000);
        assert_eq!(writer.stats().written.load(Ordering::Relaxed), 4000);
        assert_eq!(writer.stats().queued.load(Ordering::Relaxed), 0);
        let conn = crate::open_reader(&path).unwrap();
        let total: i64 = conn
            .query_row("SELECT sum(cost_nanos) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(total, 4000 * 7);
    }

    #[test]
    fn flush_waits_for_rows_sent_before_it() {
        let (_dir, path) = temp_db("flush");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        for i in 0..100 {
            writer.send(Row::example(&format!("req-{i}"), i, 1));
        }
        writer.flush();
        assert_eq!(count(&path), 100);
        // The client's address, handed over as an address, is stored as text.
        let ip: String = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT client_ip FROM requests LIMIT 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ip, "127.0.0.1");
        writer.stop();
        // A row after stop is not lost silently: it is counted (and logged).
        writer.send(Row::example("late", 0, 1));
        assert_eq!(writer.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn prune_deletes_old_rows_in_pieces_between_batches_and_keeps_the_spend() {
        let (_dir, path) = temp_db("prune");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        // Three pieces and a bit of old rows, and rows that stay.
        let old = 3 * PRUNE_PIECE as i64 + 7;
        for i in 0..old {
            writer.send(Row::example(&format!("old-{i}"), i, 1));
        }
        for i in 0..10 {
            writer.send(Row::example(&format!("new-{i}"), old + i, 1));
        }
        assert!(writer.flush());
        writer.prune(old, "then".into());
        // Rows sent while the deletion runs are committed as usual.
        for i in 0..100 {
            writer.send(Row::example(&format!("during-{i}"), old + 10 + i, 1));
        }
        // A flush is answered each round, so wait on the counter instead.
        let deadline = Instant::now() + Duration::from_secs(30);
        while writer.stats().pruned.load(Ordering::Relaxed) < old as u64 {
            assert!(Instant::now() < deadline, "old rows still there");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(writer.flush());
        assert_eq!(count(&path), 110);
        let conn = crate::open_reader(&path).unwrap();
        let oldest: i64 = conn
            .query_row("SELECT min(ts_ms) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(oldest, old);
        let spent: i64 = conn
            .query_row("SELECT sum(cost_nanos) FROM spend_days", [], |r| r.get(0))
            .unwrap();
        assert_eq!(spent, old + 110);
        writer.stop();
        assert_eq!(writer.stats().pruned.load(Ordering::Relaxed), old as u64);
    }

    #[test]
    fn a_new_cutoff_replaces_the_one_of_the_deletion_under_way() {
        let (_dir, path) = temp_db("prune-change");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        for i in 0..100 {
            writer.send(Row::example(&format!("r-{i}"), i, 1));
        }
        assert!(writer.flush());
        // Both reach the writer in one round: the second cutoff is the one applied.
        writer.prune(90, "first".into());
        writer.prune(30, "second".into());
        let deadline = Instant::now() + Duration::from_secs(30);
        while writer.stats().pruned.load(Ordering::Relaxed) < 30 {
            assert!(
                Instant::now() < deadline,
                "rows before the cutoff still there"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(writer.flush());
        assert_eq!(count(&path), 70);
        writer.stop();
    }

    /// Another process holding the write lock stands in for a full disk: SQLite refuses
    /// every commit.
    fn locked(path: &Path) -> Connection {
        let holder = Connection::open(path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        holder
    }

    #[test]
    fn a_database_that_refuses_rows_holds_a_bounded_queue_and_lets_flush_and_stop_return() {
        let (_dir, path) = temp_db("refused");
        let writer = Writer::with_limit(crate::open(&path).unwrap(), &path, 50).unwrap();
        let holder = locked(&path);
        for i in 0..60 {
            writer.send(Row::example(&format!("req-{i}"), i, 1));
        }
        let stats = writer.stats();
        // Past the limit, rows are logged whole instead of queued.
        assert_eq!(stats.queued.load(Ordering::Relaxed), 50);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 10);
        // A flush returns once the commit was tried, and says it failed.
        assert!(!writer.flush());
        assert!(stats.errors.load(Ordering::Relaxed) >= 1);
        assert!(!writer.flush_within(Duration::from_millis(10)));
        // Freed, the database takes every queued row.
        drop(holder);
        assert!(writer.flush());
        assert_eq!(count(&path), 50);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);

        // Refused again at stop: a few seconds of tries, then the rows are logged whole.
        let holder = locked(&path);
        for i in 0..5 {
            writer.send(Row::example(&format!("late-{i}"), i, 1));
        }
        let asked = std::time::Instant::now();
        writer.stop();
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 15);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
        drop(holder);
        assert_eq!(count(&path), 50);
    }

    #[test]
    fn stop_is_seen_ahead_of_the_rows_queued_behind_a_refusing_database() {
        let (_dir, path) = temp_db("stop-behind");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        let holder = locked(&path);
        for i in 0..(MAX_BATCH as i64 * 3) {
            writer.send(Row::example(&format!("req-{i}"), i, 1));
        }
        // The writer is retrying its first batch; the database comes back as the stop starts.
        std::thread::sleep(Duration::from_millis(100));
        let stopper = std::thread::spawn({
            let writer = writer.clone();
            move || writer.stop()
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(holder);
        let asked = std::time::Instant::now();
        stopper.join().unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(
            count(&path),
            MAX_BATCH as i64 * 3,
            "every queued row is committed"
        );
        assert_eq!(writer.stats().dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_database_deleted_or_replaced_while_open_is_opened_again() {
        let (dir, path) = temp_db("moved");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        let errors = || writer.stats().errors.load(Ordering::Relaxed);
        writer.send(Row::example("before", 1, 1));
        writer.flush();
        assert_eq!((count(&path), errors()), (1, 0));

        // `rm usage.db*` under the running writer: the next batch lands in a new database.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        writer.send(Row::example("after-delete", 2, 1));
        writer.flush();
        assert_eq!(count(&path), 1, "the row is in the new file");
        assert_eq!(errors(), 1, "the deletion is counted");

        // Another database renamed over it: rows go to that one, next to what it held, and
        // the old one's write-ahead log is not replayed into it.
        let ids = |path: &Path| -> Vec<String> {
            let conn = crate::open_reader(path).unwrap();
            let mut stmt = conn
                .prepare("SELECT request_id FROM requests ORDER BY id")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let replace_with = |id: &str| {
            let other = dir.0.join("other.db");
            let seed = Writer::start(crate::open(&other).unwrap(), &other).unwrap();
            seed.send(Row::example(id, 3, 1));
            seed.stop();
            std::fs::rename(&other, &path).unwrap();
        };
        replace_with("restored");
        writer.send(Row::example("after-replace", 4, 1));
        writer.flush();
        assert_eq!(errors(), 2, "the replacement is counted");
        assert_eq!(ids(&path), ["restored", "after-replace"]);

        // Again while a reader holds the old database's log: it cannot be emptied, so it goes.
        writer.send(Row::example("unread", 5, 1));
        writer.flush();
        let reader = crate::open_reader(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let seen: i64 = reader
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 3);
        replace_with("restored-again");
        writer.send(Row::example("after-second-replace", 6, 1));
        writer.stop();
        drop(reader);
        assert_eq!(errors(), 3);
        assert_eq!(ids(&path), ["restored-again", "after-second-replace"]);
        assert_eq!(writer.stats().dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_row_keeps_every_field() {
        let (_dir, path) = temp_db("fields");
        let writer = Writer::start(crate::open(&path).unwrap(), &path).unwrap();
        let mut row = Row::example("req-x", 1_700_000_000_000, 3_530_250);
        row.tags.insert("team".into(), serde_json::json!("search"));
        row.cached_tokens = Some(5);
        writer.send(row);
        writer.stop();
        let conn = crate::open_reader(&path).unwrap();
        let (tags, attempts, cached, source): (String, String, i64, String) = conn
            .query_row(
                "SELECT tags, attempts, cached_tokens, cost_source FROM requests",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(tags, r#"{"team":"search"}"#);
        assert_eq!(
            attempts,
            r#"[{"route":"openrouter:openai/gpt-4o-mini","result":"ok"}]"#
        );
        assert_eq!((cached, source.as_str()), (5, "upstream"));
    }
}
