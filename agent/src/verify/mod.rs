//! `edge-agent verify`: the upstream side's proof that a gateway's data arrived.
//!
//! Subscribes to `{prefix}/+/records` and `{prefix}/+/manifest` on the upstream
//! broker and tracks, per gateway, which seqs arrived, duplicates, and seqs that
//! arrived below the highest one seen without having been asked for (out of order).
//! Manifests are checked against what arrived (count and CRC-32C over the records'
//! stored bytes). Gaps — between `from` and the highest seq known from records,
//! manifests or `until` — are asked for on `{prefix}/{gw}/cmd/resend`, again every
//! `resend_interval` while they stay open. The run ends when everything expected is
//! there (with `until`), or after `wait`; anything still missing makes it fail.
//!
//! Seqs a gateway declares dropped (its store's quota deleted them before they were
//! acknowledged: a `dropped` record, see `model::DropEvent`) are not missing: they
//! are reported as dropped, never asked for, and left out of the manifest checks
//! (a manifest counts only what the gateway still held).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::sync::wire::{self, crc32c_combine, Manifest};
use crate::model::{Payload, Record};
use crate::store::{codec, crc32c, merge_range};

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: String,
    /// Gateways that must be seen; empty: every gateway that shows up.
    pub gateways: Vec<String>,
    /// First seq expected from each gateway.
    pub from: u64,
    /// Last seq expected from each gateway: the run ends once all are there.
    pub until: Option<u64>,
    /// Longest the run lasts.
    pub wait: Duration,
    /// Ask for resends of the gaps (and again at this interval while they stay).
    pub resend: bool,
    pub resend_interval: Duration,
    /// Widest range one resend request asks for (the agent bounds it too).
    pub resend_max_span: u64,
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
            wait: Duration::from_secs(60),
            resend: true,
            resend_interval: Duration::from_secs(2),
            resend_max_span: 10_000,
        }
    }
}

/// A manifest as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestCheck {
    pub from: u64,
    pub to: u64,
    pub count: u64,
    pub crc32c: u32,
    /// `Some(true)`: every seq arrived and count and CRC match; `Some(false)`: all
    /// arrived but count or CRC differ; `None`: seqs of the range are missing.
    pub ok: Option<bool>,
}

/// Findings for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayReport {
    /// Distinct seqs received.
    pub received: u64,
    pub duplicates: u64,
    /// New seqs that arrived below the highest seen without a resend asking for them.
    pub out_of_order: u64,
    /// Highest seq known (received, in a manifest, or expected).
    pub highest: u64,
    pub missing: Vec<RangeInclusive<u64>>,
    pub missing_count: u64,
    /// Seqs the gateway declared dropped that did not arrive.
    pub dropped: u64,
    /// The seq ranges it declared dropped.
    pub dropped_ranges: Vec<RangeInclusive<u64>>,
    pub resend_requests: u64,
    pub manifests: Vec<ManifestCheck>,
    /// Batches, manifests or records that did not decode.
    pub malformed: u64,
    /// Readings received whose schema never arrived (asked for with a resend of
    /// one of them: a resent batch carries the schemas it needs).
    pub undecoded: u64,
}

impl GatewayReport {
    pub fn manifests_failed(&self) -> usize {
        self.manifests
            .iter()
            .filter(|m| m.ok == Some(false))
            .count()
    }
}

