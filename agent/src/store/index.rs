//! Per-meter time index of the stored readings.
//!
//! Tree `by_meter`. One key per meter, batch and hour of reading time:
//!
//! ```text
//! key:   [meter id bytes] [0x00] [u64 BE: hour number, sign bit flipped] [u64 BE: first seq]
//! value: [0x01] { [zigzag varint: ts_ms - previous ts] [zigzag varint: seq - previous seq] }*
//!        the meter's readings of that batch and hour (the first entry's "previous" is 0)
//! ```
//!
//! Values written before the compact format hold `{ [i64 BE ts_ms] [u64 BE seq] }*`
//! (16 bytes an entry, starting with 0x00, or 0xFF for times before 1970); both are read.
//!
//! Flipping the sign bit makes the byte order of the key the numeric order of the
//! (signed) hour, so a meter's readings in `[start, end)` lie in one key range; the
//! entries are then filtered to the exact window and sorted by time (equal
//! timestamps by seq). Meter ids never contain `0x00` (ids are `a-z A-Z 0-9 - _`; a
//! reading whose meter id holds `0x00` or is empty is not indexed), so the separator
//! keeps one meter's keys apart from another's.
//!
//! Why batches: sled's memory use and write amplification grow with the number of
//! keys (DESIGN §3), and sled rewrites a whole leaf page every few inserts into it.
//! A key per meter and block cost more bytes written than the blocks themselves (94
//! bytes per reading at 10 meters). So the entries of the blocks that move into sled
//! are gathered in memory ([`PendingIndex`], read alongside the tree) and written
//! every [`INDEX_BATCH_RECORDS`] records, and when sled is flushed: a key per meter
//! and hour of the batch. Keys are never read-modified-written on the write path.
//!
//! The key `[0x00] "indexed_seq"` holds the highest seq whose reading is indexed,
//! written after a batch's entries. sled recovers a prefix of its log after a crash,
//! so the index may at worst lack (part of) the last batch and the mark is never
//! ahead of it; a crash loses the batch gathered in memory. [`Store::open`] indexes
//! the records in sled past the mark, which also builds the index of a store written
//! before the index existed. Whoever deletes records drops their entries in the same
//! transaction (`unindex_batch`, used by `quota.rs`): left behind, they would grow
//! the tree, and sled's files with it, without bound; entries pointing at missing
//! records are skipped anyway (entries still in memory are left: they point at
//! records that are gone, which readers skip).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use super::codec::{put_zigzag, Reader};
use super::{key_seq, scan_block, seq_key, Item, Store, StoreError};
use crate::model::Record;

pub(super) const TREE_BY_METER: &str = "by_meter";
const INDEXED_SEQ: &[u8] = b"\x00indexed_seq";
/// Records read per step when the index catches up on open.
const CATCH_UP_STEP: u64 = 10_000;
/// Width of the time bucket of one index key.
const BUCKET_MS: i64 = 3_600_000;
/// Bytes of one entry in a value of the first format: ts and seq.
const ENTRY_BYTES: usize = 16;
/// First byte of a value of the compact format (below). A value of the first format
/// starts with the top byte of a big-endian timestamp: 0x00, or 0xFF before 1970.
const COMPACT_VALUE: u8 = 0x01;
/// Records whose index entries are gathered in memory before they are written:
/// one key per meter and hour for this many records, not per block.
pub(super) const INDEX_BATCH_RECORDS: u64 = 1024;

/// An i64 as a u64 whose big-endian bytes sort like the signed value.
fn ts_bytes(ts_ms: i64) -> [u8; 8] {
    ((ts_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn bucket_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(BUCKET_MS)
}

fn meter_prefix(meter: &str) -> Option<Vec<u8>> {
    if meter.is_empty() || meter.as_bytes().contains(&0) {
        return None;
    }
    let mut key = Vec::with_capacity(meter.len() + 17);
    key.extend_from_slice(meter.as_bytes());
    key.push(0);
    Some(key)
}

/// Prefix of a meter's keys of one hour bucket.
fn bucket_prefix(meter: &str, bucket: i64) -> Option<Vec<u8>> {
    let mut key = meter_prefix(meter)?;
    key.extend_from_slice(&ts_bytes(bucket));
    Some(key)
}

/// An index value in the compact format: the marker byte, then per entry the ts and
/// the seq as zigzag varints of their difference to the entry before (the first to
/// 0). Polled readings a second apart take about 3 bytes an entry instead of 16.
fn encode_entries(entries: &[(i64, u64)]) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 + entries.len() * 4);
    value.push(COMPACT_VALUE);
    let (mut ts_before, mut seq_before) = (0i64, 0u64);
    for &(ts, seq) in entries {
        // Wrapping differences: any pair of values round-trips, extremes included.
        put_zigzag(&mut value, ts.wrapping_sub(ts_before));
        put_zigzag(&mut value, seq.wrapping_sub(seq_before) as i64);
        (ts_before, seq_before) = (ts, seq);
    }
    value
}

