//! The `edge-agent` command line: parsing and dispatch. Lives in the library so the
//! end-to-end tests run the very same entry point as a child process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG};

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "Energy-meter gateway agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a configuration file.
    Run {
        /// The configuration file (TOML; `generate-config` prints a commented default).
        #[arg(short, long, default_value = "/etc/edge-agent/config.toml")]
        config: PathBuf,
    },
    #[cfg(feature = "tools")]
    /// Run a self-contained demo: simulated meters (RTU over a pty pair and TCP), the
    /// agent, its store and the embedded broker.
    Demo(crate::demo::DemoArgs),
    #[cfg(feature = "tools")]
    /// Serve simulated meters of one profile over Modbus TCP (unit ids 1..=N), for
    /// footprint measurements and bench setups.
    Sim(crate::sim::command::SimArgs),
    /// Validate a configuration file; exits non-zero and names every bad field.
    CheckConfig {
        /// The configuration file to check (TOML).
        file: PathBuf,
    },
    /// Print a complete, commented default configuration.
    GenerateConfig,
    /// List the built-in meter profiles: name, manufacturer, model, bus types and
    /// quantities.
    Profiles,
    /// Check a store (stop the agent first): every seq present once with a valid CRC.
    /// Prints the figures; exits 1 on a quarantined record, a gap or a duplicate.
    VerifyStore {
        /// Directory of the store (`store.path` in the config).
        #[arg(long)]
        path: PathBuf,
        /// Directory of its journal (`store.journal_dir`; default: `journal` inside
        /// the store). Its records past sled's are replayed first.
        #[arg(long)]
        journal_dir: Option<PathBuf>,
    },
    #[cfg(feature = "tools")]
    /// Check upstream that gateways' records all arrived; ask for resends of gaps.
    /// Exits non-zero if anything is still missing after the wait.
    Verify(crate::verify::VerifyArgs),
    /// Probe the unit ids of a configured bus: which answer, and the SunSpec models
    /// each has.
    Scan(crate::acquire::scan::ScanArgs),
    #[cfg(feature = "tools")]
    /// Print performance figures.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[cfg(feature = "tools")]
