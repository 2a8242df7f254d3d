//! DSMR P1 port: the meter pushes a telegram every second (DSMR 5) or ten seconds
//! (DSMR 2.2 to 4) on a serial line; nothing is polled.
//!
//! A telegram is ASCII text framed `/` … `!`, followed by a CRC16 (DSMR 4 and later)
//! and CR LF:
//!
//! ```text
//! /ISk5\2MT382-1000
//!
//! 0-0:1.0.0(101209113020W)
//! 1-0:1.8.1(123456.789*kWh)
//! ...
//! !EF2F
//! ```
//!
//! - [`Framer`] cuts the byte stream into telegrams: bytes before a `/` are skipped,
//!   a telegram is at most [`MAX_TELEGRAM`] bytes, a `/` at the start of a line
//!   inside a telegram starts the next one (the cut one is a framing error), and the
//!   CRC is checked: CRC-16/ARC (polynomial 0x8005 reflected, initial value 0, no
//!   final XOR) over every byte from `/` through `!`, sent as 4 hex digits.
//! - [`parse`] reads the objects the agent stores (see [`OBJECTS`] and the M-Bus
//!   channels) and ignores the others. A malformed line of a stored object fails
//!   the whole telegram: no partial readings.
//! - [`Emitter`] turns telegrams into [`Reading`]s: one per `interval` of the meter
//!   (timestamped with the meter's clock), plus one reading per new timestamp of a
//!   value that the telegram stamps with its own time (the gas meter's last reading,
//!   the month's maximum demand).
//! - [`run_p1`] is the bus task: it reads the port continuously and counts in the
//!   meter's [`MeterStats`]: a telegram that passed as a success, a bad or missing
//!   CRC as a transport error, a framing or parse error as a decode error, and
//!   silence (no good telegram for three telegram periods) as a timeout.
//!
//! Sources: P1 Companion Standard, Dutch Smart Meter Requirements 5.0.2 (Netbeheer
//! Nederland, 2016-02-26): telegram format, CRC, objects and the example telegram of
//! its §6.12; P1 Companion Standard 2.2 (2008-04-18) for the 9600 7E1 telegrams
//! without CRC and the two-line gas object 0-n:24.3.0; e-MUCS P1 V1.4 (Fluvius,
//! Belgium, 2020-04-01) for 1-0:1.4.0 (current average demand), 1-0:1.6.0 (maximum
//! demand of the running month, with its time) and the gas meter on 0-n:24.2.3.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crc::{Crc, CRC_16_ARC};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::bus::MeterPlan;
use super::profile::Profile;
use super::serial::{self, LineSettings};
use super::stats::{FailureKind, MeterState, MeterStats};
use crate::acquire::config::AcquireSections;
use crate::acquire::config::{
    BusConfig, DataType, MeterConfig, Parity, RegisterConfig, RegisterTable, WordOrder,
};
use crate::config::units::ConfigError;
use crate::model::{now_ms, Kind, Reading, Source, Value};

/// The DSMR version of a P1 port (`dsmr` of a p1 bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Dsmr {
    /// 9600 baud 7E1, no CRC, a telegram every 10 s.
    #[serde(rename = "2.2")]
    V2_2,
    /// As 2.2.
    #[serde(rename = "3")]
    V3,
    /// 115200 baud 8N1, CRC, a telegram every 10 s.
    #[serde(rename = "4")]
    V4,
    /// 115200 baud 8N1, CRC, a telegram every second (also Belgium's e-MUCS).
    #[default]
    #[serde(rename = "5")]
    V5,
}

impl Dsmr {
    /// The serial settings the version prescribes.
    pub fn line(self) -> LineSettings {
        match self {
            Dsmr::V2_2 | Dsmr::V3 => LineSettings {
                baud_rate: 9600,
                parity: Parity::Even,
                data_bits: 7,
                stop_bits: 1,
            },
            Dsmr::V4 | Dsmr::V5 => LineSettings {
                baud_rate: 115_200,
                parity: Parity::None,
                data_bits: 8,
                stop_bits: 1,
            },
        }
    }

    /// Whether telegrams carry a CRC that must match (DSMR 4 and later).
    pub fn checks_crc(self) -> bool {
        matches!(self, Dsmr::V4 | Dsmr::V5)
    }

    /// How often the meter sends a telegram.
    pub fn period(self) -> Duration {
        match self {
            Dsmr::V5 => Duration::from_secs(1),
            _ => Duration::from_secs(10),
        }
    }
}

/// Longest telegram accepted, bytes. A DSMR 5 telegram with every object and a full
/// text message (1024 characters, sent as 2048 hex digits) stays under 4 KiB, an
/// e-MUCS one with its 13 months of maximum demand under 3 KiB; twice that leaves
/// room for meters that send more, and bounds what a babbling line can make us hold.
pub const MAX_TELEGRAM: usize = 8 * 1024;

