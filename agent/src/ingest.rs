//! Push ingest: readings that local devices send (the HTTP and MQTT front ends call
//! this library API).
//!
//! A push is one or more [`Series`]: `{meter, unit, kind, points: [{ts, value}]}`.
//!
//! - `kind` is `power` (unit `W` or `kW`; negative values are allowed and mean
//!   export), `energy_delta` or `energy_total` (unit `Wh` or `kWh`; never negative).
//! - `ts` is an RFC 3339 string (`2019-01-05T04:42:00Z`, `…00.250+01:00`; `T`, `t`
//!   or a space between date and time; fractions beyond milliseconds are truncated;
//!   no leap second) or an integer of Unix milliseconds. It must not be before 1970
//!   nor more than [`IngestLimits::max_future`] (default 5 minutes) ahead of the
//!   gateway's clock.
//! - `value` is a finite JSON number with `|value| <= 1e12`. Strings such as `"NaN"`
//!   are named as bad points. (JSON itself cannot carry NaN, and a number too large
//!   for an f64 fails the whole document's parse.)
//! - `meter` is 1-64 characters of `a-z A-Z 0-9 - _`, as configured meter ids.
//!
//! A batch with any problem is rejected whole: [`IngestError::Rejected`] lists the
//! problems with the field path (`series[0].points[3].ts`) and the timestamp text, and
//! nothing of the batch is stored. At most [`MAX_PROBLEMS`] problems are kept (the
//! rest are only counted: [`ProblemList::total`]), and text quoted from the input is
//! cut to [`MAX_QUOTED`] characters, so a bad batch costs bounded memory to answer. A timestamp given twice for the same meter and
//! kind inside one batch is such a problem (ambiguous: which value is right?).
//!
//! Accepted points become [`Reading`]s, one per meter and timestamp, with one
//! [`Value`] per series whose quantity is named after the kind (`power`,
//! `energy_delta`, `energy_total`, as in the built-in meter profiles, so pushed and
//! polled readings of a quantity line up) and the unit as sent. They are written
//! with one all-or-nothing [`BatchWriter::submit_batch`], so they take the same path
//! as polled readings (store, committed broadcast, publish), and [`ingest`] returns
//! once they are durable.
//!
//! A point whose meter, quantity and timestamp are already stored with the same value
//! and unit is skipped and counted, so a device that resends after a lost answer
//! stores nothing twice. A *different* value at a stored point is a conflict: the
//! whole batch is refused ([`IngestError::Conflict`], each [`Conflict`] naming the
//! meter, quantity, timestamp, stored and offered value), unless the push allows
//! corrections of that series ([`Correct`]: `"correct": true` on a JSON series,
//! `?correct=true` over HTTP). A correction is stored as a new record; reads
//! ([`crate::store::Store::readings`]) then show the newest record's value of a quantity at a
//! timestamp, and the intervals take it like any late point (a revision).
//! Concurrent pushes of the same point are serialised by an in-flight set: the
//! second one counts the point as skipped when its value is the same, and is a
//! conflict (retry later) when not.
//!
//! Front ends: [`wire`] turns JSON and CSV bodies into checked series (every bad
//! point named); the MQTT front end is `broker::ingest` (pushes taken from the
//! embedded broker) and the HTTP one `status::ingest_http`. They share an
//! [`Ingestor`] (store handles, limits, counters) and store through
//! [`store_readings`].
//!
//! Ingest sits beside acquire, below the store: it reaches the store and the
//! analytics' watermarks through the traits of [`sink`] ([`StoredPoints`],
//! [`BatchWriter`], [`IntervalWatermarks`]), which those stages implement.

mod service;
pub mod sink;
pub mod wire;

pub use service::{IngestCounters, Ingestor, RejectReason, Transport, TransportCounts};
pub use sink::{BatchWriter, IntervalWatermarks, StoreFailure, StoredPoints, WriterClosed};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{rfc3339_ms, Kind, Payload, Reading, Record, Source, Value};

/// Largest magnitude of a pushed value, in the unit sent: beyond any meter.
pub const MAX_ABS_VALUE: f64 = 1e12;

/// Most problems kept for one rejected batch; the rest are counted.
pub const MAX_PROBLEMS: usize = 100;

pub use crate::config::units::{clip, MAX_QUOTED};

/// One quantity of one meter over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub meter: String,
    /// `W`, `kW` (power) or `Wh`, `kWh` (energy kinds).
    pub unit: String,
    /// `power`, `energy_delta` or `energy_total`.
    pub kind: Kind,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub ts: Timestamp,
    pub value: PointValue,
}

