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

#[test]
fn tracker_closes_after_grace_and_revises_on_late_data() {
    let mut t =
        IntervalTracker::new(Kind::Power, Unit::Kw, params(2 * MIN, 6 * 3_600_000)).unwrap();
    t.push(&minute_power(16));
    // Watermark 00:15; 00:00-00:15 needs 00:17.
    assert!(t.take_closed().is_empty());
    t.push(&[(DAY + 16 * MIN, 1.0), (DAY + 17 * MIN, 1.0)]);
    let closed = t.take_closed();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].start_ms, DAY);
    assert_eq!(closed[0].revision, 0);
    assert_eq!(closed[0].samples, 15);
    assert!(t.take_closed().is_empty());
    // A correction for 00:03 after the interval closed: revision 1.
    let outcome = t.push(&[(DAY + 3 * MIN, 50.0)]);
    assert_eq!(outcome.accepted, 1);
    let revised = t.take_closed();
    assert_eq!(revised.len(), 1);
    assert_eq!(revised[0].start_ms, DAY);
    assert_eq!(revised[0].revision, 1);
    assert!(revised[0].energy_kwh > closed[0].energy_kwh);
    assert_eq!(revised[0].max_w, Some(50_000.0));
    // The same value again changes nothing.
    t.push(&[(DAY + 3 * MIN, 50.0)]);
    assert!(t.take_closed().is_empty());
    // Another change: revision 2.
    t.push(&[(DAY + 3 * MIN, 4.0)]);
    assert_eq!(t.take_closed()[0].revision, 2);
}

#[test]
fn tracker_energy_kinds_wait_for_the_next_sample() {
    let mut t =
        IntervalTracker::new(Kind::EnergyDelta, Unit::Kwh, params(5 * MIN, 6 * 3_600_000)).unwrap();
    t.push(&[(DAY, 12.0), (DAY + 60 * MIN, 26.0)]);
    // Horizon: the latest sample older than W - grace is 00:00, so nothing closes.
    assert!(t.take_closed().is_empty());
    t.push(&[(DAY + 120 * MIN, 18.0)]);
    let closed = t.take_closed();
    assert_energies(&closed, &[3.0, 3.0, 3.0, 3.0]);
    t.push(&[(DAY + 180 * MIN, 1.0)]);
    assert_energies(&t.take_closed(), &[6.5, 6.5, 6.5, 6.5]);
}

#[test]
fn tracker_refuses_data_older_than_retention_and_stays_bounded() {
    let retention = 3_600_000;
    let mut t = IntervalTracker::new(Kind::Power, Unit::Kw, params(MIN, retention)).unwrap();
    let samples = minute_power(48 * 60);
    let mut emitted = 0;
    for hour in samples.chunks(60) {
        t.push(hour);
        emitted += t.take_closed().len();
        assert!(
            t.retained_samples() <= 60 + 60 + 1,
            "{}",
            t.retained_samples()
        );
    }
    // All but the intervals within the grace of the last sample.
    assert_eq!(emitted, 48 * 4 - 1);
    let outcome = t.push(&[(DAY, 5.0), (DAY + 48 * 60 * MIN, f64::NAN)]);
    assert_eq!(
        outcome,
        PushOutcome {
            accepted: 0,
            invalid: 1,
            too_old: 1
        }
    );
    assert!(t.take_closed().is_empty());
}

#[test]
fn tracker_state_survives_serialization() {
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
        let json = serde_json::to_vec(&restarted).unwrap();
        restarted = serde_json::from_slice(&json).unwrap();
        let mut cbor = Vec::new();
        ciborium::into_writer(&restarted, &mut cbor).unwrap();
        restarted = ciborium::from_reader(cbor.as_slice()).unwrap();
    }
    // Same intervals and revisions: a restored tracker (JSON floats may come back a
    // unit in the last place off) emits no spurious revisions.
    assert_eq!(a, b);
    assert_eq!(a.len(), 11);
    assert!(a.iter().all(|i| i.revision == 0));
    assert_eq!(straight.watermark(), restarted.watermark());
    assert_eq!(straight.retained_samples(), restarted.retained_samples());
}

