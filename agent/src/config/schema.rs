//! Checks a configuration's TOML key by key before it is deserialized, so that one
//! pass names every unknown key, wrong type and out-of-range number in the file (serde
//! stops at the first), each with its field path and the rule in words.
//!
//! Bad keys are removed from the table as they are found: what is left can then be
//! deserialized and validated as a whole, so rules across fields are reported too.

use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::units::{display_id, err, ByteSize, ConfigError, HumanDuration};
use crate::model::Kind;

/// Checks one value; the error is the rule in words.
type Check = fn(&Value) -> Result<(), String>;

/// A key of a table: name, check, required.
type Key = (&'static str, Check, bool);

fn de<T: DeserializeOwned>(v: &Value) -> Result<T, String> {
    T::deserialize(v.clone()).map_err(|e| e.message().to_string())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a number",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn string(v: &Value) -> Result<(), String> {
    match v {
        Value::String(_) => Ok(()),
        other => Err(format!("must be a string, not {}", kind_of(other))),
    }
}

fn boolean(v: &Value) -> Result<(), String> {
    match v {
        Value::Boolean(_) => Ok(()),
        other => Err(format!("must be true or false, not {}", kind_of(other))),
    }
}

fn number(v: &Value) -> Result<(), String> {
    match v {
        Value::Integer(_) => Ok(()),
        Value::Float(f) if f.is_finite() => Ok(()),
        Value::Float(_) => Err("must be a finite number".into()),
        other => Err(format!("must be a number, not {}", kind_of(other))),
    }
}

fn int_in(v: &Value, lo: i64, hi: i64) -> Result<(), String> {
    match v {
        Value::Integer(n) if (lo..=hi).contains(n) => Ok(()),
        Value::Integer(n) => Err(format!("{n} is outside {lo}..={hi}")),
        other => Err(format!(
            "must be an integer in {lo}..={hi}, not {}",
            kind_of(other)
        )),
    }
}

macro_rules! int {
    ($lo:expr, $hi:expr) => {{
        fn check(v: &Value) -> Result<(), String> {
            int_in(v, $lo, $hi)
        }
        check as Check
    }};
}

macro_rules! one_of {
    ($($name:literal),+) => {{
        fn check(v: &Value) -> Result<(), String> {
            const NAMES: &[&str] = &[$($name),+];
            match v {
                Value::String(s) if NAMES.contains(&s.as_str()) => Ok(()),
                Value::String(s) => Err(format!(
                    "`{}` is not one of {}",
                    crate::config::units::clip(s),
                    NAMES.join(", ")
                )),
                other => Err(format!("must be one of {}, not {}", NAMES.join(", "), kind_of(other))),
            }
        }
        check as Check
    }};
}

fn duration(v: &Value) -> Result<(), String> {
    string(v).map_err(|_| {
        format!(
            "must be a duration like \"500ms\" or \"15m\", not {}",
            kind_of(v)
        )
    })?;
    de::<HumanDuration>(v).map(|_| ())
}

fn size(v: &Value) -> Result<(), String> {
    match v {
        Value::Integer(_) | Value::String(_) => de::<ByteSize>(v).map(|_| ()),
        other => Err(format!(
            "must be a size like \"64MiB\" or a number of bytes, not {}",
            kind_of(other)
        )),
    }
}

fn address(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => s.parse::<std::net::SocketAddr>().map(|_| ()).map_err(|_| {
            format!(
                "`{}` is not an address like \"127.0.0.1:1883\"",
                crate::config::units::clip(s)
            )
        }),
        other => Err(format!(
            "must be an address like \"127.0.0.1:1883\", not {}",
            kind_of(other)
        )),
    }
}

fn strings(v: &Value) -> Result<(), String> {
    match v {
        Value::Array(items) if items.iter().all(|i| i.is_str()) => Ok(()),
        _ => Err("must be an array of strings".into()),
    }
}

fn string_table(v: &Value) -> Result<(), String> {
    match v {
        Value::Table(t) if t.values().all(|i| i.is_str()) => Ok(()),
        _ => Err("must be a table of name = \"password\" strings".into()),
    }
}

