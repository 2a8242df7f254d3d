//! The durable store: the only module that touches sled.
//!
//! # Durability
//!
//! [`Store::append`] assigns consecutive gateway-wide sequence numbers, writes the
//! records' blocks (one insert, or one atomic `apply_batch` for several) and then
//! calls `sled::Db::flush` (fsync).
//! A record is accepted only once that flush has returned; sled's `flush_every_ms`
//! stays on as a background safety net but acceptance never relies on it. The
//! [`StoreWriter`] task groups many submissions into one `append`, so there is one
//! fsync per batch, never one per reading.
//!
//! Sequence numbers start at 1, have no gaps and are never reused: on open the next
//! one is derived from the last stored block (and from a high-water mark written with
//! every commit, in case that block is unreadable).
//!
//! # Layout
//!
//! sled's memory use and write amplification grow with the number of keys, so
//! records are grouped into blocks and each block is one sled value:
//!
//! | tree         | key                                  | value                          |
//! |--------------|--------------------------------------|--------------------------------|
//! | `records`    | big-endian u64 seq of the block's first record | block (below)        |
//! | `quarantine` | big-endian u64 seq                   | raw bytes of the bad frame     |
//! | `meta`       | `last_seq`                           | big-endian u64 high-water mark |
//! | `meta`       | `accounting`                         | live bytes and drop counter (`quota.rs`) |
//! | `by_meter`   | meter id, 0x00, hour, first seq (`index.rs`) | (ts, seq) entries: per-meter time index |
//! | `state`      | UTF-8 key (`state.rs`)               | CBOR + CRC-32C derived state   |
//! | `schemas`    | big-endian u32 schema id (`codec.rs`) | encoded schema + CRC-32C      |
//!
//! A block is a version byte followed by frames, one per record, with consecutive
//! seqs starting at the key:
//!
//! ```text
//! [u8 version] { [u32 LE len] [len bytes: the record] [u32 LE CRC-32C of those bytes] }*
//! ```
//!
//! Version `2` (written now): each record is compact (`codec.rs`): a reading holds
//! its values by position in a *schema* (meter and, per value, quantity, unit, kind
//! and source type), referred to by id, each value in its source's type (a float32
//! register as 4 bytes, an integer as a zigzag varint, a float64 as 8), with a status
//! bitmap for missing and invalid values; other payloads are CBOR behind a tag byte.
//! An SDM630 reading (14 values) takes about 70 bytes, 78 with its frame, where the
//! first format's CBOR took 554.
//!
//! Version `1` (stores written before): each record is the CBOR of `model::Record`.
//! Such blocks are never rewritten: they are read, verified, indexed and sent
//! upstream as they are, alongside version 2 blocks, until the quota or retention
//! deletes them.
//!
//! # Schemas
//!
//! A schema is a record of its own in the `schemas` tree, written (and flushed) by the
//! commit whose reading first has its meter and field list, before that reading's
//! block; a field list seen before keeps its id, so a meter that alternates between
//! two lists has two schemas. Ids count up from 1 and are never reused. Schemas are
//! never deleted (they are small: at most [`codec::MAX_SCHEMAS`], beyond which a
//! reading with a new field list is stored as CBOR), so every reading the store holds
//! can be decoded, whatever the quota or retention deleted. Schemas are not
//! seq-numbered: upstream, a batch carries the ones its readings need (`sync::wire`).
//!
//! A commit writes its records as one or more blocks of at most
//! [`BLOCK_RECORDS`] records (fewer when they would exceed [`BLOCK_BYTES`]).
//! Blocks are never rewritten. A block covers the seqs from its key up to the
//! next block's key (or the store's last seq for the last block).
//!
//! # Compression
//!
//! sled compresses its pages with zstd (`store.compress`, on by default): records take
//! about a seventh of the space and a commit writes several times fewer bytes, which
//! is what wears an SD card. The setting is fixed when a store is created (sled
//! refuses to open a store with the other one), so an existing store keeps its own.
//! Frames and their CRCs are over the uncompressed record bytes, as above. Compact
//! records compress less than CBOR did (it repeated every value's names).
//!
//! # Corruption
//!
//! A frame whose CRC fails, that does not decode, or whose record carries another
//! seq than its position says is *quarantined*: it is never returned as data, its
//! bytes are copied into the `quarantine` tree and it is counted (persistently, as
//! the size of that tree, and in memory). When a block's framing itself is broken,
//! every seq it should still hold is quarantined the same way.

#[cfg(feature = "tools")]
pub mod bench;
mod checksum;
pub mod codec;
mod health;
mod index;
pub mod journal;
mod outbox;
mod quota;
mod retention;
mod state;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