#[test]
fn advance_watermark_closes_silent_power_intervals_as_gaps() {
    let mut t = IntervalTracker::new(Kind::Power, Unit::Kw, params(MIN, 6 * 3_600_000)).unwrap();
    t.push(&minute_power(10));
    t.advance_watermark(DAY + 61 * MIN);
    let closed = t.take_closed();
    assert_eq!(closed.len(), 4);
    assert!(closed[0].flags.gap && closed[0].samples == 10);
    assert!(closed[1..].iter().all(|i| i.coverage == 0.0 && i.flags.gap));
    // Energy kinds do not close without a later sample.
    let mut e =
        IntervalTracker::new(Kind::EnergyTotal, Unit::Kwh, params(MIN, 6 * 3_600_000)).unwrap();
    e.push(&[(DAY, 1.0), (DAY + 5 * MIN, 2.0)]);
    e.advance_watermark(DAY + 61 * MIN);
    assert!(e.take_closed().is_empty());
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
    let spacing = median_spacing(samples).unwrap_or(p.max_gap_ms);
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

/// Feeds `batches` to a fresh tracker, taking closed intervals after each; returns
/// the latest revision per start and whether any revision happened.
fn run_tracker(
    kind: Series,
    tp: TrackerParams,
    batches: &[Vec<(i64, f64)>],
) -> (std::collections::BTreeMap<i64, Interval>, bool) {
    let (k, u) = kind.kind();
    let mut t = IntervalTracker::new(k, u, tp).unwrap();
    let mut latest = std::collections::BTreeMap::new();
    let mut revised = false;
    for batch in batches {
        t.push(batch);
        for iv in t.take_closed() {
            revised |= iv.revision > 0;
            latest.insert(iv.start_ms, iv);
        }
    }
    (latest, revised)
}

fn same(
    a: &std::collections::BTreeMap<i64, Interval>,
    b: &std::collections::BTreeMap<i64, Interval>,
) -> bool {
    a.len() == b.len()
        && a.values().zip(b.values()).all(|(x, y)| {
            let mut y = y.clone();
            y.revision = x.revision;
            *x == y
        })
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
    fn batches_and_late_points_within_grace_give_the_same_intervals(
        (kind, samples) in series_strategy(),
        split in 0usize..120,
        jitter in prop::collection::vec(0i64..=180_000, 120),
        chunk in 1usize..8,
    ) {
        let grace = 180_000;
        let tp = TrackerParams {
            interval: IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None },
            grace_ms: grace,
            retention_ms: 400 * 24 * 3_600_000,
        };
        let (one, revised) = run_tracker(kind, tp, std::slice::from_ref(&samples));
        prop_assert!(!revised);
        // The tracker emits exactly the closed prefix of the whole-series intervals.
        let (k, u) = kind.kind();
        let all = compute_intervals(k, u, &samples, &tp.interval).unwrap();
        let closed: std::collections::BTreeMap<i64, Interval> = all
            .into_iter()
            .take(one.len())
            .map(|i| (i.start_ms, i))
            .collect();
        prop_assert!(same(&one, &closed));

        // Two batches split in time.
        let cut = split.min(samples.len());
        let (two, revised) = run_tracker(kind, tp, &[samples[..cut].to_vec(), samples[cut..].to_vec()]);
        prop_assert!(!revised);
        prop_assert!(same(&one, &two));

        // Out of order within the grace: each point arrives by `ts + jitter`
        // (jitter <= grace), so it is never older than the watermark minus the grace.
        let mut order: Vec<(i64, usize)> = samples
            .iter()
            .enumerate()
            .map(|(i, (ts, _))| (ts + jitter[i % jitter.len()], i))
            .collect();
        order.sort();
        let shuffled: Vec<(i64, f64)> = order.iter().map(|&(_, i)| samples[i]).collect();
        let batches: Vec<Vec<(i64, f64)>> = shuffled.chunks(chunk).map(|c| c.to_vec()).collect();
        let (late, revised) = run_tracker(kind, tp, &batches);
        prop_assert!(!revised);
        prop_assert!(same(&one, &late));
    }

    #[test]
    fn any_split_converges_to_the_one_batch_intervals(
        (kind, samples) in series_strategy(),
        picks in prop::collection::vec(any::<bool>(), 120),
    ) {
        // Arbitrary arrival (late data beyond the grace, within retention): revisions
        // bring every interval to the value one batch gives.
        let tp = TrackerParams {
            interval: IntervalParams { max_gap_ms: 20 * MIN, spacing_ms: None },
            grace_ms: 60_000,
            retention_ms: 400 * 24 * 3_600_000,
        };
        let (a, b): (Vec<_>, Vec<_>) = samples
            .iter()
            .enumerate()
            .partition(|(i, _)| picks[i % picks.len()]);
        let a: Vec<(i64, f64)> = a.into_iter().map(|(_, s)| *s).collect();
        let b: Vec<(i64, f64)> = b.into_iter().map(|(_, s)| *s).collect();
        let (one, _) = run_tracker(kind, tp, std::slice::from_ref(&samples));
        let (two, _) = run_tracker(kind, tp, &[b, a]);
        prop_assert!(same(&one, &two));
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
