//! The agent's pipeline: [`Pipeline`] starts the stages in flow order and returns
//! them as one [`Running`], whose [`Running::stop`] is the one shutdown path.
//!
//! Start, upstream first: store → embedded broker and its supervisor → state
//! publisher → upstream sync → store writer → push ingest and analytics → (the start
//! hook) → discovery, availability → bus tasks and their forwarder → MQTT ingest →
//! health reporter, HTTP interface → systemd `READY=1`.
//!
//! Stop, in reverse, each step awaiting the tasks it stopped (never a sleep):
//! 1. the health reporter and the watchdog, then `offline`;
//! 2. intake: the bus tasks, then the MQTT ingest, then push ingest is closed (HTTP
//!    pushes under way finish, later ones are refused);
//! 3. the store: the forwarder hands over the last readings, analytics processes
//!    everything stored and saves its state, the writer commits what is pending;
//! 4. the outputs: the state publisher (the last states), availability, discovery;
//! 5. the upstream sync (its own `offline`, then disconnect);
//! 6. the final store flush, the broker supervisor, `offline` once more, after the
//!    last states, awaited until the broker has handled it;
//! 7. the HTTP interface, which answered (with `/readyz` failing) meanwhile.
//!
//! The stages' stop tokens form one cancellation tree in that order: each step's
//! token is a child of the next step's, so no stage outlives one it feeds, and
//! dropping a [`Running`] without stopping it cancels every stage at once.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::analytics::{Analytics, AnalyticsSettings};
use crate::broker::LocalBroker;
use crate::config::Config;
use crate::ingest::Ingestor;
use crate::model::{Payload, Reading, Record};
use crate::service::{self, Service};
use crate::store::{Store, StoreWriter};
use crate::{acquire, broker, config, ingest, status, store, sync};

/// How long a bus task (and the HTTP server, and discovery) may take to stop after
/// shutdown before it is abandoned; the MQTT ingest gets twice as long.
const BUS_STOP_LIMIT: Duration = Duration::from_secs(3);
/// How long the upstream sync may take to say `offline` and disconnect.
const SYNC_STOP_LIMIT: Duration = Duration::from_secs(2);
/// How long the broker may take to handle the last `offline`.
const OFFLINE_LIMIT: Duration = Duration::from_secs(1);
/// How often a full disk is checked for room: to open the store at start, and to
/// restart after a failed store write.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long the start waits for the MQTT ingest's subscription before it goes on (not
/// ready until the subscription stands).
const INGEST_SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// Work that needs the open store and its writer before the meters are polled (the
/// demo's history backfill). See [`Hooks::before_polling`].
pub type StartHook = Box<
    dyn FnOnce(Arc<Store>, StoreWriter) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>
        + Send,
>;

/// Extension points of the pipeline.
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

/// What to start. [`Pipeline::new`] starts every stage the configuration names; the
/// `without_*` settings leave parts out (tests, tools).
pub struct Pipeline {
    config: Config,
    hooks: Hooks,
    store: Option<Arc<Store>>,
    analytics: Option<AnalyticsSettings>,
    broker: bool,
    http: bool,
}

impl Pipeline {
    pub fn new(config: Config) -> Pipeline {
        Pipeline {
            config,
            hooks: Hooks::default(),
            store: None,
            analytics: None,
            broker: true,
            http: true,
        }
    }

    pub fn hooks(mut self, hooks: Hooks) -> Pipeline {
        self.hooks = hooks;
        self
    }

    /// Runs on this open store instead of opening `store.path`.
    pub fn store(mut self, store: Arc<Store>) -> Pipeline {
        self.store = Some(store);
        self
    }

    /// These analytics settings instead of the ones the configuration gives.
    pub fn analytics(mut self, settings: AnalyticsSettings) -> Pipeline {
        self.analytics = Some(settings);
        self
    }

    /// No embedded broker, and so nothing that publishes on it or reads from it:
    /// states, discovery, availability, the status topic, the MQTT ingest.
    pub fn without_broker(mut self) -> Pipeline {
        self.broker = false;
        self
    }

