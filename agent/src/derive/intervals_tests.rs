use proptest::prelude::*;

use super::*;

/// 2018-08-24T00:00:00Z, the day of the worked examples.
const DAY: i64 = 1_535_068_800_000;
const MIN: i64 = 60_000;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

fn energies(intervals: &[Interval]) -> Vec<f64> {
    intervals.iter().map(|i| i.energy_kwh).collect()
}

fn assert_energies(intervals: &[Interval], expected: &[f64]) {
    let got = energies(intervals);
    assert_eq!(got.len(), expected.len(), "interval count: {got:?}");
    for (g, e) in got.iter().zip(expected) {
        assert!(close(*g, *e), "got {got:?}, expected {expected:?}");
    }
}

#[test]
fn worked_example_hourly_kwh_deltas_spread_over_quarters() {
    let samples = [(DAY, 12.0), (DAY + 60 * MIN, 26.0), (DAY + 120 * MIN, 18.0)];
    let iv = compute_intervals(
        Kind::EnergyDelta,
        Unit::Kwh,
        &samples,
        &IntervalParams::default(),
    )
    .unwrap();
    assert_energies(
        &iv,
        &[3.0, 3.0, 3.0, 3.0, 6.5, 6.5, 6.5, 6.5, 4.5, 4.5, 4.5, 4.5],
    );
    for (i, interval) in iv.iter().enumerate() {
        assert_eq!(interval.start_ms, DAY + i as i64 * INTERVAL_MS);
        assert_eq!(interval.coverage, 1.0);
        assert_eq!(interval.samples, u32::from(i % 4 == 0));
    }
    // 3 kWh in 15 min is 12 kW.
    assert!(close(iv[0].mean_w.unwrap(), 12_000.0));
    // The last hour rests on the median spacing: estimated.
    assert!(iv[8..].iter().all(|i| i.flags.estimated));
}

