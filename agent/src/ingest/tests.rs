use std::sync::Arc;

use tokio::sync::broadcast;

use super::*;
use crate::model::Record;
use crate::store::testing::{config, open};
use crate::store::{start_writer, Store, StoreError, StoreWriter};

/// 2018-08-24T00:00:00Z
const T0: i64 = 1_535_068_800_000;
const NOW: i64 = T0 + 86_400_000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    writer: StoreWriter,
    committed: broadcast::Receiver<Arc<Vec<Record>>>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&config(&dir)));
    let (tx, committed) = broadcast::channel(64);
    let (writer, _task) = start_writer(store.clone(), Duration::from_millis(5), 10_000, tx);
    Fixture {
        _dir: dir,
        store,
        writer,
        committed,
    }
}

/// Everything the store holds: last seq and every record.
fn snapshot(store: &Store) -> (u64, Vec<Record>) {
    (store.last_seq(), store.read_range(0, u64::MAX).unwrap())
}

fn series(meter: &str, unit: &str, kind: Kind, points: Vec<Point>) -> Series {
    Series {
        meter: meter.into(),
        unit: unit.into(),
        kind,
        points,
    }
}

fn text(ts: &str, value: f64) -> Point {
    Point {
        ts: Timestamp::Text(ts.into()),
        value: PointValue::Number(value),
    }
}

fn minutes(meter: &str, kind: Kind, unit: &str, from: i64, n: i64) -> Series {
    series(
        meter,
        unit,
        kind,
        (0..n)
            .map(|i| Point::new(T0 + (from + i) * 60_000, 100.0 + i as f64))
            .collect(),
    )
}

