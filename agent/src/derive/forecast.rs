//! Energy forecast of one meter per 15-minute interval, from its own history.
//!
//! **Model.** Additive: `energy(day d, slot s) = level(d) / 96 + profile[s]`.
//! - `level(d)` is a straight line fitted by least squares to the daily totals of
//!   the *complete* days (all 96 intervals present) in the last `history_days` days
//!   of history: the trend. With one complete day it is flat at that day's total;
//!   with none, flat at 96 × the mean interval energy.
//! - `profile[s]` is the mean over those days of `energy − level(d) / 96` for slot
//!   `s` of day (00:00 UTC = slot 0, 96 slots): the daily shape, deseasonalised
//!   against the trend. A slot with no history has profile 0.
//!
//! **Windows.** `[start, end)` needs not be aligned: each interval it touches is
//! forecast whole and counted pro rata by the fraction of it inside the window
//! (`fraction` in each [`ForecastInterval`]); the total is the sum of those parts.
//!
//! **Backtest.** The last complete day of the history is forecast from the history
//! before it (same model, same `history_days`) and compared with what was
//! measured: MAPE (mean of `|actual − forecast| / |actual|` over the day's
//! intervals, skipping those with an actual of 0) and WAPE
//! (`Σ|actual − forecast| / Σ|actual|`, which small actuals cannot blow up), both in
//! percent. No backtest without a complete day that has history before it.
//!
//! History is `(interval_start_ms, energy_kwh)`, e.g. the closed intervals of a
//! meter; pass only intervals backed by data (leave out gaps). Order does not matter;
//! for a start given twice the last wins; non-finite energies are skipped.

use serde::{Deserialize, Serialize};

use super::intervals::{interval_start, INTERVAL_MS};
use super::DeriveError;

const DAY_MS: i64 = 86_400_000;
const SLOTS: usize = (DAY_MS / INTERVAL_MS) as usize;
/// Longest window forecast in one call: a leap year of intervals.
pub const MAX_FORECAST_INTERVALS: i64 = 366 * SLOTS as i64;

/// Forecast settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForecastParams {
    /// Days of history, counted back from the last interval, that the profile and
    /// the trend use.
    pub history_days: u32,
}

impl Default for ForecastParams {
    fn default() -> Self {
        ForecastParams { history_days: 28 }
    }
}

/// The forecast of one 15-minute interval (or the part of it inside the window).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForecastInterval {
    pub start_ms: i64,
    /// Forecast energy of the part inside the window, kWh.
    pub energy_kwh: f64,
    /// Fraction of the interval inside the window, (0, 1].
    pub fraction: f64,
}

/// How well the method forecast the last complete day of the history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backtest {
    /// Start of the day forecast, Unix ms.
    pub day_start_ms: i64,
    /// Intervals compared (the day's intervals with a non-zero actual).
    pub intervals: usize,
    pub mape_pct: f64,
    pub wape_pct: f64,
}

/// A meter's forecast for a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub start_ms: i64,
    pub end_ms: i64,
    pub intervals: Vec<ForecastInterval>,
    /// Sum of the intervals, kWh.
    pub total_kwh: f64,
    /// Slope of the daily-total trend, kWh per day.
    pub trend_kwh_per_day: f64,
    /// Complete days the trend was fitted on.
    pub complete_days: usize,
    pub backtest: Option<Backtest>,
}

