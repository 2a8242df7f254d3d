//! P1 tests: the specifications' example telegrams, framing and CRC, timestamps,
//! readings, config, arbitrary input, and the bus task over a pseudo-terminal.

use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::p1::{
    crc16, format_meter_time, meter_time, parse, Dsmr, Emitter, Frame, Framer, FramingError,
    P1Reader, Telegram, MAX_TELEGRAM,
};
use super::MeterState;
use super::{plan_meters, run_bus};
use crate::acquire::config::{BusType, Parity};
use crate::config::Config;
use crate::model::{Kind, Reading, Source, Value};
use crate::sim::P1Sim;

/// The example telegram of P1 Companion Standard DSMR 5.0.2 (Netbeheer Nederland,
/// 2016-02-26), §6.12, lines as printed, CR LF between them, up to and with `!`.
const DSMR5_EXAMPLE: &[&str] = &[
    "/ISk5\\2MT382-1000",
    "",
    "1-3:0.2.8(50)",
    "0-0:1.0.0(101209113020W)",
    "0-0:96.1.1(4B384547303034303436333935353037)",
    "1-0:1.8.1(123456.789*kWh)",
    "1-0:1.8.2(123456.789*kWh)",
    "1-0:2.8.1(123456.789*kWh)",
    "1-0:2.8.2(123456.789*kWh)",
    "0-0:96.14.0(0002)",
    "1-0:1.7.0(01.193*kW)",
    "1-0:2.7.0(00.000*kW)",
    "0-0:96.7.21(00004)",
    "0-0:96.7.9(00002)",
    "1-0:99.97.0(2)(0-0:96.7.19)(101208152415W)(0000000240*s)(101208151004W)(0000000301*s)",
    "1-0:32.32.0(00002)",
    "1-0:52.32.0(00001)",
    "1-0:72.32.0(00000)",
    "1-0:32.36.0(00000)",
    "1-0:52.36.0(00003)",
    "1-0:72.36.0(00000)",
    "0-0:96.13.0(303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F303132333435363738393A3B3C3D3E3F)",
    "1-0:32.7.0(220.1*V)",
    "1-0:52.7.0(220.2*V)",
    "1-0:72.7.0(220.3*V)",
    "1-0:31.7.0(001*A)",
    "1-0:51.7.0(002*A)",
    "1-0:71.7.0(003*A)",
    "1-0:21.7.0(01.111*kW)",
    "1-0:41.7.0(02.222*kW)",
    "1-0:61.7.0(03.333*kW)",
    "1-0:22.7.0(04.444*kW)",
    "1-0:42.7.0(05.555*kW)",
    "1-0:62.7.0(06.666*kW)",
    "0-1:24.1.0(003)",
    "0-1:96.1.0(3232323241424344313233343536373839)",
    "0-1:24.2.1(101209112500W)(12785.123*m3)",
    "!",
];

/// The CRC the specification prints after the example's `!`.
const DSMR5_EXAMPLE_PRINTED_CRC: &str = "EF2F";

/// A DSMR 2.2 telegram as P1 Companion Standard 2.2 lays it out: 9600 7E1, no
/// timestamp, no CRC, the gas meter as 0-1:24.3.0 with its value on the next line
/// (the layout open-source parsers test with, e.g. dsmr_parser's TELEGRAM_V2_2).
const DSMR22_EXAMPLE: &[&str] = &[
    "/ISk5\\2MT382-1004",
    "",
    "0-0:96.1.1(00000000000000)",
    "1-0:1.8.1(00001.001*kWh)",
    "1-0:1.8.2(00001.001*kWh)",
    "1-0:2.8.1(00001.001*kWh)",
    "1-0:2.8.2(00001.001*kWh)",
    "0-0:96.14.0(0001)",
    "1-0:1.7.0(0001.01*kW)",
    "1-0:2.7.0(0000.00*kW)",
    "0-0:17.0.0(0999.00*kW)",
    "0-0:96.3.10(1)",
    "0-0:96.13.1()",
    "0-0:96.13.0()",
    "0-1:24.1.0(3)",
    "0-1:96.1.0(000000000000)",
    "0-1:24.3.0(161107190000)(00)(60)(1)(0-1:24.2.1)(m3)",
    "(00001.001)",
    "0-1:24.4.0(1)",
    "!",
];

