//! One polling task per bus.
//!
//! The task owns the bus's connection (serial port or TCP socket) and polls its
//! meters in turn, each on its own interval, scheduled by due time: the meter due
//! first is polled next; a meter whose poll is late is polled as soon as the bus is
//! free, and its next poll is one interval after that (no catch-up bursts). Every
//! request waits `frame_gap` after the previous exchange ended.
//!
//! A poll reads all blocks of the meter's plan; if any request fails the poll fails
//! as a whole (no partial readings) and is counted by kind in the meter's
//! [`MeterStats`]. A failing meter is retried with a backoff that also bounds the
//! share of bus time its failures may take, so a dead meter cannot starve the
//! healthy ones (see [`retry_delay`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::decode::{self, DecodeError};
use super::mbap::{MbapTransport, Transactions};
use super::plan::{plan, Block};
use super::profile::{self, Profile};
use super::stats::{FailureKind, MeterState, MeterStats};
use super::sunspec::{self, DevicePlan, DiscoveryError};
use crate::acquire::config::AcquireSections;
use crate::acquire::config::{BusConfig, BusType, MeterConfig, RegisterTable, Transport};
use crate::config::units::ConfigError;
use crate::model::{now_ms, Reading, Value};

/// A meter ready to poll: its configuration, register map, block reads and counters.
#[derive(Debug, Clone)]
pub struct MeterPlan {
    pub config: MeterConfig,
    pub profile: Arc<Profile>,
    pub blocks: Vec<Block>,
    pub stats: Arc<MeterStats>,
}

/// Resolves profiles, plans block reads and groups the meters by bus, in config
/// order. Buses without meters are left out (there is nothing to poll).
pub fn plan_meters(
    config: &impl AcquireSections,
) -> Result<Vec<(BusConfig, Vec<MeterPlan>)>, ConfigError> {
    let mut out = Vec::new();
    for bus in config.buses() {
        if bus.bus_type == BusType::P1 {
            let meters = super::p1::plan(config, bus);
            if !meters.is_empty() {
                out.push((bus.clone(), meters));
            }
            continue;
        }
        if bus.transport().is_none() {
            return Err(ConfigError {
                field: format!("buses[{}]", bus.id),
                reason: "bus has no port (rtu) or address (tcp)".into(),
            });
        }
        let mut meters = Vec::new();
        for m in config.meters().iter().filter(|m| m.bus == bus.id) {
            let profile = profile::resolve(config, &m.profile).map_err(|e| ConfigError {
                field: format!("meters[{}].profile", m.id),
                reason: e.reason,
            })?;
            // A built-in meter's documented read limit, if lower than the configured one.
            let limit = match config.profiles().contains_key(&m.profile) {
                true => None,
                false => profile::request_limit(&m.profile),
            };
            let max = m.max_registers_per_request.min(limit.unwrap_or(u16::MAX));
            let blocks = plan(&profile.registers, max).map_err(|e| ConfigError {
                field: format!("meters[{}].max_registers_per_request", m.id),
                reason: e.to_string(),
            })?;
            meters.push(MeterPlan {
                config: m.clone(),
                profile,
                blocks,
                stats: Arc::new(MeterStats::new(&m.id)),
            });
        }
        if !meters.is_empty() {
            out.push((bus.clone(), meters));
        }
    }
    Ok(out)
}

/// Consecutive failures retried at the meter's normal interval: a single lost
/// frame or CRC error on RS-485 is common and not a reason to wait longer.
pub const QUICK_RETRIES: u32 = 2;

/// Longest backoff between retries of a failing meter (unless its interval is longer).
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// Share of bus time, in percent, that a failing meter's attempts may take when it
/// shares the bus with other meters.
pub const FAILING_BUS_SHARE_PERCENT: u32 = 4;

