//! What the upstream sync needs from the store: records as their exact stored bytes
//! (so a manifest's CRC can be checked upstream), and durable marks such as the
//! outbox cursor, kept in their own `outbox` tree.
//!
//! | tree     | key         | value                                              |
//! |----------|-------------|----------------------------------------------------|
//! | `outbox` | `cursor`    | big-endian u64: highest contiguous acknowledged seq |
//! | `outbox` | `manifested`| big-endian u64: last seq covered by a manifest      |

use super::{
    crc32c, key_seq, known_version, read_u32, seq_key, Crc32c, Store, StoreError, FRAME_OVERHEAD,
    MAX_BLOCK_SPAN,
};

pub(super) const TREE_OUTBOX: &str = "outbox";
/// The mark of the highest contiguous acknowledged seq: the quota's acknowledged
/// floor follows it (`quota.rs`).
pub const CURSOR_MARK: &str = "cursor";

/// One record as stored (`codec.rs`, or the CBOR of `model::Record` in a version 1
/// block) whose CRC-32C checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub seq: u64,
    pub bytes: Vec<u8>,
}

/// Result of [`Store::read_raw`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRange {
    /// Readable records in seq order (quarantined and compacted seqs are absent).
    pub records: Vec<RawRecord>,
    /// Every seq up to here (from the requested start) was looked at: the next read
    /// starts after it. Equals the request's start minus one when nothing was read.
    pub covered_to: u64,
    /// Sum of the records' byte lengths.
    pub bytes: usize,
}

/// What [`Store::visit_raw`] walked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawWalk {
    /// As [`RawRange::covered_to`].
    pub covered_to: u64,
    /// Records handed to the visitor.
    pub records: usize,
    /// Sum of their byte lengths.
    pub bytes: usize,
}

/// Count and CRC-32C of a range's stored bytes, in seq order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeDigest {
    pub count: u64,
    pub crc32c: u32,
}

