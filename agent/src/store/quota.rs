//! The byte quota: what the store measures, how it deletes the oldest blocks, and
//! how it counts what it drops.
//!
//! # What is measured
//!
//! The quota (`store.quota`) bounds sled's files on disk, but it is enforced on the
//! store's *live bytes*: the keys and values of the record blocks and of the time
//! index, counted exactly as they are written and deleted. sled's files are not a
//! usable measure: they lag deletes (space comes back only as sled cleans segments
//! it finds at most half live) and shrink only at their tail, so a store deleting
//! until its files were below the quota would delete everything and still be over.
//! Measured (sled 0.34.7, 16 KiB blocks, a first-in first-out load with one flush
//! per commit): the files settle at about 1.6 x the live bytes plus ~4 MiB of
//! segments in use, and sled's cleaning threshold puts the worst case near 2 x plus a
//! few segments. So the live bytes get a budget of `(quota - 8 MiB) / 2` and sled's
//! files stay within the quota; [`crate::store::StoreStats`] reports both figures.
//!
//! The count costs no scan: an atomic add per commit, and at most once a second
//! ([`ACCOUNT_EVERY`]) a 24-byte value written with a commit, `meta/accounting` =
//! `[u64 BE through_seq] [u64 BE live_bytes] [u64 BE dropped]`. `open` adds the
//! blocks (and their index entries) after `through_seq`: at most a second of commits,
//! or what a crash kept of them. Deletions write it in the same sled transaction as
//! the blocks and index entries they remove, so deleted bytes and the dropped count
//! never drift apart.
//!
//! # Policy when the budget is reached
//!
//! The writer checks the live bytes after each commit; over the budget, it deletes
//! whole blocks, oldest first, down to 1/16 below the budget (at most
//! [`QUOTA_PASS_BLOCKS`] per pass), so the store stays within its budget plus one
//! commit. A pass goes in steps of at most [`DELETE_STEP_BLOCKS`] blocks, each its
//! own sled transaction with its own unindex batch, and settles sled's cache as it
//! walks (as long reads do): one transaction of a whole pass held every decoded
//! record, the removal batches and sled's copy of them at once (4.9 MiB for 256
//! blocks), memory that glibc keeps once freed. Oldest first
//! is acknowledged first: the acknowledged records are the oldest ones. Records
//! above the sync cursor are *dropped*: counted in `dropped` (persistent), logged
//! once per pass with their seq range, and announced by a [`DropEvent`] record that
//! the writer appends right away, so it goes upstream like any other record and the
//! upstream side knows those seqs will never come. A drop event that is itself
//! dropped before delivery has its ranges carried into the next one.
//!
//! Without an upstream (`set_forwarding(false)`) nothing waits for an
//! acknowledgement: every record counts as acknowledged, the store is a ring of
//! its newest data, and deleting the oldest is retention, not a drop.
//!
//! The acknowledged floor moves only when the sync's cursor is durable
//! (`set_sync_mark`), under the same lock a deletion pass holds while it decides, so
//! each record is either delivered (below the floor when deleted) or dropped (above
//! it), never both: the sync counts as delivered only acknowledged records the store
//! did not drop ([`Store::dropped_among`]), and produced = delivered + dropped holds
//! exactly.
//!
//! [`DropEvent`]: crate::model::DropEvent

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;

use sled::transaction::{TransactionError, Transactional};

use super::{key_seq, scan_block, Item, Store, StoreError};
use crate::model::{Payload, Record};

pub(super) const META_ACCOUNTING: &[u8] = b"accounting";
/// Longest a commit goes without writing the byte count.
pub(super) const ACCOUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Room in the quota for sled's segments beyond twice the live bytes (see above).
pub const SLED_OVERHEAD: u64 = 8 << 20;
/// Most blocks one quota pass deletes.
pub const QUOTA_PASS_BLOCKS: usize = 256;
/// Most blocks one deletion step removes: one sled transaction and one unindex
/// batch. 16 blocks of at most 6 KiB hold at most 512 records.
pub const DELETE_STEP_BLOCKS: usize = 16;
/// Drop ranges remembered in memory for [`Store::dropped_among`].
const RECENT_DROPS: usize = 1024;

