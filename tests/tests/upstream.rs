//! Upstream sync end to end: the real agent (child process) polls simulated meters and
//! forwards to a real upstream broker (rumqttd in its own child process, so it can be
//! stopped and started again), through a fault-injecting TCP proxy where a test needs
//! one. `edge_agent::verify` checks upstream that everything arrived.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::acquire::profile;
use edge_agent::config::StoreConfig;
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent::store::{bench::sample_payload, Store};
use edge_agent::verify::{Report, Verifier, VerifyOptions};
use edge_agent_tests::{
    block_until, committed_range, free_port, lan_meters_toml, poll_until, wait_until,
    BrokerProcess, Proxy,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

const GW: &str = "up-gw";
const BATCH: u64 = 50;
const INFLIGHT: u64 = 4;
const CRASH_BATCH: u64 = 20;

/// Mosquitto (as CI installs it) on `port`, with a config of its own in `dir`.
fn start_mosquitto(port: u16, dir: &Path) -> BrokerProcess {
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"),
    )
    .expect("write mosquitto config");
    let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mosquitto");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto (apt-get install mosquitto)");
    block_until("mosquitto listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    BrokerProcess::from_child(child)
}

/// The tests crate's own broker (rumqttd) in a child process on `port`.
fn rumqttd(port: u16) -> BrokerProcess {
    BrokerProcess::start(env!("CARGO_BIN_EXE_upstream-broker"), port)
}