fn stored_points(store: &Store, meter: &str) -> Vec<(i64, String, f64)> {
    store
        .readings(meter, i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .filter_map(|r| r.payload.as_reading())
        .flat_map(|r| {
            r.values
                .iter()
                .map(|v| (r.ts_ms, v.quantity.clone(), v.value.unwrap()))
        })
        .collect()
}

#[test]
fn rfc3339_is_parsed_strictly() {
    let ok = [
        ("2018-08-24T00:00:00Z", T0),
        ("2018-08-24t00:00:00z", T0),
        ("2018-08-24 00:00:00Z", T0),
        ("2018-08-24T02:00:00+02:00", T0),
        ("2018-08-23T22:30:00-01:30", T0),
        ("2018-08-24T00:00:00.5Z", T0 + 500),
        ("2018-08-24T00:00:00.123999Z", T0 + 123),
        ("1970-01-01T00:00:00Z", 0),
        ("2000-02-29T00:00:00Z", 951_782_400_000),
        ("2019-01-05T04:42:00Z", 1_546_663_320_000),
    ];
    for (text, ms) in ok {
        assert_eq!(parse_rfc3339_ms(text), Ok(ms), "{text}");
    }
    let bad = [
        "2019-01-05T04:42:00ZZ",
        "2019-01-05T04:42:00",
        "2019-01-05T04:42Z",
        "2019-01-05",
        "2019-1-05T04:42:00Z",
        "2019-01-05T4:42:00Z",
        "2019-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2019-13-01T00:00:00Z",
        "2019-00-01T00:00:00Z",
        "2019-01-32T00:00:00Z",
        "2019-01-05T24:00:00Z",
        "2019-01-05T23:60:00Z",
        "2016-12-31T23:59:60Z",
        "2019-01-05T04:42:00.Z",
        "2019-01-05T04:42:00+0100",
        "2019-01-05T04:42:00+24:00",
        "2019-01-05X04:42:00Z",
        " 2019-01-05T04:42:00Z",
        "2019-01-05T04:42:00Z ",
        "",
        "yesterday",
        "2019-01-05T04:42:00+01:00:00",
    ];
    for text in bad {
        let err = parse_rfc3339_ms(text).unwrap_err();
        assert!(err.contains("not an RFC 3339 time"), "{text}: {err}");
    }
}

/// A problem's field path and timestamp text.
type Named<'a> = (&'a str, Option<&'a str>);

/// Every bad-input class: rejected whole, every bad point named, the store unchanged.
#[tokio::test]
async fn each_bad_input_class_is_rejected_and_nothing_is_stored() {
    let f = fixture();
    // Something stored already, so "unchanged" is not trivially "empty".
    ingest(
        &f.writer,
        &f.store,
        minutes("m1", Kind::Power, "W", 0, 5),
        NOW,
    )
    .await
    .unwrap();
    let before = snapshot(&f.store);
    assert_eq!(before.0, 5);

    let good = |i: i64| Point::new(T0 + 3_600_000 + i * 60_000, 1.0);
    let cases: Vec<(&str, Vec<Series>, Vec<Named>)> = vec![
        (
            "unparseable timestamp",
            vec![series(
                "m1",
                "W",
                Kind::Power,
                vec![good(0), text("2019-01-05T04:42:00ZZ", 1.0), good(2)],
            )],
            vec![("series[0].points[1].ts", Some("2019-01-05T04:42:00ZZ"))],
        ),
        (
            "NaN and other non-numbers",
            vec![series(
                "m1",
                "W",
                Kind::Power,
                vec![
                    good(0),
                    Point {
                        ts: Timestamp::UnixMs(T0 + 1),
                        value: PointValue::Other(serde_json::json!("NaN")),
                    },
                    Point {
                        ts: Timestamp::UnixMs(T0 + 2),
                        value: PointValue::Number(f64::NAN),
                    },
                    Point {
                        ts: Timestamp::UnixMs(T0 + 3),
                        value: PointValue::Number(f64::INFINITY),
                    },
                    Point {
                        ts: Timestamp::UnixMs(T0 + 4),
                        value: PointValue::Other(serde_json::Value::Null),
                    },
                    Point {
                        ts: Timestamp::UnixMs(T0 + 5),
                        value: PointValue::Number(1e300),
                    },
                ],
            )],
            vec![
                ("series[0].points[1].value", Some("1535068800001")),
                ("series[0].points[2].value", Some("1535068800002")),
                ("series[0].points[3].value", Some("1535068800003")),
                ("series[0].points[4].value", Some("1535068800004")),
                ("series[0].points[5].value", Some("1535068800005")),
            ],
        ),
        (
            "negative energy",
            vec![
                series(
                    "m1",
                    "kWh",
                    Kind::EnergyTotal,
                    vec![Point::new(T0, 5.0), Point::new(T0 + 1, -0.1)],
                ),
                series(
                    "m2",
                    "Wh",
                    Kind::EnergyDelta,
                    vec![Point::new(T0, -3.0), Point::new(T0 + 1, 0.0)],
                ),
            ],
            vec![
                ("series[0].points[1].value", Some("1535068800001")),
                ("series[1].points[0].value", Some("1535068800000")),
            ],
        ),
        (
            "unit that does not fit the kind",
            vec![
                series("m1", "W", Kind::EnergyTotal, vec![good(0)]),
                series("m1", "kWh", Kind::Power, vec![good(0)]),
                series("m3", "MW", Kind::Power, vec![good(0)]),
            ],
            vec![
                ("series[0].unit", None),
                ("series[1].unit", None),
                ("series[2].unit", None),
            ],
        ),
        (
            "kind that cannot be pushed",
            vec![series("m1", "V", Kind::Voltage, vec![good(0)])],
            vec![("series[0].kind", None)],
        ),
        (
            "timestamp too far in the future, or before 1970",
            vec![series(
                "m1",
                "W",
                Kind::Power,
                vec![
                    Point::new(NOW + 300_000, 1.0),
                    Point::new(NOW + 300_001, 1.0),
                    text("2030-01-01T00:00:00Z", 1.0),
                    Point::new(-1, 1.0),
                ],
            )],
            vec![
                ("series[0].points[1].ts", Some("1535155500001")),
                ("series[0].points[2].ts", Some("2030-01-01T00:00:00Z")),
                ("series[0].points[3].ts", Some("-1")),
            ],
        ),
        (
            "duplicate timestamp in the batch, in any notation",
            vec![
                series(
                    "m1",
                    "W",
                    Kind::Power,
                    vec![
                        good(0),
                        Point::new(T0, 1.0),
                        text("2018-08-24T02:00:00+02:00", 2.0),
                    ],
                ),
                series("m1", "kW", Kind::Power, vec![Point::new(T0, 3.0)]),
            ],
            vec![
                ("series[0].points[2].ts", Some("2018-08-24T02:00:00+02:00")),
                ("series[1].points[0].ts", Some("1535068800000")),
            ],
        ),
        (
            "bad meter id",
            vec![
                series("main/../x", "W", Kind::Power, vec![good(0)]),
                series("", "W", Kind::Power, vec![good(0)]),
                series(&"x".repeat(65), "W", Kind::Power, vec![good(0)]),
            ],
            vec![
                ("series[0].meter", None),
                ("series[1].meter", None),
                ("series[2].meter", None),
            ],
        ),
        (
            "empty series",
            vec![series("m1", "W", Kind::Power, vec![])],
            vec![("series[0].points", None)],
        ),
        ("empty batch", vec![], vec![("series", None)]),
    ];
    for (class, batch, expected) in cases {
        let err = ingest_all(&f.writer, &f.store, &batch, NOW, &IngestLimits::default())
            .await
            .unwrap_err();
        let named: Vec<Named> = err
            .problems()
            .iter()
            .map(|p| (p.field.as_str(), p.ts.as_deref()))
            .collect();
        assert_eq!(named, expected, "{class}: {err}");
        assert!(err
            .to_string()
            .starts_with("batch rejected, nothing stored"));
        // validate() says the same without touching the store.
        assert!(validate_all(&batch, NOW, &IngestLimits::default()).is_err());
        assert_eq!(snapshot(&f.store), before, "{class}: store changed");
    }
    let err = validate(
        &series("m1", "kWh", Kind::EnergyTotal, vec![Point::new(T0, -1.0)]),
        NOW,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("energy_total cannot be negative"),
        "{err}"
    );
}

#[tokio::test]
async fn future_limit_is_configurable() {
    let f = fixture();
    let s = series("m1", "W", Kind::Power, vec![Point::new(NOW + 60_000, 1.0)]);
    let strict = IngestLimits {
        max_future: Duration::from_secs(30),
    };
    let err = ingest_all(&f.writer, &f.store, std::slice::from_ref(&s), NOW, &strict)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("60.000 s ahead"), "{err}");
    assert_eq!(f.store.last_seq(), 0);
    ingest(&f.writer, &f.store, s, NOW).await.unwrap();
    assert_eq!(f.store.last_seq(), 1);
}