impl Store {
    /// Stored bytes of the records with `from <= seq <= to`, in order, stopping at
    /// `max_records` records or once `max_bytes` is reached (always at least one
    /// record when one is readable). Frames whose CRC fails are quarantined and
    /// skipped, as by [`Store::read_range`].
    pub fn read_raw(
        &self,
        from: u64,
        to: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<RawRange, StoreError> {
        let mut records = Vec::new();
        let walk = self.visit_raw(from, to, max_records, max_bytes, &mut |seq, bytes| {
            records.push(RawRecord {
                seq,
                bytes: bytes.to_vec(),
            })
        })?;
        Ok(RawRange {
            records,
            covered_to: walk.covered_to,
            bytes: walk.bytes,
        })
    }

    /// [`Store::read_raw`] without copies: hands each readable record's stored bytes
    /// to `visit` (seq, bytes) straight from the block, in seq order.
    pub fn visit_raw(
        &self,
        from: u64,
        to: u64,
        max_records: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<RawWalk, StoreError> {
        let from = from.max(1);
        let to = to.min(self.last_seq());
        let mut out = RawWalk {
            covered_to: from - 1,
            ..RawWalk::default()
        };
        if from > to {
            return Ok(out);
        }
        let mut bad: Vec<(u64, Vec<u8>, &'static str)> = Vec::new();
        let full = |out: &RawWalk| {
            out.records >= max_records.max(1) || (out.bytes >= max_bytes && out.bytes > 0)
        };
        'blocks: for block in self.blocks_from(from)? {
            let block = block?;
            let (first, v): (u64, &[u8]) = (block.first, &block.value);
            if first > to {
                break;
            }
            let end = block
                .next_first
                .unwrap_or(to + 1)
                .min(first.saturating_add(MAX_BLOCK_SPAN));
            // Seqs before this block that no block holds (compacted) are passed over.
            if first > out.covered_to + 1 {
                if full(&out) {
                    break;
                }
                out.covered_to = (first - 1).min(to);
            }
            let mut pos = 1;
            let mut seq = first;
            let framed = known_version(v);
            while framed && pos < v.len() && seq < end && seq <= to {
                let Some(len) = read_u32(v, pos).map(|l| l as usize) else {
                    break;
                };
                if pos + len + FRAME_OVERHEAD > v.len() {
                    break;
                }
                let body = &v[pos + 4..pos + 4 + len];
                let stored = read_u32(v, pos + 4 + len);
                let frame = &v[pos..pos + len + FRAME_OVERHEAD];
                pos += len + FRAME_OVERHEAD;
                let this = seq;
                seq += 1;
                if this < from {
                    continue;
                }
                if full(&out) {
                    break 'blocks;
                }
                if stored == Some(crc32c(body)) {
                    out.bytes += body.len();
                    out.records += 1;
                    visit(this, body);
                } else {
                    bad.push((this, frame.to_vec(), "CRC mismatch"));
                }
                out.covered_to = this;
            }
            // A block whose framing breaks early: the seqs it should still hold are
            // unreadable; `read_range` quarantines them, here they are passed over.
            let block_end = end.min(to + 1);
            if seq < block_end && out.covered_to < block_end - 1 && !full(&out) {
                out.covered_to = block_end - 1;
            }
        }
        // Unless a limit stopped the walk, nothing readable is left up to `to`.
        if !full(&out) {
            out.covered_to = to;
        }
        for (seq, raw, reason) in bad {
            self.quarantine_record(seq, &raw, reason);
        }
        Ok(out)
    }

    /// Count and CRC-32C over the stored bytes of the readable records in
    /// `from..=to`, in seq order: what a manifest vouches for.
    pub fn digest_range(&self, from: u64, to: u64) -> Result<RangeDigest, StoreError> {
        let mut digest = Crc32c::new();
        let mut count = 0;
        let mut next = from.max(1);
        while next <= to {
            let walk = self.visit_raw(next, to, 4096, 4 << 20, &mut |_, bytes| {
                digest.update(bytes);
                count += 1;
            })?;
            if walk.covered_to < next {
                break;
            }
            next = walk.covered_to + 1;
        }
        Ok(RangeDigest {
            count,
            crc32c: digest.finalize(),
        })
    }

    /// The encoded schema `id` that compact readings refer to (`codec.rs`), as a
    /// batch carries it upstream. Schemas are kept for the store's lifetime.
    pub fn schema_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.schemas.encoded(id)
    }

    /// Decodes a record's stored bytes (compact or version 1 CBOR).
    pub fn decode_stored(
        &self,
        bytes: &[u8],
    ) -> Result<crate::model::Record, super::codec::DecodeError> {
        super::codec::decode_stored(bytes, &|id| self.schemas.get(id))
    }

    /// A durable mark of the upstream sync (`cursor`, `manifested`); 0 when unset.
    pub fn sync_mark(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .outbox
            .get(name.as_bytes())?
            .and_then(|v| key_seq(&v))
            .unwrap_or(0))
    }

    /// Sets a mark and makes it durable with a journal sync (one sync covers the
    /// journal, the mark and any other written since: never an fsync of its own):
    /// when this returns, the mark survives a power cut. Once [`CURSOR_MARK`] is
    /// durable, the records up to it count as acknowledged for the quota.
    pub fn set_sync_mark(&self, name: &str, value: u64) -> Result<(), StoreError> {
        self.set_sync_mark_lazily(name, value)?;
        self.sync()?;
        if name == CURSOR_MARK {
            self.set_acked(value);
        }
        Ok(())
    }

    /// [`Store::set_sync_mark`] that waits for the next journal sync (the writer's,
    /// at most `store.sync_interval` away) instead of one of its own: the journal
    /// and the mark share one sync. Syncs itself if none started within the interval
    /// (no writer running, nothing appended).
    pub fn set_sync_mark_with_next_sync(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let after = self.syncs_started();
        self.set_sync_mark_lazily(name, value)?;
        if !self.wait_for_sync_after(after, self.sync_interval()) {
            self.sync()?;
        }
        self.check_failed()?;
        if name == CURSOR_MARK {
            self.set_acked(value);
        }
        Ok(())
    }

