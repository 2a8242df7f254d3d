//! SunSpec devices (`profile = "sunspec"`): discovered, not configured.
//!
//! Facts from the SunSpec Alliance documents:
//! - *SunSpec Device Information Model Specification*, version 1.1 (2022-05-09): the
//!   `SunS` marker (0x5375 0x6E53) at holding register 40000, else 0 or 50000; the
//!   chain of models after it, each `ID`, `L` (length of the body in registers), then
//!   the body; the end model `0xFFFF` (length 0); common model 1 first; scale factors
//!   (`sunssf`, a signed power of ten, -10..=10) and the "not implemented" values per
//!   type: int16 0x8000, uint16/enum16 0xFFFF, acc32 0, uint32 0xFFFFFFFF, sunssf
//!   0x8000, float32 NaN.
//! - The SunSpec model definitions, `json/model_N.json` of the public sunspec/models
//!   repository (commit 7abdf89, 2026-04-22): offsets, types, units and scale-factor
//!   names of models 1, 101-103, 111-113, 124 and 201-204 (tables [`INVERTER_INT`],
//!   [`INVERTER_FLOAT`], [`METER`], [`STORAGE`]). Offsets below count from the model's
//!   `ID` register (offset 0; `L` is 1; the body starts at 2), as the JSON files do.
//!
//! Discovery runs once per meter connection, again after a failed poll (a reconnect,
//! a changed chain). It finds the marker, walks the chain (bounded: at most
//! [`MAX_MODELS`] models, never past the end of the address space), reads model 1
//! into the meter's identity and maps the models it knows onto the quantity names
//! of the profiles (`power`, `voltage_l1`, `energy_import`, ...). The result is a
//! read plan: blocks over the mapped points, their scale factors and each model's
//! `ID` register (checked every poll, so a changed device is rediscovered), planned
//! within the meter's `max_registers_per_request`. A poll decodes each point with
//! the scale factor read in the same poll. A point that holds its type's "not
//! implemented" value, or whose scale factor does, is stored as missing with
//! `invalid = "not_implemented"`, never as a number.

use std::fmt;

use super::decode::apply_scale;
use super::plan::{plan, Block, PlanError};
use crate::acquire::config::{DataType, RegisterConfig, RegisterTable, WordOrder};
use crate::model::{Invalid, Kind, Source, Value};

/// The profile name that selects discovery.
pub const PROFILE: &str = "sunspec";

/// Where the marker is looked for, in order.
pub const BASES: [u16; 3] = [40000, 0, 50000];

/// `SunS` as two registers.
pub const MARKER: [u16; 2] = [0x5375, 0x6E53];

/// The model id that ends the chain.
pub const END_MODEL: u16 = 0xFFFF;

/// Most models walked before the chain is taken as broken.
pub const MAX_MODELS: usize = 64;

/// Length of common model 1's body: Mn 16, Md 16, Opt 8, Vr 8, SN 16, DA 1 (plus a
/// pad register that older devices leave out).
pub const COMMON_BODY: u16 = 65;

/// One model of the chain: its id, where its `ID` register is, its body length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelHeader {
    pub id: u16,
    pub address: u16,
    pub length: u16,
}

/// What common model 1 says about the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub manufacturer: String,
    pub model: String,
    pub version: String,
    pub serial: String,
}

/// The result of a walk: the base, the chain and the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub base: u16,
    pub models: Vec<ModelHeader>,
    pub identity: Identity,
}

/// Why discovery failed. `E` is the transport's error.
#[derive(Debug, PartialEq, Eq)]
pub enum DiscoveryError<E> {
    /// A read failed (timeout, transport): the device is not reachable.
    Read(E),
    /// No `SunS` at any base address.
    NoMarker,
    /// The chain does not start with common model 1.
    NoCommonModel { found: u16 },
    /// A model's length runs past the end of the address space.
    Overrun { id: u16, address: u16, length: u16 },
    /// More than [`MAX_MODELS`] models without an end marker.
    TooLong,
}

impl<E: fmt::Display> fmt::Display for DiscoveryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiscoveryError::Read(e) => write!(f, "{e}"),
            DiscoveryError::NoMarker => write!(
                f,
                "no SunSpec marker `SunS` at holding register 40000, 0 or 50000"
            ),
            DiscoveryError::NoCommonModel { found } => {
                write!(
                    f,
                    "SunSpec chain starts with model {found}, not common model 1"
                )
            }
            DiscoveryError::Overrun {
                id,
                address,
                length,
            } => write!(
                f,
                "SunSpec model {id} at {address} with length {length} runs past register 65535"
            ),
            DiscoveryError::TooLong => write!(
                f,
                "SunSpec chain has more than {MAX_MODELS} models without an end marker"
            ),
        }
    }
}

/// Holding-register reads of one device. `Ok(None)`: the device answered with an
/// exception (nothing there); `Err`: no usable answer.
pub(crate) trait Registers {
    type Error;
    async fn read(&mut self, start: u16, count: u16) -> Result<Option<Vec<u16>>, Self::Error>;
}

