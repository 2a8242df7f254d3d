//! edge-agent: reads energy meters over Modbus, stores every reading durably, and
//! publishes live state on an MQTT broker embedded in the process.
//!
//! Pipeline: `acquire` (one task per bus) and `ingest` (pushes over HTTP and MQTT) →
//! `store` (sled, CRC, gap-free seq, group commit) → `broker` (embedded rumqttd:
//! retained state, status, Home Assistant discovery), and `analytics` (15-minute
//! intervals, alarms, clusters) on the committed records. [`run`] wires them
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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::broker::LocalBroker;
use crate::config::Config;
use crate::model::{Payload, Reading};
use crate::store::{Store, StoreWriter};

/// How long a bus task may take to stop after shutdown before it is abandoned.
const BUS_STOP_LIMIT: Duration = Duration::from_secs(3);
/// How long the upstream sync may take to say `offline` and disconnect.
const SYNC_STOP_LIMIT: Duration = Duration::from_secs(2);
/// How often a full disk is checked for room: to open the store at start, and to
/// restart after a failed store write.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Work that needs the open store and its writer before the meters are polled (the
/// demo's history backfill). See [`Hooks::before_polling`].
pub type StartHook = Box<
    dyn FnOnce(Arc<Store>, StoreWriter) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
        + Send,
>;

/// Extension points of [`run_with`].
#[derive(Default)]
pub struct Hooks {
    /// Called once the store, its writer and the publisher run, before any bus task
    /// starts; polling starts when its future completes, so what it writes comes
    /// before the live readings in seq order. A shutdown meanwhile drops the future
    /// (its commits are each all-or-nothing). An error is logged and the agent runs on.
    pub before_polling: Option<StartHook>,
    /// Called with the embedded broker once it listens (tests: fault injection).
    pub on_broker: Option<Box<dyn FnOnce(Arc<LocalBroker>) + Send>>,
    /// The HTTP interface's listener, bound by the caller (non-blocking): served
    /// instead of binding `http.listen`, so the caller knows the address (port 0
    /// included) before the agent starts, and nothing else can take it meanwhile.
    pub http_listener: Option<std::net::TcpListener>,
}

/// Runs the agent until `shutdown` is cancelled, then stops the stages in pipeline
/// order: buses stop polling, the readings they produced are committed and flushed,
/// their state is published, and `offline` goes out last.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, Hooks::default()).await
}

