//! What ingest needs of the stages it feeds, as traits: ingest sits beside acquire,
//! below the store, so it names none of them. The store implements [`StoredPoints`]
//! and [`BatchWriter`] (`store::ingest_sink`), the analytics stage
//! [`IntervalWatermarks`]; the pipeline hands them in.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::model::{Payload, Reading, Record, Value};

/// A failure of the store, as ingest passes it on (its message is the store's).
pub type StoreFailure = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a [`BatchWriter::submit_batch`] returns.
pub type Submitted<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Record>, StoreFailure>> + Send + 'a>>;

/// The stored points a push is checked against.
pub trait StoredPoints: Send + Sync {
    /// Fails at once when the store cannot take a write now (disk short of its
    /// reserve, or the store has failed).
    fn check_writable(&self) -> Result<(), StoreFailure>;

    /// The current values stored for `meter` at exactly `ts_ms` (a correction's, not
    /// the value it replaced); empty when none is.
    fn values_at(&self, meter: &str, ts_ms: i64) -> Result<Vec<Value>, StoreFailure>;

    /// Tells stores apart: points being written are kept per store.
    fn store_id(&self) -> usize;
}

/// Where accepted readings are written.
pub trait BatchWriter: Send + Sync {
    /// Writes `payloads` as one all-or-nothing commit; answers with the records once
    /// they are durable.
    fn submit_batch(&self, payloads: Vec<Payload>) -> Submitted<'_>;
}

/// The analytics stage's watermarks: which stored points came too late for the
/// 15-minute intervals.
pub trait IntervalWatermarks: Send + Sync {
    /// The quantity and watermark of each meter of `readings`, taken before they
    /// are stored.
    fn watermarks_of(&self, readings: &[Reading]) -> HashMap<String, (String, i64)>;

    /// Counts the stored `readings` (in time order) too late for intervals behind
    /// the watermarks `before` the push, and raises the watermarks by the others.
    fn count_too_late(
        &self,
        before: HashMap<String, (String, i64)>,
        readings: &[&Reading],
    ) -> usize;
}

impl<T: StoredPoints + ?Sized> StoredPoints for Arc<T> {
    fn check_writable(&self) -> Result<(), StoreFailure> {
        (**self).check_writable()
    }

    fn values_at(&self, meter: &str, ts_ms: i64) -> Result<Vec<Value>, StoreFailure> {
        (**self).values_at(meter, ts_ms)
    }

    fn store_id(&self) -> usize {
        (**self).store_id()
    }
}

impl<T: BatchWriter + ?Sized> BatchWriter for Arc<T> {
    fn submit_batch(&self, payloads: Vec<Payload>) -> Submitted<'_> {
        (**self).submit_batch(payloads)
    }
}

/// The writer was let go: the agent is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct WriterClosed;
