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
        #[arg(short, long, default_value = "/etc/edge-agent/config.toml")]
        config: PathBuf,
    },
    /// Run a self-contained demo: simulated meters (RTU over a pty pair and TCP), the
    /// agent, its store and the embedded broker.
    Demo(crate::demo::DemoArgs),
    /// Validate a configuration file; exits non-zero and names every bad field.
    CheckConfig { file: PathBuf },
    /// Print a complete, commented default configuration.
    GenerateConfig,
    /// Print performance figures.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Durable readings/s of the store with group commit, against a bare sled loop.
    Store {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Interval, clustering and forecast figures on one year of one meter.
    Derive,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => match crate::broker::check_settings(&config.mqtt) {
                Ok(()) => {
                    println!(
                        "{}: ok ({} buses, {} meters)",
                        file.display(),
                        config.buses.len(),
                        config.meters.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: mqtt.broker_config: {e}", file.display());
                    ExitCode::FAILURE
                }
            },
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
        Command::Demo(args) => {
            crate::logging::init("info");
            exit_code(crate::demo::run(args))
        }
        Command::Bench { what } => match what {
            BenchWhat::Store { records, batch } => {
                let mut out = std::io::stdout();
                exit_code(
                    crate::store::bench::bench(&mut out, records, batch)
                        .map_err(anyhow::Error::from),
                )
            }
            BenchWhat::Derive => {
                let mut out = std::io::stdout();
                exit_code(crate::derive::bench::bench(&mut out).map_err(anyhow::Error::from))
            }
        },
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
