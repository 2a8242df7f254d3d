//! `edge-agent sim`: simulated meters of one profile served over Modbus TCP, as a
//! separate process (a load for footprint measurements, a meter for a bench setup).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use super::{serve_tcp, SimBus, SimMeter};
use crate::acquire::profile::{self, Profile};

/// Most meters one simulator serves: Modbus unit ids 1..=247.
pub const MAX_SIM_METERS: u8 = 247;

#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Built-in register map of every meter (sdm630, sdm120, ...).
    #[arg(long, default_value = "sdm630")]
    pub profile: String,
    /// Number of meters, served as Modbus unit ids 1..=N (at most 247).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=247))]
    pub meters: u8,
    /// Address of the Modbus TCP listener that serves every meter.
    #[arg(long, default_value = "127.0.0.1:5020")]
    pub listen: SocketAddr,
}

/// The simulated bus: `meters` meters of `profile` at unit ids 1..=meters, each with
/// its own seed so their values differ.
pub fn sim_bus(profile: &Arc<Profile>, meters: u8) -> SimBus {
    let mut bus = SimBus::new();
    for unit in 1..=meters.min(MAX_SIM_METERS) {
        bus.insert(unit, SimMeter::new(profile.clone(), u64::from(unit)));
    }
    bus
}

/// Serves the meters until SIGTERM or SIGINT.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let profile = profile::builtin(&args.profile)
        .map(Arc::new)
        .with_context(|| {
            let known: Vec<&str> = profile::builtin_names().collect();
            format!(
                "--profile: unknown built-in profile `{}` (known: {})",
                args.profile,
                known.join(", ")
            )
        })?;
    crate::block_on_with_signals(|shutdown| async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen: binding {}", args.listen))?;
        let bus = Arc::new(sim_bus(&profile, args.meters));
        println!(
            "edge-agent sim: {} {} meter(s) as unit ids 1..={} on Modbus TCP {}",
            args.meters,
            args.profile,
            args.meters,
            listener.local_addr()?
        );
        serve_tcp(listener, bus, shutdown)
            .await
            .context("serving the simulated meters")
    })
}
