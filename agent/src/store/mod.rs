//! The durable store: the only module that touches sled.
//!
//! # Durability
//!
//! [`Store::append`] assigns consecutive gateway-wide sequence numbers and appends
//! each record to the journal (`journal.rs`: CRC-framed records, one `pwrite` per append):
//! from then on a kill of the process cannot lose it, and readers see it at once.
//! The records past the last block in sled form the *open block*, kept in memory
//! (readers walk it after sled's blocks); once it is full it moves into sled as one
//! block, never rewritten, without a flush. [`Store::sync`] (`fdatasync` of the
//! journal) makes everything appended so far survive a power cut: the writer
//! ([`StoreWriter`]) runs it every `store.sync_interval` and at once for a push
//! waiting for its answer; the upstream reads only synced records
//! ([`Store::synced_seq`]). sled is flushed with sync marks and when a journal
//! segment waits to be reused; then the journal frees the segments sled holds.
//! On open, the journal's records past sled's last block are replayed.
//!
//! Sequence numbers start at 1, have no gaps and are never reused for a record that
//! was synced (or sent upstream): on open the next one follows the last record the
//! journal or sled holds (and a high-water mark written with every block, in case
//! that block is unreadable).
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
//! | `by_meter`   | meter id, 0x00, hour, first seq (`index.rs`) | compact (ts, seq) entries: per-meter time index |
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
//! Version `3` (`block.rs`, written now for full blocks where the store compresses,
//! `store.compress`): a version 2 block packed: its frames as zero-padded rows, stored
//! column by column and compressed with zstd, about a fifth smaller than sled's own
//! page compression makes it. Readers unpack it to version 2 first; a block that does
//! not unpack is quarantined whole. The open block is version 2.
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
//! Blocks hold at most [`BLOCK_RECORDS`] records (fewer once they reach
//! [`BLOCK_BYTES`]). Blocks are never rewritten. A block covers the seqs from its key up to the
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
mod block;
mod checksum;
pub mod codec;
pub mod config;
mod health;
mod index;
mod ingest_sink;
pub mod journal;
mod lease;
mod outbox;
mod quota;
mod retention;
pub mod runtime_dir;
mod state;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

pub use checksum::{crc32c, Crc32c};
pub use lease::LEASE_SEQS;
pub use outbox::{RangeDigest, RawRange, RawRecord, RawWalk, CURSOR_MARK};
pub use quota::{live_budget, merge_range, Deleted, QUOTA_PASS_BLOCKS, SLED_OVERHEAD};
pub use state::{StateEntry, StateError};
pub use writer::{start_writer, StoreWriter};

use std::ffi::CString;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::model::{Payload, Record};
use crate::store::config::StoreConfig;

/// Most records in one block value.
pub const BLOCK_RECORDS: usize = 32;
/// A block is closed once it holds at least this many bytes. Small enough that a
/// sled leaf page (up to 17 blocks) stays under sled's blob threshold (a quarter of
/// its 512 KiB segment): larger pages go to files of their own, which sled's cache
/// counts at a few bytes each and so never evicts.
pub const BLOCK_BYTES: usize = 6 * 1024;
/// Where the store packs blocks (`block.rs`), a block grows past [`BLOCK_RECORDS`]
/// records while it packs small: a packed block's columns compress better the more
/// rows they hold (simulated SDM630 readings: 58 bytes a reading at 32 rows, 46 at
/// 128), and sled writes every byte of it about 1.3 times. It is first tried packed
/// at [`BLOCK_BYTES`] unpacked, and closes once it packs to [`PACKED_BLOCK_TARGET`]
/// bytes or more (or not at all), or holds [`PACKED_BLOCK_RECORDS`] records. After a
/// trial that packed to `p` bytes, the next one comes after `PACKED_BLOCK_MAX - p`
/// more unpacked bytes: even if those did not compress at all, a packed block stays
/// under [`PACKED_BLOCK_MAX`], and a sled leaf of 17 blocks under sled's blob
/// threshold, as [`BLOCK_BYTES`] ensures for blocks stored as they are.
pub const PACKED_BLOCK_RECORDS: usize = 128;
/// See [`PACKED_BLOCK_RECORDS`].
pub const PACKED_BLOCK_TARGET: usize = 5 * 1024;
/// See [`PACKED_BLOCK_RECORDS`].
pub const PACKED_BLOCK_MAX: usize = 7 * 1024;
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
/// A random id of the store: names its runtime journal's directory.
const META_STORE_ID: &[u8] = b"store_id";

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
    #[error("journal: {0}")]
    Journal(String),
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
    /// How the journal writes ([`JournalMode::name`]).
    pub journal: &'static str,
}

/// How the journal reaches the disk (`docs/durability.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalMode {
    /// No `store.runtime_dir`: one buffered `pwrite` per append into the journal on
    /// disk, `fdatasync` at each sync.
    Buffered,
    /// A kill-safe runtime journal (one `pwrite` per append on a tmpfs) and the
    /// journal on disk written with `O_DIRECT` at each sync (sectors, not pages).
    RuntimeDirect,
    /// As [`JournalMode::RuntimeDirect`], but the store's filesystem refused
    /// `O_DIRECT`: the journal on disk is written through the page cache at each sync.
    RuntimeBuffered,
}

