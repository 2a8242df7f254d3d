//! Late replies on an RTU line: the simulator answers some requests only after the
//! agent's timeout. The answer then arrives while the agent is (or would be) waiting
//! for the next request's reply; no reading may ever carry another request's registers.
//!
//! Late replies over Modbus TCP: the simulator, like a TCP-to-RTU gateway, hands a
//! reply it held back to the connection the agent opened after its timeout. No
//! reading may ever carry the held (stale) values.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use edge_agent::acquire::{self, profile};
use edge_agent::config::{Config, RegisterTable};
use edge_agent::model::Reading;
use edge_agent::sim::{self, ReplyKind, SimBus, SimMeter};
use edge_agent::testkit;
use edge_agent_tests::f32_from_words;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Two single-register blocks of the same size, far apart, with values in disjoint
/// ranges (~230 V and ~50 Hz): a reply given to the wrong request would be visible.
const CONFIG: &str = r#"
gateway_id = "late"
[[buses]]
id = "rs485"
type = "rtu"
port = "PTY"
timeout = "150ms"
frame_gap = "5ms"
[[meters]]
id = "m"
bus = "rs485"
unit_id = 3
profile = "twin"
interval = "30ms"
max_registers_per_request = 10
[profiles.twin]
registers = [
  { name = "voltage", address = 0, type = "f32", unit = "V", kind = "voltage", min = 0, max = 500 },
  { name = "frequency", address = 200, type = "f32", unit = "Hz", kind = "frequency", min = 40, max = 70 },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_is_never_taken_as_the_next_answer() {
    let sims = CancellationToken::new();
    let placeholder = Config::from_toml(CONFIG).expect("config parses");
    let twin = profile::resolve(&placeholder, "twin").expect("user map");
    let meter = Arc::new(SimMeter::new(twin, 5));
    let (pty, _server) = sim::rtu_pty(
        Arc::new(SimBus::new().with_meter(3, meter.clone())),
        sims.clone(),
    )
    .expect("pty pair");
    let config = Config::from_toml(&CONFIG.replace("PTY", &pty.display().to_string()))
        .expect("config parses");
    config.validate().expect("valid");
    let mut plans = acquire::plan_meters(&config).expect("plan");
    let (bus, meters) = plans.remove(0);
    assert_eq!(meters[0].blocks.len(), 2, "one request per register");
    let stats = meters[0].stats.clone();

    let (tx, mut rx) = mpsc::channel::<Reading>(1000);
    let stop = CancellationToken::new();
    let task = tokio::spawn(acquire::run_bus(bus, meters, tx, stop.clone()));

    // Let it poll normally, then make several replies late: each arrives ~100 ms after
    // the agent gave up on it, while the next request (for the other block) is out.
    // Then poll on until every late reply was served and ten more readings came: a
    // late reply taken for the next request would be among them.
    let mut readings = Vec::new();
    let mut drain = |readings: &mut Vec<Reading>| {
        while let Ok(r) = rx.try_recv() {
            readings.push(r);
        }
    };
    let limit = Duration::from_secs(60);
    testkit::wait_until("a first reading", limit, || {
        drain(&mut readings);
        !readings.is_empty()
    })
    .await;
    meter.faults().late_reply(Duration::from_millis(250), 4);
    let mut after_faults = None;
    testkit::wait_until("the late replies served, then ten readings", limit, || {
        drain(&mut readings);
        if after_faults.is_none() && meter.stats().late >= 4 {
            after_faults = Some(readings.len());
        }
        after_faults.is_some_and(|n| readings.len() >= n + 10)
    })
    .await;
    stop.cancel();
    task.await.expect("bus task");
    sims.cancel();
    drain(&mut readings);

    let snapshot = stats.snapshot();
    assert!(
        snapshot.timeouts >= 4,
        "late replies counted as timeouts: {snapshot:?}"
    );

    // Every value must be one the simulator served *for that address*.
    let mut served: HashMap<u16, HashSet<u32>> = HashMap::new();
    for s in meter.served() {
        if matches!(s.reply, ReplyKind::Data) && s.table == Some(RegisterTable::Input) {
            served
                .entry(s.start)
                .or_default()
                .insert(f32_from_words(s.words[0], s.words[1]).to_bits());
        }
    }
    let late = meter.stats();
    assert!(late.late >= 4, "faults served: {late:?}");
    for r in &readings {
        for (name, address) in [("voltage", 0u16), ("frequency", 200u16)] {
            let v = r
                .values
                .iter()
                .find(|v| v.quantity == name)
                .and_then(|v| v.value)
                .unwrap_or_else(|| {
                    panic!("{name} is not a plausible number, so it came from another request's reply: {r:?}")
                });
            assert!(
                served[&address].contains(&(v as f32).to_bits()),
                "{name} = {v} at ts {} was not served at address {address}",
                r.ts_ms
            );
        }
    }
}

/// One f32 register: one request per poll, so a reply taken for the wrong request
/// becomes a stored reading at once.
const TCP_CONFIG: &str = r#"
gateway_id = "late"
[[buses]]
id = "lan"
type = "tcp"
address = "ADDRESS"
timeout = "500ms"
frame_gap = "2ms"
[[meters]]
id = "pv"
bus = "lan"
unit_id = 1
profile = "one"
interval = "50ms"
[profiles.one]
registers = [
  { name = "voltage", address = 0, type = "f32", unit = "V", kind = "voltage", min = 0, max = 500 },
]
"#;

/// Acceptance (issue 12, point 9): tokio-modbus numbers each connection's requests
/// from transaction id 0, so the reply to the first request of the old connection,
/// handed to the new one, matches the new first request unless the ids move on
/// across reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_reply_held_across_a_reconnect_is_never_stored() {
    let sims = CancellationToken::new();
    let placeholder = Config::from_toml(TCP_CONFIG).expect("config parses");
    let one = profile::resolve(&placeholder, "one").expect("user map");
    // Model time runs fast, so the held reply's value differs from later ones.
    let meter = Arc::new(SimMeter::new(one, 7).with_time_scale(600.0));
    // The very first reply is held back: its request is the first of the first
    // connection, as the agent's first request after a reconnect is.
    meter.faults().hold_for_next_connection(1);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(sim::serve_tcp(
        listener,
        Arc::new(SimBus::new().with_meter(1, meter.clone())),
        sims.clone(),
    ));
    let config = Config::from_toml(&TCP_CONFIG.replace("ADDRESS", &address.to_string()))
        .expect("config parses");
    config.validate().expect("valid");
    let mut plans = acquire::plan_meters(&config).expect("plan");
    let (bus, meters) = plans.remove(0);
    assert_eq!(meters[0].blocks.len(), 1, "one request per poll");
    let stats = meters[0].stats.clone();

    let (tx, mut rx) = mpsc::channel::<Reading>(1000);
    let stop = CancellationToken::new();
    let task = tokio::spawn(acquire::run_bus(bus, meters, tx, stop.clone()));
    let mut readings = Vec::new();
    while readings.len() < 5 {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("readings keep coming: {:?}", stats.snapshot()))
            .expect("bus task running");
        readings.push(r);
    }
    stop.cancel();
    task.await.expect("bus task");
    sims.cancel();

    let served = meter.served();
    let value_of = |s: &sim::Served| f32_from_words(s.words[0], s.words[1]).to_bits();
    let held: HashSet<u32> = served
        .iter()
        .filter(|s| s.reply == ReplyKind::Held)
        .map(value_of)
        .collect();
    let fresh: HashSet<u32> = served
        .iter()
        .filter(|s| s.reply == ReplyKind::Data)
        .map(value_of)
        .collect();
    assert_eq!(
        meter.stats().held,
        1,
        "the held reply reached the new connection"
    );
    assert!(
        held.is_disjoint(&fresh),
        "the held value was served again later"
    );
    for r in &readings {
        let v = r.values[0].value.expect("a plausible voltage");
        let bits = (v as f32).to_bits();
        assert!(
            !held.contains(&bits),
            "the held (stale) reply was stored as a reading at ts {}: {v}",
            r.ts_ms
        );
        assert!(fresh.contains(&bits), "{v} was never served");
    }
    let s = stats.snapshot();
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!((s.transport_errors, s.decode_errors), (0, 0), "{s:?}");
}

