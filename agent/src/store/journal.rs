//! The journal: an append-only, CRC-framed log of records in front of sled.
//!
//! A record is safe from a kill of the process once its frame is written with
//! `pwrite(2)` (the kernel holds it; the frames of one append go in one `pwrite`,
//! [`Journal::append_all`]), and from a power cut once the journal is
//! `fdatasync`ed. Sled then only ever receives whole blocks, written once, and a
//! journal segment is reused once sled holds everything in it durably.
//!
//! # Files
//!
//! `segment_count` preallocated files `NNN.seg` of `segment_bytes` each. Preallocation
//! means a sync writes data pages only: the file's size never changes.
//!
//! ```text
//! segment header (32 bytes):
//!   b"EAJ1" | u32 version=1 | u32 epoch | u32 reserved | u64 first seq | u32 reserved | u32 CRC-32C of the 28 bytes before
//! frame (8-byte aligned):
//!   u32 payload len | u32 head CRC | u64 seq | u32 epoch | u32 sync lag | payload | u32 CRC-32C of payload | zero pad to 8
//!   head CRC = CRC-32C of (len, seq, epoch, sync lag) as little-endian bytes
//!   sync lag = seq - (the last seq the journal had synced when the frame was written), capped
//!   len's top bit set: a *mark* frame (below); its seq is the last record's seq then
//! ```
//!
//! A mark frame carries small metadata of the store (such as the upstream cursor)
//! instead of a record: it becomes durable with the journal's next sync, so the
//! metadata needs no sync of its own. Replay hands the marks back in write order
//! ([`Replay::marks`]). A segment holding a mark is reused only once the store says
//! the mark is durable elsewhere ([`Journal::release_marks`]).
//!
//! Every use of a segment gets a new, larger epoch, and every frame carries its
//! segment's epoch. Frames left over from an earlier use are recognised by their
//! older epoch (or fail their CRCs) and end the replay; a reused segment is never
//! zeroed (that would double the writes).
//!
//! # Replay
//!
//! Segments are read in epoch order and frames in file order, keeping the records
//! after the seq sled already holds. A frame that is missing or fails its CRC
//! before valid frames with later seqs is one of two things, told apart by the sync
//! lag the later frames carry:
//! - *damage*: some later frame was written after the missing seq had been synced,
//!   so its bytes had reached the disk. The missing seqs are reported with the raw
//!   bytes for quarantine, and the rest is kept;
//! - *a power cut*: no later frame says the missing seq was synced, so the disk may
//!   simply never have received it (the page cache writes pages back in any order).
//!   Nothing from there on was ever synced or handed on: it is cut, like a torn
//!   last frame, and the cut frames' bytes are zeroed so that they never come back.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::checksum::crc32c;

const MAGIC: [u8; 4] = *b"EAJ1";
const VERSION: u32 = 1;
/// Bytes of the segment header.
pub const HEADER_BYTES: u64 = 32;
/// Bytes of a frame's head: len, head CRC, seq, epoch, sync lag.
const HEAD_BYTES: usize = 24;
/// Bytes of a frame around its payload: the head and the payload CRC.
pub const FRAME_OVERHEAD: usize = HEAD_BYTES + 4;
const ALIGN: u64 = 8;
/// Set in a frame's length field: the frame is a mark, not a record.
const MARK_FLAG: u32 = 1 << 31;

/// A record for [`Journal::append_all`]: its seq, its bytes and their CRC-32C (the
/// store has it at hand: a block frame carries the same).
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
    pub crc: u32,
}

impl<'a> Append<'a> {
    /// The record `seq` of bytes `payload`, its CRC computed.
    pub fn new(seq: u64, payload: &'a [u8]) -> Append<'a> {
        Append {
            seq,
            payload,
            crc: crc32c(payload),
        }
    }
}

/// Where and how large the journal is.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Bytes of each segment file, header included.
    pub segment_bytes: u64,
    /// Number of segment files; at least 2 (one written while another waits for
    /// sled to take its records).
    pub segment_count: usize,
    /// Write with `O_DIRECT` where the filesystem allows it ([`WriteMode::Direct`]).
    pub direct: bool,
}

/// How frames reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// One `pwrite` per append into the page cache, `fdatasync` at a sync. A sync
    /// writes whole 4 KiB pages: the page holding the tail is written again at every
    /// sync, however little was added to it.
    Buffered,
    /// Frames gather in memory and a sync writes the new sectors with
    /// `O_DIRECT | O_DSYNC`, rewriting only the last partial sector of `align`
    /// bytes. A frame is not in the kernel before the sync: whoever needs it to
    /// survive a kill of the process keeps it elsewhere until then.
    Direct { align: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every segment still holds records that sled has not taken durably.
    #[error("journal full: all {segments} segments hold records not yet in sled")]
    Full { segments: usize },
    #[error("record of {len} bytes does not fit a journal segment of {segment_bytes} bytes")]
    TooLarge { len: usize, segment_bytes: u64 },
    #[error("journal segment {} is not a journal segment of this version", path.display())]
    Foreign { path: PathBuf },
}

/// Seqs a damaged frame took with it, and its raw bytes, for quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: Vec<u8>,
}

/// What [`Journal::open`] found past the seq sled holds.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records in seq order, each once, contiguous apart from `damaged`.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Damaged frames between valid ones.
    pub damaged: Vec<Damaged>,
    /// Whether bytes past the last kept frame were cut: a frame being written when
    /// the process or the power went, frames the disk never received before a power
    /// cut, or, in a reused segment, leftovers of its earlier use. Never damage:
    /// nothing cut was ever synced.
    pub torn_tail: bool,
    /// Payloads of the mark frames kept, in write order (the newest last).
    pub marks: Vec<Vec<u8>>,
}

struct Segment {
    path: PathBuf,
    file: File,
    /// Epoch of the segment's current use; 0 for a segment never used.
    epoch: u32,
    /// Last seq written in this use, if any.
    last_seq: Option<u64>,
    /// Number (`Journal::marks_written`) of the last mark written in this use; 0: none.
    last_mark: u64,
    /// Where the next frame goes.
    write_at: u64,
    /// Written since the last sync (buffered writes).
    dirty: bool,
    /// The same file opened with `O_DIRECT | O_DSYNC`, in direct mode.
    direct: Option<File>,
}

/// Memory aligned for `O_DIRECT`: a vector with room to slide to a 4 KiB boundary.
struct AlignedBuf {
    bytes: Vec<u8>,
    offset: usize,
    cap: usize,
}

/// Memory alignment of direct I/O buffers: enough for every device's logical block.
const DIRECT_MEMORY_ALIGN: usize = 4096;

impl AlignedBuf {
    fn new(cap: usize) -> AlignedBuf {
        let bytes = vec![0u8; cap + DIRECT_MEMORY_ALIGN];
        let offset = bytes.as_ptr().align_offset(DIRECT_MEMORY_ALIGN);
        AlignedBuf { bytes, offset, cap }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.bytes[self.offset..self.offset + self.cap]
    }
}