/// The whole report, by gateway id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
        self.absent.is_empty()
            && self
                .gateways
                .values()
                .all(|g| g.missing_count == 0 && g.manifests_failed() == 0 && g.undecoded == 0)
    }

    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for gw in &self.absent {
            writeln!(out, "gateway {gw}: nothing received")?;
        }
        for (gw, g) in &self.gateways {
            let ok = g.manifests.iter().filter(|m| m.ok == Some(true)).count();
            let pending = g.manifests.iter().filter(|m| m.ok.is_none()).count();
            writeln!(
                out,
                "gateway {gw}: received {} (highest seq {}), missing {}, dropped by the gateway {}, duplicates {}, out of order {}, resend requests {}, manifests ok {ok} / failed {} / incomplete {pending}, malformed messages {}, readings without their schema {}",
                g.received, g.highest, g.missing_count, g.dropped, g.duplicates, g.out_of_order,
                g.resend_requests, g.manifests_failed(), g.malformed, g.undecoded
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

#[derive(Debug, Default)]
struct Gateway {
    /// seq -> (CRC-32C, length) of the record's stored bytes.
    seqs: BTreeMap<u64, (u32, u64)>,
    duplicates: u64,
    out_of_order: u64,
    max_seen: u64,
    manifests: Vec<(u64, u64, u64, u32)>,
    requested: BTreeSet<u64>,
    resend_requests: u64,
    malformed: u64,
    /// Seq ranges the gateway declared dropped, merged.
    dropped: Vec<RangeInclusive<u64>>,
    /// Readings whose schema has not arrived: seq -> schema id (bounded).
    undecoded: BTreeMap<u64, u32>,
}

impl Gateway {
    fn is_dropped(&self, seq: u64) -> bool {
        self.dropped.iter().any(|r| r.contains(&seq))
    }
}

/// The bookkeeping, without I/O.
#[derive(Debug, Default)]
pub struct Tracker {
    gateways: BTreeMap<String, Gateway>,
    /// The schemas batches carried, per gateway.
    decoder: wire::Decoder,
    from: u64,
    until: Option<u64>,
}

impl Tracker {
    pub fn new(from: u64, until: Option<u64>) -> Tracker {
        Tracker {
            gateways: BTreeMap::new(),
            decoder: wire::Decoder::default(),
            from: from.max(1),
            until,
        }
    }

    pub fn on_records(&mut self, gw_topic: &str, payload: &[u8]) {
        let records = match self.decoder.batch(payload) {
            Ok(b) => b.records,
            Err(_) => {
                self.gateways
                    .entry(gw_topic.to_string())
                    .or_default()
                    .malformed += 1;
                return;
            }
        };
        let decoder = &self.decoder;
        for rec in records {
            let g = self.gateways.entry(rec.gw.clone()).or_default();
            let entry = (crc32c(&rec.data), rec.data.len() as u64);
            if g.seqs.insert(rec.seq, entry).is_some() {
                // A record asked for again (its schema was missing) is no duplicate.
                if !g.requested.remove(&rec.seq) {
                    g.duplicates += 1;
                }
                continue;
            }
            if rec.seq < g.max_seen && !g.requested.remove(&rec.seq) {
                g.out_of_order += 1;
            }
            g.requested.remove(&rec.seq);
            g.max_seen = g.max_seen.max(rec.seq);
            match decoder.record(&rec.gw, &rec.data) {
                Ok(Record {
                    payload: Payload::Dropped(ev),
                    ..
                }) => {
                    for (from, to) in ev.ranges {
                        merge_range(&mut g.dropped, from..=to);
                    }
                }
                Ok(_) => {}
                Err(_) => match codec::peek_schema(&rec.data) {
                    Some(id) if !decoder.knows(&rec.gw, id) => {
                        if g.undecoded.len() < 1_000_000 {
                            g.undecoded.insert(rec.seq, id);
                        }
                    }
                    _ => g.malformed += 1,
                },
            }
        }
        // Readings waiting for a schema this batch brought.
        for (id, g) in self.gateways.iter_mut() {
            g.undecoded.retain(|_, schema| !decoder.knows(id, *schema));
        }
    }

    pub fn on_manifest(&mut self, gw_topic: &str, payload: &[u8]) {
        let g = self.gateways.entry(gw_topic.to_string()).or_default();
        match serde_json::from_slice::<Manifest>(payload) {
            Ok(m) if m.from <= m.to => g.manifests.push((m.from, m.to, m.count, m.crc32c)),
            _ => g.malformed += 1,
        }
    }

    fn highest(&self, g: &Gateway) -> u64 {
        let from_manifests = g.manifests.iter().map(|m| m.1).max().unwrap_or(0);
        g.max_seen.max(from_manifests).max(self.until.unwrap_or(0))
    }

    /// Seq ranges from `from` to the highest known seq that did not arrive.
    fn gaps(&self, g: &Gateway) -> Vec<RangeInclusive<u64>> {
        let highest = self.highest(g);
        let mut gaps = Vec::new();
        let mut expect = self.from;
        for &seq in g
            .seqs
            .range(self.from..=highest.max(self.from))
            .map(|(s, _)| s)
        {
            if seq > expect {
                gaps.push(expect..=seq - 1);
            }
            expect = seq + 1;
        }
        if expect <= highest {
            gaps.push(expect..=highest);
        }
        // What the gateway declared dropped will never come.
        gaps.into_iter()
            .flat_map(|gap| subtract(gap, &g.dropped))
            .collect()
    }

    /// Resend requests for the open gaps: (gateway, from, to), each at most `span` wide.
    pub fn resend_requests(&mut self, span: u64) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        let ids: Vec<String> = self.gateways.keys().cloned().collect();
        for id in ids {
            let gaps = match self.gateways.get(&id) {
                Some(g) => self.gaps(g),
                None => continue,
            };
            let Some(g) = self.gateways.get_mut(&id) else {
                continue;
            };
            // One reading of each schema that never arrived is asked for again:
            // a resent batch carries the schemas of its readings.
            let mut asked = BTreeSet::new();
            let waiting: Vec<(u64, u32)> = g.undecoded.iter().map(|(s, i)| (*s, *i)).collect();
            for (seq, schema) in waiting {
                if out.len() < 256 && asked.insert(schema) {
                    out.push((id.clone(), seq, seq));
                    g.requested.insert(seq);
                    g.resend_requests += 1;
                }
            }
            for gap in gaps {
                let mut start = *gap.start();
                while start <= *gap.end() && out.len() < 256 {
                    let end = gap
                        .end()
                        .min(&start.saturating_add(span.max(1) - 1))
                        .to_owned();
                    out.push((id.clone(), start, end));
                    // Remembered so their late arrival does not count as out of order.
                    if g.requested.len() < 1_000_000 {
                        g.requested.extend(start..=end.min(start + 100_000));
                    }
                    g.resend_requests += 1;
                    start = end + 1;
                }
            }
        }
        out
    }

    fn check_manifest(g: &Gateway, (from, to, count, crc): (u64, u64, u64, u32)) -> ManifestCheck {
        let mut check = ManifestCheck {
            from,
            to,
            count,
            crc32c: crc,
            ok: None,
        };
        // Records the gateway dropped are not in its manifest (it no longer held
        // them), even when a copy in flight arrived.
        let present: Vec<&(u32, u64)> = g
            .seqs
            .range(from..=to)
            .filter(|(seq, _)| !g.is_dropped(**seq))
            .map(|(_, v)| v)
            .collect();
        if (present.len() as u64) < to - from + 1 && (present.len() as u64) < count {
            return check;
        }
        let mut acc = crc32c(b"");
        for (c, len) in &present {
            acc = crc32c_combine(acc, *c, *len);
        }
        check.ok = Some(present.len() as u64 == count && acc == crc);
        check
    }

    pub fn report(&self, expected: &[String]) -> Report {
        let mut report = Report::default();
        for (id, g) in &self.gateways {
            let missing = self.gaps(g);
            report.gateways.insert(
                id.clone(),
                GatewayReport {
                    received: g.seqs.len() as u64,
                    duplicates: g.duplicates,
                    out_of_order: g.out_of_order,
                    highest: self.highest(g),
                    missing_count: missing.iter().map(|r| r.end() - r.start() + 1).sum(),
                    missing,
                    dropped: g
                        .dropped
                        .iter()
                        .map(|r| r.end() - r.start() + 1 - g.seqs.range(r.clone()).count() as u64)
                        .sum(),
                    dropped_ranges: g.dropped.clone(),
                    resend_requests: g.resend_requests,
                    manifests: g
                        .manifests
                        .iter()
                        .map(|m| Self::check_manifest(g, *m))
                        .collect(),
                    malformed: g.malformed,
                    undecoded: g.undecoded.len() as u64,
                },
            );
        }
        report.absent = expected
            .iter()
            .filter(|gw| !self.gateways.contains_key(*gw))
            .cloned()
            .collect();
        report
    }
}

/// A verifier running against a broker; `report` can be taken at any time.
pub struct Verifier {
    tracker: Arc<Mutex<Tracker>>,
    /// The connection as the progress lines show it.
    link: Arc<Mutex<LinkState>>,
    options: VerifyOptions,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Verifier {
    /// Connects and subscribes (in the background; it retries until stopped).
    pub fn start(options: VerifyOptions) -> Verifier {
        let tracker = Arc::new(Mutex::new(Tracker::new(options.from, options.until)));
        let link = Arc::new(Mutex::new(LinkState::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(listen(
            options.clone(),
            tracker.clone(),
            link.clone(),
            stop.clone(),
        ));
        Verifier {
            tracker,
            link,
            options,
            stop,
            task,
        }
    }

    pub fn report(&self) -> Report {
        self.tracker
            .lock()
            .map(|t| t.report(&self.options.gateways))
            .unwrap_or_default()
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

    pub async fn stop(self) -> Report {
        self.stop.cancel();
        let report = self.report();
        let _ = self.task.await;
        report
    }
}

/// The verifier's connection to the upstream broker.
#[derive(Debug, Clone, Default)]
struct LinkState {
    connected: bool,
    /// Why the last attempt failed (at most [`MAX_LINK_ERROR`] bytes).
    last_error: Option<String>,
}

/// Longest connection error kept for the progress lines.
const MAX_LINK_ERROR: usize = 200;

async fn listen(
    options: VerifyOptions,
    tracker: Arc<Mutex<Tracker>>,
    link: Arc<Mutex<LinkState>>,
    stop: CancellationToken,
) {
    let set_link = |connected: bool, error: Option<String>| {
        if let Ok(mut l) = link.lock() {
            l.connected = connected;
            if error.is_some() {
                l.last_error = error;
            }
        }
    };
    let id = format!("edge-verify-{:08x}", rand::random::<u32>());
    let mut mqtt = MqttOptions::new(id, options.host.clone(), options.port);
    mqtt.set_keep_alive(Duration::from_secs(5));
    mqtt.set_clean_session(true);
    mqtt.set_max_packet_size(64 << 20, 64 << 10);
    if let Some(user) = &options.username {
        mqtt.set_credentials(user.clone(), options.password.clone().unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(mqtt, 1024);
    let records = format!("{}/+/records", options.prefix);
    let manifests = format!("{}/+/manifest", options.prefix);
    let mut resend_tick = tokio::time::interval(options.resend_interval);
    resend_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    set_link(true, None);
                    // A clean session each time: subscribe again.
                    let _ = client.try_subscribe(records.clone(), QoS::AtLeastOnce);
                    let _ = client.try_subscribe(manifests.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let gw = gateway_of(&p.topic, &options.prefix).unwrap_or_default();
                    if let Ok(mut t) = tracker.lock() {
                        if p.topic.ends_with("/records") {
                            t.on_records(gw, &p.payload);
                        } else if p.topic.ends_with("/manifest") {
                            t.on_manifest(gw, &p.payload);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let mut error = e.to_string();
                    crate::config::cut(&mut error, MAX_LINK_ERROR);
                    set_link(false, Some(error));
                    tracing::debug!(target: "edge_agent::verify", error = %e, "upstream broker unreachable; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = resend_tick.tick(), if options.resend => {
                let requests = tracker
                    .lock()
                    .map(|mut t| t.resend_requests(options.resend_max_span))
                    .unwrap_or_default();
                for (gw, from, to) in requests {
                    let topic = format!("{}/{gw}/cmd/resend", options.prefix);
                    let body = serde_json::json!({ "from": from, "to": to }).to_string();
                    tracing::info!(target: "edge_agent::verify", gw, from, to, "asking for a resend");
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, body);
                }
            }
        }
    }
    let _ = client.try_disconnect();
}

/// The parts of `range` outside the sorted, disjoint `holes`.
fn subtract(range: RangeInclusive<u64>, holes: &[RangeInclusive<u64>]) -> Vec<RangeInclusive<u64>> {
    let (mut start, end) = (*range.start(), *range.end());
    let mut out = Vec::new();
    for h in holes {
        if *h.end() < start || *h.start() > end {
            continue;
        }
        if *h.start() > start {
            out.push(start..=*h.start() - 1);
        }
        start = h.end().saturating_add(1);
        if start > end || *h.end() == u64::MAX {
            return out;
        }
    }
    out.push(start..=end);
    out
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

/// The CLI: runs until complete (with `until`) or `wait`, prints the report to
/// `out`, and says whether everything arrived. What it waits for, and every
/// [`PROGRESS_EVERY`] how far it got, go to `progress` (one short line each).
pub async fn run(
    options: VerifyOptions,
    out: &mut dyn Write,
    progress: &mut dyn Write,
) -> anyhow::Result<bool> {
    let wait = options.wait;
    let until = options.until;
    writeln!(progress, "{}", waiting_line(&options))?;
    let verifier = Verifier::start(options);
    let started = Instant::now();
    let deadline = started + wait;
    let mut next_progress = started + PROGRESS_EVERY;
    let report = loop {
        let report = verifier.report();
        let now = Instant::now();
        if until.is_some_and(|u| report.is_complete_up_to(u)) || now >= deadline {
            break report;
        }
        if now >= next_progress {
            let link = verifier.link.lock().map(|l| l.clone()).unwrap_or_default();
            let line = progress_line(&report, &link, &verifier.options, now - started);
            writeln!(progress, "{line}")?;
            next_progress += PROGRESS_EVERY;
        }
        let next = if until.is_some() {
            now + Duration::from_millis(100)
        } else {
            next_progress
        };
        tokio::time::sleep_until(next.min(deadline)).await;
    };
    let report = if report.is_complete() {
        report
    } else {
        verifier.stop().await
    };
    report.print(out)?;
    Ok(report.is_complete())
}

/// The first line `verify` prints: what it listens for, where, and for how long.
fn waiting_line(o: &VerifyOptions) -> String {
    let gateways = if o.gateways.is_empty() {
        "every gateway".to_string()
    } else {
        format!("gateway(s) {}", o.gateways.join(", "))
    };
    let until = match o.until {
        Some(until) => format!("seqs {}..={until}, for at most", o.from),
        None => format!("seqs from {}, for", o.from),
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
    /// A gateway that must show up (repeatable); without it, every gateway seen.
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// First seq expected from each gateway.
    #[arg(long, default_value_t = 1)]
    pub from: u64,
    /// Last seq expected: finish as soon as everything up to it arrived.
    #[arg(long)]
    pub until: Option<u64>,
    /// How long to listen (and wait for repairs) before reporting.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Only report; do not ask the gateways to resend gaps.
    #[arg(long)]
    pub no_resend: bool,
    /// How often open gaps are asked for again.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub resend_interval: Duration,
    /// Widest range in one resend request.
    #[arg(long, default_value_t = 10_000)]
    pub resend_max_span: u64,
}

impl VerifyArgs {
    pub fn options(&self) -> Result<VerifyOptions, String> {
        let (host, port) = parse_broker_url(&self.broker)?;
        Ok(VerifyOptions {
            host,
            port,
            username: self.username.clone(),
            password: self.password.clone(),
            prefix: self.prefix.clone(),
            gateways: self.gateways.clone(),
            from: self.from,
            until: self.until,
            wait: self.wait,
            resend: !self.no_resend,
            resend_interval: self.resend_interval,
            resend_max_span: self.resend_max_span.max(1),
        })
    }
}

/// `edge-agent verify`: exits non-zero when anything is missing.
pub fn main(args: VerifyArgs) -> anyhow::Result<bool> {
    let options = args
        .options()
        .map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(options, &mut std::io::stdout(), &mut std::io::stderr()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RawRecord;

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
    fn record(seq: u64) -> Vec<u8> {
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
    fn batch(gw: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let recs: Vec<RawRecord> = seqs
            .into_iter()
            .map(|seq| RawRecord {
                seq,
                bytes: record(seq),
            })
            .collect();
        let mut out = Vec::new();
        wire::encode_batch(gw, &recs, &schema_bytes, &mut out);
        out
    }

    /// A batch without its schemas (as a consumer that joined mid-connection sees it).
    fn bare_batch(gw: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let recs: Vec<RawRecord> = seqs
            .into_iter()
            .map(|seq| RawRecord {
                seq,
                bytes: record(seq),
            })
            .collect();
        let mut out = Vec::new();
        wire::encode_batch(gw, &recs, &|_| None, &mut out);
        out
    }

    #[test]
    fn readings_whose_schema_is_missing_are_asked_for_again_and_then_decode() {
        let mut t = Tracker::new(5, Some(10));
        // Joined mid-connection: the schema went by in an earlier batch.
        t.on_records("gw", &bare_batch("gw", 5..=10));
        let r = t.report(&[]);
        assert_eq!(r.gateways["gw"].undecoded, 6);
        assert_eq!(r.gateways["gw"].missing_count, 0);
        assert!(
            !r.is_complete(),
            "readings that cannot be decoded are not complete"
        );
        // One reading of the unknown schema is asked for: its resend carries it.
        assert_eq!(t.resend_requests(100), vec![("gw".to_string(), 5, 5)]);
        t.on_records("gw", &batch("gw", [5]));
        let r = t.report(&[]);
        let g = &r.gateways["gw"];
        assert_eq!((g.undecoded, g.duplicates, g.malformed), (0, 0, 0));
        assert!(r.is_complete());
    }

    #[test]
    fn tracks_gaps_duplicates_order_and_manifests() {
        let mut t = Tracker::new(1, None);
        t.on_records("gw", &batch("gw", 1..=10));
        t.on_records("gw", &batch("gw", 15..=20));
        t.on_records("gw", &batch("gw", 9..=10));
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

        let asks = t.resend_requests(3);
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
        t.on_records("gw", &batch("gw", 11..=14));
        t.on_records("gw", &batch("gw", 21..=25));
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
        t.on_records("gw", &batch("gw", 1..=5));
        t.on_records("gw", &batch("gw", [12]));
        let mut out = Vec::new();
        wire::encode_batch("gw", &[drop_record(13, vec![(6, 12)])], &|_| None, &mut out);
        t.on_records("gw", &out);
        t.on_records("gw", &batch("gw", 14..=20));
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
        assert!(
            t.resend_requests(100).is_empty(),
            "dropped seqs are never asked for"
        );
    }

    #[test]
    fn subtract_leaves_what_is_outside_the_holes() {
        assert_eq!(subtract(1..=10, &[3..=4, 8..=12]), vec![1..=2, 5..=7]);
        assert_eq!(
            subtract(1..=10, &[0..=20]),
            Vec::<RangeInclusive<u64>>::new()
        );
        assert_eq!(subtract(5..=6, &[1..=2]), vec![5..=6]);
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
        t.on_records("gw", &batch("gw", [1, 2, 4]));
        t.on_records("gw", &batch("gw", [3, 5]));
        let r = t.report(&[]);
        assert_eq!(r.gateways["gw"].out_of_order, 1);
        assert_eq!(r.gateways["gw"].missing, vec![6..=6]);
    }
}