/// The live bytes a quota allows.
pub fn live_budget(quota: u64) -> u64 {
    quota.saturating_sub(SLED_OVERHEAD) / 2
}

/// The persistent byte count and drop counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Accounting {
    /// Every seq up to here is counted in `live_bytes`.
    pub through_seq: u64,
    pub live_bytes: u64,
    /// Records deleted by the quota before upstream acknowledged them.
    pub dropped: u64,
}

impl Accounting {
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.through_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.live_bytes.to_be_bytes());
        out[16..].copy_from_slice(&self.dropped.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Accounting> {
        let field = |i: usize| key_seq(bytes.get(i * 8..i * 8 + 8)?);
        (bytes.len() == 24).then_some(())?;
        Some(Accounting {
            through_seq: field(0)?,
            live_bytes: field(1)?,
            dropped: field(2)?,
        })
    }
}

/// Where acknowledgement stands, and the drops of this process.
#[derive(Debug, Default)]
pub(super) struct Floor {
    /// Highest contiguous seq acknowledged upstream (the durable sync cursor).
    pub acked: u64,
    /// Whether records are forwarded at all; if not, every record counts as acked.
    pub forwarding: bool,
    /// Seq ranges dropped by this process, merged, oldest first.
    pub recent: Vec<RangeInclusive<u64>>,
}

impl Floor {
    fn is_acked(&self, seq: u64) -> bool {
        !self.forwarding || seq <= self.acked
    }
}

/// What a deletion pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    pub blocks: usize,
    /// Seqs of the deleted blocks, `first..=last`; `0..=0` when none.
    pub first: u64,
    pub last: u64,
    /// Records deleted that were acknowledged upstream (or not forwarded at all).
    pub acknowledged: u64,
    /// Records deleted before upstream acknowledged them.
    pub dropped: u64,
    /// Seq ranges of the dropped records, with those of dropped drop events.
    pub dropped_ranges: Vec<RangeInclusive<u64>>,
    /// Live bytes freed (blocks and index entries).
    pub bytes: u64,
    /// Steps (sled transactions) that deleted blocks.
    pub steps: usize,
    /// Blocks deleted by the largest step.
    pub largest_step: usize,
}

impl Deleted {
    /// Adds the next step's deletion to a pass's.
    fn absorb(&mut self, step: Deleted) {
        if step.blocks == 0 {
            return;
        }
        if self.blocks == 0 {
            self.first = step.first;
        }
        self.last = step.last;
        self.blocks += step.blocks;
        self.acknowledged += step.acknowledged;
        self.dropped += step.dropped;
        for r in step.dropped_ranges {
            merge_range(&mut self.dropped_ranges, r);
        }
        self.bytes += step.bytes;
        self.steps += 1;
        self.largest_step = self.largest_step.max(step.blocks);
    }
}

/// One block, as a deletion pass sees it.
pub(super) struct BlockView<'a> {
    pub last: u64,
    pub bytes: u64,
    /// Its readable records.
    pub records: &'a [Record],
}

