//! `edge-agent verify`: the upstream side's proof that a gateway's data arrived, once
//! (`verify ... --wait`) or as a fleet service (`verify --serve`, [`serve`]).
//!
//! Subscribes to `{prefix}/+/records` and `{prefix}/+/manifest` on the upstream
//! broker (or to the listed gateways' own topics) and tracks, per gateway, which seqs
//! arrived (as ranges), duplicates, and seqs that arrived below the highest one seen
//! without having been asked for (out of order). Manifests are checked against what
//! arrived (count and CRC-32C over the records' stored bytes). Gaps — between `from`
//! and the highest seq known from records, manifests or the gateway's target — are
//! asked for on `{prefix}/{gw}/cmd/resend`: at most `resend_rate` requests a second
//! over all gateways, and a range asked for is not asked for again before
//! `resend_interval` passed without its records arriving ([`tracker`]).
//!
//! Seqs a gateway declares dropped (its store's quota deleted them before they were
//! acknowledged: a `dropped` record, see `model::DropEvent`) are not missing: they
//! are reported as dropped, never asked for, and left out of the manifest checks
//! (a manifest counts only what the gateway still held).
//!
//! With `--state DIR` the per-gateway state is kept on disk ([`state`]) and the MQTT
//! session is persistent (a fixed client id, clean session off): messages are
//! acknowledged to the broker only once what they brought is saved, so a restart,
//! even a crash, neither forgets what arrived nor asks for it again. `docs/verify.md`
//! is the operator's guide.

#[cfg(test)]
mod mqtt_tests;
pub mod serve;
pub mod state;
pub mod tracker;

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use state::StateStore;
pub use tracker::{shard_of, GwState, Tracker, TrackerLimits};

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: String,
    /// The only gateways followed, and that must be seen; empty: every gateway
    /// that shows up (within the shard).
    pub gateways: Vec<String>,
    /// First seq expected from each gateway.
    pub from: u64,
    /// Last seq expected from every gateway: the run ends once all are there.
    pub until: Option<u64>,
    /// Last seq expected from some gateways (these must show up too).
    pub until_per: BTreeMap<String, u64>,
    /// Longest the run lasts.
    pub wait: Duration,
    /// Ask for resends of the gaps.
    pub resend: bool,
    /// A range asked for is not asked for again before this passed without its
    /// records arriving.
    pub resend_interval: Duration,
    /// Widest range one resend request asks for (the agent bounds it too).
    pub resend_max_span: u64,
    /// Resend requests a second, over all gateways.
    pub resend_rate: u32,
    /// A fixed MQTT client id: the session is persistent (clean session off).
    pub client_id: Option<String>,
    /// The verifier's own store (and a persistent session).
    pub state: Option<PathBuf>,
    /// `(i, n)`: only the gateways of shard `i` of `n` ([`shard_of`]).
    pub shard: Option<(u64, u64)>,
    pub limits: TrackerLimits,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            prefix: "edge".into(),
            gateways: Vec::new(),
            from: 1,
            until: None,
            until_per: BTreeMap::new(),
            wait: Duration::from_secs(60),
            resend: true,
            resend_interval: Duration::from_secs(5),
            resend_max_span: 10_000,
            resend_rate: 50,
            client_id: None,
            state: None,
            shard: None,
            limits: TrackerLimits::default(),
        }
    }
}

impl VerifyOptions {
    /// Gateways that must show up: the listed ones and those with a target.
    pub fn expected(&self) -> Vec<String> {
        let mut out = self.gateways.clone();
        for gw in self.until_per.keys() {
            if !out.contains(gw) {
                out.push(gw.clone());
            }
        }
        out
    }

    fn has_targets(&self) -> bool {
        self.until.is_some() || !self.until_per.is_empty()
    }

    fn tracker(&self) -> Tracker {
        let mut t = Tracker::new(self.from, self.until);
        t.until_per = self
            .until_per
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        t.selection = tracker::Selection {
            gateways: self.gateways.iter().cloned().collect(),
            shard: self.shard,
        };
        t.limits = self.limits;
        t.timeout = self.resend_interval;
        t.span = self.resend_max_span.max(1);
        t
    }
}

/// A manifest as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCheck {
    pub from: u64,
    pub to: u64,
    pub count: u64,
    pub crc32c: u32,
    /// `Some(true)`: every seq arrived and count and CRC match; `Some(false)`: all
    /// arrived but count or CRC differ; `None`: seqs of the range are missing (or,
    /// once checked, it could not be: the CRCs of its records were not kept).
    pub ok: Option<bool>,
}

/// Most missing ranges listed per gateway in a report (all are counted).
pub const MAX_LISTED_RANGES: usize = 1000;