    /// No HTTP interface.
    pub fn without_http(mut self) -> Pipeline {
        self.http = false;
        self
    }

    /// Starts the pipeline and runs it until `shutdown` is cancelled (or the store
    /// asks for a restart), then stops it ([`Running::stop`]).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        match self.start(shutdown).await? {
            Some(running) => {
                let requested = running.stop_requested();
                requested.await;
                running.stop().await
            }
            None => Ok(()),
        }
    }

    /// Starts every stage in flow order. `None` when `shutdown` came while waiting
    /// for room on a full disk to open the store.
    pub async fn start(self, shutdown: CancellationToken) -> anyhow::Result<Option<Running>> {
        let Pipeline {
            config,
            hooks,
            store,
            analytics,
            broker: with_broker,
            http: with_http,
        } = self;
        // What the configuration names outside itself is checked before anything is
        // created: the TLS files and the broker's settings file (read with a size cap).
        // The rules of the file itself are checked when it is loaded (`Config::load`,
        // which `edge-agent run` uses); tests may set values below them on purpose.
        config
            .check_files()
            .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
        let plans = acquire::plan_meters(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        // Cancelled by the caller, or by the store monitor to restart after a failed
        // store write (see `store::health`).
        let trigger = shutdown.child_token();
        let store = match store {
            Some(store) => store,
            None => match open_store(&config.store, &trigger).await? {
                Some(store) => Arc::new(store),
                None => {
                    tracing::info!("shutdown while waiting for room to open the store");
                    return Ok(None);
                }
            },
        };
        // Without an upstream nothing waits for an acknowledgement: the quota deletes
        // the oldest records without counting them as dropped.
        store.set_forwarding(config.upstream.is_some());
        tracing::info!(
            path = %config.store.path.display(),
            last_seq = store.last_seq(),
            "store open"
        );
        let tree = StopTree::new();
        let mut s = Starting {
            // Until the start completes, an error stops what ran.
            _root: tree.http.clone().drop_guard(),
            stages: Stages::new(&tree),
            tree,
            config: &config,
            store,
            broker: None,
        };
        if with_broker {
            s.broker(hooks.on_broker)?;
        }
        let (committed, committed_rx) = broadcast::channel(256);
        // Subscribed before the writer starts: each of these sees every commit.
        let analytics_rx = committed.subscribe();
        let status_rx = with_http.then(|| committed.subscribe());
        s.publisher(committed_rx);
        let upstream = s.upstream(&committed)?;
        let discovery_rx = s.broker.as_ref().map(|_| committed.subscribe());
        let availability_rx = s.broker.as_ref().map(|_| committed.subscribe());
        let core = s.core(committed, analytics_rx, analytics);
        if let Some(hook) = hooks.before_polling {
            tokio::select! {
                result = hook(s.store.clone(), core.writer.clone()) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %format!("{e:#}"), "start hook failed");
                    }
                }
                _ = trigger.cancelled() => tracing::info!("shutdown before polling started"),
            }
        }
        // Readings handed to the writer, for the liveness checks: the watchdog's,
        // /readyz's and the status topic's, each with its own heartbeat history.
        let forwarded = Arc::new(AtomicU64::new(0));
        let start_seq = s.store.last_seq();
        let liveness = || {
            service::pipeline_liveness(
                s.store.clone(),
                start_seq,
                forwarded.clone(),
                config.store.flush_interval.0,
                &plans,
            )
        };
        let (watchdog_liveness, view_liveness, health_liveness) =
            (liveness(), liveness(), liveness());
        let status_meters = status::MeterSource::from_plans(&plans);
        s.outputs(&plans, discovery_rx, availability_rx);
        let mut watched = vec![(
            "the store writer".to_string(),
            core.writer_task.abort_handle(),
        )];
        let forwarder = s.buses(plans, &core.writer, forwarded, &mut watched);
        let ingest_subscribed = s.mqtt_ingest(&core.ingestor, &mut watched);
        if let Some(subscribed) = &ingest_subscribed {
            // The status topic and /readyz say ready only once a push over MQTT has a
            // subscriber; waiting here keeps them from saying `offline` for the few
            // milliseconds the subscription takes at every start.
            let mut subscribed = subscribed.clone();
            tokio::select! {
                result = tokio::time::timeout(INGEST_SUBSCRIBE_WAIT, subscribed.wait_for(|s| *s)) => {
                    if result.is_err() {
                        tracing::warn!(
                            waited = ?INGEST_SUBSCRIBE_WAIT,
                            "the MQTT ingest has not subscribed yet; not ready until it has"
                        );
                    }
                }
                _ = trigger.cancelled() => {}
            }
        }
        let readiness = |liveness| {
            let mut readiness = status::Readiness::new(liveness);
            for (name, task) in &watched {
                readiness.watch_task(name.clone(), task.clone());
            }
            if let Some(subscribed) = &ingest_subscribed {
                readiness.require(
                    "the MQTT ingest is not subscribed on the embedded broker yet",
                    subscribed.clone(),
                );
            }
            readiness
        };
        s.health(readiness(health_liveness));
        let mut http_addr = None;
        if let Some(status_rx) = status_rx {
            let sources = status::StatusSources {
                gateway_id: config.gateway_id.clone(),
                store: s.store.clone(),
                quota_bytes: config.store.quota.0,
                meters: status_meters,
                readiness: readiness(view_liveness),
                ingest: Some(core.ingestor.clone()),
                upstream,
                broker: s.broker.as_ref().map(|b| b.stats.clone()),
                analytics: Some(core.analytics.shared.clone()),
            };
            http_addr = s.http(hooks.http_listener, sources, status_rx).await;
        }
        // Store open, broker listening, bus tasks started: tell systemd (Type=notify).
        let service = Service::from_env();
        service.ready(watchdog_liveness, s.tree.health.clone());
        let restart = tokio::spawn(restart_after_store_failure(
            s.store.clone(),
            trigger.clone(),
        ));
        Ok(Some(Running {
            store: s.store,
            writer: Some(core.writer),
            broker: s.broker,
            http_addr,
            trigger,
            service,
            restart,
            ingestor: core.ingestor,
            forwarder,
            analytics: core.analytics,
            writer_task: core.writer_task,
            stages: s.stages,
            _root: s._root,
        }))
    }
}

