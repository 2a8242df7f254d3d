//! The sync task against a real broker (an in-process rumqttd as the upstream).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::wire::{self, Manifest};
use super::*;
use crate::broker::config::MqttConfig;
use crate::broker::LocalBroker;
use crate::config::units::{ByteSize, HumanDuration};
use crate::store::bench::sample_payload;
use crate::store::config::StoreConfig;
use crate::testkit::free_port;

/// Runs a test body with an upper bound, so a sync that never reaches the awaited
/// state fails the test instead of hanging the whole run.
async fn bounded(body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(120), body)
        .await
        .expect("the test finished within 120 s");
}

fn upstream_broker() -> (Arc<LocalBroker>, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let broker = LocalBroker::start(
        &crate::broker::upstream_logs(MqttConfig {
            listen,
            ..MqttConfig::default()
        }),
        "upstream",
    )
    .expect("upstream broker starts");
    (broker, listen)
}

fn upstream_config(addr: SocketAddr) -> UpstreamConfig {
    UpstreamConfig {
        host: addr.ip().to_string(),
        port: addr.port(),
        batch_records: 100,
        batch_bytes: ByteSize(64 << 10),
        inflight_batches: 4,
        reconnect_min: HumanDuration(Duration::from_millis(50)),
        reconnect_max: HumanDuration(Duration::from_millis(300)),
        ..UpstreamConfig::default()
    }
}

fn open_store(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(
        Store::open(&StoreConfig {
            path: dir.join("store"),
            cache_capacity: ByteSize(8 << 20),
            ..StoreConfig::default()
        })
        .expect("open store"),
    )
}

fn fill(store: &Store, n: u64) {
    let base = store.last_seq();
    store
        .append(
            (base..base + n)
                .map(|i| sample_payload("main", i))
                .collect(),
        )
        .expect("append");
    // Synced, as the writer does: the upstream sends synced records only.
    store.sync().expect("sync");
}

/// Submits reading `i` of meter `pv` and waits until it is durable.
async fn commit_reading(writer: &crate::store::StoreWriter, i: u64) {
    writer
        .submit(sample_payload("pv", i))
        .await
        .expect("submit")
        .await
        .expect("reply")
        .expect("durable");
}

/// Waits until the sync is connected and caught up.
async fn wait_live(sync: &mut UpstreamSync) {
    sync.status
        .wait_for(|s| s.state == SyncState::Live)
        .await
        .expect("live");
}

