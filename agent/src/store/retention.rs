//! Retention: deleting the oldest blocks once they are acknowledged upstream and old
//! enough. Deletes go a few blocks at a time (sled's memory and files grow with big
//! delete passes, DESIGN §3), never past the outbox cursor, and through the same
//! accounted deletion as the quota (`quota.rs`).

use super::{Store, StoreError};

impl Store {
    /// Deletes, oldest first, at most `max_blocks` whole blocks whose every record
    /// has `seq <= acked` and whose newest record is older than `before_ms` (Unix
    /// ms), with their index entries. Returns the number of records deleted. The
    /// deletion is durable with the next commit's flush (`quota.rs`).
    pub fn compact(
        &self,
        acked: u64,
        before_ms: i64,
        max_blocks: usize,
    ) -> Result<u64, StoreError> {
        let acked = acked.min(self.last_seq());
        let deleted = self.delete_front(max_blocks, |block| {
            let newest = block.records.iter().map(|r| r.payload.ts_ms()).max();
            block.last <= acked && newest.map_or(true, |ts| ts < before_ms)
        })?;
        Ok(deleted.last.saturating_sub(deleted.first) + u64::from(deleted.blocks > 0))
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Payload, Reading};
    use crate::store::config::StoreConfig;
    use crate::store::Store;

    fn reading(ts_ms: i64) -> Payload {
        Payload::Reading(Reading {
            meter: "m".into(),
            ts_ms,
            values: vec![],
        })
    }

    #[test]
    fn compacts_only_old_acknowledged_blocks_a_few_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Blocks of exactly 32 records: a store that does not pack them.
        let store = Store::open(&StoreConfig {
            path: dir.path().join("db"),
            compress: false,
            ..StoreConfig::default()
        })
        .expect("open");
        // 10 blocks of 32 records with timestamps 0..320 s.
        store
            .append((0..320).map(|i| reading(i * 1000)).collect())
            .expect("append");
        // Nothing acknowledged: nothing goes.
        assert_eq!(store.compact(0, i64::MAX, 100).expect("compact"), 0);
        // Acknowledged up to 200, old enough: blocks ending at or before 192, two per call.
        assert_eq!(store.compact(200, i64::MAX, 2).expect("compact"), 64);
        assert_eq!(store.stats().first_seq, 65);
        assert_eq!(store.compact(200, i64::MAX, 100).expect("compact"), 128);
        assert_eq!(store.stats().first_seq, 193);
        // Younger than the cutoff: kept even when acknowledged.
        assert_eq!(store.compact(320, 200_000, 100).expect("compact"), 0);
        let left = store.read_range(1, 320).expect("read");
        assert_eq!(left.first().map(|r| r.seq), Some(193));
        assert_eq!(left.len(), 128);
        // The outbox reads pass over the compacted seqs.
        let raw = store.read_raw(1, 320, 10, usize::MAX).expect("read raw");
        assert_eq!(raw.records.first().map(|r| r.seq), Some(193));
        assert_eq!(store.last_seq(), 320);
    }
}