/// Reads `count` registers from `start` in requests of at most `max` words.
async fn read_span<R: Registers>(
    regs: &mut R,
    start: u16,
    count: u16,
    max: u16,
) -> Result<Option<Vec<u16>>, R::Error> {
    let max = max.clamp(1, 125);
    let mut out = Vec::with_capacity(usize::from(count));
    let mut at = u32::from(start);
    let end = u32::from(start) + u32::from(count);
    while at < end {
        let n = (end - at).min(u32::from(max));
        // `at` < `end` <= 65536 and n <= 125: both fit a u16.
        let Some(words) = regs.read(at as u16, n as u16).await? else {
            return Ok(None);
        };
        if words.len() != n as usize {
            return Ok(None);
        }
        out.extend_from_slice(&words);
        at += n;
    }
    Ok(Some(out))
}

/// Text of a SunSpec string point: two characters per register, high byte first,
/// padded with NULs; non-printable bytes dropped, spaces trimmed.
pub fn string_of(words: &[u16]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes[..end]
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|&b| char::from(b))
        .collect::<String>()
        .trim()
        .to_string()
}

/// Looks for the marker: the base where it is, or `None`.
pub(crate) async fn find_marker<R: Registers>(regs: &mut R) -> Result<Option<u16>, R::Error> {
    for base in BASES {
        if let Some(words) = regs.read(base, 2).await? {
            if words == MARKER {
                return Ok(Some(base));
            }
        }
    }
    Ok(None)
}

/// Walks the model chain after the marker at `base`. Ends at the end model, or at
/// an address that answers with an exception (devices that leave the end model
/// out). Bounded by [`MAX_MODELS`] and the address space.
pub(crate) async fn walk<R: Registers>(
    regs: &mut R,
    base: u16,
) -> Result<Vec<ModelHeader>, DiscoveryError<R::Error>> {
    let mut models = Vec::new();
    let mut at = u32::from(base) + 2;
    loop {
        if at > 0xFFFE {
            break;
        }
        // `at` <= 0xFFFE: fits a u16.
        let Some(header) = regs
            .read(at as u16, 2)
            .await
            .map_err(DiscoveryError::Read)?
        else {
            break;
        };
        let [id, length] = header[..] else {
            break;
        };
        if id == END_MODEL {
            break;
        }
        if models.len() >= MAX_MODELS {
            return Err(DiscoveryError::TooLong);
        }
        let next = at + 2 + u32::from(length);
        if next > 0x1_0000 {
            return Err(DiscoveryError::Overrun {
                id,
                address: at as u16,
                length,
            });
        }
        models.push(ModelHeader {
            id,
            address: at as u16,
            length,
        });
        at = next;
    }
    match models.first() {
        Some(m) if m.id == 1 => Ok(models),
        Some(m) => Err(DiscoveryError::NoCommonModel { found: m.id }),
        None => Err(DiscoveryError::NoCommonModel { found: END_MODEL }),
    }
}

/// Finds the marker, walks the chain and reads the identity from model 1.
pub(crate) async fn discover<R: Registers>(
    regs: &mut R,
    max_per_read: u16,
) -> Result<Chain, DiscoveryError<R::Error>> {
    let base = find_marker(regs)
        .await
        .map_err(DiscoveryError::Read)?
        .ok_or(DiscoveryError::NoMarker)?;
    let models = walk(regs, base).await?;
    let mut identity = Identity::default();
    if let Some(common) = models.first() {
        let n = common.length.min(COMMON_BODY);
        // An empty model at the very top of the address space has no body to read.
        let body = match common.address.checked_add(2) {
            Some(start) if n > 0 => read_span(regs, start, n, max_per_read)
                .await
                .map_err(DiscoveryError::Read)?
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let text = |from: usize, len: usize| {
            body.get(from..(from + len).min(body.len()))
                .map(string_of)
                .unwrap_or_default()
        };
        identity = Identity {
            manufacturer: text(0, 16),
            model: text(16, 16),
            version: text(40, 8),
            serial: text(48, 16),
        };
    }
    Ok(Chain {
        base,
        models,
        identity,
    })
}

/// SunSpec point types and their "not implemented" values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointType {
    Int16,
    Uint16,
    /// enum16: a code, 0xFFFF when not implemented.
    Enum16,
    Acc32,
    Uint32,
    Float32,
}

impl PointType {
    pub fn data_type(self) -> DataType {
        match self {
            PointType::Int16 => DataType::I16,
            PointType::Uint16 | PointType::Enum16 => DataType::U16,
            PointType::Acc32 | PointType::Uint32 => DataType::U32,
            PointType::Float32 => DataType::F32,
        }
    }

    /// True when the words hold the type's "not implemented" value (for float32 any
    /// NaN, not only 0x7FC00000).
    pub fn not_implemented(self, words: &[u16]) -> bool {
        match (self, words) {
            (PointType::Float32, [hi, lo, ..]) => {
                f32::from_bits((u32::from(*hi) << 16) | u32::from(*lo)).is_nan()
            }
            (PointType::Int16, [w, ..]) => *w == 0x8000,
            (PointType::Uint16 | PointType::Enum16, [w, ..]) => *w == 0xFFFF,
            (PointType::Acc32, [hi, lo, ..]) => *hi == 0 && *lo == 0,
            (PointType::Uint32, [hi, lo, ..]) => *hi == 0xFFFF && *lo == 0xFFFF,
            _ => false,
        }
    }
}

