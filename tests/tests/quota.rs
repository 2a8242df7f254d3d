//! The store quota in a running agent: with the upstream unreachable, records keep
//! coming into a store with a small quota; the oldest are dropped, counted, and each
//! quota pass's drop event reaches the embedded broker on `{prefix}/{gw}/events`.

use std::sync::Arc;
use std::time::Duration;

use edge_agent::config::{ByteSize, Config};
use edge_agent::model::Payload;
use edge_agent::store::{bench::sample_payload, merge_range, Store, StoreWriter, SLED_OVERHEAD};
use edge_agent::{Hooks, StartHook};
use edge_agent_tests::{free_port, loopback, poll_until, Subscriber};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_drops_are_announced_on_the_embedded_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut config = Config::from_toml(&format!(
        "gateway_id = \"gw-q\"\n[store]\npath = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n\
         [http]\nlisten = \"127.0.0.1:{}\"\n[upstream]\nhost = \"127.0.0.1\"\nport = {}\n",
        dir.path().join("store").display(),
        free_port(),
        free_port(),
    ))
    .expect("config");
    config.validate().expect("valid config");
    // Below what a config file may ask for (16MiB): a budget of 32 KiB of live data,
    // so a few hundred readings (about 90 bytes each, index included) fill it.
    let budget = 32 << 10;
    config.store.quota = ByteSize(SLED_OVERHEAD + 2 * budget);

    let (handles_tx, handles_rx) = tokio::sync::oneshot::channel::<(Arc<Store>, StoreWriter)>();
    let hook: StartHook = Box::new(move |store, writer| {
        Box::pin(async move {
            let _ = handles_tx.send((store, writer));
            Ok(())
        })
    });
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run_with(
        config,
        shutdown.clone(),
        Hooks {
            before_polling: Some(hook),
            ..Hooks::default()
        },
    ));
    let (store, writer) = handles_rx.await.expect("agent started");
    let mut sub = Subscriber::connect(loopback(port), "edge/gw-q/#", Duration::from_secs(10)).await;
    sub.collect_until(Duration::from_secs(10), |seen| {
        seen.iter().any(|m| m.topic == "edge/gw-q/status")
    })
    .await;

    for round in 0..20u64 {
        writer
            .submit_batch(
                (0..100)
                    .map(|i| sample_payload("main", round * 100 + i))
                    .collect(),
            )
            .await
            .expect("durable");
    }
    // The drop events are records too: the last one follows the last quota pass.
    let dropped = poll_until(Duration::from_secs(10), || async {
        let dropped = store.dropped_total();
        let last = store
            .read_range(store.last_seq(), store.last_seq())
            .expect("read");
        let done = matches!(last.first().map(|r| &r.payload), Some(Payload::Dropped(_)));
        (dropped, done)
    })
    .await;
    assert!(dropped > 1000, "{dropped} dropped");
    let seen = sub
        .collect_until(Duration::from_secs(10), |seen| {
            let announced: u64 = seen
                .iter()
                .filter(|m| m.topic == "edge/gw-q/events")
                .map(|m| m.json()["count"].as_u64().unwrap_or(0))
                .sum();
            announced >= dropped
        })
        .await;
    let events: Vec<serde_json::Value> = seen
        .iter()
        .filter(|m| m.topic == "edge/gw-q/events")
        .map(|m| {
            assert_eq!(m.qos, 1, "drop events go out with QoS 1");
            m.json()
        })
        .collect();
    let mut ranges = Vec::new();
    for ev in &events {
        assert_eq!(ev["event"], "dropped");
        assert_eq!(ev["reason"], "quota");
        assert_eq!(ev["gateway"], "gw-q");
        for r in ev["ranges"].as_array().expect("ranges") {
            let (a, b) = (r[0].as_u64().expect("from"), r[1].as_u64().expect("to"));
            merge_range(&mut ranges, a..=b);
        }
    }
    let announced: u64 = events
        .iter()
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "{} drop events on the broker announce {announced} dropped records in {ranges:?}; the store counts {dropped}, keeps {}..={}",
        events.len(),
        store.stats().first_seq,
        store.last_seq()
    );
    assert_eq!(announced, dropped);
    assert_eq!(ranges, vec![1..=store.stats().first_seq - 1]);

    drop(writer);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .expect("agent stops")
        .expect("join")
        .expect("clean stop");
}
