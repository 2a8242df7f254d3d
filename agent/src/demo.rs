//! `edge-agent demo`: simulated meters on a pty serial pair (RTU) and on Modbus TCP,
//! the agent polling them, its store and the embedded broker, all in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::acquire::config::{BusConfig, BusType, MeterConfig, Parity, ProfileConfig};
use crate::acquire::profile;
use crate::backfill::{self, HistoryMeter, HistoryPlan};
use crate::broker::config::MqttConfig;
use crate::broker::LocalBroker;
use crate::config::units::{ByteSize, HumanDuration};
use crate::config::{Config, LogConfig};
use crate::sim::{self, SimBus, SimMeter};
use crate::status::config::HttpConfig;
use crate::store::config::StoreConfig;
use crate::store::{Store, StoreWriter};
use crate::sync::UpstreamConfig;
use crate::verify::parse_broker_url;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory of the demo's store; kept between runs, so sequence numbers continue.
    #[arg(long, default_value = "demo-data")]
    pub data_dir: PathBuf,
    /// Address of the embedded MQTT broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Address of the HTTP status page and API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Gateway id used in topics.
    #[arg(long, default_value = "demo-gw")]
    pub gateway_id: String,
    /// Poll interval of the simulated meters.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Days of simulated history (one reading a minute per meter) written through the
    /// push-ingest path at start, when the store is empty.
    #[arg(long, default_value_t = 7)]
    pub history_days: u32,
    /// Start without simulated history.
    #[arg(long)]
    pub no_history: bool,
    /// Sync to this upstream broker (mqtt://HOST:PORT) instead of the demo's own.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Address of the demo's own upstream broker (a second in-process rumqttd),
    /// used when `--upstream` is not given.
    #[arg(long, default_value = "127.0.0.1:1884")]
    pub upstream_listen: SocketAddr,
    /// Store quota (`store.quota`): a small one makes a soak reach the quota's
    /// deletions early.
    #[arg(long, default_value = "256MiB", value_parser = ByteSize::parse)]
    pub quota: ByteSize,
    /// sled's page cache (`store.cache_capacity`); the store's default when not given.
    #[arg(long, value_parser = ByteSize::parse)]
    pub cache_capacity: Option<ByteSize>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// The demo's user-defined register map: a PV inverter on holding registers with
/// integer types, a low-word-first counter and scales, next to the Eastron meters.
const DEMO_INVERTER: &str = r#"
manufacturer = "Example"
model = "PV inverter"
registers = [
  { name = "power", address = 0, table = "holding", type = "i32", unit = "W", kind = "power", min = -20000, max = 20000 },
  { name = "energy_total", address = 2, table = "holding", type = "u32", word_order = "low_first", scale = 0.01, unit = "kWh", kind = "energy_total", min = 0 },
  { name = "voltage", address = 6, table = "holding", type = "u16", scale = 0.1, unit = "V", kind = "voltage", min = 0, max = 500 },
]
"#;

/// The configuration the demo runs: RTU and TCP buses pointing at the simulators.
pub fn demo_config(
    args: &DemoArgs,
    rtu_port: PathBuf,
    tcp_address: String,
) -> anyhow::Result<Config> {
    let inverter: ProfileConfig =
        toml::from_str(DEMO_INVERTER).context("built-in demo register map")?;
    let interval = HumanDuration(args.interval);
    let meter = |id: &str, bus: &str, unit_id: u8, profile: &str| MeterConfig {
        id: id.into(),
        bus: bus.into(),
        unit_id,
        profile: profile.into(),
        interval,
        max_registers_per_request: 80,
        // The history carries `energy_total`; live polls continue the same register.
        energy_quantity: Some("energy_total".into()),
        // Polled: pushes for these meters are refused (the history backfill goes
        // through the library's ingest path, not the HTTP or MQTT front ends).
        accept_push: false,
        name: None,
    };
    let config = Config {
        gateway_id: args.gateway_id.clone(),
        store: StoreConfig {
            path: args.data_dir.join("store"),
            cache_capacity: args
                .cache_capacity
                .unwrap_or(StoreConfig::default().cache_capacity),
            quota: args.quota,
            ..StoreConfig::default()
        },
        mqtt: MqttConfig {
            listen: args.mqtt_listen,
            ..MqttConfig::default()
        },
        log: LogConfig::default(),
        http: HttpConfig {
            listen: args.http_listen,
            ..HttpConfig::default()
        },
        buses: vec![
            BusConfig {
                id: "rs485".into(),
                bus_type: BusType::Rtu,
                port: Some(rtu_port),
                baud_rate: Some(9600),
                parity: Some(Parity::None),
                data_bits: Some(8),
                stop_bits: 1,
                address: None,
                frame_gap: HumanDuration(Duration::from_millis(5)),
                timeout: HumanDuration(Duration::from_millis(500)),
                dsmr: None,
            },
            BusConfig {
                id: "lan".into(),
                bus_type: BusType::Tcp,
                port: None,
                baud_rate: None,
                parity: None,
                data_bits: None,
                stop_bits: 1,
                address: Some(tcp_address),
                frame_gap: HumanDuration(Duration::from_millis(0)),
                timeout: HumanDuration(Duration::from_secs(1)),
                dsmr: None,
            },
        ],
        meters: vec![
            meter("main", "lan", 1, "sdm630"),
            meter("pv", "lan", 2, "inverter"),
            meter("heatpump", "rs485", 1, "sdm120"),
            meter("garage", "rs485", 2, "sdm120"),
            meter("solar", "lan", 3, "sunspec"),
        ],
        profiles: [("inverter".to_string(), inverter)].into_iter().collect(),
        upstream: Some(demo_upstream(args)?),
        analytics: crate::analytics::config::AnalyticsConfig::default(),
        alarms: Vec::new(),
        availability: crate::broker::config::AvailabilityConfig::default(),
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))?;
    Ok(config)
}

