//! The recent alarm events and the raised alarms, for readers such as the HTTP API.
//!
//! Events are [`Payload::Event`](crate::model::Payload::Event) records in the log;
//! finding the latest ones there would mean scanning it. So the worker also keeps
//! the last [`RECENT_EVENTS`] of them, with their seqs, in one state value
//! ([`KEY_EVENTS`]), saved in the same atomic batch as its cursor: a reader gets
//! them with one state read. After a crash between storing an event and saving the
//! state, the replay finds the event in the log and adds it again (by seq, never
//! twice).
//!
//! Which alarms are raised is the alarm counters' business ([`AlarmBook`], saved
//! with the cursor); [`active_alarms`] joins them with the event that raised each.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::alarms::AlarmBook;
use super::{Cursor, KEY_CURSOR};
use crate::model::{AlarmEvent, AlarmState};
use crate::store::{StateError, Store};

/// State key of the [`EventLog`].
pub const KEY_EVENTS: &str = "derive/events";
/// Events kept for readers, newest last.
pub const RECENT_EVENTS: usize = 200;

/// A stored event and its record's seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    pub event: AlarmEvent,
}

/// The last [`RECENT_EVENTS`] events in seq order, and the event that raised each
/// alarm still raised.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLog {
    recent: VecDeque<StoredEvent>,
    /// The `raised` event of every alarm not cleared since, sorted by (meter, rule).
    raised: Vec<StoredEvent>,
}

impl EventLog {
    /// Adds events (any order; each seq once however often it is added). Returns
    /// whether anything changed.
    pub fn add(&mut self, events: impl IntoIterator<Item = StoredEvent>) -> bool {
        let mut fresh: Vec<StoredEvent> = events
            .into_iter()
            .filter(|e| !self.recent.iter().any(|r| r.seq == e.seq))
            .collect();
        fresh.sort_by_key(|e| e.seq);
        fresh.dedup_by_key(|e| e.seq);
        let changed = !fresh.is_empty();
        for e in fresh {
            let key = |s: &StoredEvent| (s.event.meter.clone(), s.event.rule.clone());
            let at = self.raised.binary_search_by_key(&key(&e), key);
            match (e.event.state, at) {
                // An older event than the one on record changes nothing.
                (_, Ok(i)) if self.raised[i].seq > e.seq => {}
                (AlarmState::Raised, Ok(i)) => self.raised[i] = e.clone(),
                (AlarmState::Raised, Err(i)) => self.raised.insert(i, e.clone()),
                (AlarmState::Cleared, Ok(i)) => {
                    self.raised.remove(i);
                }
                (AlarmState::Cleared, Err(_)) => {}
            }
            let pos = self.recent.partition_point(|r| r.seq < e.seq);
            self.recent.insert(pos, e);
        }
        while self.recent.len() > RECENT_EVENTS {
            self.recent.pop_front();
        }
        changed
    }

    /// Up to `limit` events, newest first.
    pub fn newest(&self, limit: usize) -> Vec<StoredEvent> {
        self.recent.iter().rev().take(limit).cloned().collect()
    }

    /// The event that raised `rule` for `meter`, when it is known.
    pub fn raised_by(&self, rule: &str, meter: &str) -> Option<&StoredEvent> {
        self.raised
            .iter()
            .find(|e| e.event.rule == rule && e.event.meter == meter)
    }
}

/// An alarm raised now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveAlarm {
    pub rule: String,
    pub meter: String,
    /// Readings in a row beyond the threshold so far.
    pub warnings: u32,
    /// The event that raised it; `None` when it was raised before this list was
    /// kept (an older store) and has not changed since.
    pub raised: Option<StoredEvent>,
}

/// The stored event log (empty when none was saved yet).
pub fn event_log(store: &Store) -> Result<EventLog, StateError> {
    Ok(store.get_state(KEY_EVENTS)?.unwrap_or_default())
}

/// The alarms raised now, by meter then rule: the saved alarm counters joined with
/// the events that raised them. Two state reads.
pub fn active_alarms(store: &Store, log: &EventLog) -> Result<Vec<ActiveAlarm>, StateError> {
    let book: AlarmBook = store
        .get_state::<Cursor>(KEY_CURSOR)?
        .map(|c| c.alarms)
        .unwrap_or_default();
    let mut active: Vec<ActiveAlarm> = book
        .raised()
        .map(|(rule, meter, counter)| ActiveAlarm {
            rule: rule.to_string(),
            meter: meter.to_string(),
            warnings: counter.warnings,
            raised: log.raised_by(rule, meter).cloned(),
        })
        .collect();
    active.sort_by(|a, b| (&a.meter, &a.rule).cmp(&(&b.meter, &b.rule)));
    Ok(active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, meter: &str, rule: &str, state: AlarmState) -> StoredEvent {
        StoredEvent {
            seq,
            event: AlarmEvent {
                meter: meter.into(),
                rule: rule.into(),
                quantity: "power".into(),
                state,
                value: seq as f64,
                threshold: 1.0,
                ts_ms: seq as i64 * 1000,
                count: 1,
            },
        }
    }

    #[test]
    fn keeps_the_newest_in_seq_order_once_each_and_bounded() {
        let mut log = EventLog::default();
        assert!(log.add([ev(5, "a", "r", AlarmState::Raised)]));
        // Replayed after a crash: the same seq again, and an older one late.
        assert!(!log.add([ev(5, "a", "r", AlarmState::Raised)]));
        assert!(log.add([
            ev(9, "b", "r", AlarmState::Raised),
            ev(3, "c", "r", AlarmState::Raised)
        ]));
        let seqs = |log: &EventLog, n| log.newest(n).iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&log, 10), [9, 5, 3]);
        assert_eq!(seqs(&log, 2), [9, 5]);
        for seq in 100..(100 + RECENT_EVENTS as u64 + 7) {
            log.add([ev(seq, "z", "r", AlarmState::Cleared)]);
        }
        assert_eq!(log.recent.len(), RECENT_EVENTS);
        assert_eq!(log.newest(1)[0].seq, 100 + RECENT_EVENTS as u64 + 6);
        assert_eq!(log.recent.front().map(|e| e.seq), Some(107));
        // Raised alarms outlive the bounded list.
        assert_eq!(log.raised_by("r", "a").map(|e| e.seq), Some(5));
    }

    #[test]
    fn raised_alarms_follow_raise_and_clear_in_seq_order() {
        let mut log = EventLog::default();
        // A clear and the raise before it, added in the wrong order in one step.
        log.add([
            ev(8, "a", "hot", AlarmState::Cleared),
            ev(6, "a", "hot", AlarmState::Raised),
            ev(7, "a", "cold", AlarmState::Raised),
        ]);
        assert!(log.raised_by("hot", "a").is_none());
        assert_eq!(log.raised_by("cold", "a").map(|e| e.seq), Some(7));
        // A raise older than the one on record is only history.
        log.add([ev(10, "a", "hot", AlarmState::Raised)]);
        log.add([ev(4, "a", "hot", AlarmState::Raised)]);
        assert_eq!(log.raised_by("hot", "a").map(|e| e.seq), Some(10));
        log.add([ev(11, "a", "hot", AlarmState::Cleared)]);
        assert!(log.raised_by("hot", "a").is_none());
    }
}