#[test]
fn worked_example_kw_every_five_minutes() {
    let values = [22.0, 24.0, 23.0, 18.0, 22.0, 23.0, 8.0];
    let samples: Vec<(i64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (DAY + i as i64 * 5 * MIN, *v))
        .collect();
    let iv =
        compute_intervals(Kind::Power, Unit::Kw, &samples, &IntervalParams::default()).unwrap();
    assert_energies(&iv, &[5.75, 5.25, 8.0 / 12.0]);
    assert!(close(iv[2].energy_kwh, 0.6667) || (iv[2].energy_kwh - 0.6667).abs() < 1e-4);
    assert_eq!(iv[0].coverage, 1.0);
    assert_eq!(iv[1].coverage, 1.0);
    assert!(close(iv[2].coverage, 1.0 / 3.0));
    assert_eq!(
        iv.iter().map(|i| i.samples).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    assert_eq!(iv[0].min_w, Some(22_000.0));
    assert_eq!(iv[0].max_w, Some(24_000.0));
    assert!(close(iv[0].mean_w.unwrap(), 23_000.0));
    assert!(close(iv[1].mean_w.unwrap(), 21_000.0));
    assert!(close(iv[2].mean_w.unwrap(), 8_000.0));
    assert!(iv[0].flags.is_empty() && iv[1].flags.is_empty());
    assert!(iv[2].flags.gap && iv[2].flags.estimated && !iv[2].flags.reset);
}

#[test]
fn worked_example_quarter_hour_deltas_map_one_to_one() {
    let samples: Vec<(i64, f64)> = [2.0, 5.0, 2.0, 6.0]
        .iter()
        .enumerate()
        .map(|(i, v)| (DAY + i as i64 * INTERVAL_MS, *v))
        .collect();
    let iv = compute_intervals(
        Kind::EnergyDelta,
        Unit::Kwh,
        &samples,
        &IntervalParams::default(),
    )
    .unwrap();
    assert_eq!(energies(&iv), vec![2.0, 5.0, 2.0, 6.0]);
    assert!(iv.iter().all(|i| i.coverage == 1.0 && i.samples == 1));
}

#[test]
fn units_scale_to_kwh() {
    let kw = [(DAY, 1.5), (DAY + 15 * MIN, 1.5)];
    let w = [(DAY, 1500.0), (DAY + 15 * MIN, 1500.0)];
    let p = IntervalParams::default();
    let a = compute_intervals(Kind::Power, Unit::Kw, &kw, &p).unwrap();
    let b = compute_intervals(Kind::Power, Unit::W, &w, &p).unwrap();
    assert_eq!(a, b);
    assert!(close(a[0].energy_kwh, 0.375));
    let wh = [(DAY, 250.0), (DAY + 15 * MIN, 500.0)];
    let c = compute_intervals(Kind::EnergyTotal, Unit::Wh, &wh, &p).unwrap();
    assert!(close(c[0].energy_kwh, 0.25));
    assert!(close(c[0].mean_w.unwrap(), 1000.0));
}

#[test]
fn kinds_and_units_that_do_not_fit_are_refused() {
    let p = IntervalParams::default();
    assert!(matches!(
        compute_intervals(Kind::Power, Unit::Kwh, &[], &p),
        Err(DeriveError::UnitMismatch { .. })
    ));
    assert!(matches!(
        compute_intervals(Kind::EnergyTotal, Unit::W, &[], &p),
        Err(DeriveError::UnitMismatch { .. })
    ));
    assert!(matches!(
        compute_intervals(Kind::Voltage, Unit::W, &[], &p),
        Err(DeriveError::NotEnergy("voltage"))
    ));
    assert_eq!(Unit::parse(" kwh ").unwrap(), Unit::Kwh);
    assert_eq!(Unit::parse("KW").unwrap(), Unit::Kw);
    assert!(Unit::parse("VA").is_err());
    assert!(matches!(
        compute_intervals(Kind::Power, Unit::W, &[(0, 1.0), (i64::MAX / 2, 1.0)], &p),
        Err(DeriveError::SpanTooLong { .. })
    ));
}

#[test]
fn unsorted_duplicate_and_non_finite_input() {
    let p = IntervalParams::default();
    let clean = [(DAY, 1.0), (DAY + 5 * MIN, 2.0), (DAY + 10 * MIN, 3.0)];
    let messy = [
        (DAY + 10 * MIN, 3.0),
        (DAY + 5 * MIN, 9.0),
        (DAY, 1.0),
        (DAY + 7 * MIN, f64::NAN),
        (DAY + 5 * MIN, 2.0), // last write for this timestamp wins
        (DAY + 8 * MIN, f64::INFINITY),
    ];
    assert_eq!(
        compute_intervals(Kind::Power, Unit::Kw, &clean, &p).unwrap(),
        compute_intervals(Kind::Power, Unit::Kw, &messy, &p).unwrap()
    );
    assert!(compute_intervals(Kind::Power, Unit::Kw, &[], &p)
        .unwrap()
        .is_empty());
}

#[test]
fn power_hole_longer_than_max_gap_is_a_gap_without_energy() {
    let p = IntervalParams {
        max_gap_ms: 5 * MIN,
        spacing_ms: Some(MIN),
    };
    // 2 kW at 00:00 and 01:00: the first holds 5 min, then nothing until 01:00.
    let iv = compute_intervals(
        Kind::Power,
        Unit::Kw,
        &[(DAY, 2.0), (DAY + 60 * MIN, 2.0)],
        &p,
    )
    .unwrap();
    assert_eq!(iv.len(), 5);
    assert!(close(iv[0].energy_kwh, 2.0 * 5.0 / 60.0));
    assert!(close(iv[0].coverage, 1.0 / 3.0));
    assert!(iv[0].flags.gap && !iv[0].flags.estimated);
    for hole in &iv[1..4] {
        assert_eq!(hole.energy_kwh, 0.0);
        assert_eq!(hole.coverage, 0.0);
        assert_eq!((hole.min_w, hole.mean_w, hole.max_w), (None, None, None));
        assert!(hole.flags.gap);
    }
    // The final sample holds one spacing (1 min).
    assert!(close(iv[4].energy_kwh, 2.0 / 60.0));
    assert!(iv[4].flags.estimated);
}

#[test]
fn long_energy_segments_are_estimated_not_lost() {
    let p = IntervalParams {
        max_gap_ms: 15 * MIN,
        spacing_ms: None,
    };
    let iv = compute_intervals(
        Kind::EnergyTotal,
        Unit::Kwh,
        &[(DAY, 10.0), (DAY + 60 * MIN, 14.0)],
        &p,
    )
    .unwrap();
    assert_energies(&iv, &[1.0, 1.0, 1.0, 1.0, 0.0]);
    assert!(iv[..4]
        .iter()
        .all(|i| i.flags.estimated && i.coverage == 1.0));
    // The final reading starts no segment.
    assert_eq!(iv[4].coverage, 0.0);
    assert_eq!(iv[4].samples, 1);
}

#[test]
fn counter_reset_is_flagged_and_never_negative() {
    // 5-minute register readings; between 00:15 and 00:20 it drops to 0.4 (reset).
    let readings = [
        (DAY, 100.0),
        (DAY + 5 * MIN, 101.0),
        (DAY + 10 * MIN, 102.0),
        (DAY + 15 * MIN, 103.0),
        (DAY + 20 * MIN, 0.4),
        (DAY + 25 * MIN, 1.4),
        (DAY + 30 * MIN, 2.4),
    ];
    let iv = compute_intervals(
        Kind::EnergyTotal,
        Unit::Kwh,
        &readings,
        &IntervalParams::default(),
    )
    .unwrap();
    assert!(iv.iter().all(|i| i.energy_kwh >= 0.0));
    assert_energies(&iv, &[3.0, 2.0, 0.0]);
    assert!(!iv[0].flags.reset);
    assert!(iv[1].flags.reset && iv[1].flags.gap);
    // The reset stretch 00:15-00:20 is not covered.
    assert!(close(iv[1].coverage, 10.0 / 15.0));
    let total: f64 = iv.iter().map(|i| i.energy_kwh).sum();
    assert!(close(total, 5.0));
}

#[test]
fn meter_swap_counts_from_the_new_baseline() {
    // The old meter stood at 5210 kWh; the new one starts at 37 kWh.
    let readings = [
        (DAY, 5208.0),
        (DAY + 15 * MIN, 5209.0),
        (DAY + 30 * MIN, 5210.0),
        (DAY + 45 * MIN, 37.0),
        (DAY + 60 * MIN, 38.5),
        (DAY + 75 * MIN, 40.0),
    ];
    let iv = compute_intervals(
        Kind::EnergyTotal,
        Unit::Kwh,
        &readings,
        &IntervalParams::default(),
    )
    .unwrap();
    assert_energies(&iv, &[1.0, 1.0, 0.0, 1.5, 1.5, 0.0]);
    assert!(iv[2].flags.reset && iv[2].coverage == 0.0);
    assert!(iv.iter().filter(|i| i.flags.reset).count() == 1);
    assert!(iv.iter().all(|i| i.energy_kwh >= 0.0));
}

#[test]
fn energy_of_unaligned_windows() {
    let values = [22.0, 24.0, 23.0, 18.0, 22.0, 23.0, 8.0];
    let samples: Vec<(i64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (DAY + i as i64 * 5 * MIN, *v))
        .collect();
    let p = IntervalParams::default();
    let w = energy_between_samples(
        Kind::Power,
        Unit::Kw,
        &samples,
        &p,
        DAY + 5 * MIN,
        DAY + 20 * MIN,
    )
    .unwrap();
    assert!(close(w.energy_kwh, (24.0 + 23.0 + 18.0) / 12.0));
    assert_eq!(w.coverage, 1.0);
    // Half a sample period at each edge.
    let w = energy_between_samples(
        Kind::Power,
        Unit::Kw,
        &samples,
        &p,
        DAY + 150_000,
        DAY + 17 * MIN + 30_000,
    )
    .unwrap();
    assert!(close(
        w.energy_kwh,
        (22.0 * 2.5 + 24.0 * 5.0 + 23.0 * 5.0 + 18.0 * 2.5) / 60.0
    ));
    let iv = compute_intervals(Kind::Power, Unit::Kw, &samples, &p).unwrap();
    let mixed = energy_between(
        Kind::Power,
        Unit::Kw,
        &iv,
        &samples,
        &p,
        DAY + 150_000,
        DAY + 17 * MIN + 30_000,
    )
    .unwrap();
    assert!(close(mixed.energy_kwh, w.energy_kwh));
    let whole = energy_between(Kind::Power, Unit::Kw, &iv, &[], &p, DAY, DAY + 30 * MIN).unwrap();
    assert!(close(whole.energy_kwh, 11.0));
    assert!(!whole.flags.gap);
    assert!(energy_between(Kind::Power, Unit::Kw, &iv, &[], &p, DAY, DAY).is_err());
    // Missing intervals count as gaps.
    let partial = energy_between(
        Kind::Power,
        Unit::Kw,
        &iv[..1],
        &[],
        &p,
        DAY,
        DAY + 30 * MIN,
    )
    .unwrap();
    assert!(partial.flags.gap && close(partial.coverage, 0.5));
}

#[test]
fn window_split_parts() {
    let s = WindowSplit::new(DAY + MIN, DAY + 40 * MIN);
    assert_eq!(s.head, Some((DAY + MIN, DAY + 15 * MIN)));
    assert_eq!(s.full, Some((DAY + 15 * MIN, DAY + 30 * MIN)));
    assert_eq!(s.tail, Some((DAY + 30 * MIN, DAY + 40 * MIN)));
    let s = WindowSplit::new(DAY + MIN, DAY + 2 * MIN);
    assert_eq!(
        (s.head, s.full, s.tail),
        (Some((DAY + MIN, DAY + 2 * MIN)), None, None)
    );
    let s = WindowSplit::new(DAY, DAY + 30 * MIN);
    assert_eq!(
        (s.head, s.full, s.tail),
        (None, Some((DAY, DAY + 30 * MIN)), None)
    );
    let s = WindowSplit::new(DAY, DAY);
    assert_eq!((s.head, s.full, s.tail), (None, None, None));
}

#[test]
fn interval_json_is_compact_and_round_trips() {
    let iv = compute_intervals(
        Kind::Power,
        Unit::Kw,
        &[(DAY, 1.0), (DAY + 5 * MIN, 2.0)],
        &IntervalParams::default(),
    )
    .unwrap();
    let json = serde_json::to_string(&iv[0]).unwrap();
    assert!(json.starts_with(r#"{"s":1535068800000,"kwh":"#), "{json}");
    assert!(
        json.contains(r#""f":{"gap":true,"estimated":true}"#),
        "{json}"
    );
    let back: Interval = serde_json::from_str(&json).unwrap();
    assert_eq!(back, iv[0]);
}

// ---- tracker ----

fn params(grace: i64, retention: i64) -> TrackerParams {
    TrackerParams {
        interval: IntervalParams {
            max_gap_ms: 15 * MIN,
            spacing_ms: None,
        },
        grace_ms: grace,
        retention_ms: retention,
    }
}

fn minute_power(minutes: i64) -> Vec<(i64, f64)> {
    (0..minutes)
        .map(|m| (DAY + m * MIN, 1.0 + (m % 7) as f64))
        .collect()
}

/// Plays the analytics worker over a tracker: a "store" of every finite sample
/// pushed, the newest revision of every interval, and the recomputation of closed
/// intervals from the store when late data touches them.
struct Harness {
    t: IntervalTracker,
    stored: std::collections::BTreeMap<i64, f64>,
    latest: std::collections::BTreeMap<i64, Interval>,
    revisions: usize,
    too_old: usize,
}

impl Harness {
    fn new(kind: Kind, unit: Unit, tp: TrackerParams) -> Harness {
        Harness {
            t: IntervalTracker::new(kind, unit, tp).unwrap(),
            stored: Default::default(),
            latest: Default::default(),
            revisions: 0,
            too_old: 0,
        }
    }

    fn revise(&mut self, mut iv: Interval, empty_too: bool) {
        match self.latest.get(&iv.start_ms) {
            Some(old) if old.same_content(&iv) => {}
            Some(old) => {
                iv.revision = old.revision + 1;
                self.revisions += 1;
                self.latest.insert(iv.start_ms, iv);
            }
            None => {
                if empty_too || iv.samples > 0 || iv.coverage > 0.0 || iv.flags.reset {
                    self.latest.insert(iv.start_ms, iv);
                }
            }
        }
    }

    /// One batch, sample by sample like the worker, late data recomputed after it.
    fn push(&mut self, batch: &[(i64, f64)]) {
        for &(ts, v) in batch {
            if v.is_finite() {
                self.stored.insert(ts, v);
            }
            let out = self.t.push(&[(ts, v)]);
            self.too_old += out.too_old;
            for iv in self.t.take_closed() {
                self.revise(iv, true);
            }
        }
        self.recompute_late();
    }

    /// One batch handed to the tracker at once.
    fn push_whole(&mut self, batch: &[(i64, f64)]) {
        for &(ts, v) in batch {
            if v.is_finite() {
                self.stored.insert(ts, v);
            }
        }
        let out = self.t.push(batch);
        self.too_old += out.too_old;
        for iv in self.t.take_closed() {
            self.revise(iv, true);
        }
        self.recompute_late();
    }

    fn close_silent(&mut self, now: i64) {
        for iv in self.t.close_silent(now) {
            self.revise(iv, true);
        }
        self.recompute_late();
    }

    fn recompute_late(&mut self) {
        let Some((lo, hi)) = self.t.take_late() else {
            return;
        };
        let before = self.stored.range(..lo).next_back().map(|(t, _)| *t);
        let after = self.stored.range(hi + 1..).next().map(|(t, _)| *t);
        let Some((a, b)) = self.t.late_intervals(lo, before, after) else {
            return;
        };
        let (from, to) = (a * INTERVAL_MS, b * INTERVAL_MS);
        let mut s: Vec<(i64, f64)> = Vec::new();
        s.extend(self.stored.range(..from).next_back().map(|(t, v)| (*t, *v)));
        s.extend(self.stored.range(from..to).map(|(t, v)| (*t, *v)));
        s.extend(self.stored.range(to..).next().map(|(t, v)| (*t, *v)));
        let p = self.t.params().interval;
        let ivs = recompute_intervals(self.t.kind(), self.t.unit(), &p, self.t.hold_ms(), &s, a, b)
            .unwrap();
        for iv in ivs {
            self.revise(iv, true);
        }
    }
}

/// DESIGN §5 computed directly for one interval from the whole sorted series, one
/// sample at a time (no segments, nothing shared with the tracker): energy (kWh),
/// coverage and sample count of `[k·15 min, (k+1)·15 min)`.
fn reference(
    kind: Kind,
    kilo: f64,
    max_gap: i64,
    samples: &[(i64, f64)],
    k: i64,
) -> (f64, f64, u32) {
    let (s, e) = (k * INTERVAL_MS, (k + 1) * INTERVAL_MS);
    // The typical spacing: median of the last 32 spacings, an even count giving the
    // mean of the two middle ones (whole ms, rounded down); one sample: min(max_gap, 15 min).
    let tail = &samples[samples.len().saturating_sub(33)..];
    let mut gaps: Vec<i64> = (1..tail.len()).map(|i| tail[i].0 - tail[i - 1].0).collect();
    gaps.sort();
    let spacing = if gaps.is_empty() {
        max_gap.min(15 * MIN)
    } else if gaps.len() % 2 == 1 {
        gaps[gaps.len() / 2]
    } else {
        ((gaps[gaps.len() / 2 - 1] + gaps[gaps.len() / 2]) as f64 / 2.0).floor() as i64
    };
    let overlap = |a: i64, b: i64| (b.min(e) - a.max(s)).max(0);
    let (mut energy, mut covered) = (0.0, 0i64);
    for i in 0..samples.len() {
        let (t, v) = samples[i];
        let next = samples.get(i + 1).copied();
        match kind {
            Kind::Power => {
                let end = match next {
                    Some((n, _)) => n.min(t + max_gap),
                    None => t + spacing.min(max_gap),
                };
                let o = overlap(t, end);
                energy += v * kilo * o as f64 / 3_600_000.0;
                covered += o;
            }
            Kind::EnergyDelta => {
                let end = next.map_or(t + spacing, |n| n.0);
                let o = overlap(t, end);
                if end > t {
                    energy += v * kilo * o as f64 / (end - t) as f64;
                }
                covered += o;
            }
            _ => {
                if let Some((n, r)) = next {
                    if r >= v {
                        let o = overlap(t, n);
                        energy += (r - v) * kilo * o as f64 / (n - t) as f64;
                        covered += o;
                    }
                }
            }
        }
    }
    let n = samples.iter().filter(|(t, _)| (s..e).contains(t)).count() as u32;
    (energy, covered as f64 / INTERVAL_MS as f64, n)
}

/// Every interval `h` holds equals the reference over the sorted `series`.
fn assert_matches_reference(h: &Harness, series: &[(i64, f64)]) {
    let mut sorted = series.to_vec();
    sorted.sort_by_key(|s| s.0);
    sorted.dedup_by_key(|s| s.0);
    let kilo = match h.t.unit() {
        Unit::W | Unit::Wh => 0.001,
        _ => 1.0,
    };
    let max_gap = h.t.params().interval.max_gap_ms;
    for iv in h.latest.values() {
        let k = interval_index(iv.start_ms);
        let (energy, coverage, n) = reference(h.t.kind(), kilo, max_gap, &sorted, k);
        assert!(
            (iv.energy_kwh - energy).abs() <= 1e-9 * energy.abs().max(1.0),
            "interval {k}: {} kWh, reference {energy} ({iv:?})",
            iv.energy_kwh
        );
        assert!(
            (iv.coverage - coverage).abs() <= 1e-9,
            "interval {k}: {iv:?} coverage {coverage}"
        );
        assert_eq!(iv.samples, n, "interval {k}: {iv:?}");
    }
}

fn energy_at(h: &Harness, minute: i64) -> f64 {
    h.latest
        .get(&(DAY + minute * MIN))
        .map_or(f64::NAN, |iv| iv.energy_kwh)
}

/// Live (one sample at a time), in one push, and in pushes of `chunk`.
fn three_ways(tp: TrackerParams, series: &[(i64, f64)], now: i64, chunk: usize) -> Vec<Harness> {
    let mut live = Harness::new(Kind::Power, Unit::Kw, tp);
    for s in series {
        live.push(std::slice::from_ref(s));
    }
    let mut one = Harness::new(Kind::Power, Unit::Kw, tp);
    one.push_whole(series);
    let mut many = Harness::new(Kind::Power, Unit::Kw, tp);
    for c in series.chunks(chunk) {
        many.push(c);
    }
    let mut all = vec![live, one, many];
    for h in &mut all {
        h.close_silent(now);
    }
    all
}

#[test]
fn a_last_sample_after_a_long_gap_holds_for_the_series_spacing() {
    // 1 kW every minute from 00:00 to 00:13, then 2 kW at 00:27 after a 14-minute
    // gap, then silence. The series' spacing is 1 minute: the last sample holds one
    // minute (00:27-00:28), not 14.
    let mut series: Vec<(i64, f64)> = (0..14).map(|m| (DAY + m * MIN, 1.0)).collect();
    series.push((DAY + 27 * MIN, 2.0));
    let tp = params(2 * MIN, 6 * 3_600_000);
    for h in three_ways(tp, &series, DAY + 3 * 3_600_000, 4) {
        assert_eq!(h.t.hold_ms(), MIN);
        // 00:00-00:15: 15 minutes at 1 kW.
        assert!(close(energy_at(&h, 0), 0.25), "{:?}", h.latest);
        // 00:15-00:30: 1 kW until 00:27 (12 min), 2 kW for 1 min.
        assert!(
            close(energy_at(&h, 15), 12.0 / 60.0 + 2.0 / 60.0),
            "{:?}",
            h.latest
        );
        assert!(h.latest[&(DAY + 15 * MIN)].flags.estimated);
        assert!(close(h.latest[&(DAY + 15 * MIN)].coverage, 13.0 / 15.0));
        // 00:30-00:45: no energy that does not exist.
        assert!(close(energy_at(&h, 30), 0.0), "{:?}", h.latest);
        assert_matches_reference(&h, &series);
    }
}

#[test]
fn a_last_gap_shorter_than_the_series_spacing_holds_the_full_spacing() {
    // 1 kW every 10 minutes from 00:00 to 00:40, then 3 kW at 00:42: the spacing is
    // 10 minutes, so the last sample holds until 00:52, not 00:44.
    let mut series: Vec<(i64, f64)> = (0..5).map(|i| (DAY + i * 10 * MIN, 1.0)).collect();
    series.push((DAY + 42 * MIN, 3.0));
    let tp = params(2 * MIN, 6 * 3_600_000);
    for h in three_ways(tp, &series, DAY + 3 * 3_600_000, 2) {
        assert_eq!(h.t.hold_ms(), 10 * MIN);
        // 00:30-00:45: 1 kW 00:30-00:42, 3 kW 00:42-00:45.
        assert!(
            close(energy_at(&h, 30), 12.0 / 60.0 + 9.0 / 60.0),
            "{:?}",
            h.latest
        );
        // 00:45-01:00: 3 kW 00:45-00:52.
        assert!(close(energy_at(&h, 45), 21.0 / 60.0), "{:?}", h.latest);
        assert!(close(h.latest[&(DAY + 45 * MIN)].coverage, 7.0 / 15.0));
        assert_matches_reference(&h, &series);
    }
}

#[test]
fn a_series_of_one_sample_holds_for_max_gap_at_most_15_minutes() {
    for (max_gap, held) in [
        (15 * MIN, 15 * MIN),
        (5 * MIN, 5 * MIN),
        (60 * MIN, 15 * MIN),
    ] {
        let tp = TrackerParams {
            interval: IntervalParams {
                max_gap_ms: max_gap,
                spacing_ms: None,
            },
            ..params(MIN, 6 * 3_600_000)
        };
        for (kind, unit) in [(Kind::Power, Unit::Kw), (Kind::EnergyDelta, Unit::Kwh)] {
            let mut h = Harness::new(kind, unit, tp);
            h.push(&[(DAY + 5 * MIN, 2.0)]);
            assert_eq!(h.t.hold_ms(), held);
            h.close_silent(DAY + 5 * 3_600_000);
            let total: f64 = h.latest.values().map(|i| i.energy_kwh).sum();
            let expected = match kind {
                Kind::Power => 2.0 * held as f64 / 3_600_000.0,
                _ => 2.0,
            };
            assert!(close(total, expected), "{kind:?} {max_gap}: {:?}", h.latest);
            let covered: f64 = h.latest.values().map(|i| i.coverage).sum();
            assert!(close(covered * INTERVAL_MS as f64, held as f64));
            assert!(h.latest[&DAY].flags.estimated);
        }
    }
    // compute_intervals holds a lone sample the same way.
    let iv = compute_intervals(
        Kind::Power,
        Unit::Kw,
        &[(DAY, 4.0)],
        &IntervalParams::default(),
    )
    .unwrap();
    assert_energies(&iv, &[1.0]);
}

#[test]
fn the_median_of_an_even_count_of_spacings_is_the_mean_of_the_middle_two() {
    assert_eq!(median_of(vec![60_000, 120_000]), Some(90_000));
    assert_eq!(median_of(vec![4, 1, 3, 10]), Some(3));
    assert_eq!(median_of(vec![1, 2]), Some(1));
    assert_eq!(median_of(vec![7, 1, 3]), Some(3));
    assert_eq!(median_of(vec![]), None);
    // Through a tracker: spacings of 1 and 2 minutes, the last sample holds 90 s.
    let mut h = Harness::new(Kind::Power, Unit::Kw, params(MIN, 6 * 3_600_000));
    let series = [(DAY, 1.0), (DAY + MIN, 1.0), (DAY + 3 * MIN, 4.0)];
    h.push(&series);
    assert_eq!(h.t.hold_ms(), 90_000);
    h.close_silent(DAY + 3_600_000);
    assert!(
        close(energy_at(&h, 0), 3.0 / 60.0 + 4.0 * 1.5 / 60.0),
        "{:?}",
        h.latest
    );
    assert_matches_reference(&h, &series);
    // Only the newest 32 spacings count: 40 spacings of 5 min then 32 of 1 min.
    let mut state = SpacingState::default();
    let mut ts = 0;
    for i in 0..72 {
        state.insert(ts);
        ts += if i < 40 { 5 * MIN } else { MIN };
    }
    assert_eq!(state.median(), Some(MIN));
}

#[test]
fn every_kind_closes_when_the_watermark_minus_grace_passes_the_end() {
    let grace = 5 * MIN;
    for (kind, unit, v) in [
        (Kind::Power, Unit::Kw, (2.0, 0.0)),
        (Kind::EnergyDelta, Unit::Kwh, (1.0, 0.0)),
        (Kind::EnergyTotal, Unit::Kwh, (100.0, 1.0)),
    ] {
        let v = |h: i64| v.0 + v.1 * h as f64;
        let mut t = IntervalTracker::new(kind, unit, params(grace, 6 * 3_600_000)).unwrap();
        // Hourly points at 00:00, 01:00, 02:00 (the DESIGN §5 delta example's times).
        t.push(&[(DAY, v(0)), (DAY + 60 * MIN, v(1)), (DAY + 120 * MIN, v(2))]);
        let closed = t.take_closed();
        // W - grace = 01:55: the quarters ending by then close, 00:00 to 01:30.
        let starts: Vec<i64> = closed.iter().map(|i| (i.start_ms - DAY) / MIN).collect();
        assert_eq!(starts, vec![0, 15, 30, 45, 60, 75, 90], "{kind:?}");
        // One more minute of watermark closes nothing; reaching 02:05 closes 01:45.
        t.push(&[(DAY + 121 * MIN, v(2))]);
        assert!(t.take_closed().is_empty(), "{kind:?}");
        t.push(&[(DAY + 125 * MIN, v(3))]);
        let next: Vec<i64> = t
            .take_closed()
            .iter()
            .map(|i| (i.start_ms - DAY) / MIN)
            .collect();
        assert_eq!(next, vec![105], "{kind:?}");
        if kind == Kind::EnergyDelta {
            assert!(close(closed[0].energy_kwh, 0.25));
        }
    }
}

#[test]
fn a_silent_meter_closes_by_the_wall_clock_for_every_kind() {
    let grace = 2 * MIN;
    for (kind, unit) in [
        (Kind::Power, Unit::Kw),
        (Kind::EnergyDelta, Unit::Kwh),
        (Kind::EnergyTotal, Unit::Kwh),
    ] {
        let mut h = Harness::new(kind, unit, params(grace, 6 * 3_600_000));
        // Three hourly points pushed alone (12, 26, 18 for deltas).
        let series = [(DAY, 12.0), (DAY + 60 * MIN, 26.0), (DAY + 120 * MIN, 38.0)];
        h.push(&series);
        assert_eq!(h.latest.len(), 7, "{kind:?}");
        // The wall clock at 02:50: the quarters ending by 02:48 close.
        h.close_silent(DAY + 170 * MIN);
        let last = *h.latest.keys().last().unwrap();
        assert_eq!(last, DAY + 150 * MIN, "{kind:?}");
        // Far later: no quarter beyond W + retention (08:00) is closed.
        h.close_silent(DAY + 48 * 3_600_000);
        let last = *h.latest.keys().last().unwrap();
        assert_eq!(last, DAY + 465 * MIN, "{kind:?}");
        assert_matches_reference(&h, &series);
        let after = &h.latest[&(DAY + 120 * MIN)];
        match kind {
            // The final point holds one typical spacing (an hour): estimated.
            Kind::EnergyDelta => {
                assert!(close(after.energy_kwh, 38.0 / 4.0));
                assert!(after.flags.estimated && close(after.coverage, 1.0));
            }
            // A final power sample holds one spacing capped at max_gap (15 min).
            Kind::Power => {
                assert!(close(after.energy_kwh, 38.0 / 4.0));
                assert!(after.flags.estimated);
                assert!(h.latest[&(DAY + 135 * MIN)].coverage == 0.0);
            }
            // Nothing is known after a counter's last reading: not covered.
            _ => {
                assert_eq!(after.energy_kwh, 0.0);
                assert!(after.flags.gap && after.coverage == 0.0);
            }
        }
    }
    // Through the DESIGN §5 delta example: 3 per quarter, 6.5 per quarter, 4.5 per
    // quarter once the clock passes the last point's spacing.
    let mut h = Harness::new(Kind::EnergyDelta, Unit::Kwh, params(grace, 6 * 3_600_000));
    h.push(&[(DAY, 12.0), (DAY + 60 * MIN, 26.0), (DAY + 120 * MIN, 18.0)]);
    h.close_silent(DAY + 200 * MIN);
    let e: Vec<f64> = (0..12).map(|q| energy_at(&h, q * 15)).collect();
    for (q, expected) in [3.0, 3.0, 3.0, 3.0, 6.5, 6.5, 6.5, 6.5, 4.5, 4.5, 4.5, 4.5]
        .iter()
        .enumerate()
    {
        assert!(close(e[q], *expected), "{e:?}");
    }
}

#[test]
fn late_data_is_handed_out_for_recomputation_not_held() {
    let mut h = Harness::new(Kind::Power, Unit::Kw, params(2 * MIN, 6 * 3_600_000));
    let mut series = minute_power(40);
    series.retain(|s| s.0 != DAY + 3 * MIN);
    h.push(&series);
    let before = h.latest[&DAY].clone();
    assert_eq!(before.revision, 0);
    let held = h.t.retained_samples();
    // A point for 00:03 after its interval closed: the tracker does not hold it,
    // the recomputation from the store revises the interval.
    let out = h.t.push(&[(DAY + 3 * MIN, 50.0)]);
    assert_eq!((out.accepted, out.late), (1, 1));
    assert_eq!(h.t.retained_samples(), held);
    h.stored.insert(DAY + 3 * MIN, 50.0);
    h.recompute_late();
    let after = &h.latest[&DAY];
    assert_eq!(after.revision, 1);
    assert_eq!(after.max_w, Some(50_000.0));
    series.push((DAY + 3 * MIN, 50.0));
    assert_matches_reference(&h, &series);
    // The same value again changes nothing.
    h.push(&[(DAY + 3 * MIN, 50.0)]);
    assert_eq!(h.latest[&DAY].revision, 1);
}

#[test]
fn tracker_refuses_data_older_than_retention() {
    let retention = 3_600_000;
    let mut h = Harness::new(Kind::Power, Unit::Kw, params(MIN, retention));
    let samples = minute_power(48 * 60);
    for hour in samples.chunks(60) {
        h.push(hour);
    }
    // Every quarter but the one the grace holds open.
    assert_eq!(h.latest.len(), 48 * 4 - 1);
    let out = h.t.push(&[(DAY, 5.0), (DAY + 48 * 60 * MIN, f64::NAN)]);
    assert_eq!(
        out,
        PushOutcome {
            accepted: 0,
            invalid: 1,
            too_old: 1,
            late: 0,
        }
    );
    assert!(h.t.take_late().is_none());
    assert!(h.t.take_closed().is_empty());
}

#[test]
fn memory_is_bounded_by_the_open_intervals_not_retention_times_rate() {
    // A day of 1-second samples, retention 6 h: the tracker holds the open
    // intervals' samples (grace + one quarter at most), never the retention's.
    let grace = 2 * MIN;
    let mut t = IntervalTracker::new(Kind::Power, Unit::W, params(grace, 6 * 3_600_000)).unwrap();
    let per_open = ((grace + INTERVAL_MS) / 1000 + 2) as usize;
    let mut most = 0;
    let mut most_bytes = 0;
    let mut closed = 0;
    for s in 0..86_400i64 {
        t.push(&[(DAY + s * 1000, 100.0 + (s % 60) as f64)]);
        closed += t.take_closed().len();
        most = most.max(t.retained_samples());
        most_bytes = most_bytes.max(t.approx_bytes());
    }
    assert_eq!(closed, 95);
    assert!(
        most <= per_open,
        "held {most} samples, open intervals need {per_open}"
    );
    // 16 bytes a sample, doubling growth, the spacing state: far below the 6 h of
    // samples (21,600 × 16 bytes = 345,600).
    assert!(most_bytes <= 2 * per_open * 16 + 2048, "{most_bytes} bytes");
    // Its persisted state holds no samples of the open intervals at all.
    let cbor = {
        let mut out = Vec::new();
        ciborium::into_writer(&t, &mut out).unwrap();
        out
    };
    assert!(cbor.len() < 1024, "{} bytes saved", cbor.len());
}

#[test]
fn tracker_state_survives_serialization_with_its_open_samples_reloaded() {
    let samples = minute_power(3 * 60);
    let mut straight = IntervalTracker::new(Kind::Power, Unit::W, params(MIN, 3_600_000)).unwrap();
    let mut restarted = straight.clone();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for chunk in samples.chunks(17) {
        straight.push(chunk);
        a.extend(straight.take_closed());
        restarted.push(chunk);
        b.extend(restarted.take_closed());
        let mut cbor = Vec::new();
        ciborium::into_writer(&restarted, &mut cbor).unwrap();
        restarted = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(
            restarted.retained_samples(),
            usize::from(straight.retained_samples() > 0)
        );
        // The store gives back the open intervals' samples.
        restarted.reload(&samples);
        assert_eq!(straight.retained_samples(), restarted.retained_samples());
    }
    assert_eq!(a, b);
    assert_eq!(a.len(), 11);
    assert!(a.iter().all(|i| i.revision == 0));
    assert_eq!(straight.watermark(), restarted.watermark());
    assert_eq!(straight.hold_ms(), restarted.hold_ms());
}

// ---- properties ----

#[derive(Debug, Clone, Copy)]
enum Series {
    Power,
    Delta,
    Total,
}

impl Series {
    fn kind(self) -> (Kind, Unit) {
        match self {
            Series::Power => (Kind::Power, Unit::Kw),
            Series::Delta => (Kind::EnergyDelta, Unit::Kwh),
            Series::Total => (Kind::EnergyTotal, Unit::Kwh),
        }
    }
}

fn series_strategy() -> impl Strategy<Value = (Series, Vec<(i64, f64)>)> {
    let kind = prop_oneof![
        Just(Series::Power),
        Just(Series::Delta),
        Just(Series::Total)
    ];
    // Steps of 1 s to 40 min, values 0..10: a mix of dense data, holes and gaps.
    let steps = prop::collection::vec((1_000i64..2_400_000, 0.0f64..10.0), 1..120);
    (kind, 0i64..INTERVAL_MS, steps).prop_map(|(kind, offset, steps)| {
        let mut ts = DAY + offset;
        let mut register = 1000.0;
        let mut out = Vec::with_capacity(steps.len());
        for (step, value) in steps {
            register += value;
            let v = match kind {
                Series::Total => register,
                _ => value,
            };
            out.push((ts, v));
            ts += step;
        }
        (kind, out)
    })
}

/// Energy of the whole series, computed directly from the rules.
fn whole_energy(kind: Series, samples: &[(i64, f64)], p: &IntervalParams) -> f64 {
    let spacing = median_spacing(samples).unwrap_or(p.max_gap_ms.min(INTERVAL_MS));
    match kind {
        Series::Power => samples
            .iter()
            .enumerate()
            .map(|(i, (t, v))| {
                let hold = match samples.get(i + 1) {
                    Some((n, _)) => (n - t).min(p.max_gap_ms),
                    None => spacing.min(p.max_gap_ms),
                };
                v * hold as f64 / 3_600_000.0
            })
            .sum(),
        Series::Delta => samples.iter().map(|(_, v)| v).sum(),
        Series::Total => samples.last().unwrap().1 - samples[0].1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn intervals_conserve_energy_and_are_contiguous((kind, samples) in series_strategy()) {
        let p = IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None };
        let (k, u) = kind.kind();
        let iv = compute_intervals(k, u, &samples, &p).unwrap();
        let sum: f64 = iv.iter().map(|i| i.energy_kwh).sum();
        let expected = whole_energy(kind, &samples, &p);
        prop_assert!((sum - expected).abs() <= 1e-6 * expected.abs().max(1e-3),
            "sum {} expected {}", sum, expected);
        prop_assert!(!iv.is_empty());
        prop_assert_eq!(iv[0].start_ms, interval_start(samples[0].0));
        for pair in iv.windows(2) {
            prop_assert_eq!(pair[1].start_ms, pair[0].start_ms + INTERVAL_MS);
        }
        prop_assert!(iv.last().unwrap().end_ms() > samples.last().unwrap().0);
        prop_assert_eq!(iv.iter().map(|i| i.samples as usize).sum::<usize>(), samples.len());
        for i in &iv {
            prop_assert!((0.0..=1.0).contains(&i.coverage));
            prop_assert!(i.energy_kwh >= 0.0);
            prop_assert_eq!(i.flags.gap, i.coverage < 1.0);
        }
    }

    #[test]
    fn register_resets_never_make_negative_energy(
        steps in prop::collection::vec((60_000i64..1_800_000, -50.0f64..10.0), 2..80),
    ) {
        // Negative steps are resets: the register restarts at a tenth of the step.
        let mut ts = DAY;
        let mut register = 500.0;
        let mut samples = Vec::new();
        for (step, delta) in steps {
            if delta < 0.0 { register = -delta / 10.0; } else { register += delta; }
            samples.push((ts, register));
            ts += step;
        }
        let iv = compute_intervals(Kind::EnergyTotal, Unit::Kwh, &samples, &IntervalParams::default()).unwrap();
        prop_assert!(iv.iter().all(|i| i.energy_kwh >= 0.0));
        let mut counted = 0.0;
        for pair in samples.windows(2) {
            let ((t0, r0), (t1, r1)) = (pair[0], pair[1]);
            if r1 < r0 {
                // Every interval the reset stretch touches is flagged.
                for i in iv.iter().filter(|i| i.start_ms < t1 && i.end_ms() > t0) {
                    prop_assert!(i.flags.reset);
                }
            } else {
                counted += r1 - r0;
            }
        }
        let sum: f64 = iv.iter().map(|i| i.energy_kwh).sum();
        prop_assert!((sum - counted).abs() <= 1e-9 * counted.max(1.0));
    }

    #[test]
    fn power_points_late_within_the_grace_never_revise((_kind, samples) in series_strategy(),
        jitter in prop::collection::vec(0i64..=180_000, 120),
        chunk in 1usize..8,
    ) {
        // Each point arrives by `ts + jitter` (jitter <= grace), so it is never older
        // than the watermark minus the grace: a power interval never changes once
        // closed. (Energy kinds spread a point back to the one before it, so a point
        // arriving out of order can revise them.)
        let tp = TrackerParams {
            interval: IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None },
            grace_ms: 180_000,
            retention_ms: 400 * 24 * 3_600_000,
        };
        let mut order: Vec<(i64, usize)> = samples
            .iter()
            .enumerate()
            .map(|(i, (ts, _))| (ts + jitter[i % jitter.len()], i))
            .collect();
        order.sort();
        let shuffled: Vec<(i64, f64)> = order.iter().map(|&(_, i)| samples[i]).collect();
        let mut h = Harness::new(Kind::Power, Unit::Kw, tp);
        for c in shuffled.chunks(chunk) {
            h.push(c);
        }
        prop_assert_eq!(h.revisions, 0);
        assert_matches_reference(&h, &samples);
    }

    #[test]
    fn any_order_and_chunks_converge_to_the_reference(
        (kind, samples) in series_strategy(),
        keys in prop::collection::vec(any::<u32>(), 120),
        chunks in prop::collection::vec(1usize..10, 1..40),
        grace in 0i64..600_000,
    ) {
        // Pushed in a random order and random chunks, all within retention; then the
        // wall clock closes the rest. Every closed interval's final revision equals
        // the reference computed over the sorted series.
        let tp = TrackerParams {
            interval: IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None },
            grace_ms: grace,
            retention_ms: 400 * 24 * 3_600_000,
        };
        let (k, u) = kind.kind();
        let mut order: Vec<usize> = (0..samples.len()).collect();
        order.sort_by_key(|&i| keys[i % keys.len()]);
        let shuffled: Vec<(i64, f64)> = order.iter().map(|&i| samples[i]).collect();
        let mut h = Harness::new(k, u, tp);
        let mut at = 0;
        let mut c = 0;
        while at < shuffled.len() {
            let n = chunks[c % chunks.len()].min(shuffled.len() - at);
            h.push(&shuffled[at..at + n]);
            at += n;
            c += 1;
        }
        let last = samples.iter().map(|s| s.0).max().unwrap();
        h.close_silent(last + 3 * 3_600_000);
        assert_matches_reference(&h, &samples);
        // Nothing is missing: every interval from the first sample's to the one
        // the wall clock reached is there.
        let first = interval_index(samples[0].0);
        let to = (last + 3 * 3_600_000 - grace).div_euclid(INTERVAL_MS);
        prop_assert_eq!(h.latest.len() as i64, to - first);
    }

    #[test]
    fn window_energy_from_intervals_matches_raw_samples(
        (kind, samples) in series_strategy(),
        a in 0i64..48 * 3_600_000,
        len in 1i64..24 * 3_600_000,
    ) {
        let p = IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None };
        let (k, u) = kind.kind();
        let start = DAY + a;
        let end = start + len;
        let raw = energy_between_samples(k, u, &samples, &p, start, end).unwrap();
        let iv = compute_intervals(k, u, &samples, &p).unwrap();
        // Pass all samples as edges, with the series' spacing so the final hold agrees.
        let p_edges = IntervalParams { spacing_ms: median_spacing(&samples).or(Some(p.max_gap_ms)), ..p };
        let mixed = energy_between(k, u, &iv, &samples, &p_edges, start, end).unwrap();
        prop_assert!((raw.energy_kwh - mixed.energy_kwh).abs() <= 1e-6 * raw.energy_kwh.abs().max(1e-3),
            "raw {} mixed {}", raw.energy_kwh, mixed.energy_kwh);
        prop_assert!((raw.coverage - mixed.coverage).abs() <= 1e-9);
    }
}