/// Id of the demo's P1 meter (a DSMR 5 meter's P1 port, on a pty).
pub const DEMO_P1_METER: &str = "grid";

/// Adds the demo's P1 bus on `port` and its meter to `config`.
pub fn add_p1_meter(config: &mut Config, port: PathBuf, interval: Duration) -> anyhow::Result<()> {
    config.buses.push(BusConfig {
        id: "p1".into(),
        bus_type: BusType::P1,
        port: Some(port),
        baud_rate: None,
        parity: None,
        data_bits: None,
        stop_bits: 1,
        address: None,
        frame_gap: HumanDuration(Duration::ZERO),
        timeout: HumanDuration(Duration::from_secs(1)),
        dsmr: Some(crate::acquire::p1::Dsmr::V5),
    });
    config.meters.push(MeterConfig {
        id: DEMO_P1_METER.into(),
        bus: "p1".into(),
        unit_id: 0,
        profile: String::new(),
        interval: HumanDuration(interval),
        max_registers_per_request: 80,
        energy_quantity: Some("energy_import_t1".into()),
        accept_push: false,
        name: None,
    });
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))
}

/// The demo's `[upstream]`: `--upstream`, or the demo's own broker.
fn demo_upstream(args: &DemoArgs) -> anyhow::Result<UpstreamConfig> {
    let (host, port) = match &args.upstream {
        Some(url) => parse_broker_url(url).map_err(|e| anyhow::anyhow!("--upstream: {e}"))?,
        None => (
            args.upstream_listen.ip().to_string(),
            args.upstream_listen.port(),
        ),
    };
    Ok(UpstreamConfig {
        host,
        port,
        // Manifests often enough that `verify` has some to check within a minute.
        manifest_interval: HumanDuration(Duration::from_secs(10)),
        ..UpstreamConfig::default()
    })
}

