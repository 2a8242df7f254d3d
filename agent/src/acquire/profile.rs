//! Meter profiles: register maps as data.
//!
//! Built-in families live in `agent/profiles/*.toml`, one file per family, compiled
//! into the binary. User-defined maps come from the config's `[profiles]` table and
//! use the same register schema.
//!
//! A built-in file also names its source document (`source`), the bus types the
//! meter is sold with (`bus_types`), and for every register the number the source
//! document gives it (`datasheet`). `datasheet_offset` says how those numbers map to
//! the zero-based protocol address: `datasheet = address + datasheet_offset`
//! (Eastron's 30001 is address 0: offset 30001; a document that prints protocol
//! addresses in hex: offset 0; a 1-based register number: offset 1).

use std::sync::Arc;

use serde::Deserialize;

use crate::acquire::config::AcquireSections;
use crate::acquire::config::{ProfileConfig, RegisterConfig};
use crate::config::units::ConfigError;

/// A register map with the device description used for display and discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub manufacturer: String,
    pub model: String,
    pub registers: Vec<RegisterConfig>,
}

/// A built-in profile with what its file says about where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct Builtin {
    pub profile: Profile,
    /// The manufacturer's document the register map is taken from, with its version.
    pub source: String,
    /// `rtu`, `tcp`: how the meter is connected.
    pub bus_types: Vec<String>,
    /// `datasheet` number = protocol address + this.
    pub datasheet_offset: i64,
    /// The source document's number of each register, in register order.
    pub datasheet: Vec<i64>,
    /// Most registers the meter answers in one read, where the source document sets
    /// a limit below the Modbus maximum; block reads are planned within it.
    pub max_registers_per_request: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    manufacturer: String,
    model: String,
    source: String,
    bus_types: Vec<String>,
    datasheet_offset: i64,
    #[serde(default)]
    max_registers_per_request: Option<u16>,
    registers: Vec<toml::Table>,
}

/// Pairs each name with its file under `agent/profiles/`, compiled in.
macro_rules! builtin_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../profiles/", $name, ".toml")))),*]
    };
}

/// The built-in families: name and file. `edge-agent profiles` lists them in this
/// order; the config's check of profile names uses this list too.
const BUILTIN: &[(&str, &str)] = builtin_files![
    "sdm630",
    "sdm120",
    "sdm630v2",
    "sdm72dm",
    "sdm72dmv2",
    "sdm220",
    "sdm230",
    "abb_b21",
    "abb_b23",
    "abb_b24",
    "abb_a4x",
    "cg_em24",
    "cg_em340",
    "cg_et340",
    "janitza_umg96rm",
    "janitza_umg604",
    "iem3155",
    "iem3255",
    "saia_ale3",
    "inepro_pro380",
    "dzg_dvh4013",
    "orno_we514",
    "orno_we516",
    "orno_we517",
    "finder_7m38",
    "socomec_countis_e34_e44",
];

/// Parses a built-in profile file: the register tables without their `datasheet`
/// key are ordinary register maps.
fn parse(name: &str, text: &str) -> Result<Builtin, String> {
    let file: ProfileFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut registers = Vec::with_capacity(file.registers.len());
    let mut datasheet = Vec::with_capacity(file.registers.len());
    for (i, mut table) in file.registers.into_iter().enumerate() {
        let number = match table.remove("datasheet") {
            Some(toml::Value::Integer(n)) => n,
            _ => {
                return Err(format!(
                    "registers[{i}].datasheet: missing or not an integer"
                ))
            }
        };
        let reg = RegisterConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| format!("registers[{i}]: {e}"))?;
        registers.push(reg);
        datasheet.push(number);
    }
    Ok(Builtin {
        profile: Profile {
            name: name.to_string(),
            manufacturer: file.manufacturer,
            model: file.model,
            registers,
        },
        source: file.source,
        bus_types: file.bus_types,
        datasheet_offset: file.datasheet_offset,
        datasheet,
        max_registers_per_request: file.max_registers_per_request,
    })
}