/// Subscribes to `filter` and forwards (topic, payload, retain).
async fn subscribe(
    addr: SocketAddr,
    filter: &str,
) -> mpsc::UnboundedReceiver<(String, Vec<u8>, bool)> {
    let mut opts = MqttOptions::new(
        format!("sub-{}", rand::random::<u32>()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((p.topic.clone(), p.payload.to_vec(), p.retain))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .expect("suback in time")
        .expect("subscriber alive");
    rx
}

/// Collects record seqs from batches until `until` arrived or `limit` passed.
async fn collect_seqs(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    until: u64,
    limit: Duration,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while let Some((topic, payload, _)) = rx.recv().await {
            if topic.ends_with("/records") {
                let batch = wire::decode_batch(&payload).expect("batch decodes");
                seqs.extend(batch.iter().map(|r| r.seq));
                if seqs.last().is_some_and(|&s| s >= until) {
                    return;
                }
            }
        }
    })
    .await;
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_a_backlog_in_order_persists_the_cursor_and_resumes_after_it() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        fill(&store, 1500);
        let (_broker, addr) = upstream_broker();
        let mut rx = subscribe(addr, "edge/gw1/#").await;
        let cfg = upstream_config(addr);

        let (_tx, committed) = broadcast::channel(4);
        let stop = CancellationToken::new();
        let mut sync =
            start(store.clone(), &cfg, "gw1", "edge", committed, stop.clone()).expect("start");
        let seqs = collect_seqs(&mut rx, 1500, Duration::from_secs(20)).await;
        assert_eq!(
            seqs,
            (1..=1500).collect::<Vec<_>>(),
            "every record once, in order"
        );
        let status = sync
            .status
            .wait_for(|s| s.cursor == 1500)
            .await
            .expect("status")
            .clone();
        assert_eq!(status.backlog, 0);
        assert_eq!(status.delivered, 1500);
        assert_eq!(status.connects, 1);
        assert_eq!(store.sync_mark(MARK_CURSOR).expect("mark"), 1500);
        stop.cancel();
        sync.task.await.expect("sync task ends");

        // A restart resumes after the cursor: only the new records go out.
        fill(&store, 250);
        let stop = CancellationToken::new();
        let (_tx, committed) = broadcast::channel(4);
        let mut sync =
            start(store.clone(), &cfg, "gw1", "edge", committed, stop.clone()).expect("start");
        let seqs = collect_seqs(&mut rx, 1750, Duration::from_secs(20)).await;
        assert_eq!(seqs, (1501..=1750).collect::<Vec<_>>());
        sync.status
            .wait_for(|s| s.cursor == 1750 && s.state == SyncState::Live)
            .await
            .expect("live");
        stop.cancel();
        sync.task.await.expect("sync task ends");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakes_on_committed_records_and_announces_online() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let (_broker, addr) = upstream_broker();
        let mut rx = subscribe(addr, "edge/gw2/#").await;
        let (committed_tx, committed) = broadcast::channel(16);
        let stop = CancellationToken::new();
        let mut sync = start(
            store.clone(),
            &upstream_config(addr),
            "gw2",
            "edge",
            committed,
            stop.clone(),
        )
        .expect("start");
        let online = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some((topic, payload, retain)) = rx.recv().await {
                if topic == "edge/gw2/status" {
                    return (payload, retain);
                }
            }
            (Vec::new(), false)
        })
        .await
        .expect("online in time");
        assert_eq!(online.0, b"online".to_vec());
        wait_live(&mut sync).await;

        let (writer, writer_task) =
            crate::store::start_writer(store.clone(), Duration::from_millis(10), 100, committed_tx);
        for i in 0..30 {
            commit_reading(&writer, i).await;
        }
        let seqs = collect_seqs(&mut rx, 30, Duration::from_secs(10)).await;
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        drop(writer);
        writer_task.await.expect("writer ends");
        stop.cancel();
        sync.task.await.expect("sync ends");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_trickle_writes_the_cursor_at_most_once_a_second_and_all_on_stop() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        let (_broker, addr) = upstream_broker();
        let mut rx = subscribe(addr, "edge/gw5/records").await;
        let (committed_tx, committed) = broadcast::channel(16);
        let stop = CancellationToken::new();
        // A window wider than the batches of a second: only the clock limits writes.
        let cfg = UpstreamConfig {
            inflight_batches: 64,
            ..upstream_config(addr)
        };
        let mut sync =
            start(store.clone(), &cfg, "gw5", "edge", committed, stop.clone()).expect("start");
        wait_live(&mut sync).await;

        // One record every 50 ms for 2.5 s: 50 batches, each acknowledged on its own.
        let (writer, writer_task) =
            crate::store::start_writer(store.clone(), Duration::from_millis(5), 100, committed_tx);
        let started = Instant::now();
        for i in 0..50 {
            commit_reading(&writer, i).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seqs = collect_seqs(&mut rx, 50, Duration::from_secs(10)).await;
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        let writes = sync.status.borrow().cursor_writes;
        let most = started.elapsed().as_secs() + 2;
        assert!(
            (1..=most).contains(&writes),
            "{writes} cursor writes for 50 batches in {:?} (at most {most})",
            started.elapsed()
        );

        // Stopping makes every acknowledged record durable at once.
        drop(writer);
        writer_task.await.expect("writer ends");
        stop.cancel();
        sync.task.await.expect("sync ends");
        assert_eq!(store.sync_mark(MARK_CURSOR).expect("cursor"), 50);
        assert_eq!(sync.status.borrow().delivered, 50);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_requested_ranges_counts_bad_requests_and_publishes_manifests() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        fill(&store, 400);
        let (_broker, addr) = upstream_broker();
        let mut rx = subscribe(addr, "edge/gw3/#").await;
        let cfg = UpstreamConfig {
            manifest_interval: HumanDuration(Duration::from_millis(300)),
            resend_max_span: 100,
            ..upstream_config(addr)
        };
        let (_tx, committed) = broadcast::channel(4);
        let stop = CancellationToken::new();
        let mut sync =
            start(store.clone(), &cfg, "gw3", "edge", committed, stop.clone()).expect("start");
        assert_eq!(
            collect_seqs(&mut rx, 400, Duration::from_secs(20))
                .await
                .len(),
            400
        );

        // Manifests cover what was durably acknowledged, in consecutive ranges (the
        // cursor of the last batches may be written after the first manifest), each
        // with the CRC of the stored bytes.
        let manifests = tokio::time::timeout(Duration::from_secs(5), async {
            let mut manifests = Vec::new();
            while let Some((topic, payload, _)) = rx.recv().await {
                if topic == "edge/gw3/manifest" {
                    let m: Manifest = serde_json::from_slice(&payload).expect("manifest json");
                    let m = (m.from, m.to, m.count, m.crc32c, m.gw == "gw3");
                    let done = m.1 == 400;
                    manifests.push(m);
                    if done {
                        break;
                    }
                }
            }
            manifests
        })
        .await
        .expect("manifests up to seq 400 in time");
        let mut next = 1;
        for (from, to, count, crc, own_gw) in manifests {
            assert!(own_gw);
            assert_eq!((from, count), (next, to - from + 1));
            assert_eq!(crc, store.digest_range(from, to).expect("digest").crc32c);
            next = to + 1;
        }
        assert_eq!(next, 401);

        let mut opts = MqttOptions::new("commander", addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        let (cmd, mut cmd_events) = AsyncClient::new(opts, 16);
        tokio::spawn(async move { while cmd_events.poll().await.is_ok() {} });
        for bad in [
            &b"{\"from\":5}"[..],
            b"not json",
            br#"{"from":1,"to":1000}"#,
        ] {
            cmd.publish("edge/gw3/cmd/resend", QoS::AtLeastOnce, false, bad.to_vec())
                .await
                .expect("publish");
        }
        cmd.publish(
            "edge/gw3/cmd/resend",
            QoS::AtLeastOnce,
            false,
            br#"{"from":101,"to":150}"#.to_vec(),
        )
        .await
        .expect("publish");
        let again = collect_seqs(&mut rx, 150, Duration::from_secs(10)).await;
        assert_eq!(again, (101..=150).collect::<Vec<_>>());
        let status = sync
            .status
            .wait_for(|s| s.bad_commands == 3 && s.resent == 50)
            .await
            .expect("status")
            .clone();
        assert_eq!(status.cursor, 400, "a resend does not move the cursor");
        stop.cancel();
        sync.task.await.expect("sync ends");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_without_a_broker_then_catches_up_when_it_appears() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        fill(&store, 3000);
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (_tx, committed) = broadcast::channel(4);
        let stop = CancellationToken::new();
        let mut sync = start(
            store.clone(),
            &upstream_config(addr),
            "gw4",
            "edge",
            committed,
            stop.clone(),
        )
        .expect("start");
        let status = sync
            .status
            .wait_for(|s| s.last_error.is_some())
            .await
            .expect("status")
            .clone();
        assert_eq!(status.state, SyncState::Offline);
        assert_eq!(status.backlog, 3000);
        assert!(status.oldest_unacked_age_ms.is_some());

        let mqtt = crate::broker::upstream_logs(MqttConfig {
            listen: addr,
            ..MqttConfig::default()
        });
        let _broker = LocalBroker::start(&mqtt, "upstream").expect("broker starts");
        let appeared = tokio::time::Instant::now();
        sync.status
            .wait_for(|s| s.connects == 1)
            .await
            .expect("connects");
        // reconnect_max is 300ms: the broker is found well within a second.
        assert!(
            appeared.elapsed() < Duration::from_secs(1),
            "{:?}",
            appeared.elapsed()
        );
        let done = sync
            .status
            .wait_for(|s| s.cursor == 3000)
            .await
            .expect("drained")
            .clone();
        assert_eq!(done.state, SyncState::Live);
        assert!(done.drain_rate > 0.0);
        assert_eq!(done.oldest_unacked_age_ms, None);
        stop.cancel();
        sync.task.await.expect("sync ends");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_past_the_retention_are_compacted() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        // Readings from 2023: far older than the retention.
        fill(&store, 1000);
        let (_broker, addr) = upstream_broker();
        let cfg = UpstreamConfig {
            retention: HumanDuration(Duration::from_secs(60)),
            ..upstream_config(addr)
        };
        let (_tx, committed) = broadcast::channel(4);
        let stop = CancellationToken::new();
        let mut sync =
            start(store.clone(), &cfg, "gw5", "edge", committed, stop.clone()).expect("start");
        sync.status
            .wait_for(|s| s.cursor == 1000)
            .await
            .expect("drained");
        crate::testkit::poll_until(Duration::from_secs(15), || async {
            ((), store.stats().first_seq > 1)
        })
        .await;
        let stats = store.stats();
        assert!(stats.first_seq > 1, "nothing compacted: {stats:?}");
        assert_eq!(stats.last_seq, 1000, "the newest block stays");
        assert!(!store.read_range(1000, 1000).expect("read").is_empty());
        stop.cancel();
        sync.task.await.expect("sync ends");
    })
    .await;
}