impl JournalMode {
    /// As the status page shows it.
    pub fn name(self) -> &'static str {
        match self {
            JournalMode::Buffered => "buffered",
            JournalMode::RuntimeDirect => "runtime+direct",
            JournalMode::RuntimeBuffered => "runtime+buffered",
        }
    }
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
    /// The journal every record is appended to first (`journal.rs`); with a runtime
    /// journal, in direct mode (written at each sync).
    journal: journal::Journal,
    /// The kill-safe journal on a tmpfs (`store.runtime_dir`): every record is written
    /// there first, one `pwrite` per append, never synced.
    runtime: Option<journal::Journal>,
    /// When the oldest record not yet covered by a sync was appended.
    unsynced_since: Option<std::time::Instant>,
    /// Reused between commits: a commit's block values are built here before being
    /// copied into sled's `IVec`s.
    buf: Vec<u8>,
    /// When the byte count was last written with a commit (`quota.rs`).
    accounted_at: Option<std::time::Instant>,
    /// The seq lease (`lease.rs`).
    lease: lease::LeaseState,
    /// Reused for each block packed at its seal (`block.rs`).
    packed: Vec<u8>,
}

/// The durable record store. `Send + Sync`; share it as `Arc<Store>`.
pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    quarantine: sled::Tree,
    meta: sled::Tree,
    /// Per-meter time index of the readings (see `index.rs`).
    by_meter: sled::Tree,
    /// Index entries of blocks in sled not yet written to `by_meter`.
    pending_index: Mutex<index::PendingIndex>,
    /// Derived state that survives restarts (see `state.rs`).
    state: sled::Tree,
    /// Marks of the upstream sync (see `outbox.rs`).
    outbox: sled::Tree,
    /// The schemas readings refer to (see `codec.rs`).
    schemas: codec::Schemas,
    path: PathBuf,
    /// `path` for `statvfs`.
    c_path: CString,
    /// Held for a whole commit (seq assignment, journal append, block hand-over):
    /// commits are ordered and a seq is visible once its journal append returned.
    write: Mutex<WriteState>,
    /// The open block: the records past the last block in sled, readable at once.
    tail: RwLock<Tail>,
    /// Last seq appended to the journal: visible to readers, safe from a kill.
    durable_last: AtomicU64,
    /// Last seq a journal sync covers: safe from a power cut.
    synced_last: AtomicU64,
    /// Last seq held by a block in sled (flushed or not).
    sled_last: AtomicU64,
    /// Wakes whoever waits for a sync (the upstream); carries `synced_last`.
    synced_tx: tokio::sync::watch::Sender<u64>,
    /// One sync at a time.
    sync_lock: Mutex<()>,
    /// Syncs started so far.
    syncs_started: AtomicU64,
    /// Syncs finished (journal and, when due, sled), and its waiters.
    syncs_finished: (Mutex<u64>, std::sync::Condvar),
    /// The journal holds sync marks (`outbox.rs`) that the next sync must make
    /// durable.
    marks_unsynced: AtomicBool,
    /// `store.sync_interval`.
    sync_interval: std::time::Duration,
    /// `store.upstream_sync_now`.
    upstream_sync_now: bool,
    /// Tests: told when a journal sync or a sled flush reached the disk.
    #[cfg(test)]
    disk_events: Mutex<Option<testing::DiskHook>>,
    quarantined: AtomicU64,
    /// Live bytes (blocks and index entries), the quota's measure (`quota.rs`).
    live_bytes: AtomicU64,
    /// Records the quota dropped, since the store was created (persistent).
    dropped: AtomicU64,
    /// Live bytes the quota allows.
    budget: u64,
    /// How the journal writes (see [`JournalMode`]).
    journal_mode: JournalMode,
    /// Full blocks are stored packed (`block.rs`): the store compresses.
    pack_blocks: bool,
    /// The runtime journal's directory, removed after a clean stop.
    runtime_journal_dir: Option<PathBuf>,
    /// Records go upstream under a seq lease (`lease.rs`): with a runtime journal.
    lease_mode: bool,
    /// The lease in force (synced); 0: none.
    leased: AtomicU64,
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
        } else if let Some(dir) = self.runtime_journal_dir.take() {
            // After a clean stop (the lease closed after the last record) the runtime
            // journal holds nothing the disk lacks once the disk journal is synced
            // (marks written since): it is removed, a tmpfs is memory. A store
            // dropped otherwise (a stop that failed) keeps it for the next open.
            let state = self.write.get_mut().unwrap_or_else(|e| e.into_inner());
            let closed = state.lease.closed_at == Some(state.next_seq - 1);
            if closed && state.journal.sync().is_ok() {
                state.runtime = None;
                runtime_dir::remove(&dir, "runtime journal removed after a clean stop");
            }
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
        let reason = if value.first() == Some(&block::BLOCK_V3) {
            "undecodable packed block"
        } else {
            "unknown block version"
        };
        broken(first, value, reason, sink);
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
    if let Some(n) = block::packed_frames(value) {
        return n;
    }
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
            // The journal makes records durable; sled is flushed when a journal
            // segment waits to be reused and with sync marks (`Store::sync`).
            .flush_every_ms(None)
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
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            StoreError::Incompatible {
                path: path.clone(),
                reason: "the path contains a NUL byte".into(),
            }
        })?;
        let runtime_location = runtime_dir::Location::resolve(
            &cfg.runtime_dir,
            cfg.journal_segment_size
                .0
                .saturating_mul(cfg.journal_segments as u64),
        );
        let store_id = match runtime_location {
            runtime_dir::Location::None => 0,
            _ => store_id(&meta, &db).map_err(open_err)?,
        };
        let runtime_journal = runtime_location.journal_dir(store_id);
        if let Some(rt) = &runtime_journal {
            runtime_dir::prepare(rt, &path);
        }
        let runtime_cfg = runtime_journal.as_ref().map(|rt| journal::JournalConfig {
            dir: rt.dir.clone(),
            segment_bytes: cfg.journal_segment_size.0,
            segment_count: cfg.journal_segments,
            direct: false,
        });
        let journal_cfg = journal::JournalConfig {
            dir: cfg.journal_path(),
            segment_bytes: cfg.journal_segment_size.0,
            segment_count: cfg.journal_segments,
            direct: runtime_cfg.is_some(),
        };
        let journal_err = |e: journal::JournalError| StoreError::Journal(e.to_string());
        let (mut journal, mut replay) =
            journal::Journal::open(&journal_cfg, last).map_err(journal_err)?;
        let journal_mode = match (&runtime_cfg, journal.mode()) {
            (None, _) => JournalMode::Buffered,
            (Some(_), journal::WriteMode::Direct { .. }) => JournalMode::RuntimeDirect,
            (Some(_), journal::WriteMode::Buffered) => JournalMode::RuntimeBuffered,
        };
        let mut on_disk = last;
        let mut runtime_continues = false;
        let runtime = match &runtime_cfg {
            None => None,
            Some(rt_cfg) => {
                on_disk = replay.records.last().map_or(last, |r| r.0);
                on_disk = replay
                    .damaged
                    .iter()
                    .map(|d| d.last_seq)
                    .fold(on_disk, u64::max);
                let (runtime, kept, continues) = runtime_replay(rt_cfg, on_disk)?;
                runtime_continues = continues;
                // What the runtime journal holds past the journal on disk (records a
                // kill took before their sync) goes to the disk too, synced now.
                for (seq, body) in &kept {
                    journal.append(*seq, body).map_err(journal_err)?;
                }
                if !kept.is_empty() {
                    journal.sync().map_err(journal_err)?;
                }
                replay.records.extend(kept);
                Some(runtime)
            }
        };
        outbox::restore_marks(&outbox, std::mem::take(&mut replay.marks)).map_err(open_err)?;
        let outbox_mark = |name: &str| -> Result<u64, StoreError> {
            Ok(outbox
                .get(name.as_bytes())
                .map_err(open_err)?
                .and_then(|v| key_seq(&v))
                .unwrap_or(0))
        };
        let acked = outbox_mark(CURSOR_MARK)?;
        let (lease_mark, closed_mark) = (
            outbox_mark(lease::MARK_LEASE)?,
            outbox_mark(lease::MARK_CLOSED)?,
        );
        let (synced_tx, _) = tokio::sync::watch::channel(last);
        let store = Store {
            db,
            records,
            quarantine,
            meta,
            by_meter,
            pending_index: Mutex::new(index::PendingIndex::default()),
            state,
            outbox,
            schemas,
            path,
            c_path,
            write: Mutex::new(WriteState {
                next_seq: last + 1,
                journal,
                runtime,
                unsynced_since: None,
                buf: Vec::with_capacity(BLOCK_BYTES * 2),
                accounted_at: None,
                lease: lease::LeaseState {
                    granted: lease_mark.max(closed_mark),
                    ..lease::LeaseState::default()
                },
                packed: Vec::new(),
            }),
            tail: RwLock::new(Tail::new(last + 1)),
            durable_last: AtomicU64::new(last),
            synced_last: AtomicU64::new(last),
            sled_last: AtomicU64::new(last),
            synced_tx,
            sync_lock: Mutex::new(()),
            syncs_started: AtomicU64::new(0),
            syncs_finished: (Mutex::new(0), std::sync::Condvar::new()),
            marks_unsynced: AtomicBool::new(false),
            sync_interval: cfg.sync_interval.0,
            upstream_sync_now: cfg.upstream_sync_now,
            #[cfg(test)]
            disk_events: Mutex::new(None),
            quarantined: AtomicU64::new(quarantined),
            live_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(accounting.map_or(0, |a| a.dropped)),
            budget: quota::live_budget(cfg.quota.0),
            journal_mode,
            pack_blocks: compress,
            runtime_journal_dir: runtime_cfg.as_ref().map(|c| c.dir.clone()),
            lease_mode: runtime_cfg.is_some(),
            leased: AtomicU64::new(0),
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
        store.replay(replay)?;
        // The runtime journal is gone (a power cut, a reboot) while a lease was in
        // force: seqs up to it may have gone upstream (`lease.rs`).
        if store.lease_mode && !runtime_continues && lease_mark > closed_mark.max(on_disk) {
            store.skip_past_lease(on_disk + 1, lease_mark)?;
        }
        tracing::info!(
            target: "edge_agent::store",
            path = %store.path.display(), last_seq = last, quarantined,
            live_bytes = live, budget = store.budget, dropped = store.dropped_total(),
            schemas = store.schemas.len(), journal = journal_mode.name(),
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

    /// The commit itself, under the write lock: every record is encoded, appended to
    /// the journal (one `pwrite` for all) and added to the open block; full blocks go to
    /// sled, unflushed. On failure the records not appended come back.
    fn write_records(
        &self,
        state: &mut WriteState,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Record>, (StoreError, Vec<Record>)> {
        let first = state.next_seq;
        let mut records: Vec<Record> = payloads
            .into_iter()
            .zip(first..)
            .map(|(payload, seq)| Record { seq, payload })
            .collect();
        // Readings refer to their schema: new ones are written (and flushed) first.
        #[cfg(test)]
        let schemas_before = self.schemas.len();
        let ids = match self.schemas.assign(&records) {
            Ok(ids) => ids,
            Err(e) => return Err((e, records)),
        };
        // A new schema's flush is a flush of all of sled.
        #[cfg(test)]
        if self.schemas.len() > schemas_before {
            self.disk_event(testing::DiskEvent::SledFlushed, false);
        }
        // Every record is encoded before the first is appended: an encoding error
        // consumes no seq.
        let buf = &mut state.buf;
        buf.clear();
        let mut frames = Vec::with_capacity(records.len());
        for (i, rec) in records.iter().enumerate() {
            let at = buf.len();
            if let Err(e) = encode_frame(buf, rec, ids.get(i).copied().flatten()) {
                return Err((e, records));
            }
            frames.push(at..buf.len());
        }
        let bodies: Vec<journal::Append> = records
            .iter()
            .zip(&frames)
            .map(|(rec, frame)| journal::Append {
                seq: rec.seq,
                payload: &state.buf[frame.start + 4..frame.end - 4],
                // The block frame ends with the body's CRC-32C, as a journal frame does.
                crc: read_u32(&state.buf, frame.end - 4).unwrap_or_default(),
            })
            .collect();
        let (appended, failure) =
            match self.journal_append(&mut state.journal, state.runtime.as_mut(), &bodies) {
                Ok(()) => (records.len(), None),
                Err((n, e)) => (n, Some(e)),
            };
        drop(bodies);
        let rest = records.split_off(appended);
        if let Some(last) = records.last() {
            // The records are in the journal: from here on their seqs are consumed.
            state.next_seq = last.seq + 1;
            state
                .unsynced_since
                .get_or_insert_with(std::time::Instant::now);
            let mut tail = self.tail.write().unwrap_or_else(|e| e.into_inner());
            for (rec, frame) in records.iter().zip(&frames) {
                tail.push(&state.buf[frame.clone()], Some(rec));
                if tail.is_full(self.pack_blocks, &mut state.packed) {
                    self.seal(state, &mut tail);
                }
            }
            self.durable_last.store(last.seq, Ordering::Release);
        }
        if state.buf.capacity() > COMMIT_BUF_KEEP {
            // A large commit's buffer is not kept for the small ones that follow.
            state.buf = Vec::with_capacity(BLOCK_BYTES * 2);
        }
        match failure {
            Some(e) => Err((e, rest)),
            None => Ok(records),
        }
    }

    /// Appends records (seq, body) to the journal, gathered (one `pwrite` for all of
    /// them in buffered mode, see [`journal::Journal::append_all`]); with a runtime
    /// journal, to that one first (kill-safe, in the kernel), then to the journal on
    /// disk (gathered for its next sync). A full journal (every segment waits for
    /// sled) gets sled flushed and its segments released, and the append goes on. On
    /// an error, the number of records appended (to both journals) comes with it.
    fn journal_append(
        &self,
        journal: &mut journal::Journal,
        runtime: Option<&mut journal::Journal>,
        records: &[journal::Append],
    ) -> Result<(), (usize, StoreError)> {
        match runtime {
            Some(runtime) => {
                let kill_safe = self.journal_append_all(runtime, Some(journal), records);
                let n = kill_safe
                    .as_ref()
                    .map_or_else(|(n, _)| *n, |()| records.len());
                self.journal_append_all(journal, Some(runtime), &records[..n])?;
                kill_safe
            }
            None => self.journal_append_all(journal, None, records),
        }
    }

    /// [`journal::Journal::append_all`] into `journal`, making room when it is full
    /// (as [`Store::journal_write`]; `other` is the other journal, if any).
    fn journal_append_all(
        &self,
        journal: &mut journal::Journal,
        mut other: Option<&mut journal::Journal>,
        records: &[journal::Append],
    ) -> Result<(), (usize, StoreError)> {
        let mut done = 0;
        // Where the last full journal was met: full again there after making room,
        // it stays full.
        let mut made_room_at = None;
        loop {
            match journal.append_all(&records[done..]) {
                Ok(()) => return Ok(()),
                Err((n, journal::JournalError::Full { .. })) if made_room_at != Some(done + n) => {
                    done += n;
                    made_room_at = Some(done);
                    self.make_room(journal, other.as_deref_mut())
                        .map_err(|e| (done, e))?;
                }
                Err((n, e)) => return Err((done + n, self.journal_failed(e))),
            }
        }
    }

    /// Flushes sled and releases the journals' segments (and marks) it then holds.
    fn make_room(
        &self,
        journal: &mut journal::Journal,
        other: Option<&mut journal::Journal>,
    ) -> Result<(), StoreError> {
        let through = self.sled_last.load(Ordering::Acquire);
        let marks = journal
            .marks_written()
            .max(other.as_ref().map_or(0, |o| o.marks_written()));
        self.note_write(self.db.flush())?;
        #[cfg(test)]
        self.disk_event(testing::DiskEvent::SledFlushed, false);
        journal.release_through(through);
        journal.release_marks(marks);
        if let Some(other) = other {
            other.release_through(through);
            other.release_marks(marks);
        }
        Ok(())
    }

    /// Runs one journal write; when the journal is full, sled is flushed, the
    /// segments it then holds are released and the write is tried again.
    fn journal_write(
        &self,
        journal: &mut journal::Journal,
        other: Option<&mut journal::Journal>,
        write: &mut dyn FnMut(&mut journal::Journal) -> Result<(), journal::JournalError>,
    ) -> Result<(), StoreError> {
        match write(journal) {
            Err(journal::JournalError::Full { .. }) => {
                self.make_room(journal, other)?;
                write(journal).map_err(|e| self.journal_failed(e))
            }
            other => other.map_err(|e| self.journal_failed(e)),
        }
    }

    /// A journal error: an I/O error leaves the store failed like a sled one.
    fn journal_failed(&self, e: journal::JournalError) -> StoreError {
        match e {
            journal::JournalError::Io { source, .. } => {
                match self.note_write::<()>(Err(sled::Error::Io(source))) {
                    Err(e) => e,
                    Ok(()) => StoreError::Journal("I/O error".into()),
                }
            }
            journal::JournalError::TooLarge { len, .. } => StoreError::Encode {
                seq: 0,
                reason: format!("{len} bytes do not fit a journal segment"),
            },
            other => StoreError::Journal(other.to_string()),
        }
    }

    /// Moves the full open block into sled with its index entries, the last-seq mark
    /// and (at most once a second) the byte count; no flush. The block is never
    /// written again. A sled error leaves the block open (it is in the journal) and
    /// the store failed.
    fn seal(&self, state: &mut WriteState, tail: &mut Tail) {
        let Some(last) = tail.last_seq() else {
            return;
        };
        if let Err(e) = self.seal_block(state, tail, last) {
            tracing::warn!(target: "edge_agent::store", error = %e, first = tail.first, "cannot move a block into sled");
            return;
        }
        self.sled_last.store(last, Ordering::Release);
        *tail = Tail::new(last + 1);
    }

    fn seal_block(&self, state: &mut WriteState, tail: &Tail, last: u64) -> Result<(), StoreError> {
        // Packed (`block.rs`) where the store compresses; the byte count is of what
        // sled stores.
        // A trial pack of exactly these frames may have just filled `state.packed`.
        let packed = match tail.packed_now {
            Some(packed) => packed,
            None => self.pack_blocks && block::pack(&tail.value, &mut state.packed),
        };
        let value = if packed {
            state.packed.as_slice()
        } else {
            tail.value.as_slice()
        };
        let mut added = (8 + value.len()) as u64;
        self.note_write(self.records.insert(seq_key(tail.first), value))?;
        added += match self.index_records(&tail.readings) {
            Err(StoreError::Sled(e)) => return self.note_write(Err(e)),
            other => other?,
        };
        // Written after the block: sled recovers a prefix of its log, so the mark
        // never gets ahead of the data it vouches for. The byte count goes with it
        // (`quota.rs`).
        let live = self.live_bytes.fetch_add(added, Ordering::AcqRel) + added;
        self.note_write(self.meta.insert(META_LAST_SEQ, &seq_key(last)))?;
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
        Ok(())
    }

    /// Moves the open block into sled now, full or not (tests that look at sled's
    /// blocks).
    #[cfg(test)]
    pub(crate) fn seal_open_block(&self) {
        let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut tail = self.tail.write().unwrap_or_else(|e| e.into_inner());
        self.seal(&mut state, &mut tail);
    }

    /// Takes in what the journal held past sled's last block (after a kill or a power
    /// cut): the records go to the open block (full blocks to sled), damaged frames
    /// are quarantined and counted, and the seqs continue after the last one.
    fn replay(&self, replay: journal::Replay) -> Result<(), StoreError> {
        if replay.torn_tail {
            tracing::info!(target: "edge_agent::store", "journal: a torn last frame was cut");
        }
        if replay.records.is_empty() && replay.damaged.is_empty() {
            return Ok(());
        }
        let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut tail = self.tail.write().unwrap_or_else(|e| e.into_inner());
        let mut items: Vec<(u64, Option<Vec<u8>>)> = replay
            .records
            .into_iter()
            .map(|(seq, body)| (seq, Some(body)))
            .collect();
        for d in &replay.damaged {
            self.quarantine_record(d.first_seq, &d.bytes, "damaged journal frame");
            for seq in d.first_seq.max(1)..=d.last_seq {
                if seq != d.first_seq {
                    self.quarantine_record(seq, &[], "damaged journal frame");
                }
                items.push((seq, None));
            }
        }
        items.sort_by_key(|(seq, _)| *seq);
        let count = items.len();
        let mut frame = Vec::new();
        for (seq, body) in items {
            if seq != tail.first + tail.count() as u64 {
                // Never happens: the replay is contiguous past sled's last seq.
                return Err(StoreError::Incompatible {
                    path: self.path.clone(),
                    reason: format!("journal replay not contiguous at seq {seq}"),
                });
            }
            frame.clear();
            let body = body.unwrap_or_default();
            frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(&body);
            // A damaged frame is kept as an empty body: it reads as quarantined.
            frame.extend_from_slice(&crc32c(&body).to_le_bytes());
            let mut rec = None;
            let block = [&[BLOCK_V2][..], &frame].concat();
            scan_block(
                &self.schemas,
                seq,
                &block,
                seq + 1,
                &(seq..=seq),
                &mut |item| {
                    if let Item::Record(r) = item {
                        rec = Some(r);
                    }
                },
            );
            tail.push(&frame, rec.as_ref());
            if tail.is_full(self.pack_blocks, &mut state.packed) {
                self.seal(&mut state, &mut tail);
            }
        }
        let last = tail
            .last_seq()
            .unwrap_or_else(|| tail.first.saturating_sub(1));
        state.next_seq = last + 1;
        self.durable_last.store(last, Ordering::Release);
        // `Journal::open` synced what it replayed.
        self.synced_last.store(last, Ordering::Release);
        self.synced_tx.send_replace(last);
        tracing::info!(
            target: "edge_agent::store",
            records = count, damaged = replay.damaged.len(), last_seq = last,
            "journal replayed"
        );
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
        // Taken before sled is read: a block that moves into sled meanwhile is found
        // there.
        let tail = self.tail_snapshot(self.last_seq());
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
            tail,
        })
    }

    /// The open block up to `through`.
    fn tail_snapshot(&self, through: u64) -> Option<(u64, sled::IVec)> {
        self.tail
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot(through)
    }

    /// Seq of the last record in sled's blocks; the open block follows it.
    pub(super) fn sled_last_seq(&self) -> u64 {
        self.sled_last.load(Ordering::Acquire)
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
            Ok(None) => self.tail_snapshot(last_seq).map_or(0, |(first, _)| first),
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
            journal: self.journal_mode.name(),
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
        self.check_failed()?;
        self.sync()?;
        self.flush_sled()
    }

    /// Makes every record and sync mark appended so far safe from a power cut: one
    /// `fdatasync` of the journal, without holding up appends meanwhile. sled is
    /// flushed with it only when a journal segment waits for sled before it can be
    /// reused. Returns the last seq synced.
    pub fn sync(&self) -> Result<u64, StoreError> {
        let one_at_a_time = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let number = self.syncs_started.fetch_add(1, Ordering::AcqRel) + 1;
        let result = self.sync_locked();
        // Done (or failed): waiters look again either way.
        let (finished, waiters) = &self.syncs_finished;
        let mut finished = finished.lock().unwrap_or_else(|e| e.into_inner());
        *finished = (*finished).max(number);
        waiters.notify_all();
        drop(finished);
        drop(one_at_a_time);
        result
    }

    /// Syncs started so far (see [`Store::wait_for_sync_after`]).
    pub(super) fn syncs_started(&self) -> u64 {
        self.syncs_started.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for a sync that started after `after` syncs had started
    /// to finish; false when none did.
    pub(super) fn wait_for_sync_after(&self, after: u64, limit: std::time::Duration) -> bool {
        let (finished, waiters) = &self.syncs_finished;
        let finished = finished.lock().unwrap_or_else(|e| e.into_inner());
        let (finished, _) = waiters
            .wait_timeout_while(finished, limit, |n| *n <= after)
            .unwrap_or_else(|e| e.into_inner());
        *finished > after
    }

    /// [`Store::sync`] under the sync lock.
    fn sync_locked(&self) -> Result<u64, StoreError> {
        self.check_failed()?;
        let (through, files, in_use, lease) = {
            let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let lease = self.grant_lease(&mut state)?;
            let (through, files) = state
                .journal
                .start_sync()
                .map_err(|e| self.journal_failed(e))?;
            state.unsynced_since = None;
            // The marks appended so far go with this sync.
            self.marks_unsynced.store(false, Ordering::Release);
            (through, files, state.journal.segments_in_use(), lease)
        };
        for file in files {
            file.sync_data().map_err(|e| {
                self.journal_failed(journal::JournalError::Io {
                    path: self.path.join("journal"),
                    source: e,
                })
            })?;
        }
        #[cfg(test)]
        self.disk_event(testing::DiskEvent::JournalSynced, true);
        self.write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journal
            .finish_sync(through);
        tracing::debug!(target: "edge_agent::store", "synced seq ..={through}");
        if self.synced_last.fetch_max(through, Ordering::AcqRel) < through {
            self.synced_tx.send_replace(through);
        }
        if let Some(lease) = lease {
            self.lease_in_force(lease);
        }
        if in_use > 1 {
            self.flush_sled()?;
        }
        Ok(through)
    }

    /// Flushes sled, then lets the journal reuse the segments whose records sled now
    /// holds durably.
    fn flush_sled(&self) -> Result<(), StoreError> {
        let through = self.sled_last.load(Ordering::Acquire);
        // Every mark counted here is in sled's `outbox` tree already.
        let marks = self
            .write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .journal
            .marks_written();
        self.flush_index()?;
        self.note_write(self.db.flush())?;
        #[cfg(test)]
        self.disk_event(testing::DiskEvent::SledFlushed, true);
        let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        for j in std::iter::once(&mut state.journal).chain(state.runtime.as_mut()) {
            j.release_through(through);
            j.release_marks(marks);
        }
        Ok(())
    }

    /// Tests: runs `f` with appends held.
    #[cfg(test)]
    pub(crate) fn with_appends_held<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self.write.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }

    /// Tests: `hook` is called with what reached the disk, from then on.
    #[cfg(test)]
    pub(crate) fn on_disk_event(&self, hook: testing::DiskHook) {
        *self.disk_events.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Tests: calls the hook, with appends held meanwhile (`hold`: unless the
    /// caller holds them already).
    #[cfg(test)]
    fn disk_event(&self, event: testing::DiskEvent, hold: bool) {
        let hook = self
            .disk_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hook) = hook {
            let _held = hold.then(|| self.write.lock().unwrap_or_else(|e| e.into_inner()));
            hook(event);
        }
    }

    /// Last seq a journal sync covers: records up to it survive a power cut. The
    /// upstream sends only these.
    pub fn synced_seq(&self) -> u64 {
        self.synced_last.load(Ordering::Acquire)
    }

    /// Whether records were appended since the last sync, or sync marks wait for one.
    pub fn sync_due(&self) -> bool {
        self.last_seq() > self.synced_seq() || self.marks_unsynced.load(Ordering::Acquire)
    }

    /// How long the oldest record not covered by a sync (started) has waited.
    pub fn unsynced_age(&self) -> Option<std::time::Duration> {
        self.write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsynced_since
            .map(|t| t.elapsed())
    }

    /// `store.sync_interval`.
    pub fn sync_interval(&self) -> std::time::Duration {
        self.sync_interval
    }

    /// `store.upstream_sync_now`: whether the upstream asks for a sync when it waits.
    pub fn upstream_sync_now(&self) -> bool {
        self.upstream_sync_now
    }

    /// Follows [`Store::synced_seq`].
    pub fn subscribe_synced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.synced_tx.subscribe()
    }

    /// Appends a sync mark to the journal: durable with the next [`Store::sync`],
    /// without a sled flush. The caller wrote it into sled's `outbox` tree first
    /// (unflushed): a sled flush makes it durable there, and only then may the
    /// journal reuse the segment that holds it.
    pub(super) fn journal_mark(&self, name: &str, value: u64) -> Result<(), StoreError> {
        let mut state = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.journal_mark_locked(&mut state, name, value)
    }

    /// [`Store::journal_mark`] under the write lock.
    fn journal_mark_locked(
        &self,
        state: &mut WriteState,
        name: &str,
        value: u64,
    ) -> Result<(), StoreError> {
        let mut payload = Vec::with_capacity(name.len() + 9);
        payload.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        payload.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
        payload.extend_from_slice(&seq_key(value));
        self.journal_write(&mut state.journal, state.runtime.as_mut(), &mut |j| {
            j.append_mark(&payload).map(drop)
        })?;
        state
            .unsynced_since
            .get_or_insert_with(std::time::Instant::now);
        self.marks_unsynced.store(true, Ordering::Release);
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
pub(crate) fn open_locked(cfg: &sled::Config) -> Result<sled::Db, sled::Error> {
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
    /// The open block as it was when the walk started, met after sled's blocks
    /// (unless sled holds it by then, moved meanwhile).
    tail: Option<(u64, sled::IVec)>,
}

impl Iterator for BlockWalk<'_> {
    type Item = Result<BlockAt, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some((key, value)) = self.ahead.take() else {
                let (first, value) = self.tail.take()?;
                return Some(Ok(BlockAt {
                    first,
                    next_first: None,
                    value,
                }));
            };
            self.ahead = match self.iter.next().transpose() {
                Ok(ahead) => ahead,
                Err(e) => return Some(Err(e.into())),
            };
            let Some(first) = key_seq(&key) else {
                continue;
            };
            if self.tail.as_ref().is_some_and(|(t, _)| first >= *t) {
                // The open block moved into sled during the walk: sled's copy holds
                // at least as much.
                self.tail = None;
            }
            self.settler.walked(self.tree, &key);
            let next_first = self
                .ahead
                .as_ref()
                .and_then(|(k, _)| key_seq(k))
                .or_else(|| self.tail.as_ref().map(|(t, _)| *t));
            return Some(Ok(BlockAt {
                first,
                next_first,
                value: block::unpack(value),
            }));
        }
    }
}