pub use checksum::{crc32c, Crc32c};
pub use outbox::{RangeDigest, RawRange, RawRecord, RawWalk, CURSOR_MARK};
pub use quota::{live_budget, merge_range, Deleted, QUOTA_PASS_BLOCKS, SLED_OVERHEAD};
pub use state::{StateEntry, StateError};
pub use writer::{start_writer, StoreWriter};

use std::ffi::CString;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::config::StoreConfig;
use crate::model::{Payload, Record};

/// Most records in one block value.
pub const BLOCK_RECORDS: usize = 32;
/// A block is closed once it holds at least this many bytes. Small enough that a
/// sled leaf page (up to 17 blocks) stays under sled's blob threshold (a quarter of
/// its 512 KiB segment): larger pages go to files of their own, which sled's cache
/// counts at a few bytes each and so never evicts.
pub const BLOCK_BYTES: usize = 6 * 1024;
/// Hard limit of the format: a block never spans more seqs than this. It bounds
/// how many seqs a block with broken framing can take down with it.
const MAX_BLOCK_SPAN: u64 = 1024;

/// Block version of the first format: frames hold the CBOR of `model::Record`.
const BLOCK_V1: u8 = 1;
/// Block version of the compact format: frames hold `codec.rs` records.
const BLOCK_V2: u8 = 2;

/// Whether a block's version byte is one this version reads.
fn known_version(value: &[u8]) -> bool {
    matches!(value.first(), Some(&BLOCK_V1) | Some(&BLOCK_V2))
}

/// Decodes one frame's body by its block's version.
fn decode_body(version: u8, body: &[u8], schemas: &codec::Schemas) -> Result<Record, &'static str> {
    if version == BLOCK_V1 {
        ciborium::from_reader::<Record, _>(body).map_err(|_| "undecodable CBOR")
    } else {
        codec::decode_record(body, &|id| schemas.get(id)).map_err(|_| "undecodable record")
    }
}
/// Largest commit buffer kept for the next commit.
const COMMIT_BUF_KEEP: usize = 256 * 1024;
/// Bytes of framing per record: length and CRC.
const FRAME_OVERHEAD: usize = 8;

const TREE_RECORDS: &str = "records";
const TREE_QUARANTINE: &str = "quarantine";
const TREE_META: &str = "meta";
const META_LAST_SEQ: &[u8] = b"last_seq";

/// Errors of the store. `Clone` so one failed commit can answer every submitter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store at {} holds data this version cannot read: {reason}", path.display())]
    Incompatible { path: PathBuf, reason: String },
    #[error("store I/O error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cannot encode record seq {seq}: {reason}")]
    Encode { seq: u64, reason: String },
    #[error("the store writer has stopped")]
    WriterClosed,
    #[error("store commit task failed: {0}")]
    Task(String),
    /// The store's filesystem has less free space than the reserve: nothing written.
    #[error("disk full: {free} bytes free on the store's filesystem, {reserve} kept in reserve; nothing written")]
    NoSpace { free: u64, reserve: u64 },
    /// A sled write failed earlier in this process: nothing written (see `health.rs`).
    #[error("store cannot write until the agent restarts (earlier write error: {0})")]
    Failed(String),
}

impl StoreError {
    /// Whether it is the disk's being full (ENOSPC from sled, or the reserve).
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Open {
                source: sled::Error::Io(e),
                ..
            }
            | StoreError::Sled(sled::Error::Io(e)) => e.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }

    /// Whether the failure is the store's (disk full, I/O, a failed instance) rather
    /// than the payload's: the writer holds such commits and tries again.
    pub fn is_write_failure(&self) -> bool {
        !matches!(self, StoreError::Encode { .. } | StoreError::WriterClosed)
    }
}

/// Figures for the status page and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Seqs held, from `first_seq` to `last_seq` (quarantined ones included).
    pub records: u64,
    /// Seq of the oldest record held; 0 when empty.
    pub first_seq: u64,
    /// Seq of the newest durable record; 0 when nothing was ever stored.
    pub last_seq: u64,
    /// Distinct records quarantined since the store was created.
    pub quarantined: u64,
    /// Space taken by sled's files.
    pub disk_bytes: u64,
    /// Bytes of live data (record blocks and time index): what the quota counts.
    pub live_bytes: u64,
    /// Live bytes the quota allows (`(store.quota - 8 MiB) / 2`, see `quota.rs`).
    pub budget_bytes: u64,
    /// Records deleted by the quota before upstream acknowledged them, since the
    /// store was created.
    pub dropped: u64,
    /// The last commit was refused (disk full or a failed write); readings are held.
    pub write_blocked: bool,
    /// A sled write failed: writes resume after a restart of the agent.
    pub write_failed: bool,
    /// Readings held in memory while commits are refused.
    pub held: u64,
    /// Readings dropped from memory beyond `store.hold_readings`, since start.
    pub held_dropped: u64,
    /// Free bytes on the store's filesystem (0 when unknown).
    pub free_bytes: u64,
}