/// Bytes of a zigzag varint.
fn zigzag_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    (64 - z.max(1).leading_zeros() as usize).div_ceil(7)
}

/// `encode_entries(entries).len()`, without building the value.
fn encoded_len(entries: &[(i64, u64)]) -> usize {
    let (mut ts_before, mut seq_before) = (0i64, 0u64);
    let mut len = 1;
    for &(ts, seq) in entries {
        len += zigzag_len(ts.wrapping_sub(ts_before));
        len += zigzag_len(seq.wrapping_sub(seq_before) as i64);
        (ts_before, seq_before) = (ts, seq);
    }
    debug_assert_eq!(len, encode_entries(entries).len());
    len
}

/// The (ts, seq) entries of an index value, of either format. A value that does not
/// decode yields the entries before the damage: the index only points at records,
/// which are read and checked on their own.
fn decode_entries(value: &[u8]) -> impl Iterator<Item = (i64, u64)> + '_ {
    // A first-format value starting with 0x01 would hold a time 2^56 ms (two million
    // years) from now: none was ever written.
    let (fixed, compact) = match value.split_first() {
        Some((&COMPACT_VALUE, rest)) => (&[][..], rest),
        _ => (value, &[][..]),
    };
    let fixed = fixed.chunks_exact(ENTRY_BYTES).map(|c| {
        let mut ts = [0u8; 8];
        let mut seq = [0u8; 8];
        ts.copy_from_slice(&c[..8]);
        seq.copy_from_slice(&c[8..]);
        (i64::from_be_bytes(ts), u64::from_be_bytes(seq))
    });
    let mut reader = Reader::new(compact);
    let (mut ts, mut seq) = (0i64, 0u64);
    let deltas = std::iter::from_fn(move || {
        if reader.rest().is_empty() {
            return None;
        }
        let dt = reader.zigzag("index ts").ok()?;
        let ds = reader.zigzag("index seq").ok()?;
        ts = ts.wrapping_add(dt);
        seq = seq.wrapping_add(ds as u64);
        Some((ts, seq))
    });
    fixed.chain(deltas)
}

/// (meter, ts, seq) of the readings among `records`.
fn readings_of(records: &[Record]) -> impl Iterator<Item = (&str, i64, u64)> {
    records.iter().filter_map(|rec| {
        rec.payload
            .as_reading()
            .map(|r| (r.meter.as_str(), r.ts_ms, rec.seq))
    })
}

/// Readings given as (meter, ts, seq), the indexable ones grouped by (meter, hour
/// bucket), in the order given.
fn group<'a>(
    readings: impl Iterator<Item = (&'a str, i64, u64)>,
) -> BTreeMap<(&'a str, i64), Vec<(i64, u64)>> {
    let mut groups: BTreeMap<(&str, i64), Vec<(i64, u64)>> = BTreeMap::new();
    for (meter, ts, seq) in readings {
        if meter_prefix(meter).is_some() {
            groups
                .entry((meter, bucket_of(ts)))
                .or_default()
                .push((ts, seq));
        }
    }
    groups
}

/// The readings among `records`, grouped by (meter, hour bucket), in seq order.
fn group_readings(records: &[Record]) -> BTreeMap<(&str, i64), Vec<(i64, u64)>> {
    group(readings_of(records))
}

/// What the time index needs of the readings of the open block: (meter, ts, seq)
/// each, every meter's id held once.
#[derive(Debug, Default)]
pub(super) struct BlockReadings {
    meters: Vec<String>,
    /// Position in `meters`, ts, seq; in seq order.
    readings: Vec<(u32, i64, u64)>,
    /// Records pushed (readings or not), and the seq of the last.
    records: u64,
    last_seq: u64,
}