impl Drop for BlockWalk<'_> {
    fn drop(&mut self) {
        self.settler.finish(self.tree);
    }
}

/// The open block: records past sled's last block, in the block format, kept in
/// memory (and in the journal) until it is full and moves into sled.
struct Tail {
    /// Seq of its first record (the next seq while it is empty).
    first: u64,
    /// Block value: the version byte and the frames.
    value: Vec<u8>,
    /// End of each frame in `value`.
    ends: Vec<usize>,
    /// The time index's view of the frames' records that decode.
    readings: index::BlockReadings,
    /// Unpacked bytes at which a packing store next tries the block packed.
    next_check: usize,
    /// Whether the last trial pack, of the frames as they are now, succeeded (the
    /// packed block is then in the scratch buffer it was given); `None` after a push.
    packed_now: Option<bool>,
}

impl Tail {
    fn new(first: u64) -> Tail {
        let mut value = Vec::with_capacity(BLOCK_BYTES + 1024);
        value.push(BLOCK_V2);
        Tail {
            first,
            value,
            ends: Vec::with_capacity(BLOCK_RECORDS),
            readings: index::BlockReadings::default(),
            next_check: BLOCK_BYTES,
            packed_now: None,
        }
    }

    fn count(&self) -> usize {
        self.ends.len()
    }

