//! Simulated SunSpec devices: a register image with the `SunS` marker, common model
//! 1, the models asked for and the end marker, served by an ordinary [`SimMeter`].
//!
//! The measured points are the meter's profile registers (values from the model,
//! encoded with the model's scale factors); everything else (marker, model headers,
//! identity strings, scale factors, filler models and the points the device does
//! not implement) is fixed words over the image. Each model has a realistic mix of
//! scale factors, negative and positive, and at least one point that holds its
//! type's "not implemented" value, which a reader must report as missing:
//!
//! | model | not implemented | scale factors |
//! |---|---|---|
//! | 101-103 | `VAr` (int16 0x8000), `DCA` (uint16 0xFFFF) | A -2, V -1, Hz -2, PF -1, WH +1 |
//! | 111-113 | `TmpCab` (float32 NaN), `DCA` (NaN) | none (float) |
//! | 201-204 | `VA` (its scale factor 0x8000), `TotWhExp` (acc32 0) | A -2, V -1, W +1, PF -2 |
//! | 124 | `StorAval` (uint16 0xFFFF) | ChaState -1, InBatV -1 (WChaMax 5000 W, fixed) |
//!
//! Model 120 (nameplate) and a vendor model (64110) are fixed filler that a reader
//! skips by their length.

use std::sync::Arc;

use crate::acquire::config::{RegisterConfig, RegisterTable, WordOrder};
use crate::acquire::profile::Profile;
use crate::acquire::sunspec::{self, PointDef, PointType, END_MODEL, MARKER};

use super::SimMeter;

/// What a simulated device says in common model 1.
#[derive(Debug, Clone)]
pub struct SimIdentity {
    pub manufacturer: &'static str,
    pub model: &'static str,
    pub version: &'static str,
    pub serial: &'static str,
}

/// Points the simulated models leave unimplemented, by model family, with the
/// words they hold.
fn not_implemented(model: u16, point: &str) -> Option<Vec<u16>> {
    let nan = f32::NAN.to_bits();
    let nan = vec![(nan >> 16) as u16, nan as u16];
    match (model, point) {
        (101..=103, "VAr") => Some(vec![0x8000]),
        (101..=103, "DCA") => Some(vec![0xFFFF]),
        (111..=113, "TmpCab" | "DCA") => Some(nan),
        (201..=204, "VA") => Some(vec![1234]),
        (201..=204, "TotWhExp") => Some(vec![0, 0]),
        (124, "StorAval") => Some(vec![0xFFFF]),
        _ => None,
    }
}

/// Points served as fixed words: a battery's maximum charge power, 5000 W.
fn constant(model: u16, point: &str) -> Option<Vec<u16>> {
    match (model, point) {
        (124, "WChaMax") => Some(vec![5000]),
        _ => None,
    }
}

/// Realistic ranges for the points the value model does not know (it draws them
/// smoothly inside the range), narrower than the plausible ranges a reader checks.
fn sim_range(name: &str) -> Option<(f64, f64)> {
    match name {
        "apparent_power" => Some((500.0, 6000.0)),
        "reactive_power" => Some((-1500.0, 1500.0)),
        "temperature_cabinet" => Some((20.0, 65.0)),
        "battery_voltage" => Some((44.0, 56.0)),
        _ => None,
    }
}

/// The scale factor the simulated model serves at a scale-factor offset.
fn scale_factor(model: u16, sf_offset: u16) -> i16 {
    match (model, sf_offset) {
        // 10x: A_SF, V_SF, W_SF, Hz_SF, VA_SF, VAr_SF, PF_SF, WH_SF, DCA_SF, DCV_SF,
        // DCW_SF, Tmp_SF.
        (101..=103, 6) => -2,
        (101..=103, 13) => -1,
        (101..=103, 17) => -2,
        (101..=103, 23) => -1,
        (101..=103, 26) => 1,
        (101..=103, 28) => -2,
        (101..=103, 30) => -1,
        (101..=103, 37) => -1,
        // 20x: A_SF, V_SF, Hz_SF, W_SF, VA_SF (not implemented), VAR_SF, PF_SF, TotWh_SF.
        (201..=204, 6) => -2,
        (201..=204, 15) => -1,
        (201..=204, 17) => -2,
        (201..=204, 22) => 1,
        (201..=204, 27) => i16::MIN,
        (201..=204, 37) => -2,
        // 124: ChaState_SF, InBatV_SF.
        (124, 22) => -1,
        (124, 24) => -1,
        _ => 0,
    }
}

