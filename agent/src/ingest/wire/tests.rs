use super::*;

/// 2018-08-24T00:00:00Z
const T0: i64 = 1_535_068_800_000;
const NOW: i64 = T0 + 86_400_000;

fn json(body: &str, topic: Option<&str>) -> Result<Checked, Rejection> {
    check_json(body.as_bytes(), topic, NOW, &IngestLimits::default())
}

fn csv(body: &str) -> Result<Checked, Rejection> {
    check_csv(body.as_bytes(), NOW, &IngestLimits::default())
}

fn fields(r: &Rejection) -> Vec<&str> {
    r.problems.iter().map(|p| p.field.as_str()).collect()
}

#[test]
fn json_series_and_arrays_become_readings() {
    let one = json(
        r#"{"meter":"pv","unit":"kW","kind":"power","points":[
            {"ts":"2018-08-24T00:00:00Z","value":1.5},{"ts":1535068860000,"value":-0.25}]}"#,
        None,
    )
    .expect("accepted");
    assert_eq!(one.points(), 2);
    assert_eq!(one.readings.len(), 2);
    assert_eq!(one.readings[0].ts_ms, T0);
    assert_eq!(one.readings[1].values[0].value, Some(-0.25));
    assert_eq!(one.readings[1].values[0].unit, "kW");
    let two = json(
        r#"[{"meter":"pv","unit":"W","kind":"power","points":[{"ts":1535068800000,"value":1}]},
            {"meter":"pv","unit":"kWh","kind":"energy_total","points":[{"ts":1535068800000,"value":7}]}]"#,
        None,
    )
    .expect("accepted");
    assert_eq!(two.series.len(), 2);
    // Two series of one meter at one time share a reading.
    assert_eq!(two.readings.len(), 1);
    assert_eq!(two.readings[0].values.len(), 2);
}

#[test]
fn every_bad_part_of_a_json_batch_is_named() {
    let r = json(
        r#"[{"meter":"pv","unit":"W","kind":"power","points":[
              {"ts":"2018-08-24T00:00:00Z","value":1},
              {"ts":true,"value":2},
              {"ts":"2018-08-24T00:02:00Z","value":"NaN"},
              {"ts":"2018-08-24T00:03:00Z"},
              {"ts":"2018-08-24T00:04:00Z","value":4,"q":1},
              {"ts":"2018-08-26T00:00:00Z","value":5},
              7]},
            {"meter":"pv","unit":"W","kind":"volts","points":[{"ts":"2018-08-24T00:00:00Z","value":1}]},
            {"meter":"b a d","unit":"kWh","kind":"energy_total","points":[{"ts":"2018-08-24T00:00:00Z","value":-1}]},
            {"unit":"W","kind":"power","points":[]},
            "x"]"#,
        None,
    )
    .expect_err("rejected");
    assert_eq!(r.reason, RejectReason::Invalid);
    assert_eq!(
        fields(&r),
        vec![
            "series[0].points[1].ts",
            "series[0].points[2].value",
            "series[0].points[3].value",
            "series[0].points[4].q",
            "series[0].points[5].ts",
            "series[0].points[6]",
            "series[1].kind",
            "series[2].meter",
            "series[2].points[0].value",
            "series[3].meter",
            "series[4]",
        ],
        "{:#?}",
        r.problems
    );
    let reason = |field: &str| {
        r.problems
            .iter()
            .find(|p| p.field == field)
            .map(|p| p.reason.clone())
            .unwrap_or_default()
    };
    assert!(reason("series[0].points[1].ts").contains("neither an RFC 3339"));
    assert!(reason("series[0].points[2].value").contains("not a number"));
    assert!(reason("series[0].points[3].value").contains("missing"));
    assert!(reason("series[0].points[5].ts").contains("ahead of the gateway clock"));
    assert!(reason("series[1].kind").contains("`volts` is not a kind"));
    assert!(reason("series[2].points[0].value").contains("cannot be negative"));
    assert_eq!(r.problems[0].series, Some(0));
    assert_eq!(r.problems[0].point, Some(1));
}

