//! The store as push ingest sees it: ingest sits below the store and names it only
//! through the traits of [`crate::ingest::sink`], implemented here.

use crate::ingest::sink::{BatchWriter, StoreFailure, StoredPoints, Submitted};
use crate::model::{Payload, Value};

use super::{Store, StoreWriter};

impl StoredPoints for Store {
    fn check_writable(&self) -> Result<(), StoreFailure> {
        Store::check_writable(self).map_err(StoreFailure::from)
    }

    fn values_at(&self, meter: &str, ts_ms: i64) -> Result<Vec<Value>, StoreFailure> {
        // The index answers most pushes (new points) without reading a block.
        if !self.has_reading(meter, ts_ms)? {
            return Ok(Vec::new());
        }
        // `readings` answers the current values: a correction's, not the one it replaced.
        Ok(self
            .readings(meter, ts_ms, ts_ms.saturating_add(1))?
            .into_iter()
            .filter_map(|rec| match rec.payload {
                Payload::Reading(r) => Some(r.values),
                _ => None,
            })
            .flatten()
            .collect())
    }

    fn store_id(&self) -> usize {
        self as *const Store as usize
    }
}

impl BatchWriter for StoreWriter {
    fn submit_batch(&self, payloads: Vec<Payload>) -> Submitted<'_> {
        Box::pin(async move {
            StoreWriter::submit_batch(self, payloads)
                .await
                .map_err(StoreFailure::from)
        })
    }
}