/// Starts the simulators, prints where to look, and runs the agent until a signal.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Addresses first, before anything is created: a taken port is named with the
    // option that changes it. The HTTP listener is kept and handed to the agent, so
    // the banner's URL is the one served (port 0 included).
    check_free(
        args.mqtt_listen,
        "the embedded MQTT broker",
        "--mqtt-listen",
    )?;
    if args.upstream.is_none() {
        check_free(
            args.upstream_listen,
            "the demo's upstream broker",
            "--upstream-listen",
        )?;
    }
    let http = bind(args.http_listen, "the HTTP status page", "--http-listen")?;
    crate::block_on_with_signals(|shutdown| async move {
        let sims = CancellationToken::new();
        let placeholder = demo_config(&args, PathBuf::from("/dev/null"), "127.0.0.1:1".into())?;
        let resolve =
            |name: &str| profile::resolve(&placeholder, name).map_err(|e| anyhow::anyhow!("{e}"));

        // The live values continue the history: model time starts where it ends.
        let span = if args.no_history {
            Duration::ZERO
        } else {
            Duration::from_secs(u64::from(args.history_days) * 86_400)
        };
        let sim = |profile: &str, seed| -> anyhow::Result<Arc<SimMeter>> {
            Ok(Arc::new(
                SimMeter::new(resolve(profile)?, seed).with_model_offset(span),
            ))
        };
        let (main, pv) = (sim("sdm630", 1)?, sim("inverter", 2)?);
        let (heatpump, garage) = (sim("sdm120", 3)?, sim("sdm120", 4)?);
        let solar = Arc::new(demo_sunspec_inverter().with_model_offset(span));
        let live_start_ms = crate::model::now_ms();
        let tcp_bus = Arc::new(
            SimBus::new()
                .with_meter(1, main.clone())
                .with_meter(2, pv.clone())
                .with_meter(3, solar.clone()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the simulated Modbus TCP server")?;
        let tcp_address = listener.local_addr()?.to_string();
        tokio::spawn(sim::serve_tcp(listener, tcp_bus, sims.clone()));

        let rtu_bus = Arc::new(
            SimBus::new()
                .with_meter(1, heatpump.clone())
                .with_meter(2, garage.clone()),
        );
        let (rtu_port, _rtu_server) =
            sim::rtu_pty(rtu_bus, sims.clone()).context("creating the simulated RS-485 line")?;

        // A DSMR 5 meter's P1 port: a telegram a second at 115200 baud.
        let (p1_port, _p1_sender) = sim::p1_pty(
            sim::P1Sim::new(crate::acquire::p1::Dsmr::V5, 7),
            sims.clone(),
        )
        .context("creating the simulated P1 port")?;

        let mut config = demo_config(&args, rtu_port.clone(), tcp_address.clone())?;
        add_p1_meter(&mut config, p1_port, args.interval)?;
        // The demo's own upstream broker, so the whole path is visible on one machine.
        let _upstream_broker = match &args.upstream {
            Some(_) => None,
            None => Some(
                LocalBroker::start(
                    &crate::broker::upstream_logs(MqttConfig {
                        listen: args.upstream_listen,
                        ..MqttConfig::default()
                    }),
                    "demo-upstream",
                )
                .with_context(|| {
                    format!(
                        "starting the demo's upstream broker on {} (use --upstream-listen or --upstream)",
                        args.upstream_listen
                    )
                })?,
            ),
        };
        let http_addr = http.local_addr().context("the HTTP listener's address")?;
        print_banner(&config, &rtu_port, &tcp_address, http_addr);
        let mut hooks = crate::pipeline::Hooks {
            http_listener: Some(http),
            ..crate::pipeline::Hooks::default()
        };
        let meters: Vec<HistoryMeter> = [
            ("main", main),
            ("pv", pv),
            ("heatpump", heatpump),
            ("garage", garage),
            ("solar", solar),
        ]
        .into_iter()
        .map(|(id, sim)| HistoryMeter { id: id.into(), sim })
        .collect();
        let plan = HistoryPlan {
            meters,
            live_start_ms,
            span,
            step: Duration::from_secs(60),
        };
        hooks.before_polling = Some(Box::new(move |store, writer| {
            Box::pin(async move {
                if store.last_seq() > 0 {
                    // A restart: the simulated meters go on from their stored counters.
                    continue_counters(&store, &plan.meters, crate::model::now_ms());
                    return Ok(());
                }
                if plan.span.is_zero() {
                    return Ok(());
                }
                backfill_history(&writer, &store, &plan).await
            })
        }));
        let result = crate::pipeline::Pipeline::new(config)
            .hooks(hooks)
            .run(shutdown)
            .await;
        sims.cancel();
        result
    })
}

/// Binds `addr` for `what`; a failure says which address, why, and which option
/// (`flag`) chooses another, in one line (the OS error is not repeated as a cause).
fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| port_error(addr, what, flag, &e))
}

/// Checks that `addr` can be bound now, for a server that binds it itself (rumqttd).
fn check_free(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<()> {
    bind(addr, what, flag).map(drop)
}

fn port_error(addr: SocketAddr, what: &str, flag: &str, e: &std::io::Error) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse if addr.port() == 1883 => {
            "the port is in use by another program (Debian's mosquitto package starts a broker on 1883)".to_string()
        }
        std::io::ErrorKind::AddrInUse => "the port is in use by another program".to_string(),
        _ => e.to_string(),
    };
    let other = addr
        .port()
        .checked_add(10_000)
        .unwrap_or(addr.port().saturating_sub(1));
    anyhow::anyhow!(
        "{what} cannot listen on {addr}: {why}; choose another address with {flag} (e.g. {flag} {}:{other})",
        addr.ip(),
    )
}

