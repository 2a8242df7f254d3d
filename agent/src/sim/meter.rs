//! One simulated meter: register image from the value model, fault switches, and the
//! history of what it served.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::acquire::config::{DataType, RegisterConfig, RegisterTable, WordOrder};
use crate::acquire::profile::Profile;
use crate::model::{now_ms, Kind};

use super::model::{splitmix64, Model, State};

/// How many served replies a meter remembers.
pub const SERVED_CAPACITY: usize = 10_000;

/// Modbus exception codes the simulator sends.
pub mod exception {
    pub const ILLEGAL_FUNCTION: u8 = 0x01;
    pub const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
    pub const ILLEGAL_DATA_VALUE: u8 = 0x03;
    pub const SERVER_DEVICE_FAILURE: u8 = 0x04;
    pub const GATEWAY_TARGET_FAILED: u8 = 0x0B;
}

/// Largest register count of one read (Modbus limit for 0x03/0x04).
const MAX_READ: u16 = 125;

/// What kind of reply went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A normal data reply.
    Data,
    /// A data reply sent with this (wrong) unit id in the frame.
    WrongUnit(u8),
    /// An exception reply with this code (natural or injected).
    Exception(u8),
    /// Random bytes instead of the frame.
    Garbage,
    /// A data reply held back and sent on a later TCP connection (see
    /// [`SimFaults::hold_for_next_connection`]); the words are those of the
    /// original request's time.
    Held,
}

/// One reply that was sent, for bit-exact assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// Unit id the request addressed (this meter's).
    pub unit_id: u8,
    /// Function code of the request.
    pub function: u8,
    /// Register table, for 0x03 (holding) and 0x04 (input) requests.
    pub table: Option<RegisterTable>,
    pub start: u16,
    pub count: u16,
    /// Register words as served; empty unless `reply` is `Data` or `WrongUnit`.
    pub words: Vec<u16>,
    pub reply: ReplyKind,
    /// Model time the values were computed for (see [`SimMeter::value_at`]).
    pub model_time: Duration,
    /// Wall clock when the reply was written, Unix ms (same clock as `Reading::ts_ms`).
    pub sent_at_ms: i64,
}

/// Counters of a meter, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests addressed to this meter.
    pub requests: u64,
    /// Replies of any kind written.
    pub replies: u64,
    pub data_replies: u64,
    /// Exception replies written, natural or injected.
    pub exceptions: u64,
    pub garbage: u64,
    pub wrong_unit: u64,
    /// Replies that were delayed by `late_reply`.
    pub late: u64,
    /// Requests left unanswered because of `silence`.
    pub silenced: u64,
    /// Held replies sent on a later TCP connection.
    pub held: u64,
}

#[derive(Debug, Default)]
struct FaultState {
    late: Option<(Duration, u32)>,
    exception: Option<(u8, u32)>,
    garbage: u32,
    wrong_unit: u32,
    silence: bool,
    hold: u32,
}

/// Run-time fault switches of one meter. Cloning gives another handle to the same
/// switches. Counted faults apply to the next replies; when several are armed, a
/// reply is delayed (late) and then carries at most one of exception, garbage or
/// wrong unit, in that order of precedence.
#[derive(Debug, Clone, Default)]
pub struct SimFaults {
    state: Arc<Mutex<FaultState>>,
}

impl SimFaults {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // The state is plain data: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delays the next `count` replies by `delay`.
    pub fn late_reply(&self, delay: Duration, count: u32) {
        self.lock().late = (count > 0).then_some((delay, count));
    }

    /// Answers the next `count` requests with exception `code`.
    pub fn exception(&self, code: u8, count: u32) {
        self.lock().exception = (count > 0).then_some((code, count));
    }

    /// Sends random bytes instead of the next `count` replies.
    pub fn garbage(&self, count: u32) {
        self.lock().garbage = count;
    }

    /// Sends the next `count` replies with another unit id in the frame.
    pub fn wrong_unit(&self, count: u32) {
        self.lock().wrong_unit = count;
    }

    /// Holds the next `count` replies back (TCP only; RTU ignores it): each is not
    /// sent on its connection but on the next connection that sends a request, just
    /// before that request's reply, with its original transaction id. So does a
    /// TCP-to-RTU gateway that forwards a late answer from the serial side on
    /// whatever connection is open when it arrives.
    pub fn hold_for_next_connection(&self, count: u32) {
        self.lock().hold = count;
    }