/// Delay from the end of a failed poll to the next attempt.
///
/// Exponential backoff: the first [`QUICK_RETRIES`] retries come after the normal
/// interval, then the delay doubles per failure up to [`BACKOFF_CAP`]. On a shared
/// bus the delay is also at least long enough that the failed attempts (`cost`: the
/// time the bus was held, mostly the timeout and the recovery after it) take no
/// more than [`FAILING_BUS_SHARE_PERCENT`] of the bus. A timing-out meter is
/// therefore retried sparsely from the start, while a cheap failure (exception,
/// CRC error) is retried quickly. The healthy meters lose at most about that share
/// of their polls.
pub fn retry_delay(interval: Duration, failures: u32, cost: Duration, shared: bool) -> Duration {
    let cap = BACKOFF_CAP.max(interval);
    let doublings = failures.saturating_sub(QUICK_RETRIES).min(20);
    let backoff = interval.saturating_mul(1u32 << doublings).min(cap);
    if !shared {
        return backoff;
    }
    let budget = cost
        .saturating_mul(100 / FAILING_BUS_SHARE_PERCENT - 1)
        .min(cap);
    backoff.max(budget)
}

/// Next due time after a successful poll that was due at `due` and started at
/// `started`. A poll that started less than an interval late keeps the meter's
/// phase; one that started later restarts the phase at its start, so missed polls
/// are not caught up in a burst.
fn next_due(due: Instant, started: Instant, interval: Duration) -> Instant {
    let next = due + interval;
    if next <= started {
        started + interval
    } else {
        next
    }
}

/// Why a poll failed, with details for the log.
#[derive(Debug)]
enum PollError {
    Timeout,
    /// Connecting to the TCP address took longer than the bus timeout.
    ConnectTimeout(String),
    Exception(tokio_modbus::ExceptionCode),
    Transport(String),
    /// A register could not be decoded from the words read for it.
    Decode {
        register: String,
        error: DecodeError,
    },
    /// A reply with another number of words than requested.
    ReplyLength {
        expected: usize,
        got: usize,
    },
    /// A SunSpec device without a marker, with a broken chain, or whose chain
    /// changed since it was discovered.
    SunSpec(String),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::Timeout => write!(f, "timeout: no reply within the bus timeout"),
            PollError::ConnectTimeout(address) => {
                write!(f, "timeout connecting to {address}")
            }
            PollError::Exception(code) => write!(f, "modbus {}", describe_exception(*code)),
            PollError::Transport(e) => write!(f, "transport error: {e}"),
            PollError::Decode { register, error } => {
                write!(f, "decode error: register `{register}`: {error}")
            }
            PollError::ReplyLength { expected, got } => {
                let what = if got > expected {
                    "too long"
                } else {
                    "too short"
                };
                write!(
                    f,
                    "decode error: reply {what}: expected {expected} words, got {got}"
                )
            }
            PollError::SunSpec(e) => write!(f, "decode error: {e}"),
        }
    }
}

/// A Modbus exception with its code in hex and its name, e.g. `exception 0x02
/// (illegal data address)`; a code without a name says so.
fn describe_exception(code: tokio_modbus::ExceptionCode) -> String {
    use tokio_modbus::ExceptionCode as E;
    let name = match code {
        E::IllegalFunction => "illegal function",
        E::IllegalDataAddress => "illegal data address",
        E::IllegalDataValue => "illegal data value",
        E::ServerDeviceFailure => "server device failure",
        E::Acknowledge => "acknowledge",
        E::ServerDeviceBusy => "server device busy",
        E::MemoryParityError => "memory parity error",
        E::GatewayPathUnavailable => "gateway path unavailable",
        E::GatewayTargetDevice => "gateway target device failed to respond",
        E::Custom(_) => "unknown code",
    };
    format!("exception 0x{:02x} ({name})", u8::from(code))
}

/// A tokio-modbus error for the log. tokio-modbus reports the end of a TCP stream
/// as the last OS error of the thread, typically EAGAIN (11) or EINPROGRESS (115),
/// which a tokio socket never returns to its caller otherwise: that is the peer
/// closing the connection. (The TCP transport reports the close itself; this covers
/// any path that still ends up there.)
fn describe_transport(e: &tokio_modbus::Error) -> String {
    if let tokio_modbus::Error::Transport(io) = e {
        if matches!(io.raw_os_error(), Some(libc::EAGAIN | libc::EINPROGRESS)) {
            return "connection closed by the meter (end of stream)".into();
        }
    }
    e.to_string()
}

impl PollError {
    fn kind(&self) -> FailureKind {
        match self {
            PollError::Timeout | PollError::ConnectTimeout(_) => FailureKind::Timeout,
            PollError::Exception(_) => FailureKind::Exception,
            PollError::Transport(_) => FailureKind::Transport,
            PollError::Decode { .. } | PollError::ReplyLength { .. } | PollError::SunSpec(_) => {
                FailureKind::Decode
            }
        }
    }

