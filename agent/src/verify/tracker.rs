//! The verifier's bookkeeping, without I/O: per gateway, which seqs arrived (as
//! ranges), what the gateway declared dropped, the manifests still to check, and the
//! resend requests under way (each with a deadline, so that a gap asked for is not
//! asked for again before it times out).
//!
//! Memory per gateway is bounded: received seqs are merged into ranges (at most
//! [`TrackerLimits::max_ranges`]), the CRCs of records not yet covered by a checked
//! manifest at most [`TrackerLimits::max_crcs`], manifests waiting for their records
//! at most [`MAX_PENDING_MANIFESTS`], requests under way at most
//! [`MAX_OUTSTANDING`]. The number of gateways is capped too
//! ([`TrackerLimits::max_gateways`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::ManifestCheck;
use crate::model::{Payload, Record};
use crate::store::{codec, crc32c};
use crate::sync::wire::{self, crc32c_combine, Manifest};

/// An inclusive seq range.
pub type Span = (u64, u64);

/// Manifests kept per gateway while their records are still missing.
pub const MAX_PENDING_MANIFESTS: usize = 64;
/// Checked manifests kept per gateway for the report (the counters cover all).
pub const KEPT_CHECKS: usize = 64;
/// Resend requests under way per gateway.
pub const MAX_OUTSTANDING: usize = 1024;
/// Readings without their schema remembered per gateway.
const MAX_UNDECODED: usize = 10_000;

/// The caps of a [`Tracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerLimits {
    /// Gateways tracked; records of further gateways are ignored (and counted).
    pub max_gateways: usize,
    /// Disjoint ranges of received seqs per gateway; a record that would open one
    /// more is not tracked (counted as `untracked`).
    pub max_ranges: usize,
    /// CRCs of records not yet covered by a checked manifest, per gateway; beyond
    /// it the oldest are forgotten and a manifest over them counts as unchecked.
    pub max_crcs: usize,
}

impl Default for TrackerLimits {
    fn default() -> Self {
        TrackerLimits {
            max_gateways: 20_000,
            max_ranges: 65_536,
            max_crcs: 8_192,
        }
    }
}

/// Which gateways a tracker follows: a list, a shard, or both.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these gateways (empty: any).
    pub gateways: HashSet<String>,
    /// `(i, n)`: only gateways whose id hashes to shard `i` of `n`.
    pub shard: Option<(u64, u64)>,
}

impl Selection {
    pub fn accepts(&self, gw: &str) -> bool {
        (self.gateways.is_empty() || self.gateways.contains(gw))
            && self.shard.map_or(true, |(i, n)| shard_of(gw, n) == i)
    }
}

/// FNV-1a (64 bit) of the gateway id's UTF-8 bytes.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard of `n` gateway `gw` belongs to: FNV-1a 64 of its id, modulo `n`.
pub fn shard_of(gw: &str, n: u64) -> u64 {
    fnv1a64(gw.as_bytes()) % n.max(1)
}

/// A resend request under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outstanding {
    from: u64,
    to: u64,
    /// Not asked for again before this (moved on while its records arrive).
    deadline: Instant,
}