/// Longest trailer after `!` (4 hex digits, CR, LF, and slack for stray spaces).
const MAX_TRAILER: usize = 8;

/// Telegram periods without a good telegram before a timeout is counted.
pub const SILENT_PERIODS: u32 = 3;

/// Largest difference between the meter's clock and ours that is trusted: beyond
/// it, readings are stamped when they were received (and logged).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// How far a value's own time may be ahead of the telegram's (clocks differ a little).
const STAMPED_AHEAD_MS: i64 = 3_600_000;
/// How far it may be behind: a month's maximum is at most a month old, a gas
/// reading at most hours; a year allows for meters that report less often.
const STAMPED_BEHIND_MS: i64 = 400 * 86_400_000;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_ARC);

/// CRC-16/ARC of `bytes`: the P1 telegram checksum.
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC16.checksum(bytes)
}

/// What the framer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete telegram, `/` through `!`, whose CRC matched (or that has none
    /// where none is required).
    Telegram(Vec<u8>),
    /// The CRC sent does not match the bytes received.
    BadCrc { sent: u16, computed: u16 },
    /// A telegram without CRC where the DSMR version requires one.
    NoCrc,
    /// Not a telegram.
    Framing(FramingError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// Longer than [`MAX_TELEGRAM`] without its `!`.
    TooLong,
    /// A new telegram began before this one ended.
    Cut,
    /// After `!` came something other than a CRC and the line end.
    BadTrailer,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FramingError::TooLong => "telegram longer than the limit without its end `!`",
            FramingError::Cut => "telegram cut off by the start of the next one",
            FramingError::BadTrailer => "no CRC and line end after `!`",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    /// Skipping bytes until a `/`.
    Hunt,
    /// Inside a telegram.
    Body,
    /// After the `!` at this offset + 1: the CRC and line end.
    Trailer(usize),
}

/// Cuts a byte stream into telegrams, one byte at a time.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    state: FrameState,
    check_crc: bool,
    max: usize,
    skipped: u64,
}

impl Framer {
    pub fn new(check_crc: bool, max: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            state: FrameState::Hunt,
            check_crc,
            max: max.max(2),
            skipped: 0,
        }
    }

    /// Whether a telegram has begun and not ended.
    pub fn in_telegram(&self) -> bool {
        self.state != FrameState::Hunt
    }

    /// Bytes skipped outside telegrams so far (noise, a telegram's tail after a
    /// restart).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    fn start(&mut self) {
        self.buf.clear();
        self.buf.push(b'/');
        self.state = FrameState::Body;
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.state = FrameState::Hunt;
    }

    /// Takes one byte; returns what it completed, if anything.
    pub fn push(&mut self, byte: u8) -> Option<Frame> {
        match self.state {
            FrameState::Hunt => {
                if byte == b'/' {
                    self.start();
                } else {
                    self.skipped += 1;
                }
                None
            }
            FrameState::Body => {
                if byte == b'/' {
                    // Still in the identification line: what came before was noise
                    // that happened to hold a `/`. At a line start: a new telegram.
                    let in_header = !self.buf.contains(&b'\n');
                    if in_header {
                        self.skipped += self.buf.len() as u64;
                        self.start();
                        return None;
                    }
                    if self.buf.last() == Some(&b'\n') {
                        self.start();
                        return Some(Frame::Framing(FramingError::Cut));
                    }
                }
                if self.buf.len() >= self.max {
                    self.reset();
                    return Some(Frame::Framing(FramingError::TooLong));
                }
                self.buf.push(byte);
                if byte == b'!' {
                    self.state = FrameState::Trailer(self.buf.len());
                }
                None
            }
            FrameState::Trailer(end) => {
                if byte == b'\n' {
                    let frame = self.finish(end);
                    self.reset();
                    return Some(frame);
                }
                if byte == b'/' {
                    self.start();
                    return Some(Frame::Framing(FramingError::BadTrailer));
                }
                if self.buf.len() - end >= MAX_TRAILER {
                    self.reset();
                    return Some(Frame::Framing(FramingError::BadTrailer));
                }
                self.buf.push(byte);
                None
            }
        }
    }

    fn finish(&mut self, end: usize) -> Frame {
        let trailer: Vec<u8> = self
            .buf
            .get(end..)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'\r' | b' ' | b'\t'))
            .collect();
        let mut body = std::mem::take(&mut self.buf);
        body.truncate(end);
        if trailer.is_empty() {
            return if self.check_crc {
                Frame::NoCrc
            } else {
                Frame::Telegram(body)
            };
        }
        let sent = std::str::from_utf8(&trailer)
            .ok()
            .filter(|t| t.len() == 4 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|t| u16::from_str_radix(t, 16).ok());
        match sent {
            // A CRC is checked wherever one is sent, required or not.
            Some(sent) => {
                let computed = crc16(&body);
                if sent == computed {
                    Frame::Telegram(body)
                } else {
                    Frame::BadCrc { sent, computed }
                }
            }
            None => Frame::Framing(FramingError::BadTrailer),
        }
    }
}

