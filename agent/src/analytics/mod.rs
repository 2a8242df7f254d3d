//! The analytics stage: turns committed readings into 15-minute intervals, alarm
//! events and cluster statistics, stores them and publishes them.
//!
//! **Input.** The worker subscribes to the store writer's `committed` broadcast, so
//! polled and pushed (ingest) readings take the same path. It keeps the seq of the
//! last record it has processed; a batch that starts past it (the broadcast lagged,
//! or records were committed while it was busy) is first completed from the store
//! with `read_range`, and a periodic tick does the same when nothing arrives, so no
//! reading is skipped.
//!
//! **Energy quantity.** One per meter, chosen at the meter's first reading that has
//! one, then kept (stored under `derive/info/{meter}`): `meters[].energy_quantity`
//! when configured; else the first `energy_total` quantity whose name contains
//! `import`; else the first `energy_total`; else the first `energy_delta`; else the
//! quantity named `power`, else the first `power`. Its unit must be W, kW, Wh or kWh
//! and fit the kind. Readings without that quantity add nothing to the intervals.
//!
//! **Intervals.** One [`IntervalTracker`] per meter (grace, retention and max_gap from
//! `[analytics]`), holding only its open intervals' samples and the typical-spacing
//! state; the rules are in docs/intervals.md. Intervals close as the watermark passes
//! (checked after every reading), and by the wall clock at each tick for a meter
//! whose watermark is more than `max(max_gap, spacing) + grace` behind it. Late
//! samples (in closed intervals) are not held: the closed intervals they touch are
//! recomputed from the store's readings (a few intervals per read) and each changed
//! one gets the next revision after the newest one in the interval index. Samples
//! older than the retention behind the watermark change nothing and are counted
//! ([`AnalyticsShared::too_late`]; pushes count them in their answer). An operator
//! can recompute a window ([`AnalyticsShared::recompute`]). Closed intervals and
//! revisions become [`Payload::Interval`] records in the log and are published on
//! `{prefix}/{gw}/{meter}/energy/15m`. A per-day index in the state tree
//! (`derive/iv/{meter}/{day}`: start, revision and seq of every interval record)
//! serves the series queries: reading a window costs one state read per day plus
//! one block read per record, never a log scan.
//!
//! **Alarms.** See [`alarms`]. Events are [`Payload::Event`] records, published with
//! QoS 1 on `{prefix}/{gw}/{meter}/events` by a rumqttc client connected to the
//! embedded broker over loopback: rumqttd's local links can only publish QoS 0, and
//! a QoS 0 publish through the router is delivered at QoS 0 to every subscriber
//! whatever its subscription asked for.
//!
//! **Drops.** The store's [`Payload::Dropped`] records (records its quota deleted
//! before upstream acknowledged them, or readings a full disk made it drop) pass
//! through here like every committed record and are published with QoS 1 on
//! `{prefix}/{gw}/events` (JSON, see [`drop_event_json`]), so a local dashboard sees
//! data loss as it happens.
//!
//! **Order of a step and what a crash does.** A step processes records in seq order:
//! (1) trackers and alarm counters in memory; (2) the new interval and event records
//! go to the store writer and are durable; (3) the state (trackers, alarm counters,
//! interval index and the cursor: last processed seq and the highest own record
//! accounted for) is written as one atomic batch, visible at once and durable with
//! the store's next flush; (4) intervals and events are published. State is also
//! written and flushed every `persist_every` and on shutdown.
//! On start the worker loads that state and replays the log after the cursor, which
//! rebuilds the alarm counters and trackers exactly as they were (the readings are
//! in the log before anyone processes them). A crash before (3) is on disk leaves
//! records the replay would create again: the worker first collects its own records
//! past the cursor and does not store them twice, but publishes those events again
//! (they may not have gone out): at-least-once on MQTT, exactly once in the log.
//! The last events are also kept in the state for readers ([`events`]).
//!
//! **Clusters.** Per meter, after `cluster_every` of its readings were processed,
//! [`cluster_intervals`] runs on the blocking pool (never on the polling or
//! publishing path) over the meter's stored intervals (mean power and energy of
//! every interval that has data); the result is stored under `clusters/{meter}` and
//! published retained on `{prefix}/{gw}/{meter}/clusters`. The reading counts are
//! kept in memory: after a restart a meter waits for another `cluster_every`
//! readings.

pub mod alarms;
pub mod config;
pub mod events;
mod ingest_watch;
pub mod series;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::analytics::config::AnalyticsSections;
use crate::broker::config::MqttConfig;
use crate::broker::{rfc3339_ms, LocalBroker};
use crate::derive::intervals::{check_kind_unit, interval_index, recompute_intervals};
use crate::derive::{
    cluster_intervals, ClusterCount, ClusterStats, Interval, IntervalParams, IntervalTracker,
    TrackerParams, Unit, INTERVAL_MS,
};
use crate::model::{
    now_ms, AlarmEvent, AlarmState, DropEvent, IntervalRecord, Kind, Payload, Reading, Record,
};
use crate::store::{StateEntry, StateError, Store, StoreWriter};
use alarms::{AlarmBook, Rule};
use events::{EventLog, StoredEvent, KEY_EVENTS};

const DAY_MS: i64 = 86_400_000;
/// Records read from the store per step when catching up.
const CATCH_UP_STEP: u64 = 5_000;

/// Intervals recomputed from the store per read (bounds the readings held at once).
const RECOMPUTE_STEP: i64 = 4;
/// First window when looking for the stored sample next to a time.
const SEARCH_START_MS: i64 = 60_000;

/// State key of the worker's cursor and alarm counters.
pub const KEY_CURSOR: &str = "derive/cursor";

/// State key of the readings counted per meter since its last cluster run: saved
/// with the cursor, so a restart neither forgets nor double-counts them.
const KEY_CLUSTER_COUNTS: &str = "derive/cluster_counts";

/// State key of a meter's energy quantity.
pub fn info_key(meter: &str) -> String {
    format!("derive/info/{meter}")
}

fn tracker_key(meter: &str) -> String {
    format!("derive/tracker/{meter}")
}

/// Prefix of a meter's interval index keys.
pub fn index_prefix(meter: &str) -> String {
    format!("derive/iv/{meter}/")
}