/// Findings for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GatewayReport {
    /// Distinct seqs received.
    pub received: u64,
    /// Highest seq received.
    pub last_seq: u64,
    pub duplicates: u64,
    /// New seqs that arrived below the highest seen without a resend asking for them.
    pub out_of_order: u64,
    /// Highest seq known (received, in a manifest, or expected).
    pub highest: u64,
    /// The last seq expected (`--until`), if any.
    pub target: Option<u64>,
    /// The first [`MAX_LISTED_RANGES`] missing ranges.
    pub missing: Vec<RangeInclusive<u64>>,
    pub missing_count: u64,
    /// Seqs the gateway declared dropped that did not arrive.
    pub dropped: u64,
    /// The seq ranges it declared dropped.
    pub dropped_ranges: Vec<RangeInclusive<u64>>,
    pub resend_requests: u64,
    /// The last checked manifests and those waiting for their records, by seq.
    pub manifests: Vec<ManifestCheck>,
    pub manifests_ok_total: u64,
    pub manifests_failed_total: u64,
    pub manifests_unchecked_total: u64,
    /// Whether the last checked manifest matched.
    pub last_manifest_ok: Option<bool>,
    /// Seconds since the newest record arrived.
    pub newest_record_age_s: Option<f64>,
    /// Since when (Unix ms) records are missing.
    pub incomplete_since_ms: Option<i64>,
    /// Batches, manifests or records that did not decode.
    pub malformed: u64,
    /// Readings received whose schema never arrived (asked for with a resend of
    /// one of them: a resent batch carries the schemas it needs).
    pub undecoded: u64,
    /// Records not tracked (the gateway's seqs are too fragmented: range cap).
    pub untracked: u64,
}

impl GatewayReport {
    pub fn manifests_failed(&self) -> u64 {
        self.manifests_failed_total
    }

    pub fn is_complete(&self) -> bool {
        self.missing_count == 0
            && self.manifests_failed_total == 0
            && self.undecoded == 0
            && self.untracked == 0
    }
}

/// The whole report, by gateway id.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub gateways: BTreeMap<String, GatewayReport>,
    /// Gateways asked for that never showed up.
    pub absent: Vec<String>,
}

impl Report {
    pub fn missing_total(&self) -> u64 {
        self.gateways.values().map(|g| g.missing_count).sum()
    }

    /// Complete, with every gateway's records known up to `until`.
    pub fn is_complete_up_to(&self, until: u64) -> bool {
        self.is_complete()
            && !self.gateways.is_empty()
            && self.gateways.values().all(|g| g.highest >= until)
    }

    /// Nothing missing, no manifest mismatch, every expected gateway seen.
    pub fn is_complete(&self) -> bool {
        self.absent.is_empty() && self.gateways.values().all(|g| g.is_complete())
    }

    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for gw in &self.absent {
            writeln!(out, "gateway {gw}: nothing received")?;
        }
        for (gw, g) in &self.gateways {
            let pending = g.manifests.iter().filter(|m| m.ok.is_none()).count();
            writeln!(
                out,
                "gateway {gw}: received {} (highest seq {}), missing {}, dropped by the gateway {}, duplicates {}, out of order {}, resend requests {}, manifests ok {} / failed {} / incomplete {pending}, malformed messages {}, readings without their schema {}",
                g.received, g.highest, g.missing_count, g.dropped, g.duplicates, g.out_of_order,
                g.resend_requests, g.manifests_ok_total, g.manifests_failed_total, g.malformed, g.undecoded
            )?;
            for r in g.dropped_ranges.iter().take(20) {
                writeln!(out, "  dropped {}..={}", r.start(), r.end())?;
            }
            for r in g.missing.iter().take(20) {
                writeln!(out, "  missing {}..={}", r.start(), r.end())?;
            }
            for m in g.manifests.iter().filter(|m| m.ok == Some(false)) {
                writeln!(
                    out,
                    "  manifest {}..={} (count {}, crc32c {:08x}) does not match what arrived",
                    m.from, m.to, m.count, m.crc32c
                )?;
            }
            if g.untracked > 0 {
                writeln!(
                    out,
                    "  {} records not tracked: more than the range cap",
                    g.untracked
                )?;
            }
        }
        writeln!(
            out,
            "{}",
            if self.is_complete() {
                "complete: nothing missing"
            } else {
                "INCOMPLETE"
            }
        )
    }
}

fn to_ranges(spans: &[tracker::Span]) -> Vec<RangeInclusive<u64>> {
    spans.iter().map(|&(a, b)| a..=b).collect()
}

impl Tracker {
    /// One gateway's findings (`now_ms`: the wall clock, for ages).
    pub fn gateway_report(&self, gw: &str, g: &GwState, now_ms: i64) -> GatewayReport {
        let gaps = self.gaps(gw, g);
        let mut manifests: Vec<ManifestCheck> = g.checked.clone();
        manifests.extend(
            g.pending_manifests
                .iter()
                .map(|&(from, to, count, crc32c)| ManifestCheck {
                    from,
                    to,
                    count,
                    crc32c,
                    ok: None,
                }),
        );
        manifests.sort_by_key(|m| (m.from, m.to));
        let dropped_arrived: u64 = g
            .dropped
            .iter()
            .map(|&(a, b)| {
                tracker::span_len(&tracker::subtract(
                    &[(a, b)],
                    &tracker::complement(&g.received, a, b),
                ))
            })
            .sum();
        GatewayReport {
            received: g.received_count,
            last_seq: g.max_seen,
            duplicates: g.duplicates,
            out_of_order: g.out_of_order,
            highest: self.highest(gw, g),
            target: self.target_of(gw),
            missing_count: tracker::span_len(&gaps),
            missing: to_ranges(&gaps[..gaps.len().min(MAX_LISTED_RANGES)]),
            dropped: tracker::span_len(&g.dropped) - dropped_arrived,
            dropped_ranges: to_ranges(&g.dropped[..g.dropped.len().min(MAX_LISTED_RANGES)]),
            resend_requests: g.resend_requests,
            manifests,
            manifests_ok_total: g.manifests_ok,
            manifests_failed_total: g.manifests_failed,
            manifests_unchecked_total: g.manifests_unchecked,
            last_manifest_ok: g.last_manifest_ok,
            newest_record_age_s: (g.newest_record_ms > 0)
                .then(|| (now_ms - g.newest_record_ms).max(0) as f64 / 1000.0),
            incomplete_since_ms: g.incomplete_since_ms,
            malformed: g.malformed,
            undecoded: g.undecoded.len() as u64,
            untracked: g.untracked,
        }
    }