/// A DSMR object the agent stores: OBIS code, quantity, kind and accepted units.
#[derive(Debug, Clone, Copy)]
pub struct Object {
    pub obis: &'static str,
    pub quantity: &'static str,
    pub kind: Kind,
    pub units: &'static [&'static str],
    /// The value comes with its own timestamp: `(YYMMDDhhmmssX)(value*unit)`.
    pub stamped: bool,
}

const ENERGY: &[&str] = &["kWh", "Wh"];
const POWER: &[&str] = &["kW", "W"];

const fn obj(
    obis: &'static str,
    quantity: &'static str,
    kind: Kind,
    units: &'static [&'static str],
) -> Object {
    Object {
        obis,
        quantity,
        kind,
        units,
        stamped: false,
    }
}

/// The electricity objects stored, with the quantity each becomes (DSMR 5.0.2
/// §6.12; 1-0:1.4.0 and 1-0:1.6.0 from e-MUCS P1 V1.4).
pub const OBJECTS: &[Object] = &[
    obj("1-0:1.8.1", "energy_import_t1", Kind::EnergyTotal, ENERGY),
    obj("1-0:1.8.2", "energy_import_t2", Kind::EnergyTotal, ENERGY),
    obj("1-0:2.8.1", "energy_export_t1", Kind::EnergyTotal, ENERGY),
    obj("1-0:2.8.2", "energy_export_t2", Kind::EnergyTotal, ENERGY),
    obj("1-0:1.7.0", "power_import", Kind::Power, POWER),
    obj("1-0:2.7.0", "power_export", Kind::Power, POWER),
    obj("1-0:21.7.0", "power_import_l1", Kind::Power, POWER),
    obj("1-0:41.7.0", "power_import_l2", Kind::Power, POWER),
    obj("1-0:61.7.0", "power_import_l3", Kind::Power, POWER),
    obj("1-0:22.7.0", "power_export_l1", Kind::Power, POWER),
    obj("1-0:42.7.0", "power_export_l2", Kind::Power, POWER),
    obj("1-0:62.7.0", "power_export_l3", Kind::Power, POWER),
    obj("1-0:32.7.0", "voltage_l1", Kind::Voltage, &["V"]),
    obj("1-0:52.7.0", "voltage_l2", Kind::Voltage, &["V"]),
    obj("1-0:72.7.0", "voltage_l3", Kind::Voltage, &["V"]),
    obj("1-0:31.7.0", "current_l1", Kind::Current, &["A"]),
    obj("1-0:51.7.0", "current_l2", Kind::Current, &["A"]),
    obj("1-0:71.7.0", "current_l3", Kind::Current, &["A"]),
    obj("1-0:1.4.0", "demand_avg", Kind::Power, POWER),
    Object {
        obis: "1-0:1.6.0",
        quantity: "demand_max_month",
        kind: Kind::Power,
        units: POWER,
        stamped: true,
    },
];

/// The tariff indicator (0-0:96.14.0): `1` or `2`, no unit.
pub const TARIFF: &str = "tariff";

/// Units of an M-Bus meter reading (gas and water in m3, heat in GJ).
const MBUS_UNITS: &[&str] = &["m3", "GJ", "kWh", "MWh"];

/// The quantities a P1 meter can have, for the status page and Home Assistant
/// discovery: the electricity objects, the tariff, and the gas meter.
pub fn profile() -> Profile {
    let register = |name: &str, unit: &str, kind: Kind| RegisterConfig {
        name: name.to_string(),
        address: 0,
        table: RegisterTable::Input,
        data_type: DataType::F64,
        word_order: WordOrder::HighFirst,
        scale: 1.0,
        unit: unit.to_string(),
        kind,
        min: None,
        max: None,
    };
    let mut registers: Vec<RegisterConfig> = OBJECTS
        .iter()
        .map(|o| register(o.quantity, o.units[0], o.kind))
        .collect();
    registers.push(register(TARIFF, "", Kind::Gauge));
    registers.push(register("gas_total", "m3", Kind::Gauge));
    Profile {
        name: "p1".into(),
        manufacturer: "DSMR".into(),
        model: "P1 port".into(),
        registers,
    }
}