#[test]
fn json_that_is_not_json_is_a_syntax_problem_with_its_line() {
    let r = json("{\"meter\": \"pv\",\n \"unit\": }", None).expect_err("rejected");
    assert_eq!(r.reason, RejectReason::Syntax);
    assert_eq!(fields(&r), vec!["body"]);
    assert_eq!(r.problems[0].line, Some(2));
    let r = json("42", None).expect_err("rejected");
    assert_eq!(
        (r.reason, fields(&r)),
        (RejectReason::Invalid, vec!["body"])
    );
    let r = json("[]", None).expect_err("rejected");
    assert_eq!(fields(&r), vec!["series"]);
}

#[test]
fn the_topic_meter_fills_or_must_match_the_body() {
    let filled = json(
        r#"{"unit":"W","kind":"power","points":[{"ts":1535068800000,"value":1}]}"#,
        Some("pv"),
    )
    .expect("accepted");
    assert_eq!(filled.readings[0].meter, "pv");
    let same = json(
        r#"{"meter":"pv","unit":"W","kind":"power","points":[{"ts":1535068800000,"value":1}]}"#,
        Some("pv"),
    );
    assert!(same.is_ok());
    let other = json(
        r#"{"meter":"main","unit":"W","kind":"power","points":[{"ts":1535068800000,"value":1}]}"#,
        Some("pv"),
    )
    .expect_err("rejected");
    assert_eq!(fields(&other), vec!["series[0].meter"]);
    assert!(other.problems[0].reason.contains("topic's meter `pv`"));
}

#[test]
fn csv_lines_become_series_with_the_documented_units() {
    let c = csv("meter,timestamp,quantity,value\r\n\
         pv,2018-08-24T00:00:00Z,power,1500\r\n\
         pv,1535068860000,power,1400.5\n\
         \n\
         pv,2018-08-24T00:00:00Z,energy_total,12.5\n\
         pv,2018-08-24T00:00:00Z,energy_delta,250,Wh\n\
         heat, 2018-08-24T00:00:00Z , power , 2.5 , kW\n")
    .expect("accepted");
    let shapes: Vec<(&str, &str, Kind, usize)> = c
        .series
        .iter()
        .map(|s| (s.meter.as_str(), s.unit.as_str(), s.kind, s.points.len()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("pv", "W", Kind::Power, 2),
            ("pv", "kWh", Kind::EnergyTotal, 1),
            ("pv", "Wh", Kind::EnergyDelta, 1),
            ("heat", "kW", Kind::Power, 1),
        ]
    );
    assert_eq!(c.points(), 5);
    // pv at T0 (three quantities), pv at T0+1min, heat at T0.
    assert_eq!(c.readings.len(), 3);
    let dry = series_json(&c.series);
    assert_eq!(dry[0]["points"][1]["ts"], "2018-08-24T00:01:00.000Z");
    assert_eq!(dry[0]["points"][1]["value"], 1400.5);
    assert_eq!(dry[3]["unit"], "kW");
}

#[test]
fn every_bad_csv_line_is_named_by_its_number() {
    let r = csv("pv,2018-08-24T00:00:00Z,power,1\n\
         pv,2018-08-24T00:00:00Z,power\n\
         pv,2018-08-24T00:01:00Z,voltage,230\n\
         pv,2018-08-24T00:02:00Z,power,1,kWh\n\
         p v,2018-08-24T00:03:00Z,power,1\n\
         pv,yesterday,power,1\n\
         pv,2018-08-24T00:05:00Z,power,abc\n\
         pv,2018-08-24T00:06:00Z,energy_total,-3\n\
         pv,2018-08-24T00:00:00Z,power,2\n\
         pv,2018-08-24T00:07:00Z,power,NaN\n")
    .expect_err("rejected");
    assert_eq!(r.reason, RejectReason::Invalid);
    assert_eq!(
        fields(&r),
        vec![
            "line[2]",
            "line[3].quantity",
            "line[4].unit",
            "line[5].meter",
            "line[6].timestamp",
            "line[7].value",
            "line[8].value",
            "line[9].timestamp",
            "line[10].value",
        ],
        "{:#?}",
        r.problems
    );
    let lines: Vec<Option<usize>> = r.problems.iter().map(|p| p.line).collect();
    assert_eq!(
        lines,
        [2, 3, 4, 5, 6, 7, 8, 9, 10].map(Some).to_vec(),
        "every problem carries its line"
    );
    let dup = &r.problems[7];
    assert!(dup.reason.contains("as line[1]"), "{}", dup.reason);
    assert!(r.problems[0].reason.contains("found 3"));
}

