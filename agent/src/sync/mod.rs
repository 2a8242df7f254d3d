//! Upstream sync: forwards the store's records to the fleet's MQTT broker, at least
//! once and in seq order, across outages, broker restarts, crashes and power cuts.
//!
//! # How
//!
//! The store's log is the outbox. A durable *cursor* (the highest contiguous seq the
//! broker acknowledged) says where delivery stands; it advances only on PubAck and is
//! fsynced before anything counts as delivered. rumqttc has no per-publish ack
//! token, so each published request is matched with its `Outgoing::Publish(pkid)`
//! event ([`link::LinkEvent::Sent`]; requests go out in the order they were queued)
//! and then with `PubAck(pkid)` ([`link::LinkEvent::Acked`]). The session is clean
//! (`clean_session = true`, and a new rumqttc client and event loop for every
//! connection): after every ConnAck, including the first after a restart, the
//! outbox replays from the cursor, so nothing depends on rumqttc's in-memory queue,
//! and nothing of an earlier connection reaches the next. A crash loses at most the
//! batches in flight, which are sent again: duplicates are bounded by
//! `inflight_batches × batch_records` per restart, and subscribers drop them by
//! `(gw, seq)`. Acknowledged batches keep their place in the window until the cursor
//! covering them is durable; a trickle of them is written at most once a second
//! (each write is an fsync: SD-card wear), half a window or a stop at once.
//!
//! The task is an explicit state machine ([`phase::Phase`]), its label the status's
//! `state`:
//!
//! - `offline`: no connection; the link reconnects after a jittered delay that
//!   doubles from `reconnect_min` up to `reconnect_max`.
//! - `catching_up`: connected, more than one batch of records not yet acknowledged.
//! - `live`: connected, at most one batch behind.
//!
//! What only a connection has (the window of batches in flight, packet ids, the
//! schemas announced, the batch read ahead) lives in the connected states and goes
//! with them: a ConnAck creates it at the cursor, a loss drops it. The transitions
//! are methods (`on_connected`, `on_disconnected`, `on_caught_up`, `on_fell_behind`,
//! `on_sent`, `on_ack`, `on_cursor`).
//!
//! The broker connection is a [`link::Link`]: rumqttc's implementation
//! ([`rumqtt`]) runs the event loop on a task of its own, with a fresh client and
//! event loop for every connection; the machine's tests drive it with an in-process
//! double instead.
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
mod link;
mod phase;
mod rumqtt;
mod tls;
pub mod wire;

pub use config::{TlsConfig, UpstreamConfig};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{now_ms, Record};
use crate::store::{Store, StoreError};
use link::{Link, LinkEvent};
use phase::{Phase, Slot, Tag};
use rumqtt::RumqttLink;
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
    let options = rumqtt::options(cfg, gateway, &topics)?;
    let link = RumqttLink::start(
        options,
        cfg.inflight_batches + 32,
        cfg.reconnect_min.0,
        cfg.reconnect_max.0,
    );
    let (machine, status) = Machine::new(store, cfg, gateway, topics, link)?;
    let task = tokio::spawn(machine.run(committed, shutdown));
    Ok(UpstreamSync { status, task })
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

