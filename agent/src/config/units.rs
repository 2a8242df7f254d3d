//! The leaf of the configuration: durations, byte sizes and config errors.
//!
//! Every stage's config section (`acquire::config`, `store::config`, ...) is built
//! from these and reports its problems as [`ConfigError`]s; this module imports no
//! other module of the crate, so any stage may use it (see the layering in
//! `agent/tests/module_graph.rs`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A configuration problem, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the bad field, e.g. `meters[main].unit_id`; empty for a syntax error.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// All problems found in one configuration, so an operator fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Longest field path and reason reported: text quoted from the file is cut.
const MAX_FIELD_TEXT: usize = 256;
const MAX_REASON_TEXT: usize = 1024;

/// Cuts `text` to at most `max` bytes (on a char boundary) plus `…`.
pub fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push('…');
    }
}

/// Errors with their texts cut to a bounded length.
pub fn bounded(mut errors: Vec<ConfigError>) -> ConfigErrors {
    for e in &mut errors {
        cut(&mut e.field, MAX_FIELD_TEXT);
        cut(&mut e.reason, MAX_REASON_TEXT);
    }
    ConfigErrors(errors)
}

/// A duration written the human way: `500ms`, `15m`, `1h 30m`.
/// Kept over `humantime-serde`: the same humantime parser, plus a refusal of negative
/// durations and an error text that shows the accepted forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "duration `{text}` is negative"
            )));
        }
        humantime::parse_duration(trimmed)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration like `500ms` or `15m`: {e}"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A byte size: an integer number of bytes, or a string such as `64MiB`, `512 KB`.
/// Kept over the `bytesize` crate: 40 lines that accept exactly the units
/// docs/configuration.md lists, and error texts that quote the value and its field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let shown = clip(text);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{shown}` is not a size like `64MiB` or `1048576`"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            "p" | "pb" => 1_000_000_000_000_000,
            "pib" => 1 << 50,
            other => {
                return Err(format!(
                    "unknown size unit `{}` in `{shown}` (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB, PB, PiB)",
                    clip(other)
                ))
            }
        };
        let bytes = num * mult as f64;
        // 2^64: the first f64 past u64::MAX.
        if !bytes.is_finite() || bytes >= 18_446_744_073_709_551_616.0 {
            return Err(format!(
                "`{shown}` is beyond the largest size a u64 can count (16EiB)"
            ));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(ByteSize(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!("size {n} is negative"))),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// An id: 1-64 characters of a-z, A-Z, 0-9, `-` or `_`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An entry's id for a field path, or its position when it has none.
pub fn display_id(id: &str, index: usize) -> String {
    if id.is_empty() {
        index.to_string()
    } else {
        id.to_string()
    }
}

/// Most characters of input text quoted in one problem (the rest is cut, `…`).
pub const MAX_QUOTED: usize = 64;

/// `text` cut to [`MAX_QUOTED`] characters, for quoting input in a problem.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}
