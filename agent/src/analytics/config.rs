//! The analytics stage's config sections, `[analytics]` and `[[alarms]]`, with
//! their validation.
//!
//! The root [`crate::config::Config`] composes them; this module uses the config
//! leaf ([`crate::config::units`]) and the meters of the acquire stage's section.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acquire::config::MeterConfig;
use crate::config::units::{display_id, err, valid_id, ConfigError, HumanDuration};

/// What the analytics stage reads of the root config. The root
/// [`crate::config::Config`] implements it, so the stage need not import the root.
pub trait AnalyticsSections {
    fn gateway_id(&self) -> &str;
    fn analytics(&self) -> &AnalyticsConfig;
    fn meters(&self) -> &[MeterConfig];
    fn alarms(&self) -> &[AlarmRule];
}

/// `[analytics]`: how intervals close and when clusters are recomputed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// An interval closes once the data passes its end plus this.
    pub grace: HumanDuration,
    /// How far back late data still revises an interval.
    pub retention: HumanDuration,
    /// Longest a power sample holds; longer energy stretches are `estimated`.
    pub max_gap: HumanDuration,
    /// Recompute a meter's clusters after this many of its readings were stored.
    pub cluster_every: u64,
    /// Clusters per meter: a number, or `"auto"` (best BIC in 2..=6).
    pub clusters: crate::derive::ClusterCount,
    /// Interval tracker state is saved at least this often (and whenever an interval
    /// closes, and on shutdown).
    pub persist_every: HumanDuration,
    /// Longest window one recompute request may rebuild.
    pub max_recompute: HumanDuration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            grace: HumanDuration(Duration::from_secs(120)),
            retention: HumanDuration(Duration::from_secs(6 * 3600)),
            max_gap: HumanDuration(Duration::from_secs(15 * 60)),
            cluster_every: 1000,
            clusters: crate::derive::ClusterCount::Fixed(3),
            persist_every: HumanDuration(Duration::from_secs(300)),
            max_recompute: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

/// One `[[alarms]]` rule: `count` readings in a row beyond the threshold raise an
/// alarm; a normal reading clears it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmRule {
    /// Names the rule in events and in its saved counters; default `alarm<N>` (N =
    /// position, from 1), so give one when rules may be reordered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A meter id, or `"*"` for every meter.
    pub meter: String,
    pub quantity: String,
    /// Warning when the value is greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Warning when the value is less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// Warnings in a row that raise the alarm.
    #[serde(default = "default_alarm_count")]
    pub count: u32,
    /// The meter only pushes its readings (HTTP or MQTT) and so is not among
    /// `[[meters]]`: its id is then taken as given instead of checked against them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pushed: bool,
}

fn default_alarm_count() -> u32 {
    1
}

impl AlarmRule {
    /// The rule's id: `id`, or `alarm<position + 1>`.
    pub fn id_at(&self, index: usize) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("alarm{}", index + 1))
    }

    /// Whether the rule applies to `meter`.
    pub fn matches_meter(&self, meter: &str) -> bool {
        self.meter == "*" || self.meter == meter
    }

    /// `(threshold, true for above)`; `above` wins if both were given (validation
    /// rejects that).
    pub fn threshold(&self) -> Option<(f64, bool)> {
        match (self.above, self.below) {
            (Some(a), _) => Some((a, true)),
            (None, Some(b)) => Some((b, false)),
            (None, None) => None,
        }
    }
}

impl AnalyticsConfig {
    /// Checks the section's durations and cluster count.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        let a = self;
        if a.grace.0.is_zero() {
            errors.push(err(
                "analytics.grace",
                "must be greater than zero (late readings need time to arrive)",
            ));
        }
        if a.max_gap.0.is_zero() {
            errors.push(err("analytics.max_gap", "must be greater than zero"));
        }
        if a.retention.0 < a.grace.0 + Duration::from_secs(15 * 60) {
            errors.push(err(
                "analytics.retention",
                "must be at least analytics.grace plus 15m",
            ));
        }
        if a.cluster_every == 0 {
            errors.push(err("analytics.cluster_every", "must be at least 1"));
        }
        if let crate::derive::ClusterCount::Fixed(k) = a.clusters {
            if !(1..=12).contains(&k) {
                errors.push(err(
                    "analytics.clusters",
                    format!("{k} is outside 1..=12 (or use \"auto\")"),
                ));
            }
        }
        if a.max_recompute.0.is_zero() {
            errors.push(err("analytics.max_recompute", "must be greater than zero"));
        }
        if a.persist_every.0.is_zero() {
            errors.push(err("analytics.persist_every", "must be greater than zero"));
        }
    }
}

/// Checks the `[[alarms]]` rules against the configured meters.
pub fn validate_alarms(
    alarms: &[AlarmRule],
    meters: &[MeterConfig],
    errors: &mut Vec<ConfigError>,
) {
    let mut ids = HashSet::new();
    for (i, rule) in alarms.iter().enumerate() {
        let id = rule.id_at(i);
        let at = format!("alarms[{}]", display_id(&id, i));
        if !valid_id(&id) {
            errors.push(err(
                format!("{at}.id"),
                format!("`{id}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`"),
            ));
        } else if !ids.insert(id.clone()) {
            errors.push(err(
                format!("{at}.id"),
                format!("duplicate alarm id `{id}`"),
            ));
        }
        if rule.meter != "*" && !valid_id(&rule.meter) {
            errors.push(err(
                format!("{at}.meter"),
                format!("`{}` is neither a meter id nor \"*\"", rule.meter),
            ));
        } else if rule.meter != "*" && !rule.pushed && !meters.iter().any(|m| m.id == rule.meter) {
            errors.push(err(
                format!("{at}.meter"),
                format!(
                    "no meter with id `{}` is configured (use a meter id, \"*\", or `pushed = true` for a meter that pushes its readings)",
                    rule.meter
                ),
            ));
        }
        if rule.quantity.trim().is_empty() {
            errors.push(err(format!("{at}.quantity"), "must not be empty"));
        }
        match (rule.above, rule.below) {
            (Some(_), Some(_)) => errors.push(err(
                format!("{at}.above"),
                "give either `above` or `below`, not both",
            )),
            (None, None) => errors.push(err(
                format!("{at}.above"),
                "one of `above` or `below` is required",
            )),
            (Some(v), None) | (None, Some(v)) if !v.is_finite() => {
                let key = if rule.above.is_some() {
                    "above"
                } else {
                    "below"
                };
                errors.push(err(format!("{at}.{key}"), "must be a finite number"));
            }
            _ => {}
        }
        if rule.count == 0 {
            errors.push(err(format!("{at}.count"), "must be at least 1"));
        }
    }
}