/// Adds `range` to merged, ascending `ranges`.
pub fn merge_range(ranges: &mut Vec<RangeInclusive<u64>>, range: RangeInclusive<u64>) {
    if range.is_empty() {
        return;
    }
    ranges.push(range);
    ranges.sort_by_key(|r| *r.start());
    let mut merged: Vec<RangeInclusive<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(m) if *r.start() <= m.end().saturating_add(1) => {
                *m = *m.start()..=(*m.end()).max(*r.end());
            }
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

impl Store {
    /// Whether the store forwards its records upstream. With `false`, every record
    /// counts as acknowledged: the quota deletes the oldest without counting drops.
    pub fn set_forwarding(&self, forwarding: bool) {
        self.floor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forwarding = forwarding;
    }

    /// Moves the acknowledged floor (the durable sync cursor).
    pub(super) fn set_acked(&self, acked: u64) {
        let mut floor = self.floor.lock().unwrap_or_else(|e| e.into_inner());
        floor.acked = floor.acked.max(acked);
    }

    /// How many of `seqs` this process dropped (deleted unacknowledged).
    pub fn dropped_among(&self, seqs: &[u64]) -> u64 {
        let floor = self.floor.lock().unwrap_or_else(|e| e.into_inner());
        if floor.recent.is_empty() {
            return 0;
        }
        seqs.iter()
            .filter(|s| floor.recent.iter().any(|r| r.contains(s)))
            .count() as u64
    }

    /// Live bytes above the budget: a quota pass is due. Two atomic loads.
    pub fn over_quota(&self) -> bool {
        self.live_bytes.load(Ordering::Acquire) > self.budget
    }

    /// Deletes the oldest blocks until the live bytes are 1/16 below the budget (or
    /// [`QUOTA_PASS_BLOCKS`] went). Does nothing when within the budget. Logs a
    /// warning when it dropped unacknowledged records; the caller appends the drop
    /// event.
    pub fn enforce_quota(&self) -> Result<Deleted, StoreError> {
        let live = self.live_bytes.load(Ordering::Acquire);
        if live <= self.budget {
            return Ok(Deleted::default());
        }
        let target = self.budget - self.budget / 16;
        let mut left = live;
        let deleted = self.delete_front(QUOTA_PASS_BLOCKS, |block| {
            if left <= target {
                return false;
            }
            left = left.saturating_sub(block.bytes);
            true
        })?;
        if deleted.dropped > 0 {
            let ranges: Vec<String> = deleted
                .dropped_ranges
                .iter()
                .map(|r| format!("{}..={}", r.start(), r.end()))
                .collect();
            tracing::warn!(
                target: "edge_agent::store",
                dropped = deleted.dropped,
                seqs = %ranges.join(","),
                acknowledged = deleted.acknowledged,
                dropped_total = self.dropped_total(),
                live_bytes = self.live_bytes.load(Ordering::Acquire),
                budget = self.budget,
                "store quota reached: oldest unacknowledged records dropped"
            );
        } else if deleted.blocks > 0 {
            tracing::debug!(
                target: "edge_agent::store",
                records = deleted.acknowledged,
                first = deleted.first,
                last = deleted.last,
                "store quota reached: oldest acknowledged records deleted"
            );
        }
        Ok(deleted)
    }

    /// Records dropped by the quota since the store was created.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    /// Deletes whole blocks from the front while `take` accepts them, at most
    /// `max_blocks`, never the last block (it may be the only witness of the last
    /// seq), in steps of at most [`DELETE_STEP_BLOCKS`] (see the module docs).
    pub(super) fn delete_front(
        &self,
        max_blocks: usize,
        mut take: impl FnMut(&BlockView<'_>) -> bool,
    ) -> Result<Deleted, StoreError> {
        let mut out = Deleted::default();
        let mut settler = super::CacheSettler::default();
        while out.blocks < max_blocks {
            let want = (max_blocks - out.blocks).min(DELETE_STEP_BLOCKS);
            let step = self.delete_step(want, &mut take, &mut settler);
            let step = match step {
                Ok(step) => step,
                Err(e) if out.blocks == 0 => return Err(e),
                // The steps before are committed: report them; the next pass retries.
                Err(e) => {
                    tracing::warn!(target: "edge_agent::store", error = %e, "deletion step failed");
                    break;
                }
            };
            let done = step.blocks < want;
            out.absorb(step);
            if done {
                break;
            }
        }
        settler.finish(&self.records);
        Ok(out)
    }

    /// One step of [`Store::delete_front`]: at most `max_blocks` blocks. Blocks, their
    /// index entries and the accounting go in one transaction; sled makes it durable
    /// with the next flush (the next commit's), and a crash before that brings all
    /// of it back together.
    fn delete_step(
        &self,
        max_blocks: usize,
        take: &mut impl FnMut(&BlockView<'_>) -> bool,
        settler: &mut super::CacheSettler,
    ) -> Result<Deleted, StoreError> {
        // Appends (and seals into sled) wait while the guard lives: the accounting is
        // read and written whole.
        let _appends_wait = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.check_failed()?;
        // Held while deciding which records are dropped (see the module docs).
        let mut floor = self.floor.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Deleted::default();
        let mut batch = sled::Batch::default();
        let mut gone: Vec<Record> = Vec::new();
        let mut iter = self.records.iter();
        let mut cur = iter.next().transpose()?;
        while let Some((key, value)) = cur {
            if out.blocks >= max_blocks {
                break;
            }
            let next = iter.next().transpose()?;
            let Some(first) = key_seq(&key) else { break };
            let Some(next_first) = next.as_ref().and_then(|(k, _)| key_seq(k)) else {
                break;
            };
            let last = next_first - 1;
            let mut records = Vec::new();
            scan_block(
                &self.schemas,
                first,
                &super::block::unpack(value.clone()),
                next_first,
                &(first..=last),
                &mut |item| {
                    if let Item::Record(rec) = item {
                        records.push(rec);
                    }
                },
            );
            let view = BlockView {
                last,
                bytes: (key.len() + value.len()) as u64,
                records: &records,
            };
            if !take(&view) {
                break;
            }
            settler.walked(&self.records, &key);
            batch.remove(key);
            if out.blocks == 0 {
                out.first = first;
            }
            out.last = last;
            out.blocks += 1;
            out.bytes += view.bytes + super::index::counted_bytes(&records);
            for rec in &records {
                if floor.is_acked(rec.seq) {
                    out.acknowledged += 1;
                    continue;
                }
                out.dropped += 1;
                merge_range(&mut out.dropped_ranges, rec.seq..=rec.seq);
                // An undelivered drop event goes too: its news moves to the next one.
                if let Payload::Dropped(ev) = &rec.payload {
                    for &(from, to) in &ev.ranges {
                        merge_range(&mut out.dropped_ranges, from..=to);
                    }
                }
            }
            gone.extend(records);
            cur = next;
        }
        if out.blocks == 0 {
            return Ok(out);
        }
        let index = self.unindex_batch(&gone)?;
        let live = self
            .live_bytes
            .load(Ordering::Acquire)
            .saturating_sub(out.bytes);
        let acct = Accounting {
            // The count covers the blocks in sled, not the open block past them.
            through_seq: self.sled_last_seq(),
            live_bytes: live,
            dropped: self.dropped.load(Ordering::Acquire) + out.dropped,
        };
        let encoded = acct.encode();
        let result =
            (&self.records, &self.by_meter, &self.meta).transaction(|(records, by_meter, meta)| {
                records.apply_batch(&batch)?;
                by_meter.apply_batch(&index)?;
                meta.insert(META_ACCOUNTING, &encoded[..])?;
                Ok(())
            });
        let result = result.map_err(|e: TransactionError<()>| match e {
            TransactionError::Storage(e) => e,
            // The closure never aborts.
            TransactionError::Abort(()) => sled::Error::ReportableBug("transaction aborted".into()),
        });
        self.note_write(result)?;
        self.live_bytes.store(live, Ordering::Release);
        self.dropped.store(acct.dropped, Ordering::Release);
        for r in &out.dropped_ranges {
            merge_range(&mut floor.recent, r.clone());
        }
        let excess = floor.recent.len().saturating_sub(RECENT_DROPS);
        floor.recent.drain(..excess);
        Ok(out)
    }

    /// The byte count when `open` finds no (or a stale) accounting value: the blocks
    /// after `through` (all of them for 0) and their index entries.
    pub(super) fn count_live_after(&self, through: u64) -> Result<u64, StoreError> {
        let mut bytes = 0;
        let start = super::seq_key(through.saturating_add(1));
        for entry in self.records.range(start..) {
            let (k, v) = entry?;
            bytes += (k.len() + v.len()) as u64;
        }
        // Index entries are counted per block when it moves into sled, as a key per
        // meter and hour of the block (`Store::index_records`): counted the same way
        // here. The open block is not counted until then.
        let last = self.sled_last_seq();
        for block in self.blocks_from(through.saturating_add(1))? {
            let block = block?;
            if block.first <= through {
                continue;
            }
            if block.first > last {
                break;
            }
            let end = block.next_first.unwrap_or(last + 1).min(last + 1);
            let mut records = Vec::new();
            scan_block(
                &self.schemas,
                block.first,
                &block.value,
                end,
                &(block.first..=end - 1),
                &mut |item| {
                    if let Item::Record(rec) = item {
                        records.push(rec);
                    }
                },
            );
            bytes += super::index::counted_bytes(&records);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::broadcast;

    use super::*;
    use crate::config::units::ByteSize;
    use crate::model::{DropEvent, DropReason};
    use crate::store::bench::sample_payload;
    use crate::store::config::StoreConfig;
    use crate::store::testing::{config, open};
    use crate::store::{start_writer, verify, CURSOR_MARK};

    /// A store whose live bytes may reach `budget`.
    fn small(dir: &tempfile::TempDir, budget: u64) -> Store {
        open(&StoreConfig {
            quota: ByteSize(SLED_OVERHEAD + 2 * budget),
            ..config(dir)
        })
    }

    fn fill(store: &Store, from: u64, n: u64, per_commit: u64) {
        let mut i = from;
        while i < from + n {
            let k = per_commit.min(from + n - i);
            let meter = if i % 2 == 0 { "a" } else { "b" };
            store
                .append((i..i + k).map(|j| sample_payload(meter, j)).collect())
                .expect("append");
            i += k;
        }
    }

    /// The live bytes counted from scratch: every block and index entry.
    fn recount(store: &Store) -> u64 {
        store.count_live_after(0).expect("recount")
    }

    #[test]
    fn ranges_merge() {
        let mut r = Vec::new();
        merge_range(&mut r, 5..=5);
        merge_range(&mut r, 6..=9);
        merge_range(&mut r, 1..=2);
        merge_range(&mut r, 20..=30);
        merge_range(&mut r, 3..=4);
        assert_eq!(r, vec![1..=9, 20..=30]);
        merge_range(&mut r, 8..=25);
        assert_eq!(r, vec![1..=30]);
    }

    #[test]
    fn accounting_round_trips_and_budget_leaves_room_for_sled() {
        let a = Accounting {
            through_seq: 7,
            live_bytes: 1 << 40,
            dropped: 3,
        };
        assert_eq!(Accounting::decode(&a.encode()), Some(a));
        assert_eq!(Accounting::decode(&[0; 8]), None);
        assert_eq!(live_budget(16 << 20), 4 << 20);
        assert_eq!(live_budget(1 << 30), (1016 << 20) / 2);
        assert_eq!(live_budget(1 << 20), 0);
    }

    #[test]
    fn live_bytes_are_counted_exactly_through_commits_deletions_crashes_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&config(&dir));
        assert_eq!(store.live_bytes(), 0);
        fill(&store, 0, 300, 7);
        let live = store.live_bytes();
        assert_eq!(live, recount(&store));
        // Packed blocks (`block.rs`): about 40 bytes a reading with its index entry.
        assert!(live > 300 * 30, "{live}");

        // Packed blocks hold up to 128 readings: the first ends at 128.
        store.set_sync_mark(CURSOR_MARK, 200).expect("cursor");
        assert!(store.compact(200, i64::MAX, 3).expect("compact") > 0);
        assert!(store.live_bytes() < live);
        assert_eq!(store.live_bytes(), recount(&store));
        let before_crash = store.meta.get(META_ACCOUNTING).expect("get").expect("set");
        fill(&store, 300, 40, 40);
        let expected = store.live_bytes();
        assert_eq!(expected, recount(&store));
        // As if a crash kept the last commit's blocks but not its accounting.
        store
            .meta
            .insert(META_ACCOUNTING, before_crash)
            .expect("insert");
        store.flush().expect("flush");
        drop(store);
        let store = open(&config(&dir));
        assert_eq!(store.live_bytes(), expected);
        // A store from before the count: counted once, in full.
        store.meta.remove(META_ACCOUNTING).expect("remove");
        store.flush().expect("flush");
        drop(store);
        let store = open(&config(&dir));
        assert_eq!(store.live_bytes(), expected);
        assert_eq!(store.stats().live_bytes, expected);
    }

    #[test]
    fn the_quota_deletes_the_oldest_acknowledged_first_then_drops_and_counts_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = 16 << 10;
        let store = small(&dir, budget);
        fill(&store, 0, 1200, 50);
        assert!(store.over_quota());
        store.set_sync_mark(CURSOR_MARK, 200).expect("cursor");
        let deleted = store.enforce_quota().expect("quota pass");
        println!(
            "quota pass: budget {budget}, live {} after deleting {:?}",
            store.live_bytes(),
            deleted
        );
        assert!(store.live_bytes() <= budget - budget / 16);
        assert_eq!(store.live_bytes(), recount(&store));
        assert_eq!(deleted.first, 1);
        assert!(deleted.last > 200, "{deleted:?}");
        assert_eq!(
            deleted.acknowledged, 200,
            "every acknowledged record went first"
        );
        assert_eq!(deleted.dropped, deleted.last - 200);
        assert_eq!(deleted.dropped_ranges, vec![201..=deleted.last]);
        assert_eq!(store.dropped_total(), deleted.dropped);
        assert_eq!(store.stats().first_seq, deleted.last + 1);
        assert_eq!(
            store.dropped_among(&[150, 201, deleted.last, deleted.last + 1]),
            2
        );
        let report = verify(&store).expect("verify");
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.ok, 1200 - deleted.last);
        // Within the budget: nothing to do.
        assert_eq!(store.enforce_quota().expect("pass"), Deleted::default());
        // The drop counter is persistent.
        let dropped = store.dropped_total();
        drop(store);
        let store = small(&dir, budget);
        assert_eq!(store.dropped_total(), dropped);
        assert_eq!(store.stats().dropped, dropped);
        assert_eq!(store.live_bytes(), recount(&store));
    }

    #[test]
    fn a_quota_pass_deletes_in_bounded_steps_and_still_reaches_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = 24 << 10;
        let store = small(&dir, budget);
        // 8,000 readings in packed blocks of up to 128: far more than one step over
        // the budget.
        fill(&store, 0, 8000, 200);
        store.set_sync_mark(CURSOR_MARK, 4000).expect("cursor");
        let blocks_before = store.records.len();
        let deleted = store.enforce_quota().expect("quota pass");
        println!(
            "{} blocks deleted in {} steps, the largest {} blocks",
            deleted.blocks, deleted.steps, deleted.largest_step
        );
        assert!(
            deleted.blocks > 2 * DELETE_STEP_BLOCKS,
            "the test needs several steps: {deleted:?}"
        );
        assert!(deleted.largest_step <= DELETE_STEP_BLOCKS, "{deleted:?}");
        assert_eq!(
            deleted.steps,
            deleted.blocks.div_ceil(DELETE_STEP_BLOCKS),
            "every step but the last is full"
        );
        assert_eq!(store.records.len(), blocks_before - deleted.blocks);
        // The steps together reach the target, with exact accounting.
        assert!(store.live_bytes() <= budget - budget / 16);
        assert_eq!(store.live_bytes(), recount(&store));
        assert_eq!(deleted.first, 1);
        assert_eq!(deleted.acknowledged, 4000);
        assert_eq!(deleted.dropped_ranges, vec![4001..=deleted.last]);
        assert_eq!(store.dropped_total(), deleted.dropped);
        assert!(verify(&store).expect("verify").is_clean());
        // Retention goes through the same steps.
        fill(&store, 8000, 2000, 200);
        store.set_sync_mark(CURSOR_MARK, 9000).expect("cursor");
        let first = store.stats().first_seq;
        let n = store.compact(9000, i64::MAX, 40).expect("compact");
        assert!(n > 0);
        assert_eq!(store.stats().first_seq, first + n);
    }

    #[test]
    fn without_an_upstream_everything_counts_as_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = small(&dir, 16 << 10);
        store.set_forwarding(false);
        fill(&store, 0, 600, 50);
        let deleted = store.enforce_quota().expect("quota pass");
        assert!(deleted.blocks > 0);
        assert_eq!(deleted.dropped, 0);
        assert_eq!(deleted.acknowledged, deleted.last);
        assert_eq!(store.dropped_total(), 0);
    }

    #[test]
    fn a_dropped_drop_event_hands_its_ranges_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = small(&dir, 16 << 10);
        fill(&store, 0, 10, 10);
        let event = Payload::Dropped(DropEvent {
            reason: DropReason::Quota,
            ranges: vec![(1, 3), (7, 9)],
            count: 6,
            total: 6,
            ts_ms: 0,
        });
        store.append(vec![event]).expect("append");
        fill(&store, 10, 1200, 50);
        let deleted = store.enforce_quota().expect("quota pass");
        assert!(deleted.last > 11, "{deleted:?}");
        assert_eq!(deleted.dropped_ranges, vec![1..=deleted.last]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_keeps_the_store_within_its_budget_plus_one_commit_and_announces_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = 20 << 10;
        let store = Arc::new(small(&dir, budget));
        let (committed, mut commits) = broadcast::channel(4096);
        let (writer, task) = start_writer(store.clone(), Duration::from_millis(5), 20, committed);
        let (mut peak, mut commit_bytes) = (0, 0);
        for round in 0..100u64 {
            let before = store.live_bytes();
            writer
                .submit_batch(
                    (0..20)
                        .map(|i| sample_payload("m", round * 20 + i))
                        .collect(),
                )
                .await
                .expect("durable");
            let after = store.live_bytes();
            if round == 0 {
                commit_bytes = after - before;
            }
            peak = peak.max(after);
        }
        drop(writer);
        task.await.expect("writer ends");
        println!(
            "budget {budget} bytes, one commit of 20 readings {commit_bytes} bytes, peak live {peak} bytes, {} dropped",
            store.dropped_total()
        );
        assert!(peak <= budget + commit_bytes + 1024, "peak {peak}");
        assert!(store.dropped_total() > 1000);
        let (mut announced, mut ranges) = (0, Vec::new());
        while let Ok(records) = commits.try_recv() {
            for rec in records.iter() {
                if let Payload::Dropped(ev) = &rec.payload {
                    assert_eq!(ev.reason, DropReason::Quota);
                    announced += ev.count;
                    for &(a, b) in &ev.ranges {
                        merge_range(&mut ranges, a..=b);
                    }
                }
            }
        }
        // Nothing was acknowledged: every deleted seq is dropped and announced.
        let first_kept = store.stats().first_seq;
        assert_eq!(announced, store.dropped_total());
        assert_eq!(ranges, vec![1..=first_kept - 1]);
        assert!(verify(&store).expect("verify").is_clean());
    }
}
