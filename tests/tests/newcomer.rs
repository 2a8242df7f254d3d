//! The README's first steps as a new user takes them: the demo on a machine where a
//! port is already taken, the URL and the `verify` command its banner prints.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use edge_agent_tests::{free_port, http_get, wait_ready};

fn demo(dir: &std::path::Path, mqtt: &str, http: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-agent-under-test"));
    cmd.arg("demo")
        .arg("--data-dir")
        .arg(dir)
        .args(["--mqtt-listen", mqtt])
        .args(["--upstream-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", http])
        .args(["--no-history", "--interval", "300ms"])
        // As a person's shell would run it: not through cargo.
        .env_remove("CARGO")
        .env_remove("CARGO_PKG_NAME")
        .stdin(Stdio::null());
    cmd
}

/// Runs the demo to its end (it must end by itself) within a bounded time.
async fn run_to_end(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the demo");
    let pid = child.id();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match out {
        Ok(out) => out.expect("join").expect("demo output"),
        Err(_) => {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the demo did not exit with its port taken");
        }
    }
}

/// A port another program holds: the demo says which, once, names the option that
/// changes it, exits 1, and prints no banner with addresses it does not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_named_once_with_its_option_and_the_demo_exits() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    for (mqtt, http, flag) in [
        (held.as_str(), "127.0.0.1:0", "--mqtt-listen"),
        (
            &*format!("127.0.0.1:{}", free_port()),
            held.as_str(),
            "--http-listen",
        ),
    ] {
        let out = run_to_end(demo(dir.path(), mqtt, http)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(
            stderr.contains(&held) && stderr.contains(flag),
            "{flag}: {stderr}"
        );
        assert_eq!(stderr.matches("in use").count(), 1, "{flag}: {stderr}");
        assert!(
            !stdout.contains("http://"),
            "{flag}: banner shown: {stdout}"
        );
    }
    drop(taken);
}

/// Kills the child when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The banner's status URL is served (port 0 asks for any free port: the banner
/// gives the one bound), and its `verify` command runs as printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banner_gives_a_served_url_and_a_verify_command_that_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = demo(
        dir.path(),
        &format!("127.0.0.1:{}", free_port()),
        "127.0.0.1:0",
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().expect("piped stdout");
    let _demo = Reaped(child);
    let banner = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("banner line");
                let last = line.contains("Ctrl-C");
                lines.push(line);
                if last {
                    break;
                }
            }
            lines
        }),
    )
    .await
    .expect("the banner within 30 s")
    .expect("join");
    let field = |name: &str| {
        banner
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{name}` line in {banner:#?}"))
    };

    let status = field("status:");
    let url = status.split_whitespace().next().expect("a URL");
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|r| r.strip_suffix('/'))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("not a URL: {status}"));
    assert_ne!(addr.port(), 0, "the bound port, not the one asked for");
    assert_eq!(wait_ready(addr, Duration::from_secs(30)).await.status, 200);
    assert_eq!(http_get(addr, "/").await.status, 200);
    assert_eq!(http_get(addr, "/api/v1").await.status, 200);

    let verify = field("verify upstream:");
    let words: Vec<&str> = verify.split_whitespace().collect();
    assert_eq!(
        words[0],
        env!("CARGO_BIN_EXE_edge-agent-under-test"),
        "outside cargo, the program's own path: {verify}"
    );
    assert_eq!(words[1], "verify", "{verify}");
    // As printed, with a shorter wait.
    let args: Vec<&str> = words[1..]
        .iter()
        .map(|w| if *w == "30s" { "3s" } else { w })
        .collect();
    let out = Command::new(words[0])
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run the printed verify command");
    let report = String::from_utf8_lossy(&out.stdout);
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "a report, complete or not: {:?}\n{report}\n{progress}",
        out.status
    );
    assert!(report.contains("demo-gw"), "{report}\n{progress}");
    assert!(
        progress.starts_with("verify: listening on mqtt://"),
        "{progress}"
    );
}
