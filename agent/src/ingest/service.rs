//! What the HTTP and MQTT front ends share: the store handles, the limits, and the
//! counters `/metrics` shows. [`Ingestor::close`] lets go of the store writer at
//! shutdown, so the writer can commit what is pending and end.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::sink::{BatchWriter, IntervalWatermarks, StoredPoints, WriterClosed};
use super::wire::{Checked, Rejection};
use super::{
    store_readings_with, Correct, IngestError, IngestLimits, IngestOutcome, Problem, ProblemList,
};
use crate::model::{Reading, Record};

/// How a push arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Mqtt,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Http, Transport::Mqtt];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Mqtt => "mqtt",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a push was rejected (nothing of it stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The body is not JSON / CSV at all (or not UTF-8).
    Syntax,
    /// Readable, but with bad fields or points (every one named in the answer).
    Invalid,
    /// HTTP only: a `Content-Type` other than JSON or CSV.
    ContentType,
    /// The store could not make the batch durable, or the agent is shutting down.
    Store,
    /// A point's meter, quantity and timestamp hold a different value, and the push
    /// does not correct it.
    Conflict,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::Syntax,
        RejectReason::Invalid,
        RejectReason::ContentType,
        RejectReason::Store,
        RejectReason::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Syntax => "syntax",
            RejectReason::Invalid => "invalid",
            RejectReason::ContentType => "content_type",
            RejectReason::Store => "store",
            RejectReason::Conflict => "conflict",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const TRANSPORTS: usize = Transport::ALL.len();
const REASONS: usize = RejectReason::ALL.len();

/// Counters of pushed batches, per transport. Dry runs store nothing and count
/// nothing.
#[derive(Debug, Default)]
pub struct IngestCounters {
    batches: [AtomicU64; TRANSPORTS],
    points: [AtomicU64; TRANSPORTS],
    skipped: [AtomicU64; TRANSPORTS],
    corrected: [AtomicU64; TRANSPORTS],
    too_late: [AtomicU64; TRANSPORTS],
    rejected: [[AtomicU64; REASONS]; TRANSPORTS],
}

/// A copy of the counters of one transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransportCounts {
    /// Batches accepted (durable, or every point already stored).
    pub batches: u64,
    /// Points written.
    pub points: u64,
    /// Points of accepted batches that were already stored.
    pub skipped: u64,
    /// Points written that replaced a different stored value (in `points` too).
    pub corrected: u64,
    /// Points stored too late for the 15-minute intervals.
    pub too_late_for_intervals: u64,
    /// Rejected batches by [`RejectReason`], in `RejectReason::ALL` order.
    pub rejected: [u64; REASONS],
}

impl TransportCounts {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }
}

impl IngestCounters {
    pub fn accepted(&self, transport: Transport, outcome: &IngestOutcome) {
        let t = transport.index();
        self.batches[t].fetch_add(1, Ordering::Relaxed);
        self.points[t].fetch_add(outcome.stored as u64, Ordering::Relaxed);
        self.skipped[t].fetch_add(outcome.skipped as u64, Ordering::Relaxed);
        self.corrected[t].fetch_add(outcome.corrected as u64, Ordering::Relaxed);
        self.too_late[t].fetch_add(outcome.too_late_for_intervals as u64, Ordering::Relaxed);
    }

    pub fn rejected(&self, transport: Transport, reason: RejectReason) {
        self.rejected[transport.index()][reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, transport: Transport) -> TransportCounts {
        let t = transport.index();
        let mut rejected = [0; REASONS];
        for (slot, counter) in rejected.iter_mut().zip(&self.rejected[t]) {
            *slot = counter.load(Ordering::Relaxed);
        }
        TransportCounts {
            batches: self.batches[t].load(Ordering::Relaxed),
            points: self.points[t].load(Ordering::Relaxed),
            skipped: self.skipped[t].load(Ordering::Relaxed),
            corrected: self.corrected[t].load(Ordering::Relaxed),
            too_late_for_intervals: self.too_late[t].load(Ordering::Relaxed),
            rejected,
        }
    }
}

/// The push-ingest service of a running agent.
pub struct Ingestor {
    store: Arc<dyn StoredPoints>,
    /// `None` once closed (shutdown): pushes then fail with [`WriterClosed`].
    writer: Mutex<Option<Arc<dyn BatchWriter>>>,
    pub limits: IngestLimits,
    pub counters: Arc<IngestCounters>,
    /// Meters the agent polls that do not accept pushes (`accept_push = false`):
    /// a push for one is refused, so a LAN client cannot forge a polled meter's
    /// readings (or raise its alarms).
    polled: HashSet<String>,
    /// The analytics stage's watermarks, to count points too late for intervals.
    intervals: std::sync::OnceLock<Arc<dyn IntervalWatermarks>>,
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor")
            .field("limits", &self.limits)
            .field("counters", &self.counters)
            .field("polled", &self.polled)
            .finish_non_exhaustive()
    }
}