/// Forecasts the energy of `[start_ms, end_ms)` per interval and in total from the
/// meter's `history` (see the module doc). Errors: an empty window, a window over
/// [`MAX_FORECAST_INTERVALS`], or no usable history.
pub fn forecast(
    history: &[(i64, f64)],
    start_ms: i64,
    end_ms: i64,
    params: &ForecastParams,
) -> Result<Forecast, DeriveError> {
    if end_ms <= start_ms {
        return Err(DeriveError::EmptyWindow { start_ms, end_ms });
    }
    let first = interval_start(start_ms);
    // Intervals touched: the last one holds end_ms - 1.
    let intervals = (end_ms.saturating_sub(1).saturating_sub(first))
        .div_euclid(INTERVAL_MS)
        .saturating_add(1);
    if intervals > MAX_FORECAST_INTERVALS {
        return Err(DeriveError::SpanTooLong {
            intervals,
            limit: MAX_FORECAST_INTERVALS,
        });
    }
    let history = normalize(history);
    let model = Model::fit(&history, params).ok_or(DeriveError::NoHistory)?;
    let mut out = Vec::with_capacity(intervals as usize);
    for i in 0..intervals {
        let s = first.saturating_add(i * INTERVAL_MS);
        let inside = s.saturating_add(INTERVAL_MS).min(end_ms) - s.max(start_ms);
        let fraction = inside as f64 / INTERVAL_MS as f64;
        out.push(ForecastInterval {
            start_ms: s,
            energy_kwh: model.predict(s) * fraction,
            fraction,
        });
    }
    Ok(Forecast {
        start_ms,
        end_ms,
        total_kwh: out.iter().map(|f| f.energy_kwh).sum(),
        intervals: out,
        trend_kwh_per_day: model.slope,
        complete_days: model.complete_days,
        backtest: backtest(&history, params),
    })
}

/// Sorted by start, one per interval (the last given wins), finite energies only.
fn normalize(history: &[(i64, f64)]) -> Vec<(i64, f64)> {
    let mut sorted: Vec<(i64, f64)> = history
        .iter()
        .filter(|(_, e)| e.is_finite())
        .map(|&(ts, e)| (interval_start(ts), e))
        .collect();
    sorted.sort_by_key(|&(ts, _)| ts);
    let mut out: Vec<(i64, f64)> = Vec::with_capacity(sorted.len());
    for (ts, e) in sorted {
        match out.last_mut() {
            Some(last) if last.0 == ts => last.1 = e,
            _ => out.push((ts, e)),
        }
    }
    out
}

fn day_of(ts: i64) -> i64 {
    ts.div_euclid(DAY_MS)
}

fn slot_of(ts: i64) -> usize {
    (ts.rem_euclid(DAY_MS) / INTERVAL_MS) as usize
}

struct Model {
    /// Daily total at `centre_day`, kWh.
    level: f64,
    slope: f64,
    centre_day: f64,
    profile: [f64; SLOTS],
    complete_days: usize,
}

impl Model {
    /// Fits on sorted, unique `history`; `None` when it is empty.
    fn fit(history: &[(i64, f64)], params: &ForecastParams) -> Option<Model> {
        let last_day = day_of(history.last()?.0);
        let first_day = last_day - i64::from(params.history_days.max(1)) + 1;
        let from = history.partition_point(|(ts, _)| day_of(*ts) < first_day);
        let used = &history[from..];

        // Daily totals of complete days.
        let mut days: Vec<(i64, usize, f64)> = Vec::new();
        for &(ts, e) in used {
            let d = day_of(ts);
            match days.last_mut() {
                Some(last) if last.0 == d => {
                    last.1 += 1;
                    last.2 += e;
                }
                _ => days.push((d, 1, e)),
            }
        }
        let complete: Vec<(f64, f64)> = days
            .iter()
            .filter(|d| d.1 == SLOTS)
            .map(|d| (d.0 as f64, d.2))
            .collect();
        let (level, slope, centre_day) = match complete.len() {
            0 => {
                let mean = used.iter().map(|p| p.1).sum::<f64>() / used.len() as f64;
                (mean * SLOTS as f64, 0.0, last_day as f64)
            }
            1 => (complete[0].1, 0.0, complete[0].0),
            n => {
                let n = n as f64;
                let mx = complete.iter().map(|p| p.0).sum::<f64>() / n;
                let my = complete.iter().map(|p| p.1).sum::<f64>() / n;
                let sxy: f64 = complete.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
                let sxx: f64 = complete.iter().map(|p| (p.0 - mx).powi(2)).sum();
                (my, if sxx > 0.0 { sxy / sxx } else { 0.0 }, mx)
            }
        };
        let mut model = Model {
            level,
            slope,
            centre_day,
            profile: [0.0; SLOTS],
            complete_days: complete.len(),
        };
        let mut sums = [0.0; SLOTS];
        let mut counts = [0usize; SLOTS];
        for &(ts, e) in used {
            let slot = slot_of(ts);
            sums[slot] += e - model.slot_level(day_of(ts));
            counts[slot] += 1;
        }
        for slot in 0..SLOTS {
            if counts[slot] > 0 {
                model.profile[slot] = sums[slot] / counts[slot] as f64;
            }
        }
        Some(model)
    }