impl BlockReadings {
    /// Takes in `rec` (seqs increase); a reading's entry is kept.
    pub(super) fn push(&mut self, rec: &Record) {
        self.records += 1;
        self.last_seq = rec.seq;
        let Some(r) = rec.payload.as_reading() else {
            return;
        };
        // A block holds a few meters: the last reading's is the likeliest.
        let known = match self.readings.last() {
            Some(&(m, ..)) if self.meters[m as usize] == r.meter => Some(m as usize),
            _ => self.meters.iter().position(|m| *m == r.meter),
        };
        let m = known.unwrap_or_else(|| {
            self.meters.push(r.meter.clone());
            self.meters.len() - 1
        });
        // At most one meter per record of a block: fits a u32.
        self.readings.push((m as u32, r.ts_ms, rec.seq));
    }

    /// (meter, ts, seq) of the readings, in seq order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, i64, u64)> {
        self.readings
            .iter()
            .map(|&(m, ts, seq)| (self.meters[m as usize].as_str(), ts, seq))
    }
}

/// Index entries of blocks in sled not yet written to `by_meter`, grouped by meter
/// and hour bucket (at most [`INDEX_BATCH_RECORDS`] records' worth, plus one block).
#[derive(Debug, Default)]
pub(super) struct PendingIndex {
    groups: BTreeMap<(String, i64), Vec<(i64, u64)>>,
    /// Seq of the last record queued, reading or not: the mark once written.
    through: u64,
    /// Records queued since the last write.
    records: u64,
}

/// Index entries of `records`, one key per meter and hour, as (key, value) pairs.
pub(super) fn index_entries(records: &[Record]) -> Vec<(Vec<u8>, Vec<u8>)> {
    group_readings(records)
        .into_iter()
        .filter_map(|((meter, bucket), entries)| {
            let mut key = bucket_prefix(meter, bucket)?;
            key.extend_from_slice(&seq_key(entries.first()?.1));
            Some((key, encode_entries(&entries)))
        })
        .collect()
}

/// Bytes the quota counts for the index entries of one block's records (see
/// [`Store::index_records`]): those of [`index_entries`].
pub(super) fn counted_bytes(block_records: &[Record]) -> u64 {
    counted(&group_readings(block_records))
}

/// [`counted_bytes`] of the readings grouped.
fn counted(groups: &BTreeMap<(&str, i64), Vec<(i64, u64)>>) -> u64 {
    groups
        .iter()
        .filter(|(_, entries)| !entries.is_empty())
        // The key: meter, 0x00, hour, first seq.
        .map(|((meter, _), entries)| (meter.len() + 1 + 8 + 8 + encoded_len(entries)) as u64)
        .sum()
}

/// Bytes (keys and values) that index entries take.
#[cfg(test)]
pub(super) fn entries_bytes(entries: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    entries
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum()
}

impl Store {
    /// Queues the index entries of a block that moved into sled; once
    /// [`INDEX_BATCH_RECORDS`] records are queued, writes them (one key per meter and
    /// hour of the batch), then moves the mark. Returns the bytes the quota counts
    /// for these entries: their size as a key per meter and hour of the block (see
    /// [`index_entries`]), whatever batch they are written in, so that a deletion and
    /// a recount from the blocks come to the same figure. The compact batches take
    /// less than that.
    ///
    /// sled rewrites a whole leaf every few inserts into it, so a key per meter and
    /// block cost more than the records themselves; a batch costs one small key per
    /// meter. Until written, the entries are read from memory ([`PendingIndex`]); a
    /// crash loses them, and the catch-up on open writes them again from the blocks.
    pub(super) fn index_records(&self, readings: &BlockReadings) -> Result<u64, StoreError> {
        let (count, last) = (readings.records, readings.last_seq);
        if count == 0 {
            return Ok(0);
        }
        let groups = group(readings.iter());
        let counted = counted(&groups);
        let mut pending = self.pending_index.lock().unwrap_or_else(|e| e.into_inner());
        for ((meter, bucket), mut entries) in groups {
            pending
                .groups
                .entry((meter.to_string(), bucket))
                .or_default()
                .append(&mut entries);
        }
        pending.through = last;
        pending.records += count;
        if pending.records >= INDEX_BATCH_RECORDS {
            self.write_index(&mut pending)?;
        }
        Ok(counted)
    }

    /// Writes the queued index entries now (before sled is flushed).
    pub(super) fn flush_index(&self) -> Result<(), StoreError> {
        let mut pending = self.pending_index.lock().unwrap_or_else(|e| e.into_inner());
        match self.write_index(&mut pending) {
            Err(StoreError::Sled(e)) => self.note_write(Err(e)),
            other => other,
        }
    }

