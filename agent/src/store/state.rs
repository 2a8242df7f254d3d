//! Derived state that must survive a restart (alarm counters, interval tracker
//! state, cluster results): a small key-value tree `state`.
//!
//! A value is stored as `[u8 version=1] [CBOR of the value] [u32 LE CRC-32C of the
//! CBOR]`. A value whose CRC fails or that does not decode is an error for the
//! caller, never a silently wrong or default value. Writes are flushed before
//! [`Store::put_state`] returns. Keys are UTF-8 strings; use a `/`-separated
//! namespace such as `alarm/main/0` so [`Store::state_keys`] can list one kind.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{crc32c, Store, StoreError};

pub(super) const TREE_STATE: &str = "state";
const STATE_V1: u8 = 1;

/// Errors of the state tree.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state `{key}` cannot be encoded: {reason}")]
    Encode { key: String, reason: String },
    /// The stored bytes fail their CRC, carry an unknown version or do not decode
    /// as the requested type.
    #[error("state `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// An encoded state value, for [`Store::put_states`].
#[derive(Debug, Clone)]
pub struct StateEntry {
    key: String,
    bytes: Vec<u8>,
}

impl StateEntry {
    /// Encodes `value` for `key` (version byte, CBOR, CRC).
    pub fn new<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<StateEntry, StateError> {
        let mut buf = vec![STATE_V1];
        ciborium::into_writer(value, &mut buf).map_err(|e| StateError::Encode {
            key: key.into(),
            reason: e.to_string(),
        })?;
        let crc = crc32c(&buf[1..]);
        buf.extend_from_slice(&crc.to_le_bytes());
        Ok(StateEntry {
            key: key.to_string(),
            bytes: buf,
        })
    }
}

impl Store {
    /// Stores `value` under `key`, durable when this returns `Ok`.
    pub fn put_state<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StateError> {
        self.put_states(vec![StateEntry::new(key, value)?])
    }

    /// Stores several values as one atomic batch (all or none after a crash), with
    /// one flush; durable when this returns `Ok`.
    pub fn put_states(&self, entries: Vec<StateEntry>) -> Result<(), StateError> {
        self.put_states_deferred(entries)?;
        self.note_write(self.db.flush())?;
        Ok(())
    }