/// The scale-factor sentinel.
pub const SF_NOT_IMPLEMENTED: u16 = 0x8000;

/// One point of a model table: offset from the model's `ID`, type, quantity, unit,
/// kind, the offset of its scale factor, a plausible range.
#[derive(Debug, Clone, Copy)]
pub struct PointDef {
    pub offset: u16,
    pub point: &'static str,
    pub ty: PointType,
    pub name: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    pub sf: Option<u16>,
    pub min: f64,
    pub max: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
const fn p(
    offset: u16,
    point: &'static str,
    ty: PointType,
    name: &'static str,
    unit: &'static str,
    kind: Kind,
    sf: Option<u16>,
    min: f64,
    max: Option<f64>,
) -> PointDef {
    PointDef {
        offset,
        point,
        ty,
        name,
        unit,
        kind,
        sf,
        min,
        max,
    }
}

use Kind::{Current as KC, EnergyTotal as KE, Frequency as KF, Gauge as KG, Power as KP};
use Kind::{PowerFactor as KPF, Voltage as KV};
use PointType::{Acc32, Enum16, Float32, Int16, Uint16};

/// Inverter models 101 (single phase), 102 (split phase), 103 (three phase): integer
/// points with scale factors; body length 50.
#[rustfmt::skip]
pub const INVERTER_INT: &[PointDef] = &[
    p(2, "A", Uint16, "current", "A", KC, Some(6), 0.0, Some(2000.0)),
    p(3, "AphA", Uint16, "current_l1", "A", KC, Some(6), 0.0, Some(2000.0)),
    p(4, "AphB", Uint16, "current_l2", "A", KC, Some(6), 0.0, Some(2000.0)),
    p(5, "AphC", Uint16, "current_l3", "A", KC, Some(6), 0.0, Some(2000.0)),
    p(10, "PhVphA", Uint16, "voltage_l1", "V", KV, Some(13), 0.0, Some(1000.0)),
    p(11, "PhVphB", Uint16, "voltage_l2", "V", KV, Some(13), 0.0, Some(1000.0)),
    p(12, "PhVphC", Uint16, "voltage_l3", "V", KV, Some(13), 0.0, Some(1000.0)),
    p(14, "W", Int16, "power", "W", KP, Some(15), -1e7, Some(1e7)),
    p(16, "Hz", Uint16, "frequency", "Hz", KF, Some(17), 40.0, Some(70.0)),
    p(18, "VA", Int16, "apparent_power", "VA", KG, Some(19), -1e7, Some(1e7)),
    p(20, "VAr", Int16, "reactive_power", "var", KG, Some(21), -1e7, Some(1e7)),
    p(22, "PF", Int16, "power_factor", "%", KPF, Some(23), -100.0, Some(100.0)),
    p(24, "WH", Acc32, "energy_total", "Wh", KE, Some(26), 0.0, None),
    p(27, "DCA", Uint16, "dc_current", "A", KC, Some(28), 0.0, Some(2000.0)),
    p(29, "DCV", Uint16, "dc_voltage", "V", KV, Some(30), 0.0, Some(2000.0)),
    p(31, "DCW", Int16, "dc_power", "W", KP, Some(32), -1e7, Some(1e7)),
    p(33, "TmpCab", Int16, "temperature_cabinet", "°C", KG, Some(37), -60.0, Some(150.0)),
    p(38, "St", Enum16, "operating_state", "", KG, None, 1.0, Some(8.0)),
];

/// Inverter models 111, 112, 113: float32 points; body length 60.
#[rustfmt::skip]
pub const INVERTER_FLOAT: &[PointDef] = &[
    p(2, "A", Float32, "current", "A", KC, None, 0.0, Some(2000.0)),
    p(4, "AphA", Float32, "current_l1", "A", KC, None, 0.0, Some(2000.0)),
    p(6, "AphB", Float32, "current_l2", "A", KC, None, 0.0, Some(2000.0)),
    p(8, "AphC", Float32, "current_l3", "A", KC, None, 0.0, Some(2000.0)),
    p(16, "PhVphA", Float32, "voltage_l1", "V", KV, None, 0.0, Some(1000.0)),
    p(18, "PhVphB", Float32, "voltage_l2", "V", KV, None, 0.0, Some(1000.0)),
    p(20, "PhVphC", Float32, "voltage_l3", "V", KV, None, 0.0, Some(1000.0)),
    p(22, "W", Float32, "power", "W", KP, None, -1e7, Some(1e7)),
    p(24, "Hz", Float32, "frequency", "Hz", KF, None, 40.0, Some(70.0)),
    p(26, "VA", Float32, "apparent_power", "VA", KG, None, -1e7, Some(1e7)),
    p(28, "VAr", Float32, "reactive_power", "var", KG, None, -1e7, Some(1e7)),
    p(30, "PF", Float32, "power_factor", "%", KPF, None, -100.0, Some(100.0)),
    p(32, "WH", Float32, "energy_total", "Wh", KE, None, 0.0, None),
    p(34, "DCA", Float32, "dc_current", "A", KC, None, 0.0, Some(2000.0)),
    p(36, "DCV", Float32, "dc_voltage", "V", KV, None, 0.0, Some(2000.0)),
    p(38, "DCW", Float32, "dc_power", "W", KP, None, -1e7, Some(1e7)),
    p(40, "TmpCab", Float32, "temperature_cabinet", "°C", KG, None, -60.0, Some(150.0)),
    p(48, "St", Enum16, "operating_state", "", KG, None, 1.0, Some(8.0)),
];

/// Meter models 201 (single phase), 202 (split phase), 203 (wye), 204 (delta):
/// integer points with scale factors; body length 105.
#[rustfmt::skip]
pub const METER: &[PointDef] = &[
    p(2, "A", Int16, "current", "A", KC, Some(6), -2000.0, Some(2000.0)),
    p(3, "AphA", Int16, "current_l1", "A", KC, Some(6), -2000.0, Some(2000.0)),
    p(4, "AphB", Int16, "current_l2", "A", KC, Some(6), -2000.0, Some(2000.0)),
    p(5, "AphC", Int16, "current_l3", "A", KC, Some(6), -2000.0, Some(2000.0)),
    p(8, "PhVphA", Int16, "voltage_l1", "V", KV, Some(15), 0.0, Some(1000.0)),
    p(9, "PhVphB", Int16, "voltage_l2", "V", KV, Some(15), 0.0, Some(1000.0)),
    p(10, "PhVphC", Int16, "voltage_l3", "V", KV, Some(15), 0.0, Some(1000.0)),
    p(16, "Hz", Int16, "frequency", "Hz", KF, Some(17), 40.0, Some(70.0)),
    p(18, "W", Int16, "power", "W", KP, Some(22), -1e7, Some(1e7)),
    p(19, "WphA", Int16, "power_l1", "W", KP, Some(22), -1e7, Some(1e7)),
    p(20, "WphB", Int16, "power_l2", "W", KP, Some(22), -1e7, Some(1e7)),
    p(21, "WphC", Int16, "power_l3", "W", KP, Some(22), -1e7, Some(1e7)),
    p(23, "VA", Int16, "apparent_power", "VA", KG, Some(27), -1e7, Some(1e7)),
    p(28, "VAR", Int16, "reactive_power", "var", KG, Some(32), -1e7, Some(1e7)),
    p(33, "PF", Int16, "power_factor", "%", KPF, Some(37), -100.0, Some(100.0)),
    p(38, "TotWhExp", Acc32, "energy_export", "Wh", KE, Some(54), 0.0, None),
    p(46, "TotWhImp", Acc32, "energy_import", "Wh", KE, Some(54), 0.0, None),
];

/// Storage model 124 (basic storage controls); body length 24.
#[rustfmt::skip]
pub const STORAGE: &[PointDef] = &[
    p(2, "WChaMax", Uint16, "battery_max_charge_power", "W", KG, Some(18), 0.0, Some(1e7)),
    p(8, "ChaState", Uint16, "state_of_charge", "%", KG, Some(22), 0.0, Some(100.0)),
    p(9, "StorAval", Uint16, "battery_available", "Ah", KG, Some(23), 0.0, Some(1e6)),
    p(10, "InBatV", Uint16, "battery_voltage", "V", KG, Some(24), 0.0, Some(2000.0)),
    p(11, "ChaSt", Enum16, "charge_state", "", KG, None, 1.0, Some(7.0)),
];

/// The table and the minimum body length of a model this agent maps.
pub fn table_of(model: u16) -> Option<(&'static [PointDef], u16)> {
    match model {
        101..=103 => Some((INVERTER_INT, 50)),
        111..=113 => Some((INVERTER_FLOAT, 60)),
        201..=204 => Some((METER, 105)),
        124 => Some((STORAGE, 24)),
        _ => None,
    }
}

/// The quantity a point gives on a model: single-phase models name their one
/// voltage `voltage` and have no per-phase current, as single-phase profiles do.
fn quantity(model: u16, def: &PointDef) -> Option<&'static str> {
    let single = matches!(model, 101 | 111 | 201);
    match def.name {
        "voltage_l1" if single => Some("voltage"),
        "voltage_l2" | "voltage_l3" | "current_l1" | "current_l2" | "current_l3" | "power_l1"
        | "power_l2" | "power_l3"
            if single =>
        {
            None
        }
        n => Some(n),
    }
}