    /// While on, the meter does not reply at all.
    pub fn silence(&self, on: bool) {
        self.lock().silence = on;
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        *self.lock() = FaultState::default();
    }

    /// True while any fault is armed or silence is on.
    pub fn armed(&self) -> bool {
        let s = self.lock();
        s.late.is_some()
            || s.exception.is_some()
            || s.garbage > 0
            || s.wrong_unit > 0
            || s.silence
            || s.hold > 0
    }
}

/// What the transport should send for one request.
#[derive(Debug)]
pub(crate) struct Reply {
    pub delay: Duration,
    /// Unit id to put in the frame.
    pub frame_unit: u8,
    /// The response PDU (function code first).
    pub pdu: Vec<u8>,
    /// Replace the whole frame by random bytes of the same length.
    pub garbage: bool,
    /// Send on the next TCP connection instead (see `hold_for_next_connection`).
    pub hold: bool,
    /// Filled in by the transport when the reply was written.
    pub record: Served,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    replies: AtomicU64,
    data_replies: AtomicU64,
    exceptions: AtomicU64,
    garbage: AtomicU64,
    wrong_unit: AtomicU64,
    late: AtomicU64,
    silenced: AtomicU64,
    held: AtomicU64,
}

/// Where a register's value comes from in the model.
#[derive(Debug, Clone, Copy)]
enum Source {
    Voltage(Agg),
    Current(Agg),
    Power(Agg),
    PowerFactor(Agg),
    Frequency,
    Import,
    Export,
    /// Import + export, e.g. Eastron's "total active energy".
    Total,
    /// Something the model does not know: a smooth value inside the range.
    Gauge,
}

/// Which phase(s) a quantity refers to.
#[derive(Debug, Clone, Copy)]
enum Agg {
    Phase(usize),
    /// The meter-level figure: sum (power, current) or mean (voltage, pf).
    All,
}

#[derive(Debug, Clone)]
struct Slot {
    reg: RegisterConfig,
    source: Source,
    /// Multiplier from the model's base unit to the register's unit.
    unit_factor: f64,
    channel: u64,
}

/// A simulated meter serving one profile. Values are a deterministic function of the
/// seed and the model time, which runs from the meter's creation, `time_scale` times
/// faster than the wall clock.
#[derive(Debug)]
pub struct SimMeter {
    profile: Arc<Profile>,
    model: Model,
    slots: Vec<Slot>,
    epoch: Instant,
    time_scale: f64,
    /// Model time at creation (see [`SimMeter::with_model_offset`]); moved by
    /// [`SimMeter::set_model_time`].
    offset: Mutex<Duration>,
    faults: SimFaults,
    counters: Counters,
    served: Mutex<VecDeque<Served>>,
    /// Highest energy values handed out (import, export): keeps counters monotone
    /// even across floating-point rounding of the closed-form integral.
    energy_floor: Mutex<(f64, f64)>,
    garbage_seq: AtomicU64,
    seed: u64,
    /// Words served as they are, over the profile's registers (a SunSpec device's
    /// marker, model headers, scale factors, "not implemented" points).
    fixed: Vec<(RegisterTable, u16, u16)>,
}

impl SimMeter {
    pub fn new(profile: Arc<Profile>, seed: u64) -> SimMeter {
        let phases = if profile
            .registers
            .iter()
            .any(|r| phase_of(&r.name).is_some_and(|p| p > 0))
        {
            3
        } else {
            1
        };
        let model = Model::new(seed, phases);
        let slots = profile
            .registers
            .iter()
            .map(|r| Slot {
                reg: r.clone(),
                source: source_of(&profile, r, phases),
                unit_factor: unit_factor(r.kind, &r.unit),
                channel: splitmix64(
                    r.name
                        .bytes()
                        .fold(seed, |h, b| splitmix64(h ^ u64::from(b))),
                ),
            })
            .collect();
        SimMeter {
            profile,
            model,
            slots,
            epoch: Instant::now(),
            time_scale: 1.0,
            offset: Mutex::new(Duration::ZERO),
            faults: SimFaults::default(),
            counters: Counters::default(),
            served: Mutex::new(VecDeque::new()),
            energy_floor: Mutex::new((f64::MIN, f64::MIN)),
            garbage_seq: AtomicU64::new(0),
            seed,
            fixed: Vec::new(),
        }
    }