/// Result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records present with a valid CRC that decode.
    pub ok: u64,
    /// Of those, records of the first format (version 1 blocks, CBOR records).
    pub first_format: u64,
    /// Records that failed (CRC, framing, decoding, wrong seq).
    pub quarantined: u64,
    /// Seq ranges between first and last that no block holds.
    pub gaps: Vec<RangeInclusive<u64>>,
    /// Frames past the range their block may hold (a seq stored twice).
    pub duplicates: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl VerifyReport {
    /// Every seq from first to last present exactly once with a valid CRC.
    pub fn is_clean(&self) -> bool {
        self.quarantined == 0 && self.gaps.is_empty() && self.duplicates == 0
    }
}

struct WriteState {
    next_seq: u64,
    /// Reused between commits: a commit's block values are built here before being
    /// copied into sled's `IVec`s.
    buf: Vec<u8>,
    /// When the byte count was last written with a commit (`quota.rs`).
    accounted_at: Option<std::time::Instant>,
}

/// The durable record store. `Send + Sync`; share it as `Arc<Store>`.
pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    quarantine: sled::Tree,
    meta: sled::Tree,
    /// Per-meter time index of the readings (see `index.rs`).
    by_meter: sled::Tree,
    /// Derived state that survives restarts (see `state.rs`).
    state: sled::Tree,
    /// Marks of the upstream sync (see `outbox.rs`).
    outbox: sled::Tree,
    /// The schemas readings refer to (see `codec.rs`).
    schemas: codec::Schemas,
    path: PathBuf,
    /// `path` for `statvfs`.
    c_path: CString,
    /// Held for a whole commit (seq assignment, write, flush): commits are ordered
    /// and a seq is visible as durable only after the flush that covers it.
    write: Mutex<WriteState>,
    durable_last: AtomicU64,
    quarantined: AtomicU64,
    /// Live bytes (blocks and index entries), the quota's measure (`quota.rs`).
    live_bytes: AtomicU64,
    /// Records the quota dropped, since the store was created (persistent).
    dropped: AtomicU64,
    /// Live bytes the quota allows.
    budget: u64,
    /// Free space left on the filesystem: below it, commits are refused.
    min_free: u64,
    /// Most payloads the writer holds in memory while commits are refused.
    hold_max: usize,
    /// `store.cache_capacity`: what sled's page cache is sized for.
    cache_capacity: u64,
    /// Acknowledged floor and this process's drops (`quota.rs`).
    floor: Mutex<quota::Floor>,
    health: health::Health,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.has_failed() {
            // After a failed write, sled's instance cannot flush and its drop would
            // block forever: keep one reference of each handle alive so it never
            // runs. What was durable before the failure is on disk.
            for tree in [
                &self.records,
                &self.quarantine,
                &self.meta,
                &self.by_meter,
                &self.state,
                &self.outbox,
                &self.schemas.tree,
            ] {
                std::mem::forget(tree.clone());
            }
            std::mem::forget(self.db.clone());
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("last_seq", &self.last_seq())
            .finish()
    }
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
}

/// What a block scan finds, in seq order.
enum Item<'a> {
    Record(Record),
    /// `raw` is the frame's bytes; empty for the seqs after a framing break.
    Quarantined {
        seq: u64,
        raw: &'a [u8],
        reason: &'static str,
    },
    Duplicate,
    Gap(RangeInclusive<u64>),
}

/// Walks the frames of the block keyed `first`, which may hold seqs up to `end`
/// (exclusive). Only frames whose seq is in `want` are checked and decoded.
fn scan_block<'a>(
    schemas: &codec::Schemas,
    first: u64,
    value: &'a [u8],
    end: u64,
    want: &RangeInclusive<u64>,
    sink: &mut dyn FnMut(Item<'a>),
) {
    let end = end.min(first.saturating_add(MAX_BLOCK_SPAN));
    let broken = |from: u64, raw: &'a [u8], reason, sink: &mut dyn FnMut(Item<'a>)| {
        let mut raw = raw;
        for seq in from..end {
            if want.contains(&seq) {
                sink(Item::Quarantined { seq, raw, reason });
                // The remaining bytes are kept once, with the first seq they cover.
                raw = &[];
            }
        }
    };
    if !known_version(value) {
        broken(first, value, "unknown block version", sink);
        return;
    }
    let version = value[0];
    let mut pos = 1;
    let mut seq = first;
    while pos < value.len() {
        let room = value.len().saturating_sub(pos + FRAME_OVERHEAD);
        let len = match read_u32(value, pos) {
            Some(len) if value.len() >= pos + FRAME_OVERHEAD && len as usize <= room => {
                len as usize
            }
            _ => {
                broken(seq, &value[pos..], "broken framing", sink);
                return;
            }
        };
        let body = &value[pos + 4..pos + 4 + len];
        let stored_crc = read_u32(value, pos + 4 + len);
        let frame = &value[pos..pos + len + FRAME_OVERHEAD];
        pos += len + FRAME_OVERHEAD;
        let this = seq;
        seq += 1;
        if this >= end {
            sink(Item::Duplicate);
            continue;
        }
        if !want.contains(&this) {
            continue;
        }
        if stored_crc != Some(crc32c(body)) {
            sink(Item::Quarantined {
                seq: this,
                raw: frame,
                reason: "CRC mismatch",
            });
            continue;
        }
        match decode_body(version, body, schemas) {
            Ok(rec) if rec.seq == this => sink(Item::Record(rec)),
            Ok(_) => sink(Item::Quarantined {
                seq: this,
                raw: frame,
                reason: "sequence mismatch",
            }),
            Err(reason) => sink(Item::Quarantined {
                seq: this,
                raw: frame,
                reason,
            }),
        }
    }
    if seq < end {
        sink(Item::Gap(seq..=end - 1));
    }
}

