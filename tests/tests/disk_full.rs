//! A full disk, for real: the agent runs as a child process with its store on a small
//! tmpfs that the test fills with a file. Starting on a full disk, it waits for room
//! instead of exiting; filled while it polls, it keeps polling, holds the readings in
//! memory and writes them once the file goes. It never exits on its own, and the store
//! it leaves is clean and gap-free. Mounting needs root (CI runs as root); elsewhere the
//! test fails and says so.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_agent::acquire::profile;
use edge_agent::config::StoreConfig;
use edge_agent::sim::{self, SimBus, SimMeter};
use edge_agent::store::{self, Store};
use edge_agent_tests::{committed_range, free_port, lan_meters_toml, wait_until};
use tokio_util::sync::CancellationToken;

/// A tmpfs on a temp dir, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a `size` tmpfs; needs root (CI runs the tests as root). Without it the
    /// test fails and says why, rather than passing without having run.
    fn mount(size: &str) -> SmallFs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the full-disk test mounts a {size} tmpfs, which needs root (CI runs the tests as root); run it as root"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => SmallFs { dir },
            other => panic!(
                "the full-disk test cannot mount a {size} tmpfs on {} ({other:?}): it needs root and the `mount` program (util-linux)",
                dir.path().display()
            ),
        }
    }

    fn free(&self) -> u64 {
        let c =
            std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: statvfs only writes into the struct we pass; zeroed is valid.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and a live statvfs.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs");
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Writes a filler file until at most `leave` bytes are free.
    fn fill_until(&self, leave: u64) -> PathBuf {
        let path = self.dir.path().join("filler");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("filler"));
        let chunk = vec![0x5Au8; 64 << 10];
        let mut left = self.free().saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if file.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = file.flush();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The agent's stderr lines and the highest committed seq, as they arrive.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    committed: u64,
}

fn spawn_agent(config: &Path) -> (Child, Arc<Mutex<Log>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,edge_agent::store=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let log = Arc::new(Mutex::new(Log::default()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().expect("lock");
            if let Some((_, last)) = committed_range(&line) {
                log.committed = log.committed.max(last);
            } else {
                log.lines.push(line);
            }
        }
    });
    (child, log)
}

fn count(log: &Mutex<Log>, text: &str) -> usize {
    log.lock()
        .expect("lock")
        .lines
        .iter()
        .filter(|l| l.contains(text))
        .count()
}

fn committed(log: &Mutex<Log>) -> u64 {
    log.lock().expect("lock").committed
}

fn alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_stops_the_agent_and_writing_resumes_when_space_returns() {
    let fs = SmallFs::mount("24m");
    let sims = CancellationToken::new();
    let resolve = |name: &str| profile::builtin(name).map(Arc::new).expect("profile");
    let bus = Arc::new(
        SimBus::new()
            .with_meter(1, SimMeter::new(resolve("sdm630"), 31))
            .with_meter(2, SimMeter::new(resolve("sdm120"), 32)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let tcp = listener.local_addr().expect("addr").to_string();
    tokio::spawn(sim::serve_tcp(listener, bus, sims.clone()));

    let store_path = fs.dir.path().join("store");
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
gateway_id = "full-gw"
[store]
path = "{store}"
flush_interval = "30ms"
cache_capacity = "4MiB"
min_free_space = "4MiB"
[mqtt]
listen = "127.0.0.1:{mqtt}"
[http]
listen = "127.0.0.1:{http}"
{meters}"#,
            store = store_path.display(),
            mqtt = free_port(),
            http = free_port(),
            meters = lan_meters_toml(&tcp),
        ),
    )
    .expect("write config");

    // 1. Start on a full disk: the store cannot be opened, the agent waits for room.
    let filler = fs.fill_until(0);
    let (mut child, log) = spawn_agent(&config);
    wait_until(
        "the open failure is logged",
        Duration::from_secs(20),
        || count(&log, "disk full: cannot open the store") == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(alive(&mut child), "the agent exited on a full disk");
    assert_eq!(
        count(&log, "disk full: cannot open the store"),
        1,
        "one line, not one per try"
    );
    std::fs::remove_file(&filler).expect("remove filler");
    wait_until(
        "readings committed once the disk has room",
        Duration::from_secs(20),
        || committed(&log) > 50,
    )
    .await;

    // 2. The disk fills while the agent polls: commits wait in memory.
    let filler = fs.fill_until(2 << 20);
    wait_until("the full disk is logged", Duration::from_secs(20), || {
        count(&log, "store cannot write") == 1
    })
    .await;
    let stalled_at = committed(&log);
    let full_from = edge_agent::model::now_ms();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full_to = edge_agent::model::now_ms();
    assert!(
        alive(&mut child),
        "the agent exited while the disk was full"
    );
    assert_eq!(
        committed(&log),
        stalled_at,
        "nothing written while the disk is full"
    );
    assert_eq!(
        count(&log, "store cannot write"),
        1,
        "one line per change of state"
    );
    std::fs::remove_file(&filler).expect("remove filler");
    wait_until("writing resumes", Duration::from_secs(20), || {
        count(&log, "store writes again") == 1 && committed(&log) > stalled_at + 100
    })
    .await;
    let resumed = committed(&log);
    println!(
        "committed up to seq {stalled_at} before the disk filled, {resumed} soon after space returned"
    );

    // 3. A clean stop; the store is clean and gap-free, the held readings in it.
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "clean exit, got {status:?}");
    assert_eq!(
        count(&log, "could not write"),
        0,
        "nothing lost at the stop"
    );
    sims.cancel();
    let store = Store::open(&StoreConfig {
        path: store_path,
        ..StoreConfig::default()
    })
    .expect("store opens");
    let report = store::verify(&store).expect("verify");
    println!("store after the full disk: {report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert!(report.last_seq >= resumed);
    assert_eq!(report.ok, report.last_seq, "every seq from 1, once");
    // Polling went on while the disk was full: those readings were held and written.
    let held = store
        .readings("main", full_from, full_to)
        .expect("readings");
    println!(
        "readings of `main` taken while the disk was full ({} ms): {}",
        full_to - full_from,
        held.len()
    );
    assert!(held.len() > 30, "{} readings", held.len());
    assert!(held.iter().all(|r| r.seq > stalled_at));
    drop(store);
}