/// Simulated meters on Modbus TCP, polled every 20 ms.
async fn meters(stop: &CancellationToken) -> String {
    let resolve = |name: &str| profile::builtin(name).map(Arc::new).expect("profile");
    let bus = Arc::new(
        SimBus::new()
            .with_meter(1, SimMeter::new(resolve("sdm630"), 21))
            .with_meter(2, SimMeter::new(resolve("sdm120"), 22)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(sim::serve_tcp(listener, bus, stop.clone()));
    addr
}

fn write_config(
    dir: &Path,
    tcp: &str,
    upstream_port: u16,
    keep_alive: &str,
    batch: u64,
) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        r#"
gateway_id = "{GW}"
[store]
path = "{store}"
flush_interval = "30ms"
cache_capacity = "8MiB"
[mqtt]
listen = "127.0.0.1:{mqtt}"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
keep_alive = "{keep_alive}"
reconnect_min = "50ms"
reconnect_max = "500ms"
batch_records = {batch}
inflight_batches = {INFLIGHT}
manifest_interval = "1s"
{meters}"#,
        store = dir.join("store").display(),
        mqtt = free_port(),
        meters = lan_meters_toml(tcp),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// The agent as a child process; tracks the highest committed seq and keeps the
/// sync's log lines with the time they arrived.
struct Agent {
    child: Child,
    committed: Arc<Mutex<u64>>,
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Agent {
    fn start(config: &Path) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                "warn,edge_agent::store=debug,edge_agent::sync=info",
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let committed = Arc::new(Mutex::new(0u64));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (seen, lines) = (committed.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, last)) = committed_range(&line) {
                    let mut c = seen.lock().expect("lock");
                    *c = (*c).max(last);
                } else if line.contains("sync") {
                    lines.lock().expect("lock").push((Instant::now(), line));
                }
            }
        });
        Agent {
            child,
            committed,
            log,
        }
    }

    fn committed(&self) -> u64 {
        *self.committed.lock().expect("lock")
    }

    /// First log line after `since` containing `text`, with its arrival time.
    fn log_line_after(&self, since: Instant, text: &str) -> Option<(Instant, String)> {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .find(|(t, l)| *t >= since && l.contains(text))
            .cloned()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sigterm(&mut self) {
        // SAFETY: kill(2) with the pid of our own child; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn verifier(port: u16, resend: bool) -> Verifier {
    Verifier::start(VerifyOptions {
        port,
        gateways: vec![GW.to_string()],
        resend,
        resend_interval: Duration::from_millis(700),
        ..VerifyOptions::default()
    })
}

async fn wait_received(v: &Verifier, n: u64, limit: Duration) {
    let received = |v: &Verifier| v.report().gateways.get(GW).is_some_and(|g| g.received >= n);
    wait_until(&format!("upstream receiving {n} records"), limit, || {
        received(v)
    })
    .await;
}

/// Waits until everything the agent committed so far arrived upstream.
async fn complete(agent: &Agent, v: &Verifier) -> Report {
    // A freshly started agent commits its first readings after connecting to the meters.
    poll_until(Duration::from_secs(30), || async {
        ((), agent.committed() > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let until = agent.committed();
    assert!(until > 0, "the agent committed nothing in 30 s");
    // Generous: it returns as soon as everything arrived, and a loaded CI machine
    // drains a six-figure backlog slowly.
    let mut report = v.wait_complete(until, Duration::from_secs(180)).await;
    // Manifests go out every second while connected: wait for one to be checked.
    let checked = |r: &Report| r.gateways[GW].manifests.iter().any(|m| m.ok == Some(true));
    if !checked(&report) {
        report = poll_until(Duration::from_secs(10), || async {
            let r = v.report();
            let done = checked(&r);
            (r, done)
        })
        .await;
    }
    let mut text = Vec::new();
    report.print(&mut text).expect("print");
    println!("{}", String::from_utf8_lossy(&text));
    let g = &report.gateways[GW];
    assert!(
        g.highest >= until,
        "highest {} < committed {until}",
        g.highest
    );
    assert_eq!(g.missing_count, 0, "missing upstream: {:?}", g.missing);
    assert_eq!(
        g.manifests_failed(),
        0,
        "manifest mismatch: {:?}",
        g.manifests
    );
    assert!(
        g.manifests.iter().any(|m| m.ok == Some(true)),
        "no manifest was checked: {:?}",
        g.manifests
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_the_upstream_broker_loses_nothing_and_keeps_order() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_an_upstream_mosquitto_loses_nothing_and_keeps_order() {
    outage(true).await;
}

async fn outage(mosquitto: bool) {
    let stop = CancellationToken::new();
    let tcp = meters(&stop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let start_broker = |port| {
        if mosquitto {
            start_mosquitto(port, dir.path())
        } else {
            rumqttd(port)
        }
    };
    let mut broker = start_broker(port);
    let v = verifier(port, true);
    let agent = Agent::start(&write_config(dir.path(), &tcp, port, "2s", BATCH));
    wait_received(&v, 100, Duration::from_secs(30)).await;

    broker.kill();
    let during = agent.committed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        agent.committed() > during + 50,
        "polling goes on while upstream is down"
    );
    let restart = Instant::now();
    let _broker = start_broker(port);
    let ready = Instant::now();
    let report = complete(&agent, &v).await;
    let (connected, _) = agent
        .log_line_after(restart, "upstream connected")
        .expect("the agent reconnected");
    let took = connected.saturating_duration_since(ready);
    println!(
        "reconnected {} ms after the broker came back",
        took.as_millis()
    );
    assert!(
        took < Duration::from_millis(1500),
        "reconnect took {took:?}"
    );
    let g = &report.gateways[GW];
    assert_eq!(g.out_of_order, 0, "records arrived out of order");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_drain_loses_nothing_and_bounds_duplicates() {
    const KILLS: u64 = 20;
    const PREFILL: u64 = 100_000;
    let stop = CancellationToken::new();
    let tcp = meters(&stop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A backlog to drain, as after a long outage.
    {
        let store = Store::open(&StoreConfig {
            path: dir.path().join("store"),
            ..StoreConfig::default()
        })
        .expect("open store");
        for chunk in 0..PREFILL / 1000 {
            store
                .append(
                    (0..1000)
                        .map(|i| sample_payload("old", chunk * 1000 + i))
                        .collect(),
                )
                .expect("prefill");
        }
    }
    let port = free_port();
    let _broker = rumqttd(port);
    // No resend requests: every duplicate comes from a replay after a kill.
    let v = verifier(port, false);
    // Small batches make the drain last through the kills.
    let config = write_config(dir.path(), &tcp, port, "5s", CRASH_BATCH);
    let mut rng = rand::thread_rng();
    let mut received = Vec::new();
    for round in 0..KILLS {
        let mut agent = Agent::start(&config);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..700))).await;
        agent.sigkill();
        received.push(v.report().gateways.get(GW).map_or(0, |g| g.received));
        println!(
            "round {round}: {} received upstream so far",
            received[received.len() - 1]
        );
    }
    let mid_drain = received.iter().filter(|&&n| n < PREFILL).count();
    assert!(
        mid_drain >= 15,
        "most kills must land during the drain: {received:?}"
    );
    let agent = Agent::start(&config);
    let report = complete(&agent, &v).await;
    let g = &report.gateways[GW];
    let bound = INFLIGHT * CRASH_BATCH * KILLS;
    println!(
        "duplicates {} (bound: {INFLIGHT} batches x {CRASH_BATCH} records x {KILLS} kills = {bound})",
        g.duplicates
    );
    assert!(
        g.duplicates <= bound,
        "duplicates {} > {bound}",
        g.duplicates
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_loses_nothing() {
    let stop = CancellationToken::new();
    let tcp = meters(&stop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _broker = rumqttd(port);
    let proxy = Proxy::start(edge_agent_tests::loopback(port)).await;
    let v = verifier(port, true);
    let agent = Agent::start(&write_config(
        dir.path(),
        &tcp,
        proxy.addr.port(),
        "2s",
        BATCH,
    ));
    wait_received(&v, 50, Duration::from_secs(30)).await;
    let mut rng = rand::thread_rng();
    let until = Instant::now() + Duration::from_secs(6);
    let mut drops = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        proxy.drop_connections();
        drops += 1;
    }
    complete(&agent, &v).await;
    println!(
        "{drops} drops, {} connections through the proxy",
        proxy.accepted()
    );
    assert!(proxy.accepted() >= 6, "the link did not really flap");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_detected_within_one_and_a_half_keepalives() {
    let stop = CancellationToken::new();
    let tcp = meters(&stop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _broker = rumqttd(port);
    let proxy = Proxy::start(edge_agent_tests::loopback(port)).await;
    let v = verifier(port, true);
    let keep_alive = Duration::from_secs(2);
    let agent = Agent::start(&write_config(
        dir.path(),
        &tcp,
        proxy.addr.port(),
        "2s",
        BATCH,
    ));
    wait_received(&v, 50, Duration::from_secs(30)).await;

    let start = Instant::now();
    proxy.set_black_hole(true);
    // The log line's own time is the moment of detection, whenever the poll sees it.
    let detected = poll_until(keep_alive * 3, || {
        let seen = agent.log_line_after(start, "link silent").map(|(t, _)| t);
        async move { (seen, seen.is_some()) }
    })
    .await
    .unwrap_or_else(|| panic!("black hole not detected after {:?}", start.elapsed()));
    let took = detected.duration_since(start);
    println!(
        "black hole detected after {} ms (keepalive 2 s)",
        took.as_millis()
    );
    assert!(took <= keep_alive * 3 / 2, "detected after {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_black_hole(false);
    complete(&agent, &v).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_cli_repairs_what_upstream_did_not_keep() {
    let stop = CancellationToken::new();
    let tcp = meters(&stop).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _broker = rumqttd(port);
    // This subscriber sees the first records go by and keeps none of them.
    let forgetful = verifier(port, false);
    let mut agent = Agent::start(&write_config(dir.path(), &tcp, port, "2s", BATCH));
    wait_received(&forgetful, 200, Duration::from_secs(30)).await;
    drop(forgetful);

    // A verify that starts now has not seen seqs 1..: without resends it fails...
    tokio::time::sleep(Duration::from_millis(300)).await;
    let until = agent.committed();
    let broker = format!("mqtt://127.0.0.1:{port}");
    let cli = move |extra: &[&str]| {
        let mut args = vec![
            "verify".to_string(),
            "--broker".into(),
            broker.clone(),
            "--gateway".into(),
            GW.into(),
            "--until".into(),
            until.to_string(),
            "--resend-interval".into(),
            "500ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
            .args(args)
            .output()
            .expect("run verify")
    };
    let blind = tokio::task::spawn_blocking({
        let cli = cli.clone();
        move || cli(&["--no-resend", "--wait", "3s"])
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&blind.stdout).to_string();
    assert_eq!(blind.status.code(), Some(2), "{text}");
    assert!(text.contains("missing 1..="), "{text}");

    // ...and with resends the gap closes.
    let repaired = tokio::task::spawn_blocking(move || cli(&["--wait", "30s"]))
        .await
        .expect("join");
    let text = String::from_utf8_lossy(&repaired.stdout).to_string();
    println!("{text}");
    assert_eq!(repaired.status.code(), Some(0), "{text}");
    assert!(text.contains("complete: nothing missing"), "{text}");
    assert!(!text.contains("resend requests 0"), "{text}");
    agent.sigterm();
    stop.cancel();
}
