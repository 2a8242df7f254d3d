//! Packed blocks (version 3): how a full block is stored in sled when the store
//! compresses (`store.compress`).
//!
//! A block's frames are mostly readings of the same few schemas: the same bytes at
//! the same offsets (schema id, status bits, the sign and exponent bytes of float
//! values) and small differences elsewhere. sled compresses whole pages, frame after
//! frame, and finds little of that. Laid out column by column (byte `j` of every
//! frame together) the same block compresses about a fifth smaller, and every byte of
//! a block is a byte sled writes (about 1.3 times: its fragment, and again for the
//! few carried into a new leaf at a split, `vendor/sled/PATCHES.md`).
//!
//! ```text
//! version 3: [u8 3] [u32 LE frames n] [u32 LE row length m] [zstd frame of n × m bytes]
//!   the n × m bytes: byte j of every row, for j = 0..m; row k is frame k of the
//!   version 2 block (length, record, CRC), zero padded to m bytes
//! ```
//!
//! Readers never see a packed block: [`unpack`] gives back the version 2 block byte
//! for byte (each frame keeps its CRC), or the value as it is when it cannot, which
//! the scan then quarantines as undecodable.

use sled::IVec;

use super::{read_u32, BLOCK_V2, FRAME_OVERHEAD, MAX_BLOCK_SPAN};

/// Block version of a packed version 2 block.
pub const BLOCK_V3: u8 = 3;
const HEADER: usize = 1 + 4 + 4;
/// zstd's fastest level: a block is packed once, at its seal, on the write path.
const LEVEL: i32 = 1;
/// Largest unpacked block a header may announce (a damaged header must not make a
/// reader allocate much).
const MAX_UNPACKED: usize = 16 << 20;

/// The frames of a version 2 block: their byte ranges, if its framing holds.
fn frames(v2: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    if v2.first() != Some(&BLOCK_V2) {
        return None;
    }
    let mut out = Vec::new();
    let mut pos = 1;
    while pos < v2.len() {
        let len = read_u32(v2, pos)? as usize;
        let end = pos.checked_add(len)?.checked_add(FRAME_OVERHEAD)?;
        if end > v2.len() {
            return None;
        }
        out.push(pos..end);
        pos = end;
    }
    Some(out)
}

/// Packs a version 2 block into `out` (cleared first). Returns false, leaving the
/// block to be stored as it is, when packing does not make it smaller or the frames
/// differ too much in length for rows (a large push among readings).
pub fn pack(v2: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let Some(frames) = frames(v2) else {
        return false;
    };
    let n = frames.len();
    let m = frames.iter().map(|f| f.len()).max().unwrap_or(0);
    if n == 0 || n * m > 2 * v2.len() {
        return false;
    }
    let mut columns = vec![0u8; n * m];
    for (k, frame) in frames.iter().enumerate() {
        for (j, &b) in v2[frame.clone()].iter().enumerate() {
            columns[j * n + k] = b;
        }
    }
    let Ok(compressed) = zstd::block::compress(&columns, LEVEL) else {
        return false;
    };
    if HEADER + compressed.len() >= v2.len() {
        return false;
    }
    out.push(BLOCK_V3);
    // n and m are at most the block's length, which is far below 4 GiB.
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&(m as u32).to_le_bytes());
    out.extend_from_slice(&compressed);
    true
}

/// Number of frames a packed block says it holds; `None` for other versions.
pub fn packed_frames(value: &[u8]) -> Option<u64> {
    (value.first() == Some(&BLOCK_V3)).then(|| read_u32(value, 1).map_or(0, u64::from))
}

/// The version 2 block a packed block holds; any other value as it is. A packed
/// block that does not unpack comes back as it is (version 3): the scan quarantines
/// its seqs.
pub fn unpack(value: IVec) -> IVec {
    if value.first() != Some(&BLOCK_V3) {
        return value;
    }
    match unpack_v3(&value) {
        Some(v2) => IVec::from(v2),
        None => value,
    }
}

