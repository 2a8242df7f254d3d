//! History backfill from simulated meters: the demo starts with days of readings,
//! so everything derived from history has data in its first seconds.
//!
//! The history is computed by the same simulators that then serve the live values,
//! and enters the store through the push-ingest path ([`ingest::ingest_all`], one
//! all-or-nothing commit per chunk), never behind the store's back.
//!
//! Time: a meter built with `SimMeter::with_model_offset(span)` serves live values
//! from model time `span` on, starting at wall time `live_start_ms`. The history
//! point at wall time `w` is the model's value at model time
//! `span - (live_start_ms - w)`, so the history ends where the live data starts, on
//! the same curve. Points
//! are on whole `step`s of wall time, from `live_start_ms - span` up to one step
//! before `live_start_ms`. Values go through the register's encoding and decoding,
//! as a poll would see them, so the energy counters are monotone across the seam.

use std::sync::Arc;
use std::time::Duration;

use crate::acquire::config::RegisterConfig;
use crate::acquire::decode;
use crate::ingest::{self, IngestError, IngestLimits, Point, Series};
use crate::model::Kind;
use crate::sim::{self, SimMeter};
use crate::store::{Store, StoreWriter};

/// Readings per commit: large enough for few fsyncs, small enough to keep sled's
/// batch memory modest (DESIGN §3).
pub const READINGS_PER_COMMIT: usize = 2_000;

/// One simulated meter and the id its readings are stored under.
#[derive(Debug, Clone)]
pub struct HistoryMeter {
    pub id: String,
    pub sim: Arc<SimMeter>,
}

/// What to backfill.
#[derive(Debug, Clone)]
pub struct HistoryPlan {
    pub meters: Vec<HistoryMeter>,
    /// Wall time (Unix ms) at which the meters' model time was `span`.
    pub live_start_ms: i64,
    /// Length of the history; the meters' model offset.
    pub span: Duration,
    /// Spacing of the history points.
    pub step: Duration,
}

/// What a backfill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillOutcome {
    /// Readings written (one per meter and point in time).
    pub readings: usize,
    /// Points (values) written.
    pub points: usize,
    /// Points already stored, not written again.
    pub skipped: usize,
    /// Commits made.
    pub commits: usize,
}

/// The quantities a history carries: the ones energy is derived from.
const HISTORY_KINDS: [(&str, Kind); 2] =
    [("power", Kind::Power), ("energy_total", Kind::EnergyTotal)];

/// Runs [`backfill`] only when the store holds no record at all, so a second start
/// adds nothing. `None` when the store was not empty.
pub async fn backfill_if_empty(
    writer: &StoreWriter,
    store: &Store,
    plan: &HistoryPlan,
) -> Result<Option<BackfillOutcome>, IngestError> {
    if store.last_seq() > 0 {
        return Ok(None);
    }
    backfill(writer, store, plan).await.map(Some)
}

/// Writes the history of every meter in `plan` through the ingest path. Points
/// already stored are skipped, so running it twice stores them once.
pub async fn backfill(
    writer: &StoreWriter,
    store: &Store,
    plan: &HistoryPlan,
) -> Result<BackfillOutcome, IngestError> {
    let step_ms = (plan.step.as_millis() as i64).max(1);
    let span_ms = plan.span.as_millis() as i64;
    let first = (plan.live_start_ms - span_ms + step_ms - 1).div_euclid(step_ms) * step_ms;
    let last = plan.live_start_ms - step_ms;
    let per_meter = usize::max(1, READINGS_PER_COMMIT / plan.meters.len().max(1));
    let mut outcome = BackfillOutcome::default();
    // The counters' running maximum per meter and register: rounding in the
    // simulator's closed-form integral must not show up as a decrease.
    let mut floors = vec![f64::MIN; plan.meters.len()];
    let mut from = first;
    while from <= last {
        let to = last.min(from + (per_meter as i64 - 1) * step_ms);
        let mut batch = Vec::new();
        for (meter, floor) in plan.meters.iter().zip(floors.iter_mut()) {
            for (name, kind) in HISTORY_KINDS {
                let Some(reg) = register(&meter.sim, name, kind) else {
                    continue;
                };
                let mut points = Vec::with_capacity(per_meter);
                let mut ts = from;
                while ts <= to {
                    let model = Duration::from_millis((span_ms - (plan.live_start_ms - ts)) as u64);
                    if let Some(mut v) = served_value(&meter.sim, reg, model) {
                        if kind == Kind::EnergyTotal {
                            v = v.max(*floor);
                            *floor = v;
                        }
                        points.push(Point::new(ts, v));
                    }
                    ts += step_ms;
                }
                if !points.is_empty() {
                    batch.push(Series {
                        meter: meter.id.clone(),
                        unit: reg.unit.clone(),
                        kind,
                        points,
                    });
                }
            }
        }
        if !batch.is_empty() {
            let now = plan.live_start_ms.max(crate::model::now_ms());
            let mut readings = ingest::validate_all(&batch, now, &IngestLimits::default())?;
            // The values are what a poll decodes: they keep their register's number
            // type (an f32 register reads back in f32's shortest form, as polled).
            for reading in &mut readings {
                let Some(meter) = plan.meters.iter().find(|m| m.id == reading.meter) else {
                    continue;
                };
                for value in &mut reading.values {
                    if let Some((name, _)) = HISTORY_KINDS.iter().find(|(_, k)| *k == value.kind) {
                        if let Some(reg) = register(&meter.sim, name, value.kind) {
                            value.source = decode::source_of(reg.data_type, reg.scale);
                        }
                    }
                }
            }
            let (done, _) = ingest::store_readings(writer, store, readings).await?;
            outcome.readings += done.readings;
            outcome.points += done.stored;
            outcome.skipped += done.skipped;
            outcome.commits += usize::from(done.readings > 0);
        }
        from = to + step_ms;
    }
    Ok(outcome)
}

