//! Energy analytics derived from stored readings: pure functions, no I/O.
//!
//! - [`intervals`]: clock-aligned 15-minute energy intervals for `power`,
//!   `energy_delta` and `energy_total` series, an incremental [`IntervalTracker`]
//!   that closes intervals behind a data watermark and revises them on late data, and
//!   the energy of any window ([`energy_between`], [`energy_between_samples`]).
//! - [`clusters`]: operating-state clusters of 15-minute mean power (exact 1-D
//!   k-means by dynamic programming, as in Ckmeans.1d.dp).
//! - [`forecast`]: energy forecast per 15-minute interval from a slot-of-day profile
//!   plus a linear trend, with its backtest error on the meter's own history.
//!
//! The worker that feeds these from the store and publishes their results lives
//! elsewhere; everything here takes slices and returns serializable values.

#[cfg(feature = "tools")]
pub mod bench;
pub mod clusters;
pub mod forecast;
pub mod intervals;

pub use clusters::{cluster_intervals, Cluster, ClusterCount, ClusterStats, HourCount, KScore};
pub use forecast::{forecast, Backtest, Forecast, ForecastInterval, ForecastParams};
pub use intervals::{
    compute_intervals, energy_between, energy_between_samples, Interval, IntervalFlags,
    IntervalParams, IntervalTracker, PushOutcome, TrackerParams, Unit, WindowEnergy, WindowSplit,
    INTERVAL_MS,
};

/// Why a derivation cannot be computed from its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeriveError {
    /// Only `power`, `energy_delta` and `energy_total` quantities carry energy.
    #[error("quantity kind `{0}` carries no energy")]
    NotEnergy(&'static str),
    /// The unit does not fit the kind (e.g. `kWh` for `power`).
    #[error("unit `{unit}` does not fit kind `{kind}`")]
    UnitMismatch {
        kind: &'static str,
        unit: &'static str,
    },
    /// A unit string other than W, kW, Wh, kWh.
    #[error("unknown unit `{0}` (expected W, kW, Wh or kWh)")]
    UnknownUnit(String),
    /// The window is empty or reversed.
    #[error("empty window: end {end_ms} is not after start {start_ms}")]
    EmptyWindow { start_ms: i64, end_ms: i64 },
    /// The span would need more intervals than the limit (protects memory).
    #[error("span of {intervals} intervals exceeds the limit of {limit}")]
    SpanTooLong { intervals: i64, limit: i64 },
    /// A forecast needs at least one interval of history.
    #[error("no history to forecast from")]
    NoHistory,
}
