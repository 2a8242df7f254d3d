//! The Modbus register decoder on arbitrary words, types, word orders, scales and
//! ranges: never a panic; too few words is an error giving both counts; a number is
//! finite and within the register's range.
#![no_main]

use edge_agent::acquire::decode::{decode, DecodeError};
use edge_agent::config::{DataType, RegisterConfig, RegisterTable, WordOrder};
use edge_agent::model::Kind;
use libfuzzer_sys::fuzz_target;

const TYPES: [DataType; 8] = [
    DataType::U16,
    DataType::I16,
    DataType::U32,
    DataType::I32,
    DataType::U64,
    DataType::I64,
    DataType::F32,
    DataType::F64,
];

fn f64_at(data: &[u8], at: usize) -> Option<f64> {
    let bytes: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
    Some(f64::from_le_bytes(bytes))
}

fuzz_target!(|data: &[u8]| {
    // Layout: type, flags (word order, min, max), scale, min, max, then the words.
    if data.len() < 26 {
        return;
    }
    let data_type = TYPES[usize::from(data[0] % 8)];
    let flags = data[1];
    let word_order = if flags & 1 == 0 {
        WordOrder::HighFirst
    } else {
        WordOrder::LowFirst
    };
    let scale = f64_at(data, 2).unwrap_or(1.0);
    let min = f64_at(data, 10).filter(|_| flags & 2 != 0);
    let max = f64_at(data, 18).filter(|_| flags & 4 != 0);
    let words: Vec<u16> = data[26..]
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect();
    let reg = RegisterConfig {
        name: "q".into(),
        address: 0,
        table: RegisterTable::Input,
        data_type,
        word_order,
        scale,
        unit: "W".into(),
        kind: Kind::Power,
        min,
        max,
    };
    let needed = usize::from(data_type.words());
    match decode(&reg, &words) {
        Err(e) => {
            assert_eq!(
                e,
                DecodeError {
                    needed,
                    got: words.len()
                }
            );
            assert!(words.len() < needed);
        }
        Ok(v) => {
            assert!(words.len() >= needed);
            assert_eq!(v.value.is_some(), v.invalid.is_none());
            if let Some(x) = v.value {
                assert!(x.is_finite());
                assert!(!min.is_some_and(|lo| x < lo) && !max.is_some_and(|hi| x > hi));
            }
        }
    }
});
