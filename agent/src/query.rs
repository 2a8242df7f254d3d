//! Queries over the stored readings (a library API; the HTTP endpoints call it).
//!
//! Windows are `[start_ms, end_ms)` in Unix milliseconds. Everything reads through
//! the store's per-meter time index and its CRC-checked read path, so a corrupt
//! record is quarantined and never answered as data.

use serde::Serialize;

use crate::model::{Kind, Value};
use crate::store::{Store, StoreError};

/// How many meters [`top_meters`] returns unless told otherwise.
pub const DEFAULT_TOP: usize = 3;

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
/// from their cumulative registers. Meters without energy data are left out.
pub fn top_meters(store: &Store, window: Window, n: usize) -> Result<Vec<MeterEnergy>, StoreError> {
    top_meters_by(store, window, n, &CounterEnergy)
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
