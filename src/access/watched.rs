//! Settings read from files that change on disk while the gateway runs: certificates rotated by
//! cert-manager or SPIRE, a policy edited by its owners.
//!
//! A [`Watched`] value is loaded once at start-up (a file that does not load then stops
//! start-up), and again whenever one of its files changes. A change is seen by the file's
//! metadata, followed through symlinks, because Kubernetes replaces a mounted secret by swapping
//! a symlink. A new version that does not load keeps the old value in force, and is logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// How often watched files are looked at.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// What tells one version of a file from the next: enough that an atomic replacement (a new
/// inode), an edit in place (a new modification time) or a truncation is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    device: u64,
    len: u64,
    modified: Option<SystemTime>,
    changed_ns: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: metadata.ino(),
        device: metadata.dev(),
        len: metadata.len(),
        modified: metadata.modified().ok(),
        changed_ns: metadata
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(metadata.ctime_nsec()),
    })
}

/// Loads a value from its files; the error says what is wrong, without quoting the files.
pub type Loader<T> = fn(&[PathBuf]) -> Result<T, String>;

/// A value loaded from files, reloaded when they change.
pub struct Watched<T> {
    /// What the files are, for log lines: the flags that name them.
    what: &'static str,
    paths: Vec<PathBuf>,
    load: Loader<T>,
    /// Read on every call or handshake: a read lock, so that readers never wait for each other.
    current: RwLock<Arc<T>>,
    /// The files' stamps when last loaded; held through a reload, so that two reloads never
    /// race.
    stamps: Mutex<Vec<Option<Stamp>>>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Loads the value; an error names `what` and stops start-up.
    pub fn open(what: &'static str, paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self, String> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let current = Arc::new(load(&paths)?);
        Ok(Self {
            what,
            paths,
            load,
            current: RwLock::new(current),
            stamps: Mutex::new(stamps),
        })
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        // The lock is only held to copy or replace an `Arc`; a panic cannot leave it half done.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads the files again if any of them changed since the last look. Returns whether a new
    /// value took effect. A version that does not load is logged once and the old value kept;
    /// the next change is tried again.
    pub fn refresh(&self) -> bool {
        let stamps: Vec<Option<Stamp>> = self.paths.iter().map(|p| stamp(p)).collect();
        let mut last = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == stamps {
            return false;
        }
        *last = stamps;
        match (self.load)(&self.paths) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
                tracing::info!(files = self.what, "reloaded after a change on disk");
                true
            }
            Err(error) => {
                tracing::error!(
                    files = self.what,
                    %error,
                    "the changed files do not load; the previous version stays in force"
                );
                false
            }
        }
    }

    /// Looks for changes every [`RELOAD_INTERVAL`] until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let this = self.clone();
            // Reading files blocks; keep it off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || this.refresh()).await;
        }
    }
}
