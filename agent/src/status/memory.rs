//! Memory figures for `GET /api/v1/status` (`memory`) and `/metrics`
//! (`edge_memory_*`): the process's resident set and the bounded consumers that can
//! be large, each beside the config key that bounds it. The budget is in
//! docs/memory.md.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::{json, Value as Json_};

use crate::broker::{BrokerStats, LogMemory};
use crate::store::Store;

/// The process's resident set in bytes, from `/proc/self/status` (`VmRSS`); `None`
/// where there is no procfs.
pub fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// What the status document and the metrics report.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MemoryFigures {
    pub rss_bytes: Option<u64>,
    /// `store.cache_capacity`.
    pub store_cache_bytes: u64,
    /// Readings held in memory while the disk refuses commits, and their bound
    /// (`store.hold_readings`).
    pub held_readings: u64,
    pub held_readings_max: u64,
    /// The embedded broker's filter logs; `None` without the broker.
    pub broker_log: Option<LogMemory>,
    // The analytics state's size is the analytics stage's own figure: status
    // `analytics`, metrics `edge_analytics_*`.
}

impl MemoryFigures {
    pub fn read(store: &Store, held: u64, broker: Option<&BrokerStats>) -> MemoryFigures {
        let (cache, hold_max) = store.memory_bounds();
        MemoryFigures {
            rss_bytes: rss_bytes(),
            store_cache_bytes: cache,
            held_readings: held,
            held_readings_max: hold_max as u64,
            broker_log: broker.map(|b| b.log_memory()),
        }
    }

    /// The `memory` object of the status document.
    pub fn json(&self) -> Json_ {
        json!({
            "rss_bytes": self.rss_bytes,
            "store_cache_bytes": self.store_cache_bytes,
            "held_readings": self.held_readings,
            "held_readings_max": self.held_readings_max,
            "broker_log": self.broker_log.map(|l| json!({
                "filters": l.filters,
                "bytes": l.bytes,
                "reserved_bytes": l.reserved_bytes,
                "max_bytes": l.max_bytes,
                "refused_subscriptions": l.refused,
            })),
        })
    }
}

/// `edge_memory_*` at scrape time.
#[derive(Debug)]
pub(crate) struct MemoryCollector {
    pub store: Arc<Store>,
    pub broker: Option<Arc<BrokerStats>>,
}

impl Collector for MemoryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let held = self.store.held_readings();
        let f = MemoryFigures::read(&self.store, held, self.broker.as_deref());
        let mut gauges = vec![
            (
                "memory_store_cache_bytes",
                "Size of the store's page cache (store.cache_capacity).",
                f.store_cache_bytes,
            ),
            (
                "memory_held_readings",
                "Readings held in memory while the disk refuses commits.",
                f.held_readings,
            ),
            (
                "memory_held_readings_max",
                "Most readings held in memory while the disk refuses commits (store.hold_readings).",
                f.held_readings_max,
            ),
        ];
        if let Some(rss) = f.rss_bytes {
            gauges.push((
                "memory_rss_bytes",
                "Resident set of the agent's process.",
                rss,
            ));
        }
        if let Some(l) = f.broker_log {
            gauges.extend([
                (
                    "memory_broker_log_bytes",
                    "Bytes in the embedded broker's per-filter message logs (topic and payload of each message).",
                    l.bytes,
                ),
                (
                    "memory_broker_log_reserved_bytes",
                    "Most the embedded broker's existing filter logs can reach (log_segment_size x log_segment_count each).",
                    l.reserved_bytes,
                ),
                (
                    "memory_broker_log_max_bytes",
                    "Cap on the filter logs' reserved bytes (mqtt.log_max_bytes).",
                    l.max_bytes,
                ),
                (
                    "broker_log_filters",
                    "Subscription filters with a message log in the embedded broker.",
                    l.filters,
                ),
            ]);
        }
        for (name, help, v) in gauges {
            let metric = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        if let Some(l) = f.broker_log {
            let refused = ConstCounter::new(l.refused);
            refused.encode(encoder.encode_descriptor(
                "broker_refused_subscriptions",
                "Subscriptions refused because a new filter log would pass mqtt.log_max_bytes (since the broker started).",
                None,
                refused.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::broker::config::MqttConfig;
    use crate::broker::LocalBroker;
    use crate::config::units::ByteSize;
    use crate::store::config::StoreConfig;
    use crate::store::testing::{config, open};

    #[test]
    fn figures_name_rss_the_store_bounds_and_the_broker_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(open(&StoreConfig {
            cache_capacity: ByteSize(3 << 20),
            hold_readings: 777,
            ..config(&dir)
        }));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mqtt = MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..MqttConfig::default()
        };
        let broker = LocalBroker::start(&mqtt, "gw1").expect("broker starts");
        let f = MemoryFigures::read(&store, 0, Some(&broker.stats));
        assert!(f.rss_bytes.is_some_and(|b| b > 1 << 20), "{f:?}");
        assert_eq!((f.store_cache_bytes, f.held_readings_max), (3 << 20, 777));
        assert_eq!(
            f.broker_log.map(|l| (l.filters, l.max_bytes)),
            Some((0, mqtt.log_max_bytes.0))
        );
        let doc = f.json();
        assert_eq!(doc["store_cache_bytes"], 3 << 20);
        assert_eq!(doc["broker_log"]["max_bytes"], mqtt.log_max_bytes.0);

        let mut metrics = super::super::metrics::Metrics::new(store.clone(), 1 << 30, &[], None);
        metrics.register_memory(store, Some(broker.stats.clone()));
        let text = metrics.encode().expect("encode");
        for line in [
            "edge_memory_store_cache_bytes 3145728",
            "edge_memory_held_readings_max 777",
            "edge_memory_broker_log_bytes 0",
            "edge_broker_log_filters 0",
            "edge_broker_refused_subscriptions_total 0",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        assert!(text.contains("edge_memory_rss_bytes "), "{text}");
    }
}
