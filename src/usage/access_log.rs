//! The access log writer: JSON lines to standard output, standard error or a file, written by a
//! thread of their own so that no request waits on a disk.
//!
//! Requests append their line to a shared buffer (a short lock, no wake-up); the writer takes
//! the buffer every 200 ms, so a line is out within a second. A file is opened for appending
//! and reopened on request (SIGHUP) or when the path no longer names it (moved or deleted by
//! logrotate); `copytruncate` needs nothing, appends follow the truncation. If the writer
//! falls behind by more than [`MAX_BUFFERED`] bytes, or cannot write, lines are dropped,
//! counted in `firstgate_access_log_dropped_total`, and a warning says so.

use crate::config::LogTarget;
use prometheus::IntCounter;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most bytes waiting to be written.
pub const MAX_BUFFERED: usize = 16 * 1024 * 1024;
/// How often the writer takes what is waiting.
const CYCLE: Duration = Duration::from_millis(200);

/// Lines for the writer, and what is asked of it.
struct Pending {
    lines: Vec<u8>,
    /// Flushes asked for and not yet done (each waiter watches `flushed` pass its number).
    flushes_asked: u64,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer early (a flush), and the flushers when it is done.
    wake: Condvar,
    flushed: Mutex<u64>,
    flushed_cv: Condvar,
    reopen: AtomicBool,
    dropped: IntCounter,
    last_warning: AtomicU64,
}

/// The access log (see the module comment).
pub struct AccessLog {
    shared: Arc<Shared>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn start(target: LogTarget, dropped: IntCounter) -> std::io::Result<AccessLog> {
        let mut out = Output::open(target)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                lines: Vec::with_capacity(64 * 1024),
                flushes_asked: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            flushed: Mutex::new(0),
            flushed_cv: Condvar::new(),
            reopen: AtomicBool::new(false),
            dropped,
            last_warning: AtomicU64::new(0),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&writer, &mut out))?;
        Ok(AccessLog { shared })
    }

    /// Appends one line, which `line` writes (without its newline) straight into the waiting
    /// lines: no buffer of its own. Never blocks on I/O.
    pub fn write(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = p.lines.len();
        line(&mut p.lines);
        if p.lines.len() < MAX_BUFFERED {
            p.lines.push(b'\n');
        } else {
            p.lines.truncate(before);
            drop(p);
            self.shared.dropped(1, "the writer is behind");
        }
    }

    /// Reopens a file target (after logrotate moved it; SIGHUP).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Relaxed);
    }

    /// Writes everything appended so far; waits at most `limit`.
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let ticket = {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.flushes_asked += 1;
            p.flushes_asked
        };
        self.shared.wake.notify_one();
        let mut flushed = self
            .shared
            .flushed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *flushed < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            flushed = self
                .shared
                .flushed_cv
                .wait_timeout(flushed, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn dropped(&self, lines: u64, why: &str) {
        self.dropped.inc_by(lines);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "access log: lines DROPPED ({why}); see firstgate_access_log_dropped_total \
                 (further drops for 10 s are only counted)"
            );
        }
    }
}

fn write_loop(shared: &Shared, out: &mut Output) {
    let mut checked = Instant::now();
    let mut served = 0;
    loop {
        let (lines, ticket, stop) = {
            let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            // A cycle's lines are written together; only a flush or the end wakes us early.
            let due = Instant::now() + CYCLE;
            while !p.stop && p.flushes_asked == served {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                p = shared
                    .wake
                    .wait_timeout(p, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let lines = std::mem::replace(&mut p.lines, Vec::with_capacity(64 * 1024));
            (lines, p.flushes_asked, p.stop)
        };
        // Once a second (and on request) make sure the file is still the one at the path.
        let asked = shared.reopen.swap(false, Ordering::Relaxed);
        if asked || checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            if let Err(e) = out.reopen_if_moved() {
                log::error!("access log: cannot reopen: {e}");
            }
        }
        if !lines.is_empty() {
            if let Err(e) = out.write(&lines) {
                let count = lines.iter().filter(|b| **b == b'\n').count() as u64;
                shared.dropped(count, &format!("cannot write: {e}"));
            }
        }
        if ticket > served {
            served = ticket;
            *shared.flushed.lock().unwrap_or_else(|e| e.into_inner()) = ticket;
            shared.flushed_cv.notify_all();
        }
        if stop {
            return;
        }
    }
}

/// Where the lines go.
enum Output {
    Stdout,
    Stderr,
    File {
        path: std::path::PathBuf,
        file: File,
    },
}

impl Output {
    fn open(target: LogTarget) -> std::io::Result<Output> {
        Ok(match target {
            LogTarget::Stdout => Output::Stdout,
            LogTarget::Stderr => Output::Stderr,
            LogTarget::File(path) => {
                let file = open_append(&path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?;
                Output::File { path, file }
            }
        })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(bytes)?;
                o.flush()
            }
            Output::Stderr => std::io::stderr().lock().write_all(bytes),
            Output::File { file, .. } => file.write_all(bytes),
        }
    }

    /// Reopens the file when the path now names another file, or none.
    fn reopen_if_moved(&mut self) -> std::io::Result<()> {
        let Output::File { path, file } = self else {
            return Ok(());
        };
        if same_file(file, path) {
            return Ok(());
        }
        *file = open_append(path)?;
        log::info!("access log: reopened {}", path.display());
        Ok(())
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Whether `path` still names the open `file` (same device and inode).
fn same_file(file: &File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_reach_the_file_and_a_moved_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let log = AccessLog::start(LogTarget::File(path.clone()), dropped.clone()).unwrap();
        log.write(|l| l.extend_from_slice(br#"{"a":1}"#));
        log.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n");
        // logrotate moves the file; the next lines go to a new one at the path.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.write(|l| l.extend_from_slice(br#"{"a":2}"#));
        log.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":2}\n");
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "{\"a\":1}\n");
        assert_eq!(dropped.get(), 0);
    }
}