/// What is kept of one gateway (and saved in the state store).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GwState {
    /// Received seqs, as sorted disjoint inclusive ranges.
    pub received: Vec<Span>,
    pub received_count: u64,
    pub max_seen: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    /// Records not tracked because the range cap was reached.
    pub untracked: u64,
    pub resend_requests: u64,
    /// Seq ranges the gateway declared dropped, merged.
    pub dropped: Vec<Span>,
    /// `(seq, CRC-32C, length)` of records not yet covered by a checked manifest,
    /// by seq.
    pub crcs: Vec<(u64, u32, u32)>,
    /// CRCs of seqs up to this were forgotten (cap).
    pub crcs_forgotten_to: u64,
    /// Manifests waiting for their records: `(from, to, count, crc32c)`.
    pub pending_manifests: Vec<(u64, u64, u64, u32)>,
    /// The last checked manifests.
    pub checked: Vec<ManifestCheck>,
    pub manifests_ok: u64,
    pub manifests_failed: u64,
    /// Manifests that could not be checked (their CRCs were forgotten, or more
    /// waited than [`MAX_PENDING_MANIFESTS`]).
    pub manifests_unchecked: u64,
    pub last_manifest_ok: Option<bool>,
    /// Highest `to` of any manifest.
    pub manifest_high: u64,
    /// Highest `to` of a checked manifest.
    pub checked_to: u64,
    /// Wall clock (Unix ms) when the newest new record arrived.
    pub newest_record_ms: i64,
    /// Wall clock (Unix ms) since when records are missing (none: complete).
    pub incomplete_since_ms: Option<i64>,
    /// Readings whose schema has not arrived: seq -> schema id.
    pub undecoded: BTreeMap<u64, u32>,
    /// The gateway's schemas, encoded (`store::codec`): saved so that a restart
    /// still decodes what follows.
    pub schemas: Vec<Vec<u8>>,
    #[serde(skip)]
    pub(crate) outstanding: Vec<Outstanding>,
    /// Changed since it was last saved.
    #[serde(skip)]
    pub(crate) dirty: bool,
}

/// Where `seq` would go in sorted disjoint `ranges`: the index of the first range
/// starting after it.
fn after(ranges: &[Span], seq: u64) -> usize {
    ranges.partition_point(|r| r.0 <= seq)
}

pub fn contains(ranges: &[Span], seq: u64) -> bool {
    let i = after(ranges, seq);
    i > 0 && ranges[i - 1].1 >= seq
}

#[derive(Debug, PartialEq, Eq)]
enum Insert {
    New,
    Present,
    Full,
}

/// Adds `seq` to sorted disjoint `ranges`, merging neighbours; at most `cap` ranges.
fn insert_seq(ranges: &mut Vec<Span>, seq: u64, cap: usize) -> Insert {
    let i = after(ranges, seq);
    if i > 0 && ranges[i - 1].1 >= seq {
        return Insert::Present;
    }
    let joins_prev = i > 0 && ranges[i - 1].1.checked_add(1) == Some(seq);
    let joins_next = i < ranges.len() && seq.checked_add(1) == Some(ranges[i].0);
    match (joins_prev, joins_next) {
        (true, true) => {
            ranges[i - 1].1 = ranges[i].1;
            ranges.remove(i);
        }
        (true, false) => ranges[i - 1].1 = seq,
        (false, true) => ranges[i].0 = seq,
        (false, false) => {
            if ranges.len() >= cap {
                return Insert::Full;
            }
            ranges.insert(i, (seq, seq));
        }
    }
    Insert::New
}

/// Merges `span` into sorted disjoint `ranges`.
pub fn merge_span(ranges: &mut Vec<Span>, span: Span) {
    if span.0 > span.1 {
        return;
    }
    let (mut from, mut to) = span;
    // Every range that overlaps or touches `span` is folded into it.
    let start = ranges.partition_point(|r| r.1.saturating_add(1) < from);
    let mut end = start;
    while end < ranges.len() && ranges[end].0 <= to.saturating_add(1) {
        from = from.min(ranges[end].0);
        to = to.max(ranges[end].1);
        end += 1;
    }
    ranges.splice(start..end, [(from, to)]);
}

/// The parts of `from..=to` that `ranges` (sorted, disjoint) do not cover.
pub fn complement(ranges: &[Span], from: u64, to: u64) -> Vec<Span> {
    let mut out = Vec::new();
    if from > to {
        return out;
    }
    let mut expect = from;
    let first = ranges.partition_point(|r| r.1 < from);
    for r in &ranges[first..] {
        if r.0 > to {
            break;
        }
        if r.0 > expect {
            out.push((expect, r.0 - 1));
        }
        expect = match r.1.checked_add(1) {
            Some(e) => e,
            None => return out,
        };
        if expect > to {
            return out;
        }
    }
    out.push((expect, to));
    out
}

/// The parts of `spans` outside `holes` (both sorted, disjoint).
pub fn subtract(spans: &[Span], holes: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(from, to) in spans {
        out.extend(complement(holes, from, to));
    }
    out
}

