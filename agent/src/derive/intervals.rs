//! Clock-aligned 15-minute energy intervals.
//!
//! Intervals are `[k·15 min, (k+1)·15 min)` UTC, labelled by their start in Unix ms.
//! Every series is first turned into *segments*: stretches of time with a constant
//! power and a known energy. Interval energy is each segment's energy split pro rata
//! by the time it overlaps the interval, so the sum of the intervals is the energy of
//! the segments (conservation), whatever the alignment of the samples.
//!
//! Segments per kind (samples sorted by time, one value per timestamp):
//! - `power` (W, kW): step-hold. Sample `i` holds from `t_i` until `t_{i+1}`, at
//!   most `max_gap`; what lies beyond `max_gap` is a hole without data. The final
//!   sample holds for one typical spacing (capped at `max_gap`) and is `estimated`.
//! - `energy_delta` (Wh, kWh consumed from `t_i` until `t_{i+1}`): spread uniformly
//!   over `[t_i, t_{i+1})`. The final point covers one typical spacing and is
//!   `estimated`. A point spread over more than `max_gap` is `estimated` too: its
//!   energy is known, how it was distributed in time is not.
//! - `energy_total` (cumulative register, Wh, kWh): linear interpolation between
//!   consecutive readings, differenced at the interval boundaries, which is the same
//!   as a constant power between the two readings. Segments longer than `max_gap`
//!   are `estimated`. The final reading starts no segment (nothing is known after it).
//!   **Counter reset / meter swap**: when a reading is lower than the one before, the
//!   register was reset or the meter replaced somewhere between the two. The energy
//!   of that one stretch is unknown (a reset to zero and a swap to a used meter look
//!   the same), so it counts as *no data*: zero energy, not covered, and every
//!   interval it touches is flagged `reset`. Counting resumes from the new baseline,
//!   the first reading after the decrease. Energy is never negative because of a reset.
//!
//! The typical spacing of a series is the median of its newest [`SPACING_WINDOW`]
//! spacings (for an even count the mean of the two middle ones, rounded down to the
//! millisecond); a series of one sample holds for `min(max_gap, 15 min)`.
//! [`compute_intervals`] and the window functions take `IntervalParams::spacing_ms`
//! instead when given. The rules in operator words: docs/intervals.md.
//!
//! Per interval: energy (kWh), number of samples with their timestamp inside,
//! coverage (covered time / 15 min), min/mean/max power in W (mean = energy over
//! covered time; min/max over the constant powers of the segments that overlap the
//! interval; `None` when nothing covers it), and flags: `gap` (coverage < 1: some of
//! the interval has no data, including before the first and after the last sample),
//! `reset`, `estimated`.
//!
//! Input handling: non-finite values are dropped; samples are sorted by time; for a
//! timestamp given more than once the last one given wins.

use serde::{Deserialize, Serialize};

use super::DeriveError;
use crate::model::Kind;
pub use crate::model::{Interval, IntervalFlags, INTERVAL_MS};

const MS_PER_HOUR: f64 = 3_600_000.0;
/// kWh per ms of 1 W is 1 / 3.6e9.
const WATT_MS_PER_KWH: f64 = 3_600_000_000.0;
/// Most intervals one call computes (about 11 years): protects memory from a wild
/// timestamp.
pub const MAX_SPAN_INTERVALS: i64 = 400_000;

/// Units energy can be derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unit {
    #[serde(rename = "W")]
    W,
    #[serde(rename = "kW")]
    Kw,
    #[serde(rename = "Wh")]
    Wh,
    #[serde(rename = "kWh")]
    Kwh,
}

impl Unit {
    /// Parses `W`, `kW`, `Wh`, `kWh` (ASCII case-insensitive, surrounding blanks ignored).
    pub fn parse(text: &str) -> Result<Unit, DeriveError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "w" => Ok(Unit::W),
            "kw" => Ok(Unit::Kw),
            "wh" => Ok(Unit::Wh),
            "kwh" => Ok(Unit::Kwh),
            _ => Err(DeriveError::UnknownUnit(text.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::W => "W",
            Unit::Kw => "kW",
            Unit::Wh => "Wh",
            Unit::Kwh => "kWh",
        }
    }

    /// True for W and kW.
    pub fn is_power(self) -> bool {
        matches!(self, Unit::W | Unit::Kw)
    }

    /// Factor to kW (power units) or kWh (energy units).
    fn to_kilo(self) -> f64 {
        match self {
            Unit::W | Unit::Wh => 0.001,
            Unit::Kw | Unit::Kwh => 1.0,
        }
    }
}

