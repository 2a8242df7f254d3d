//! The MQTT broker embedded in the process (rumqttd), the local topic layout, and the
//! stage that publishes live state from committed records.
//!
//! rumqttd facts that shape this module: `Broker::start` blocks until its listeners
//! stop, so it runs on its own thread; links publish QoS 0 and `LinkTx::publish` never
//! sets retain, so retained messages go through `LinkTx::send` with
//! `Publish::new(.., retain: true)`; `offline` is published before the process exits.
//!
//! The broker is the patched rumqttd in `vendor/rumqttd` (see its PATCHES.md); the
//! agent uses its hooks for the [`guard`] (who may publish what, reserved client ids,
//! the listener's connection cap) and its shutdown handle for [`supervise`], which
//! starts the broker again after a failure.
//!
//! [`ingest`] is push ingest's MQTT front end: it takes pushes published on the broker
//! and hands them to [`crate::ingest`], which checks and stores them.

pub mod availability;
pub mod config;
pub mod discovery;
pub mod guard;
pub mod ingest;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use serde::Serialize;
use serde_json::{json, Map};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::broker::config::MqttConfig;
pub use crate::model::rfc3339_ms;
use crate::model::{Reading, Record};

pub use guard::{agent_client_id, agent_login, BrokerStats};

/// The embedded broker's built-in settings: `broker-config/rumqttd.toml`.
pub const DEFAULT_BROKER_CONFIG: &str = include_str!("../../../broker-config/rumqttd.toml");

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot read broker config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("broker config {path} is invalid: {reason}")]
    Parse { path: String, reason: String },
    #[error("embedded broker did not start listening on {0} (address in use?)")]
    NotListening(SocketAddr),
    // The OS error is part of the message and not a `source`, so that a report of
    // the whole chain (`{:#}`) says it once.
    #[error("embedded broker cannot listen on {addr}: {error}")]
    AddressInUse {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("embedded broker link failed: {0}")]
    Link(String),
    #[error("mqtt.max_connections ({cap}) must be below the broker file's router.max_connections ({router}), which also counts the agent's in-process link")]
    Cap { cap: usize, router: usize },
}

/// Topic names of one gateway: `{prefix}/{gw}/...`.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub gateway: String,
}

impl Topics {
    pub fn new(prefix: &str, gateway: &str) -> Topics {
        Topics {
            prefix: prefix.to_string(),
            gateway: gateway.to_string(),
        }
    }
    /// `online`/`offline`, retained.
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.gateway)
    }
    /// Latest values of a meter, retained JSON.
    pub fn state(&self, meter: &str) -> String {
        format!("{}/{}/{}/state", self.prefix, self.gateway, meter)
    }
    /// `online`/`offline` of one meter, retained (see [`availability`]).
    pub fn availability(&self, meter: &str) -> String {
        format!("{}/{}/{}/availability", self.prefix, self.gateway, meter)
    }
}

/// Largest broker settings file read (`mqtt.broker_config`).
pub const MAX_BROKER_CONFIG: u64 = 64 << 10;