/// [`run`] with [`Hooks`].
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> anyhow::Result<()> {
    // What the configuration names outside itself is checked before anything is
    // created: the TLS files and the broker's settings file (read with a size cap).
    // The rules of the file itself are checked when it is loaded (`Config::load`,
    // which `edge-agent run` uses); tests may set values below them on purpose.
    config
        .check_files()
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let service = service::Service::from_env();
    // Cancelled by the caller, or by the store monitor to restart after a failed
    // store write (see `store::health`).
    let shutdown = shutdown.child_token();
    let Some(store) = open_store(&config.store, &shutdown).await? else {
        tracing::info!("shutdown while waiting for room to open the store");
        return Ok(());
    };
    let store = Arc::new(store);
    // Without an upstream nothing waits for an acknowledgement: the quota deletes
    // the oldest records without counting them as dropped.
    store.set_forwarding(config.upstream.is_some());
    tracing::info!(
        path = %config.store.path.display(),
        last_seq = store.last_seq(),
        "store open"
    );
    let broker = LocalBroker::start(&config.mqtt, &config.gateway_id)?;
    broker.publish_status(true)?;
    tracing::info!(listen = %broker.listen, "embedded broker listening");
    // Restarts the broker after a failure; nothing else waits for it.
    let supervisor_stop = CancellationToken::new();
    let supervisor = tokio::spawn(broker::supervise(broker.clone(), supervisor_stop.clone()));
    if let Some(hook) = hooks.on_broker {
        hook(broker.clone());
    }

    let (committed_tx, committed_rx) = broadcast::channel(256);
    // Subscribed before the writer starts: the analytics stage sees every commit.
    let analytics_rx = committed_tx.subscribe();
    let status_rx = committed_tx.subscribe();
    let discovery_rx = committed_tx.subscribe();
    let availability_rx = committed_tx.subscribe();
    let publisher_stop = CancellationToken::new();
    let publisher = tokio::spawn(broker::run_state_publisher(
        broker.clone(),
        committed_rx,
        publisher_stop.clone(),
    ));
    // Upstream sync (optional): wakes on committed records, replays from its cursor.
    let sync_stop = CancellationToken::new();
    let upstream = match &config.upstream {
        Some(cfg) => Some(sync::start(
            store.clone(),
            cfg,
            &config.gateway_id,
            &config.mqtt.topic_prefix,
            committed_tx.subscribe(),
            sync_stop.clone(),
        )?),
        None => None,
    };
    let (writer, writer_task) = store::start_writer(
        store.clone(),
        config.store.flush_interval.0,
        config.store.max_batch,
        committed_tx,
    );
    // Push ingest (HTTP and MQTT) shares the writer with the buses; closed at shutdown
    // so the writer can end.
    // Pushes for polled meters are refused unless the meter accepts them.
    let polled = config
        .meters
        .iter()
        .filter(|m| !m.accept_push)
        .map(|m| m.id.clone())
        .collect();
    let ingestor = ingest::Ingestor::with_polled(
        store.clone(),
        writer.clone(),
        ingest::IngestLimits::default(),
        polled,
    );
    let analytics = analytics::Analytics::start(
        store.clone(),
        writer.clone(),
        analytics_rx,
        Some(broker.clone()),
        Some(&config.mqtt),
        analytics::AnalyticsSettings::from_config(&config),
    );
    ingestor.set_intervals(analytics.shared.clone());

    if let Some(hook) = hooks.before_polling {
        tokio::select! {
            result = hook(store.clone(), writer.clone()) => {
                if let Err(e) = result {
                    tracing::warn!(error = %format!("{e:#}"), "start hook failed");
                }
            }
            _ = shutdown.cancelled() => tracing::info!("shutdown before polling started"),
        }
    }

    let plans = acquire::plan_meters(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Readings handed to the writer, for the watchdog's liveness check.
    let forwarded = Arc::new(AtomicU64::new(0));
    let liveness = service::pipeline_liveness(
        store.clone(),
        store.last_seq(),
        forwarded.clone(),
        config.store.flush_interval.0,
        &plans,
    );
    // The same heartbeats for /readyz, and the meters' counters for the status page.
    let liveness_view = service::pipeline_liveness(
        store.clone(),
        store.last_seq(),
        forwarded.clone(),
        config.store.flush_interval.0,
        &plans,
    );
    // And for the gateway's status topic (`broker::run_health`).
    let liveness_health = service::pipeline_liveness(
        store.clone(),
        store.last_seq(),
        forwarded.clone(),
        config.store.flush_interval.0,
        &plans,
    );
    let status_meters = status::MeterSource::from_plans(&plans);
    let discovery_stop = CancellationToken::new();
    let discovery = if config.mqtt.homeassistant_discovery {
        let meters = broker::discovery::DiscoveryMeter::from_plans(&plans);
        let configs = broker::discovery::Discovery::new(
            broker.topics.clone(),
            &config.mqtt.homeassistant_prefix,
            meters,
        )
        .with_identities(&plans);
        Some(broker::discovery::start(
            broker.clone(),
            &config.mqtt,
            configs,
            discovery_rx,
            discovery_stop.clone(),
        ))
    } else {
        drop(discovery_rx);
        None
    };
    let availability_stop = CancellationToken::new();
    let availability = broker::availability::start(
        broker.clone(),
        broker::availability::Availability::new(
            &config.availability,
            plans
                .iter()
                .flat_map(|(_, meters)| meters.iter().map(|m| m.stats.clone()))
                .collect(),
        ),
        availability_rx,
        availability_stop.clone(),
    );
    let (reading_tx, mut reading_rx) = mpsc::channel::<Reading>(1024);
    let bus_stop = CancellationToken::new();
    let mut buses = Vec::new();
    for (bus, meters) in plans {
        tracing::info!(bus = %bus.id, meters = meters.len(), "bus task starting");
        buses.push(tokio::spawn(acquire::run_bus(
            bus,
            meters,
            reading_tx.clone(),
            bus_stop.clone(),
        )));
    }
    drop(reading_tx);

    // Readings go to the store's group-commit writer; the writer answers once they are
    // durable and hands the committed records to the publisher.
    let forwarder = tokio::spawn(async move {
        let mut last_durable = None;
        while let Some(reading) = reading_rx.recv().await {
            match writer.submit(Payload::Reading(reading)).await {
                Ok(durable) => {
                    forwarded.fetch_add(1, Ordering::Relaxed);
                    last_durable = Some(durable);
                }
                Err(e) => tracing::error!(error = %e, "store writer is gone; reading not stored"),
            }
        }
        // The writer commits in order: once the last reading is durable, all are.
        if let Some(durable) = last_durable {
            let _ = durable.await;
        }
        // `writer` drops here: the writer task commits what is pending and ends.
    });

    let ingest_stop = CancellationToken::new();
    let mqtt_ingest = ingest::mqtt::start(
        ingestor.clone(),
        &config.mqtt,
        broker.topics.clone(),
        ingest_stop.clone(),
    );

    // The HTTP status interface; a port in use is logged and the agent runs on without it.
    let readiness_of = |liveness| {
        let mut readiness = status::Readiness::new(liveness);
        readiness.watch_task("the store writer", writer_task.abort_handle());
        readiness.watch_task("the MQTT ingest", mqtt_ingest.abort_handle());
        for (i, bus) in buses.iter().enumerate() {
            readiness.watch_task(format!("bus task {i}"), bus.abort_handle());
        }
        readiness
    };
    let readiness = readiness_of(liveness_view);
    // The gateway's status topic says `offline` while the agent runs but is not
    // ready (the same check as /readyz), or its store failed.
    let health = readiness_of(liveness_health);
    let health_store = store.clone();
    let health_stop = CancellationToken::new();
    let health_task = tokio::spawn(broker::run_health(
        broker.clone(),
        move || {
            if health_store.has_failed() {
                return Err("the store failed".to_string());
            }
            health.check()
        },
        broker::HEALTH_EVERY,
        health_stop.clone(),
    ));
    let status_stop = CancellationToken::new();
    let status_sources = status::StatusSources {
        gateway_id: config.gateway_id.clone(),
        store: store.clone(),
        quota_bytes: config.store.quota.0,
        meters: status_meters,
        readiness,
        ingest: Some(ingestor.clone()),
        upstream: upstream.as_ref().map(|u| u.status.clone()),
        broker: Some(broker.stats.clone()),
        analytics: Some(analytics.shared.clone()),
    };
    let status_server = match status::start(
        &config.http,
        hooks.http_listener,
        status_sources,
        status_rx,
        status_stop.clone(),
    )
    .await
    {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "HTTP status interface not started");
            None
        }
    };

    // Store open, broker listening, bus tasks started: tell systemd (Type=notify).
    let watchdog_stop = CancellationToken::new();
    service.ready(liveness, watchdog_stop.clone());

    let restart = tokio::spawn(restart_after_store_failure(store.clone(), shutdown.clone()));
    shutdown.cancelled().await;
    // Ended already when the store asked for the restart; aborted otherwise.
    let restart_needed = restart.is_finished() && store.has_failed();
    restart.abort();
    tracing::info!("shutting down");
    service.stopping();
    // `offline` first: Home Assistant shows the gateway `off` while it drains (and
    // again at the end, after the last states).
    health_stop.cancel();
    let _ = health_task.await;
    if let Err(e) = broker.publish_status(false) {
        tracing::warn!(error = %e, "`offline` not published");
    }
    watchdog_stop.cancel();
    bus_stop.cancel();
    for bus in buses {
        if tokio::time::timeout(BUS_STOP_LIMIT, bus).await.is_err() {
            tracing::warn!("a bus task did not stop in time");
        }
    }
    // Pushes under way finish; later ones are refused. Then no ingest path holds
    // the writer.
    ingest_stop.cancel();
    if tokio::time::timeout(BUS_STOP_LIMIT * 2, mqtt_ingest)
        .await
        .is_err()
    {
        tracing::warn!("the MQTT ingest did not stop in time");
    }
    ingestor.close();
    let _ = forwarder.await;
    // Analytics processes every stored reading, saves its state and drops its writer
    // handle; then the writer can end.
    analytics.stop().await;
    let _ = writer_task.await;
    publisher_stop.cancel();
    let _ = publisher.await;
    availability_stop.cancel();
    let _ = availability.await;
    discovery_stop.cancel();
    if let Some(task) = discovery {
        let _ = tokio::time::timeout(BUS_STOP_LIMIT, task).await;
    }
    if let Some(upstream) = upstream {
        sync_stop.cancel();
        if tokio::time::timeout(SYNC_STOP_LIMIT, upstream.task)
            .await
            .is_err()
        {
            tracing::warn!("the upstream sync did not stop in time");
        }
    }
    store.flush().context("final store flush")?;
    supervisor_stop.cancel();
    let _ = supervisor.await;
    if let Err(e) = broker.publish_status(false) {
        tracing::warn!(error = %e, "`offline` not published");
    }
    // The router thread forwards `offline` asynchronously; give it a moment before the
    // process (and with it the broker) goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    status_stop.cancel();
    if let Some(server) = status_server {
        if tokio::time::timeout(BUS_STOP_LIMIT, server.stopped())
            .await
            .is_err()
        {
            tracing::warn!("the HTTP server did not stop in time");
        }
    }
    if restart_needed {
        anyhow::bail!(
            "stopped to reopen the store after a failed write; the service manager starts the agent again"
        );
    }
    if store.has_failed() {
        anyhow::bail!("stopped with a failed store write; it reopens at the next start");
    }
    tracing::info!(last_seq = store.last_seq(), "stopped cleanly");
    Ok(())
}