    /// The report over every gateway; `expected` must show up.
    pub fn report(&self, expected: &[String]) -> Report {
        let now_ms = crate::model::now_ms();
        let mut report = Report::default();
        for (id, g) in &self.gateways {
            report
                .gateways
                .insert(id.clone(), self.gateway_report(id, g, now_ms));
        }
        report.absent = expected
            .iter()
            .filter(|gw| !self.gateways.contains_key(*gw))
            .cloned()
            .collect();
        report
    }
}

/// What the verifier shares with its HTTP side and callers.
pub struct Shared {
    pub tracker: Mutex<Tracker>,
    link: Mutex<LinkState>,
    pub options: VerifyOptions,
}

impl Shared {
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // Plain bookkeeping: consistent enough to report on even after a panic.
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self) -> LinkState {
        self.link.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn connected(&self) -> bool {
        self.link().connected
    }

    /// Connected, and every subscription confirmed.
    pub fn subscribed(&self) -> bool {
        let link = self.link();
        link.connected && link.subscribed >= subscriptions(&self.options).len()
    }
}

/// A verifier running against a broker; `report` can be taken at any time.
pub struct Verifier {
    pub shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Verifier {
    /// Connects and subscribes (in the background; it retries until stopped).
    /// Without a state store: `options.state` is not opened (see [`Verifier::open`]).
    pub fn start(options: VerifyOptions) -> Verifier {
        Self::launch(options, None, Vec::new())
    }

    /// As [`Verifier::start`], with the state store of `options.state` (if any):
    /// what it kept is taken back first.
    pub fn open(options: VerifyOptions) -> anyhow::Result<Verifier> {
        let Some(dir) = options.state.clone() else {
            return Ok(Self::start(options));
        };
        let store = StateStore::open(&dir)?;
        let loaded = store.load()?;
        if loaded.corrupt > 0 {
            tracing::warn!(target: "edge_agent::verify", corrupt = loaded.corrupt, "some gateways' saved state was unreadable");
        }
        Ok(Self::launch(options, Some(store), loaded.gateways))
    }

    fn launch(
        options: VerifyOptions,
        store: Option<StateStore>,
        saved: Vec<(String, GwState)>,
    ) -> Verifier {
        let mut tracker = options.tracker();
        for (gw, state) in saved {
            tracker.restore(gw, state);
        }
        let shared = Arc::new(Shared {
            tracker: Mutex::new(tracker),
            link: Mutex::new(LinkState::default()),
            options,
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(listen(shared.clone(), store, stop.clone()));
        Verifier { shared, stop, task }
    }

    pub fn report(&self) -> Report {
        self.shared
            .tracker()
            .report(&self.shared.options.expected())
    }

    /// Waits until the report is complete up to `until` (or `limit` passes).
    pub async fn wait_complete(&self, until: u64, limit: Duration) -> Report {
        let deadline = Instant::now() + limit;
        loop {
            let report = self.report();
            if report.is_complete_up_to(until) || Instant::now() >= deadline {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops: saves the state (if kept) and disconnects; returns the last report.
    pub async fn stop(self) -> Report {
        self.stop.cancel();
        let _ = self.task.await;
        self.shared
            .tracker()
            .report(&self.shared.options.expected())
    }
}

/// The verifier's connection to the upstream broker.
#[derive(Debug, Clone, Default)]
struct LinkState {
    connected: bool,
    /// Subscriptions the broker confirmed on this connection.
    subscribed: usize,
    /// Why the last attempt failed (at most [`MAX_LINK_ERROR`] bytes).
    last_error: Option<String>,
}

/// Longest connection error kept for the progress lines.
const MAX_LINK_ERROR: usize = 200;
/// How often resend requests are scheduled (within the rate limit).
const RESEND_TICK: Duration = Duration::from_millis(100);
/// With a state store: the longest a received message waits to be saved (and then
/// acknowledged to the broker)...
const SAVE_EVERY: Duration = Duration::from_millis(200);
/// ...or the most messages that wait (below the broker's in-flight window, 20 by
/// default in Mosquitto, 32 in EMQX).
const SAVE_AFTER: usize = 16;
/// Listed gateways up to this many get a subscription each; more, the wildcard.
const MAX_EXACT_SUBSCRIPTIONS: usize = 100;

/// The topic filters a verifier subscribes to.
pub fn subscriptions(options: &VerifyOptions) -> Vec<String> {
    let p = &options.prefix;
    if !options.gateways.is_empty() && options.gateways.len() <= MAX_EXACT_SUBSCRIPTIONS {
        options
            .gateways
            .iter()
            .flat_map(|gw| [format!("{p}/{gw}/records"), format!("{p}/{gw}/manifest")])
            .collect()
    } else {
        vec![format!("{p}/+/records"), format!("{p}/+/manifest")]
    }
}

/// Saves the changed gateways, then acknowledges the messages that brought the
/// changes; on failure they stay unacknowledged (the broker sends them again).
async fn save(
    shared: &Shared,
    store: &StateStore,
    client: &AsyncClient,
    unacked: &mut Vec<Publish>,
) {
    let dirty = shared.tracker().take_dirty();
    if !dirty.is_empty() {
        let store = store.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let result = store.save(&dirty);
            (result, dirty)
        })
        .await;
        match saved {
            Ok((Ok(()), _)) => {}
            Ok((Err(e), dirty)) => {
                tracing::warn!(target: "edge_agent::verify", error = %e, "cannot save the verifier's state; retrying");
                shared.tracker().unsaved(dirty);
                return;
            }
            Err(e) => {
                tracing::warn!(target: "edge_agent::verify", error = %e, "saving the verifier's state failed");
                return;
            }
        }
    }
    for p in unacked.drain(..) {
        let _ = client.try_ack(&p);
    }
}

async fn listen(shared: Arc<Shared>, store: Option<StateStore>, stop: CancellationToken) {
    let options = &shared.options;
    let set_link = |connected: bool, error: Option<String>| {
        if let Ok(mut l) = shared.link.lock() {
            l.connected = connected;
            if error.is_some() {
                l.last_error = error;
            }
        }
    };
    let random = format!("edge-verify-{:08x}", rand::random::<u32>());
    let client_id = match (&options.client_id, &store) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(store)) => match store.client_id(&random) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(target: "edge_agent::verify", error = %e, "cannot keep a client id in the state store: a clean session");
                None
            }
        },
        (None, None) => None,
    };
    let persistent = client_id.is_some();
    let mut mqtt = MqttOptions::new(
        client_id.unwrap_or(random),
        options.host.clone(),
        options.port,
    );
    mqtt.set_keep_alive(Duration::from_secs(5));
    mqtt.set_clean_session(!persistent);
    mqtt.set_max_packet_size(64 << 20, 64 << 10);
    // With a store, a message is acknowledged once what it brought is saved.
    mqtt.set_manual_acks(store.is_some());
    if let Some(user) = &options.username {
        mqtt.set_credentials(user.clone(), options.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(mqtt, 1024);
    let topics = subscriptions(options);
    let mut tick = tokio::time::interval(RESEND_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rate = tracker::RateLimit::new(options.resend_rate, Instant::now());
    let mut unacked: Vec<Publish> = Vec::new();
    let mut next_save = Instant::now() + SAVE_EVERY;
    let mut next_mark = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    set_link(true, None);
                    if let Ok(mut l) = shared.link.lock() {
                        l.subscribed = 0;
                    }
                    // Acknowledgements of the last connection's messages are void: the
                    // broker sends them again.
                    unacked.clear();
                    for t in &topics {
                        let _ = client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Ok(mut l) = shared.link.lock() {
                        l.subscribed += 1;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let gw = gateway_of(&p.topic, &options.prefix).unwrap_or_default();
                    {
                        let mut t = shared.tracker();
                        if p.topic.ends_with("/records") {
                            t.on_records(gw, &p.payload, Instant::now(), crate::model::now_ms());
                        } else if p.topic.ends_with("/manifest") {
                            t.on_manifest(gw, &p.payload);
                        }
                    }
                    // QoS 0 has nothing to acknowledge: saved with the next tick.
                    if let (Some(store), true) = (&store, p.qos != QoS::AtMostOnce) {
                        let mut ack = Publish::new("", p.qos, Vec::<u8>::new());
                        ack.pkid = p.pkid;
                        unacked.push(ack);
                        if unacked.len() >= SAVE_AFTER {
                            save(&shared, store, &client, &mut unacked).await;
                            next_save = Instant::now() + SAVE_EVERY;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let mut error = e.to_string();
                    crate::config::units::cut(&mut error, MAX_LINK_ERROR);
                    set_link(false, Some(error));
                    unacked.clear();
                    tracing::debug!(target: "edge_agent::verify", error = %e, "upstream broker unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= next_mark {
                    shared.tracker().update_incomplete(crate::model::now_ms());
                    next_mark = now + Duration::from_secs(1);
                }
                if options.resend && shared.connected() {
                    let budget = rate.available(now);
                    let requests = shared.tracker().resend_requests(now, budget);
                    rate.spend(requests.len());
                    for (gw, from, to) in requests {
                        let topic = format!("{}/{gw}/cmd/resend", options.prefix);
                        let body = serde_json::json!({ "from": from, "to": to }).to_string();
                        tracing::info!(target: "edge_agent::verify", gw, from, to, "asking for a resend");
                        let _ = client.try_publish(topic, QoS::AtLeastOnce, false, body);
                    }
                }
                if let Some(store) = &store {
                    if now >= next_save {
                        save(&shared, store, &client, &mut unacked).await;
                        next_save = now + SAVE_EVERY;
                    }
                }
            }
        }
    }
    if let Some(store) = &store {
        save(&shared, store, &client, &mut unacked).await;
    }
    let _ = client.try_disconnect();
    // Lets the disconnect go out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

fn gateway_of<'a>(topic: &'a str, prefix: &str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix('/')?
        .split('/')
        .next()
}

/// How often `verify` says how far it got while it waits.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Gateways named in one progress line; the others are counted.
const PROGRESS_GATEWAYS: usize = 4;

/// The CLI: runs until complete (with targets) or `wait`, prints the report to
/// `out`, and says whether everything arrived. What it waits for, and every
/// [`PROGRESS_EVERY`] how far it got, go to `progress` (one short line each).
pub async fn run(
    options: VerifyOptions,
    out: &mut dyn Write,
    progress: &mut dyn Write,
) -> anyhow::Result<bool> {
    let wait = options.wait;
    let targets = options.has_targets();
    writeln!(progress, "{}", waiting_line(&options))?;
    let verifier = Verifier::open(options)?;
    let started = Instant::now();
    let deadline = started + wait;
    let mut next_progress = started + PROGRESS_EVERY;
    loop {
        let report = verifier.report();
        let now = Instant::now();
        if (targets && report.is_complete() && !report.gateways.is_empty()) || now >= deadline {
            break;
        }
        if now >= next_progress {
            let link = verifier.shared.link();
            let line = progress_line(&report, &link, &verifier.shared.options, now - started);
            writeln!(progress, "{line}")?;
            next_progress += PROGRESS_EVERY;
        }
        let next = if targets {
            now + Duration::from_millis(100)
        } else {
            next_progress
        };
        tokio::time::sleep_until(next.min(deadline)).await;
    }
    let report = verifier.stop().await;
    report.print(out)?;
    Ok(report.is_complete())
}

/// The first line `verify` prints: what it listens for, where, and for how long.
fn waiting_line(o: &VerifyOptions) -> String {
    let mut gateways = if o.gateways.is_empty() {
        "every gateway".to_string()
    } else {
        format!("gateway(s) {}", o.gateways.join(", "))
    };
    if let Some((i, n)) = o.shard {
        gateways.push_str(&format!(" of shard {i}/{n}"));
    }
    let mut until = match o.until {
        Some(until) => format!("seqs {}..={until}", o.from),
        None => format!("seqs from {}", o.from),
    };
    for (gw, u) in &o.until_per {
        until.push_str(&format!(", {gw} up to {u}"));
    }
    let until = if o.has_targets() {
        format!("{until}, for at most")
    } else {
        format!("{until}, for")
    };
    format!(
        "verify: listening on mqtt://{}:{} for {}/+/records and manifests of {gateways}: {until} {}",
        o.host,
        o.port,
        o.prefix,
        humantime::format_duration(o.wait)
    )
}
/// One progress line: the connection, then per gateway what arrived and what is
/// missing (the first few gateways; the others counted).
fn progress_line(
    report: &Report,
    link: &LinkState,
    o: &VerifyOptions,
    elapsed: Duration,
) -> String {
    let clock = format!("verify: {}s of {}s:", elapsed.as_secs(), o.wait.as_secs());
    if !link.connected {
        let why = link.last_error.as_deref().unwrap_or("connecting");
        return format!(
            "{clock} not connected to mqtt://{}:{} yet ({why}); retrying",
            o.host, o.port
        );
    }
    if report.gateways.is_empty() {
        return format!("{clock} connected, no records yet");
    }
    let mut parts: Vec<String> = report
        .gateways
        .iter()
        .take(PROGRESS_GATEWAYS)
        .map(|(gw, g)| {
            format!(
                "{gw}: {} received up to seq {}, {} missing, {} manifest(s)",
                g.received,
                g.highest,
                g.missing_count,
                g.manifests.len()
            )
        })
        .collect();
    if report.gateways.len() > PROGRESS_GATEWAYS {
        parts.push(format!(
            "{} more gateway(s)",
            report.gateways.len() - PROGRESS_GATEWAYS
        ));
    }
    format!("{clock} {}", parts.join("; "))
}

/// `mqtt://HOST:PORT` (or `HOST:PORT`, or `HOST` for port 1883) as host and port.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").unwrap_or(url);
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("`{url}` is not mqtt://HOST:PORT"));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|p| (host.trim_matches(['[', ']']).to_string(), p))
            .ok_or_else(|| format!("`{url}`: `{port}` is not a port")),
        Some(_) => Err(format!("`{url}` has no host")),
        None => Ok((rest.to_string(), 1883)),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// `--until`: `N` (every gateway) or `GW=N` (one gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    All(u64),
    Gateway(String, u64),
}

fn parse_until(s: &str) -> Result<Until, String> {
    let seq = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("`{v}` is not a seq (a whole number)"))
    };
    match s.rsplit_once('=') {
        Some((gw, v)) if !gw.is_empty() && !gw.contains(['/', '+', '#']) => {
            Ok(Until::Gateway(gw.to_string(), seq(v)?))
        }
        Some(_) => Err(format!("`{s}`: expected N or GATEWAY=N")),
        None => Ok(Until::All(seq(s)?)),
    }
}