/// Two blocks far apart: one poll is two requests, so the reading's stamp can be
/// compared with the time of the first and of the last reply.
const SLOW_CONFIG: &str = r#"
gateway_id = "slow"
[[buses]]
id = "lan"
type = "tcp"
address = "ADDRESS"
timeout = "2s"
frame_gap = "0ms"
[[meters]]
id = "slow"
bus = "lan"
unit_id = 1
profile = "twin"
interval = "10s"
max_registers_per_request = 10
[profiles.twin]
registers = [
  { name = "voltage", address = 0, type = "f32", unit = "V", kind = "voltage", min = 0, max = 500 },
  { name = "frequency", address = 200, type = "f32", unit = "Hz", kind = "frequency", min = 40, max = 70 },
]
"#;

/// Acceptance (issue 14, point 5): a reading is stamped when its values were read,
/// that is when the poll's last reply arrived, not when the poll started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_meters_reading_is_stamped_when_its_last_reply_arrives() {
    let sims = CancellationToken::new();
    let placeholder = Config::from_toml(SLOW_CONFIG).expect("config parses");
    let twin = profile::resolve(&placeholder, "twin").expect("user map");
    let meter = Arc::new(SimMeter::new(twin, 9));
    // Both replies of the first poll come 300 ms late (within the 2 s timeout).
    meter.faults().late_reply(Duration::from_millis(300), 2);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(sim::serve_tcp(
        listener,
        Arc::new(SimBus::new().with_meter(1, meter.clone())),
        sims.clone(),
    ));
    let config = Config::from_toml(&SLOW_CONFIG.replace("ADDRESS", &address.to_string()))
        .expect("config parses");
    config.validate().expect("valid");
    let mut plans = acquire::plan_meters(&config).expect("plan");
    let (bus, meters) = plans.remove(0);
    assert_eq!(meters[0].blocks.len(), 2, "two requests per poll");

    let (tx, mut rx) = mpsc::channel::<Reading>(10);
    let stop = CancellationToken::new();
    let before = edge_agent::model::now_ms();
    let task = tokio::spawn(acquire::run_bus(bus, meters, tx, stop.clone()));
    let reading = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a reading within 20 s")
        .expect("bus task running");
    let after = edge_agent::model::now_ms();
    stop.cancel();
    task.await.expect("bus task");
    sims.cancel();

    let replies: Vec<i64> = meter
        .served()
        .iter()
        .filter(|s| s.reply == ReplyKind::Data)
        .map(|s| s.sent_at_ms)
        .collect();
    assert_eq!(replies.len(), 2, "one poll of two late replies");
    let last_reply = replies[1];
    assert!(
        last_reply - before >= 600,
        "two replies of 300 ms each: poll started {before}, last reply {last_reply}"
    );
    // Stamped when the last reply arrived (the same wall clock; the simulator notes
    // the time just after its write, hence the small slack), and before the test saw
    // the reading. A stamp from the poll's start would be >= 600 ms early.
    assert!(
        reading.ts_ms >= last_reply - 50 && reading.ts_ms <= after,
        "reading stamped {} but the last reply was sent at {last_reply} (poll started {before})",
        reading.ts_ms
    );
}