/// A Belgian telegram with the objects e-MUCS P1 V1.4 (Fluvius, 2020) adds or
/// moves, in its formats: the version 0-0:96.1.4, the current average demand
/// 1-0:1.4.0, the month's maximum demand 1-0:1.6.0 with its time, currents with
/// two decimals (new in V1.4) and the gas meter on 0-1:24.2.3. Values are ours.
const EMUCS_EXAMPLE: &[&str] = &[
    "/FLU5\\253769484_A",
    "",
    "0-0:96.1.4(50217)",
    "0-0:96.1.1(3153414733313030313239383636)",
    "0-0:1.0.0(240606201844S)",
    "1-0:1.8.1(007446.749*kWh)",
    "1-0:1.8.2(009269.520*kWh)",
    "1-0:2.8.1(010848.406*kWh)",
    "1-0:2.8.2(004287.921*kWh)",
    "0-0:96.14.0(0001)",
    "1-0:1.4.0(00.062*kW)",
    "1-0:1.6.0(240602103000S)(02.478*kW)",
    "0-0:98.1.0(1)(1-0:1.6.0)(1-0:1.6.0)(240601000000S)(240530213000S)(02.764*kW)",
    "1-0:1.7.0(00.263*kW)",
    "1-0:2.7.0(00.000*kW)",
    "1-0:32.7.0(235.1*V)",
    "1-0:31.7.0(000.71*A)",
    "0-0:96.3.10(1)",
    "0-0:17.0.0(999.9*kW)",
    "0-1:24.1.0(003)",
    "0-1:96.1.1(37464C4F32313139303532333035)",
    "0-1:24.4.0(1)",
    "0-1:24.2.3(240606201647S)(02673.890*m3)",
    "!",
];

fn body(lines: &[&str]) -> String {
    lines.join("\r\n")
}

/// The telegram with the CRC of its bytes and the line end.
fn with_crc(lines: &[&str]) -> Vec<u8> {
    let body = body(lines);
    format!("{body}{:04X}\r\n", crc16(body.as_bytes())).into_bytes()
}

fn frames(framer: &mut Framer, bytes: &[u8]) -> Vec<Frame> {
    bytes.iter().filter_map(|&b| framer.push(b)).collect()
}

fn telegram_bytes(frame: &Frame) -> &[u8] {
    match frame {
        Frame::Telegram(bytes) => bytes,
        other => panic!("expected a telegram, got {other:?}"),
    }
}

fn get<'a>(values: &'a [Value], quantity: &str) -> &'a Value {
    values
        .iter()
        .find(|v| v.quantity == quantity)
        .unwrap_or_else(|| panic!("no `{quantity}` in {values:?}"))
}

/// (quantity, unit, kind, value printed as stored)
fn summary(values: &[Value]) -> Vec<(String, String, Kind, String)> {
    values
        .iter()
        .map(|v| {
            (
                v.quantity.clone(),
                v.unit.clone(),
                v.kind,
                v.number_json().to_string(),
            )
        })
        .collect()
}

/// 2010-12-09 11:30:20 CET (`W`) = 10:30:20 UTC.
const EXAMPLE_TIME_MS: i64 = 1_291_890_620_000;

#[test]
fn the_crc_is_crc16_arc() {
    // The catalogue's check value of CRC-16/ARC over "123456789".
    assert_eq!(crc16(b"123456789"), 0xBB3D);
}

#[test]
fn the_dsmr5_example_parses_to_the_documented_values() {
    let telegram = with_crc(DSMR5_EXAMPLE);
    let mut framer = Framer::new(true, MAX_TELEGRAM);
    let got = frames(&mut framer, &telegram);
    assert_eq!(got.len(), 1, "{got:?}");
    let t = parse(telegram_bytes(&got[0])).expect("parses");
    assert_eq!(t.ident, "ISk5\\2MT382-1000");
    assert_eq!(t.version.as_deref(), Some("50"));
    assert_eq!(t.time_ms, Some(EXAMPLE_TIME_MS));
    let s = |q: &str, u: &str, k: Kind, v: &str| (q.to_string(), u.to_string(), k, v.to_string());
    assert_eq!(
        summary(&t.values),
        vec![
            s("energy_import_t1", "kWh", Kind::EnergyTotal, "123456.789"),
            s("energy_import_t2", "kWh", Kind::EnergyTotal, "123456.789"),
            s("energy_export_t1", "kWh", Kind::EnergyTotal, "123456.789"),
            s("energy_export_t2", "kWh", Kind::EnergyTotal, "123456.789"),
            s("tariff", "", Kind::Gauge, "2"),
            s("power_import", "kW", Kind::Power, "1.193"),
            s("power_export", "kW", Kind::Power, "0"),
            s("voltage_l1", "V", Kind::Voltage, "220.1"),
            s("voltage_l2", "V", Kind::Voltage, "220.2"),
            s("voltage_l3", "V", Kind::Voltage, "220.3"),
            s("current_l1", "A", Kind::Current, "1"),
            s("current_l2", "A", Kind::Current, "2"),
            s("current_l3", "A", Kind::Current, "3"),
            s("power_import_l1", "kW", Kind::Power, "1.111"),
            s("power_import_l2", "kW", Kind::Power, "2.222"),
            s("power_import_l3", "kW", Kind::Power, "3.333"),
            s("power_export_l1", "kW", Kind::Power, "4.444"),
            s("power_export_l2", "kW", Kind::Power, "5.555"),
            s("power_export_l3", "kW", Kind::Power, "6.666"),
        ]
    );
    // Exact decimals, kept as f64 and printed as the meter sent them.
    assert!(t.values.iter().all(|v| v.source != Source::F32));
    assert_eq!(get(&t.values, "energy_import_t1").value, Some(123456.789));
    // The gas meter on M-Bus channel 1 with its own time: 2010-12-09 11:25:00 CET.
    assert_eq!(t.stamped.len(), 1);
    let (gas_ms, gas) = &t.stamped[0];
    assert_eq!(*gas_ms, EXAMPLE_TIME_MS - 320_000);
    assert_eq!(
        summary(std::slice::from_ref(gas)),
        vec![s("gas_total", "m3", Kind::Gauge, "12785.123")]
    );
}