/// A pipeline being started: what runs so far.
struct Starting<'a> {
    config: &'a Config,
    store: Arc<Store>,
    broker: Option<Arc<LocalBroker>>,
    tree: StopTree,
    stages: Stages,
    _root: DropGuard,
}

/// The store writer and the stages that share it with the buses.
struct Core {
    writer: StoreWriter,
    writer_task: JoinHandle<()>,
    ingestor: Arc<Ingestor>,
    analytics: Analytics,
}

impl Starting<'_> {
    /// The embedded broker, `online`, and its supervisor.
    fn broker(
        &mut self,
        on_broker: Option<Box<dyn FnOnce(Arc<LocalBroker>) + Send>>,
    ) -> anyhow::Result<()> {
        let broker = LocalBroker::start(&self.config.mqtt, &self.config.gateway_id)?;
        broker.publish_status(true)?;
        tracing::info!(listen = %broker.listen, "embedded broker listening");
        // Restarts the broker after a failure; nothing else waits for it.
        self.stages.supervisor.spawn(
            "the broker supervisor",
            broker::supervise(broker.clone(), self.tree.supervisor.clone()),
            None,
        );
        if let Some(hook) = on_broker {
            hook(broker.clone());
        }
        self.broker = Some(broker);
        Ok(())
    }

    /// The retained state of each meter, from the committed records.
    fn publisher(&mut self, committed: broadcast::Receiver<Arc<Vec<Record>>>) {
        if let Some(broker) = &self.broker {
            self.stages.outputs.spawn(
                "the state publisher",
                broker::run_state_publisher(broker.clone(), committed, self.tree.outputs.clone()),
                None,
            );
        }
    }

    /// The upstream sync (optional): wakes on committed records, replays from its
    /// cursor. Returns its figures for the status interface.
    fn upstream(
        &mut self,
        committed: &broadcast::Sender<Arc<Vec<Record>>>,
    ) -> anyhow::Result<Option<watch::Receiver<sync::SyncStatus>>> {
        let Some(cfg) = &self.config.upstream else {
            return Ok(None);
        };
        let upstream = sync::start(
            self.store.clone(),
            cfg,
            &self.config.gateway_id,
            &self.config.mqtt.topic_prefix,
            committed.subscribe(),
            self.tree.sync.clone(),
        )?;
        self.stages
            .sync
            .add("the upstream sync", upstream.task, Some(SYNC_STOP_LIMIT));
        Ok(Some(upstream.status))
    }

    /// The store's group-commit writer, push ingest and analytics. Push ingest (HTTP
    /// and MQTT) shares the writer with the buses; pushes for polled meters are
    /// refused unless the meter accepts them.
    fn core(
        &mut self,
        committed: broadcast::Sender<Arc<Vec<Record>>>,
        analytics_rx: broadcast::Receiver<Arc<Vec<Record>>>,
        settings: Option<AnalyticsSettings>,
    ) -> Core {
        let config = self.config;
        let (writer, writer_task) = store::start_writer(
            self.store.clone(),
            config.store.flush_interval.0,
            config.store.max_batch,
            committed,
        );
        let polled = config
            .meters
            .iter()
            .filter(|m| !m.accept_push)
            .map(|m| m.id.clone())
            .collect();
        let ingestor = Ingestor::with_polled(
            self.store.clone(),
            writer.clone(),
            ingest::IngestLimits::default(),
            polled,
        );
        let analytics = Analytics::start(
            self.store.clone(),
            writer.clone(),
            analytics_rx,
            self.broker.clone(),
            self.broker.as_ref().map(|_| &config.mqtt),
            settings.unwrap_or_else(|| AnalyticsSettings::from_config(config)),
        );
        ingestor.set_intervals(analytics.shared.clone());
        Core {
            writer,
            writer_task,
            ingestor,
            analytics,
        }
    }

    /// Home Assistant discovery (when configured) and the meters' availability.
    fn outputs(
        &mut self,
        plans: &[(config::BusConfig, Vec<acquire::MeterPlan>)],
        discovery_rx: Option<broadcast::Receiver<Arc<Vec<Record>>>>,
        availability_rx: Option<broadcast::Receiver<Arc<Vec<Record>>>>,
    ) {
        let Some(broker) = &self.broker else {
            return;
        };
        let mqtt = &self.config.mqtt;
        if let Some(rx) = discovery_rx.filter(|_| mqtt.homeassistant_discovery) {
            let meters = broker::discovery::DiscoveryMeter::from_plans(plans);
            let configs = broker::discovery::Discovery::new(
                broker.topics.clone(),
                &mqtt.homeassistant_prefix,
                meters,
            )
            .with_identities(plans);
            let task = broker::discovery::start(
                broker.clone(),
                mqtt,
                configs,
                rx,
                self.tree.outputs.clone(),
            );
            self.stages
                .outputs
                .add("discovery", task, Some(BUS_STOP_LIMIT));
        }
        if let Some(rx) = availability_rx {
            let stats = plans
                .iter()
                .flat_map(|(_, meters)| meters.iter().map(|m| m.stats.clone()))
                .collect();
            let availability =
                broker::availability::Availability::new(&self.config.availability, stats);
            let task = broker::availability::start(
                broker.clone(),
                availability,
                rx,
                self.tree.outputs.clone(),
            );
            self.stages.outputs.add("availability", task, None);
        }
    }

    /// One task per bus, and the forwarder that hands their readings to the writer.
    fn buses(
        &mut self,
        plans: Vec<(config::BusConfig, Vec<acquire::MeterPlan>)>,
        writer: &StoreWriter,
        forwarded: Arc<AtomicU64>,
        watched: &mut Vec<(String, AbortHandle)>,
    ) -> JoinHandle<()> {
        let (reading_tx, reading_rx) = mpsc::channel::<Reading>(1024);
        for (i, (bus, meters)) in plans.into_iter().enumerate() {
            tracing::info!(bus = %bus.id, meters = meters.len(), "bus task starting");
            let task = self.stages.buses.spawn(
                "a bus task",
                acquire::run_bus(bus, meters, reading_tx.clone(), self.tree.buses.clone()),
                Some(BUS_STOP_LIMIT),
            );
            watched.push((format!("bus task {i}"), task));
        }
        tokio::spawn(forward(reading_rx, writer.clone(), forwarded))
    }

    /// Pushes over MQTT, on the embedded broker; returns whether its subscription
    /// stands (a readiness condition).
    fn mqtt_ingest(
        &mut self,
        ingestor: &Arc<Ingestor>,
        watched: &mut Vec<(String, AbortHandle)>,
    ) -> Option<watch::Receiver<bool>> {
        let broker = self.broker.as_ref()?;
        let (task, subscribed) = broker::ingest::start(
            ingestor.clone(),
            &self.config.mqtt,
            broker.topics.clone(),
            self.tree.ingest.clone(),
        );
        let task =
            self.stages
                .ingest
                .spawn_handle("the MQTT ingest", task, Some(BUS_STOP_LIMIT * 2));
        watched.insert(1, ("the MQTT ingest".to_string(), task));
        Some(subscribed)
    }

    /// The gateway's status topic says `offline` while the agent runs but is not
    /// ready (the same check as /readyz), or its store failed.
    fn health(&mut self, readiness: status::Readiness) {
        let Some(broker) = &self.broker else {
            return;
        };
        let store = self.store.clone();
        let check = move || {
            if store.has_failed() {
                return Err("the store failed".to_string());
            }
            readiness.check()
        };
        self.stages.health.spawn(
            "the health reporter",
            broker::run_health(
                broker.clone(),
                check,
                broker::HEALTH_EVERY,
                self.tree.health.clone(),
            ),
            None,
        );
    }

    /// The HTTP status interface; a port in use is logged and the agent runs on
    /// without it. Returns where it listens.
    async fn http(
        &mut self,
        listener: Option<std::net::TcpListener>,
        sources: status::StatusSources,
        committed: broadcast::Receiver<Arc<Vec<Record>>>,
    ) -> Option<SocketAddr> {
        let started = status::start(
            &self.config.http,
            listener,
            sources,
            committed,
            self.tree.http.clone(),
        )
        .await;
        match started {
            Ok(server) => {
                let addr = server.local_addr;
                self.stages.http.add_future(
                    "the HTTP server",
                    server.stopped(),
                    Some(BUS_STOP_LIMIT),
                );
                Some(addr)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "HTTP status interface not started");
                None
            }
        }
    }
}