/// Checks a meter on a p1 bus: no profile, no unit id, one meter per port.
pub(crate) fn validate_meter<'a>(
    at: &str,
    m: &'a MeterConfig,
    p1_meters: &mut BTreeMap<&'a str, &'a str>,
    errors: &mut Vec<ConfigError>,
) {
    let err = |field: &str, reason: String| ConfigError {
        field: format!("{at}.{field}"),
        reason,
    };
    if !m.profile.is_empty() {
        errors.push(err(
            "profile",
            format!(
                "a meter on p1 bus `{}` has no profile: the telegram names its quantities",
                m.bus
            ),
        ));
    }
    if m.unit_id != 0 {
        errors.push(err(
            "unit_id",
            format!("a meter on p1 bus `{}` has no unit id", m.bus),
        ));
    }
    if let Some(other) = p1_meters.insert(m.bus.as_str(), m.id.as_str()) {
        if other != m.id {
            errors.push(err(
                "bus",
                format!(
                    "p1 bus `{}` already carries meter `{other}`: a P1 port has one meter",
                    m.bus
                ),
            ));
        }
    }
    if m.interval.0.is_zero() {
        errors.push(err("interval", "must be greater than zero".into()));
    }
    if let Some(q) = &m.energy_quantity {
        let pushed =
            m.accept_push && ["power", "energy_delta", "energy_total"].contains(&q.as_str());
        if !pushed && !profile().registers.iter().any(|r| &r.name == q) {
            errors.push(err(
                "energy_quantity",
                format!(
                    "`{}` is not a quantity of a P1 meter ({})",
                    crate::config::units::clip(q),
                    OBJECTS
                        .iter()
                        .filter(|o| o.kind == Kind::EnergyTotal)
                        .map(|o| o.quantity)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
}

/// The meter of a p1 bus, ready for [`run_p1`], with the P1 quantities as its profile.
pub fn plan(config: &impl AcquireSections, bus: &BusConfig) -> Vec<MeterPlan> {
    let profile = Arc::new(profile());
    config
        .meters()
        .iter()
        .filter(|m| m.bus == bus.id)
        .take(1)
        .map(|m| MeterPlan {
            config: m.clone(),
            profile: profile.clone(),
            blocks: Vec::new(),
            stats: Arc::new(MeterStats::new(&m.id)),
        })
        .collect()
}

/// Why a telegram could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The OBIS code of the bad object; empty for the telegram as a whole.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "object {}: {}", self.object, self.reason)
        }
    }
}

/// A telegram's stored content.
#[derive(Debug, Clone, PartialEq)]
pub struct Telegram {
    /// The identification line after `/`, e.g. `ISk5\2MT382-1000`.
    pub ident: String,
    /// The P1 version object (1-3:0.2.8, or Belgium's 0-0:96.1.4).
    pub version: Option<String>,
    /// The meter's time of the telegram (0-0:1.0.0), Unix ms; none before DSMR 4.
    pub time_ms: Option<i64>,
    /// The values as of `time_ms`.
    pub values: Vec<Value>,
    /// Values with a time of their own (Unix ms): M-Bus meter readings, the month's
    /// maximum demand.
    pub stamped: Vec<(i64, Value)>,
}

fn value(quantity: &str, unit: &str, kind: Kind, v: f64, source: Source) -> Value {
    Value {
        quantity: quantity.to_string(),
        unit: unit.to_string(),
        kind,
        value: Some(v),
        invalid: None,
        source,
    }
}

/// A plain decimal as P1 sends it (`001234.567`): digits with at most one point
/// inside. Read as the f64 nearest the decimal, which prints back as that decimal
/// (without the padding zeros).
fn decimal(s: &str) -> Option<f64> {
    if s.is_empty() || s.len() > 24 {
        return None;
    }
    let mut point = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'0'..=b'9' => {}
            b'.' if !point && i > 0 && i + 1 < s.len() => point = true,
            _ => return None,
        }
    }
    s.parse().ok()
}

/// `001234.567*kWh`: the number and its unit, which must be one of `units`.
fn measurement<'a>(group: &'a str, units: &[&str]) -> Result<(f64, &'a str), String> {
    let (number, unit) = group
        .split_once('*')
        .ok_or_else(|| format!("`{}` has no unit", crate::config::units::clip(group)))?;
    let v = decimal(number).ok_or_else(|| {
        format!(
            "`{}` is not a decimal number",
            crate::config::units::clip(number)
        )
    })?;
    if !units.contains(&unit) {
        return Err(format!(
            "unit `{}` is not one of {}",
            crate::config::units::clip(unit),
            units.join(", ")
        ));
    }
    Ok((v, unit))
}

