//! Threshold alarms: warnings that become events.
//!
//! Per rule and meter a counter of readings in a row beyond the threshold. The
//! reading that brings it to the rule's `count` raises one `raised` event; further
//! warnings only count. A normal reading resets the counter and, when the alarm was
//! raised, emits `cleared`. A reading without the rule's quantity, or whose value is
//! not a number, is neither a warning nor normal: it changes nothing.
//!
//! [`AlarmBook`] is plain data: the worker persists it together with the seq of the
//! last reading it has seen (see the module doc of `analytics` for the order that
//! keeps a crash from losing or duplicating an event).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::analytics::config::AlarmRule;
use crate::model::{AlarmEvent, AlarmState, Reading};

/// A rule with its resolved id and threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    /// Meter id or `*`.
    pub meter: String,
    pub quantity: String,
    pub threshold: f64,
    /// True: a value above the threshold warns; false: below.
    pub above: bool,
    pub count: u32,
}

impl Rule {
    /// The valid rules of a configuration (validation rejects the others).
    pub fn from_config(rules: &[AlarmRule]) -> Vec<Rule> {
        rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let (threshold, above) = r.threshold()?;
                Some(Rule {
                    id: r.id_at(i),
                    meter: r.meter.clone(),
                    quantity: r.quantity.clone(),
                    threshold,
                    above,
                    count: r.count.max(1),
                })
            })
            .collect()
    }

    fn beyond(&self, value: f64) -> bool {
        if self.above {
            value > self.threshold
        } else {
            value < self.threshold
        }
    }
}

/// One rule's state for one meter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Readings in a row beyond the threshold.
    pub warnings: u32,
    pub raised: bool,
}

/// Every counter, keyed by (rule id, meter).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlarmBook {
    counters: BTreeMap<String, BTreeMap<String, Counter>>,
}

impl AlarmBook {
    /// The counter of `rule` for `meter` (zero when never touched).
    pub fn counter(&self, rule: &str, meter: &str) -> Counter {
        self.counters
            .get(rule)
            .and_then(|m| m.get(meter))
            .copied()
            .unwrap_or_default()
    }

    /// Every alarm raised now: (rule id, meter, counter).
    pub fn raised(&self) -> impl Iterator<Item = (&str, &str, Counter)> {
        self.counters.iter().flat_map(|(rule, meters)| {
            meters
                .iter()
                .filter(|(_, c)| c.raised)
                .map(move |(meter, c)| (rule.as_str(), meter.as_str(), *c))
        })
    }

    /// Applies one reading to every matching rule; returns the events it causes.
    pub fn apply(&mut self, rules: &[Rule], reading: &Reading) -> Vec<AlarmEvent> {
        let mut events = Vec::new();
        for rule in rules
            .iter()
            .filter(|r| r.meter == "*" || r.meter == reading.meter)
        {
            let Some(value) = reading
                .values
                .iter()
                .find(|v| v.quantity == rule.quantity)
                .and_then(|v| v.value)
                .filter(|v| v.is_finite())
            else {
                continue;
            };
            let counter = self
                .counters
                .entry(rule.id.clone())
                .or_default()
                .entry(reading.meter.clone())
                .or_default();
            let event = |state, count| AlarmEvent {
                meter: reading.meter.clone(),
                rule: rule.id.clone(),
                quantity: rule.quantity.clone(),
                state,
                value,
                threshold: rule.threshold,
                ts_ms: reading.ts_ms,
                count,
            };
            if rule.beyond(value) {
                counter.warnings = counter.warnings.saturating_add(1);
                if !counter.raised && counter.warnings >= rule.count {
                    counter.raised = true;
                    events.push(event(AlarmState::Raised, counter.warnings));
                }
            } else {
                if counter.raised {
                    events.push(event(AlarmState::Cleared, counter.warnings));
                }
                *counter = Counter::default();
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Value};

    fn reading(meter: &str, ts_ms: i64, power: f64) -> Reading {
        Reading {
            meter: meter.into(),
            ts_ms,
            values: vec![Value {
                quantity: "power".into(),
                unit: "W".into(),
                kind: Kind::Power,
                value: Some(power),
                invalid: None,
                source: Default::default(),
            }],
        }
    }

    fn rule(count: u32) -> Rule {
        Rule {
            id: "hot".into(),
            meter: "*".into(),
            quantity: "power".into(),
            threshold: 5000.0,
            above: true,
            count,
        }
    }

    #[test]
    fn n_minus_one_warnings_then_normal_raise_nothing_and_n_raise_once() {
        let rules = vec![rule(3)];
        let mut book = AlarmBook::default();
        assert!(book.apply(&rules, &reading("a", 1, 6000.0)).is_empty());
        assert!(book.apply(&rules, &reading("a", 2, 6000.0)).is_empty());
        assert_eq!(book.counter("hot", "a").warnings, 2);
        assert!(book.apply(&rules, &reading("a", 3, 100.0)).is_empty());
        assert_eq!(book.counter("hot", "a"), Counter::default());

        let mut events = Vec::new();
        for ts in 10..20 {
            events.extend(book.apply(&rules, &reading("a", ts, 7000.0)));
        }
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].state, AlarmState::Raised);
        assert_eq!((events[0].ts_ms, events[0].count), (12, 3));
        assert_eq!((events[0].value, events[0].threshold), (7000.0, 5000.0));
        // Another meter has its own counter.
        assert!(book.apply(&rules, &reading("b", 20, 7000.0)).is_empty());

        let cleared = book.apply(&rules, &reading("a", 21, 5000.0));
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].state, AlarmState::Cleared);
        assert_eq!(cleared[0].count, 10);
        assert!(book.apply(&rules, &reading("a", 22, 10.0)).is_empty());
        assert_eq!(book.raised().count(), 0);
    }

    #[test]
    fn below_rules_and_missing_values_change_nothing_else() {
        let rules = vec![Rule {
            above: false,
            threshold: 200.0,
            meter: "a".into(),
            count: 1,
            ..rule(1)
        }];
        let mut book = AlarmBook::default();
        let mut no_value = reading("a", 1, 0.0);
        no_value.values[0].value = None;
        assert!(book.apply(&rules, &no_value).is_empty());
        assert!(book.apply(&rules, &reading("b", 1, 0.0)).is_empty());
        let raised = book.apply(&rules, &reading("a", 2, 199.0));
        assert_eq!(raised.len(), 1);
        assert!(book.apply(&rules, &no_value).is_empty());
        assert!(book.counter("hot", "a").raised);
        let raised: Vec<_> = book.raised().collect();
        assert_eq!(raised.len(), 1);
        assert_eq!(
            (raised[0].0, raised[0].1, raised[0].2.warnings),
            ("hot", "a", 1)
        );
    }
}