/// Seqs of `ranges` within `from..=to`.
fn count_within(ranges: &[Span], from: u64, to: u64) -> u64 {
    let first = ranges.partition_point(|r| r.1 < from);
    ranges[first..]
        .iter()
        .take_while(|r| r.0 <= to)
        .map(|r| r.1.min(to) - r.0.max(from) + 1)
        .sum()
}

pub fn span_len(spans: &[Span]) -> u64 {
    spans.iter().map(|r| r.1 - r.0 + 1).sum()
}

impl GwState {
    fn outstanding_contains(&self, seq: u64) -> bool {
        self.outstanding
            .iter()
            .any(|o| o.from <= seq && seq <= o.to)
    }

    /// Seqs from `from` to `target` that neither arrived nor were declared dropped.
    pub fn gaps(&self, from: u64, target: u64) -> Vec<Span> {
        subtract(&complement(&self.received, from, target), &self.dropped)
    }

    /// Keeps a record's CRC until a manifest over it is checked.
    fn keep_crc(&mut self, seq: u64, crc: u32, len: u32, max: usize) {
        if seq <= self.crcs_forgotten_to {
            return;
        }
        if seq <= self.checked_to
            && !self
                .pending_manifests
                .iter()
                .any(|m| m.0 <= seq && seq <= m.1)
        {
            return;
        }
        let i = self.crcs.partition_point(|c| c.0 < seq);
        self.crcs.insert(i, (seq, crc, len));
        if self.crcs.len() > max {
            let (forgotten, _, _) = self.crcs.remove(0);
            self.crcs_forgotten_to = self.crcs_forgotten_to.max(forgotten);
        }
    }

    /// Checks the manifests whose records are all there.
    fn check_manifests(&mut self) {
        let mut i = 0;
        while i < self.pending_manifests.len() {
            let m = self.pending_manifests[i];
            match self.check(m) {
                None => i += 1,
                Some(ok) => {
                    self.pending_manifests.remove(i);
                    self.resolve(m, ok);
                }
            }
        }
    }

    /// `None`: records of the range are still missing; `Some(None)`: cannot be
    /// checked (CRCs forgotten); `Some(Some(ok))`: checked.
    fn check(&self, (from, to, count, crc): (u64, u64, u64, u32)) -> Option<Option<bool>> {
        let span = to - from + 1;
        let held = span - count_within(&self.dropped, from, to);
        let arrived = count_within(&self.received, from, to);
        let dropped_arrived: u64 = {
            // Copies of dropped records that arrived anyway are not in the manifest.
            let first = self.dropped.partition_point(|r| r.1 < from);
            self.dropped[first..]
                .iter()
                .take_while(|r| r.0 <= to)
                .map(|r| count_within(&self.received, r.0.max(from), r.1.min(to)))
                .sum()
        };
        let present = arrived - dropped_arrived;
        if present < held && present < count {
            return None;
        }
        if from <= self.crcs_forgotten_to {
            return Some(None);
        }
        let first = self.crcs.partition_point(|c| c.0 < from);
        let mut acc = crc32c(b"");
        let mut n = 0u64;
        for &(seq, c, len) in self.crcs[first..].iter().take_while(|c| c.0 <= to) {
            if contains(&self.dropped, seq) {
                continue;
            }
            acc = crc32c_combine(acc, c, len as u64);
            n += 1;
        }
        if n < present {
            // Some arrived before a restart without their CRC kept.
            return Some(None);
        }
        Some(Some(n == count && acc == crc))
    }

    fn resolve(&mut self, (from, to, count, crc): (u64, u64, u64, u32), ok: Option<bool>) {
        match ok {
            Some(true) => self.manifests_ok += 1,
            Some(false) => self.manifests_failed += 1,
            None => self.manifests_unchecked += 1,
        }
        if ok.is_some() {
            self.last_manifest_ok = ok;
        }
        self.checked.push(ManifestCheck {
            from,
            to,
            count,
            crc32c: crc,
            ok,
        });
        if self.checked.len() > KEPT_CHECKS {
            self.checked.remove(0);
        }
        self.checked_to = self.checked_to.max(to);
        // Their CRCs are no longer needed, unless a manifest still waiting covers them.
        let pending = &self.pending_manifests;
        self.crcs
            .retain(|c| c.0 < from || c.0 > to || pending.iter().any(|m| m.0 <= c.0 && c.0 <= m.1));
    }
}