/// Index key of the day (since the epoch) holding `start_ms`.
pub fn index_key(meter: &str, start_ms: i64) -> String {
    format!(
        "{}{:08}",
        index_prefix(meter),
        start_ms.div_euclid(DAY_MS).max(0)
    )
}

/// Prefix of the stored cluster summaries.
pub const CLUSTERS_PREFIX: &str = "clusters/";

/// The quantity a meter's intervals come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyInfo {
    pub quantity: String,
    pub kind: Kind,
    pub unit: Unit,
    pub params: IntervalParams,
}

/// One entry of the interval index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalRef {
    #[serde(rename = "s")]
    pub start_ms: i64,
    #[serde(rename = "r")]
    pub revision: u32,
    #[serde(rename = "q")]
    pub seq: u64,
}

/// A meter's clusters as stored and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub meter: String,
    pub quantity: String,
    /// When they were computed, Unix ms.
    pub computed_ms: i64,
    #[serde(flatten)]
    pub stats: ClusterStats,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Cursor {
    /// Every record up to this seq has been processed.
    through_seq: u64,
    /// Every own record up to this seq is accounted for in this state.
    own_through: u64,
    alarms: AlarmBook,
}

/// What the analytics stage needs from the configuration.
#[derive(Debug, Clone)]
pub struct AnalyticsSettings {
    pub gateway: String,
    pub tracker: TrackerParams,
    /// Poll interval of each configured meter, ms.
    pub spacing_ms: HashMap<String, i64>,
    /// `meters[].energy_quantity`.
    pub energy_quantity: HashMap<String, String>,
    pub rules: Vec<Rule>,
    pub cluster_every: u64,
    pub clusters: ClusterCount,
    pub persist_every: Duration,
    /// Longest window of one recompute request, ms.
    pub max_recompute_ms: i64,
}

impl AnalyticsSettings {
    pub fn from_config(config: &impl AnalyticsSections) -> AnalyticsSettings {
        let a = config.analytics();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        AnalyticsSettings {
            gateway: config.gateway_id().to_string(),
            tracker: TrackerParams {
                interval: IntervalParams {
                    max_gap_ms: ms(a.max_gap.0),
                    spacing_ms: None,
                },
                grace_ms: ms(a.grace.0),
                retention_ms: ms(a.retention.0),
            },
            spacing_ms: config
                .meters()
                .iter()
                .map(|m| (m.id.clone(), ms(m.interval.0)))
                .collect(),
            energy_quantity: config
                .meters()
                .iter()
                .filter_map(|m| Some((m.id.clone(), m.energy_quantity.clone()?)))
                .collect(),
            rules: Rule::from_config(config.alarms()),
            cluster_every: a.cluster_every.max(1),
            clusters: a.clusters,
            persist_every: a.persist_every.0.max(Duration::from_millis(100)),
            max_recompute_ms: ms(a.max_recompute.0).max(INTERVAL_MS),
        }
    }
}

/// Picks a meter's energy quantity from a reading (see the module doc).
pub fn energy_quantity(reading: &Reading, configured: Option<&str>) -> Option<EnergyInfo> {
    let usable = |v: &&crate::model::Value| {
        Unit::parse(&v.unit)
            .ok()
            .is_some_and(|u| check_kind_unit(v.kind, u).is_ok())
    };
    let values = || reading.values.iter().filter(usable);
    let of_kind = |k: Kind| values().filter(move |v| v.kind == k);
    let chosen = match configured {
        Some(q) => values().find(|v| v.quantity == q),
        None => of_kind(Kind::EnergyTotal)
            .find(|v| v.quantity.contains("import"))
            .or_else(|| of_kind(Kind::EnergyTotal).next())
            .or_else(|| of_kind(Kind::EnergyDelta).next())
            .or_else(|| of_kind(Kind::Power).find(|v| v.quantity == "power"))
            .or_else(|| of_kind(Kind::Power).next()),
    }?;
    Some(EnergyInfo {
        quantity: chosen.quantity.clone(),
        kind: chosen.kind,
        unit: Unit::parse(&chosen.unit).ok()?,
        params: IntervalParams::default(),
    })
}

/// The JSON published for an interval record.
pub fn interval_json(gateway: &str, seq: u64, rec: &IntervalRecord) -> serde_json::Value {
    let mut doc = serde_json::to_value(&rec.interval).unwrap_or_default();
    if let Some(map) = doc.as_object_mut() {
        map.insert("gateway".into(), gateway.into());
        map.insert("meter".into(), rec.meter.clone().into());
        map.insert("quantity".into(), rec.quantity.clone().into());
        map.insert("seq".into(), seq.into());
        map.insert("start".into(), rfc3339_ms(rec.interval.start_ms).into());
        map.insert("end_ms".into(), rec.interval.end_ms().into());
    }
    doc
}

/// The JSON published for an alarm event.
pub fn event_json(gateway: &str, seq: u64, ev: &AlarmEvent) -> serde_json::Value {
    let mut doc = serde_json::to_value(ev).unwrap_or_default();
    if let Some(map) = doc.as_object_mut() {
        map.insert("gateway".into(), gateway.into());
        map.insert("seq".into(), seq.into());
        map.insert("ts".into(), rfc3339_ms(ev.ts_ms).into());
    }
    doc
}

/// The JSON of a drop event as published on `{prefix}/{gw}/events`.
pub fn drop_event_json(gateway: &str, seq: u64, ev: &DropEvent) -> serde_json::Value {
    serde_json::json!({
        "gateway": gateway,
        "seq": seq,
        "event": "dropped",
        "reason": ev.reason,
        "ranges": ev.ranges,
        "count": ev.count,
        "total": ev.total,
        "ts": rfc3339_ms(ev.ts_ms),
    })
}

