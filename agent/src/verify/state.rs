//! The verifier's own store (`--state DIR`): one sled tree, one entry per gateway,
//! holding what [`GwState`] keeps (received seqs as ranges, dropped ranges, the CRCs
//! of records a manifest has yet to cover, counters, schemas).
//!
//! An entry is `[version: u8][CRC-32C of the body: u32 LE][body: CBOR]`; an entry
//! whose CRC does not match is skipped with a warning (that gateway starts afresh).
//! The client id of the persistent MQTT session is kept in the same store, so that a
//! restart without `--client-id` resumes the same session.

use std::path::Path;

use anyhow::Context;

use super::tracker::GwState;
use crate::store::crc32c;

const VERSION: u8 = 1;
const CLIENT_ID: &[u8] = b"client_id";

/// The verifier's store.
#[derive(Clone)]
pub struct StateStore {
    db: sled::Db,
    gateways: sled::Tree,
}

/// What [`StateStore::load`] read.
pub struct Loaded {
    pub gateways: Vec<(String, GwState)>,
    /// Entries skipped: bad CRC, unknown version, or undecodable.
    pub corrupt: u64,
}

pub fn encode(state: &GwState) -> Vec<u8> {
    let mut body = Vec::new();
    // Writing CBOR into a Vec cannot fail for these plain types.
    let _ = ciborium::into_writer(state, &mut body);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(VERSION);
    out.extend_from_slice(&crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode(bytes: &[u8]) -> Result<GwState, String> {
    if bytes.len() < 5 {
        return Err("entry shorter than its header".into());
    }
    if bytes[0] != VERSION {
        return Err(format!("entry version {}, expected {VERSION}", bytes[0]));
    }
    let body = &bytes[5..];
    let crc = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    if crc32c(body) != crc {
        return Err("CRC-32C does not match".into());
    }
    ciborium::from_reader(body).map_err(|e| format!("not a gateway state: {e}"))
}

impl StateStore {
    pub fn open(dir: &Path) -> anyhow::Result<StateStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("--state {}", dir.display()))?;
        let cfg = sled::Config::new()
            .path(dir.join("verify.sled"))
            .cache_capacity(8 << 20)
            .flush_every_ms(None);
        // A verifier restarted in the same process (tests) may find the lock still
        // held by the one before for a moment.
        let db = crate::store::open_locked(&cfg)
            .with_context(|| format!("--state {}: open the verifier's store", dir.display()))?;
        let gateways = db.open_tree("gateways")?;
        Ok(StateStore { db, gateways })
    }

    pub fn load(&self) -> anyhow::Result<Loaded> {
        let mut loaded = Loaded {
            gateways: Vec::new(),
            corrupt: 0,
        };
        for entry in self.gateways.iter() {
            let (key, value) = entry?;
            let gw = String::from_utf8_lossy(&key).into_owned();
            match decode(&value) {
                Ok(state) => loaded.gateways.push((gw, state)),
                Err(e) => {
                    loaded.corrupt += 1;
                    tracing::warn!(target: "edge_agent::verify", gateway = gw, error = e, "the verifier's state of this gateway is unreadable: it starts afresh");
                }
            }
        }
        Ok(loaded)
    }

    /// Writes the gateways' states and waits until they are on disk.
    pub fn save(&self, states: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        for (gw, bytes) in states {
            batch.insert(gw.as_bytes(), bytes.as_slice());
        }
        self.gateways.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// The client id kept from an earlier run, or `fresh` (then kept).
    pub fn client_id(&self, fresh: &str) -> anyhow::Result<String> {
        if let Some(id) = self.db.get(CLIENT_ID)? {
            if let Ok(id) = std::str::from_utf8(&id) {
                return Ok(id.to_string());
            }
        }
        self.db.insert(CLIENT_ID, fresh.as_bytes())?;
        self.db.flush()?;
        Ok(fresh.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_flipped_bit_is_caught() {
        let state = GwState {
            received: vec![(1, 100), (120, 130)],
            received_count: 111,
            max_seen: 130,
            crcs: vec![(129, 7, 30), (130, 8, 31)],
            ..GwState::default()
        };
        let bytes = encode(&state);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back.received, state.received);
        assert_eq!(back.crcs, state.crcs);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("CRC"));
        assert!(decode(&bytes[..3]).is_err());
    }

    #[test]
    fn the_store_keeps_states_and_the_client_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = StateStore::open(dir.path()).expect("open");
            let state = GwState {
                received: vec![(1, 5)],
                ..GwState::default()
            };
            store
                .save(&[("gw".to_string(), encode(&state))])
                .expect("save");
            assert_eq!(store.client_id("first").expect("id"), "first");
        }
        let store = StateStore::open(dir.path()).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.gateways.len(), 1);
        assert_eq!(loaded.gateways[0].1.received, vec![(1, 5)]);
        assert_eq!(store.client_id("second").expect("id"), "first");
    }
}