    /// Plain inserts, entries first and the mark last, not a batch (which costs sled
    /// two extra synced writes): a crash keeps a prefix of them, so the mark never
    /// passes an entry that is missing. Entries it kept past the mark are overwritten
    /// by the catch-up on open, not doubled: the catch-up starts where this batch
    /// started, so each key (meter, hour, the first seq of that meter's readings in
    /// the hour) is also a key the catch-up writes, with a superset of the entries.
    /// The queue is emptied only once written: readers find the entries in memory
    /// until then, in `by_meter` after.
    fn write_index(&self, pending: &mut PendingIndex) -> Result<(), StoreError> {
        if pending.records == 0 {
            return Ok(());
        }
        for ((meter, bucket), entries) in &pending.groups {
            let (Some(mut key), Some(first)) = (bucket_prefix(meter, *bucket), entries.first())
            else {
                continue;
            };
            key.extend_from_slice(&seq_key(first.1));
            self.by_meter.insert(key, encode_entries(entries))?;
        }
        self.by_meter
            .insert(INDEXED_SEQ, &seq_key(pending.through))?;
        pending.groups.clear();
        pending.records = 0;
        Ok(())
    }

    /// (meter, ts, seq) of the readings not in `by_meter` yet, up to seq `through`:
    /// the open block's (all of them), then the queued entries of `meter` (all
    /// meters: `None`) in the hour buckets `buckets`. In that order, the order in
    /// which readings move on: one that moves meanwhile is met again further on, or
    /// in `by_meter`, read after this.
    fn unwritten_readings(
        &self,
        meter: Option<&str>,
        buckets: RangeInclusive<i64>,
        through: u64,
        visit: &mut dyn FnMut(&str, i64, u64),
    ) {
        self.tail_readings(through, visit);
        let pending = self.pending_index.lock().unwrap_or_else(|e| e.into_inner());
        for ((m, bucket), entries) in &pending.groups {
            if meter.is_some_and(|want| want != m) || !buckets.contains(bucket) {
                continue;
            }
            for &(ts, seq) in entries.iter().filter(|(_, seq)| *seq <= through) {
                visit(m, ts, seq);
            }
        }
    }

    /// Indexes the durable records past the index mark (see the module docs).
    pub(super) fn catch_up_index(&self) -> Result<(), StoreError> {
        let mark = match self.by_meter.get(INDEXED_SEQ)? {
            Some(v) => key_seq(&v).unwrap_or(0),
            None => 0,
        };
        // Called on open before the journal's replay: the records in sled.
        let last = self.sled_last_seq();
        if mark >= last {
            return Ok(());
        }
        let mut from = mark + 1;
        while from <= last {
            let to = last.min(from + CATCH_UP_STEP - 1);
            let records = self.read_range(from, to)?;
            let mut batch = sled::Batch::default();
            for (key, value) in index_entries(&records) {
                batch.insert(key, value);
            }
            batch.insert(INDEXED_SEQ, &seq_key(to));
            self.note_write(self.by_meter.apply_batch(batch))?;
            from = to + 1;
        }
        self.note_write(self.db.flush())?;
        tracing::info!(
            target: "edge_agent::store",
            from = mark + 1, to = last,
            "time index caught up"
        );
        Ok(())
    }

    /// The batch that removes the index entries of records about to be deleted. The
    /// caller applies it with the deletion of the records (and frees what
    /// [`counted_bytes`] counted for each block).
    pub(super) fn unindex_batch(&self, records: &[Record]) -> Result<sled::Batch, StoreError> {
        let gone: HashSet<u64> = records.iter().map(|r| r.seq).collect();
        let mut batch = sled::Batch::default();
        for (meter, bucket) in group_readings(records).into_keys() {
            let Some(prefix) = bucket_prefix(meter, bucket) else {
                continue;
            };
            for entry in self.by_meter.scan_prefix(prefix) {
                let (key, value) = entry?;
                let all: Vec<(i64, u64)> = decode_entries(&value).collect();
                let kept: Vec<(i64, u64)> = all
                    .iter()
                    .filter(|(_, seq)| !gone.contains(seq))
                    .copied()
                    .collect();
                if kept.is_empty() {
                    batch.remove(key);
                } else if kept.len() != all.len() {
                    batch.insert(key, encode_entries(&kept));
                }
            }
        }
        Ok(batch)
    }

    /// Bytes of the index's entries as written (keys and values, the mark left out):
    /// a full scan.
    #[cfg(test)]
    pub(super) fn index_bytes(&self) -> Result<u64, StoreError> {
        let mut bytes = 0;
        for entry in self.by_meter.iter() {
            let (key, value) = entry?;
            if key.as_ref() != INDEXED_SEQ {
                bytes += (key.len() + value.len()) as u64;
            }
        }
        Ok(bytes)
    }

