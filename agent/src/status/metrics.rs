//! `GET /metrics`: Prometheus text exposition (format 0.0.4) through prometheus-client.
//!
//! The figures already live elsewhere (each meter's [`MeterStats`], the store's
//! counters, the upstream sync's status watch), so a [`Collector`] reads them at
//! scrape time instead of keeping a second set of counters in step.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::guard::ApiError;
use super::{AppState, MeterSource};
use crate::acquire::MeterStats;
use crate::store::Store;
use crate::sync::{SyncState, SyncStatus};

/// The registry served at `/metrics`.
pub(crate) struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(
        store: Arc<Store>,
        quota_bytes: u64,
        meters: &[MeterSource],
        upstream: Option<watch::Receiver<SyncStatus>>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("edge");
        registry.register_collector(Box::new(PollCollector {
            meters: meters
                .iter()
                .map(|m| (m.id.clone(), m.stats.clone()))
                .collect(),
        }));
        registry.register_collector(Box::new(StoreCollector { store, quota_bytes }));
        registry.register_collector(Box::new(UpstreamCollector { status: upstream }));
        Metrics { registry }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[derive(Debug)]
struct PollCollector {
    meters: Vec<(String, Arc<MeterStats>)>,
}

impl Collector for PollCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshots: Vec<_> = self
            .meters
            .iter()
            .map(|(id, s)| (id, s.snapshot(), s.latency_histogram()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "polls",
                "Polls per meter by outcome (success, timeout, exception, transport, decode).",
                None,
                MetricType::Counter,
            )?;
            for (id, s, _) in &snapshots {
                for (outcome, n) in [
                    ("success", s.successes),
                    ("timeout", s.timeouts),
                    ("exception", s.exceptions),
                    ("transport", s.transport_errors),
                    ("decode", s.decode_errors),
                ] {
                    let labels = [("meter", id.as_str()), ("outcome", outcome)];
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "invalid_values",
                "Values read but not stored as numbers (NaN, infinite, out of range).",
                None,
                MetricType::Counter,
            )?;
            for (id, s, _) in &snapshots {
                let labels = [("meter", id.as_str())];
                ConstCounter::new(s.invalid_values).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "poll_latency_seconds",
                "Duration of the successful polls (all requests of one poll).",
                None,
                MetricType::Histogram,
            )?;
            for (id, _, h) in &snapshots {
                let labels = [("meter", id.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        h.sum_s, h.count, &h.buckets, None,
                    )?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "meter_up",
                "1 when the meter's last poll succeeded.",
                None,
                MetricType::Gauge,
            )?;
            for (id, s, _) in &snapshots {
                let labels = [("meter", id.as_str())];
                let up = i64::from(s.state == crate::acquire::MeterState::Ok);
                ConstGauge::new(up).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct StoreCollector {
    store: Arc<Store>,
    quota_bytes: u64,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.store.stats();
        let gauges = [
            (
                "store_disk_bytes",
                "Size of the store's files on disk.",
                stats.disk_bytes,
            ),
            (
                "store_quota_bytes",
                "Most space the store may take (store.quota).",
                self.quota_bytes,
            ),
            ("store_records", "Records held in the store.", stats.records),
            (
                "store_last_seq",
                "Sequence number of the newest durable record.",
                stats.last_seq,
            ),
        ];
        for (name, help, v) in gauges {
            let metric = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        let quarantined = ConstCounter::new(stats.quarantined);
        quarantined.encode(encoder.encode_descriptor(
            "store_quarantined",
            "Records whose CRC failed, quarantined since the store was created.",
            None,
            quarantined.metric_type(),
        )?)?;
        let dropped = ConstCounter::new(stats.dropped);
        dropped.encode(encoder.encode_descriptor(
            "store_dropped_records",
            "Records the byte quota deleted before upstream acknowledged them, since the store was created.",
            None,
            dropped.metric_type(),
        )?)?;
        let held_dropped = ConstCounter::new(stats.held_dropped);
        held_dropped.encode(encoder.encode_descriptor(
            "store_held_dropped_readings",
            "Readings dropped from memory while the disk was full, beyond store.hold_readings, since start.",
            None,
            held_dropped.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The upstream link, from the sync's status watch. Without an `[upstream]` section
/// only `upstream_configured 0` is reported.
#[derive(Debug)]
struct UpstreamCollector {
    status: Option<watch::Receiver<SyncStatus>>,
}

fn gauge<N>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: N) -> std::fmt::Result
where
    N: prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug,
{
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        gauge(
            e,
            "upstream_configured",
            "1 when an upstream broker is configured.",
            i64::from(self.status.is_some()),
        )?;
        let Some(status) = &self.status else {
            return Ok(());
        };
        // A copy: the sync task's sends are never blocked by a slow scrape.
        let s = status.borrow().clone();
        {
            let mut family = e.encode_descriptor(
                "upstream_state",
                "The upstream link's state: 1 for the current one.",
                None,
                MetricType::Gauge,
            )?;
            for state in [SyncState::Offline, SyncState::CatchingUp, SyncState::Live] {
                let labels = [("state", state.as_str())];
                ConstGauge::new(i64::from(s.state == state))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            e,
            "upstream_backlog_records",
            "Records not yet acknowledged by the upstream broker.",
            int(s.backlog),
        )?;
        gauge(
            e,
            "upstream_oldest_unacked_age_seconds",
            "Age of the oldest record not yet acknowledged (0 when none).",
            s.oldest_unacked_age_ms.unwrap_or(0) as f64 / 1000.0,
        )?;
        gauge(
            e,
            "upstream_drain_rate_records_per_second",
            "Records acknowledged per second over the last few seconds.",
            s.drain_rate,
        )?;
        gauge(
            e,
            "upstream_cursor_seq",
            "Highest contiguous seq acknowledged upstream.",
            int(s.cursor),
        )?;
        gauge(
            e,
            "upstream_inflight_batches",
            "Batches published and not yet acknowledged.",
            i64::try_from(s.inflight_batches).unwrap_or(i64::MAX),
        )?;
        counter(
            e,
            "upstream_delivered_records",
            "Records acknowledged upstream since the agent started.",
            s.delivered,
        )?;
        counter(
            e,
            "upstream_resent_records",
            "Records republished on an upstream resend request.",
            s.resent,
        )?;
        counter(
            e,
            "upstream_connects",
            "Connections to the upstream broker (ConnAcks) since the start.",
            s.connects,
        )?;
        counter(
            e,
            "upstream_bad_commands",
            "Upstream command messages rejected as malformed or out of bounds.",
            s.bad_commands,
        )?;
        counter(
            e,
            "upstream_manifests",
            "Manifests published since the start.",
            s.manifests,
        )?;
        counter(
            e,
            "upstream_cursor_writes",
            "Writes of the upstream cursor since the start, each an fsync (SD-card wear).",
            s.cursor_writes,
        )?;
        Ok(())
    }
}

pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    // The store collector walks the store's directory: off the runtime threads.
    let encoded = tokio::task::spawn_blocking(move || app.metrics.encode()).await;
    match encoded {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
        .into_response(),
    }
}

// Push-ingest counters: a self-contained collector over the ingest service's atomics.

impl Metrics {
    /// Adds `edge_ingest_*`: accepted batches and points, already-stored points and
    /// rejected batches by transport (and reason).
    pub fn register_broker(&mut self, stats: Arc<crate::broker::BrokerStats>) {
        self.registry
            .register_collector(Box::new(BrokerCollector { stats }));
    }

    /// Adds `edge_memory_*`: RSS and the bounded consumers (docs/memory.md).
    pub fn register_memory(
        &mut self,
        store: Arc<Store>,
        broker: Option<Arc<crate::broker::BrokerStats>>,
    ) {
        self.registry
            .register_collector(Box::new(super::memory::MemoryCollector { store, broker }));
    }

    /// Adds `edge_analytics_*`: the interval state's size and the samples too late
    /// for intervals.
    pub fn register_analytics(&mut self, shared: Arc<crate::analytics::AnalyticsShared>) {
        self.registry
            .register_collector(Box::new(AnalyticsCollector { shared }));
    }

    pub fn register_ingest(&mut self, counters: Arc<crate::ingest::IngestCounters>) {
        self.registry
            .register_collector(Box::new(IngestCollector { counters }));
    }
}

/// The analytics stage's state size.
#[derive(Debug)]
struct AnalyticsCollector {
    shared: Arc<crate::analytics::AnalyticsShared>,
}

impl Collector for AnalyticsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.shared;
        for (name, help, value) in [
            (
                "analytics_held_samples",
                "Samples the 15-minute interval trackers hold in memory (their open intervals').",
                s.held_samples.load(Relaxed),
            ),
            (
                "analytics_state_bytes",
                "Approximate bytes of the 15-minute interval state in memory.",
                s.state_bytes.load(Relaxed),
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(family)?;
        }
        let family = encoder.encode_descriptor(
            "analytics_too_late_for_intervals",
            "Samples older than analytics.retention behind their meter's newest sample: stored, no interval changed.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.too_late.load(Relaxed)).encode(family)?;
        Ok(())
    }
}

/// The embedded broker's counters.
#[derive(Debug)]
struct BrokerCollector {
    stats: Arc<crate::broker::BrokerStats>,
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        for (name, help, value) in [
            (
                "broker_restarts",
                "Restarts of the embedded MQTT broker after a failure.",
                s.restarts.load(Relaxed),
            ),
            (
                "broker_failures",
                "Failures of the embedded MQTT broker seen by its supervisor.",
                s.failures.load(Relaxed),
            ),
            (
                "broker_panics",
                "Panics on the embedded MQTT broker's threads (contained, the broker restarted).",
                s.panics(),
            ),
            (
                "broker_refused_publishes",
                "MQTT publishes and wills on the agent's topics refused from other clients.",
                s.refused_publishes.load(Relaxed),
            ),
            (
                "broker_refused_client_ids",
                "MQTT connections refused for using one of the agent's reserved client ids.",
                s.refused_client_ids.load(Relaxed),
            ),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// Reads one figure of a transport's counts.
type PickCount = fn(&crate::ingest::TransportCounts) -> u64;

#[derive(Debug)]
struct IngestCollector {
    counters: Arc<crate::ingest::IngestCounters>,
}

impl Collector for IngestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::ingest::{RejectReason, Transport};
        let counts: Vec<_> = Transport::ALL
            .iter()
            .map(|t| (t.as_str(), self.counters.snapshot(*t)))
            .collect();
        let per_transport: [(&str, &str, PickCount); 5] = [
            (
                "ingest_batches",
                "Pushed batches accepted (durable), by transport (http, mqtt).",
                |c| c.batches,
            ),
            (
                "ingest_points",
                "Pushed points stored, by transport.",
                |c| c.points,
            ),
            (
                "ingest_skipped_points",
                "Pushed points of accepted batches that were already stored, by transport.",
                |c| c.skipped,
            ),
            (
                "ingest_corrected_points",
                "Pushed points stored as corrections of a different stored value (\"correct\": true), by transport.",
                |c| c.corrected,
            ),
            (
                "ingest_too_late_for_intervals_points",
                "Pushed points stored too late to change any 15-minute interval (older than analytics.retention behind their meter's newest sample), by transport.",
                |c| c.too_late_for_intervals,
            ),
        ];
        for (name, help, get) in per_transport {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (transport, c) in &counts {
                let labels = [("transport", *transport)];
                ConstCounter::new(get(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "ingest_rejected_batches",
            "Pushed batches rejected whole, by transport and reason (syntax, invalid, content_type, store, conflict).",
            None,
            MetricType::Counter,
        )?;
        for (transport, c) in &counts {
            for reason in RejectReason::ALL {
                let labels = [("transport", *transport), ("reason", reason.as_str())];
                ConstCounter::new(c.rejected(reason)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