/// Relays TCP connections from `listener` to `target` until `stop`: the upstream as
/// the gateway sees it, reachable only while the relay runs.
async fn relay(listener: tokio::net::TcpListener, target: SocketAddr, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut inbound, _)) = accepted else {
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_with_the_upstream_down_stays_within_budget_and_counts_every_drop() {
    use crate::store::{start_writer, SLED_OVERHEAD};
    use crate::verify::{Verifier, VerifyOptions};

    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        // A few dozen KiB of live data (SDM630 readings take about 90 bytes with
        // their index entry); the quota adds sled's room (store::quota).
        let budget: u64 = 48 << 10;
        let quota = SLED_OVERHEAD + 2 * budget;
        let store = Arc::new(
            Store::open(&StoreConfig {
                path: dir.path().join("store"),
                cache_capacity: ByteSize(8 << 20),
                quota: ByteSize(quota),
                ..StoreConfig::default()
            })
            .expect("open store"),
        );
        assert_eq!(store.budget_bytes(), budget);
        // The upstream broker runs all along, with the checker on it; the gateway
        // reaches it only through the relay, which starts after the outage.
        let (_broker, broker_addr) = upstream_broker();
        let verifier = Verifier::start(VerifyOptions {
            host: broker_addr.ip().to_string(),
            port: broker_addr.port(),
            prefix: "edge".into(),
            gateways: vec!["gwq".into()],
            wait: Duration::from_secs(60),
            ..VerifyOptions::default()
        });
        let gateway_side = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let upstream_addr = gateway_side.local_addr().expect("addr");

        let (committed_tx, committed) = broadcast::channel(1024);
        let stop = CancellationToken::new();
        let cfg = UpstreamConfig {
            manifest_interval: HumanDuration(Duration::from_millis(300)),
            ..upstream_config(upstream_addr)
        };
        let mut sync = start(
            store.clone(),
            &cfg,
            "gwq",
            "edge",
            committed,
            stop.clone(),
        )
        .expect("start");
        let batch = 100u64;
        let (writer, writer_task) = start_writer(
            store.clone(),
            Duration::from_millis(5),
            batch as usize,
            committed_tx,
        );

        // Outage: 40 commits of 100 readings, about 8 x the budget.
        let (mut peak_live, mut peak_disk, mut batch_bytes) = (0, 0, 0);
        for round in 0..40u64 {
            let before = store.live_bytes();
            writer
                .submit_batch(
                    (0..batch)
                        .map(|i| sample_payload("main", round * batch + i))
                        .collect(),
                )
                .await
                .expect("durable");
            if round == 0 {
                batch_bytes = store.live_bytes() - before;
            }
            peak_live = peak_live.max(store.live_bytes());
            peak_disk = peak_disk.max(store.stats().disk_bytes);
        }
        // The last commit's quota pass runs after its reply: let the writer finish.
        drop(writer);
        writer_task.await.expect("writer ends");
        let offline = sync.status.borrow().clone();
        assert_eq!(offline.state, SyncState::Offline);
        assert_eq!(offline.cursor, 0);
        let dropped = store.dropped_total();
        println!(
            "quota {quota} bytes (live budget {budget}), one batch of {batch} readings {batch_bytes} bytes: \
             peak live {peak_live} bytes, peak on disk {peak_disk} bytes; dropped {dropped}"
        );
        assert!(
            peak_live <= budget + batch_bytes,
            "live bytes {peak_live} beyond the budget {budget} plus one batch {batch_bytes}"
        );
        assert!(peak_disk <= quota, "sled's files {peak_disk} beyond the quota {quota}");
        assert!(dropped > 2000, "{dropped}");

        // The upstream comes back: the sync drains what the store still holds.
        let relay_stop = CancellationToken::new();
        tokio::spawn(relay(gateway_side, broker_addr, relay_stop.clone()));
        let produced = store.last_seq();
        let done = sync
            .status
            .wait_for(|s| s.cursor == produced)
            .await
            .expect("drained")
            .clone();
        let report = verifier.wait_complete(produced, Duration::from_secs(30)).await;
        let g = &report.gateways["gwq"];
        println!(
            "produced {produced} = delivered {} + dropped {}; upstream received {}, declared dropped {} in {:?}, missing {}",
            done.delivered, done.dropped, g.received, g.dropped, g.dropped_ranges, g.missing_count
        );
        assert_eq!(done.dropped, dropped);
        assert_eq!(produced, done.delivered + done.dropped, "every record delivered or dropped");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(g.missing_count, 0);
        // Nothing was in flight when the drops happened: what arrived is exactly
        // what was delivered, and upstream knows every dropped seq.
        assert_eq!(g.received, done.delivered);
        assert_eq!(g.dropped, done.dropped);
        assert_eq!(g.dropped_ranges, vec![1..=dropped]);
        // The manifests count only what the store still held: they check out.
        let manifests = crate::testkit::poll_until(Duration::from_secs(10), || async {
            let manifests = verifier.report().gateways["gwq"].manifests.clone();
            let covered = manifests.iter().map(|m| m.to).max() == Some(produced);
            (manifests, covered)
        })
        .await;
        println!("manifests: {manifests:?}");
        assert_eq!(manifests.iter().map(|m| m.to).max(), Some(produced));
        assert!(manifests.iter().all(|m| m.ok == Some(true)), "{manifests:?}");
        assert!(crate::store::verify(&store).expect("verify").is_clean());
        relay_stop.cancel();
        stop.cancel();
        sync.task.await.expect("sync ends");
        verifier.stop().await;
    })
    .await;
}