/// Number of frames a block holds according to its framing alone.
fn count_frames(value: &[u8]) -> u64 {
    if !known_version(value) {
        return 0;
    }
    let mut pos = 1;
    let mut n = 0;
    while let Some(len) = read_u32(value, pos) {
        let next = pos + len as usize + FRAME_OVERHEAD;
        if next > value.len() {
            break;
        }
        pos = next;
        n += 1;
    }
    n
}

impl Store {
    /// Opens (or creates) the store at `cfg.path`.
    pub fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let path = cfg.path.clone();
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let compress = match created_compressed(&path) {
            Some(stored) if stored != cfg.compress => {
                tracing::info!(
                    target: "edge_agent::store",
                    path = %path.display(), compress = stored,
                    "the store keeps the compression it was created with (store.compress differs)"
                );
                stored
            }
            Some(stored) => stored,
            None => cfg.compress,
        };
        let sled_cfg = sled::Config::new()
            .path(&path)
            .cache_capacity(sled_cache_capacity(cfg.cache_capacity.0, compress))
            .flush_every_ms(Some(1000))
            .use_compression(compress)
            .compression_factor(COMPRESSION_LEVEL);
        let db = open_locked(&sled_cfg).map_err(open_err)?;
        let records = db.open_tree(TREE_RECORDS).map_err(open_err)?;
        let quarantine = db.open_tree(TREE_QUARANTINE).map_err(open_err)?;
        let meta = db.open_tree(TREE_META).map_err(open_err)?;
        let by_meter = db.open_tree(index::TREE_BY_METER).map_err(open_err)?;
        let state = db.open_tree(state::TREE_STATE).map_err(open_err)?;
        let outbox = db.open_tree(outbox::TREE_OUTBOX).map_err(open_err)?;
        let schemas = codec::Schemas::open(db.open_tree(codec::TREE_SCHEMAS).map_err(open_err)?)
            .map_err(open_err)?;