/// A text file of at most `max` bytes.
fn read_capped(path: &std::path::Path, max: u64) -> Result<String, BrokerError> {
    use std::io::Read;
    let read = |source| BrokerError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(max + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > max {
        return Err(BrokerError::Parse {
            path: path.display().to_string(),
            reason: format!("larger than {} KiB", max >> 10),
        });
    }
    Ok(text)
}

/// Loads the rumqttd settings and applies the agent's own on top (listener, users,
/// everything optional switched off).
pub fn broker_settings(mqtt: &MqttConfig) -> Result<rumqttd::Config, BrokerError> {
    let (path, text) = match &mqtt.broker_config {
        Some(path) => (
            path.display().to_string(),
            read_capped(path, MAX_BROKER_CONFIG)?,
        ),
        None => ("(built-in)".to_string(), DEFAULT_BROKER_CONFIG.to_string()),
    };
    let mut settings: rumqttd::Config = toml::from_str(&text).map_err(|e| BrokerError::Parse {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut server = settings
        .v4
        .as_ref()
        .and_then(|servers| servers.values().next().cloned())
        .ok_or_else(|| BrokerError::Parse {
            path,
            reason: "it needs one [v4.1] server section".into(),
        })?;
    server.listen = mqtt.listen;
    server.tls = None;
    // The thread's name tells the panic hook that it belongs to the broker.
    server.name = guard::LISTENER_THREAD.into();
    server.max_connections = Some(mqtt.max_connections);
    if mqtt.max_connections + guard::IN_PROCESS_LINKS > settings.router.max_connections {
        return Err(BrokerError::Cap {
            cap: mqtt.max_connections,
            router: settings.router.max_connections,
        });
    }
    settings.id = 0;
    settings.router.publish_filter = None;
    // Memory of the per-filter logs: [mqtt] sizes them (see docs/memory.md).
    settings.router.max_segment_size =
        usize::try_from(mqtt.log_segment_size.0).unwrap_or(usize::MAX);
    settings.router.max_segment_count = mqtt.log_segment_count;
    settings.router.custom_segment = None;
    settings.router.max_log_bytes =
        Some(usize::try_from(mqtt.log_max_bytes.0).unwrap_or(usize::MAX));
    server.connections.auth = if mqtt.users.is_empty() {
        None
    } else {
        Some(mqtt.users.clone().into_iter().collect())
    };
    settings.v4 = Some([("1".to_string(), server)].into_iter().collect());
    settings.v5 = None;
    settings.ws = None;
    settings.console = None;
    settings.prometheus = None;
    settings.bridge = None;
    settings.cluster = None;
    settings.metrics = None;
    Ok(settings)
}

/// Log sizes for a broker that stands in for a fleet's upstream broker (the demo's,
/// the benchmarks' and tests'): its subscribers read whole record batches (up to
/// `upstream.batch_bytes` each) and must not miss one while they lag, so each filter
/// keeps 4 × 1 MiB, as the shipped broker file did before the [mqtt] log keys.
pub fn upstream_logs(mqtt: MqttConfig) -> MqttConfig {
    MqttConfig {
        log_segment_size: crate::config::units::ByteSize(1 << 20),
        log_segment_count: 4,
        log_max_bytes: crate::config::units::ByteSize(64 << 20),
        ..mqtt
    }
}

/// Segments of the log of the agent's MQTT ingest subscription (`{prefix}/{gw}/
/// ingest/+`): pushes are acknowledged to the device once in that log, and the
/// agent must read each before it falls off, so it holds several of the largest
/// messages the broker takes (`max_payload_size`, 256 KiB built in) whatever
/// `mqtt.log_segment_size` is.
pub const INGEST_LOG_SEGMENT: usize = 1 << 20;
pub const INGEST_LOG_SEGMENTS: usize = 2;

/// Checks that the broker settings file (if any) loads; used by `check-config`.
pub fn check_settings(mqtt: &MqttConfig) -> Result<(), BrokerError> {
    broker_settings(mqtt).map(|_| ())
}

/// One run of rumqttd: its router and listener threads, the agent's link into it.
struct Running {
    tx: LinkTx,
    // Kept so the router does not see the link as gone. The agent subscribes only at
    // shutdown (see `LocalBroker::publish_status_handled`), which takes it meanwhile.
    rx: Option<LinkRx>,
    shutdown: Option<rumqttd::ShutdownHandle>,
    thread: std::thread::JoinHandle<()>,
    /// A send through the link failed: the router is gone.
    link_failed: bool,
    /// Memory of this run's per-filter message logs.
    log: rumqttd::LogMeter,
}

/// Memory of the embedded broker's per-filter message logs (see docs/memory.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LogMemory {
    /// Subscription filters that have a log.
    pub filters: u64,
    /// Bytes the logs hold now, as rumqttd counts them (topic, payload and 4 bytes a
    /// message; the heap they take is about twice that).
    pub bytes: u64,
    /// Most the logs of these filters can reach (segment size × count each).
    pub reserved_bytes: u64,
    /// `mqtt.log_max_bytes`: the cap on `reserved_bytes`.
    pub max_bytes: u64,
    /// Subscriptions refused by the cap since the broker (re)started.
    pub refused: u64,
}

impl Running {
    /// Starts rumqttd on its own thread and waits until it accepts connections.
    fn start(mut settings: rumqttd::Config, listen: SocketAddr) -> Result<Running, BrokerError> {
        // rumqttd reports a failed bind only in its own log, and the probe below would
        // take another program on the port for our broker: check the address first.
        drop(
            std::net::TcpListener::bind(listen).map_err(|error| BrokerError::AddressInUse {
                addr: listen,
                error,
            })?,
        );
        let log = rumqttd::LogMeter::default();
        settings.router.log_meter = log.clone();
        let mut broker = rumqttd::Broker::new(settings);
        let (tx, rx) = broker
            .link(guard::AGENT_LINK_ID)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let shutdown = broker.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let running = Running {
            tx,
            rx: Some(rx),
            shutdown,
            thread,
            link_failed: false,
            log,
        };
        if let Err(e) = wait_listening(listen, Duration::from_secs(5)) {
            running.stop(Duration::from_secs(1));
            return Err(e);
        }
        Ok(running)
    }

    /// Stops the router and the listener; waits up to `limit` for the threads to end.
    fn stop(mut self, limit: Duration) -> bool {
        if let Some(handle) = self.shutdown.take() {
            handle.shutdown();
        }
        let start = Instant::now();
        while !self.thread.is_finished() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.thread.is_finished()
    }
}

/// The retained messages the agent published, to publish again after a restart;
/// at most `max_bytes` of topics and payloads (beyond that new topics are not kept).
#[derive(Debug, Default)]
struct RetainedCopy {
    messages: HashMap<String, Vec<u8>>,
    order: Vec<String>,
    bytes: usize,
    max_bytes: usize,
    full_logged: bool,
}

impl RetainedCopy {
    fn record(&mut self, topic: &str, payload: &[u8]) {
        if payload.is_empty() {
            if let Some(old) = self.messages.remove(topic) {
                self.bytes -= topic.len() + old.len();
                self.order.retain(|t| t != topic);
            }
            return;
        }
        match self.messages.get_mut(topic) {
            Some(old) => {
                let bytes = self.bytes - old.len() + payload.len();
                if bytes <= self.max_bytes {
                    self.bytes = bytes;
                    *old = payload.to_vec();
                }
            }
            None => {
                let bytes = self.bytes + topic.len() + payload.len();
                if bytes > self.max_bytes {
                    if !self.full_logged {
                        self.full_logged = true;
                        tracing::warn!(
                            max_bytes = self.max_bytes,
                            "mqtt.republish_max reached: more retained topics are not kept for a broker restart"
                        );
                    }
                    return;
                }
                self.bytes = bytes;
                self.messages.insert(topic.to_string(), payload.to_vec());
                self.order.push(topic.to_string());
            }
        }
    }

    fn all(&self) -> Vec<(String, Vec<u8>)> {
        self.order
            .iter()
            .filter_map(|t| self.messages.get(t).map(|p| (t.clone(), p.clone())))
            .collect()
    }
}

/// The embedded broker and the agent's own link into it; it survives restarts of
/// rumqttd (see [`supervise`]).
pub struct LocalBroker {
    running: Mutex<Option<Running>>,
    settings: rumqttd::Config,
    retained: Mutex<RetainedCopy>,
    /// Broker panics seen by the panic hook when this run started.
    panics_at_start: AtomicU64,
    pub listen: SocketAddr,
    pub topics: Topics,
    pub stats: Arc<BrokerStats>,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker")
            .field("listen", &self.listen)
            .field("topics", &self.topics)
            .finish()
    }
}

/// The subscription filter: `{prefix}/{gw}/ingest/+`.
pub fn ingest_filter(topics: &Topics) -> String {
    format!("{}/{}/ingest/+", topics.prefix, topics.gateway)
}

/// The broker's loopback address for a client of the agent's own.
pub fn loopback(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    }
}