/// The frames not yet written in direct mode, from the start of the sector that
/// holds the first of them.
struct Pending {
    buf: AlignedBuf,
    /// Segment and file offset of the buffer's first byte (sector-aligned).
    segment: usize,
    base: u64,
    len: usize,
    align: usize,
}

/// Largest buffer of gathered frames kept for the next append.
const GATHER_KEEP: usize = 256 * 1024;

/// Bytes of frames gathered before a direct-mode journal writes them even without
/// a sync.
const DIRECT_PENDING_BYTES: usize = 256 * 1024;

/// The open journal: appends, syncs, and frees segments sled has taken.
pub struct Journal {
    segment_bytes: u64,
    segments: Vec<Segment>,
    active: usize,
    next_epoch: u32,
    /// The last seq appended, and the last one a sync made durable.
    appended_through: u64,
    synced_through: u64,
    /// Records up to this seq are in sled durably: their segments can be reused.
    released_through: u64,
    /// Marks written so far, and how many of them are durable elsewhere.
    marks_written: u64,
    marks_released: u64,
    frame_buf: Vec<u8>,
    /// Direct mode's gathered frames; `None` in buffered mode.
    pending: Option<Pending>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("segments", &self.segments.len())
            .field("active", &self.active)
            .field("synced_through", &self.synced_through)
            .field("released_through", &self.released_through)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn head_crc(len: u32, seq: u64, epoch: u32, lag: u32) -> u32 {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&len.to_le_bytes());
    b[4..12].copy_from_slice(&seq.to_le_bytes());
    b[12..16].copy_from_slice(&epoch.to_le_bytes());
    b[16..].copy_from_slice(&lag.to_le_bytes());
    crc32c(&b)
}

