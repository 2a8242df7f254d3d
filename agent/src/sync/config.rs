//! The `[upstream]` section: where and how the store's records are forwarded.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{ByteSize, ConfigError, HumanDuration};

/// Upstream broker and outbox settings. The section is optional: without it the
/// agent keeps everything local.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Host name or address of the upstream MQTT broker.
    pub host: String,
    pub port: u16,
    /// MQTT client id; empty means the gateway id.
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// First topic level upstream; empty means `mqtt.topic_prefix`.
    pub topic_prefix: String,
    /// MQTT keepalive; a link silent for 1.25 times this is taken as dead.
    pub keep_alive: HumanDuration,
    /// First delay before reconnecting; doubles per failure up to `reconnect_max`.
    pub reconnect_min: HumanDuration,
    /// Longest delay between reconnect attempts (each delay is jittered).
    pub reconnect_max: HumanDuration,
    /// Most records in one published batch.
    pub batch_records: usize,
    /// Most payload bytes in one published batch.
    pub batch_bytes: ByteSize,
    /// Batches published and not yet acknowledged, at most.
    pub inflight_batches: usize,
    /// How often a manifest of the newly acknowledged records is published.
    pub manifest_interval: HumanDuration,
    /// Widest seq range one resend request may ask for.
    pub resend_max_span: u64,
    /// How long acknowledged records stay in the store (for local queries and
    /// resends) before they are compacted.
    pub retention: HumanDuration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// TLS towards the upstream broker (rustls, ring provider).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM client certificate (chain), for brokers that authenticate clients by certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: String::new(),
            port: 1883,
            client_id: String::new(),
            username: None,
            password: None,
            topic_prefix: String::new(),
            keep_alive: HumanDuration(Duration::from_secs(15)),
            reconnect_min: HumanDuration(Duration::from_millis(100)),
            reconnect_max: HumanDuration(Duration::from_secs(1)),
            batch_records: 500,
            batch_bytes: ByteSize(128 << 10),
            inflight_batches: 8,
            manifest_interval: HumanDuration(Duration::from_secs(30 * 60)),
            resend_max_span: 100_000,
            retention: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            tls: None,
        }
    }
}

/// Largest batch payload: rumqttc and most brokers handle this easily.
pub const MAX_BATCH_BYTES: u64 = 16 << 20;

impl UpstreamConfig {
    /// The client id used: `client_id`, or the gateway id when empty.
    pub fn client_id_or(&self, gateway: &str) -> String {
        if self.client_id.is_empty() {
            gateway.to_string()
        } else {
            self.client_id.clone()
        }
    }

    /// The topic prefix used upstream: `topic_prefix`, or the local one when empty.
    pub fn prefix_or(&self, local: &str) -> String {
        if self.topic_prefix.is_empty() {
            local.to_string()
        } else {
            self.topic_prefix.clone()
        }
    }