/// Checks that `kind` carries energy and `unit` fits it: `power` takes W or kW,
/// `energy_delta` and `energy_total` take Wh or kWh.
pub fn check_kind_unit(kind: Kind, unit: Unit) -> Result<(), DeriveError> {
    let fits = match kind {
        Kind::Power => unit.is_power(),
        Kind::EnergyDelta | Kind::EnergyTotal => !unit.is_power(),
        other => return Err(DeriveError::NotEnergy(other.as_str())),
    };
    if fits {
        Ok(())
    } else {
        Err(DeriveError::UnitMismatch {
            kind: kind.as_str(),
            unit: unit.as_str(),
        })
    }
}

/// How samples turn into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalParams {
    /// Longest a power sample holds; energy segments longer than this are `estimated`.
    pub max_gap_ms: i64,
    /// Typical spacing of the series (the poll interval); `None`: the median spacing
    /// of the samples.
    pub spacing_ms: Option<i64>,
}

impl Default for IntervalParams {
    fn default() -> Self {
        IntervalParams {
            max_gap_ms: INTERVAL_MS,
            spacing_ms: None,
        }
    }
}

/// Index of the interval that contains `ts_ms`.
pub fn interval_index(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(INTERVAL_MS)
}

/// Start of the interval that contains `ts_ms`.
pub fn interval_start(ts_ms: i64) -> i64 {
    interval_index(ts_ms).saturating_mul(INTERVAL_MS)
}

/// A stretch of constant power with a known energy, or a reset stretch (no data).
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: i64,
    end: i64,
    energy_kwh: f64,
    power_w: f64,
    /// Power samples: a piece's energy is power × overlap, independent of how far
    /// the hold reaches (so a sample arriving after an interval cannot change it by
    /// rounding). Energy kinds: energy × overlap / length.
    step_hold: bool,
    estimated: bool,
    reset: bool,
}

/// Drops non-finite values, sorts by time, keeps the last value given per timestamp.
fn normalize(samples: &[(i64, f64)]) -> Vec<(i64, f64)> {
    let mut sorted: Vec<(i64, f64)> = samples
        .iter()
        .copied()
        .filter(|(_, v)| v.is_finite())
        .collect();
    // Stable sort: among equal timestamps the input order survives, so the last wins.
    sorted.sort_by_key(|&(ts, _)| ts);
    let mut out: Vec<(i64, f64)> = Vec::with_capacity(sorted.len());
    for (ts, v) in sorted {
        match out.last_mut() {
            Some(last) if last.0 == ts => last.1 = v,
            _ => out.push((ts, v)),
        }
    }
    out
}

/// How many of a series' newest spacings its typical spacing is the median of.
pub const SPACING_WINDOW: usize = 32;

/// Median of spacings in ms: for an even count the mean of the two middle ones,
/// rounded down to the millisecond. `None` without spacings.
pub fn median_of(mut diffs: Vec<i64>) -> Option<i64> {
    if diffs.is_empty() {
        return None;
    }
    diffs.sort_unstable();
    let n = diffs.len();
    if n % 2 == 1 {
        Some(diffs[n / 2])
    } else {
        let (a, b) = (diffs[n / 2 - 1], diffs[n / 2]);
        // Mean without overflow, rounded down.
        Some(a.div_euclid(2) + b.div_euclid(2) + (a.rem_euclid(2) + b.rem_euclid(2)) / 2)
    }
}

/// Median of the last [`SPACING_WINDOW`] spacings of sorted, unique samples.
fn median_spacing(samples: &[(i64, f64)]) -> Option<i64> {
    let from = samples.len().saturating_sub(SPACING_WINDOW + 1);
    median_of(
        samples[from..]
            .windows(2)
            .map(|w| w[1].0.saturating_sub(w[0].0))
            .collect(),
    )
}

/// How long the final sample of a series of one sample holds: `min(max_gap, 15 min)`.
fn single_sample_hold(params: &IntervalParams) -> i64 {
    params.max_gap_ms.clamp(0, INTERVAL_MS)
}

fn typical_spacing(samples: &[(i64, f64)], params: &IntervalParams) -> i64 {
    params
        .spacing_ms
        .filter(|s| *s > 0)
        .or_else(|| median_spacing(samples))
        .unwrap_or_else(|| single_sample_hold(params))
        .max(0)
}

/// The typical-spacing state of a series: its newest [`SPACING_WINDOW`] + 1 sample
/// times, so the median of its newest spacings is the same whatever order and
/// batches the samples came in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpacingState {
    /// Sorted, unique, at most `SPACING_WINDOW + 1`.
    newest: std::collections::VecDeque<i64>,
}

