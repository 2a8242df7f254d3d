//! Configuration: one TOML file, parsed strictly and validated with the field named.
//!
//! Parsing rejects unknown keys (serde `deny_unknown_fields`); [`Config::validate`]
//! checks what serde cannot: ranges, references between sections and duplicates.
//! Every error names the offending field as a path such as `meters[main].unit_id`.
//!
//! Each stage owns its section and that section's validation: `[[buses]]`,
//! `[[meters]]` and `[profiles]` in [`crate::acquire::config`], `[store]` in
//! [`crate::store::config`], `[mqtt]` and `[availability]` in
//! [`crate::broker::config`], `[upstream]` in [`crate::sync::config`],
//! `[analytics]` and `[[alarms]]` in [`crate::analytics::config`], `[http]` in
//! [`crate::status::config`]. Durations, sizes and config errors are the leaf
//! [`units`], which imports nothing else of the crate. This module only composes the
//! sections into [`Config`] (plus the small `[log]` section and the checks across
//! sections), so it imports every stage and sits above them all, just below the
//! pipeline and the wiring (`cli`, `lib.rs`). A stage imports its own section and `config::units`,
//! never this module; where it needs several sections it declares a trait for them
//! (`acquire::config::AcquireSections`), which [`Config`] implements. The layers are
//! checked by `agent/tests/module_graph.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

mod schema;
pub mod units;

use units::{bounded, err, valid_id};
pub use units::{ByteSize, ConfigError, ConfigErrors, HumanDuration};

use crate::acquire::config as acquire;
pub use crate::acquire::config::{
    validate_registers, BusConfig, BusType, DataType, MeterConfig, Parity, ProfileConfig,
    RegisterConfig, RegisterTable, Transport, WordOrder,
};
pub use crate::analytics::config::{AlarmRule, AnalyticsConfig};
pub use crate::broker::config::{AvailabilityConfig, MqttConfig, MIN_PUBLIC_PASSWORD};
pub use crate::status::config::HttpConfig;
pub use crate::store::config::{StoreConfig, MAX_CACHE_CAPACITY, MAX_MIN_FREE_SPACE, MAX_QUOTA};

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
        self.store.validate(&mut errors);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errors.push(err(
                "log.level",
                format!(
                    "`{}` is not a log filter like `info` or `edge_agent=debug,warn`: {e}",
                    crate::config::units::clip(&self.log.level)
                ),
            ));
        }
        self.mqtt.validate(&mut errors);
        self.http.validate(&mut errors);
        acquire::validate_buses(&self.buses, &mut errors);
        acquire::validate_profiles(&self.profiles, &mut errors);
        acquire::validate_meters(&self.meters, &self.buses, &self.profiles, &mut errors);
        if let Some(upstream) = &self.upstream {
            upstream.validate(&mut errors);
        }
        self.analytics.validate(&mut errors);
        crate::analytics::config::validate_alarms(&self.alarms, &self.meters, &mut errors);
        self.availability.validate(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(bounded(errors))
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

impl acquire::AcquireSections for Config {
    fn buses(&self) -> &[BusConfig] {
        &self.buses
    }
    fn meters(&self) -> &[MeterConfig] {
        &self.meters
    }
    fn profiles(&self) -> &BTreeMap<String, ProfileConfig> {
        &self.profiles
    }
}

impl crate::analytics::config::AnalyticsSections for Config {
    fn gateway_id(&self) -> &str {
        &self.gateway_id
    }
    fn analytics(&self) -> &AnalyticsConfig {
        &self.analytics
    }
    fn meters(&self) -> &[MeterConfig] {
        &self.meters
    }
    fn alarms(&self) -> &[AlarmRule] {
        &self.alarms
    }
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

    use std::net::SocketAddr;
    use std::time::Duration;

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
