//! Crash safety: the agent runs as a child process and is killed with SIGKILL at
//! random points while polling and taking pushes, many times in a row. After each
//! kill the store must open, hold every reading the agent had written to its journal
//! and every push it acknowledged (with a valid CRC, unchanged), and its sequence
//! numbers must have no gap and no reuse.
//!
//! The journal is synced only for pushes here (`sync_interval` far longer than a
//! round): polled readings written to the journal but not synced yet are what a
//! kill inside the old commit window (accepted, fsync not returned) used to lose.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_agent::acquire::profile;
use edge_agent::broker::rfc3339_ms;
use edge_agent::config::StoreConfig;
use edge_agent::model::{now_ms, Record};
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent::store::{self, Store};
use edge_agent_tests::{committed_range, free_port, http_request, lan_meters_toml};
use rand::Rng;
use tokio_util::sync::CancellationToken;

const KILLS: usize = 20;
const TOKEN: &str = "crash-token-0123456789";

fn config_text(
    store: &Path,
    runtime_dir: &Path,
    mqtt_port: u16,
    http_port: u16,
    tcp: &str,
    rtu: &Path,
) -> String {
    format!(
        r#"
gateway_id = "crash-gw"
[store]
path = "{store}"
runtime_dir = "{runtime_dir}"
flush_interval = "30ms"
cache_capacity = "8MiB"
sync_interval = "60s"
[mqtt]
listen = "127.0.0.1:{mqtt_port}"
[http]
listen = "127.0.0.1:{http_port}"
token = "{TOKEN}"
{lan}[[buses]]
id = "rs485"
type = "rtu"
port = "{rtu}"
timeout = "300ms"
frame_gap = "2ms"
[[meters]]
id = "heatpump"
bus = "rs485"
unit_id = 1
profile = "sdm120"
interval = "50ms"
"#,
        store = store.display(),
        runtime_dir = runtime_dir.display(),
        rtu = rtu.display(),
        lan = lan_meters_toml(tcp),
    )
}

/// The highest journaled and synced seqs, as the reader thread saw them.
type Seqs = Arc<Mutex<(u64, u64)>>;

/// Highest seqs the child reported as written to its journal (`committed seq`) and
/// as synced (`synced seq`), from its debug log. The reader thread ends when the
/// child's stderr closes (it exited or was killed).
fn spawn_agent(config: &Path) -> (Child, Seqs, std::thread::JoinHandle<()>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,edge_agent::store=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let accepted = Arc::new(Mutex::new((0u64, 0u64)));
    let stderr = child.stderr.take().expect("piped stderr");
    let seen = accepted.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut a = seen.lock().expect("lock");
            if let Some((_, last)) = committed_range(&line) {
                a.0 = a.0.max(last);
            }
            let synced = line.split("synced seq ..=").nth(1);
            if let Some(seq) = synced.and_then(|s| s.trim().parse::<u64>().ok()) {
                a.1 = a.1.max(seq);
            }
        }
    });
    (child, accepted, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_accepted_reading() {
    kill_rounds(false).await;
}

/// The same with a runtime journal (`store.runtime_dir`, as packaged): the journal on
/// disk gets records only at its syncs, the runtime journal keeps them across kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_accepted_reading_with_a_runtime_journal() {
    kill_rounds(true).await;
}

