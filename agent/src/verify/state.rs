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

use super::tracker::{CrcChunk, GwState};
use crate::store::crc32c;

const VERSION: u8 = 1;
const CLIENT_ID: &[u8] = b"client_id";
/// Most CRCs taken back per gateway (the tracker's cap is lower unless raised).
const MAX_LOADED_CRCS: usize = 1 << 20;

/// The verifier's store.
#[derive(Clone)]
pub struct StateStore {
    db: sled::Db,
    gateways: sled::Tree,
    /// `gw ++ 0x00 ++ chunk (u64 BE)` -> the chunk's entries ([`CrcChunk`]): the CRCs
    /// a manifest has yet to cover.
    crcs: sled::Tree,
}

/// The key of one chunk of kept CRCs (a gateway id never holds U+0000: MQTT forbids
/// it in topic names).
fn crc_key(gw: &str, chunk: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(gw.len() + 9);
    key.extend_from_slice(gw.as_bytes());
    key.push(0);
    key.extend_from_slice(&chunk.to_be_bytes());
    key
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
        let db = sled::Config::new()
            .path(dir.join("verify.sled"))
            .cache_capacity(8 << 20)
            .flush_every_ms(None)
            .open()
            .with_context(|| format!("--state {}: open the verifier's store", dir.display()))?;
        let gateways = db.open_tree("gateways")?;
        let crcs = db.open_tree("crcs")?;
        Ok(StateStore { db, gateways, crcs })
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
        // The kept CRCs, in key order: by gateway, then by chunk.
        let mut at = 0;
        for entry in self.crcs.iter() {
            let (key, value) = entry?;
            let Some(split) = key.len().checked_sub(9) else {
                continue;
            };
            let gw = &key[..split];
            while at < loaded.gateways.len() && loaded.gateways[at].0.as_bytes() < gw {
                at += 1;
            }
            let Some((id, state)) = loaded.gateways.get_mut(at) else {
                continue;
            };
            if id.as_bytes() != gw {
                continue;
            }
            for e in value.chunks_exact(16) {
                if state.crcs.len() >= MAX_LOADED_CRCS {
                    break;
                }
                let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
                let seq = u64::from(word(0)) | (u64::from(word(4)) << 32);
                state.crcs.push((seq, word(8), word(12)));
            }
        }
        Ok(loaded)
    }

    /// Writes the gateways' states and changed CRC chunks, and waits until they are
    /// on disk.
    pub fn save(&self, states: &[(String, Vec<u8>, Vec<CrcChunk>)]) -> anyhow::Result<()> {
        let mut batch = sled::Batch::default();
        let mut crcs = sled::Batch::default();
        for (gw, bytes, chunks) in states {
            batch.insert(gw.as_bytes(), bytes.as_slice());
            for (chunk, entries) in chunks {
                if entries.is_empty() {
                    crcs.remove(crc_key(gw, *chunk));
                } else {
                    crcs.insert(crc_key(gw, *chunk), entries.as_slice());
                }
            }
        }
        self.crcs.apply_batch(crcs)?;
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
            ..GwState::default()
        };
        let bytes = encode(&state);
        let back = decode(&bytes).expect("decodes");
        assert_eq!(back.received, state.received);
        assert_eq!(back.received_count, 111);
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
            let entry = |seq: u64, crc: u32, len: u32| {
                let mut e = seq.to_le_bytes().to_vec();
                e.extend_from_slice(&crc.to_le_bytes());
                e.extend_from_slice(&len.to_le_bytes());
                e
            };
            let chunk0 = [entry(7, 70, 700), entry(8, 80, 800)].concat();
            let chunk1 = entry(300, 90, 900);
            store
                .save(&[(
                    "gw".to_string(),
                    encode(&state),
                    vec![(0, chunk0), (1, chunk1)],
                )])
                .expect("save");
            // Chunk 0 rewritten with 7 only.
            store
                .save(&[(
                    "gw".to_string(),
                    encode(&state),
                    vec![(0, entry(7, 70, 700))],
                )])
                .expect("save");
            assert_eq!(store.client_id("first").expect("id"), "first");
        }
        let store = StateStore::open(dir.path()).expect("reopen");
        let loaded = store.load().expect("load");
        assert_eq!(loaded.gateways.len(), 1);
        assert_eq!(loaded.gateways[0].1.received, vec![(1, 5)]);
        assert_eq!(
            loaded.gateways[0].1.crcs,
            vec![(7, 70, 700), (300, 90, 900)]
        );
        assert_eq!(store.client_id("second").expect("id"), "first");
    }
}
