//! The README's first command: `edge-agent demo` starts its simulated meters, polls
//! them, publishes their state, and on SIGTERM flushes, publishes `offline` and exits 0.

use std::process::{Command, Stdio};
use std::time::Duration;

use edge_agent_tests::{
    free_port, http_request, loopback, poll_until, states_per_meter, Subscriber,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_publishes_every_meter_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let upstream = free_port();
    let http = free_port();
    let mut up = Subscriber::connect(
        loopback(upstream),
        "edge/demo-gw/records",
        Duration::from_secs(15),
    )
    .await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--interval", "300ms"])
        .args(["--upstream-listen", &format!("127.0.0.1:{upstream}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");

    let mut sub =
        Subscriber::connect(loopback(port), "edge/demo-gw/#", Duration::from_secs(15)).await;
    // The Modbus meters and the P1 meter (`grid`, a DSMR 5 P1 port on a pty).
    let messages = sub
        .collect_until(Duration::from_secs(30), |seen| {
            let counts = states_per_meter(seen);
            ["main", "pv", "heatpump", "garage", "solar", "grid"]
                .iter()
                .all(|m| counts.get(*m).copied().unwrap_or(0) >= 3)
        })
        .await;
    let counts = states_per_meter(&messages);
    for meter in ["main", "pv", "heatpump", "garage", "solar", "grid"] {
        assert!(
            counts.get(meter).copied().unwrap_or(0) >= 3,
            "meter {meter}: {counts:?}"
        );
    }
    assert!(
        messages
            .iter()
            .any(|m| m.topic == "edge/demo-gw/status" && m.payload == b"online"),
        "status online seen"
    );
    // Values carry units, and a meter's sequence numbers never go back. A document's
    // seq is its meter's newest reading's. Across meters they interleave: a commit
    // publishes each meter's document once, with its newest seq, in the order the
    // meters first appear in it. The same seq may come again: the P1 meter's gas
    // reading, at the gas meter's own earlier time, updates `gas_total` in a
    // document that keeps that seq.
    let mut last_seq: std::collections::HashMap<String, u64> = Default::default();
    for m in messages
        .iter()
        .filter(|m| m.topic.ends_with("/state") && !m.retain)
    {
        let doc = m.json();
        let seq = doc["seq"].as_u64().expect("seq");
        let meter = doc["meter"].as_str().expect("meter").to_string();
        let last = last_seq.entry(meter.clone()).or_default();
        assert!(seq >= *last, "{meter}: seq {seq} after {last}");
        *last = seq;
        assert!(doc["values"].as_object().is_some_and(|v| !v.is_empty()));
    }
    assert!(
        last_seq.values().filter(|&&s| s > 0).count() >= 5,
        "states of every meter: {last_seq:?}"
    );

    // The SunSpec inverter was discovered: its common model names it. (The HTTP
    // server may still be starting.)
    let solar = poll_until(Duration::from_secs(30), || async {
        let meters = match http_request(loopback(http), "GET", "/api/v1/meters", &[], &[]).await {
            Ok(r) if r.status == 200 => r.json(),
            _ => return (serde_json::Value::Null, false),
        };
        let solar = meters["meters"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["id"] == "solar"))
            .cloned()
            .unwrap_or_default();
        let done = solar["serial"].is_string();
        (solar, done)
    })
    .await;
    assert_eq!(
        (&solar["manufacturer"], &solar["model"], &solar["serial"]),
        (
            &serde_json::json!("Example Solar"),
            &serde_json::json!("ES-5000-3P"),
            &serde_json::json!("ES5K0001")
        ),
        "{solar}"
    );

    // The records also reach the demo's upstream broker, as CBOR batches.
    let batch = up
        .next(Duration::from_secs(15))
        .await
        .expect("a batch of records upstream");
    let records = edge_agent::sync::wire::decode_batch(&batch.payload).expect("batch decodes");
    assert!(records
        .first()
        .is_some_and(|r| r.gw == "demo-gw" && r.seq >= 1));

    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "send SIGTERM");
    let offline = sub
        .collect_until(Duration::from_secs(5), |seen| {
            seen.iter()
                .any(|m| m.topic == "edge/demo-gw/status" && m.payload == b"offline")
        })
        .await;
    assert!(
        offline
            .iter()
            .any(|m| m.topic == "edge/demo-gw/status" && m.payload == b"offline"),
        "offline published on SIGTERM"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait for the demo");
    assert_eq!(status.code(), Some(0), "demo exits 0 on SIGTERM");
    assert!(dir.path().join("store").exists(), "store directory created");
}

/// The demo's history is enough for clusters of every meter within seconds of the
/// start, stored and published retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_history_gives_retained_clusters_for_every_meter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--history-days", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let meters = ["main", "pv", "heatpump", "garage"];
    let clusters_of = |seen: &[edge_agent_tests::Message], meter: &str| {
        seen.iter()
            .any(|m| m.topic == format!("edge/demo-gw/{meter}/clusters"))
    };
    let mut sub = Subscriber::connect(
        loopback(port),
        "edge/demo-gw/+/clusters",
        Duration::from_secs(15),
    )
    .await;
    let seen = sub
        .collect_until(Duration::from_secs(40), |seen| {
            meters.iter().all(|m| clusters_of(seen, m))
        })
        .await;
    for meter in meters {
        assert!(clusters_of(&seen, meter), "no clusters for {meter}");
    }
    // A subscriber that comes later gets them retained.
    let mut late = Subscriber::connect(
        loopback(port),
        "edge/demo-gw/main/clusters",
        Duration::from_secs(10),
    )
    .await;
    let retained = late
        .next(Duration::from_secs(10))
        .await
        .expect("retained clusters");
    assert!(retained.retain);
    let doc = retained.json();
    assert_eq!(doc["meter"], "main");
    assert!(doc["n"].as_u64().unwrap_or(0) >= 60, "{doc}");
    assert!(doc["k"].as_u64().unwrap_or(0) >= 1, "{doc}");

    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "send SIGTERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait for the demo");
    assert_eq!(status.code(), Some(0), "demo exits 0 on SIGTERM");
}

