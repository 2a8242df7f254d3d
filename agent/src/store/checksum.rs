//! CRC-32C (Castagnoli): the checksum after every stored frame and in manifests.
//!
//! Computed with the CPU's CRC-32C instructions where it has them (SSE 4.2 on x86-64;
//! the CRC extension on aarch64, which the Cortex-A53/A72/A76 of the 64-bit Raspberry
//! Pis have), otherwise with a 16-lane table (armv7). The sync reads every record's
//! bytes through this on a drain, so it is on the hot path.

use crc::{Crc, Digest, Table, CRC_32_ISCSI};

// 16-lane table: several times faster than the default single table on the
// ~500-byte records of a 14-value meter; the table is 16 KiB, built at compile time.
static TABLE: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    match hardware() {
        Some(update) => !update(!0, bytes),
        None => TABLE.checksum(bytes),
    }
}

/// CRC-32C over bytes fed in pieces.
pub struct Crc32c(State);

enum State {
    Hardware(fn(u32, &[u8]) -> u32, u32),
    Table(Digest<'static, u32, Table<16>>),
}

impl Crc32c {
    pub fn new() -> Self {
        Crc32c(match hardware() {
            Some(update) => State::Hardware(update, !0),
            None => State::Table(TABLE.digest()),
        })
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            State::Hardware(update, crc) => *crc = update(*crc, bytes),
            State::Table(digest) => digest.update(bytes),
        }
    }

    pub fn finalize(self) -> u32 {
        match self.0 {
            State::Hardware(_, crc) => !crc,
            State::Table(digest) => digest.finalize(),
        }
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

/// The instruction-based update (register in, register out, no inversions), when
/// this CPU has it. The feature check is cached by std.
fn hardware() -> Option<fn(u32, &[u8]) -> u32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        return Some(x86::update);
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("crc") {
        return Some(arm::update);
    }
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};

    pub fn update(crc: u32, bytes: &[u8]) -> u32 {
        // SAFETY: only handed out by `hardware()` once SSE 4.2 was detected.
        unsafe { update_sse42(crc, bytes) }
    }

    /// # Safety
    /// The CPU must have SSE 4.2.
    #[target_feature(enable = "sse4.2")]
    unsafe fn update_sse42(crc: u32, bytes: &[u8]) -> u32 {
        let words = bytes.chunks_exact(8);
        let tail = words.remainder();
        let mut crc = u64::from(crc);
        for w in words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            crc = _mm_crc32_u64(crc, u64::from_le_bytes(word));
        }
        // The instruction's result fits in 32 bits; the upper half is zero.
        let mut crc = crc as u32;
        for &b in tail {
            crc = _mm_crc32_u8(crc, b);
        }
        crc
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::{__crc32cb, __crc32cd};

    pub fn update(crc: u32, bytes: &[u8]) -> u32 {
        // SAFETY: only handed out by `hardware()` once the CRC extension was detected.
        unsafe { update_crc(crc, bytes) }
    }

    /// # Safety
    /// The CPU must have the CRC extension.
    #[target_feature(enable = "crc")]
    unsafe fn update_crc(mut crc: u32, bytes: &[u8]) -> u32 {
        let words = bytes.chunks_exact(8);
        let tail = words.remainder();
        for w in words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            crc = __crc32cd(crc, u64::from_le_bytes(word));
        }
        for &b in tail {
            crc = __crc32cb(crc, b);
        }
        crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes of every length and alignment that matters.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn known_answer() {
        // The check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn instructions_and_table_agree_at_every_length_and_split() {
        for n in (0..80).chain([511, 512, 513, 4096, 65_537]) {
            for seed in 0..3 {
                let data = bytes(n, seed);
                let table = TABLE.checksum(&data);
                assert_eq!(crc32c(&data), table, "length {n}");
                if let Some(update) = hardware() {
                    assert_eq!(!update(!0, &data), table, "length {n}");
                }
                // Fed in uneven pieces, from an odd offset on.
                let mut digest = Crc32c::new();
                for piece in data.chunks(7 + seed as usize) {
                    digest.update(piece);
                }
                assert_eq!(digest.finalize(), table, "length {n} in pieces");
            }
        }
    }
}
