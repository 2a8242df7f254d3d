//! Block planning: merge a profile's registers into as few read requests as sensible.
//!
//! Rule: registers are sorted per table (input, holding) by address and taken
//! greedily. A register joins the current block when it is in the same table, the
//! unused words between the block's end and the register are at most
//! [`MAX_GAP_WORDS`], and the block including it stays within the meter's
//! `max_registers_per_request`. Otherwise it starts a new block. A register is
//! always read whole by exactly one block.
//!
//! Why a gap of a few words: on a 9600 baud RS-485 line each extra word in a reply
//! costs about 2.3 ms, while a separate request costs two frame headers and CRCs,
//! the device's turnaround and the bus's frame gap: tens of milliseconds. Larger
//! gaps would still be cheaper on the wire, but unused addresses on some devices
//! answer with an exception, so only short holes (typical padding between
//! quantities) are read through.

use std::fmt;

use crate::acquire::config::{RegisterConfig, RegisterTable};

/// Largest run of unused words read through to save a request.
pub const MAX_GAP_WORDS: u16 = 8;

/// One read request: `count` words from `start` in `table`, holding whole registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub table: RegisterTable,
    pub start: u16,
    pub count: u16,
    /// Indices into the profile's register list, ascending by address.
    pub registers: Vec<usize>,
}

impl Block {
    /// Offset of a register's first word within this block's reply.
    pub fn offset_of(&self, reg: &RegisterConfig) -> usize {
        usize::from(reg.address.saturating_sub(self.start))
    }
}

/// A register that cannot be read in one request of the allowed size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    pub register: String,
    pub words: u16,
    pub max_registers_per_request: u16,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "register `{}` spans {} words, more than max_registers_per_request = {}",
            self.register, self.words, self.max_registers_per_request
        )
    }
}

impl std::error::Error for PlanError {}

fn table_rank(t: RegisterTable) -> u8 {
    match t {
        RegisterTable::Input => 0,
        RegisterTable::Holding => 1,
    }
}