/// The `(...)` groups after an OBIS code; `None` if the line is not made of them.
fn groups(mut rest: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_end_matches([' ', '\t']);
        if rest.is_empty() {
            return Some(out);
        }
        let inner = rest.strip_prefix('(')?;
        let close = inner.find(')')?;
        out.push(inner.get(..close)?);
        rest = inner.get(close + 1..)?;
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Whether EU summer time is in force at `utc_ms`: from 01:00 UTC on the last
/// Sunday of March to 01:00 UTC on the last Sunday of October.
fn eu_summer(utc_ms: i64) -> bool {
    let (year, _, _) = civil_from_days(utc_ms.div_euclid(DAY_MS));
    let last_sunday = |month: u32| {
        let last = days_from_civil(year, month, days_in_month(year, month));
        // 1970-01-01 was a Thursday: weekday 0 = Sunday.
        last - (last + 4).rem_euclid(7)
    };
    let start = last_sunday(3) * DAY_MS + HOUR_MS;
    let end = last_sunday(10) * DAY_MS + HOUR_MS;
    (start..end).contains(&utc_ms)
}

/// A P1 timestamp `YYMMDDhhmmssX` (X = `S` summer time, `W` winter time; older
/// objects leave it out) in the meter's zone, Central European Time, as Unix ms.
/// Without the flag, the EU rule decides (the repeated autumn hour is read as
/// summer time).
pub fn meter_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let dst = match b.len() {
        12 => None,
        13 => match b[12] {
            b'S' => Some(true),
            b'W' => Some(false),
            _ => return None,
        },
        _ => return None,
    };
    let digits = b.get(..12)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let two = |i: usize| u32::from(digits[i] - b'0') * 10 + u32::from(digits[i + 1] - b'0');
    let (year, month, day) = (2000 + i64::from(two(0)), two(2), two(4));
    let (hour, minute, second) = (two(6), two(8), two(10));
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let local = days_from_civil(year, month, day) * DAY_MS
        + i64::from(hour * 3600 + minute * 60 + second) * 1000;
    Some(match dst {
        Some(true) => local - 2 * HOUR_MS,
        Some(false) => local - HOUR_MS,
        None if eu_summer(local - 2 * HOUR_MS) => local - 2 * HOUR_MS,
        None => local - HOUR_MS,
    })
}

/// `utc_ms` as a P1 timestamp with its S/W flag (for the simulator).
pub fn format_meter_time(utc_ms: i64) -> String {
    let summer = eu_summer(utc_ms);
    let local = utc_ms + if summer { 2 * HOUR_MS } else { HOUR_MS };
    let (year, month, day) = civil_from_days(local.div_euclid(DAY_MS));
    let secs = local.rem_euclid(DAY_MS) / 1000;
    format!(
        "{:02}{:02}{:02}{:02}{:02}{:02}{}",
        year.rem_euclid(100),
        month,
        day,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        if summer { 'S' } else { 'W' }
    )
}

/// An M-Bus channel's reading: device type, time, value, unit.
#[derive(Debug, Default)]
struct Channel<'a> {
    device_type: Option<u32>,
    reading: Option<(i64, f64, &'a str)>,
}

fn bad(object: &str, reason: impl Into<String>) -> ParseError {
    ParseError {
        object: crate::config::units::clip(object),
        reason: reason.into(),
    }
}

/// Splits `0-1:24.2.1` into channel 1 and `24.2.1`.
fn mbus_object(obis: &str) -> Option<(u8, &str)> {
    let rest = obis.strip_prefix("0-")?;
    let (channel, code) = rest.split_once(':')?;
    let channel: u8 = channel.parse().ok()?;
    (1..=4).contains(&channel).then_some((channel, code))
}

