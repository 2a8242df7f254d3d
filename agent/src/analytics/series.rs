//! Reading the analytics stage's stored intervals back: a meter's 15-minute series
//! from the day index the worker writes. `query` answers questions with it, and
//! the worker's cluster recompute reads with it too; it lives here so that the
//! analytics stage does not import the query layer above it.

use serde::Serialize;

use super::IntervalRef;
use crate::derive::DeriveError;
use crate::model::{Interval, Payload};
use crate::store::{StateError, Store, StoreError};

/// Why an analytics query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Derive(#[from] DeriveError),
    /// No energy quantity is known for the meter (no reading with one was processed).
    #[error("no energy data for meter `{0}`")]
    NoEnergy(String),
}

/// A half-open time window `[start_ms, end_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Window {
    pub fn new(start_ms: i64, end_ms: i64) -> Window {
        Window { start_ms, end_ms }
    }

    /// Everything stored.
    pub fn all() -> Window {
        Window::new(i64::MIN, i64::MAX)
    }
}

impl Default for Window {
    fn default() -> Self {
        Window::all()
    }
}

/// One stored interval of a meter's series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntervalPoint {
    /// Seq of the interval record.
    pub seq: u64,
    pub quantity: String,
    #[serde(flatten)]
    pub interval: Interval,
}

/// `query::series_15m` handed to `visit` point by point, in time order, reading at most
/// `days_per_step` days of the index (and their intervals' records) at a time: the
/// memory it holds is bounded by the step, not by the length of the series. Each
/// interval start lies in exactly one day, so the points are those of
/// `query::series_15m` whatever the step.
pub fn visit_series_15m(
    store: &Store,
    meter: &str,
    window: Window,
    days_per_step: usize,
    visit: &mut dyn FnMut(IntervalPoint),
) -> Result<(), QueryError> {
    let prefix = super::index_prefix(meter);
    let first_day = super::index_key(meter, window.start_ms.max(0));
    let last_day = super::index_key(meter, window.end_ms.saturating_sub(1).max(0));
    let days: Vec<String> = store
        .state_keys(&prefix)?
        .into_iter()
        .filter(|key| *key >= first_day && *key <= last_day)
        .collect();
    for step in days.chunks(days_per_step.max(1)) {
        let mut refs: Vec<IntervalRef> = Vec::new();
        for key in step {
            if let Some(day) = store.get_state::<Vec<IntervalRef>>(key)? {
                refs.extend(
                    day.into_iter()
                        .filter(|r| (window.start_ms..window.end_ms).contains(&r.start_ms)),
                );
            }
        }
        let latest = super::latest_per_start(refs);
        let seqs: Vec<u64> = latest.iter().map(|r| r.seq).collect();
        let mut found = store.records_by_seq(&seqs)?;
        for r in &latest {
            let Some(rec) = found.remove(&r.seq) else {
                continue;
            };
            if let Payload::Interval(iv) = rec.payload {
                if iv.meter == meter {
                    visit(IntervalPoint {
                        seq: rec.seq,
                        quantity: iv.quantity,
                        interval: iv.interval,
                    });
                }
            }
        }
    }
    Ok(())
}
