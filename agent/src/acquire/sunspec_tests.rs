//! SunSpec devices end to end: simulated inverters and a meter (see
//! [`crate::sim::sunspec`]) discovered and read by the agent's own bus task over
//! Modbus TCP and over an RTU line on a pseudo-terminal, and `scan` against them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::stats::MeterStats;
use super::sunspec::Identity;
use super::{plan_meters, run_bus};
use crate::acquire::config::DataType;
use crate::config::Config;
use crate::model::{Invalid, Reading};
use crate::sim::sunspec::{device, SimIdentity};
use crate::sim::{serve_tcp, ReplyKind, SimBus, SimMeter};

/// Generous: the crate's tests also run under qemu.
const WAIT: Duration = Duration::from_secs(60);

const INVERTER: SimIdentity = SimIdentity {
    manufacturer: "Acme Solar",
    model: "AS-5000TL",
    version: "2.1.7",
    serial: "INV0001",
};
const METER: SimIdentity = SimIdentity {
    manufacturer: "Acme Metering",
    model: "AM-3P",
    version: "1.0",
    serial: "MTR0042",
};
const FLOAT: SimIdentity = SimIdentity {
    manufacturer: "Float Power",
    model: "FP-10",
    version: "3",
    serial: "F-77",
};

/// Unit 1: a three-phase inverter (103, nameplate 120, a vendor model, storage 124)
/// at 40000; unit 2: a wye meter 203 at 0; unit 3: a float inverter 113 at 50000;
/// unit 4: an SDM630 (no SunSpec). Model time stands nearly still.
fn sim_bus() -> Arc<SimBus> {
    let slow = |m: SimMeter| Arc::new(m.with_time_scale(1e-6));
    let sdm = crate::acquire::profile::builtin("sdm630").expect("sdm630");
    Arc::new(
        SimBus::new()
            .with_meter(
                1,
                slow(device(40000, &INVERTER, &[103, 120, 64110, 124], 11)),
            )
            .with_meter(2, slow(device(0, &METER, &[203], 12)))
            .with_meter(3, slow(device(50000, &FLOAT, &[113], 13)))
            .with_meter(4, slow(SimMeter::new(Arc::new(sdm), 14))),
    )
}

/// Quantities each device leaves unimplemented (its sentinels), by meter id.
const NOT_IMPLEMENTED: &[(&str, &[&str])] = &[
    (
        "inverter",
        &["reactive_power", "dc_current", "battery_available"],
    ),
    ("meter", &["apparent_power", "energy_export"]),
    ("float", &["temperature_cabinet", "dc_current"]),
];

fn config_text(bus_toml: &str) -> String {
    let mut text = format!("gateway_id = \"gw\"\n{bus_toml}");
    for (id, unit) in [("inverter", 1), ("meter", 2), ("float", 3)] {
        // A small read limit: discovery and the plan split their reads.
        text.push_str(&format!(
            "[[meters]]\nid = \"{id}\"\nbus = \"bus\"\nunit_id = {unit}\nprofile = \"sunspec\"\ninterval = \"1h\"\nmax_registers_per_request = 40\n"
        ));
    }
    text
}