    fn last_seq(&self) -> Option<u64> {
        (!self.ends.is_empty()).then(|| self.first + self.ends.len() as u64 - 1)
    }

    fn push(&mut self, frame: &[u8], rec: Option<&Record>) {
        self.value.extend_from_slice(frame);
        self.ends.push(self.value.len());
        self.packed_now = None;
        if let Some(rec) = rec {
            self.readings.push(rec);
        }
    }

    /// Whether the block is full: at most [`BLOCK_RECORDS`] records and about
    /// [`BLOCK_BYTES`] bytes, or in a store that packs its blocks (`packing`) see
    /// [`PACKED_BLOCK_RECORDS`]. `scratch` is for the trial packs.
    fn is_full(&mut self, packing: bool, scratch: &mut Vec<u8>) -> bool {
        if !packing {
            return self.ends.len() >= BLOCK_RECORDS || self.value.len() >= BLOCK_BYTES;
        }
        if self.ends.len() >= PACKED_BLOCK_RECORDS {
            return true;
        }
        if self.value.len() < self.next_check {
            return false;
        }
        let packed = block::pack(&self.value, scratch);
        self.packed_now = Some(packed);
        if !packed || scratch.len() >= PACKED_BLOCK_TARGET {
            return true;
        }
        // Below the target: at least PACKED_BLOCK_MAX - PACKED_BLOCK_TARGET to go.
        self.next_check = self.value.len() + (PACKED_BLOCK_MAX - scratch.len());
        false
    }

