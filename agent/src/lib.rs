//! edge-agent: reads energy meters over Modbus, stores every reading durably, and
//! publishes live state on an MQTT broker embedded in the process.
//!
//! Pipeline: `acquire` (one task per bus) and `ingest` (pushes over HTTP and MQTT) →
//! `store` (sled, CRC, gap-free seq, group commit) → `broker` (embedded rumqttd:
//! retained state, status, Home Assistant discovery), and `analytics` (15-minute
//! intervals, alarms, clusters) on the committed records. [`pipeline`] wires them
//! and shuts them down in order, so everything polled before a shutdown is flushed.

pub mod acquire;
pub mod alloc;
pub mod analytics;
#[cfg(feature = "tools")]
pub mod backfill;
pub mod broker;
pub mod cli;
pub mod config;
#[cfg(feature = "tools")]
pub mod demo;
pub mod derive;
pub mod ingest;
pub mod logging;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod service;
#[cfg(feature = "tools")]
pub mod sim;
pub mod status;
pub mod store;
pub mod sync;
#[cfg(feature = "tools")]
pub mod testkit;
#[cfg(feature = "tools")]
pub mod verify;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub use pipeline::{Hooks, Pipeline, StartHook};

/// Runs the agent until `shutdown` is cancelled, then stops the stages in pipeline
/// order: buses stop polling, the readings they produced are committed and flushed,
/// their state is published, and `offline` goes out last (see [`pipeline`]).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    Pipeline::new(config).run(shutdown).await
}

/// [`run`] with [`Hooks`].
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    Pipeline::new(config).hooks(hooks).run(shutdown).await
}

/// Builds the runtime, cancels on SIGTERM or SIGINT, and runs `f` to completion.
pub fn block_on_with_signals<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(alloc::trim_periodically());
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            on_signal.cancel();
        });
        f(shutdown).await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `edge-agent run`: the agent until SIGTERM/SIGINT.
pub fn run_until_signal(config: Config) -> anyhow::Result<()> {
    block_on_with_signals(|shutdown| run(config, shutdown))
}