#[test]
fn csv_without_lines_or_text_is_rejected() {
    let r = csv("meter,timestamp,quantity,value\n\n").expect_err("rejected");
    assert_eq!(fields(&r), vec!["body"]);
    let r =
        check_csv(b"pv,1,power,1\n\xff\xfe", NOW, &IngestLimits::default()).expect_err("rejected");
    assert_eq!(r.reason, RejectReason::Syntax);
    assert_eq!(r.problems[0].line, Some(2));
}

mod generated {
    //! Generated bodies: whatever arrives, the parsers do not panic, keep at most
    //! `MAX_PROBLEMS` problems with bounded text, count every one, and name a field.

    use proptest::prelude::*;

    use super::*;
    use crate::ingest::MAX_PROBLEMS;

    /// Longest problem text: a field path, a reason and a quoted timestamp, each
    /// with its input cut to `MAX_QUOTED` characters.
    const MAX_PROBLEM_TEXT: usize = 1024;

    fn check_bounded(result: Result<Checked, Rejection>) {
        let Err(r) = result else { return };
        assert!(!r.problems.is_empty(), "a rejection names a problem");
        assert!(r.problems.len() <= MAX_PROBLEMS);
        assert!(r.problems_total >= r.problems.len());
        assert_eq!(r.truncated(), r.problems_total > r.problems.len());
        for p in &r.problems {
            assert!(!p.field.is_empty(), "{p:?}");
            let text = p.to_string();
            assert!(
                text.len() <= MAX_PROBLEM_TEXT,
                "{} bytes: {text}",
                text.len()
            );
        }
        assert!(r.summary().len() <= MAX_PROBLEM_TEXT + 100);
    }