/// A point's timestamp as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Timestamp {
    /// Unix milliseconds.
    UnixMs(i64),
    /// RFC 3339.
    Text(String),
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timestamp::UnixMs(ms) => write!(f, "{ms}"),
            Timestamp::Text(t) => write!(f, "{t}"),
        }
    }
}

/// A point's value as sent: a number, or anything else (named as a bad point).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PointValue {
    Number(f64),
    Other(serde_json::Value),
}

impl From<f64> for PointValue {
    fn from(v: f64) -> Self {
        PointValue::Number(v)
    }
}

impl Point {
    pub fn new(ts_ms: i64, value: f64) -> Point {
        Point {
            ts: Timestamp::UnixMs(ts_ms),
            value: PointValue::Number(value),
        }
    }
}

/// Limits of what is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IngestLimits {
    /// How far ahead of the gateway's clock a timestamp may be.
    pub max_future: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_future: Duration::from_secs(300),
        }
    }
}

/// One reason a batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Path of the bad field, e.g. `series[0].points[3].ts`, `series[1].unit`, or
    /// `line[4].timestamp` for CSV; `body` when the body as a whole is unreadable.
    pub field: String,
    /// Index of the series in the batch, for series and point problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub series: Option<usize>,
    /// Index of the point in its series, for point problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<usize>,
    /// The point's timestamp as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<String>,
    /// Line of the body (from 1), for CSV bodies and unparseable JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub reason: String,
}

impl Problem {
    /// A problem with the whole body or a part that is not a series or point.
    pub fn at(field: impl Into<String>, reason: impl Into<String>) -> Problem {
        Problem {
            field: field.into(),
            series: None,
            point: None,
            ts: None,
            line: None,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.ts {
            Some(ts) => write!(f, "{} (ts `{ts}`): {}", self.field, self.reason),
            None => write!(f, "{}: {}", self.field, self.reason),
        }
    }
}

/// The problems of one batch: the first [`MAX_PROBLEMS`] found are kept, every one
/// is counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProblemList {
    pub list: Vec<Problem>,
    /// Problems found, kept or not.
    pub total: usize,
}

impl ProblemList {
    pub fn push(&mut self, problem: Problem) {
        self.total += 1;
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(problem);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Whether problems were found beyond the ones kept.
    pub fn truncated(&self) -> bool {
        self.total > self.list.len()
    }
}

/// Which stored points a batch may correct, that is replace with a different value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Correct {
    /// None: a different value at a stored point refuses the batch.
    #[default]
    None,
    /// Every point of the batch (HTTP `?correct=true`).
    All,
    /// The points of these (meter, quantity) series (`"correct": true` on a JSON
    /// series).
    Series(HashSet<(String, String)>),
}

impl Correct {
    /// Whether points of `meter`'s `quantity` may replace stored values.
    pub fn allows(&self, meter: &str, quantity: &str) -> bool {
        match self {
            Correct::None => false,
            Correct::All => true,
            Correct::Series(set) => set.contains(&(meter.to_string(), quantity.to_string())),
        }
    }
}

/// A pushed point whose meter, quantity and timestamp hold a different value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    pub meter: String,
    pub quantity: String,
    pub ts_ms: i64,
    /// The value stored (`None`: stored as not a number), and its unit.
    pub stored: Option<f64>,
    pub stored_unit: String,
    /// The value this push offers, and its unit.
    pub offered: Option<f64>,
    pub offered_unit: String,
    /// The stored value is another push's, not yet durable (retry later).
    pub pending: bool,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let number = |v: Option<f64>, unit: &str| match v {
            Some(v) => format!("{v} {unit}"),
            None => "no number".to_string(),
        };
        write!(
            f,
            "meter `{}` {} at {} ({} ms) {} {}, this push offers {}",
            self.meter,
            self.quantity,
            rfc3339_ms(self.ts_ms),
            self.ts_ms,
            if self.pending {
                "is being stored by another push as"
            } else {
                "is stored as"
            },
            number(self.stored, &self.stored_unit),
            number(self.offered, &self.offered_unit),
        )?;
        if self.pending {
            f.write_str("; push again once that push is answered")
        } else {
            f.write_str("; send \"correct\": true with the series to replace the stored value")
        }
    }
}

/// The conflicts of one refused batch: the first [`MAX_PROBLEMS`] kept, all counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConflictList {
    pub list: Vec<Conflict>,
    pub total: usize,
}

