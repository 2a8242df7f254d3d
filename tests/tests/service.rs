//! Running under systemd: the agent, as a child process with `NOTIFY_SOCKET` pointing at
//! a real `AF_UNIX` datagram socket, reports `READY=1` once its broker accepts
//! connections, feeds the watchdog (`WATCHDOG=1` at half of `WATCHDOG_USEC`) and says
//! `STOPPING=1` on SIGTERM. A panic anywhere ends the process with SIGABRT.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent_tests::{free_port, loopback};

fn recv(sock: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The first notification, which must be `READY=1`. When it is not, the message says
/// whether the agent still runs and ends with the last lines of its log, the one place
/// that says why (an address taken, a store that would not open).
fn expect_ready(sock: &UnixDatagram, child: &mut Child, log: &Path) {
    let first = recv(sock);
    if first.as_deref() == Some("READY=1") {
        return;
    }
    let state = match child.try_wait() {
        Ok(Some(status)) => format!("the agent ended: {status}"),
        Ok(None) => "the agent still runs".to_string(),
        Err(e) => format!("the agent's state is unknown: {e}"),
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(30).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!(
        "first notification {first:?}, expected READY=1; {state}; its log ends:\n{}",
        tail.join("\n")
    );
}

/// A file for the agent's log (stderr), kept in the test's temp dir.
fn log_file(dir: &Path) -> (PathBuf, Stdio) {
    let path = dir.join("agent.log");
    let file = std::fs::File::create(&path).expect("create the agent's log file");
    (path, Stdio::from(file))
}

#[test]
fn agent_notifies_ready_feeds_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let port = free_port();
    let (log, stderr) = log_file(dir.path());
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--interval", "200ms"])
        .env("NOTIFY_SOCKET", &sock_path)
        // 400 ms: a ping every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the agent");

    expect_ready(&sock, &mut child, &log);
    // READY means the broker accepts connections already.
    TcpStream::connect(loopback(port)).expect("broker listening at READY=1");
    let ready_after = started.elapsed();

    let mut pings = Vec::new();
    let watch_from = Instant::now();
    while pings.len() < 5 {
        match recv(&sock).as_deref() {
            Some("WATCHDOG=1") => pings.push(watch_from.elapsed()),
            other => panic!("expected WATCHDOG=1, got {other:?}"),
        }
    }
    let spread = pings[4] - pings[0];
    // Four periods of 200 ms: not much faster (a busy loop) nor much slower.
    assert!(
        spread >= Duration::from_millis(600) && spread <= Duration::from_millis(2000),
        "4 watchdog periods took {spread:?}"
    );

    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut stopping = false;
    while let Some(msg) = recv(&sock) {
        if msg == "STOPPING=1" {
            stopping = true;
            break;
        }
        assert_eq!(msg, "WATCHDOG=1", "unexpected notification");
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "exit 0 after SIGTERM");
    println!("READY=1 after {ready_after:?}; 4 watchdog periods in {spread:?}");
}

#[test]
fn watchdog_meant_for_another_pid_is_not_fed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let port = free_port();
    let (log, stderr) = log_file(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"))
        .arg("demo")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        // systemd sets WATCHDOG_PID to the main process; here it names another one.
        .env("WATCHDOG_PID", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the agent");
    expect_ready(&sock, &mut child, &log);
    sock.set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let next = recv(&sock);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(next, None, "no WATCHDOG=1 for a watchdog of another pid");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_panic_in_a_task_aborts_the_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_panic-probe"))
        .output()
        .expect("run the probe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "status {:?}, stdout {stdout}, stderr {stderr}",
        out.status
    );
    assert!(
        stderr.contains("probe panic inside a task"),
        "the panic message reaches stderr: {stderr}"
    );
    assert!(!stdout.contains("still running"), "{stdout}");
}
