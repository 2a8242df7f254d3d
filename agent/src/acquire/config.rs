//! The acquire stage's config sections: `[[buses]]`, `[[meters]]` and the
//! user-defined register maps under `[profiles]`, with their validation.
//!
//! The root [`crate::config::Config`] composes these; this module uses only the
//! config leaf ([`crate::config::units`]) and the acquire stage itself.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{display_id, err, valid_id, ConfigError, HumanDuration};
use crate::model::Kind;

/// What the acquire stage reads of the root config: its own sections. The root
/// [`crate::config::Config`] implements it, so the stage need not import the root.
pub trait AcquireSections {
    fn buses(&self) -> &[BusConfig];
    fn meters(&self) -> &[MeterConfig];
    /// The user-defined register maps, by profile name.
    fn profiles(&self) -> &BTreeMap<String, ProfileConfig>;
}

/// One physical bus: a serial line, or one Modbus TCP connection (a meter or a
/// TCP-to-RTU bridge with several unit ids behind it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub id: String,
    #[serde(rename = "type")]
    pub bus_type: BusType,
    /// RTU: serial device, e.g. `/dev/ttyUSB0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PathBuf>,
    /// Line speed; default 9600 (rtu), or as `dsmr` says (p1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud_rate: Option<u32>,
    /// Default `none` (rtu), or as `dsmr` says (p1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parity: Option<Parity>,
    /// Default 8 (rtu), or as `dsmr` says (p1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bits: Option<u8>,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// TCP: `host:port` of the Modbus TCP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Quiet time between the end of one exchange and the next request.
    #[serde(default = "default_frame_gap")]
    pub frame_gap: HumanDuration,
    /// How long to wait for each reply.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// p1: the DSMR version of the meter's P1 port (see `acquire::p1`); default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsmr: Option<super::p1::Dsmr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BusType {
    Rtu,
    Tcp,
    /// A DSMR P1 port: the meter pushes telegrams on a serial line (`acquire::p1`).
    P1,
}

/// How to reach a bus, resolved from a validated [`BusConfig`].
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Rtu {
        port: PathBuf,
        baud_rate: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
    Tcp {
        address: String,
    },
}

impl BusConfig {
    /// The transport of a bus; `None` only for a bus that failed validation.
    pub fn transport(&self) -> Option<Transport> {
        match self.bus_type {
            BusType::Rtu => Some(Transport::Rtu {
                port: self.port.clone()?,
                baud_rate: self.baud_rate.unwrap_or(default_baud()),
                parity: self.parity.unwrap_or_default(),
                data_bits: self.data_bits.unwrap_or(default_data_bits()),
                stop_bits: self.stop_bits,
            }),
            BusType::Tcp => Some(Transport::Tcp {
                address: self.address.clone()?,
            }),
            // Not polled: the P1 reader takes its line from `p1_line`.
            BusType::P1 => None,
        }
    }

    /// A p1 bus's serial line: the `dsmr` version's settings, each overridable.
    pub fn p1_line(&self) -> super::serial::LineSettings {
        let dsmr = self.dsmr.unwrap_or_default();
        let preset = dsmr.line();
        super::serial::LineSettings {
            baud_rate: self.baud_rate.unwrap_or(preset.baud_rate),
            parity: self.parity.unwrap_or(preset.parity),
            data_bits: self.data_bits.unwrap_or(preset.data_bits),
            stop_bits: self.stop_bits,
        }
    }
}

fn default_frame_gap() -> HumanDuration {
    HumanDuration(Duration::from_millis(20))
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub id: String,
    pub bus: String,
    /// Modbus unit (slave) id, 1..=247; required on a Modbus bus, absent (0) on p1.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unit_id: u8,
    /// A built-in profile (`edge-agent profiles`) or the name of a map under
    /// `[profiles]`; required on a Modbus bus, absent (empty) on p1 (the telegram
    /// names its quantities).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub profile: String,
    /// How often to read this meter.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Largest block of registers read in one request.
    #[serde(default = "default_max_registers")]
    pub max_registers_per_request: u16,
    /// Quantity the 15-minute intervals are derived from; default: see
    /// `analytics::energy_quantity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_quantity: Option<String>,
    /// Also accept pushed readings (HTTP and MQTT ingest) for this polled meter.
    /// Off by default: a push for a polled meter is refused, so nobody on the LAN
    /// can forge its readings or raise its alarms.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_push: bool,
    /// Name of the meter's device in Home Assistant; default `{gateway_id} {id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_max_registers() -> u16 {
    // Modbus allows 125 per read; meters often accept fewer. 80 suits Eastron.
    80
}

/// A user-defined register map.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    #[serde(default)]
    pub manufacturer: String,
    #[serde(default)]
    pub model: String,
    pub registers: Vec<RegisterConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    Input,
    Holding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// Number of 16-bit registers the type occupies.
    pub fn words(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Order of the 16-bit words of a multi-register value. Bytes within a word are
/// always big-endian, as Modbus fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// Most significant word at the lowest address (Eastron, most meters).
    #[default]
    HighFirst,
    /// Least significant word at the lowest address.
    LowFirst,
}