/// Plans the block reads for a register list. `max` is the meter's
/// `max_registers_per_request` (validated to 1..=125).
pub fn plan(registers: &[RegisterConfig], max: u16) -> Result<Vec<Block>, PlanError> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| {
        let r = &registers[i];
        (table_rank(r.table), r.address, r.data_type.words())
    });
    let mut blocks: Vec<Block> = Vec::new();
    for i in order {
        let r = &registers[i];
        let words = r.data_type.words();
        if words > max {
            return Err(PlanError {
                register: r.name.clone(),
                words,
                max_registers_per_request: max,
            });
        }
        // u32 arithmetic: a register may end exactly at 65536.
        let r_start = u32::from(r.address);
        let r_end = r_start + u32::from(words);
        if let Some(b) = blocks.last_mut() {
            let b_start = u32::from(b.start);
            let b_end = b_start + u32::from(b.count);
            let gap = r_start.saturating_sub(b_end);
            let new_end = b_end.max(r_end);
            if b.table == r.table
                && gap <= u32::from(MAX_GAP_WORDS)
                && new_end - b_start <= u32::from(max)
            {
                // Fits: cannot exceed `max` (<= 125), so the cast is lossless.
                b.count = (new_end - b_start) as u16;
                b.registers.push(i);
                continue;
            }
        }
        blocks.push(Block {
            table: r.table,
            start: r.address,
            count: words,
            registers: vec![i],
        });
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::config::{DataType, WordOrder};
    use crate::acquire::profile::builtin;
    use crate::model::Kind;
    use proptest::prelude::*;

    fn reg(name: &str, address: u16, table: RegisterTable, data_type: DataType) -> RegisterConfig {
        RegisterConfig {
            name: name.into(),
            address,
            table,
            data_type,
            word_order: WordOrder::HighFirst,
            scale: 1.0,
            unit: String::new(),
            kind: Kind::Gauge,
            min: None,
            max: None,
        }
    }

    fn spans(blocks: &[Block]) -> Vec<(RegisterTable, u16, u16)> {
        blocks.iter().map(|b| (b.table, b.start, b.count)).collect()
    }

    #[test]
    fn sdm630_needs_four_requests() {
        let p = builtin("sdm630").expect("sdm630");
        let blocks = plan(&p.registers, 80).expect("plans");
        use RegisterTable::Input;
        assert_eq!(
            spans(&blocks),
            vec![
                (Input, 0x00, 0x12),
                (Input, 0x34, 2),
                (Input, 0x46, 6),
                (Input, 0x156, 2)
            ]
        );
        // With a small limit the first run is split without cutting a register.
        let blocks = plan(&p.registers, 5).expect("plans");
        assert_eq!(blocks[0].count, 4);
        assert_eq!(blocks[1].start, 4);
    }

    #[test]
    fn gaps_up_to_the_limit_are_read_through() {
        use DataType::U16;
        use RegisterTable::{Holding, Input};
        let regs = vec![
            reg("a", 0, Input, U16),
            reg("b", 1 + MAX_GAP_WORDS, Input, U16),
            reg("c", 2 + 2 * MAX_GAP_WORDS + 1, Input, U16),
            reg("h", 0, Holding, U16),
            reg("h2", 1, Holding, U16),
        ];
        let blocks = plan(&regs, 125).expect("plans");
        assert_eq!(
            spans(&blocks),
            vec![
                (Input, 0, 2 + MAX_GAP_WORDS),
                (Input, 2 + 2 * MAX_GAP_WORDS + 1, 1),
                (Holding, 0, 2)
            ]
        );
        assert_eq!(blocks[0].registers, vec![0, 1]);
        assert_eq!(blocks[2].registers, vec![3, 4]);
    }

    #[test]
    fn register_wider_than_the_limit_is_an_error() {
        let regs = vec![reg("e", 0, RegisterTable::Input, DataType::U64)];
        assert_eq!(
            plan(&regs, 3),
            Err(PlanError {
                register: "e".into(),
                words: 4,
                max_registers_per_request: 3
            })
        );
        assert!(plan(&regs, 4).is_ok());
    }

    #[test]
    fn register_at_the_top_of_the_address_space() {
        let regs = vec![
            reg("a", 65532, RegisterTable::Holding, DataType::U16),
            reg("b", 65534, RegisterTable::Holding, DataType::U32),
        ];
        let blocks = plan(&regs, 125).expect("plans");
        assert_eq!(spans(&blocks), vec![(RegisterTable::Holding, 65532, 4)]);
    }

    fn any_register() -> impl Strategy<Value = (u16, bool, DataType)> {
        let types = prop_oneof![
            Just(DataType::U16),
            Just(DataType::I32),
            Just(DataType::F32),
            Just(DataType::F64),
            Just(DataType::U64),
        ];
        (0u16..300, any::<bool>(), types)
    }

    proptest! {
        #[test]
        fn every_register_is_in_exactly_one_block(
            raw in prop::collection::vec(any_register(), 1..40),
            max in 4u16..=125,
        ) {
            let regs: Vec<RegisterConfig> = raw
                .iter()
                .enumerate()
                .map(|(i, &(addr, holding, t))| {
                    let table = if holding { RegisterTable::Holding } else { RegisterTable::Input };
                    reg(&format!("r{i}"), addr, table, t)
                })
                .collect();
            let blocks = plan(&regs, max).expect("every type fits in 4 words");
            let mut seen = vec![0usize; regs.len()];
            for b in &blocks {
                prop_assert!(b.count >= 1 && b.count <= max, "block {:?} exceeds {}", b, max);
                for &i in &b.registers {
                    seen[i] += 1;
                    let r = &regs[i];
                    prop_assert_eq!(r.table, b.table);
                    prop_assert!(r.address >= b.start);
                    prop_assert!(
                        u32::from(r.address) + u32::from(r.data_type.words())
                            <= u32::from(b.start) + u32::from(b.count)
                    );
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "coverage {:?}", seen);
        }
    }
}
