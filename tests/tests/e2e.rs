//! End to end: a simulated SDM630 on Modbus TCP and a simulated SDM120 on Modbus RTU
//! over a pty pair → the agent → its store → the embedded broker. Subscribers (rumqttc
//! and the third-party `mosquitto_sub`) must receive exactly the values the simulator
//! served, bit for bit after f32 decoding, with increasing sequence numbers.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::acquire::profile;
use edge_agent::config::{Config, RegisterTable, StoreConfig};
use edge_agent::sim::{self, ReplyKind, SimBus, SimMeter};
use edge_agent::store::{self, Store};
use edge_agent_tests::{f32_from_words, free_port, states_per_meter, Subscriber};
use tokio_util::sync::CancellationToken;

/// For every register address of a meter, the f32 bit patterns the simulator served.
fn served_f32s(meter: &SimMeter) -> HashMap<u16, HashSet<u32>> {
    let mut by_address: HashMap<u16, HashSet<u32>> = HashMap::new();
    for s in meter.served() {
        if s.reply != ReplyKind::Data || s.table != Some(RegisterTable::Input) {
            continue;
        }
        for r in &meter.profile().registers {
            let offset = r.address.wrapping_sub(s.start) as usize;
            if r.address >= s.start && offset + 1 < s.words.len() {
                let v = f32_from_words(s.words[offset], s.words[offset + 1]);
                by_address.entry(r.address).or_default().insert(v.to_bits());
            }
        }
    }
    by_address
}

/// Checks that each value in a state document is one the simulator served for that
/// register, bit-exact; returns how many values were checked.
fn assert_served(doc: &serde_json::Value, meter: &SimMeter) -> usize {
    let served = served_f32s(meter);
    let mut checked = 0;
    let values = doc["values"].as_object().expect("values object");
    for r in &meter.profile().registers {
        let entry = &values[&r.name];
        assert_eq!(entry["unit"], r.unit.as_str(), "unit of {}", r.name);
        let Some(v) = entry["value"].as_f64() else {
            panic!("{}: no value in {doc}", r.name);
        };
        let bits = (v as f32).to_bits();
        let options = served.get(&r.address).cloned().unwrap_or_default();
        assert!(
            options.contains(&bits),
            "{}: published {v} was never served at address {} ({} served values)",
            r.name,
            r.address,
            options.len()
        );
        checked += 1;
    }
    checked
}