    /// Seqs of `meter`'s readings with `start_ms <= ts < end_ms`, in time order
    /// (equal timestamps in seq order).
    pub fn reading_seqs(
        &self,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        if start_ms >= end_ms {
            return Ok(Vec::new());
        }
        // `end_ms - 1` is the last instant in the window; its bucket is the last one.
        let last_bucket = bucket_of(end_ms - 1);
        let (Some(from), Some(to)) = (
            bucket_prefix(meter, bucket_of(start_ms)),
            bucket_prefix(meter, last_bucket + 1),
        ) else {
            return Ok(Vec::new());
        };
        let last = self.last_seq();
        let mut found = Vec::new();
        let buckets = bucket_of(start_ms)..=last_bucket;
        self.unwritten_readings(Some(meter), buckets, last, &mut |m, ts, seq| {
            if m == meter && (start_ms..end_ms).contains(&ts) {
                found.push((ts, seq));
            }
        });
        for entry in self.by_meter.range(from..to) {
            let (_, value) = entry?;
            found.extend(
                decode_entries(&value)
                    // An entry whose commit has not been flushed yet is not data yet.
                    .filter(|(ts, seq)| (start_ms..end_ms).contains(ts) && *seq <= last),
            );
        }
        found.sort_unstable();
        found.dedup();
        Ok(found.into_iter().map(|(_, seq)| seq).collect())
    }

