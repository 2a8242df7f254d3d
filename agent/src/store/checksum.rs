//! CRC-32C (Castagnoli): the checksum after every stored frame and in manifests.
//!
//! Computed with the `crc` crate's 16-lane table on every CPU. The CPU's CRC-32C
//! instructions are about three times faster on the bytes alone, but a record is about
//! 80 bytes, so they made no difference to the store benchmark beyond its noise (see
//! docs/performance.md, "CRC-32C"), and are not worth the `unsafe` they need.

use crc::{Crc, Digest, Table, CRC_32_ISCSI};

// 16-lane table: several times faster than the default single table on the
// ~500-byte records of a 14-value meter; the table is 16 KiB, built at compile time.
static TABLE: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    TABLE.checksum(bytes)
}

/// CRC-32C over bytes fed in pieces.
pub struct Crc32c(Digest<'static, u32, Table<16>>);

impl Crc32c {
    pub fn new() -> Self {
        Crc32c(TABLE.digest())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finalize(self) -> u32 {
        self.0.finalize()
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

/// Raw CRC-32C throughput over `size`-byte buffers, in MB/s (for `bench store`).
#[cfg(feature = "tools")]
pub(crate) fn raw_throughput(size: usize) -> f64 {
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(131) >> 3) as u8)
        .collect();
    let rounds = ((256usize << 20) / size.max(1)).max(1);
    let t0 = std::time::Instant::now();
    let mut acc = 0u32;
    for _ in 0..rounds {
        acc ^= crc32c(std::hint::black_box(&data));
    }
    std::hint::black_box(acc);
    (rounds * size) as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e6
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
    fn pieces_and_whole_agree_at_every_length_and_split() {
        for n in (0..80).chain([511, 512, 513, 4096, 65_537]) {
            for seed in 0..3 {
                let data = bytes(n, seed);
                let whole = crc32c(&data);
                // Fed in uneven pieces, from an odd offset on.
                let mut digest = Crc32c::new();
                for piece in data.chunks(7 + seed as usize) {
                    digest.update(piece);
                }
                assert_eq!(digest.finalize(), whole, "length {n} in pieces");
            }
        }
    }
}
