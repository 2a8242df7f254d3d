//! Where the runtime journal lives (`store.runtime_dir`), and its housekeeping.
//!
//! - `""`: no runtime journal (the journal on disk is written through the page cache,
//!   one `pwrite(2)` per record: `buffered`).
//! - `"auto"` (the default): systemd's `$RUNTIME_DIRECTORY` when the agent runs under
//!   a unit with `RuntimeDirectory=`, else `/dev/shm`; either only if it is a tmpfs
//!   with room for the journal's segments. Otherwise the store says why and runs
//!   `buffered`. The store's journal is `edge-agent-journal-<store id>/` there, with
//!   a file naming the store, so that journals of stores that no longer exist (a
//!   removed store, an agent killed and never started again) are removed by the
//!   next agent that opens a store there.
//! - any other path: that directory (one agent's own: the journals of other stores
//!   in it are removed), `journal-<store id>/`.
//!
//! After a clean stop (the lease closed, everything synced) the runtime journal holds
//! nothing the disk lacks, and it is removed: a tmpfs is memory.

use std::path::{Path, PathBuf};

/// The value of `store.runtime_dir` that picks a tmpfs by itself.
pub const AUTO: &str = "auto";
/// Directory name prefix of a store's runtime journal in a shared tmpfs (`auto`).
const SHARED_PREFIX: &str = "edge-agent-journal-";
/// Directory name prefix in a directory of the agent's own.
const OWN_PREFIX: &str = "journal-";
/// File in a shared runtime journal's directory that names its store's path.
const OWNER_FILE: &str = "store";
/// `statfs(2)`'s filesystem type of a tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The runtime journal's place for one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeJournalDir {
    /// The directory holding the journal's segments.
    pub dir: PathBuf,
    /// In a shared directory (`auto`): other agents may have journals beside it.
    pub shared: bool,
}

/// Where `store.runtime_dir` puts the runtime journal, before the store's id is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    None,
    /// `auto` found this tmpfs.
    Shared(PathBuf),
    /// A directory set in the config.
    Own(PathBuf),
}

impl Location {
    /// Resolves `store.runtime_dir`; `needed` is the bytes of the journal's segments.
    /// `auto` without a usable tmpfs is `None`, with a warning that says why.
    pub fn resolve(runtime_dir: &Path, needed: u64) -> Location {
        if runtime_dir.as_os_str().is_empty() {
            return Location::None;
        }
        if runtime_dir != Path::new(AUTO) {
            return Location::Own(runtime_dir.to_path_buf());
        }
        let systemd = std::env::var_os("RUNTIME_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .map(PathBuf::from)
            })
            .filter(|p| !p.as_os_str().is_empty());
        let candidates = systemd.into_iter().chain([PathBuf::from("/dev/shm")]);
        let mut refused = Vec::new();
        for candidate in candidates {
            match usable_tmpfs(&candidate, needed) {
                Ok(()) => return Location::Shared(candidate),
                Err(why) => refused.push(format!("{}: {why}", candidate.display())),
            }
        }
        tracing::warn!(
            target: "edge_agent::store",
            refused = %refused.join("; "),
            "store.runtime_dir = \"auto\" found no tmpfs for the runtime journal: the journal \
             on disk is written through the page cache (more bytes written per reading, \
             the upstream waits for each sync); set store.runtime_dir to a tmpfs directory"
        );
        Location::None
    }

    /// The journal's directory for the store `store_id`.
    pub fn journal_dir(&self, store_id: u64) -> Option<RuntimeJournalDir> {
        match self {
            Location::None => None,
            Location::Shared(base) => Some(RuntimeJournalDir {
                dir: base.join(format!("{SHARED_PREFIX}{store_id:016x}")),
                shared: true,
            }),
            Location::Own(base) => Some(RuntimeJournalDir {
                dir: base.join(format!("{OWN_PREFIX}{store_id:016x}")),
                shared: false,
            }),
        }
    }
}

