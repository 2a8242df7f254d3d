//! Home Assistant MQTT discovery on the embedded broker, seen by a real MQTT client
//! subscribed to `homeassistant/#`: one retained config per meter quantity with the
//! keys Home Assistant needs, sent again after `online` on `homeassistant/status`,
//! none when switched off.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::acquire::profile;
use edge_agent::config::Config;
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent_tests::homeassistant::HomeAssistant;
use edge_agent_tests::{free_port, loopback, Message, Subscriber};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

const GW: &str = "ha-gw";

struct Agent {
    /// The simulated SDM120 the agent polls as `heat`.
    heat: Arc<SimMeter>,
    mqtt: SocketAddr,
    http: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

/// An agent polling one simulated SDM120 (`heat`) over Modbus TCP.
async fn start(discovery: bool, sims: &CancellationToken) -> Agent {
    start_with(discovery, sims, "").await
}

/// [`start`] with more config TOML (tables) at the end.
async fn start_with(discovery: bool, sims: &CancellationToken, extra: &str) -> Agent {
    let heat = Arc::new(SimMeter::new(
        Arc::new(profile::builtin("sdm120").expect("profile")),
        1,
    ));
    let bus = SimBus::new().with_meter(1, heat.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let tcp = listener.local_addr().expect("addr");
    tokio::spawn(sim::serve_tcp(listener, Arc::new(bus), sims.clone()));
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, http) = (free_port(), free_port());
    let text = format!(
        r#"
gateway_id = "{GW}"
[store]
path = "{store}"
flush_interval = "50ms"
[mqtt]
listen = "127.0.0.1:{mqtt}"
homeassistant_discovery = {discovery}
[http]
listen = "127.0.0.1:{http}"
[[buses]]
id = "lan"
type = "tcp"
address = "{tcp}"
frame_gap = "0ms"
[[meters]]
id = "heat"
bus = "lan"
unit_id = 1
profile = "sdm120"
interval = "200ms"
{extra}
"#,
        store = dir.path().join("store").display(),
    );
    let config = Config::from_toml(&text).expect("config parses");
    config.validate().expect("config valid");
    let stop = CancellationToken::new();
    let task = tokio::spawn(edge_agent::run(config, stop.clone()));
    let ready = edge_agent_tests::wait_ready(loopback(http), Duration::from_secs(10)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    Agent {
        heat,
        mqtt: loopback(mqtt),
        http: loopback(http),
        stop,
        task,
        _dir: dir,
    }
}

impl Agent {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
            .expect("agent ran cleanly");
    }
}

fn configs(messages: &[Message]) -> Vec<&Message> {
    messages
        .iter()
        .filter(|m| m.topic.ends_with("/config"))
        .collect()
}

fn sensor_configs(messages: &[Message]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in configs(messages) {
        if m.topic.starts_with("homeassistant/sensor/") {
            *counts.entry(m.topic.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// Checks a sensor config has every key Home Assistant needs, with our topics.
fn check_sensor(m: &Message, quantity: &str, unit: &str) {
    let c = m.json();
    assert!(c.is_object(), "{}: not JSON", m.topic);
    assert_eq!(c["state_topic"], format!("edge/{GW}/heat/state"), "{c}");
    let template = c["value_template"].as_str().expect("value_template");
    assert!(template.contains(&format!("\"{quantity}\"")), "{template}");
    assert_eq!(c["availability_mode"], "all", "{c}");
    assert_eq!(c["availability"][0]["topic"], format!("edge/{GW}/status"));
    assert_eq!(
        c["availability"][1]["topic"],
        format!("edge/{GW}/heat/availability")
    );
    assert_eq!(c["availability"][1]["payload_available"], "online");
    assert_eq!(c["availability"][1]["payload_not_available"], "offline");
    assert_eq!(c["unique_id"], format!("edge-agent.{GW}.heat.{quantity}"));
    assert!(c["name"].as_str().is_some_and(|n| !n.is_empty()));
    if unit.is_empty() {
        assert!(c.get("unit_of_measurement").is_none(), "{c}");
    } else {
        assert_eq!(c["unit_of_measurement"], unit, "{c}");
    }
    let device = &c["device"];
    assert_eq!(device["identifiers"][0], format!("edge-agent.{GW}.heat"));
    assert_eq!(device["manufacturer"], "Eastron");
    assert_eq!(device["model"], "SDM120");
    assert_eq!(device["name"], format!("{GW} heat"));
    assert_eq!(device["via_device"], format!("edge-agent.{GW}"));
    assert_eq!(c["origin"]["name"], "edge-agent");
    assert_eq!(c["origin"]["sw_version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_quantity_is_discovered_and_sent_again_when_home_assistant_comes_online() {
    let sims = CancellationToken::new();
    let agent = start(true, &sims).await;
    let sdm120 = profile::builtin("sdm120").expect("profile");
    let quantities = sdm120.registers.len();
    let mut ha = Subscriber::connect(agent.mqtt, "homeassistant/#", Duration::from_secs(10)).await;

    // Retained: a client subscribing after the start gets every config once.
    let first = ha
        .collect_until(Duration::from_secs(10), |seen| {
            sensor_configs(seen).len() == quantities
                && configs(seen)
                    .iter()
                    .any(|m| m.topic.contains("/binary_sensor/"))
        })
        .await;
    // Anything more that comes in a short while would be a duplicate.
    let mut all = first.clone();
    all.extend(
        ha.collect_until(Duration::from_millis(700), |_| false)
            .await,
    );
    let sensors = sensor_configs(&all);
    assert_eq!(sensors.len(), quantities, "{:?}", sensors.keys());
    assert!(
        sensors.values().all(|&n| n == 1),
        "each config exactly once: {sensors:?}"
    );
    // Retained: a client that subscribes once they are out gets them all from the
    // broker's store, flagged retained (the first client may have been subscribed
    // before they went out and got them live, unflagged).
    let mut late =
        Subscriber::connect(agent.mqtt, "homeassistant/#", Duration::from_secs(10)).await;
    let stored = late
        .collect_until(Duration::from_secs(10), |seen| {
            sensor_configs(seen).len() == quantities
        })
        .await;
    assert_eq!(
        sensor_configs(&stored).len(),
        quantities,
        "retained configs"
    );
    assert!(
        configs(&stored).iter().all(|m| m.retain),
        "configs are retained"
    );
    for register in &sdm120.registers {
        let topic = format!("homeassistant/sensor/{GW}/heat_{}/config", register.name);
        let m = all
            .iter()
            .find(|m| m.topic == topic)
            .unwrap_or_else(|| panic!("no config on {topic}"));
        check_sensor(m, &register.name, &register.unit);
    }
    let classes = |q: &str| {
        let topic = format!("homeassistant/sensor/{GW}/heat_{q}/config");
        let c = all
            .iter()
            .find(|m| m.topic == topic)
            .map(Message::json)
            .unwrap_or_default();
        (c["device_class"].clone(), c["state_class"].clone())
    };
    assert_eq!(
        classes("energy_import"),
        ("energy".into(), "total_increasing".into())
    );
    assert_eq!(
        classes("energy_total"),
        ("energy".into(), "total_increasing".into())
    );
    assert_eq!(classes("power"), ("power".into(), "measurement".into()));
    assert_eq!(classes("voltage"), ("voltage".into(), "measurement".into()));
    let precision = |q: &str| {
        let topic = format!("homeassistant/sensor/{GW}/heat_{q}/config");
        all.iter()
            .find(|m| m.topic == topic)
            .map(|m| m.json()["suggested_display_precision"].clone())
            .unwrap_or_default()
    };
    for (q, p) in [
        ("voltage", 1),
        ("current", 2),
        ("power", 0),
        ("energy_total", 3),
        ("frequency", 2),
        ("power_factor", 2),
    ] {
        assert_eq!(precision(q), p, "suggested_display_precision of {q}");
    }
    let gateway = all
        .iter()
        .find(|m| m.topic == format!("homeassistant/binary_sensor/{GW}/gateway/config"))
        .map(Message::json)
        .expect("gateway config");
    assert_eq!(gateway["state_topic"], format!("edge/{GW}/status"));
    assert_eq!(
        gateway["device"]["identifiers"][0],
        format!("edge-agent.{GW}")
    );
    println!(
        "discovery: {} sensor configs and the gateway, each once",
        sensors.len()
    );

    // Home Assistant's birth message: everything again.
    ha.client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
        .await
        .expect("publish online");
    let again = ha
        .collect_until(Duration::from_secs(10), |seen| {
            sensor_configs(seen).len() == quantities
                && configs(seen)
                    .iter()
                    .any(|m| m.topic.contains("/binary_sensor/"))
        })
        .await;
    let resent = sensor_configs(&again);
    assert_eq!(
        resent.len(),
        quantities,
        "sent again after online: {resent:?}"
    );
    for m in configs(&again) {
        let before = all
            .iter()
            .find(|b| b.topic == m.topic)
            .expect("same topics");
        assert_eq!(m.json(), before.json(), "{}", m.topic);
    }
    println!(
        "after `online` on homeassistant/status: {} configs again",
        resent.len()
    );

    // A pushed meter is announced when its first reading is stored.
    let now = edge_agent::model::now_ms();
    let body = format!(
        r#"{{"meter":"pv","unit":"kW","kind":"power","points":[{{"ts":{now},"value":3.5}}]}}"#
    );
    let r = edge_agent_tests::http_request(
        agent.http,
        "POST",
        "/api/v1/ingest",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
    .expect("push");
    assert_eq!(r.status, 200, "{}", r.text());
    let pushed = ha
        .collect_until(Duration::from_secs(10), |seen| {
            seen.iter()
                .any(|m| m.topic == format!("homeassistant/sensor/{GW}/pv_power/config"))
        })
        .await;
    let pv = pushed
        .iter()
        .find(|m| m.topic == format!("homeassistant/sensor/{GW}/pv_power/config"))
        .map(Message::json)
        .expect("pushed meter announced");
    assert_eq!(pv["state_topic"], format!("edge/{GW}/pv/state"));
    assert_eq!(pv["unit_of_measurement"], "kW");
    assert_eq!(pv["device_class"], "power");
    assert_eq!(pv["device"]["via_device"], format!("edge-agent.{GW}"));

    agent.stop().await;
    sims.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_switched_off_publishes_nothing() {
    let sims = CancellationToken::new();
    let agent = start(false, &sims).await;
    let mut ha = Subscriber::connect(agent.mqtt, "homeassistant/#", Duration::from_secs(10)).await;
    // The agent is up and publishing: its meter's state arrives.
    let mut state = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/heat/state"),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        state.next(Duration::from_secs(10)).await.is_some(),
        "state arrives"
    );
    ha.client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
        .await
        .expect("publish online");
    let seen = ha
        .collect_until(Duration::from_millis(1500), |_| false)
        .await;
    let topics: HashSet<&str> = configs(&seen).iter().map(|m| m.topic.as_str()).collect();
    assert!(
        topics.is_empty(),
        "no discovery when switched off: {topics:?}"
    );
    // Only our own birth message came back.
    assert!(
        seen.iter().all(|m| m.topic == "homeassistant/status"),
        "{seen:?}"
    );
    agent.stop().await;
    sims.cancel();
}

/// Push one power value for `meter` over HTTP.
async fn push_power(http: SocketAddr, meter: &str, kw: f64) {
    let now = edge_agent::model::now_ms();
    let body = format!(
        r#"{{"meter":"{meter}","unit":"kW","kind":"power","points":[{{"ts":{now},"value":{kw}}}]}}"#
    );
    let r = edge_agent_tests::http_request(
        http,
        "POST",
        "/api/v1/ingest",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
    .expect("push");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Home Assistant subscribes the availability topic again for every new entity on
/// its one connection: a meter first seen while it is connected must become
/// available through the broker's retained replay, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_discovered_at_runtime_becomes_available_without_a_reconnect() {
    let sims = CancellationToken::new();
    let agent = start(true, &sims).await;
    let mut ha = HomeAssistant::connect(agent.mqtt).await;
    let quantities = profile::builtin("sdm120").expect("profile").registers.len();
    let heat_voltage = format!("edge-agent.{GW}.heat.voltage");
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.entities.len() == quantities + 1
                && ha.entities.values().all(|e| e.available())
                && ha
                    .shown(&heat_voltage)
                    .is_some_and(|s| s.parse::<f64>().is_ok())
        })
        .await;
    assert!(ok, "the polled meter's entities:\n{}", ha.describe());
    assert!(
        ha.subscribes[&format!("edge/{GW}/status")] > 1,
        "every entity subscribes the status topic"
    );

    // A pushed meter first seen now: its entity is created, subscribes the status
    // topic the connection already holds, and must get the retained `online`.
    push_power(agent.http, "pv", 3.5).await;
    let pv_power = format!("edge-agent.{GW}.pv.power");
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.shown(&pv_power).as_deref() == Some("3.5")
        })
        .await;
    assert!(ok, "the pushed meter's entity:\n{}", ha.describe());
    agent.stop().await;
    sims.cancel();
}

/// Per-meter availability with `availability_mode: all`: a polled meter that stops
/// answering turns unavailable in Home Assistant after `availability.failed_polls`
/// failed polls while the gateway stays online, and comes back with its next good
/// poll; a pushed meter turns unavailable after `availability.push_timeout` without
/// data and comes back with its next push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_meter_becomes_unavailable_and_returns() {
    let sims = CancellationToken::new();
    let agent = start_with(
        true,
        &sims,
        "[availability]\nfailed_polls = 2\npush_timeout = \"3s\"\n",
    )
    .await;
    let mut ha = HomeAssistant::connect(agent.mqtt).await;
    let voltage = format!("edge-agent.{GW}.heat.voltage");
    let online = format!("edge-agent.{GW}.online");
    let numeric =
        |ha: &HomeAssistant, id: &str| ha.shown(id).is_some_and(|s| s.parse::<f64>().is_ok());
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| numeric(ha, &voltage))
        .await;
    assert!(ok, "heat is available:\n{}", ha.describe());
    let mut availability = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/heat/availability"),
        Duration::from_secs(10),
    )
    .await;
    let m = availability
        .next(Duration::from_secs(10))
        .await
        .expect("retained availability");
    assert_eq!((m.payload.as_slice(), m.retain), (&b"online"[..], true));

    agent.heat.faults().silence(true);
    let ok = ha
        .run_until(Duration::from_secs(30), |ha| {
            ha.shown(&voltage).as_deref() == Some("unavailable")
        })
        .await;
    assert!(ok, "a silent meter turns unavailable:\n{}", ha.describe());
    assert_eq!(
        ha.shown(&online).as_deref(),
        Some("on"),
        "the gateway itself stays online"
    );
    let m = availability
        .next(Duration::from_secs(10))
        .await
        .expect("offline");
    assert_eq!(m.payload, b"offline");

    agent.heat.faults().silence(false);
    let ok = ha
        .run_until(Duration::from_secs(30), |ha| numeric(ha, &voltage))
        .await;
    assert!(ok, "the meter answers again:\n{}", ha.describe());

    // A pushed meter: available with its push, unavailable after the timeout.
    push_power(agent.http, "pv", 3.5).await;
    let pv = format!("edge-agent.{GW}.pv.power");
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.shown(&pv).as_deref() == Some("3.5")
        })
        .await;
    assert!(ok, "the pushed meter is available:\n{}", ha.describe());
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.shown(&pv).as_deref() == Some("unavailable")
        })
        .await;
    assert!(ok, "no push for push_timeout:\n{}", ha.describe());
    push_power(agent.http, "pv", 4.25).await;
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.shown(&pv).as_deref() == Some("4.25")
        })
        .await;
    assert!(ok, "pushed again:\n{}", ha.describe());
    agent.stop().await;
    sims.cancel();
}

