//! Graceful stop under load: the agent polls many meters at short intervals and gets
//! SIGTERM (or SIGINT) mid-stream. Every reading it reported as committed must be in
//! the store, with a valid CRC and no gap; nothing is stored that was not reported
//! (the final commit is logged too); `offline` is published; the exit code is 0 and
//! comes within 5 seconds of the signal.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::acquire::profile;
use edge_agent::config::StoreConfig;
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent::store::{self, Store};
use edge_agent_tests::{
    committed_range, free_port, loopback, poll_until, states_per_meter, Subscriber,
};
use tokio_util::sync::CancellationToken;

const TCP_METERS: u8 = 12;
const STOP_LIMIT: Duration = Duration::from_secs(5);

fn config_text(store: &Path, mqtt_port: u16, tcp: &str, rtu: &Path) -> String {
    let mut text = format!(
        r#"
gateway_id = "sig-gw"
[store]
path = "{store}"
flush_interval = "50ms"
[mqtt]
listen = "127.0.0.1:{mqtt_port}"
[[buses]]
id = "lan"
type = "tcp"
address = "{tcp}"
timeout = "500ms"
frame_gap = "0ms"
[[buses]]
id = "rs485"
type = "rtu"
port = "{rtu}"
baud_rate = 115200
timeout = "300ms"
frame_gap = "2ms"
"#,
        store = store.display(),
        rtu = rtu.display(),
    );
    for unit in 1..=TCP_METERS {
        let profile = if unit % 2 == 0 { "sdm120" } else { "sdm630" };
        text.push_str(&format!(
            "[[meters]]\nid = \"m{unit}\"\nbus = \"lan\"\nunit_id = {unit}\nprofile = \"{profile}\"\ninterval = \"10ms\"\n"
        ));
    }
    for unit in 1..=2 {
        text.push_str(&format!(
            "[[meters]]\nid = \"r{unit}\"\nbus = \"rs485\"\nunit_id = {unit}\nprofile = \"sdm120\"\ninterval = \"20ms\"\n"
        ));
    }
    text
}

/// Committed ranges the agent logged, in order.
type Ranges = Arc<Mutex<Vec<(u64, u64)>>>;

async fn stop_under_load(signal: i32, run_for: Duration, min_accepted: u64) {
    let sims = CancellationToken::new();
    let resolve = |name: &str| {
        profile::builtin(name)
            .map(Arc::new)
            .expect("built-in profile")
    };
    let mut tcp_bus = SimBus::new();
    for unit in 1..=TCP_METERS {
        let p = if unit % 2 == 0 { "sdm120" } else { "sdm630" };
        tcp_bus = tcp_bus.with_meter(unit, SimMeter::new(resolve(p), u64::from(unit)));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let tcp = listener.local_addr().expect("addr").to_string();
    tokio::spawn(sim::serve_tcp(listener, Arc::new(tcp_bus), sims.clone()));
    let rtu_bus = SimBus::new()
        .with_meter(1, SimMeter::new(resolve("sdm120"), 31))
        .with_meter(2, SimMeter::new(resolve("sdm120"), 32));
    let (rtu_path, _rtu) = sim::rtu_pty(Arc::new(rtu_bus), sims.clone()).expect("pty pair");

    let dir = tempfile::tempdir().expect("temp dir");
    let store_path = dir.path().join("store");
    let config_path = dir.path().join("config.toml");
    let port = free_port();
    std::fs::write(
        &config_path,
        config_text(&store_path, port, &tcp, &rtu_path),
    )
    .expect("write config");

    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "warn,edge_agent::store=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let ranges: Ranges = Arc::default();
    let stderr = child.stderr.take().expect("piped stderr");
    let seen = ranges.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(range) = committed_range(&line) {
                seen.lock().expect("lock").push(range);
            }
        }
    });

    let mut sub =
        Subscriber::connect(loopback(port), "edge/sig-gw/#", Duration::from_secs(15)).await;
    let warmup = sub
        .collect_until(Duration::from_secs(15), |seen| {
            states_per_meter(seen).len() == usize::from(TCP_METERS) + 2
        })
        .await;
    assert_eq!(
        states_per_meter(&warmup).len(),
        usize::from(TCP_METERS) + 2,
        "every meter is polled before the signal"
    );
    // Run at least `run_for` and until `min_accepted` readings are committed (a
    // loaded machine polls slower; the signal must land under load either way).
    tokio::time::sleep(run_for).await;
    poll_until(Duration::from_secs(60), || async {
        let committed = ranges.lock().expect("lock").last().map_or(0, |r| r.1);
        ((), committed >= min_accepted)
    })
    .await;

    let before = ranges.lock().expect("lock").last().map_or(0, |r| r.1);
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let signalled = Instant::now();
    let offline = sub
        .collect_until(STOP_LIMIT, |seen| {
            seen.iter()
                .any(|m| m.topic == "edge/sig-gw/status" && m.payload == b"offline")
        })
        .await;
    let status = poll_until(STOP_LIMIT * 2, || {
        let status = child.try_wait().expect("try_wait");
        async move { (status, status.is_some()) }
    })
    .await;
    if status.is_none() {
        // Bounded: a hung agent is killed so the test fails instead of hanging.
        let _ = child.kill();
        let _ = child.wait();
    }
    let stop_time = signalled.elapsed();
    reader.join().expect("stderr reader");
    sims.cancel();

    let status = status.expect("the agent exits after the signal");
    assert_eq!(status.code(), Some(0), "exit code after signal {signal}");
    assert!(stop_time < STOP_LIMIT, "stopped in {stop_time:?}");
    assert!(
        offline
            .iter()
            .any(|m| m.topic == "edge/sig-gw/status" && m.payload == b"offline"),
        "offline published"
    );

    // The logged commits are consecutive from seq 1.
    let ranges = ranges.lock().expect("lock").clone();
    let mut next = 1;
    for &(a, b) in &ranges {
        assert_eq!(a, next, "commits are consecutive: {ranges:?}");
        assert!(b >= a);
        next = b + 1;
    }
    let accepted = next - 1;
    assert!(
        accepted >= min_accepted,
        "heavy polling: only {accepted} readings accepted (expected {min_accepted})"
    );

    let store = Store::open(&StoreConfig {
        path: store_path,
        ..StoreConfig::default()
    })
    .expect("store opens after the stop");
    let report = store::verify(&store).expect("verify");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        store.last_seq(),
        accepted,
        "the store holds exactly what the agent reported committed"
    );
    let records = store.read_range(1, accepted).expect("read all");
    assert_eq!(records.len() as u64, accepted);
    assert!(records
        .iter()
        .enumerate()
        .all(|(i, r)| r.seq == i as u64 + 1));
    println!(
        "signal {signal}: {accepted} readings stored ({} committed after the signal), stopped in {stop_time:?}",
        accepted - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_heavy_polling_loses_no_accepted_reading() {
    stop_under_load(libc::SIGTERM, Duration::from_secs(3), 500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_the_same_way() {
    stop_under_load(libc::SIGINT, Duration::from_secs(1), 200).await;
}
