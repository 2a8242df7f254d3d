//! Helpers for tests that use real stores in temp dirs.

use std::time::{Duration, Instant};

use super::{Store, StoreError};
use crate::config::{ByteSize, StoreConfig};

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
    let start = Instant::now();
    loop {
        match Store::open(cfg) {
            Ok(store) => return store,
            Err(StoreError::Open { source, .. })
                if start.elapsed() < Duration::from_secs(10)
                    && source.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open store: {e}"),
        }
    }
}