    /// The trend's share of one interval on `day`.
    fn slot_level(&self, day: i64) -> f64 {
        (self.level + self.slope * (day as f64 - self.centre_day)) / SLOTS as f64
    }

    fn predict(&self, interval_start_ms: i64) -> f64 {
        self.slot_level(day_of(interval_start_ms)) + self.profile[slot_of(interval_start_ms)]
    }
}

/// Forecasts the last complete day from the history before it.
fn backtest(history: &[(i64, f64)], params: &ForecastParams) -> Option<Backtest> {
    let mut day_end = history.len();
    while day_end > 0 {
        let day = day_of(history[day_end - 1].0);
        let day_start = history.partition_point(|(ts, _)| day_of(*ts) < day);
        if day_end - day_start == SLOTS {
            let model = Model::fit(&history[..day_start], params)?;
            let (mut abs_pct, mut n, mut abs_err, mut abs_actual) = (0.0, 0usize, 0.0, 0.0);
            for &(ts, actual) in &history[day_start..day_end] {
                let err = (actual - model.predict(ts)).abs();
                abs_err += err;
                abs_actual += actual.abs();
                if actual != 0.0 {
                    abs_pct += err / actual.abs();
                    n += 1;
                }
            }
            if n == 0 {
                return None;
            }
            return Some(Backtest {
                day_start_ms: day * DAY_MS,
                intervals: n,
                mape_pct: 100.0 * abs_pct / n as f64,
                wape_pct: 100.0 * abs_err / abs_actual,
            });
        }
        day_end = day_start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const DAY: i64 = 1_535_068_800_000;

    /// Daily shape of a household, kWh per interval: night base, morning and
    /// evening peaks.
    fn shape(slot: usize) -> f64 {
        let h = slot as f64 / 4.0;
        0.08 + 0.25 * (-(h - 7.5f64).powi(2) / 2.0).exp()
            + 0.45 * (-(h - 19.0f64).powi(2) / 4.0).exp()
    }

    fn synthetic(days: i64, noise: f64, trend_per_day: f64, seed: u64) -> Vec<(i64, f64)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..days * SLOTS as i64)
            .map(|i| {
                let day = i / SLOTS as i64;
                let base = shape((i % SLOTS as i64) as usize) * (1.0 + trend_per_day * day as f64);
                (
                    DAY + i * INTERVAL_MS,
                    base * (1.0 + rng.gen_range(-noise..noise)),
                )
            })
            .collect()
    }

    #[test]
    fn periodic_load_backtests_under_five_percent() {
        // Two weeks, ±4% noise, +0.5% per day.
        let history = synthetic(14, 0.04, 0.005, 1);
        let start = DAY + 14 * DAY_MS;
        let f = forecast(&history, start, start + DAY_MS, &ForecastParams::default()).unwrap();
        let bt = f.backtest.unwrap();
        assert_eq!(bt.day_start_ms, DAY + 13 * DAY_MS);
        assert_eq!(bt.intervals, 96);
        assert!(bt.mape_pct < 5.0, "MAPE {}", bt.mape_pct);
        assert!(bt.wape_pct < 5.0, "WAPE {}", bt.wape_pct);
        assert_eq!(f.intervals.len(), 96);
        assert_eq!(f.complete_days, 14);
        assert!(f.trend_kwh_per_day > 0.0);
        // The next day's expected total (noise-free), within 3%.
        let expected: f64 = (0..SLOTS).map(|s| shape(s) * (1.0 + 0.005 * 14.0)).sum();
        assert!(
            (f.total_kwh / expected - 1.0).abs() < 0.03,
            "{} vs {expected}",
            f.total_kwh
        );
        // The evening peak is forecast at the evening.
        let peak = f
            .intervals
            .iter()
            .max_by(|a, b| a.energy_kwh.total_cmp(&b.energy_kwh))
            .unwrap();
        assert_eq!((peak.start_ms - start) / 3_600_000, 19);
    }

    #[test]
    fn additive_trend_without_noise_is_forecast_exactly() {
        let history: Vec<(i64, f64)> = (0..10 * SLOTS as i64)
            .map(|i| {
                let day = (i / SLOTS as i64) as f64;
                (
                    DAY + i * INTERVAL_MS,
                    shape((i % SLOTS as i64) as usize) + 0.002 * day,
                )
            })
            .collect();
        let start = DAY + 10 * DAY_MS;
        let f = forecast(&history, start, start + DAY_MS, &ForecastParams::default()).unwrap();
        for (slot, fi) in f.intervals.iter().enumerate() {
            assert!((fi.energy_kwh - (shape(slot) + 0.002 * 10.0)).abs() < 1e-9);
        }
        assert!((f.trend_kwh_per_day - 0.002 * 96.0).abs() < 1e-9);
        assert!(f.backtest.unwrap().mape_pct < 1e-6);
    }

    #[test]
    fn unaligned_window_counts_partial_intervals_pro_rata() {
        let history = synthetic(7, 0.02, 0.0, 2);
        let p = ForecastParams::default();
        let day = DAY + 7 * DAY_MS;
        let whole = forecast(&history, day, day + 30 * 60_000, &p).unwrap();
        // 00:07 to 00:22: 8/15 of the first interval and 7/15 of the second.
        let part = forecast(&history, day + 7 * 60_000, day + 22 * 60_000, &p).unwrap();
        assert_eq!(part.intervals.len(), 2);
        assert!((part.intervals[0].fraction - 8.0 / 15.0).abs() < 1e-12);
        assert!((part.intervals[1].fraction - 7.0 / 15.0).abs() < 1e-12);
        let expected =
            whole.intervals[0].energy_kwh * 8.0 / 15.0 + whole.intervals[1].energy_kwh * 7.0 / 15.0;
        assert!((part.total_kwh - expected).abs() < 1e-12);
        // A window inside one interval.
        let tiny = forecast(&history, day + 60_000, day + 2 * 60_000, &p).unwrap();
        assert_eq!(tiny.intervals.len(), 1);
        assert!((tiny.total_kwh - whole.intervals[0].energy_kwh / 15.0).abs() < 1e-12);
    }

    #[test]
    fn errors_and_thin_history() {
        let p = ForecastParams::default();
        assert_eq!(
            forecast(&[], DAY, DAY + DAY_MS, &p),
            Err(DeriveError::NoHistory)
        );
        assert!(matches!(
            forecast(&[(DAY, 1.0)], DAY, DAY, &p),
            Err(DeriveError::EmptyWindow { .. })
        ));
        assert!(matches!(
            forecast(&[(DAY, 1.0)], DAY, DAY + 400 * DAY_MS, &p),
            Err(DeriveError::SpanTooLong { .. })
        ));
        // One interval of history: a flat forecast at its level, no backtest.
        let f = forecast(
            &[(DAY, 0.3)],
            DAY + DAY_MS,
            DAY + DAY_MS + 2 * INTERVAL_MS,
            &p,
        )
        .unwrap();
        assert!(f
            .intervals
            .iter()
            .all(|i| (i.energy_kwh - 0.3).abs() < 1e-12));
        assert_eq!(f.backtest, None);
        // Non-finite values are skipped; out-of-order history gives the same result.
        let mut history = synthetic(3, 0.02, 0.0, 3);
        let a = forecast(&history, DAY + 3 * DAY_MS, DAY + 4 * DAY_MS, &p).unwrap();
        history.reverse();
        history.push((DAY, f64::NAN));
        history.insert(0, (DAY, f64::INFINITY));
        let b = forecast(&history, DAY + 3 * DAY_MS, DAY + 4 * DAY_MS, &p).unwrap();
        assert_eq!(a, b);
    }
}
