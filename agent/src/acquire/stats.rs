//! Per-meter polling statistics, shared between the bus task and the status page.
//!
//! Counters are atomics so the bus task never waits for a reader; [`MeterStats::snapshot`]
//! gives a plain, serializable copy.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Health of a meter as its bus task sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterState {
    /// Not polled yet.
    Pending,
    /// The last poll succeeded.
    Ok,
    /// The last poll failed; the meter is retried at its normal interval.
    Failing,
    /// Several polls failed; retries are spaced out beyond the interval.
    BackingOff,
}

impl MeterState {
    fn from_u8(v: u8) -> MeterState {
        match v {
            1 => MeterState::Ok,
            2 => MeterState::Failing,
            3 => MeterState::BackingOff,
            _ => MeterState::Pending,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            MeterState::Pending => 0,
            MeterState::Ok => 1,
            MeterState::Failing => 2,
            MeterState::BackingOff => 3,
        }
    }
}

/// Why a poll failed. Each kind has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No (complete) reply within the bus timeout.
    Timeout,
    /// The device answered with a Modbus exception.
    Exception,
    /// I/O error, bad CRC, mismatching reply, or the port/connection could not be opened.
    Transport,
    /// A reply too short for the registers it should hold.
    Decode,
}

/// Upper bounds, in seconds, of the poll latency histogram's buckets (the `+Inf`
/// bucket is the success count). From a TCP meter on the LAN (ms) to a long RTU
/// block list at 9600 baud (seconds).
pub const LATENCY_BUCKETS_S: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Latency histogram of the successful polls, for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    /// Sum of all observed latencies, seconds.
    pub sum_s: f64,
    pub count: u64,
    /// (upper bound in seconds, polls in this bucket only), the last bound `+Inf`.
    /// Not cumulative: the exposition encoder sums them up.
    pub buckets: Vec<(f64, u64)>,
}

/// Counters of one meter. One instance per meter, `Arc`-shared.
#[derive(Debug)]
pub struct MeterStats {
    meter: String,
    successes: AtomicU64,
    timeouts: AtomicU64,
    exceptions: AtomicU64,
    transport_errors: AtomicU64,
    decode_errors: AtomicU64,
    invalid_values: AtomicU64,
    /// Start of the last poll attempt, Unix ms; 0 = never.
    last_poll_ms: AtomicI64,
    /// Start of the last successful poll, Unix ms; 0 = never.
    last_success_ms: AtomicI64,
    /// Duration of the last successful poll, microseconds.
    last_latency_us: AtomicU64,
    consecutive_failures: AtomicU32,
    state: AtomicU8,
    /// Successful polls per latency bucket (not cumulative); the last slot is `+Inf`.
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    latency_sum_us: AtomicU64,
    /// The last failed poll: when (Unix ms) and why (at most [`MAX_ERROR_TEXT`] bytes).
    last_error: Mutex<Option<(i64, String)>>,
    /// When a failing meter is tried again, Unix ms; 0 = not failing.
    next_retry_ms: AtomicI64,
    /// What the device says it is (SunSpec common model), once discovered.
    identity: std::sync::Mutex<Option<super::sunspec::Identity>>,
}

/// Longest error text kept per meter.
pub const MAX_ERROR_TEXT: usize = 256;

/// A plain copy of a meter's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterStatsSnapshot {
    pub meter: String,
    pub state: MeterState,
    pub successes: u64,
    pub timeouts: u64,
    pub exceptions: u64,
    pub transport_errors: u64,
    pub decode_errors: u64,
    /// Values read but not stored as numbers (NaN, infinite, out of range, not
    /// implemented).
    pub invalid_values: u64,
    pub consecutive_failures: u32,
    /// Start of the last poll attempt, Unix ms.
    pub last_poll_ms: Option<i64>,
    /// Start of the last successful poll, Unix ms.
    pub last_success_ms: Option<i64>,
    /// Duration of the last successful poll (all its requests), ms.
    pub last_latency_ms: Option<f64>,
    /// Why the last failed poll failed (kept after the meter answers again).
    pub last_error: Option<String>,
    /// When the last failed poll started, Unix ms.
    pub last_error_ms: Option<i64>,
    /// When a failing meter is tried next, Unix ms; `None` while it answers.
    pub next_retry_ms: Option<i64>,
}

impl MeterStats {
    pub fn new(meter: impl Into<String>) -> MeterStats {
        MeterStats {
            meter: meter.into(),
            successes: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            exceptions: AtomicU64::new(0),
            transport_errors: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            invalid_values: AtomicU64::new(0),
            last_poll_ms: AtomicI64::new(0),
            last_success_ms: AtomicI64::new(0),
            last_latency_us: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            state: AtomicU8::new(MeterState::Pending.as_u8()),
            latency_buckets: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            last_error: Mutex::new(None),
            next_retry_ms: AtomicI64::new(0),
            identity: std::sync::Mutex::new(None),
        }
    }