    /// Whether the connection must be torn down before the next request. An
    /// exception is a complete, well-formed exchange. Anything else leaves the line
    /// or stream in an unknown state; a reply of the wrong length in particular may
    /// be a stale answer to an earlier request, and requests and replies would stay
    /// out of step until the line is cleared.
    fn needs_reset(&self) -> bool {
        !matches!(self, PollError::Exception(_) | PollError::SunSpec(_))
    }
}

/// The bus's connection, opened lazily and torn down after a failed exchange.
struct Link {
    transport: Transport,
    timeout: Duration,
    ctx: Option<Context>,
    /// Modbus TCP transaction ids, moving on across reconnects (see [`super::mbap`]).
    transactions: Arc<Transactions>,
}

impl Link {
    /// The open client context, connecting first if needed.
    async fn context(&mut self) -> Result<&mut Context, PollError> {
        if self.ctx.is_none() {
            let ctx = match &self.transport {
                Transport::Tcp { address } => {
                    let stream = timeout(self.timeout, tokio::net::TcpStream::connect(address))
                        .await
                        .map_err(|_| PollError::ConnectTimeout(address.clone()))?
                        .map_err(|e| PollError::Transport(format!("connect {address}: {e}")))?;
                    // Requests are small and latency matters more than packet count.
                    let _ = stream.set_nodelay(true);
                    let stream = MbapTransport::new(stream, Arc::clone(&self.transactions));
                    tokio_modbus::client::tcp::attach_slave(stream, Slave(0))
                }
                Transport::Rtu { .. } => {
                    let stream = self.open_serial()?;
                    tokio_modbus::client::rtu::attach_slave(stream, Slave(0))
                }
            };
            self.ctx = Some(ctx);
        }
        // Set just above; `ok_or_else` keeps this free of a panic path.
        self.ctx
            .as_mut()
            .ok_or_else(|| PollError::Transport("not connected".into()))
    }

    fn open_serial(&self) -> Result<SerialStream, PollError> {
        let Transport::Rtu {
            port,
            baud_rate,
            parity,
            data_bits,
            stop_bits,
        } = &self.transport
        else {
            return Err(PollError::Transport("not a serial bus".into()));
        };
        let line = super::serial::LineSettings {
            baud_rate: *baud_rate,
            parity: *parity,
            data_bits: *data_bits,
            stop_bits: *stop_bits,
        };
        super::serial::open(port, line)
            .map_err(|e| PollError::Transport(format!("open {}: {e}", port.display())))
    }

    /// Tears the connection down after a timeout or transport error and brings it
    /// back in a state where the next reply read belongs to the next request.
    ///
    /// Why: tokio-modbus matches a reply to a request only by unit id and function
    /// code (RTU) or transaction id (TCP), and clears its buffer only of bytes
    /// already read. A device that answers after our timeout would otherwise have
    /// its late reply taken as the answer to the next request, possibly for another
    /// meter polled with the same function code. On TCP, closing the socket
    /// discards what is in flight on it; we reconnect. A gateway or NAT may still
    /// hand a held reply to the new connection: the transaction ids keep moving
    /// across connections, so [`MbapTransport`] discards it. On RTU the reply is on the
    /// wire: we reopen the port and read-and-discard until the line has been quiet
    /// for a while (bounded, in case something keeps talking), then attach a fresh
    /// client to the quiet port.
    async fn recover(&mut self) {
        let was_connected = self.ctx.take().is_some();
        match &self.transport {
            Transport::Tcp { .. } => {
                // If connecting was what failed, trying again right away would only
                // hold the bus longer; the next request connects.
                if !was_connected {
                    return;
                }
                if let Err(e) = self.context().await {
                    debug!(error = %e, "reconnect failed; retrying before the next request");
                }
            }
            Transport::Rtu { baud_rate, .. } => {
                let (quiet, bound) = drain_periods(self.timeout, *baud_rate);
                match self.open_serial() {
                    Ok(mut stream) => {
                        match drain(&mut stream, quiet, bound).await {
                            Ok(0) => {}
                            Ok(n) => debug!(bytes = n, "discarded late bytes from the line"),
                            Err(e) => debug!(error = %e, "draining the serial line failed"),
                        }
                        self.ctx = Some(tokio_modbus::client::rtu::attach_slave(stream, Slave(0)));
                    }
                    Err(e) => debug!(error = %e, "reopening the serial port failed"),
                }
            }
        }
    }
}