/// Why the tracker refused a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in the list or not in the shard: ignored silently.
    NotSelected,
    /// Beyond `max_gateways`.
    Full,
}

/// The bookkeeping of all gateways.
#[derive(Debug)]
pub struct Tracker {
    pub(crate) gateways: BTreeMap<String, GwState>,
    /// The schemas batches carried, per gateway.
    decoder: wire::Decoder,
    pub(crate) from: u64,
    /// Last seq expected from every gateway.
    pub(crate) until: Option<u64>,
    /// Last seq expected from some gateways.
    pub(crate) until_per: HashMap<String, u64>,
    pub(crate) selection: Selection,
    pub(crate) limits: TrackerLimits,
    /// How long a resend request is given before the same gap is asked for again.
    pub(crate) timeout: Duration,
    /// Widest range one request asks for.
    pub(crate) span: u64,
    /// Records of gateways beyond `max_gateways`.
    pub refused: u64,
    refused_logged: Option<Instant>,
    /// Where the next round of resend requests starts (round robin over gateways).
    cursor: Option<String>,
    /// Resend requests sent, and rounds that had more to ask than the rate allowed.
    pub resend_total: u64,
    pub rate_limited_rounds: u64,
    /// Resend rounds run (tests wait on it).
    pub rounds: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(1, None)
    }
}

impl Tracker {
    pub fn new(from: u64, until: Option<u64>) -> Tracker {
        Tracker {
            gateways: BTreeMap::new(),
            decoder: wire::Decoder::default(),
            from: from.max(1),
            until,
            until_per: HashMap::new(),
            selection: Selection::default(),
            limits: TrackerLimits::default(),
            timeout: Duration::from_secs(5),
            span: 10_000,
            refused: 0,
            refused_logged: None,
            cursor: None,
            resend_total: 0,
            rate_limited_rounds: 0,
            rounds: 0,
        }
    }

    /// The last seq expected from `gw`, if any.
    pub fn target_of(&self, gw: &str) -> Option<u64> {
        self.until_per.get(gw).copied().or(self.until)
    }

    /// Highest seq known of `gw` (received, in a manifest, or expected).
    pub fn highest(&self, gw: &str, g: &GwState) -> u64 {
        g.max_seen
            .max(g.manifest_high)
            .max(self.target_of(gw).unwrap_or(0))
    }

    /// The missing seqs of `gw`.
    pub fn gaps(&self, gw: &str, g: &GwState) -> Vec<Span> {
        g.gaps(self.from, self.highest(gw, g))
    }

    pub fn get(&self, gw: &str) -> Option<&GwState> {
        self.gateways.get(gw)
    }

    pub fn len(&self) -> usize {
        self.gateways.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }

    /// Takes back a gateway's saved state (its schemas too).
    pub fn restore(&mut self, gw: String, mut state: GwState) {
        if !self.selection.accepts(&gw) || self.gateways.len() >= self.limits.max_gateways {
            return;
        }
        for bytes in &state.schemas {
            if let Ok(schema) = codec::decode_schema(bytes) {
                self.decoder.learn(&gw, schema);
            }
        }
        state.dirty = false;
        self.gateways.insert(gw, state);
    }

