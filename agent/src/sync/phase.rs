//! The sync's states and their transitions: what exists only while connected (the
//! window of batches in flight, the packet ids, the schemas announced) lives in a
//! [`Session`] that a connection creates and its loss drops, so no state can carry
//! a window over a reconnect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::link::Link;
use super::{Prepared, SyncState};

/// Something published and waiting for its [`super::link::LinkEvent::Sent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    /// A batch of the outbox; the cursor moves when it is acknowledged.
    Slot(u64),
    /// Status, manifest, resent batch: nothing depends on its acknowledgement.
    Other,
}

/// A batch of the outbox in seq order.
#[derive(Debug)]
pub(super) struct Slot {
    pub last: u64,
    pub acked: bool,
    /// Seqs of the records published in it.
    pub seqs: Vec<u64>,
}

/// What one connection holds. It starts at the cursor: the session is clean, so
/// everything not acknowledged is published again.
#[derive(Debug)]
pub(super) struct Session {
    /// Next seq to put into a batch.
    pub next: u64,
    /// Outbox batches not yet folded into the cursor, in seq order; ids are
    /// `first_slot..first_slot + slots.len()`.
    pub slots: VecDeque<Slot>,
    pub first_slot: u64,
    /// Tags of accepted publishes, in order, until their packet id is known.
    pub awaiting_outgoing: VecDeque<Tag>,
    /// Tags of publishes sent and not yet acknowledged, by packet id.
    pub inflight: HashMap<u16, Tag>,
    /// Schemas sent on this connection (at most `codec::MAX_SCHEMAS`).
    pub announced: HashSet<u32>,
    /// A batch read ahead, waiting for room in the window.
    pub ready: Option<Prepared>,
    /// When the broker last sent anything (the keepalive watchdog's clock).
    pub last_incoming: Instant,
}

impl Session {
    fn new(cursor: u64, now: Instant) -> Session {
        Session {
            next: cursor + 1,
            slots: VecDeque::new(),
            first_slot: 0,
            awaiting_outgoing: VecDeque::new(),
            inflight: HashMap::new(),
            announced: HashSet::new(),
            ready: None,
            last_incoming: now,
        }
    }

    /// Publishes and orders `tag` behind the publishes already waiting for their
    /// packet id; `false` when the link refused it.
    pub fn send(
        &mut self,
        link: &mut impl Link,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        tag: Tag,
    ) -> bool {
        let sent = link.publish(topic, retain, payload);
        if sent {
            self.awaiting_outgoing.push_back(tag);
        }
        sent
    }

    /// Publishes accepted and not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.awaiting_outgoing.len() + self.inflight.len()
    }

    /// Batches published and not yet acknowledged.
    pub fn unacked_batches(&self) -> usize {
        self.slots.iter().filter(|s| !s.acked).count()
    }

    /// Whether another batch may go out with `window` (`upstream.inflight_batches`)
    /// batches of at most `batch_records`: fewer than `window` unacknowledged, and
    /// the batches not yet covered by the durable cursor (acknowledged or not) hold
    /// fewer than `window` full batches' records, in fewer than
    /// [`ACKED_SLOTS_PER_WINDOW`] × `window` batches. A kill then re-sends at most a
    /// window of full batches, as before; but a trickle of one-reading batches
    /// (more than `window` a second), whose cursor is made durable with the next
    /// journal sync (up to `store.sync_interval` later), does not wait for that sync.
    pub fn has_room(&self, window: usize, batch_records: usize) -> bool {
        let records: usize = self.slots.iter().map(|s| s.seqs.len()).sum();
        self.unacked_batches() < window
            && self.slots.len() < window.saturating_mul(ACKED_SLOTS_PER_WINDOW)
            && records < window.saturating_mul(batch_records)
            && self.outstanding() < window + 2
    }
}

/// Bound of the batches in the window (acknowledged or not) per batch in flight.
pub(super) const ACKED_SLOTS_PER_WINDOW: usize = 4;

/// Where the sync stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// No connection since `since` (the link keeps trying, with its backoff).
    Offline { since: Instant },
    /// Connected, more than one batch of records not yet acknowledged.
    CatchingUp(Session),
    /// Connected, at most one batch behind.
    Live(Session),
}