/// One register (or register group) of a map. Used for the built-in profiles' data
/// files as well as for user-defined maps.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Quantity name, e.g. `power_l1`.
    pub name: String,
    /// Zero-based protocol address of the first register.
    pub address: u16,
    #[serde(default = "default_table")]
    pub table: RegisterTable,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default)]
    pub word_order: WordOrder,
    /// Multiplier applied after decoding.
    #[serde(default = "default_scale")]
    pub scale: f64,
    pub unit: String,
    pub kind: Kind,
    /// Plausible range after scaling; values outside are not stored as numbers.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_table() -> RegisterTable {
    RegisterTable::Input
}

fn default_scale() -> f64 {
    1.0
}

/// Checks the `[[buses]]`: ids, ports and line settings.
pub fn validate_buses(buses: &[BusConfig], errors: &mut Vec<ConfigError>) {
    let mut ids = HashSet::new();
    let mut ports: BTreeMap<&Path, &str> = BTreeMap::new();
    for (i, bus) in buses.iter().enumerate() {
        let at = format!("buses[{}]", display_id(&bus.id, i));
        if !valid_id(&bus.id) {
            errors.push(err(
                format!("{at}.id"),
                format!(
                    "`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`",
                    bus.id
                ),
            ));
        } else if !ids.insert(bus.id.as_str()) {
            errors.push(err(
                format!("{at}.id"),
                format!("duplicate bus id `{}`", bus.id),
            ));
        }
        if bus.timeout.0.is_zero() {
            errors.push(err(format!("{at}.timeout"), "must be greater than zero"));
        }
        if bus.dsmr.is_some() && bus.bus_type != BusType::P1 {
            errors.push(err(
                format!("{at}.dsmr"),
                "only a p1 bus has a `dsmr` version",
            ));
        }
        match bus.bus_type {
            BusType::Rtu | BusType::P1 => {
                match &bus.port {
                    None => errors.push(err(
                        format!("{at}.port"),
                        "a serial (rtu or p1) bus needs a serial `port`",
                    )),
                    Some(port) => {
                        if let Some(other) = ports.insert(port.as_path(), bus.id.as_str()) {
                            errors.push(err(
                                format!("{at}.port"),
                                format!("serial port {} is already used by bus `{other}`: one bus owns a port", port.display()),
                            ));
                        }
                    }
                }
                if bus.address.is_some() {
                    errors.push(err(
                        format!("{at}.address"),
                        "only a tcp bus has an `address`",
                    ));
                }
                let baud_rate = bus.baud_rate.unwrap_or(default_baud());
                if !super::serial::STANDARD_BAUD_RATES.contains(&baud_rate) {
                    errors.push(err(
                        format!("{at}.baud_rate"),
                        format!(
                            "{} is not a standard serial speed ({:?})",
                            baud_rate,
                            super::serial::STANDARD_BAUD_RATES
                        ),
                    ));
                }
                let data_bits = bus.data_bits.unwrap_or(default_data_bits());
                if !(5..=8).contains(&data_bits) {
                    errors.push(err(
                        format!("{at}.data_bits"),
                        format!("{} is outside 5..=8", data_bits),
                    ));
                }
                if !(1..=2).contains(&bus.stop_bits) {
                    errors.push(err(
                        format!("{at}.stop_bits"),
                        format!("{} is not 1 or 2", bus.stop_bits),
                    ));
                }
            }
            BusType::Tcp => {
                match &bus.address {
                    None => errors.push(err(
                        format!("{at}.address"),
                        "a tcp bus needs an `address` (host:port)",
                    )),
                    Some(address) if !address.contains(':') => errors.push(err(
                        format!("{at}.address"),
                        format!("`{address}` must be host:port"),
                    )),
                    Some(_) => {}
                }
                if bus.port.is_some() {
                    errors.push(err(
                        format!("{at}.port"),
                        "only a serial (rtu or p1) bus has a `port`",
                    ));
                }
            }
        }
    }
}

/// Checks the user-defined register maps under `[profiles]`.
pub fn validate_profiles(
    profiles: &BTreeMap<String, ProfileConfig>,
    errors: &mut Vec<ConfigError>,
) {
    for (name, profile) in profiles {
        let at = format!("profiles.{name}");
        if super::profile::is_builtin(name) {
            errors.push(err(
                &at,
                format!("`{name}` is a built-in profile; choose another name"),
            ));
        }
        if profile.registers.is_empty() {
            errors.push(err(
                format!("{at}.registers"),
                "must list at least one register",
            ));
        }
        validate_registers(&at, &profile.registers, errors);
    }
}