fn encode_header(epoch: u32, first_seq: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c(&h[..28]);
    h[28..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The header's epoch, or 0 for a segment never used (all zeros). A header that is
/// neither is foreign.
fn decode_header(h: &[u8]) -> Result<u32, ()> {
    if h.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    if h[..4] != MAGIC || crc32c(&h[..28]) != le_u32(h, 28) || le_u32(h, 4) != VERSION {
        return Err(());
    }
    Ok(le_u32(h, 8))
}

/// A frame read back from a segment.
enum Parsed {
    /// A valid frame of the segment's epoch.
    Frame {
        seq: u64,
        synced_through: u64,
        payload: std::ops::Range<usize>,
        next: usize,
        mark: bool,
    },
    /// The head is valid but the payload's CRC is not.
    BadPayload { next: usize },
    /// Zeros, a frame of an earlier use of the segment, or too little room left.
    End,
    /// Anything else.
    Garbage,
}

fn parse_at(data: &[u8], at: usize, epoch: u32) -> Parsed {
    let Some(head) = data.get(at..at + HEAD_BYTES) else {
        return Parsed::End;
    };
    if head.iter().all(|&b| b == 0) {
        return Parsed::End;
    }
    let (len, crc, seq) = (le_u32(head, 0), le_u32(head, 4), le_u64(head, 8));
    let (frame_epoch, lag) = (le_u32(head, 16), le_u32(head, 20));
    if head_crc(len, seq, frame_epoch, lag) != crc {
        return Parsed::Garbage;
    }
    if frame_epoch != epoch {
        // A whole head of an earlier use: the current use ended before it.
        return if frame_epoch < epoch {
            Parsed::End
        } else {
            Parsed::Garbage
        };
    }
    let start = at + HEAD_BYTES;
    let mark = len & MARK_FLAG != 0;
    let Some(end) = start.checked_add((len & !MARK_FLAG) as usize) else {
        return Parsed::Garbage;
    };
    let Some(crc_bytes) = data.get(end..end + 4) else {
        return Parsed::Garbage;
    };
    let next = align((end + 4) as u64) as usize;
    if crc32c(&data[start..end]) != le_u32(crc_bytes, 0) {
        return Parsed::BadPayload { next };
    }
    Parsed::Frame {
        seq,
        synced_through: seq.saturating_sub(u64::from(lag)),
        payload: start..end,
        next,
        mark,
    }
}

/// The next valid frame of `epoch` at or after `from`, with a seq above `after`:
/// its offset. Frames are 8-byte aligned, so only those offsets are tried.
fn resync(data: &[u8], from: usize, epoch: u32, after: Option<u64>) -> Option<usize> {
    let mut at = align(from as u64) as usize;
    while at + HEAD_BYTES <= data.len() {
        if let Parsed::Frame { seq, .. } = parse_at(data, at, epoch) {
            if after.map_or(true, |a| seq > a) {
                return Some(at);
            }
        }
        at += ALIGN as usize;
    }
    None
}

/// What one segment holds, in file order.
enum Event {
    Frame {
        seq: u64,
        synced_through: u64,
        at: usize,
        payload: Vec<u8>,
        mark: bool,
    },
    /// Bytes between valid frames that are not a valid frame.
    Bad { at: usize, bytes: Vec<u8> },
}

struct SegmentScan {
    events: Vec<Event>,
    /// Where the valid frames end.
    end: usize,
    /// Whether bytes that are not a clean end follow them.
    torn: bool,
}

fn scan_segment(data: &[u8], epoch: u32) -> SegmentScan {
    let mut scan = SegmentScan {
        events: Vec::new(),
        end: HEADER_BYTES as usize,
        torn: false,
    };
    let mut at = HEADER_BYTES as usize;
    let mut last_seq: Option<u64> = None;
    loop {
        match parse_at(data, at, epoch) {
            // A mark carries the seq of the record before it.
            Parsed::Frame {
                seq,
                synced_through,
                payload,
                next,
                mark,
            } if last_seq.map_or(true, |l| seq > l || (mark && seq == l)) => {
                scan.events.push(Event::Frame {
                    seq,
                    synced_through,
                    at,
                    payload: data[payload].to_vec(),
                    mark,
                });
                last_seq = Some(seq);
                at = next;
                scan.end = at;
            }
            Parsed::End => {
                // Zeros or an older use's frame where a frame was due, with frames of
                // this use after it: a page the disk never received (a hole).
                match resync(data, at + ALIGN as usize, epoch, last_seq) {
                    Some(found) => {
                        scan.events.push(Event::Bad {
                            at,
                            bytes: data[at..found].to_vec(),
                        });
                        at = found;
                    }
                    None => break,
                }
            }
            bad => {
                let skip_to = match bad {
                    Parsed::BadPayload { next } => next,
                    _ => at + ALIGN as usize,
                };
                match resync(data, skip_to, epoch, last_seq) {
                    Some(found) => {
                        scan.events.push(Event::Bad {
                            at,
                            bytes: data[at..found].to_vec(),
                        });
                        at = found;
                    }
                    None => {
                        scan.torn = true;
                        break;
                    }
                }
            }
        }
    }
    scan
}

/// Where a replay stopped keeping frames, to be cut on open.
struct Cut {
    segment: usize,
    at: usize,
    /// End of the segment's valid frames: `at..zero_to` is zeroed.
    zero_to: usize,
}

impl Journal {
    /// Opens (creating and preallocating what is missing) the journal and replays
    /// what it holds after `sled_last_seq`. What is replayed is synced before this
    /// returns: it may have been in the page cache only, after a kill.
    pub fn open(
        config: &JournalConfig,
        sled_last_seq: u64,
    ) -> Result<(Journal, Replay), JournalError> {
        let min_bytes = HEADER_BYTES + align(FRAME_OVERHEAD as u64 + 1);
        let segment_bytes = align(config.segment_bytes.max(min_bytes));
        std::fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        let align = if config.direct {
            direct_alignment(&config.dir)
        } else {
            None
        };
        let mut created = false;
        let mut segments = Vec::with_capacity(config.segment_count.max(2));
        let mut scans = Vec::new();
        for i in 0..config.segment_count.max(2) {
            let path = config.dir.join(format!("{i:03}.seg"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path))?;
            let len = file.metadata().map_err(io_err(&path))?.len();
            if len < segment_bytes {
                preallocate(&file, len, segment_bytes).map_err(io_err(&path))?;
                created = true;
            }
            // One segment in memory at a time, for its scan.
            let mut data = vec![0u8; segment_bytes as usize];
            file.read_exact_at(&mut data, 0).map_err(io_err(&path))?;
            let epoch = decode_header(&data[..HEADER_BYTES as usize])
                .map_err(|()| JournalError::Foreign { path: path.clone() })?;
            let scan = (epoch > 0).then(|| scan_segment(&data, epoch));
            drop(data);
            // Marks read back stay until the store has them durably elsewhere.
            let has_marks = scan.as_ref().is_some_and(|s| {
                s.events
                    .iter()
                    .any(|e| matches!(e, Event::Frame { mark: true, .. }))
            });
            let (last_seq, write_at) = match &scan {
                Some(s) => (
                    s.events.iter().rev().find_map(|e| match e {
                        Event::Frame { seq, .. } => Some(*seq),
                        Event::Bad { .. } => None,
                    }),
                    s.end as u64,
                ),
                None => (None, HEADER_BYTES),
            };
            let direct = match align {
                Some(_) => Some(open_direct(&path).map_err(io_err(&path))?),
                None => None,
            };
            segments.push(Segment {
                path,
                file,
                epoch,
                last_seq,
                last_mark: u64::from(has_marks),
                write_at,
                dirty: false,
                direct,
            });
            scans.push(scan);
        }
        if created {
            sync_dir(&config.dir).map_err(io_err(&config.dir))?;
        }

        // Epoch order is write order.
        let mut order: Vec<usize> = (0..segments.len())
            .filter(|&i| segments[i].epoch > 0)
            .collect();
        order.sort_by_key(|&i| segments[i].epoch);
        // The newest seq any frame says had been synced when it was written.
        let synced_ever = scans
            .iter()
            .flatten()
            .flat_map(|s| s.events.iter())
            .filter_map(|e| match e {
                Event::Frame { synced_through, .. } => Some(*synced_through),
                Event::Bad { .. } => None,
            })
            .max()
            .unwrap_or(0);

        let mut replay = Replay::default();
        let mut expected = sled_last_seq + 1;
        let mut cut: Option<Cut> = None;
        let mut bad_bytes: Vec<u8> = Vec::new();
        let mut bad_at: Option<(usize, usize)> = None;
        'segments: for &i in &order {
            let Some(scan) = scans[i].take() else {
                continue;
            };
            let segment_end = scan.end;
            for event in scan.events {
                match event {
                    Event::Bad { at, bytes } => {
                        bad_at.get_or_insert((i, at));
                        bad_bytes.extend_from_slice(&bytes);
                    }
                    Event::Frame {
                        mark: true,
                        payload,
                        ..
                    } => replay.marks.push(payload),
                    Event::Frame { seq, .. } if seq < expected => {}
                    Event::Frame {
                        seq, at, payload, ..
                    } => {
                        if seq > expected {
                            if expected <= synced_ever {
                                // It had been synced: the disk lost or damaged it.
                                replay.damaged.push(Damaged {
                                    first_seq: expected,
                                    last_seq: seq - 1,
                                    bytes: std::mem::take(&mut bad_bytes),
                                });
                            } else {
                                // Never synced: a power cut took it; cut from there.
                                let (segment, at) = bad_at.unwrap_or((i, at));
                                cut = Some(Cut {
                                    segment,
                                    at,
                                    zero_to: segment_end,
                                });
                                break 'segments;
                            }
                        }
                        bad_bytes.clear();
                        bad_at = None;
                        replay.records.push((seq, payload));
                        expected = seq + 1;
                    }
                }
            }
            replay.torn_tail |= scan.torn;
        }

        let next_epoch = segments.iter().map(|s| s.epoch).max().unwrap_or(0) + 1;
        let active = order.last().copied().unwrap_or(0);
        let last = replay.records.last().map_or(sled_last_seq, |r| r.0);
        let marks_written = segments.iter().map(|s| s.last_mark).max().unwrap_or(0);
        let mut journal = Journal {
            segment_bytes,
            segments,
            active,
            next_epoch,
            appended_through: last,
            synced_through: last,
            released_through: sled_last_seq,
            marks_written,
            marks_released: 0,
            frame_buf: Vec::new(),
            pending: None,
        };
        if let Some(cut) = cut {
            replay.torn_tail = true;
            journal.cut(cut, &order)?;
        }
        if let Some(align) = align {
            // The sector the next frame goes into, as it is on disk: a direct write
            // rewrites it whole.
            let segment = &journal.segments[journal.active];
            let base = segment.write_at / align as u64 * align as u64;
            let len = (segment.write_at - base) as usize;
            let mut buf = AlignedBuf::new(DIRECT_PENDING_BYTES + align);
            segment
                .file
                .read_exact_at(&mut buf.get()[..len], base)
                .map_err(io_err(&segment.path))?;
            journal.pending = Some(Pending {
                buf,
                segment: journal.active,
                base,
                len,
                align,
            });
        }
        if journal.segments[journal.active].epoch == 0 {
            journal.start_segment(journal.active, sled_last_seq + 1)?;
        }
        // A replay after a kill read frames from the page cache: make them durable,
        // with the cut's zeros.
        for segment in &mut journal.segments {
            segment.dirty = true;
        }
        journal.sync()?;
        Ok((journal, replay))
    }

    /// Drops everything from a cut on: the cut segment's frames after it are zeroed
    /// (they would come back on the next replay) and later segments are emptied.
    fn cut(&mut self, cut: Cut, order: &[usize]) -> Result<(), JournalError> {
        let segment = &mut self.segments[cut.segment];
        let zeros = vec![0u8; cut.zero_to.saturating_sub(cut.at)];
        segment
            .file
            .write_all_at(&zeros, cut.at as u64)
            .map_err(io_err(&segment.path))?;
        segment.write_at = cut.at as u64;
        // At most the last kept seq: enough to keep the segment until sled has it.
        segment.last_seq = Some(self.appended_through);
        let position = order.iter().position(|&i| i == cut.segment).unwrap_or(0);
        for &later in &order[position + 1..] {
            let s = &mut self.segments[later];
            s.file
                .write_all_at(&[0u8; HEADER_BYTES as usize], 0)
                .map_err(io_err(&s.path))?;
            s.epoch = 0;
            s.last_seq = None;
            s.write_at = HEADER_BYTES;
        }
        self.active = cut.segment;
        Ok(())
    }

    /// Appends one record's frame with one `pwrite`. Seqs must increase.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), JournalError> {
        self.append_frame(seq, payload, false)
    }

    /// Appends a mark frame (see the module doc): durable with the next sync, handed
    /// back by a replay until its segment is reused. Returns the mark's number, for
    /// [`Journal::release_marks`].
    pub fn append_mark(&mut self, payload: &[u8]) -> Result<u64, JournalError> {
        self.append_frame(self.appended_through, payload, true)?;
        self.marks_written += 1;
        let number = self.marks_written;
        self.segments[self.active].last_mark = number;
        Ok(number)
    }

    /// Marks written so far (the number of the last one).
    pub fn marks_written(&self) -> u64 {
        self.marks_written
    }

    /// The marks numbered up to `number` are durable elsewhere: segments holding no
    /// later one can be reused (with [`Journal::release_through`]).
    pub fn release_marks(&mut self, number: u64) {
        self.marks_released = self.marks_released.max(number);
    }

    fn append_frame(&mut self, seq: u64, payload: &[u8], mark: bool) -> Result<(), JournalError> {
        let too_large = || JournalError::TooLarge {
            len: payload.len(),
            segment_bytes: self.segment_bytes,
        };
        let frame_len = align((FRAME_OVERHEAD + payload.len()) as u64);
        if HEADER_BYTES + frame_len > self.segment_bytes {
            return Err(too_large());
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l & MARK_FLAG == 0)
            .ok_or_else(too_large)?;
        let len = if mark { len | MARK_FLAG } else { len };
        if self.segments[self.active].write_at + frame_len > self.segment_bytes {
            let next = self.free_segment()?;
            let first = if mark { self.appended_through + 1 } else { seq };
            self.start_segment(next, first)?;
        }
        if let Some(p) = &self.pending {
            if p.len + frame_len as usize > DIRECT_PENDING_BYTES {
                self.write_pending()?;
            }
        }
        let lag = self.lag(seq);
        let segment = &mut self.segments[self.active];
        let buf = &mut self.frame_buf;
        buf.clear();
        put_frame(buf, len, seq, segment.epoch, lag, payload, crc32c(payload));
        match &mut self.pending {
            Some(p) => {
                debug_assert_eq!(p.base + p.len as u64, segment.write_at);
                p.buf.get()[p.len..p.len + buf.len()].copy_from_slice(buf);
                p.len += buf.len();
            }
            None => {
                segment
                    .file
                    .write_all_at(buf, segment.write_at)
                    .map_err(io_err(&segment.path))?;
                segment.dirty = true;
            }
        }
        segment.write_at += frame_len;
        segment.last_seq = Some(seq);
        if !mark {
            self.appended_through = seq;
        }
        Ok(())
    }

    /// The sync lag a frame of `seq` carries now.
    fn lag(&self, seq: u64) -> u32 {
        u32::try_from(seq.saturating_sub(self.synced_through)).unwrap_or(u32::MAX)
    }

    /// Appends the frames of `records` (seqs increasing), as [`Journal::append`] each
    /// but gathered: in buffered mode one `pwrite` per segment they go into (one,
    /// unless a segment fills), so every one of them is in the kernel on return. On
    /// an error, the records before the first one not appended were appended: their
    /// number comes with it.
    pub fn append_all(&mut self, records: &[Append<'_>]) -> Result<(), (usize, JournalError)> {
        if self.pending.is_some() {
            // Direct mode copies each frame into the pending buffer: no write per frame.
            for (i, r) in records.iter().enumerate() {
                self.append_frame(r.seq, r.payload, false)
                    .map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.clear();
        let result = self.append_gathered(records, &mut buf);
        if buf.capacity() <= GATHER_KEEP {
            self.frame_buf = buf;
        }
        result
    }

    /// Buffered mode's [`Journal::append_all`], gathering the frames in `buf`.
    fn append_gathered(
        &mut self,
        records: &[Append<'_>],
        buf: &mut Vec<u8>,
    ) -> Result<(), (usize, JournalError)> {
        // The first record gathered in `buf` not yet written (those before it are).
        let mut from = 0;
        for (i, &Append { seq, payload, crc }) in records.iter().enumerate() {
            let frame_len = align((FRAME_OVERHEAD + payload.len()) as u64);
            let len = u32::try_from(payload.len())
                .ok()
                .filter(|&l| l & MARK_FLAG == 0 && HEADER_BYTES + frame_len <= self.segment_bytes);
            let at = self.segments[self.active].write_at + buf.len() as u64;
            if len.is_none() || at + frame_len > self.segment_bytes {
                // What is gathered goes to the active segment first.
                if i > from {
                    self.write_gathered(buf, records[i - 1].seq)
                        .map_err(|e| (from, e))?;
                    from = i;
                }
            }
            let Some(len) = len else {
                let e = JournalError::TooLarge {
                    len: payload.len(),
                    segment_bytes: self.segment_bytes,
                };
                return Err((i, e));
            };
            if at + frame_len > self.segment_bytes {
                let next = self.free_segment().map_err(|e| (i, e))?;
                self.start_segment(next, seq).map_err(|e| (i, e))?;
            }
            let (epoch, lag) = (self.segments[self.active].epoch, self.lag(seq));
            put_frame(buf, len, seq, epoch, lag, payload, crc);
        }
        if let Some(last) = records.last() {
            self.write_gathered(buf, last.seq).map_err(|e| (from, e))?;
        }
        Ok(())
    }

    /// Writes the frames gathered in `buf` (the last of seq `last`) at the active
    /// segment's end with one `pwrite`, and empties `buf`.
    fn write_gathered(&mut self, buf: &mut Vec<u8>, last: u64) -> Result<(), JournalError> {
        if buf.is_empty() {
            return Ok(());
        }
        let segment = &mut self.segments[self.active];
        segment
            .file
            .write_all_at(buf, segment.write_at)
            .map_err(io_err(&segment.path))?;
        segment.dirty = true;
        segment.write_at += buf.len() as u64;
        segment.last_seq = Some(last);
        self.appended_through = last;
        buf.clear();
        Ok(())
    }

    /// How frames reach the disk: direct where asked for and the filesystem allows.
    pub fn mode(&self) -> WriteMode {
        match &self.pending {
            Some(p) => WriteMode::Direct { align: p.align },
            None => WriteMode::Buffered,
        }
    }

    /// Direct mode: writes the gathered frames (durable on return: `O_DSYNC`), the
    /// last sector padded with zeros, and starts the next frames on a new sector.
    /// Writing the partial sector again with the next frames would cost half a
    /// sector a sync on average; the zeros cost only room in the segment, and a
    /// replay steps over them (a run of zeros between frames whose seqs follow on).
    fn write_pending(&mut self) -> Result<(), JournalError> {
        let Some(p) = &mut self.pending else {
            return Ok(());
        };
        if p.len == 0 {
            return Ok(());
        }
        let segment = &mut self.segments[p.segment];
        let end = p.len.div_ceil(p.align) * p.align;
        let len = p.len;
        let buf = p.buf.get();
        buf[len..end].fill(0);
        let file = segment.direct.as_ref().unwrap_or(&segment.file);
        file.write_all_at(&buf[..end], p.base)
            .map_err(io_err(&segment.path))?;
        p.base += end as u64;
        p.len = 0;
        // Past the segment's end the next frame starts a new segment.
        segment.write_at = p.base;
        Ok(())
    }

    /// `fdatasync`s every segment written since the last sync; everything appended
    /// so far is then durable. Returns how many files were synced.
    pub fn sync(&mut self) -> Result<usize, JournalError> {
        let mut synced = 0;
        // Buffered writes (direct mode: only a cut's zeros) go first, then the frames.
        let direct = self.pending.as_ref().map(|p| (p.segment, p.len > 0));
        for segment in self.segments.iter_mut().filter(|s| s.dirty) {
            segment.file.sync_data().map_err(io_err(&segment.path))?;
            segment.dirty = false;
            synced += 1;
        }
        if let Some((_, true)) = direct {
            self.write_pending()?;
            synced += 1;
        }
        self.synced_through = self.appended_through;
        Ok(synced)
    }

    /// The first half of a sync that does not hold the journal while the disk works:
    /// direct mode writes its gathered frames here (durable on return); buffered mode
    /// hands back a handle of every segment written since the last sync. Once those
    /// are `fdatasync`ed, [`Journal::finish_sync`] with the returned seq records the
    /// sync. Frames appended meanwhile are left for the next sync.
    pub fn start_sync(&mut self) -> Result<(u64, Vec<File>), JournalError> {
        let target = self.appended_through;
        let mut files = Vec::new();
        for segment in self.segments.iter_mut().filter(|s| s.dirty) {
            files.push(segment.file.try_clone().map_err(io_err(&segment.path))?);
            segment.dirty = false;
        }
        if self.pending.as_ref().is_some_and(|p| p.len > 0) {
            self.write_pending()?;
        }
        Ok((target, files))
    }

    /// Records a sync started by [`Journal::start_sync`] as done.
    pub fn finish_sync(&mut self, through: u64) {
        self.synced_through = self.synced_through.max(through);
    }

    /// The last seq appended.
    pub fn appended_through(&self) -> u64 {
        self.appended_through
    }

    /// The last seq a sync made durable.
    pub fn synced_through(&self) -> u64 {
        self.synced_through
    }

    /// Sled holds every record up to `seq` durably: segments with nothing newer can
    /// be reused.
    pub fn release_through(&mut self, seq: u64) {
        self.released_through = self.released_through.max(seq);
    }

    /// Segments not yet reusable (the active one included).
    pub fn segments_in_use(&self) -> usize {
        (0..self.segments.len())
            .filter(|&i| !self.reusable(i))
            .count()
    }

    fn reusable(&self, i: usize) -> bool {
        let s = &self.segments[i];
        i != self.active
            && (s.epoch == 0
                || (s.last_seq.map_or(true, |l| l <= self.released_through)
                    && s.last_mark <= self.marks_released))
    }

    fn free_segment(&self) -> Result<usize, JournalError> {
        let n = self.segments.len();
        (1..n)
            .map(|k| (self.active + k) % n)
            .find(|&i| self.reusable(i))
            .ok_or(JournalError::Full { segments: n })
    }

    /// Starts a new use of segment `i`: a new epoch in its header. The previous
    /// active segment stays dirty until the next sync.
    fn start_segment(&mut self, i: usize, first_seq: u64) -> Result<(), JournalError> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let header = encode_header(epoch, first_seq);
        if self.pending.is_some() {
            // The old segment's frames are written before the new one starts.
            self.write_pending()?;
        }
        let segment = &mut self.segments[i];
        match &mut self.pending {
            Some(p) => {
                p.segment = i;
                p.base = 0;
                p.len = header.len();
                p.buf.get()[..header.len()].copy_from_slice(&header);
            }
            None => {
                segment
                    .file
                    .write_all_at(&header, 0)
                    .map_err(io_err(&segment.path))?;
                segment.dirty = true;
            }
        }
        segment.epoch = epoch;
        segment.last_seq = None;
        segment.last_mark = 0;
        segment.write_at = HEADER_BYTES;
        self.active = i;
        Ok(())
    }
}

/// Appends one frame (8-byte aligned) to `buf`; `len` is the length field (with the
/// mark flag for a mark), `crc` the payload's CRC-32C.
fn put_frame(
    buf: &mut Vec<u8>,
    len: u32,
    seq: u64,
    epoch: u32,
    lag: u32,
    payload: &[u8],
    crc: u32,
) {
    debug_assert_eq!(crc, crc32c(payload));
    let start = buf.len();
    let mut head = [0u8; HEAD_BYTES];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..8].copy_from_slice(&head_crc(len, seq, epoch, lag).to_le_bytes());
    head[8..16].copy_from_slice(&seq.to_le_bytes());
    head[16..20].copy_from_slice(&epoch.to_le_bytes());
    head[20..].copy_from_slice(&lag.to_le_bytes());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(&crc.to_le_bytes());
    let end = start + align((FRAME_OVERHEAD + payload.len()) as u64) as usize;
    buf.resize(end, 0);
}

/// The write alignment `O_DIRECT` accepts in `dir` (512 or 4096 bytes), found by
/// writing a probe file; `None` where the filesystem refuses direct I/O (tmpfs,
/// some FUSE and overlay filesystems).
fn direct_alignment(dir: &Path) -> Option<usize> {
    let path = dir.join("direct-probe");
    let result = (|| {
        let file = open_direct(&path).ok()?;
        let mut buf = AlignedBuf::new(4096);
        [512usize, 4096]
            .into_iter()
            .find(|&align| file.write_all_at(&buf.get()[..align], 0).is_ok())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
}

/// Reserves the file's blocks so later writes and syncs never change its size, by
/// writing zeros from `from` (the bytes before it are kept). `posix_fallocate` would
/// leave the blocks *unwritten*: the filesystem then commits its own journal at
/// every `O_DSYNC` write that first touches one, to mark it written. Measured on
/// ext4: 4 KiB reach the device for a 1 KiB direct write into fallocated blocks,
/// 1 KiB into written ones. A segment is zeroed once, when it is created.
fn preallocate(file: &File, from: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 256 * 1024;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// Makes new directory entries durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, segment_bytes: u64, segment_count: usize) -> JournalConfig {
        JournalConfig {
            dir: dir.join("journal"),
            segment_bytes,
            segment_count,
            direct: false,
        }
    }

    fn payload(seq: u64) -> Vec<u8> {
        // Varying lengths exercise the alignment padding.
        (0..(seq % 13 + 20))
            .map(|i| (seq as u8) ^ (i as u8))
            .collect()
    }

    fn write(journal: &mut Journal, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            journal.append(seq, &payload(seq)).expect("append");
        }
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.records.iter().map(|r| r.0).collect()
    }

    fn assert_payloads(replay: &Replay) {
        for (seq, bytes) in &replay.records {
            assert_eq!(bytes, &payload(*seq), "seq {seq}");
        }
    }

    #[test]
    fn records_written_come_back_after_the_seq_sled_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 64 * 1024, 2);
        let (mut journal, replay) = Journal::open(&cfg, 0).expect("open");
        assert!(replay.records.is_empty() && !replay.torn_tail);
        write(&mut journal, 1..=100);
        journal.sync().expect("sync");
        drop(journal);

        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=100).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert!(!replay.torn_tail && replay.damaged.is_empty());

        // Sled already holds 1..=60: only the rest is replayed.
        let (_, replay) = Journal::open(&cfg, 60).expect("reopen");
        assert_eq!(seqs(&replay), (61..=100).collect::<Vec<_>>());
    }

    #[test]
    fn files_are_preallocated_and_keep_their_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 16 * 1024, 3);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        write(&mut journal, 1..=50);
        journal.sync().expect("sync");
        for i in 0..3 {
            let meta = std::fs::metadata(cfg.dir.join(format!("{i:03}.seg"))).expect("segment");
            assert_eq!(meta.len(), 16 * 1024);
            // Blocks are allocated, not a sparse file.
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 >= 16 * 1024, "{} blocks", meta.blocks());
            // And written: no hole, not even an unwritten (fallocated) extent, which
            // the filesystem reports as one.
            use std::os::unix::io::AsRawFd;
            let file = File::open(cfg.dir.join(format!("{i:03}.seg"))).expect("open");
            // SAFETY: the descriptor is open for the duration of the call.
            let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
            assert_eq!(hole, 16 * 1024, "segment {i} has a hole at {hole}");
        }
    }

    #[test]
    fn a_torn_last_frame_is_cut_and_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 64 * 1024, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        write(&mut journal, 1..=10);
        let end = journal.segments[journal.active].write_at;
        write(&mut journal, 11..=11);
        drop(journal);
        // The last frame was half written when the power went.
        let path = cfg.dir.join("000.seg");
        let file = OpenOptions::new().write(true).open(&path).expect("segment");
        let frame = align((FRAME_OVERHEAD + payload(11).len()) as u64);
        file.write_all_at(&vec![0u8; (frame / 2) as usize], end + frame / 2)
            .expect("tear");

        let (mut journal, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=10).collect::<Vec<_>>());
        assert!(replay.torn_tail, "the cut is reported as a torn tail");
        assert!(replay.damaged.is_empty(), "a torn tail is not damage");
        // Seq 11 was never synced: it is written again, over the torn bytes.
        write(&mut journal, 11..=12);
        drop(journal);
        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=12).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert!(!replay.torn_tail);
    }

    #[test]
    fn a_corrupt_middle_frame_is_reported_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 64 * 1024, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        write(&mut journal, 1..=4);
        let at = journal.segments[journal.active].write_at;
        write(&mut journal, 5..=5);
        // Seq 5 had reached the disk: the frames written after say so.
        journal.sync().expect("sync");
        write(&mut journal, 6..=20);
        drop(journal);
        let path = cfg.dir.join("000.seg");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("segment");

        // A flipped payload byte in seq 5's frame.
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at + HEAD_BYTES as u64 + 3)
            .expect("read");
        file.write_all_at(&[byte[0] ^ 0x40], at + HEAD_BYTES as u64 + 3)
            .expect("flip");
        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        let mut expected: Vec<u64> = (1..=4).collect();
        expected.extend(6..=20);
        assert_eq!(seqs(&replay), expected);
        assert_payloads(&replay);
        assert_eq!(replay.damaged.len(), 1);
        assert_eq!(
            (replay.damaged[0].first_seq, replay.damaged[0].last_seq),
            (5, 5)
        );
        assert!(!replay.damaged[0].bytes.is_empty());
        assert!(!replay.torn_tail);

        // A smashed head (its length unreadable) of seq 5: resynchronised all the same.
        file.write_all_at(&[0xFF; 8], at).expect("smash");
        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), expected);
        assert_eq!(
            (replay.damaged[0].first_seq, replay.damaged[0].last_seq),
            (5, 5)
        );
    }

    /// A power cut: the page cache wrote back a later page but not an earlier one,
    /// none of it synced. Everything from the hole on is cut, for good.
    #[test]
    fn unsynced_frames_after_a_hole_are_cut_and_never_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 64 * 1024, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        write(&mut journal, 1..=4);
        journal.sync().expect("sync");
        let hole = journal.segments[journal.active].write_at;
        write(&mut journal, 5..=6);
        let after_hole = journal.segments[journal.active].write_at;
        write(&mut journal, 7..=30);
        drop(journal);
        let path = cfg.dir.join("000.seg");
        let file = OpenOptions::new().write(true).open(&path).expect("segment");
        // Seqs 5 and 6 never reached the disk (preallocated zeros), 7..=30 did.
        file.write_all_at(&vec![0u8; (after_hole - hole) as usize], hole)
            .expect("hole");

        let (mut journal, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), vec![1, 2, 3, 4]);
        assert!(replay.torn_tail, "cut, as a torn tail");
        assert!(replay.damaged.is_empty(), "never synced, so no damage");
        // The seqs are used again for new records; the old 7..=30 never return.
        write(&mut journal, 5..=8);
        journal.sync().expect("sync");
        drop(journal);
        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=8).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert!(replay.damaged.is_empty() && !replay.torn_tail);
    }

    #[test]
    fn segments_are_reused_once_released_and_stale_frames_end_the_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Room for a few dozen frames per segment.
        let cfg = config(dir.path(), 2048, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        let mut seq = 0;
        // Fill both segments.
        let full = loop {
            seq += 1;
            if seq % 5 == 0 {
                journal.sync().expect("sync");
            }
            match journal.append(seq, &payload(seq)) {
                Ok(()) => {}
                Err(JournalError::Full { segments }) => break segments,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(full, 2);
        assert_eq!(journal.segments_in_use(), 2);
        let failed = seq;
        // Sled takes everything written so far: the older segment is reused.
        journal.release_through(failed - 1);
        write(&mut journal, failed..=failed + 5);
        journal.sync().expect("sync");
        let last = failed + 5;
        drop(journal);

        // The reused segment still holds frames of its first use past the new ones.
        let (_, replay) = Journal::open(&cfg, failed - 1).expect("reopen");
        assert_eq!(seqs(&replay), (failed..=last).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert!(
            replay.damaged.is_empty(),
            "leftovers of the first use are no damage"
        );

        // Were sled behind what it released, the records of the reused segment are
        // gone: the gap is reported, and the rest comes back in order.
        let (_, replay) = Journal::open(&cfg, 10).expect("reopen");
        let got = seqs(&replay);
        assert_eq!(got.last(), Some(&last));
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
        assert_eq!(replay.damaged.len(), 1);
        assert_eq!(
            (replay.damaged[0].first_seq, replay.damaged[0].last_seq),
            (11, got[0] - 1)
        );
    }

    #[test]
    fn a_journal_of_empty_or_preallocated_segments_replays_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 8192, 2);
        std::fs::create_dir_all(&cfg.dir).expect("dir");
        // One empty file, one missing: both become preallocated segments.
        File::create(cfg.dir.join("000.seg")).expect("empty");
        let (mut journal, replay) = Journal::open(&cfg, 41).expect("open");
        assert!(replay.records.is_empty() && !replay.torn_tail && replay.damaged.is_empty());
        write(&mut journal, 42..=43);
        drop(journal);
        let (_, replay) = Journal::open(&cfg, 41).expect("reopen");
        assert_eq!(seqs(&replay), vec![42, 43]);
    }

    #[test]
    fn a_foreign_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 8192, 2);
        std::fs::create_dir_all(&cfg.dir).expect("dir");
        std::fs::write(cfg.dir.join("001.seg"), vec![7u8; 8192]).expect("foreign");
        let e = Journal::open(&cfg, 0).expect_err("foreign segment");
        assert!(e.to_string().contains("001.seg"), "{e}");
    }

    /// Write system calls of this thread so far.
    fn thread_write_calls() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("syscw in /proc/thread-self/io")
    }

    /// Gathered appends write the same bytes as one append per record, one `pwrite`
    /// per segment they go into.
    #[test]
    fn gathered_appends_write_the_same_frames_with_one_pwrite_per_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (one, all) = (dir.path().join("one"), dir.path().join("all"));
        // Room for a few dozen frames per segment.
        let (one_cfg, all_cfg) = (config(&one, 4096, 3), config(&all, 4096, 3));
        let (mut by_one, _) = Journal::open(&one_cfg, 0).expect("open");
        let (mut by_all, _) = Journal::open(&all_cfg, 0).expect("open");
        let payloads: Vec<(u64, Vec<u8>)> = (1..=150).map(|seq| (seq, payload(seq))).collect();
        let records: Vec<Append> = payloads.iter().map(|(s, p)| Append::new(*s, p)).collect();
        // In batches of 1, 10 and 40, some of which cross into the next segment.
        let mut from = 0;
        for (i, n) in [1, 10, 40, 40, 10, 40, 9].into_iter().enumerate() {
            let batch = &records[from..from + n];
            write(&mut by_one, batch[0].seq..=batch[n - 1].seq);
            let segment = by_all.active;
            let (at, calls) = (by_all.segments[segment].write_at, thread_write_calls());
            by_all.append_all(batch).expect("append_all");
            // One write for the frames that go into each segment, and one for the
            // header of a segment started.
            let (mut end, mut gathered, mut expected) = (at, false, 1);
            for r in batch {
                let frame = align((FRAME_OVERHEAD + r.payload.len()) as u64);
                if end + frame > 4096 {
                    expected += if gathered { 2 } else { 1 };
                    end = HEADER_BYTES;
                }
                end += frame;
                gathered = true;
            }
            // At most (one write per record, as before, would be `n` of them).
            let made = thread_write_calls() - calls;
            assert!(
                made <= expected,
                "batch {i} of {n}: {made} writes, expected {expected}"
            );
            from += n;
            if i == 3 {
                // Both have synced 1..=91: the frames after carry that sync lag.
                by_one.sync().expect("sync");
                by_all.sync().expect("sync");
            }
        }
        assert_eq!(by_all.appended_through(), 150);
        drop((by_one, by_all));
        for i in 0..3 {
            let name = format!("journal/{i:03}.seg");
            let a = std::fs::read(one.join(&name)).expect("read");
            let b = std::fs::read(all.join(&name)).expect("read");
            assert!(a == b, "segment {i} differs");
        }
        let (_, replay) = Journal::open(&all_cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=150).collect::<Vec<_>>());
        assert_payloads(&replay);
    }

    /// A gathered append that fills the journal keeps the records before the full
    /// segment and says how many; the rest follow once a segment is released.
    #[test]
    fn a_gathered_append_into_a_full_journal_says_how_many_it_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 2048, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        let payloads: Vec<(u64, Vec<u8>)> = (1..=200).map(|seq| (seq, payload(seq))).collect();
        let records: Vec<Append> = payloads.iter().map(|(s, p)| Append::new(*s, p)).collect();
        let appended = match journal.append_all(&records) {
            Err((n, JournalError::Full { segments: 2 })) => n,
            other => panic!("expected a full journal, got {other:?}"),
        };
        assert!(appended > 20 && appended < 200, "{appended} appended");
        assert_eq!(journal.appended_through(), appended as u64);
        journal.sync().expect("sync");
        let (_, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=appended as u64).collect::<Vec<_>>());

        // Sled takes them: the rest goes in where the first batch stopped.
        journal.release_through(appended as u64);
        let rest = &records[appended..];
        let more = match journal.append_all(rest) {
            Ok(()) => rest.len(),
            Err((n, JournalError::Full { .. })) => n,
            Err((_, e)) => panic!("{e}"),
        };
        let last = (appended + more) as u64;
        assert_eq!(journal.appended_through(), last);
        journal.sync().expect("sync");
        drop(journal);
        let (_, replay) = Journal::open(&cfg, appended as u64).expect("reopen");
        assert_eq!(
            seqs(&replay),
            (appended as u64 + 1..=last).collect::<Vec<_>>()
        );
        assert_payloads(&replay);
    }

    fn thread_write_bytes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("write_bytes in /proc/thread-self/io")
    }

    /// The sector size of a direct-mode journal; a test that needs direct mode fails
    /// here, saying why, where the filesystem refuses `O_DIRECT`.
    fn direct_sector(mode: WriteMode, dir: &Path) -> usize {
        match mode {
            WriteMode::Direct { align } => align,
            WriteMode::Buffered => panic!(
                "O_DIRECT is refused on {}'s filesystem; run the tests from a directory on \
                 ext4 or xfs (TMPDIR)",
                dir.display()
            ),
        }
    }

    fn direct_config(dir: &Path) -> JournalConfig {
        JournalConfig {
            direct: true,
            ..config(dir, 64 * 1024, 2)
        }
    }

    #[test]
    fn direct_mode_keeps_what_was_synced_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = JournalConfig {
            segment_bytes: 4096,
            ..direct_config(dir.path())
        };
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        direct_sector(journal.mode(), dir.path());
        // Several segments' worth, synced as it goes, with sled taking what is synced.
        for seq in 1..=200 {
            journal.append(seq, &payload(seq)).expect("append");
            if seq % 7 == 0 {
                journal.sync().expect("sync");
                journal.release_through(seq.saturating_sub(40));
            }
        }
        journal.sync().expect("sync");
        // Not synced: in direct mode these were never in the kernel.
        write(&mut journal, 201..=205);
        drop(journal);
        let (mut journal, replay) = Journal::open(&cfg, 160).expect("reopen");
        assert_eq!(seqs(&replay), (161..=200).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert!(replay.damaged.is_empty());
        // It goes on where it stopped, and a buffered reader sees the same.
        write(&mut journal, 201..=210);
        journal.sync().expect("sync");
        drop(journal);
        let (_, replay) = Journal::open(&config(dir.path(), 4096, 2), 160).expect("reopen");
        assert_eq!(seqs(&replay), (161..=210).collect::<Vec<_>>());
        assert_payloads(&replay);
    }

    /// A direct sync starts on a fresh sector: it writes the new frames rounded up to
    /// whole sectors and never the previous sync's last sector again.
    #[test]
    fn a_direct_sync_never_writes_a_sector_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(&direct_config(dir.path()), 0).expect("open");
        let sector = direct_sector(journal.mode(), dir.path());
        // Frames of 56 bytes, 10 a sync: 560 bytes, not a multiple of a sector.
        let payload = [0xA5u8; 28];
        let per_sync = 10 * align((FRAME_OVERHEAD + payload.len()) as u64);
        assert_eq!(per_sync, 560);
        let rounds = 20;
        let before = thread_write_bytes();
        let mut seq = 0;
        for _ in 0..rounds {
            for _ in 0..10 {
                seq += 1;
                journal.append(seq, &payload).expect("append");
            }
            journal.sync().expect("sync");
        }
        let written = thread_write_bytes() - before;
        let sectors = per_sync.div_ceil(sector as u64) * sector as u64;
        assert_eq!(written, rounds * sectors, "{sector}-byte sectors");
        drop(journal);
        // The zeros after each sync's frames are stepped over.
        let (_, replay) = Journal::open(&direct_config(dir.path()), 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=seq).collect::<Vec<_>>());
        assert!(replay.damaged.is_empty() && !replay.torn_tail);
    }

    /// The point of direct mode: a sync writes the new bytes and one partial sector,
    /// not a whole page per sync.
    #[test]
    fn a_direct_sync_writes_the_new_sectors_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload = vec![0x5Au8; 72];
        let frame = align((FRAME_OVERHEAD + payload.len()) as u64) as usize;
        let (rounds, per_round) = (40u64, 10u64);
        let mut figures = Vec::new();
        for direct in [false, true] {
            let cfg = JournalConfig {
                direct,
                ..config(&dir.path().join(format!("{direct}")), 1 << 20, 2)
            };
            let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
            let before = thread_write_bytes();
            let mut seq = 0;
            for _ in 0..rounds {
                for _ in 0..per_round {
                    seq += 1;
                    journal.append(seq, &payload).expect("append");
                }
                journal.sync().expect("sync");
            }
            let written = thread_write_bytes() - before;
            figures.push((journal.mode(), written / (rounds * per_round)));
            if let WriteMode::Direct { align } = journal.mode() {
                let bound = rounds * (per_round * frame as u64 + 2 * align as u64);
                assert!(written <= bound, "{written} bytes written, at most {bound}");
            }
        }
        let [(buffered, per_buffered), (direct, per_direct)] = figures[..] else {
            unreachable!("two modes measured");
        };
        assert_eq!(buffered, WriteMode::Buffered);
        let align = direct_sector(direct, dir.path());
        eprintln!(
            "journal bytes written per 72-byte record, {per_round} records per sync: \
             buffered {per_buffered}, direct {per_direct} ({align}-byte sectors)"
        );
        // A page per sync at least, buffered; about the frames' bytes, direct.
        assert!(
            per_buffered >= 4096 / per_round,
            "{per_buffered} B/record buffered"
        );
        if align == 512 {
            assert!(
                per_direct * 2 < per_buffered,
                "direct {per_direct} B/record against buffered {per_buffered}"
            );
        }
    }

    #[test]
    fn marks_come_back_in_order_and_hold_their_segment_until_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 2048, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        write(&mut journal, 1..=3);
        journal.append_mark(b"one").expect("mark");
        write(&mut journal, 4..=5);
        journal.append_mark(b"two").expect("mark");
        journal.sync().expect("sync");
        drop(journal);
        let (journal, replay) = Journal::open(&cfg, 0).expect("reopen");
        assert_eq!(seqs(&replay), (1..=5).collect::<Vec<_>>());
        assert_payloads(&replay);
        assert_eq!(replay.marks, vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(replay.damaged.is_empty() && !replay.torn_tail);
        // Marks written after the records sled holds still come back.
        drop(journal);
        let (mut journal, replay) = Journal::open(&cfg, 5).expect("reopen");
        assert!(replay.records.is_empty());
        assert_eq!(replay.marks.len(), 2);

        // Sled holds every record, but the marks are not released: the segment
        // that holds them is not reused.
        journal.release_through(u64::MAX);
        let mut seq = 6;
        let full = loop {
            match journal.append(seq, &payload(seq)) {
                Ok(()) => seq += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(full, JournalError::Full { .. }), "{full}");
        journal.release_marks(journal.marks_written());
        journal
            .append(seq, &payload(seq))
            .expect("reused once released");
        seq += 1;
        // A mark written now holds the segment it is in (the active one, reused).
        let three = journal.append_mark(b"three").expect("mark");
        let full = loop {
            match journal.append(seq, &payload(seq)) {
                Ok(()) => seq += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(full, JournalError::Full { .. }), "{full}");
        journal.release_marks(three);
        journal
            .append(seq, &payload(seq))
            .expect("reused once released");
    }

    #[test]
    fn a_record_larger_than_a_segment_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), 4096, 2);
        let (mut journal, _) = Journal::open(&cfg, 0).expect("open");
        let e = journal.append(1, &vec![0u8; 8000]).expect_err("too large");
        assert!(matches!(e, JournalError::TooLarge { len: 8000, .. }), "{e}");
        journal.append(1, b"fits").expect("a small one still fits");
    }
}