/// The sync task: the phase (with the connection's window) and what outlives a
/// connection (the durable cursor, resend requests, figures, store work under way).
struct Machine<L: Link> {
    store: Arc<Store>,
    cfg: UpstreamConfig,
    gateway: String,
    topics: UpstreamTopics,
    link: L,
    status_tx: watch::Sender<SyncStatus>,
    /// Offline, catching up or live, with the connection's window while connected.
    phase: Phase,
    /// Durable cursor (fsynced).
    cursor: u64,
    manifested: u64,
    /// Resend requests not yet fully republished: next seq, last seq.
    resends: VecDeque<(u64, u64)>,
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
    /// The read of the next batch, under way on the blocking pool. It may outlive
    /// the connection it was started for (see [`Prepared::from`]).
    reading: Option<tokio::task::JoinHandle<Result<Prepared, StoreError>>>,
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
    // Only records a power cut cannot take back, or whose seqs a durable lease
    // covers: a seq sent upstream is never assigned again to another record.
    let walk = store.visit_raw(
        from,
        store.sendable_seq(),
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
    Link(LinkEvent),
    Wake,
    Tick,
}

/// Ends a batch with the schemas `ids` (see `wire.rs`).
fn append_schemas(store: &Store, payload: &mut Vec<u8>, ids: &[u32]) {
    let schemas: Vec<Vec<u8>> = ids
        .iter()
        .filter_map(|&id| store.schema_bytes(id))
        .collect();
    wire::append_schemas(payload, &schemas);
}

impl<L: Link> Machine<L> {
    /// A machine that starts offline at the store's durable cursor.
    fn new(
        store: Arc<Store>,
        cfg: &UpstreamConfig,
        gateway: &str,
        topics: UpstreamTopics,
        link: L,
    ) -> Result<(Machine<L>, watch::Receiver<SyncStatus>), SyncError> {
        let cursor = store.sync_mark(MARK_CURSOR)?;
        let manifested = store.sync_mark(MARK_MANIFESTED)?;
        let (status_tx, status) = watch::channel(SyncStatus {
            cursor,
            last_seq: store.last_seq(),
            backlog: store.last_seq().saturating_sub(cursor),
            ..SyncStatus::default()
        });
        let now = Instant::now();
        let machine = Machine {
            store,
            cfg: cfg.clone(),
            gateway: gateway.to_string(),
            topics,
            link,
            status_tx,
            phase: Phase::new(now),
            cursor,
            manifested,
            resends: VecDeque::new(),
            status: SyncStatus {
                cursor,
                ..SyncStatus::default()
            },
            rate: Rate::default(),
            last_manifest: now,
            buf: Vec::new(),
            age_at: None,
            age_cursor: None,
            persist: None,
            cursor_written_at: None,
            last_compaction: now,
            compaction: None,
            sync: None,
            reading: None,
            read_retry_at: None,
        };
        Ok((machine, status))
    }

    async fn run(
        mut self,
        mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
        shutdown: CancellationToken,
    ) {
        let keep_alive = self.cfg.keep_alive.0;
        let mut tick = tokio::time::interval((keep_alive / 10).min(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut committed_open = true;
        let mut synced = self.store.subscribe_synced();
        tracing::info!(
            target: "edge_agent::sync",
            broker = %format!("{}:{}", self.cfg.host, self.cfg.port),
            cursor = self.cursor,
            last_seq = self.store.last_seq(),
            "upstream sync starting"
        );
        loop {
            if self.phase.is_connected() {
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
                event = self.link.next_event() => match event {
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
                    if let Some(session) = self.phase.session_mut() {
                        if batch.from == session.next {
                            session.ready = Some(batch);
                        }
                    }
                }
                Step::Read(Err(e)) => {
                    tracing::warn!(target: "edge_agent::sync", error = %e, "cannot read the outbox; trying again in 1 s");
                    self.status.last_error = Some(e);
                    self.read_retry_at = Some(Instant::now() + READ_RETRY);
                }
                Step::Wake => {}
                Step::Tick => self.on_tick(),
                Step::Link(event) => self.on_event(event),
            }
        }
        // The broker publishes the will only on an unexpected loss: say `offline` first.
        if self.phase.is_connected() {
            self.link
                .disconnect(Some((self.topics.status.clone(), b"offline".to_vec())));
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(event) = self.link.next_event().await {
                    if matches!(event, LinkEvent::Closed | LinkEvent::Down { .. }) {
                        break;
                    }
                }
            })
            .await;
        }
        self.link.stop().await;
        // No store work may outlive the task: the last `Arc` of the store must drop
        // here, not on the blocking pool (sled's final flush runs on drop).
        if let Some(compaction) = self.compaction.take() {
            let _ = compaction.await;
        }
        if let Some(reading) = self.reading.take() {
            let _ = reading.await;
        }
        if let Some(session) = self.phase.session_mut() {
            session.ready = None;
        }
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
        self.phase.on_disconnected(Instant::now());
        self.publish_status();
        tracing::info!(target: "edge_agent::sync", cursor = self.cursor, "upstream sync stopped");
    }