/// Checks the `[[meters]]` against the buses and profiles they name.
pub fn validate_meters(
    meters: &[MeterConfig],
    buses: &[BusConfig],
    profiles: &BTreeMap<String, ProfileConfig>,
    errors: &mut Vec<ConfigError>,
) {
    let bus_ids: HashSet<&str> = buses.iter().map(|b| b.id.as_str()).collect();
    let mut ids = HashSet::new();
    let mut addresses = HashSet::new();
    // Meter id by p1 bus: a P1 port carries one meter.
    let mut p1_meters: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, m) in meters.iter().enumerate() {
        let at = format!("meters[{}]", display_id(&m.id, i));
        if !valid_id(&m.id) {
            errors.push(err(format!("{at}.id"), format!("`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_` (it is part of MQTT topics)", m.id)));
        } else if !ids.insert(m.id.as_str()) {
            errors.push(err(
                format!("{at}.id"),
                format!("duplicate meter id `{}`", m.id),
            ));
        }
        if let Some(name) = &m.name {
            if name.trim().is_empty() || name.chars().count() > 64 {
                errors.push(err(
                    format!("{at}.name"),
                    "must be 1-64 characters, not only spaces",
                ));
            }
        }
        if !bus_ids.contains(m.bus.as_str()) {
            errors.push(err(
                format!("{at}.bus"),
                format!("no bus with id `{}` is configured", m.bus),
            ));
        }
        let on_p1 = buses
            .iter()
            .any(|b| b.id == m.bus && b.bus_type == BusType::P1);
        if on_p1 {
            super::p1::validate_meter(&at, m, &mut p1_meters, errors);
            continue;
        }
        if m.unit_id == 0 {
            errors.push(err(
                format!("{at}.unit_id"),
                "is required for a meter on a Modbus bus (1..=247)",
            ));
        } else if !(1..=247).contains(&m.unit_id) {
            errors.push(err(
                format!("{at}.unit_id"),
                format!("{} is outside 1..=247", m.unit_id),
            ));
        } else if !addresses.insert((m.bus.as_str(), m.unit_id)) {
            errors.push(err(
                format!("{at}.unit_id"),
                format!("unit id {} is already used on bus `{}`", m.unit_id, m.bus),
            ));
        }
        if m.interval.0.is_zero() {
            errors.push(err(format!("{at}.interval"), "must be greater than zero"));
        }
        if !(1..=125).contains(&m.max_registers_per_request) {
            errors.push(err(
                format!("{at}.max_registers_per_request"),
                format!(
                    "{} is outside 1..=125 (the Modbus limit)",
                    m.max_registers_per_request
                ),
            ));
        }
        if let Some(q) = &m.energy_quantity {
            let registers = match profiles.get(&m.profile) {
                Some(p) => Some(p.registers.clone()),
                None => super::profile::builtin(&m.profile).map(|p| p.registers),
            };
            // A meter that accepts pushes also has the pushed quantities.
            let pushed =
                m.accept_push && ["power", "energy_delta", "energy_total"].contains(&q.as_str());
            if let Some(registers) = registers {
                if !pushed && !registers.iter().any(|r| &r.name == q) {
                    errors.push(err(
                        format!("{at}.energy_quantity"),
                        format!(
                            "`{}` is not a quantity of profile `{}`",
                            crate::config::units::clip(q),
                            m.profile
                        ),
                    ));
                }
            }
        }
        if m.profile.is_empty() {
            errors.push(err(
                format!("{at}.profile"),
                "is required for a meter on a Modbus bus",
            ));
        } else if !super::profile::is_builtin(&m.profile) && !profiles.contains_key(&m.profile) {
            errors.push(err(
                format!("{at}.profile"),
                format!(
                    "unknown profile `{}`: use a built-in profile (`edge-agent profiles` lists them) or a name under [profiles]",
                    m.profile
                ),
            ));
        }
    }
}

/// Checks a register list, built-in or user-defined. `at` is the path prefix.
pub fn validate_registers(at: &str, registers: &[RegisterConfig], errors: &mut Vec<ConfigError>) {
    let mut names = HashSet::new();
    for (j, r) in registers.iter().enumerate() {
        let rat = format!("{at}.registers[{j}]");
        if r.name.is_empty() || r.name.contains(['/', '#', '+']) {
            errors.push(err(
                format!("{rat}.name"),
                "must be non-empty, without `/`, `#` or `+`",
            ));
        } else if !names.insert(r.name.as_str()) {
            errors.push(err(
                format!("{rat}.name"),
                format!("duplicate quantity `{}`", r.name),
            ));
        }
        if !r.scale.is_finite() || r.scale == 0.0 {
            errors.push(err(
                format!("{rat}.scale"),
                "must be a finite, non-zero number",
            ));
        }
        if u32::from(r.address) + u32::from(r.data_type.words()) > 65536 {
            errors.push(err(
                format!("{rat}.address"),
                "register runs past address 65535",
            ));
        }
        if let (Some(lo), Some(hi)) = (r.min, r.max) {
            if lo > hi {
                errors.push(err(
                    format!("{rat}.min"),
                    format!("min {lo} is above max {hi}"),
                ));
            }
        }
    }
}