    /// Serves `words` from `start` in `table` as they are, in place of anything the
    /// profile maps there. Words beyond register 65535 are left out.
    pub fn with_fixed_words(mut self, table: RegisterTable, start: u16, words: &[u16]) -> SimMeter {
        for (i, w) in words.iter().enumerate() {
            if let Ok(a) = u16::try_from(usize::from(start) + i) {
                self.fixed.push((table, a, *w));
            }
        }
        self
    }

    /// Runs model time `scale` times faster than the wall clock (a demo can show a
    /// day's load curve in minutes). Values must be finite and positive.
    pub fn with_time_scale(mut self, scale: f64) -> SimMeter {
        if scale.is_finite() && scale > 0.0 {
            self.time_scale = scale;
        }
        self
    }

    /// Starts the meter's model time at `offset` instead of 0, so the model times
    /// before it can serve as the meter's history (the demo's backfill) and the
    /// live values continue from there.
    pub fn with_model_offset(self, offset: Duration) -> SimMeter {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) = offset;
        self
    }

    /// Moves the model time so that it is `at` now and runs on from there (the
    /// demo continues its stored counters after a restart).
    pub fn set_model_time(&self, at: Duration) {
        let elapsed = self.epoch.elapsed().mul_f64(self.time_scale);
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) = at.saturating_sub(elapsed);
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }

    /// A handle to this meter's fault switches.
    pub fn faults(&self) -> SimFaults {
        self.faults.clone()
    }

    /// Model time now: the offset plus elapsed wall time since creation times the
    /// time scale.
    pub fn model_time(&self) -> Duration {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
            + self.epoch.elapsed().mul_f64(self.time_scale)
    }

    /// The value of quantity `name` at model time `at`, in the register's unit, before
    /// encoding (a decoder should get this back within the register's resolution).
    /// Energy counters are not floored here; see [`SimMeter::read_at`].
    pub fn value_at(&self, name: &str, at: Duration) -> Option<f64> {
        let slot = self.slots.iter().find(|s| s.reg.name == name)?;
        let state = self.model.state_at(self.model.start_s + at.as_secs_f64());
        Some(self.slot_value(slot, &state, at.as_secs_f64()))
    }

    /// Register words for a read of `count` registers from `start`, at model time
    /// `at`; `Err(exception code)` for an illegal address range. Unmapped words
    /// inside the range read as 0, as on Eastron meters.
    pub fn read_at(
        &self,
        table: RegisterTable,
        start: u16,
        count: u16,
        at: Duration,
    ) -> Result<Vec<u16>, u8> {
        let highest = self
            .slots
            .iter()
            .filter(|s| s.reg.table == table)
            .map(|s| u32::from(s.reg.address) + u32::from(s.reg.data_type.words()) - 1)
            .chain(
                self.fixed
                    .iter()
                    .filter(|f| f.0 == table)
                    .map(|f| u32::from(f.1)),
            )
            .max();
        let end = u32::from(start) + u32::from(count);
        match highest {
            Some(h) if count > 0 && count <= MAX_READ && u32::from(start) <= h && end <= 65_536 => {
            }
            _ => return Err(exception::ILLEGAL_DATA_ADDRESS),
        }
        let t = at.as_secs_f64();
        let state = self.floored(self.model.state_at(self.model.start_s + t));
        let mut words = vec![0u16; usize::from(count)];
        for slot in self.slots.iter().filter(|s| s.reg.table == table) {
            let addr = u32::from(slot.reg.address);
            let n = u32::from(slot.reg.data_type.words());
            if addr + n <= u32::from(start) || addr >= end {
                continue;
            }
            let encoded = encode(&slot.reg, self.slot_value(slot, &state, t));
            for (i, w) in encoded.into_iter().enumerate() {
                let a = addr + i as u32;
                if a >= u32::from(start) && a < end {
                    words[(a - u32::from(start)) as usize] = w;
                }
            }
        }
        for &(t, a, w) in &self.fixed {
            let a = u32::from(a);
            if t == table && a >= u32::from(start) && a < end {
                words[(a - u32::from(start)) as usize] = w;
            }
        }
        Ok(words)
    }

    /// Register words at the current model time.
    pub fn read(&self, table: RegisterTable, start: u16, count: u16) -> Result<Vec<u16>, u8> {
        self.read_at(table, start, count, self.model_time())
    }

    /// The last served replies, oldest first (at most [`SERVED_CAPACITY`]).
    pub fn served(&self) -> Vec<Served> {
        self.served_lock().iter().cloned().collect()
    }

    /// Forgets the served history.
    pub fn clear_served(&self) {
        self.served_lock().clear();
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: get(&c.requests),
            replies: get(&c.replies),
            data_replies: get(&c.data_replies),
            exceptions: get(&c.exceptions),
            garbage: get(&c.garbage),
            wrong_unit: get(&c.wrong_unit),
            late: get(&c.late),
            silenced: get(&c.silenced),
            held: get(&c.held),
        }
    }

    fn served_lock(&self) -> MutexGuard<'_, VecDeque<Served>> {
        // Plain data; a poisoned lock still holds a usable history.
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn floored(&self, mut s: State) -> State {
        let mut floor = self.energy_floor.lock().unwrap_or_else(|e| e.into_inner());
        floor.0 = floor.0.max(s.import_kwh);
        floor.1 = floor.1.max(s.export_kwh);
        s.import_kwh = floor.0;
        s.export_kwh = floor.1;
        s
    }

    fn slot_value(&self, slot: &Slot, s: &State, t: f64) -> f64 {
        let agg = |v: &[f64], a: Agg, mean: bool| match a {
            Agg::Phase(k) => v.get(k).copied().unwrap_or(0.0),
            Agg::All if mean => v.iter().sum::<f64>() / v.len().max(1) as f64,
            Agg::All => v.iter().sum(),
        };
        let (lo, hi) = range(&slot.reg);
        let f = slot.unit_factor;
        let model = match slot.source {
            Source::Voltage(a) => agg(&s.voltage, a, true) * f,
            Source::Current(a) => agg(&s.current, a, false) * f,
            Source::Power(a) => agg(&s.power, a, false) * f,
            Source::PowerFactor(a) => agg(&s.power_factor, a, true) * f,
            Source::Frequency => s.frequency * f,
            Source::Import | Source::Export | Source::Total => {
                let (total, delta) = match slot.source {
                    Source::Import => (s.import_kwh, s.import_delta_kwh),
                    Source::Export => (s.export_kwh, s.export_delta_kwh),
                    _ => (
                        s.import_kwh + s.export_kwh,
                        s.import_delta_kwh + s.export_delta_kwh,
                    ),
                };
                let total = total * f;
                // A register too small for the lifetime total counts from its start
                // instead (both are monotone).
                let cap = capacity(&slot.reg).min(hi);
                return if total <= cap {
                    total.max(lo)
                } else {
                    (lo.max(0.0) + delta * f).min(cap)
                };
            }
            Source::Gauge => return self.model.in_range(slot.channel, lo, hi, t),
        };
        if model >= lo && model <= hi {
            model
        } else {
            self.model.in_range(slot.channel, lo, hi, t)
        }
    }

    /// Handles one request PDU addressed to this meter: faults, the read, counters.
    pub(crate) fn handle(&self, unit_id: u8, pdu: &[u8]) -> Option<Reply> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut faults = self.faults.lock();
        if faults.silence {
            self.counters.silenced.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let function = pdu.first().copied().unwrap_or(0);
        let table = match function {
            0x03 => Some(RegisterTable::Holding),
            0x04 => Some(RegisterTable::Input),
            _ => None,
        };
        let (start, count) = match pdu {
            [_, a0, a1, c0, c1] => (
                u16::from_be_bytes([*a0, *a1]),
                u16::from_be_bytes([*c0, *c1]),
            ),
            _ => (0, 0),
        };
        let model_time = self.model_time();
        let mut result = match table {
            None => Err(exception::ILLEGAL_FUNCTION),
            Some(_) if pdu.len() != 5 => Err(exception::ILLEGAL_DATA_VALUE),
            Some(table) => self.read_at(table, start, count, model_time),
        };

        let mut delay = Duration::ZERO;
        if let Some((d, n)) = faults.late {
            delay = d;
            faults.late = (n > 1).then_some((d, n - 1));
        }
        let mut garbage = false;
        let mut frame_unit = unit_id;
        if let Some((code, n)) = faults.exception {
            result = Err(code);
            faults.exception = (n > 1).then_some((code, n - 1));
        } else if faults.garbage > 0 {
            faults.garbage -= 1;
            garbage = true;
        } else if faults.wrong_unit > 0 {
            faults.wrong_unit -= 1;
            frame_unit = if unit_id >= 247 { 1 } else { unit_id + 1 };
        }
        let hold = faults.hold > 0;
        faults.hold = faults.hold.saturating_sub(1);
        drop(faults);

        let (pdu, words, reply) = match result {
            Ok(words) => {
                let mut out = Vec::with_capacity(2 + 2 * words.len());
                out.push(function);
                // At most 125 words: the byte count fits a u8.
                out.push((words.len() * 2) as u8);
                for w in &words {
                    out.extend_from_slice(&w.to_be_bytes());
                }
                let kind = if frame_unit != unit_id {
                    ReplyKind::WrongUnit(frame_unit)
                } else {
                    ReplyKind::Data
                };
                (out, words, kind)
            }
            Err(code) => (
                vec![function | 0x80, code],
                Vec::new(),
                ReplyKind::Exception(code),
            ),
        };
        let reply = if garbage { ReplyKind::Garbage } else { reply };
        let words = if garbage { Vec::new() } else { words };
        Some(Reply {
            delay,
            frame_unit,
            pdu,
            garbage,
            hold,
            record: Served {
                unit_id,
                function,
                table,
                start,
                count,
                words,
                reply,
                model_time,
                sent_at_ms: 0,
            },
        })
    }

    /// Random bytes for a garbage reply, reproducible per meter seed.
    pub(crate) fn garbage_bytes(&self, len: usize) -> Vec<u8> {
        let n = self.garbage_seq.fetch_add(1, Ordering::Relaxed);
        let mut h = splitmix64(self.seed ^ 0x6A7B_A6E0 ^ n);
        (0..len)
            .map(|_| {
                h = splitmix64(h);
                h as u8
            })
            .collect()
    }

    /// Records a reply the transport has written.
    pub(crate) fn sent(&self, mut record: Served, delayed: bool) {
        let c = &self.counters;
        c.replies.fetch_add(1, Ordering::Relaxed);
        if delayed {
            c.late.fetch_add(1, Ordering::Relaxed);
        }
        match record.reply {
            ReplyKind::Data => c.data_replies.fetch_add(1, Ordering::Relaxed),
            ReplyKind::WrongUnit(_) => c.wrong_unit.fetch_add(1, Ordering::Relaxed),
            ReplyKind::Exception(_) => c.exceptions.fetch_add(1, Ordering::Relaxed),
            ReplyKind::Garbage => c.garbage.fetch_add(1, Ordering::Relaxed),
            ReplyKind::Held => c.held.fetch_add(1, Ordering::Relaxed),
        };
        record.sent_at_ms = now_ms();
        let mut served = self.served_lock();
        if served.len() >= SERVED_CAPACITY {
            served.pop_front();
        }
        served.push_back(record);
    }
}