/// Publishes alarm events with QoS 1 through a client on the embedded broker.
struct EventPublisher {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl EventPublisher {
    fn connect(mqtt: &MqttConfig, gateway: &str) -> EventPublisher {
        let addr = if mqtt.listen.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], mqtt.listen.port()))
        } else {
            mqtt.listen
        };
        let mut opts = MqttOptions::new(
            crate::broker::agent_client_id("events", gateway),
            addr.ip().to_string(),
            addr.port(),
        );
        opts.set_keep_alive(Duration::from_secs(30));
        // Events are few; keep unacknowledged ones across a reconnect.
        opts.set_clean_session(false);
        // A reserved client id: nobody else can take this session over.
        crate::broker::agent_login(&mut opts);
        let (client, mut events) = AsyncClient::new(opts, 256);
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = events.poll().await {
                    tracing::debug!(error = %e, "event publisher connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        EventPublisher { client, task }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) {
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(error = %e, "event publish failed");
        }
    }

    async fn close(self) {
        // Give queued QoS 1 publishes a moment to be acknowledged.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

/// What the analytics stage shares with ingest and the status interface.
#[derive(Debug)]
pub struct AnalyticsShared {
    /// Per meter: its energy quantity and watermark (newest sample time).
    watermarks: Mutex<HashMap<String, (String, i64)>>,
    retention_ms: i64,
    max_recompute_ms: i64,
    /// Samples the interval trackers hold in memory.
    pub held_samples: AtomicU64,
    /// Approximate bytes of the interval state in memory.
    pub state_bytes: AtomicU64,
    /// Samples the worker found too late for intervals (any source).
    pub too_late: AtomicU64,
    requests: mpsc::Sender<RecomputeRequest>,
    /// Woken whenever the worker moves a watermark or counts too-late samples.
    progress: tokio::sync::Notify,
}

impl AnalyticsShared {
    /// A meter's watermark as the worker (and pushes since) last saw it.
    pub fn watermark(&self, meter: &str) -> Option<i64> {
        let map = self.watermarks.lock().unwrap_or_else(|e| e.into_inner());
        map.get(meter).map(|(_, w)| *w)
    }

    /// Longest window of one recompute request, ms.
    pub fn max_recompute_ms(&self) -> i64 {
        self.max_recompute_ms
    }

    fn set_watermark(&self, meter: &str, quantity: &str, watermark: Option<i64>) {
        let Some(w) = watermark else {
            return;
        };
        {
            let mut map = self.watermarks.lock().unwrap_or_else(|e| e.into_inner());
            match map.get_mut(meter) {
                Some(entry) => {
                    entry.1 = entry.1.max(w);
                    if entry.0 != quantity {
                        entry.0 = quantity.to_string();
                    }
                }
                None => {
                    map.insert(meter.to_string(), (quantity.to_string(), w));
                }
            }
        }
        self.progress.notify_waiters();
    }

    /// Waits until `done` holds, checking again whenever the worker makes progress.
    #[cfg(test)]
    pub(crate) async fn wait_until(&self, done: impl Fn(&AnalyticsShared) -> bool) {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            // Registered before the check, so progress between the two is not missed.
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }

    /// The quantity and watermark of each meter of `readings`, taken before they
    /// are stored (the worker may see them before the push answers).
    pub fn watermarks_of(&self, readings: &[Reading]) -> HashMap<String, (String, i64)> {
        let map = self.watermarks.lock().unwrap_or_else(|e| e.into_inner());
        readings
            .iter()
            .filter_map(|r| Some((r.meter.clone(), map.get(&r.meter)?.clone())))
            .collect()
    }

    /// Counts the stored `readings` (of a push, in time order) whose value of their
    /// meter's energy quantity is too late for intervals: older than the retention
    /// behind the meter's watermark `before` the push. Raises the watermarks by the
    /// others.
    pub fn count_too_late<'a>(
        &self,
        mut before: HashMap<String, (String, i64)>,
        readings: impl IntoIterator<Item = &'a Reading>,
    ) -> usize {
        let mut late = 0;
        let mut newest: HashMap<String, i64> = HashMap::new();
        for r in readings {
            let Some((quantity, w)) = before.get_mut(&r.meter) else {
                continue;
            };
            if !r
                .values
                .iter()
                .any(|v| &v.quantity == quantity && v.value.is_some())
            {
                continue;
            }
            if r.ts_ms < w.saturating_sub(self.retention_ms) {
                late += 1;
            } else {
                *w = (*w).max(r.ts_ms);
                let n = newest.entry(r.meter.clone()).or_insert(r.ts_ms);
                *n = (*n).max(r.ts_ms);
            }
        }
        let mut map = self.watermarks.lock().unwrap_or_else(|e| e.into_inner());
        for (meter, ts) in newest {
            if let Some(entry) = map.get_mut(&meter) {
                entry.1 = entry.1.max(ts);
            }
        }
        late
    }

    /// Asks the worker to recompute `meter`'s closed intervals in `[start, end)`
    /// from the stored readings; answers once the new revisions are stored.
    pub async fn recompute(
        &self,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<RecomputeOutcome, RecomputeError> {
        let (reply, answer) = oneshot::channel();
        let request = RecomputeRequest {
            meter: meter.to_string(),
            start_ms,
            end_ms,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| RecomputeError::Stopped)?;
        answer.await.map_err(|_| RecomputeError::Stopped)?
    }
}

/// An operator's request to recompute a window of a meter's intervals.
struct RecomputeRequest {
    meter: String,
    start_ms: i64,
    end_ms: i64,
    reply: oneshot::Sender<Result<RecomputeOutcome, RecomputeError>>,
}

/// What a recompute did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecomputeOutcome {
    pub meter: String,
    /// The closed intervals recomputed: `[start_ms, end_ms)`.
    pub start_ms: i64,
    pub end_ms: i64,
    /// Intervals recomputed.
    pub intervals: usize,
    /// Of those, stored as a new revision (their figures changed).
    pub revised: usize,
}

/// Why a recompute has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecomputeError {
    #[error("no intervals are kept for meter `{0}`")]
    UnknownMeter(String),
    #[error("the analytics stage has stopped")]
    Stopped,
}

/// The running analytics stage.
pub struct Analytics {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Watermarks, figures and the recompute path.
    pub shared: Arc<AnalyticsShared>,
}