fn clusters(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) if s == "auto" => Ok(()),
        Value::Integer(n) if (1..=12).contains(n) => Ok(()),
        _ => Err("must be 1..=12 or \"auto\"".into()),
    }
}

fn kind(v: &Value) -> Result<(), String> {
    de::<Kind>(v).map(|_| ()).map_err(|_| {
        "must be one of power, energy_total, energy_delta, voltage, current, frequency, power_factor, gauge".into()
    })
}

/// A key checked by its own table (a nested section); nothing to check here.
fn nested(_: &Value) -> Result<(), String> {
    Ok(())
}

const U32: i64 = u32::MAX as i64;
const U16: i64 = u16::MAX as i64;

const STORE: &[Key] = &[
    ("path", string, false),
    ("cache_capacity", size, false),
    ("flush_interval", duration, false),
    ("max_batch", int!(0, U32), false),
    ("quota", size, false),
    ("min_free_space", size, false),
    ("hold_readings", int!(0, U32), false),
    ("compress", boolean, false),
    ("sync_interval", duration, false),
    ("journal_dir", string, false),
    ("journal_segment_size", size, false),
    ("journal_segments", int!(0, U32), false),
    ("upstream_sync_now", boolean, false),
    ("runtime_dir", string, false),
];

const MQTT: &[Key] = &[
    ("topic_prefix", string, false),
    ("broker_config", string, false),
    ("listen", address, false),
    ("users", string_table, false),
    ("homeassistant_discovery", boolean, false),
    ("homeassistant_prefix", string, false),
    ("max_connections", int!(1, U16), false),
    ("republish_max", size, false),
    ("log_segment_size", size, false),
    ("log_segment_count", int!(1, 64), false),
    ("log_max_bytes", size, false),
];

const LOG: &[Key] = &[("level", string, false)];

const HTTP: &[Key] = &[
    ("listen", address, false),
    ("token", string, false),
    ("hostnames", strings, false),
    ("max_body", size, false),
    ("header_timeout", duration, false),
    ("body_timeout", duration, false),
    ("idle_timeout", duration, false),
    ("max_connections", int!(1, 65_536), false),
    ("max_heavy_queries", int!(1, 64), false),
    ("heavy_query_wait", duration, false),
    ("max_ingest_requests", int!(1, 64), false),
    ("max_answer", size, false),
];

const BUS: &[Key] = &[
    ("id", string, true),
    ("type", one_of!("rtu", "tcp", "p1"), true),
    ("port", string, false),
    ("baud_rate", int!(1, U32), false),
    ("parity", one_of!("none", "even", "odd"), false),
    ("data_bits", int!(5, 8), false),
    ("stop_bits", int!(1, 2), false),
    ("address", string, false),
    ("frame_gap", duration, false),
    ("timeout", duration, false),
    ("dsmr", one_of!("2.2", "3", "4", "5"), false),
];

const METER: &[Key] = &[
    ("id", string, true),
    ("bus", string, true),
    // Required on a Modbus bus, absent on a p1 bus: checked with the bus's type.
    ("unit_id", int!(1, 247), false),
    ("profile", string, false),
    ("interval", duration, false),
    ("max_registers_per_request", int!(1, 125), false),
    ("energy_quantity", string, false),
    ("accept_push", boolean, false),
    ("name", string, false),
];

const PROFILE: &[Key] = &[
    ("manufacturer", string, false),
    ("model", string, false),
    ("registers", nested, true),
];

const REGISTER: &[Key] = &[
    ("name", string, true),
    ("address", int!(0, U16), true),
    ("table", one_of!("input", "holding"), false),
    (
        "type",
        one_of!("u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"),
        true,
    ),
    ("word_order", one_of!("high_first", "low_first"), false),
    ("scale", number, false),
    ("unit", string, true),
    ("kind", kind, true),
    ("min", number, false),
    ("max", number, false),
];