        let mark = match meta.get(META_LAST_SEQ).map_err(open_err)? {
            None => 0,
            Some(v) => key_seq(&v).ok_or_else(|| StoreError::Incompatible {
                path: path.clone(),
                reason: format!("meta/last_seq is {} bytes, expected 8", v.len()),
            })?,
        };
        let from_blocks = match records.last().map_err(open_err)? {
            None => 0,
            Some((k, v)) => {
                let first = key_seq(&k).ok_or_else(|| StoreError::Incompatible {
                    path: path.clone(),
                    reason: format!("record key of {} bytes, expected 8", k.len()),
                })?;
                // The key's seq was assigned even if its block is unreadable.
                first + count_frames(&v).max(1) - 1
            }
        };
        let last = mark.max(from_blocks);
        let quarantined = quarantine.len() as u64;
        let accounting = meta
            .get(quota::META_ACCOUNTING)
            .map_err(open_err)?
            .and_then(|v| quota::Accounting::decode(&v));
        let acked = outbox
            .get(CURSOR_MARK.as_bytes())
            .map_err(open_err)?
            .and_then(|v| key_seq(&v))
            .unwrap_or(0);
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            StoreError::Incompatible {
                path: path.clone(),
                reason: "the path contains a NUL byte".into(),
            }
        })?;
        let store = Store {
            db,
            records,
            quarantine,
            meta,
            by_meter,
            state,
            outbox,
            schemas,
            path,
            c_path,
            write: Mutex::new(WriteState {
                next_seq: last + 1,
                buf: Vec::with_capacity(BLOCK_BYTES * 2),
                accounted_at: None,
            }),
            durable_last: AtomicU64::new(last),
            quarantined: AtomicU64::new(quarantined),
            live_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(accounting.map_or(0, |a| a.dropped)),
            budget: quota::live_budget(cfg.quota.0),
            min_free: cfg.min_free_space.0,
            hold_max: cfg.hold_readings.max(1),
            cache_capacity: cfg.cache_capacity.0,
            floor: Mutex::new(quota::Floor {
                acked,
                forwarding: true,
                recent: Vec::new(),
            }),
            health: health::Health::default(),
        };
        store.catch_up_index()?;
        // The byte count: as of the last commit that wrote it, plus what a crash
        // kept of later ones; a store without one is counted once, in full.
        let live = match accounting {
            Some(a) if a.through_seq >= last => a.live_bytes,
            Some(a) => a.live_bytes + store.count_live_after(a.through_seq)?,
            None => store.count_live_after(0)?,
        };
        store.live_bytes.store(live, Ordering::Release);
        tracing::info!(
            target: "edge_agent::store",
            path = %store.path.display(), last_seq = last, quarantined,
            live_bytes = live, budget = store.budget, dropped = store.dropped_total(),
            schemas = store.schemas.len(),
            "store opened"
        );
        Ok(store)
    }

    /// Directory of the sled database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Assigns consecutive seqs, writes atomically, flushes. Durable when `Ok`.
    ///
    /// Refused before anything is written, with no seq consumed, while the disk is
    /// short of `store.min_free_space` ([`StoreError::NoSpace`]) or after a failed
    /// write ([`StoreError::Failed`]). On a failed flush the seqs stay consumed (the
    /// records are in sled and may still reach the disk), so a retry gets new seqs:
    /// never a reused one.
    pub fn append(&self, payloads: Vec<Payload>) -> Result<Vec<Record>, StoreError> {
        self.try_append(payloads).map_err(|(e, _)| e)
    }

    /// [`Store::append`] that hands the payloads back when it fails, for a retry.
    pub fn try_append(
        &self,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Record>, (StoreError, Vec<Payload>)> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = self.check_writable() {
            return Err((e, payloads));
        }
        let records = self.write_records(&mut state, payloads);
        records.map_err(|(e, records)| (e, records.into_iter().map(|r| r.payload).collect()))
    }

    /// The commit itself, under the write lock. On failure the records come back.
    fn write_records(
        &self,
        state: &mut WriteState,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Record>, (StoreError, Vec<Record>)> {
        let first = state.next_seq;
        let records: Vec<Record> = payloads
            .into_iter()
            .zip(first..)
            .map(|(payload, seq)| Record { seq, payload })
            .collect();
        match self.write_blocks(state, &records) {
            Ok(()) => Ok(records),
            Err(e) => Err((e, records)),
        }
    }

    fn write_blocks(&self, state: &mut WriteState, records: &[Record]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(());
        };
        let last = last.seq;
        // Readings refer to their schema (new ones are written first).
        let ids = self.schemas.assign(records)?;
        // Every block is encoded before the first is written: an encoding error
        // consumes no seq.
        let buf = &mut state.buf;
        buf.clear();
        let mut blocks = Vec::new();
        for block in Blocks::new(records) {
            let start = buf.len();
            buf.push(BLOCK_V2);
            for rec in block {
                // Records hold consecutive seqs from `first`, one id each.
                let id = ids.get((rec.seq - first.seq) as usize).copied().flatten();
                encode_frame(buf, rec, id)?;
            }
            blocks.push((block[0].seq, start..buf.len()));
        }
        debug_assert_eq!(first.seq, state.next_seq);
        let mut added = 0;
        if let [(first, range)] = blocks.as_slice() {
            // A single block goes in with a plain insert rather than a batch: sled
            // writes and syncs its log buffer twice around every batch, which made a
            // small commit (the common case: a few readings every flush interval)
            // write two to three times the bytes. Batches are kept for larger
            // commits, where those writes matter little and sled's memory stays lower
            // with them (measured, uncompressed store: 64 against 106 MiB peak).
            added += (8 + range.len()) as u64;
            self.note_write(self.records.insert(seq_key(*first), &buf[range.clone()]))?;
        } else {
            let mut batch = sled::Batch::default();
            for (first, range) in blocks {
                added += (8 + range.len()) as u64;
                batch.insert(&seq_key(first), &buf[range]);
            }
            self.note_write(self.records.apply_batch(batch))?;
        }
        // The blocks are in sled: from here on the seqs are consumed (see `append`).
        state.next_seq = last + 1;
        if buf.capacity() > COMMIT_BUF_KEEP {
            // A large commit's buffer is not kept for the small ones that follow.
            *buf = Vec::with_capacity(BLOCK_BYTES * 2);
        }
        added += match self.index_records(records) {
            Err(StoreError::Sled(e)) => return self.note_write(Err(e)),
            other => other?,
        };
        // Written after the blocks: sled recovers a prefix of its log, so the mark
        // never gets ahead of the data it vouches for. The byte count goes with it
        // (`quota.rs`).
        let live = self.live_bytes.fetch_add(added, Ordering::AcqRel) + added;
        self.note_write(self.meta.insert(META_LAST_SEQ, &seq_key(last)))?;
        // The count goes with a commit at most once a second (each extra write adds to
        // the SD card's wear); `open` counts the blocks written after it.
        if state
            .accounted_at
            .map_or(true, |t| t.elapsed() >= quota::ACCOUNT_EVERY)
        {
            let accounting = quota::Accounting {
                through_seq: last,
                live_bytes: live,
                dropped: self.dropped.load(Ordering::Acquire),
            };
            self.note_write(
                self.meta
                    .insert(quota::META_ACCOUNTING, &accounting.encode()),
            )?;
            state.accounted_at = Some(std::time::Instant::now());
        }
        self.note_write(self.db.flush())?;
        self.durable_last.store(last, Ordering::Release);
        Ok(())
    }

    /// Records with `from <= seq <= to` in order; quarantined ones are skipped and
    /// counted. Only durable records are returned.
    pub fn read_range(&self, from: u64, to: u64) -> Result<Vec<Record>, StoreError> {
        let last = self.last_seq();
        let (from, to) = (from.max(1), to.min(last));
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let want = from..=to;
        let mut bad = Vec::new();
        for block in self.blocks_from(from)? {
            let block = block?;
            if block.first > to {
                break;
            }
            let end = block.next_first.unwrap_or(last + 1);
            scan_block(
                &self.schemas,
                block.first,
                &block.value,
                end,
                &want,
                &mut |item| match item {
                    Item::Record(rec) => out.push(rec),
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

    /// The record blocks from the one holding `from` on, in key order (see
    /// [`BlockWalk`]).
    fn blocks_from(&self, from: u64) -> Result<BlockWalk<'_>, StoreError> {
        // The block holding `from` is the last one keyed at or before it.
        let start = match self.records.range(..=seq_key(from)).next_back() {
            Some(entry) => entry?.0,
            None => sled::IVec::from(&seq_key(from)),
        };
        let mut iter = self.records.range(start..);
        let ahead = iter.next().transpose()?;
        Ok(BlockWalk {
            tree: &self.records,
            iter,
            ahead,
            settler: CacheSettler::default(),
        })
    }

    /// Seq of the newest durable record; 0 when empty.
    pub fn last_seq(&self) -> u64 {
        self.durable_last.load(Ordering::Acquire)
    }

    /// Figures for the status page and metrics. Walks the store's directory for its
    /// size on disk: call it off the async runtime's threads.
    pub fn stats(&self) -> StoreStats {
        let last_seq = self.last_seq();
        let first_seq = match self.records.first() {
            Ok(Some((k, _))) => key_seq(&k).unwrap_or(0).min(last_seq),
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(target: "edge_agent::store", error = %e, "cannot read first block");
                0
            }
        };
        StoreStats {
            records: if first_seq == 0 {
                0
            } else {
                last_seq - first_seq + 1
            },
            first_seq,
            last_seq,
            quarantined: self.quarantined.load(Ordering::Relaxed),
            disk_bytes: dir_size(&self.path),
            live_bytes: self.live_bytes.load(Ordering::Acquire),
            budget_bytes: self.budget,
            dropped: self.dropped_total(),
            write_blocked: self.hold_figures().0,
            write_failed: self.has_failed(),
            held: self.hold_figures().1,
            held_dropped: self.hold_figures().2,
            free_bytes: self.free_bytes().unwrap_or(0),
        }
    }

    /// Live bytes (record blocks and time index), the quota's measure.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Acquire)
    }

    /// Live bytes the quota allows.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// Forces everything written so far to disk (also records of an earlier
    /// `append` whose own flush failed: they become durable and readable).
    pub fn flush(&self) -> Result<(), StoreError> {
        let state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.check_failed()?;
        self.note_write(self.db.flush())?;
        self.durable_last
            .store(state.next_seq - 1, Ordering::Release);
        Ok(())
    }

    fn quarantine_record(&self, seq: u64, raw: &[u8], reason: &str) {
        match self.note_write(self.quarantine.insert(seq_key(seq), raw)) {
            // Already quarantined by an earlier read: counted then.
            Ok(Some(_)) => {}
            Ok(None) => {
                self.quarantined.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "edge_agent::store", seq, reason, "record quarantined");
            }
            Err(e) => {
                self.quarantined.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "edge_agent::store",
                    seq, reason, error = %e,
                    "record quarantined; cannot keep its bytes"
                );
            }
        }
    }
}