impl Analytics {
    /// Starts the worker (call within a tokio runtime). `committed` must have been
    /// subscribed before the writer committed anything the worker should see live
    /// (anything else is read from the store). Without `broker` nothing is published.
    pub fn start(
        store: Arc<Store>,
        writer: StoreWriter,
        committed: broadcast::Receiver<Arc<Vec<Record>>>,
        broker: Option<Arc<LocalBroker>>,
        mqtt: Option<&MqttConfig>,
        settings: AnalyticsSettings,
    ) -> Analytics {
        let events = match (&broker, mqtt) {
            (Some(_), Some(mqtt)) => Some(EventPublisher::connect(mqtt, &settings.gateway)),
            _ => None,
        };
        let stop = CancellationToken::new();
        let (requests, requests_rx) = mpsc::channel(4);
        let shared = Arc::new(AnalyticsShared {
            watermarks: Mutex::new(HashMap::new()),
            retention_ms: settings.tracker.retention_ms,
            max_recompute_ms: settings.max_recompute_ms,
            held_samples: AtomicU64::new(0),
            state_bytes: AtomicU64::new(0),
            too_late: AtomicU64::new(0),
            requests,
            progress: tokio::sync::Notify::new(),
        });
        let worker = Worker {
            store,
            writer,
            broker,
            events,
            settings,
            cursor: Cursor::default(),
            next_seq: 1,
            meters: HashMap::new(),
            new_infos: Vec::new(),
            index_days: BTreeMap::new(),
            replayed_events: HashMap::new(),
            replayed_intervals: HashMap::new(),
            event_log: EventLog::default(),
            event_log_changed: false,
            since_cluster: HashMap::new(),
            shared: shared.clone(),
            requests: requests_rx,
            jobs: JoinSet::new(),
        };
        let task = tokio::spawn(worker.run(committed, stop.clone()));
        Analytics { stop, task, shared }
    }

    /// Processes everything stored up to now, saves the state and ends. Call once
    /// the readings to account for are durable.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

struct MeterDerive {
    info: EnergyInfo,
    tracker: IntervalTracker,
    dirty: bool,
}

type EventKey = (String, String, bool, i64);
type IntervalKey = (String, i64, u32);

struct Worker {
    store: Arc<Store>,
    writer: StoreWriter,
    broker: Option<Arc<LocalBroker>>,
    events: Option<EventPublisher>,
    settings: AnalyticsSettings,
    cursor: Cursor,
    next_seq: u64,
    meters: HashMap<String, MeterDerive>,
    new_infos: Vec<String>,
    /// Index days changed since the last save, by key.
    index_days: BTreeMap<String, Vec<IntervalRef>>,
    /// Own records past the cursor found at start, with their seqs.
    replayed_events: HashMap<EventKey, (u64, AlarmEvent)>,
    replayed_intervals: HashMap<IntervalKey, u64>,
    /// The recent events for readers; saved with the cursor when changed.
    event_log: EventLog,
    event_log_changed: bool,
    since_cluster: HashMap<String, u64>,
    /// Figures and watermarks shared with ingest and status.
    shared: Arc<AnalyticsShared>,
    /// Operator requests (recompute a window).
    requests: mpsc::Receiver<RecomputeRequest>,
    jobs: JoinSet<()>,
}

/// When a state save must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// Before `save` returns (the periodic save, load, shutdown).
    Now,
    /// With the store's next flush ([`Store::put_states_deferred`]).
    WithNextFlush,
}

fn event_key(ev: &AlarmEvent) -> EventKey {
    (
        ev.meter.clone(),
        ev.rule.clone(),
        ev.state == AlarmState::Raised,
        ev.ts_ms,
    )
}

