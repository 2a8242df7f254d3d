//! Meter profiles: register maps as data.
//!
//! Built-in families live in `agent/profiles/*.toml`, one file per family, compiled
//! into the binary. User-defined maps come from the config's `[profiles]` table and
//! use the same register schema.

use std::sync::Arc;

use serde::Deserialize;

use crate::config::{Config, ConfigError, ProfileConfig, RegisterConfig};

/// A register map with the device description used for display and discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub manufacturer: String,
    pub model: String,
    pub registers: Vec<RegisterConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    manufacturer: String,
    model: String,
    registers: Vec<RegisterConfig>,
}

const BUILTIN: &[(&str, &str)] = &[
    ("sdm630", include_str!("../../profiles/sdm630.toml")),
    ("sdm120", include_str!("../../profiles/sdm120.toml")),
];

/// Parses one built-in profile; the files ship with the binary, and a test checks
/// that each parses and validates.
pub fn builtin(name: &str) -> Option<Profile> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
    let file: ProfileFile = toml::from_str(text).ok()?;
    Some(Profile {
        name: name.to_string(),
        manufacturer: file.manufacturer,
        model: file.model,
        registers: file.registers,
    })
}

/// Names of the built-in profiles.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(n, _)| *n)
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
pub fn resolve(config: &Config, name: &str) -> Result<Arc<Profile>, ConfigError> {
    if let Some(p) = config.profiles.get(name) {
        return Ok(Arc::new(from_config(name, p)));
    }
    builtin(name).map(Arc::new).ok_or_else(|| ConfigError {
        field: "profile".into(),
        reason: format!("unknown profile `{name}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{validate_registers, DataType, RegisterTable, WordOrder};
    use crate::model::Kind;

    #[test]
    fn builtin_profiles_parse_and_validate() {
        for name in builtin_names() {
            let p = builtin(name).unwrap_or_else(|| panic!("profile {name} parses"));
            let mut errors = Vec::new();
            validate_registers(name, &p.registers, &mut errors);
            assert_eq!(errors, vec![], "profile {name}");
            assert_eq!(p.manufacturer, "Eastron");
            for r in &p.registers {
                assert_eq!(r.table, RegisterTable::Input, "{name}.{}", r.name);
                assert_eq!(r.data_type, DataType::F32, "{name}.{}", r.name);
                assert_eq!(r.word_order, WordOrder::HighFirst, "{name}.{}", r.name);
            }
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
