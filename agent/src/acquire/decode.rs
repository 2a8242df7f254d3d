//! Register decoding: 16-bit Modbus words → a typed, scaled, checked [`Value`].
//!
//! Bytes within a word are big-endian (Modbus fixes that); the order of the words of
//! a multi-word value comes from the register's [`WordOrder`]. A value that is not a
//! plausible number (NaN, ±infinity, outside the register's min/max) is kept as
//! `value: None` with the reason in `invalid`: it is never turned into a number.

use std::fmt;

use crate::acquire::config::{DataType, RegisterConfig, WordOrder};
use crate::model::{Invalid, Source, Value};

/// The words handed to the decoder are too few to hold the register. (The caller
/// names the register; a reply of the wrong length is the caller's check.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    /// Words the register's type needs.
    pub needed: usize,
    /// Words that were available.
    pub got: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "needs {} words, only {} available",
            self.needed, self.got
        )
    }
}

impl std::error::Error for DecodeError {}

/// Joins the register's words into one integer, most significant word first.
/// `words` must hold at least `n` words; the caller checks.
fn join_words(words: &[u16], n: usize, order: WordOrder) -> u64 {
    let mut bits = 0u64;
    for i in 0..n {
        let w = match order {
            WordOrder::HighFirst => words[i],
            WordOrder::LowFirst => words[n - 1 - i],
        };
        bits = (bits << 16) | u64::from(w);
    }
    bits
}

/// Splits the low `n` words of `bits` into register order; the inverse of decoding.
/// Used by test servers and simulators to build a register image.
pub fn split_words(bits: u64, n: usize, order: WordOrder) -> Vec<u16> {
    let mut high_first: Vec<u16> = (0..n).rev().map(|i| (bits >> (16 * i)) as u16).collect();
    if order == WordOrder::LowFirst {
        high_first.reverse();
    }
    high_first
}

/// Encodes a number as the register's words: the raw value of the register's type,
/// without scaling. Integers are truncated to the type (test helper for images).
pub fn encode(data_type: DataType, order: WordOrder, raw: f64) -> Vec<u16> {
    let n = usize::from(data_type.words());
    let bits = match data_type {
        DataType::U16 => raw as u16 as u64,
        DataType::I16 => raw as i16 as u16 as u64,
        DataType::U32 => raw as u32 as u64,
        DataType::I32 => raw as i32 as u32 as u64,
        DataType::U64 => raw as u64,
        DataType::I64 => raw as i64 as u64,
        DataType::F32 => u64::from((raw as f32).to_bits()),
        DataType::F64 => raw.to_bits(),
    };
    split_words(bits, n, order)
}

/// Decodes the raw (unscaled) number of a register from the words starting at the
/// register's first word. Extra words after the register are ignored.
///
/// 64-bit integers above 2^53 lose precision in the f64; energy counters of that
/// size do not occur in practice.
pub fn decode_raw(
    data_type: DataType,
    order: WordOrder,
    words: &[u16],
) -> Result<f64, DecodeError> {
    let n = usize::from(data_type.words());
    if words.len() < n {
        return Err(DecodeError {
            needed: n,
            got: words.len(),
        });
    }
    let bits = join_words(words, n, order);
    Ok(match data_type {
        DataType::U16 => f64::from(bits as u16),
        DataType::I16 => f64::from(bits as u16 as i16),
        DataType::U32 => f64::from(bits as u32),
        DataType::I32 => f64::from(bits as u32 as i32),
        DataType::U64 => bits as f64,
        DataType::I64 => bits as i64 as f64,
        // f32 → f64 is exact, so the served number survives bit for bit.
        DataType::F32 => f64::from(f32::from_bits(bits as u32)),
        DataType::F64 => f64::from_bits(bits),
    })
}