/// `_l1`, `_l2`, `_l3` (or `l1`... at the end of the name) → phase index.
fn phase_of(name: &str) -> Option<usize> {
    let lower = name.to_ascii_lowercase();
    ["l1", "l2", "l3"]
        .iter()
        .position(|suffix| lower.ends_with(suffix))
}

fn source_of(profile: &Profile, r: &RegisterConfig, phases: usize) -> Source {
    let agg = match phase_of(&r.name) {
        Some(k) if k < phases => Agg::Phase(k),
        Some(_) => Agg::Phase(0),
        None => Agg::All,
    };
    let name = r.name.to_ascii_lowercase();
    match r.kind {
        Kind::Voltage => Source::Voltage(agg),
        Kind::Current => Source::Current(agg),
        Kind::Power => Source::Power(agg),
        Kind::PowerFactor => Source::PowerFactor(agg),
        Kind::Frequency => Source::Frequency,
        Kind::EnergyTotal if name.contains("export") => Source::Export,
        Kind::EnergyTotal if name.contains("import") => Source::Import,
        // A lone energy register is what the meter imported; next to separate
        // import and export registers it is their sum.
        Kind::EnergyTotal
            if profile.registers.iter().any(|o| {
                o.kind == Kind::EnergyTotal && o.name.to_ascii_lowercase().contains("export")
            }) =>
        {
            Source::Total
        }
        Kind::EnergyTotal => Source::Import,
        Kind::EnergyDelta | Kind::Gauge => Source::Gauge,
    }
}