/// The stop tokens, one per shutdown step; each is a child of the next step's.
struct StopTree {
    http: CancellationToken,
    supervisor: CancellationToken,
    sync: CancellationToken,
    outputs: CancellationToken,
    ingest: CancellationToken,
    buses: CancellationToken,
    health: CancellationToken,
}

impl StopTree {
    fn new() -> StopTree {
        let http = CancellationToken::new();
        let supervisor = http.child_token();
        let sync = supervisor.child_token();
        let outputs = sync.child_token();
        let ingest = outputs.child_token();
        let buses = ingest.child_token();
        let health = buses.child_token();
        StopTree {
            http,
            supervisor,
            sync,
            outputs,
            ingest,
            buses,
            health,
        }
    }
}

type Waiting = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The tasks of one shutdown step and the token that stops them.
struct Stage {
    stop: CancellationToken,
    tasks: Vec<(&'static str, Waiting, Option<Duration>)>,
}

impl Stage {
    fn new(stop: &CancellationToken) -> Stage {
        Stage {
            stop: stop.clone(),
            tasks: Vec::new(),
        }
    }

    /// Spawns `task`; [`Stage::stop`] waits for it up to `limit` (`None`: until it ends).
    fn spawn<F>(&mut self, name: &'static str, task: F, limit: Option<Duration>) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_handle(name, tokio::spawn(task), limit)
    }

