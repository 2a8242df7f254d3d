//! Per-meter availability: `{prefix}/{gw}/{meter}/availability`, `online` or
//! `offline`, retained, published when it changes.
//!
//! - A polled meter is `online` once a poll succeeded and `offline` after
//!   `availability.failed_polls` failed polls in a row (its bus task's counters);
//!   nothing is published before its first poll result.
//! - A pushed meter (one no bus polls) is `online` when a commit brings it data that
//!   is recent (not older than its timeout), and `offline` after no such data for
//!   `availability.push_timeout`, or for three of its latest push spacings when that
//!   is longer. At most [`MAX_PUSHED`] pushed meters are followed.
//!
//! Home Assistant's discovery combines this topic with the gateway's status
//! (`availability_mode: all`): a meter's entities are available only while both say
//! `online`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::LocalBroker;
use crate::acquire::stats::MeterStats;
use crate::broker::config::AvailabilityConfig;
use crate::model::{now_ms, Record};

/// Pushed meters followed at most; more are not given an availability topic.
pub const MAX_PUSHED: usize = 1024;
/// How often the meters' health is looked at.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Longest push spacing taken into account (a meter pushing once a day).
const MAX_SPACING_MS: i64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy)]
struct Pushed {
    /// When its latest recent data arrived (wall clock, ms).
    last_ms: i64,
    /// Time between its latest two arrivals, ms.
    spacing_ms: i64,
}

/// The availability of every meter, and what was last published for each.
#[derive(Debug)]
pub struct Availability {
    failed_polls: u32,
    push_timeout_ms: i64,
    polled: Vec<Arc<MeterStats>>,
    polled_ids: HashSet<String>,
    pushed: HashMap<String, Pushed>,
    published: HashMap<String, bool>,
    full_logged: bool,
}

impl Availability {
    pub fn new(config: &AvailabilityConfig, polled: Vec<Arc<MeterStats>>) -> Availability {
        Availability {
            failed_polls: config.failed_polls.max(1),
            push_timeout_ms: i64::try_from(config.push_timeout.0.as_millis()).unwrap_or(i64::MAX),
            polled_ids: polled.iter().map(|s| s.meter().to_string()).collect(),
            polled,
            pushed: HashMap::new(),
            published: HashMap::new(),
            full_logged: false,
        }
    }

    fn timeout_ms(&self, p: &Pushed) -> i64 {
        self.push_timeout_ms.max(p.spacing_ms.saturating_mul(3))
    }

    /// Notes the pushed meters that a commit brought recent data for.
    pub fn on_commit(&mut self, records: &[Record], now: i64) {
        // The newest timestamp per pushed meter of the commit, in first-seen order.
        let mut newest: Vec<(&str, i64)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for reading in records.iter().filter_map(|r| r.payload.as_reading()) {
            if self.polled_ids.contains(&reading.meter) {
                continue;
            }
            match index.get(reading.meter.as_str()) {
                Some(&i) => newest[i].1 = newest[i].1.max(reading.ts_ms),
                None => {
                    index.insert(&reading.meter, newest.len());
                    newest.push((&reading.meter, reading.ts_ms));
                }
            }
        }
        for (meter, newest) in newest {
            let known = self.pushed.get(meter).copied();
            let timeout = known
                .map(|p| self.timeout_ms(&p))
                .unwrap_or(self.push_timeout_ms);
            // History pushed late does not make a meter available.
            if newest < now.saturating_sub(timeout) {
                continue;
            }
            match known {
                Some(p) => {
                    let spacing = (now - p.last_ms).clamp(0, MAX_SPACING_MS);
                    self.pushed.insert(
                        meter.to_string(),
                        Pushed {
                            last_ms: now,
                            spacing_ms: spacing,
                        },
                    );
                }
                None if self.pushed.len() >= MAX_PUSHED => {
                    if !self.full_logged {
                        self.full_logged = true;
                        tracing::warn!(
                            limit = MAX_PUSHED,
                            "too many pushed meters: no availability topic for more"
                        );
                    }
                }
                None => {
                    self.pushed.insert(
                        meter.to_string(),
                        Pushed {
                            last_ms: now,
                            spacing_ms: 0,
                        },
                    );
                }
            }
        }
    }

    /// Each meter whose availability differs from what was last published, with
    /// its new value; remembered as published.
    pub fn changes(&mut self, now: i64) -> Vec<(String, bool)> {
        let mut current = Vec::new();
        for stats in &self.polled {
            let s = stats.snapshot();
            if s.consecutive_failures >= self.failed_polls {
                current.push((s.meter, false));
            } else if s.successes > 0 && s.consecutive_failures == 0 {
                current.push((s.meter, true));
            }
        }
        for (meter, p) in &self.pushed {
            current.push((meter.clone(), now - p.last_ms <= self.timeout_ms(p)));
        }
        current
            .into_iter()
            .filter(|(meter, online)| {
                self.published.insert(meter.clone(), *online) != Some(*online)
            })
            .collect()
    }
}

