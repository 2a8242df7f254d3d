//! A simulated DSMR P1 meter: telegrams with advancing counters, written to a
//! pseudo-terminal at the line's baud rate (as a meter's P1 port pushes them).

use std::f64::consts::TAU;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use crate::acquire::p1::{crc16, format_meter_time, Dsmr};
use crate::model::now_ms;

/// 2020-01-01T00:00:00Z: the simulated counters start from their base values here.
const EPOCH_MS: i64 = 1_577_836_800_000;

/// A simulated P1 meter and how it sends.
#[derive(Debug, Clone)]
pub struct P1Sim {
    pub dsmr: Dsmr,
    /// Varies the meter's load and counters.
    pub seed: u64,
    /// Belgian e-MUCS objects: 1-0:1.4.0, 1-0:1.6.0 and the gas meter on 0-1:24.2.3.
    pub emucs: bool,
    /// Time between telegrams.
    pub period: Duration,
    /// The meter's clock: `None` follows the wall clock; `Some(step)` starts at the
    /// wall clock and advances `step` per telegram (tests run a meter fast).
    pub step: Option<Duration>,
    /// Telegrams (counted from 0) sent with a value changed after the CRC was
    /// computed: a transmission error the CRC must catch.
    pub bad_crc: Vec<u64>,
    /// Noise bytes written before every telegram.
    pub noise: bool,
}

/// The simulated meter's values at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct P1Values {
    pub import_t1: f64,
    pub import_t2: f64,
    pub export_t1: f64,
    pub export_t2: f64,
    pub power_import: f64,
    pub power_export: f64,
    pub voltage: [f64; 3],
    pub tariff: u32,
    /// The gas meter's last reading and its time (every 5 minutes).
    pub gas: (i64, f64),
}

impl P1Sim {
    /// A meter of `dsmr` sending at the version's period on the wall clock.
    pub fn new(dsmr: Dsmr, seed: u64) -> P1Sim {
        P1Sim {
            dsmr,
            seed,
            emucs: false,
            period: dsmr.period(),
            step: None,
            bad_crc: Vec::new(),
            noise: false,
        }
    }

    /// The meter's values at `utc_ms`: a load around a seed-dependent mean that
    /// swings over ten minutes, counters that integrate it exactly (so they only go
    /// up), and a gas meter read every five minutes.
    pub fn values(&self, utc_ms: i64) -> P1Values {
        let t = (utc_ms - EPOCH_MS) as f64 / 1000.0;
        let phase = (self.seed % 7) as f64;
        let mean = 0.6 + 0.1 * (self.seed % 5) as f64;
        let swing = 0.4 * mean;
        let w = TAU / 600.0;
        let power_import = mean + swing * (w * t + phase).sin();
        // ∫ power dt in kWh.
        let import = (mean * t + swing / w * (phase.cos() - (w * t + phase).cos())) / 3600.0;
        let we = TAU / 900.0;
        let power_export = 0.15 + 0.1 * (we * t).sin();
        let export = (0.15 * t + 0.1 / we * (1.0 - (we * t).cos())) / 3600.0;
        let base = 100.0 * (self.seed % 10) as f64;
        let hour = (utc_ms.rem_euclid(86_400_000) / 3_600_000) as u32;
        let gas_ms = utc_ms - utc_ms.rem_euclid(300_000);
        let gas =
            1000.0 + 10.0 * (self.seed % 10) as f64 + 0.3 * (gas_ms - EPOCH_MS) as f64 / 3.6e6;
        let volt = |k: f64| 230.0 + 2.0 * (TAU * t / 120.0 + k).sin();
        P1Values {
            import_t1: base + 0.45 * import,
            import_t2: base + 0.55 * import,
            export_t1: 0.5 * export,
            export_t2: 0.5 * export,
            power_import,
            power_export,
            voltage: [volt(0.0), volt(2.1), volt(4.2)],
            tariff: if (6..22).contains(&hour) { 2 } else { 1 },
            gas: (gas_ms, gas),
        }
    }