impl Store {
    /// `store.cache_capacity` (bytes) and `store.hold_readings`: the bounds of the
    /// store's two largest memory consumers.
    pub fn memory_bounds(&self) -> (u64, usize) {
        (self.cache_capacity, self.hold_max)
    }

    /// Readings held in memory now while commits are refused (cheap: one load).
    pub fn held_readings(&self) -> u64 {
        self.hold_figures().1
    }
}

/// zstd level of sled's page compression. Higher levels cost more CPU (a Pi's)
/// for a few percent less: on the store benchmark, levels 1 and 3 wrote the same
/// bytes per record within 2 %.
const COMPRESSION_LEVEL: i32 = 1;

/// How much more a compressed page takes in memory than sled's cache counts for it.
/// sled charges each cached page its size *on disk*, so with compression its cache
/// would hold several times `cache_capacity`; records compress about eightfold, index
/// and state pages less.
const COMPRESSED_CACHE_SHARE: u64 = 8;

/// The capacity to give sled so that the cache's memory stays near `configured`.
fn sled_cache_capacity(configured: u64, compress: bool) -> u64 {
    if compress {
        (configured / COMPRESSED_CACHE_SHARE).max(1 << 20)
    } else {
        configured
    }
}

/// Whether the store at `path` was created with compression, from sled's own
/// `conf` file (sled refuses to open a store with the other setting); `None` for a
/// new store or a file that does not say.
fn created_compressed(path: &Path) -> Option<bool> {
    let text = std::fs::read(path.join("conf")).ok()?;
    // The file is `key: value` lines followed by a binary CRC.
    String::from_utf8_lossy(&text).lines().find_map(|line| {
        match line.strip_prefix("use_compression: ")? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    })
}