/// Runs the bus task until every SunSpec meter gave a reading; checks every value
/// against what the simulator served, the sentinels and the identities.
async fn read_back(bus_toml: &str, sim: &SimBus) {
    let config = Config::from_toml(&config_text(bus_toml)).expect("config parses");
    config.validate().expect("config is valid");
    let (bus, plans) = plan_meters(&config).expect("plans").remove(0);
    let stats: HashMap<String, Arc<MeterStats>> = plans
        .iter()
        .map(|p| (p.config.id.clone(), p.stats.clone()))
        .collect();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, plans, tx, shutdown.clone()));
    let mut readings: HashMap<String, Reading> = HashMap::new();
    while readings.len() < 3 {
        let r = timeout(WAIT, rx.recv()).await;
        let r = r
            .unwrap_or_else(|_| {
                let snaps: Vec<_> = stats.values().map(|s| s.snapshot()).collect();
                panic!("a reading from every meter: {snaps:?}")
            })
            .expect("bus task running");
        readings.entry(r.meter.clone()).or_insert(r);
    }
    shutdown.cancel();
    timeout(WAIT, task)
        .await
        .expect("bus task stops")
        .expect("no panic");

    for (id, unit, identity) in [
        ("inverter", 1u8, &INVERTER),
        ("meter", 2, &METER),
        ("float", 3, &FLOAT),
    ] {
        let snap = stats[id].snapshot();
        assert_eq!(
            (
                snap.timeouts,
                snap.exceptions,
                snap.transport_errors,
                snap.decode_errors
            ),
            (0, 0, 0, 0),
            "{id}: {snap:?}"
        );
        assert_eq!(
            stats[id].identity(),
            Some(Identity {
                manufacturer: identity.manufacturer.into(),
                model: identity.model.into(),
                version: identity.version.into(),
                serial: identity.serial.into(),
            }),
            "{id}"
        );
        let meter = sim.meter(unit).expect("sim meter");
        let served = meter.served();
        let reading = &readings[id];
        let missing = NOT_IMPLEMENTED
            .iter()
            .find(|(m, _)| *m == id)
            .map(|(_, q)| *q)
            .unwrap_or_default();
        for q in missing {
            let v = reading
                .values
                .iter()
                .find(|v| v.quantity == *q)
                .unwrap_or_else(|| panic!("{id}.{q} is listed"));
            assert_eq!(
                (v.value, v.invalid),
                (None, Some(Invalid::NotImplemented)),
                "{id}.{q}"
            );
        }
        let invalid: Vec<(&str, Option<Invalid>)> = reading
            .values
            .iter()
            .filter(|v| v.invalid.is_some())
            .map(|v| (v.quantity.as_str(), v.invalid))
            .collect();
        assert_eq!(
            snap.invalid_values,
            missing.len() as u64,
            "{id}: counted {invalid:?}"
        );
        // Every register the simulator computes comes back with its value.
        let profile = meter.profile();
        assert!(profile.registers.len() >= 10, "{id}");
        for reg in &profile.registers {
            let at = format!("{id}.{}", reg.name);
            let v = reading
                .values
                .iter()
                .find(|v| v.quantity == reg.name)
                .unwrap_or_else(|| panic!("{at}: not read"));
            assert_eq!((&v.unit, v.kind), (&reg.unit, reg.kind), "{at}");
            let got = v
                .value
                .unwrap_or_else(|| panic!("{at}: no number ({:?})", v.invalid));
            let words = u32::from(reg.data_type.words());
            let reply = served
                .iter()
                .rev()
                .find(|s| {
                    s.reply == ReplyKind::Data
                        && u32::from(s.start) <= u32::from(reg.address)
                        && u32::from(reg.address) + words <= u32::from(s.start) + u32::from(s.count)
                })
                .unwrap_or_else(|| panic!("{at}: no reply covered the register"));
            let expected = meter
                .value_at(&reg.name, reply.model_time)
                .expect("quantity of the meter");
            let tolerance = match reg.data_type {
                DataType::F32 => expected.abs() * f64::from(f32::EPSILON),
                _ => reg.scale / 2.0,
            } * (1.0 + 1e-9)
                + 1e-9;
            assert!(
                (got - expected).abs() <= tolerance,
                "{at}: read {got}, served {expected} (scale {})",
                reg.scale
            );
        }
        // Realistic figures through the scale factors.
        let value = |q: &str| {
            reading
                .values
                .iter()
                .find(|v| v.quantity == q)
                .and_then(|v| v.value)
                .unwrap_or_else(|| panic!("{id}.{q}"))
        };
        assert!((215.0..=245.0).contains(&value("voltage_l1")), "{id}");
        assert!((49.85..=50.15).contains(&value("frequency")), "{id}");
        assert!(value("power") > 0.0 && value("power") < 15_000.0, "{id}");
    }
    // Scale factors: V_SF -1 keeps decimals; the meter's W_SF +1 gives tens of W;
    // the inverter's WH_SF +1 tens of Wh.
    let value = |m: &str, q: &str| {
        readings[m]
            .values
            .iter()
            .find(|v| v.quantity == q)
            .and_then(|v| v.value)
            .unwrap_or_else(|| panic!("{m}.{q}"))
    };
    assert_eq!(value("meter", "power") % 10.0, 0.0);
    assert_eq!(value("inverter", "energy_total") % 10.0, 0.0);
    let v = value("inverter", "voltage_l1") * 10.0;
    assert!((v - v.round()).abs() < 1e-6);
    assert!((0.0..=100.0).contains(&value("inverter", "state_of_charge")));
    assert_eq!(value("inverter", "battery_max_charge_power"), 5000.0);
}