/// Whether `dir` is a directory on a tmpfs with at least `needed` bytes free.
fn usable_tmpfs(dir: &Path, needed: u64) -> Result<(), String> {
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "the path contains a NUL byte".to_string())?;
    // SAFETY: `statfs` is plain old data; zeroed is a valid value to be overwritten.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `fs` is valid for writes.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    #[allow(clippy::unnecessary_cast)] // the field's type differs between targets
    let kind = fs.f_type as i64;
    if kind != TMPFS_MAGIC {
        return Err("not a tmpfs".into());
    }
    #[allow(clippy::unnecessary_cast)]
    let free = fs.f_bavail as u64 * fs.f_bsize as u64;
    // Twice the journal: other agents and programs use the same tmpfs.
    if free < needed.saturating_mul(2) {
        return Err(format!(
            "{free} bytes free, the runtime journal needs {needed}"
        ));
    }
    let probe = dir.join(format!(".{SHARED_PREFIX}probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|e| format!("not writable: {e}"))
}

/// Prepares the journal's directory: in a shared directory it names its store, and
/// the journals of stores that no longer exist are removed; in an own directory the
/// journals of other stores are removed (a store removed or moved).
pub fn prepare(journal: &RuntimeJournalDir, store_path: &Path) {
    let Some(parent) = journal.dir.parent() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = if journal.shared {
        SHARED_PREFIX
    } else {
        OWN_PREFIX
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == journal.dir || !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let stale = if journal.shared {
            // Another agent's journal stays while its store exists.
            std::fs::read(path.join(OWNER_FILE))
                .ok()
                .and_then(|owner| String::from_utf8(owner).ok())
                .is_some_and(|owner| !Path::new(&owner).join("db").exists())
        } else {
            true
        };
        if stale {
            remove(&path, "removed the runtime journal of a store that is gone");
        }
    }
    if journal.shared {
        let owner = store_path
            .canonicalize()
            .unwrap_or_else(|_| store_path.to_path_buf());
        let written = std::fs::create_dir_all(&journal.dir).and_then(|()| {
            std::fs::write(
                journal.dir.join(OWNER_FILE),
                owner.as_os_str().as_encoded_bytes(),
            )
        });
        if let Err(e) = written {
            tracing::warn!(
                target: "edge_agent::store",
                dir = %journal.dir.display(), error = %e,
                "cannot name the store in its runtime journal's directory"
            );
        }
    }
}

/// Removes a runtime journal's directory, logging the outcome.
pub fn remove(dir: &Path, why: &'static str) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(target: "edge_agent::store", dir = %dir.display(), "{why}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            target: "edge_agent::store",
            dir = %dir.display(), error = %e,
            "cannot remove a runtime journal"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_none_and_a_path_is_the_agents_own() {
        assert_eq!(Location::resolve(Path::new(""), 1), Location::None);
        let own = Location::resolve(Path::new("/run/edge-agent"), 1);
        assert_eq!(own, Location::Own(PathBuf::from("/run/edge-agent")));
        let dir = own.journal_dir(0xab).expect("a journal dir");
        assert_eq!(
            dir.dir,
            Path::new("/run/edge-agent/journal-00000000000000ab")
        );
        assert!(!dir.shared);
    }

    #[test]
    fn auto_takes_a_tmpfs_and_refuses_other_filesystems() {
        let disk = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            usable_tmpfs(disk.path(), 1),
            Err("not a tmpfs".to_string()),
            "the temp dir ({}) is expected on a disk filesystem",
            disk.path().display()
        );
        // /dev/shm is a tmpfs on Linux machines with a usual /dev; where it is not,
        // auto must not pick it.
        let shm = usable_tmpfs(Path::new("/dev/shm"), 1);
        match Location::resolve(Path::new(AUTO), 1) {
            Location::Shared(p) => {
                assert!(usable_tmpfs(&p, 1).is_ok(), "{} is usable", p.display())
            }
            Location::None => assert!(shm.is_err(), "/dev/shm was usable: {shm:?}"),
            Location::Own(p) => panic!("auto resolved to an own directory {}", p.display()),
        }
        assert!(
            usable_tmpfs(Path::new("/dev/shm"), u64::MAX / 4).is_err(),
            "no tmpfs has room for that"
        );
    }

    #[test]
    fn a_shared_directory_keeps_live_stores_journals_and_removes_gone_ones() {
        let base = tempfile::tempdir().expect("tempdir");
        let live_store = tempfile::tempdir().expect("tempdir");
        std::fs::write(live_store.path().join("db"), b"").expect("db");
        let journal = |id: u64| Location::Shared(base.path().to_path_buf()).journal_dir(id);
        let (live, gone, ours) = (
            journal(1).expect("dir"),
            journal(2).expect("dir"),
            journal(3).expect("dir"),
        );
        prepare(&live, live_store.path());
        prepare(&gone, &base.path().join("removed-store"));
        let unrelated = base.path().join("something-else");
        std::fs::create_dir(&unrelated).expect("mkdir");
        prepare(&ours, &base.path().join("our-store"));
        assert!(
            live.dir.exists(),
            "the journal of a store that exists stays"
        );
        assert!(
            !gone.dir.exists(),
            "the journal of a removed store is removed"
        );
        assert!(unrelated.exists(), "other programs' files are left alone");
        assert!(ours.dir.join(OWNER_FILE).exists());
    }
}