/// How to run this program again from a shell: `cargo run [--release] -p edge-agent --`
/// when cargo started it (`cargo run` is how the README starts the demo, and leaves
/// nothing on the PATH), `edge-agent` when that name on the PATH is this program,
/// else the program's full path.
pub fn self_command() -> String {
    let exe = std::env::current_exe().ok();
    let by_cargo = std::env::var_os("CARGO").is_some()
        && std::env::var("CARGO_PKG_NAME").is_ok_and(|name| name == env!("CARGO_PKG_NAME"));
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("edge-agent"))
            .find(|candidate| candidate.is_file())
    });
    command_for(exe.as_deref(), by_cargo, on_path.as_deref())
}

fn command_for(
    exe: Option<&std::path::Path>,
    by_cargo: bool,
    on_path: Option<&std::path::Path>,
) -> String {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    match exe {
        Some(exe) if by_cargo => {
            let release = exe
                .parent()
                .and_then(|dir| dir.file_name())
                .is_some_and(|name| name == "release");
            let profile = if release { " --release" } else { "" };
            format!("cargo run{profile} -p edge-agent --")
        }
        Some(exe) if on_path.is_some_and(|p| canonical(p) == canonical(exe)) => "edge-agent".into(),
        Some(exe) => shell_word(&exe.display().to_string()),
        None => "edge-agent".into(),
    }
}

/// `word` quoted for a POSIX shell when it needs to be.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The demo's SunSpec inverter: common model, three-phase inverter 103, nameplate
/// 120 and storage 124 at 40000, discovered by the agent (`profile = "sunspec"`).
fn demo_sunspec_inverter() -> SimMeter {
    let identity = sim::sunspec::SimIdentity {
        manufacturer: "Example Solar",
        model: "ES-5000-3P",
        version: "1.4.2",
        serial: "ES5K0001",
    };
    sim::sunspec::device(40000, &identity, &[103, 120, 124], 5)
}

/// The counter each simulated meter continues from after a restart.
const CONTINUED_COUNTER: &str = "energy_total";

/// Sets each simulated meter's model time so that its `energy_total` continues from
/// the newest stored reading, plus what the meter used since then: a counter never
/// goes backwards across a restart of the demo. A meter without a stored counter is
/// left as it is.
pub fn continue_counters(store: &Store, meters: &[HistoryMeter], now_ms: i64) {
    for meter in meters {
        let Some((ts_ms, value)) = newest_counter(store, &meter.id) else {
            continue;
        };
        let Some(at) = model_time_reaching(&meter.sim, value) else {
            tracing::warn!(meter = %meter.id, value, "simulated counter cannot reach the stored one");
            continue;
        };
        let since = Duration::from_millis(u64::try_from(now_ms - ts_ms).unwrap_or(0));
        meter.sim.set_model_time(at + since);
        tracing::info!(meter = %meter.id, stored_kwh = value, "simulated meter continues its stored counter");
    }
}

/// The newest stored `energy_total` of `meter` with its timestamp: looked for in
/// the last hour, day, 30 days, then everything.
fn newest_counter(store: &Store, meter: &str) -> Option<(i64, f64)> {
    let now = crate::model::now_ms();
    for back_ms in [3_600_000, 86_400_000, 30 * 86_400_000, i64::MAX] {
        let start = now.saturating_sub(back_ms);
        let Ok(records) = store.readings(meter, start, i64::MAX) else {
            return None;
        };
        let newest = records.iter().rev().find_map(|r| {
            let reading = r.payload.as_reading()?;
            let v = reading
                .values
                .iter()
                .find(|v| v.quantity == CONTINUED_COUNTER)?;
            Some((reading.ts_ms, v.value?))
        });
        if newest.is_some() {
            return newest;
        }
    }
    None
}

