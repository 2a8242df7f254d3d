//! Configuration: one TOML file, parsed strictly and validated with the field named.
//!
//! Parsing rejects unknown keys (serde `deny_unknown_fields`); [`Config::validate`]
//! checks what serde cannot: ranges, references between sections and duplicates.
//! Every error names the offending field as a path such as `meters[main].unit_id`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::Kind;

/// A configuration problem, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the bad field, e.g. `meters[main].unit_id`; empty for a syntax error.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// All problems found in one configuration, so an operator fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A duration written the human way: `500ms`, `15m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "duration `{text}` is negative"
            )));
        }
        humantime::parse_duration(trimmed)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a duration like `500ms` or `15m`: {e}"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A byte size: an integer number of bytes, or a string such as `64MiB`, `512 KB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size like `64MiB` or `1048576`"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        Ok(ByteSize((num * mult as f64) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(ByteSize(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!("size {n} is negative"))),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

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
    /// Group commit: the longest a reading waits for the flush that makes it durable.
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/edge-agent/store"),
            cache_capacity: ByteSize(32 << 20),
            flush_interval: HumanDuration(Duration::from_millis(200)),
            max_batch: 1000,
            quota: ByteSize(1 << 30),
            min_free_space: ByteSize(32 << 20),
            hold_readings: 10_000,
            compress: true,
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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            hostnames: Vec::new(),
            max_body: ByteSize(1 << 20),
        }
    }
}

/// One physical bus: a serial line, or one Modbus TCP connection (a meter or a
/// TCP-to-RTU bridge with several unit ids behind it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    pub id: String,
    #[serde(rename = "type")]
    pub bus_type: BusType,
    /// RTU: serial device, e.g. `/dev/ttyUSB0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PathBuf>,
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// TCP: `host:port` of the Modbus TCP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Quiet time between the end of one exchange and the next request.
    #[serde(default = "default_frame_gap")]
    pub frame_gap: HumanDuration,
    /// How long to wait for each reply.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BusType {
    Rtu,
    Tcp,
}

/// How to reach a bus, resolved from a validated [`BusConfig`].
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Rtu {
        port: PathBuf,
        baud_rate: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
    Tcp {
        address: String,
    },
}

impl BusConfig {
    /// The transport of a bus; `None` only for a bus that failed validation.
    pub fn transport(&self) -> Option<Transport> {
        match self.bus_type {
            BusType::Rtu => Some(Transport::Rtu {
                port: self.port.clone()?,
                baud_rate: self.baud_rate,
                parity: self.parity,
                data_bits: self.data_bits,
                stop_bits: self.stop_bits,
            }),
            BusType::Tcp => Some(Transport::Tcp {
                address: self.address.clone()?,
            }),
        }
    }
}

fn default_frame_gap() -> HumanDuration {
    HumanDuration(Duration::from_millis(20))
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub id: String,
    pub bus: String,
    /// Modbus unit (slave) id, 1..=247.
    pub unit_id: u8,
    /// `sdm630`, `sdm120`, or the name of a map under `[profiles]`.
    pub profile: String,
    /// How often to read this meter.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Largest block of registers read in one request.
    #[serde(default = "default_max_registers")]
    pub max_registers_per_request: u16,
    /// Quantity the 15-minute intervals are derived from; default: see
    /// `analytics::energy_quantity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_quantity: Option<String>,
    /// Also accept pushed readings (HTTP and MQTT ingest) for this polled meter.
    /// Off by default: a push for a polled meter is refused, so nobody on the LAN
    /// can forge its readings or raise its alarms.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_push: bool,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_max_registers() -> u16 {
    // Modbus allows 125 per read; meters often accept fewer. 80 suits Eastron.
    80
}

/// A user-defined register map.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    #[serde(default)]
    pub manufacturer: String,
    #[serde(default)]
    pub model: String,
    pub registers: Vec<RegisterConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    Input,
    Holding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// Number of 16-bit registers the type occupies.
    pub fn words(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Order of the 16-bit words of a multi-register value. Bytes within a word are
/// always big-endian, as Modbus fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// Most significant word at the lowest address (Eastron, most meters).
    #[default]
    HighFirst,
    /// Least significant word at the lowest address.
    LowFirst,
}

/// One register (or register group) of a map. Used for the built-in profiles' data
/// files as well as for user-defined maps.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// Quantity name, e.g. `power_l1`.
    pub name: String,
    /// Zero-based protocol address of the first register.
    pub address: u16,
    #[serde(default = "default_table")]
    pub table: RegisterTable,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default)]
    pub word_order: WordOrder,
    /// Multiplier applied after decoding.
    #[serde(default = "default_scale")]
    pub scale: f64,
    pub unit: String,
    pub kind: Kind,
    /// Plausible range after scaling; values outside are not stored as numbers.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_table() -> RegisterTable {
    RegisterTable::Input
}

