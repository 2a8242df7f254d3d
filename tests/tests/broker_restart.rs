//! The embedded broker fails under a running agent: a panic on its router thread (with
//! the agent's panic hook installed, as `edge-agent` does), then its listener dying.
//! The agent stays up, keeps storing, counts the failures and restarts the broker, and
//! a later subscriber sees `online`, the states and the discovery configs again.
//!
//! Its own test binary: the panic hook it installs is process-wide.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::broker::{rfc3339_ms, LocalBroker};
use edge_agent::config::Config;
use edge_agent::model::now_ms;
use edge_agent_tests::{
    free_port, http_get, loopback, poll_until, push_agent_toml, wait_ready, Subscriber,
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio_util::sync::CancellationToken;

const GW: &str = "restart-gw";

/// A publisher that reconnects on its own.
fn publisher(addr: SocketAddr) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("restart-pusher", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let task = tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    (client, task)
}

/// Number of stored `power` values of `meter` since `from`.
async fn stored(http: SocketAddr, meter: &str, from: i64) -> usize {
    let path = format!(
        "/api/v1/meters/{meter}/readings?start={}&end={}",
        rfc3339_ms(from),
        rfc3339_ms(now_ms() + 60_000)
    );
    let r = http_get(http, &path).await;
    if r.status != 200 {
        return 0;
    }
    r.json()["readings"].as_array().map_or(0, |a| a.len())
}

/// Pushes one reading (retrying: the broker may be restarting, the agent's ingest
/// client reconnecting) until `want` readings of `meter` are stored.
async fn push_until_stored(
    client: &AsyncClient,
    http: SocketAddr,
    meter: &str,
    from: i64,
    want: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0i64;
    while stored(http, meter, from).await < want {
        assert!(Instant::now() < deadline, "{meter}: push not stored");
        i += 1;
        let body = format!(
            r#"{{"unit":"W","kind":"power","points":[{{"ts":"{}","value":{}}}]}}"#,
            rfc3339_ms(from + i),
            i
        );
        let _ = client.try_publish(
            format!("edge/{GW}/ingest/{meter}"),
            QoS::AtLeastOnce,
            false,
            body,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The broker section of the status document once `restarts` reaches `want`.
async fn wait_restarts(http: SocketAddr, want: u64) -> serde_json::Value {
    let doc = poll_until(Duration::from_secs(30), || async {
        let doc = http_get(http, "/api/v1/status").await.json();
        let done = doc["broker"]["restarts"].as_u64() >= Some(want);
        (doc, done)
    })
    .await;
    assert!(
        doc["broker"]["restarts"].as_u64() >= Some(want),
        "no restart: {doc}"
    );
    doc["broker"].clone()
}

/// What a new subscriber gets retained on `topic` (bounded wait).
async fn retained(addr: SocketAddr, topic: &str) -> Option<Vec<u8>> {
    let mut sub = Subscriber::connect(addr, topic, Duration::from_secs(10)).await;
    let got = sub.next(Duration::from_secs(5)).await.map(|m| m.payload);
    let _ = sub.client.disconnect().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_broker_is_restarted_while_the_agent_runs_on() {
    edge_agent::service::install_panic_hook();
    let dir = tempfile::tempdir().expect("temp dir");
    let (http, mqtt) = (free_port(), free_port());
    let text = push_agent_toml(GW, &dir.path().join("store"), mqtt, http, "", "");
    let config = Config::from_toml(&text).expect("config parses");
    let (http, mqtt) = (loopback(http), loopback(mqtt));
    let handle: Arc<Mutex<Option<Arc<LocalBroker>>>> = Arc::default();
    let slot = handle.clone();
    let hooks = edge_agent::Hooks {
        on_broker: Some(Box::new(move |b| {
            *slot.lock().expect("slot") = Some(b);
        })),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(edge_agent::run_with(config, stop.clone(), hooks));
    let ready = wait_ready(http, Duration::from_secs(10)).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let broker = handle
        .lock()
        .expect("slot")
        .clone()
        .expect("broker handed over");

    let t0 = now_ms() - 60_000;
    let (client, pump) = publisher(mqtt);
    push_until_stored(&client, http, "boiler", t0, 1).await;
    let state = format!("edge/{GW}/boiler/state");
    let config_topic = format!("homeassistant/sensor/{GW}/boiler_power/config");
    let (state_before, config_before) = poll_until(Duration::from_secs(10), || async {
        let both = retained(mqtt, &state)
            .await
            .zip(retained(mqtt, &config_topic).await);
        let done = both.is_some();
        (both, done)
    })
    .await
    .expect("no state or discovery config");

    // 1. A panic on the router thread: contained, counted, the broker restarted.
    broker.stats.panic_router_for_test();
    let _ = client.try_publish("elsewhere/poke", QoS::AtLeastOnce, false, "x");
    let first = wait_restarts(http, 1).await;
    assert!(first["panics"].as_u64() >= Some(1), "{first}");
    assert!(!task.is_finished(), "the agent stopped");
    push_until_stored(&client, http, "boiler", t0 + 10_000, 1).await;

    // 2. The listener and router stop under the agent: restarted again.
    broker.kill_for_test();
    let second = wait_restarts(http, 2).await;
    assert!(second["failures"].as_u64() >= Some(2), "{second}");
    push_until_stored(&client, http, "boiler", t0 + 20_000, 1).await;

    // A new subscriber sees the agent's retained messages again.
    assert_eq!(
        retained(mqtt, &format!("edge/{GW}/status"))
            .await
            .as_deref(),
        Some(&b"online"[..])
    );
    let state_after = retained(mqtt, &state).await.expect("state republished");
    let doc: serde_json::Value = serde_json::from_slice(&state_after).expect("state json");
    assert_eq!(doc["meter"], "boiler", "{doc}");
    assert_ne!(state_after, state_before, "newer pushes, newer state");
    assert_eq!(
        retained(mqtt, &config_topic).await,
        Some(config_before),
        "discovery config republished"
    );
    let metrics = http_get(http, "/metrics").await.text();
    assert!(
        metrics.contains("edge_broker_restarts_total 2"),
        "{metrics}"
    );

    pump.abort();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("agent stops")
        .expect("agent task")
        .expect("agent ran cleanly");
}
