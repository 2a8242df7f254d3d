//! Generated pushes through the real broker to the MQTT ingest subscriber: whatever a
//! device publishes on `{prefix}/{gw}/ingest/{meter}`, the agent does not panic, and it
//! either accepts the push (stores it) or answers on the error topic with a bounded JSON reply whose
//! every problem names its field.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::LocalBroker;
use crate::broker::config::MqttConfig;
use crate::ingest::{IngestCounters, IngestLimits, Ingestor, Transport};
use crate::model::now_ms;
use crate::store::start_writer;
use crate::store::testing::{config, open};
use crate::testkit::free_port;

/// Longest error reply: the problem list is cut at 64 KiB, plus the envelope.
const MAX_REPLY: usize = (64 << 10) + 4096;

struct Rig {
    runtime: tokio::runtime::Runtime,
    counters: Arc<IngestCounters>,
    client: AsyncClient,
    replies: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    _broker: Arc<LocalBroker>,
    _dir: tempfile::TempDir,
    _stop: CancellationToken,
}

fn rig() -> Rig {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(&config(&dir)));
    let mqtt = MqttConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
        homeassistant_discovery: false,
        ..MqttConfig::default()
    };
    let stop = CancellationToken::new();
    let (broker, client, replies, counters) = runtime.block_on(async {
        let (tx, _committed) = broadcast::channel(64);
        let (writer, _task) = start_writer(store.clone(), Duration::from_millis(5), 10_000, tx);
        let ingestor = Ingestor::new(store.clone(), writer, IngestLimits::default());
        let counters = ingestor.counters.clone();
        let broker = LocalBroker::start(&mqtt, "fuzz").expect("broker");
        let (_task, mut subscribed) =
            super::ingest::start(ingestor, &mqtt, broker.topics.clone(), stop.clone());
        // Pushes sent before the subscription stands would find no subscriber.
        subscribed
            .wait_for(|s| *s)
            .await
            .expect("the ingest subscribes");
        let mut opts = MqttOptions::new("fuzzer", "127.0.0.1", mqtt.listen.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 64);
        client
            .subscribe("edge/fuzz/ingest/+/error", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let (tx, replies) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        (broker, client, replies, counters)
    });
    let mut rig = Rig {
        runtime,
        counters,
        client,
        replies,
        _broker: broker,
        _dir: dir,
        _stop: stop,
    };
    // Both subscriptions are in place once a probe is answered.
    let answered = rig.runtime.block_on(async {
        for _ in 0..100 {
            let _ = rig
                .client
                .publish("edge/fuzz/ingest/probe", QoS::AtLeastOnce, false, "probe")
                .await;
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(300), rig.replies.recv()).await
            {
                return true;
            }
        }
        false
    });
    assert!(answered, "the ingest subscriber never answered a probe");
    rig.runtime.block_on(async {
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), rig.replies.recv()).await
        {}
    });
    rig
}

/// Unique timestamps for generated points.
static NEXT_TS: AtomicI64 = AtomicI64::new(0);

fn fresh_ts() -> String {
    let n = NEXT_TS.fetch_add(1, Ordering::Relaxed);
    super::rfc3339_ms(now_ms() - 3_600_000 + n)
}

fn json_text() -> impl Strategy<Value = String> {
    let ts = prop_oneof![
        Just("fresh".to_string()),
        Just("\"soon\"".to_string()),
        Just("12".to_string()),
        Just("\"9999-99-99T00:00:00Z\"".to_string()),
        Just("null".to_string()),
    ];
    let value = prop_oneof![
        (-1e6f64..1e6).prop_map(|v| v.to_string()),
        Just("\"NaN\"".to_string()),
        Just("null".to_string()),
        Just("[]".to_string()),
        Just("1e999".to_string()),
    ];
    let kind = prop_oneof![
        Just("power"),
        Just("energy_total"),
        Just("voltage"),
        Just("bogus"),
    ];
    let point = (ts, value).prop_map(|(ts, value)| {
        let ts = if ts == "fresh" {
            format!("\"{}\"", fresh_ts())
        } else {
            ts
        };
        format!(r#"{{"ts":{ts},"value":{value}}}"#)
    });
    (kind, "[A-Za-z%]{0,4}", prop::collection::vec(point, 0..6)).prop_map(|(kind, unit, points)| {
        format!(
            r#"{{"unit":"{unit}","kind":"{kind}","points":[{}]}}"#,
            points.join(",")
        )
    })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => json_text().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => json_text().prop_map(|t| t.as_bytes()[..t.len() / 2].to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn any_mqtt_push_is_accepted_or_answered_naming_its_field(
        meter in "[a-z0-9_-]{1,8}|[A-Za-z0-9 .]{60,70}",
        body in payload(),
    ) {
        static RIG: std::sync::OnceLock<std::sync::Mutex<Rig>> = std::sync::OnceLock::new();
        let mut rig = RIG
            .get_or_init(|| std::sync::Mutex::new(rig()))
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let rig = &mut *rig;
        let accepted = |c: &IngestCounters| c.snapshot(Transport::Mqtt).batches;
        let before = accepted(&rig.counters);
        let topic = format!("edge/fuzz/ingest/{meter}");
        let (client, counters) = (rig.client.clone(), rig.counters.clone());
        let replies = &mut rig.replies;
        let outcome = rig.runtime.block_on(async {
            client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, body.clone())
                .await
                .expect("publish queued");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if accepted(&counters) > before {
                    return None;
                }
                match tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
                    replies.recv(),
                )
                .await
                {
                    Ok(Some(reply)) => return Some(reply),
                    Ok(None) => panic!("reply channel closed"),
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        panic!("neither stored nor answered: {}", String::from_utf8_lossy(&body))
                    }
                    Err(_) => {}
                }
            }
        });
        if let Some((reply_topic, reply)) = outcome {
            prop_assert_eq!(reply_topic, format!("{topic}/error"));
            prop_assert!(reply.len() <= MAX_REPLY, "reply of {} bytes", reply.len());
            let doc: serde_json::Value = serde_json::from_slice(&reply).expect("reply is JSON");
            let problems = doc["problems"].as_array().expect("problems");
            prop_assert!(!problems.is_empty(), "{}", doc);
            for p in problems {
                let field = p["field"].as_str().unwrap_or_default();
                prop_assert!(!field.is_empty(), "a problem without its field: {}", doc);
            }
        }
    }
}