#[tokio::test]
async fn good_batch_is_queryable_when_the_call_returns_and_is_broadcast() {
    let mut f = fixture();
    let s = series(
        "boiler",
        "kW",
        Kind::Power,
        vec![
            text("2018-08-24T00:10:00Z", -1.5),
            text("2018-08-24T00:00:00.250Z", 2.25),
            Point::new(T0 + 5 * 60_000, 0.0),
        ],
    );
    let readings = validate(&s, NOW).unwrap();
    assert_eq!(
        readings.iter().map(|r| r.ts_ms).collect::<Vec<_>>(),
        vec![T0 + 250, T0 + 300_000, T0 + 600_000],
        "sorted by time"
    );
    let outcome = ingest(&f.writer, &f.store, s, NOW).await.unwrap();
    assert_eq!(
        outcome,
        IngestOutcome {
            corrected: 0,
            stored: 3,
            skipped: 0,
            readings: 3,
            too_late_for_intervals: 0,
            first_seq: Some(1),
            last_seq: Some(3)
        }
    );
    // Durable and indexed the moment the call returns.
    let stored = f.store.readings("boiler", T0, T0 + 900_000).unwrap();
    assert_eq!(stored.len(), 3);
    let r = stored[2].payload.as_reading().unwrap();
    assert_eq!(r.ts_ms, T0 + 600_000);
    assert_eq!(
        r.values,
        vec![Value {
            quantity: "power".into(),
            unit: "kW".into(),
            kind: Kind::Power,
            value: Some(-1.5),
            invalid: None,
            source: Source::F64,
        }]
    );
    // Same path as polled readings: the committed broadcast carries them.
    let committed = f.committed.recv().await.unwrap();
    assert_eq!(
        committed.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[tokio::test]
async fn same_meter_and_time_is_stored_once() {
    let f = fixture();
    let s = minutes("m1", Kind::EnergyTotal, "kWh", 0, 20);
    let first = ingest(&f.writer, &f.store, s.clone(), NOW).await.unwrap();
    assert_eq!((first.stored, first.skipped), (20, 0));
    let after_first = snapshot(&f.store);
    let again = ingest(&f.writer, &f.store, s, NOW).await.unwrap();
    assert_eq!(
        again,
        IngestOutcome {
            corrected: 0,
            stored: 0,
            skipped: 20,
            readings: 0,
            too_late_for_intervals: 0,
            first_seq: None,
            last_seq: None
        }
    );
    assert_eq!(snapshot(&f.store), after_first);

    // Another kind at the same times is not a duplicate: it is another quantity.
    let power = minutes("m1", Kind::Power, "W", 10, 20);
    let third = ingest(&f.writer, &f.store, power, NOW).await.unwrap();
    assert_eq!((third.stored, third.skipped), (20, 0));
    assert_eq!(stored_points(&f.store, "m1").len(), 40);
    // And the same point from two concurrent calls is still stored once.
    let s = minutes("m2", Kind::Power, "W", 0, 500);
    let (a, b) = tokio::join!(
        ingest(&f.writer, &f.store, s.clone(), NOW),
        ingest(&f.writer, &f.store, s, NOW)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.stored + b.stored, 500, "{a:?} {b:?}");
    assert_eq!(a.skipped + b.skipped, 500);
    assert_eq!(
        f.store.readings("m2", i64::MIN, i64::MAX).unwrap().len(),
        500
    );
}

#[tokio::test]
async fn a_batch_split_across_two_calls_stores_the_same_as_one_call() {
    let whole = fixture();
    let s = minutes("m1", Kind::Power, "W", 0, 100);
    ingest(&whole.writer, &whole.store, s.clone(), NOW)
        .await
        .unwrap();

    let split = fixture();
    // Overlapping halves, the second sent first and out of order.
    let mut late = series("m1", "W", Kind::Power, s.points[40..].to_vec());
    late.points.reverse();
    let early = series("m1", "W", Kind::Power, s.points[..60].to_vec());
    let a = ingest(&split.writer, &split.store, late, NOW)
        .await
        .unwrap();
    let b = ingest(&split.writer, &split.store, early, NOW)
        .await
        .unwrap();
    assert_eq!((a.stored, a.skipped, b.stored, b.skipped), (60, 0, 40, 20));
    assert_eq!(
        stored_points(&split.store, "m1"),
        stored_points(&whole.store, "m1")
    );
    assert_eq!(stored_points(&split.store, "m1").len(), 100);
}

#[tokio::test]
async fn series_of_one_meter_share_a_reading_per_timestamp() {
    let f = fixture();
    let batch = [
        minutes("pv", Kind::Power, "W", 0, 3),
        minutes("pv", Kind::EnergyTotal, "kWh", 1, 3),
        minutes("heat", Kind::EnergyDelta, "Wh", 0, 1),
    ];
    let out = ingest_all(&f.writer, &f.store, &batch, NOW, &IngestLimits::default())
        .await
        .unwrap();
    // pv: t0 power; t1, t2 power + energy; t3 energy. heat: t0.
    assert_eq!((out.stored, out.readings), (7, 5));
    let pv = f.store.readings("pv", i64::MIN, i64::MAX).unwrap();
    let shape: Vec<Vec<&str>> = pv
        .iter()
        .map(|r| {
            r.payload
                .as_reading()
                .unwrap()
                .values
                .iter()
                .map(|v| v.quantity.as_str())
                .collect()
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            vec!["power"],
            vec!["power", "energy_total"],
            vec!["power", "energy_total"],
            vec!["energy_total"]
        ]
    );
    assert_eq!(f.store.meters().unwrap(), vec!["heat", "pv"]);
}

#[test]
fn series_parse_from_json_and_bad_values_are_named() {
    let doc = r#"{"meter": "boiler", "unit": "W", "kind": "power", "points": [
        {"ts": "2018-08-24T00:00:00Z", "value": 12},
        {"ts": 1535068860000, "value": 12.5},
        {"ts": "2018-08-24T00:02:00Z", "value": "NaN"}
    ]}"#;
    let s: Series = serde_json::from_str(doc).unwrap();
    assert_eq!(s.points[0].value, PointValue::Number(12.0));
    assert_eq!(s.points[1].ts, Timestamp::UnixMs(T0 + 60_000));
    let err = validate(&s, NOW).unwrap_err();
    assert_eq!(
        err.problems()
            .iter()
            .map(|p| p.field.as_str())
            .collect::<Vec<_>>(),
        vec!["series[0].points[2].value"]
    );
    assert!(err.to_string().contains("\"NaN\" is not a number"), "{err}");
    let unknown = doc.replace("\"unit\"", "\"colour\": 1, \"unit\"");
    assert!(serde_json::from_str::<Series>(&unknown).is_err());
}