/// Acceptance (issue 17, point 2): SunSpec devices at 40000, 0 and 50000, with
/// integer (scale factor) and float models, read over Modbus TCP.
#[tokio::test]
async fn sunspec_devices_are_discovered_and_read_over_tcp() {
    let sim = sim_bus();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_tcp(listener, sim.clone(), shutdown.clone()));
    let bus = format!(
        "[[buses]]\nid = \"bus\"\ntype = \"tcp\"\naddress = \"{addr}\"\ntimeout = \"5s\"\nframe_gap = \"1ms\"\n"
    );
    read_back(&bus, &sim).await;
    shutdown.cancel();
    let stopped = timeout(WAIT, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

/// The same devices on one RTU line over a pseudo-terminal.
#[tokio::test]
async fn sunspec_devices_are_discovered_and_read_over_rtu() {
    let sim = sim_bus();
    let shutdown = CancellationToken::new();
    let (path, server) = crate::sim::rtu_pty(sim.clone(), shutdown.clone()).expect("pty");
    let bus = format!(
        "[[buses]]\nid = \"bus\"\ntype = \"rtu\"\nport = \"{}\"\nbaud_rate = 9600\ntimeout = \"2s\"\nframe_gap = \"2ms\"\n",
        path.display()
    );
    read_back(&bus, &sim).await;
    shutdown.cancel();
    let stopped = timeout(WAIT, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

/// `scan` lists the units that answer with their SunSpec models, the SDM630 as a
/// unit without the marker, and leaves out the silent unit 5.
async fn scan_lists(bus_toml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("gateway_id = \"gw\"\n{bus_toml}")).expect("write config");
    let args = super::scan::ScanArgs {
        config: path,
        bus: "bus".into(),
        units: (1, 5),
        timeout: Some(Duration::from_millis(300)),
        max_time: WAIT,
    };
    let buses = crate::config::Config::load(&args.config)
        .expect("config")
        .buses;
    let mut out = Vec::new();
    super::scan::scan(&args, &buses, &mut out)
        .await
        .expect("scans");
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "unit 1: SunSpec at 40000: Acme Solar AS-5000TL serial INV0001; models 1 (66), 103 (50), 120 (26), 64110 (8), 124 (24)",
            "unit 2: SunSpec at 0: Acme Metering AM-3P serial MTR0042; models 1 (66), 203 (105)",
            "unit 3: SunSpec at 50000: Float Power FP-10 serial F-77; models 1 (66), 113 (60)",
            "unit 4: answers; no SunSpec marker `SunS` at holding register 40000, 0 or 50000",
        ],
        "{text}"
    );
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[4].starts_with("bus bus: 4 of units 1-5 answered"),
        "{text}"
    );
    // An unknown bus is named.
    let args = super::scan::ScanArgs {
        bus: "nope".into(),
        ..args
    };
    let e = super::scan::scan(&args, &buses, &mut Vec::new())
        .await
        .expect_err("no such bus");
    assert!(e.to_string().contains("--bus: no bus `nope`"), "{e}");
}

