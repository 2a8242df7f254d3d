//! Upstream sync: forwards the store's records to the fleet's MQTT broker, at least
//! once and in seq order, across outages, broker restarts, crashes and power cuts.
//!
//! # How
//!
//! The store's log is the outbox. A durable *cursor* (the highest contiguous seq the
//! broker acknowledged) says where delivery stands; it advances only on PubAck and is
//! fsynced before anything counts as delivered. rumqttc has no per-publish ack
//! token, so each published request is matched with its `Outgoing::Publish(pkid)`
//! event (requests go out in the order they were queued) and then with
//! `PubAck(pkid)`. The session is clean (`clean_session = true`): after every
//! ConnAck, including the first after a restart, the outbox replays from the cursor,
//! so nothing depends on rumqttc's in-memory queue. A crash loses at most the
//! batches in flight, which are sent again: duplicates are bounded by
//! `inflight_batches × batch_records` per restart, and subscribers drop them by
//! `(gw, seq)`. Acknowledged batches keep their place in the window until the cursor
//! covering them is durable; a trickle of them is written at most once a second
//! (each write is an fsync: SD-card wear), half a window or a stop at once.
//!
//! The task is an explicit state machine:
//!
//! - `offline`: no connection; reconnects after a jittered delay that doubles from
//!   `reconnect_min` up to `reconnect_max`.
//! - `catching_up`: connected, more than one batch of records not yet acknowledged.
//! - `live`: connected, at most one batch behind.
//!
//! Batches are read and framed on the blocking pool, one ahead of the window, so
//! sled's page reads overlap the publishing and acknowledgement handling instead
//! of taking turns with them on one thread.
//!
//! Its figures go out through a `watch` channel ([`SyncStatus`]). The task wakes on
//! the store's committed broadcast (new records), on MQTT events and on a short tick
//! (dead-link watchdog, status, manifests); it never polls sled in a loop.
//!
//! A link that goes silent without closing (a black hole) is detected by a watchdog:
//! while connected, the broker answers at least every keepalive (PingResp), so no
//! packet for 1.25 × keepalive drops the connection and reconnects.
//!
//! Wire formats and topics: [`wire`].

#[cfg(feature = "tools")]
pub mod bench;
pub mod config;
#[cfg(feature = "tools")]
pub mod lag;
mod tls;
pub mod wire;

pub use config::{TlsConfig, UpstreamConfig};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, MqttState, Outgoing, Packet, QoS,
    Transport,
};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{now_ms, Record};
use crate::store::{Store, StoreError};
use wire::{Manifest, ResendRequest, UpstreamTopics};

/// Durable mark: highest contiguous acknowledged seq (the store's quota counts the
/// records up to it as acknowledged).
pub const MARK_CURSOR: &str = crate::store::CURSOR_MARK;
/// Durable mark: last seq covered by a published manifest.
pub const MARK_MANIFESTED: &str = "manifested";

/// Where the sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    #[default]
    Offline,
    CatchingUp,
    Live,
}

impl SyncState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::Offline => "offline",
            SyncState::CatchingUp => "catching_up",
            SyncState::Live => "live",
        }
    }
}