#[tokio::test]
async fn a_push_while_the_disk_is_full_is_refused_at_once_and_nothing_is_stored() {
    let f = fixture();
    let points = minutes("m1", Kind::Power, "W", 0, 5);
    ingest(
        &f.writer,
        &f.store,
        minutes("m0", Kind::Power, "W", 0, 3),
        NOW,
    )
    .await
    .unwrap();
    let before = snapshot(&f.store);
    f.store.inject_disk_full(true);
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        ingest(&f.writer, &f.store, points.clone(), NOW),
    )
    .await
    .expect("answered at once, not held until the disk has room")
    .unwrap_err();
    assert!(
        matches!(
            &refused,
            IngestError::Store(e)
                if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::NoSpace { .. }))
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("disk full"), "{refused}");
    assert_eq!(snapshot(&f.store), before);

    // Room again: the same push goes through whole.
    f.store.inject_disk_full(false);
    let stored = ingest(&f.writer, &f.store, points, NOW).await.unwrap();
    assert_eq!((stored.stored, stored.skipped), (5, 0));
}

fn stored_values_at(store: &Store, meter: &str, ts: i64) -> Vec<(String, f64)> {
    let mut values: Vec<(String, f64)> = stored_points(store, meter)
        .into_iter()
        .filter(|(t, _, _)| *t == ts)
        .map(|(_, q, v)| (q, v))
        .collect();
    values.sort_by(|a, b| a.0.cmp(&b.0));
    values
}

