//! Helpers shared by the tests of both crates (`edge-agent-tests` re-exports them) and
//! the benchmarks: the one free-port helper and the one bounded wait.
//!
//! Where the code under test can take a listener (the HTTP interface: `Hooks::
//! http_listener`; the simulators: `sim::serve_tcp`), tests bind it once and hand it
//! over. [`free_port`] is for what cannot: rumqttd binds its own address and cannot
//! report the port it got for port 0, and a child process is given an address.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// A loopback port that was free a moment ago, for a server that binds it itself
/// (rumqttd, a child process). Another program may take it before the server does;
/// the window is short, and servers that can take a listener get one instead.
///
/// The port comes from below the kernel's ephemeral range (32768 and up on Linux):
/// a port the kernel handed out for port 0 is also where it puts the source port of
/// the next outgoing connection, so a test's own clients could take it back before
/// the server binds it. Each call in a process moves on to the next port, from a start
/// that differs per process, so parallel tests do not get the same one.
/// Panics when no loopback port can be bound (nothing of the agent could run then).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let start = rand::random::<u32>() % COUNT;
        // Only the first caller's start counts; the others move on from it.
        let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..COUNT {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        // FIRST + offset < 32_000: it fits a u16.
        let port = (FIRST + offset) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// How often [`poll_until`] asks again.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Calls `probe` until it says it is done or `limit` has passed, and returns its last
/// answer: for state only visible by asking (an HTTP API, a store, a child process),
/// where no event says that it changed. The caller asserts on what comes back.
pub async fn poll_until<T, F, Fut>(limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (T, bool)>,
{
    let deadline = Instant::now() + limit;
    loop {
        let (value, done) = probe().await;
        if done || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`poll_until`] for a plain condition: waits until `done()` holds, and panics
/// naming `what` when it does not within `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let held = poll_until(limit, || {
        let now = done();
        async move { (now, now) }
    })
    .await;
    assert!(held, "{what}: not within {limit:?}");
}

/// [`wait_until`] for code outside a runtime (a child process started from a plain
/// function): blocks the thread between the checks.
pub fn block_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        std::thread::sleep(POLL_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_until_returns_once_done_and_names_what_did_not_happen() {
        let mut calls = 0;
        block_until("third call", Duration::from_secs(10), || {
            calls += 1;
            calls == 3
        });
        assert_eq!(calls, 3);
        let failed = std::panic::catch_unwind(|| {
            block_until("never", Duration::from_millis(120), || false);
        })
        .expect_err("a condition that never holds panics");
        let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.starts_with("never: not within"), "{message}");
    }

    #[tokio::test(start_paused = true)]
    async fn polls_until_done_or_the_limit() {
        let mut calls = 0;
        let got = poll_until(Duration::from_secs(10), || {
            calls += 1;
            let n = calls;
            async move { (n, n == 3) }
        })
        .await;
        assert_eq!(got, 3);
        let started = Instant::now();
        let last = poll_until(Duration::from_secs(1), || async { (7, false) }).await;
        assert_eq!(last, 7);
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "the flag: not within")]
    async fn wait_until_names_what_did_not_happen() {
        wait_until("the flag", Duration::from_secs(1), || false).await;
    }
}