/// The specification prints `!EF2F` after the example, but the example's bytes as
/// printed give E47C: the text was edited after its CRC was computed. A checker
/// that accepted it would not be checking.
#[test]
fn the_dsmr5_example_with_its_printed_crc_is_refused() {
    let printed = format!("{}{DSMR5_EXAMPLE_PRINTED_CRC}\r\n", body(DSMR5_EXAMPLE));
    let mut framer = Framer::new(true, MAX_TELEGRAM);
    assert_eq!(
        frames(&mut framer, printed.as_bytes()),
        vec![Frame::BadCrc {
            sent: 0xEF2F,
            computed: 0xE47C
        }]
    );
}

#[test]
fn a_dsmr22_telegram_without_crc_parses_with_its_gas_line() {
    let telegram = format!("{}\r\n", body(DSMR22_EXAMPLE));
    // DSMR 2.2 settings: 9600 7E1 and no CRC required.
    assert_eq!(Dsmr::V2_2.line().baud_rate, 9600);
    assert_eq!(Dsmr::V2_2.line().parity, Parity::Even);
    assert_eq!(Dsmr::V2_2.line().data_bits, 7);
    let mut framer = Framer::new(Dsmr::V2_2.checks_crc(), MAX_TELEGRAM);
    let got = frames(&mut framer, telegram.as_bytes());
    let t = parse(telegram_bytes(&got[0])).expect("parses");
    assert_eq!(
        t.time_ms, None,
        "DSMR 2.2 sends no time: receive time is used"
    );
    assert_eq!(
        get(&t.values, "energy_import_t1").number_json().to_string(),
        "1.001"
    );
    assert_eq!(
        get(&t.values, "power_import").number_json().to_string(),
        "1.01"
    );
    assert_eq!(get(&t.values, "tariff").number_json().to_string(), "1");
    let (gas_ms, gas) = &t.stamped[0];
    assert_eq!(gas.quantity, "gas_total");
    assert_eq!(gas.number_json().to_string(), "1.001");
    // 2016-11-07 19:00:00 with no S/W flag: November is winter time, UTC+1.
    assert_eq!(*gas_ms, 1_478_541_600_000);
    // The same telegram where a CRC is required: dropped.
    let mut strict = Framer::new(Dsmr::V5.checks_crc(), MAX_TELEGRAM);
    assert_eq!(frames(&mut strict, telegram.as_bytes()), vec![Frame::NoCrc]);
}

#[test]
fn the_emucs_objects_parse_with_their_times() {
    let telegram = with_crc(EMUCS_EXAMPLE);
    let mut framer = Framer::new(true, MAX_TELEGRAM);
    let got = frames(&mut framer, &telegram);
    let t = parse(telegram_bytes(&got[0])).expect("parses");
    assert_eq!(t.version.as_deref(), Some("50217"));
    // 2024-06-06 20:18:44 CEST (`S`) = 18:18:44 UTC.
    assert_eq!(t.time_ms, Some(1_717_697_924_000));
    let avg = get(&t.values, "demand_avg");
    assert_eq!((avg.unit.as_str(), avg.kind), ("kW", Kind::Power));
    assert_eq!(avg.number_json().to_string(), "0.062");
    assert_eq!(
        get(&t.values, "current_l1").number_json().to_string(),
        "0.71"
    );
    assert_eq!(get(&t.values, "tariff").number_json().to_string(), "1");
    let stamped: Vec<(i64, String, String)> = t
        .stamped
        .iter()
        .map(|(ts, v)| (*ts, v.quantity.clone(), v.number_json().to_string()))
        .collect();
    assert_eq!(
        stamped,
        vec![
            // 2024-06-02 10:30:00 CEST.
            (1_717_317_000_000, "demand_max_month".into(), "2.478".into()),
            // 2024-06-06 20:16:47 CEST, gas on 0-1:24.2.3.
            (1_717_697_807_000, "gas_total".into(), "2673.89".into()),
        ]
    );
}