/// `--shard i/n` with `0 <= i < n`.
pub fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not i/n"))?;
    let i: u64 = i
        .parse()
        .map_err(|_| format!("`{s}`: `{i}` is not a number"))?;
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: `{n}` is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("`{s}`: needs 0 <= i < n"));
    }
    Ok((i, n))
}

fn parse_rate(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    n.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a rate (requests a second, at least 1: e.g. 50/s)"))
}

/// Command-line arguments of `edge-agent verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Upstream broker.
    #[arg(long, default_value = "mqtt://127.0.0.1:1884")]
    pub broker: String,
    /// MQTT username on the upstream broker.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password on the upstream broker (with `--username`).
    #[arg(long)]
    pub password: Option<String>,
    /// Topic prefix upstream.
    #[arg(long, default_value = "edge")]
    pub prefix: String,
    /// Follow only this gateway, which must show up (repeatable); without it, every
    /// gateway seen (of the shard).
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// First seq expected from each gateway.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Last seq expected: `N` for every gateway, or `GATEWAY=N` for one (repeatable;
    /// that gateway must show up). The run ends once everything up to them arrived.
    #[arg(long = "until", value_parser = parse_until)]
    pub until: Vec<Until>,
    /// How long to listen (and wait for repairs) before reporting.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Only report; do not ask the gateways to resend gaps.
    #[arg(long)]
    pub no_resend: bool,
    /// How long a resend request is given: a range asked for is asked for again
    /// only once this passed without its records arriving.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub resend_interval: Duration,
    /// Widest range in one resend request.
    #[arg(long, default_value_t = 10_000)]
    pub resend_max_span: u64,
    /// Most resend requests a second, over all gateways (`N` or `N/s`).
    #[arg(long, default_value = "50/s", value_parser = parse_rate)]
    pub resend_rate: u32,
    /// A fixed MQTT client id: a persistent session (clean session off), so the
    /// broker keeps what arrives while the verifier is down.
    #[arg(long)]
    pub client_id: Option<String>,
    /// The verifier's own store: what arrived, per gateway, survives a restart (and
    /// the session is persistent; its client id is kept there without --client-id).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Only the gateways of shard i of n: FNV-1a 64 of the gateway id, modulo n.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(u64, u64)>,
    /// Most gateways followed; records of more are ignored, with a warning.
    #[arg(long, default_value_t = 20_000)]
    pub max_gateways: usize,
    /// Run as a service: follow the gateways until stopped (SIGTERM, Ctrl-C) and
    /// answer on --listen: /metrics, /gateways, /gateways/{gw}.
    #[arg(long)]
    pub serve: bool,
    /// Address of --serve's HTTP endpoint.
    #[arg(long, default_value = "127.0.0.1:9108")]
    pub listen: std::net::SocketAddr,
    /// Most HTTP connections open at once (--serve).
    #[arg(long, default_value_t = 64)]
    pub http_max_connections: usize,
    /// An HTTP connection idle this long is closed (--serve).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
}