    /// Telegram number `n` at `utc_ms`, with its CRC (DSMR 4 and later) and line end.
    pub fn telegram(&self, n: u64, utc_ms: i64) -> Vec<u8> {
        let v = self.values(utc_ms);
        let mut body = match self.dsmr {
            Dsmr::V2_2 | Dsmr::V3 => self.body_v2(&v, utc_ms),
            Dsmr::V4 | Dsmr::V5 => self.body_v5(&v, utc_ms),
        };
        body.push('!');
        let mut out = Vec::with_capacity(body.len() + 8);
        if self.dsmr.checks_crc() {
            let crc = crc16(body.as_bytes());
            if self.bad_crc.contains(&n) {
                // One value changed in transit: the CRC no longer matches.
                body = body.replacen(
                    &format!("1-0:1.7.0({:06.3}*kW)", v.power_import),
                    "1-0:1.7.0(99.999*kW)",
                    1,
                );
            }
            out.extend_from_slice(body.as_bytes());
            out.extend_from_slice(format!("{crc:04X}\r\n").as_bytes());
        } else {
            out.extend_from_slice(body.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn body_v5(&self, v: &P1Values, utc_ms: i64) -> String {
        let mut s = String::with_capacity(1024);
        let mut line = |l: String| {
            s.push_str(&l);
            s.push_str("\r\n");
        };
        if self.emucs {
            line("/FLU5\\253769484_A".into());
            line(String::new());
            line("0-0:96.1.4(50217)".into());
        } else {
            line("/ISk5\\2MT382-1000".into());
            line(String::new());
            line("1-3:0.2.8(50)".into());
        }
        line(format!("0-0:1.0.0({})", format_meter_time(utc_ms)));
        line(format!("0-0:96.1.1(45444745{:016X})", self.seed));
        line(format!("1-0:1.8.1({:010.3}*kWh)", v.import_t1));
        line(format!("1-0:1.8.2({:010.3}*kWh)", v.import_t2));
        line(format!("1-0:2.8.1({:010.3}*kWh)", v.export_t1));
        line(format!("1-0:2.8.2({:010.3}*kWh)", v.export_t2));
        line(format!("0-0:96.14.0({:04})", v.tariff));
        if self.emucs {
            // The 15-minute average so far, and this month's peak (a week's here).
            line(format!("1-0:1.4.0({:06.3}*kW)", v.power_import));
            let week = 7 * 86_400_000;
            let peak_ms = utc_ms - utc_ms.rem_euclid(week) + 18 * 3_600_000;
            let peak_ms = if peak_ms > utc_ms {
                peak_ms - week
            } else {
                peak_ms
            };
            line(format!(
                "1-0:1.6.0({})({:06.3}*kW)",
                format_meter_time(peak_ms),
                1.4 * v.power_import.max(0.6)
            ));
        }
        line(format!("1-0:1.7.0({:06.3}*kW)", v.power_import));
        line(format!("1-0:2.7.0({:06.3}*kW)", v.power_export));
        line("0-0:96.7.21(00004)".into());
        line("0-0:96.7.9(00002)".into());
        line("1-0:99.97.0(1)(0-0:96.7.19)(101208152415W)(0000000240*s)".into());
        let shares = [0.5, 0.3, 0.2];
        for (k, (volt_code, cur_code)) in [("32", "31"), ("52", "51"), ("72", "71")]
            .iter()
            .enumerate()
        {
            line(format!("1-0:{volt_code}.7.0({:05.1}*V)", v.voltage[k]));
            let amps = v.power_import * shares[k] * 1000.0 / v.voltage[k];
            line(format!("1-0:{cur_code}.7.0({:03.0}*A)", amps));
        }
        for (k, code) in ["21", "41", "61"].iter().enumerate() {
            line(format!(
                "1-0:{code}.7.0({:06.3}*kW)",
                v.power_import * shares[k]
            ));
        }
        for code in ["22", "42", "62"] {
            line(format!("1-0:{code}.7.0({:06.3}*kW)", v.power_export / 3.0));
        }
        line("0-0:96.13.0()".into());
        line("0-1:24.1.0(003)".into());
        line("0-1:96.1.0(3232323241424344313233343536373839)".into());
        let gas_object = if self.emucs { "24.2.3" } else { "24.2.1" };
        line(format!(
            "0-1:{gas_object}({})({:09.3}*m3)",
            format_meter_time(v.gas.0),
            v.gas.1
        ));
        s
    }

    fn body_v2(&self, v: &P1Values, _utc_ms: i64) -> String {
        let mut s = String::with_capacity(512);
        let mut line = |l: String| {
            s.push_str(&l);
            s.push_str("\r\n");
        };
        line("/ISk5\\2MT382-1004".into());
        line(String::new());
        line(format!("0-0:96.1.1({:014})", self.seed));
        line(format!("1-0:1.8.1({:09.3}*kWh)", v.import_t1));
        line(format!("1-0:1.8.2({:09.3}*kWh)", v.import_t2));
        line(format!("1-0:2.8.1({:09.3}*kWh)", v.export_t1));
        line(format!("1-0:2.8.2({:09.3}*kWh)", v.export_t2));
        line(format!("0-0:96.14.0({:04})", v.tariff));
        line(format!("1-0:1.7.0({:07.2}*kW)", v.power_import));
        line(format!("1-0:2.7.0({:07.2}*kW)", v.power_export));
        line("0-0:17.0.0(0999.00*kW)".into());
        line("0-0:96.3.10(1)".into());
        line("0-0:96.13.1()".into());
        line("0-0:96.13.0()".into());
        line("0-1:24.1.0(3)".into());
        line("0-1:96.1.0(000000000000)".into());
        // DSMR 2.2/3: hourly gas, no S/W flag, the value on its own line.
        let hour_ms = v.gas.0 - v.gas.0.rem_euclid(3_600_000);
        let stamp = format_meter_time(hour_ms);
        line(format!(
            "0-1:24.3.0({})(00)(60)(1)(0-1:24.2.1)(m3)",
            stamp.get(..12).unwrap_or_default()
        ));
        line(format!("({:09.3})", v.gas.1));
        line("0-1:24.4.0(1)".into());
        s
    }
}

/// Writes `bytes` no faster than `baud` (10 bits a character: start, 7 or 8 data
/// bits with parity or none, stop).
async fn write_paced<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8], baud: u32) -> io::Result<()> {
    const CHUNK: usize = 64;
    let start = Instant::now();
    let per_byte = Duration::from_secs_f64(10.0 / f64::from(baud.max(300)));
    let mut sent = 0usize;
    for chunk in bytes.chunks(CHUNK) {
        w.write_all(chunk).await?;
        w.flush().await?;
        sent += chunk.len();
        sleep_until(start + per_byte * u32::try_from(sent).unwrap_or(u32::MAX)).await;
    }
    Ok(())
}

/// Sends `sim`'s telegrams on `w` until `shutdown`.
pub async fn serve_p1<W: AsyncWrite + Unpin>(
    mut w: W,
    sim: P1Sim,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let baud = sim.dsmr.line().baud_rate;
    // The meter's clock has whole seconds: the values are those of the time sent.
    let whole = |ms: i64| ms - ms.rem_euclid(1000);
    let start_ms = whole(now_ms());
    let mut next = Instant::now();
    for n in 0u64.. {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sleep_until(next) => {}
        }
        let at = match sim.step {
            None => whole(now_ms()),
            Some(step) => start_ms + i64::try_from(step.as_millis()).unwrap_or(1000) * n as i64,
        };
        let mut bytes = Vec::new();
        if sim.noise {
            bytes.extend_from_slice(b"\x00\xff~noise!\r\n(");
        }
        bytes.extend_from_slice(&sim.telegram(n, at));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = write_paced(&mut w, &bytes, baud) => r?,
        }
        next += sim.period;
        // Behind (a slow machine, a reader that does not read): no burst to catch up.
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
    Ok(())
}

/// Creates a pseudo-terminal pair and sends `sim`'s telegrams on one side; returns
/// the path of the other side, which the agent opens like the meter's P1 port, and
/// the sender task. Must be called within a tokio runtime.
///
/// The task keeps the agent's side open, so the path stays valid while the agent
/// closes and reopens it. Telegrams sent while nobody reads queue in the pty until
/// it is full; the agent clears its input when it opens the port.
pub fn p1_pty(
    sim: P1Sim,
    shutdown: CancellationToken,
) -> io::Result<(PathBuf, JoinHandle<io::Result<()>>)> {
    let (sender_side, agent_side) = SerialStream::pair().map_err(io::Error::from)?;
    let path = agent_side
        .name()
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other("pty has no path"))?;
    // SAFETY: the descriptor is open (owned by `agent_side`, kept by the task);
    // TIOCNXCL takes no argument and only clears the exclusive flag, so anyone may
    // open the path. A failure changes nothing.
    unsafe { libc::ioctl(agent_side.as_raw_fd(), libc::TIOCNXCL) };
    let task = tokio::spawn(async move {
        let _held = agent_side;
        serve_p1(sender_side, sim, shutdown).await
    });
    Ok((path, task))
}