impl Phase {
    /// The state a sync starts in: offline, its first attempt under way.
    pub fn new(now: Instant) -> Phase {
        Phase::Offline { since: now }
    }

    /// Its label for the status page and the metrics.
    pub fn label(&self) -> SyncState {
        match self {
            Phase::Offline { .. } => SyncState::Offline,
            Phase::CatchingUp(_) => SyncState::CatchingUp,
            Phase::Live(_) => SyncState::Live,
        }
    }

    pub fn session(&self) -> Option<&Session> {
        match self {
            Phase::Offline { .. } => None,
            Phase::CatchingUp(s) | Phase::Live(s) => Some(s),
        }
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match self {
            Phase::Offline { .. } => None,
            Phase::CatchingUp(s) | Phase::Live(s) => Some(s),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.session().is_some()
    }

    /// How long it has been offline (`None`: connected).
    pub fn offline_for(&self, now: Instant) -> Option<Duration> {
        match self {
            Phase::Offline { since } => Some(now.saturating_duration_since(*since)),
            _ => None,
        }
    }

    /// ConnAck: a new session that starts after the durable `cursor`, catching up
    /// when more than a batch is `behind`. A session still open (a ConnAck without
    /// a loss before it) is dropped: its window belongs to the old connection.
    pub fn on_connected(&mut self, cursor: u64, behind: bool, now: Instant) {
        let session = Session::new(cursor, now);
        *self = if behind {
            Phase::CatchingUp(session)
        } else {
            Phase::Live(session)
        };
    }

    /// The connection failed or was lost (or was dropped as silent): the window and
    /// the read-ahead go. A failed attempt while offline keeps `since`.
    pub fn on_disconnected(&mut self, now: Instant) {
        if self.is_connected() {
            *self = Phase::Offline { since: now };
        }
    }

    /// The backlog is at most one batch: catching up is over.
    pub fn on_caught_up(&mut self) {
        self.replace(|phase| match phase {
            Phase::CatchingUp(s) => Phase::Live(s),
            other => other,
        });
    }

    /// The backlog grew past one batch (records came faster than they drained).
    pub fn on_fell_behind(&mut self) {
        self.replace(|phase| match phase {
            Phase::Live(s) => Phase::CatchingUp(s),
            other => other,
        });
    }

    /// A packet came from the broker: the link is alive.
    pub fn on_heard(&mut self, now: Instant) {
        if let Some(s) = self.session_mut() {
            s.last_incoming = now;
        }
    }

    /// Whether the broker has said nothing for longer than `limit` while connected.
    pub fn is_silent(&self, now: Instant, limit: Duration) -> bool {
        self.session()
            .is_some_and(|s| now.saturating_duration_since(s.last_incoming) > limit)
    }

    /// The oldest publish waiting for its packet id went out as `pkid`. Ignored
    /// while offline: it belongs to a connection that is gone.
    pub fn on_sent(&mut self, pkid: u16) {
        if let Some(s) = self.session_mut() {
            if let Some(tag) = s.awaiting_outgoing.pop_front() {
                s.inflight.insert(pkid, tag);
            }
        }
    }

    /// PubAck for `pkid`: `true` when it acknowledged a batch of the window (the
    /// cursor may move). Ignored while offline.
    pub fn on_ack(&mut self, pkid: u16) -> bool {
        let Some(s) = self.session_mut() else {
            return false;
        };
        let Some(Tag::Slot(id)) = s.inflight.remove(&pkid) else {
            return false;
        };
        if let Some(slot) = id
            .checked_sub(s.first_slot)
            .and_then(|i| s.slots.get_mut(i as usize))
        {
            slot.acked = true;
        }
        true
    }

    /// The cursor up to `cursor` is durable: the batches it covers leave the window.
    pub fn on_cursor(&mut self, cursor: u64) {
        if let Some(s) = self.session_mut() {
            while s.slots.front().is_some_and(|slot| slot.last <= cursor) {
                s.slots.pop_front();
                s.first_slot += 1;
            }
        }
    }

    fn replace(&mut self, f: impl FnOnce(Phase) -> Phase) {
        // A placeholder for the moment the session moves between variants.
        let now = Instant::now();
        let phase = std::mem::replace(self, Phase::new(now));
        *self = f(phase);
    }
}
