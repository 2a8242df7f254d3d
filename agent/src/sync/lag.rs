//! `edge-agent bench lag`: subscribes to a gateway's upstream records topic and
//! reports, for the readings that arrive, the lag from the reading's timestamp (the
//! last reply of its Modbus read) to its arrival at the subscriber, and the upstream
//! payload bytes per reading. Run it beside an agent polling meters with a live
//! upstream (`scripts/footprint.sh` does).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::model::now_ms;
use crate::sync::wire;

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct LagFigures {
    /// Milliseconds from each reading's timestamp to its arrival, sorted.
    pub lags_ms: Vec<i64>,
    /// Bytes of the records payloads received.
    pub payload_bytes: u64,
    /// Readings among the records received.
    pub readings: u64,
}

impl LagFigures {
    /// The `q` quantile (0..=1) of the lags, nearest rank; 0 without any.
    pub fn quantile(&self, q: f64) -> i64 {
        if self.lags_ms.is_empty() {
            return 0;
        }
        let rank = ((self.lags_ms.len() as f64 * q).ceil() as usize).clamp(1, self.lags_ms.len());
        self.lags_ms[rank - 1]
    }
}

/// Subscribes to `topic` on `broker` for `seconds` and measures the readings.
pub fn measure(broker: SocketAddr, topic: &str, seconds: u64) -> anyhow::Result<LagFigures> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut options = MqttOptions::new(
            format!("edge-agent-lag-{}", std::process::id()),
            broker.ip().to_string(),
            broker.port(),
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(topic, QoS::AtMostOnce).await?;
        let mut figures = LagFigures::default();
        let mut decoder = wire::Decoder::default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        loop {
            let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) => break,
                Ok(event) => event?,
            };
            let Event::Incoming(Packet::Publish(publish)) = event else {
                continue;
            };
            let arrived = now_ms();
            figures.payload_bytes += publish.payload.len() as u64;
            let Ok(batch) = decoder.batch(&publish.payload) else {
                continue;
            };
            for rec in &batch.records {
                // A reading's time is in its head: no schema needed (the tool may
                // start after the connection's first batch carried them).
                let ts = match decoder.record(&batch.gw, &rec.data) {
                    Ok(record) => record.payload.as_reading().map(|r| r.ts_ms),
                    Err(_) => crate::store::codec::peek_reading_ts(&rec.data),
                };
                if let Some(ts) = ts {
                    figures.readings += 1;
                    figures.lags_ms.push(arrived - ts);
                }
            }
        }
        figures.lags_ms.sort_unstable();
        Ok(figures)
    })
}

/// Runs [`measure`] and prints one line of figures.
pub fn bench(
    out: &mut dyn Write,
    broker: SocketAddr,
    topic: &str,
    seconds: u64,
) -> anyhow::Result<()> {
    let f = measure(broker, topic, seconds)?;
    writeln!(
        out,
        "readings {} lag_p50_ms {} lag_p99_ms {} upstream_bytes_per_reading {:.0}",
        f.readings,
        f.quantile(0.5),
        f.quantile(0.99),
        f.payload_bytes as f64 / f.readings.max(1) as f64
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let f = LagFigures {
            lags_ms: (1..=100).collect(),
            ..LagFigures::default()
        };
        assert_eq!(
            (f.quantile(0.5), f.quantile(0.99), f.quantile(1.0)),
            (50, 99, 100)
        );
        assert_eq!(LagFigures::default().quantile(0.5), 0);
    }
}
