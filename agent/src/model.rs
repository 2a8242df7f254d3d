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
    /// The device says it does not implement the point (a SunSpec "not
    /// implemented" value such as int16 0x8000, or its scale factor is one).
    NotImplemented,
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
    /// What number type the value came as, which decides how it is printed. Left
    /// out for [`Source::F32`], so records stored before the tag decode as before.
    #[serde(rename = "s", default, skip_serializing_if = "Source::is_f32")]
    pub source: Source,
}

impl Value {
    /// The value as a JSON number (null without a number), printed for its
    /// [`Source`]: see [`number_json`].
    pub fn number_json(&self) -> serde_json::Value {
        self.value
            .map_or(serde_json::Value::Null, |v| number_json(v, self.source))
    }
}

/// The number type a value came as: a float32 register, an integer register, or a
/// float64 (a push, a float64 register, a scaled float32). It decides how the value
/// is printed (see [`number_json`]), so what a subscriber reads is the number the
/// source served.
///
/// Stored as a small unsigned integer code that never changes meaning (key `s` of a
/// stored value; absent means `F32`), so a positional record format can carry it as
/// one byte per value. A code this version does not know decodes as `F64`, the form
/// that prints any stored number exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Source {
    /// Code 0: a float32 register at scale 1, or a value stored before the tag
    /// existed. Printed in f32's shortest form when it is exactly an f32.
    #[default]
    F32,
    /// Code 1: an integer register (counter), scaled or not.
    Int,
    /// Code 2: a float64: a pushed value, a float64 register, a scaled float32.
    F64,
}

impl Source {
    /// The stored code.
    pub fn code(self) -> u8 {
        match self {
            Source::F32 => 0,
            Source::Int => 1,
            Source::F64 => 2,
        }
    }

