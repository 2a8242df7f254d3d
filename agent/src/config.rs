//! Configuration: one TOML file, parsed strictly and validated with the field named.
//!
//! Parsing rejects unknown keys (serde `deny_unknown_fields`); [`Config::validate`]
//! checks what serde cannot: ranges, references between sections and duplicates.
//! Every error names the offending field as a path such as `meters[main].unit_id`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod schema;
pub mod units;

pub(crate) use units::cut;
use units::{bounded, display_id, err, valid_id};
pub use units::{ByteSize, ConfigError, ConfigErrors, HumanDuration};

use crate::acquire::config as acquire;
pub use crate::acquire::config::{
    validate_registers, BusConfig, BusType, DataType, MeterConfig, Parity, ProfileConfig,
    RegisterConfig, RegisterTable, Transport, WordOrder,
};

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's id: the `{gw}` in every topic and in each record upstream.
    pub gateway_id: String,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub buses: Vec<BusConfig>,
    #[serde(default)]
    pub meters: Vec<MeterConfig>,
    /// User-defined register maps, by profile name.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// Upstream broker the store's records are forwarded to; absent = no forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<crate::sync::UpstreamConfig>,
    /// 15-minute intervals and cluster statistics.
    #[serde(default)]
    pub analytics: AnalyticsConfig,
    /// Threshold alarms.
    #[serde(default)]
    pub alarms: Vec<AlarmRule>,
    /// When a meter's availability topic says `offline`.
    #[serde(default)]
    pub availability: AvailabilityConfig,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// sled's page cache. sled's memory is not bounded by this, but it is the main knob.
    pub cache_capacity: ByteSize,
    /// The longest a record waits to be appended to the journal with others.
    pub flush_interval: HumanDuration,
    /// Group commit: flush early once this many records are pending.
    pub max_batch: usize,
    /// Upper bound for the store's files on disk. Enforced on the live data, which
    /// gets `(quota - 8MiB) / 2` (sled's files run up to about twice the live data);
    /// when it is reached the oldest records are deleted, acknowledged ones first,
    /// unacknowledged ones counted as dropped.
    pub quota: ByteSize,
    /// Free space the store leaves on its filesystem: with less, commits are refused
    /// (disk full) and readings wait in memory until space returns.
    pub min_free_space: ByteSize,
    /// Most readings (and other records) held in memory while the store cannot
    /// write; beyond it the oldest are dropped and counted.
    pub hold_readings: usize,
    /// Compress the store's pages on disk (zstd): several times less disk space and
    /// fewer bytes written per reading (SD-card wear). Fixed when a store is created:
    /// an existing store keeps the setting it was created with.
    pub compress: bool,
    /// The journal is synced (fdatasync) at least this often: a power cut loses at
    /// most this much of the polled readings. Pushes and the upstream never wait
    /// for it (they ask for a sync of their own).
    pub sync_interval: HumanDuration,
    /// Directory of the journal's segment files; empty: `journal` inside `path`.
    pub journal_dir: PathBuf,
    /// Bytes of each preallocated journal segment.
    pub journal_segment_size: ByteSize,
    /// Number of journal segments (at least 2).
    pub journal_segments: usize,
    /// Sync at once when the upstream waits for records that wait for their sync
    /// (lag: the sync's latency); otherwise they go with the next periodic sync (lag
    /// up to `sync_interval`, fewer syncs and bytes written).
    pub upstream_sync_now: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/edge-agent/store"),
            cache_capacity: ByteSize(8 << 20),
            flush_interval: HumanDuration(Duration::from_millis(10)),
            max_batch: 1000,
            quota: ByteSize(1 << 30),
            min_free_space: ByteSize(32 << 20),
            hold_readings: 10_000,
            compress: true,
            sync_interval: HumanDuration(Duration::from_secs(1)),
            journal_dir: PathBuf::new(),
            journal_segment_size: ByteSize(1 << 20),
            journal_segments: 4,
            upstream_sync_now: false,
        }
    }
}