fn default_scale() -> f64 {
    1.0
}

/// Built-in profile names; a user map may not shadow them.
pub const BUILTIN_PROFILES: &[&str] = &["sdm630", "sdm120"];

impl Config {
    /// Parses TOML text; unknown keys and type errors come back with their location.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        toml::from_str::<Config>(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| field_at(text, s.start))
                .unwrap_or_default();
            ConfigErrors(vec![err(field, e.message().to_string())])
        })
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
        Ok(config)
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
        self.validate_mqtt(&mut errors);
        self.validate_http(&mut errors);
        self.validate_buses(&mut errors);
        self.validate_profiles(&mut errors);
        self.validate_meters(&mut errors);
        if let Some(upstream) = &self.upstream {
            upstream.validate(&mut errors);
        }
        self.validate_analytics(&mut errors);
        self.validate_alarms(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn validate_store(&self, errors: &mut Vec<ConfigError>) {
        if self.store.flush_interval.0.is_zero() {
            errors.push(err("store.flush_interval", "must be greater than zero"));
        }
        if self.store.max_batch == 0 {
            errors.push(err("store.max_batch", "must be at least 1"));
        }
        if self.store.cache_capacity.0 < (1 << 20) {
            errors.push(err("store.cache_capacity", "must be at least 1MiB"));
        }
        if self.store.quota.0 < (16 << 20) {
            errors.push(err(
                "store.quota",
                "must be at least 16MiB (8MiB of it is room for sled's segments)",
            ));
        }
        if self.store.min_free_space.0 < (2 << 20) {
            errors.push(err(
                "store.min_free_space",
                "must be at least 2MiB (sled allocates its file in 512KiB segments)",
            ));
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
        for (user, pass) in &self.mqtt.users {
            if pass.is_empty() {
                errors.push(err(
                    format!("mqtt.users.{user}"),
                    "password must not be empty",
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
    }

    fn validate_buses(&self, errors: &mut Vec<ConfigError>) {
        let mut ids = HashSet::new();
        let mut ports: BTreeMap<&Path, &str> = BTreeMap::new();
        for (i, bus) in self.buses.iter().enumerate() {
            let at = format!("buses[{}]", display_id(&bus.id, i));
            if !valid_id(&bus.id) {
                errors.push(err(
                    format!("{at}.id"),
                    format!(
                        "`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_`",
                        bus.id
                    ),
                ));
            } else if !ids.insert(bus.id.as_str()) {
                errors.push(err(
                    format!("{at}.id"),
                    format!("duplicate bus id `{}`", bus.id),
                ));
            }
            if bus.timeout.0.is_zero() {
                errors.push(err(format!("{at}.timeout"), "must be greater than zero"));
            }
            match bus.bus_type {
                BusType::Rtu => {
                    match &bus.port {
                        None => errors.push(err(
                            format!("{at}.port"),
                            "an rtu bus needs a serial `port`",
                        )),
                        Some(port) => {
                            if let Some(other) = ports.insert(port.as_path(), bus.id.as_str()) {
                                errors.push(err(
                                    format!("{at}.port"),
                                    format!("serial port {} is already used by bus `{other}`: one bus owns a port", port.display()),
                                ));
                            }
                        }
                    }
                    if bus.address.is_some() {
                        errors.push(err(
                            format!("{at}.address"),
                            "only a tcp bus has an `address`",
                        ));
                    }
                    if !crate::acquire::serial::STANDARD_BAUD_RATES.contains(&bus.baud_rate) {
                        errors.push(err(
                            format!("{at}.baud_rate"),
                            format!(
                                "{} is not a standard serial speed ({:?})",
                                bus.baud_rate,
                                crate::acquire::serial::STANDARD_BAUD_RATES
                            ),
                        ));
                    }
                    if !(5..=8).contains(&bus.data_bits) {
                        errors.push(err(
                            format!("{at}.data_bits"),
                            format!("{} is outside 5..=8", bus.data_bits),
                        ));
                    }
                    if !(1..=2).contains(&bus.stop_bits) {
                        errors.push(err(
                            format!("{at}.stop_bits"),
                            format!("{} is not 1 or 2", bus.stop_bits),
                        ));
                    }
                }
                BusType::Tcp => {
                    match &bus.address {
                        None => errors.push(err(
                            format!("{at}.address"),
                            "a tcp bus needs an `address` (host:port)",
                        )),
                        Some(address) if !address.contains(':') => errors.push(err(
                            format!("{at}.address"),
                            format!("`{address}` must be host:port"),
                        )),
                        Some(_) => {}
                    }
                    if bus.port.is_some() {
                        errors.push(err(
                            format!("{at}.port"),
                            "only an rtu bus has a serial `port`",
                        ));
                    }
                }
            }
        }
    }

    fn validate_profiles(&self, errors: &mut Vec<ConfigError>) {
        for (name, profile) in &self.profiles {
            let at = format!("profiles.{name}");
            if BUILTIN_PROFILES.contains(&name.as_str()) {
                errors.push(err(
                    &at,
                    format!("`{name}` is a built-in profile; choose another name"),
                ));
            }
            if profile.registers.is_empty() {
                errors.push(err(
                    format!("{at}.registers"),
                    "must list at least one register",
                ));
            }
            validate_registers(&at, &profile.registers, errors);
        }
    }

    fn validate_meters(&self, errors: &mut Vec<ConfigError>) {
        let buses: HashSet<&str> = self.buses.iter().map(|b| b.id.as_str()).collect();
        let mut ids = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            let at = format!("meters[{}]", display_id(&m.id, i));
            if !valid_id(&m.id) {
                errors.push(err(format!("{at}.id"), format!("`{}` must be 1-64 characters of a-z, A-Z, 0-9, `-` or `_` (it is part of MQTT topics)", m.id)));
            } else if !ids.insert(m.id.as_str()) {
                errors.push(err(
                    format!("{at}.id"),
                    format!("duplicate meter id `{}`", m.id),
                ));
            }
            if !buses.contains(m.bus.as_str()) {
                errors.push(err(
                    format!("{at}.bus"),
                    format!("no bus with id `{}` is configured", m.bus),
                ));
            }
            if !(1..=247).contains(&m.unit_id) {
                errors.push(err(
                    format!("{at}.unit_id"),
                    format!("{} is outside 1..=247", m.unit_id),
                ));
            } else if !addresses.insert((m.bus.as_str(), m.unit_id)) {
                errors.push(err(
                    format!("{at}.unit_id"),
                    format!("unit id {} is already used on bus `{}`", m.unit_id, m.bus),
                ));
            }
            if m.interval.0.is_zero() {
                errors.push(err(format!("{at}.interval"), "must be greater than zero"));
            }
            if !(1..=125).contains(&m.max_registers_per_request) {
                errors.push(err(
                    format!("{at}.max_registers_per_request"),
                    format!(
                        "{} is outside 1..=125 (the Modbus limit)",
                        m.max_registers_per_request
                    ),
                ));
            }
            if !BUILTIN_PROFILES.contains(&m.profile.as_str())
                && !self.profiles.contains_key(&m.profile)
            {
                errors.push(err(
                    format!("{at}.profile"),
                    format!(
                        "unknown profile `{}`: use sdm630, sdm120 or a name under [profiles]",
                        m.profile
                    ),
                ));
            }
        }
    }
}

impl Config {
    fn validate_analytics(&self, errors: &mut Vec<ConfigError>) {
        let a = &self.analytics;
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

/// Checks a register list, built-in or user-defined. `at` is the path prefix.
pub fn validate_registers(at: &str, registers: &[RegisterConfig], errors: &mut Vec<ConfigError>) {
    let mut names = HashSet::new();
    for (j, r) in registers.iter().enumerate() {
        let rat = format!("{at}.registers[{}]", display_id(&r.name, j));
        if r.name.is_empty() || r.name.contains(['/', '#', '+']) {
            errors.push(err(
                format!("{rat}.name"),
                "must be non-empty, without `/`, `#` or `+`",
            ));
        } else if !names.insert(r.name.as_str()) {
            errors.push(err(
                format!("{rat}.name"),
                format!("duplicate quantity `{}`", r.name),
            ));
        }
        if !r.scale.is_finite() || r.scale == 0.0 {
            errors.push(err(
                format!("{rat}.scale"),
                "must be a finite, non-zero number",
            ));
        }
        if u32::from(r.address) + u32::from(r.data_type.words()) > 65536 {
            errors.push(err(
                format!("{rat}.address"),
                "register runs past address 65535",
            ));
        }
        if let (Some(lo), Some(hi)) = (r.min, r.max) {
            if lo > hi {
                errors.push(err(
                    format!("{rat}.min"),
                    format!("min {lo} is above max {hi}"),
                ));
            }
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn display_id(id: &str, index: usize) -> String {
    if id.is_empty() {
        index.to_string()
    } else {
        id.to_string()
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
            "{}\n[mqtt]\nlisten = \"0.0.0.0:1883\"\n[mqtt.users]\nhass = \"secret\"\n",
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
        assert_rejected(&text, "mqtt", "invalid type");
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
    }

    #[test]
    fn unknown_profile_and_bad_registers_are_named() {
        let text = base().replace("profile = \"sdm630\"", "profile = \"nope\"");
        assert_rejected(&text, "meters[main].profile", "unknown profile `nope`");
        let text = format!(
            "{}\n[profiles.pump]\nregisters = [{{ name = \"p\", address = 0, type = \"f32\", unit = \"W\", kind = \"power\", scale = 0.0 }}]\n",
            base()
        );
        assert_rejected(&text, "profiles.pump.registers[p].scale", "non-zero");
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