impl SpacingState {
    /// Takes a sample time into account.
    pub fn insert(&mut self, ts: i64) {
        let full = self.newest.len() > SPACING_WINDOW;
        if full && self.newest.front().is_some_and(|&f| ts < f) {
            return;
        }
        if let Err(at) = self.newest.binary_search(&ts) {
            self.newest.insert(at, ts);
            if self.newest.len() > SPACING_WINDOW + 1 {
                self.newest.pop_front();
            }
        }
    }

    /// Median of the newest spacings; `None` for fewer than two samples.
    pub fn median(&self) -> Option<i64> {
        let times: Vec<i64> = self.newest.iter().copied().collect();
        median_of(times.windows(2).map(|w| w[1] - w[0]).collect())
    }

    /// How long the final sample holds (before the `max_gap` cap of `power`).
    pub fn hold_ms(&self, params: &IntervalParams) -> i64 {
        self.median()
            .unwrap_or_else(|| single_sample_hold(params))
            .max(0)
    }
}

/// Segments of sorted, unique, finite samples (see the module doc).
fn build_segments(
    kind: Kind,
    unit: Unit,
    samples: &[(i64, f64)],
    params: &IntervalParams,
    spacing: i64,
) -> Vec<Segment> {
    let max_gap = params.max_gap_ms.max(0);
    let scale = unit.to_kilo();
    let mut segments = Vec::with_capacity(samples.len());
    for (i, &(ts, raw)) in samples.iter().enumerate() {
        let value = raw * scale;
        let next = samples.get(i + 1).map(|s| s.0);
        match kind {
            Kind::Power => {
                let end = match next {
                    Some(n) => n.min(ts.saturating_add(max_gap)),
                    None => ts.saturating_add(spacing.min(max_gap)),
                };
                if end > ts {
                    let len = (end - ts) as f64;
                    segments.push(Segment {
                        start: ts,
                        end,
                        energy_kwh: value * len / MS_PER_HOUR,
                        power_w: value * 1000.0,
                        step_hold: true,
                        estimated: next.is_none(),
                        reset: false,
                    });
                }
            }
            Kind::EnergyDelta => {
                let end = next.unwrap_or_else(|| ts.saturating_add(spacing));
                if end > ts {
                    let len = end - ts;
                    segments.push(Segment {
                        start: ts,
                        end,
                        energy_kwh: value,
                        power_w: value * WATT_MS_PER_KWH / len as f64,
                        step_hold: false,
                        estimated: next.is_none() || len > max_gap,
                        reset: false,
                    });
                }
            }
            Kind::EnergyTotal => {
                let Some((next_ts, next_raw)) = samples.get(i + 1).copied() else {
                    continue;
                };
                let len = next_ts - ts;
                let delta = next_raw * scale - value;
                if delta >= 0.0 {
                    segments.push(Segment {
                        start: ts,
                        end: next_ts,
                        energy_kwh: delta,
                        power_w: delta * WATT_MS_PER_KWH / len as f64,
                        step_hold: false,
                        estimated: len > max_gap,
                        reset: false,
                    });
                } else {
                    segments.push(Segment {
                        start: ts,
                        end: next_ts,
                        energy_kwh: 0.0,
                        power_w: 0.0,
                        step_hold: false,
                        estimated: false,
                        reset: true,
                    });
                }
            }
            // Callers check the kind first; other kinds carry no energy.
            _ => {}
        }
    }
    segments
}

#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    energy_kwh: f64,
    covered_ms: i64,
    samples: u32,
    min_w: Option<f64>,
    max_w: Option<f64>,
    reset: bool,
    estimated: bool,
}

impl Acc {
    fn add_segment(&mut self, seg: &Segment, overlap: i64) {
        if seg.reset {
            self.reset = true;
            return;
        }
        self.covered_ms += overlap;
        self.energy_kwh += if seg.step_hold {
            seg.power_w * overlap as f64 / WATT_MS_PER_KWH
        } else {
            seg.energy_kwh * (overlap as f64 / (seg.end - seg.start) as f64)
        };
        self.min_w = Some(self.min_w.map_or(seg.power_w, |m| m.min(seg.power_w)));
        self.max_w = Some(self.max_w.map_or(seg.power_w, |m| m.max(seg.power_w)));
        self.estimated |= seg.estimated;
    }

    fn mean_w(&self) -> Option<f64> {
        (self.covered_ms > 0).then(|| self.energy_kwh * WATT_MS_PER_KWH / self.covered_ms as f64)
    }

    fn flags(&self, length_ms: i64) -> IntervalFlags {
        IntervalFlags {
            gap: self.covered_ms < length_ms,
            reset: self.reset,
            estimated: self.estimated,
        }
    }
}