/// Characters of a string point, two per register, NUL padded to `len` registers.
fn string_words(s: &str, len: usize) -> Vec<u16> {
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(len * 2, 0);
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// A SunSpec device at `base` with common model 1 and `models` (ids from 101-103,
/// 111-113, 120, 124, 201-204, 64110) in that order, then the end marker.
pub fn device(base: u16, identity: &SimIdentity, models: &[u16], seed: u64) -> SimMeter {
    let mut fixed: Vec<(u16, Vec<u16>)> = vec![(base, MARKER.to_vec())];
    let mut registers: Vec<RegisterConfig> = Vec::new();
    let mut at = base + 2;
    // Common model 1: Mn, Md, Opt, Vr, SN, DA, pad.
    let mut common = vec![1, 66];
    common.extend(string_words(identity.manufacturer, 16));
    common.extend(string_words(identity.model, 16));
    common.extend(string_words("", 8));
    common.extend(string_words(identity.version, 8));
    common.extend(string_words(identity.serial, 16));
    common.extend([1, 0]);
    at += common.len() as u16;
    fixed.push((base + 2, common));
    for &id in models {
        let length = match sunspec::table_of(id) {
            Some((_, length)) => length,
            None if id == 120 => 26,
            None => 8,
        };
        fixed.push((at, vec![id, length]));
        match sunspec::table_of(id) {
            Some((table, _)) => {
                add_points(id, at, table, &mut fixed, &mut registers);
            }
            None if id == 120 => {
                // Nameplate: PV (4), 5000 W, 5000 VA; the rest not implemented.
                let mut body = vec![0xFFFFu16; 26];
                body[0] = 4;
                body[1] = 5000;
                body[2] = 0;
                body[3] = 5000;
                body[4] = 0;
                fixed.push((at + 2, body));
            }
            None => fixed.push((at + 2, vec![0x1234; usize::from(length)])),
        }
        at += 2 + length;
    }
    fixed.push((at, vec![END_MODEL, 0]));
    let profile = Profile {
        name: "sunspec".into(),
        manufacturer: identity.manufacturer.into(),
        model: identity.model.into(),
        registers,
    };
    let mut meter = SimMeter::new(Arc::new(profile), seed);
    for (start, words) in fixed {
        meter = meter.with_fixed_words(RegisterTable::Holding, start, &words);
    }
    meter
}

fn add_points(
    id: u16,
    at: u16,
    table: &[PointDef],
    fixed: &mut Vec<(u16, Vec<u16>)>,
    registers: &mut Vec<RegisterConfig>,
) {
    let single = matches!(id, 101 | 111 | 201);
    let mut sfs: Vec<u16> = Vec::new();
    for def in table {
        let address = at + def.offset;
        let sf = def.sf.map_or(0, |off| scale_factor(id, off));
        if let Some(off) = def.sf {
            if !sfs.contains(&off) {
                sfs.push(off);
                fixed.push((at + off, vec![sf as u16]));
            }
        }
        if let Some(words) = not_implemented(id, def.point).or(constant(id, def.point)) {
            fixed.push((address, words));
            continue;
        }
        // A single-phase model has no phase B and C: their points are not
        // implemented.
        let phase = def.name.ends_with("_l2") || def.name.ends_with("_l3");
        if single && phase {
            let sentinel = match def.ty {
                PointType::Int16 => vec![0x8000],
                PointType::Float32 => vec![0x7FC0, 0],
                _ => vec![0xFFFF],
            };
            fixed.push((address, sentinel));
            continue;
        }
        let name = match def.name {
            "voltage_l1" if single => "voltage",
            n => n,
        };
        registers.push(RegisterConfig {
            name: name.into(),
            address,
            table: RegisterTable::Holding,
            data_type: def.ty.data_type(),
            word_order: WordOrder::HighFirst,
            scale: 10f64.powi(i32::from(sf)),
            unit: def.unit.into(),
            kind: def.kind,
            min: Some(sim_range(name).map_or(def.min, |r| r.0)),
            max: sim_range(name).map_or(def.max, |r| Some(r.1)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_has_the_marker_the_chain_and_the_end() {
        let id = SimIdentity {
            manufacturer: "Acme",
            model: "X",
            version: "1",
            serial: "S1",
        };
        let m = device(40000, &id, &[103, 120, 203], 1);
        let w = m.read(RegisterTable::Holding, 40000, 4).expect("reads");
        assert_eq!(w, vec![0x5375, 0x6E53, 1, 66]);
        let w = m.read(RegisterTable::Holding, 40070, 2).expect("reads");
        assert_eq!(w, vec![103, 50]);
        let w = m
            .read(RegisterTable::Holding, 40070 + 52, 2)
            .expect("reads");
        assert_eq!(w, vec![120, 26]);
        let end = 40070 + 52 + 28 + 107;
        let w = m.read(RegisterTable::Holding, end, 2).expect("reads");
        assert_eq!(w, vec![0xFFFF, 0]);
    }
}