/// Reads a telegram (`/` through `!`, as [`Framer`] hands it on).
pub fn parse(bytes: &[u8]) -> Result<Telegram, ParseError> {
    let text = std::str::from_utf8(bytes).map_err(|_| bad("", "not ASCII text"))?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches(['\r', ' ']));
    let ident = lines
        .next()
        .and_then(|l| l.strip_prefix('/'))
        .ok_or_else(|| bad("", "no identification line starting with `/`"))?;
    // One object per line; a line starting with `(` continues the one before (the
    // value line of DSMR 2.2/3's 0-n:24.3.0).
    let mut objects: Vec<String> = Vec::new();
    for line in lines {
        if line.starts_with('!') {
            break;
        }
        if line.is_empty() {
            continue;
        }
        match objects.last_mut() {
            Some(last) if line.starts_with('(') => last.push_str(line),
            _ => objects.push(line.to_string()),
        }
    }
    let mut telegram = Telegram {
        ident: crate::config::units::clip(ident),
        version: None,
        time_ms: None,
        values: Vec::new(),
        stamped: Vec::new(),
    };
    let mut channels: BTreeMap<u8, Channel> = BTreeMap::new();
    for line in &objects {
        let Some(open) = line.find('(') else {
            continue;
        };
        let (obis, rest) = line.split_at(open);
        // Some meters append the OBIS code's F group (`.255`).
        let obis = obis.trim().strip_suffix(".255").unwrap_or(obis.trim());
        let group = |i: usize| -> Result<&str, ParseError> {
            groups(rest)
                .ok_or_else(|| bad(obis, "not a sequence of `(...)` values"))?
                .get(i)
                .copied()
                .ok_or_else(|| bad(obis, format!("value {} is missing", i + 1)))
        };
        match obis {
            "0-0:1.0.0" => {
                let text = group(0)?;
                telegram.time_ms = Some(meter_time(text).ok_or_else(|| {
                    bad(
                        obis,
                        format!(
                            "`{}` is not a time YYMMDDhhmmssX",
                            crate::config::units::clip(text)
                        ),
                    )
                })?);
            }
            "1-3:0.2.8" | "0-0:96.1.4" => {
                telegram.version = Some(crate::config::units::clip(group(0)?));
            }
            "0-0:96.14.0" => {
                let text = group(0)?;
                let tariff = (!text.is_empty()
                    && text.len() <= 8
                    && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<u32>().ok())
                .flatten()
                .ok_or_else(|| {
                    bad(
                        obis,
                        format!(
                            "`{}` is not a tariff number",
                            crate::config::units::clip(text)
                        ),
                    )
                })?;
                telegram.values.push(value(
                    TARIFF,
                    "",
                    Kind::Gauge,
                    f64::from(tariff),
                    Source::Int,
                ));
            }
            _ => {
                if let Some(o) = OBJECTS.iter().find(|o| o.obis == obis) {
                    if o.stamped {
                        // No valid time (meters send `632525252525W` while they have none,
                        // an M-Bus value often without unit then): no value either.
                        let Some(ts) = meter_time(group(0)?) else {
                            continue;
                        };
                        let (v, unit) =
                            measurement(group(1)?, o.units).map_err(|e| bad(obis, e))?;
                        telegram
                            .stamped
                            .push((ts, value(o.quantity, unit, o.kind, v, Source::F64)));
                    } else {
                        let (v, unit) =
                            measurement(group(0)?, o.units).map_err(|e| bad(obis, e))?;
                        telegram
                            .values
                            .push(value(o.quantity, unit, o.kind, v, Source::F64));
                    }
                    continue;
                }
                let Some((channel, code)) = mbus_object(obis) else {
                    continue;
                };
                match code {
                    "24.1.0" => {
                        let text = group(0)?;
                        channels.entry(channel).or_default().device_type = text.parse().ok();
                    }
                    "24.2.1" | "24.2.3" => {
                        // No valid time (meters send `632525252525W` while they have none,
                        // an M-Bus value often without unit then): no value either.
                        let Some(ts) = meter_time(group(0)?) else {
                            continue;
                        };
                        let (v, unit) =
                            measurement(group(1)?, MBUS_UNITS).map_err(|e| bad(obis, e))?;
                        channels.entry(channel).or_default().reading = Some((ts, v, unit));
                    }
                    // DSMR 2.2/3: (time)(status)(period)(values)(object)(unit)(value).
                    "24.3.0" => {
                        // No valid time (meters send `632525252525W` while they have none,
                        // an M-Bus value often without unit then): no value either.
                        let Some(ts) = meter_time(group(0)?) else {
                            continue;
                        };
                        let unit = group(5)?;
                        if !MBUS_UNITS.contains(&unit) {
                            return Err(bad(
                                obis,
                                format!(
                                    "unit `{}` is not one of {}",
                                    crate::config::units::clip(unit),
                                    MBUS_UNITS.join(", ")
                                ),
                            ));
                        }
                        let number = group(6)?;
                        let v = decimal(number).ok_or_else(|| {
                            bad(
                                obis,
                                format!(
                                    "`{}` is not a decimal number",
                                    crate::config::units::clip(number)
                                ),
                            )
                        })?;
                        channels.entry(channel).or_default().reading = Some((ts, v, unit));
                    }
                    _ => {}
                }
            }
        }
    }
    for (channel, c) in channels {
        let Some((ts, v, unit)) = c.reading else {
            continue;
        };
        // Device types of EN 13757-3: 3 gas, 7 water, 4 and 12 heat.
        let medium = match (c.device_type, unit) {
            (Some(7), _) => "water",
            (Some(4 | 12), _) => "heat",
            (Some(3), _) | (None, "m3") => "gas",
            _ => "mbus",
        };
        let mut quantity = format!("{medium}_total");
        if telegram.stamped.iter().any(|(_, v)| v.quantity == quantity) {
            quantity = format!("{medium}_total_{channel}");
        }
        telegram
            .stamped
            .push((ts, value(&quantity, unit, Kind::Gauge, v, Source::F64)));
    }
    Ok(telegram)
}