#[test]
fn meter_times_follow_the_dst_flag_and_else_the_eu_rule() {
    assert_eq!(meter_time("101209113020W"), Some(EXAMPLE_TIME_MS));
    // The same wall time in summer time is an hour earlier in UTC.
    assert_eq!(
        meter_time("101209113020S"),
        Some(EXAMPLE_TIME_MS - 3_600_000)
    );
    // 2021-03-28: summer time from 01:00 UTC (02:00 CET becomes 03:00 CEST).
    assert_eq!(meter_time("210328015959"), Some(1_616_893_199_000)); // 00:59:59 UTC
    assert_eq!(meter_time("210328030000"), Some(1_616_893_200_000)); // 01:00:00 UTC
    assert_eq!(meter_time("210328030000S"), Some(1_616_893_200_000));
    // 2021-10-31: the hour 02:00-03:00 comes twice; the flag tells which.
    assert_eq!(meter_time("211031023000S"), Some(1_635_640_200_000)); // 00:30 UTC
    assert_eq!(meter_time("211031023000W"), Some(1_635_643_800_000)); // 01:30 UTC
    for bad in [
        "",
        "1012091130",
        "101209113020X",
        "101309113020W",
        "101232113020W",
        "210229120000W",
        "101209243020W",
        "10120911302OW",
        "101209113020WW",
        "1012091130\u{e9}W",
    ] {
        assert_eq!(meter_time(bad), None, "{bad:?}");
    }
    // Formatting is the inverse, with the flag of the instant.
    for ms in [
        EXAMPLE_TIME_MS,
        1_616_893_200_000,
        1_635_640_200_000,
        1_635_643_800_000,
    ] {
        assert_eq!(meter_time(&format_meter_time(ms)), Some(ms), "{ms}");
    }
    assert_eq!(format_meter_time(EXAMPLE_TIME_MS), "101209113020W");
}

