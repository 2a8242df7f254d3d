//! The store's config section, `[store]`, with its validation.
//!
//! The root [`crate::config::Config`] composes it; this module uses only the config
//! leaf ([`crate::config::units`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{err, ByteSize, ConfigError, HumanDuration};

/// Largest `store.cache_capacity`: sled holds its cache in memory.
pub const MAX_CACHE_CAPACITY: u64 = 1 << 30;
/// Largest `store.quota`.
pub const MAX_QUOTA: u64 = 16 << 40;
/// Largest `store.min_free_space`.
pub const MAX_MIN_FREE_SPACE: u64 = 1 << 40;
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// sled's page cache. sled's memory is not bounded by this, but it is the main knob.
    pub cache_capacity: ByteSize,
    /// The longest a record waits to be appended to the journal with others.
    pub flush_interval: HumanDuration,
    /// Group commit: flush early once this many records are pending.
    pub max_batch: usize,
    /// Upper bound for the store's files on disk. Enforced on the live data, which
    /// gets `(quota - 8MiB) / 2` (sled's files run up to about twice the live data);
    /// when it is reached the oldest records are deleted, acknowledged ones first,
    /// unacknowledged ones counted as dropped.
    pub quota: ByteSize,
    /// Free space the store leaves on its filesystem: with less, commits are refused
    /// (disk full) and readings wait in memory until space returns.
    pub min_free_space: ByteSize,
    /// Most readings (and other records) held in memory while the store cannot
    /// write; beyond it the oldest are dropped and counted.
    pub hold_readings: usize,
    /// Compress the store's pages on disk (zstd): several times less disk space and
    /// fewer bytes written per reading (SD-card wear). Fixed when a store is created:
    /// an existing store keeps the setting it was created with.
    pub compress: bool,
    /// The journal is synced (fdatasync) at least this often: a power cut loses at
    /// most this much of the polled readings. Pushes and the upstream never wait
    /// for it (they ask for a sync of their own).
    pub sync_interval: HumanDuration,
    /// Directory of the journal's segment files; empty: `journal` inside `path`.
    pub journal_dir: PathBuf,
    /// Bytes of each preallocated journal segment.
    pub journal_segment_size: ByteSize,
    /// Number of journal segments (at least 2).
    pub journal_segments: usize,
    /// Sync at once when the upstream waits for records that wait for their sync
    /// (lag: the sync's latency); otherwise they go with the next periodic sync (lag
    /// up to `sync_interval`, fewer syncs and bytes written).
    pub upstream_sync_now: bool,
    /// Directory on a tmpfs (`/run/edge-agent` in the package) for the kill-safe
    /// runtime journal; `auto`: systemd's `$RUNTIME_DIRECTORY` or `/dev/shm`, where it
    /// is a tmpfs with room (`runtime_dir.rs`); empty: none (the journal on disk is
    /// written through the page cache, one `pwrite` per append).
    pub runtime_dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/edge-agent/store"),
            cache_capacity: ByteSize(8 << 20),
            flush_interval: HumanDuration(Duration::from_millis(10)),
            max_batch: 1000,
            quota: ByteSize(1 << 30),
            min_free_space: ByteSize(32 << 20),
            hold_readings: 10_000,
            compress: true,
            sync_interval: HumanDuration(Duration::from_secs(1)),
            journal_dir: PathBuf::new(),
            journal_segment_size: ByteSize(1 << 20),
            journal_segments: 4,
            upstream_sync_now: false,
            runtime_dir: PathBuf::from(super::runtime_dir::AUTO),
        }
    }
}

impl StoreConfig {
    /// Where the journal's segments are.
    pub fn journal_path(&self) -> PathBuf {
        if self.journal_dir.as_os_str().is_empty() {
            self.path.join("journal")
        } else {
            self.journal_dir.clone()
        }
    }
}

impl StoreConfig {
    /// Checks the section's ranges.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.flush_interval.0.is_zero() {
            errors.push(err("store.flush_interval", "must be greater than zero"));
        }
        let sync = self.sync_interval.0;
        if sync.is_zero() || sync > Duration::from_secs(60) {
            errors.push(err("store.sync_interval", "must be between 1ms and 60s"));
        }
        if !(64 << 10..=1 << 30).contains(&self.journal_segment_size.0) {
            errors.push(err(
                "store.journal_segment_size",
                "must be between 64KiB and 1GiB",
            ));
        }
        if !(2..=64).contains(&self.journal_segments) {
            errors.push(err("store.journal_segments", "must be between 2 and 64"));
        }
        if self.max_batch == 0 {
            errors.push(err("store.max_batch", "must be at least 1"));
        }
        if self.cache_capacity.0 < (1 << 20) {
            errors.push(err("store.cache_capacity", "must be at least 1MiB"));
        } else if self.cache_capacity.0 > MAX_CACHE_CAPACITY {
            errors.push(err(
                "store.cache_capacity",
                "must be at most 1GiB (it is held in memory)",
            ));
        }
        if self.quota.0 < (16 << 20) {
            errors.push(err(
                "store.quota",
                "must be at least 16MiB (8MiB of it is room for sled's segments)",
            ));
        } else if self.quota.0 > MAX_QUOTA {
            errors.push(err("store.quota", "must be at most 16TiB"));
        }
        if self.min_free_space.0 < (2 << 20) {
            errors.push(err(
                "store.min_free_space",
                "must be at least 2MiB (sled allocates its file in 512KiB segments)",
            ));
        } else if self.min_free_space.0 > MAX_MIN_FREE_SPACE {
            errors.push(err("store.min_free_space", "must be at most 1TiB"));
        }
        if self.hold_readings == 0 {
            errors.push(err("store.hold_readings", "must be at least 1"));
        }
        if self.path.as_os_str().is_empty() {
            errors.push(err("store.path", "must not be empty"));
        }
    }
}