    /// Stores several values as one atomic batch, visible to readers at once but
    /// durable only with the store's next flush (a journal segment's reuse, a
    /// [`Store::put_states`], or the close). For state that a crash may take back to
    /// an earlier batch, because its writer rebuilds it from the log: a flush costs
    /// an `fsync` and whole pages on an SD card.
    pub fn put_states_deferred(&self, entries: Vec<StateEntry>) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(entry.key.as_bytes(), entry.bytes);
        }
        self.note_write(self.state.apply_batch(batch))?;
        Ok(())
    }

    /// The value under `key`, `None` when there is none.
    pub fn get_state<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        let Some(bytes) = self.state.get(key.as_bytes()).map_err(StoreError::from)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StateError::Corrupt {
            key: key.into(),
            reason,
        };
        if bytes.first() != Some(&STATE_V1) {
            return Err(corrupt(format!("unknown version byte {:?}", bytes.first())));
        }
        if bytes.len() < 5 {
            return Err(corrupt(format!("{} bytes is too short", bytes.len())));
        }
        let (body, crc) = bytes[1..].split_at(bytes.len() - 5);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if stored != crc32c(body) {
            return Err(corrupt("CRC mismatch".into()));
        }
        ciborium::from_reader(body)
            .map(Some)
            .map_err(|e| corrupt(format!("does not decode: {e}")))
    }

    /// Removes `key`; flushed before returning. True when it existed.
    pub fn delete_state(&self, key: &str) -> Result<bool, StateError> {
        let old = self.note_write(self.state.remove(key.as_bytes()))?;
        self.note_write(self.db.flush())?;
        Ok(old.is_some())
    }

    /// The keys starting with `prefix`, sorted.
    pub fn state_keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut keys = Vec::new();
        for key in self.state.scan_prefix(prefix.as_bytes()).keys() {
            let key = key.map_err(StoreError::from)?;
            keys.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::testing::{config as cfg, open};

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Alarm {
        count: u32,
        raised: bool,
        last_ts: i64,
        centres: Vec<f64>,
    }

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = Alarm {
            count: 3,
            raised: true,
            last_ts: -7,
            centres: vec![0.1, 1234.5, f64::MAX],
        };
        let store = open(&cfg(&dir));
        store.put_state("alarm/main/0", &a).unwrap();
        store.put_state("alarm/pv/0", &1u8).unwrap();
        store.put_state("clusters/main", "x").unwrap();
        store.put_state("alarm/main/0", &a).unwrap();
        drop(store);

        let store = open(&cfg(&dir));
        assert_eq!(store.get_state::<Alarm>("alarm/main/0").unwrap(), Some(a));
        assert_eq!(store.get_state::<u8>("alarm/pv/0").unwrap(), Some(1));
        assert_eq!(store.get_state::<u8>("alarm/none").unwrap(), None);
        assert_eq!(
            store.state_keys("alarm/").unwrap(),
            vec!["alarm/main/0".to_string(), "alarm/pv/0".to_string()]
        );
        assert_eq!(store.state_keys("").unwrap().len(), 3);
        assert!(store.delete_state("alarm/pv/0").unwrap());
        assert!(!store.delete_state("alarm/pv/0").unwrap());
        drop(store);
        let store = open(&cfg(&dir));
        assert_eq!(store.state_keys("alarm/").unwrap(), vec!["alarm/main/0"]);
        // State is not part of the record log.
        assert_eq!(store.last_seq(), 0);
    }

    #[test]
    fn a_deferred_batch_is_visible_at_once_and_written_with_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(&dir);
        let store = open(&cfg);
        store.put_state("flushed/0", &1u32).unwrap();
        // sled writes its log only when flushed (or when a log buffer fills).
        let log_bytes = || std::fs::metadata(cfg.path.join("db")).unwrap().len();
        let before = log_bytes();
        // 32 KiB that do not compress below 16 KiB: were they written, the log would
        // show it (sled may write a few bytes of its own).
        let noise: String = (0..32 * 1024)
            .map(|_| char::from_digit(rand::random::<u32>() % 16, 16).unwrap_or('0'))
            .collect();
        let entries = vec![
            StateEntry::new("deferred/0", &2u32).unwrap(),
            StateEntry::new("deferred/1", &noise).unwrap(),
        ];
        store.put_states_deferred(entries).unwrap();
        assert_eq!(store.get_state::<u32>("deferred/0").unwrap(), Some(2));
        assert_eq!(
            store.get_state::<String>("deferred/1").unwrap().as_ref(),
            Some(&noise)
        );
        let grown = log_bytes() - before;
        assert!(
            grown < 1024,
            "a deferred batch wrote {grown} bytes to the log"
        );
        store.put_state("flushed/1", &3u32).unwrap();
        let grown = log_bytes() - before;
        assert!(grown > 16 * 1024, "the flush wrote only {grown} bytes");
        drop(store);

        let store = open(&cfg);
        assert_eq!(store.get_state::<u32>("deferred/0").unwrap(), Some(2));
        assert_eq!(
            store.get_state::<String>("deferred/1").unwrap().as_ref(),
            Some(&noise)
        );
        assert_eq!(store.get_state::<u32>("flushed/1").unwrap(), Some(3));
    }

    #[test]
    fn corrupt_value_is_an_error_never_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        store.put_state("k", &12_345u32).unwrap();
        let good = store.state.get("k").unwrap().unwrap().to_vec();

        // One flipped bit in the CBOR body: still decodes, but the CRC catches it.
        let mut flipped = good.clone();
        flipped[2] ^= 0x01;
        store.state.insert("k", flipped).unwrap();
        let err = store.get_state::<u32>("k").unwrap_err();
        assert!(
            matches!(&err, StateError::Corrupt { key, reason } if key == "k" && reason.contains("CRC")),
            "{err}"
        );

        let mut version = good.clone();
        version[0] = 9;
        store.state.insert("k", version).unwrap();
        assert!(matches!(
            store.get_state::<u32>("k"),
            Err(StateError::Corrupt { .. })
        ));

        store.state.insert("k", &good[..3]).unwrap();
        assert!(matches!(
            store.get_state::<u32>("k"),
            Err(StateError::Corrupt { .. })
        ));

        // Intact bytes of another type: a decode error, not a wrong value.
        store.state.insert("k", good).unwrap();
        assert_eq!(store.get_state::<u32>("k").unwrap(), Some(12_345));
        assert!(matches!(
            store.get_state::<String>("k"),
            Err(StateError::Corrupt { .. })
        ));
    }
}