impl VerifyArgs {
    pub fn options(&self) -> Result<VerifyOptions, String> {
        let (host, port) = parse_broker_url(&self.broker).map_err(|e| format!("--broker: {e}"))?;
        let mut until = None;
        let mut until_per = BTreeMap::new();
        for u in &self.until {
            match u {
                Until::All(n) => until = Some(*n),
                Until::Gateway(gw, n) => {
                    until_per.insert(gw.clone(), *n);
                }
            }
        }
        if self.max_gateways == 0 {
            return Err("--max-gateways: must be at least 1".into());
        }
        if self.serve && self.state.is_none() {
            tracing::warn!(target: "edge_agent::verify", "--serve without --state: a restart forgets what arrived");
        }
        Ok(VerifyOptions {
            host,
            port,
            username: self.username.clone(),
            password: self.password.clone(),
            prefix: self.prefix.clone(),
            gateways: self.gateways.clone(),
            from: self.from,
            until,
            until_per,
            wait: self.wait,
            resend: !self.no_resend,
            resend_interval: self.resend_interval,
            resend_max_span: self.resend_max_span.max(1),
            resend_rate: self.resend_rate,
            client_id: self.client_id.clone(),
            state: self.state.clone(),
            shard: self.shard,
            limits: TrackerLimits {
                max_gateways: self.max_gateways,
                ..TrackerLimits::default()
            },
        })
    }
}