async fn kill_rounds(runtime: bool) {
    let sims = CancellationToken::new();
    let resolve = |name: &str| {
        profile::builtin(name)
            .map(Arc::new)
            .expect("built-in profile")
    };
    let tcp_bus = Arc::new(
        SimBus::new()
            .with_meter(1, SimMeter::new(resolve("sdm630"), 11))
            .with_meter(2, SimMeter::new(resolve("sdm120"), 12)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let tcp = listener.local_addr().expect("addr").to_string();
    tokio::spawn(sim::serve_tcp(listener, tcp_bus, sims.clone()));
    let rtu_bus = Arc::new(SimBus::new().with_meter(1, SimMeter::new(resolve("sdm120"), 13)));
    let (rtu_path, _rtu) = sim::rtu_pty(rtu_bus, sims.clone()).expect("pty pair");

    let dir = tempfile::tempdir().expect("temp dir");
    let store_path = dir.path().join("store");
    // Empty: no runtime journal.
    let runtime_dir = if runtime {
        dir.path().join("run")
    } else {
        PathBuf::new()
    };
    let config_path = dir.path().join("config.toml");
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        &config_path,
        config_text(
            &store_path,
            &runtime_dir,
            free_port(),
            http.port(),
            &tcp,
            &rtu_path,
        ),
    )
    .expect("write config");
    let store_config = StoreConfig {
        path: store_path.clone(),
        runtime_dir: runtime_dir.clone(),
        ..StoreConfig::default()
    };

    // Every record seen after an earlier kill: a later run must never change them.
    let mut known: BTreeMap<u64, Record> = BTreeMap::new();
    let mut rng = rand::thread_rng();
    let mut total_accepted = 0;
    // Timestamps of the pushes answered 200, over all rounds.
    let mut acknowledged: BTreeSet<i64> = BTreeSet::new();
    let push_base = now_ms() - 600_000;
    let mut next_push = 0i64;
    let mut unsynced_rounds = 0;
    for round in 0..KILLS {
        let (mut child, accepted, reader) = spawn_agent(&config_path);
        let wait = rng.gen_range(300..1500);
        let pushes = push_until(
            http,
            push_base,
            &mut next_push,
            tokio::time::Instant::now() + Duration::from_millis(wait),
        )
        .await;
        child.kill().expect("SIGKILL the agent");
        let status = child.wait().expect("reap the agent");
        assert!(!status.success(), "round {round}: agent was killed");
        // The stderr reader has every line the child wrote once the pipe closed.
        reader.join().expect("stderr reader");
        let (accepted, synced) = *accepted.lock().expect("lock");
        if accepted > synced {
            unsynced_rounds += 1;
        }
        acknowledged.extend(pushes);

        let store = Store::open(&store_config)
            .unwrap_or_else(|e| panic!("round {round}: store does not open: {e}"));
        let report = store::verify(&store).expect("verify");
        assert_eq!(
            report.quarantined, 0,
            "round {round}: CRC failures {report:?}"
        );
        assert!(report.gaps.is_empty(), "round {round}: gaps {report:?}");
        assert_eq!(report.duplicates, 0, "round {round}: duplicates {report:?}");
        let last = store.last_seq();
        assert!(
            last >= accepted,
            "round {round}: accepted up to seq {accepted}, store ends at {last}"
        );
        let records = store.read_range(1, last).expect("read all");
        assert_eq!(records.len() as u64, last, "round {round}: seqs 1..={last}");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "round {round}: seq order");
            if let Some(before) = known.get(&r.seq) {
                assert_eq!(before, r, "round {round}: seq {} was reused", r.seq);
            }
        }
        let pushed: BTreeSet<i64> = records
            .iter()
            .filter_map(|r| r.payload.as_reading())
            .filter(|r| r.meter == "pushed")
            .map(|r| r.ts_ms)
            .collect();
        let lost: Vec<&i64> = acknowledged.difference(&pushed).collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged pushes lost: {lost:?}"
        );
        // Only accepted records are promised to survive; remember those.
        for r in records.into_iter().filter(|r| r.seq <= accepted) {
            known.insert(r.seq, r);
        }
        // Seqs run on across rounds: a round killed before its first commit reports 0.
        total_accepted = total_accepted.max(accepted);
        drop(store);
        println!(
            "round {round}: killed after {wait} ms, accepted {accepted} (synced {synced}), stored {last}, {} pushes acknowledged",
            acknowledged.len()
        );
    }
    assert!(
        total_accepted > 100,
        "the agent accepted too few readings ({total_accepted}) for the test to mean much"
    );
    assert!(
        acknowledged.len() > 20,
        "too few pushes acknowledged ({}) for the test to mean much",
        acknowledged.len()
    );
    // Kills while accepted readings waited for their sync: all of them were kept.
    assert!(
        unsynced_rounds > 0,
        "no kill came while readings waited for a sync"
    );
    println!("{unsynced_rounds} of {KILLS} kills came while accepted readings were not synced");
    sims.cancel();
}

/// Pushes one reading at a time (meter `pushed`, a new timestamp each) until
/// `until`, and returns the timestamps of those answered 200. Refused connections
/// (the agent still starting) are retried.
async fn push_until(
    http: SocketAddr,
    base: i64,
    next: &mut i64,
    until: tokio::time::Instant,
) -> Vec<i64> {
    let mut acknowledged = Vec::new();
    let auth = format!("Bearer {TOKEN}");
    while tokio::time::Instant::now() < until {
        let ts = base + *next;
        *next += 1;
        let body = format!(
            "meter,timestamp,quantity,value,unit\npushed,{},power,{}.5,W\n",
            rfc3339_ms(ts),
            *next
        );
        let headers = [
            ("Content-Type", "text/csv"),
            ("Authorization", auth.as_str()),
        ];
        let request = http_request(http, "POST", "/api/v1/ingest", &headers, body.as_bytes());
        match tokio::time::timeout_at(until, request).await {
            Ok(Ok(r)) if r.status == 200 => {
                acknowledged.push(ts);
                // Paced: polled readings wait for their sync in between.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Ok(r)) => panic!("push answered {}: {}", r.status, r.text()),
            // Not listening yet, or the kill came first: not acknowledged.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(_) => break,
        }
    }
    acknowledged
}
