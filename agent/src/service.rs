//! Running under systemd: readiness and watchdog notifications (`sd_notify`), a
//! liveness check of the pipeline stages, and a panic hook that aborts.
//!
//! The notification protocol is one datagram per message to the `AF_UNIX` socket named
//! by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`). Outside
//! systemd the variable is unset and every call here is a no-op.
//!
//! The watchdog is fed only while the stages make progress. Each stage exposes a
//! heartbeat: a counter the stage itself bumps as it works (a meter's start of the last
//! poll, the store's last durable seq). A [`Liveness`] check remembers when each counter
//! last moved; a stage that has work but whose counter has not moved for its limit is
//! stalled, and then `WATCHDOG=1` stops, so systemd kills and restarts the agent after
//! `WatchdogSec=`. The check uses only the monotonic clock: a wall-clock jump (a Pi
//! without RTC setting its clock from NTP) never looks like a stall.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The notification socket from `$NOTIFY_SOCKET`, if the service manager set one.
// Kept over the `sd-notify` crate: it opens a blocking socket per message (a full
// systemd queue would block a runtime thread), rereads the environment each time and
// takes an `@abstract` name for a path; this keeps one non-blocking socket.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
}

#[derive(Debug)]
enum Target {
    Path(std::path::PathBuf),
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. An unusable value is logged and ignored: the agent runs
    /// without notifications rather than not at all.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        match Notifier::connect(&name) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "NOTIFY_SOCKET unusable; no sd_notify");
                Notifier::disabled()
            }
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier for the socket `name` (a path, or `@abstract-name`).
    pub fn connect(name: &std::ffi::OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        let target = match bytes.first() {
            None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty name")),
            #[cfg(target_os = "linux")]
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            Some(_) => Target::Path(name.into()),
        };
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must never block a runtime thread: drop the message.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some((socket, target)),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (e.g. `READY=1`). Errors are returned for tests; callers
    /// in the agent log and go on.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some((socket, target)) = &self.target else {
            return Ok(());
        };
        match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path).map(|_| ()),
            #[cfg(target_os = "linux")]
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
            }
        }
    }

    fn notify_logged(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "sd_notify failed");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog is on and
/// meant for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_period() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// One stage's heartbeat: `read` returns the stage's progress counter and whether the
/// stage has work waiting (an idle stage is healthy however old its counter is).
struct Probe {
    name: String,
    limit: Duration,
    read: Box<dyn Fn() -> (i64, bool) + Send + Sync>,
    last_value: Option<i64>,
    moved_at: Instant,
}

/// The liveness check of the pipeline's stages; see the module documentation.
#[derive(Default)]
pub struct Liveness {
    probes: Vec<Probe>,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.probes.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("Liveness").field("probes", &names).finish()
    }
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// Watches a stage: it is stalled when `read` reports work waiting and its counter
    /// has not changed for `limit`.
    pub fn watch(
        &mut self,
        name: impl Into<String>,
        limit: Duration,
        read: impl Fn() -> (i64, bool) + Send + Sync + 'static,
    ) {
        self.probes.push(Probe {
            name: name.into(),
            limit,
            read: Box::new(read),
            last_value: None,
            moved_at: Instant::now(),
        });
    }

    /// Samples every heartbeat at `now`; names the first stalled stage.
    pub fn check(&mut self, now: Instant) -> Result<(), String> {
        let mut stalled = None;
        for p in &mut self.probes {
            let (value, busy) = (p.read)();
            if p.last_value != Some(value) || !busy {
                p.last_value = Some(value);
                p.moved_at = now;
                continue;
            }
            let still = now.saturating_duration_since(p.moved_at);
            if still > p.limit && stalled.is_none() {
                stalled = Some(format!(
                    "{} made no progress for {} s (limit {} s)",
                    p.name,
                    still.as_secs(),
                    p.limit.as_secs()
                ));
            }
        }
        stalled.map_or(Ok(()), Err)
    }
}

/// Extra time a stage gets beyond its own schedule before it counts as stalled: an SD
/// card's fsync can take seconds, and an emulated or loaded Pi is slow.
const STALL_SLACK: Duration = Duration::from_secs(60);