/// Factor from the model's base unit (V, A, W, kWh, Hz, pf as a fraction) to `unit`.
fn unit_factor(kind: Kind, unit: &str) -> f64 {
    let u = unit.trim();
    match kind {
        Kind::Voltage => match u {
            "mV" => 1e3,
            "kV" => 1e-3,
            _ => 1.0,
        },
        Kind::Current => match u {
            "mA" => 1e3,
            "kA" => 1e-3,
            _ => 1.0,
        },
        Kind::Power => match u {
            "kW" => 1e-3,
            "MW" => 1e-6,
            _ => 1.0,
        },
        Kind::EnergyTotal => match u {
            "Wh" => 1e3,
            "MWh" => 1e-3,
            _ => 1.0,
        },
        Kind::PowerFactor if u == "%" => 100.0,
        _ => 1.0,
    }
}

/// The plausible range of a register: min/max when given, else around the model.
fn range(r: &RegisterConfig) -> (f64, f64) {
    const SPAN: f64 = 100.0;
    match (r.min, r.max) {
        (Some(lo), Some(hi)) => (lo, hi),
        (Some(lo), None) if r.kind == Kind::EnergyTotal => (lo, f64::INFINITY),
        (Some(lo), None) => (lo, lo.max(0.0) + SPAN.max(lo.abs())),
        (None, Some(hi)) => (hi - SPAN.max(hi.abs()), hi),
        (None, None) if r.kind == Kind::EnergyTotal => (0.0, f64::INFINITY),
        (None, None) => (0.0, SPAN),
    }
}