#[tokio::test]
async fn scan_lists_units_and_sunspec_models_over_tcp() {
    let sim = sim_bus();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_tcp(listener, sim.clone(), shutdown.clone()));
    scan_lists(&format!(
        "[[buses]]\nid = \"bus\"\ntype = \"tcp\"\naddress = \"{addr}\"\n"
    ))
    .await;
    shutdown.cancel();
    let _ = timeout(WAIT, server).await;
}

#[tokio::test]
async fn scan_lists_units_and_sunspec_models_over_rtu() {
    let sim = sim_bus();
    let shutdown = CancellationToken::new();
    let (path, server) = crate::sim::rtu_pty(sim.clone(), shutdown.clone()).expect("pty");
    scan_lists(&format!(
        "[[buses]]\nid = \"bus\"\ntype = \"rtu\"\nport = \"{}\"\nbaud_rate = 9600\n",
        path.display()
    ))
    .await;
    shutdown.cancel();
    let _ = timeout(WAIT, server).await;
}

/// The holding registers of a simulated device from 0 to the end of its chain.
fn holding_image(meter: &SimMeter, end: u16) -> super::test_server::Image {
    let mut holding = Vec::with_capacity(usize::from(end));
    let mut at = 0u16;
    while at < end {
        let n = (end - at).min(125);
        // Past the device's last register: zeros.
        holding.extend(
            meter
                .read(crate::acquire::config::RegisterTable::Holding, at, n)
                .unwrap_or_else(|_| vec![0; usize::from(n)]),
        );
        at += n;
    }
    super::test_server::Image {
        input: Vec::new(),
        holding,
    }
}

/// A device whose chain changes (replaced by another at the same unit id) fails
/// one poll, is discovered again and read with its new models and identity.
#[tokio::test]
async fn a_changed_chain_is_discovered_again() {
    use super::test_server::{TestServer, Unit};
    let meter = device(40000, &METER, &[203], 1);
    let battery = device(40000, &INVERTER, &[124], 2);
    // Marker, common model (68), 203 (107) or 124 (26), end (2).
    let server = TestServer::start(holding_image(&meter, 40200), &[(1, Unit::Serve)]).await;
    let text = format!(
        "gateway_id = \"gw\"\n[[buses]]\nid = \"bus\"\ntype = \"tcp\"\naddress = \"{}\"\ntimeout = \"5s\"\nframe_gap = \"1ms\"\n\
         [[meters]]\nid = \"dev\"\nbus = \"bus\"\nunit_id = 1\nprofile = \"sunspec\"\ninterval = \"50ms\"\n",
        server.addr
    );
    let config = Config::from_toml(&text).expect("config parses");
    let (bus, plans) = plan_meters(&config).expect("plans").remove(0);
    let stats = plans[0].stats.clone();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, plans, tx, shutdown.clone()));
    let has = |r: &Reading, q: &str| {
        r.values
            .iter()
            .any(|v| v.quantity == q && v.value.is_some())
    };
    let first = timeout(WAIT, rx.recv())
        .await
        .expect("a reading")
        .expect("running");
    assert!(has(&first, "energy_import"), "{first:?}");
    assert_eq!(stats.identity().map(|i| i.serial), Some("MTR0042".into()));

    server.set_image(holding_image(&battery, 40200));
    let changed = timeout(WAIT, async {
        loop {
            let r = rx.recv().await.expect("running");
            if has(&r, "state_of_charge") {
                return r;
            }
        }
    })
    .await
    .expect("a reading of the new device");
    assert!(!has(&changed, "energy_import"), "{changed:?}");
    assert_eq!(stats.identity().map(|i| i.serial), Some("INV0001".into()));
    let snap = stats.snapshot();
    assert_eq!(
        snap.decode_errors, 1,
        "the poll that found the change: {snap:?}"
    );
    shutdown.cancel();
    timeout(WAIT, task).await.expect("stops").expect("no panic");
}
