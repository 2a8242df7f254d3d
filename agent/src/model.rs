//! Shared types that travel between the pipeline stages.
//!
//! A [`Reading`] is one poll of one meter (or one pushed point): a timestamp and the
//! values of several quantities. The store wraps payloads into [`Record`]s that carry
//! the gateway-wide sequence number.

use serde::{Deserialize, Serialize};

/// What a quantity measures, which decides how energy is derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Instantaneous active power (W, kW).
    Power,
    /// Cumulative energy register (Wh, kWh): only goes up, except on a reset.
    EnergyTotal,
    /// Energy consumed since this point's timestamp until the next point.
    EnergyDelta,
    Voltage,
    Current,
    Frequency,
    PowerFactor,
    /// Reactive or apparent power, angles and anything else that is only displayed.
    Gauge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Power => "power",
            Kind::EnergyTotal => "energy_total",
            Kind::EnergyDelta => "energy_delta",
            Kind::Voltage => "voltage",
            Kind::Current => "current",
            Kind::Frequency => "frequency",
            Kind::PowerFactor => "power_factor",
            Kind::Gauge => "gauge",
        }
    }
}

/// Why a value read from a meter is not stored as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Invalid {
    /// The register held a NaN.
    Nan,
    /// The register held +/- infinity.
    Infinite,
    /// A finite number outside the profile's plausible range for the quantity.
    OutOfRange,
}

/// One quantity in a reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Value {
    /// Quantity name from the profile, e.g. `power_l1`.
    #[serde(rename = "q")]
    pub quantity: String,
    /// Unit as served, e.g. `W`, `kWh`.
    #[serde(rename = "u")]
    pub unit: String,
    #[serde(rename = "k")]
    pub kind: Kind,
    /// The decoded, scaled value; `None` when it was not a plausible number.
    #[serde(rename = "v")]
    pub value: Option<f64>,
    /// Set when `value` is `None`: why.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<Invalid>,
}

/// One poll of one meter: all values share the timestamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    #[serde(rename = "m")]
    pub meter: String,
    /// Milliseconds since the Unix epoch, UTC.
    #[serde(rename = "t")]
    pub ts_ms: i64,
    #[serde(rename = "vs")]
    pub values: Vec<Value>,
}

/// What a stored record holds. New payload kinds are added as variants; the
/// variant name is stored, so existing records keep decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    Reading(Reading),
    /// A closed 15-minute energy interval (or a revision of one).
    Interval(IntervalRecord),
    /// An alarm event (raised or cleared).
    Event(AlarmEvent),
    /// Records or readings the gateway lost: deleted by the store's quota before
    /// upstream acknowledged them, or dropped from memory while the disk was full.
    Dropped(DropEvent),
}

/// Why records or readings were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The store reached its quota with nothing acknowledged left to delete: the
    /// oldest unacknowledged records were deleted. `ranges` names their seqs.
    Quota,
    /// The store could not write (disk full) and more readings arrived than the
    /// memory bound holds: the oldest held ones were dropped. They never had a seq.
    DiskFull,
}

/// A drop event, stored as a record so it goes upstream like any other: the
/// upstream side learns which seqs will never arrive and stops asking for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEvent {
    pub reason: DropReason,
    /// Seq ranges (inclusive, ascending) this event accounts for. Includes the
    /// ranges of earlier drop events that were themselves deleted before delivery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<(u64, u64)>,
    /// Records (or readings) dropped in this event.
    pub count: u64,
    /// Records and readings dropped since the store was created, this event included.
    pub total: u64,
    /// When, Unix ms.
    pub ts_ms: i64,
}

/// A closed 15-minute interval of one meter's energy quantity, as stored and sent
/// upstream. A revision of an interval is a new record with a higher `revision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalRecord {
    #[serde(rename = "m")]
    pub meter: String,
    /// The quantity the energy was derived from, e.g. `energy_total`.
    #[serde(rename = "q")]
    pub quantity: String,
    #[serde(rename = "iv")]
    pub interval: crate::derive::Interval,
}

/// Whether an alarm event starts or ends an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    Raised,
    Cleared,
}

/// An alarm event: a rule's warnings reached its count (`raised`), or a normal
/// reading ended a raised alarm (`cleared`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEvent {
    pub meter: String,
    /// The rule's id from the config.
    pub rule: String,
    pub quantity: String,
    pub state: AlarmState,
    /// The value of the reading that raised or cleared the alarm.
    pub value: f64,
    pub threshold: f64,
    /// Timestamp of that reading, Unix ms.
    pub ts_ms: i64,
    /// Readings beyond the threshold in a row when raised; those before the normal
    /// reading when cleared.
    pub count: u32,
}

impl Payload {
    /// Short name of the payload kind, as used in upstream batches and metrics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Payload::Reading(_) => "reading",
            Payload::Interval(_) => "interval",
            Payload::Event(_) => "event",
            Payload::Dropped(_) => "dropped",
        }
    }

    /// The reading, when this payload is one.
    pub fn as_reading(&self) -> Option<&Reading> {
        match self {
            Payload::Reading(r) => Some(r),
            _ => None,
        }
    }

    /// Timestamp of the payload, Unix milliseconds: when a reading was taken, the
    /// start of an interval, when an event's reading was taken, when a drop happened.
    pub fn ts_ms(&self) -> i64 {
        match self {
            Payload::Reading(r) => r.ts_ms,
            Payload::Interval(i) => i.interval.start_ms,
            Payload::Event(e) => e.ts_ms,
            Payload::Dropped(d) => d.ts_ms,
        }
    }
}

/// A payload with the gateway-wide sequence number the store assigned to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub payload: Payload,
}

/// Formats a number as the shortest decimal that reads back as the same value.
///
/// Meters serve f32; a value that is exactly an f32 is printed the way `f32`'s
/// `Display` prints it (`230.1`, not `230.10000610351562`), so a subscriber gets
/// exactly the number the meter served. Other values use f64's shortest form.
pub fn shortest_number(v: f64) -> serde_json::Value {
    if v.is_finite() && (v as f32) as f64 == v {
        let text = (v as f32).to_string();
        // Parsing our own Display output cannot fail; fall back to f64 regardless.
        if let Ok(n) = text.parse::<serde_json::Number>() {
            return serde_json::Value::Number(n);
        }
    }
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_number_prints_f32_values_as_served() {
        let served: f32 = 230.1;
        assert_eq!(shortest_number(served as f64).to_string(), "230.1");
        assert_eq!(shortest_number(0.1f64).to_string(), "0.1");
        assert_eq!(shortest_number(1234.56f64).to_string(), "1234.56");
        assert_eq!(shortest_number(f64::NAN), serde_json::Value::Null);
        let back: f32 = shortest_number(served as f64)
            .as_f64()
            .map(|v| v as f32)
            .unwrap_or(f32::NAN);
        assert_eq!(back.to_bits(), served.to_bits());
    }
}