/// Intervals with index in `[k_from, k_to)` from segments and samples that include
/// everything touching that range.
fn accumulate(
    segments: &[Segment],
    samples: &[(i64, f64)],
    k_from: i64,
    k_to: i64,
) -> Vec<Interval> {
    if k_to <= k_from {
        return Vec::new();
    }
    let mut accs = vec![Acc::default(); (k_to - k_from) as usize];
    for seg in segments {
        let ka = interval_index(seg.start).max(k_from);
        let kb = interval_index(seg.end - 1).min(k_to - 1);
        for k in ka..=kb {
            let start = k * INTERVAL_MS;
            let overlap = seg.end.min(start.saturating_add(INTERVAL_MS)) - seg.start.max(start);
            if overlap > 0 {
                accs[(k - k_from) as usize].add_segment(seg, overlap);
            }
        }
    }
    for &(ts, _) in samples {
        let k = interval_index(ts);
        if (k_from..k_to).contains(&k) {
            accs[(k - k_from) as usize].samples += 1;
        }
    }
    accs.iter()
        .enumerate()
        .map(|(i, acc)| Interval {
            start_ms: (k_from + i as i64) * INTERVAL_MS,
            energy_kwh: acc.energy_kwh,
            samples: acc.samples,
            coverage: acc.covered_ms as f64 / INTERVAL_MS as f64,
            min_w: acc.min_w,
            mean_w: acc.mean_w(),
            max_w: acc.max_w,
            flags: acc.flags(INTERVAL_MS),
            revision: 0,
        })
        .collect()
}

fn check_span(k_from: i64, k_to: i64) -> Result<(), DeriveError> {
    let intervals = k_to.saturating_sub(k_from);
    if intervals > MAX_SPAN_INTERVALS {
        return Err(DeriveError::SpanTooLong {
            intervals,
            limit: MAX_SPAN_INTERVALS,
        });
    }
    Ok(())
}

/// The 15-minute intervals of a whole series: contiguous, from the interval holding
/// the first sample to the one holding the last sample or the end of its hold.
///
/// `samples` are `(ts_ms, value)` in `unit`, in any order (see the module doc for
/// duplicates and non-finite values). Errors: a kind without energy, a unit that
/// does not fit the kind, or a span over [`MAX_SPAN_INTERVALS`].
pub fn compute_intervals(
    kind: Kind,
    unit: Unit,
    samples: &[(i64, f64)],
    params: &IntervalParams,
) -> Result<Vec<Interval>, DeriveError> {
    check_kind_unit(kind, unit)?;
    let samples = normalize(samples);
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Ok(Vec::new());
    };
    let spacing = typical_spacing(&samples, params);
    let segments = build_segments(kind, unit, &samples, params, spacing);
    let last_instant = segments.iter().map(|s| s.end - 1).fold(last.0, i64::max);
    let k_from = interval_index(first.0);
    let k_to = interval_index(last_instant).saturating_add(1);
    check_span(k_from, k_to)?;
    Ok(accumulate(&segments, &samples, k_from, k_to))
}

/// Energy of an arbitrary window `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WindowEnergy {
    pub start_ms: i64,
    pub end_ms: i64,
    pub energy_kwh: f64,
    /// Fraction of the window backed by data, 0..=1.
    pub coverage: f64,
    pub flags: IntervalFlags,
}

/// Energy, covered ms and flags of `[start, end)` from segments.
fn window_acc(segments: &[Segment], start: i64, end: i64) -> Acc {
    let mut acc = Acc::default();
    for seg in segments {
        let overlap = seg.end.min(end) - seg.start.max(start);
        if overlap > 0 {
            acc.add_segment(seg, overlap);
        }
    }
    acc
}

fn check_window(start_ms: i64, end_ms: i64) -> Result<(), DeriveError> {
    if end_ms <= start_ms {
        return Err(DeriveError::EmptyWindow { start_ms, end_ms });
    }
    Ok(())
}