    /// Rules serde cannot express; errors name the field under `upstream.`.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut bad = |field: &str, reason: String| {
            errors.push(ConfigError {
                field: format!("upstream.{field}"),
                reason,
            })
        };
        if self.host.trim().is_empty() {
            bad("host", "must name the upstream broker".into());
        }
        if self.port == 0 {
            bad("port", "must be 1..=65535".into());
        }
        if self.client_id.len() > 128 {
            bad("client_id", "must be at most 128 bytes".into());
        }
        if self.password.is_some() && self.username.is_none() {
            bad(
                "password",
                "MQTT 3.1.1 sends a password only with a username".into(),
            );
        }
        let prefix = &self.topic_prefix;
        if prefix.contains(['#', '+', '\0']) || prefix.starts_with('/') || prefix.ends_with('/') {
            bad(
                "topic_prefix",
                format!("`{prefix}` must be without `#`, `+`, or a leading or trailing `/`"),
            );
        }
        let keep_alive = self.keep_alive.0;
        if keep_alive < Duration::from_secs(1) || keep_alive > Duration::from_secs(65_535) {
            bad("keep_alive", "must be between 1s and 65535s".into());
        }
        if self.reconnect_min.0.is_zero() {
            bad("reconnect_min", "must be greater than zero".into());
        }
        if self.reconnect_max.0 < self.reconnect_min.0 {
            bad(
                "reconnect_max",
                "must be at least `reconnect_min`".to_string(),
            );
        }
        if self.batch_records == 0 || self.batch_records > 100_000 {
            bad("batch_records", "must be 1..=100000".into());
        }
        if self.batch_bytes.0 < 1024 || self.batch_bytes.0 > MAX_BATCH_BYTES {
            bad("batch_bytes", "must be between 1KiB and 16MiB".into());
        }
        if self.inflight_batches == 0 || self.inflight_batches > 64 {
            bad("inflight_batches", "must be 1..=64".into());
        }
        if self.manifest_interval.0 < Duration::from_millis(100) {
            bad("manifest_interval", "must be at least 100ms".into());
        }
        if self.retention.0 < Duration::from_secs(60) {
            bad("retention", "must be at least 1m".into());
        }
        if self.resend_max_span == 0 {
            bad("resend_max_span", "must be at least 1".into());
        }
        if let Some(tls) = &self.tls {
            if tls.ca_file.as_os_str().is_empty() {
                bad("tls.ca_file", "must name a PEM file".into());
            }
            match (&tls.client_cert, &tls.client_key) {
                (Some(_), None) => bad(
                    "tls.client_key",
                    "a client certificate needs its key".into(),
                ),
                (None, Some(_)) => bad(
                    "tls.client_cert",
                    "a client key needs its certificate".into(),
                ),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, DEFAULT_CONFIG};

    fn errors(upstream: &str) -> Vec<String> {
        let text = format!("gateway_id = \"gw\"\n[upstream]\n{upstream}");
        match Config::from_toml(&text).map(|c| c.validate()) {
            Ok(Ok(())) => Vec::new(),
            Ok(Err(e)) | Err(e) => e.0.iter().map(|e| e.field.clone()).collect(),
        }
    }

    #[test]
    fn upstream_keys_are_validated_with_the_field_named() {
        assert!(errors("host = \"broker\"").is_empty());
        assert_eq!(
            errors("host = \"\"\nport = 0\nkeep_alive = \"0s\"\ninflight_batches = 0\nbatch_records = 0\nbatch_bytes = 10\npassword = \"x\"\nreconnect_min = \"2s\"\nreconnect_max = \"1s\"\nresend_max_span = 0\nmanifest_interval = \"1ms\""),
            [
                "upstream.host",
                "upstream.port",
                "upstream.password",
                "upstream.keep_alive",
                "upstream.reconnect_max",
                "upstream.batch_records",
                "upstream.batch_bytes",
                "upstream.inflight_batches",
                "upstream.manifest_interval",
                "upstream.resend_max_span",
            ]
        );
        assert_eq!(
            errors("host = \"b\"\n[upstream.tls]\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\""),
            ["upstream.tls.client_key"]
        );
        let unknown = errors("host = \"b\"\nhots = \"typo\"");
        assert_eq!(unknown.len(), 1);
        assert!(unknown[0].contains("upstream"), "{unknown:?}");
    }

    #[test]
    fn the_default_config_documents_every_upstream_key() {
        // The commented example, uncommented, is a valid section.
        let example: String = DEFAULT_CONFIG
            .lines()
            .skip_while(|l| !l.starts_with("# [upstream]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim())
            // Keys and section headers only; the prose comments stay out.
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!("gateway_id = \"gw\"\n{example}");
        let config = Config::from_toml(&text).expect("example parses");
        config.validate().expect("example validates");
        let up = config.upstream.expect("section present");
        assert_eq!(up.host, "mqtt.example.net");
        assert!(up.tls.is_some_and(|t| t.client_key.is_some()));
    }
}