/// One mapped point of a discovered device.
#[derive(Debug, Clone)]
pub struct Point {
    pub reg: RegisterConfig,
    pub ty: PointType,
    /// Index of the scale factor's register in [`DevicePlan::registers`].
    pub sf: Option<usize>,
}

/// A model `ID` register checked on every poll.
#[derive(Debug, Clone)]
pub struct Check {
    pub register: usize,
    pub id: u16,
}

/// What a discovered device is read with.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub chain: Chain,
    pub points: Vec<Point>,
    /// Every register read: the points, then scale factors, then model ids.
    pub registers: Vec<RegisterConfig>,
    pub checks: Vec<Check>,
    pub blocks: Vec<Block>,
}

fn holding(name: String, address: u16, data_type: DataType) -> RegisterConfig {
    RegisterConfig {
        name,
        address,
        table: RegisterTable::Holding,
        data_type,
        word_order: WordOrder::HighFirst,
        scale: 1.0,
        unit: String::new(),
        kind: Kind::Gauge,
        min: None,
        max: None,
    }
}

/// Maps the models of a chain onto points and plans their reads. The first model
/// of a kind gives the plain quantity names; a later one whose name is taken gets
/// `_m{id}` appended (an inverter with a built-in meter: `power` and `power_m203`).
pub fn plan_device(chain: Chain, max_per_read: u16) -> Result<DevicePlan, PlanError> {
    let mut points: Vec<Point> = Vec::new();
    let mut sf_regs: Vec<RegisterConfig> = Vec::new();
    let mut checks: Vec<RegisterConfig> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for model in &chain.models {
        let Some((table, min_len)) = table_of(model.id) else {
            continue;
        };
        if model.length < min_len {
            continue;
        }
        checks.push(holding(
            format!("model {} id", model.id),
            model.address,
            DataType::U16,
        ));
        for def in table {
            let Some(base_name) = quantity(model.id, def) else {
                continue;
            };
            let name = if names.contains(base_name) {
                format!("{base_name}_m{}", model.id)
            } else {
                base_name.to_string()
            };
            if !names.insert(name.clone()) {
                continue;
            }
            // The body fits below 65536 (the walk checked), so these cannot overflow.
            let address = model.address + def.offset;
            let sf = def.sf.map(|off| {
                let at = model.address + off;
                match sf_regs.iter().position(|r| r.address == at) {
                    Some(i) => i,
                    None => {
                        sf_regs.push(holding(format!("{} sf", def.point), at, DataType::I16));
                        sf_regs.len() - 1
                    }
                }
            });
            points.push(Point {
                reg: RegisterConfig {
                    name,
                    address,
                    table: RegisterTable::Holding,
                    data_type: def.ty.data_type(),
                    word_order: WordOrder::HighFirst,
                    scale: 1.0,
                    unit: def.unit.to_string(),
                    kind: def.kind,
                    min: Some(def.min),
                    max: def.max,
                },
                ty: def.ty,
                sf,
            });
        }
    }
    let n_points = points.len();
    let n_sf = sf_regs.len();
    for p in &mut points {
        p.sf = p.sf.map(|i| n_points + i);
    }
    let mut registers: Vec<RegisterConfig> = points.iter().map(|p| p.reg.clone()).collect();
    registers.extend(sf_regs);
    let checks: Vec<Check> = checks
        .into_iter()
        .enumerate()
        .map(|(i, reg)| {
            let id = chain
                .models
                .iter()
                .find(|m| m.address == reg.address)
                .map_or(0, |m| m.id);
            registers.push(reg);
            Check {
                register: n_points + n_sf + i,
                id,
            }
        })
        .collect();
    let blocks = plan(&registers, max_per_read)?;
    Ok(DevicePlan {
        chain,
        points,
        registers,
        checks,
        blocks,
    })
}

