//! The embedded broker against hostile LAN clients, over real sockets: a connection
//! flood (the agent in a child process, where rumqttd's panic used to abort it), spoofed
//! publishes on the agent's topics, and clients that take the agent's client ids.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent::broker::rfc3339_ms;
use edge_agent::model::now_ms;
use edge_agent_tests::{
    free_port, http_get, loopback, poll_until, push_agent_toml, wait_ready, InProcessAgent,
    Message, Subscriber,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

const GW: &str = "broker-gw";

fn agent_toml(store: &Path, mqtt: u16, http: u16) -> String {
    push_agent_toml(GW, store, mqtt, http, "", "")
}

/// An agent without meters (readings arrive by MQTT push), discovery on.
async fn start_agent(store: &Path) -> InProcessAgent {
    // Port 0: the agent serves the listener InProcessAgent binds.
    InProcessAgent::start(&agent_toml(store, free_port(), 0)).await
}

/// A client with `id` that keeps reconnecting on its own (as rumqttc does when its
/// event loop is polled after an error); counts its ConnAcks.
fn client(
    addr: SocketAddr,
    id: &str,
    will: Option<LastWill>,
) -> (
    AsyncClient,
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<u32>,
) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some(will) = will {
        opts.set_last_will(will);
    }
    let (client, mut events) = AsyncClient::new(opts, 64);
    let (acks_tx, acks) = tokio::sync::watch::channel(0u32);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    if a.code == rumqttc::ConnectReturnCode::Success {
                        acks_tx.send_modify(|n| *n += 1);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (client, task, acks)
}

/// The retained message on `topic` a new subscriber gets, if any within `wait`.
async fn retained(addr: SocketAddr, topic: &str, wait: Duration) -> Option<Message> {
    let mut sub = Subscriber::connect(addr, topic, Duration::from_secs(5)).await;
    let got = sub.next(wait).await;
    let _ = sub.client.disconnect().await;
    got
}

/// Values of `quantity` stored for `meter`, from the readings API.
async fn stored(http: SocketAddr, meter: &str, quantity: &str, from: i64) -> Vec<f64> {
    let path = format!(
        "/api/v1/meters/{meter}/readings?start={}&end={}",
        rfc3339_ms(from),
        rfc3339_ms(now_ms() + 60_000)
    );
    let r = http_get(http, &path).await;
    if r.status == 404 {
        return Vec::new();
    }
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()["readings"]
        .as_array()
        .expect("readings")
        .iter()
        .flat_map(|reading| {
            reading["values"]
                .as_array()
                .expect("values")
                .iter()
                .filter(|v| v["quantity"] == quantity)
                .filter_map(|v| v["value"].as_f64())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Sends an MQTT 3.1.1 CONNECT with `client_id` on a new connection and waits
/// (bounded) for the broker's answer: a CONNACK, or the connection closed.
async fn raw_connect(addr: SocketAddr, client_id: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = client_id.as_bytes();
    let mut packet = vec![0x10, (12 + id.len()) as u8];
    // Protocol name, level 4, clean session, keep-alive 60 s, then the client id.
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id);
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return; // refused at once: an answer too
    };
    if stream.write_all(&packet).await.is_err() {
        return;
    }
    let mut answer = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
    assert!(
        read.is_ok(),
        "no CONNACK and no close for {client_id} within 5 s"
    );
}

fn push_body(ts_ms: i64, value: u32) -> String {
    format!(
        r#"{{"unit":"W","kind":"power","points":[{{"ts":"{}","value":{value}}}]}}"#,
        rfc3339_ms(ts_ms)
    )
}

/// Waits (bounded) until `meter` has `want` stored values of `power`.
async fn wait_stored(http: SocketAddr, meter: &str, from: i64, want: usize) -> Vec<f64> {
    poll_until(Duration::from_secs(20), || async {
        let got = stored(http, meter, "power", from).await;
        let done = got.len() >= want;
        (got, done)
    })
    .await
}

/// Issue 12, point 1: 100 clients that reconnect on their own when refused, and a
/// refused client id that connects again. rumqttd 0.20 panicked there (upstream
/// #1062) and the agent, which aborts on a panic, exited with 134. Now the listener
/// refuses beyond `mqtt.max_connections` and the agent answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_leaves_the_agent_running_and_answering() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mqtt, http) = (free_port(), free_port());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, agent_toml(&dir.path().join("store"), mqtt, http)).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let (http, mqtt) = (loopback(http), loopback(mqtt));
    let ready = wait_ready(http, Duration::from_secs(20)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    // More clients than the router's 64 connections, each reconnecting when refused.
    let flood: Vec<_> = (0..100)
        .map(|i| client(mqtt, &format!("flood-{i}"), None))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(
            child.try_wait().expect("child status").is_none(),
            "the agent exited during the flood: {:?}",
            child.try_wait()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected: u32 = flood.iter().map(|(_, _, acks)| *acks.borrow()).sum();
    println!("flood: {connected} ConnAcks for 100 reconnecting clients");
    assert!(connected > 0, "nobody got in");
    // A refused id that connects twice more while the listener is still full.
    for _ in 0..2 {
        raw_connect(mqtt, "flood-99").await;
    }
    assert!(
        child.try_wait().expect("child status").is_none(),
        "the agent exited: {:?}",
        child.try_wait()
    );
    let status = http_get(http, "/api/v1/status").await;
    assert_eq!(status.status, 200, "{}", status.text());

    // The flood ends: the broker takes new clients and still says `online`.
    for (_, task, _) in flood {
        task.abort();
    }
    let status_topic = format!("edge/{GW}/status");
    let got = retained(mqtt, &status_topic, Duration::from_secs(10))
        .await
        .expect("retained status after the flood");
    assert_eq!(got.payload, b"online");
    assert!(child.try_wait().expect("child status").is_none());
    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 12, point 4: a LAN client publishes a retained `offline` on the agent's
/// status, deletes it with an empty retained message, leaves an `offline` will,
/// overwrites a meter's state and replaces a discovery config. A subscriber that comes
/// later still sees the agent's own messages, and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_publishes_on_the_agents_topics_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store")).await;
    let status = format!("edge/{GW}/status");
    let state = format!("edge/{GW}/boiler/state");
    let config = format!("homeassistant/sensor/{GW}/boiler_power/config");

    // The agent's own state and discovery config for a pushed meter.
    let (pusher, pump, _) = client(agent.mqtt, "pusher", None);
    let t0 = now_ms() - 10_000;
    pusher
        .publish(
            format!("edge/{GW}/ingest/boiler"),
            QoS::AtLeastOnce,
            false,
            push_body(t0, 800),
        )
        .await
        .expect("publish");
    assert_eq!(wait_stored(agent.http, "boiler", t0, 1).await, vec![800.0]);
    let (agent_state, agent_config) = poll_until(Duration::from_secs(10), || async {
        let s = retained(agent.mqtt, &state, Duration::from_millis(500)).await;
        let c = retained(agent.mqtt, &config, Duration::from_millis(500)).await;
        let both = s.zip(c).map(|(s, c)| (s.payload, c.payload));
        let done = both.is_some();
        (both, done)
    })
    .await
    .expect("no state or discovery config");

    // The spoofs, each acknowledged (QoS 1) by the broker.
    let will = LastWill::new(&status, "offline", QoS::AtLeastOnce, true);
    let (spoofer, spoof_pump, acks) = client(agent.mqtt, "spoofer", Some(will));
    let mut acks = acks;
    acks.wait_for(|n| *n > 0).await.expect("spoofer connects");
    for (topic, payload) in [
        (&status, "offline"),
        (&status, ""),
        (&state, r#"{"values":{"power":{"value":0}}}"#),
        (&config, r#"{"name":"spoofed"}"#),
    ] {
        spoofer
            .publish(topic.as_str(), QoS::AtLeastOnce, true, payload)
            .await
            .expect("publish");
    }
    // The four publishes reach the broker and are refused; then the connection drops
    // without a DISCONNECT, so the will fires and is refused as well.
    wait_refused_publishes(agent.http, 4).await;
    spoof_pump.abort();
    drop(spoofer);
    wait_refused_publishes(agent.http, 5).await;

    let got = retained(agent.mqtt, &status, Duration::from_secs(5)).await;
    assert_eq!(
        got.map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
        Some("online".to_string()),
        "the retained status must stay the agent's"
    );
    let got = retained(agent.mqtt, &state, Duration::from_secs(5))
        .await
        .expect("retained state");
    assert_eq!(got.payload, agent_state, "the state must stay the agent's");
    let got = retained(agent.mqtt, &config, Duration::from_secs(5))
        .await
        .expect("retained discovery config");
    assert_eq!(got.payload, agent_config, "the discovery config must stay");

    // Pushes and Home Assistant's birth message are still anyone's.
    pusher
        .publish(
            format!("edge/{GW}/ingest/boiler"),
            QoS::AtLeastOnce,
            false,
            push_body(t0 + 1000, 900),
        )
        .await
        .expect("publish");
    assert_eq!(
        wait_stored(agent.http, "boiler", t0, 2).await,
        vec![800.0, 900.0]
    );
    let doc = http_get(agent.http, "/api/v1/status").await.json();
    let refused = doc["broker"]["refused_publishes"].as_u64().unwrap_or(0);
    assert!(refused >= 5, "4 publishes and a will refused: {doc}");
    let metrics = http_get(agent.http, "/metrics").await.text();
    assert!(
        metrics.contains("edge_broker_refused_publishes_total"),
        "{metrics}"
    );
    pump.abort();
    agent.stop().await;
}

/// Issue 12, point 5: a client that connects with one of the agent's client ids used
/// to take the session over (pushes the broker acknowledged were never stored). Now
/// each such connection is refused and every push is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_client_ids_cannot_be_taken_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = start_agent(&dir.path().join("store")).await;
    let (pusher, pump, mut acks) = client(agent.mqtt, "pusher", None);
    acks.wait_for(|n| *n > 0).await.expect("pusher connects");
    // The ingest subscription is in place once a first push is stored.
    let t0 = now_ms() - 60_000;
    let topic = format!("edge/{GW}/ingest/heat");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        pusher
            .publish(topic.as_str(), QoS::AtLeastOnce, false, push_body(t0, 0))
            .await
            .expect("publish");
        if !wait_stored_quick(agent.http, t0).await.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "ingest never subscribed");
    }

    let ids = [
        "edge-agent".to_string(),
        format!("edge-agent-ingest-{GW}"),
        format!("edge-agent-discovery-{GW}"),
        format!("edge-agent-events-{GW}"),
    ];
    let hostile: Vec<_> = ids.iter().map(|id| client(agent.mqtt, id, None)).collect();
    for i in 1..=20u32 {
        pusher
            .publish(
                topic.as_str(),
                QoS::AtLeastOnce,
                false,
                push_body(t0 + i as i64 * 1000, i),
            )
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = wait_stored(agent.http, "heat", t0, 21).await;
    assert_eq!(got.len(), 21, "every push stored: {got:?}");
    for ((_, task, acks), id) in hostile.into_iter().zip(&ids) {
        assert_eq!(*acks.borrow(), 0, "{id} was let in");
        task.abort();
    }
    let doc = http_get(agent.http, "/api/v1/status").await.json();
    assert!(
        doc["broker"]["refused_client_ids"].as_u64().unwrap_or(0) >= 4,
        "{doc}"
    );
    pump.abort();
    agent.stop().await;
}

/// Waits (bounded) until the broker has refused `want` publishes of other clients.
async fn wait_refused_publishes(http: SocketAddr, want: u64) {
    let doc = poll_until(Duration::from_secs(10), || async {
        let doc = http_get(http, "/api/v1/status").await.json();
        let done = doc["broker"]["refused_publishes"].as_u64() >= Some(want);
        (doc, done)
    })
    .await;
    assert!(
        doc["broker"]["refused_publishes"].as_u64() >= Some(want),
        "{want} refused publishes: {doc}"
    );
}

/// The stored `power` values of `heat` from `from`, once some are there or after
/// half a second.
async fn wait_stored_quick(http: SocketAddr, from: i64) -> Vec<f64> {
    poll_until(Duration::from_millis(500), || async {
        let got = stored(http, "heat", "power", from).await;
        let done = !got.is_empty();
        (got, done)
    })
    .await
}