/// Quiet period and upper bound for draining an RTU line after a timeout.
///
/// Waiting a whole timeout of silence (at least 20 character times) after the
/// timeout discards any reply that starts up to two timeouts after its request. A
/// device slower than that is indistinguishable from a dead one on a shared line;
/// raise the bus `timeout` for it. The bound stops a line that never goes quiet
/// from holding the bus forever.
fn drain_periods(request_timeout: Duration, baud_rate: u32) -> (Duration, Duration) {
    // 11 bits per character (start, 8 data, parity or stop, stop).
    let char_time = Duration::from_secs_f64(11.0 / f64::from(baud_rate.max(1)));
    let quiet = request_timeout.max(char_time * 20);
    let bound = quiet * 4 + char_time * 256;
    (quiet, bound)
}

/// Reads and discards until nothing arrives for `quiet`, or `bound` has passed.
/// Returns the number of bytes discarded.
async fn drain(stream: &mut SerialStream, quiet: Duration, bound: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + bound;
    let mut buf = [0u8; 256];
    let mut discarded = 0;
    loop {
        let until = (Instant::now() + quiet).min(deadline);
        match timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return Ok(discarded),
            Ok(Ok(0)) => return Ok(discarded),
            Ok(Ok(n)) => discarded += n,
            Ok(Err(e)) => return Err(e),
        }
        if Instant::now() >= deadline {
            warn!(
                bytes = discarded,
                "serial line did not go quiet; continuing anyway"
            );
            return Ok(discarded);
        }
    }
}

/// Bus-wide state of the polling loop.
struct BusRunner {
    bus_id: String,
    link: Link,
    frame_gap: Duration,
    request_timeout: Duration,
    /// When the last exchange on the bus ended; the next request waits `frame_gap`.
    last_exchange_end: Option<Instant>,
}

impl BusRunner {
    /// One request, bounded by the bus timeout (tokio-modbus has no timeout).
    async fn read_block(&mut self, unit_id: u8, block: &Block) -> Result<Vec<u16>, PollError> {
        if let Some(end) = self.last_exchange_end {
            sleep_until(end + self.frame_gap).await;
        }
        let request_timeout = self.request_timeout;
        let result = async {
            let ctx = self.link.context().await?;
            ctx.set_slave(Slave(unit_id));
            let request = match block.table {
                RegisterTable::Input => Request::ReadInputRegisters(block.start, block.count),
                RegisterTable::Holding => Request::ReadHoldingRegisters(block.start, block.count),
            };
            // `call` rather than `read_*_registers`: those assert on the reply length,
            // which a misbehaving device must not be able to turn into a panic.
            match timeout(request_timeout, ctx.call(request)).await {
                Err(_) => Err(PollError::Timeout),
                Ok(Err(e)) => Err(PollError::Transport(describe_transport(&e))),
                Ok(Ok(Err(code))) => Err(PollError::Exception(code)),
                Ok(Ok(Ok(
                    Response::ReadInputRegisters(words) | Response::ReadHoldingRegisters(words),
                ))) => {
                    // A reply of another length does not belong to this request.
                    if words.len() != usize::from(block.count) {
                        Err(PollError::ReplyLength {
                            expected: usize::from(block.count),
                            got: words.len(),
                        })
                    } else {
                        Ok(words)
                    }
                }
                Ok(Ok(Ok(other))) => {
                    Err(PollError::Transport(format!("unexpected reply {other:?}")))
                }
            }
        }
        .await;
        self.last_exchange_end = Some(Instant::now());
        result
    }

    /// Reads all blocks of a meter and decodes its values in profile order.
    async fn poll(&mut self, meter: &MeterPlan) -> Result<Vec<Value>, PollError> {
        let registers = &meter.profile.registers;
        let mut values: Vec<Option<Value>> = vec![None; registers.len()];
        for block in &meter.blocks {
            let words = self.read_block(meter.config.unit_id, block).await?;
            for &i in &block.registers {
                let Some(reg) = registers.get(i) else {
                    continue;
                };
                let at = block.offset_of(reg).min(words.len());
                let value =
                    decode::decode(reg, &words[at..]).map_err(|error| PollError::Decode {
                        register: reg.name.clone(),
                        error,
                    })?;
                values[i] = Some(value);
            }
        }
        Ok(values.into_iter().flatten().collect())
    }
}

