//! The verifier against a real Mosquitto (a child process on a free loopback port):
//! the gateways are plain MQTT clients publishing batches, and a watcher counts the
//! resend commands on `edge/+/cmd/resend`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::serve::{self, HttpLimits};
use super::tests::{batch, record};
use super::{shard_of, Verifier, VerifyOptions};
use crate::testkit::{free_port, wait_until};

/// Generous for qemu.
const LIMIT: Duration = Duration::from_secs(60);

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path) -> (Mosquitto, u16) {
    let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("these tests need mosquitto (apt-get install mosquitto)"));
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"),
    )
    .expect("write mosquitto config");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let guard = Mosquitto(child);
    crate::testkit::block_until("mosquitto listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (guard, port)
}

/// Publishes received: topic and payload.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An MQTT client whose received publishes are kept; `subscribe` returns once the
/// broker confirmed.
struct Client {
    client: AsyncClient,
    got: Received,
    subacks: Arc<Notify>,
}

async fn client(port: u16, id: &str) -> Client {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 256);
    let got: Received = Arc::new(Mutex::new(Vec::new()));
    let subacks = Arc::new(Notify::new());
    let (g, s) = (got.clone(), subacks.clone());
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    g.lock()
                        .expect("test lock")
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => s.notify_one(),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Client {
        client,
        got,
        subacks,
    }
}

impl Client {
    async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(LIMIT, self.subacks.notified())
            .await
            .expect("suback");
    }

    async fn publish(&self, gw: &str, seqs: impl IntoIterator<Item = u64>) {
        self.client
            .publish(
                format!("edge/{gw}/records"),
                QoS::AtLeastOnce,
                false,
                batch(gw, seqs),
            )
            .await
            .expect("publish");
    }

    fn topics(&self) -> Vec<String> {
        self.got
            .lock()
            .expect("test lock")
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }
}

fn received(v: &Verifier, gw: &str) -> u64 {
    v.shared.tracker().get(gw).map_or(0, |g| g.received_count)
}

async fn wait_subscribed(v: &Verifier) {
    let shared = v.shared.clone();
    wait_until("the verifier subscribed", LIMIT, move || {
        shared.subscribed()
    })
    .await;
}

/// `GET path` on `addr`: status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut text = String::new();
    tokio::time::timeout(LIMIT, stream.read_to_string(&mut text))
        .await
        .expect("answer in time")
        .expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

/// The done-when of the fleet service: stopped and started again with its state,
/// `verify --serve` neither forgets what arrived nor asks for it again, and the
/// persistent session hands it what arrived while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_restarted_with_its_state_does_not_ask_again_for_what_arrived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, port) = mosquitto(dir.path());
    let watcher = client(port, "watcher").await;
    watcher.subscribe("edge/+/cmd/resend").await;
    let gateway = client(port, "gateway").await;
    let options = VerifyOptions {
        port,
        state: Some(dir.path().join("state")),
        client_id: Some("verify-restart".into()),
        resend_interval: Duration::from_secs(1),
        resend_rate: 100,
        ..VerifyOptions::default()
    };

    let first = serve::start(options.clone(), listener().await, HttpLimits::default())
        .await
        .expect("serve");
    wait_subscribed(&first.verifier).await;
    gateway.publish("g1", 1..=50).await;
    let v = &first.verifier;
    wait_until("50 records", LIMIT, || received(v, "g1") == 50).await;
    first.stop().await;

    // While it is down: the broker keeps these for its session.
    gateway.publish("g1", 51..=60).await;

    let second = serve::start(options, listener().await, HttpLimits::default())
        .await
        .expect("serve again");
    let v = &second.verifier;
    assert!(
        received(v, "g1") >= 50,
        "what arrived before is known at once"
    );
    wait_subscribed(v).await;
    gateway.publish("g1", 61..=62).await;
    wait_until("62 records", LIMIT, || received(v, "g1") == 62).await;
    // A manifest over records of both runs checks out: the CRCs of the first run's
    // records were kept too.
    let bytes: Vec<u8> = (1..=62).flat_map(record).collect();
    let manifest = format!(
        r#"{{"gw":"g1","from":1,"to":62,"count":62,"crc32c":{},"ts_ms":0}}"#,
        crate::store::crc32c(&bytes)
    );
    gateway
        .client
        .publish("edge/g1/manifest", QoS::AtLeastOnce, false, manifest)
        .await
        .expect("publish");
    wait_until("the manifest checked", LIMIT, || {
        v.shared
            .tracker()
            .get("g1")
            .is_some_and(|g| g.last_manifest_ok.is_some())
    })
    .await;
    // A few resend rounds after everything arrived: none asks for anything.
    let rounds = v.shared.tracker().rounds;
    wait_until("three resend rounds", LIMIT, || {
        v.shared.tracker().rounds >= rounds + 3
    })
    .await;
    assert_eq!(
        watcher.topics(),
        Vec::<String>::new(),
        "no resend asked for"
    );
    let (status, body) = get(second.addr, "/gateways/g1").await;
    assert_eq!(status, 200, "{body}");
    let g = json(&body);
    assert_eq!(g["received"], 62, "{body}");
    assert_eq!(g["missing_count"], 0, "{body}");
    assert_eq!(g["duplicates"], 0, "{body}");
    assert_eq!(g["resend_requests"], 0, "{body}");
    assert_eq!(g["last_manifest_ok"], true, "{body}");
    assert_eq!(g["manifests_ok_total"], 1, "{body}");
    second.stop().await;
}