impl ConflictList {
    fn push(&mut self, conflict: Conflict) {
        self.total += 1;
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(conflict);
        }
    }
}

impl fmt::Display for ConflictList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(first) = self.list.first() {
            write!(f, "{first}")?;
        }
        if self.total > 1 {
            write!(f, " (and {} more)", self.total - 1)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Bad input; nothing of the batch was stored.
    #[error("batch rejected, nothing stored: {}", list(.0))]
    Rejected(ProblemList),
    /// A point's meter, quantity and timestamp already hold a different value and
    /// the batch does not correct it; nothing of the batch was stored.
    #[error("batch refused, nothing stored: {0}")]
    Conflict(ConflictList),
    /// The store could not make the batch durable; nothing of it counts as stored.
    #[error("batch not stored: {0}")]
    Store(#[from] StoreFailure),
}

impl IngestError {
    /// The problems of a rejected batch; empty for a store failure.
    pub fn problems(&self) -> &[Problem] {
        match self {
            IngestError::Rejected(p) => &p.list,
            IngestError::Conflict(_) | IngestError::Store(_) => &[],
        }
    }
}

fn list(problems: &ProblemList) -> String {
    let text = problems
        .list
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if problems.truncated() {
        format!("{text} ({} problems in all)", problems.total)
    } else {
        text
    }
}

/// What an accepted batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestOutcome {
    /// Points written in this call.
    pub stored: usize,
    /// Points already stored (same meter, quantity, timestamp and value), not
    /// written again.
    pub skipped: usize,
    /// Points written that replace a different stored value (counted in `stored`).
    pub corrected: usize,
    /// Readings written (points of several series at one timestamp share one).
    pub readings: usize,
    /// Stored points too late to change any 15-minute interval: older than
    /// `analytics.retention` behind their meter's newest sample (see
    /// docs/intervals.md for how to recompute them).
    pub too_late_for_intervals: usize,
    /// Seqs of the written records; `None` when everything was skipped.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Checks one series and turns it into readings, one per point, in time order.
pub fn validate(series: &Series, now_ms: i64) -> Result<Vec<Reading>, IngestError> {
    validate_all(
        std::slice::from_ref(series),
        now_ms,
        &IngestLimits::default(),
    )
}

/// Checks a batch of series and turns it into readings: one per meter and
/// timestamp, sorted by meter then time.
pub fn validate_all(
    batch: &[Series],
    now_ms: i64,
    limits: &IngestLimits,
) -> Result<Vec<Reading>, IngestError> {
    validate_named(batch, now_ms, limits, &series_point_name)
}

/// How a problem names a point's field in a JSON push: `series[0].points[3].ts`
/// (`field` `None`: the point itself).
pub fn series_point_name(series: usize, point: usize, field: Option<&str>) -> String {
    match field {
        Some(f) => format!("series[{series}].points[{point}].{f}"),
        None => format!("series[{series}].points[{point}]"),
    }
}

/// [`validate_all`] with problems naming points by `name(series, point, field)`
/// (`field` is `ts` or `value`, `None` for the point itself), so a CSV front end
/// can name lines instead.
pub fn validate_named(
    batch: &[Series],
    now_ms: i64,
    limits: &IngestLimits,
    name: &dyn Fn(usize, usize, Option<&str>) -> String,
) -> Result<Vec<Reading>, IngestError> {
    let mut problems = ProblemList::default();
    let readings = validate_into(batch, now_ms, limits, name, &mut |p| problems.push(p));
    if !problems.is_empty() {
        return Err(IngestError::Rejected(problems));
    }
    Ok(readings)
}

/// [`validate_named`] handing every problem to `report`; the readings returned
/// are only meaningful when nothing was reported.
pub fn validate_into(
    batch: &[Series],
    now_ms: i64,
    limits: &IngestLimits,
    name: &dyn Fn(usize, usize, Option<&str>) -> String,
    report: &mut dyn FnMut(Problem),
) -> Vec<Reading> {
    let mut problems = 0usize;
    let mut report = |p: Problem| {
        problems += 1;
        report(p)
    };
    if batch.is_empty() {
        report(Problem::at("series", "no series in the batch"));
    }
    let latest = now_ms.saturating_add(limits.max_future.as_millis() as i64);
    // (meter, ts) -> values, for merging series of one meter.
    let mut merged: BTreeMap<(&str, i64), Vec<Value>> = BTreeMap::new();
    // (meter, kind, ts) -> (series, point) that first had it.
    let mut seen: HashMap<(&str, Kind, i64), (usize, usize)> = HashMap::new();
    for (s, series) in batch.iter().enumerate() {
        let mut series_problem = |field: &str, reason: String| {
            report(Problem {
                field: format!("series[{s}].{field}"),
                series: Some(s),
                point: None,
                ts: None,
                line: None,
                reason,
            })
        };
        let mut series_ok = true;
        if !valid_meter_id(&series.meter) {
            series_problem(
                "meter",
                format!(
                    "`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`",
                    clip(&series.meter)
                ),
            );
            series_ok = false;
        }
        let units: &[&str] = match series.kind {
            Kind::Power => &["W", "kW"],
            Kind::EnergyDelta | Kind::EnergyTotal => &["Wh", "kWh"],
            other => {
                series_problem(
                    "kind",
                    format!(
                        "`{}` cannot be pushed; use power, energy_delta or energy_total",
                        other.as_str()
                    ),
                );
                series_ok = false;
                &[]
            }
        };
        if series_ok && !units.contains(&series.unit.as_str()) {
            series_problem(
                "unit",
                format!(
                    "`{}` does not fit kind {}; use {}",
                    clip(&series.unit),
                    series.kind.as_str(),
                    units.join(" or ")
                ),
            );
            series_ok = false;
        }
        if series.points.is_empty() {
            series_problem("points", "no points".into());
        }
        let energy = matches!(series.kind, Kind::EnergyDelta | Kind::EnergyTotal);
        for (p, point) in series.points.iter().enumerate() {
            let mut point_problem = |field: &str, reason: String| {
                report(Problem {
                    field: name(s, p, Some(field)),
                    series: Some(s),
                    point: Some(p),
                    ts: Some(clip(&point.ts.to_string())),
                    line: None,
                    reason,
                })
            };
            let ts = match &point.ts {
                Timestamp::UnixMs(ms) => Ok(*ms),
                Timestamp::Text(text) => parse_rfc3339_ms(text),
            };
            let ts = match ts {
                Ok(ms) if ms < 0 => {
                    point_problem("ts", "before 1970-01-01T00:00:00Z".into());
                    None
                }
                Ok(ms) if ms > latest => {
                    point_problem(
                        "ts",
                        format!(
                            "{:.3} s ahead of the gateway clock (at most {} s allowed)",
                            (ms - now_ms) as f64 / 1000.0,
                            limits.max_future.as_secs_f64()
                        ),
                    );
                    None
                }
                Ok(ms) => Some(ms),
                Err(reason) => {
                    point_problem("ts", reason);
                    None
                }
            };
            let value = match &point.value {
                PointValue::Number(v) if !v.is_finite() => {
                    point_problem("value", format!("{v} is not a finite number"));
                    None
                }
                PointValue::Number(v) if v.abs() > MAX_ABS_VALUE => {
                    point_problem(
                        "value",
                        format!("{v} is implausible (|value| > {MAX_ABS_VALUE:e})"),
                    );
                    None
                }
                PointValue::Number(v) if energy && *v < 0.0 => {
                    point_problem(
                        "value",
                        format!("{v}: {} cannot be negative", series.kind.as_str()),
                    );
                    None
                }
                PointValue::Number(v) => Some(*v),
                PointValue::Other(other) => {
                    point_problem(
                        "value",
                        format!("{} is not a number", clip(&other.to_string())),
                    );
                    None
                }
            };
            let Some(ts) = ts else { continue };
            if let Some((s0, p0)) = seen.insert((series.meter.as_str(), series.kind, ts), (s, p)) {
                point_problem(
                    "ts",
                    format!(
                        "same meter, kind and time as {} ({})",
                        name(s0, p0, None),
                        clip(&batch[s0].points[p0].ts.to_string())
                    ),
                );
                continue;
            }
            if let (Some(value), true) = (value, series_ok) {
                // Most readings get one value: room for one, not the default four.
                merged
                    .entry((series.meter.as_str(), ts))
                    .or_insert_with(|| Vec::with_capacity(1))
                    .push(Value {
                        quantity: series.kind.as_str().to_string(),
                        unit: series.unit.clone(),
                        kind: series.kind,
                        value: Some(value),
                        invalid: None,
                        // A pushed number is an f64 and reads back as one.
                        source: Source::F64,
                    });
            }
        }
    }
    if problems > 0 {
        return Vec::new();
    }
    merged
        .into_iter()
        .map(|((meter, ts_ms), values)| Reading {
            meter: meter.to_string(),
            ts_ms,
            values,
        })
        .collect()
}

/// Validates one series and stores its new points; returns once they are durable.
pub async fn ingest(
    writer: &(impl BatchWriter + ?Sized),
    store: &(impl StoredPoints + ?Sized),
    series: Series,
    now_ms: i64,
) -> Result<IngestOutcome, IngestError> {
    ingest_all(
        writer,
        store,
        std::slice::from_ref(&series),
        now_ms,
        &IngestLimits::default(),
    )
    .await
}

/// Validates a batch of series and stores its new points as one all-or-nothing
/// commit; returns once they are durable.
pub async fn ingest_all(
    writer: &(impl BatchWriter + ?Sized),
    store: &(impl StoredPoints + ?Sized),
    batch: &[Series],
    now_ms: i64,
    limits: &IngestLimits,
) -> Result<IngestOutcome, IngestError> {
    let readings = validate_all(batch, now_ms, limits)?;
    store_readings(writer, store, readings)
        .await
        .map(|(outcome, _)| outcome)
}

/// Stores readings that passed [`validate_all`] (or [`validate_named`]) as one
/// all-or-nothing commit, skipping points already stored; returns once they are
/// durable, with the records written. A different value at a stored point refuses
/// the batch (see [`store_readings_with`]).
pub async fn store_readings(
    writer: &(impl BatchWriter + ?Sized),
    store: &(impl StoredPoints + ?Sized),
    readings: Vec<Reading>,
) -> Result<(IngestOutcome, Vec<Record>), IngestError> {
    store_readings_with(writer, store, readings, &Correct::None).await
}

/// [`store_readings`] where `correct` says which stored points may be replaced by
/// a different value. A different value elsewhere refuses the whole batch with
/// [`IngestError::Conflict`]; the same value (and unit) is skipped.
pub async fn store_readings_with(
    writer: &(impl BatchWriter + ?Sized),
    store: &(impl StoredPoints + ?Sized),
    readings: Vec<Reading>,
    correct: &Correct,
) -> Result<(IngestOutcome, Vec<Record>), IngestError> {
    // Refused at once while the disk is short of its reserve (or the store has
    // failed), rather than held with the polled readings: the device keeps its
    // points and pushes again, instead of a request left open until there is room.
    store.check_writable()?;
    let offered: usize = readings.iter().map(|r| r.values.len()).sum();
    let store_id = store.store_id();
    let mut claim = InFlight {
        keys: Vec::with_capacity(offered),
    };
    let mut fresh = Vec::with_capacity(readings.len());
    let mut conflicts = ConflictList::default();
    let mut corrected = 0;
    {
        let mut guard = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        let in_flight = guard.get_or_insert_with(HashMap::new);
        for mut reading in readings {
            let stored = stored_values(store, &reading.meter, reading.ts_ms)?;
            let (meter, ts_ms) = (reading.meter.as_str(), reading.ts_ms);
            reading.values.retain(|v| {
                let key = (store_id, meter.to_string(), v.quantity.clone(), ts_ms);
                let offered = StoredValue {
                    value: v.value,
                    unit: v.unit.clone(),
                };
                let conflict = |held: &StoredValue, pending: bool| Conflict {
                    meter: meter.to_string(),
                    quantity: v.quantity.clone(),
                    ts_ms,
                    stored: held.value,
                    stored_unit: held.unit.clone(),
                    offered: v.value,
                    offered_unit: v.unit.clone(),
                    pending,
                };
                if let Some(pending) = in_flight.get(&key) {
                    if !pending.same(&offered) {
                        conflicts.push(conflict(pending, true));
                    }
                    return false;
                }
                match stored.get(&v.quantity) {
                    Some(held) if held.same(&offered) => return false,
                    Some(held) if !correct.allows(meter, &v.quantity) => {
                        conflicts.push(conflict(held, false));
                        return false;
                    }
                    Some(_) => corrected += 1,
                    None => {}
                }
                in_flight.insert(key.clone(), offered);
                claim.keys.push(key);
                true
            });
            if !reading.values.is_empty() {
                fresh.push(Payload::Reading(reading));
            }
        }
    }
    if conflicts.total > 0 {
        // Nothing of the batch is stored; the claims are released with `claim`.
        return Err(IngestError::Conflict(conflicts));
    }
    let stored: usize = claim.keys.len();
    let mut outcome = IngestOutcome {
        stored,
        skipped: offered - stored,
        corrected,
        readings: fresh.len(),
        ..IngestOutcome::default()
    };
    if fresh.is_empty() {
        return Ok((outcome, Vec::new()));
    }
    let records = writer.submit_batch(fresh).await?;
    outcome.first_seq = records.first().map(|r| r.seq);
    outcome.last_seq = records.last().map(|r| r.seq);
    drop(claim);
    Ok((outcome, records))
}

/// A value held for a point: stored, or being stored by another call.
#[derive(Debug, Clone, PartialEq)]
struct StoredValue {
    value: Option<f64>,
    unit: String,
}

impl StoredValue {
    /// The same number (bit for bit) in the same unit: a repeat, not a correction.
    fn same(&self, other: &StoredValue) -> bool {
        self.value.map(f64::to_bits) == other.value.map(f64::to_bits) && self.unit == other.unit
    }
}

/// The current values stored for `meter` at exactly `ts_ms`, by quantity.
fn stored_values(
    store: &(impl StoredPoints + ?Sized),
    meter: &str,
    ts_ms: i64,
) -> Result<HashMap<String, StoredValue>, StoreFailure> {
    Ok(store
        .values_at(meter, ts_ms)?
        .into_iter()
        .map(|v| {
            (
                v.quantity,
                StoredValue {
                    value: v.value,
                    unit: v.unit,
                },
            )
        })
        .collect())
}

/// (store, meter, quantity, ts) of points being written by some ingest call.
type InFlightKey = (usize, String, String, i64);

/// Points being written, with the value being written.
static IN_FLIGHT: Mutex<Option<HashMap<InFlightKey, StoredValue>>> = Mutex::new(None);

/// Points claimed by one call; released when the call ends (done, failed or
/// cancelled). Once released after success, the index answers for them.
struct InFlight {
    keys: Vec<InFlightKey>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut guard = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = guard.as_mut() {
            for key in &self.keys {
                set.remove(key);
            }
        }
    }
}