/// Starts the demo on `dir` with its history of one day, polling every 300 ms.
fn spawn_demo(dir: &std::path::Path, port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir)
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--history-days", "1", "--interval", "300ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo")
}

/// Stops the demo with SIGTERM and waits for it.
async fn stop_demo(mut child: std::process::Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0, "send SIGTERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait for the demo");
    assert_eq!(status.code(), Some(0), "demo exits 0 on SIGTERM");
}

/// `energy_total` of each live (not retained) state message, per meter, in order.
fn live_counters(seen: &[edge_agent_tests::Message]) -> Vec<(String, f64)> {
    seen.iter()
        .filter(|m| m.topic.ends_with("/state") && !m.retain)
        .filter_map(|m| {
            let doc = m.json();
            Some((
                doc["meter"].as_str()?.to_string(),
                doc["values"]["energy_total"]["value"].as_f64()?,
            ))
        })
        .collect()
}

/// After a restart the simulated meters continue from the stored energy totals:
/// no `total_increasing` counter goes backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_counters_continue_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let meters = ["main", "pv", "heatpump", "garage", "solar"];
    let port = free_port();
    let child = spawn_demo(dir.path(), port);
    let mut sub = Subscriber::connect(
        loopback(port),
        "edge/demo-gw/+/state",
        Duration::from_secs(15),
    )
    .await;
    // Long enough live polling that the counters moved past the history's end.
    let seen = sub
        .collect_until(Duration::from_secs(60), |seen| {
            let counts = states_per_meter(seen);
            meters
                .iter()
                .all(|m| counts.get(*m).copied().unwrap_or(0) >= 15)
        })
        .await;
    stop_demo(child).await;
    let mut last: std::collections::HashMap<String, f64> = Default::default();
    for (meter, v) in live_counters(&seen) {
        last.insert(meter, v);
    }
    assert_eq!(last.len(), meters.len(), "{last:?}");

    let port = free_port();
    let child = spawn_demo(dir.path(), port);
    let mut sub = Subscriber::connect(
        loopback(port),
        "edge/demo-gw/+/state",
        Duration::from_secs(15),
    )
    .await;
    let seen = sub
        .collect_until(Duration::from_secs(60), |seen| {
            let counts = states_per_meter(seen);
            meters
                .iter()
                .all(|m| counts.get(*m).copied().unwrap_or(0) >= 3)
        })
        .await;
    stop_demo(child).await;
    let after = live_counters(&seen);
    for meter in meters {
        let first = after
            .iter()
            .find(|(m, _)| m == meter)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no state of {meter} after the restart"));
        let before = last[meter];
        assert!(
            first >= before,
            "{meter}: {before} kWh before the restart, {first} kWh after"
        );
        println!("{meter}: {before} kWh -> {first} kWh across the restart");
    }
}