    /// The short tick: a cursor write that waited, retention, the dead-link
    /// watchdog, manifests.
    fn on_tick(&mut self) {
        self.advance_cursor(false);
        if self.last_compaction.elapsed() >= COMPACT_EVERY {
            self.last_compaction = Instant::now();
            self.compact();
        }
        let now = Instant::now();
        let limit = self.cfg.keep_alive.0 * 5 / 4;
        if self.phase.is_silent(now, limit) {
            let silent = self.phase.session().map(|s| now - s.last_incoming);
            tracing::warn!(
                target: "edge_agent::sync",
                silent_ms = silent.unwrap_or(limit).as_millis() as u64,
                "upstream link silent for longer than 1.25 x keepalive; reconnecting"
            );
            self.link.reset();
            self.disconnected("link silent (keepalive watchdog)".into());
        }
        if self.phase.is_connected() && self.last_manifest.elapsed() >= self.cfg.manifest_interval.0
        {
            self.publish_manifest();
        }
    }

    /// The connection is gone: back to offline, the window and the read-ahead with
    /// it; the next connection replays from the cursor.
    fn disconnected(&mut self, reason: String) {
        self.status.last_error = Some(reason);
        self.phase.on_disconnected(Instant::now());
    }

    fn on_event(&mut self, event: LinkEvent) {
        let now = Instant::now();
        if event.is_incoming() {
            self.phase.on_heard(now);
        }
        match event {
            LinkEvent::Connected => self.connected(now),
            LinkEvent::Sent(pkid) => self.phase.on_sent(pkid),
            LinkEvent::Acked(pkid) => {
                if self.phase.on_ack(pkid) {
                    self.advance_cursor(false);
                }
            }
            LinkEvent::Message { topic, payload } if topic == self.topics.resend => {
                self.on_resend(&payload);
            }
            LinkEvent::Down { reason, retry_in } => {
                let error = format!("{reason} (retry in {} ms)", retry_in.as_millis());
                if self.phase.is_connected() {
                    tracing::warn!(target: "edge_agent::sync", error = %error, "upstream connection lost");
                } else {
                    tracing::debug!(target: "edge_agent::sync", error = %error, "upstream connect failed");
                }
                self.disconnected(error);
            }
            LinkEvent::Message { .. } | LinkEvent::Heard | LinkEvent::Closed => {}
        }
    }

