//! `edge-agent scan --bus ID`: which unit ids answer on a configured bus, and the
//! SunSpec models each has (like mbmd's `inspect`).
//!
//! Each unit id is asked for the SunSpec marker at holding register 40000 (then 0,
//! 50000); a unit that answers anything, data or its own exception, is listed, with
//! its SunSpec identity and models (`id (length)`) when it has the marker. A
//! gateway's "target device failed to respond" counts as no answer. Time is bounded
//! by the per-request timeout times the units probed, and by `--max-time`; output
//! by the unit range (one line per answering unit, at most [`super::sunspec::MAX_MODELS`]
//! models on it).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::acquire::config::{BusConfig, BusType};

/// Per-request timeout of a scan on a serial line, where most unit ids are silent.
pub const RTU_TIMEOUT: Duration = Duration::from_millis(100);

/// Per-request timeout of a scan over TCP.
pub const TCP_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, clap::Args)]
pub struct ScanArgs {
    /// The configuration file that defines the bus.
    #[arg(short, long, default_value = "/etc/edge-agent/config.toml")]
    pub config: PathBuf,
    /// Id of the bus to scan (`[[buses]] id`).
    #[arg(long)]
    pub bus: String,
    /// Unit ids to probe, `FIRST-LAST` or one id.
    #[arg(long, default_value = "1-247", value_parser = parse_units)]
    pub units: (u8, u8),
    /// Per-request timeout; default 100ms on RTU, 500ms on TCP.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop probing after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_time: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// `1-247`, `3` → an inclusive range within 1..=247.
pub fn parse_units(s: &str) -> Result<(u8, u8), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let id = |t: &str| {
        t.trim()
            .parse::<u8>()
            .ok()
            .filter(|u| (1..=247).contains(u))
            .ok_or_else(|| format!("`{t}` is not a unit id in 1..=247"))
    };
    let (a, b) = (id(a)?, id(b)?);
    if a > b {
        return Err(format!("{a} is above {b}"));
    }
    Ok((a, b))
}

/// Runs the scan and prints one line per answering unit, then a summary line.
/// `buses` are those of the loaded config (`args.config`). Fails on an unknown bus.
pub async fn scan(
    args: &ScanArgs,
    buses: &[BusConfig],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let Some(bus) = buses.iter().find(|b| b.id == args.bus) else {
        let ids: Vec<&str> = buses.iter().map(|b| b.id.as_str()).collect();
        anyhow::bail!("--bus: no bus `{}` (buses: {})", args.bus, ids.join(", "));
    };
    let timeout = args.timeout.unwrap_or(match bus.bus_type {
        BusType::Rtu => RTU_TIMEOUT,
        BusType::Tcp => TCP_TIMEOUT,
        BusType::P1 => anyhow::bail!(
            "--bus: `{}` is a P1 port: its meter pushes telegrams, there are no units to scan",
            bus.id
        ),
    });
    let deadline = tokio::time::Instant::now() + args.max_time;
    let started = std::time::Instant::now();
    let answers = super::bus::scan(bus, args.units.0..=args.units.1, timeout, deadline, 125)
        .await
        .map_err(anyhow::Error::msg)?;
    for a in &answers {
        match &a.sunspec {
            Ok(chain) => {
                let i = &chain.identity;
                writeln!(
                    out,
                    "unit {}: SunSpec at {}: {} {} serial {}; models {}",
                    a.unit_id,
                    chain.base,
                    i.manufacturer,
                    i.model,
                    i.serial,
                    super::sunspec::describe_models(&chain.models)
                )?;
            }
            Err(why) => writeln!(out, "unit {}: answers; {why}", a.unit_id)?,
        }
    }
    writeln!(
        out,
        "bus {}: {} of units {}-{} answered ({:.1} s)",
        bus.id,
        answers.len(),
        args.units.0,
        args.units.1,
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// The `scan` command: exits non-zero when the config or the bus is wrong.
pub fn run(args: ScanArgs, buses: &[BusConfig]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout().lock();
    runtime.block_on(scan(&args, buses, &mut out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_ranges_are_checked() {
        assert_eq!(parse_units("1-247"), Ok((1, 247)));
        assert_eq!(parse_units("3"), Ok((3, 3)));
        assert!(parse_units("0-5").is_err());
        assert!(parse_units("5-2").is_err());
        assert!(parse_units("1-300").is_err());
    }
}