impl Ingestor {
    pub fn new(
        store: Arc<impl StoredPoints + 'static>,
        writer: impl BatchWriter + 'static,
        limits: IngestLimits,
    ) -> Arc<Ingestor> {
        Ingestor::with_polled(store, writer, limits, HashSet::new())
    }

    /// An ingest service that refuses pushes for the meters in `polled`.
    pub fn with_polled(
        store: Arc<impl StoredPoints + 'static>,
        writer: impl BatchWriter + 'static,
        limits: IngestLimits,
        polled: HashSet<String>,
    ) -> Arc<Ingestor> {
        Arc::new(Ingestor {
            store,
            writer: Mutex::new(Some(Arc::new(writer))),
            limits,
            counters: Arc::new(IngestCounters::default()),
            polled,
            intervals: std::sync::OnceLock::new(),
        })
    }

    /// Refuses a checked batch with a series for a polled meter that does not
    /// accept pushes, naming each such series' meter field.
    pub fn check_meters(&self, checked: &Checked) -> Result<(), Rejection> {
        let mut problems = ProblemList::default();
        for (s, series) in checked.series.iter().enumerate() {
            if self.polled.contains(&series.meter) {
                let field = checked
                    .meter_fields
                    .get(s)
                    .cloned()
                    .unwrap_or_else(|| format!("series[{s}].meter"));
                problems.push(Problem {
                    series: Some(s),
                    ..Problem::at(
                        field,
                        format!(
                            "`{}` is a polled meter: its readings come from the meter itself and pushes for it are refused (set accept_push = true on the meter to allow both)",
                            series.meter
                        ),
                    )
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Rejection::invalid(problems))
        }
    }

    /// Stores validated readings (see [`super::store_readings`]) and counts the outcome;
    /// returns once they are durable.
    pub async fn store(
        &self,
        transport: Transport,
        readings: Vec<Reading>,
    ) -> Result<(IngestOutcome, Vec<Record>), IngestError> {
        self.store_with(transport, readings, &Correct::None).await
    }

    /// [`Ingestor::store`] allowing the corrections `correct` names (see
    /// [`store_readings_with`]).
    pub async fn store_with(
        &self,
        transport: Transport,
        readings: Vec<Reading>,
        correct: &Correct,
    ) -> Result<(IngestOutcome, Vec<Record>), IngestError> {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let before = self.intervals.get().map(|a| a.watermarks_of(&readings));
        let mut result = match writer {
            Some(writer) => store_readings_with(&*writer, &*self.store, readings, correct).await,
            None => Err(IngestError::Store(Box::new(WriterClosed))),
        };
        if let (Ok((outcome, records)), Some(shared), Some(before)) =
            (&mut result, self.intervals.get(), before)
        {
            let stored: Vec<&Reading> = records
                .iter()
                .filter_map(|r| r.payload.as_reading())
                .collect();
            outcome.too_late_for_intervals = shared.count_too_late(before, &stored);
        }
        match &result {
            Ok((outcome, _)) => self.counters.accepted(transport, outcome),
            Err(IngestError::Conflict(_)) => {
                self.counters.rejected(transport, RejectReason::Conflict)
            }
            Err(_) => self.counters.rejected(transport, RejectReason::Store),
        }
        result
    }

    /// Lets pushes count their points too late for the analytics' intervals.
    pub fn set_intervals(&self, shared: Arc<dyn IntervalWatermarks>) {
        let _ = self.intervals.set(shared);
    }

    /// Counts a batch rejected before it reached the store.
    pub fn reject(&self, transport: Transport, reason: RejectReason) {
        self.counters.rejected(transport, reason);
    }

    /// Lets go of the store writer: later pushes fail, pushes under way finish.
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