    /// ConnAck: a new session after the cursor, announced `online`, listening for
    /// resend commands.
    fn connected(&mut self, now: Instant) {
        let offline_ms = self.phase.offline_for(now).map(|d| d.as_millis() as u64);
        let backlog = self.store.last_seq().saturating_sub(self.cursor);
        self.phase
            .on_connected(self.cursor, backlog > self.cfg.batch_records as u64, now);
        self.status.connects += 1;
        self.status.last_error = None;
        if let Some(session) = self.phase.session_mut() {
            session.send(
                &mut self.link,
                &self.topics.status,
                true,
                b"online".to_vec(),
                Tag::Other,
            );
        }
        if !self.link.subscribe(&self.topics.resend) {
            tracing::warn!(target: "edge_agent::sync", "cannot subscribe to the command topic");
        }
        tracing::info!(
            target: "edge_agent::sync",
            cursor = self.cursor,
            backlog,
            offline_ms,
            "upstream connected; resuming after the cursor"
        );
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
        let Some(session) = self.phase.session() else {
            return;
        };
        let acked = || session.slots.iter().take_while(|s| s.acked);
        let target = acked().last().map_or(self.cursor, |s| s.last);
        if target <= self.cursor {
            return;
        }
        // A drain (half a window of full batches acknowledged) has its cursor synced at
        // once; a trickle of small batches (records sent one by one as they are
        // polled) waits for the next sync rather than asking for syncs of its own.
        let acked_records: usize = acked().map(|s| s.seqs.len()).sum();
        let urgent = force
            || acked_records * 2
                >= self.cfg.inflight_batches.max(1) * self.cfg.batch_records.max(1);
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
                self.phase.on_cursor(self.cursor);
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

    /// Publishes batches (resends first) while fewer than `inflight_batches` are
    /// outstanding.
    fn fill_window(&mut self) -> Result<(), StoreError> {
        let window = self.cfg.inflight_batches;
        let max_records = self.cfg.batch_records;
        let max_bytes = self.cfg.batch_bytes.0 as usize;
        let Some(session) = self.phase.session_mut() else {
            return Ok(());
        };
        while session.outstanding() < window {
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
                append_schemas(&self.store, &mut payload, &ids);
                let topic = &self.topics.records;
                if !session.send(&mut self.link, topic, false, payload, Tag::Other) {
                    return Ok(());
                }
                session.announced.extend(ids);
                self.status.resent += raw.records as u64;
            }
            if raw.covered_to >= to || raw.covered_to < from {
                self.resends.pop_front();
            } else if let Some(front) = self.resends.front_mut() {
                front.0 = raw.covered_to + 1;
            }
        }
        // The batch read ahead goes out once there is room, and the next read starts.
        while self
            .phase
            .session()
            .is_some_and(|s| s.has_room(window, max_records))
        {
            let Some(batch) = self.phase.session_mut().and_then(|s| s.ready.take()) else {
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
    /// when the link refused it (its request queue is full).
    fn enqueue(&mut self, batch: Prepared) -> bool {
        let Some(session) = self.phase.session_mut() else {
            // No connection: nothing to send it on; the next one reads again.
            return true;
        };
        if batch.from != session.next {
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
            let id = session.first_slot + session.slots.len() as u64;
            // The schemas not sent yet on this connection go with the batch.
            let fresh: Vec<u32> = batch
                .schemas
                .iter()
                .copied()
                .filter(|id| !session.announced.contains(id))
                .collect();
            let mut payload = batch.payload;
            append_schemas(&self.store, &mut payload, &fresh);
            let topic = &self.topics.records;
            if !session.send(&mut self.link, topic, false, payload, Tag::Slot(id)) {
                // The payload went with the refused request: `next` stays, so the
                // batch is read again.
                return false;
            }
            session.announced.extend(fresh);
        }
        session.next = batch.covered_to + 1;
        session.slots.push_back(slot);
        if session.slots.front().is_some_and(|s| s.acked) {
            self.advance_cursor(false);
        }
        true
    }

    /// Starts reading the next batch on the blocking pool, unless one is being read
    /// or waits already, or nothing is left to send.
    fn start_read(&mut self) {
        let Some(session) = self.phase.session() else {
            return;
        };
        let from = session.next;
        if self.reading.is_some()
            || session.ready.is_some()
            || from > self.store.last_seq()
            || self.read_retry_at.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        if from > self.store.sendable_seq() {
            self.request_sync();
            return;
        }
        self.read_retry_at = None;
        let store = self.store.clone();
        let gateway = self.gateway.clone();
        let max_records = self.cfg.batch_records;
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
        let Some(session) = self.phase.session_mut() else {
            return;
        };
        if session.send(
            &mut self.link,
            &self.topics.manifest,
            false,
            json,
            Tag::Other,
        ) {
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
        self.status.inflight_batches = self.phase.session().map_or(0, |s| s.unacked_batches());
        if backlog > self.cfg.batch_records as u64 {
            self.phase.on_fell_behind();
        } else {
            self.phase.on_caught_up();
        }
        self.status.state = self.phase.label();
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
mod fake;
#[cfg(test)]
mod machine_tests;
#[cfg(test)]
mod tests;