/// Collects the record batches of `rx` until seq `until` arrived or `limit` passed.
async fn collect_batches(
    rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
    until: u64,
    limit: Duration,
) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while let Some((topic, payload, _)) = rx.recv().await {
            if topic.ends_with("/records") {
                let last = wire::decode_batch(&payload)
                    .expect("batch decodes")
                    .last()
                    .map_or(0, |r| r.seq);
                batches.push(payload);
                if last >= until {
                    return;
                }
            }
        }
    })
    .await;
    batches
}

/// Schemas go with the first batch of a connection that needs them and with every
/// resent batch: a consumer from seq 1 decodes everything, and one that joined
/// mid-stream decodes everything once it asked for a resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consumer_gets_the_schemas_it_needs_from_the_first_batch_or_a_resend() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_store(dir.path());
        fill(&store, 300);
        let (_broker, addr) = upstream_broker();
        let mut rx = subscribe(addr, "edge/gws/#").await;
        let cfg = upstream_config(addr);
        let (_tx, committed) = broadcast::channel(4);
        let stop = CancellationToken::new();
        let sync =
            start(store.clone(), &cfg, "gws", "edge", committed, stop.clone()).expect("start");
        let batches = collect_batches(&mut rx, 300, Duration::from_secs(20)).await;
        let schemas: Vec<usize> = batches
            .iter()
            .map(|b| wire::decode(b).expect("batch").schemas.len())
            .collect();
        assert_eq!(
            schemas,
            vec![1, 0, 0],
            "the schema goes once per connection"
        );
        // From seq 1: everything decodes, as stored.
        let mut from_start = wire::Decoder::default();
        let mut decoded = Vec::new();
        for b in &batches {
            for rec in from_start.batch(b).expect("batch").records {
                decoded.push(from_start.record("gws", &rec.data).expect("decodes"));
            }
        }
        assert_eq!(decoded, store.read_range(1, 300).expect("read"));
        // Joined mid-stream: the last batch alone does not decode...
        let mut late = wire::Decoder::default();
        let last = late.batch(&batches[2]).expect("batch");
        assert!(late.record("gws", &last.records[0].data).is_err());
        // ...until a resend of one of its readings brought the schema.
        let mut opts = MqttOptions::new("asker", addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        let (cmd, mut cmd_events) = AsyncClient::new(opts, 16);
        tokio::spawn(async move { while cmd_events.poll().await.is_ok() {} });
        cmd.publish(
            "edge/gws/cmd/resend",
            QoS::AtLeastOnce,
            false,
            br#"{"from":250,"to":250}"#.to_vec(),
        )
        .await
        .expect("publish");
        let resent = collect_batches(&mut rx, 250, Duration::from_secs(20)).await;
        let resent = late
            .batch(resent.last().expect("a resent batch"))
            .expect("batch");
        assert_eq!(
            resent.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![250]
        );
        assert_eq!(resent.schemas.len(), 1);
        for rec in &last.records {
            assert_eq!(
                late.record("gws", &rec.data).expect("decodes"),
                decoded[rec.seq as usize - 1]
            );
        }
        stop.cancel();
        sync.task.await.expect("sync task ends");

        // A new connection sends the schema again with its first batch.
        fill(&store, 20);
        let stop = CancellationToken::new();
        let (_tx, committed) = broadcast::channel(4);
        let sync =
            start(store.clone(), &cfg, "gws", "edge", committed, stop.clone()).expect("start");
        let batches = collect_batches(&mut rx, 320, Duration::from_secs(20)).await;
        let first = wire::decode(&batches[0]).expect("batch");
        assert_eq!(first.records[0].seq, 301);
        assert_eq!(first.schemas.len(), 1);
        stop.cancel();
        sync.task.await.expect("sync task ends");
    })
    .await;
}