struct Rig {
    config: Config,
    sdm630: Arc<SimMeter>,
    sdm120: Arc<SimMeter>,
    sims: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn rig(gateway: &str) -> Rig {
    let sims = CancellationToken::new();
    let sdm630 = Arc::new(SimMeter::new(
        Arc::new(profile::builtin("sdm630").expect("sdm630")),
        21,
    ));
    let sdm120 = Arc::new(SimMeter::new(
        Arc::new(profile::builtin("sdm120").expect("sdm120")),
        22,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let tcp = listener.local_addr().expect("addr");
    tokio::spawn(sim::serve_tcp(
        listener,
        Arc::new(SimBus::new().with_meter(1, sdm630.clone())),
        sims.clone(),
    ));
    let (pty, _server) = sim::rtu_pty(
        Arc::new(SimBus::new().with_meter(7, sdm120.clone())),
        sims.clone(),
    )
    .expect("pty pair");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        r#"
gateway_id = "{gateway}"
[store]
path = "{store}"
flush_interval = "50ms"
[mqtt]
listen = "127.0.0.1:{port}"
[[buses]]
id = "lan"
type = "tcp"
address = "{tcp}"
[[buses]]
id = "rs485"
type = "rtu"
port = "{pty}"
baud_rate = 19200
[[meters]]
id = "grid"
bus = "lan"
unit_id = 1
profile = "sdm630"
interval = "200ms"
[[meters]]
id = "boiler"
bus = "rs485"
unit_id = 7
profile = "sdm120"
interval = "200ms"
"#,
        store = dir.path().join("store").display(),
        port = free_port(),
        pty = pty.display(),
    );
    let config = Config::from_toml(&text).expect("config parses");
    config.validate().expect("config valid");
    Rig {
        config,
        sdm630,
        sdm120,
        sims,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_values_arrive_bit_exact_with_increasing_seq() {
    let rig = rig("e2e").await;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(rig.config.clone(), shutdown.clone()));
    let addr = rig.config.mqtt.listen;
    let mut sub = Subscriber::connect(addr, "edge/e2e/+/state", Duration::from_secs(10)).await;
    let messages = sub
        .collect_until(Duration::from_secs(30), |seen| {
            let live: Vec<_> = seen.iter().filter(|m| !m.retain).cloned().collect();
            let c = states_per_meter(&live);
            c.get("grid").copied().unwrap_or(0) >= 5 && c.get("boiler").copied().unwrap_or(0) >= 5
        })
        .await;
    let live: Vec<_> = messages.into_iter().filter(|m| !m.retain).collect();
    let counts = states_per_meter(&live);
    assert!(counts.get("grid").copied().unwrap_or(0) >= 5, "{counts:?}");
    assert!(
        counts.get("boiler").copied().unwrap_or(0) >= 5,
        "{counts:?}"
    );

    let mut last_seq = 0;
    let mut checked = 0;
    for m in &live {
        let doc = m.json();
        let seq = doc["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        let meter = match doc["meter"].as_str() {
            Some("grid") => &rig.sdm630,
            Some("boiler") => &rig.sdm120,
            other => panic!("unexpected meter {other:?}"),
        };
        assert_eq!(
            m.topic,
            format!("edge/e2e/{}/state", doc["meter"].as_str().unwrap_or(""))
        );
        checked += assert_served(&doc, meter);
    }
    assert!(checked >= 5 * 14 + 5 * 8, "checked {checked} values");

    shutdown.cancel();
    agent
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
    rig.sims.cancel();

    // Everything published was durable: the store holds it, CRCs valid, no gaps.
    let store = Store::open(&StoreConfig {
        path: rig.config.store.path.clone(),
        ..StoreConfig::default()
    })
    .expect("reopen store");
    let report = store::verify(&store).expect("verify");
    assert_eq!(report.quarantined, 0);
    assert!(report.gaps.is_empty(), "{report:?}");
    assert!(store.last_seq() >= last_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_reads_retained_state_and_status() {
    let rig = rig("e2e-mosq").await;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(rig.config.clone(), shutdown.clone()));
    let addr = rig.config.mqtt.listen;
    // Wait until both meters have published state, so the retained copies exist.
    let mut sub = Subscriber::connect(addr, "edge/e2e-mosq/+/state", Duration::from_secs(10)).await;
    let seen = sub
        .collect_until(Duration::from_secs(20), |seen| {
            let c = states_per_meter(seen);
            c.contains_key("grid") && c.contains_key("boiler")
        })
        .await;
    assert_eq!(states_per_meter(&seen).len(), 2);

    // A third-party client: mosquitto_sub gets the retained status and both states.
    let port = addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-v", "-W", "10", "-C", "3"])
            .args(["-t", "edge/e2e-mosq/status", "-t", "edge/e2e-mosq/+/state"])
            .output()
    })
    .await
    .expect("join")
    .expect("mosquitto_sub runs (apt-get install mosquitto-clients)");
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut meters = HashSet::new();
    let mut status = None;
    for line in text.lines() {
        let (topic, payload) = line.split_once(' ').expect("-v prints topic and payload");
        if topic == "edge/e2e-mosq/status" {
            status = Some(payload.to_string());
            continue;
        }
        let doc: serde_json::Value = serde_json::from_str(payload).expect("state is JSON");
        let meter = doc["meter"].as_str().expect("meter").to_string();
        let sim = if meter == "grid" {
            &rig.sdm630
        } else {
            &rig.sdm120
        };
        assert_served(&doc, sim);
        meters.insert(meter);
    }
    assert_eq!(status.as_deref(), Some("online"));
    assert_eq!(
        meters,
        HashSet::from(["grid".to_string(), "boiler".to_string()])
    );

    shutdown.cancel();
    agent.await.expect("agent task").expect("clean stop");
    rig.sims.cancel();
}