const UPSTREAM: &[Key] = &[
    ("host", string, false),
    ("port", int!(0, U16), false),
    ("client_id", string, false),
    ("username", string, false),
    ("password", string, false),
    ("topic_prefix", string, false),
    ("keep_alive", duration, false),
    ("reconnect_min", duration, false),
    ("reconnect_max", duration, false),
    ("batch_records", int!(0, U32), false),
    ("batch_bytes", size, false),
    ("inflight_batches", int!(0, U32), false),
    ("manifest_interval", duration, false),
    ("resend_max_span", int!(0, i64::MAX), false),
    ("retention", duration, false),
    ("tls", nested, false),
];

const TLS: &[Key] = &[
    ("ca_file", string, true),
    ("client_cert", string, false),
    ("client_key", string, false),
];

const ANALYTICS: &[Key] = &[
    ("grace", duration, false),
    ("retention", duration, false),
    ("max_gap", duration, false),
    ("cluster_every", int!(0, i64::MAX), false),
    ("clusters", clusters, false),
    ("persist_every", duration, false),
    ("max_recompute", duration, false),
];

const AVAILABILITY: &[Key] = &[
    ("failed_polls", int!(1, 1000), false),
    ("push_timeout", duration, false),
];

const ALARM: &[Key] = &[
    ("id", string, false),
    ("meter", string, true),
    ("quantity", string, true),
    ("above", number, false),
    ("below", number, false),
    ("count", int!(0, U32), false),
    ("pushed", boolean, false),
];

const TOP: &[Key] = &[
    ("gateway_id", string, true),
    ("store", nested, false),
    ("mqtt", nested, false),
    ("log", nested, false),
    ("http", nested, false),
    ("buses", nested, false),
    ("meters", nested, false),
    ("profiles", nested, false),
    ("upstream", nested, false),
    ("analytics", nested, false),
    ("alarms", nested, false),
    ("availability", nested, false),
];

/// Checks the keys of `table` against `keys`, removing bad ones. `at` is the path
/// prefix (`store`, `meters[main]`; empty at the top).
fn check_keys(at: &str, table: &mut Table, keys: &[Key], errors: &mut Vec<ConfigError>) {
    let path = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    let names: Vec<&str> = keys.iter().map(|(k, _, _)| *k).collect();
    let mut bad = Vec::new();
    for (key, value) in table.iter() {
        match keys.iter().find(|(k, _, _)| k == key) {
            None => {
                let key = crate::config::units::clip(key);
                errors.push(err(
                    path(&key),
                    format!(
                        "unknown field `{key}`; expected one of {}",
                        names.join(", ")
                    ),
                ));
                bad.push(key.clone());
            }
            Some((_, check, _)) => {
                if let Err(reason) = check(value) {
                    errors.push(err(path(key), reason));
                    bad.push(key.clone());
                }
            }
        }
    }
    for key in bad {
        table.remove(&key);
    }
    for (key, _, required) in keys {
        if *required && !table.contains_key(*key) && !errors.iter().any(|e| e.field == path(key)) {
            errors.push(err(path(key), "is required"));
        }
    }
}

/// A section that must be a table: checked with `keys`, or removed if not a table.
fn section(
    at: &str,
    parent: &mut Table,
    key: &str,
    keys: &[Key],
    errors: &mut Vec<ConfigError>,
) -> Option<()> {
    let value = parent.get_mut(key)?;
    match value {
        Value::Table(table) => {
            check_keys(at, table, keys, errors);
            Some(())
        }
        other => {
            errors.push(err(at, format!("must be a table, not {}", kind_of(other))));
            parent.remove(key);
            None
        }
    }
}