/// How long `open` waits for the lock of a store that is being closed.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled, waiting a little while its file lock is held: a dropped `Db` lets
/// go of the lock only once its background threads have finished, so reopening
/// right after a drop (a restart within the process, tests) can find it taken.
/// Another live process holding it still fails, after `LOCK_WAIT`.
fn open_locked(cfg: &sled::Config) -> Result<sled::Db, sled::Error> {
    let start = std::time::Instant::now();
    loop {
        match cfg.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Lookups of one key that fill the access queue of that key's page in sled's cache.
const SLED_ACCESS_QUEUE: usize = 64;
/// Blocks a long read walks between two [`CacheSettler`] steps: about one leaf page.
const SETTLE_EVERY_BLOCKS: usize = 16;
/// Fewer blocks than this at the end of a read are left for the next one to settle.
const SETTLE_MIN_BLOCKS: usize = 4;

/// Keeps a long read from piling up resident pages. sled 0.34 records page accesses
/// in 256 shards and looks at a shard's queue (evicting beyond the cache size) only
/// once 64 accesses to that shard have queued up. A sequential read touches each leaf
/// page about once, so draining a large backlog kept most pages it read in memory:
/// 0.6 bytes of heap per byte read, without bound (sled issue #1036). Looking up a
/// key just read that many times fills its shard's queue, so sled evicts that shard
/// down to the cache size; resident pages stay near one per shard.
#[derive(Default)]
struct CacheSettler {
    unsettled: usize,
    last_key: Option<sled::IVec>,
}

impl CacheSettler {
    /// Notes a block walked; settles every [`SETTLE_EVERY_BLOCKS`].
    fn walked(&mut self, tree: &sled::Tree, key: &sled::IVec) {
        self.unsettled += 1;
        self.last_key = Some(key.clone());
        if self.unsettled >= SETTLE_EVERY_BLOCKS {
            self.finish(tree);
        }
    }

    /// Settles the page of the last block walked, unless only a few were walked
    /// since (a short read, such as the oldest record's age, costs no lookups).
    fn finish(&mut self, tree: &sled::Tree) {
        if let (Some(key), true) = (self.last_key.take(), self.unsettled >= SETTLE_MIN_BLOCKS) {
            for _ in 0..SLED_ACCESS_QUEUE {
                if tree.get(&key).is_err() {
                    break;
                }
            }
        }
        self.unsettled = 0;
    }
}

/// One record block met by a [`BlockWalk`].
struct BlockAt {
    /// Seq of its first record (its key).
    first: u64,
    /// First seq of the next block, if there is one: this block covers the seqs
    /// before it.
    next_first: Option<u64>,
    value: sled::IVec,
}

/// Walks record blocks in key order, one block ahead (a block's extent ends where
/// the next begins), settling sled's cache as it goes and when dropped
/// ([`CacheSettler`]). Keys that are not seqs are passed over.
struct BlockWalk<'a> {
    tree: &'a sled::Tree,
    iter: sled::Iter,
    ahead: Option<(sled::IVec, sled::IVec)>,
    settler: CacheSettler,
}

impl Iterator for BlockWalk<'_> {
    type Item = Result<BlockAt, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (key, value) = self.ahead.take()?;
            self.ahead = match self.iter.next().transpose() {
                Ok(ahead) => ahead,
                Err(e) => return Some(Err(e.into())),
            };
            let Some(first) = key_seq(&key) else {
                continue;
            };
            self.settler.walked(self.tree, &key);
            let next_first = self.ahead.as_ref().and_then(|(k, _)| key_seq(k));
            return Some(Ok(BlockAt {
                first,
                next_first,
                value,
            }));
        }
    }
}