/// Energy of `[start_ms, end_ms)` (any boundaries, not only 15-minute ones) from raw
/// samples, by the same rules as the intervals: the result for an aligned window is
/// the sum of its intervals.
///
/// `samples` must include the last sample before `start_ms` and the first at or
/// after `end_ms` when they exist (they decide the segments at the edges); more
/// samples are harmless. Give `params.spacing_ms` if the window can reach past the
/// last sample, so the final hold matches the series' (the median of a few edge
/// samples may differ).
pub fn energy_between_samples(
    kind: Kind,
    unit: Unit,
    samples: &[(i64, f64)],
    params: &IntervalParams,
    start_ms: i64,
    end_ms: i64,
) -> Result<WindowEnergy, DeriveError> {
    check_kind_unit(kind, unit)?;
    check_window(start_ms, end_ms)?;
    let samples = normalize(samples);
    let spacing = typical_spacing(&samples, params);
    let segments = build_segments(kind, unit, &samples, params, spacing);
    let acc = window_acc(&segments, start_ms, end_ms);
    let length = end_ms - start_ms;
    Ok(WindowEnergy {
        start_ms,
        end_ms,
        energy_kwh: acc.energy_kwh,
        coverage: acc.covered_ms as f64 / length as f64,
        flags: acc.flags(length),
    })
}

/// How a window splits into a partial head, whole 15-minute intervals and a partial
/// tail. Each part is `[start, end)` in Unix ms; the window lying inside one interval
/// is all `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSplit {
    pub head: Option<(i64, i64)>,
    pub full: Option<(i64, i64)>,
    pub tail: Option<(i64, i64)>,
}

impl WindowSplit {
    /// Splits `[start_ms, end_ms)`; an empty or reversed window has no parts.
    pub fn new(start_ms: i64, end_ms: i64) -> WindowSplit {
        let mut split = WindowSplit {
            head: None,
            full: None,
            tail: None,
        };
        if end_ms <= start_ms {
            return split;
        }
        let first_full = if interval_start(start_ms) == start_ms {
            start_ms
        } else {
            interval_start(start_ms).saturating_add(INTERVAL_MS)
        };
        let last_full_end = interval_start(end_ms);
        if first_full >= last_full_end {
            split.head = Some((start_ms, end_ms));
            return split;
        }
        if start_ms < first_full {
            split.head = Some((start_ms, first_full));
        }
        split.full = Some((first_full, last_full_end));
        if last_full_end < end_ms {
            split.tail = Some((last_full_end, end_ms));
        }
        split
    }
}

/// Energy of `[start_ms, end_ms)` from stored 15-minute intervals for the whole
/// intervals inside the window and raw samples for the partial edges
/// ([`WindowSplit`] names them).
///
/// `intervals`: the series' intervals (any superset of the whole ones in the window;
/// a missing one counts as not covered). `edge_samples`: the raw samples of the
/// partial edges, including the last sample before each edge and the first at or
/// after its end (see [`energy_between_samples`]); empty when the window is aligned.
pub fn energy_between(
    kind: Kind,
    unit: Unit,
    intervals: &[Interval],
    edge_samples: &[(i64, f64)],
    params: &IntervalParams,
    start_ms: i64,
    end_ms: i64,
) -> Result<WindowEnergy, DeriveError> {
    check_kind_unit(kind, unit)?;
    check_window(start_ms, end_ms)?;
    let split = WindowSplit::new(start_ms, end_ms);
    let mut energy = 0.0;
    let mut covered = 0.0;
    let mut flags = IntervalFlags::default();
    let edges = normalize(edge_samples);
    let spacing = typical_spacing(&edges, params);
    let segments = build_segments(kind, unit, &edges, params, spacing);
    for (a, b) in [split.head, split.tail].into_iter().flatten() {
        let acc = window_acc(&segments, a, b);
        energy += acc.energy_kwh;
        covered += acc.covered_ms as f64;
        flags.merge(acc.flags(b - a));
    }
    if let Some((a, b)) = split.full {
        // One interval per start: a later entry (a newer revision) replaces an earlier.
        let inside: std::collections::BTreeMap<i64, &Interval> = intervals
            .iter()
            .filter(|iv| iv.start_ms >= a && iv.start_ms < b)
            .map(|iv| (iv.start_ms, iv))
            .collect();
        let seen = inside.len() as i64;
        for iv in inside.values() {
            energy += iv.energy_kwh;
            covered += iv.coverage * INTERVAL_MS as f64;
            flags.merge(iv.flags);
        }
        if seen < (b - a) / INTERVAL_MS {
            flags.gap = true;
        }
    }
    let length = (end_ms - start_ms) as f64;
    Ok(WindowEnergy {
        start_ms,
        end_ms,
        energy_kwh: energy,
        coverage: (covered / length).clamp(0.0, 1.0),
        flags,
    })
}

/// Parameters of an [`IntervalTracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerParams {
    pub interval: IntervalParams,
    /// An interval closes once the watermark minus this passes its end.
    pub grace_ms: i64,
    /// Data older than this behind the watermark can no longer revise intervals
    /// (it is counted as too late). At least `grace_ms` + 15 min.
    pub retention_ms: i64,
}