/// The agent pipeline's heartbeats:
/// - the store writer: its counter is the store's last durable seq; it has work while
///   fewer readings were committed than the forwarder handed it (`forwarded`, counted
///   from `start_seq`, the last seq when the run began), unless the store refuses
///   commits for a full disk (then it holds them, and says so in its figures);
/// - each bus task: its counter is the latest start of a poll on any of its meters
///   (every poll starts, whatever its outcome, within the slowest meter's retry delay
///   plus one round of timeouts on the bus).
pub fn pipeline_liveness(
    store: Arc<crate::store::Store>,
    start_seq: u64,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
    flush_interval: Duration,
    plans: &[(
        crate::acquire::config::BusConfig,
        Vec<crate::acquire::MeterPlan>,
    )],
) -> Liveness {
    use std::sync::atomic::Ordering;
    let mut live = Liveness::new();
    live.watch(
        "store writer",
        flush_interval
            .saturating_mul(10)
            .max(Duration::from_secs(30)),
        move || {
            let last = store.last_seq();
            // Readings dropped from memory while the disk was full never commit; a
            // writer holding readings for a full disk is waiting on the disk, which
            // the store reports, not stuck (a watchdog restart would not help).
            let committed = last.saturating_sub(start_seq) + store.held_dropped();
            let waiting = forwarded.load(Ordering::Relaxed) > committed && !store.write_blocked();
            (last as i64, waiting)
        },
    );
    for (bus, meters) in plans {
        let exchange = bus.timeout.0 + bus.frame_gap.0;
        // Per meter: its blocks plus a recovery after a timeout (drain, reopen).
        let round: Duration = meters
            .iter()
            .map(|m| exchange.saturating_mul(m.blocks.len() as u32 + 2))
            .sum();
        let slowest = meters
            .iter()
            .map(|m| m.config.interval.0.max(crate::acquire::bus::BACKOFF_CAP))
            .max()
            .unwrap_or(crate::acquire::bus::BACKOFF_CAP);
        let stats: Vec<_> = meters.iter().map(|m| m.stats.clone()).collect();
        live.watch(
            format!("bus {}", bus.id),
            slowest + round + STALL_SLACK,
            move || {
                let latest = stats
                    .iter()
                    .filter_map(|s| s.snapshot().last_poll_ms)
                    .max()
                    .unwrap_or(0);
                (latest, true)
            },
        );
    }
    live
}

/// The agent's side of the service manager protocol for one run.
#[derive(Debug, Clone)]
pub struct Service {
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
}

impl Service {
    /// From the environment systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Service {
        let notifier = Notifier::from_env();
        let watchdog = watchdog_period().filter(|_| notifier.is_enabled());
        Service {
            notifier: Arc::new(notifier),
            watchdog,
        }
    }

    /// Sends `READY=1` and, when the watchdog is on, starts feeding it from `liveness`
    /// until `stop` is cancelled.
    pub fn ready(&self, liveness: Liveness, stop: CancellationToken) {
        self.notifier.notify_logged("READY=1");
        if let Some(period) = self.watchdog {
            tracing::info!(
                period_ms = period.as_millis() as u64,
                "feeding the systemd watchdog"
            );
            tokio::spawn(feed_watchdog(self.notifier.clone(), liveness, period, stop));
        }
    }

    /// Sends `STOPPING=1`: the shutdown has begun.
    pub fn stopping(&self) {
        self.notifier.notify_logged("STOPPING=1");
    }
}