/// `edge-agent verify`: exits non-zero when anything is missing.
pub fn main(args: VerifyArgs) -> anyhow::Result<bool> {
    let options = args.options().map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.serve {
        let limits = serve::HttpLimits {
            max_connections: args.http_max_connections.max(1),
            idle_timeout: args.http_idle_timeout,
        };
        return runtime
            .block_on(serve::run_until_signal(options, args.listen, limits))
            .map(|()| true);
    }
    runtime.block_on(run(options, &mut std::io::stdout(), &mut std::io::stderr()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Payload, Record};
    use crate::store::{codec, crc32c, RawRecord};
    use crate::sync::wire;

    fn schema() -> codec::Schema {
        codec::Schema {
            id: 1,
            meter: "m".into(),
            fields: vec![codec::Field {
                quantity: "power".into(),
                unit: "W".into(),
                kind: crate::model::Kind::Power,
                source: crate::model::Source::F32,
            }],
        }
    }

    /// The stored bytes of reading `seq`, by schema 1.
    pub(super) fn record(seq: u64) -> Vec<u8> {
        let rec = Record {
            seq,
            payload: Payload::Reading(crate::model::Reading {
                meter: "m".into(),
                ts_ms: seq as i64 * 1000,
                values: vec![crate::model::Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: crate::model::Kind::Power,
                    value: Some(seq as f64),
                    invalid: None,
                    source: crate::model::Source::F32,
                }],
            }),
        };
        let mut out = Vec::new();
        codec::encode_record(&mut out, &rec, Some(1)).expect("encodes");
        out
    }

    fn schema_bytes(id: u32) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        codec::encode_schema(&schema(), &mut out);
        (id == 1).then_some(out)
    }

    /// A batch that carries its schemas.
    pub(super) fn batch(gw: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        encode(gw, seqs, &schema_bytes)
    }

    /// A batch without its schemas (as a consumer that joined mid-connection sees it).
    fn bare_batch(gw: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        encode(gw, seqs, &|_| None)
    }

    /// The batch of `seqs`, carrying what `schemas` gives for each schema id.
    fn encode(
        gw: &str,
        seqs: impl IntoIterator<Item = u64>,
        schemas: &dyn Fn(u32) -> Option<Vec<u8>>,
    ) -> Vec<u8> {
        let recs: Vec<RawRecord> = seqs
            .into_iter()
            .map(|seq| RawRecord {
                seq,
                bytes: record(seq),
            })
            .collect();
        let mut out = Vec::new();
        wire::encode_batch(gw, &recs, schemas, &mut out);
        out
    }

    #[test]
    fn readings_whose_schema_is_missing_are_asked_for_again_and_then_decode() {
        let mut t = Tracker::new(5, Some(10));
        // Joined mid-connection: the schema went by in an earlier batch.
        t.records("gw", &bare_batch("gw", 5..=10));
        let r = t.report(&[]);
        assert_eq!(r.gateways["gw"].undecoded, 6);
        assert_eq!(r.gateways["gw"].missing_count, 0);
        assert!(
            !r.is_complete(),
            "readings that cannot be decoded are not complete"
        );
        // One reading of the unknown schema is asked for: its resend carries it.
        assert_eq!(t.asks(100), vec![("gw".to_string(), 5, 5)]);
        t.records("gw", &batch("gw", [5]));
        let r = t.report(&[]);
        let g = &r.gateways["gw"];
        assert_eq!((g.undecoded, g.duplicates, g.malformed), (0, 0, 0));
        assert!(r.is_complete());
    }

    #[test]
    fn tracks_gaps_duplicates_order_and_manifests() {
        let mut t = Tracker::new(1, None);
        t.records("gw", &batch("gw", 1..=10));
        t.records("gw", &batch("gw", 15..=20));
        t.records("gw", &batch("gw", 9..=10));
        let bytes: Vec<u8> = (1..=10u64).flat_map(record).collect();
        let good = format!(
            r#"{{"gw":"gw","from":1,"to":10,"count":10,"crc32c":{},"ts_ms":0}}"#,
            crc32c(&bytes)
        );
        t.on_manifest("gw", good.as_bytes());
        t.on_manifest(
            "gw",
            br#"{"gw":"gw","from":11,"to":25,"count":15,"crc32c":1,"ts_ms":0}"#,
        );
        t.on_manifest("gw", b"nonsense");
        let r = t.report(&["gw".into(), "other".into()]);
        let g = &r.gateways["gw"];
        assert_eq!(g.received, 16);
        assert_eq!(g.duplicates, 2);
        assert_eq!(g.highest, 25);
        assert_eq!(g.missing, vec![11..=14, 21..=25]);
        assert_eq!(g.missing_count, 9);
        assert_eq!(g.manifests[0].ok, Some(true));
        assert_eq!(g.manifests[1].ok, None);
        assert_eq!(g.malformed, 1);
        assert_eq!(r.absent, vec!["other".to_string()]);
        assert!(!r.is_complete());

        let asks = t.asks(3);
        assert_eq!(
            asks,
            vec![
                ("gw".to_string(), 11, 13),
                ("gw".to_string(), 14, 14),
                ("gw".to_string(), 21, 23),
                ("gw".to_string(), 24, 25)
            ]
        );
        // The repair arrives below the highest seq, but it was asked for.
        t.records("gw", &batch("gw", 11..=14));
        t.records("gw", &batch("gw", 21..=25));
        let r = t.report(&["gw".into()]);
        let g = &r.gateways["gw"];
        assert_eq!((g.missing_count, g.out_of_order), (0, 0));
        // Everything arrived: the second manifest is now checked, and its CRC is wrong.
        assert_eq!(g.manifests[1].ok, Some(false));
        assert!(!r.is_complete());
    }

    #[test]
    fn seqs_declared_dropped_are_not_missing_and_stay_out_of_manifests() {
        use crate::model::{DropEvent, DropReason};
        let drop_record = |seq: u64, ranges: Vec<(u64, u64)>| {
            let rec = Record {
                seq,
                payload: Payload::Dropped(DropEvent {
                    reason: DropReason::Quota,
                    ranges,
                    count: 0,
                    total: 0,
                    ts_ms: 0,
                }),
            };
            let mut bytes = Vec::new();
            codec::encode_record(&mut bytes, &rec, None).expect("encodes");
            RawRecord { seq, bytes }
        };
        let mut t = Tracker::new(1, Some(20));
        // 1..=5 arrived; 6..=12 were dropped by the gateway (a copy of 12 was in
        // flight and arrived anyway); 13 says so; 14..=20 arrived.
        t.records("gw", &batch("gw", 1..=5));
        t.records("gw", &batch("gw", [12]));
        let mut out = Vec::new();
        wire::encode_batch("gw", &[drop_record(13, vec![(6, 12)])], &|_| None, &mut out);
        t.records("gw", &out);
        t.records("gw", &batch("gw", 14..=20));
        // The manifest counts what the gateway still held: 1..=5, 13, 14..=20.
        let held: Vec<u8> = (1..=5u64)
            .flat_map(record)
            .chain(drop_record(13, vec![(6, 12)]).bytes)
            .chain((14..=20u64).flat_map(record))
            .collect();
        let manifest = format!(
            r#"{{"gw":"gw","from":1,"to":20,"count":13,"crc32c":{},"ts_ms":0}}"#,
            crc32c(&held)
        );
        t.on_manifest("gw", manifest.as_bytes());
        let r = t.report(&["gw".into()]);
        let g = &r.gateways["gw"];
        assert_eq!(g.missing_count, 0);
        assert_eq!((g.dropped, g.dropped_ranges.clone()), (6, vec![6..=12]));
        assert_eq!(g.manifests[0].ok, Some(true));
        assert!(r.is_complete());
        assert!(t.asks(100).is_empty(), "dropped seqs are never asked for");
    }

    #[test]
    fn subtract_leaves_what_is_outside_the_holes() {
        use tracker::subtract;
        assert_eq!(
            subtract(&[(1, 10)], &[(3, 4), (8, 12)]),
            vec![(1, 2), (5, 7)]
        );
        assert_eq!(
            subtract(&[(1, 10)], &[(0, 20)]),
            Vec::<tracker::Span>::new()
        );
        assert_eq!(subtract(&[(5, 6)], &[(1, 2)]), vec![(5, 6)]);
        assert_eq!(subtract(&[(5, u64::MAX)], &[(7, u64::MAX)]), vec![(5, 6)]);
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(parse_broker_url("mqtt://h:1884"), Ok(("h".into(), 1884)));
        assert_eq!(parse_broker_url("10.0.0.1:1"), Ok(("10.0.0.1".into(), 1)));
        assert_eq!(parse_broker_url("host"), Ok(("host".into(), 1883)));
        for bad in [
            "",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://h:0",
            ":5",
            "http://h/x",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    /// While it waits, `verify` says what for, then every few seconds how far it
    /// got: here, that nothing answers at the broker's address.
    #[tokio::test(start_paused = true)]
    async fn progress_says_what_it_waits_for_and_how_far_it_got() {
        // Bound but not listening: connections are refused, and no other program
        // can take the port while the test runs.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let options = VerifyOptions {
            host: addr.ip().to_string(),
            port: addr.port(),
            gateways: vec!["gw1".into()],
            wait: Duration::from_secs(12),
            ..VerifyOptions::default()
        };
        let (mut out, mut progress) = (Vec::new(), Vec::new());
        let complete = run(options, &mut out, &mut progress).await.expect("runs");
        assert!(!complete, "nothing arrived");
        let progress = String::from_utf8(progress).expect("utf-8");
        let lines: Vec<&str> = progress.lines().collect();
        assert!(
            lines[0].contains(&format!("mqtt://{addr}")) && lines[0].contains("gw1"),
            "{progress}"
        );
        // One line at the start, one every 5 s of the 12 s: bounded by the wait.
        assert_eq!(lines.len(), 3, "{progress}");
        assert!(lines[1].starts_with("verify: 5s of 12s:"), "{progress}");
        assert!(lines[2].contains("not connected"), "{progress}");
        let report = String::from_utf8(out).expect("utf-8");
        assert!(report.contains("gw1"), "the report goes to `out`: {report}");
    }

    #[test]
    fn progress_lines_name_a_few_gateways_and_count_the_rest() {
        let mut report = Report::default();
        for i in 0..6 {
            report.gateways.insert(
                format!("gw{i}"),
                GatewayReport {
                    received: 10,
                    highest: 12,
                    missing_count: 2,
                    ..GatewayReport::default()
                },
            );
        }
        let link = LinkState {
            connected: true,
            subscribed: 2,
            last_error: None,
        };
        let line = progress_line(
            &report,
            &link,
            &VerifyOptions::default(),
            Duration::from_secs(10),
        );
        assert!(
            line.contains("gw0: 10 received up to seq 12, 2 missing"),
            "{line}"
        );
        assert!(
            line.contains("2 more gateway(s)") && !line.contains("gw5"),
            "{line}"
        );
    }

    #[test]
    fn unrequested_late_records_count_as_out_of_order() {
        let mut t = Tracker::new(1, Some(6));
        t.records("gw", &batch("gw", [1, 2, 4]));
        t.records("gw", &batch("gw", [3, 5]));
        let r = t.report(&[]);
        assert_eq!(r.gateways["gw"].out_of_order, 1);
        assert_eq!(r.gateways["gw"].missing, vec![6..=6]);
    }
}