fn unpack_v3(value: &[u8]) -> Option<Vec<u8>> {
    let n = read_u32(value, 1)? as usize;
    let m = read_u32(value, 5)? as usize;
    let size = n.checked_mul(m)?;
    if n == 0 || n as u64 > MAX_BLOCK_SPAN || size > MAX_UNPACKED || m < FRAME_OVERHEAD {
        return None;
    }
    let columns = zstd::block::decompress(value.get(HEADER..)?, size).ok()?;
    if columns.len() != size {
        return None;
    }
    let mut v2 = Vec::with_capacity(1 + size);
    v2.push(BLOCK_V2);
    let mut row = vec![0u8; m];
    for k in 0..n {
        for (j, b) in row.iter_mut().enumerate() {
            *b = columns[j * n + k];
        }
        let len = read_u32(&row, 0)? as usize;
        let frame = row.get(..len.checked_add(FRAME_OVERHEAD)?)?;
        v2.extend_from_slice(frame);
    }
    Some(v2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::bench::sample_payload;
    use crate::store::checksum::crc32c;

    /// A version 2 block of `n` readings' worth of frames (any bytes: the layout is
    /// what counts here).
    fn block_of(n: u64) -> Vec<u8> {
        let mut v2 = vec![BLOCK_V2];
        for i in 0..n {
            let body = ciborium_bytes(i);
            v2.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v2.extend_from_slice(&body);
            v2.extend_from_slice(&crc32c(&body).to_le_bytes());
        }
        v2
    }

    fn ciborium_bytes(i: u64) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&sample_payload(&format!("m{}", i % 10), i), &mut out)
            .expect("encode");
        // Shorter rows, as compact records are: the values' part of the CBOR.
        out.truncate(70 + (i % 3) as usize);
        out
    }

    #[test]
    fn a_packed_block_unpacks_byte_for_byte_and_is_smaller() {
        let v2 = block_of(32);
        let mut packed = Vec::new();
        assert!(pack(&v2, &mut packed), "packing pays for readings");
        assert_eq!(packed[0], BLOCK_V3);
        assert_eq!(packed_frames(&packed), Some(32));
        assert!(
            packed.len() * 2 < v2.len(),
            "{} bytes packed from {}",
            packed.len(),
            v2.len()
        );
        assert_eq!(unpack(IVec::from(packed)).as_ref(), &v2[..]);
        // Other versions pass through.
        assert_eq!(unpack(IVec::from(v2.clone())).as_ref(), &v2[..]);
        assert_eq!(packed_frames(&v2), None);
    }

    #[test]
    fn blocks_that_do_not_pay_are_left_as_they_are() {
        let mut out = Vec::new();
        // Broken framing.
        assert!(!pack(&[BLOCK_V2, 9, 0, 0, 0, 1], &mut out));
        // One large frame among small ones: rows would be mostly padding.
        let mut v2 = block_of(8);
        let big = vec![7u8; 4000];
        v2.extend_from_slice(&(big.len() as u32).to_le_bytes());
        v2.extend_from_slice(&big);
        v2.extend_from_slice(&crc32c(&big).to_le_bytes());
        assert!(!pack(&v2, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn a_damaged_packed_block_comes_back_as_it_is() {
        let mut packed = Vec::new();
        assert!(pack(&block_of(32), &mut packed));
        let mut cut = packed.clone();
        cut.truncate(packed.len() / 2);
        assert_eq!(unpack(IVec::from(cut.clone())).as_ref(), &cut[..]);
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(unpack(IVec::from(huge.clone())).as_ref(), &huge[..]);
        let mut flipped = packed;
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let back = unpack(IVec::from(flipped));
        // Either zstd refuses it, or a frame's CRC will.
        assert!(back[0] == BLOCK_V3 || back.as_ref() != &block_of(32)[..]);
    }
}
