//! Acquisition: meter profiles, register decoding, block planning and one polling
//! task per bus.

#[cfg(feature = "tools")]
pub mod bench;
pub mod bus;
pub mod config;
pub mod decode;
pub mod mbap;
pub mod p1;
pub mod plan;
pub mod profile;
pub mod scan;
pub mod serial;
pub mod stats;
pub mod sunspec;

pub use bus::{plan_meters, run_bus, MeterPlan};
pub use plan::Block;
pub use stats::{LatencyHistogram, MeterState, MeterStats, MeterStatsSnapshot};

#[cfg(test)]
mod bus_tests;
#[cfg(test)]
mod p1_tests;
#[cfg(test)]
mod profile_tests;
#[cfg(test)]
mod sunspec_tests;
#[cfg(test)]
mod test_server;