    /// Adds a spawned task; returns its abort handle (for the readiness check).
    fn spawn_handle(
        &mut self,
        name: &'static str,
        task: JoinHandle<()>,
        limit: Option<Duration>,
    ) -> AbortHandle {
        let handle = task.abort_handle();
        self.add(name, task, limit);
        handle
    }

    fn add(&mut self, name: &'static str, task: JoinHandle<()>, limit: Option<Duration>) {
        self.add_future(
            name,
            async move {
                let _ = task.await;
            },
            limit,
        );
    }

    fn add_future<F>(&mut self, name: &'static str, ended: F, limit: Option<Duration>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.push((name, Box::pin(ended), limit));
    }

    /// Cancels the step's token and waits for each of its tasks in start order.
    async fn stop(&mut self) {
        self.stop.cancel();
        for (name, ended, limit) in self.tasks.drain(..) {
            match limit {
                Some(limit) => {
                    if tokio::time::timeout(limit, ended).await.is_err() {
                        tracing::warn!("{name} did not stop in time");
                    }
                }
                None => ended.await,
            }
        }
    }
}

/// The shutdown steps, in start order.
struct Stages {
    supervisor: Stage,
    outputs: Stage,
    sync: Stage,
    buses: Stage,
    ingest: Stage,
    health: Stage,
    http: Stage,
}

impl Stages {
    fn new(tree: &StopTree) -> Stages {
        Stages {
            supervisor: Stage::new(&tree.supervisor),
            outputs: Stage::new(&tree.outputs),
            sync: Stage::new(&tree.sync),
            buses: Stage::new(&tree.buses),
            ingest: Stage::new(&tree.ingest),
            health: Stage::new(&tree.health),
            http: Stage::new(&tree.http),
        }
    }
}

/// A started pipeline.
pub struct Running {
    store: Arc<Store>,
    writer: Option<StoreWriter>,
    broker: Option<Arc<LocalBroker>>,
    http_addr: Option<SocketAddr>,
    trigger: CancellationToken,
    service: Service,
    restart: JoinHandle<()>,
    ingestor: Arc<Ingestor>,
    forwarder: JoinHandle<()>,
    analytics: Analytics,
    writer_task: JoinHandle<()>,
    stages: Stages,
    _root: DropGuard,
}

impl Running {
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A handle on the store writer, for work beside the stages (tests). Drop it
    /// before [`Running::stop`]: the writer ends once no handle is left.
    pub fn writer(&self) -> Option<StoreWriter> {
        self.writer.clone()
    }