/// A poll's reply did not match the discovered chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainChanged {
    pub address: u16,
    pub expected: u16,
    pub found: Option<u16>,
}

impl fmt::Display for ChainChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found {
            Some(found) => write!(
                f,
                "SunSpec model at {} is now {found}, was {}: rediscovering",
                self.address, self.expected
            ),
            None => write!(
                f,
                "SunSpec model {} at {} was not read: rediscovering",
                self.expected, self.address
            ),
        }
    }
}

/// Decodes one poll: `replies[i]` holds the words of `plan.blocks[i]`.
pub fn decode_poll(plan: &DevicePlan, replies: &[Vec<u16>]) -> Result<Vec<Value>, ChainChanged> {
    let mut at: Vec<Option<&[u16]>> = vec![None; plan.registers.len()];
    for (block, words) in plan.blocks.iter().zip(replies) {
        for &i in &block.registers {
            let Some(reg) = plan.registers.get(i) else {
                continue;
            };
            let from = block.offset_of(reg).min(words.len());
            let to = (from + usize::from(reg.data_type.words())).min(words.len());
            at[i] = Some(&words[from..to]);
        }
    }
    for check in &plan.checks {
        let found = at
            .get(check.register)
            .copied()
            .flatten()
            .and_then(|w| w.first().copied());
        if found != Some(check.id) {
            return Err(ChainChanged {
                address: plan.registers.get(check.register).map_or(0, |r| r.address),
                expected: check.id,
                found,
            });
        }
    }
    let values = plan
        .points
        .iter()
        .enumerate()
        .map(|(i, point)| {
            let words = at.get(i).copied().flatten().unwrap_or(&[]);
            let sf_word = point.sf.map(|s| {
                at.get(s)
                    .copied()
                    .flatten()
                    .and_then(|w| w.first().copied())
            });
            let (value, invalid) = match point_value(point, words, sf_word) {
                Ok(v) => (Some(v), None),
                Err(why) => (None, Some(why)),
            };
            Value {
                quantity: point.reg.name.clone(),
                unit: point.reg.unit.clone(),
                kind: point.reg.kind,
                value,
                invalid,
                source: match point.ty {
                    PointType::Float32 => Source::F32,
                    _ => Source::Int,
                },
            }
        })
        .collect();
    Ok(values)
}