/// A built-in profile with its source; `None` for an unknown name. The files ship
/// with the binary, and a test checks that each parses and validates.
pub fn builtin_info(name: &str) -> Option<Builtin> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
    parse(name, text).ok()
}

/// Parses one built-in profile.
pub fn builtin(name: &str) -> Option<Profile> {
    builtin_info(name).map(|b| b.profile)
}

/// Names of the built-in profiles.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(n, _)| *n)
}

/// The read size limit of a built-in profile's meter, if its document sets one.
/// (A user map cannot take a built-in name, so the name says which profile it is.)
pub fn request_limit(name: &str) -> Option<u16> {
    builtin_info(name).and_then(|b| b.max_registers_per_request)
}

/// True for the name of a built-in profile (or `sunspec`, whose map is
/// discovered from the device: see [`super::sunspec`]).
pub fn is_builtin(name: &str) -> bool {
    BUILTIN.iter().any(|(n, _)| *n == name) || name == super::sunspec::PROFILE
}

/// The table `edge-agent profiles` prints: one line per built-in profile with its
/// name, manufacturer, model, bus types and quantities, after a header line.
pub fn listing() -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "MANUFACTURER".to_string(),
        "MODEL".to_string(),
        "BUSES".to_string(),
        "QUANTITIES".to_string(),
    ]];
    for name in builtin_names() {
        let Some(b) = builtin_info(name) else {
            continue;
        };
        let quantities: Vec<&str> = b
            .profile
            .registers
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        rows.push([
            name.to_string(),
            b.profile.manufacturer.clone(),
            b.profile.model.clone(),
            b.bus_types.join(","),
            quantities.join(","),
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        for (w, cell) in widths.iter().zip(row.iter()) {
            out.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(&row[4]);
        out.push('\n');
    }
    out
}

fn from_config(name: &str, p: &ProfileConfig) -> Profile {
    Profile {
        name: name.to_string(),
        manufacturer: p.manufacturer.clone(),
        model: if p.model.is_empty() {
            name.to_string()
        } else {
            p.model.clone()
        },
        registers: p.registers.clone(),
    }
}

/// Resolves a profile name against the config's user maps, then the built-ins.
pub fn resolve(config: &impl AcquireSections, name: &str) -> Result<Arc<Profile>, ConfigError> {
    if let Some(p) = config.profiles().get(name) {
        return Ok(Arc::new(from_config(name, p)));
    }
    if name == super::sunspec::PROFILE {
        // No registers until the device is discovered.
        return Ok(Arc::new(Profile {
            name: name.to_string(),
            manufacturer: String::new(),
            model: "SunSpec device".into(),
            registers: Vec::new(),
        }));
    }
    builtin(name).map(Arc::new).ok_or_else(|| ConfigError {
        field: "profile".into(),
        reason: format!("unknown profile `{name}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::config::{validate_registers, RegisterTable};
    use crate::config::Config;
    use crate::model::Kind;

    #[test]
    fn builtin_profiles_parse_and_validate() {
        let mut models = std::collections::HashSet::new();
        for (name, text) in BUILTIN {
            let b = parse(name, text).unwrap_or_else(|e| panic!("profile {name}: {e}"));
            let p = &b.profile;
            let mut errors = Vec::new();
            validate_registers(name, &p.registers, &mut errors);
            assert_eq!(errors, vec![], "profile {name}");
            assert!(!p.manufacturer.is_empty() && !p.model.is_empty(), "{name}");
            assert!(models.insert(p.model.clone()), "{name}: model listed twice");
            assert!(b.source.len() > 10, "{name}: names its source document");
            assert!(
                !b.bus_types.is_empty() && b.bus_types.iter().all(|t| t == "rtu" || t == "tcp"),
                "{name}: bus types {:?}",
                b.bus_types
            );
            assert!(is_builtin(name) && builtin(name).as_ref() == Some(p));
            assert!(
                b.max_registers_per_request
                    .map_or(true, |n| (1..=125).contains(&n)),
                "{name}: read limit"
            );
            let mut names = std::collections::HashSet::new();
            let mut used: Vec<(RegisterTable, u32, u32, &str)> = Vec::new();
            for (r, number) in p.registers.iter().zip(&b.datasheet) {
                let at = format!("{name}.{}", r.name);
                assert!(names.insert(r.name.as_str()), "{at}: name used twice");
                // The address is the datasheet number through the file's one mapping.
                assert_eq!(
                    i64::from(r.address) + b.datasheet_offset,
                    *number,
                    "{at}: address {:#x} does not match datasheet number {number}",
                    r.address
                );
                // Every register has a plausible range; a counter needs no ceiling.
                assert!(r.min.is_some(), "{at}: no min");
                assert!(
                    r.max.is_some() || r.kind == Kind::EnergyTotal,
                    "{at}: no max"
                );
                let (start, end) = (
                    u32::from(r.address),
                    u32::from(r.address) + u32::from(r.data_type.words()),
                );
                for (t, s, e, other) in &used {
                    assert!(
                        *t != r.table || end <= *s || start >= *e,
                        "{at} overlaps {other}"
                    );
                }
                used.push((r.table, start, end, r.name.as_str()));
            }
            // What every meter has: power and an energy counter.
            for kind in [Kind::Power, Kind::EnergyTotal] {
                assert!(
                    p.registers.iter().any(|r| r.kind == kind),
                    "{name}: no {kind:?} register"
                );
            }
        }
    }

    #[test]
    fn a_datasheet_number_that_does_not_parse_is_named() {
        let text = "manufacturer = \"m\"\nmodel = \"x\"\nsource = \"doc\"\nbus_types = [\"rtu\"]\ndatasheet_offset = 0\nregisters = [\n  { name = \"p\", address = 0, type = \"f32\", unit = \"W\", kind = \"power\" },\n]\n";
        assert_eq!(
            parse("x", text).err().as_deref(),
            Some("registers[0].datasheet: missing or not an integer")
        );
        let ok = text.replace("{ name", "{ datasheet = 7, name");
        let b = parse("x", &ok).expect("parses");
        assert_eq!((b.datasheet, b.profile.registers[0].address), (vec![7], 0));
        let bad = ok.replace("type = \"f32\"", "type = \"f33\"");
        assert!(parse("x", &bad)
            .err()
            .is_some_and(|e| e.starts_with("registers[0]: ")));
    }

    #[test]
    fn every_builtin_name_is_a_valid_meter_profile_and_reserved() {
        let base = "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"127.0.0.1:502\"\n";
        for name in builtin_names() {
            let text = format!(
                "{base}[[meters]]\nid = \"m\"\nbus = \"lan\"\nunit_id = 1\nprofile = \"{name}\"\n"
            );
            let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(config.validate().is_ok(), "{name}");
            let text = format!(
                "{base}[profiles.{name}]\nregisters = [{{ name = \"p\", address = 0, type = \"f32\", unit = \"W\", kind = \"power\" }}]\n"
            );
            let rejected = Config::from_toml(&text).and_then(|c| c.validate());
            assert!(rejected.is_err(), "a user map may not shadow {name}");
        }
    }

    #[test]
    fn listing_names_every_profile_with_its_buses_and_quantities() {
        let text = listing();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), builtin_names().count() + 1);
        assert!(lines[0].starts_with("NAME") && lines[0].contains("QUANTITIES"));
        for (line, name) in lines[1..].iter().zip(builtin_names()) {
            let b = builtin_info(name).expect("parses");
            assert!(line.starts_with(&format!("{name} ")), "{line}");
            assert!(line.contains(&b.profile.manufacturer) && line.contains(&b.profile.model));
            assert!(line.contains(&b.bus_types.join(",")), "{line}");
            let quantities: Vec<&str> = b
                .profile
                .registers
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            assert!(line.ends_with(&quantities.join(",")), "{line}");
        }
    }

    /// Facts typed from the source documents, independent of the profile files: a
    /// changed address, table, type, word order, scale or unit shows up here.
    #[test]
    fn profiles_match_their_datasheets() {
        use crate::acquire::config::{DataType as T, WordOrder as O};
        use RegisterTable::{Holding as H, Input as I};
        /// Profile, quantity, address, table, type, word order, scale, unit.
        type Fact = (
            &'static str,
            &'static str,
            u16,
            RegisterTable,
            T,
            O,
            f64,
            &'static str,
        );
        #[rustfmt::skip]
        let facts: &[Fact] = &[
            ("sdm72dm", "power", 0x34, I, T::F32, O::HighFirst, 1.0, "W"),
            ("sdm72dm", "energy_total", 0x156, I, T::F32, O::HighFirst, 1.0, "kWh"),
            ("sdm72dmv2", "voltage_l3", 0x04, I, T::F32, O::HighFirst, 1.0, "V"),
            ("sdm72dmv2", "power_factor", 0x3E, I, T::F32, O::HighFirst, 1.0, ""),
            ("sdm220", "energy_export", 0x4A, I, T::F32, O::HighFirst, 1.0, "kWh"),
            ("sdm230", "power_factor", 0x1E, I, T::F32, O::HighFirst, 1.0, ""),
            ("sdm630v2", "voltage_thd_l1", 0xEA, I, T::F32, O::HighFirst, 1.0, "%"),
            ("sdm630v2", "current_thd_l3", 0xF4, I, T::F32, O::HighFirst, 1.0, "%"),
            ("sdm630v2", "power_demand", 0x54, I, T::F32, O::HighFirst, 1.0, "W"),
            ("sdm630v2", "current_demand_l1", 0x102, I, T::F32, O::HighFirst, 1.0, "A"),
            ("abb_b21", "voltage", 0x5B00, H, T::U32, O::HighFirst, 0.1, "V"),
            ("abb_b23", "energy_import", 0x5000, H, T::U64, O::HighFirst, 0.01, "kWh"),
            ("abb_b23", "power", 0x5B14, H, T::I32, O::HighFirst, 0.01, "W"),
            ("abb_b23", "current_l2", 0x5B0E, H, T::U32, O::HighFirst, 0.01, "A"),
            ("abb_b23", "frequency", 0x5B2C, H, T::U16, O::HighFirst, 0.01, "Hz"),
            ("abb_b24", "power_factor_l3", 0x5B3D, H, T::I16, O::HighFirst, 0.001, ""),
            ("abb_a4x", "energy_export", 0x5004, H, T::U64, O::HighFirst, 0.01, "kWh"),
            ("cg_em24", "energy_import", 0x3E, I, T::I32, O::LowFirst, 0.1, "kWh"),
            ("cg_em24", "frequency", 0x37, I, T::I16, O::HighFirst, 0.1, "Hz"),
            ("cg_em24", "current_l1", 0x0C, I, T::I32, O::LowFirst, 0.001, "A"),
            ("cg_em340", "energy_import", 0x34, I, T::I32, O::LowFirst, 0.1, "kWh"),
            ("cg_em340", "power_factor", 0x31, I, T::I16, O::HighFirst, 0.001, ""),
            ("cg_et340", "energy_export", 0x4E, I, T::I32, O::LowFirst, 0.1, "kWh"),
            ("janitza_umg96rm", "power", 19026, H, T::F32, O::HighFirst, 1.0, "W"),
            ("janitza_umg96rm", "energy_import", 19068, H, T::F32, O::HighFirst, 1.0, "Wh"),
            ("janitza_umg604", "frequency", 19050, H, T::F32, O::HighFirst, 1.0, "Hz"),
            ("iem3155", "energy_import", 3203, H, T::I64, O::HighFirst, 1.0, "Wh"),
            ("iem3155", "voltage_l1", 3027, H, T::F32, O::HighFirst, 1.0, "V"),
            ("iem3155", "power", 3059, H, T::F32, O::HighFirst, 1.0, "kW"),
            ("iem3255", "current_l1", 2999, H, T::F32, O::HighFirst, 1.0, "A"),
            ("saia_ale3", "energy_import_t1", 27, H, T::U32, O::HighFirst, 0.01, "kWh"),
            ("saia_ale3", "voltage_l1", 35, H, T::U16, O::HighFirst, 1.0, "V"),
            ("saia_ale3", "power", 50, H, T::I16, O::HighFirst, 0.01, "kW"),
            ("inepro_pro380", "power", 0x5012, H, T::F32, O::HighFirst, 1.0, "kW"),
            ("inepro_pro380", "energy_export", 0x6018, H, T::F32, O::HighFirst, 1.0, "kWh"),
            ("dzg_dvh4013", "energy_import", 0x4000, H, T::U32, O::HighFirst, 0.001, "kWh"),
            ("dzg_dvh4013", "voltage_l1", 0x04, H, T::U32, O::HighFirst, 0.01, "V"),
            ("orno_we514", "voltage", 0x131, H, T::U16, O::HighFirst, 0.01, "V"),
            ("orno_we514", "energy_total", 0xA000, H, T::U32, O::HighFirst, 0.01, "kWh"),
            ("orno_we516", "power", 0x1C, H, T::F32, O::HighFirst, 1.0, "kW"),
            ("orno_we517", "energy_export", 0x110, H, T::F32, O::HighFirst, 1.0, "kWh"),
            ("finder_7m38", "voltage_l1", 2500, I, T::F32, O::HighFirst, 1.0, "V"),
            ("finder_7m38", "energy_import", 2752, I, T::F32, O::HighFirst, 1.0, "Wh"),
            ("socomec_countis_e34_e44", "voltage_l2", 50522, H, T::U32, O::HighFirst, 0.01, "V"),
            ("socomec_countis_e34_e44", "frequency", 0xC55E, H, T::U32, O::HighFirst, 0.01, "Hz"),
            ("socomec_countis_e34_e44", "current_l1", 50528, H, T::U32, O::HighFirst, 0.001, "A"),
            ("socomec_countis_e34_e44", "power", 50536, H, T::I32, O::HighFirst, 10.0, "W"),
            ("socomec_countis_e34_e44", "power_factor_l3", 0xC586, H, T::I32, O::HighFirst, 0.001, ""),
            ("socomec_countis_e34_e44", "energy_import", 50946, H, T::U32, O::HighFirst, 10.0, "Wh"),
            ("socomec_countis_e34_e44", "energy_export", 0xC708, H, T::U32, O::HighFirst, 10.0, "Wh"),
        ];
        for (profile, quantity, address, table, data_type, order, scale, unit) in facts {
            let p = builtin(profile).unwrap_or_else(|| panic!("{profile}"));
            let r = p
                .registers
                .iter()
                .find(|r| r.name == *quantity)
                .unwrap_or_else(|| panic!("{profile}.{quantity}"));
            assert_eq!(
                (
                    r.address,
                    r.table,
                    r.data_type,
                    r.word_order,
                    r.scale,
                    r.unit.as_str()
                ),
                (*address, *table, *data_type, *order, *scale, *unit),
                "{profile}.{quantity}"
            );
        }
        // Every profile is covered by at least one fact (the two first ones by the
        // SDM630 test below and the bus tests).
        for name in builtin_names().skip(2) {
            assert!(
                facts.iter().any(|f| f.0 == name),
                "no datasheet fact for {name}"
            );
        }
    }

    #[test]
    fn sdm630_has_the_datasheet_addresses() {
        let p = builtin("sdm630").expect("sdm630");
        let at = |n: &str| {
            p.registers
                .iter()
                .find(|r| r.name == n)
                .map(|r| (r.address, r.kind))
        };
        assert_eq!(at("voltage_l1"), Some((0, Kind::Voltage)));
        assert_eq!(at("current_l3"), Some((0x0A, Kind::Current)));
        assert_eq!(at("power_l2"), Some((0x0E, Kind::Power)));
        assert_eq!(at("power"), Some((0x34, Kind::Power)));
        assert_eq!(at("frequency"), Some((0x46, Kind::Frequency)));
        assert_eq!(at("energy_import"), Some((0x48, Kind::EnergyTotal)));
        assert_eq!(at("energy_export"), Some((0x4A, Kind::EnergyTotal)));
        assert_eq!(p.registers.len(), 14);
    }
}