    /// JSON scalars, right or wrong for a field.
    fn json_leaf() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            (-1e13f64..1e13).prop_map(|f| format!("{f:e}")),
            Just("\"2018-08-24T00:00:00Z\"".to_string()),
            Just("\"NaN\"".to_string()),
            Just("1535068800000".to_string()),
            (64usize..400).prop_map(|n| format!("\"{}\"", "z".repeat(n))),
        ]
    }

    /// JSON-ish values: the right shape with random parts, or anything.
    fn json_value() -> impl Strategy<Value = String> {
        json_leaf().prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("meter".to_string()),
                            Just("unit".to_string()),
                            Just("kind".to_string()),
                            Just("points".to_string()),
                            Just("ts".to_string()),
                            Just("value".to_string()),
                            (1usize..200).prop_map(|n| "k".repeat(n)),
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|fields| {
                    let body: Vec<String> =
                        fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", body.join(","))
                }),
            ]
        })
    }

    /// A series with many generated points: often far more problems than the cap.
    fn series_body() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("pv".to_string()), Just("p v".to_string()), (1usize..90).prop_map(|n| "m".repeat(n))],
            prop_oneof![Just("W"), Just("kWh"), Just("V")],
            prop_oneof![Just("power"), Just("energy_total"), Just("volts")],
            prop::collection::vec((json_leaf(), json_leaf()), 0..160),
        )
            .prop_map(|(meter, unit, kind, points)| {
                let points: Vec<String> = points
                    .iter()
                    .map(|(ts, v)| format!("{{\"ts\":{ts},\"value\":{v}}}"))
                    .collect();
                format!(
                    "{{\"meter\":\"{meter}\",\"unit\":\"{unit}\",\"kind\":\"{kind}\",\"points\":[{}]}}",
                    points.join(",")
                )
            })
    }

    /// CSV fields, right or wrong for a column.
    const CSV_FIELDS: [&str; 12] = [
        "pv",
        "power",
        "energy_total",
        "1535068800000",
        "2018-08-24T00:00:00Z",
        "kWh",
        "NaN",
        " 12.5 ",
        "-3",
        "p v",
        "9999-99-99T99:99:99Z",
        "",
    ];

    /// A line: up to 7 fields picked from [`CSV_FIELDS`], or a long one.
    fn csv_line() -> impl Strategy<Value = String> {
        (
            prop::array::uniform7(0..CSV_FIELDS.len() + 1),
            0usize..8,
            64usize..300,
        )
            .prop_map(|(picks, count, long)| {
                picks[..count]
                    .iter()
                    .map(|&i| match CSV_FIELDS.get(i) {
                        Some(f) => f.to_string(),
                        None => "q".repeat(long),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn json_bodies_never_panic_and_answers_stay_bounded(
            body in prop_oneof![json_value(), series_body()],
            topic in prop::option::of(prop_oneof![Just("pv".to_string()), Just("main".to_string())]),
        ) {
            check_bounded(check_json(body.as_bytes(), topic.as_deref(), NOW, &IngestLimits::default()));
        }

        #[test]
        fn json_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            check_bounded(check_json(&body, None, NOW, &IngestLimits::default()));
        }

        #[test]
        fn csv_bodies_never_panic_and_answers_stay_bounded(
            lines in prop::collection::vec(csv_line(), 0..150),
            crlf in any::<bool>(),
        ) {
            let end = if crlf { "\r\n" } else { "\n" };
            let body: String = lines.iter().map(|l| format!("{l}{end}")).collect();
            let result = check_csv(body.as_bytes(), NOW, &IngestLimits::default());
            if let Err(r) = &result {
                // Every problem of a CSV body names a line or the body.
                prop_assert!(r.problems.iter().all(|p| p.field.starts_with("line[") || p.field == "body"));
            }
            check_bounded(result);
        }
    }
}

/// Pushed numbers whose float32 form differs from what was sent, and others.
const EXACT: [(&str, f64); 6] = [
    ("51.001953125", 51.001953125),
    ("0.5000000596046448", 0.5000000596046448),
    ("0.1", 0.1),
    ("1e-300", 1e-300),
    ("17179869184", 17_179_869_184.0),
    ("999999999999.9999", 999_999_999_999.999_9),
];

#[test]
fn pushed_numbers_are_read_exactly_and_kept_as_float64s() {
    for (text, expected) in EXACT {
        let body = format!(
            r#"{{"meter":"pv","unit":"W","kind":"power","points":[{{"ts":1535068800000,"value":{text}}}]}}"#
        );
        let checked = json(&body, None).expect("accepted");
        let v = &checked.readings[0].values[0];
        assert_eq!(
            v.value.map(f64::to_bits),
            Some(expected.to_bits()),
            "JSON {text}"
        );
        assert_eq!(v.source, crate::model::Source::F64);
        assert_eq!(
            v.number_json().to_string().parse::<f64>().ok(),
            Some(expected)
        );
        let checked = csv(&format!("pv,1535068800000,power,{text}\n")).expect("accepted");
        let v = &checked.readings[0].values[0];
        assert_eq!(
            v.value.map(f64::to_bits),
            Some(expected.to_bits()),
            "CSV {text}"
        );
        assert_eq!(v.source, crate::model::Source::F64);
        // A dry run echoes the number as it will read back.
        let echo = series_json(&checked.series);
        assert_eq!(
            echo[0]["points"][0]["value"]
                .to_string()
                .parse::<f64>()
                .ok(),
            Some(expected)
        );
    }
}