/// Applies a register's scale. No arithmetic at scale 1: an f32 must reach the store
/// exactly as served. A decimal scale such as 0.01 divides by its integer reciprocal
/// instead of multiplying, so 857888 × 0.01 gives 8578.88 (the correctly rounded
/// quotient) rather than 8578.880000000001.
pub fn apply_scale(raw: f64, scale: f64) -> f64 {
    if scale == 1.0 {
        return raw;
    }
    let reciprocal = 1.0 / scale;
    let whole = reciprocal.round();
    if scale.abs() < 1.0 && (whole - reciprocal).abs() <= 1e-9 * reciprocal.abs() {
        raw / whole
    } else {
        raw * scale
    }
}

/// Scales a raw number and checks it against the register's plausible range.
/// Returns the value to store, or why there is none.
pub fn check(reg: &RegisterConfig, raw: f64) -> Result<f64, Invalid> {
    if raw.is_nan() {
        return Err(Invalid::Nan);
    }
    let v = apply_scale(raw, reg.scale);
    if v.is_nan() {
        return Err(Invalid::Nan);
    }
    if v.is_infinite() {
        return Err(Invalid::Infinite);
    }
    if reg.min.is_some_and(|lo| v < lo) || reg.max.is_some_and(|hi| v > hi) {
        return Err(Invalid::OutOfRange);
    }
    Ok(v)
}

#[cfg(test)]
mod scale_tests {
    use super::apply_scale;

    #[test]
    fn decimal_scales_give_the_shortest_decimal() {
        assert_eq!(apply_scale(857_888.0, 0.01), 8578.88);
        assert_eq!(apply_scale(2296.0, 0.1), 229.6);
        assert_eq!(apply_scale(-15.0, 0.001), -0.015);
        assert_eq!(apply_scale(12.0, 10.0), 120.0);
        assert_eq!(apply_scale(3.0, 0.25), 0.75);
        let served = 230.1f32 as f64;
        assert_eq!(apply_scale(served, 1.0).to_bits(), served.to_bits());
    }
}

/// Decodes one register into a [`Value`]. `words` starts at the register's address.
/// A NaN, infinite or out-of-range number gives a `Value` without a number; only
/// missing words are an error.
pub fn decode(reg: &RegisterConfig, words: &[u16]) -> Result<Value, DecodeError> {
    let raw = decode_raw(reg.data_type, reg.word_order, words)?;
    let (value, invalid) = match check(reg, raw) {
        Ok(v) => (Some(v), None),
        Err(why) => (None, Some(why)),
    };
    Ok(Value {
        quantity: reg.name.clone(),
        unit: reg.unit.clone(),
        kind: reg.kind,
        value,
        invalid,
        source: source_of(reg.data_type, reg.scale),
    })
}