impl Drop for BlockWalk<'_> {
    fn drop(&mut self) {
        self.settler.finish(self.tree);
    }
}

/// Splits a commit's records into blocks of at most [`BLOCK_RECORDS`] records and
/// about [`BLOCK_BYTES`] bytes (estimated, the encoded size is not known yet).
struct Blocks<'a> {
    rest: &'a [Record],
}

impl<'a> Blocks<'a> {
    fn new(records: &'a [Record]) -> Self {
        Blocks { rest: records }
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = &'a [Record];
    fn next(&mut self) -> Option<&'a [Record]> {
        if self.rest.is_empty() {
            return None;
        }
        let mut n = 0;
        let mut bytes = 0;
        while n < self.rest.len() && n < BLOCK_RECORDS && bytes < BLOCK_BYTES {
            bytes += estimated_size(&self.rest[n]);
            n += 1;
        }
        let (block, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(block)
    }
}

fn estimated_size(rec: &Record) -> usize {
    match &rec.payload {
        // By schema: about 4 bytes a value (8 for float64s).
        Payload::Reading(r) => 24 + r.values.len() * 6,
        Payload::Interval(iv) => 120 + iv.meter.len() + iv.quantity.len(),
        Payload::Event(ev) => 96 + ev.meter.len() + ev.rule.len() + ev.quantity.len(),
        Payload::Dropped(d) => 64 + d.ranges.len() * 18,
    }
}

/// Appends `[u32 len][record][u32 crc]` for `rec` to `buf`, encoding in place
/// (`codec.rs`; by schema `schema` when it is a reading that has one).
fn encode_frame(buf: &mut Vec<u8>, rec: &Record, schema: Option<u32>) -> Result<(), StoreError> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    codec::encode_record(buf, rec, schema)?;
    let len = buf.len() - at - 4;
    let len32 = u32::try_from(len).map_err(|_| StoreError::Encode {
        seq: rec.seq,
        reason: format!("{len} bytes do not fit a frame"),
    })?;
    buf[at..at + 4].copy_from_slice(&len32.to_le_bytes());
    let crc = crc32c(&buf[at + 4..]);
    buf.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Bytes allocated to the files under `dir` (sled's db, conf, snapshots, blobs).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(md) = entry.metadata() else { continue };
            if md.is_dir() {
                stack.push(entry.path());
            } else {
                total += file_bytes(&md);
            }
        }
    }
    total
}

#[cfg(unix)]
fn file_bytes(md: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    // Allocated blocks, not the apparent length: what counts against the disk.
    md.blocks() * 512
}

#[cfg(not(unix))]
fn file_bytes(md: &std::fs::Metadata) -> u64 {
    md.len()
}

/// Full scan for tools and tests: is every seq from first to last present once
/// with a valid CRC? Bad records found are quarantined as by [`Store::read_range`].
pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let last = store.last_seq();
    let mut report = VerifyReport {
        last_seq: last,
        ..VerifyReport::default()
    };
    let all = 1..=u64::MAX;
    let mut iter = store.records.iter();
    let mut cur = iter.next().transpose()?;
    let mut bad = Vec::new();
    while let Some((k, v)) = cur {
        let next = iter.next().transpose()?;
        let Some(first) = key_seq(&k) else {
            cur = next;
            continue;
        };
        if first > last {
            // Written by a commit whose flush has not returned (or failed).
            break;
        }
        if report.first_seq == 0 {
            report.first_seq = first;
        }
        let end = next
            .as_ref()
            .and_then(|(nk, _)| key_seq(nk))
            .unwrap_or(last + 1);
        // A block cannot span more than MAX_BLOCK_SPAN seqs: anything between that
        // and the next block is missing.
        let limit = first.saturating_add(MAX_BLOCK_SPAN);
        if end > limit {
            report.gaps.push(limit..=end - 1);
        }
        let first_format = v.first() == Some(&BLOCK_V1);
        scan_block(
            &store.schemas,
            first,
            &v,
            end,
            &all,
            &mut |item| match item {
                Item::Record(_) => {
                    report.ok += 1;
                    report.first_format += first_format as u64;
                }
                Item::Quarantined { seq, raw, reason } => {
                    report.quarantined += 1;
                    bad.push((seq, raw.to_vec(), reason));
                }
                Item::Duplicate => report.duplicates += 1,
                Item::Gap(r) => report.gaps.push(r),
            },
        );
        for (seq, raw, reason) in bad.drain(..) {
            store.quarantine_record(seq, &raw, reason);
        }
        cur = next;
    }
    report.gaps.sort_by_key(|r| *r.start());
    Ok(report)
}

#[cfg(test)]
mod tests;