/// The number of one point, or why there is none. `sf_word`: `None` for a point
/// without a scale factor, `Some(None)` when its register was not read.
pub fn point_value(
    point: &Point,
    words: &[u16],
    sf_word: Option<Option<u16>>,
) -> Result<f64, Invalid> {
    let needed = usize::from(point.reg.data_type.words());
    if words.len() < needed || point.ty.not_implemented(words) {
        return Err(Invalid::NotImplemented);
    }
    let scale = match sf_word {
        None => 1.0,
        Some(None) | Some(Some(SF_NOT_IMPLEMENTED)) => return Err(Invalid::NotImplemented),
        Some(Some(w)) => {
            let sf = w as i16;
            if !(-10..=10).contains(&sf) {
                return Err(Invalid::OutOfRange);
            }
            10f64.powi(i32::from(sf))
        }
    };
    let raw = super::decode::decode_raw(point.reg.data_type, WordOrder::HighFirst, words)
        .map_err(|_| Invalid::NotImplemented)?;
    if raw.is_nan() {
        return Err(Invalid::Nan);
    }
    let v = apply_scale(raw, scale);
    if v.is_nan() {
        return Err(Invalid::Nan);
    }
    if v.is_infinite() {
        return Err(Invalid::Infinite);
    }
    let r = &point.reg;
    if r.min.is_some_and(|lo| v < lo) || r.max.is_some_and(|hi| v > hi) {
        return Err(Invalid::OutOfRange);
    }
    Ok(v)
}