impl Default for TrackerParams {
    fn default() -> Self {
        TrackerParams {
            interval: IntervalParams::default(),
            grace_ms: 2 * 60 * 1000,
            retention_ms: 6 * 3600 * 1000,
        }
    }
}

/// What [`IntervalTracker::push`] did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushOutcome {
    /// Samples taken (a repeated timestamp replaces the earlier value).
    pub accepted: usize,
    /// NaN or infinite values, dropped.
    pub invalid: usize,
    /// Older than the retention behind the watermark: too late for intervals.
    pub too_old: usize,
    /// Accepted samples that fall in (or change) intervals already closed: the
    /// caller recomputes those from the stored readings ([`IntervalTracker::take_late`]).
    pub late: usize,
}

/// Incremental 15-minute intervals of one meter's quantity, holding only what the
/// open intervals need.
///
/// Feed samples with [`push`](Self::push) in any order and batch size, then call
/// [`take_closed`](Self::take_closed) (or [`close_silent`](Self::close_silent) for
/// a meter that went quiet): it returns every interval that closed since the last
/// call, revision 0.
///
/// **Closing rule (all kinds).** The watermark `W` is the newest sample time. An
/// interval closes when `W - grace` reaches its end, or, for a silent meter, when
/// the wall clock minus grace does (up to `W + retention`).
///
/// **Memory.** The tracker holds the samples of its open intervals, the last sample
/// before them (it bounds the segment reaching into them) and the typical-spacing
/// state; nothing of the closed intervals. A sample that falls in a closed interval
/// (late data) is not held: it is counted in [`PushOutcome::late`] and its time
/// range is handed out by [`take_late`](Self::take_late), so the caller recomputes
/// the closed intervals it touches from the stored readings
/// ([`recompute_intervals`]). Serialize the tracker (serde) to persist its small
/// state; after loading it, give it back the samples of
/// [`open_range`](Self::open_range) with [`reload`](Self::reload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalTracker {
    kind: Kind,
    unit: Unit,
    params: TrackerParams,
    watermark: Option<i64>,
    /// Index of the first interval not closed yet.
    #[serde(default, alias = "next_index")]
    closed_to: Option<i64>,
    #[serde(default)]
    spacing: SpacingState,
    /// The last sample before the first open interval.
    #[serde(default)]
    anchor: Option<(i64, f64)>,
    /// Samples in the open intervals, sorted, one per timestamp (reloaded from the
    /// store, never persisted).
    #[serde(skip)]
    open: Vec<(i64, f64)>,
    /// Time range of samples that changed closed intervals since the last
    /// `take_late`.
    #[serde(skip)]
    late: Option<(i64, i64)>,
}