#[test]
fn the_framer_skips_noise_resyncs_and_bounds_a_telegram() {
    let good = with_crc(DSMR5_EXAMPLE);
    // Noise, with a `/` that looks like a telegram's start until the real one.
    let mut stream = b"\x00\xffnoise with a / slash ".to_vec();
    // A telegram cut off by a restart of the meter.
    stream.extend_from_slice(&good[..300]);
    stream.extend_from_slice(b"\r\n");
    stream.extend_from_slice(&good);
    // A line of noise, then a telegram that never ends.
    stream.extend_from_slice(b"~~~\r\n");
    let mut endless = good[..200].to_vec();
    endless.extend(std::iter::repeat_n(b'7', MAX_TELEGRAM));
    stream.extend_from_slice(&endless);
    stream.extend_from_slice(&good);
    let mut framer = Framer::new(true, MAX_TELEGRAM);
    let got = frames(&mut framer, &stream);
    let kinds: Vec<&str> = got
        .iter()
        .map(|f| match f {
            Frame::Telegram(_) => "telegram",
            Frame::Framing(FramingError::Cut) => "cut",
            Frame::Framing(FramingError::TooLong) => "too long",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["cut", "telegram", "too long", "telegram"]);
    assert_eq!(telegram_bytes(&got[1]), &good[..good.len() - 6]);
    assert_eq!(got[2], Frame::Framing(FramingError::TooLong));
    assert_eq!(telegram_bytes(&got[3]), &good[..good.len() - 6]);
    assert!(framer.skipped() >= 20, "noise counted");

    // After `!`: anything but 4 hex digits and the line end is not a telegram.
    let text = body(DSMR5_EXAMPLE);
    for trailer in ["XYZW\r\n", "E47C00000\r\n", "E4\r\n"] {
        let mut framer = Framer::new(true, MAX_TELEGRAM);
        let got = frames(&mut framer, format!("{text}{trailer}").as_bytes());
        assert_eq!(
            got,
            vec![Frame::Framing(FramingError::BadTrailer)],
            "{trailer:?}"
        );
    }
    // Lower-case hex is still the right number.
    let mut framer = Framer::new(true, MAX_TELEGRAM);
    let got = frames(&mut framer, format!("{text}e47c\r\n").as_bytes());
    assert!(matches!(got[..], [Frame::Telegram(_)]), "{got:?}");
}

#[test]
fn a_malformed_stored_object_fails_the_telegram_and_unknown_ones_are_ignored() {
    let lines = |replace: &str, with: &str| -> Vec<String> {
        DSMR5_EXAMPLE
            .iter()
            .map(|l| {
                if *l == replace {
                    with.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect()
    };
    for (replace, with, object) in [
        (
            "1-0:1.8.1(123456.789*kWh)",
            "1-0:1.8.1(123456.7#9*kWh)",
            "1-0:1.8.1",
        ),
        (
            "1-0:1.8.1(123456.789*kWh)",
            "1-0:1.8.1(123456.789*MJ)",
            "1-0:1.8.1",
        ),
        (
            "1-0:1.8.1(123456.789*kWh)",
            "1-0:1.8.1(123456.789)",
            "1-0:1.8.1",
        ),
        (
            "1-0:1.8.1(123456.789*kWh)",
            "1-0:1.8.1(-12.5*kWh)",
            "1-0:1.8.1",
        ),
        ("1-0:1.7.0(01.193*kW)", "1-0:1.7.0(01.193*kW", "1-0:1.7.0"),
        (
            "0-0:1.0.0(101209113020W)",
            "0-0:1.0.0(101309113020W)",
            "0-0:1.0.0",
        ),
        ("0-0:96.14.0(0002)", "0-0:96.14.0(high)", "0-0:96.14.0"),
        (
            "0-1:24.2.1(101209112500W)(12785.123*m3)",
            "0-1:24.2.1(101209112500W)",
            "0-1:24.2.1",
        ),
    ] {
        let text = lines(replace, with).join("\r\n");
        let e = parse(text.as_bytes()).expect_err(with);
        assert_eq!(e.object, object, "{e}");
    }
    // A value whose own time is the meters' "no time" marker is left out, with
    // whatever follows it; the telegram stands.
    let text = lines(
        "0-1:24.2.1(101209112500W)(12785.123*m3)",
        "0-1:24.2.1(632525252525S)(00000.000)",
    )
    .join("\r\n");
    let t = parse(text.as_bytes()).expect("parses");
    assert!(t.stamped.is_empty(), "{:?}", t.stamped);
    assert_eq!(t.values.len(), 19);
    let emucs: Vec<&str> = EMUCS_EXAMPLE
        .iter()
        .map(|l| {
            if l.starts_with("1-0:1.6.0") {
                "1-0:1.6.0(632525252525W)(00.000*kW)"
            } else {
                l
            }
        })
        .collect();
    let t = parse(body(&emucs).as_bytes()).expect("parses");
    assert_eq!(t.stamped.len(), 1, "only the gas reading: {:?}", t.stamped);
    // Objects the agent does not store may take any shape.
    let text = lines("0-0:96.7.21(00004)", "0-0:96.7.21(odd)(((").join("\r\n");
    assert!(parse(text.as_bytes()).is_ok());
    let text = lines("0-0:96.7.21(00004)", "garbage without parentheses").join("\r\n");
    assert!(parse(text.as_bytes()).is_ok());
    // An OBIS code with its `.255` F group is the same object.
    let text = lines("1-0:31.7.0(001*A)", "1-0:31.7.0.255(007*A)").join("\r\n");
    let t = parse(text.as_bytes()).expect("parses");
    assert_eq!(get(&t.values, "current_l1").value, Some(7.0));
}

fn reading_summary(readings: &[Reading]) -> Vec<(i64, Vec<String>)> {
    readings
        .iter()
        .map(|r| {
            (
                r.ts_ms,
                r.values.iter().map(|v| v.quantity.clone()).collect(),
            )
        })
        .collect()
}

fn example_at(time_ms: i64, gas_ms: i64) -> Telegram {
    let mut t = parse(body(DSMR5_EXAMPLE).as_bytes()).expect("parses");
    t.values.truncate(1);
    t.time_ms = Some(time_ms);
    t.stamped[0].0 = gas_ms;
    t
}

#[test]
fn readings_keep_one_telegram_per_interval_and_stamped_values_once_per_time() {
    let t0 = EXAMPLE_TIME_MS;
    let mut e = Emitter::new("home", Duration::from_secs(5));
    let mut out = Vec::new();
    for s in 0..12 {
        let gas_ms = t0 - 320_000 + if s >= 7 { 300_000 } else { 0 };
        out.extend(e.readings(example_at(t0 + s * 1000, gas_ms), t0 + s * 1000 + 400));
    }
    let gas = vec!["gas_total".to_string()];
    let main = vec!["energy_import_t1".to_string()];
    assert_eq!(
        reading_summary(&out),
        vec![
            (t0 - 320_000, gas.clone()),
            (t0, main.clone()),
            (t0 + 5000, main.clone()),
            (t0 - 20_000, gas.clone()),
            (t0 + 10_000, main.clone()),
        ]
    );
    // A gas time that is a placeholder years back is not stored at that time.
    let mut e = Emitter::new("home", Duration::from_secs(1));
    let out = e.readings(example_at(t0, 946_684_800_000), t0);
    assert_eq!(reading_summary(&out), vec![(t0, main.clone())]);
    // A meter clock an hour off: stamped when received, the gas time moved alike.
    let mut e = Emitter::new("home", Duration::from_secs(1));
    let received = t0 + 3_600_000;
    let out = e.readings(example_at(t0, t0 - 320_000), received);
    assert_eq!(
        reading_summary(&out),
        vec![(received - 320_000, gas), (received, main)]
    );
}

fn p1_config(port: &str, dsmr: Option<&str>, meter_extra: &str) -> String {
    let dsmr = dsmr
        .map(|d| format!("dsmr = \"{d}\"\n"))
        .unwrap_or_default();
    format!(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"p1\"\ntype = \"p1\"\nport = \"{port}\"\n{dsmr}[[meters]]\nid = \"home\"\nbus = \"p1\"\ninterval = \"1s\"\n{meter_extra}"
    )
}

#[test]
fn a_p1_bus_takes_its_line_from_the_dsmr_version_and_its_meter_has_no_profile() {
    let config = Config::from_toml(&p1_config("/dev/ttyUSB1", None, "")).expect("parses");
    config.validate().expect("valid");
    let bus = &config.buses[0];
    assert_eq!(bus.bus_type, BusType::P1);
    let line = bus.p1_line();
    assert_eq!(
        (line.baud_rate, line.parity, line.data_bits, line.stop_bits),
        (115_200, Parity::None, 8, 1)
    );
    let config = Config::from_toml(&p1_config("/dev/ttyUSB1", Some("2.2"), "")).expect("parses");
    let line = config.buses[0].p1_line();
    assert_eq!(
        (line.baud_rate, line.parity, line.data_bits),
        (9600, Parity::Even, 7)
    );
    // Each setting can be overridden.
    let text = p1_config("/dev/ttyUSB1", Some("3"), "").replace(
        "dsmr = \"3\"\n",
        "dsmr = \"3\"\nbaud_rate = 115200\nparity = \"none\"\n",
    );
    let config = Config::from_toml(&text).expect("parses");
    let line = config.buses[0].p1_line();
    assert_eq!(
        (line.baud_rate, line.parity, line.data_bits),
        (115_200, Parity::None, 7)
    );
    let plans = plan_meters(&config).expect("plans");
    assert_eq!(plans[0].1[0].config.id, "home");
    assert!(plans[0].1[0]
        .profile
        .registers
        .iter()
        .any(|r| r.name == "energy_import_t1"));

    let rejected = |text: &str, field: &str, reason: &str| {
        let e = Config::from_toml(text)
            .and_then(|c| c.validate().map(|_| c))
            .expect_err(field);
        assert!(
            e.0.iter()
                .any(|e| e.field == field && e.reason.contains(reason)),
            "{field}: {e}"
        );
    };
    rejected(
        &p1_config("/dev/ttyUSB1", None, "profile = \"sdm630\"\n"),
        "meters[home].profile",
        "no profile",
    );
    rejected(
        &p1_config("/dev/ttyUSB1", None, "unit_id = 1\n"),
        "meters[home].unit_id",
        "no unit id",
    );
    rejected(
        &p1_config("/dev/ttyUSB1", Some("6"), ""),
        "buses[p1].dsmr",
        "not one of 2.2, 3, 4, 5",
    );
    rejected(
        &format!(
            "{}[[meters]]\nid = \"other\"\nbus = \"p1\"\n",
            p1_config("/dev/ttyUSB1", None, "")
        ),
        "meters[other].bus",
        "already carries meter `home`",
    );
    rejected(
        &p1_config("/dev/ttyUSB1", None, "energy_quantity = \"energy_total\"\n"),
        "meters[home].energy_quantity",
        "not a quantity of a P1 meter",
    );
    // A Modbus meter still needs its unit id and profile, named.
    let text = "gateway_id = \"gw\"\n[[buses]]\nid = \"lan\"\ntype = \"tcp\"\naddress = \"127.0.0.1:502\"\n[[meters]]\nid = \"m\"\nbus = \"lan\"\n";
    rejected(text, "meters[m].unit_id", "is required");
    rejected(text, "meters[m].profile", "is required");
    // `dsmr` belongs to p1 buses only.
    rejected(
        &text.replace("address", "dsmr = \"5\"\naddress"),
        "buses[lan].dsmr",
        "only a p1 bus",
    );
}

/// Flips, drops and inserts bytes of a telegram.
fn mutate(bytes: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(at, op, byte) in edits {
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = at % out.len();
        match op % 3 {
            0 => out[at] ^= byte | 1,
            1 => {
                out.remove(at);
            }
            _ => out.insert(at, byte),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Mutated example telegrams and arbitrary bytes: no panic; whatever passes the
    /// framer is at most the bound, starts with `/` and ends with `!`.
    #[test]
    fn no_input_panics(
        which in 0usize..3,
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..12),
        noise in prop::collection::vec(any::<u8>(), 0..600),
        crc in any::<bool>(),
    ) {
        let example = [DSMR5_EXAMPLE, DSMR22_EXAMPLE, EMUCS_EXAMPLE][which];
        let telegram = with_crc(example);
        let mut stream = noise.clone();
        stream.extend(mutate(&telegram, &edits));
        stream.extend(&noise);
        let mut framer = Framer::new(crc, 1024);
        for frame in frames(&mut framer, &stream) {
            if let Frame::Telegram(bytes) = frame {
                prop_assert!(bytes.len() <= 1024);
                prop_assert_eq!(bytes.first(), Some(&b'/'));
                prop_assert_eq!(bytes.last(), Some(&b'!'));
                let _ = parse(&bytes);
            }
        }
        // The parser on its own, CRC or not.
        let _ = parse(&mutate(body(example).as_bytes(), &edits));
        let _ = parse(&noise);
    }
}

async fn next_reading(rx: &mut mpsc::Receiver<Reading>) -> Reading {
    timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a reading within 30 s")
        .expect("the bus task is running")
}

/// A DSMR 5 meter on a pty at 115200 baud, a telegram every 100 ms with its clock
/// advancing a second per telegram, noise between telegrams, and telegram 2 damaged
/// in transit: the bus task stores every other telegram's values, exactly, at the
/// meter's time, counts the bad CRC and stores nothing of it.
#[tokio::test]
async fn a_dsmr5_meter_on_a_pty_is_read_and_a_bad_crc_is_counted_not_stored() {
    let mut sim = P1Sim::new(Dsmr::V5, 3);
    sim.period = Duration::from_millis(100);
    sim.step = Some(Duration::from_secs(1));
    // Late enough that the agent has opened the port (which discards what came
    // before) even under emulation.
    sim.bad_crc = vec![10];
    sim.noise = true;
    let model = sim.clone();
    let stop_sim = CancellationToken::new();
    let (path, sim_task) = crate::sim::p1_pty(sim, stop_sim.clone()).expect("pty");
    let config =
        Config::from_toml(&p1_config(&path.display().to_string(), None, "")).expect("parses");
    config.validate().expect("valid");
    let (bus, meters) = plan_meters(&config).expect("plans").remove(0);
    let stats = meters[0].stats.clone();
    let (tx, mut rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, meters, tx, shutdown.clone()));

    let mut main: Vec<Reading> = Vec::new();
    let mut gas: Vec<Reading> = Vec::new();
    // Until the damaged telegram was counted and two more were stored.
    let mut after = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while after < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the damaged telegram was not counted: {:?}",
            stats.snapshot()
        );
        let r = next_reading(&mut rx).await;
        assert_eq!(r.meter, "home");
        if r.values.len() == 1 && r.values[0].quantity == "gas_total" {
            gas.push(r);
        } else {
            main.push(r);
            if stats.snapshot().transport_errors > 0 {
                after += 1;
            }
        }
    }
    shutdown.cancel();
    timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
    stop_sim.cancel();
    let _ = timeout(Duration::from_secs(5), sim_task).await;

    let s = stats.snapshot();
    // The agent may open the port in the middle of a telegram: its tail is noise.
    assert!(s.successes >= 3, "{s:?}");
    assert_eq!(s.transport_errors, 1, "the damaged telegram: {s:?}");
    for r in &main {
        assert_eq!(r.ts_ms % 1000, 0, "the meter's time, whole seconds");
        let v = model.values(r.ts_ms);
        let exact = |x: f64| format!("{x:.3}").parse::<f64>().expect("a number");
        assert_eq!(
            get(&r.values, "energy_import_t1").value,
            Some(exact(v.import_t1))
        );
        assert_eq!(
            get(&r.values, "power_import").value,
            Some(exact(v.power_import))
        );
        assert_ne!(
            get(&r.values, "power_import").value,
            Some(99.999),
            "nothing of the damaged telegram"
        );
        assert_eq!(get(&r.values, "voltage_l1").unit, "V");
    }
    // Consecutive meter times one second apart, but across the dropped telegram.
    let gaps: Vec<i64> = main.windows(2).map(|w| w[1].ts_ms - w[0].ts_ms).collect();
    assert_eq!(gaps.iter().filter(|g| **g == 2000).count(), 1, "{gaps:?}");
    assert!(gaps.iter().all(|g| *g == 1000 || *g == 2000), "{gaps:?}");
    // The gas meter's reading at its own five-minute time, once per new time (a
    // run may cross one five-minute boundary of the meter's fast clock).
    assert!((1..=2).contains(&gas.len()), "{gas:?}");
    for g in &gas {
        assert_eq!(g.ts_ms % 300_000, 0);
        assert_eq!(g.values[0].unit, "m3");
    }
}

/// A DSMR 2.2 meter on a pty configured 9600 7E1, no CRC and no meter time: read,
/// stamped when received, gas at its hourly time.
#[tokio::test]
async fn a_dsmr22_meter_on_a_pty_at_9600_7e1_is_read_without_crc() {
    let mut sim = P1Sim::new(Dsmr::V2_2, 5);
    sim.period = Duration::from_millis(200);
    let stop_sim = CancellationToken::new();
    let (path, sim_task) = crate::sim::p1_pty(sim, stop_sim.clone()).expect("pty");
    let config = Config::from_toml(&p1_config(&path.display().to_string(), Some("2.2"), ""))
        .expect("parses");
    config.validate().expect("valid");
    let (bus, meters) = plan_meters(&config).expect("plans").remove(0);
    assert_eq!(bus.p1_line().baud_rate, 9600);
    let stats = meters[0].stats.clone();
    let (tx, mut rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let before = crate::model::now_ms();
    let task = tokio::spawn(run_bus(bus, meters, tx, shutdown.clone()));
    let mut main = None;
    let mut gas = None;
    while main.is_none() || gas.is_none() {
        let r = next_reading(&mut rx).await;
        if r.values[0].quantity == "gas_total" {
            gas = Some(r);
        } else {
            main = Some(r);
        }
    }
    shutdown.cancel();
    timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
    stop_sim.cancel();
    let _ = timeout(Duration::from_secs(5), sim_task).await;
    let (main, gas) = (main.expect("main"), gas.expect("gas"));
    assert!(
        main.ts_ms >= before && main.ts_ms <= crate::model::now_ms(),
        "receive time"
    );
    assert_eq!(get(&main.values, "energy_import_t1").unit, "kWh");
    assert_eq!(gas.ts_ms % 3_600_000, 0, "the hourly gas time");
    let s = stats.snapshot();
    assert!(s.successes >= 1 && s.transport_errors == 0, "{s:?}");
}

/// A port that stays silent: a timeout every three telegram periods, each also a
/// sign of life for the watchdog; the next good telegram makes the meter OK again.
#[tokio::test(start_paused = true)]
async fn a_silent_port_counts_timeouts_and_the_task_stays_alive() {
    use tokio::io::AsyncWriteExt;
    let config = Config::from_toml(&p1_config("/dev/ttyUSB1", None, "")).expect("parses");
    let (_, meters) = plan_meters(&config).expect("plans").remove(0);
    let stats = meters[0].stats.clone();
    let mut reader = P1Reader::new("p1", Dsmr::V5, &meters[0]);
    let (mut line, port) = tokio::io::duplex(4096);
    let (sink, mut readings) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        reader.read(port, &sink).await;
    });
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let s = stats.snapshot();
    assert_eq!((s.timeouts, s.successes), (3, 0), "{s:?}");
    assert_eq!(s.state, MeterState::Failing);
    assert!(s.last_poll_ms.is_some(), "a sign of life while silent");
    line.write_all(&with_crc(DSMR5_EXAMPLE))
        .await
        .expect("write");
    // The gas reading at its own time, then the telegram's.
    let gas = next_reading(&mut readings).await;
    assert_eq!(gas.values[0].quantity, "gas_total");
    let r = next_reading(&mut readings).await;
    assert_eq!(get(&r.values, "energy_import_t1").value, Some(123456.789));
    let s = stats.snapshot();
    assert_eq!(
        (s.timeouts, s.successes, s.state),
        (3, 1, MeterState::Ok),
        "{s:?}"
    );
    task.abort();
}