/// An array of tables (`[[meters]]`), each entry named by its `id` (or position).
fn entries(
    name: &str,
    parent: &mut Table,
    keys: &[Key],
    errors: &mut Vec<ConfigError>,
    dropped: &mut Vec<String>,
) {
    let Some(value) = parent.get_mut(name) else {
        return;
    };
    let Value::Array(items) = value else {
        errors.push(err(
            name,
            format!(
                "must be an array of tables ([[{name}]]), not {}",
                kind_of(value)
            ),
        ));
        parent.remove(name);
        return;
    };
    let mut keep = Vec::with_capacity(items.len());
    for (i, item) in std::mem::take(items).into_iter().enumerate() {
        let Value::Table(mut table) = item else {
            errors.push(err(format!("{name}[{i}]"), "must be a table"));
            continue;
        };
        let id = table
            .get("id")
            .and_then(Value::as_str)
            .map(crate::config::units::clip)
            .unwrap_or_default();
        // Named as validation names them: by id, else by position (alarms: `alarm<N>`).
        let at = match (id.is_empty(), name) {
            (true, "alarms") => format!("{name}[alarm{}]", i + 1),
            _ => format!("{name}[{}]", display_id(&id, i)),
        };
        check_keys(&at, &mut table, keys, errors);
        // An entry missing a required key cannot be deserialized: leave it out.
        if keys
            .iter()
            .all(|(k, _, required)| !required || table.contains_key(*k))
        {
            keep.push(Value::Table(table));
        } else if !id.is_empty() {
            dropped.push(id);
        }
    }
    *items = keep;
}

/// Checks every key of a parsed configuration; removes the bad ones from `table`.
/// Also returns the ids of entries left out whole (a required key was bad or
/// missing), whose references elsewhere are then not errors of their own.
pub fn check(table: &mut Table) -> (Vec<ConfigError>, Vec<String>) {
    let mut errors = Vec::new();
    let mut dropped = Vec::new();
    check_keys("", table, TOP, &mut errors);
    section("store", table, "store", STORE, &mut errors);
    section("mqtt", table, "mqtt", MQTT, &mut errors);
    section("log", table, "log", LOG, &mut errors);
    section("http", table, "http", HTTP, &mut errors);
    section("analytics", table, "analytics", ANALYTICS, &mut errors);
    section(
        "availability",
        table,
        "availability",
        AVAILABILITY,
        &mut errors,
    );
    if section("upstream", table, "upstream", UPSTREAM, &mut errors).is_some() {
        if let Some(Value::Table(upstream)) = table.get_mut("upstream") {
            section("upstream.tls", upstream, "tls", TLS, &mut errors);
        }
    }
    entries("buses", table, BUS, &mut errors, &mut dropped);
    entries("meters", table, METER, &mut errors, &mut dropped);
    entries("alarms", table, ALARM, &mut errors, &mut dropped);
    if let Some(value) = table.get_mut("profiles") {
        match value {
            Value::Table(profiles) => {
                let names: Vec<String> = profiles.keys().cloned().collect();
                for name in names {
                    let at = format!("profiles.{}", crate::config::units::clip(&name));
                    if section(&at, profiles, &name, PROFILE, &mut errors).is_none() {
                        continue;
                    }
                    let Some(Value::Table(profile)) = profiles.get_mut(&name) else {
                        continue;
                    };
                    registers(&at, profile, &mut errors);
                }
            }
            other => {
                errors.push(err(
                    "profiles",
                    format!("must be a table of register maps, not {}", kind_of(other)),
                ));
                table.remove("profiles");
            }
        }
    }
    (errors, dropped)
}

/// `registers` of a profile: an array of register tables, named by position.
fn registers(at: &str, profile: &mut Table, errors: &mut Vec<ConfigError>) {
    let Some(value) = profile.get_mut("registers") else {
        return;
    };
    let Value::Array(items) = value else {
        errors.push(err(
            format!("{at}.registers"),
            format!(
                "must be an array of register tables, not {}",
                kind_of(value)
            ),
        ));
        profile.remove("registers");
        return;
    };
    let mut keep = Vec::with_capacity(items.len());
    for (j, item) in std::mem::take(items).into_iter().enumerate() {
        let rat = format!("{at}.registers[{j}]");
        let Value::Table(mut table) = item else {
            errors.push(err(
                rat,
                "must be a table {name, address, type, unit, kind, ...}",
            ));
            continue;
        };
        check_keys(&rat, &mut table, REGISTER, errors);
        if REGISTER
            .iter()
            .all(|(k, _, required)| !required || table.contains_key(*k))
        {
            keep.push(Value::Table(table));
        }
    }
    *items = keep;
}
