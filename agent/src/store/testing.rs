//! Helpers for tests that use real stores in temp dirs.

use std::time::Duration;

use super::{Store, StoreError};
use crate::config::units::ByteSize;
use crate::store::config::StoreConfig;

/// What reached the disk, for a test's model of a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskEvent {
    /// A journal sync's `fdatasync` returned (before anyone is told).
    JournalSynced,
    /// A sled flush returned (before the journal reuses a segment).
    SledFlushed,
}

/// Called on every [`DiskEvent`], with appends held.
pub(crate) type DiskHook = std::sync::Arc<dyn Fn(DiskEvent) + Send + Sync>;

/// A small store config under `dir`.
pub(crate) fn config(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig {
        path: dir.path().join("store"),
        cache_capacity: ByteSize(4 << 20),
        ..StoreConfig::default()
    }
}

/// Opens the store, retrying for a while when the file lock is still held: sled's
/// background threads of a just-dropped instance release it shortly after the drop.
/// (A restart is a new process, where this cannot happen.)
pub(crate) fn open(cfg: &StoreConfig) -> Store {
    let mut opened = None;
    crate::testkit::block_until(
        "the store's file lock released",
        Duration::from_secs(10),
        || match Store::open(cfg) {
            Ok(store) => {
                opened = Some(store);
                true
            }
            Err(StoreError::Open { source, .. })
                if source.to_string().contains("could not acquire lock") =>
            {
                false
            }
            Err(e) => panic!("open store: {e}"),
        },
    );
    // `block_until` returns only once the closure opened the store.
    opened.expect("opened")
}

/// A small tmpfs mounted on a temp dir, unmounted on drop. Needs root to mount (CI
/// runs as root): without it the test fails and says why, rather than passing
/// without having run.
pub(crate) struct SmallFs {
    pub dir: tempfile::TempDir,
}

impl SmallFs {
    pub(crate) fn mount(size: &str) -> SmallFs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test fills a real filesystem: it mounts a {size} tmpfs, which needs root (CI runs the tests as root); run it as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => SmallFs { dir },
            other => panic!(
                "this test fills a real filesystem and cannot mount a {size} tmpfs on {} ({other:?}): it needs root and the `mount` program (util-linux)",
                dir.path().display()
            ),
        }
    }

    /// Fills the filesystem with a file until `leave` bytes are free.
    pub(crate) fn fill_until(&self, leave: u64) -> std::path::PathBuf {
        let filler = self.dir.path().join("filler");
        let free = free_bytes(self.dir.path());
        let file = std::fs::File::create(&filler).expect("create filler");
        let chunk = vec![0xA5u8; 64 << 10];
        let mut left = free.saturating_sub(leave);
        use std::io::Write;
        let mut w = std::io::BufWriter::new(file);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).expect("write filler");
            left -= n as u64;
        }
        w.flush().expect("flush filler");
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: a store left behind after a failed write still holds its files open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Free bytes on the filesystem holding `path`.
pub(crate) fn free_bytes(path: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    super::health::free_space(&c).expect("statvfs")
}