/// The number type a register's values are: an f32 at scale 1 stays an f32 (printed
/// as served); an integer type is an integer (scaled or not); anything else (an f64,
/// a scaled f32) is an f64.
pub fn source_of(data_type: DataType, scale: f64) -> Source {
    match data_type {
        DataType::F32 if scale == 1.0 => Source::F32,
        DataType::F32 | DataType::F64 => Source::F64,
        DataType::U16
        | DataType::I16
        | DataType::U32
        | DataType::I32
        | DataType::U64
        | DataType::I64 => Source::Int,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::config::RegisterTable;
    use crate::model::Kind;
    use proptest::prelude::*;

    fn reg(data_type: DataType, word_order: WordOrder, scale: f64) -> RegisterConfig {
        RegisterConfig {
            name: "q".into(),
            address: 0,
            table: RegisterTable::Input,
            data_type,
            word_order,
            scale,
            unit: "W".into(),
            kind: Kind::Power,
            min: None,
            max: None,
        }
    }

    const ORDERS: [WordOrder; 2] = [WordOrder::HighFirst, WordOrder::LowFirst];

    #[test]
    fn word_orders_are_as_documented() {
        // 0x12345678 high word first is [0x1234, 0x5678].
        assert_eq!(
            decode_raw(DataType::U32, WordOrder::HighFirst, &[0x1234, 0x5678]),
            Ok(f64::from(0x1234_5678u32))
        );
        assert_eq!(
            decode_raw(DataType::U32, WordOrder::LowFirst, &[0x5678, 0x1234]),
            Ok(f64::from(0x1234_5678u32))
        );
        // Eastron-style f32 230.0 = 0x43660000.
        assert_eq!(
            decode_raw(DataType::F32, WordOrder::HighFirst, &[0x4366, 0x0000]),
            Ok(230.0)
        );
        assert_eq!(
            decode_raw(DataType::I16, WordOrder::HighFirst, &[0xFFFF]),
            Ok(-1.0)
        );
        assert_eq!(
            decode_raw(
                DataType::I64,
                WordOrder::LowFirst,
                &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]
            ),
            Ok(-2.0)
        );
    }

    #[test]
    fn too_few_words_is_a_decode_error() {
        let r = reg(DataType::F64, WordOrder::HighFirst, 1.0);
        assert_eq!(
            decode(&r, &[1, 2, 3]),
            Err(DecodeError { needed: 4, got: 3 })
        );
        let r = reg(DataType::U16, WordOrder::HighFirst, 1.0);
        assert_eq!(decode(&r, &[]), Err(DecodeError { needed: 1, got: 0 }));
    }

    #[test]
    fn nan_and_infinity_are_not_numbers() {
        for order in ORDERS {
            let r = reg(DataType::F32, order, 1.0);
            let v = decode(&r, &encode(DataType::F32, order, f64::NAN)).expect("decodes");
            assert_eq!((v.value, v.invalid), (None, Some(Invalid::Nan)));
            let v = decode(&r, &encode(DataType::F32, order, f64::NEG_INFINITY)).expect("decodes");
            assert_eq!((v.value, v.invalid), (None, Some(Invalid::Infinite)));
        }
        // A finite value that scaling pushes to infinity is not stored either.
        let r = reg(DataType::F64, WordOrder::HighFirst, 10.0);
        let v =
            decode(&r, &encode(DataType::F64, WordOrder::HighFirst, f64::MAX)).expect("decodes");
        assert_eq!((v.value, v.invalid), (None, Some(Invalid::Infinite)));
    }

    #[test]
    fn range_applies_after_scaling() {
        let mut r = reg(DataType::U16, WordOrder::HighFirst, 0.1);
        r.min = Some(0.0);
        r.max = Some(500.0);
        let v = decode(&r, &[2301]).expect("decodes");
        assert_eq!(v.value, Some(230.1));
        assert_eq!(v.invalid, None);
        let v = decode(&r, &[5001]).expect("decodes");
        assert_eq!((v.value, v.invalid), (None, Some(Invalid::OutOfRange)));
        // The bounds themselves are plausible.
        let v = decode(&r, &[5000]).expect("decodes");
        assert_eq!(v.value, Some(500.0));
        let mut r = reg(DataType::I16, WordOrder::HighFirst, 1.0);
        r.min = Some(0.0);
        let v = decode(&r, &[0xFFFF]).expect("decodes");
        assert_eq!(v.invalid, Some(Invalid::OutOfRange));
    }

    #[test]
    fn value_carries_the_register_description() {
        let mut r = reg(DataType::F32, WordOrder::HighFirst, 1.0);
        r.name = "energy_import".into();
        r.unit = "kWh".into();
        r.kind = Kind::EnergyTotal;
        let v = decode(&r, &[0x4366, 0x0000]).expect("decodes");
        assert_eq!(
            v,
            Value {
                quantity: "energy_import".into(),
                unit: "kWh".into(),
                kind: Kind::EnergyTotal,
                value: Some(230.0),
                invalid: None,
                source: Source::F32,
            }
        );
    }

    #[test]
    fn values_carry_the_number_type_of_their_register() {
        let cases = [
            (DataType::F32, 1.0, Source::F32),
            (DataType::F32, 0.001, Source::F64),
            (DataType::F64, 1.0, Source::F64),
            (DataType::U32, 1.0, Source::Int),
            (DataType::I16, 0.1, Source::Int),
            (DataType::U64, 1.0, Source::Int),
        ];
        for (data_type, scale, source) in cases {
            let r = reg(data_type, WordOrder::HighFirst, scale);
            let v = decode(&r, &[0x4366, 0, 0, 0]).expect("decodes");
            assert_eq!(v.source, source, "{data_type:?} at scale {scale}");
        }
        // A u32 counter above f32's exact range prints its integer, not f32's
        // shortest form (4294967000).
        let r = reg(DataType::U32, WordOrder::HighFirst, 1.0);
        let v = decode(&r, &[0xFFFF, 0xFF00]).expect("decodes");
        assert_eq!(v.number_json().to_string(), "4294967040");
    }

    fn order() -> impl Strategy<Value = WordOrder> {
        prop_oneof![Just(WordOrder::HighFirst), Just(WordOrder::LowFirst)]
    }

    /// Words of `bits` for a type, plus extra trailing words that must be ignored.
    fn words_with_tail(bits: u64, n: usize, o: WordOrder, tail: &[u16]) -> Vec<u16> {
        let mut w = split_words(bits, n, o);
        w.extend_from_slice(tail);
        w
    }

    fn data_type() -> impl Strategy<Value = DataType> {
        prop_oneof![
            Just(DataType::U16),
            Just(DataType::I16),
            Just(DataType::U32),
            Just(DataType::I32),
            Just(DataType::U64),
            Just(DataType::I64),
            Just(DataType::F32),
            Just(DataType::F64),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Arbitrary words, lengths, types, word orders, scales and ranges: no panic;
        /// too few words is an error giving both counts; otherwise a number that is
        /// finite and within the range, or no number with the reason.
        #[test]
        fn arbitrary_replies_decode_or_fail_cleanly(
            words in prop::collection::vec(any::<u16>(), 0..6),
            t in data_type(),
            o in order(),
            scale in prop_oneof![any::<f64>(), Just(1.0), Just(0.1), Just(1e-300), Just(0.0)],
            min in prop::option::of(any::<f64>()),
            max in prop::option::of(any::<f64>()),
        ) {
            let mut r = reg(t, o, scale);
            (r.min, r.max) = (min, max);
            let needed = usize::from(t.words());
            match decode(&r, &words) {
                Err(e) => {
                    prop_assert!(words.len() < needed);
                    prop_assert_eq!(e, DecodeError { needed, got: words.len() });
                    let text = e.to_string();
                    prop_assert!(text.contains(&needed.to_string()) && text.contains(&words.len().to_string()), "{}", text);
                }
                Ok(v) => {
                    prop_assert!(words.len() >= needed);
                    prop_assert_eq!(v.value.is_some(), v.invalid.is_none());
                    if let Some(x) = v.value {
                        prop_assert!(x.is_finite());
                        prop_assert!(!min.is_some_and(|lo| x < lo) && !max.is_some_and(|hi| x > hi));
                    }
                    // Words after the register do not change the value.
                    let head = decode(&r, &words[..needed]).expect("enough words");
                    prop_assert_eq!(head.value.map(f64::to_bits), v.value.map(f64::to_bits));
                }
            }
        }

        #[test]
        fn f32_round_trips_bit_exactly(bits in any::<u32>(), o in order(), tail in prop::collection::vec(any::<u16>(), 0..3)) {
            let served = f32::from_bits(bits);
            let r = reg(DataType::F32, o, 1.0);
            let v = decode(&r, &words_with_tail(u64::from(bits), 2, o, &tail)).expect("decodes");
            if served.is_nan() {
                prop_assert_eq!((v.value, v.invalid), (None, Some(Invalid::Nan)));
            } else if served.is_infinite() {
                prop_assert_eq!((v.value, v.invalid), (None, Some(Invalid::Infinite)));
            } else {
                let got = v.value.expect("finite f32 is a number");
                prop_assert_eq!((got as f32).to_bits(), bits);
                prop_assert_eq!(got, f64::from(served));
            }
        }

        #[test]
        fn f64_round_trips_bit_exactly(bits in any::<u64>(), o in order()) {
            let served = f64::from_bits(bits);
            let r = reg(DataType::F64, o, 1.0);
            let v = decode(&r, &split_words(bits, 4, o)).expect("decodes");
            match v.value {
                Some(got) => prop_assert_eq!(got.to_bits(), bits),
                None => prop_assert!(!served.is_finite()),
            }
            prop_assert_eq!(v.value.is_none(), v.invalid.is_some());
        }

        #[test]
        fn unsigned_round_trip(x in any::<u64>(), o in order()) {
            let x16 = x as u16;
            let x32 = x as u32;
            prop_assert_eq!(decode_raw(DataType::U16, o, &encode(DataType::U16, o, f64::from(x16))), Ok(f64::from(x16)));
            prop_assert_eq!(decode_raw(DataType::U32, o, &encode(DataType::U32, o, f64::from(x32))), Ok(f64::from(x32)));
            prop_assert_eq!(decode_raw(DataType::U64, o, &split_words(x, 4, o)), Ok(x as f64));
        }

        #[test]
        fn signed_round_trip(x in any::<i64>(), o in order()) {
            let x16 = x as i16;
            let x32 = x as i32;
            prop_assert_eq!(decode_raw(DataType::I16, o, &encode(DataType::I16, o, f64::from(x16))), Ok(f64::from(x16)));
            prop_assert_eq!(decode_raw(DataType::I32, o, &encode(DataType::I32, o, f64::from(x32))), Ok(f64::from(x32)));
            prop_assert_eq!(decode_raw(DataType::I64, o, &split_words(x as u64, 4, o)), Ok(x as f64));
            // Negative numbers stay negative: the sign bit is the top bit of the high word.
            prop_assert_eq!(decode_raw(DataType::I32, o, &encode(DataType::I32, o, f64::from(x32))).map(|v| v < 0.0), Ok(x32 < 0));
        }

        #[test]
        fn scale_multiplies(x in any::<i32>(), scale in prop_oneof![Just(0.1), Just(0.01), Just(10.0), Just(-1.0), Just(0.001)], o in order()) {
            let r = reg(DataType::I32, o, scale);
            let v = decode(&r, &encode(DataType::I32, o, f64::from(x))).expect("decodes");
            prop_assert_eq!(v.value, Some(apply_scale(f64::from(x), scale)));
            // Within one rounding step of the plain product.
            let product = f64::from(x) * scale;
            prop_assert!((apply_scale(f64::from(x), scale) - product).abs() <= product.abs() * 4.0 * f64::EPSILON);
        }

        #[test]
        fn nan_and_inf_never_produce_a_number(
            mantissa in 1u64..(1 << 52),
            negative in any::<bool>(),
            scale in prop_oneof![Just(1.0), Just(0.1), Just(1000.0)],
            o in order(),
        ) {
            let sign = if negative { 1u64 << 63 } else { 0 };
            let nan64 = sign | (0x7FFu64 << 52) | mantissa;
            let inf64 = sign | (0x7FFu64 << 52);
            let nan32 = ((sign >> 32) as u32) | (0xFF << 23) | ((mantissa as u32) & 0x7F_FFFF).max(1);
            let inf32 = ((sign >> 32) as u32) | (0xFF << 23);
            let mut r = reg(DataType::F64, o, scale);
            r.min = Some(-1.0);
            r.max = Some(1.0);
            for (t, bits, n, why) in [
                (DataType::F64, nan64, 4, Invalid::Nan),
                (DataType::F64, inf64, 4, Invalid::Infinite),
                (DataType::F32, u64::from(nan32), 2, Invalid::Nan),
                (DataType::F32, u64::from(inf32), 2, Invalid::Infinite),
            ] {
                r.data_type = t;
                let v = decode(&r, &split_words(bits, n, o)).expect("decodes");
                prop_assert_eq!(v.value, None);
                prop_assert_eq!(v.invalid, Some(why));
            }
        }
    }
}