    /// Records what a discovered device says it is.
    pub fn set_identity(&self, identity: super::sunspec::Identity) {
        // Plain data: a poisoned lock still holds a usable value.
        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity);
    }

    /// What the device said it is, once discovered (SunSpec meters).
    pub fn identity(&self) -> Option<super::sunspec::Identity> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn meter(&self) -> &str {
        &self.meter
    }

    pub fn state(&self) -> MeterState {
        MeterState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub(crate) fn poll_started(&self, ts_ms: i64) {
        self.last_poll_ms.store(ts_ms, Ordering::Relaxed);
    }

    pub(crate) fn record_success(&self, ts_ms: i64, latency: Duration, invalid_values: usize) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.invalid_values
            .fetch_add(invalid_values as u64, Ordering::Relaxed);
        self.last_success_ms.store(ts_ms, Ordering::Relaxed);
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.last_latency_us.store(latency_us, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS_S
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.next_retry_ms.store(0, Ordering::Relaxed);
        self.state.store(MeterState::Ok.as_u8(), Ordering::Relaxed);
    }

    /// Why the poll that started at `ts_ms` failed, and when the meter is tried again
    /// (Unix ms). The text is cut to [`MAX_ERROR_TEXT`] bytes.
    pub(crate) fn record_error(&self, ts_ms: i64, error: &str, retry_at_ms: i64) {
        let mut text = error.to_string();
        crate::config::units::cut(&mut text, MAX_ERROR_TEXT);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some((ts_ms, text));
        self.next_retry_ms.store(retry_at_ms, Ordering::Relaxed);
    }

    /// Counts a failed poll; returns the number of consecutive failures.
    pub(crate) fn record_failure(&self, kind: FailureKind) -> u32 {
        let counter = match kind {
            FailureKind::Timeout => &self.timeouts,
            FailureKind::Exception => &self.exceptions,
            FailureKind::Transport => &self.transport_errors,
            FailureKind::Decode => &self.decode_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn set_state(&self, state: MeterState) {
        self.state.store(state.as_u8(), Ordering::Relaxed);
    }

    /// The latency histogram of the successful polls so far. The buckets are read one
    /// by one while polls go on, so `count` is the sum of the buckets read, never a
    /// different figure.
    pub fn latency_histogram(&self) -> LatencyHistogram {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_S.len() + 1);
        for (i, n) in self.latency_buckets.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            count += n;
            let le = LATENCY_BUCKETS_S.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((le, n));
        }
        LatencyHistogram {
            sum_s: self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count,
            buckets,
        }
    }

    pub fn snapshot(&self) -> MeterStatsSnapshot {
        let opt = |v: i64| (v != 0).then_some(v);
        let last_success_ms = opt(self.last_success_ms.load(Ordering::Relaxed));
        let last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        MeterStatsSnapshot {
            meter: self.meter.clone(),
            state: self.state(),
            successes: self.successes.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            exceptions: self.exceptions.load(Ordering::Relaxed),
            transport_errors: self.transport_errors.load(Ordering::Relaxed),
            decode_errors: self.decode_errors.load(Ordering::Relaxed),
            invalid_values: self.invalid_values.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            last_poll_ms: opt(self.last_poll_ms.load(Ordering::Relaxed)),
            last_success_ms,
            last_latency_ms: last_success_ms
                .map(|_| self.last_latency_us.load(Ordering::Relaxed) as f64 / 1000.0),
            last_error_ms: last_error.as_ref().map(|(ts, _)| *ts),
            last_error: last_error.map(|(_, text)| text),
            next_retry_ms: opt(self.next_retry_ms.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_state_show_in_the_snapshot() {
        let s = MeterStats::new("main");
        let snap = s.snapshot();
        assert_eq!(snap.state, MeterState::Pending);
        assert_eq!(snap.last_poll_ms, None);
        assert_eq!(snap.last_latency_ms, None);
        s.poll_started(1000);
        assert_eq!(s.record_failure(FailureKind::Timeout), 1);
        assert_eq!(s.record_failure(FailureKind::Exception), 2);
        assert_eq!(s.record_failure(FailureKind::Transport), 3);
        assert_eq!(s.record_failure(FailureKind::Decode), 4);
        s.set_state(MeterState::BackingOff);
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.timeouts,
                snap.exceptions,
                snap.transport_errors,
                snap.decode_errors
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(snap.consecutive_failures, 4);
        assert_eq!(snap.state, MeterState::BackingOff);
        assert_eq!((snap.last_error, snap.next_retry_ms), (None, None));
        s.record_error(1000, &"x".repeat(10_000), 9000);
        let snap = s.snapshot();
        assert_eq!(snap.last_error_ms, Some(1000));
        assert_eq!(snap.next_retry_ms, Some(9000));
        let text = snap.last_error.expect("the error kept");
        assert!(text.len() <= MAX_ERROR_TEXT + '…'.len_utf8(), "bounded");
        s.record_success(2000, Duration::from_micros(12_500), 1);
        let snap = s.snapshot();
        assert_eq!(snap.state, MeterState::Ok);
        assert_eq!(snap.consecutive_failures, 0);
        assert_eq!(snap.next_retry_ms, None, "answers: no retry due");
        assert_eq!(
            snap.last_error_ms,
            Some(1000),
            "the last error stays, dated"
        );
        assert_eq!(snap.successes, 1);
        assert_eq!(snap.invalid_values, 1);
        assert_eq!(snap.last_success_ms, Some(2000));
        assert_eq!(snap.last_latency_ms, Some(12.5));
        s.record_success(3000, Duration::from_secs(7), 0);
        let h = s.latency_histogram();
        assert_eq!(h.count, 2);
        assert!((h.sum_s - 7.0125).abs() < 1e-9, "{}", h.sum_s);
        // 12.5 ms falls in the 25 ms bucket, 7 s in +Inf.
        let at = |le: f64| h.buckets.iter().find(|b| b.0 == le).map(|b| b.1);
        assert_eq!(at(0.01), Some(0));
        assert_eq!(at(0.025), Some(1));
        assert_eq!(at(5.0), Some(0));
        assert_eq!(at(f64::INFINITY), Some(1));
        assert_eq!(h.buckets.iter().map(|b| b.1).sum::<u64>(), h.count);
        let json = serde_json::to_value(&snap).expect("serializes");
        assert_eq!(json["state"], "ok");
        assert_eq!(json["meter"], "main");
    }
}
