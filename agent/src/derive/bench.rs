//! Figures for the derive stage on one year of one meter (35,040 intervals):
//! interval throughput (whole-series and incremental), clustering time for k = 3 and
//! `auto`, forecast time. Run with `cargo bench -p edge-agent --bench derive`.

use std::io::Write;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::clusters::{cluster_intervals, ClusterCount};
use super::forecast::{forecast, ForecastParams};
use super::intervals::{compute_intervals, IntervalParams, IntervalTracker, TrackerParams, Unit};
use crate::model::Kind;

const YEAR_START: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z
const MINUTE: i64 = 60_000;
const DAYS: i64 = 365;
const RUNS: usize = 5;

/// Household power in W at minute `m` of the year: standby at night, a base load by
/// day, a heat pump in the evening, with noise.
fn household_w(minute: i64, rng: &mut rand::rngs::StdRng) -> f64 {
    let hour = (minute / 60) % 24;
    let level = match hour {
        0..=5 => 180.0,
        17..=20 => 3800.0,
        _ => 1400.0,
    };
    level * (1.0 + rng.gen_range(-0.05..0.05))
}

/// Median duration of `RUNS` runs of `f`, and the last result.
fn time<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut result = None;
    for _ in 0..RUNS {
        let started = Instant::now();
        let r = f();
        times.push(started.elapsed());
        result = Some(r);
    }
    times.sort();
    // RUNS > 0, so a result exists.
    (times[RUNS / 2], result.expect("at least one run"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_second(count: usize, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64().max(1e-9)
}

/// Prints the figures to `out`.
pub fn bench(out: &mut impl Write) -> std::io::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let minutes = DAYS * 24 * 60;
    let power: Vec<(i64, f64)> = (0..minutes)
        .map(|m| (YEAR_START + m * MINUTE, household_w(m, &mut rng)))
        .collect();
    // The same load as a 5-minute energy register in kWh.
    let mut register = 12_345.0;
    let mut totals = Vec::with_capacity(power.len() / 5 + 1);
    for (i, (ts, w)) in power.iter().enumerate() {
        if i % 5 == 0 {
            totals.push((*ts, register));
        }
        register += w / 1000.0 / 60.0;
    }
    let params = IntervalParams {
        max_gap_ms: 5 * MINUTE,
        spacing_ms: Some(MINUTE),
    };
    writeln!(
        out,
        "derive bench: one meter, {DAYS} days, {} intervals, median of {RUNS} runs",
        DAYS * 96
    )?;

    let (d, intervals) = time(|| compute_intervals(Kind::Power, Unit::W, &power, &params));
    let intervals = intervals.map_err(std::io::Error::other)?;
    writeln!(
        out,
        "intervals  power, 1 reading/min:  {:>8} readings in {:>7.1} ms = {:>6.2} M readings/s ({} intervals)",
        power.len(),
        ms(d),
        per_second(power.len(), d) / 1e6,
        intervals.len()
    )?;
    let (d, from_totals) = time(|| {
        compute_intervals(
            Kind::EnergyTotal,
            Unit::Kwh,
            &totals,
            &IntervalParams::default(),
        )
    });
    let from_totals = from_totals.map_err(std::io::Error::other)?;
    writeln!(
        out,
        "intervals  energy_total, 1/5 min: {:>8} readings in {:>7.1} ms = {:>6.2} M readings/s ({} intervals)",
        totals.len(),
        ms(d),
        per_second(totals.len(), d) / 1e6,
        from_totals.len()
    )?;

    // Incremental: one push per minute-poll batch of 10 readings, take_closed each time.
    let tracker_params = TrackerParams {
        interval: params,
        grace_ms: 2 * MINUTE,
        retention_ms: 6 * 3_600_000,
    };
    let (d, (closed, retained)) = time(|| {
        // Power in W is a valid series.
        let mut tracker = IntervalTracker::new(Kind::Power, Unit::W, tracker_params)
            .expect("power in W is a valid series");
        let mut closed = 0;
        for batch in power.chunks(10) {
            tracker.push(batch);
            closed += tracker.take_closed().len();
        }
        (closed, tracker.retained_samples())
    });
    writeln!(
        out,
        "tracker    power, batches of 10:  {:>8} readings in {:>7.1} ms = {:>6.2} M readings/s ({closed} closed, {retained} samples retained)",
        power.len(),
        ms(d),
        per_second(power.len(), d) / 1e6,
    )?;
    let state = serde_json::to_vec(&{
        // Power in W is a valid series.
        let mut tracker = IntervalTracker::new(Kind::Power, Unit::W, tracker_params)
            .expect("power in W is a valid series");
        tracker.push(&power[..24 * 60]);
        tracker.take_closed();
        tracker
    })?;
    writeln!(
        out,
        "tracker    persisted state (JSON, 6 h retention, 1 reading/min): {} bytes",
        state.len()
    )?;

    let points: Vec<(i64, f64, f64)> = intervals
        .iter()
        .filter_map(|iv| iv.mean_w.map(|p| (iv.start_ms, p, iv.energy_kwh)))
        .collect();
    let (d, k3) = time(|| cluster_intervals(&points, ClusterCount::Fixed(3)));
    writeln!(
        out,
        "clusters   k = 3:    {:>7.2} ms for {} intervals; centres {}",
        ms(d),
        points.len(),
        centres(&k3.clusters)
    )?;
    let (d, auto) = time(|| cluster_intervals(&points, ClusterCount::Auto));
    writeln!(
        out,
        "clusters   k = auto: {:>7.2} ms for {} intervals; chose k = {}, centres {}",
        ms(d),
        points.len(),
        auto.k,
        centres(&auto.clusters)
    )?;

    let history: Vec<(i64, f64)> = intervals
        .iter()
        .filter(|iv| iv.coverage == 1.0)
        .map(|iv| (iv.start_ms, iv.energy_kwh))
        .collect();
    let next_day = YEAR_START + DAYS * 24 * 3_600_000;
    let (d, fc) = time(|| {
        forecast(
            &history,
            next_day,
            next_day + 24 * 3_600_000,
            &ForecastParams::default(),
        )
    });
    let fc = fc.map_err(std::io::Error::other)?;
    let backtest = fc
        .backtest
        .map(|b| format!("MAPE {:.2}%, WAPE {:.2}%", b.mape_pct, b.wape_pct))
        .unwrap_or_else(|| "no backtest".to_string());
    writeln!(
        out,
        "forecast   next day ({} intervals) from {} intervals of history: {:>7.2} ms; total {:.2} kWh; backtest {backtest}",
        fc.intervals.len(),
        history.len(),
        ms(d),
        fc.total_kwh,
    )?;
    Ok(())
}

fn centres(clusters: &[super::clusters::Cluster]) -> String {
    let parts: Vec<String> = clusters
        .iter()
        .map(|c| format!("{:.0} W", c.centre_w))
        .collect();
    parts.join(", ")
}