/// How often the heartbeats are sampled, independent of the ping period, so a stall
/// is timed to about a second.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Sends `WATCHDOG=1` every `period` while `liveness` finds every stage healthy. It
/// runs on the agent's runtime on purpose: a blocked runtime stops the pings too.
pub async fn feed_watchdog(
    notifier: Arc<Notifier>,
    mut liveness: Liveness,
    period: Duration,
    stop: CancellationToken,
) {
    let sample = SAMPLE_EVERY.min(period);
    let mut next_ping = Instant::now();
    let mut was_stalled = false;
    loop {
        let now = Instant::now();
        match liveness.check(now) {
            Ok(()) => {
                if was_stalled {
                    tracing::warn!("all stages progress again; feeding the watchdog");
                    was_stalled = false;
                }
                if now >= next_ping {
                    notifier.notify_logged("WATCHDOG=1");
                    next_ping = now + period;
                }
            }
            Err(why) => {
                if !was_stalled {
                    tracing::error!(stage = %why, "stage stalled; no longer feeding the watchdog");
                    was_stalled = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(sample) => {}
        }
    }
}

/// Makes every panic, on any thread or task, end the process: logs it and aborts. This
/// keeps a panicking tokio task (whose panic the runtime would otherwise catch) from
/// leaving a half-alive agent; systemd then restarts the service (`Restart=on-failure`).
///
/// One exception: a panic on one of the embedded broker's own threads (its listener
/// and router, see `broker::guard::is_broker_thread`) unwinds that thread only. It is
/// logged and counted, and the broker's supervisor starts the broker again, while
/// polling, storing and the upstream sync go on. This is why the release profile
/// unwinds (`panic = "unwind"`): with `abort` no panic could be contained.
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if crate::broker::guard::is_broker_thread(std::thread::current().name()) {
            crate::broker::guard::note_broker_panic();
            tracing::error!(panic = %info, "panic in the embedded broker; it is started again");
            default_hook(info);
            return;
        }
        tracing::error!(panic = %info, "panic; aborting");
        // The default hook prints the message (and a backtrace if asked for) to stderr
        // even when no log subscriber is installed yet.
        default_hook(info);
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    fn receiver() -> (tempfile::TempDir, UnixDatagram, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram) -> Option<String> {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn notifies_a_path_socket() {
        let (_dir, sock, path) = receiver();
        let n = Notifier::connect(path.as_os_str()).expect("notifier");
        n.notify("READY=1").expect("send");
        assert_eq!(recv(&sock).as_deref(), Some("READY=1"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edge-agent-test-{}", rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = Notifier::connect(format!("@{name}").as_ref()).expect("notifier");
        n.notify("WATCHDOG=1").expect("send");
        assert_eq!(recv(&sock).as_deref(), Some("WATCHDOG=1"));
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_succeeds() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.notify("READY=1").expect("no-op");
        assert!(Notifier::connect("".as_ref()).is_err());
    }

    #[test]
    fn a_stage_with_work_and_no_progress_is_stalled_after_its_limit() {
        let counter = Arc::new(AtomicI64::new(0));
        let busy = Arc::new(AtomicBool::new(true));
        let mut live = Liveness::new();
        let (c, b) = (counter.clone(), busy.clone());
        live.watch("store writer", Duration::from_secs(10), move || {
            (c.load(Ordering::SeqCst), b.load(Ordering::SeqCst))
        });
        let t0 = Instant::now();
        assert!(live.check(t0).is_ok());
        assert!(
            live.check(t0 + Duration::from_secs(10)).is_ok(),
            "at the limit"
        );
        let err = live
            .check(t0 + Duration::from_secs(11))
            .expect_err("stalled past the limit");
        assert!(err.contains("store writer"), "{err}");
        // Progress clears it, and the limit counts from the move.
        counter.store(5, Ordering::SeqCst);
        assert!(live.check(t0 + Duration::from_secs(12)).is_ok());
        assert!(live.check(t0 + Duration::from_secs(22)).is_ok());
        assert!(live.check(t0 + Duration::from_secs(23)).is_err());
        // An idle stage (no work waiting) is healthy however old its counter.
        busy.store(false, Ordering::SeqCst);
        assert!(live.check(t0 + Duration::from_secs(100)).is_ok());
        busy.store(true, Ordering::SeqCst);
        assert!(live.check(t0 + Duration::from_secs(105)).is_ok());
        assert!(live.check(t0 + Duration::from_secs(116)).is_err());
    }

    #[test]
    fn pipeline_liveness_sees_a_stuck_writer_and_a_bus_that_stopped_polling() {
        use crate::model::{Payload, Reading};
        use std::sync::atomic::AtomicU64;
        let dir = tempfile::tempdir().expect("temp dir");
        let text = crate::config::DEFAULT_CONFIG.replace(
            "path = \"/var/lib/edge-agent/store\"",
            &format!("path = \"{}\"", dir.path().join("store").display()),
        );
        let config = crate::config::Config::from_toml(&text).expect("default config");
        let store = Arc::new(crate::store::Store::open(&config.store).expect("store"));
        let plans = crate::acquire::plan_meters(&config).expect("plans");
        let forwarded = Arc::new(AtomicU64::new(0));
        let flush = Duration::from_millis(200);
        let mut live = pipeline_liveness(store.clone(), 0, forwarded.clone(), flush, &plans);
        let writer_limit = Duration::from_secs(30);
        // rs485: interval 5 s and 10 s < the 300 s backoff cap; 8 blocks + 2 x 2
        // recoveries of a 520 ms exchange; 60 s slack.
        let bus_limit = Duration::from_secs(300 + 60) + Duration::from_millis(520) * 12;

        let t0 = Instant::now();
        assert!(live.check(t0).is_ok());
        // Nothing handed to the writer: idle, healthy however long.
        assert!(live.check(t0 + writer_limit * 2).is_ok());

        // Three readings handed over, none committed: stalled after the limit.
        forwarded.store(3, Ordering::SeqCst);
        let t1 = t0 + writer_limit * 2;
        assert!(live.check(t1).is_ok());
        let err = live
            .check(t1 + writer_limit + Duration::from_secs(1))
            .expect_err("writer stalled");
        assert!(err.contains("store writer"), "{err}");
        // They become durable: healthy again.
        let reading = |i: i64| {
            Payload::Reading(Reading {
                meter: "main".into(),
                ts_ms: i,
                values: Vec::new(),
            })
        };
        store.append((0..3).map(reading).collect()).expect("append");
        assert!(live.check(t1 + writer_limit * 2).is_ok());

        // No bus has started a poll since t0: the rs485 bus (the first) is named
        // once its limit has passed.
        assert!(
            // Both buses' limits exceed the 300 s backoff cap plus the 60 s slack.
            live.check(t0 + Duration::from_secs(360)).is_ok(),
            "a dead meter's 5 minute backoff is not a stall"
        );
        let err = live
            .check(t0 + bus_limit + Duration::from_secs(1))
            .expect_err("bus stalled");
        assert_eq!(err.split(" made").next(), Some("bus rs485"), "{err}");
        for (_, meters) in &plans {
            meters[0].stats.poll_started(crate::model::now_ms());
        }
        assert!(live.check(t0 + bus_limit + Duration::from_secs(2)).is_ok());
    }

    #[tokio::test]
    async fn watchdog_is_fed_only_while_every_stage_progresses() {
        let (_dir, sock, path) = receiver();
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        let notifier = Arc::new(Notifier::connect(path.as_os_str()).expect("notifier"));
        let counter = Arc::new(AtomicI64::new(0));
        let mut live = Liveness::new();
        let c = counter.clone();
        live.watch("bus lan", Duration::from_millis(300), move || {
            (c.load(Ordering::SeqCst), true)
        });
        let ticking = {
            let c = counter.clone();
            tokio::spawn(async move {
                loop {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let stop = CancellationToken::new();
        let feeder = tokio::spawn(feed_watchdog(
            notifier,
            live,
            Duration::from_millis(100),
            stop.clone(),
        ));
        let sock = Arc::new(sock);
        let s = sock.clone();
        let first = tokio::task::spawn_blocking(move || recv(&s))
            .await
            .expect("join");
        assert_eq!(
            first.as_deref(),
            Some("WATCHDOG=1"),
            "fed while progressing"
        );

        // The stage stops: after its limit the pings stop.
        ticking.abort();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let s = sock.clone();
        tokio::task::spawn_blocking(move || {
            // Drain what was sent before the stall was noticed.
            s.set_nonblocking(true).expect("nonblocking");
            while recv(&s).is_some() {}
            s.set_nonblocking(false).expect("blocking");
        })
        .await
        .expect("join");
        let s = sock.clone();
        let during_stall = tokio::task::spawn_blocking(move || recv(&s))
            .await
            .expect("join");
        assert_eq!(during_stall, None, "no WATCHDOG=1 while a stage is stalled");
        stop.cancel();
        feeder.await.expect("feeder ends on stop");
    }
}
