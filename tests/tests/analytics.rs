//! The analytics stage in a running agent: a pushed day of readings becomes
//! 15-minute intervals on the embedded broker, alarm events with QoS 1, retained
//! clusters, and late data comes again as a higher revision.

use std::sync::Arc;
use std::time::Duration;

use edge_agent::config::{AlarmRule, Config};
use edge_agent::ingest::{self, Point, Series};
use edge_agent::model::{now_ms, Kind};
use edge_agent::store::{Store, StoreWriter};
use edge_agent::{Hooks, StartHook};
use edge_agent_tests::{free_port, loopback, Message, Subscriber};
use tokio_util::sync::CancellationToken;

const MIN: i64 = 60_000;
const QUARTER: i64 = 15 * MIN;

/// The power at `minute` of the pushed day, counted from its start: a night, an
/// evening peak (hours 17 to 20) and a daytime level, wherever the day falls on the
/// clock, so the peak always starts and ends inside it.
fn level_w(minute: i64) -> f64 {
    match (minute / 60) % 24 {
        0..=5 => 200.0,
        17..=19 => 4000.0,
        _ => 1500.0,
    }
}

fn intervals<'a>(messages: &'a [Message], meter: &str) -> Vec<&'a Message> {
    let topic = format!("edge/gw-a/{meter}/energy/15m");
    messages.iter().filter(|m| m.topic == topic).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_day_gives_intervals_events_clusters_and_revisions_on_the_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut config = Config::from_toml(&format!(
        "gateway_id = \"gw-a\"\n[store]\npath = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n[analytics]\ncluster_every = 500\n",
        dir.path().join("store").display()
    ))
    .expect("config");
    config.alarms.push(AlarmRule {
        id: Some("peak".into()),
        meter: "*".into(),
        quantity: "power".into(),
        above: Some(3000.0),
        below: None,
        count: 2,
        pushed: false,
    });
    config.validate().expect("valid config");

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
    let mut sub = Subscriber::connect(loopback(port), "edge/gw-a/#", Duration::from_secs(10)).await;
    // The retained status arrives once the subscription is in place.
    let online = sub
        .collect_until(Duration::from_secs(10), |seen| {
            seen.iter().any(|m| m.topic == "edge/gw-a/status")
        })
        .await;
    assert!(online.iter().any(|m| m.payload == b"online"));

    // One day of power, a minute apart, ending 30 minutes ago on a quarter; the
    // reading at `hole` is left out and pushed late.
    let end = (now_ms() / QUARTER) * QUARTER - 2 * QUARTER;
    let start = end - 24 * 60 * MIN;
    let hole = end - 120 * MIN + 7 * MIN;
    let points: Vec<Point> = (0..24 * 60)
        .map(|m| (start + m * MIN, level_w(m)))
        .filter(|(ts, _)| *ts != hole)
        .map(|(ts, w)| Point::new(ts, w))
        .collect();
    let series = |points| Series {
        meter: "house".into(),
        unit: "W".into(),
        kind: Kind::Power,
        points,
    };
    ingest::ingest(&writer, &store, series(points), now_ms())
        .await
        .expect("ingest");

    let seen = sub
        .collect_until(Duration::from_secs(20), |seen| {
            intervals(seen, "house").len() >= 95
                && seen.iter().any(|m| m.topic == "edge/gw-a/house/clusters")
                && seen.iter().filter(|m| m.topic.ends_with("/events")).count() >= 2
        })
        .await;
    let ivs = intervals(&seen, "house");
    // The last quarter waits for the grace: 95 or 96 closed.
    assert!(ivs.len() >= 95, "{} intervals", ivs.len());
    let first = ivs[0].json();
    assert_eq!(first["s"].as_i64(), Some(start));
    assert_eq!(first["meter"], "house");
    assert_eq!(first["quantity"], "power");
    assert_eq!(first["rev"].as_u64(), Some(0));
    let want = level_w(0) * 0.25 / 1000.0;
    assert!((first["kwh"].as_f64().unwrap_or(-1.0) - want).abs() < 1e-9);

    // The evening peak (hours 17 to 20 of the day) raises once after two readings and
    // clears.
    let event_messages: Vec<_> = seen
        .iter()
        .filter(|m| m.topic == "edge/gw-a/house/events")
        .collect();
    // Events are published with QoS 1 and the subscription asked for QoS 1: every
    // event must reach the subscriber as a QoS 1 delivery (acknowledged, resent).
    assert!(!event_messages.is_empty());
    for m in &event_messages {
        assert_eq!(m.qos, 1, "event delivered with QoS {}", m.qos);
    }
    let events: Vec<serde_json::Value> = event_messages.iter().map(|m| m.json()).collect();
    assert_eq!(events[0]["state"], "raised", "{events:?}");
    assert_eq!(events[0]["rule"], "peak");
    assert_eq!(events[0]["count"].as_u64(), Some(2));
    assert_eq!(events[1]["state"], "cleared", "{events:?}");

    // Late data within retention: the interval comes again with revision 1.
    let hole_start = (hole / QUARTER) * QUARTER;
    ingest::ingest(
        &writer,
        &store,
        series(vec![Point::new(
            hole,
            level_w((hole - start) / MIN) + 600.0,
        )]),
        now_ms(),
    )
    .await
    .expect("late ingest");
    let later = sub
        .collect_until(Duration::from_secs(10), |seen| {
            intervals(seen, "house")
                .iter()
                .any(|m| m.json()["s"].as_i64() == Some(hole_start))
        })
        .await;
    let revised = intervals(&later, "house")
        .into_iter()
        .find(|m| m.json()["s"].as_i64() == Some(hole_start))
        .expect("revised interval published")
        .json();
    assert_eq!(revised["rev"].as_u64(), Some(1));
    let before = ivs
        .iter()
        .find(|m| m.json()["s"].as_i64() == Some(hole_start))
        .expect("original interval")
        .json();
    let added = revised["kwh"].as_f64().unwrap_or(0.0) - before["kwh"].as_f64().unwrap_or(0.0);
    assert!((added - 0.6 / 60.0).abs() < 1e-9, "{added}");

    // A new subscriber gets the clusters retained.
    let mut late_sub = Subscriber::connect(
        loopback(port),
        "edge/gw-a/house/clusters",
        Duration::from_secs(10),
    )
    .await;
    let retained = late_sub
        .next(Duration::from_secs(10))
        .await
        .expect("retained clusters");
    assert!(retained.retain);
    let doc = retained.json();
    assert_eq!(doc["k"].as_u64(), Some(3), "{doc}");
    let centres: Vec<f64> = doc["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .filter_map(|c| c["centre_w"].as_f64())
        .collect();
    for (c, want) in centres.iter().zip([200.0, 1500.0, 4000.0]) {
        assert!((c - want).abs() < 0.02 * want, "{centres:?}");
    }

    drop(writer);
    drop(store);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops")
        .expect("join")
        .expect("clean stop");
}