#[tokio::test]
async fn a_different_value_at_a_stored_point_refuses_the_batch_and_names_it() {
    let f = fixture();
    let first = series(
        "pv",
        "kW",
        Kind::Power,
        vec![Point::new(T0, 1.5), Point::new(T0 + 60_000, 1.75)],
    );
    ingest(&f.writer, &f.store, first, NOW).await.unwrap();
    let before = snapshot(&f.store);
    // One new point and one that differs from the stored one: nothing is stored.
    let offered = series(
        "pv",
        "kW",
        Kind::Power,
        vec![Point::new(T0 + 120_000, 3.0), Point::new(T0 + 60_000, 2.0)],
    );
    let err = ingest(&f.writer, &f.store, offered, NOW)
        .await
        .expect_err("a different value is refused");
    let IngestError::Conflict(conflicts) = &err else {
        panic!("not a conflict: {err}");
    };
    assert_eq!(conflicts.total, 1);
    assert_eq!(
        conflicts.list[0],
        Conflict {
            meter: "pv".into(),
            quantity: "power".into(),
            ts_ms: T0 + 60_000,
            stored: Some(1.75),
            stored_unit: "kW".into(),
            offered: Some(2.0),
            offered_unit: "kW".into(),
            pending: false,
        }
    );
    let text = err.to_string();
    for part in [
        "nothing stored",
        "meter `pv` power",
        "2018-08-24T00:01:00.000Z",
        "1535068860000",
        "stored as 1.75 kW",
        "offers 2 kW",
        "\"correct\": true",
    ] {
        assert!(text.contains(part), "`{part}` in {text}");
    }
    assert_eq!(snapshot(&f.store), before);
    // The same number in another unit is another value too.
    let other_unit = series("pv", "W", Kind::Power, vec![Point::new(T0, 1.5)]);
    assert!(matches!(
        ingest(&f.writer, &f.store, other_unit, NOW).await,
        Err(IngestError::Conflict(_))
    ));
    // The same value again is still a repeat.
    let repeat = series("pv", "kW", Kind::Power, vec![Point::new(T0 + 60_000, 1.75)]);
    let out = ingest(&f.writer, &f.store, repeat, NOW).await.unwrap();
    assert_eq!((out.stored, out.skipped, out.corrected), (0, 1, 0));
    assert_eq!(snapshot(&f.store), before);
}

