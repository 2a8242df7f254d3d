//! The latest readings per meter, followed from the store's committed broadcast: what
//! the page and `GET /api/v1/meters` show, without reading the store per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use heapless::HistoryBuffer;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::model::{Reading, Record};

/// Readings kept per meter (the newest last).
pub const RECENT_READINGS: usize = 16;

/// A meter's newest readings with their seqs, oldest overwritten first.
type Ring = HistoryBuffer<(u64, Arc<Reading>), RECENT_READINGS>;

/// The last [`RECENT_READINGS`] readings of every meter seen since the start, with
/// their seqs, in timestamp order. A fixed-size ring per meter: the memory does not
/// grow with the run time.
#[derive(Debug, Default)]
pub struct LatestReadings {
    meters: Mutex<HashMap<String, Ring>>,
    /// Bumped on every update; the live stream watches it.
    changes: tokio::sync::watch::Sender<u64>,
}

impl LatestReadings {
    /// Adds committed records. A reading older than the meter's newest (a history
    /// backfill after live readings, a late push) is not "latest" and is skipped, and
    /// so is a record already added. A reading at the newest reading's timestamp
    /// takes its place, with the values it does not have kept: a correction shows
    /// its value, and quantities pushed apart show together.
    pub fn add(&self, records: &[Record]) {
        let mut changed = false;
        {
            let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
            for record in records {
                let Some(reading) = record.payload.as_reading() else {
                    continue;
                };
                let ring = meters.entry(reading.meter.clone()).or_default();
                if ring.recent().is_some_and(|(_, r)| r.ts_ms > reading.ts_ms) {
                    continue;
                }
                // Push ingest adds its records before answering; the broadcast brings
                // them again.
                if ring.oldest_ordered().any(|(seq, _)| *seq == record.seq) {
                    continue;
                }
                match ring.recent() {
                    // Another record at the newest timestamp (a correction, or a
                    // quantity pushed apart): its values replace or join that reading's.
                    Some((_, newest)) if newest.ts_ms == reading.ts_ms => {
                        let mut merged = reading.clone();
                        merged.values.extend(
                            newest
                                .values
                                .iter()
                                .filter(|v| {
                                    !reading.values.iter().any(|n| n.quantity == v.quantity)
                                })
                                .cloned(),
                        );
                        let mut kept: Vec<_> = ring.oldest_ordered().cloned().collect();
                        kept.pop();
                        ring.clear();
                        ring.extend_from_slice(&kept);
                        ring.write((record.seq, Arc::new(merged)));
                    }
                    _ => ring.write((record.seq, Arc::new(reading.clone()))),
                }
                changed = true;
            }
        }
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// The newest reading of `meter` and its seq.
    pub fn latest(&self, meter: &str) -> Option<(u64, Arc<Reading>)> {
        let meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        meters.get(meter).and_then(|r| r.recent().cloned())
    }

    /// The kept readings of `meter`, oldest first.
    pub fn recent(&self, meter: &str) -> Vec<(u64, Arc<Reading>)> {
        let meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        meters
            .get(meter)
            .map(|r| r.oldest_ordered().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of every meter with a reading, sorted.
    pub fn meter_ids(&self) -> Vec<String> {
        let meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> = meters.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A receiver that sees a change whenever a reading was added.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Feeds `latest` from the committed broadcast until `stop` or the channel closes. A
/// lag (the page reader was slow) only skips readings: later ones replace them.
pub async fn follow(
    latest: Arc<LatestReadings>,
    mut committed: broadcast::Receiver<Arc<Vec<Record>>>,
    stop: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = committed.recv() => batch,
        };
        match batch {
            Ok(records) => latest.add(&records),
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(batches = n, "status view skipped committed batches")
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Payload, Source, Value};

    fn record(seq: u64, ts_ms: i64, values: &[(&str, f64)]) -> Record {
        Record {
            seq,
            payload: Payload::Reading(Reading {
                meter: "pv".into(),
                ts_ms,
                values: values
                    .iter()
                    .map(|(q, v)| Value {
                        quantity: q.to_string(),
                        unit: "W".into(),
                        kind: Kind::Power,
                        value: Some(*v),
                        invalid: None,
                        source: Source::F64,
                    })
                    .collect(),
            }),
        }
    }

    fn values(r: &Reading) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = r
            .values
            .iter()
            .map(|v| (v.quantity.clone(), v.value.unwrap_or(f64::NAN)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn a_record_at_the_newest_timestamp_replaces_its_values_in_place() {
        let latest = LatestReadings::default();
        latest.add(&[
            record(1, 1000, &[("power", 1.0)]),
            record(2, 2000, &[("power", 2.0), ("energy_total", 5.0)]),
        ]);
        // A correction of the newest reading's power.
        latest.add(&[record(3, 2000, &[("power", 2.5)])]);
        let (seq, newest) = latest.latest("pv").expect("a reading");
        assert_eq!(seq, 3);
        assert_eq!(
            values(&newest),
            vec![("energy_total".into(), 5.0), ("power".into(), 2.5)]
        );
        // One entry per timestamp.
        let recent = latest.recent("pv");
        let ts: Vec<i64> = recent.iter().map(|(_, r)| r.ts_ms).collect();
        assert_eq!(ts, vec![1000, 2000]);
        // An older timestamp is not "latest".
        latest.add(&[record(4, 1000, &[("power", 9.0)])]);
        assert_eq!(latest.latest("pv").map(|(s, _)| s), Some(3));
    }
}