/// The first model time at which the simulator's counter is above `value` (by more
/// than an f32 register's rounding), by bisection: the counter grows with model
/// time. `None` when it does not get there within 100 years.
pub fn model_time_reaching(sim: &SimMeter, value: f64) -> Option<Duration> {
    let counter = |t: f64| sim.value_at(CONTINUED_COUNTER, Duration::from_secs_f64(t));
    // A stored f32 counter is within one of its ulps of the value served.
    let target = value + (value.abs() * f64::from(f32::EPSILON)).max(1e-6) * 2.0;
    let mut hi = 86_400.0f64;
    while counter(hi)? < target {
        hi *= 2.0;
        if hi > 100.0 * 365.0 * 86_400.0 {
            return None;
        }
    }
    let mut lo = 0.0f64;
    if counter(lo)? >= target {
        return Some(Duration::ZERO);
    }
    // To a millisecond.
    while hi - lo > 0.001 {
        let mid = (lo + hi) / 2.0;
        if counter(mid)? >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(Duration::from_secs_f64(hi))
}

/// The demo's history, once: a store that holds anything is left as it is.
async fn backfill_history(
    writer: &StoreWriter,
    store: &Store,
    plan: &HistoryPlan,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    match backfill::backfill_if_empty(writer, store, plan).await? {
        Some(done) => tracing::info!(
            readings = done.readings,
            meters = plan.meters.len(),
            days = plan.span.as_secs_f64() / 86_400.0,
            commits = done.commits,
            seconds = started.elapsed().as_secs_f64(),
            "simulated history stored"
        ),
        None => tracing::info!("store not empty: no simulated history added"),
    }
    Ok(())
}

fn print_banner(config: &Config, rtu_port: &std::path::Path, tcp_address: &str, http: SocketAddr) {
    let prefix = &config.mqtt.topic_prefix;
    let gw = &config.gateway_id;
    let listen = config.mqtt.listen;
    println!("edge-agent demo");
    println!("  simulated meters:");
    println!("    main     SDM630, Modbus TCP {tcp_address} unit 1");
    println!("    pv       user-defined map (inverter), Modbus TCP {tcp_address} unit 2");
    println!(
        "    heatpump SDM120, Modbus RTU on {} unit 1",
        rtu_port.display()
    );
    println!(
        "    garage   SDM120, Modbus RTU on {} unit 2",
        rtu_port.display()
    );
    println!("    solar    SunSpec inverter (discovered), Modbus TCP {tcp_address} unit 3");
    for bus in config.buses.iter().filter(|b| b.bus_type == BusType::P1) {
        for m in config.meters.iter().filter(|m| m.bus == bus.id) {
            let port = bus.port.as_deref().unwrap_or(std::path::Path::new("?"));
            println!("    {:<8} DSMR 5 P1 port on {}", m.id, port.display());
        }
    }
    println!("  store:    {}", config.store.path.display());
    println!("  broker:   mqtt://{listen}");
    println!("  topics:   {prefix}/{gw}/status, {prefix}/{gw}/<meter>/state (retained JSON)");
    println!(
        "  watch:    mosquitto_sub -h {} -p {} -t '{prefix}/{gw}/#' -v",
        listen.ip(),
        listen.port()
    );
    if let Some(up) = &config.upstream {
        let upstream_prefix = up.prefix_or(prefix);
        println!(
            "  upstream: mqtt://{}:{} (records as CBOR batches, manifests, status)",
            up.host, up.port
        );
        println!(
            "  watch upstream: mosquitto_sub -h {} -p {} -t '{upstream_prefix}/{gw}/#' -F '%t %l bytes'",
            up.host, up.port
        );
        println!(
            "  verify upstream: {} verify --broker mqtt://{}:{} --prefix {upstream_prefix} --gateway {gw} --wait 30s",
            self_command(),
            up.host,
            up.port
        );
    }
    println!("  status:   http://{http}/ (API index: http://{http}/api/v1)");
    println!(
        "  push:     POST http://{http}/api/v1/ingest (JSON or CSV), or MQTT {prefix}/{gw}/ingest/<meter>"
    );
    if config.mqtt.homeassistant_discovery {
        println!(
            "  home assistant: discovery under {}/ on the broker (retained)",
            config.mqtt.homeassistant_prefix
        );
    }
    println!("  Ctrl-C flushes the store, publishes `offline` and exits.");
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn sim(seed: u64) -> SimMeter {
        SimMeter::new(
            Arc::new(profile::builtin("sdm120").expect("built-in profile")),
            seed,
        )
        .with_model_offset(Duration::from_secs(7 * 86_400))
    }

    /// After a restart the simulator started again at the end of its history, below
    /// what its first run stored; continued, it serves at least the stored counter.
    #[test]
    fn a_restarted_simulator_continues_from_its_stored_counter() {
        let first = sim(3);
        // The first run polled for an hour past its history.
        let end = Duration::from_secs(7 * 86_400 + 3_600);
        let stored = first.value_at(CONTINUED_COUNTER, end).expect("counter") as f32 as f64;
        let restarted = sim(3);
        let now = |s: &SimMeter| {
            s.value_at(CONTINUED_COUNTER, s.model_time())
                .expect("counter")
        };
        assert!(now(&restarted) < stored, "the restart's own start is below");
        let at = model_time_reaching(&restarted, stored).expect("reachable");
        assert!(
            at >= end - Duration::from_secs(1) && at <= end + Duration::from_secs(60),
            "{at:?} against {end:?}"
        );
        // The gateway was down for 10 minutes: the counter went on meanwhile.
        restarted.set_model_time(at + Duration::from_secs(600));
        let continued = now(&restarted);
        assert!(continued >= stored, "{continued} below {stored}");
        assert!(
            (continued as f32) > (stored as f32),
            "ten minutes of load counted"
        );
        assert!(
            continued - stored < 1.0,
            "{continued} - {stored}: a plausible step"
        );
    }

    #[test]
    fn a_counter_beyond_reach_is_left_alone() {
        assert_eq!(model_time_reaching(&sim(3), 1e15), None);
    }

    /// The banner's `verify` command runs from a shell as printed: through cargo
    /// when cargo started the demo, else by a name or path that exists.
    #[test]
    fn the_printed_command_is_one_that_runs() {
        use std::path::Path;
        let release = Path::new("/src/edge-agent/target/release/edge-agent");
        let debug = Path::new("/var/tmp/t/debug/edge-agent");
        assert_eq!(
            command_for(Some(release), true, None),
            "cargo run --release -p edge-agent --"
        );
        assert_eq!(
            command_for(Some(debug), true, None),
            "cargo run -p edge-agent --"
        );
        // Not started by cargo and not on the PATH: the program's own path.
        assert_eq!(
            command_for(Some(release), false, None),
            release.display().to_string()
        );
        assert_eq!(
            command_for(Some(Path::new("/opt/my dir/edge-agent")), false, None),
            "'/opt/my dir/edge-agent'"
        );
        // Another `edge-agent` on the PATH is not this one: still the path.
        let exe = std::env::current_exe().expect("test binary path");
        assert_eq!(
            command_for(Some(&exe), false, Some(release)),
            exe.display().to_string()
        );
        assert_eq!(command_for(Some(&exe), false, Some(&exe)), "edge-agent");
    }

    /// A taken port is named once, with the option that changes it.
    #[test]
    fn a_taken_port_names_its_option_once() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = check_free(addr, "the embedded MQTT broker", "--mqtt-listen")
            .expect_err("the port is taken");
        let text = format!("{err:#}");
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("--mqtt-listen"), "{text}");
        assert_eq!(text.matches("in use").count(), 1, "{text}");
        let err = bind(addr, "the HTTP status page", "--http-listen").expect_err("taken");
        assert!(format!("{err:#}").contains("--http-listen"), "{err:#}");
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<Config> {
        let cli = Cli::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))?;
        demo_config(&cli.demo, PathBuf::from("/dev/null"), "127.0.0.1:1".into())
    }

    #[test]
    fn the_demo_has_a_p1_meter_next_to_the_modbus_ones() {
        let mut c = config(&[]).expect("default demo config");
        add_p1_meter(&mut c, PathBuf::from("/dev/ttyP1"), Duration::from_secs(2)).expect("valid");
        let plans = crate::acquire::plan_meters(&c).expect("plans");
        let ids: Vec<(&str, Vec<&str>)> = plans
            .iter()
            .map(|(b, ms)| {
                (
                    b.id.as_str(),
                    ms.iter().map(|m| m.config.id.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                ("rs485", vec!["heatpump", "garage"]),
                ("lan", vec!["main", "pv", "solar"]),
                ("p1", vec![DEMO_P1_METER]),
            ]
        );
        let line = c.buses[2].p1_line();
        assert_eq!((line.baud_rate, line.data_bits), (115_200, 8));
    }

    #[test]
    fn quota_option_sets_the_store_quota_and_is_checked() {
        let default = config(&[]).expect("default demo config");
        assert_eq!(default.store.quota, ByteSize(256 << 20));
        let small = config(&["--quota", "32MiB"]).expect("32MiB quota");
        assert_eq!(small.store.quota, ByteSize(32 << 20));
        let err = config(&["--quota", "8MiB"]).expect_err("below the store's minimum");
        assert!(format!("{err:#}").contains("store.quota"), "{err:#}");
        assert!(config(&["--quota", "lots"]).is_err());
    }
}