/// Turns telegrams into readings for one meter.
///
/// Readings are stamped with the meter's time (0-0:1.0.0), which is when the meter
/// sampled the values; receive time only stands in where the telegram has none
/// (DSMR 2.2/3) or the meter's clock is more than [`MAX_CLOCK_SKEW`] off ours. One
/// reading per `interval` of the meter is kept (a DSMR 5 meter sends every second).
/// A value with a time of its own (gas, maximum demand) becomes a reading of its
/// own at that time, once per new time: the gas meter reports every 5 minutes (DSMR
/// 5) or hour (DSMR 4) and the telegrams in between repeat it.
#[derive(Debug)]
pub struct Emitter {
    meter: String,
    interval_ms: i64,
    last_ms: Option<i64>,
    stamped_last: BTreeMap<String, i64>,
    skewed: bool,
}

impl Emitter {
    pub fn new(meter: &str, interval: Duration) -> Emitter {
        Emitter {
            meter: meter.to_string(),
            interval_ms: i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
            last_ms: None,
            stamped_last: BTreeMap::new(),
            skewed: false,
        }
    }

    /// The readings a telegram received at `received_ms` gives.
    pub fn readings(&mut self, telegram: Telegram, received_ms: i64) -> Vec<Reading> {
        let skew_ms = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(i64::MAX);
        let (ts, shift) = match telegram.time_ms {
            Some(t) if (t - received_ms).abs() <= skew_ms => {
                if self.skewed {
                    info!(meter = %self.meter, "the P1 meter's clock agrees with ours again");
                    self.skewed = false;
                }
                (t, 0)
            }
            Some(t) => {
                if !self.skewed {
                    warn!(meter = %self.meter, offset_s = (t - received_ms) / 1000, "the P1 meter's clock is off; stamping its readings when received");
                    self.skewed = true;
                }
                (received_ms, received_ms - t)
            }
            None => (received_ms, 0),
        };
        let mut out = Vec::new();
        for (at, v) in telegram.stamped {
            let at = at.saturating_add(shift);
            // A time far from the telegram's is a placeholder (`000101000000W` from
            // a gas meter never read), not a reading to store at that time.
            if at > ts + STAMPED_AHEAD_MS || at < ts - STAMPED_BEHIND_MS {
                continue;
            }
            if self.stamped_last.get(&v.quantity) != Some(&at) {
                self.stamped_last.insert(v.quantity.clone(), at);
                out.push(Reading {
                    meter: self.meter.clone(),
                    ts_ms: at,
                    values: vec![v],
                });
            }
        }
        let due = match self.last_ms {
            None => true,
            // A clock set back starts over.
            Some(last) => ts < last || ts - last >= self.interval_ms,
        };
        if due && !telegram.values.is_empty() {
            self.last_ms = Some(ts);
            out.push(Reading {
                meter: self.meter.clone(),
                ts_ms: ts,
                values: telegram.values,
            });
        }
        out
    }
}

/// Why reading the port stopped.
pub(crate) enum Stop {
    /// The reading sink is closed: the agent is stopping.
    SinkClosed,
    /// The port failed or closed; it is reopened.
    Port(String),
}

/// Reads one P1 port's telegrams and counts them in the meter's stats.
pub struct P1Reader {
    bus: String,
    stats: Arc<MeterStats>,
    framer: Framer,
    emitter: Emitter,
    silence: Duration,
    /// A good telegram arrived since the port was (re)opened.
    good: bool,
}

impl P1Reader {
    pub fn new(bus: &str, dsmr: Dsmr, meter: &MeterPlan) -> P1Reader {
        P1Reader {
            bus: bus.to_string(),
            stats: meter.stats.clone(),
            framer: Framer::new(dsmr.checks_crc(), MAX_TELEGRAM),
            emitter: Emitter::new(&meter.config.id, meter.config.interval.0),
            silence: dsmr.period() * SILENT_PERIODS,
            good: false,
        }
    }

    fn failure(&self, kind: FailureKind, what: &str) {
        let failures = self.stats.record_failure(kind);
        self.stats.set_state(MeterState::Failing);
        if failures == 1 {
            warn!(bus = %self.bus, meter = %self.stats.meter(), error = %what, "P1 telegram lost");
        } else {
            debug!(bus = %self.bus, meter = %self.stats.meter(), error = %what, failures, "P1 telegram lost");
        }
    }