#[tokio::test]
async fn a_correction_is_a_new_record_that_reads_show_instead_of_the_old_value() {
    let mut f = fixture();
    // Power and energy of one meter at T0 share one reading.
    let batch = [
        series("pv", "kW", Kind::Power, vec![Point::new(T0, 1.5)]),
        series("pv", "kWh", Kind::EnergyTotal, vec![Point::new(T0, 10.0)]),
    ];
    let readings = validate_all(&batch, NOW, &IngestLimits::default()).unwrap();
    store_readings(&f.writer, &f.store, readings).await.unwrap();
    while f.committed.try_recv().is_ok() {}
    let old_seq = f.store.last_seq();

    let fix = series("pv", "kW", Kind::Power, vec![Point::new(T0, 2.25)]);
    let readings = validate(&fix, NOW).unwrap();
    let only_energy = Correct::Series(
        [("pv".to_string(), "energy_total".to_string())]
            .into_iter()
            .collect(),
    );
    // Allowed for another series only: still a conflict.
    assert!(matches!(
        store_readings_with(&f.writer, &f.store, readings.clone(), &only_energy).await,
        Err(IngestError::Conflict(_))
    ));
    let power = Correct::Series(
        [("pv".to_string(), "power".to_string())]
            .into_iter()
            .collect(),
    );
    let (out, records) = store_readings_with(&f.writer, &f.store, readings.clone(), &power)
        .await
        .unwrap();
    assert_eq!((out.stored, out.skipped, out.corrected), (1, 0, 1));
    assert_eq!(records.len(), 1);
    assert!(records[0].seq > old_seq, "a new record");
    // It goes the way of every commit (state, intervals, upstream).
    let committed = f.committed.recv().await.unwrap();
    assert_eq!(committed[0].seq, records[0].seq);
    // Reads show the correction and the values it did not touch; the old record
    // stays in the log.
    assert_eq!(
        stored_values_at(&f.store, "pv", T0),
        vec![("energy_total".into(), 10.0), ("power".into(), 2.25)]
    );
    assert_eq!(f.store.read_range(old_seq, old_seq).unwrap().len(), 1);
    // The same correction again is a repeat; the replaced value is now a conflict.
    let (again, _) = store_readings_with(&f.writer, &f.store, readings, &power)
        .await
        .unwrap();
    assert_eq!((again.stored, again.skipped, again.corrected), (0, 1, 0));
    let old = series("pv", "kW", Kind::Power, vec![Point::new(T0, 1.5)]);
    assert!(matches!(
        ingest(&f.writer, &f.store, old, NOW).await,
        Err(IngestError::Conflict(_))
    ));
    // A correction of a point not stored yet is an ordinary point.
    let new = validate(
        &series("pv", "kW", Kind::Power, vec![Point::new(T0 + 60_000, 1.0)]),
        NOW,
    )
    .unwrap();
    let (out, _) = store_readings_with(&f.writer, &f.store, new, &Correct::All)
        .await
        .unwrap();
    assert_eq!((out.stored, out.corrected), (1, 0));
}

#[tokio::test]
async fn a_point_another_push_is_storing_with_another_value_is_a_conflict() {
    let f = fixture();
    let a = series("m3", "W", Kind::Power, vec![Point::new(T0, 100.0)]);
    let b = series("m3", "W", Kind::Power, vec![Point::new(T0, 200.0)]);
    // `join` polls the first call until it waits for the writer (its point claimed),
    // then the second.
    let (a, b) = tokio::join!(
        ingest(&f.writer, &f.store, a, NOW),
        ingest(&f.writer, &f.store, b, NOW)
    );
    assert_eq!(a.unwrap().stored, 1);
    let Err(IngestError::Conflict(c)) = b else {
        panic!("not a conflict: {b:?}");
    };
    assert!(c.list[0].pending);
    assert!(c.to_string().contains("another push"), "{c}");
    assert_eq!(
        stored_values_at(&f.store, "m3", T0),
        vec![("power".into(), 100.0)]
    );
}