    /// The source of a stored code; unknown codes are `F64` (exact printing).
    pub fn from_code(code: u64) -> Source {
        match code {
            0 => Source::F32,
            1 => Source::Int,
            _ => Source::F64,
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == Source::F32
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Source, D::Error> {
        u64::deserialize(d).map(Source::from_code)
    }
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
    /// A power cut took the store's runtime journal: records sent upstream before
    /// their journal sync (under the seq lease) may be lost, and the seqs up to the
    /// lease are never used again. `ranges` names them; most were never used at all.
    PowerCut,
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
    pub interval: Interval,
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

/// The current values of readings sorted by time (equal timestamps in seq order, as
/// [`crate::store::Store::readings`] returns them): a value is superseded by a value
/// of the same meter, quantity and timestamp in a later record (a correction, see
/// the push-ingest contract), and a record left without values is dropped. Records
/// of other payloads pass unchanged.
pub fn current_readings(mut records: Vec<Record>) -> Vec<Record> {
    fn key(r: &Record) -> Option<(i64, &str)> {
        r.payload.as_reading().map(|x| (x.ts_ms, x.meter.as_str()))
    }
    let mut superseded = Vec::new();
    let mut start = 0;
    for i in 1..=records.len() {
        if i < records.len()
            && key(&records[i]).is_some()
            && key(&records[i]) == key(&records[i - 1])
        {
            continue;
        }
        // Records start..i share meter and timestamp: the newest value of a quantity wins.
        if i - start > 1 {
            let mut seen: Vec<String> = Vec::new();
            for rec in records[start..i].iter_mut().rev() {
                if let Payload::Reading(r) = &mut rec.payload {
                    let had = r.values.len();
                    let quantities: Vec<String> =
                        r.values.iter().map(|v| v.quantity.clone()).collect();
                    r.values.retain(|v| !seen.contains(&v.quantity));
                    if had > 0 && r.values.is_empty() {
                        superseded.push(rec.seq);
                    }
                    seen.extend(quantities);
                }
            }
        }
        start = i;
    }
    if !superseded.is_empty() {
        records.retain(|r| !superseded.contains(&r.seq));
    }
    records
}

/// Formats a number of `source` as the shortest decimal that reads back as the same
/// value: [`shortest_number`] for an f32 register (the number the meter served),
/// [`shortest_f64`] for integers and float64s (a pushed 51.001953125 stays
/// 51.001953125 even though it is also an f32).
pub fn number_json(v: f64, source: Source) -> serde_json::Value {
    match source {
        Source::F32 => shortest_number(v),
        Source::Int | Source::F64 => shortest_f64(v),
    }
}

/// Formats an f64 as the shortest decimal that reads back as the same f64: an
/// integer-valued number below 2^53 as an integer (`12`, not `12.0`), anything else
/// in f64's shortest form (`0.1`, `1e-300`). Non-finite: null.
pub fn shortest_f64(v: f64) -> serde_json::Value {
    const EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT_INT && !(v == 0.0 && v.is_sign_negative()) {
        return serde_json::Value::from(v as i64);
    }
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
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

/// Last instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const RFC3339_MAX_MS: i64 = 253_402_300_799_999;

/// RFC 3339 UTC timestamp with milliseconds. RFC 3339 has four-digit years: times
/// outside 1970..=9999 are written as the nearest end of that range (never a panic).
pub fn rfc3339_ms(ts_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(ts_ms.clamp(0, RFC3339_MAX_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Length of one interval in milliseconds (15 minutes).
pub const INTERVAL_MS: i64 = 15 * 60 * 1000;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Quality flags of an interval or window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalFlags {
    /// Part of the interval has no data (coverage < 1).
    #[serde(default, skip_serializing_if = "is_false")]
    pub gap: bool,
    /// A counter reset or meter swap happened in it (see `derive::intervals`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset: bool,
    /// Some of its energy rests on an assumption: a final sample's typical spacing,
    /// or energy spread over a stretch longer than `max_gap`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub estimated: bool,
}

impl IntervalFlags {
    pub fn is_empty(&self) -> bool {
        !(self.gap || self.reset || self.estimated)
    }

    /// Sets every flag that `other` has.
    pub fn merge(&mut self, other: IntervalFlags) {
        self.gap |= other.gap;
        self.reset |= other.reset;
        self.estimated |= other.estimated;
    }
}

/// One 15-minute interval of one meter's quantity. Serialized with short field names
/// (`s`, `kwh`, `n`, `cov`, `pmin`, `pavg`, `pmax`, `f`, `rev`) for storage and
/// publishing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Interval start, Unix ms UTC (a multiple of [`INTERVAL_MS`]).
    #[serde(rename = "s")]
    pub start_ms: i64,
    /// Energy in the interval, kWh.
    #[serde(rename = "kwh")]
    pub energy_kwh: f64,
    /// Samples whose timestamp lies in the interval.
    #[serde(rename = "n")]
    pub samples: u32,
    /// Fraction of the interval backed by data, 0..=1.
    #[serde(rename = "cov")]
    pub coverage: f64,
    /// Lowest power held in the interval, W.
    #[serde(rename = "pmin", default, skip_serializing_if = "Option::is_none")]
    pub min_w: Option<f64>,
    /// Energy over covered time, W.
    #[serde(rename = "pavg", default, skip_serializing_if = "Option::is_none")]
    pub mean_w: Option<f64>,
    /// Highest power held in the interval, W.
    #[serde(rename = "pmax", default, skip_serializing_if = "Option::is_none")]
    pub max_w: Option<f64>,
    #[serde(rename = "f", default, skip_serializing_if = "IntervalFlags::is_empty")]
    pub flags: IntervalFlags,
    /// 0 when first published; each correction by late data adds 1.
    #[serde(rename = "rev", default)]
    pub revision: u32,
}

impl Interval {
    /// End of the interval (exclusive), Unix ms.
    pub fn end_ms(&self) -> i64 {
        self.start_ms.saturating_add(INTERVAL_MS)
    }

    /// Same figures (to 1e-12 relative: a value restored from JSON may differ in the
    /// last place) and flags, whatever the revision.
    pub fn same_content(&self, other: &Interval) -> bool {
        fn near(a: f64, b: f64) -> bool {
            a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
        }
        fn near_opt(a: Option<f64>, b: Option<f64>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => near(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        self.start_ms == other.start_ms
            && near(self.energy_kwh, other.energy_kwh)
            && self.samples == other.samples
            && near(self.coverage, other.coverage)
            && near_opt(self.min_w, other.min_w)
            && near_opt(self.mean_w, other.mean_w)
            && near_opt(self.max_w, other.max_w)
            && self.flags == other.flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_covers_every_i64_without_panicking() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(RFC3339_MAX_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

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

    /// Pushed float64s that read back wrong in f32's shortest form, and others.
    pub const PUSHED_F64: [f64; 6] = [
        51.001953125,
        0.5000000596046448,
        0.1,
        1e-300,
        17_179_869_184.0,
        -0.0,
    ];

    #[test]
    fn float64_values_print_as_float64s_and_read_back_bit_for_bit() {
        for v in PUSHED_F64 {
            let text = number_json(v, Source::F64).to_string();
            let back: f64 = serde_json::from_str(&text).expect("a JSON number");
            assert_eq!(back.to_bits(), v.to_bits(), "{v:e} printed as {text}");
        }
        assert_eq!(
            number_json(51.001953125, Source::F64).to_string(),
            "51.001953125"
        );
        assert_eq!(
            number_json(0.5000000596046448, Source::F64).to_string(),
            "0.5000000596046448"
        );
        assert_eq!(
            number_json(17_179_869_184.0, Source::F64).to_string(),
            "17179869184"
        );
        assert_eq!(number_json(1e-300, Source::F64).to_string(), "1e-300");
        assert_eq!(number_json(12.0, Source::F64).to_string(), "12");
        // f32's shortest form loses them: what a float32 register keeps.
        assert_eq!(
            number_json(51.001953125, Source::F32).to_string(),
            "51.001953"
        );
        assert_eq!(
            number_json(17_179_869_184.0, Source::F32).to_string(),
            "17179870000"
        );
        // An integer register prints its integer.
        assert_eq!(
            number_json(4_294_967_040.0, Source::Int).to_string(),
            "4294967040"
        );
        assert_eq!(number_json(8578.88, Source::Int).to_string(), "8578.88");
    }

    fn value(source: Source, v: f64) -> Value {
        Value {
            quantity: "power".into(),
            unit: "W".into(),
            kind: Kind::Power,
            value: Some(v),
            invalid: None,
            source,
        }
    }

    fn cbor<T: Serialize>(t: &T) -> Vec<u8> {
        let mut out = Vec::new();
        // Serializing plain data into a Vec cannot fail.
        ciborium::into_writer(t, &mut out).expect("encodes");
        out
    }

    #[test]
    fn values_stored_before_the_source_tag_decode_as_before() {
        // A value as the agent stored it before the tag: {q, u, k, v}.
        let old = ciborium::Value::Map(vec![
            ("q".into(), "power".into()),
            ("u".into(), "W".into()),
            ("k".into(), "power".into()),
            ("v".into(), ciborium::Value::Float(51.001953125)),
        ]);
        let bytes = cbor(&old);
        let decoded: Value = ciborium::from_reader(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, value(Source::F32, 51.001953125));
        assert_eq!(decoded.number_json().to_string(), "51.001953");
        // A float32 value is stored exactly as before (no tag, same bytes).
        assert_eq!(cbor(&value(Source::F32, 51.001953125)), bytes);
        // A whole old reading record decodes too.
        let record = ciborium::Value::Map(vec![
            ("seq".into(), 7.into()),
            (
                "payload".into(),
                ciborium::Value::Map(vec![(
                    "reading".into(),
                    ciborium::Value::Map(vec![
                        ("m".into(), "pv".into()),
                        ("t".into(), 1_535_068_800_000i64.into()),
                        ("vs".into(), ciborium::Value::Array(vec![old])),
                    ]),
                )]),
            ),
        ]);
        let rec: Record = ciborium::from_reader(cbor(&record).as_slice()).expect("decodes");
        let r = rec.payload.as_reading().expect("a reading");
        assert_eq!(r.values, vec![value(Source::F32, 51.001953125)]);
    }

    #[test]
    fn the_source_tag_is_one_small_code_and_round_trips() {
        for (source, code) in [(Source::Int, 1u8), (Source::F64, 2)] {
            let v = value(source, 0.5000000596046448);
            let bytes = cbor(&v);
            let plain = cbor(&value(Source::F32, 0.5000000596046448));
            // Key `s` (2 bytes) and a one-byte code.
            assert_eq!(bytes.len(), plain.len() + 3);
            assert_eq!(bytes[bytes.len() - 1], code);
            let back: Value = ciborium::from_reader(bytes.as_slice()).expect("decodes");
            assert_eq!(back, v);
            assert_eq!(
                back.value.map(f64::to_bits),
                Some(0.5000000596046448f64.to_bits())
            );
        }
        assert_eq!(Source::from_code(9), Source::F64);
    }

    fn reading(seq: u64, ts_ms: i64, values: &[(&str, f64)]) -> Record {
        Record {
            seq,
            payload: Payload::Reading(Reading {
                meter: "pv".into(),
                ts_ms,
                values: values
                    .iter()
                    .map(|(q, v)| Value {
                        quantity: q.to_string(),
                        ..value(Source::F64, *v)
                    })
                    .collect(),
            }),
        }
    }

    #[test]
    fn a_later_record_at_the_same_timestamp_supersedes_values_of_its_quantities() {
        let records = vec![
            reading(1, 1000, &[("power", 1.0), ("energy_total", 5.0)]),
            reading(2, 2000, &[("power", 7.0)]),
            reading(3, 2000, &[("power", 8.0)]),
            reading(4, 1000, &[("power", 2.0)]),
            reading(5, 1000, &[("energy_total", 6.0)]),
            reading(6, 3000, &[("power", 9.0)]),
        ];
        // Sorted by time, then seq, as the store reads them.
        let mut sorted = records.clone();
        sorted.sort_by_key(|r| (r.payload.ts_ms(), r.seq));
        let current = current_readings(sorted);
        type Seen = (u64, i64, Vec<(String, f64)>);
        let seen: Vec<Seen> = current
            .iter()
            .map(|r| {
                let x = r.payload.as_reading().expect("a reading");
                (
                    r.seq,
                    x.ts_ms,
                    x.values
                        .iter()
                        .map(|v| (v.quantity.clone(), v.value.unwrap_or(f64::NAN)))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (4, 1000, vec![("power".into(), 2.0)]),
                (5, 1000, vec![("energy_total".into(), 6.0)]),
                (3, 2000, vec![("power".into(), 8.0)]),
                (6, 3000, vec![("power".into(), 9.0)]),
            ]
        );
        // Nothing shared: unchanged.
        let plain = vec![records[0].clone(), records[1].clone()];
        assert_eq!(current_readings(plain.clone()), plain);
    }
}