    /// Writes a mark that becomes durable with the next journal sync; a crash before
    /// that keeps the previous value. For marks whose loss only repeats work.
    pub fn set_sync_mark_lazily(&self, name: &str, value: u64) -> Result<(), StoreError> {
        self.check_failed()?;
        self.note_write(self.outbox.insert(name.as_bytes(), &seq_key(value)))?;
        self.journal_mark(name, value)
    }
}

/// Takes in the marks a journal replay found (`Store::journal_mark`: name length,
/// name, big-endian u64), newest last: a mark the journal holds is at least as new
/// as sled's copy, since marks only grow, the larger value wins. Written into sled
/// unflushed: the journal keeps its segments until a sled flush.
pub(super) fn restore_marks(outbox: &sled::Tree, marks: Vec<Vec<u8>>) -> Result<(), sled::Error> {
    for mark in marks {
        let Some((&len, rest)) = mark.split_first() else {
            continue;
        };
        let (name, value) = rest.split_at(usize::from(len).min(rest.len()));
        let Some(value) = key_seq(value) else {
            continue;
        };
        let stored = outbox.get(name)?.and_then(|v| key_seq(&v)).unwrap_or(0);
        if value > stored {
            outbox.insert(name, &seq_key(value))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Payload, Reading, Record};
    use crate::store::config::StoreConfig;

    fn reading(i: i64) -> Payload {
        Payload::Reading(Reading {
            meter: format!("m{}", i % 3),
            ts_ms: 1_700_000_000_000 + i,
            values: vec![],
        })
    }

    fn open(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("db"),
            ..StoreConfig::default()
        })
        .expect("open store")
    }

    #[test]
    fn raw_records_are_the_stored_bytes_in_order_within_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        for chunk in 0..10 {
            store
                .append((0..50).map(|i| reading(chunk * 50 + i)).collect())
                .expect("append");
        }
        let got = store.read_raw(7, 400, 100, usize::MAX).expect("read");
        assert_eq!(got.records.len(), 100);
        assert_eq!(got.covered_to, 106);
        for (i, rec) in got.records.iter().enumerate() {
            assert_eq!(rec.seq, 7 + i as u64);
            let decoded: Record = store.decode_stored(&rec.bytes).expect("a record");
            assert_eq!(decoded.seq, rec.seq);
            assert_eq!(decoded.payload, reading(rec.seq as i64 - 1));
        }
        let one = got.records[0].bytes.len();
        let by_bytes = store.read_raw(1, 500, 1000, one * 3).expect("read");
        assert_eq!(by_bytes.records.len(), 3);
        let tail = store.read_raw(480, 900, 1000, usize::MAX).expect("read");
        assert_eq!(tail.records.len(), 21);
        assert_eq!(tail.covered_to, 500);
        let none = store.read_raw(501, 900, 10, 10).expect("read");
        assert!(none.records.is_empty());
        assert_eq!(none.covered_to, 500);
    }

    #[test]
    fn digest_is_crc_of_concatenated_stored_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store
            .append((0..100).map(reading).collect())
            .expect("append");
        let raw = store.read_raw(10, 60, 1000, usize::MAX).expect("read");
        let all: Vec<u8> = raw.records.iter().flat_map(|r| r.bytes.clone()).collect();
        let d = store.digest_range(10, 60).expect("digest");
        assert_eq!(d.count, 51);
        assert_eq!(d.crc32c, crc32c(&all));
    }

    #[test]
    fn marks_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open(dir.path());
            assert_eq!(store.sync_mark("cursor").expect("mark"), 0);
            store.set_sync_mark("cursor", 42).expect("set");
        }
        let store = open(dir.path());
        assert_eq!(store.sync_mark("cursor").expect("mark"), 42);
    }
}