/// Whether `id` is a valid meter id: 1-64 characters of `a-z A-Z 0-9 - _`.
pub fn valid_meter_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Strict RFC 3339 date-time to Unix milliseconds (see the module docs).
/// Kept by hand: jiff's and humantime's parsers accept or reject other forms (RFC 9557
/// annotations, offsets other than `Z`), and this profile is the push contract.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    let bad = |why: &str| Err(format!("`{}` is not an RFC 3339 time: {why}", clip(text)));
    let b = text.as_bytes();
    let digits = |from: usize, n: usize| -> Option<i64> {
        let part = b.get(from..from + n)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let (Some(year), Some(month), Some(day)) = (digits(0, 4), digits(5, 2), digits(8, 2)) else {
        return bad("expected YYYY-MM-DD");
    };
    if !sep(4, b"-") || !sep(7, b"-") {
        return bad("expected YYYY-MM-DD");
    }
    if !sep(10, b"Tt ") {
        return bad("expected `T` between date and time");
    }
    let (Some(hour), Some(minute), Some(second)) = (digits(11, 2), digits(14, 2), digits(17, 2))
    else {
        return bad("expected hh:mm:ss");
    };
    if !sep(13, b":") || !sep(16, b":") {
        return bad("expected hh:mm:ss");
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return bad("no such date");
    }
    if hour > 23 || minute > 59 {
        return bad("no such time of day");
    }
    if second == 60 {
        return bad("leap seconds are not supported");
    }
    if second > 59 {
        return bad("no such time of day");
    }
    let mut pos = 19;
    let mut millis = 0;
    if sep(pos, b".") {
        let start = pos + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return bad("expected digits after `.`");
        }
        for i in 0..3 {
            millis = millis * 10
                + b.get(start + i)
                    .filter(|_| start + i < end)
                    .map_or(0, |d| i64::from(d - b'0'));
        }
        pos = end;
    }
    let offset_min = match b.get(pos) {
        Some(b'Z' | b'z') => {
            pos += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let (Some(oh), Some(om)) = (digits(pos + 1, 2), digits(pos + 4, 2)) else {
                return bad("expected a zone offset ±hh:mm");
            };
            if !sep(pos + 3, b":") || oh > 23 || om > 59 {
                return bad("expected a zone offset ±hh:mm");
            }
            pos += 6;
            let m = oh * 60 + om;
            if *sign == b'-' {
                -m
            } else {
                m
            }
        }
        _ => return bad("missing zone (`Z` or ±hh:mm)"),
    };
    if pos != b.len() {
        return bad("unexpected text after the zone");
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1_000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
