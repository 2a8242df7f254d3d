//! Whether the store can write: the free-space guard, sled write failures, and the
//! figures of the readings the writer holds in memory meanwhile.
//!
//! # Disk full
//!
//! sled 0.34 does not survive a failed write in the same process: after one I/O
//! error (ENOSPC included) every later write of that instance fails with the same
//! error, and dropping the instance blocks forever in its final flush while still
//! holding the directory's file lock, so it can neither be reopened nor closed. What
//! it wrote before is intact: a new process opens it, finds every flushed record and
//! writes on. (Measured on a full tmpfs; `open` itself fails with ENOSPC while the
//! disk stays full.)
//!
//! So the store does not let sled hit ENOSPC in the first place: before each commit
//! it checks the free space of its filesystem (`statvfs`, a syscall, no scan) and
//! refuses the commit with [`StoreError::NoSpace`] while less than
//! `store.min_free_space` is free. Nothing reaches sled, the instance stays healthy,
//! and the writer holds the readings in memory and retries (`writer.rs`); once space
//! returns, the next commit goes through, in order, with gap-free seqs. The reserve
//! is left for the small writes that go on meanwhile (sync cursor, derived state,
//! quota deletions) and for sled's own segment allocation.
//!
//! If sled fails a write anyway (another program took the reserve, a hardware
//! error), the store marks itself *failed*: every later write is refused at once
//! with [`StoreError::Failed`], without touching sled, and dropping the store leaves
//! the sled instance behind instead of hanging (`Store`'s `Drop`). The agent keeps
//! polling into memory and, once the disk has room again, exits so that its service
//! manager starts it afresh (`lib.rs`): one restart per such failure, never a loop.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Store, StoreError};

/// Write health shared by the store and its writer task.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// A sled write failed: the instance refuses writes until the process restarts.
    failed: AtomicBool,
    /// The store refuses commits (disk full or failed) as of the last attempt.
    blocked: AtomicBool,
    /// Readings the writer holds in memory because commits are refused.
    held: AtomicU64,
    /// Readings dropped from memory (oldest first) beyond the hold bound, since start.
    held_dropped: AtomicU64,
    /// Last write error, cleared once a commit succeeds again.
    last_error: Mutex<Option<String>>,
    /// The sled error that failed the store.
    failure: Mutex<Option<String>>,
    /// Test double: the filesystem reads as full.
    #[cfg(test)]
    pub(super) inject_full: AtomicBool,
}

/// Bytes available to this (unprivileged) process on the filesystem holding `path`.
#[cfg(unix)]
pub(super) fn free_space(path: &CString) -> Option<u64> {
    let st = rustix::fs::statvfs(path.as_c_str()).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(not(unix))]
pub(super) fn free_space(_path: &CString) -> Option<u64> {
    None
}

impl Store {
    /// Refuses a write while the store has failed or its filesystem is short of the
    /// reserve. A syscall, no scan: cheap enough for every commit.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        #[cfg(test)]
        if self.health.inject_full.load(Ordering::SeqCst) {
            return Err(StoreError::NoSpace {
                free: 0,
                reserve: self.min_free,
            });
        }
        match self.free_bytes() {
            Some(free) if free < self.min_free => Err(StoreError::NoSpace {
                free,
                reserve: self.min_free,
            }),
            _ => Ok(()),
        }
    }

    /// Free bytes on the store's filesystem (`None` where it cannot be told).
    pub fn free_bytes(&self) -> Option<u64> {
        free_space(&self.c_path)
    }

    /// Whether the disk has room above the reserve again (for a failed store: the
    /// moment a restart can reopen it).
    pub fn has_room(&self) -> bool {
        #[cfg(test)]
        if self.health.inject_full.load(Ordering::SeqCst) {
            return false;
        }
        self.free_bytes().map_or(true, |free| free >= self.min_free)
    }

    /// Refuses any write once a sled write failed: its instance is unusable.
    pub(super) fn check_failed(&self) -> Result<(), StoreError> {
        if !self.health.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let failure = self
            .health
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Err(StoreError::Failed(
            failure.unwrap_or_else(|| "an earlier write failed".into()),
        ))
    }

    /// Notes the outcome of a sled write: an I/O error leaves sled's instance unable
    /// to write again (see the module docs), so the store stops trying.
    pub(super) fn note_write<T>(&self, result: Result<T, sled::Error>) -> Result<T, StoreError> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if matches!(e, sled::Error::Io(_)) && !self.health.failed.load(Ordering::Acquire) {
                    *self
                        .health
                        .failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                    self.health.failed.store(true, Ordering::Release);
                    tracing::error!(
                        target: "edge_agent::store",
                        error = %e,
                        "store write failed; it takes no more writes until the agent restarts"
                    );
                }
                self.set_write_error(Some(e.to_string()));
                Err(StoreError::Sled(e))
            }
        }
    }

    /// A sled write failed in this process: writes are refused until a restart.
    pub fn has_failed(&self) -> bool {
        self.health.failed.load(Ordering::Acquire)
    }

    /// The last write error, until a commit succeeds again.
    pub fn last_write_error(&self) -> Option<String> {
        self.health
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_write_error(&self, error: Option<String>) {
        *self
            .health
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// The writer's view: commits refused (`blocked`), readings held in memory, and
    /// readings dropped beyond the bound since start.
    pub(super) fn set_hold(&self, blocked: bool, held: u64, dropped: u64) {
        self.health.blocked.store(blocked, Ordering::Release);
        self.health.held.store(held, Ordering::Release);
        self.health.held_dropped.store(dropped, Ordering::Release);
    }

    /// Commits are refused (disk full or a failed write) and the writer holds
    /// what arrives: a known, reported state, not a stuck writer.
    pub fn write_blocked(&self) -> bool {
        self.health.blocked.load(Ordering::Acquire)
    }

    /// Payloads the writer dropped from memory beyond the bound, since start.
    pub fn held_dropped(&self) -> u64 {
        self.health.held_dropped.load(Ordering::Acquire)
    }

    pub(super) fn hold_figures(&self) -> (bool, u64, u64) {
        (
            self.health.blocked.load(Ordering::Acquire),
            self.health.held.load(Ordering::Acquire),
            self.health.held_dropped.load(Ordering::Acquire),
        )
    }

    /// Test double: makes the filesystem read as full (`true`) or as it is.
    #[cfg(test)]
    pub(crate) fn inject_disk_full(&self, full: bool) {
        self.health.inject_full.store(full, Ordering::SeqCst);
    }
}