    pub fn broker(&self) -> Option<&Arc<LocalBroker>> {
        self.broker.as_ref()
    }

    /// Where the HTTP interface listens, if it runs.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Completes once the caller's shutdown token is cancelled or the store asks for
    /// a restart.
    pub fn stop_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        self.trigger.clone().cancelled_owned()
    }

    /// Stops the stages in reverse pipeline order (see the module documentation):
    /// buses stop polling, the readings they produced are committed and flushed,
    /// their state is published, and `offline` goes out last.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Ended already when the store asked for the restart; aborted otherwise.
        let restart_needed = self.restart.is_finished() && self.store.has_failed();
        self.restart.abort();
        self.trigger.cancel();
        tracing::info!("shutting down");
        self.service.stopping();
        // `offline` first: Home Assistant shows the gateway `off` while it drains (and
        // again at the end, after the last states). The watchdog stops feeding.
        self.stages.health.stop().await;
        if let Some(broker) = &self.broker {
            if let Err(e) = broker.publish_status(false) {
                tracing::warn!(error = %e, "`offline` not published");
            }
        }
        self.stages.buses.stop().await;
        // Pushes under way finish; later ones are refused. Then no ingest path holds
        // the writer.
        self.stages.ingest.stop().await;
        self.ingestor.close();
        drop(self.writer.take());
        // The writer commits in order: the forwarder ends once its last reading is
        // durable.
        let _ = (&mut self.forwarder).await;
        // Analytics processes every stored reading, saves its state and drops its
        // writer handle; then the writer commits what is pending and ends.
        self.analytics.stop().await;
        let _ = (&mut self.writer_task).await;
        // The last states, availability and discovery; then the upstream sync.
        self.stages.outputs.stop().await;
        self.stages.sync.stop().await;
        let flushed = self.store.flush().context("final store flush");
        self.stages.supervisor.stop().await;
        if let Some(broker) = &self.broker {
            // Awaited until the router has handled it, so it reaches the subscribers
            // before the process (and with it the broker) goes away.
            match broker.publish_status_handled(false, OFFLINE_LIMIT).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!("the broker did not confirm `offline` in time"),
                Err(e) => tracing::warn!(error = %e, "`offline` not published"),
            }
        }
        self.stages.http.stop().await;
        flushed?;
        if restart_needed {
            anyhow::bail!(
                "stopped to reopen the store after a failed write; the service manager starts the agent again"
            );
        }
        if self.store.has_failed() {
            anyhow::bail!("stopped with a failed store write; it reopens at the next start");
        }
        tracing::info!(last_seq = self.store.last_seq(), "stopped cleanly");
        Ok(())
    }
}