/// Two shards split the gateways between them: each follows only its own, and
/// together they follow all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_each_follow_only_their_gateways_and_together_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, port) = mosquitto(dir.path());
    let gateway = client(port, "gateway").await;
    let shards: Vec<Verifier> = (0..2)
        .map(|i| {
            Verifier::start(VerifyOptions {
                port,
                shard: Some((i, 2)),
                resend: false,
                ..VerifyOptions::default()
            })
        })
        .collect();
    for v in &shards {
        wait_subscribed(v).await;
    }
    let ids: Vec<String> = (0..8).map(|i| format!("site-{i}")).collect();
    for gw in &ids {
        gateway.publish(gw, 1..=3).await;
    }
    wait_until("every gateway's records", LIMIT, || {
        ids.iter()
            .all(|gw| shards.iter().map(|v| received(v, gw)).sum::<u64>() == 3)
    })
    .await;
    let mut all = Vec::new();
    for (i, v) in shards.into_iter().enumerate() {
        let report = v.stop().await;
        let mine: Vec<String> = report.gateways.keys().cloned().collect();
        assert!(!mine.is_empty(), "shard {i} follows some of the eight");
        for gw in &mine {
            assert_eq!(shard_of(gw, 2), i as u64, "{gw} in shard {i}");
        }
        all.extend(mine);
    }
    all.sort();
    assert_eq!(all, ids, "together, every gateway once");
}

/// `/metrics` and `/gateways` say which gateways are incomplete; a gateway not
/// listed is neither followed nor asked for resends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_shows_per_gateway_completeness_and_unlisted_gateways_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_broker, port) = mosquitto(dir.path());
    let watcher = client(port, "watcher").await;
    watcher.subscribe("edge/+/cmd/resend").await;
    let gateway = client(port, "gateway").await;
    let serving = serve::start(
        VerifyOptions {
            port,
            gateways: vec!["g1".into(), "g2".into()],
            resend_interval: Duration::from_secs(30),
            ..VerifyOptions::default()
        },
        listener().await,
        HttpLimits::default(),
    )
    .await
    .expect("serve");
    let v = &serving.verifier;
    wait_subscribed(v).await;
    gateway.publish("g1", (1..=5).chain(8..=10)).await;
    gateway.publish("g2", 1..=3).await;
    gateway.publish("g3", [1, 5]).await;
    wait_until("g1 and g2", LIMIT, || {
        received(v, "g1") == 8 && received(v, "g2") == 3
    })
    .await;
    // g1's gap is asked for, once (the request is given 30 s)...
    wait_until("g1's resend request", LIMIT, || {
        watcher.topics().contains(&"edge/g1/cmd/resend".to_string())
    })
    .await;
    let rounds = v.shared.tracker().rounds;
    wait_until("three more resend rounds", LIMIT, || {
        v.shared.tracker().rounds >= rounds + 3
    })
    .await;
    // ...g3's never: it is not listed.
    assert_eq!(watcher.topics(), vec!["edge/g1/cmd/resend".to_string()]);
    assert_eq!(
        json(&String::from_utf8_lossy(
            &watcher.got.lock().expect("lock")[0].1
        )),
        serde_json::json!({"from": 6, "to": 7})
    );

    let (status, metrics) = get(serving.addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "edge_verify_missing_records{gateway=\"g1\"} 2",
        "edge_verify_missing_records{gateway=\"g2\"} 0",
        "edge_verify_last_seq{gateway=\"g1\"} 10",
        "edge_verify_gateways 2",
        "edge_verify_resend_requests_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(
        metrics.contains("edge_verify_newest_record_age_seconds{gateway=\"g2\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("g3"), "{metrics}");

    let (status, body) = get(serving.addr, "/gateways/g1").await;
    assert_eq!(status, 200, "{body}");
    let g = json(&body);
    assert_eq!(g["missing_count"], 2, "{body}");
    assert_eq!(
        g["missing"],
        serde_json::json!([{"start": 6, "end": 7}]),
        "{body}"
    );
    assert_eq!(g["last_seq"], 10, "{body}");
    let (status, body) = get(serving.addr, "/gateways/g3").await;
    assert_eq!(
        (status, json(&body)["field"].clone()),
        (404, "gw".into()),
        "{body}"
    );

    let (_, body) = get(serving.addr, "/gateways?limit=1").await;
    let page = json(&body);
    assert_eq!(page["total"], 2, "{body}");
    assert_eq!(page["gateways"][0]["gateway"], "g1", "{body}");
    assert_eq!(page["next"], "g1", "{body}");
    let (_, body) = get(serving.addr, "/gateways?after=g1").await;
    let page = json(&body);
    assert_eq!(page["gateways"][0]["gateway"], "g2", "{body}");
    assert!(page["next"].is_null(), "{body}");
    let (_, body) = get(serving.addr, "/gateways?incomplete=true").await;
    let names: Vec<String> = json(&body)["gateways"]
        .as_array()
        .expect("array")
        .iter()
        .map(|g| g["gateway"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, vec!["g1"], "{body}");
    let (status, body) = get(serving.addr, "/gateways?limit=0").await;
    assert_eq!(
        (status, json(&body)["field"].clone()),
        (400, "limit".into()),
        "{body}"
    );
    serving.stop().await;
}
