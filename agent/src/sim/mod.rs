//! Simulated Modbus meters for the demo and the end-to-end tests.
//!
//! A [`SimBus`] holds [`SimMeter`]s by unit id and is served over Modbus TCP
//! ([`serve_tcp`]), over any byte stream as Modbus RTU ([`serve_rtu`]), or over a
//! pseudo-terminal that the agent opens like a serial port ([`rtu_pty`]).
//!
//! The framing is written here rather than taken from tokio-modbus's server so that
//! faults can be injected at the byte level ([`SimFaults`]): late replies,
//! exceptions, garbage bytes, a wrong unit id, silence, and (TCP) replies held back
//! and handed to the next connection.
//!
//! Protocol behaviour, as on Eastron meters:
//! - 0x03 (holding) and 0x04 (input registers) are served; any other function gets
//!   exception 0x01. A read may span unmapped words inside the map (they read 0);
//!   a count of 0 or above 125, or a start beyond the highest mapped register, gets
//!   exception 0x02.
//! - RTU: a frame with a bad CRC, of unknown shape, or for a unit id not on the bus
//!   gets no reply, and the receive buffer is discarded. Bytes that arrive while a
//!   late reply is pending are discarded too, as a busy half-duplex device would.
//! - TCP: a request for a unit id not on the bus gets exception 0x0B (gateway target
//!   device failed to respond), as a TCP-to-RTU gateway answers; a malformed MBAP
//!   header (protocol id not 0, bad length) closes the connection.

pub mod command;
mod meter;
mod model;
pub mod p1;
mod rtu;
pub mod sunspec;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use meter::{
    encode, exception, ReplyKind, Served, SimFaults, SimMeter, SimStats, SERVED_CAPACITY,
};
pub use p1::{p1_pty, serve_p1, P1Sim};
pub use rtu::{rtu_pty, serve_rtu};
pub use tcp::serve_tcp;

/// The meters reachable on one simulated bus (serial line or TCP endpoint).
#[derive(Debug, Default, Clone)]
pub struct SimBus {
    meters: BTreeMap<u8, Arc<SimMeter>>,
    /// RTU: baud rate whose wire time (10 bits a character) each exchange takes
    /// before the reply is written; `None`: at once (a pty has no baud rate).
    line_rate: Option<u32>,
}

impl SimBus {
    pub fn new() -> SimBus {
        SimBus::default()
    }

    /// Adds a meter (a `SimMeter` or an `Arc<SimMeter>` the caller keeps) at
    /// `unit_id`, replacing any meter already there.
    pub fn with_meter(mut self, unit_id: u8, meter: impl Into<Arc<SimMeter>>) -> SimBus {
        self.insert(unit_id, meter);
        self
    }

    /// Adds a meter at `unit_id`, replacing any meter already there.
    pub fn insert(&mut self, unit_id: u8, meter: impl Into<Arc<SimMeter>>) {
        self.meters.insert(unit_id, meter.into());
    }

    /// Paces RTU exchanges as a line at `baud` (8N1) would: a reply is written once
    /// the request and the reply would have crossed the wire.
    pub fn with_line_rate(mut self, baud: u32) -> SimBus {
        self.line_rate = (baud > 0).then_some(baud);
        self
    }

    /// Wire time of `chars` characters at the bus's line rate, if it has one.
    pub fn wire_time(&self, chars: usize) -> Option<std::time::Duration> {
        let baud = self.line_rate?;
        Some(std::time::Duration::from_secs_f64(
            chars as f64 * 10.0 / f64::from(baud),
        ))
    }

    pub fn meter(&self, unit_id: u8) -> Option<&Arc<SimMeter>> {
        self.meters.get(&unit_id)
    }

    /// Unit ids and meters, by unit id.
    pub fn meters(&self) -> impl Iterator<Item = (u8, &Arc<SimMeter>)> {
        self.meters.iter().map(|(u, m)| (*u, m))
    }
}