fn register<'a>(sim: &'a SimMeter, name: &str, kind: Kind) -> Option<&'a RegisterConfig> {
    sim.profile()
        .registers
        .iter()
        .find(|r| r.name == name && r.kind == kind)
}

/// The value a poll at model time `at` would decode: encoded into the register's
/// words and decoded back. `None` when the decoder would not store a number.
fn served_value(sim: &SimMeter, reg: &RegisterConfig, at: Duration) -> Option<f64> {
    let v = sim.value_at(&reg.name, at)?;
    decode::decode(reg, &sim::encode(reg, v)).ok()?.value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::profile;
    use crate::store::start_writer;
    use crate::store::testing::{config, open};
    use tokio::sync::broadcast;

    const DAY_MS: i64 = 86_400_000;

    fn meters(span: Duration) -> Vec<HistoryMeter> {
        let sdm = |name: &str| Arc::new(profile::builtin(name).unwrap());
        [
            ("main", "sdm630", 1),
            ("heatpump", "sdm120", 3),
            ("garage", "sdm120", 4),
        ]
        .into_iter()
        .map(|(id, p, seed)| HistoryMeter {
            id: id.into(),
            sim: Arc::new(SimMeter::new(sdm(p), seed).with_model_offset(span)),
        })
        .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_week_of_history_per_meter_monotone_into_live_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&config(&dir)));
        let (tx, _rx) = broadcast::channel(16);
        let (writer, _task) = start_writer(store.clone(), Duration::from_millis(50), 5_000, tx);
        let span = Duration::from_secs(7 * 86_400);
        // Not on a minute boundary, as in a real start.
        let live_start_ms = 1_700_000_000_123;
        let plan = HistoryPlan {
            meters: meters(span),
            live_start_ms,
            span,
            step: Duration::from_secs(60),
        };
        let started = std::time::Instant::now();
        let done = backfill_if_empty(&writer, &store, &plan)
            .await
            .unwrap()
            .unwrap();
        let elapsed = started.elapsed();
        // Whole minutes from 7 days before the start to a minute before it.
        let per_meter = 7 * 24 * 60 - 1;
        assert_eq!(done.readings, 3 * per_meter, "{done:?}");
        assert_eq!(done.points, 2 * done.readings);
        assert_eq!(done.skipped, 0);
        // 666 minutes of 3 meters per commit.
        assert_eq!(done.commits, per_meter.div_ceil(666));
        println!("backfilled {} readings in {elapsed:?}", done.readings);

        for meter in &plan.meters {
            let history = store.readings(&meter.id, i64::MIN, i64::MAX).unwrap();
            assert_eq!(history.len(), per_meter, "{}", meter.id);
            let ts: Vec<i64> = history
                .iter()
                .map(|r| r.payload.as_reading().unwrap().ts_ms)
                .collect();
            assert!(
                ts[0] > live_start_ms - 7 * DAY_MS
                    && ts[0] - (live_start_ms - 7 * DAY_MS) <= 60_000
            );
            assert!(live_start_ms - ts[per_meter - 1] >= 60_000);
            assert!(live_start_ms - ts[per_meter - 1] < 120_000);
            assert!(ts.windows(2).all(|w| w[1] - w[0] == 60_000));
            let value = |r: &crate::model::Record, q: &str| {
                r.payload
                    .as_reading()
                    .unwrap()
                    .values
                    .iter()
                    .find(|v| v.quantity == q)
                    .unwrap()
                    .value
                    .unwrap()
            };
            let energy: Vec<f64> = history.iter().map(|r| value(r, "energy_total")).collect();
            assert!(
                energy.windows(2).all(|w| w[1] >= w[0]),
                "{} counter goes down",
                meter.id
            );
            // A week of a load of hundreds of watts: tens of kWh at least.
            let used = energy[per_meter - 1] - energy[0];
            assert!((5.0..2_000.0).contains(&used), "{}: {used} kWh", meter.id);
            assert!(history.iter().all(|r| value(r, "power") > 0.0));
            // The first live poll (model time = span) continues the counter.
            let reg = register(&meter.sim, "energy_total", Kind::EnergyTotal).unwrap();
            // Values keep the register's number type, as a poll stores them.
            let source = decode::source_of(reg.data_type, reg.scale);
            assert!(history.iter().all(|r| r
                .payload
                .as_reading()
                .unwrap()
                .values
                .iter()
                .all(|v| v.source == source)));
            let live = served_value(&meter.sim, reg, span).unwrap();
            assert!(
                live >= energy[per_meter - 1],
                "{}: live {live} after {}",
                meter.id,
                energy[per_meter - 1]
            );
            assert!(live - energy[per_meter - 1] < 0.1);
        }

        // A second start: the store is not empty, nothing is added; and even a forced
        // second run stores nothing twice.
        let last = store.last_seq();
        assert_eq!(
            backfill_if_empty(&writer, &store, &plan).await.unwrap(),
            None
        );
        let again = backfill(&writer, &store, &plan).await.unwrap();
        assert_eq!((again.points, again.skipped), (0, 2 * 3 * per_meter));
        assert_eq!(store.last_seq(), last);
    }
}