impl Worker {
    async fn run(
        mut self,
        mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
        stop: CancellationToken,
    ) {
        if let Err(e) = self.load().await {
            tracing::error!(error = %e, "analytics state cannot be loaded; analytics stopped");
            return;
        }
        // The first tick comes one period after start, not at once: a silence check
        // then would race the first batches still arriving on the broadcast and close
        // a meter's intervals by the wall clock before its data is in.
        let period = self.settings.persist_every;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = committed.recv() => match batch {
                    Ok(records) => {
                        if let Some(first) = records.first() {
                            if first.seq > self.next_seq {
                                self.catch_up(first.seq - 1).await;
                            }
                        }
                        self.step(&records, None).await;
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // The missed records are read from the store with the next batch.
                        tracing::debug!(skipped_batches = n, "analytics fell behind the broadcast");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    self.catch_up(self.store.last_seq()).await;
                    self.step(&[], Some(now_ms())).await;
                    self.save(Durable::Now);
                }
                Some(request) = self.requests.recv() => {
                    self.catch_up(self.store.last_seq()).await;
                    let answer = self.recompute_window(&request.meter, request.start_ms, request.end_ms).await;
                    let _ = request.reply.send(answer);
                }
                _ = stop.cancelled() => break,
            }
            while self.jobs.try_join_next().is_some() {}
        }
        self.catch_up(self.store.last_seq()).await;
        self.save(Durable::Now);
        while self.jobs.join_next().await.is_some() {}
        if let Some(events) = self.events.take() {
            events.close().await;
        }
    }

    /// Loads the cursor, collects own records past it, and replays the log.
    async fn load(&mut self) -> Result<(), StateError> {
        self.cursor = self.store.get_state(KEY_CURSOR)?.unwrap_or_default();
        self.since_cluster = self
            .store
            .get_state(KEY_CLUSTER_COUNTS)?
            .unwrap_or_default();
        self.event_log = match events::event_log(&self.store) {
            Ok(log) => log,
            Err(e) => {
                // Only the readers' view: the events themselves are in the log.
                tracing::warn!(error = %e, "recent alarm events list lost; starting afresh");
                EventLog::default()
            }
        };
        self.next_seq = self.cursor.through_seq + 1;
        let last = self.store.last_seq();
        let mut from = self.next_seq.max(self.cursor.own_through + 1);
        while from <= last {
            let to = last.min(from + CATCH_UP_STEP - 1);
            for rec in self.store.read_range(from, to).map_err(StateError::from)? {
                match rec.payload {
                    Payload::Event(ev) => {
                        self.replayed_events.insert(event_key(&ev), (rec.seq, ev));
                    }
                    Payload::Interval(iv) => {
                        self.replayed_intervals.insert(
                            (iv.meter.clone(), iv.interval.start_ms, iv.interval.revision),
                            rec.seq,
                        );
                    }
                    Payload::Reading(_) | Payload::Dropped(_) => {}
                }
            }
            from = to + 1;
        }
        if self.next_seq <= last {
            tracing::info!(
                from = self.next_seq,
                to = last,
                "analytics replaying the log"
            );
        }
        self.catch_up(last).await;
        self.save(Durable::Now);
        Ok(())
    }

    /// Processes the stored records from `next_seq` to `to`.
    async fn catch_up(&mut self, to: u64) {
        while self.next_seq <= to {
            let end = to.min(self.next_seq + CATCH_UP_STEP - 1);
            match self.store.read_range(self.next_seq, end) {
                Ok(records) => {
                    self.step(&records, None).await;
                    // Quarantined seqs are absent: do not read them again.
                    self.next_seq = self.next_seq.max(end + 1);
                    self.cursor.through_seq = self.next_seq - 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "analytics cannot read the store");
                    return;
                }
            }
        }
    }

    fn meter(&mut self, reading: &Reading) -> Option<&mut MeterDerive> {
        let meter = reading.meter.as_str();
        if !self.meters.contains_key(meter) {
            let stored: Option<(EnergyInfo, IntervalTracker)> =
                match self.store.get_state(&tracker_key(meter)) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(meter, error = %e, "interval state lost; starting afresh");
                        None
                    }
                };
            let (info, tracker, fresh) = match stored {
                Some((info, mut tracker)) => {
                    // The open intervals' samples are not saved: the store has them.
                    if let Some((from, to)) = tracker.open_range() {
                        let samples =
                            self.samples_in(meter, &info.quantity, from, to.saturating_add(1));
                        tracker.reload(&samples);
                    }
                    (info, tracker, false)
                }
                None => {
                    let configured = self.settings.energy_quantity.get(meter);
                    let mut info = energy_quantity(reading, configured.map(String::as_str))?;
                    let mut params = self.settings.tracker;
                    params.interval.spacing_ms = self.settings.spacing_ms.get(meter).copied();
                    info.params = params.interval;
                    let tracker = IntervalTracker::new(info.kind, info.unit, params).ok()?;
                    (info, tracker, true)
                }
            };
            if fresh {
                self.new_infos.push(meter.to_string());
            }
            self.shared
                .set_watermark(meter, &info.quantity, tracker.watermark());
            self.meters.insert(
                meter.to_string(),
                MeterDerive {
                    info,
                    tracker,
                    dirty: fresh,
                },
            );
        }
        self.meters.get_mut(meter)
    }

    /// The stored samples of `meter`'s `quantity` with `from <= ts < to`, in time
    /// order (for one timestamp the newest record last). A store error is logged
    /// and reads as no samples.
    fn samples_in(&self, meter: &str, quantity: &str, from: i64, to: i64) -> Vec<(i64, f64)> {
        match self.store.readings(meter, from, to) {
            Ok(records) => records
                .iter()
                .filter_map(|rec| {
                    let r = rec.payload.as_reading()?;
                    let v = r.values.iter().find(|v| v.quantity == quantity)?.value?;
                    Some((r.ts_ms, v))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(meter, error = %e, "stored readings not read for intervals");
                Vec::new()
            }
        }
    }

    /// The last stored sample before `ts`, looking back no further than `floor`,
    /// in widening windows (a dense series answers from the first small window).
    fn sample_before(
        &self,
        meter: &str,
        quantity: &str,
        ts: i64,
        floor: i64,
    ) -> Option<(i64, f64)> {
        let mut width = SEARCH_START_MS;
        loop {
            let from = ts.saturating_sub(width).max(floor);
            if from >= ts {
                return None;
            }
            if let Some(last) = self.samples_in(meter, quantity, from, ts).last() {
                return Some(*last);
            }
            if from <= floor {
                return None;
            }
            width = width.saturating_mul(8);
        }
    }

    /// The first stored sample at or after `ts` and before `ceiling`.
    fn sample_from(
        &self,
        meter: &str,
        quantity: &str,
        ts: i64,
        ceiling: i64,
    ) -> Option<(i64, f64)> {
        let mut width = SEARCH_START_MS;
        let mut from = ts;
        while from < ceiling {
            let to = from.saturating_add(width).min(ceiling);
            if let Some(first) = self.samples_in(meter, quantity, from, to).first() {
                return Some(*first);
            }
            from = to;
            width = width.saturating_mul(8);
        }
        None
    }

    /// The newest stored revision of `meter`'s interval at `start_ms`.
    fn stored_interval(&self, meter: &str, start_ms: i64) -> Option<Interval> {
        let key = index_key(meter, start_ms);
        let refs: Vec<IntervalRef> = match self.index_days.get(&key) {
            Some(day) => day.clone(),
            None => match self.store.get_state(&key) {
                Ok(day) => day.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(key, error = %e, "interval index not read");
                    Vec::new()
                }
            },
        };
        let best = refs
            .into_iter()
            .filter(|r| r.start_ms == start_ms)
            .max_by_key(|r| (r.revision, r.seq))?;
        let mut found = self.store.records_by_seq(&[best.seq]).ok()?;
        match found.remove(&best.seq)?.payload {
            Payload::Interval(rec) => Some(rec.interval),
            _ => None,
        }
    }

    /// Adds `iv` to the intervals to store unless the newest known revision of its
    /// start (this step's, else the stored one) has the same content; numbers it.
    /// `empty_too`: store it even when it holds no data and nothing is stored for
    /// its start (a closing does; a recomputation does not).
    fn revise(
        &self,
        meter: &str,
        pending: &mut BTreeMap<i64, Interval>,
        mut iv: Interval,
        empty_too: bool,
    ) -> bool {
        if let Some(p) = pending.get_mut(&iv.start_ms) {
            if p.same_content(&iv) {
                return false;
            }
            iv.revision = p.revision;
            *p = iv;
            return true;
        }
        match self.stored_interval(meter, iv.start_ms) {
            Some(old) if old.same_content(&iv) => return false,
            Some(old) => iv.revision = old.revision.saturating_add(1),
            None => {
                let empty = iv.samples == 0 && iv.coverage == 0.0 && !iv.flags.reset;
                if empty && !empty_too {
                    return false;
                }
                iv.revision = 0;
            }
        }
        pending.insert(iv.start_ms, iv);
        true
    }

    /// Recomputes `meter`'s closed intervals `[k_from, k_to)` from the stored
    /// readings, a few at a time, and adds the changed ones to `pending`. Returns
    /// (intervals recomputed, intervals changed).
    fn recompute_closed(
        &self,
        meter: &str,
        k_from: i64,
        k_to: i64,
        pending: &mut BTreeMap<i64, Interval>,
        empty_too: bool,
    ) -> (usize, usize) {
        let Some(m) = self.meters.get(meter) else {
            return (0, 0);
        };
        let tracker = &m.tracker;
        let quantity = m.info.quantity.as_str();
        let params = tracker.params();
        let hold = tracker.hold_ms();
        let reach = params
            .retention_ms
            .saturating_add(params.interval.max_gap_ms);
        let ceiling = tracker
            .watermark()
            .unwrap_or(i64::MIN)
            .max(k_to.saturating_mul(INTERVAL_MS))
            .saturating_add(1);
        let (mut seen, mut changed) = (0, 0);
        let mut k = k_from;
        while k < k_to {
            let k_end = k.saturating_add(RECOMPUTE_STEP).min(k_to);
            let (a, b) = (
                k.saturating_mul(INTERVAL_MS),
                k_end.saturating_mul(INTERVAL_MS),
            );
            let mut samples = Vec::new();
            samples.extend(self.sample_before(meter, quantity, a, a.saturating_sub(reach)));
            samples.extend(self.samples_in(meter, quantity, a, b));
            samples.extend(self.sample_from(meter, quantity, b, ceiling));
            match recompute_intervals(
                tracker.kind(),
                tracker.unit(),
                &params.interval,
                hold,
                &samples,
                k,
                k_end,
            ) {
                Ok(ivs) => {
                    for iv in ivs {
                        seen += 1;
                        changed += usize::from(self.revise(meter, pending, iv, empty_too));
                    }
                }
                Err(e) => tracing::warn!(meter, error = %e, "intervals not recomputed"),
            }
            k = k_end;
        }
        (seen, changed)
    }

    /// Recomputes the closed intervals that late samples in `[lo, hi]` touch: from
    /// the one holding the sample before `lo` to the one holding the sample after
    /// `hi`, none older than the retention behind the watermark.
    fn recompute_late(&self, meter: &str, lo: i64, hi: i64, pending: &mut BTreeMap<i64, Interval>) {
        let Some(m) = self.meters.get(meter) else {
            return;
        };
        let Some(closed_to) = m.tracker.closed_to_ms() else {
            return;
        };
        let quantity = m.info.quantity.as_str();
        let params = m.tracker.params();
        let reach = params
            .retention_ms
            .saturating_add(params.interval.max_gap_ms);
        let before = self.sample_before(meter, quantity, lo, lo.saturating_sub(reach));
        let ceiling = m
            .tracker
            .watermark()
            .unwrap_or(closed_to)
            .max(closed_to)
            .saturating_add(1);
        let after = self.sample_from(meter, quantity, hi.saturating_add(1), ceiling);
        let Some((k_from, k_to)) =
            m.tracker
                .late_intervals(lo, before.map(|s| s.0), after.map(|s| s.0))
        else {
            return;
        };
        // Between the samples around late data, an interval without data is a gap
        // to state like any closed one.
        self.recompute_closed(meter, k_from, k_to, pending, true);
    }

    /// The operator's recompute of `meter`'s closed intervals over a window (see
    /// docs/intervals.md): new revisions for the changed ones, stored and published.
    async fn recompute_window(
        &mut self,
        meter: &str,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<RecomputeOutcome, RecomputeError> {
        let Some(m) = self.meters.get(meter) else {
            return Err(RecomputeError::UnknownMeter(meter.to_string()));
        };
        let closed_k = m.tracker.closed_to_ms().map_or(i64::MIN, interval_index);
        let k_from = interval_index(start_ms);
        let k_to = interval_index(end_ms.saturating_sub(1))
            .saturating_add(1)
            .min(closed_k);
        let mut pending = BTreeMap::new();
        let (seen, changed) = if k_from < k_to {
            self.recompute_closed(meter, k_from, k_to, &mut pending, false)
        } else {
            (0, 0)
        };
        let mut all = BTreeMap::new();
        all.insert(meter.to_string(), pending);
        self.emit(all, Vec::new(), Vec::new(), Vec::new()).await;
        Ok(RecomputeOutcome {
            meter: meter.to_string(),
            start_ms: k_from.saturating_mul(INTERVAL_MS),
            end_ms: k_to.max(k_from).saturating_mul(INTERVAL_MS),
            intervals: seen,
            revised: changed,
        })
    }

    /// Updates the figures of the state's size.
    fn update_footprint(&self) {
        let held: usize = self
            .meters
            .values()
            .map(|m| m.tracker.retained_samples())
            .sum();
        let bytes: usize = self
            .meters
            .iter()
            .map(|(k, m)| {
                k.capacity()
                    + m.info.quantity.capacity()
                    + m.tracker.approx_bytes()
                    + std::mem::size_of::<MeterDerive>()
            })
            .sum();
        self.shared
            .held_samples
            .store(held as u64, Ordering::Relaxed);
        self.shared
            .state_bytes
            .store(bytes as u64, Ordering::Relaxed);
    }

    /// One step over records in seq order (see the module doc for the order).
    /// With `now` (the periodic tick), silent meters' intervals close by the wall
    /// clock too.
    async fn step(&mut self, records: &[Record], now: Option<i64>) {
        let mut payloads: Vec<Payload> = Vec::new();
        let mut republish: Vec<(u64, AlarmEvent)> = Vec::new();
        let mut closed: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
        let mut drops: Vec<(u64, DropEvent)> = Vec::new();
        let mut too_late = 0u64;
        for rec in records {
            if rec.seq < self.next_seq {
                continue;
            }
            self.next_seq = rec.seq + 1;
            if let Payload::Dropped(ev) = &rec.payload {
                drops.push((rec.seq, ev.clone()));
            }
            let Some(reading) = rec.payload.as_reading() else {
                continue;
            };
            for ev in self.cursor.alarms.apply(&self.settings.rules, reading) {
                match self.replayed_events.remove(&event_key(&ev)) {
                    Some(found) => republish.push(found),
                    None => payloads.push(Payload::Event(ev)),
                }
            }
            *self.since_cluster.entry(reading.meter.clone()).or_insert(0) += 1;
            let shared = self.shared.clone();
            if let Some(m) = self.meter(reading) {
                let sample = reading
                    .values
                    .iter()
                    .find(|v| v.quantity == m.info.quantity)
                    .and_then(|v| v.value);
                if let Some(v) = sample {
                    let outcome = m.tracker.push(&[(reading.ts_ms, v)]);
                    too_late += outcome.too_old as u64;
                    m.dirty = true;
                    shared.set_watermark(&reading.meter, &m.info.quantity, m.tracker.watermark());
                    // Close as the watermark passes: the tracker holds only open intervals.
                    let newly = m.tracker.take_closed();
                    let list = closed.entry(reading.meter.clone()).or_default();
                    list.extend(newly);
                }
            }
        }
        self.cursor.through_seq = self.next_seq.saturating_sub(1);
        if too_late > 0 {
            self.shared.too_late.fetch_add(too_late, Ordering::Relaxed);
            self.shared.progress.notify_waiters();
        }
        if let Some(now) = now {
            for (meter, m) in self.meters.iter_mut() {
                let Some(w) = m.tracker.watermark() else {
                    continue;
                };
                let params = m.tracker.params();
                let quiet = params
                    .interval
                    .max_gap_ms
                    .max(m.tracker.hold_ms())
                    .saturating_add(params.grace_ms);
                if now.saturating_sub(w) > quiet {
                    let newly = m.tracker.close_silent(now);
                    if !newly.is_empty() {
                        m.dirty = true;
                        closed.entry(meter.clone()).or_default().extend(newly);
                    }
                }
            }
        }
        // Number the closed intervals, then recompute what late data touched.
        let mut intervals: BTreeMap<String, BTreeMap<i64, Interval>> = BTreeMap::new();
        for (meter, list) in closed {
            let mut pending = BTreeMap::new();
            for iv in list {
                self.revise(&meter, &mut pending, iv, true);
            }
            intervals.insert(meter, pending);
        }
        let late: Vec<(String, i64, i64)> = self
            .meters
            .iter_mut()
            .filter_map(|(meter, m)| {
                m.tracker
                    .take_late()
                    .map(|(lo, hi)| (meter.clone(), lo, hi))
            })
            .collect();
        for (meter, lo, hi) in late {
            let mut pending = intervals.remove(&meter).unwrap_or_default();
            self.recompute_late(&meter, lo, hi, &mut pending);
            intervals.insert(meter, pending);
        }
        self.emit(intervals, payloads, republish, drops).await;
        self.update_footprint();
    }

    /// Stores, indexes, saves and publishes a step's intervals and events.
    async fn emit(
        &mut self,
        intervals: BTreeMap<String, BTreeMap<i64, Interval>>,
        mut payloads: Vec<Payload>,
        republish: Vec<(u64, AlarmEvent)>,
        drops: Vec<(u64, DropEvent)>,
    ) {
        let mut reused: Vec<(u64, IntervalRecord)> = Vec::new();
        for (meter, pending) in intervals {
            let Some(quantity) = self.meters.get(&meter).map(|m| m.info.quantity.clone()) else {
                continue;
            };
            for interval in pending.into_values() {
                let rec = IntervalRecord {
                    meter: meter.clone(),
                    quantity: quantity.clone(),
                    interval,
                };
                let key = (meter.clone(), rec.interval.start_ms, rec.interval.revision);
                match self.replayed_intervals.remove(&key) {
                    Some(seq) => reused.push((seq, rec)),
                    None => payloads.push(Payload::Interval(rec)),
                }
            }
        }

        let mut stored: Vec<Record> = Vec::new();
        if !payloads.is_empty() {
            match self.writer.submit_batch(payloads).await {
                Ok(records) => stored = records,
                Err(e) => tracing::error!(error = %e, "intervals and events not stored"),
            }
        }
        for rec in &stored {
            self.cursor.own_through = self.cursor.own_through.max(rec.seq);
        }
        let new_intervals: Vec<(u64, &IntervalRecord)> = stored
            .iter()
            .filter_map(|r| match &r.payload {
                Payload::Interval(iv) => Some((r.seq, iv)),
                _ => None,
            })
            .chain(reused.iter().map(|(s, iv)| (*s, iv)))
            .collect();
        for (seq, iv) in &new_intervals {
            self.add_to_index(*seq, iv);
        }
        let kept = stored
            .iter()
            .filter_map(|r| match &r.payload {
                Payload::Event(ev) => Some(StoredEvent {
                    seq: r.seq,
                    event: ev.clone(),
                }),
                _ => None,
            })
            .chain(republish.iter().map(|(seq, ev)| StoredEvent {
                seq: *seq,
                event: ev.clone(),
            }));
        self.event_log_changed |= self.event_log.add(kept);
        if !stored.is_empty() || !reused.is_empty() || self.event_log_changed {
            // Readers see the new intervals at once. Making them durable can wait for
            // the store's next flush: a crash before it takes the state back to the
            // last flushed save, and the replay from there finds these records in the
            // log and does not store them again. At a quarter-hour, meters close one
            // step after another: a flush each would be an fsync each.
            self.save(Durable::WithNextFlush);
        }

        // Publish what is durable and accounted for.
        if let Some(broker) = &self.broker {
            for (seq, iv) in &new_intervals {
                let topic = format!(
                    "{}/{}/{}/energy/15m",
                    broker.topics.prefix, broker.topics.gateway, iv.meter
                );
                let doc = interval_json(&self.settings.gateway, *seq, iv);
                if let Err(e) = broker.publish(&topic, doc.to_string().into_bytes(), false) {
                    tracing::warn!(error = %e, topic, "interval publish failed");
                }
            }
        }
        if let (Some(broker), Some(events)) = (&self.broker, &self.events) {
            let fresh = stored.iter().filter_map(|r| match &r.payload {
                Payload::Event(ev) => Some((r.seq, ev)),
                _ => None,
            });
            for (seq, ev) in fresh.chain(republish.iter().map(|(s, e)| (*s, e))) {
                let topic = format!(
                    "{}/{}/{}/events",
                    broker.topics.prefix, broker.topics.gateway, ev.meter
                );
                let doc = event_json(&self.settings.gateway, seq, ev);
                events.publish(topic, doc.to_string().into_bytes()).await;
            }
            let topic = format!("{}/{}/events", broker.topics.prefix, broker.topics.gateway);
            for (seq, ev) in drops {
                let doc = drop_event_json(&self.settings.gateway, seq, &ev);
                events
                    .publish(topic.clone(), doc.to_string().into_bytes())
                    .await;
            }
        }
        self.start_cluster_jobs();
    }

    fn add_to_index(&mut self, seq: u64, iv: &IntervalRecord) {
        let key = index_key(&iv.meter, iv.interval.start_ms);
        if !self.index_days.contains_key(&key) {
            let day = match self.store.get_state::<Vec<IntervalRef>>(&key) {
                Ok(day) => day.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(key, error = %e, "interval index day rebuilt");
                    Vec::new()
                }
            };
            self.index_days.insert(key.clone(), day);
        }
        if let Some(day) = self.index_days.get_mut(&key) {
            day.push(IntervalRef {
                start_ms: iv.interval.start_ms,
                revision: iv.interval.revision,
                seq,
            });
        }
    }

    /// Writes trackers, infos, changed index days and the cursor as one batch.
    fn save(&mut self, durable: Durable) {
        let mut entries = Vec::new();
        let mut encode = |key: &str, value: &dyn erased::Value| match value.entry(key) {
            Ok(e) => entries.push(e),
            Err(e) => tracing::error!(key, error = %e, "analytics state not encodable"),
        };
        for meter in self.new_infos.drain(..) {
            if let Some(m) = self.meters.get(&meter) {
                encode(&info_key(&meter), &m.info);
            }
        }
        for (meter, m) in self.meters.iter_mut().filter(|(_, m)| m.dirty) {
            encode(&tracker_key(meter), &(&m.info, &m.tracker));
            m.dirty = false;
        }
        for (key, day) in std::mem::take(&mut self.index_days) {
            encode(&key, &day);
        }
        encode(KEY_CLUSTER_COUNTS, &self.since_cluster);
        if std::mem::take(&mut self.event_log_changed) {
            encode(KEY_EVENTS, &self.event_log);
        }
        encode(KEY_CURSOR, &self.cursor);
        let saved = match durable {
            Durable::Now => self.store.put_states(entries),
            Durable::WithNextFlush => self.store.put_states_deferred(entries),
        };
        if let Err(e) = saved {
            tracing::error!(error = %e, "analytics state not saved");
        }
    }

    fn start_cluster_jobs(&mut self) {
        let every = self.settings.cluster_every;
        let due: Vec<String> = self
            .since_cluster
            .iter()
            .filter(|(_, n)| **n >= every)
            .map(|(m, _)| m.clone())
            .collect();
        for meter in due {
            self.since_cluster.insert(meter.clone(), 0);
            let Some(quantity) = self.meters.get(&meter).map(|m| m.info.quantity.clone()) else {
                continue;
            };
            let store = self.store.clone();
            let broker = self.broker.clone();
            let count = self.settings.clusters;
            self.jobs.spawn_blocking(move || {
                match compute_clusters(&store, &meter, &quantity, count) {
                    Ok(Some(summary)) => {
                        // Derived again after another `cluster_every` readings if a
                        // crash loses it: no flush of its own.
                        let stored =
                            StateEntry::new(&format!("{CLUSTERS_PREFIX}{meter}"), &summary)
                                .and_then(|entry| store.put_states_deferred(vec![entry]));
                        if let Err(e) = stored {
                            tracing::warn!(meter, error = %e, "clusters not stored");
                        }
                        if let Some(broker) = broker {
                            let topic = format!(
                                "{}/{}/{}/clusters",
                                broker.topics.prefix, broker.topics.gateway, meter
                            );
                            let doc = serde_json::to_vec(&summary).unwrap_or_default();
                            if let Err(e) = broker.publish(&topic, doc, true) {
                                tracing::warn!(error = %e, topic, "clusters publish failed");
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(meter, error = %e, "clusters not computed"),
                }
            });
        }
    }
}

/// Days of intervals a cluster run reads at a time (672 intervals).
pub const CLUSTER_READ_DAYS: usize = 7;

/// Clusters of a meter's stored intervals; `None` when it has none with data.
pub fn compute_clusters(
    store: &Store,
    meter: &str,
    quantity: &str,
    count: ClusterCount,
) -> Result<Option<ClusterSummary>, series::QueryError> {
    // The intervals are read a week at a time; only the three numbers of each are
    // kept (24 bytes an interval, 0.8 MiB for a year).
    let mut points: Vec<(i64, f64, f64)> = Vec::new();
    series::visit_series_15m(
        store,
        meter,
        series::Window::all(),
        CLUSTER_READ_DAYS,
        &mut |p| {
            if let Some(mean_w) = p.interval.mean_w {
                points.push((p.interval.start_ms, mean_w, p.interval.energy_kwh));
            }
        },
    )?;
    if points.is_empty() {
        return Ok(None);
    }
    Ok(Some(ClusterSummary {
        meter: meter.to_string(),
        quantity: quantity.to_string(),
        computed_ms: now_ms(),
        stats: cluster_intervals(&points, count),
    }))
}

/// Lets `save` encode values of different types through one closure.
mod erased {
    use crate::store::{StateEntry, StateError};

    pub trait Value {
        fn entry(&self, key: &str) -> Result<StateEntry, StateError>;
    }

    impl<T: serde::Serialize> Value for T {
        fn entry(&self, key: &str) -> Result<StateEntry, StateError> {
            StateEntry::new(key, self)
        }
    }
}

/// Latest interval per start from index entries: the highest revision (then seq).
pub fn latest_per_start(refs: impl IntoIterator<Item = IntervalRef>) -> Vec<IntervalRef> {
    let mut best: BTreeMap<i64, IntervalRef> = BTreeMap::new();
    for r in refs {
        match best.get(&r.start_ms) {
            Some(b) if (b.revision, b.seq) >= (r.revision, r.seq) => {}
            _ => {
                best.insert(r.start_ms, r);
            }
        }
    }
    best.into_values().collect()
}