/// Publishes each meter's availability when it changes, until `stop`.
pub fn start(
    broker: Arc<LocalBroker>,
    mut availability: Availability,
    mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut committed_open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                batch = committed.recv(), if committed_open => match batch {
                    Ok(records) => availability.on_commit(&records, now_ms()),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => committed_open = false,
                },
                _ = tick.tick() => {}
            }
            for (meter, online) in availability.changes(now_ms()) {
                let topic = broker.topics.availability(&meter);
                let payload = if online { "online" } else { "offline" };
                tracing::info!(meter, availability = payload, "meter availability");
                if let Err(e) = broker.publish(&topic, payload.as_bytes().to_vec(), true) {
                    tracing::warn!(error = %e, topic, "availability not published");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::stats::FailureKind;
    use crate::config::units::HumanDuration;
    use crate::model::{Kind, Payload, Reading, Value};

    fn push(meter: &str, ts_ms: i64) -> Record {
        Record {
            seq: 1,
            payload: Payload::Reading(Reading {
                meter: meter.into(),
                ts_ms,
                values: vec![Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: Some(1.0),
                    invalid: None,
                    source: Default::default(),
                }],
            }),
        }
    }

    fn config(failed_polls: u32, push_timeout: Duration) -> AvailabilityConfig {
        AvailabilityConfig {
            failed_polls,
            push_timeout: HumanDuration(push_timeout),
        }
    }

    #[test]
    fn a_polled_meter_goes_offline_after_n_failed_polls_and_back_on_a_good_one() {
        let stats = Arc::new(MeterStats::new("main"));
        let mut a = Availability::new(&config(3, Duration::from_secs(60)), vec![stats.clone()]);
        assert!(a.changes(0).is_empty(), "nothing before the first poll");
        stats.record_success(0, Duration::from_millis(5), 0);
        assert_eq!(a.changes(0), vec![("main".to_string(), true)]);
        assert!(a.changes(0).is_empty(), "published once");
        stats.record_failure(FailureKind::Timeout);
        stats.record_failure(FailureKind::Timeout);
        assert!(a.changes(0).is_empty(), "two failures: still online");
        stats.record_failure(FailureKind::Timeout);
        assert_eq!(a.changes(0), vec![("main".to_string(), false)]);
        stats.record_success(0, Duration::from_millis(5), 0);
        assert_eq!(a.changes(0), vec![("main".to_string(), true)]);
    }

    #[test]
    fn a_pushed_meter_goes_offline_after_its_timeout_or_three_spacings() {
        let mut a = Availability::new(&config(3, Duration::from_secs(60)), Vec::new());
        let t0 = 1_000_000_000;
        a.on_commit(&[push("pv", t0)], t0);
        assert_eq!(a.changes(t0), vec![("pv".to_string(), true)]);
        assert!(a.changes(t0 + 60_000).is_empty());
        assert_eq!(a.changes(t0 + 60_001), vec![("pv".to_string(), false)]);
        // Back with a spacing of 100 s: offline only after 300 s of silence.
        let t1 = t0 + 100_000;
        a.on_commit(&[push("pv", t1)], t1);
        assert_eq!(a.changes(t1), vec![("pv".to_string(), true)]);
        assert!(a.changes(t1 + 300_000).is_empty());
        assert_eq!(a.changes(t1 + 300_001), vec![("pv".to_string(), false)]);
        // Old history pushed now does not make it available.
        let t2 = t1 + 400_000;
        a.on_commit(&[push("pv", t0)], t2);
        assert!(a.changes(t2).is_empty());
    }

    #[test]
    fn polled_meters_are_not_followed_as_pushed_and_pushed_ones_are_capped() {
        let stats = Arc::new(MeterStats::new("main"));
        let mut a = Availability::new(&config(3, Duration::from_secs(60)), vec![stats]);
        a.on_commit(&[push("main", 5)], 5);
        assert!(
            a.changes(5).is_empty(),
            "a polled meter's health is its polls"
        );
        let many: Vec<Record> = (0..MAX_PUSHED + 10)
            .map(|i| push(&format!("m{i}"), 5))
            .collect();
        a.on_commit(&many, 5);
        assert_eq!(a.changes(5).len(), MAX_PUSHED);
    }
}
