//! Every built-in profile against its simulated meter, read by the agent's own bus
//! task over Modbus TCP, and a mix of profiles on one RTU line over a pty.
//!
//! The simulator builds each meter's register image from the profile (types, word
//! order, scale) and records every reply with the model time it was computed for;
//! the agent's reading must give back the simulator's value within the register's
//! resolution, for every register. The values must also be the model's realistic
//! ones (about 230 V, 50 Hz, a few A and kW): a profile whose range or unit would
//! reject them shows up here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::profile::{builtin, builtin_names};
use super::{plan_meters, run_bus};
use crate::acquire::config::{DataType, RegisterConfig};
use crate::config::Config;
use crate::model::{Kind, Reading};
use crate::sim::{serve_tcp, ReplyKind, SimBus, SimMeter};

/// Generous: the crate's tests also run under qemu.
const WAIT: Duration = Duration::from_secs(60);

/// A simulated bus with one meter per profile, unit ids from 1. Model time runs a
/// million times slower than the wall clock, so the values stand still while the
/// agent reads.
fn sim_bus(names: &[&str]) -> Arc<SimBus> {
    let mut bus = SimBus::new();
    for (i, name) in names.iter().enumerate() {
        let profile = Arc::new(builtin(name).unwrap_or_else(|| panic!("profile {name}")));
        let meter = SimMeter::new(profile, 100 + i as u64).with_time_scale(1e-6);
        bus.insert(i as u8 + 1, meter);
    }
    Arc::new(bus)
}

/// Config text of the meters, one per profile, on bus `bus`.
fn meters_toml(names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "[[meters]]\nid = \"m{i}\"\nbus = \"bus\"\nunit_id = {}\nprofile = \"{name}\"\ninterval = \"1h\"\n",
                i + 1
            )
        })
        .collect()
}

/// A value in the model's base unit (V, A, W, Hz, kWh, power factor as a fraction).
fn base(kind: Kind, unit: &str, v: f64) -> f64 {
    match (kind, unit) {
        (Kind::Power, "kW") => v * 1e3,
        (Kind::EnergyTotal, "Wh") => v / 1e3,
        (Kind::PowerFactor, "%") => v / 100.0,
        _ => v,
    }
}

/// How far a read-back value may be from the simulator's: the register's resolution.
fn tolerance(reg: &RegisterConfig, expected: f64) -> f64 {
    let rounding = match reg.data_type {
        // Half an f32 ulp, relative; f64 is exact.
        DataType::F32 => expected.abs() * f64::from(f32::EPSILON),
        DataType::F64 => expected.abs() * 4.0 * f64::EPSILON,
        _ => reg.scale.abs() / 2.0,
    };
    rounding * (1.0 + 1e-9) + 1e-9
}