    /// The state of `gw`, created if it is selected and there is room.
    fn entry(&mut self, gw: &str) -> Result<&mut GwState, Refusal> {
        if !self.gateways.contains_key(gw) {
            if !self.selection.accepts(gw) {
                return Err(Refusal::NotSelected);
            }
            if self.gateways.len() >= self.limits.max_gateways {
                self.refused += 1;
                if self
                    .refused_logged
                    .map_or(true, |t| t.elapsed() >= Duration::from_secs(60))
                {
                    self.refused_logged = Some(Instant::now());
                    tracing::warn!(
                        target: "edge_agent::verify",
                        gateway = gw,
                        max_gateways = self.limits.max_gateways,
                        refused_messages = self.refused,
                        "more gateways than --max-gateways: records of new gateways are ignored (raise --max-gateways or split with --shard)"
                    );
                }
                return Err(Refusal::Full);
            }
            self.gateways.insert(gw.to_string(), GwState::default());
        }
        // Present: inserted above or before.
        self.gateways.get_mut(gw).ok_or(Refusal::Full)
    }

    /// A batch on `{prefix}/{gw_topic}/records`, arrived at `now` (`wall_ms`: Unix ms).
    pub fn on_records(&mut self, gw_topic: &str, payload: &[u8], now: Instant, wall_ms: i64) {
        // Not selected, or beyond the cap (counted): not even decoded.
        if self.entry(gw_topic).is_err() {
            return;
        }
        let batch = match self.decoder.batch(payload) {
            Ok(b) if b.gw == gw_topic => b,
            _ => {
                if let Ok(g) = self.entry(gw_topic) {
                    g.malformed += 1;
                    g.dirty = true;
                }
                return;
            }
        };
        let learnt = !batch.schemas.is_empty();
        let limits = self.limits;
        let timeout = self.timeout;
        let schemas: Option<Vec<Vec<u8>>> = learnt.then(|| {
            self.decoder
                .schemas_of(gw_topic)
                .iter()
                .map(|s| {
                    let mut out = Vec::new();
                    codec::encode_schema(s, &mut out);
                    out
                })
                .collect()
        });
        if self.entry(gw_topic).is_err() {
            return;
        }
        let Some(g) = self.gateways.get_mut(gw_topic) else {
            return;
        };
        g.dirty = true;
        if let Some(schemas) = schemas {
            g.schemas = schemas;
        }
        let decoder = &self.decoder;
        for rec in batch.records {
            let asked = g.outstanding_contains(rec.seq);
            match insert_seq(&mut g.received, rec.seq, limits.max_ranges) {
                Insert::Full => {
                    g.untracked += 1;
                    continue;
                }
                Insert::Present => {
                    // A record asked for again (its schema was missing) is no duplicate.
                    if g.undecoded.contains_key(&rec.seq) {
                        if decoder.record(gw_topic, &rec.data).is_ok() {
                            g.undecoded.remove(&rec.seq);
                        }
                    } else if !asked {
                        g.duplicates += 1;
                    }
                    continue;
                }
                Insert::New => {}
            }
            g.received_count += 1;
            if rec.seq < g.max_seen && !asked {
                g.out_of_order += 1;
            }
            g.max_seen = g.max_seen.max(rec.seq);
            g.newest_record_ms = g.newest_record_ms.max(wall_ms);
            if asked {
                // The resend is under way: its deadline moves on while records come.
                for o in g.outstanding.iter_mut() {
                    if o.from <= rec.seq && rec.seq <= o.to {
                        o.deadline = o.deadline.max(now + timeout);
                    }
                }
            }
            let len = u32::try_from(rec.data.len()).unwrap_or(u32::MAX);
            g.keep_crc(rec.seq, crc32c(&rec.data), len, limits.max_crcs);
            match decoder.record(gw_topic, &rec.data) {
                Ok(Record {
                    payload: Payload::Dropped(ev),
                    ..
                }) => {
                    for (from, to) in ev.ranges {
                        merge_span(&mut g.dropped, (from, to));
                    }
                }
                Ok(_) => {}
                Err(_) => match codec::peek_schema(&rec.data) {
                    Some(id) if !decoder.knows(gw_topic, id) => {
                        if g.undecoded.len() < MAX_UNDECODED {
                            g.undecoded.insert(rec.seq, id);
                        }
                    }
                    _ => g.malformed += 1,
                },
            }
        }
        // Readings waiting for a schema this batch brought.
        if learnt {
            g.undecoded
                .retain(|_, schema| !decoder.knows(gw_topic, *schema));
        }
        g.check_manifests();
    }