/// A push with only `energy_total` leaves the power Home Assistant shows as it was:
/// the retained state keeps the latest value of each quantity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_push_does_not_blank_the_other_quantities() {
    let sims = CancellationToken::new();
    let agent = start(true, &sims).await;
    let mut ha = HomeAssistant::connect(agent.mqtt).await;
    let now = edge_agent::model::now_ms();
    let push = |body: String| async move {
        let r = edge_agent_tests::http_request(
            agent.http,
            "POST",
            "/api/v1/ingest",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
        .expect("push");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    push(format!(
        r#"{{"meter":"hp","unit":"kW","kind":"power","points":[{{"ts":{now},"value":3.1}}]}}"#
    ))
    .await;
    push(format!(
        r#"{{"meter":"hp","unit":"kWh","kind":"energy_total","points":[{{"ts":{},"value":1200.5}}]}}"#,
        now + 1000
    ))
    .await;
    let power = format!("edge-agent.{GW}.hp.power");
    let energy = format!("edge-agent.{GW}.hp.energy_total");
    let ok = ha
        .run_until(Duration::from_secs(20), |ha| {
            ha.shown(&energy).as_deref() == Some("1200.5")
        })
        .await;
    assert!(ok, "energy shown:\n{}", ha.describe());
    assert_eq!(
        ha.shown(&power).as_deref(),
        Some("3.1"),
        "power kept:\n{}",
        ha.describe()
    );
    // The retained document carries both, each with its own timestamp.
    let mut state = Subscriber::connect(
        agent.mqtt,
        &format!("edge/{GW}/hp/state"),
        Duration::from_secs(10),
    )
    .await;
    let doc = state
        .next(Duration::from_secs(10))
        .await
        .expect("retained state")
        .json();
    assert_eq!(doc["values"]["power"]["value"], 3.1, "{doc}");
    assert_eq!(doc["values"]["power"]["ts_ms"], now);
    assert_eq!(doc["values"]["energy_total"]["ts_ms"], now + 1000);
    assert_eq!(doc["ts_ms"], now + 1000);
    agent.stop().await;
    sims.cancel();
}