    /// Handles one frame; `Err` when the sink is closed.
    async fn frame(
        &mut self,
        frame: Frame,
        started: Instant,
        sink: &mpsc::Sender<Reading>,
    ) -> Result<bool, ()> {
        match frame {
            Frame::Telegram(bytes) => match parse(&bytes) {
                Ok(telegram) => {
                    let received_ms = now_ms();
                    if self.stats.state() != MeterState::Ok
                        && self.stats.state() != MeterState::Pending
                    {
                        info!(bus = %self.bus, meter = %self.stats.meter(), "P1 telegrams arrive again");
                    }
                    self.stats.record_success(received_ms, started.elapsed(), 0);
                    self.good = true;
                    for reading in self.emitter.readings(telegram, received_ms) {
                        sink.send(reading).await.map_err(|_| ())?;
                    }
                    return Ok(true);
                }
                Err(e) => self.failure(FailureKind::Decode, &format!("telegram not readable: {e}")),
            },
            Frame::BadCrc { sent, computed } => self.failure(
                FailureKind::Transport,
                &format!("CRC mismatch: telegram says {sent:04X}, its bytes give {computed:04X}"),
            ),
            Frame::NoCrc => self.failure(
                FailureKind::Transport,
                "telegram without CRC (DSMR 4 and later send one; for DSMR 2.2/3 set `dsmr`)",
            ),
            Frame::Framing(e) => self.failure(FailureKind::Decode, &format!("framing: {e}")),
        }
        Ok(false)
    }

    /// Reads `port` until it fails or the sink closes.
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &mut self,
        mut port: R,
        sink: &mpsc::Sender<Reading>,
    ) -> Stop {
        let mut chunk = [0u8; 512];
        let mut started = Instant::now();
        let mut deadline = Instant::now() + self.silence;
        loop {
            let n = match timeout_at(deadline, port.read(&mut chunk)).await {
                Err(_) => {
                    // The task is alive and listening: the watchdog's sign of life
                    // (`service::pipeline_liveness`), as a failing Modbus poll is.
                    self.stats.poll_started(now_ms());
                    self.failure(
                        FailureKind::Timeout,
                        &format!("no good telegram for {:?}", self.silence),
                    );
                    deadline = Instant::now() + self.silence;
                    continue;
                }
                Ok(Ok(0)) => return Stop::Port("end of stream".into()),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Stop::Port(e.to_string()),
            };
            for &byte in chunk.get(..n).unwrap_or_default() {
                let was_in = self.framer.in_telegram();
                let frame = self.framer.push(byte);
                let begun = self.framer.in_telegram() && (!was_in || frame.is_some());
                if let Some(frame) = frame {
                    match self.frame(frame, started, sink).await {
                        Ok(true) => deadline = Instant::now() + self.silence,
                        Ok(false) => {}
                        Err(()) => return Stop::SinkClosed,
                    }
                }
                if begun {
                    started = Instant::now();
                    self.stats.poll_started(now_ms());
                }
            }
        }
    }
}

/// Longest wait before reopening a port that failed.
const REOPEN_CAP: Duration = Duration::from_secs(30);

/// The task of a p1 bus: opens the port, reads telegrams until `shutdown`, reopens
/// it (after 1 s, doubling up to 30 s) when it fails.
pub async fn run_p1(
    bus: BusConfig,
    meters: Vec<MeterPlan>,
    sink: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    let bus_id = bus.id.clone();
    if shutdown
        .run_until_cancelled(run(bus, meters, sink))
        .await
        .is_none()
    {
        debug!(bus = %bus_id, "p1 task stopped");
    }
}

async fn run(bus: BusConfig, meters: Vec<MeterPlan>, sink: mpsc::Sender<Reading>) {
    let Some(meter) = meters.first() else {
        return;
    };
    let Some(port) = bus.port.clone() else {
        warn!(bus = %bus.id, "p1 bus has no port; not reading it");
        return;
    };
    let dsmr = bus.dsmr.unwrap_or_default();
    let line = bus.p1_line();
    let mut reader = P1Reader::new(&bus.id, dsmr, meter);
    let mut delay = Duration::from_secs(1);
    info!(bus = %bus.id, meter = %meter.config.id, port = %port.display(), baud = line.baud_rate, "reading P1 telegrams");
    loop {
        reader.good = false;
        reader.stats.poll_started(now_ms());
        match serial::open(&port, line) {
            Ok(stream) => match reader.read(stream, &sink).await {
                Stop::SinkClosed => {
                    debug!(bus = %bus.id, "reading sink closed; stopping");
                    return;
                }
                Stop::Port(e) => {
                    reader.failure(
                        FailureKind::Transport,
                        &format!("port {}: {e}", port.display()),
                    );
                }
            },
            Err(e) => reader.failure(
                FailureKind::Transport,
                &format!("opening {}: {e}", port.display()),
            ),
        }
        // A new port, a new framer: a half telegram from before is not continued.
        reader.framer = Framer::new(dsmr.checks_crc(), MAX_TELEGRAM);
        if reader.good {
            delay = Duration::from_secs(1);
        }
        sleep(delay).await;
        delay = (delay * 2).min(REOPEN_CAP);
    }
}
