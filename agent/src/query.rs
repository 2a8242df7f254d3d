//! Queries over the stored readings (a library API; the HTTP endpoints call it).
//!
//! Windows are `[start_ms, end_ms)` in Unix milliseconds. Everything reads through
//! the store's per-meter time index and its CRC-checked read path, so a corrupt
//! record is quarantined and never answered as data.

use serde::Serialize;

pub use crate::analytics::series::{visit_series_15m, IntervalPoint, QueryError, Window};
use crate::analytics::{self, ClusterSummary, EnergyInfo};
use crate::derive::{self, Forecast, ForecastParams, Interval, WindowEnergy};
use crate::model::{Kind, Value};
use crate::store::{StateError, Store, StoreError};

/// How many meters [`top_meters`] returns unless told otherwise.
pub const DEFAULT_TOP: usize = 3;

/// One stored reading of a meter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadingPoint {
    pub ts_ms: i64,
    /// Gateway-wide sequence number of the record.
    pub seq: u64,
    pub values: Vec<Value>,
}

/// The readings of `meter` in `window`, in time order.
pub fn readings(
    store: &Store,
    meter: &str,
    window: Window,
) -> Result<Vec<ReadingPoint>, StoreError> {
    Ok(store
        .readings(meter, window.start_ms, window.end_ms)?
        .into_iter()
        .filter_map(|rec| {
            let seq = rec.seq;
            rec.payload.as_reading().map(|r| ReadingPoint {
                ts_ms: r.ts_ms,
                seq,
                values: r.values.clone(),
            })
        })
        .collect())
}

/// Energy of one meter in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterEnergy {
    pub meter: String,
    pub energy_kwh: f64,
}

/// Where a meter's energy in a window comes from. [`CounterEnergy`] is the first
/// version; the 15-minute interval series can take its place without changing the
/// queries built on it.
pub trait EnergySource {
    /// Energy of `meter` in `window`, kWh; `None` when there is no data to tell.
    fn energy_kwh(
        &self,
        store: &Store,
        meter: &str,
        window: Window,
    ) -> Result<Option<f64>, StoreError>;
}

/// Energy from a cumulative register (kind `energy_total`; the quantity named
/// `energy_total` when a reading has several): the sum of the increases between
/// consecutive readings in the window. A decrease is a reset or meter swap and
/// adds nothing, so the result is never negative. Only what lies between the first
/// and the last reading inside the window is counted (no interpolation to the
/// window's edges).
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterEnergy;

impl EnergySource for CounterEnergy {
    fn energy_kwh(
        &self,
        store: &Store,
        meter: &str,
        window: Window,
    ) -> Result<Option<f64>, StoreError> {
        let mut quantity: Option<String> = None;
        let mut last: Option<f64> = None;
        let mut total = 0.0;
        let mut counted = false;
        for rec in store.readings(meter, window.start_ms, window.end_ms)? {
            let Some(reading) = rec.payload.as_reading() else {
                continue;
            };
            // Stick to one register per meter: the first one seen.
            let quantity = quantity.get_or_insert_with(|| {
                let counters = || {
                    reading
                        .values
                        .iter()
                        .filter(|v| v.kind == Kind::EnergyTotal)
                };
                counters()
                    .find(|v| v.quantity == "energy_total")
                    .or_else(|| counters().next())
                    .map(|v| v.quantity.clone())
                    .unwrap_or_default()
            });
            let Some(kwh) = reading
                .values
                .iter()
                .find(|v| v.kind == Kind::EnergyTotal && &v.quantity == quantity)
                .and_then(|v| Some(v.value? * kwh_factor(&v.unit)?))
            else {
                continue;
            };
            if let Some(prev) = last {
                total += (kwh - prev).max(0.0);
                counted = true;
            }
            last = Some(kwh);
        }
        Ok(counted.then_some(total))
    }
}

fn kwh_factor(unit: &str) -> Option<f64> {
    match unit {
        "kWh" => Some(1.0),
        "Wh" => Some(1e-3),
        "MWh" => Some(1e3),
        _ => None,
    }
}

/// The `n` meters with the most energy in `window` (largest first; ties by id),
/// from their 15-minute intervals ([`IntervalEnergy`], falling back to the
/// cumulative registers for a meter without intervals). Meters without energy data
/// are left out.
pub fn top_meters(store: &Store, window: Window, n: usize) -> Result<Vec<MeterEnergy>, StoreError> {
    top_meters_by(store, window, n, &IntervalEnergy)
}

/// Energy from the stored 15-minute intervals and, at a window's partial edges, the
/// raw samples ([`energy`]). A meter without interval data falls back to
/// [`CounterEnergy`].
#[derive(Debug, Clone, Copy, Default)]
pub struct IntervalEnergy;