/// Runs the agent's bus task until every meter gave one reading and checks each
/// value against what its simulated meter served.
async fn read_back(names: &[&str], bus_toml: &str, sim: &SimBus) {
    let text = format!("gateway_id = \"gw\"\n{bus_toml}{}", meters_toml(names));
    let config = Config::from_toml(&text).expect("config parses");
    config.validate().expect("config is valid");
    let mut buses = plan_meters(&config).expect("plans");
    assert_eq!(buses.len(), 1);
    let (bus, plans) = buses.remove(0);
    let stats: Vec<_> = plans.iter().map(|p| p.stats.clone()).collect();
    let (tx, mut rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, plans, tx, shutdown.clone()));

    let mut readings: HashMap<String, Reading> = HashMap::new();
    while readings.len() < names.len() {
        let r = timeout(WAIT, rx.recv()).await;
        let r = r
            .unwrap_or_else(|_| {
                let snaps: Vec<_> = stats.iter().map(|s| s.snapshot()).collect();
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

    for (i, name) in names.iter().enumerate() {
        let meter = sim.meter(i as u8 + 1).expect("sim meter");
        let profile = meter.profile();
        let reading = &readings[&format!("m{i}")];
        let snap = stats[i].snapshot();
        assert_eq!(
            (
                snap.timeouts,
                snap.exceptions,
                snap.transport_errors,
                snap.decode_errors
            ),
            (0, 0, 0, 0),
            "{name}: {snap:?}"
        );
        assert_eq!(reading.values.len(), profile.registers.len(), "{name}");
        let served = meter.served();
        for (reg, v) in profile.registers.iter().zip(&reading.values) {
            let at = format!("{name}.{}", reg.name);
            assert_eq!(
                (&v.quantity, &v.unit, v.kind),
                (&reg.name, &reg.unit, reg.kind),
                "{at}"
            );
            let got = v
                .value
                .unwrap_or_else(|| panic!("{at}: no number ({:?})", v.invalid));
            // The reply that carried this register, and the model time it was for.
            let words = u32::from(reg.data_type.words());
            let reply = served
                .iter()
                .rev()
                .find(|s| {
                    s.table == Some(reg.table)
                        && s.reply == ReplyKind::Data
                        && u32::from(s.start) <= u32::from(reg.address)
                        && u32::from(reg.address) + words <= u32::from(s.start) + u32::from(s.count)
                })
                .unwrap_or_else(|| panic!("{at}: no reply covered the register"));
            let expected = meter
                .value_at(&reg.name, reply.model_time)
                .expect("quantity of the meter");
            assert!(
                (got - expected).abs() <= tolerance(reg, expected),
                "{at}: read {got}, served {expected} ({:?}, {:?}, scale {})",
                reg.data_type,
                reg.word_order,
                reg.scale
            );
            // The model's realistic figures came through: the range and the unit fit.
            let b = base(reg.kind, &reg.unit, got);
            let fits = match reg.kind {
                Kind::Voltage => (215.0..=245.0).contains(&b),
                Kind::Current => b > 0.0 && b < 30.0,
                Kind::Power => b > 0.0 && b < 15_000.0,
                Kind::Frequency => (49.85..=50.15).contains(&b),
                Kind::PowerFactor => (0.79..=1.0).contains(&b),
                Kind::EnergyTotal => (0.0..1e6).contains(&b),
                Kind::EnergyDelta | Kind::Gauge => true,
            };
            assert!(
                fits,
                "{at}: {got} {} is not a realistic {:?}",
                reg.unit, reg.kind
            );
        }
    }
}

/// Acceptance (issue 17, point 1): every built-in profile's registers read back
/// through the agent's Modbus TCP client with the simulator's values, scale and word
/// order.
#[tokio::test]
async fn every_builtin_profile_reads_back_over_tcp() {
    let names: Vec<&str> = builtin_names().collect();
    assert!(names.len() >= 26, "{} profiles", names.len());
    let sim = sim_bus(&names);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_tcp(listener, sim.clone(), shutdown.clone()));
    let bus = format!(
        "[[buses]]\nid = \"bus\"\ntype = \"tcp\"\naddress = \"{addr}\"\ntimeout = \"5s\"\nframe_gap = \"1ms\"\n"
    );
    read_back(&names, &bus, &sim).await;
    shutdown.cancel();
    let stopped = timeout(WAIT, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

/// Every built-in profile over a serial line: each of them on its own unit id of one
/// RTU line over a pseudo-terminal, read back through the agent's RTU client.
#[tokio::test]
async fn every_builtin_profile_reads_back_over_rtu() {
    let names: Vec<&str> = builtin_names().collect();
    assert!(names.len() >= 26, "{} profiles", names.len());
    let sim = sim_bus(&names);
    let shutdown = CancellationToken::new();
    let (path, server) = crate::sim::rtu_pty(sim.clone(), shutdown.clone()).expect("pty");
    let bus = format!(
        "[[buses]]\nid = \"bus\"\ntype = \"rtu\"\nport = \"{}\"\nbaud_rate = 115200\ntimeout = \"2s\"\nframe_gap = \"2ms\"\n",
        path.display()
    );
    read_back(&names, &bus, &sim).await;
    shutdown.cancel();
    let stopped = timeout(WAIT, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

/// Nine different profiles (float and scaled integers, input and holding tables,
/// both word orders, 16- to 64-bit types, addresses above 0x8000) polled in turn on
/// one RTU line over a pseudo-terminal.
#[tokio::test]
async fn nine_profiles_share_one_rtu_line() {
    // The RTU benchmark's eight, and one with addresses above 0x8000.
    let names: Vec<&str> = super::bench::PROFILES
        .into_iter()
        .chain(["socomec_countis_e34_e44"])
        .collect();
    let sim = sim_bus(&names);
    let shutdown = CancellationToken::new();
    let (path, server) = crate::sim::rtu_pty(sim.clone(), shutdown.clone()).expect("pty");
    let bus = format!(
        "[[buses]]\nid = \"bus\"\ntype = \"rtu\"\nport = \"{}\"\nbaud_rate = 9600\ntimeout = \"2s\"\nframe_gap = \"2ms\"\n",
        path.display()
    );
    read_back(&names, &bus, &sim).await;
    shutdown.cancel();
    let stopped = timeout(WAIT, server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}

/// A meter whose document limits the read size (Saia ALE3: 20 registers) is planned
/// within that limit although the config allows 80; a lower configured limit wins.
#[test]
fn a_documented_read_limit_caps_the_block_plan() {
    let text = "gateway_id = \"gw\"\n[[buses]]\nid = \"bus\"\ntype = \"tcp\"\naddress = \"127.0.0.1:502\"\n\
        [[meters]]\nid = \"a\"\nbus = \"bus\"\nunit_id = 1\nprofile = \"saia_ale3\"\n\
        [[meters]]\nid = \"b\"\nbus = \"bus\"\nunit_id = 2\nprofile = \"saia_ale3\"\nmax_registers_per_request = 10\n\
        [[meters]]\nid = \"c\"\nbus = \"bus\"\nunit_id = 3\nprofile = \"sdm72dmv2\"\n";
    let config = Config::from_toml(text).expect("parses");
    config.validate().expect("valid");
    let (_, plans) = plan_meters(&config).expect("plans").remove(0);
    let profile = builtin("saia_ale3").expect("profile");
    let unlimited = super::plan::plan(&profile.registers, 80).expect("plans");
    assert!(
        unlimited.iter().any(|b| b.count > 20),
        "without the limit one read would exceed 20 registers: {unlimited:?}"
    );
    let largest = |i: usize| plans[i].blocks.iter().map(|b| b.count).max().unwrap_or(0);
    assert!(largest(0) <= 20 && largest(0) > 10, "{:?}", plans[0].blocks);
    assert!(largest(1) <= 10, "{:?}", plans[1].blocks);
    assert!(largest(2) <= 60, "{:?}", plans[2].blocks);
    for p in &plans {
        let covered: usize = p.blocks.iter().map(|b| b.registers.len()).sum();
        assert_eq!(
            covered,
            p.profile.registers.len(),
            "every register read once"
        );
    }
}