/// Per-meter scheduling state.
struct Slot {
    plan: MeterPlan,
    due: Instant,
    /// A SunSpec meter's discovered read plan; `None` until discovered, and again
    /// after a failed poll (a reconnect or a changed chain rediscovers).
    sunspec: Option<DevicePlan>,
}

/// Holding-register reads of one unit for SunSpec discovery. An exception is "no
/// registers there", except a gateway's "target did not respond" (0x0A, 0x0B),
/// which is no answer.
struct UnitRegisters<'a> {
    runner: &'a mut BusRunner,
    unit: u8,
    /// Whether the unit answered at all (data or its own exception).
    answered: bool,
}

impl sunspec::Registers for UnitRegisters<'_> {
    type Error = PollError;
    async fn read(&mut self, start: u16, count: u16) -> Result<Option<Vec<u16>>, PollError> {
        use tokio_modbus::ExceptionCode as E;
        let block = Block {
            table: RegisterTable::Holding,
            start,
            count,
            registers: Vec::new(),
        };
        match self.runner.read_block(self.unit, &block).await {
            Ok(words) => {
                self.answered = true;
                Ok(Some(words))
            }
            // No answer from behind a gateway; a complete exchange all the same, so
            // the connection stays up.
            Err(e @ PollError::Exception(E::GatewayPathUnavailable | E::GatewayTargetDevice)) => {
                Err(e)
            }
            Err(PollError::Exception(_)) => {
                self.answered = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl BusRunner {
    /// Polls a meter: a SunSpec meter is discovered first if needed.
    async fn poll_slot(&mut self, slot: &mut Slot) -> Result<Vec<Value>, PollError> {
        if slot.plan.config.profile != sunspec::PROFILE {
            return self.poll(&slot.plan).await;
        }
        let result = self.poll_sunspec(slot).await;
        if result.is_err() {
            slot.sunspec = None;
        }
        result
    }

    async fn poll_sunspec(&mut self, slot: &mut Slot) -> Result<Vec<Value>, PollError> {
        let unit = slot.plan.config.unit_id;
        let max = slot.plan.config.max_registers_per_request;
        if slot.sunspec.is_none() {
            let mut regs = UnitRegisters {
                runner: self,
                unit,
                answered: false,
            };
            let chain = sunspec::discover(&mut regs, max)
                .await
                .map_err(|e| match e {
                    DiscoveryError::Read(e) => e,
                    other => PollError::SunSpec(other.to_string()),
                })?;
            let device =
                sunspec::plan_device(chain, max).map_err(|e| PollError::SunSpec(e.to_string()))?;
            info!(
                bus = %self.bus_id,
                meter = %slot.plan.config.id,
                base = device.chain.base,
                models = %sunspec::describe_models(&device.chain.models),
                manufacturer = %device.chain.identity.manufacturer,
                model = %device.chain.identity.model,
                serial = %device.chain.identity.serial,
                points = device.points.len(),
                "SunSpec device discovered"
            );
            slot.plan.stats.set_identity(device.chain.identity.clone());
            slot.sunspec = Some(device);
        }
        let Some(device) = &slot.sunspec else {
            return Err(PollError::SunSpec("not discovered".into()));
        };
        let mut replies = Vec::with_capacity(device.blocks.len());
        for block in &device.blocks {
            replies.push(self.read_block(unit, block).await?);
        }
        sunspec::decode_poll(device, &replies).map_err(|e| PollError::SunSpec(e.to_string()))
    }
}

/// One unit id that answered a scan.
#[derive(Debug)]
pub struct ScanAnswer {
    pub unit_id: u8,
    /// The SunSpec chain, or why there is none (no marker, a broken chain).
    pub sunspec: Result<sunspec::Chain, String>,
}

/// Probes `units` on a bus, one after the other, each with `timeout`, until
/// `deadline`: the unit ids that answer, with their SunSpec models. A unit that
/// answers anything (data or its own exception) is listed.
pub async fn scan(
    bus: &BusConfig,
    units: std::ops::RangeInclusive<u8>,
    request_timeout: Duration,
    deadline: Instant,
    max_per_read: u16,
) -> Result<Vec<ScanAnswer>, String> {
    let transport = bus
        .transport()
        .ok_or_else(|| format!("buses[{}]: bus has no port (rtu) or address (tcp)", bus.id))?;
    let mut runner = BusRunner {
        bus_id: bus.id.clone(),
        link: Link {
            transport,
            timeout: request_timeout,
            ctx: None,
            transactions: Arc::new(Transactions::random()),
        },
        frame_gap: bus.frame_gap.0,
        request_timeout,
        last_exchange_end: None,
    };
    let mut found = Vec::new();
    for unit in units {
        if Instant::now() >= deadline {
            break;
        }
        let mut regs = UnitRegisters {
            runner: &mut runner,
            unit,
            answered: false,
        };
        let result = timeout_at(deadline, sunspec::discover(&mut regs, max_per_read)).await;
        let answered = regs.answered;
        let sunspec = match result {
            Err(_) => break,
            Ok(Ok(chain)) => Ok(chain),
            Ok(Err(DiscoveryError::Read(e))) => {
                if e.needs_reset() {
                    runner.link.recover().await;
                    runner.last_exchange_end = Some(Instant::now());
                }
                Err(e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
        };
        if answered {
            found.push(ScanAnswer {
                unit_id: unit,
                sunspec,
            });
        }
    }
    Ok(found)
}

/// Polls the meters of one bus until `shutdown` is cancelled or the sink is closed.
///
/// Sends one [`Reading`] per successful poll (timestamp: start of the poll). On
/// cancellation the task returns at once; a request in flight is abandoned.
pub async fn run_bus(
    bus: BusConfig,
    meters: Vec<MeterPlan>,
    sink: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
) {
    if bus.bus_type == BusType::P1 {
        return super::p1::run_p1(bus, meters, sink, shutdown).await;
    }
    let bus_id = bus.id.clone();
    if shutdown
        .run_until_cancelled(run(bus, meters, sink))
        .await
        .is_none()
    {
        debug!(bus = %bus_id, "bus task stopped");
    }
}

async fn run(bus: BusConfig, meters: Vec<MeterPlan>, sink: mpsc::Sender<Reading>) {
    let Some(transport) = bus.transport() else {
        warn!(bus = %bus.id, "bus has no port or address; not polling it");
        return;
    };
    if meters.is_empty() {
        return;
    }
    let mut runner = BusRunner {
        bus_id: bus.id.clone(),
        link: Link {
            transport,
            timeout: bus.timeout.0,
            ctx: None,
            transactions: Arc::new(Transactions::random()),
        },
        frame_gap: bus.frame_gap.0,
        request_timeout: bus.timeout.0,
        last_exchange_end: None,
    };
    let shared = meters.len() > 1;
    let start = Instant::now();
    let mut slots: Vec<Slot> = meters
        .into_iter()
        .map(|plan| Slot {
            plan,
            due: start,
            sunspec: None,
        })
        .collect();
    info!(bus = %bus.id, meters = slots.len(), "polling");
    loop {
        // Earliest due first; config order breaks ties.
        let Some(i) = (0..slots.len()).min_by_key(|&i| (slots[i].due, i)) else {
            return;
        };
        sleep_until(slots[i].due).await;
        let slot = &mut slots[i];
        let stats = Arc::clone(&slot.plan.stats);
        let interval = slot.plan.config.interval.0;
        let started = Instant::now();
        let poll_started_ms = now_ms();
        stats.poll_started(poll_started_ms);
        match runner.poll_slot(slot).await {
            Ok(values) => {
                // A reading is stamped when its last reply arrived: the values are as
                // of the end of the read, not its start (a slow meter or a long
                // multi-block poll would otherwise date them too early).
                let ts_ms = now_ms();
                let latency = started.elapsed();
                let invalid = values.iter().filter(|v| v.invalid.is_some()).count();
                if stats.state() != MeterState::Ok && stats.state() != MeterState::Pending {
                    info!(bus = %runner.bus_id, meter = %slot.plan.config.id, "meter answers again");
                }
                stats.record_success(ts_ms, latency, invalid);
                slot.due = next_due(slot.due, started, interval);
                let reading = Reading {
                    meter: slot.plan.config.id.clone(),
                    ts_ms,
                    values,
                };
                if sink.send(reading).await.is_err() {
                    debug!(bus = %runner.bus_id, "reading sink closed; stopping");
                    return;
                }
            }
            Err(e) => {
                let failures = stats.record_failure(e.kind());
                if e.needs_reset() {
                    runner.link.recover().await;
                    runner.last_exchange_end = Some(Instant::now());
                }
                // The bus was held from the start of the poll through the recovery.
                let cost = started.elapsed();
                let delay = retry_delay(interval, failures, cost, shared);
                let state = if delay > interval {
                    MeterState::BackingOff
                } else {
                    MeterState::Failing
                };
                if failures == 1 {
                    warn!(bus = %runner.bus_id, meter = %slot.plan.config.id, error = %e, "poll failed");
                } else {
                    debug!(bus = %runner.bus_id, meter = %slot.plan.config.id, error = %e, failures, retry_in = ?delay, "poll failed");
                }
                stats.set_state(state);
                let retry_at =
                    now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                stats.record_error(poll_started_ms, &e.to_string(), retry_at);
                slot.due = Instant::now() + delay;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_is_quick_first_then_exponential_and_capped() {
        let interval = Duration::from_secs(5);
        let cheap = 10 * MS;
        let d: Vec<Duration> = (1..=12)
            .map(|f| retry_delay(interval, f, cheap, false))
            .collect();
        assert_eq!(d[0], interval);
        assert_eq!(d[1], interval);
        assert_eq!(d[2], interval * 2);
        assert_eq!(d[3], interval * 4);
        assert_eq!(d[6], interval * 32);
        assert_eq!(d[7], BACKOFF_CAP);
        assert_eq!(d[11], BACKOFF_CAP);
        assert_eq!(retry_delay(interval, u32::MAX, cheap, true), BACKOFF_CAP);
        // An interval longer than the cap is not shortened.
        let long = Duration::from_secs(900);
        assert_eq!(retry_delay(long, 30, cheap, false), long);
    }

    #[test]
    fn failures_that_hold_the_bus_are_spread_out_on_a_shared_bus() {
        let interval = 100 * MS;
        let timeout = 200 * MS;
        let d = retry_delay(interval, 1, timeout, true);
        // At most FAILING_BUS_SHARE_PERCENT of the bus time goes to the failing meter.
        let share = timeout.as_secs_f64() / (timeout + d).as_secs_f64();
        assert!(share <= f64::from(FAILING_BUS_SHARE_PERCENT) / 100.0 + 1e-9);
        // Alone on its bus, nobody is starved: plain backoff.
        assert_eq!(retry_delay(interval, 1, timeout, false), interval);
        // A cheap failure is retried at the normal interval.
        assert_eq!(retry_delay(interval, 1, MS, true), interval);
    }

    #[test]
    fn plan_meters_groups_by_bus_with_blocks() {
        let config = Config::from_toml(crate::config::DEFAULT_CONFIG).expect("parses");
        let buses = plan_meters(&config).expect("plans");
        let summary: Vec<(&str, Vec<(&str, usize)>)> = buses
            .iter()
            .map(|(b, ms)| {
                let meters = ms
                    .iter()
                    .map(|m| (m.config.id.as_str(), m.blocks.len()))
                    .collect();
                (b.id.as_str(), meters)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("rs485", vec![("main", 4), ("heatpump", 4)]),
                ("lan", vec![("pv", 1)]),
            ]
        );
        let pv = &buses[1].1[0];
        assert_eq!(pv.blocks[0].table, RegisterTable::Holding);
        assert_eq!((pv.blocks[0].start, pv.blocks[0].count), (0, 7));
        assert_eq!(pv.stats.meter(), "pv");

        // A register that does not fit in one request is named.
        let text = crate::config::DEFAULT_CONFIG.replace(
            "interval = \"10s\"\n\n# A user",
            "interval = \"10s\"\nmax_registers_per_request = 1\n\n# A user",
        );
        let config = Config::from_toml(&text).expect("parses");
        let e = plan_meters(&config).expect_err("u32 does not fit in 1 register");
        assert_eq!(e.field, "meters[pv].max_registers_per_request");
        assert!(e.reason.contains("`power` spans 2 words"), "{e}");
    }

    #[test]
    fn late_polls_are_not_caught_up() {
        let t0 = Instant::now();
        let interval = 100 * MS;
        // On time, or a little late: the phase is kept.
        assert_eq!(next_due(t0, t0, interval), t0 + interval);
        assert_eq!(next_due(t0, t0 + 30 * MS, interval), t0 + interval);
        // Two intervals late: one poll now, the next a full interval later.
        assert_eq!(next_due(t0, t0 + 250 * MS, interval), t0 + 350 * MS);
    }

    #[test]
    fn poll_errors_say_what_happened() {
        use tokio_modbus::ExceptionCode;
        assert_eq!(
            PollError::Exception(ExceptionCode::Custom(0x0c)).to_string(),
            "modbus exception 0x0c (unknown code)"
        );
        assert_eq!(
            PollError::Exception(ExceptionCode::IllegalDataAddress).to_string(),
            "modbus exception 0x02 (illegal data address)"
        );
        assert_eq!(
            PollError::Exception(ExceptionCode::GatewayTargetDevice).to_string(),
            "modbus exception 0x0b (gateway target device failed to respond)"
        );
        assert_eq!(
            PollError::ReplyLength {
                expected: 7,
                got: 8
            }
            .to_string(),
            "decode error: reply too long: expected 7 words, got 8"
        );
        assert_eq!(
            PollError::ReplyLength {
                expected: 7,
                got: 6
            }
            .to_string(),
            "decode error: reply too short: expected 7 words, got 6"
        );
        let e = PollError::Decode {
            register: "power".into(),
            error: DecodeError { needed: 2, got: 1 },
        };
        assert_eq!(
            e.to_string(),
            "decode error: register `power`: needs 2 words, only 1 available"
        );
        assert_eq!(e.kind(), FailureKind::Decode);
        // tokio-modbus's end of stream: the thread's last OS error.
        for errno in [libc::EAGAIN, libc::EINPROGRESS] {
            let e = tokio_modbus::Error::Transport(io::Error::from_raw_os_error(errno));
            assert_eq!(
                describe_transport(&e),
                "connection closed by the meter (end of stream)"
            );
        }
        let refused =
            tokio_modbus::Error::Transport(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(describe_transport(&refused).contains("refused"));
        assert_eq!(
            PollError::ConnectTimeout("192.0.2.1:502".into()).to_string(),
            "timeout connecting to 192.0.2.1:502"
        );
    }

    fn tcp_runner(address: String) -> BusRunner {
        BusRunner {
            bus_id: "lan".into(),
            link: Link {
                transport: Transport::Tcp { address },
                timeout: Duration::from_secs(5),
                ctx: None,
                transactions: Arc::new(Transactions::random()),
            },
            frame_gap: Duration::ZERO,
            request_timeout: Duration::from_secs(5),
            last_exchange_end: None,
        }
    }

    /// A meter (or gateway) that reads the request and closes the connection: the
    /// log says so, not "os error 11".
    #[tokio::test]
    async fn a_peer_close_is_reported_as_a_close() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                // The whole request (12 bytes), then a clean close.
                let mut request = [0u8; 12];
                let _ = stream.read_exact(&mut request).await;
            }
        });
        let mut runner = tcp_runner(addr.to_string());
        let block = Block {
            table: RegisterTable::Input,
            start: 0,
            count: 2,
            registers: vec![0],
        };
        let e = runner.read_block(1, &block).await.expect_err("closed");
        assert_eq!(
            e.to_string(),
            "transport error: connection closed by the meter"
        );
        assert_eq!(e.kind(), FailureKind::Transport);
        server.abort();
    }

    #[test]
    fn drain_waits_longer_than_a_character_gap() {
        let (quiet, bound) = drain_periods(Duration::from_millis(500), 9600);
        assert_eq!(quiet, Duration::from_millis(500));
        assert!(bound > quiet);
        // Short timeouts at slow rates still wait 20 character times.
        let (quiet, _) = drain_periods(Duration::from_millis(2), 1200);
        assert!(quiet >= Duration::from_secs_f64(20.0 * 11.0 / 1200.0) - MS);
    }
}