/// Largest value the register can hold, in the register's unit.
fn capacity(r: &RegisterConfig) -> f64 {
    let max = match r.data_type {
        DataType::U16 => f64::from(u16::MAX),
        DataType::I16 => f64::from(i16::MAX),
        DataType::U32 => f64::from(u32::MAX),
        DataType::I32 => f64::from(i32::MAX),
        DataType::U64 => u64::MAX as f64,
        DataType::I64 => i64::MAX as f64,
        DataType::F32 => f64::from(f32::MAX),
        DataType::F64 => f64::MAX,
    };
    max * r.scale.abs()
}

/// Encodes a value (in the register's unit) into words: divided by the scale,
/// rounded and saturated for integer types, words in the register's order.
pub fn encode(r: &RegisterConfig, value: f64) -> Vec<u16> {
    let raw = value / r.scale;
    let be: Vec<u8> = match r.data_type {
        DataType::U16 => (raw.round() as u16).to_be_bytes().to_vec(),
        DataType::I16 => (raw.round() as i16).to_be_bytes().to_vec(),
        DataType::U32 => (raw.round() as u32).to_be_bytes().to_vec(),
        DataType::I32 => (raw.round() as i32).to_be_bytes().to_vec(),
        DataType::U64 => (raw.round() as u64).to_be_bytes().to_vec(),
        DataType::I64 => (raw.round() as i64).to_be_bytes().to_vec(),
        DataType::F32 => (raw as f32).to_be_bytes().to_vec(),
        DataType::F64 => raw.to_be_bytes().to_vec(),
    };
    let mut words: Vec<u16> = be
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    if r.word_order == WordOrder::LowFirst {
        words.reverse();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acquire::profile::builtin;

    fn reg(data_type: DataType, word_order: WordOrder, scale: f64) -> RegisterConfig {
        RegisterConfig {
            name: "x".into(),
            address: 0,
            table: RegisterTable::Holding,
            data_type,
            word_order,
            scale,
            unit: "".into(),
            kind: Kind::Gauge,
            min: None,
            max: None,
        }
    }

    #[test]
    fn encoding_follows_type_order_and_scale() {
        let r = reg(DataType::U32, WordOrder::LowFirst, 0.01);
        assert_eq!(encode(&r, 12_345.678), vec![0xD688, 0x0012]); // 1234568
        let r = reg(DataType::U32, WordOrder::HighFirst, 0.01);
        assert_eq!(encode(&r, 12_345.678), vec![0x0012, 0xD688]);
        let r = reg(DataType::I16, WordOrder::HighFirst, 10.0);
        assert_eq!(encode(&r, -1_234.0), vec![(-123i16) as u16]);
        let r = reg(DataType::F32, WordOrder::HighFirst, 1.0);
        let bits = 230.5f32.to_bits();
        assert_eq!(encode(&r, 230.5), vec![(bits >> 16) as u16, bits as u16]);
        let r = reg(DataType::U16, WordOrder::HighFirst, 1.0);
        assert_eq!(encode(&r, 1e9), vec![u16::MAX], "saturates");
        assert_eq!(encode(&r, -5.0), vec![0], "saturates");
        let r = reg(DataType::I64, WordOrder::LowFirst, 1.0);
        assert_eq!(encode(&r, -2.0), vec![0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]);
    }

    #[test]
    fn reads_fill_gaps_and_reject_bad_ranges() {
        let m = SimMeter::new(Arc::new(builtin("sdm630").expect("sdm630")), 1);
        let at = Duration::from_secs(60);
        // 0x10..0x36 spans power_l3 (0x10), a gap, and power (0x34).
        let w = m
            .read_at(RegisterTable::Input, 0x10, 0x26, at)
            .expect("read");
        assert_eq!(w.len(), 0x26);
        assert!(w[2..0x24].iter().all(|&x| x == 0), "gap reads as zero");
        assert_ne!(&w[0..2], &[0, 0]);
        assert_ne!(&w[0x24..0x26], &[0, 0]);
        // energy_total at 0x156..0x157 is the highest register.
        assert!(m.read_at(RegisterTable::Input, 0x157, 1, at).is_ok());
        assert!(m.read_at(RegisterTable::Input, 0x157, 125, at).is_ok());
        for (table, start, count) in [
            (RegisterTable::Input, 0x158, 1),
            (RegisterTable::Input, 0, 0),
            (RegisterTable::Input, 0, 126),
            (RegisterTable::Holding, 0, 2),
        ] {
            assert_eq!(
                m.read_at(table, start, count, at),
                Err(exception::ILLEGAL_DATA_ADDRESS),
                "{table:?} {start} {count}"
            );
        }
    }

    #[test]
    fn single_and_three_phase_profiles_map_to_the_model() {
        let m = SimMeter::new(Arc::new(builtin("sdm630").expect("sdm630")), 5);
        let at = Duration::from_secs(1_000);
        let v = |n: &str| m.value_at(n, at).expect(n);
        let sum = v("power_l1") + v("power_l2") + v("power_l3");
        assert!((v("power") - sum).abs() < 1e-9);
        assert!((v("energy_total") - v("energy_import") - v("energy_export")).abs() < 1e-9);
        assert_ne!(v("voltage_l1"), v("voltage_l2"));
        let m = SimMeter::new(Arc::new(builtin("sdm120").expect("sdm120")), 5);
        let v = |n: &str| m.value_at(n, at).expect(n);
        let p = v("voltage") * v("current") * v("power_factor");
        assert!((p - v("power")).abs() < 1e-6 * v("power"));
    }

    #[test]
    fn user_ranges_and_units_are_respected() {
        let mk = |name: &str, kind, unit: &str, dt, min, max| RegisterConfig {
            name: name.into(),
            address: 0,
            table: RegisterTable::Holding,
            data_type: dt,
            word_order: WordOrder::HighFirst,
            scale: 1.0,
            unit: unit.into(),
            kind,
            min,
            max,
        };
        let profile = Profile {
            name: "us".into(),
            manufacturer: "x".into(),
            model: "y".into(),
            registers: vec![
                mk(
                    "voltage",
                    Kind::Voltage,
                    "V",
                    DataType::F32,
                    Some(100.0),
                    Some(130.0),
                ),
                mk("power", Kind::Power, "kW", DataType::F32, None, None),
                mk(
                    "temp",
                    Kind::Gauge,
                    "C",
                    DataType::F32,
                    Some(-20.0),
                    Some(60.0),
                ),
                mk(
                    "energy",
                    Kind::EnergyTotal,
                    "Wh",
                    DataType::U16,
                    Some(0.0),
                    None,
                ),
                mk(
                    "pf",
                    Kind::PowerFactor,
                    "%",
                    DataType::F32,
                    Some(0.0),
                    Some(100.0),
                ),
            ],
        };
        let m = SimMeter::new(Arc::new(profile), 9);
        let mut last_energy = 0.0;
        for s in 0..500 {
            let at = Duration::from_secs(s * 97);
            let v = |n: &str| m.value_at(n, at).expect(n);
            assert!((100.0..=130.0).contains(&v("voltage")));
            assert!(v("power") > 0.0 && v("power") < 5.0, "kW");
            assert!((-20.0..=60.0).contains(&v("temp")));
            assert!((80.0..=100.0).contains(&v("pf")), "percent");
            let e = v("energy");
            assert!(e <= 65_535.0 && e >= last_energy, "{e} after {last_energy}");
            last_energy = e;
        }
    }
}