impl EnergySource for IntervalEnergy {
    fn energy_kwh(
        &self,
        store: &Store,
        meter: &str,
        window: Window,
    ) -> Result<Option<f64>, StoreError> {
        match energy(store, meter, window) {
            Ok(e) if e.coverage > 0.0 => Ok(Some(e.energy_kwh)),
            Ok(_) | Err(QueryError::NoEnergy(_)) => CounterEnergy.energy_kwh(store, meter, window),
            Err(QueryError::Store(e)) | Err(QueryError::State(StateError::Store(e))) => Err(e),
            Err(e) => {
                tracing::warn!(meter, error = %e, "interval energy unavailable; using the register");
                CounterEnergy.energy_kwh(store, meter, window)
            }
        }
    }
}

/// The 15-minute series of `meter`: every stored interval starting in `window`, the
/// latest revision of each, in time order.
///
/// Cost: one state-tree read per day of the window that has intervals (the index
/// lists their seqs) plus one record-block read per interval; no log scan.
pub fn series_15m(
    store: &Store,
    meter: &str,
    window: Window,
) -> Result<Vec<IntervalPoint>, QueryError> {
    let mut out = Vec::new();
    visit_series_15m(store, meter, window, usize::MAX, &mut |p| out.push(p))?;
    Ok(out)
}

/// The energy quantity the intervals of `meter` come from.
pub fn energy_info(store: &Store, meter: &str) -> Result<EnergyInfo, QueryError> {
    store
        .get_state::<EnergyInfo>(&analytics::info_key(meter))?
        .ok_or_else(|| QueryError::NoEnergy(meter.to_string()))
}

/// Total energy of `meter` in `window`, at any boundary: stored intervals for the
/// whole quarters inside the window, raw samples for the partial edges (read within
/// `max_gap` around each edge; see [`derive::energy_between`]).
pub fn energy(store: &Store, meter: &str, window: Window) -> Result<WindowEnergy, QueryError> {
    let info = energy_info(store, meter)?;
    let split = derive::WindowSplit::new(window.start_ms, window.end_ms);
    let intervals: Vec<Interval> = match split.full {
        Some((a, b)) => series_15m(store, meter, Window::new(a, b))?
            .into_iter()
            .map(|p| p.interval)
            .collect(),
        None => Vec::new(),
    };
    let reach = info.params.max_gap_ms.max(derive::INTERVAL_MS);
    let mut edge_samples = Vec::new();
    for (a, b) in [split.head, split.tail].into_iter().flatten() {
        for rec in store.readings(meter, a.saturating_sub(reach), b.saturating_add(reach))? {
            if let Some(r) = rec.payload.as_reading() {
                if let Some(v) = r
                    .values
                    .iter()
                    .find(|v| v.quantity == info.quantity)
                    .and_then(|v| v.value)
                {
                    edge_samples.push((r.ts_ms, v));
                }
            }
        }
    }
    Ok(derive::energy_between(
        info.kind,
        info.unit,
        &intervals,
        &edge_samples,
        &info.params,
        window.start_ms,
        window.end_ms,
    )?)
}

/// Forecast of `meter`'s energy per 15-minute interval and in total for `window`,
/// from its stored intervals that are fully backed by data, with the backtest error
/// on its own history ([`derive::forecast`]).
pub fn forecast(
    store: &Store,
    meter: &str,
    window: Window,
    params: &ForecastParams,
) -> Result<Forecast, QueryError> {
    let history: Vec<(i64, f64)> = series_15m(store, meter, Window::all())?
        .iter()
        .filter(|p| !p.interval.flags.gap && !p.interval.flags.reset)
        .map(|p| (p.interval.start_ms, p.interval.energy_kwh))
        .collect();
    Ok(derive::forecast(
        &history,
        window.start_ms,
        window.end_ms,
        params,
    )?)
}

/// The stored cluster summaries of every meter, by meter id. Never recomputes.
pub fn clusters(store: &Store) -> Result<Vec<ClusterSummary>, QueryError> {
    let mut out = Vec::new();
    for key in store.state_keys(analytics::CLUSTERS_PREFIX)? {
        if let Some(summary) = store.get_state::<ClusterSummary>(&key)? {
            out.push(summary);
        }
    }
    Ok(out)
}

/// [`top_meters`] with another source of energy figures.
pub fn top_meters_by(
    store: &Store,
    window: Window,
    n: usize,
    source: &dyn EnergySource,
) -> Result<Vec<MeterEnergy>, StoreError> {
    let mut all = Vec::new();
    for meter in store.meters()? {
        if let Some(energy_kwh) = source.energy_kwh(store, &meter, window)? {
            all.push(MeterEnergy { meter, energy_kwh });
        }
    }
    all.sort_by(|a, b| {
        b.energy_kwh
            .total_cmp(&a.energy_kwh)
            .then_with(|| a.meter.cmp(&b.meter))
    });
    all.truncate(n);
    Ok(all)
}

#[cfg(test)]
mod tests;