#[derive(Subcommand)]
enum BenchWhat {
    /// Durable readings/s of the store with group commit, against a bare sled loop.
    Store {
        /// Readings written.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Readings per group commit.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Records/s and peak RSS draining a stored backlog upstream, against a bare
    /// rumqttc QoS 1 publish loop of the same batches.
    Sync {
        /// Records in the stored backlog that is drained.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Records per published batch (`upstream.batch_records`).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Batches published and not yet acknowledged (`upstream.inflight_batches`).
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// An external broker (HOST:PORT, e.g. a Mosquitto on loopback) instead of
        /// an in-process rumqttd.
        #[arg(long)]
        broker: Option<std::net::SocketAddr>,
        /// `store.cache_capacity` of the draining agent, in bytes (default: the
        /// config's default).
        #[arg(long)]
        cache_capacity: Option<u64>,
        /// Internal: drain this filled store to `--broker` and print the figures
        /// (the benchmark runs its drain in a child process this way).
        #[arg(long, hide = true)]
        drain_store: Option<PathBuf>,
    },
    /// Interval, clustering and forecast figures on one year of one meter.
    Derive,
    /// Polls/s of eight simulated meters on one RTU line (a pty paced at the baud
    /// rate) against the line's theoretical transaction rate.
    Rtu(crate::acquire::bench::BenchRtuArgs),
    /// Lag from each reading's timestamp to its arrival upstream, and upstream bytes
    /// per reading, of a running agent: subscribes to its records topic.
    Lag {
        /// The upstream broker the agent publishes to.
        #[arg(long)]
        broker: std::net::SocketAddr,
        /// The records topic (`{prefix}/{gateway}/records`).
        #[arg(long)]
        topic: String,
        /// How long to listen, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

pub fn main() -> ExitCode {
    // Before any thread starts: the arena limit applies to threads created later.
    crate::alloc::tune();
    crate::service::install_panic_hook();
    let cli = Cli::parse();
    match cli.command {
        Command::VerifyStore { path, journal_dir } => verify_store(&path, journal_dir),
        Command::GenerateConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Profiles => {
            print!("{}", crate::acquire::profile::listing());
            ExitCode::SUCCESS
        }
        // Every problem is named: unknown keys, wrong types and out-of-range values
        // key by key, the rules across fields, and the files the config names.
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} buses, {} meters)",
                    file.display(),
                    config.buses.len(),
                    config.meters.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{}: {e}", file.display());
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    for e in &errors.0 {
                        eprintln!("{}: {e}", config.display());
                    }
                    return ExitCode::FAILURE;
                }
            };
            crate::logging::init(&config.log.level);
            exit_code(crate::run_until_signal(config))
        }
        #[cfg(feature = "tools")]
        Command::Demo(args) => {
            crate::logging::init("info");
            exit_code(crate::demo::run(args))
        }
        #[cfg(feature = "tools")]
        Command::Sim(args) => {
            crate::logging::init("warn");
            exit_code(crate::sim::command::run(args))
        }
        #[cfg(feature = "tools")]
        Command::Verify(args) => {
            crate::logging::init(if args.serve { "info" } else { "warn" });
            match crate::verify::main(args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(2),
                Err(e) => exit_code(Err(e)),
            }
        }
        Command::Scan(args) => exit_code(
            crate::config::Config::load(&args.config)
                .map_err(|errors| anyhow::anyhow!("{}: {errors}", args.config.display()))
                .and_then(|config| crate::acquire::scan::run(args, &config.buses)),
        ),
        #[cfg(feature = "tools")]
        Command::Bench { what } => match what {
            BenchWhat::Store { records, batch } => {
                let mut out = std::io::stdout();
                exit_code(
                    crate::store::bench::bench(&mut out, records, batch)
                        .map_err(anyhow::Error::from),
                )
            }
            BenchWhat::Sync {
                records,
                batch,
                inflight,
                broker,
                cache_capacity,
                drain_store,
            } => exit_code(crate::sync::bench::bench(
                &mut std::io::stdout(),
                crate::sync::bench::Params {
                    records,
                    batch_records: batch,
                    inflight,
                    broker,
                    cache_capacity,
                    drain_store,
                },
            )),
            BenchWhat::Rtu(args) => exit_code(crate::acquire::bench::run(
                args,
                &mut std::io::stdout().lock(),
            )),
            BenchWhat::Derive => {
                let mut out = std::io::stdout();
                exit_code(crate::derive::bench::bench(&mut out).map_err(anyhow::Error::from))
            }
            BenchWhat::Lag {
                broker,
                topic,
                seconds,
            } => exit_code(crate::sync::lag::bench(
                &mut std::io::stdout(),
                broker,
                &topic,
                seconds,
            )),
        },
    }
}

/// `verify-store`: opens an existing store (never creates one) and scans it. The scan
/// moves records with a bad CRC to the quarantine tree, as a normal read would.
fn verify_store(path: &std::path::Path, journal_dir: Option<PathBuf>) -> ExitCode {
    if !path.join("db").exists() && !path.join("conf").exists() {
        eprintln!("{}: no store here", path.display());
        return ExitCode::FAILURE;
    }
    let config = crate::store::config::StoreConfig {
        path: path.to_path_buf(),
        journal_dir: journal_dir.unwrap_or_default(),
        // Without the runtime journal: verify reads what is on the disk, and never
        // takes a missing runtime journal for a power cut (`durability.md`).
        runtime_dir: PathBuf::new(),
        ..crate::store::config::StoreConfig::default()
    };
    let report =
        match crate::store::Store::open(&config).and_then(|store| crate::store::verify(&store)) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
    let gaps: Vec<String> = report
        .gaps
        .iter()
        .map(|g| format!("{}..={}", g.start(), g.end()))
        .collect();
    println!(
        "{}: records {} (seq {}..={}; {} in the first format), quarantined {}, duplicates {}, gaps {}{}",
        path.display(),
        report.ok,
        report.first_seq,
        report.last_seq,
        report.first_format,
        report.quarantined,
        report.duplicates,
        report.gaps.len(),
        if gaps.is_empty() {
            String::new()
        } else {
            format!(" [{}]", gaps.join(", "))
        }
    );
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every option and argument of every subcommand says what it is for in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                // clap's own `--help` and `--version` carry their text.
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the subcommand)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "edge-agent", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}