    /// A manifest on `{prefix}/{gw_topic}/manifest`.
    pub fn on_manifest(&mut self, gw_topic: &str, payload: &[u8]) {
        let Ok(g) = self.entry(gw_topic) else {
            return;
        };
        g.dirty = true;
        match serde_json::from_slice::<Manifest>(payload) {
            Ok(m) if m.from <= m.to && m.from > 0 => {
                g.manifest_high = g.manifest_high.max(m.to);
                g.pending_manifests.push((m.from, m.to, m.count, m.crc32c));
                if g.pending_manifests.len() > MAX_PENDING_MANIFESTS {
                    let oldest = g.pending_manifests.remove(0);
                    g.resolve(oldest, None);
                }
                g.check_manifests();
            }
            _ => g.malformed += 1,
        }
    }

    /// Notes when each gateway became incomplete (or complete again).
    pub fn update_incomplete(&mut self, wall_ms: i64) {
        let from = self.from;
        let (until, until_per) = (self.until, &self.until_per);
        for (gw, g) in self.gateways.iter_mut() {
            let target = until_per.get(gw).copied().or(until).unwrap_or(0);
            let highest = g.max_seen.max(g.manifest_high).max(target);
            let incomplete = !g.gaps(from, highest).is_empty() || !g.undecoded.is_empty();
            match (incomplete, g.incomplete_since_ms) {
                (true, None) => {
                    g.incomplete_since_ms = Some(wall_ms);
                    g.dirty = true;
                }
                (false, Some(_)) => {
                    g.incomplete_since_ms = None;
                    g.dirty = true;
                }
                _ => {}
            }
        }
    }

    /// At most `budget` resend requests `(gateway, from, to)` for gaps not asked for
    /// already (or whose request timed out), round robin over the gateways.
    pub fn resend_requests(&mut self, now: Instant, budget: usize) -> Vec<(String, u64, u64)> {
        self.rounds += 1;
        let mut out = Vec::new();
        let Tracker {
            gateways,
            from,
            until,
            until_per,
            timeout,
            span,
            cursor,
            ..
        } = self;
        let start = cursor.take();
        let span = (*span).max(1);
        // The gateways from the cursor on, then those before it.
        let order: Vec<String> = match &start {
            Some(c) => gateways
                .range::<String, _>((Bound::Included(c), Bound::Unbounded))
                .chain(gateways.range::<String, _>((Bound::Unbounded, Bound::Excluded(c))))
                .map(|(k, _)| k.clone())
                .collect(),
            None => gateways.keys().cloned().collect(),
        };
        let mut limited = false;
        'gateways: for id in order {
            let Some(g) = gateways.get_mut(&id) else {
                continue;
            };
            g.outstanding.retain(|o| o.deadline > now);
            let target = until_per.get(&id).copied().or(*until).unwrap_or(0);
            let highest = g.max_seen.max(g.manifest_high).max(target);
            // One reading of each schema that never arrived is asked for again:
            // a resent batch carries the schemas of its readings.
            let mut schemas = BTreeSet::new();
            let mut asks: Vec<Span> = Vec::new();
            for (&seq, &schema) in &g.undecoded {
                if g.outstanding_contains(seq) {
                    schemas.insert(schema);
                }
            }
            for (&seq, &schema) in &g.undecoded {
                if schemas.insert(schema) {
                    asks.push((seq, seq));
                }
            }
            let mut asked: Vec<Span> = g.outstanding.iter().map(|o| (o.from, o.to)).collect();
            asked.sort_unstable();
            let mut merged = Vec::new();
            for a in asked {
                merge_span(&mut merged, a);
            }
            for (gap_from, gap_to) in subtract(&g.gaps(*from, highest), &merged) {
                let mut s = gap_from;
                while s <= gap_to {
                    let e = gap_to.min(s.saturating_add(span - 1));
                    asks.push((s, e));
                    if e == u64::MAX {
                        break;
                    }
                    s = e + 1;
                }
            }
            for (a, b) in asks {
                if out.len() >= budget {
                    limited = true;
                    *cursor = Some(id);
                    break 'gateways;
                }
                if g.outstanding.len() >= MAX_OUTSTANDING {
                    break;
                }
                g.outstanding.push(Outstanding {
                    from: a,
                    to: b,
                    deadline: now + *timeout,
                });
                g.resend_requests += 1;
                g.dirty = true;
                out.push((id.clone(), a, b));
            }
        }
        if limited {
            self.rate_limited_rounds += 1;
        }
        self.resend_total += out.len() as u64;
        out
    }

    /// Gateways changed since the last call, with their state encoded for the store.
    pub fn take_dirty(&mut self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (gw, g) in self.gateways.iter_mut() {
            if g.dirty {
                g.dirty = false;
                out.push((gw.clone(), super::state::encode(g)));
            }
        }
        out
    }

    /// Marks what a failed save did not write: saved again next time.
    pub fn unsaved(&mut self, failed: Vec<(String, Vec<u8>)>) {
        for (gw, _) in failed {
            if let Some(g) = self.gateways.get_mut(&gw) {
                g.dirty = true;
            }
        }
    }

    /// The gateways, in id order, from `after` (exclusive).
    pub fn iter_from<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a String, &'a GwState)> + 'a {
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_string()),
            None => Bound::Unbounded,
        };
        self.gateways.range((lower, Bound::Unbounded))
    }
}