    /// The block as far as `through`, if it holds anything up to there.
    fn snapshot(&self, through: u64) -> Option<(u64, sled::IVec)> {
        let n = usize::try_from(through.checked_sub(self.first)? + 1)
            .unwrap_or(usize::MAX)
            .min(self.ends.len());
        let end = *self.ends.get(n.checked_sub(1)?)?;
        Some((self.first, sled::IVec::from(&self.value[..end])))
    }
}

#[cfg(feature = "tools")]
/// How many of `records` the first block takes (for the benchmark's figures), in a
/// store that packs its blocks (`packed`) or not.
pub(super) fn records_per_block(records: &[Record], packed: bool) -> usize {
    let mut tail = Tail::new(1);
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    for rec in records {
        buf.clear();
        // Any schema id: the encoding's size does not depend on it.
        if encode_frame(&mut buf, rec, Some(1)).is_err() {
            break;
        }
        tail.push(&buf, None);
        if tail.is_full(packed, &mut scratch) {
            break;
        }
    }
    tail.count()
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

/// The runtime journal, the records it held past the journal on disk, and whether
/// it continued it.
type RuntimeReplay = (journal::Journal, Vec<(u64, Vec<u8>)>, bool);

/// The store's random id (`meta/store_id`), created and flushed the first time.
fn store_id(meta: &sled::Tree, db: &sled::Db) -> Result<u64, sled::Error> {
    if let Some(id) = meta.get(META_STORE_ID)?.and_then(|v| key_seq(&v)) {
        return Ok(id);
    }
    let id: u64 = rand::random();
    meta.insert(META_STORE_ID, &seq_key(id))?;
    db.flush()?;
    Ok(id)
}

/// Opens the runtime journal and keeps what it holds past `on_disk` (the last seq
/// the journal on disk holds): the records a kill took before their sync, and
/// whether it continues the journal on disk. A runtime journal that does not (a new
/// one after a reboot, or damaged) gives nothing.
fn runtime_replay(cfg: &journal::JournalConfig, on_disk: u64) -> Result<RuntimeReplay, StoreError> {
    // A tmpfs loses it with a power cut or a reboot: then it is created anew here.
    let existed = cfg.dir.join("000.seg").exists();
    let (runtime, replay) = journal::Journal::open(cfg, on_disk)
        .map_err(|e| StoreError::Journal(format!("runtime journal: {e}")))?;
    let continues = existed
        && replay.damaged.is_empty()
        && replay
            .records
            .iter()
            .zip(on_disk + 1..)
            .all(|((seq, _), want)| *seq == want);
    if !continues && existed {
        tracing::warn!(
            target: "edge_agent::store",
            dir = %cfg.dir.display(),
            "the runtime journal does not continue the journal on disk: not replayed, emptied"
        );
        drop(runtime);
        for i in 0..cfg.segment_count.max(2) {
            let path = cfg.dir.join(format!("{i:03}.seg"));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Journal(format!(
                        "runtime journal: cannot remove {}: {e}",
                        path.display()
                    )))
                }
                _ => {}
            }
        }
        let (runtime, _) = journal::Journal::open(cfg, on_disk)
            .map_err(|e| StoreError::Journal(format!("runtime journal: {e}")))?;
        return Ok((runtime, Vec::new(), false));
    }
    if !replay.records.is_empty() {
        tracing::info!(
            target: "edge_agent::store",
            records = replay.records.len(),
            "records of the runtime journal replayed (the agent was killed before their sync)"
        );
    }
    Ok((runtime, replay.records, continues))
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
                // The journal's preallocated segments are not sled's files.
                if entry.file_name() != "journal" {
                    stack.push(entry.path());
                }
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
    let mut bad = Vec::new();
    // Seqs a power cut made the store skip (`lease.rs`): no gap.
    let mut skipped: Vec<(u64, u64)> = Vec::new();
    for block in store.blocks_from(0)? {
        let block = block?;
        let first = block.first;
        if first > last {
            break;
        }
        if report.first_seq == 0 {
            report.first_seq = first;
        }
        let end = block.next_first.unwrap_or(last + 1);
        // A block cannot span more than MAX_BLOCK_SPAN seqs: anything between that
        // and the next block is missing.
        let limit = first.saturating_add(MAX_BLOCK_SPAN);
        if end > limit {
            report.gaps.push(limit..=end - 1);
        }
        // Frames past `last` belong to records appended after the walk began.
        let duplicate_from = block.next_first.is_some();
        let first_format = block.value.first() == Some(&BLOCK_V1);
        scan_block(
            &store.schemas,
            first,
            &block.value,
            end,
            &all,
            &mut |item| match item {
                Item::Record(rec) => {
                    report.ok += 1;
                    report.first_format += first_format as u64;
                    if let Payload::Dropped(ev) = &rec.payload {
                        if ev.reason == crate::model::DropReason::PowerCut {
                            skipped.extend(&ev.ranges);
                        }
                    }
                }
                Item::Quarantined { seq, raw, reason } => {
                    report.quarantined += 1;
                    bad.push((seq, raw.to_vec(), reason));
                }
                Item::Duplicate if duplicate_from => report.duplicates += 1,
                Item::Duplicate => {}
                Item::Gap(r) => report.gaps.push(r),
            },
        );
        for (seq, raw, reason) in bad.drain(..) {
            store.quarantine_record(seq, &raw, reason);
        }
    }
    report
        .gaps
        .retain(|g| !skipped.iter().any(|(a, b)| a <= g.start() && g.end() <= b));
    report.gaps.sort_by_key(|r| *r.start());
    Ok(report)
}

#[cfg(test)]
mod journal_tests;
#[cfg(test)]
mod tests;