/// Snapshot for the status page and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SyncStatus {
    pub state: SyncState,
    /// Highest contiguous seq acknowledged upstream and fsynced.
    pub cursor: u64,
    /// Newest durable seq in the store.
    pub last_seq: u64,
    /// Records not yet acknowledged (`last_seq - cursor`).
    pub backlog: u64,
    /// Age of the oldest unacknowledged record (from its timestamp), if any.
    pub oldest_unacked_age_ms: Option<u64>,
    /// Records acknowledged per second, averaged over the last few seconds.
    pub drain_rate: f64,
    /// Records acknowledged since the agent started (records the store's quota
    /// dropped while they were in flight are counted as dropped, not here).
    pub delivered: u64,
    /// Records the store's quota dropped before upstream acknowledged them, since
    /// the store was created.
    pub dropped: u64,
    /// Batches published and not yet acknowledged.
    pub inflight_batches: usize,
    /// Successful connections (ConnAcks) since start.
    pub connects: u64,
    /// Records republished on request.
    pub resent: u64,
    /// Command messages rejected as malformed or out of bounds.
    pub bad_commands: u64,
    /// Manifests published since start.
    pub manifests: u64,
    /// Cursor writes (each an fsync) since start.
    pub cursor_writes: u64,
    /// Last connection or store error, cleared on the next ConnAck.
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Tls(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// A running sync task.
pub struct UpstreamSync {
    pub status: watch::Receiver<SyncStatus>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the sync task (within a tokio runtime). It runs until `shutdown`.
pub fn start(
    store: Arc<Store>,
    cfg: &UpstreamConfig,
    gateway: &str,
    local_prefix: &str,
    committed: broadcast::Receiver<Arc<Vec<Record>>>,
    shutdown: CancellationToken,
) -> Result<UpstreamSync, SyncError> {
    let topics = UpstreamTopics::new(&cfg.prefix_or(local_prefix), gateway);
    let options = mqtt_options(cfg, gateway, &topics)?;
    let (client, eventloop) = AsyncClient::new(options, cfg.inflight_batches + 32);
    let (machine, status) = Machine::new(store, cfg, gateway, topics, client)?;
    let task = tokio::spawn(machine.run(eventloop, committed, shutdown));
    Ok(UpstreamSync { status, task })
}

fn mqtt_options(
    cfg: &UpstreamConfig,
    gateway: &str,
    topics: &UpstreamTopics,
) -> Result<MqttOptions, SyncError> {
    let mut options = MqttOptions::new(cfg.client_id_or(gateway), cfg.host.clone(), cfg.port);
    options.set_keep_alive(cfg.keep_alive.0);
    options.set_clean_session(true);
    options.set_last_will(LastWill::new(
        topics.status.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    // Room for a full batch and its framing; commands coming down are small.
    let outgoing = cfg.batch_bytes.0 as usize + cfg.batch_records * 64 + 4096;
    options.set_max_packet_size(64 << 10, outgoing);
    // More packet ids than this task ever has in flight: no collisions.
    options.set_inflight((cfg.inflight_batches + 16) as u16);
    if let Some(user) = &cfg.username {
        options.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        let config = tls::client_config(tls).map_err(SyncError::Tls)?;
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
    }
    Ok(options)
}

/// Something published and waiting for its `Outgoing::Publish` event.
#[derive(Debug, Clone, Copy)]
enum Tag {
    /// A batch of the outbox; the cursor moves when it is acknowledged.
    Slot(u64),
    /// Status, manifest, resent batch: nothing depends on its acknowledgement.
    Other,
}

/// A batch of the outbox in seq order.
#[derive(Debug)]
struct Slot {
    last: u64,
    acked: bool,
    /// Seqs of the records published in it.
    seqs: Vec<u64>,
}

/// Acknowledged records per second over a sliding window of a few seconds.
#[derive(Debug, Default)]
struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Rate {
    fn add(&mut self, now: Instant, records: u64) {
        self.samples.push_back((now, records));
        self.trim(now);
    }
    fn trim(&mut self, now: Instant) {
        while let Some((t, _)) = self.samples.front() {
            if now.duration_since(*t) > RATE_WINDOW {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }
    fn per_second(&mut self, now: Instant) -> f64 {
        self.trim(now);
        let total: u64 = self.samples.iter().map(|(_, n)| n).sum();
        total as f64 / RATE_WINDOW.as_secs_f64()
    }
}

struct Machine {
    store: Arc<Store>,
    cfg: UpstreamConfig,
    gateway: String,
    topics: UpstreamTopics,
    client: AsyncClient,
    status_tx: watch::Sender<SyncStatus>,
    connected: bool,
    /// Durable cursor (fsynced).
    cursor: u64,
    manifested: u64,
    /// Next seq to put into a batch.
    next: u64,
    /// Outbox batches not yet folded into the cursor, in seq order; ids are
    /// `first_slot..first_slot + slots.len()`.
    slots: VecDeque<Slot>,
    first_slot: u64,
    awaiting_outgoing: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    /// Resend requests not yet fully republished: next seq, last seq.
    resends: VecDeque<(u64, u64)>,
    /// Schemas sent on this connection (at most `codec::MAX_SCHEMAS`).
    announced: HashSet<u32>,
    last_incoming: Instant,
    status: SyncStatus,
    rate: Rate,
    last_manifest: Instant,
    buf: Vec<u8>,
    age_at: Option<Instant>,
    age_cursor: Option<u64>,
    /// The cursor write under way, if any.
    persist: Option<Persist>,
    /// When the last cursor write started.
    cursor_written_at: Option<Instant>,
    last_compaction: Instant,
    /// The retention pass under way on the blocking pool, if any; awaited before
    /// the task ends so no store work outlives the sync.
    compaction: Option<tokio::task::JoinHandle<()>>,
    /// A journal sync this task asked for, while it runs.
    sync: Option<tokio::task::JoinHandle<()>>,
    /// The read of the next batch, under way on the blocking pool.
    reading: Option<tokio::task::JoinHandle<Result<Prepared, StoreError>>>,
    /// A batch read ahead, waiting for room in the window.
    ready: Option<Prepared>,
    /// After a failed read, the next one waits until then (no busy loop of errors).
    read_retry_at: Option<Instant>,
}

/// A batch of the outbox, read and framed off the async threads.
#[derive(Debug)]
struct Prepared {
    /// The seq the read started at: the batch is used only if that is still the
    /// next seq to send (a reconnect rewinds to the cursor).
    from: u64,
    /// As [`crate::store::RawWalk::covered_to`].
    covered_to: u64,
    /// Seqs of the records in it, in order (none: the range held no readable record).
    seqs: Vec<u64>,
    /// The batch up to its `schemas` array (added when it is sent: see
    /// [`Machine::enqueue`]).
    payload: Vec<u8>,
    /// Schema ids its readings refer to.
    schemas: Vec<u32>,
}

/// Reads the batch starting at `from` (see [`Store::visit_raw`]) and frames it.
fn read_batch(
    store: &Store,
    gateway: &str,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Prepared, StoreError> {
    // Room for the whole batch up front: growing it by doubling copies it again.
    let mut payload = Vec::with_capacity(max_bytes + max_bytes / 4 + 4096);
    let mut seqs = Vec::with_capacity(max_records.min(4096));
    let mut batch = wire::BatchEncoder::new(gateway, &mut payload);
    // Only records a power cut cannot take back: a seq sent upstream is never
    // assigned again to another record.
    let walk = store.visit_raw(
        from,
        store.synced_seq(),
        max_records,
        max_bytes,
        &mut |seq, bytes| {
            batch.push(seq, bytes);
            seqs.push(seq);
        },
    )?;
    let schemas = batch.finish();
    Ok(Prepared {
        from,
        covered_to: walk.covered_to,
        seqs,
        payload,
        schemas,
    })
}

/// Longest a live trickle of acknowledged batches waits for its cursor write.
const CURSOR_EVERY: Duration = Duration::from_secs(1);

/// Wait after a failed batch read before the next one.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Shortest time between two reads of the oldest unacknowledged record's age.
const AGE_REFRESH: Duration = Duration::from_millis(200);

/// How often retention runs, and how many blocks (of up to 32 records) one run deletes.
const COMPACT_EVERY: Duration = Duration::from_secs(5);
const COMPACT_BLOCKS: usize = 64;

/// A cursor write running on the blocking pool (it fsyncs).
struct Persist {
    target: u64,
    /// Seqs of the records it makes delivered.
    seqs: Vec<u64>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

/// A durable cursor and the seqs of the records it newly covers.
type Persisted = Result<(u64, Vec<u64>), String>;

/// Waits for the cursor write, if one is under way; otherwise never returns.
async fn join_persist(persist: &mut Option<Persist>) -> Persisted {
    match persist {
        Some(p) => match (&mut p.task).await {
            Ok(Ok(())) => Ok((p.target, std::mem::take(&mut p.seqs))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => std::future::pending().await,
    }
}

/// Waits for the batch read, if one is under way; otherwise never returns.
async fn join_read(
    reading: &mut Option<tokio::task::JoinHandle<Result<Prepared, StoreError>>>,
) -> Result<Prepared, String> {
    match reading {
        Some(task) => match task.await {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(e)) => Err(format!("store: {e}")),
            Err(e) => Err(format!("batch read: {e}")),
        },
        None => std::future::pending().await,
    }
}

enum Step {
    Stop,
    Persisted(Persisted),
    Read(Result<Prepared, String>),
    Link(Result<Event, String>),
    Wake,
    Tick,
}

/// Owns rumqttc's event loop and forwards its events in order. `EventLoop::poll` is
/// not cancel-safe while connecting (a dropped poll closes a connection the broker
/// has just accepted, and the broker then publishes the will), so it is polled here
/// to completion, never raced against other work. `reset` drops the connection
/// (dead-link watchdog); after a failure the next attempt waits a jittered backoff.
async fn link_task(
    mut eventloop: EventLoop,
    min: Duration,
    max: Duration,
    tx: mpsc::Sender<Result<Event, String>>,
    reset: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let polled = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = reset.notified() => {
                // Drops the socket; the next poll connects again.
                eventloop.clean();
                continue;
            }
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(event) => {
                if let Event::Incoming(Packet::ConnAck(_)) = event {
                    // A new clean session: rumqttc's leftovers (buffered events,
                    // packet ids) belong to the old one.
                    eventloop.state = MqttState::new(eventloop.mqtt_options.inflight(), false);
                    failures = 0;
                }
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let delay = backoff(min, max, failures);
                failures = failures.saturating_add(1);
                if tx
                    .send(Err(format!("{e} (retry in {} ms)", delay.as_millis())))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Delay before reconnect attempt number `failures + 1`: doubling from `min` up to
/// `max`, then jittered to between half and all of it, so a fleet does not
/// reconnect in step.
fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.min(16)).min(max);
    exp.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

impl Machine {
    /// A machine that starts offline at the store's durable cursor.
    fn new(
        store: Arc<Store>,
        cfg: &UpstreamConfig,
        gateway: &str,
        topics: UpstreamTopics,
        client: AsyncClient,
    ) -> Result<(Machine, watch::Receiver<SyncStatus>), SyncError> {
        let cursor = store.sync_mark(MARK_CURSOR)?;
        let manifested = store.sync_mark(MARK_MANIFESTED)?;
        let (status_tx, status) = watch::channel(SyncStatus {
            cursor,
            last_seq: store.last_seq(),
            backlog: store.last_seq().saturating_sub(cursor),
            ..SyncStatus::default()
        });
        let machine = Machine {
            store,
            cfg: cfg.clone(),
            gateway: gateway.to_string(),
            topics,
            client,
            status_tx,
            connected: false,
            cursor,
            manifested,
            next: cursor + 1,
            slots: VecDeque::new(),
            first_slot: 0,
            awaiting_outgoing: VecDeque::new(),
            inflight: HashMap::new(),
            resends: VecDeque::new(),
            announced: HashSet::new(),
            last_incoming: Instant::now(),
            status: SyncStatus {
                cursor,
                ..SyncStatus::default()
            },
            rate: Rate::default(),
            last_manifest: Instant::now(),
            buf: Vec::new(),
            age_at: None,
            age_cursor: None,
            persist: None,
            cursor_written_at: None,
            last_compaction: Instant::now(),
            compaction: None,
            sync: None,
            reading: None,
            ready: None,
            read_retry_at: None,
        };
        Ok((machine, status))
    }

    async fn run(
        mut self,
        eventloop: EventLoop,
        mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
        shutdown: CancellationToken,
    ) {
        let keep_alive = self.cfg.keep_alive.0;
        let mut tick = tokio::time::interval((keep_alive / 10).min(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut committed_open = true;
        let mut synced = self.store.subscribe_synced();
        let (link_tx, mut link) = mpsc::channel(256);
        let reset = Arc::new(Notify::new());
        let link_stop = CancellationToken::new();
        let link_task = tokio::spawn(link_task(
            eventloop,
            self.cfg.reconnect_min.0,
            self.cfg.reconnect_max.0,
            link_tx,
            reset.clone(),
            link_stop.clone(),
        ));
        tracing::info!(
            target: "edge_agent::sync",
            broker = %format!("{}:{}", self.cfg.host, self.cfg.port),
            cursor = self.cursor,
            last_seq = self.store.last_seq(),
            "upstream sync starting"
        );
        loop {
            if self.connected {
                if let Err(e) = self.fill_window() {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "cannot read the outbox");
                    self.status.last_error = Some(format!("store: {e}"));
                }
            }
            self.publish_status();
            let mut persist = self.persist.take();
            let mut reading = self.reading.take();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Step::Stop,
                done = join_persist(&mut persist) => {
                    persist = None;
                    Step::Persisted(done)
                }
                read = join_read(&mut reading) => {
                    reading = None;
                    Step::Read(read)
                }
                event = link.recv() => match event {
                    Some(event) => Step::Link(event),
                    None => Step::Stop,
                },
                wake = committed.recv(), if committed_open => {
                    if matches!(wake, Err(broadcast::error::RecvError::Closed)) {
                        committed_open = false;
                    }
                    Step::Wake
                }
                _ = synced.changed() => Step::Wake,
                _ = tick.tick() => Step::Tick,
            };
            self.persist = persist;
            self.reading = reading;
            match step {
                Step::Stop => break,
                Step::Persisted(result) => self.persisted(result),
                Step::Read(Ok(batch)) => {
                    // Read before a reconnect rewound `next`: not the batch to send.
                    if self.connected && batch.from == self.next {
                        self.ready = Some(batch);
                    }
                }
                Step::Read(Err(e)) => {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "cannot read the outbox; trying again in 1 s");
                    self.status.last_error = Some(e);
                    self.read_retry_at = Some(Instant::now() + READ_RETRY);
                }
                Step::Wake => {}
                Step::Tick => {
                    self.advance_cursor(false);
                    if self.last_compaction.elapsed() >= COMPACT_EVERY {
                        self.last_compaction = Instant::now();
                        self.compact();
                    }
                    if self.connected && self.last_incoming.elapsed() > keep_alive * 5 / 4 {
                        tracing::warn!(
                            target: "edge_agent::sync",
                            silent_ms = self.last_incoming.elapsed().as_millis() as u64,
                            "upstream link silent for longer than 1.25 x keepalive; reconnecting"
                        );
                        reset.notify_one();
                        self.disconnected("link silent (keepalive watchdog)".into());
                    }
                    if self.connected
                        && self.last_manifest.elapsed() >= self.cfg.manifest_interval.0
                    {
                        self.publish_manifest();
                    }
                }
                Step::Link(Ok(event)) => self.on_event(event),
                Step::Link(Err(e)) => {
                    if self.connected {
                        tracing::warn!(target: "edge_agent::sync", error = %e, "upstream connection lost");
                    } else {
                        tracing::debug!(target: "edge_agent::sync", error = %e, "upstream connect failed");
                    }
                    self.disconnected(e);
                }
            }
        }
        // The broker publishes the will only on an unexpected loss: say `offline` first.
        if self.connected {
            let _ = self.client.try_publish(
                self.topics.status.clone(),
                QoS::AtMostOnce,
                true,
                "offline",
            );
            let _ = self.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(event) = link.recv().await {
                    if matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        link_stop.cancel();
        let _ = link_task.await;
        // No store work may outlive the task: the last `Arc` of the store must drop
        // here, not on the blocking pool (sled's final flush runs on drop).
        if let Some(compaction) = self.compaction.take() {
            let _ = compaction.await;
        }
        if let Some(reading) = self.reading.take() {
            let _ = reading.await;
        }
        self.ready = None;
        // What was acknowledged becomes durable now, not after a restart's re-send:
        // the write under way, if any, then one for what it did not cover.
        for _ in 0..2 {
            self.advance_cursor(true);
            let mut persist = self.persist.take();
            if persist.is_none() {
                break;
            }
            let done = join_persist(&mut persist).await;
            self.persisted(done);
        }
        // Nothing is acknowledged any more, but a write `persisted` started must
        // not outlive the task either.
        if let Some(last) = self.persist.take() {
            let _ = last.task.await;
        }
        self.connected = false;
        self.status.state = SyncState::Offline;
        self.publish_status();
        tracing::info!(target: "edge_agent::sync", cursor = self.cursor, "upstream sync stopped");
    }

    fn disconnected(&mut self, reason: String) {
        self.connected = false;
        self.status.last_error = Some(reason);
        self.slots.clear();
        self.awaiting_outgoing.clear();
        self.inflight.clear();
        self.ready = None;
        self.next = self.cursor + 1;
    }

    fn on_event(&mut self, event: Event) {
        if let Event::Incoming(_) = event {
            self.last_incoming = Instant::now();
        }
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.connected = true;
                // A new connection: the schemas go again with the batches that need them.
                self.announced.clear();
                self.status.connects += 1;
                self.status.last_error = None;
                self.slots.clear();
                self.awaiting_outgoing.clear();
                self.inflight.clear();
                self.ready = None;
                self.next = self.cursor + 1;
                self.send(
                    self.topics.status.clone(),
                    true,
                    b"online".to_vec(),
                    Tag::Other,
                );
                if let Err(e) = self
                    .client
                    .try_subscribe(self.topics.resend.clone(), QoS::AtLeastOnce)
                {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "cannot subscribe to the command topic");
                }
                tracing::info!(
                    target: "edge_agent::sync",
                    cursor = self.cursor,
                    backlog = self.store.last_seq().saturating_sub(self.cursor),
                    "upstream connected; resuming after the cursor"
                );
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(tag) = self.awaiting_outgoing.pop_front() {
                    self.inflight.insert(pkid, tag);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Tag::Slot(id)) = self.inflight.remove(&ack.pkid) {
                    if let Some(slot) = id
                        .checked_sub(self.first_slot)
                        .and_then(|i| self.slots.get_mut(i as usize))
                    {
                        slot.acked = true;
                    }
                    self.advance_cursor(false);
                }
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == self.topics.resend => {
                self.on_resend(&p.payload);
            }
            _ => {}
        }
    }

    /// Starts fsyncing the cursor up to the acknowledged batches at the front, unless
    /// a write is already under way (then the next one covers these too). The
    /// batches keep their place in the window until the cursor is durable, so a
    /// crash re-sends at most `inflight_batches` batches.
    ///
    /// Each cursor write is an fsync, and fsyncs are what wears an SD card: unless
    /// `force`d, a trickle of live batches is made durable at most every
    /// [`CURSOR_EVERY`]. Half a window of acknowledged batches never waits, so a
    /// drain keeps its pace.
    fn advance_cursor(&mut self, force: bool) {
        if self.persist.is_some() {
            return;
        }
        let acked = || self.slots.iter().take_while(|s| s.acked);
        let target = acked().last().map_or(self.cursor, |s| s.last);
        if target <= self.cursor {
            return;
        }
        let urgent = force || acked().count() * 2 >= self.cfg.inflight_batches.max(1);
        let due = urgent
            || self
                .cursor_written_at
                .map_or(true, |t| t.elapsed() >= CURSOR_EVERY);
        if !due {
            return;
        }
        self.cursor_written_at = Some(Instant::now());
        self.status.cursor_writes += 1;
        let seqs = acked()
            .flat_map(|s| s.seqs.iter().copied())
            .filter(|&seq| seq > self.cursor)
            .collect();
        let store = self.store.clone();
        self.persist = Some(Persist {
            target,
            seqs,
            // A live trickle's cursor goes with the next journal sync; a drain's or a
            // stop's is synced at once.
            task: tokio::task::spawn_blocking(move || {
                if urgent {
                    store.set_sync_mark(MARK_CURSOR, target)
                } else {
                    store.set_sync_mark_with_next_sync(MARK_CURSOR, target)
                }
            }),
        });
    }

    /// Deletes a few of the oldest acknowledged blocks past the retention, on the
    /// blocking pool; one pass at a time.
    fn compact(&mut self) {
        if self.compaction.as_ref().is_some_and(|c| !c.is_finished()) || self.store.has_failed() {
            return;
        }
        let store = self.store.clone();
        let acked = self.cursor;
        let cutoff = now_ms().saturating_sub(self.cfg.retention.0.as_millis() as i64);
        self.compaction = Some(tokio::task::spawn_blocking(move || {
            match store.compact(acked, cutoff, COMPACT_BLOCKS) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(target: "edge_agent::sync", records = n, "compacted records past the retention")
                }
                Err(e) => {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "compaction failed")
                }
            }
        }));
    }

    /// The cursor write finished: only now do its records count as delivered, those
    /// the store's quota dropped meanwhile excepted (they count as dropped).
    fn persisted(&mut self, result: Persisted) {
        match result {
            Ok((target, seqs)) => {
                let delivered = seqs.len() as u64 - self.store.dropped_among(&seqs);
                self.cursor = self.cursor.max(target);
                while self.slots.front().is_some_and(|s| s.last <= self.cursor) {
                    self.slots.pop_front();
                    self.first_slot += 1;
                }
                if !self.connected {
                    self.next = self.next.max(self.cursor + 1);
                }
                self.status.delivered += delivered;
                self.rate.add(Instant::now(), delivered);
            }
            Err(e) => {
                // Not durable, so not delivered: the batches stay in the window and
                // the write is tried again on the next acknowledgement or tick.
                let error = format!("store: {e}");
                if self.status.last_error.as_ref() != Some(&error) {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "cannot persist the cursor");
                }
                self.status.last_error = Some(error);
            }
        }
        self.advance_cursor(false);
    }

    fn outstanding(&self) -> usize {
        self.awaiting_outgoing.len() + self.inflight.len()
    }

    fn send(&mut self, topic: String, retain: bool, payload: Vec<u8>, tag: Tag) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.awaiting_outgoing.push_back(tag);
                true
            }
            Err(e) => {
                tracing::debug!(target: "edge_agent::sync", error = %e, "request queue full");
                false
            }
        }
    }

    /// Publishes batches (resends first) while fewer than `inflight_batches` are
    /// outstanding.
    fn fill_window(&mut self) -> Result<(), StoreError> {
        let window = self.cfg.inflight_batches;
        let max_records = self.cfg.batch_records;
        let max_bytes = self.cfg.batch_bytes.0 as usize;
        while self.outstanding() < window {
            let Some((from, to)) = self.resends.front().copied() else {
                break;
            };
            let mut batch = wire::BatchEncoder::new(&self.gateway, &mut self.buf);
            let raw =
                self.store
                    .visit_raw(from, to, max_records, max_bytes, &mut |seq, bytes| {
                        batch.push(seq, bytes)
                    })?;
            // A resend carries every schema its readings refer to: whoever asked
            // may have missed them.
            let ids = batch.finish();
            if raw.records > 0 {
                let mut payload = std::mem::take(&mut self.buf);
                self.append_schemas(&mut payload, &ids);
                if !self.send(self.topics.records.clone(), false, payload, Tag::Other) {
                    return Ok(());
                }
                self.announced.extend(ids);
                self.status.resent += raw.records as u64;
            }
            if raw.covered_to >= to || raw.covered_to < from {
                self.resends.pop_front();
            } else if let Some(front) = self.resends.front_mut() {
                front.0 = raw.covered_to + 1;
            }
        }
        // The batch read ahead goes out once there is room, and the next read starts.
        while self.slots.len() < window && self.outstanding() < window + 2 {
            let Some(batch) = self.ready.take() else {
                break;
            };
            if !self.enqueue(batch) {
                return Ok(());
            }
        }
        self.start_read();
        Ok(())
    }

    /// Publishes a batch read ahead and gives it its slot in the window; `false`
    /// when rumqttc's request queue is full.
    fn enqueue(&mut self, batch: Prepared) -> bool {
        if batch.from != self.next {
            return true;
        }
        if batch.covered_to < batch.from {
            // The read got nowhere (the store's walk always moves on while `from` is
            // at most its last seq): wait rather than read again at once.
            self.read_retry_at = Some(Instant::now() + READ_RETRY);
            return true;
        }
        let slot = Slot {
            last: batch.covered_to,
            acked: batch.seqs.is_empty(),
            seqs: batch.seqs,
        };
        if !slot.acked {
            let id = self.first_slot + self.slots.len() as u64;
            // The schemas not sent yet on this connection go with the batch.
            let fresh: Vec<u32> = batch
                .schemas
                .iter()
                .copied()
                .filter(|id| !self.announced.contains(id))
                .collect();
            let mut payload = batch.payload;
            self.append_schemas(&mut payload, &fresh);
            if !self.send(self.topics.records.clone(), false, payload, Tag::Slot(id)) {
                // The payload went with the refused request: `next` stays, so the
                // batch is read again.
                return false;
            }
            self.announced.extend(fresh);
        }
        self.next = batch.covered_to + 1;
        self.slots.push_back(slot);
        if self.slots.front().is_some_and(|s| s.acked) {
            self.advance_cursor(false);
        }
        true
    }

    /// Ends a batch with the schemas `ids` (see `wire.rs`).
    fn append_schemas(&self, payload: &mut Vec<u8>, ids: &[u32]) {
        let schemas: Vec<Vec<u8>> = ids
            .iter()
            .filter_map(|&id| self.store.schema_bytes(id))
            .collect();
        wire::append_schemas(payload, &schemas);
    }

    /// Starts reading the next batch on the blocking pool, unless one is being read
    /// or waits already, or nothing is left to send.
    fn start_read(&mut self) {
        if !self.connected
            || self.reading.is_some()
            || self.ready.is_some()
            || self.next > self.store.last_seq()
            || self.read_retry_at.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        if self.next > self.store.synced_seq() {
            self.request_sync();
            return;
        }
        self.read_retry_at = None;
        let store = self.store.clone();
        let gateway = self.gateway.clone();
        let (from, max_records) = (self.next, self.cfg.batch_records);
        let max_bytes = self.cfg.batch_bytes.0 as usize;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            read_batch(&store, &gateway, from, max_records, max_bytes)
        }));
    }

    /// Records wait for their journal sync and the link waits for them: sync now
    /// rather than at the next `store.sync_interval` (one sync at a time; records
    /// appended meanwhile go with the next). Its end wakes the task.
    fn request_sync(&mut self) {
        if !self.store.upstream_sync_now()
            || self.store.has_failed()
            || self.sync.as_ref().is_some_and(|t| !t.is_finished())
        {
            // The writer's periodic sync wakes the task.
            return;
        }
        let store = self.store.clone();
        self.sync = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = store.sync() {
                tracing::warn!(target: "edge_agent::sync", error = %e, "journal sync failed");
            }
        }));
    }

    fn on_resend(&mut self, payload: &[u8]) {
        match ResendRequest::parse(payload, self.cfg.resend_max_span) {
            Ok(req) => {
                tracing::info!(target: "edge_agent::sync", from = req.from, to = req.to, "resend requested");
                // Bounded queue: a flood of requests cannot grow memory.
                if self.resends.len() >= 64 {
                    self.status.bad_commands += 1;
                    tracing::warn!(target: "edge_agent::sync", "too many resend requests queued; request dropped");
                } else {
                    self.resends.push_back((req.from, req.to));
                }
            }
            Err(reason) => {
                self.status.bad_commands += 1;
                tracing::warn!(target: "edge_agent::sync", reason, "malformed resend request ignored");
            }
        }
    }

    /// Publishes a manifest for the records acknowledged since the last one.
    fn publish_manifest(&mut self) {
        self.last_manifest = Instant::now();
        let (from, to) = (self.manifested + 1, self.cursor);
        if from > to {
            return;
        }
        let digest = match self.store.digest_range(from, to) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target: "edge_agent::sync", error = %e, "cannot compute a manifest");
                return;
            }
        };
        let manifest = Manifest {
            gw: &self.gateway,
            from,
            to,
            count: digest.count,
            crc32c: digest.crc32c,
            ts_ms: now_ms(),
        };
        let Ok(json) = serde_json::to_vec(&manifest) else {
            return;
        };
        if self.send(self.topics.manifest.clone(), false, json, Tag::Other) {
            // Marked once queued: a lost manifest is superseded by the records
            // themselves; the next one starts after this range.
            if let Err(e) = self.store.set_sync_mark_lazily(MARK_MANIFESTED, to) {
                tracing::warn!(target: "edge_agent::sync", error = %e, "cannot persist the manifest mark");
            }
            self.manifested = to;
            self.status.manifests += 1;
            tracing::debug!(target: "edge_agent::sync", from, to, count = digest.count, "manifest published");
        }
    }

    fn publish_status(&mut self) {
        let last = self.store.last_seq();
        let backlog = last.saturating_sub(self.cursor);
        self.status.cursor = self.cursor;
        self.status.last_seq = last;
        self.status.dropped = self.store.dropped_total();
        self.status.backlog = backlog;
        self.status.inflight_batches = self.slots.iter().filter(|s| !s.acked).count();
        self.status.state = if !self.connected {
            SyncState::Offline
        } else if backlog > self.cfg.batch_records as u64 {
            SyncState::CatchingUp
        } else {
            SyncState::Live
        };
        let now = Instant::now();
        self.status.drain_rate = self.rate.per_second(now);
        // The oldest record's age needs a read: once a second, and at most every
        // AGE_REFRESH while the cursor moves (a drain moves it thousands of times a
        // second).
        let since = self.age_at.map(|t| now.duration_since(t));
        if backlog == 0 {
            self.status.oldest_unacked_age_ms = None;
            self.age_at = None;
        } else if since.map_or(true, |d| {
            d >= Duration::from_secs(1)
                || (self.age_cursor != Some(self.cursor) && d >= AGE_REFRESH)
        }) {
            self.status.oldest_unacked_age_ms = self.oldest_age(self.cursor + 1, last);
            self.age_at = Some(now);
            self.age_cursor = Some(self.cursor);
        }
        self.status_tx.send_if_modified(|s| {
            if *s == self.status {
                false
            } else {
                *s = self.status.clone();
                true
            }
        });
    }

    fn oldest_age(&self, from: u64, to: u64) -> Option<u64> {
        let rec = self.store.read_range(from, to.min(from + 4)).ok()?;
        let ts = rec.first().map(|r| r.payload.ts_ms())?;
        Some(now_ms().saturating_sub(ts).max(0) as u64)
    }
}

#[cfg(test)]
mod tests;