#[cfg(test)]
impl Tracker {
    /// `on_records` now.
    pub(crate) fn records(&mut self, gw: &str, payload: &[u8]) {
        self.on_records(gw, payload, Instant::now(), crate::model::now_ms());
    }

    /// Every request due now, at most `span` wide.
    pub(crate) fn asks(&mut self, span: u64) -> Vec<(String, u64, u64)> {
        self.span = span;
        self.resend_requests(Instant::now(), usize::MAX)
    }
}

/// A token bucket: at most `rate` requests a second, in bursts of at most `rate`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate_per_s: u32, now: Instant) -> RateLimit {
        let rate = rate_per_s.max(1) as f64;
        RateLimit {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Requests allowed now.
    pub fn available(&mut self, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens.floor() as usize
    }

    pub fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::tests::batch;

    fn tracker(gateways: &[&str]) -> Tracker {
        let mut t = Tracker::new(1, None);
        t.selection.gateways = gateways.iter().map(|g| g.to_string()).collect();
        t
    }

    #[test]
    fn a_gateway_not_listed_is_neither_followed_nor_asked_for_resends() {
        let mut t = tracker(&["g1"]);
        for gw in ["g1", "g2"] {
            t.records(gw, &batch(gw, [1, 2, 5]));
            t.on_manifest(
                gw,
                format!(r#"{{"gw":"{gw}","from":1,"to":8,"count":8,"crc32c":0,"ts_ms":0}}"#)
                    .as_bytes(),
            );
        }
        assert_eq!(
            t.asks(100),
            vec![("g1".to_string(), 3, 4), ("g1".to_string(), 6, 8)]
        );
        let r = t.report(&[]);
        assert_eq!(r.gateways.keys().collect::<Vec<_>>(), vec!["g1"]);
    }

    #[test]
    fn targets_are_per_gateway_with_a_default_for_the_others() {
        let mut t = Tracker::new(1, Some(4));
        t.until_per.insert("g1".into(), 10);
        for gw in ["g1", "g2"] {
            t.records(gw, &batch(gw, 1..=5));
        }
        let r = t.report(&[]);
        assert_eq!(r.gateways["g1"].missing, vec![6..=10]);
        assert_eq!(r.gateways["g1"].target, Some(10));
        assert_eq!(r.gateways["g2"].missing_count, 0);
        assert_eq!(r.gateways["g2"].target, Some(4));
    }

    /// A gap asked for is not asked for again before its request timed out, and the
    /// timeout moves on while the resent records arrive.
    #[tokio::test(start_paused = true)]
    async fn a_gap_asked_for_is_not_asked_again_before_its_timeout() {
        let mut t = tracker(&[]);
        t.timeout = Duration::from_secs(5);
        t.records("g1", &batch("g1", [1, 2, 3, 10]));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(
            t.resend_requests(at(0), 100),
            vec![("g1".to_string(), 4, 9)]
        );
        assert!(t.resend_requests(at(1), 100).is_empty());
        assert!(t.resend_requests(at(4), 100).is_empty());
        // Part of the resend arrives at 4 s: the request is given 5 s more.
        t.on_records("g1", &batch("g1", [4, 5]), at(4), 0);
        assert!(t.resend_requests(at(6), 100).is_empty());
        assert!(t.resend_requests(at(8), 100).is_empty());
        // Timed out: what is still missing is asked for again, once.
        assert_eq!(
            t.resend_requests(at(9), 100),
            vec![("g1".to_string(), 6, 9)]
        );
        assert!(t.resend_requests(at(10), 100).is_empty());
        let g = &t.report(&[]).gateways["g1"];
        assert_eq!((g.resend_requests, g.out_of_order, g.duplicates), (2, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_stay_within_the_budget_round_robin_over_gateways() {
        let mut t = tracker(&[]);
        t.timeout = Duration::from_secs(60);
        let gws = ["a", "b", "c", "d", "e"];
        for gw in gws {
            t.records(gw, &batch(gw, [1, 3, 5]));
        }
        let now = Instant::now();
        let names = |asks: Vec<(String, u64, u64)>| {
            asks.into_iter()
                .map(|(gw, from, _)| format!("{gw}{from}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(t.resend_requests(now, 3)), vec!["a2", "a4", "b2"]);
        assert_eq!(names(t.resend_requests(now, 3)), vec!["b4", "c2", "c4"]);
        assert_eq!(names(t.resend_requests(now, 3)), vec!["d2", "d4", "e2"]);
        assert_eq!(names(t.resend_requests(now, 3)), vec!["e4"]);
        assert!(t.resend_requests(now, 3).is_empty());
        assert_eq!(t.rate_limited_rounds, 3);

        let mut rate = RateLimit::new(10, now);
        assert_eq!(rate.available(now), 10);
        rate.spend(10);
        assert_eq!(rate.available(now), 0);
        assert_eq!(rate.available(now + Duration::from_millis(500)), 5);
        assert_eq!(
            rate.available(now + Duration::from_secs(60)),
            10,
            "bursts of at most a second"
        );
    }

    #[test]
    fn shards_split_the_gateways_by_fnv1a_of_their_id() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let ids: Vec<String> = (0..100).map(|i| format!("gw-{i:03}")).collect();
        let shard = |i| Selection {
            shard: Some((i, 3)),
            ..Selection::default()
        };
        let counts: Vec<usize> = (0..3)
            .map(|i| ids.iter().filter(|id| shard(i).accepts(id)).count())
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 100, "{counts:?}");
        assert!(counts.iter().all(|c| *c > 20), "{counts:?}");
    }

    #[test]
    fn gateways_beyond_the_cap_are_refused_and_counted() {
        let mut t = tracker(&[]);
        t.limits.max_gateways = 2;
        for gw in ["a", "b", "c"] {
            t.records(gw, &batch(gw, [1]));
        }
        t.on_manifest(
            "c",
            br#"{"gw":"c","from":1,"to":1,"count":1,"crc32c":0,"ts_ms":0}"#,
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.refused, 2);
        assert!(t.get("c").is_none());
    }

    #[test]
    fn ranges_merge_as_seqs_arrive() {
        let mut r = Vec::new();
        for seq in [5, 3, 4, 1, 9, 2, 8] {
            assert_eq!(insert_seq(&mut r, seq, 10), Insert::New);
        }
        assert_eq!(r, vec![(1, 5), (8, 9)]);
        assert_eq!(insert_seq(&mut r, 4, 10), Insert::Present);
        assert_eq!(insert_seq(&mut r, 20, 2), Insert::Full);
        assert_eq!(complement(&r, 1, 12), vec![(6, 7), (10, 12)]);
        assert_eq!(count_within(&r, 3, 8), 4);
        merge_span(&mut r, (6, 12));
        assert_eq!(r, vec![(1, 12)]);
    }
}
