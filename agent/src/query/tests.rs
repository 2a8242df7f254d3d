use super::*;
use crate::model::{Payload, Reading};
use crate::store::testing::{config, open};

const T0: i64 = 1_535_068_800_000;
const MIN: i64 = 60_000;

fn value(quantity: &str, unit: &str, kind: Kind, v: f64) -> Value {
    Value {
        quantity: quantity.into(),
        unit: unit.into(),
        kind,
        value: Some(v),
        invalid: None,
        source: Default::default(),
    }
}

/// A polled-looking reading: power, an import register and the total register.
fn polled(meter: &str, minute: i64, total_kwh: f64) -> Payload {
    Payload::Reading(Reading {
        meter: meter.into(),
        ts_ms: T0 + minute * MIN,
        values: vec![
            value("power", "W", Kind::Power, 1_000.0),
            value("energy_import", "kWh", Kind::EnergyTotal, 5.0 * total_kwh),
            value("energy_total", "kWh", Kind::EnergyTotal, total_kwh),
        ],
    })
}

fn pushed_wh(meter: &str, minute: i64, wh: f64) -> Payload {
    Payload::Reading(Reading {
        meter: meter.into(),
        ts_ms: T0 + minute * MIN,
        values: vec![value("energy_total", "Wh", Kind::EnergyTotal, wh)],
    })
}

#[test]
fn readings_of_a_meter_in_a_window_are_exact_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&config(&dir));
    store
        .append(
            (0..30)
                .flat_map(|m| [polled("a", m, m as f64), polled("b", m, 0.0)])
                .collect(),
        )
        .unwrap();
    let got = readings(&store, "a", Window::new(T0 + 10 * MIN, T0 + 20 * MIN)).unwrap();
    assert_eq!(
        got.iter().map(|p| p.ts_ms).collect::<Vec<_>>(),
        (10..20).map(|m| T0 + m * MIN).collect::<Vec<_>>()
    );
    // Seqs alternate with meter b's.
    assert_eq!(got[0].seq, 21);
    assert_eq!(
        got[0].values[2],
        value("energy_total", "kWh", Kind::EnergyTotal, 10.0)
    );
    assert_eq!(readings(&store, "a", Window::all()).unwrap().len(), 30);
    assert!(readings(&store, "c", Window::all()).unwrap().is_empty());
}

#[test]
fn top_meters_by_energy_from_counters() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&config(&dir));
    let mut batch = Vec::new();
    for m in 0..=60 {
        let m_f = m as f64;
        batch.push(polled("small", m, 100.0 + 0.01 * m_f));
        batch.push(polled("big", m, 5_000.0 + 0.5 * m_f));
        batch.push(polled("mid", m, 20.0 + 0.1 * m_f));
        // A counter reset at minute 30: the drop counts as nothing.
        let reset = if m < 30 {
            900.0 + 0.2 * m_f
        } else {
            0.2 * (m_f - 30.0)
        };
        batch.push(polled("swapped", m, reset));
        batch.push(pushed_wh("wh", m, 1_000.0 * m_f * 0.3));
        batch.push(Payload::Reading(Reading {
            meter: "power-only".into(),
            ts_ms: T0 + m * MIN,
            values: vec![value("power", "W", Kind::Power, 9e9)],
        }));
    }
    store.append(batch).unwrap();

    let close = |got: &[MeterEnergy], want: &[(&str, f64)]| {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, (meter, kwh)) in got.iter().zip(want) {
            assert_eq!(g.meter, *meter, "{got:?}");
            assert!((g.energy_kwh - kwh).abs() < 1e-9, "{got:?}");
        }
    };
    // 60 minutes: big 30 kWh, wh 18 kWh (in Wh), swapped 29 × 0.2 + 30 × 0.2 = 11.8,
    // mid 6, small 0.6; the power-only meter has no counter and is left out.
    close(
        &top_meters(&store, Window::all(), DEFAULT_TOP).unwrap(),
        &[("big", 30.0), ("wh", 18.0), ("swapped", 11.8)],
    );
    close(
        &top_meters(&store, Window::all(), 10).unwrap(),
        &[
            ("big", 30.0),
            ("wh", 18.0),
            ("swapped", 11.8),
            ("mid", 6.0),
            ("small", 0.6),
        ],
    );
    // [10, 20) holds minutes 10..=19: nine steps.
    close(
        &top_meters(&store, Window::new(T0 + 10 * MIN, T0 + 20 * MIN), 2).unwrap(),
        &[("big", 4.5), ("wh", 2.7)],
    );
    assert!(top_meters(&store, Window::all(), 0).unwrap().is_empty());
    assert!(top_meters(&store, Window::new(0, T0), 3)
        .unwrap()
        .is_empty());
}

/// The interval series can replace the counter difference without touching callers.
#[test]
fn top_meters_takes_another_energy_source() {
    struct ByName;
    impl EnergySource for ByName {
        fn energy_kwh(&self, _: &Store, meter: &str, _: Window) -> Result<Option<f64>, StoreError> {
            Ok(Some(meter.len() as f64))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&config(&dir));
    store
        .append(vec![
            polled("a", 0, 1.0),
            polled("ccc", 0, 1.0),
            polled("bb", 0, 1.0),
        ])
        .unwrap();
    let got = top_meters_by(&store, Window::all(), 2, &ByName).unwrap();
    assert_eq!(
        got,
        vec![
            MeterEnergy {
                meter: "ccc".into(),
                energy_kwh: 3.0
            },
            MeterEnergy {
                meter: "bb".into(),
                energy_kwh: 2.0
            }
        ]
    );
}