impl LocalBroker {
    /// Starts rumqttd on its own thread and waits until it accepts connections.
    pub fn start(mqtt: &MqttConfig, gateway: &str) -> Result<Arc<LocalBroker>, BrokerError> {
        let mut settings = broker_settings(mqtt)?;
        let topics = Topics::new(&mqtt.topic_prefix, gateway);
        settings.router.custom_segment = Some(
            [(
                ingest_filter(&topics),
                rumqttd::SegmentConfig {
                    max_segment_size: INGEST_LOG_SEGMENT,
                    max_segment_count: INGEST_LOG_SEGMENTS,
                },
            )]
            .into_iter()
            .collect(),
        );
        let stats = Arc::new(BrokerStats::default());
        guard::install(&mut settings, mqtt, &topics, stats.clone());
        let listen = mqtt.listen;
        let panics_at_start = guard::broker_panics();
        let running = Running::start(settings.clone(), listen)?;
        stats.log_max_bytes.store(
            settings.router.max_log_bytes.unwrap_or(usize::MAX) as u64,
            Ordering::Relaxed,
        );
        *lock(&stats.log) = Some(running.log.clone());
        Ok(Arc::new(LocalBroker {
            running: Mutex::new(Some(running)),
            settings,
            retained: Mutex::new(RetainedCopy {
                max_bytes: usize::try_from(mqtt.republish_max.0).unwrap_or(usize::MAX),
                ..RetainedCopy::default()
            }),
            panics_at_start: AtomicU64::new(panics_at_start),
            listen,
            topics,
            stats,
        }))
    }