/// Opens the store. A full disk is not a reason to exit (the service manager would
/// restart the agent into the same failure until it gave up): the open is tried
/// again until it succeeds or `shutdown` (then `None`).
async fn open_store(
    cfg: &config::StoreConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let mut logged = false;
    loop {
        match Store::open(cfg) {
            Ok(store) => {
                if logged {
                    tracing::info!("the disk has room again; store open");
                }
                return Ok(Some(store));
            }
            Err(e) if e.is_no_space() => {
                if !logged {
                    tracing::error!(
                        error = %e,
                        "disk full: cannot open the store; trying again until there is room"
                    );
                    logged = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(DISK_CHECK_EVERY) => {}
                }
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("opening the store at {}", cfg.path.display()))
            }
        }
    }
}

/// After a failed store write (sled takes no more writes in this process, see
/// `store::health`), the agent polls on into memory; once the disk has room again
/// it stops, so that a new start reopens the store. One restart per failure.
async fn restart_after_store_failure(store: Arc<Store>, shutdown: CancellationToken) {
    loop {
        tokio::time::sleep(DISK_CHECK_EVERY).await;
        if store.has_failed() && store.has_room() {
            tracing::error!(
                "the store failed a write earlier and the disk has room again: stopping so that the agent restarts with the store reopened"
            );
            shutdown.cancel();
            return;
        }
    }
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