    /// The readings of `meter` with `start_ms <= ts < end_ms`, in time order (equal
    /// timestamps in seq order), as records read and CRC-checked like
    /// [`Store::read_range`]: a corrupt record is quarantined and left out. Values
    /// superseded by a later record at the same timestamp (a correction) are left
    /// out: see [`crate::model::current_readings`].
    pub fn readings(
        &self,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<Record>, StoreError> {
        let seqs = self.reading_seqs(meter, start_ms, end_ms)?;
        let mut found = self.records_by_seq(&seqs)?;
        let records = seqs
            .iter()
            .filter_map(|seq| found.remove(seq))
            .filter(|rec| {
                // The index points at a reading of this meter in the window; anything
                // else would be a stale entry, never data.
                rec.payload
                    .as_reading()
                    .is_some_and(|r| r.meter == meter && (start_ms..end_ms).contains(&r.ts_ms))
            })
            .collect();
        Ok(crate::model::current_readings(records))
    }

    /// Whether a reading of `meter` at exactly `ts_ms` is stored (index only).
    pub fn has_reading(&self, meter: &str, ts_ms: i64) -> Result<bool, StoreError> {
        let Some(prefix) = bucket_prefix(meter, bucket_of(ts_ms)) else {
            return Ok(false);
        };
        let last = self.last_seq();
        let mut in_memory = false;
        let bucket = bucket_of(ts_ms);
        self.unwritten_readings(Some(meter), bucket..=bucket, last, &mut |m, ts, _| {
            in_memory |= m == meter && ts == ts_ms
        });
        if in_memory {
            return Ok(true);
        }
        for entry in self.by_meter.scan_prefix(prefix) {
            let (_, value) = entry?;
            if decode_entries(&value).any(|(ts, seq)| ts == ts_ms && seq <= last) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// (meter, ts, seq) of the open block's readings up to `through`.
    fn tail_readings(&self, through: u64, visit: &mut dyn FnMut(&str, i64, u64)) {
        let tail = self.tail.read().unwrap_or_else(|e| e.into_inner());
        for (meter, ts, seq) in tail.readings.iter() {
            if seq <= through {
                visit(meter, ts, seq);
            }
        }
    }

    /// The distinct meter ids with indexed readings, sorted. One index seek per meter.
    pub fn meters(&self) -> Result<Vec<String>, StoreError> {
        let mut meters: Vec<String> = Vec::new();
        let all = i64::MIN..=i64::MAX;
        self.unwritten_readings(None, all, self.last_seq(), &mut |m, _, _| {
            if meter_prefix(m).is_some() && !meters.iter().any(|known| known == m) {
                meters.push(m.to_string());
            }
        });
        // Meter keys start with a non-zero byte; the mark starts with 0x00.
        let mut from = vec![1u8];
        while let Some(key) = self.by_meter.range(from.as_slice()..).keys().next() {
            let key = key?;
            let Some(end) = key.iter().position(|b| *b == 0) else {
                break;
            };
            let meter = String::from_utf8_lossy(&key[..end]).into_owned();
            if !meters.contains(&meter) {
                meters.push(meter);
            }
            // The smallest key after every key of this meter: id followed by 0x01.
            from = key[..end].to_vec();
            from.push(1);
        }
        meters.sort();
        Ok(meters)
    }

    /// Durable records by seq, CRC-checked; missing or quarantined seqs are absent.
    pub fn records_by_seq(&self, seqs: &[u64]) -> Result<HashMap<u64, Record>, StoreError> {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let last = self.last_seq();
        let tail = self.tail_snapshot(last);
        let mut out = HashMap::with_capacity(sorted.len());
        // The block last looked up: (first seq, end seq exclusive, value).
        let mut block: Option<(u64, u64, sled::IVec)> = None;
        let mut bad = Vec::new();
        for seq in sorted.into_iter().filter(|s| (1..=last).contains(s)) {
            if !block
                .as_ref()
                .is_some_and(|(first, end, _)| (*first..*end).contains(&seq))
            {
                block = None;
                if let Some((first, value)) = tail.as_ref().filter(|(t, _)| seq >= *t) {
                    block = Some((*first, last + 1, value.clone()));
                } else if let Some(entry) = self.records.range(..=seq_key(seq)).next_back() {
                    let (k, v) = entry?;
                    if let Some(first) = key_seq(&k) {
                        let end = match self.records.range(seq_key(first + 1)..).next() {
                            Some(next) => key_seq(&next?.0).unwrap_or(last + 1),
                            None => tail.as_ref().map_or(last + 1, |(t, _)| *t),
                        };
                        block = Some((first, end, super::block::unpack(v)));
                    }
                }
            }
            let Some((first, end, value)) = &block else {
                continue;
            };
            scan_block(
                &self.schemas,
                *first,
                value,
                *end,
                &(seq..=seq),
                &mut |item| match item {
                    Item::Record(rec) => {
                        out.insert(rec.seq, rec);
                    }
                    Item::Quarantined { seq, raw, reason } => bad.push((seq, raw.to_vec(), reason)),
                    Item::Duplicate | Item::Gap(_) => {}
                },
            );
            for (seq, raw, reason) in bad.drain(..) {
                self.quarantine_record(seq, &raw, reason);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Payload, Reading, Value};

    use crate::store::testing::{config as cfg, open};

    fn reading(meter: &str, ts_ms: i64, v: f64) -> Payload {
        Payload::Reading(Reading {
            meter: meter.into(),
            ts_ms,
            values: vec![Value {
                quantity: "power".into(),
                unit: "W".into(),
                kind: Kind::Power,
                value: Some(v),
                invalid: None,
                source: Default::default(),
            }],
        })
    }

    fn ts_of(records: &[Record]) -> Vec<i64> {
        records
            .iter()
            .filter_map(|r| r.payload.as_reading().map(|r| r.ts_ms))
            .collect()
    }

    #[test]
    fn key_order_is_numeric_order_of_timestamps() {
        let ts = [i64::MIN, -1_000, -1, 0, 1, 1_000, i64::MAX];
        for pair in ts.windows(2) {
            assert!(ts_bytes(pair[0]) < ts_bytes(pair[1]), "{pair:?}");
        }
        let a = bucket_prefix("ab", 5).unwrap();
        let b = bucket_prefix("ab-c", 0).unwrap();
        assert!(
            a < b,
            "one meter's keys never interleave with a longer id's"
        );
        assert!(meter_prefix("").is_none());
        assert!(meter_prefix("a\0b").is_none());
    }

    #[test]
    fn ranges_are_exact_and_in_time_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        // Out of time order on purpose: the index orders by ts, not by seq.
        store
            .append(vec![
                reading("m1", 3_000, 3.0),
                reading("m1", 1_000, 1.0),
                reading("m1", 2_000, 2.0),
                reading("m1", -500, -1.0),
            ])
            .unwrap();
        store.append(vec![reading("m1", 4_000, 4.0)]).unwrap();
        let check = |store: &Store| {
            assert_eq!(
                ts_of(&store.readings("m1", 1_000, 3_000).unwrap()),
                vec![1_000, 2_000]
            );
            assert_eq!(
                ts_of(&store.readings("m1", 1_001, 3_001).unwrap()),
                vec![2_000, 3_000]
            );
            assert_eq!(
                ts_of(&store.readings("m1", i64::MIN, i64::MAX).unwrap()),
                vec![-500, 1_000, 2_000, 3_000, 4_000]
            );
            assert!(store.readings("m1", 2_000, 2_000).unwrap().is_empty());
            assert!(store.readings("m1", 3_000, 1_000).unwrap().is_empty());
            assert!(store.readings("m", 0, i64::MAX).unwrap().is_empty());
            assert!(store.readings("m1x", 0, i64::MAX).unwrap().is_empty());
            assert!(store.has_reading("m1", 2_000).unwrap());
            assert!(!store.has_reading("m1", 2_001).unwrap());
            assert!(!store.has_reading("m2", 2_000).unwrap());
            assert_eq!(store.meters().unwrap(), vec!["m1".to_string()]);
        };
        check(&store);
        drop(store);
        let store = open(&cfg(&dir));
        check(&store);
    }

    #[test]
    fn many_meters_interleaved() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        let meters = ["a", "a-b", "a_b", "b", "B", "main", "m9"];
        for round in 0..10i64 {
            let batch = (0..100i64)
                .flat_map(|i| {
                    meters
                        .iter()
                        .map(move |m| reading(m, (round * 100 + i) * 1_000, i as f64))
                })
                .collect();
            store.append(batch).unwrap();
        }
        let mut sorted: Vec<String> = meters.iter().map(|m| m.to_string()).collect();
        sorted.sort();
        assert_eq!(store.meters().unwrap(), sorted);
        for m in meters {
            let all = store.readings(m, i64::MIN, i64::MAX).unwrap();
            assert_eq!(all.len(), 1_000, "{m}");
            assert_eq!(
                ts_of(&all),
                (0..1_000).map(|i| i * 1_000).collect::<Vec<_>>()
            );
            for rec in &all {
                assert_eq!(rec.payload.as_reading().unwrap().meter, m);
            }
            let window = store.readings(m, 250_000, 260_000).unwrap();
            assert_eq!(
                ts_of(&window),
                (250..260).map(|i| i * 1_000).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn missing_index_is_rebuilt_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        store
            .append((0..50).map(|i| reading("m1", i * 10, i as f64)).collect())
            .unwrap();
        store.seal_open_block();
        store.flush().unwrap();
        // As after a crash that lost the index batch, or a store from before the index.
        store.by_meter.clear().unwrap();
        store.flush().unwrap();
        assert!(store.readings("m1", 0, i64::MAX).unwrap().is_empty());
        drop(store);
        let store = open(&cfg(&dir));
        assert_eq!(
            ts_of(&store.readings("m1", 0, i64::MAX).unwrap()),
            (0..50).map(|i| i * 10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn entries_a_crash_kept_past_the_mark_are_not_indexed_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        store
            .append((0..20).map(|i| reading("m1", i * 10, 1.0)).collect())
            .unwrap();
        store.seal_open_block();
        store.flush().unwrap();
        store
            .append(
                (20..40)
                    .map(|i| reading(if i % 2 == 0 { "m1" } else { "m2" }, i * 10, 1.0))
                    .collect(),
            )
            .unwrap();
        store.seal_open_block();
        store.flush().unwrap();
        // As after a crash that kept the last batch's entries but not its mark.
        store.by_meter.insert(INDEXED_SEQ, &seq_key(20)).unwrap();
        store.flush().unwrap();
        drop(store);

        let store = open(&cfg(&dir));
        let m1 = store.reading_seqs("m1", 0, i64::MAX).unwrap();
        let mut unique = m1.clone();
        unique.dedup();
        assert_eq!(m1, unique, "no reading twice");
        let expected: Vec<u64> = (1..=20).chain((21..=40).filter(|s| s % 2 == 1)).collect();
        assert_eq!(m1, expected);
        assert_eq!(store.reading_seqs("m2", 0, i64::MAX).unwrap().len(), 10);
        assert_eq!(store.index_bytes().unwrap(), {
            let all = store.read_range(1, store.last_seq()).unwrap();
            // One key per meter and batch: the catch-up wrote the same keys again.
            entries_bytes(&index_entries(&all[..20])) + entries_bytes(&index_entries(&all[20..]))
        });
    }

    #[test]
    fn compact_values_round_trip_and_first_format_values_still_read() {
        let entries = vec![
            (1_765_000_000_000, 7),
            (1_765_000_001_000, 17),
            (1_764_999_000_000, 18),
            (i64::MIN, 19),
            (i64::MAX, u64::MAX),
            (-1, 0),
        ];
        let value = encode_entries(&entries);
        assert_eq!(decode_entries(&value).collect::<Vec<_>>(), entries);
        // Polled readings a second apart: about 3 bytes an entry, against 16.
        let polled: Vec<(i64, u64)> = (0..100)
            .map(|i| (1_765_000_000_000 + i * 1_000, 5_000 + i as u64 * 10))
            .collect();
        let bytes = encode_entries(&polled).len();
        assert!(bytes <= 1 + 8 + 4 + 99 * 3, "{bytes} bytes for 100 entries");
        // The first format: 16 bytes an entry, big-endian ts and seq.
        let mut old = Vec::new();
        for (ts, seq) in [(1_765_000_000_000i64, 3u64), (-500, 4)] {
            old.extend_from_slice(&ts.to_be_bytes());
            old.extend_from_slice(&seq.to_be_bytes());
        }
        assert_eq!(
            decode_entries(&old).collect::<Vec<_>>(),
            vec![(1_765_000_000_000, 3), (-500, 4)]
        );
        // A damaged compact value yields what precedes the damage, without a panic.
        let mut cut = value.clone();
        cut.truncate(value.len() - 1);
        assert_eq!(decode_entries(&cut).count(), entries.len() - 1);
        assert_eq!(decode_entries(&[COMPACT_VALUE, 0xff]).count(), 0);
    }

    #[test]
    fn entries_are_written_in_batches_and_read_from_memory_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        let meters = ["a", "b", "c", "d"];
        // 32-record blocks of four meters, one reading a second each.
        let mut ts = 0;
        let mut append_block = |store: &Store| {
            let batch = (0..8)
                .flat_map(|_| {
                    ts += 1_000;
                    let at = ts;
                    meters.iter().map(move |m| reading(m, at, 1.0))
                })
                .collect();
            store.append(batch).unwrap();
            store.seal_open_block();
        };
        append_block(&store);
        // In sled's blocks, not yet in `by_meter`: found in memory.
        assert_eq!(store.by_meter.len(), 0);
        assert_eq!(store.reading_seqs("b", 0, i64::MAX).unwrap().len(), 8);
        assert!(store.has_reading("c", 8_000).unwrap());
        assert_eq!(store.meters().unwrap(), meters.to_vec());
        // A batch's worth of blocks: one key per meter, and the mark.
        let blocks = INDEX_BATCH_RECORDS as usize / 32;
        for _ in 1..blocks {
            append_block(&store);
        }
        assert_eq!(store.by_meter.len(), meters.len() + 1, "one key per meter");
        let per_block_keys = blocks * meters.len();
        let bytes = store.index_bytes().unwrap();
        assert!(
            bytes < INDEX_BATCH_RECORDS * 4,
            "{bytes} bytes for {INDEX_BATCH_RECORDS} entries ({per_block_keys} keys per block before)"
        );
        for m in meters {
            let seqs = store.reading_seqs(m, 0, i64::MAX).unwrap();
            assert_eq!(seqs.len(), blocks * 8, "{m}");
        }
        // Half a batch more, then a clean flush writes it.
        for _ in 0..blocks / 2 {
            append_block(&store);
        }
        assert_eq!(store.by_meter.len(), meters.len() + 1);
        store.flush().unwrap();
        assert_eq!(store.by_meter.len(), 2 * meters.len() + 1);
        assert_eq!(
            store.reading_seqs("d", 0, i64::MAX).unwrap().len(),
            blocks * 12
        );
    }

    #[test]
    fn entries_a_crash_took_from_memory_are_written_again_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        store
            .append((0..100).map(|i| reading("m1", i * 1_000, 1.0)).collect())
            .unwrap();
        store.seal_open_block();
        store.sync().unwrap();
        assert_eq!(store.by_meter.len(), 0, "queued in memory only");
        // A crash: the queue is gone with the process, the blocks are in sled.
        store.db.flush().unwrap();
        drop(store);
        let store = open(&cfg(&dir));
        assert_eq!(
            store.reading_seqs("m1", 0, i64::MAX).unwrap(),
            (1..=100).collect::<Vec<u64>>()
        );
        assert!(store.by_meter.len() > 1, "written by the catch-up");
    }

    #[test]
    fn corrupt_record_is_quarantined_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&cfg(&dir));
        store
            .append((0..3).map(|i| reading("m1", i, 1.0)).collect())
            .unwrap();
        store.seal_open_block();
        // Flip the last byte of the block (the third record's CRC).
        let (k, v) = store.records.first().unwrap().unwrap();
        let mut bytes = crate::store::block::unpack(v).to_vec();
        let n = bytes.len();
        bytes[n - 1] ^= 0xFF;
        store.records.insert(k, bytes).unwrap();
        assert_eq!(ts_of(&store.readings("m1", 0, 10).unwrap()), vec![0, 1]);
        assert_eq!(store.stats().quarantined, 1);
    }
}