    /// Publishes a message (QoS 0, as local links do), retained or not.
    pub fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), BrokerError> {
        if retain {
            lock(&self.retained).record(topic, &payload);
        }
        let publish = Publish::new(
            bytes::Bytes::from(topic.to_string()),
            bytes::Bytes::from(payload),
            retain,
        );
        let mut running = lock(&self.running);
        let Some(running) = running.as_mut() else {
            return Err(BrokerError::Link("the broker is restarting".into()));
        };
        // `send` only queues into the link buffer and notifies the router: it never
        // waits, so polling it to completion here is cheap.
        let sent =
            futures_util::FutureExt::now_or_never(running.tx.send(Packet::Publish(publish, None)))
                .unwrap_or(Ok(0));
        if let Err(e) = sent {
            running.link_failed = true;
            return Err(BrokerError::Link(e.to_string()));
        }
        Ok(())
    }

    pub fn publish_status(&self, online: bool) -> Result<(), BrokerError> {
        let payload = if online { "online" } else { "offline" };
        self.publish(&self.topics.status(), payload.as_bytes().to_vec(), true)
    }

    /// Publishes the gateway's status and waits, up to `limit`, until the router has
    /// handled it; `Ok(false)` when it did not answer in time. The agent's own link
    /// subscribes to the status topic after the publish: the router handles one
    /// link's packets in order, so the retained status it answers that subscription
    /// with is this one, and it serves the subscribers the publish woke before this
    /// later one.
    pub async fn publish_status_handled(
        &self,
        online: bool,
        limit: Duration,
    ) -> Result<bool, BrokerError> {
        self.publish_status(online)?;
        let topic = self.topics.status();
        let rx = {
            let mut running = lock(&self.running);
            let Some(running) = running.as_mut() else {
                return Err(BrokerError::Link("the broker is restarting".into()));
            };
            if let Err(e) = running.tx.try_subscribe(topic.clone()) {
                running.link_failed = true;
                return Err(BrokerError::Link(e.to_string()));
            }
            running.rx.take()
        };
        // Taken by a call under way.
        let Some(mut rx) = rx else {
            return Ok(false);
        };
        let payload: &[u8] = if online { b"online" } else { b"offline" };
        let answered = tokio::time::timeout(limit, async {
            loop {
                match rx.next().await {
                    Ok(Some(rumqttd::Notification::Forward(f))) if f.publish.topic == topic => {
                        return f.publish.payload == payload;
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        // Back for the next call, unless the broker was restarted meanwhile.
        if let Some(running) = lock(&self.running).as_mut() {
            if running.rx.is_none() {
                running.rx = Some(rx);
            }
        }
        Ok(answered)
    }

    /// Memory of the per-filter message logs of the running broker.
    pub fn log_memory(&self) -> LogMemory {
        self.stats.log_memory()
    }

    /// Why the running broker is not healthy, if it is not: its listener thread ended,
    /// its router is gone, or one of its threads panicked.
    pub fn failure(&self) -> Option<&'static str> {
        let running = lock(&self.running);
        let Some(running) = running.as_ref() else {
            return Some("it is not running");
        };
        if running.thread.is_finished() {
            return Some("its listener stopped");
        }
        if running.link_failed {
            return Some("its router is gone");
        }
        if guard::broker_panics() != self.panics_at_start.load(Ordering::Relaxed) {
            return Some("one of its threads panicked");
        }
        None
    }

    /// Stops what is left of the broker and starts a new one on the same address,
    /// then publishes `online` and the retained messages again (blocking: call it off
    /// the async runtime).
    pub fn restart(&self) -> Result<(), BrokerError> {
        let old = lock(&self.running).take();
        if let Some(old) = old {
            if !old.stop(Duration::from_secs(5)) {
                tracing::warn!("the old broker's listener did not stop in time");
            }
        }
        self.panics_at_start
            .store(guard::broker_panics(), Ordering::Relaxed);
        let running = Running::start(self.settings.clone(), self.listen)?;
        *lock(&self.stats.log) = Some(running.log.clone());
        *lock(&self.running) = Some(running);
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        let retained = lock(&self.retained).all();
        for (topic, payload) in retained {
            self.publish(&topic, payload, true)?;
        }
        Ok(())
    }

    /// Stops the broker for good (tests: a listener that dies under the agent).
    #[doc(hidden)]
    pub fn kill_for_test(&self) {
        if let Some(running) = lock(&self.running).as_mut() {
            if let Some(handle) = running.shutdown.take() {
                handle.shutdown();
            }
        }
    }
}

/// A lock that survives a panic of another holder (the data stays consistent: every
/// holder only swaps or updates whole values).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often [`supervise`] checks the broker.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
/// Longest wait between two restarts that failed.
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Watches the broker until `stop` and restarts it after a failure (a panic in one
/// of its threads, its listener ending, its router gone). Polling, storing and the
/// upstream sync do not depend on it and go on meanwhile; the agent's own MQTT
/// clients reconnect on their own.
pub async fn supervise(broker: Arc<LocalBroker>, stop: CancellationToken) {
    let mut backoff = SUPERVISE_EVERY;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
        let Some(why) = broker.failure() else {
            backoff = SUPERVISE_EVERY;
            continue;
        };
        broker.stats.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            reason = why,
            "the embedded broker failed; starting it again"
        );
        let b = broker.clone();
        match tokio::task::spawn_blocking(move || b.restart()).await {
            Ok(Ok(())) => {
                tracing::info!(listen = %broker.listen, "embedded broker restarted");
                backoff = SUPERVISE_EVERY;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "embedded broker restart failed; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RESTART_BACKOFF_CAP);
            }
            Err(e) => tracing::error!(error = %e, "embedded broker restart task failed"),
        }
    }
}

fn wait_listening(addr: SocketAddr, limit: Duration) -> Result<(), BrokerError> {
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let start = Instant::now();
    while start.elapsed() < limit {
        if TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(addr))
}

/// How often [`run_health`] checks the agent.
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Publishes the gateway's own status on `{prefix}/{gw}/status` until `stop`:
/// `offline` while `check` fails (the agent runs but is not ready), `online` again
/// once it passes. Home Assistant's Online sensor then shows `off` while the broker,
/// and so its connection, stays up; `unavailable` means it cannot reach the broker.
pub async fn run_health<F>(
    broker: Arc<LocalBroker>,
    check: F,
    every: Duration,
    stop: CancellationToken,
) where
    F: Fn() -> Result<(), String> + Send + 'static,
{
    let mut online = true;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = check();
        if result.is_ok() == online {
            continue;
        }
        online = result.is_ok();
        match result {
            Ok(()) => tracing::info!("the agent is ready again: status online"),
            Err(why) => tracing::warn!(reason = why, "the agent is not ready: status offline"),
        }
        if let Err(e) = broker.publish_status(online) {
            tracing::warn!(error = %e, "status not published");
        }
    }
}

/// Meters whose latest values are kept for their state documents, at most; a
/// reading of a meter beyond it is published on its own (its values only).
pub const MAX_STATE_METERS: usize = 1024;
/// Quantities kept per meter, at most; beyond it a reading's other quantities are
/// in the document of that reading only.
pub const MAX_STATE_QUANTITIES: usize = 256;

/// The latest value of each quantity of a meter, each with its own timestamp, and
/// the newest reading's timestamp and sequence number.
#[derive(Debug, Clone, Default)]
pub struct MeterLatest {
    pub meter: String,
    pub seq: u64,
    pub ts_ms: i64,
    /// In order of first appearance: the value and the timestamp of its reading.
    pub values: Vec<(crate::model::Value, i64)>,
}

impl MeterLatest {
    /// Takes the values of `reading` (seq `seq`) that are not older than the kept ones.
    pub fn update(&mut self, seq: u64, reading: &Reading, cap: usize) {
        if reading.ts_ms >= self.ts_ms || self.values.is_empty() {
            self.ts_ms = reading.ts_ms;
            self.seq = seq;
        }
        for v in &reading.values {
            match self
                .values
                .iter()
                .position(|(k, _)| k.quantity == v.quantity)
            {
                Some(i) if self.values[i].1 <= reading.ts_ms => {
                    self.values[i] = (v.clone(), reading.ts_ms);
                }
                Some(_) => {}
                None if self.values.len() < cap => self.values.push((v.clone(), reading.ts_ms)),
                None => {}
            }
        }
    }

    fn of(seq: u64, reading: &Reading) -> MeterLatest {
        let mut latest = MeterLatest {
            meter: reading.meter.clone(),
            ..MeterLatest::default()
        };
        latest.update(seq, reading, usize::MAX);
        latest
    }
}

/// The retained state document of a meter: the latest value of each quantity with
/// its unit, kind and own timestamp, and the newest reading's timestamp and
/// sequence number.
pub fn latest_json(gateway: &str, latest: &MeterLatest) -> serde_json::Value {
    let mut values = Map::new();
    for (v, ts_ms) in &latest.values {
        let mut entry = Map::new();
        entry.insert("value".into(), v.number_json());
        entry.insert("unit".into(), json!(v.unit));
        entry.insert("kind".into(), json!(v.kind.as_str()));
        if let Some(why) = v.invalid {
            entry.insert("invalid".into(), json!(why));
        }
        entry.insert("ts".into(), json!(rfc3339_ms(*ts_ms)));
        entry.insert("ts_ms".into(), json!(ts_ms));
        values.insert(v.quantity.clone(), serde_json::Value::Object(entry));
    }
    json!({
        "gateway": gateway,
        "meter": latest.meter,
        "seq": latest.seq,
        "ts": rfc3339_ms(latest.ts_ms),
        "ts_ms": latest.ts_ms,
        "values": values,
    })
}

/// The state document of a single reading (see [`latest_json`]).
pub fn state_json(gateway: &str, seq: u64, reading: &Reading) -> serde_json::Value {
    latest_json(gateway, &MeterLatest::of(seq, reading))
}

/// The latest values of every meter, for the state documents.
#[derive(Debug, Default)]
pub struct LatestStates {
    meters: HashMap<String, MeterLatest>,
}

impl LatestStates {
    /// Takes a reading in; false when the meter is beyond [`MAX_STATE_METERS`]
    /// (its document is then the reading's own).
    pub fn update(&mut self, seq: u64, reading: &Reading) -> bool {
        if !self.meters.contains_key(&reading.meter) && self.meters.len() >= MAX_STATE_METERS {
            return false;
        }
        self.meters
            .entry(reading.meter.clone())
            .or_insert_with(|| MeterLatest {
                meter: reading.meter.clone(),
                ..MeterLatest::default()
            })
            .update(seq, reading, MAX_STATE_QUANTITIES);
        true
    }

    /// The state document of `meter`, if it is kept.
    pub fn doc(&self, gateway: &str, meter: &str) -> Option<serde_json::Value> {
        self.meters.get(meter).map(|l| latest_json(gateway, l))
    }
}

/// Publishes retained state for every committed reading, until shutdown. Runs after
/// the store, so everything published here is already durable. A value older than
/// the one kept for its quantity (a late push, a correction of an earlier point)
/// leaves the state as it is.
pub async fn run_state_publisher(
    broker: Arc<LocalBroker>,
    mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
    shutdown: CancellationToken,
) {
    let mut latest = LatestStates::default();
    loop {
        let batch = tokio::select! {
            batch = committed.recv() => batch,
            _ = shutdown.cancelled() => break,
        };
        match batch {
            Ok(records) => publish_states(&broker, &mut latest, &records),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // State is "latest value": a skipped batch is superseded by later ones.
                tracing::warn!(skipped_batches = n, "state publisher fell behind");
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    // Drain what was committed before shutdown, so the last state is published.
    while let Ok(records) = committed.try_recv() {
        publish_states(&broker, &mut latest, &records);
    }
}

fn publish_states(broker: &LocalBroker, latest: &mut LatestStates, records: &[Record]) {
    // Every reading updates its meter's latest values; of a commit, each meter's
    // document is published once (a commit of pushed history holds thousands per
    // meter). A meter beyond the cap gets its newest reading's own document.
    let mut touched: Vec<&str> = Vec::new();
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut untracked: Vec<(&Record, &Reading)> = Vec::new();
    for record in records {
        // Intervals and events have topics of their own (the analytics stage).
        let Some(reading) = record.payload.as_reading() else {
            continue;
        };
        if latest.update(record.seq, reading) {
            if seen.insert(&reading.meter) {
                touched.push(&reading.meter);
            }
            continue;
        }
        match untracked.iter_mut().find(|(_, r)| r.meter == reading.meter) {
            Some(slot) if slot.1.ts_ms <= reading.ts_ms => *slot = (record, reading),
            Some(_) => {}
            None => untracked.push((record, reading)),
        }
    }
    let gateway = &broker.topics.gateway;
    let docs = touched
        .into_iter()
        .filter_map(|m| latest.doc(gateway, m).map(|d| (m, d)))
        .chain(
            untracked
                .into_iter()
                .map(|(record, r)| (r.meter.as_str(), state_json(gateway, record.seq, r))),
        );
    for (meter, doc) in docs {
        let topic = broker.topics.state(meter);
        if let Err(e) = broker.publish(&topic, doc.to_string().into_bytes(), true) {
            tracing::warn!(error = %e, topic, "state publish failed");
        }
    }
}

#[cfg(test)]
mod ingest_fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Value};
    use crate::testkit::free_port;

    #[test]
    fn builtin_settings_fit_a_pi_and_apply_overrides() {
        let mqtt = MqttConfig {
            listen: "127.0.0.1:18830".parse().expect("address literal"),
            users: [("hass".to_string(), "pw".to_string())]
                .into_iter()
                .collect(),
            ..MqttConfig::default()
        };
        let s = broker_settings(&mqtt).expect("built-in settings load");
        assert!(s.router.max_segment_size <= 4 << 20);
        assert!(s.console.is_none() && s.v5.is_none());
        let v4 = s.v4.expect("v4 server");
        let server = v4.values().next().expect("one server");
        assert_eq!(server.listen, mqtt.listen);
        assert_eq!(
            server.connections.auth.as_ref().and_then(|a| a.get("hass")),
            Some(&"pw".to_string())
        );
    }

    #[test]
    fn the_listener_cap_stays_below_the_routers() {
        let s = broker_settings(&MqttConfig::default()).expect("defaults load");
        let server =
            s.v4.as_ref()
                .and_then(|v| v.values().next())
                .expect("server");
        assert_eq!(server.max_connections, Some(48));
        assert_eq!(server.name, guard::LISTENER_THREAD);
        let mqtt = MqttConfig {
            max_connections: 64,
            ..MqttConfig::default()
        };
        let e = broker_settings(&mqtt).expect_err("64 leaves no room for the agent's link");
        assert!(e.to_string().contains("mqtt.max_connections (64)"), "{e}");
    }

    #[test]
    fn missing_broker_file_is_named() {
        let mqtt = MqttConfig {
            broker_config: Some("/nonexistent/rumqttd.toml".into()),
            ..MqttConfig::default()
        };
        let e = broker_settings(&mqtt).expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/rumqttd.toml"));
    }

    #[test]
    fn state_json_carries_exact_values_units_and_seq() {
        let reading = Reading {
            meter: "main".into(),
            ts_ms: 1_535_068_800_123,
            values: vec![
                Value {
                    quantity: "voltage_l1".into(),
                    unit: "V".into(),
                    kind: Kind::Voltage,
                    value: Some(230.1f32 as f64),
                    invalid: None,
                    source: Default::default(),
                },
                Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: None,
                    invalid: Some(crate::model::Invalid::Nan),
                    source: Default::default(),
                },
            ],
        };
        let doc = state_json("gw1", 42, &reading);
        let text = doc.to_string();
        assert!(text.contains("\"value\":230.1"), "{text}");
        assert_eq!(doc["seq"], 42);
        assert_eq!(doc["ts"], "2018-08-24T00:00:00.123Z");
        assert_eq!(doc["values"]["voltage_l1"]["unit"], "V");
        assert_eq!(doc["values"]["power"]["value"], serde_json::Value::Null);
        assert_eq!(doc["values"]["power"]["invalid"], "nan");
    }

    fn value(quantity: &str, kind: Kind, value: f64) -> Value {
        Value {
            quantity: quantity.into(),
            unit: if kind == Kind::Power { "kW" } else { "kWh" }.into(),
            kind,
            value: Some(value),
            invalid: None,
            source: Default::default(),
        }
    }

    /// A reading with only some quantities leaves the others as they were, each with
    /// the timestamp of the reading it came from; an older reading changes nothing
    /// newer.
    #[test]
    fn a_partial_reading_keeps_the_other_quantities_with_their_own_timestamps() {
        let mut latest = LatestStates::default();
        let reading = |ts_ms, values| Reading {
            meter: "heatpump".into(),
            ts_ms,
            values,
        };
        let t1 = 1_535_068_800_000;
        latest.update(
            5,
            &reading(
                t1,
                vec![
                    value("power", Kind::Power, 3.1),
                    value("energy_total", Kind::EnergyTotal, 100.5),
                ],
            ),
        );
        latest.update(
            6,
            &reading(
                t1 + 60_000,
                vec![value("energy_total", Kind::EnergyTotal, 100.75)],
            ),
        );
        // Late history: older than both values.
        latest.update(
            7,
            &reading(t1 - 60_000, vec![value("power", Kind::Power, 9.0)]),
        );
        let doc = latest.doc("gw1", "heatpump").expect("kept");
        assert_eq!(doc["seq"], 6, "{doc}");
        assert_eq!(doc["ts_ms"], t1 + 60_000);
        assert_eq!(doc["values"]["power"]["value"], 3.1);
        assert_eq!(doc["values"]["power"]["ts_ms"], t1);
        assert_eq!(doc["values"]["power"]["ts"], "2018-08-24T00:00:00.000Z");
        assert_eq!(doc["values"]["energy_total"]["value"], 100.75);
        assert_eq!(doc["values"]["energy_total"]["ts_ms"], t1 + 60_000);
        assert_eq!(doc["values"]["energy_total"]["unit"], "kWh");
    }

    #[test]
    fn the_kept_states_are_bounded() {
        let mut latest = LatestStates::default();
        let many: Vec<Value> = (0..MAX_STATE_QUANTITIES + 5)
            .map(|i| value(&format!("q{i}"), Kind::Power, 1.0))
            .collect();
        let r = Reading {
            meter: "m".into(),
            ts_ms: 1,
            values: many,
        };
        assert!(latest.update(1, &r));
        let doc = latest.doc("gw1", "m").expect("kept");
        assert_eq!(
            doc["values"].as_object().map(|o| o.len()),
            Some(MAX_STATE_QUANTITIES)
        );
        for i in 1..MAX_STATE_METERS {
            let r = Reading {
                meter: format!("m{i}"),
                ts_ms: 1,
                values: vec![value("power", Kind::Power, 1.0)],
            };
            assert!(latest.update(1, &r));
        }
        let r = Reading {
            meter: "one-too-many".into(),
            ts_ms: 1,
            values: vec![value("power", Kind::Power, 1.0)],
        };
        assert!(!latest.update(1, &r), "beyond the cap: not kept");
        assert!(latest.doc("gw1", "one-too-many").is_none());
    }

    #[test]
    fn a_taken_address_is_named_instead_of_mistaken_for_our_broker() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mqtt = MqttConfig {
            listen: other.local_addr().expect("addr"),
            ..MqttConfig::default()
        };
        match LocalBroker::start(&mqtt, "gw1") {
            Err(e @ BrokerError::AddressInUse { addr, .. }) => {
                assert_eq!(addr, mqtt.listen);
                // The whole chain, as `edge-agent` prints it, says it once.
                let chain = format!("{:#}", anyhow::Error::from(e));
                assert_eq!(chain.matches("in use").count(), 1, "{chain}");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("started on an address another program holds"),
        }
    }

    /// A plain client of the broker on `port`, and its event loop.
    fn test_client(port: u16, id: &str) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        rumqttc::AsyncClient::new(opts, 10)
    }

    /// The next PUBLISH the client receives within `wait`; a failed connection fails
    /// the test.
    async fn next_publish(
        events: &mut rumqttc::EventLoop,
        wait: Duration,
    ) -> Option<rumqttc::Publish> {
        tokio::time::timeout(wait, async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => return p,
                    Ok(_) => {}
                    Err(e) => panic!("connection failed: {e}"),
                }
            }
        })
        .await
        .ok()
    }

    #[tokio::test]
    async fn retained_status_reaches_a_late_subscriber() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        broker.publish_status(true).expect("publish");
        // Subscribe only after publishing: the retained message must be replayed.
        let (client, mut events) = test_client(mqtt.listen.port(), "t");
        client
            .subscribe("edge/gw1/status", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let got = next_publish(&mut events, Duration::from_secs(5))
            .await
            .expect("retained status arrives");
        assert_eq!(
            (got.payload.to_vec(), got.retain),
            (b"online".to_vec(), true)
        );
    }

    /// The status topic follows the agent's own health while the broker stays up.
    #[tokio::test]
    async fn the_status_goes_offline_while_the_agent_is_not_ready() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        broker.publish_status(true).expect("publish");
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = CancellationToken::new();
        let r = ready.clone();
        let task = tokio::spawn(run_health(
            broker.clone(),
            move || {
                if r.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("a bus task has stopped".into())
                }
            },
            Duration::from_millis(20),
            stop.clone(),
        ));
        let (client, mut events) = test_client(mqtt.listen.port(), "health");
        client
            .subscribe("edge/gw1/status", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        async fn next(events: &mut rumqttc::EventLoop) -> Vec<u8> {
            next_publish(events, Duration::from_secs(10))
                .await
                .expect("a status message")
                .payload
                .to_vec()
        }
        assert_eq!(next(&mut events).await, b"online");
        ready.store(false, Ordering::Relaxed);
        assert_eq!(next(&mut events).await, b"offline");
        ready.store(true, Ordering::Relaxed);
        assert_eq!(next(&mut events).await, b"online");
        stop.cancel();
        task.await.expect("health task");
        broker.kill_for_test();
    }

    /// The shutdown's last `offline` is awaited until the router has handled it: a
    /// subscriber gets it, and the retained status is `offline` by then.
    #[tokio::test]
    async fn a_handled_status_is_retained_and_forwarded_when_the_call_returns() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        broker.publish_status(true).expect("publish");
        let (client, mut events) = test_client(mqtt.listen.port(), "before");
        client
            .subscribe("edge/gw1/status", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let retained = next_publish(&mut events, Duration::from_secs(10))
            .await
            .expect("retained status");
        assert_eq!(retained.payload.to_vec(), b"online");
        let handled = broker
            .publish_status_handled(false, Duration::from_secs(10))
            .await
            .expect("published");
        assert!(handled, "the router answers within the limit");
        let got = next_publish(&mut events, Duration::from_secs(10))
            .await
            .expect("offline forwarded");
        assert_eq!(got.payload.to_vec(), b"offline");
        let (late, mut late_events) = test_client(mqtt.listen.port(), "after");
        late.subscribe("edge/gw1/status", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let got = next_publish(&mut late_events, Duration::from_secs(10))
            .await
            .expect("retained status");
        assert_eq!(
            (got.payload.to_vec(), got.retain),
            (b"offline".to_vec(), true)
        );
        broker.kill_for_test();
    }

    /// MQTT-3.8.4-3: every SUBSCRIBE replays the retained messages of its filter,
    /// also one to a filter the client already holds (Home Assistant subscribes an
    /// availability topic again for every new entity on the one connection).
    #[tokio::test]
    async fn a_repeated_subscribe_gets_the_retained_message_again() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        broker.publish_status(true).expect("publish");
        let (client, mut events) = test_client(mqtt.listen.port(), "twice");
        for (round, qos) in [
            (1, rumqttc::QoS::AtLeastOnce),
            (2, rumqttc::QoS::AtLeastOnce),
            (3, rumqttc::QoS::AtMostOnce),
        ] {
            client
                .subscribe("edge/gw1/status", qos)
                .await
                .expect("subscribe");
            let got = next_publish(&mut events, Duration::from_secs(10))
                .await
                .map(|p| (p.topic, p.payload.to_vec(), p.retain))
                .unwrap_or_else(|| panic!("subscribe {round}: no retained status"));
            assert_eq!(
                got,
                ("edge/gw1/status".to_string(), b"online".to_vec(), true),
                "subscribe {round}"
            );
        }
        broker.kill_for_test();
    }

    /// Subscribes to `filter` and returns the SUBACK's return code.
    async fn suback(
        client: &rumqttc::AsyncClient,
        events: &mut rumqttc::EventLoop,
        filter: &str,
    ) -> rumqttc::SubscribeReasonCode {
        client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                        return ack.return_codes[0];
                    }
                    Ok(_) => {}
                    Err(e) => panic!("connection failed: {e}"),
                }
            }
        })
        .await
        .expect("suback arrives")
    }

    #[tokio::test]
    async fn filter_logs_stay_within_their_segments_and_the_total_cap_refuses_new_filters() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            log_segment_size: crate::config::units::ByteSize(4 << 10),
            log_segment_count: 2,
            // Room for two filters' logs.
            log_max_bytes: crate::config::units::ByteSize(16 << 10),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        let (client, mut events) = test_client(mqtt.listen.port(), "t");
        use rumqttc::SubscribeReasonCode::{Failure, Success};
        let ok = Success(rumqttc::QoS::AtMostOnce);
        assert_eq!(suback(&client, &mut events, "#").await, ok);
        assert_eq!(suback(&client, &mut events, "edge/gw1/+/state").await, ok);
        // A third filter would need a third log: refused.
        assert_eq!(
            suback(&client, &mut events, "edge/gw1/status").await,
            Failure
        );
        // A filter that has a log already costs nothing more.
        assert_eq!(suback(&client, &mut events, "#").await, ok);
        let log = broker.log_memory();
        assert_eq!(
            (log.filters, log.reserved_bytes, log.max_bytes, log.refused),
            (2, 16 << 10, 16 << 10, 1)
        );

        // 200 messages of about 500 bytes into both logs (each keeps two segments);
        // once a subscriber has the last one, the router has appended them all.
        for i in 0..200 {
            let mut payload = vec![b'x'; 500];
            if i == 199 {
                payload[..4].copy_from_slice(b"last");
            }
            broker
                .publish("edge/gw1/m1/state", payload, false)
                .expect("publish");
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                        if p.payload.starts_with(b"last") =>
                    {
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("connection failed: {e}"),
                }
            }
        })
        .await
        .expect("the last message arrives");
        let message = 4 + "edge/gw1/m1/state".len() as u64 + 500;
        let log = broker.log_memory();
        // Per log: one full segment (it may pass the size by a message) and the one
        // filling; 200 messages would be 104 KB in each.
        assert!(log.bytes >= 2 * (4 << 10), "{log:?}");
        assert!(
            log.bytes <= 2 * 2 * ((4 << 10) + message),
            "{log:?}, {message} bytes a message"
        );
    }

    #[tokio::test]
    async fn the_ingest_subscription_gets_a_log_for_the_largest_pushes() {
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        let (client, mut events) = test_client(mqtt.listen.port(), "t");
        let ok = rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce);
        let filter = ingest_filter(&broker.topics);
        assert_eq!(suback(&client, &mut events, &filter).await, ok);
        assert_eq!(suback(&client, &mut events, "#").await, ok);
        let log = broker.log_memory();
        assert_eq!(log.filters, 2);
        assert_eq!(
            log.reserved_bytes,
            (INGEST_LOG_SEGMENT * INGEST_LOG_SEGMENTS) as u64
                + mqtt.log_segment_size.0 * mqtt.log_segment_count as u64
        );
    }
}