/// Hands the buses' readings to the store's group-commit writer; the writer answers
/// once they are durable and hands the committed records to the publisher. Ends
/// when every bus task has ended and the last reading is durable.
async fn forward(
    mut readings: mpsc::Receiver<Reading>,
    writer: StoreWriter,
    forwarded: Arc<AtomicU64>,
) {
    let mut last_durable = None;
    while let Some(reading) = readings.recv().await {
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
    // `writer` drops here.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Value};
    use crate::testkit::free_port;

    const LIMIT: Duration = Duration::from_secs(20);

    /// The next status payload the client receives; `None` after `LIMIT`.
    async fn next_status(events: &mut rumqttc::EventLoop) -> Option<Vec<u8>> {
        tokio::time::timeout(LIMIT, async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        return p.payload.to_vec()
                    }
                    Ok(_) => {}
                    Err(e) => panic!("connection failed: {e}"),
                }
            }
        })
        .await
        .ok()
    }

    /// One stop path: what the writer was handed is committed before the stop
    /// returns, the writer is closed, and the status topic says `offline` when the
    /// drain begins and again, handled by the broker, at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_commits_what_was_handed_over_and_says_offline_at_both_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let text = format!(
            "gateway_id = \"pipe-gw\"\n[store]\npath = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().join("store").display()
        );
        let config = Config::from_toml(&text).expect("config parses");
        let running = Pipeline::new(config)
            .without_http()
            .start(CancellationToken::new())
            .await
            .expect("pipeline starts")
            .expect("store open");
        assert!(running.broker().is_some() && running.http_addr().is_none());
        let mut opts = rumqttc::MqttOptions::new("watcher", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 10);
        client
            .subscribe("edge/pipe-gw/status", rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        assert_eq!(
            next_status(&mut events).await.as_deref(),
            Some(&b"online"[..])
        );

        let store = running.store().clone();
        // Kept past the stop, as the process keeps it until it exits.
        let broker = running.broker().cloned().expect("the embedded broker");
        let writer = running.writer().expect("the store writer");
        let reading = Reading {
            meter: "m1".into(),
            ts_ms: crate::model::now_ms(),
            values: vec![Value {
                quantity: "power".into(),
                unit: "W".into(),
                kind: Kind::Power,
                value: Some(1.0),
                invalid: None,
                source: Default::default(),
            }],
        };
        // Handed over, not awaited: the stop commits it.
        let _durable = writer
            .submit(Payload::Reading(reading.clone()))
            .await
            .expect("handed to the writer");
        drop(writer);
        tokio::time::timeout(LIMIT, running.stop())
            .await
            .expect("the pipeline stops")
            .expect("it stops cleanly");
        assert_eq!(store.last_seq(), 1, "the handed-over reading is committed");

        let mut statuses = Vec::new();
        while statuses.len() < 2 {
            match next_status(&mut events).await {
                Some(payload) => statuses.push(payload),
                None => break,
            }
        }
        assert_eq!(statuses, vec![b"offline".to_vec(), b"offline".to_vec()]);
        broker.kill_for_test();
    }
}
