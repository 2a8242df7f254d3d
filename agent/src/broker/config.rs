//! The broker's config sections, `[mqtt]` and `[availability]`, with their
//! validation.
//!
//! The root [`crate::config::Config`] composes them; this module uses only the
//! config leaf ([`crate::config::units`]) and the broker itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{err, ByteSize, ConfigError, HumanDuration};

/// Bounds of `mqtt.log_segment_size` (rumqttd refuses segments below 1 KiB).
const MIN_LOG_SEGMENT: u64 = 4 << 10;
const MAX_LOG_SEGMENT: u64 = 64 << 20;
/// The log of the agent's MQTT ingest subscription, which `mqtt.log_max_bytes` must
/// leave room for (see `broker::INGEST_LOG_SEGMENT`).
const INGEST_LOG_BYTES: u64 = (super::INGEST_LOG_SEGMENT * super::INGEST_LOG_SEGMENTS) as u64;
/// Largest `mqtt.log_max_bytes`.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// Shortest broker password when the broker listens beyond loopback.
pub const MIN_PUBLIC_PASSWORD: usize = 12;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// First level of every topic.
    pub topic_prefix: String,
    /// rumqttd configuration of the embedded broker (segment sizes, connection limits).
    /// Without it, the copy of `broker-config/rumqttd.toml` built into the binary is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_config: Option<PathBuf>,
    /// Address the embedded broker listens on; overrides the broker file's listeners.
    pub listen: SocketAddr,
    /// username = password pairs; required when `listen` is not a loopback address.
    pub users: BTreeMap<String, String>,
    /// Home Assistant MQTT discovery: a retained config for every meter quantity.
    pub homeassistant_discovery: bool,
    /// First topic level of the discovery configs and of Home Assistant's
    /// `{prefix}/status` birth message.
    pub homeassistant_prefix: String,
    /// Most connections the embedded broker's listener holds at once; a connection
    /// beyond it is closed as soon as it is accepted. Below the broker file's
    /// `router.max_connections`, which must leave room for the agent's in-process link.
    pub max_connections: usize,
    /// Most bytes of retained messages (status, states, discovery configs) kept to
    /// publish again when the embedded broker is restarted after a failure.
    pub republish_max: ByteSize,
    /// Size of one segment of the broker's message log of a subscription filter
    /// (overrides the broker file's `router.max_segment_size`).
    pub log_segment_size: ByteSize,
    /// Segments kept per filter (overrides `router.max_segment_count`): a filter's log
    /// holds at most `log_segment_size × log_segment_count` of messages.
    pub log_segment_count: usize,
    /// Most bytes the logs of all filters may reach together; a subscription that
    /// needs a new filter log beyond it is refused (SUBACK failure).
    pub log_max_bytes: ByteSize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            topic_prefix: "edge".into(),
            broker_config: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            users: BTreeMap::new(),
            homeassistant_discovery: true,
            homeassistant_prefix: "homeassistant".into(),
            max_connections: 48,
            republish_max: ByteSize(4 << 20),
            log_segment_size: ByteSize(32 << 10),
            log_segment_count: 2,
            log_max_bytes: ByteSize(16 << 20),
        }
    }
}

impl MqttConfig {
    /// Checks the section's ranges, prefixes and users.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        for (field, prefix) in [
            ("mqtt.topic_prefix", &self.topic_prefix),
            ("mqtt.homeassistant_prefix", &self.homeassistant_prefix),
        ] {
            if prefix.is_empty()
                || prefix.contains(['#', '+', '\0'])
                || prefix.starts_with('/')
                || prefix.ends_with('/')
            {
                errors.push(err(
                    field,
                    format!(
                        "`{prefix}` must be non-empty, without `#`, `+`, or a leading or trailing `/`"
                    ),
                ));
            }
        }
        if !self.listen.ip().is_loopback() && self.users.is_empty() {
            errors.push(err(
                "mqtt.listen",
                format!(
                    "{} is not a loopback address and no [mqtt.users] are configured: anyone on the network could publish; add users or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        if self.max_connections == 0 {
            errors.push(err("mqtt.max_connections", "must be at least 1"));
        }
        let segment = self.log_segment_size.0;
        if !(MIN_LOG_SEGMENT..=MAX_LOG_SEGMENT).contains(&segment) {
            errors.push(err(
                "mqtt.log_segment_size",
                "must be between 4KiB and 64MiB",
            ));
        }
        if !(1..=64).contains(&self.log_segment_count) {
            errors.push(err("mqtt.log_segment_count", "must be 1..=64"));
        }
        let per_filter = segment.saturating_mul(self.log_segment_count as u64);
        if self.log_max_bytes.0 > MAX_LOG_BYTES {
            errors.push(err("mqtt.log_max_bytes", "must be at most 1GiB"));
        } else if self.log_max_bytes.0 < INGEST_LOG_BYTES.saturating_add(per_filter) {
            errors.push(err(
                "mqtt.log_max_bytes",
                "must hold the MQTT ingest log (2MiB) and one filter's log (log_segment_size × log_segment_count)",
            ));
        }
        let public = !self.listen.ip().is_loopback();
        for (user, pass) in &self.users {
            if pass.is_empty() {
                errors.push(err(
                    format!("mqtt.users.{user}"),
                    "password must not be empty",
                ));
            } else if public && pass.chars().count() < MIN_PUBLIC_PASSWORD {
                errors.push(err(
                    format!("mqtt.users.{user}"),
                    format!(
                        "password must be at least {MIN_PUBLIC_PASSWORD} characters when mqtt.listen is not a loopback address"
                    ),
                ));
            }
        }
    }
}

/// `[availability]`: when a meter's `{prefix}/{gw}/{meter}/availability` topic turns
/// `offline` (Home Assistant then shows its entities as unavailable).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AvailabilityConfig {
    /// A polled meter is offline after this many failed polls in a row.
    pub failed_polls: u32,
    /// A pushed meter is offline after no data for this long, or for three of its
    /// recent push spacings when that is longer.
    pub push_timeout: HumanDuration,
}

impl Default for AvailabilityConfig {
    fn default() -> Self {
        AvailabilityConfig {
            failed_polls: 3,
            push_timeout: HumanDuration(Duration::from_secs(300)),
        }
    }
}

impl AvailabilityConfig {
    /// Checks the section's timeout.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.push_timeout.0.is_zero() {
            errors.push(err(
                "availability.push_timeout",
                "must be greater than zero",
            ));
        }
    }
}
