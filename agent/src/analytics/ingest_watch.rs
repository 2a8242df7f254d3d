//! The analytics' watermarks as push ingest sees them (ingest sits below analytics
//! and names it only through [`crate::ingest::IntervalWatermarks`]).

use std::collections::HashMap;

use super::AnalyticsShared;
use crate::ingest::IntervalWatermarks;
use crate::model::Reading;

impl IntervalWatermarks for AnalyticsShared {
    fn watermarks_of(&self, readings: &[Reading]) -> HashMap<String, (String, i64)> {
        AnalyticsShared::watermarks_of(self, readings)
    }

    fn count_too_late(
        &self,
        before: HashMap<String, (String, i64)>,
        readings: &[&Reading],
    ) -> usize {
        AnalyticsShared::count_too_late(self, before, readings.iter().copied())
    }
}