impl StoreConfig {
    /// Where the journal's segments are.
    pub fn journal_path(&self) -> PathBuf {
        if self.journal_dir.as_os_str().is_empty() {
            self.path.join("journal")
        } else {
            self.journal_dir.clone()
        }
    }
}

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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `edge_agent=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// The local HTTP interface (status page, JSON API, metrics).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Bearer token: required for every write, and for everything when `listen` is not
    /// a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Host names accepted in the `Host` header besides localhost and the address the
    /// request came in on (requests for other names are refused: DNS rebinding).
    pub hostnames: Vec<String>,
    /// Largest request body accepted.
    pub max_body: ByteSize,
    /// Longest a client may take to send a request's line and headers, from its
    /// first byte.
    pub header_timeout: HumanDuration,
    /// Longest a client may take to send a request's body, from the end of its head.
    pub body_timeout: HumanDuration,
    /// A connection without a request under way (before the first, between
    /// keep-alive requests), or whose answer the client stops reading, is closed after
    /// this long.
    pub idle_timeout: HumanDuration,
    /// Open HTTP connections at most; a new one beyond it closes the connection idle
    /// the longest (or is closed itself when every one is busy).
    pub max_connections: usize,
    /// Store queries (readings, series, energy, forecast, top) running at once at
    /// most; others wait up to `heavy_query_wait`, then get 503 with `Retry-After`.
    pub max_heavy_queries: usize,
    /// How long a store query waits for its turn before it is refused.
    pub heavy_query_wait: HumanDuration,
    /// Largest answer of `GET .../readings`: a longer one stops early with
    /// `truncated` and `next_start`.
    pub max_answer: ByteSize,
    /// Push-ingest requests (`POST /api/v1/ingest`) whose bodies are read and parsed
    /// at once; others wait up to `heavy_query_wait` before their body is read, then
    /// get 503 with `Retry-After`.
    pub max_ingest_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            hostnames: Vec::new(),
            max_body: ByteSize(1 << 20),
            header_timeout: HumanDuration(Duration::from_secs(10)),
            body_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_connections: 256,
            max_heavy_queries: 2,
            heavy_query_wait: HumanDuration(Duration::from_secs(2)),
            max_answer: ByteSize(4 << 20),
            max_ingest_requests: 4,
        }
    }
}

/// Bounds of `mqtt.log_segment_size` (rumqttd refuses segments below 1 KiB).
const MIN_LOG_SEGMENT: u64 = 4 << 10;
const MAX_LOG_SEGMENT: u64 = 64 << 20;
/// The log of the agent's MQTT ingest subscription, which `mqtt.log_max_bytes` must
/// leave room for (see `broker::INGEST_LOG_SEGMENT`).
const INGEST_LOG_BYTES: u64 =
    (crate::broker::INGEST_LOG_SEGMENT * crate::broker::INGEST_LOG_SEGMENTS) as u64;
/// Largest `mqtt.log_max_bytes`.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// Largest `store.cache_capacity`: sled holds its cache in memory.
pub const MAX_CACHE_CAPACITY: u64 = 1 << 30;
/// Largest `store.quota`.
pub const MAX_QUOTA: u64 = 16 << 40;
/// Largest `store.min_free_space`.
pub const MAX_MIN_FREE_SPACE: u64 = 1 << 40;
/// Shortest broker password when the broker listens beyond loopback.
pub const MIN_PUBLIC_PASSWORD: usize = 12;

impl Config {
    /// Parses TOML text; unknown keys and type errors come back with their location.
    ///
    /// The file is first checked key by key (see `schema`): every unknown key, wrong
    /// type and out-of-range number is named, not only the first; the rules across
    /// fields ([`Config::validate`]) are then checked on what is left, so one pass
    /// reports as much as it can.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let syntax = |e: toml::de::Error| {
            let field = e
                .span()
                .map(|s| field_at(text, s.start))
                .unwrap_or_default();
            // Some syntax errors (a control character in a comment) come without a
            // message; the error's full text still says what and where.
            let reason = match e.message().trim() {
                "" => {
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or("").trim();
                    format!("not valid TOML ({first})")
                }
                m => m.to_string(),
            };
            bounded(vec![err(field, reason)])
        };
        let mut table: toml::Table = toml::from_str(text).map_err(syntax)?;
        let (mut errors, dropped) = schema::check(&mut table);
        if errors.is_empty() {
            return toml::from_str::<Config>(text).map_err(syntax);
        }
        if let Ok(rest) = Config::deserialize(toml::Value::Table(table)) {
            if let Err(more) = rest.validate() {
                for e in more.0 {
                    // A reference to an entry left out (already named) is no error
                    // of its own.
                    let left_out = dropped
                        .iter()
                        .any(|id| e.reason.contains(&format!("`{id}`")));
                    if !left_out && !errors.iter().any(|known| known.field == e.field) {
                        errors.push(e);
                    }
                }
            }
        }
        Err(bounded(errors))
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![err(
                "",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        let config = Config::from_toml(&text)?;
        config.validate()?;
        config.check_files()?;
        Ok(config)
    }

    /// Checks what the configuration names outside itself: the upstream TLS files
    /// exist and the embedded broker's settings file loads (read with a size cap).
    /// `load` and `run` call it before anything is created.
    pub fn check_files(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if let Some(tls) = self.upstream.as_ref().and_then(|u| u.tls.as_ref()) {
            let files = [
                ("upstream.tls.ca_file", Some(&tls.ca_file)),
                ("upstream.tls.client_cert", tls.client_cert.as_ref()),
                ("upstream.tls.client_key", tls.client_key.as_ref()),
            ];
            for (field, path) in files {
                let Some(path) = path else { continue };
                if !path.is_file() {
                    errors.push(err(
                        field,
                        format!("{} does not exist or is not a file", path.display()),
                    ));
                }
            }
        }
        if let Err(e) = crate::broker::check_settings(&self.mqtt) {
            errors.push(err("mqtt.broker_config", e.to_string()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(bounded(errors))
        }
    }

    /// Checks every rule that serde cannot express. Returns all problems found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if !valid_id(&self.gateway_id) {
            errors.push(err(
                "gateway_id",
                format!("`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_` (it is part of every MQTT topic)", self.gateway_id),
            ));
        }
        self.validate_store(&mut errors);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(err(
                "log.level",
                format!(
                    "`{}` is not a log filter like `info` or `edge_agent=debug,warn`: {e}",
                    crate::ingest::clip(&self.log.level)
                ),
            ));
        }
        self.validate_mqtt(&mut errors);
        self.validate_http(&mut errors);
        acquire::validate_buses(&self.buses, &mut errors);
        acquire::validate_profiles(&self.profiles, &mut errors);
        acquire::validate_meters(&self.meters, &self.buses, &self.profiles, &mut errors);
        if let Some(upstream) = &self.upstream {
            upstream.validate(&mut errors);
        }
        self.validate_analytics(&mut errors);
        self.validate_alarms(&mut errors);
        if self.availability.push_timeout.0.is_zero() {
            errors.push(err(
                "availability.push_timeout",
                "must be greater than zero",
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(bounded(errors))
        }
    }

    fn validate_store(&self, errors: &mut Vec<ConfigError>) {
        if self.store.flush_interval.0.is_zero() {
            errors.push(err("store.flush_interval", "must be greater than zero"));
        }
        let sync = self.store.sync_interval.0;
        if sync.is_zero() || sync > Duration::from_secs(60) {
            errors.push(err("store.sync_interval", "must be between 1ms and 60s"));
        }
        if !(64 << 10..=1 << 30).contains(&self.store.journal_segment_size.0) {
            errors.push(err(
                "store.journal_segment_size",
                "must be between 64KiB and 1GiB",
            ));
        }
        if !(2..=64).contains(&self.store.journal_segments) {
            errors.push(err("store.journal_segments", "must be between 2 and 64"));
        }
        if self.store.max_batch == 0 {
            errors.push(err("store.max_batch", "must be at least 1"));
        }
        if self.store.cache_capacity.0 < (1 << 20) {
            errors.push(err("store.cache_capacity", "must be at least 1MiB"));
        } else if self.store.cache_capacity.0 > MAX_CACHE_CAPACITY {
            errors.push(err(
                "store.cache_capacity",
                "must be at most 1GiB (it is held in memory)",
            ));
        }
        if self.store.quota.0 < (16 << 20) {
            errors.push(err(
                "store.quota",
                "must be at least 16MiB (8MiB of it is room for sled's segments)",
            ));
        } else if self.store.quota.0 > MAX_QUOTA {
            errors.push(err("store.quota", "must be at most 16TiB"));
        }
        if self.store.min_free_space.0 < (2 << 20) {
            errors.push(err(
                "store.min_free_space",
                "must be at least 2MiB (sled allocates its file in 512KiB segments)",
            ));
        } else if self.store.min_free_space.0 > MAX_MIN_FREE_SPACE {
            errors.push(err("store.min_free_space", "must be at most 1TiB"));
        }
        if self.store.hold_readings == 0 {
            errors.push(err("store.hold_readings", "must be at least 1"));
        }
        if self.store.path.as_os_str().is_empty() {
            errors.push(err("store.path", "must not be empty"));
        }
    }

    fn validate_mqtt(&self, errors: &mut Vec<ConfigError>) {
        for (field, prefix) in [
            ("mqtt.topic_prefix", &self.mqtt.topic_prefix),
            ("mqtt.homeassistant_prefix", &self.mqtt.homeassistant_prefix),
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
        if !self.mqtt.listen.ip().is_loopback() && self.mqtt.users.is_empty() {
            errors.push(err(
                "mqtt.listen",
                format!(
                    "{} is not a loopback address and no [mqtt.users] are configured: anyone on the network could publish; add users or listen on 127.0.0.1",
                    self.mqtt.listen
                ),
            ));
        }
        if self.mqtt.max_connections == 0 {
            errors.push(err("mqtt.max_connections", "must be at least 1"));
        }
        let segment = self.mqtt.log_segment_size.0;
        if !(MIN_LOG_SEGMENT..=MAX_LOG_SEGMENT).contains(&segment) {
            errors.push(err(
                "mqtt.log_segment_size",
                "must be between 4KiB and 64MiB",
            ));
        }
        if !(1..=64).contains(&self.mqtt.log_segment_count) {
            errors.push(err("mqtt.log_segment_count", "must be 1..=64"));
        }
        let per_filter = segment.saturating_mul(self.mqtt.log_segment_count as u64);
        if self.mqtt.log_max_bytes.0 > MAX_LOG_BYTES {
            errors.push(err("mqtt.log_max_bytes", "must be at most 1GiB"));
        } else if self.mqtt.log_max_bytes.0 < INGEST_LOG_BYTES.saturating_add(per_filter) {
            errors.push(err(
                "mqtt.log_max_bytes",
                "must hold the MQTT ingest log (2MiB) and one filter's log (log_segment_size × log_segment_count)",
            ));
        }
        let public = !self.mqtt.listen.ip().is_loopback();
        for (user, pass) in &self.mqtt.users {
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

    fn validate_http(&self, errors: &mut Vec<ConfigError>) {
        let http = &self.http;
        match &http.token {
            None if !http.listen.ip().is_loopback() => errors.push(err(
                "http.listen",
                format!(
                    "{} is not a loopback address and no http.token is configured: anyone on the network could read and write; set a token or listen on 127.0.0.1",
                    http.listen
                ),
            )),
            Some(t) if t.len() < 16 || t.chars().any(|c| !c.is_ascii_graphic()) => errors.push(
                err("http.token", "must be at least 16 printable ASCII characters without spaces"),
            ),
            _ => {}
        }
        for (i, name) in http.hostnames.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                errors.push(err(
                    format!("http.hostnames[{i}]"),
                    format!("`{name}` is not a host name (letters, digits, `-`, `.`; no port)"),
                ));
            }
        }
        if http.max_body.0 < 1024 || http.max_body.0 > (256 << 20) {
            errors.push(err("http.max_body", "must be between 1KiB and 256MiB"));
        }
        for (key, value, max) in [
            ("http.header_timeout", http.header_timeout.0, 3600),
            ("http.body_timeout", http.body_timeout.0, 3600),
            ("http.idle_timeout", http.idle_timeout.0, 86_400),
            ("http.heavy_query_wait", http.heavy_query_wait.0, 60),
        ] {
            let ok = value >= Duration::from_millis(10) && value <= Duration::from_secs(max);
            if !ok {
                errors.push(err(key, format!("must be between 10ms and {max}s")));
            }
        }
        if !(1..=65_536).contains(&http.max_connections) {
            errors.push(err("http.max_connections", "must be between 1 and 65536"));
        }
        if !(1..=64).contains(&http.max_heavy_queries) {
            errors.push(err("http.max_heavy_queries", "must be between 1 and 64"));
        }
        if !(1..=64).contains(&http.max_ingest_requests) {
            errors.push(err("http.max_ingest_requests", "must be between 1 and 64"));
        }
        if http.max_answer.0 < (64 << 10) || http.max_answer.0 > (256 << 20) {
            errors.push(err("http.max_answer", "must be between 64KiB and 256MiB"));
        }
    }
}

impl Config {
    fn validate_analytics(&self, errors: &mut Vec<ConfigError>) {
        let a = &self.analytics;
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

    fn validate_alarms(&self, errors: &mut Vec<ConfigError>) {
        let mut ids = HashSet::new();
        for (i, rule) in self.alarms.iter().enumerate() {
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
            } else if rule.meter != "*"
                && !rule.pushed
                && !self.meters.iter().any(|m| m.id == rule.meter)
            {
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
}

/// Best-effort dotted path of the TOML key at a byte offset, for parse errors.
fn field_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    for line in before.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let mut field = String::new();
    if !table.is_empty() {
        field.push_str(&table);
    }
    if !key.is_empty() && !key.starts_with('[') {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(key);
    }
    format!("line {line_no}: {field}")
}

/// A complete, commented default configuration, printed by `generate-config`.
pub const DEFAULT_CONFIG: &str = include_str!("../default-config.toml");

#[cfg(test)]
mod tests {
    #[test]
    fn a_syntax_error_without_a_message_still_has_a_reason() {
        // Found by the `config` fuzz target: a control character in a comment.
        let e = Config::from_toml("#\x0b").expect_err("not TOML");
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].reason.starts_with("not valid TOML ("), "{e}");
    }

    use super::*;

    fn base() -> String {
        r#"
gateway_id = "gw1"
[store]
path = "/tmp/x"
[[buses]]
id = "rs485"
type = "rtu"
port = "/dev/ttyUSB0"
[[buses]]
id = "lan"
type = "tcp"
address = "127.0.0.1:502"
[[meters]]
id = "main"
bus = "rs485"
unit_id = 1
profile = "sdm630"
interval = "5s"
"#
        .to_string()
    }

    fn errors_of(text: &str) -> Vec<ConfigError> {
        match Config::from_toml(text) {
            Err(e) => e.0,
            Ok(c) => c.validate().err().map(|e| e.0).unwrap_or_default(),
        }
    }

    fn assert_rejected(text: &str, field_part: &str, reason_part: &str) {
        let errors = errors_of(text);
        assert!(
            errors
                .iter()
                .any(|e| e.field.contains(field_part) && e.reason.contains(reason_part)),
            "expected an error on `{field_part}` with `{reason_part}`, got {errors:?}"
        );
    }

    #[test]
    fn meter_names_and_availability_are_checked_by_field() {
        let named = base().replace(
            "interval = \"5s\"",
            "interval = \"5s\"\nname = \"Main meter\"",
        );
        assert_eq!(errors_of(&named), vec![]);
        let blank = base().replace("interval = \"5s\"", "interval = \"5s\"\nname = \"  \"");
        assert_rejected(&blank, "meters[main].name", "1-64 characters");
        let zero = format!("{}\n[availability]\npush_timeout = \"0s\"\n", base());
        assert_rejected(&zero, "availability.push_timeout", "greater than zero");
        let polls = format!("{}\n[availability]\nfailed_polls = 0\n", base());
        assert_rejected(&polls, "availability.failed_polls", "");
    }

    #[test]
    fn base_config_is_valid() {
        assert_eq!(errors_of(&base()), vec![]);
    }

    #[test]
    fn default_config_is_complete_and_valid() {
        let c = Config::from_toml(DEFAULT_CONFIG).expect("default config parses");
        c.validate().expect("default config is valid");
        assert!(!c.meters.is_empty() && !c.buses.is_empty() && !c.profiles.is_empty());
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_rejected(
            &format!("{}\nbogus = 1\n", base()),
            "",
            "unknown field `bogus`",
        );
        let text = base().replace("interval = \"5s\"", "interval = \"5s\"\npoll_rate = 3");
        assert_rejected(&text, "meters", "unknown field `poll_rate`");
        let text = base().replace("path = \"/tmp/x\"", "path = \"/tmp/x\"\ncache = 1");
        assert_rejected(&text, "store", "unknown field `cache`");
    }

    #[test]
    fn duplicate_meter_ids_are_rejected() {
        let text = format!(
            "{}\n[[meters]]\nid = \"main\"\nbus = \"lan\"\nunit_id = 2\nprofile = \"sdm120\"\n",
            base()
        );
        assert_rejected(&text, "meters[main].id", "duplicate meter id");
    }

    #[test]
    fn unit_id_outside_range_is_rejected() {
        for bad in ["0", "248", "255"] {
            let text = base().replace("unit_id = 1", &format!("unit_id = {bad}"));
            assert_rejected(&text, "meters[main].unit_id", "outside 1..=247");
        }
        let text = base().replace("unit_id = 1", "unit_id = 300");
        assert_rejected(&text, "", "");
        assert!(!errors_of(&text).is_empty());
    }

    #[test]
    fn zero_and_negative_intervals_are_rejected() {
        let text = base().replace("interval = \"5s\"", "interval = \"0s\"");
        assert_rejected(&text, "meters[main].interval", "greater than zero");
        let text = base().replace("interval = \"5s\"", "interval = \"-5s\"");
        assert_rejected(&text, "meters", "negative");
        let text = base().replace(
            "path = \"/tmp/x\"",
            "path = \"/tmp/x\"\nflush_interval = \"0ms\"",
        );
        assert_rejected(&text, "store.flush_interval", "greater than zero");
        let text = base().replace("interval = \"5s\"", "interval = \"soon\"");
        assert_rejected(&text, "meters", "not a duration");
    }

    #[test]
    fn store_quota_reserve_and_hold_bounds_are_named() {
        let with = |extra: &str| {
            base().replace("path = \"/tmp/x\"", &format!("path = \"/tmp/x\"\n{extra}"))
        };
        assert_rejected(&with("quota = \"8MiB\""), "store.quota", "at least 16MiB");
        assert_rejected(
            &with("min_free_space = \"1MiB\""),
            "store.min_free_space",
            "at least 2MiB",
        );
        assert_rejected(
            &with("hold_readings = 0"),
            "store.hold_readings",
            "at least 1",
        );
        let ok = with("quota = \"16MiB\"\nmin_free_space = \"2MiB\"\nhold_readings = 1");
        assert_eq!(errors_of(&ok), vec![]);
    }

    #[test]
    fn two_buses_on_one_serial_port_are_rejected() {
        let text = format!(
            "{}\n[[buses]]\nid = \"second\"\ntype = \"rtu\"\nport = \"/dev/ttyUSB0\"\n",
            base()
        );
        assert_rejected(&text, "buses[second].port", "already used by bus `rs485`");
    }

    #[test]
    fn meter_on_missing_bus_is_rejected() {
        let text = base().replace("bus = \"rs485\"", "bus = \"nowhere\"");
        assert_rejected(&text, "meters[main].bus", "no bus with id `nowhere`");
    }

    #[test]
    fn public_listener_without_auth_is_rejected() {
        let text = format!("{}\n[mqtt]\nlisten = \"0.0.0.0:1883\"\n", base());
        assert_rejected(&text, "mqtt.listen", "not a loopback address");
        let ok = format!(
            "{}\n[mqtt]\nlisten = \"0.0.0.0:1883\"\n[mqtt.users]\nhass = \"long-enough-secret\"\n",
            base()
        );
        assert_eq!(errors_of(&ok), vec![]);
    }

    #[test]
    fn homeassistant_discovery_keys_are_checked() {
        let c = Config::from_toml(&base()).expect("parses");
        assert!(c.mqtt.homeassistant_discovery);
        assert_eq!(c.mqtt.homeassistant_prefix, "homeassistant");
        let off = format!("{}\n[mqtt]\nhomeassistant_discovery = false\n", base());
        assert_eq!(errors_of(&off), vec![]);
        assert!(
            !Config::from_toml(&off)
                .expect("parses")
                .mqtt
                .homeassistant_discovery
        );
        for bad in ["", "ha/", "/ha", "ha/#", "h+a"] {
            let text = format!("{}\n[mqtt]\nhomeassistant_prefix = \"{bad}\"\n", base());
            assert_rejected(&text, "mqtt.homeassistant_prefix", "must be non-empty");
        }
        let text = format!("{}\n[mqtt]\nhomeassistant_discovery = \"yes\"\n", base());
        assert_rejected(&text, "mqtt.homeassistant_discovery", "true or false");
    }

    #[test]
    fn public_http_listener_needs_a_token() {
        let text = format!("{}\n[http]\nlisten = \"0.0.0.0:8080\"\n", base());
        assert_rejected(&text, "http.listen", "not a loopback address");
        let ok = format!(
            "{}\n[http]\nlisten = \"0.0.0.0:8080\"\ntoken = \"0123456789abcdef\"\n",
            base()
        );
        assert_eq!(errors_of(&ok), vec![]);
        let short = format!("{}\n[http]\ntoken = \"short\"\n", base());
        assert_rejected(&short, "http.token", "at least 16");
        let names = format!(
            "{}\n[http]\nhostnames = [\"gw.local\", \"evil.com:80\"]\n",
            base()
        );
        assert_rejected(&names, "http.hostnames[1]", "not a host name");
        assert_eq!(errors_of(&names).len(), 1, "gw.local is fine");
        let body = format!("{}\n[http]\nmax_body = 10\n", base());
        assert_rejected(&body, "http.max_body", "between 1KiB");
        let c = Config::from_toml(&base()).expect("parses");
        assert_eq!(c.http.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.http.max_body, ByteSize(1 << 20));
        assert_eq!(c.http.max_connections, 256);
        assert_eq!(c.http.header_timeout.0, Duration::from_secs(10));
        let caps = format!(
            "{}\n[http]\nmax_connections = 0\nidle_timeout = \"0s\"\nmax_heavy_queries = 0\nmax_answer = \"1KiB\"\n",
            base()
        );
        assert_rejected(&caps, "http.max_connections", "outside 1..=65536");
        assert_rejected(&caps, "http.idle_timeout", "between 10ms");
        assert_rejected(&caps, "http.max_heavy_queries", "outside 1..=64");
        assert_rejected(&caps, "http.max_answer", "between 64KiB");
    }

    #[test]
    fn unknown_profile_and_bad_registers_are_named() {
        let text = base().replace("profile = \"sdm630\"", "profile = \"nope\"");
        assert_rejected(&text, "meters[main].profile", "unknown profile `nope`");
        let text = format!(
            "{}\n[profiles.pump]\nregisters = [{{ name = \"p\", address = 0, type = \"f32\", unit = \"W\", kind = \"power\", scale = 0.0 }}]\n",
            base()
        );
        assert_rejected(&text, "profiles.pump.registers[0].scale", "non-zero");
    }

    #[test]
    fn analytics_and_alarm_mistakes_are_named() {
        let ok = format!(
            "{}\n[analytics]\nclusters = \"auto\"\ngrace = \"1m\"\n[[alarms]]\nid = \"hot\"\nmeter = \"*\"\nquantity = \"power\"\nabove = 5000\ncount = 3\n",
            base()
        );
        assert_eq!(errors_of(&ok), vec![]);
        let c = Config::from_toml(&ok).unwrap();
        assert_eq!(c.analytics.clusters, crate::derive::ClusterCount::Auto);
        assert_eq!(c.alarms[0].threshold(), Some((5000.0, true)));
        let rule = |body: &str| format!("{}\n[[alarms]]\n{body}\n", base());
        assert_rejected(
            &rule("meter = \"main\"\nquantity = \"power\"\nabove = 1\ncount = 0"),
            "alarms[alarm1].count",
            "at least 1",
        );
        assert_rejected(
            &rule("meter = \"main\"\nquantity = \"power\""),
            "alarms[alarm1].above",
            "required",
        );
        assert_rejected(
            &rule("meter = \"main\"\nquantity = \"power\"\nabove = 1\nbelow = 0"),
            "alarms[alarm1].above",
            "not both",
        );
        assert_rejected(
            &rule("meter = \"a b\"\nquantity = \"power\"\nbelow = 1"),
            "alarms[alarm1].meter",
            "neither",
        );
        assert_rejected(
            &format!("{}\n[analytics]\nretention = \"5m\"\n", base()),
            "analytics.retention",
            "at least",
        );
        assert_rejected(
            &format!("{}\n[analytics]\ncluster_every = 0\n", base()),
            "analytics.cluster_every",
            "at least 1",
        );
    }

    #[test]
    fn sizes_beyond_u64_or_the_machine_are_named() {
        assert!(ByteSize::parse("99999PiB")
            .unwrap_err()
            .contains("beyond the largest size"));
        assert!(ByteSize::parse("99999999999999999999")
            .unwrap_err()
            .contains("beyond"));
        assert_eq!(ByteSize::parse("2TiB"), Ok(ByteSize(2 << 40)));
        let with = |extra: &str| {
            base().replace("path = \"/tmp/x\"", &format!("path = \"/tmp/x\"\n{extra}"))
        };
        assert_rejected(
            &with("cache_capacity = \"99999PiB\""),
            "store.cache_capacity",
            "beyond the largest size",
        );
        assert_rejected(
            &with("cache_capacity = \"2GiB\""),
            "store.cache_capacity",
            "at most 1GiB",
        );
        assert_rejected(&with("quota = \"1PiB\""), "store.quota", "at most 16TiB");
        assert_rejected(
            &with("min_free_space = \"2TiB\""),
            "store.min_free_space",
            "at most 1TiB",
        );
        let body = format!("{}\n[http]\nmax_body = \"1PiB\"\n", base());
        assert_rejected(&body, "http.max_body", "between 1KiB and 256MiB");
    }

    #[test]
    fn a_log_level_that_is_no_filter_is_named() {
        let text = format!("{}\n[log]\nlevel = \"edge_agent=loud\"\n", base());
        assert_rejected(&text, "log.level", "is not a log filter");
        for ok in ["info", "edge_agent=debug,warn"] {
            let text = format!("{}\n[log]\nlevel = \"{ok}\"\n", base());
            assert_eq!(errors_of(&text), vec![], "{ok}");
        }
    }

    #[test]
    fn an_energy_quantity_the_profile_lacks_is_named() {
        let text = base().replace(
            "interval = \"5s\"",
            "interval = \"5s\"\nenergy_quantity = \"energy_bogus\"",
        );
        assert_rejected(
            &text,
            "meters[main].energy_quantity",
            "not a quantity of profile `sdm630`",
        );
        let ok = base().replace(
            "interval = \"5s\"",
            "interval = \"5s\"\nenergy_quantity = \"energy_import\"",
        );
        assert_eq!(errors_of(&ok), vec![]);
    }

    #[test]
    fn an_alarm_on_a_meter_that_does_not_exist_is_named() {
        let text = format!(
            "{}\n[[alarms]]\nmeter = \"nowhere\"\nquantity = \"power\"\nabove = 1\n",
            base()
        );
        assert_rejected(
            &text,
            "alarms[alarm1].meter",
            "no meter with id `nowhere` is configured",
        );
        // A meter that only pushes its readings is named as such, and taken as given.
        let pushed = format!("{text}pushed = true\n");
        let config = Config::from_toml(&pushed).expect("an alarm on a pushed meter is valid");
        assert!(config.alarms[0].pushed);
    }

    #[test]
    fn a_zero_analytics_grace_is_named() {
        let text = format!("{}\n[analytics]\ngrace = \"0s\"\n", base());
        assert_rejected(&text, "analytics.grace", "greater than zero");
    }

    #[test]
    fn missing_tls_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").expect("write ca");
        let text = format!(
            "{}\n[upstream]\nhost = \"b\"\n[upstream.tls]\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            base(),
            dir.path().join("nope-ca.pem").display(),
            dir.path().join("nope-cert.pem").display(),
            dir.path().join("nope-key.pem").display(),
        );
        let config = Config::from_toml(&text).expect("parses");
        config.validate().expect("valid apart from the files");
        let errors = config.check_files().expect_err("files missing").0;
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "upstream.tls.ca_file",
                "upstream.tls.client_cert",
                "upstream.tls.client_key"
            ]
        );
        assert!(errors[0].reason.contains("does not exist"), "{errors:?}");
        let ok = text
            .replace(
                &dir.path().join("nope-ca.pem").display().to_string(),
                &ca.display().to_string(),
            )
            .replace(
                &dir.path().join("nope-cert.pem").display().to_string(),
                &ca.display().to_string(),
            )
            .replace(
                &dir.path().join("nope-key.pem").display().to_string(),
                &ca.display().to_string(),
            );
        Config::from_toml(&ok)
            .expect("parses")
            .check_files()
            .expect("files exist");
    }

    #[test]
    fn a_broker_file_that_is_too_large_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let big = dir.path().join("rumqttd.toml");
        std::fs::write(&big, "#".repeat(65 << 10)).expect("write");
        let text = format!(
            "{}\n[mqtt]\nbroker_config = \"{}\"\n",
            base(),
            big.display()
        );
        let errors = Config::from_toml(&text)
            .expect("parses")
            .check_files()
            .expect_err("too large")
            .0;
        assert_eq!(errors[0].field, "mqtt.broker_config");
        assert!(
            errors[0].reason.contains("larger than 64 KiB"),
            "{errors:?}"
        );
    }

    #[test]
    fn short_broker_passwords_on_a_public_listener_are_named() {
        let with = |listen: &str, pass: &str| {
            format!(
                "{}\n[mqtt]\nlisten = \"{listen}\"\n[mqtt.users]\nhass = \"{pass}\"\n",
                base()
            )
        };
        assert_rejected(
            &with("0.0.0.0:1883", "secret"),
            "mqtt.users.hass",
            "at least 12 characters",
        );
        assert_rejected(&with("0.0.0.0:1883", ""), "mqtt.users.hass", "not be empty");
        assert_eq!(errors_of(&with("0.0.0.0:1883", "twelve-chars")), vec![]);
        // On loopback only an empty password is refused.
        assert_eq!(errors_of(&with("127.0.0.1:1883", "secret")), vec![]);
    }

    #[test]
    fn register_errors_name_the_register_and_its_key() {
        let text = format!(
            "{}\n[profiles.inverter]\nregisters = [\n  {{ name = \"p\", address = 0, type = \"f32\", unit = \"W\", kind = \"power\" }},\n  {{ name = \"e\", address = 2, type = \"f33\", unit = \"kWh\", kind = \"energy_total\" }},\n  {{ name = \"q\", address = 70000, type = \"u16\", unit = \"W\", kind = \"watts\" }},\n]\n",
            base()
        );
        assert_rejected(
            &text,
            "profiles.inverter.registers[1].type",
            "not one of u16",
        );
        assert_rejected(
            &text,
            "profiles.inverter.registers[2].address",
            "outside 0..=65535",
        );
        assert_rejected(
            &text,
            "profiles.inverter.registers[2].kind",
            "must be one of power",
        );
    }

    #[test]
    fn a_file_with_several_errors_names_every_one_with_its_rule() {
        let text = format!(
            "{}\n[[meters]]\nid = \"sub\"\nbus = \"lan\"\nunit_id = 300\nprofile = \"sdm120\"\nsurprise = 1\n\
[log]\nlevel = \"a=b=c\"\n[http]\nlisten = \"nowhere\"\nmax_body = \"5XB\"\n[analytics]\ngrace = \"0s\"\n",
            base().replace("gateway_id = \"gw1\"", "gateway_id = \"g w\"")
        );
        let errors = errors_of(&text);
        let has = |field: &str, reason: &str| {
            errors
                .iter()
                .any(|e| e.field == field && e.reason.contains(reason))
        };
        for (field, reason) in [
            ("meters[sub].unit_id", "300 is outside 1..=247"),
            ("meters[sub].surprise", "unknown field `surprise`"),
            ("http.listen", "not an address"),
            ("http.max_body", "unknown size unit"),
            ("gateway_id", "must be 1-64 characters"),
            ("log.level", "not a log filter"),
            ("analytics.grace", "greater than zero"),
        ] {
            assert!(
                has(field, reason),
                "no `{field}`: `{reason}` in {errors:#?}"
            );
        }
        assert!(
            errors.iter().all(|e| !e.reason.contains("expected u8")),
            "rules in words: {errors:#?}"
        );
        // An alarm on the meter with the bad unit id is not reported as well.
        let text =
            format!("{text}\n[[alarms]]\nmeter = \"sub\"\nquantity = \"power\"\nabove = 1\n");
        let errors = errors_of(&text);
        assert!(
            errors.iter().all(|e| !e.field.starts_with("alarms")),
            "{errors:#?}"
        );
        assert!(errors.iter().any(|e| e.field == "meters[sub].unit_id"));
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("512 KB"), Ok(ByteSize(512_000)));
        assert_eq!(ByteSize::parse("1024"), Ok(ByteSize(1024)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        let text = base().replace("interval = \"5s\"", "interval = \"15m\"");
        let c = Config::from_toml(&text).expect("parses");
        assert_eq!(c.meters[0].interval.0, Duration::from_secs(900));
    }
}

#[cfg(test)]
mod generated {
    //! Random mutations of the default configuration: swapped types, numbers out of
    //! range, unknown keys, huge strings. Loading never panics, and a rejected file
    //! names a field with each error (bounded text).

    use proptest::prelude::*;

    use super::*;

    /// `key = value` lines of the default configuration (comments dropped).
    fn value_lines() -> Vec<usize> {
        DEFAULT_CONFIG
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim_start().starts_with('#') && l.contains(" = "))
            .map(|(i, _)| i)
            .collect()
    }

    fn replacement() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("true".to_string()),
            Just("\"\"".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("-1".to_string()),
            Just("0".to_string()),
            Just("1e300".to_string()),
            Just("9223372036854775807".to_string()),
            Just("\"99999PiB\"".to_string()),
            Just("\"0s\"".to_string()),
            Just("nan".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "[a-zA-Z0-9 ._:/-]{0,30}".prop_map(|s| format!("\"{s}\"")),
            (1usize..20_000).prop_map(|n| format!("\"{}\"", "h".repeat(n))),
        ]
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        /// Replace the value on the n-th `key = value` line.
        Value(usize, String),
        /// Add an unknown key after the n-th line.
        Unknown(usize, String),
        /// Drop the n-th line.
        Drop(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<prop::sample::Index>(), replacement())
                .prop_map(|(i, v)| Mutation::Value(i.index(usize::MAX), v)),
            (any::<prop::sample::Index>(), "[a-z_]{1,12}")
                .prop_map(|(i, k)| Mutation::Unknown(i.index(usize::MAX), k)),
            any::<prop::sample::Index>().prop_map(|i| Mutation::Drop(i.index(usize::MAX))),
        ]
    }

    fn mutate(mutations: &[Mutation]) -> String {
        let targets = value_lines();
        let mut lines: Vec<String> = DEFAULT_CONFIG.lines().map(str::to_string).collect();
        for m in mutations {
            match m {
                Mutation::Value(i, value) => {
                    let at = targets[i % targets.len()];
                    let key = lines[at].split(" = ").next().unwrap_or("").to_string();
                    lines[at] = format!("{key} = {value}");
                }
                Mutation::Unknown(i, key) => {
                    let at = targets[i % targets.len()];
                    lines[at] = format!("{}\nzz_{key} = 1", lines[at]);
                }
                Mutation::Drop(i) => {
                    let at = targets[i % targets.len()];
                    lines[at] = String::new();
                }
            }
        }
        lines.join("\n")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn mutated_default_configs_never_panic_and_name_a_field(
            mutations in prop::collection::vec(mutation(), 1..5),
        ) {
            let text = mutate(&mutations);
            let errors = match Config::from_toml(&text) {
                Ok(config) => config.validate().err().map(|e| e.0).unwrap_or_default(),
                Err(e) => e.0,
            };
            for e in &errors {
                // A syntax error names its line; every other error names its key.
                prop_assert!(!e.field.is_empty() || e.reason.contains("line"), "{e:?}");
                prop_assert!(e.to_string().len() <= 2048, "{} bytes", e.to_string().len());
            }
        }
    }
}
