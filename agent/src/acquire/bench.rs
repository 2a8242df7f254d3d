//! `edge-agent bench rtu`: polls per second of one RTU line against the line's
//! theoretical transaction rate.
//!
//! Eight simulated meters of different profiles share a pseudo-terminal line; the
//! simulator paces each exchange as a real line at the given baud rate would (the
//! request's and the reply's characters at 10 bits each, 8N1) before it answers.
//! The agent's own bus task polls them as fast as it may (every meter always due),
//! with the bus's `frame_gap` between exchanges. The theoretical rate is what the
//! line allows for the same block plan: per request, `(8 + 5 + 2 × words)`
//! characters of wire time plus the frame gap. The ratio says how much the agent's
//! scheduling, Modbus stack and timers cost on top of the wire.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::profile::builtin;
use super::{plan_meters, run_bus, MeterPlan};
use crate::config::Config;
use crate::sim::{SimBus, SimMeter};

/// The meters of the benchmark: float and scaled integers, input and holding
/// tables, both word orders, 16- to 64-bit types.
pub const PROFILES: [&str; 8] = [
    "sdm630",
    "abb_b23",
    "cg_em24",
    "iem3155",
    "saia_ale3",
    "dzg_dvh4013",
    "janitza_umg96rm",
    "orno_we514",
];

#[derive(Debug, Clone, clap::Args)]
pub struct BenchRtuArgs {
    /// Line speed.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Silence the agent keeps between exchanges (`frame_gap`); Modbus asks for 3.5
    /// character times, 4 ms at 9600 baud.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub frame_gap: Duration,
    /// How long to poll.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Wire characters of one poll of `meter`, and its number of requests.
pub fn poll_chars(meter: &MeterPlan) -> (usize, usize) {
    let chars = meter
        .blocks
        .iter()
        .map(|b| 8 + 5 + 2 * usize::from(b.count))
        .sum();
    (chars, meter.blocks.len())
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub theoretical_polls_per_s: f64,
    pub achieved_polls_per_s: f64,
    pub requests_per_cycle: usize,
    pub chars_per_cycle: usize,
    pub cycle: Duration,
    pub polls: u64,
    pub elapsed: Duration,
}

/// Runs the benchmark (within a tokio runtime).
pub async fn measure(args: &BenchRtuArgs) -> anyhow::Result<Figures> {
    let mut sim = SimBus::new().with_line_rate(args.baud);
    for (i, name) in PROFILES.iter().enumerate() {
        let profile = builtin(name).ok_or_else(|| anyhow::anyhow!("profile {name}"))?;
        sim.insert(
            i as u8 + 1,
            SimMeter::new(Arc::new(profile), 100 + i as u64),
        );
    }
    let shutdown = CancellationToken::new();
    let (path, server) = crate::sim::rtu_pty(Arc::new(sim), shutdown.clone())?;
    let mut text = format!(
        "gateway_id = \"bench\"\n[[buses]]\nid = \"rs485\"\ntype = \"rtu\"\nport = \"{}\"\nbaud_rate = {}\ntimeout = \"1s\"\nframe_gap = \"{}ms\"\n",
        path.display(),
        args.baud,
        args.frame_gap.as_millis()
    );
    for (i, name) in PROFILES.iter().enumerate() {
        text.push_str(&format!(
            "[[meters]]\nid = \"m{i}\"\nbus = \"rs485\"\nunit_id = {}\nprofile = \"{name}\"\ninterval = \"1ms\"\n",
            i + 1
        ));
    }
    let config = Config::from_toml(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (bus, plans) = plan_meters(&config)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .remove(0);
    let char_time = 10.0 / f64::from(args.baud.max(1));
    let (chars, requests) = plans
        .iter()
        .map(poll_chars)
        .fold((0, 0), |(c, r), (c1, r1)| (c + c1, r + r1));
    let cycle =
        Duration::from_secs_f64(chars as f64 * char_time) + args.frame_gap * requests as u32;
    let theoretical = plans.len() as f64 / cycle.as_secs_f64();

    let (tx, mut rx) = mpsc::channel(1024);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_bus(bus, plans, tx, stop.clone()));
    // The first reading starts the clock: opening the port is not line time.
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    if !matches!(first, Ok(Some(_))) {
        anyhow::bail!("no reading within 30 s");
    }
    let started = Instant::now();
    let mut polls = 0u64;
    let until = tokio::time::Instant::now() + args.duration;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {
        polls += 1;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let _ = task.await;
    shutdown.cancel();
    let _ = server.await;
    Ok(Figures {
        theoretical_polls_per_s: theoretical,
        achieved_polls_per_s: polls as f64 / elapsed.as_secs_f64(),
        requests_per_cycle: requests,
        chars_per_cycle: chars,
        cycle,
        polls,
        elapsed,
    })
}

/// `edge-agent bench rtu`: prints the figures.
pub fn run(args: BenchRtuArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let f = runtime.block_on(measure(&args))?;
    writeln!(
        out,
        "bench rtu: {} meters ({}) on one line at {} baud 8N1, frame_gap {} ms",
        PROFILES.len(),
        PROFILES.join(", "),
        args.baud,
        args.frame_gap.as_millis()
    )?;
    writeln!(
        out,
        "  line: {} requests, {} characters per cycle of all meters = {:.1} ms: theoretical {:.2} polls/s",
        f.requests_per_cycle,
        f.chars_per_cycle,
        f.cycle.as_secs_f64() * 1e3,
        f.theoretical_polls_per_s
    )?;
    writeln!(
        out,
        "  achieved: {} polls in {:.1} s = {:.2} polls/s, {:.1} % of the line's rate",
        f.polls,
        f.elapsed.as_secs_f64(),
        f.achieved_polls_per_s,
        100.0 * f.achieved_polls_per_s / f.theoretical_polls_per_s
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run at a fast line rate: the figures are consistent and the agent
    /// gets a good share of the line (a loose bound: the test machine is shared and
    /// may run under emulation).
    #[tokio::test]
    async fn the_bench_measures_polls_against_the_line() {
        let args = BenchRtuArgs {
            baud: 9600,
            frame_gap: Duration::from_millis(5),
            duration: Duration::from_secs(2),
        };
        let f = measure(&args).await.expect("runs");
        // sdm630 alone: 4 blocks of 0x12, 2, 6 and 2 words.
        assert!(f.requests_per_cycle > 8, "{f:?}");
        assert!(
            f.theoretical_polls_per_s > 1.0 && f.theoretical_polls_per_s < 20.0,
            "{f:?}"
        );
        assert!(f.polls > 0, "{f:?}");
        // Never faster than the simulated wire allows (give or take the meters of
        // one cycle at the edges of the window).
        let allowed = f.theoretical_polls_per_s * f.elapsed.as_secs_f64() + PROFILES.len() as f64;
        assert!(f.polls as f64 <= allowed, "{f:?}");
    }
}