impl IntervalTracker {
    /// A tracker for a quantity of `kind` in `unit`. `retention_ms` is raised to at
    /// least `grace_ms + 15 min`.
    pub fn new(kind: Kind, unit: Unit, params: TrackerParams) -> Result<Self, DeriveError> {
        check_kind_unit(kind, unit)?;
        let mut params = params;
        params.grace_ms = params.grace_ms.max(0);
        params.retention_ms = params
            .retention_ms
            .max(params.grace_ms.saturating_add(INTERVAL_MS));
        Ok(IntervalTracker {
            kind,
            unit,
            params,
            watermark: None,
            closed_to: None,
            spacing: SpacingState::default(),
            anchor: None,
            open: Vec::new(),
            late: None,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    pub fn params(&self) -> &TrackerParams {
        &self.params
    }

    /// Newest sample time seen.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Start of the first interval not closed yet (Unix ms).
    pub fn closed_to_ms(&self) -> Option<i64> {
        self.closed_to.map(|k| k.saturating_mul(INTERVAL_MS))
    }

    /// How long the series' final sample holds: the median of its newest spacings.
    pub fn hold_ms(&self) -> i64 {
        self.spacing.hold_ms(&self.params.interval)
    }

    /// Samples held in memory (the open intervals' and the one before them).
    pub fn retained_samples(&self) -> usize {
        self.open.len() + usize::from(self.anchor.is_some())
    }

    /// Approximate bytes of memory this tracker holds.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.open.capacity() * std::mem::size_of::<(i64, f64)>()
            + self.spacing.newest.capacity() * std::mem::size_of::<i64>()
    }

    /// Samples older than this are too late for intervals.
    pub fn too_late_before(&self) -> Option<i64> {
        self.watermark
            .map(|w| w.saturating_sub(self.params.retention_ms))
    }

    /// Adds samples, in any order. Non-finite values and samples older than
    /// `watermark - retention` are dropped and counted.
    pub fn push(&mut self, samples: &[(i64, f64)]) -> PushOutcome {
        let mut outcome = PushOutcome::default();
        for &(ts, v) in samples {
            if !v.is_finite() {
                outcome.invalid += 1;
                continue;
            }
            if self.too_late_before().is_some_and(|c| ts < c) {
                outcome.too_old += 1;
                continue;
            }
            outcome.accepted += 1;
            self.spacing.insert(ts);
            let old_watermark = self.watermark;
            self.watermark = Some(old_watermark.map_or(ts, |w| w.max(ts)));
            let boundary = self.closed_to_ms();
            // The final sample's hold (it depends on the spacing and on what follows
            // it) lies in closed intervals: they change too.
            if let (Some(w), Some(b)) = (old_watermark, boundary) {
                if b > w {
                    self.mark_late(w);
                }
            }
            match boundary {
                Some(b) if ts < b => {
                    outcome.late += 1;
                    self.mark_late(ts);
                    if self.anchor.map_or(true, |(a, _)| a <= ts) {
                        self.anchor = Some((ts, v));
                    }
                }
                _ => {
                    // An energy point's stretch reaches back to the point before it:
                    // a new first open sample changes the anchor's stretch, which
                    // lies partly in closed intervals.
                    if let (Some(a), Some(_)) = (self.anchor, boundary) {
                        let first = self.open.first().map_or(true, |f| ts <= f.0);
                        if first && self.kind != Kind::Power {
                            self.mark_late(a.0);
                        }
                    }
                    match self.open.binary_search_by_key(&ts, |s| s.0) {
                        Ok(i) => self.open[i].1 = v,
                        Err(i) => self.open.insert(i, (ts, v)),
                    }
                }
            }
        }
        outcome
    }

    fn mark_late(&mut self, ts: i64) {
        self.late = Some(match self.late {
            Some((lo, hi)) => (lo.min(ts), hi.max(ts)),
            None => (ts, ts),
        });
    }

    /// The time range `[lo, hi]` of samples that changed closed intervals since the
    /// last call: the closed intervals from the one holding the sample before `lo`
    /// to the one holding the sample after `hi` need recomputing.
    pub fn take_late(&mut self) -> Option<(i64, i64)> {
        self.late.take()
    }

    /// The closed intervals `[k_from, k_to)` that late samples in `[lo, hi]` (from
    /// [`take_late`](Self::take_late)) touch, given the stored sample just before
    /// `lo` and the one just after `hi`: from the interval holding `before` to the
    /// one holding `after`, none older than the retention behind the watermark and
    /// none open.
    pub fn late_intervals(
        &self,
        lo: i64,
        before: Option<i64>,
        after: Option<i64>,
    ) -> Option<(i64, i64)> {
        let closed = self.closed_to?;
        let cutoff = interval_index(self.too_late_before()?);
        let k_from = interval_index(before.unwrap_or(lo).min(lo)).max(cutoff);
        let k_to = after.map_or(closed, |a| interval_index(a).saturating_add(1).min(closed));
        (k_from < k_to).then_some((k_from, k_to))
    }

    /// The time range `[from, to]` whose stored samples [`reload`](Self::reload)
    /// needs after the tracker was restored from its serialized state.
    pub fn open_range(&self) -> Option<(i64, i64)> {
        Some((self.closed_to_ms()?, self.watermark?))
    }

    /// Gives a restored tracker back the samples of its open intervals (any order;
    /// samples outside [`open_range`](Self::open_range) are ignored).
    pub fn reload(&mut self, samples: &[(i64, f64)]) {
        let Some((from, to)) = self.open_range() else {
            return;
        };
        let inside: Vec<(i64, f64)> = samples
            .iter()
            .copied()
            .filter(|(ts, v)| (from..=to).contains(ts) && v.is_finite())
            .collect();
        self.open = merge(&self.open, &normalize(&inside));
    }

    /// Newly closed intervals by the watermark rule (revision 0), sorted by start.
    pub fn take_closed(&mut self) -> Vec<Interval> {
        match self.watermark {
            Some(w) => self.close_until(w.saturating_sub(self.params.grace_ms)),
            None => Vec::new(),
        }
    }

    /// Closes the intervals of a silent meter by the wall clock `now_ms`: those
    /// ending at or before `now - grace`, but none beyond `W + retention` (later
    /// ones would hold no data).
    pub fn close_silent(&mut self, now_ms: i64) -> Vec<Interval> {
        let Some(w) = self.watermark else {
            return Vec::new();
        };
        let by_clock = now_ms.saturating_sub(self.params.grace_ms);
        let most = w.saturating_add(self.params.retention_ms);
        let mut out = self.take_closed();
        out.extend(self.close_until(by_clock.min(most)));
        out
    }

    /// Closes every interval ending at or before `horizon`.
    fn close_until(&mut self, horizon: i64) -> Vec<Interval> {
        let first = self.anchor.or_else(|| self.open.first().copied());
        let (Some(first), Some(watermark)) = (first, self.watermark) else {
            return Vec::new();
        };
        let k_to = horizon.div_euclid(INTERVAL_MS);
        let k_from = self.closed_to.unwrap_or_else(|| interval_index(first.0));
        if k_to <= k_from {
            return Vec::new();
        }
        let mut samples: Vec<(i64, f64)> = Vec::with_capacity(self.open.len() + 1);
        samples.extend(self.anchor);
        samples.extend_from_slice(&self.open);
        let hold = self.hold_ms();
        let out = emit_intervals(
            self.kind,
            self.unit,
            &self.params.interval,
            hold,
            &samples,
            k_from,
            k_to,
            interval_index(watermark.saturating_sub(self.params.retention_ms)),
        );
        // Keep the samples from the last one before the new boundary on.
        let boundary = k_to.saturating_mul(INTERVAL_MS);
        let split = self.open.partition_point(|s| s.0 < boundary);
        if split > 0 {
            self.anchor = Some(self.open[split - 1]);
            self.open.drain(..split);
        }
        self.closed_to = Some(k_to);
        out
    }
}

/// Intervals `[k_from, k_to)` from sorted samples (any order is sorted) that include
/// the last sample before the first interval and the first at or after the end of
/// the last one, where they exist. `hold_ms` is the series' typical spacing (how
/// long its final sample holds). Intervals with no data before `keep_empty_from`
/// are left out (nothing to say about them).
#[allow(clippy::too_many_arguments)]
fn emit_intervals(
    kind: Kind,
    unit: Unit,
    params: &IntervalParams,
    hold_ms: i64,
    samples: &[(i64, f64)],
    k_from: i64,
    k_to: i64,
    keep_empty_from: i64,
) -> Vec<Interval> {
    let segments = build_segments(kind, unit, samples, params, hold_ms);
    // Ranges of intervals to compute: those touched by data, and every one from
    // `keep_empty_from` on.
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for seg in &segments {
        ranges.push((interval_index(seg.start), interval_index(seg.end - 1)));
    }
    for &(ts, _) in samples {
        ranges.push((interval_index(ts), interval_index(ts)));
    }
    ranges.push((keep_empty_from, k_to - 1));
    let mut clipped: Vec<(i64, i64)> = ranges
        .into_iter()
        .map(|(a, b)| (a.max(k_from), b.min(k_to - 1)))
        .filter(|(a, b)| a <= b)
        .collect();
    clipped.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (a, b) in clipped {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut out = Vec::new();
    for (a, b) in merged {
        // Bounded per call: a wild span keeps its newest intervals.
        let a = a.max(b.saturating_sub(MAX_SPAN_INTERVALS));
        out.extend(accumulate(&segments, samples, a, b + 1));
    }
    out
}

/// The intervals `[k_from, k_to)` of a series recomputed from its stored samples
/// (revision 0; the caller numbers revisions). `samples` must hold every sample in
/// those intervals plus the last one before them and the first one after them
/// (where they exist); `hold_ms` is the series' typical spacing
/// ([`IntervalTracker::hold_ms`]). Every interval of the range is returned, with
/// or without data.
pub fn recompute_intervals(
    kind: Kind,
    unit: Unit,
    params: &IntervalParams,
    hold_ms: i64,
    samples: &[(i64, f64)],
    k_from: i64,
    k_to: i64,
) -> Result<Vec<Interval>, DeriveError> {
    check_kind_unit(kind, unit)?;
    check_span(k_from, k_to)?;
    if k_to <= k_from {
        return Ok(Vec::new());
    }
    let samples = normalize(samples);
    Ok(emit_intervals(
        kind, unit, params, hold_ms, &samples, k_from, k_to, k_from,
    ))
}

/// Merges two sorted, unique sample lists; `newer` wins on equal timestamps.
fn merge(held: &[(i64, f64)], newer: &[(i64, f64)]) -> Vec<(i64, f64)> {
    let mut out = Vec::with_capacity(held.len() + newer.len());
    let (mut i, mut j) = (0, 0);
    while i < held.len() && j < newer.len() {
        match held[i].0.cmp(&newer[j].0) {
            std::cmp::Ordering::Less => {
                out.push(held[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(newer[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(newer[j]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&held[i..]);
    out.extend_from_slice(&newer[j..]);
    out
}

#[cfg(test)]
#[path = "intervals_tests.rs"]
mod tests;