/// `id (length)` for each model, as `scan` prints them.
pub fn describe_models(models: &[ModelHeader]) -> String {
    models
        .iter()
        .map(|m| format!("{} ({})", m.id, m.length))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register image: holding registers from 0, reads beyond it are exceptions.
    struct Image {
        words: Vec<u16>,
        reads: usize,
    }

    impl Registers for Image {
        type Error = String;
        async fn read(&mut self, start: u16, count: u16) -> Result<Option<Vec<u16>>, String> {
            self.reads += 1;
            if self.reads > 1000 {
                return Err("too many reads".into());
            }
            let (s, e) = (usize::from(start), usize::from(start) + usize::from(count));
            Ok(self.words.get(s..e).map(<[u16]>::to_vec))
        }
    }

    fn image_at(base: u16, chain: &[u16]) -> Image {
        let mut words = vec![0u16; usize::from(base)];
        words.extend_from_slice(&MARKER);
        words.extend_from_slice(chain);
        Image { words, reads: 0 }
    }

    fn model(id: u16, body: &[u16]) -> Vec<u16> {
        let mut m = vec![id, body.len() as u16];
        m.extend_from_slice(body);
        m
    }

    fn common() -> Vec<u16> {
        let mut body = vec![0u16; 66];
        let put = |body: &mut Vec<u16>, at: usize, s: &str| {
            for (i, c) in s.as_bytes().chunks(2).enumerate() {
                body[at + i] = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            }
        };
        put(&mut body, 0, "Acme Solar");
        put(&mut body, 16, "PV-5000");
        put(&mut body, 40, "1.2.3");
        put(&mut body, 48, "SN123");
        model(1, &body)
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn finds_the_marker_walks_the_chain_and_reads_the_identity() {
        for base in BASES {
            let mut chain = common();
            chain.extend(model(103, &[0; 50]));
            chain.extend(model(64_001, &[7; 9])); // a vendor model: skipped by length
            chain.extend(model(203, &[0; 105]));
            chain.extend([END_MODEL, 0]);
            let mut img = image_at(base, &chain);
            let c = run(discover(&mut img, 10)).expect("discovers");
            assert_eq!(c.base, base);
            let ids: Vec<(u16, u16)> = c.models.iter().map(|m| (m.id, m.length)).collect();
            assert_eq!(ids, vec![(1, 66), (103, 50), (64_001, 9), (203, 105)]);
            assert_eq!(c.models[1].address, base + 2 + 68);
            assert_eq!(c.models[3].address, base + 2 + 68 + 52 + 11);
            assert_eq!(
                c.identity,
                Identity {
                    manufacturer: "Acme Solar".into(),
                    model: "PV-5000".into(),
                    version: "1.2.3".into(),
                    serial: "SN123".into(),
                }
            );
            assert_eq!(
                describe_models(&c.models),
                "1 (66), 103 (50), 64001 (9), 203 (105)"
            );
        }
    }

    #[test]
    fn a_bad_marker_is_no_sunspec_device() {
        let mut img = image_at(40000, &common());
        img.words[40001] = 0x6E54;
        assert_eq!(run(discover(&mut img, 125)), Err(DiscoveryError::NoMarker));
        // Exceptions everywhere: no marker either, after the three bases.
        let mut empty = Image {
            words: Vec::new(),
            reads: 0,
        };
        assert_eq!(
            run(discover(&mut empty, 125)),
            Err(DiscoveryError::NoMarker)
        );
        assert_eq!(empty.reads, 3);
    }

    #[test]
    fn the_chain_must_start_with_the_common_model() {
        let mut chain = model(103, &[0; 50]);
        chain.extend([END_MODEL, 0]);
        let mut img = image_at(40000, &chain);
        assert_eq!(
            run(discover(&mut img, 125)),
            Err(DiscoveryError::NoCommonModel { found: 103 })
        );
    }

    #[test]
    fn a_missing_end_marker_ends_at_the_image_end() {
        let mut chain = common();
        chain.extend(model(120, &[0; 26]));
        let mut img = image_at(40000, &chain);
        let c = run(discover(&mut img, 125)).expect("discovers");
        assert_eq!(c.models.len(), 2);
    }

    #[test]
    fn walks_are_bounded() {
        // Zero-length models forever: stops after MAX_MODELS.
        let mut chain = common();
        for _ in 0..200 {
            chain.extend(model(64_000, &[]));
        }
        let mut img = image_at(40000, &chain);
        assert_eq!(run(discover(&mut img, 125)), Err(DiscoveryError::TooLong));
        assert!(img.reads < MAX_MODELS + 10, "{} reads", img.reads);
        // A length that runs past the address space: an error, not a wrap-around
        // to register 0 (which would loop).
        let mut chain = common();
        chain.extend([203, 0xFFF0]);
        let mut img = image_at(40000, &chain);
        assert!(matches!(
            run(discover(&mut img, 125)),
            Err(DiscoveryError::Overrun { id: 203, .. })
        ));
    }

    #[test]
    fn read_errors_are_passed_on() {
        struct Dead;
        impl Registers for Dead {
            type Error = String;
            async fn read(&mut self, _: u16, _: u16) -> Result<Option<Vec<u16>>, String> {
                Err("timeout".into())
            }
        }
        assert_eq!(
            run(discover(&mut Dead, 125)),
            Err(DiscoveryError::Read("timeout".into()))
        );
    }

    fn point(ty: PointType, sf: bool) -> Point {
        Point {
            reg: holding("x".into(), 0, ty.data_type()),
            ty,
            sf: sf.then_some(1),
        }
    }

    #[test]
    fn sentinels_are_missing_and_scale_factors_apply() {
        let ni = Err(Invalid::NotImplemented);
        assert_eq!(
            point_value(&point(Int16, true), &[0x8000], Some(Some(0))),
            ni
        );
        assert_eq!(
            point_value(&point(Uint16, true), &[0xFFFF], Some(Some(0))),
            ni
        );
        assert_eq!(point_value(&point(Enum16, false), &[0xFFFF], None), ni);
        assert_eq!(point_value(&point(Acc32, true), &[0, 0], Some(Some(0))), ni);
        assert_eq!(
            point_value(
                &point(PointType::Uint32, true),
                &[0xFFFF, 0xFFFF],
                Some(Some(0))
            ),
            ni
        );
        // A scale factor that is not implemented makes its points missing.
        assert_eq!(
            point_value(&point(Uint16, true), &[2301], Some(Some(0x8000))),
            ni
        );
        let nan = f32::NAN.to_bits();
        assert_eq!(
            point_value(
                &point(Float32, false),
                &[(nan >> 16) as u16, nan as u16],
                None
            ),
            ni
        );
        assert_eq!(
            point_value(&point(Float32, false), &[0x7F80, 0], None),
            Err(Invalid::Infinite)
        );
        // Negative and positive scale factors.
        assert_eq!(
            point_value(&point(Uint16, true), &[2301], Some(Some((-1i16) as u16))),
            Ok(230.1)
        );
        assert_eq!(
            point_value(
                &point(Int16, true),
                &[(-523i16) as u16],
                Some(Some((-2i16) as u16))
            ),
            Ok(-5.23)
        );
        assert_eq!(
            point_value(&point(Acc32, true), &[0x0001, 0x0000], Some(Some(2))),
            Ok(6_553_600.0)
        );
        // Outside the specification's -10..=10.
        assert_eq!(
            point_value(&point(Uint16, true), &[1], Some(Some(11))),
            Err(Invalid::OutOfRange)
        );
        // A value that is a number next to a sentinel is still a number.
        assert_eq!(
            point_value(&point(Int16, true), &[0x7FFF], Some(Some(0))),
            Ok(32767.0)
        );
    }

    #[test]
    fn plans_cover_points_scale_factors_and_model_ids() {
        let chain = Chain {
            base: 40000,
            models: vec![
                ModelHeader {
                    id: 1,
                    address: 40002,
                    length: 66,
                },
                ModelHeader {
                    id: 103,
                    address: 40070,
                    length: 50,
                },
                ModelHeader {
                    id: 203,
                    address: 40122,
                    length: 105,
                },
                ModelHeader {
                    id: 111,
                    address: 40229,
                    length: 40,
                }, // too short: skipped
            ],
            identity: Identity::default(),
        };
        let plan = plan_device(chain, 40).expect("plans");
        let names: Vec<&str> = plan.points.iter().map(|p| p.reg.name.as_str()).collect();
        assert!(
            names.contains(&"power") && names.contains(&"power_m203"),
            "{names:?}"
        );
        assert!(names.contains(&"energy_total") && names.contains(&"energy_import"));
        assert!(names.contains(&"power_l1"), "no clash: plain name");
        assert_eq!(plan.checks.len(), 2);
        assert!(plan.blocks.iter().all(|b| b.count <= 40));
        let covered: usize = plan.blocks.iter().map(|b| b.registers.len()).sum();
        assert_eq!(covered, plan.registers.len());
        let w = plan
            .points
            .iter()
            .find(|p| p.reg.name == "power")
            .expect("W");
        assert_eq!(w.reg.address, 40070 + 14);
        assert_eq!(plan.registers[w.sf.expect("W_SF")].address, 40070 + 15);
        // Single-phase models name their voltage `voltage`.
        let chain = Chain {
            base: 0,
            models: vec![ModelHeader {
                id: 101,
                address: 2,
                length: 50,
            }],
            identity: Identity::default(),
        };
        let plan = plan_device(chain, 125).expect("plans");
        let names: Vec<&str> = plan.points.iter().map(|p| p.reg.name.as_str()).collect();
        assert!(
            names.contains(&"voltage") && !names.contains(&"voltage_l2"),
            "{names:?}"
        );
    }

    /// Facts typed from the model definitions (sunspec/models `json/model_N.json`),
    /// independent of the tables: point, offset from `ID`, type, unit, scale factor's
    /// offset.
    #[test]
    fn tables_match_the_model_definitions() {
        type Fact = (u16, &'static str, u16, PointType, &'static str, Option<u16>);
        #[rustfmt::skip]
        let facts: &[Fact] = &[
            (103, "A", 2, Uint16, "A", Some(6)),
            (103, "PhVphA", 10, Uint16, "V", Some(13)),
            (103, "W", 14, Int16, "W", Some(15)),
            (103, "Hz", 16, Uint16, "Hz", Some(17)),
            (103, "PF", 22, Int16, "%", Some(23)),
            (103, "WH", 24, Acc32, "Wh", Some(26)),
            (103, "DCW", 31, Int16, "W", Some(32)),
            (103, "TmpCab", 33, Int16, "°C", Some(37)),
            (103, "St", 38, Enum16, "", None),
            (113, "PhVphC", 20, Float32, "V", None),
            (113, "W", 22, Float32, "W", None),
            (113, "WH", 32, Float32, "Wh", None),
            (113, "St", 48, Enum16, "", None),
            (203, "AphC", 5, Int16, "A", Some(6)),
            (203, "PhVphA", 8, Int16, "V", Some(15)),
            (203, "Hz", 16, Int16, "Hz", Some(17)),
            (203, "W", 18, Int16, "W", Some(22)),
            (203, "VAR", 28, Int16, "var", Some(32)),
            (203, "PF", 33, Int16, "%", Some(37)),
            (203, "TotWhExp", 38, Acc32, "Wh", Some(54)),
            (203, "TotWhImp", 46, Acc32, "Wh", Some(54)),
            (124, "WChaMax", 2, Uint16, "W", Some(18)),
            (124, "ChaState", 8, Uint16, "%", Some(22)),
            (124, "InBatV", 10, Uint16, "V", Some(24)),
            (124, "ChaSt", 11, Enum16, "", None),
        ];
        for &(model, point, offset, ty, unit, sf) in facts {
            let (table, _) = table_of(model).expect("mapped model");
            let def = table
                .iter()
                .find(|d| d.point == point)
                .unwrap_or_else(|| panic!("{model}.{point}"));
            assert_eq!(
                (def.offset, def.ty, def.unit, def.sf),
                (offset, ty, unit, sf),
                "{model}.{point}"
            );
        }
        // Body lengths: 10x 50, 11x 60, 20x 105, 124 24; every point inside.
        for (model, length) in [(101, 50), (111, 60), (201, 105), (124, 24)] {
            let (table, min) = table_of(model).expect("mapped");
            assert_eq!(min, length);
            for d in table {
                let end = d.offset + d.ty.data_type().words();
                assert!(end <= length + 2, "{model}.{}", d.point);
                assert!(d.sf.map_or(true, |s| s < length + 2), "{model}.{}", d.point);
            }
        }
    }

    #[test]
    fn a_changed_model_id_asks_for_rediscovery() {
        let chain = Chain {
            base: 0,
            models: vec![ModelHeader {
                id: 124,
                address: 2,
                length: 24,
            }],
            identity: Identity::default(),
        };
        let plan = plan_device(chain, 125).expect("plans");
        assert_eq!(plan.blocks.len(), 1);
        let b = &plan.blocks[0];
        let mut words = vec![0u16; usize::from(b.count)];
        words[usize::from(2 - b.start)] = 124;
        assert!(decode_poll(&plan, &[words.clone()]).is_ok());
        words[usize::from(2 - b.start)] = 125;
        assert_eq!(
            decode_poll(&plan, &[words]),
            Err(ChainChanged {
                address: 2,
                expected: 124,
                found: Some(125)
            })
        );
    }
}
