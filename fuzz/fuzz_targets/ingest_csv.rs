//! The push ingest's CSV parser on arbitrary bodies: never a panic; a rejection
//! names at least one problem.
#![no_main]

use edge_agent::ingest::wire::check_csv;
use edge_agent::ingest::IngestLimits;
use libfuzzer_sys::fuzz_target;

/// 2026-01-01T00:00:00Z, fixed so a failure reproduces.
const NOW_MS: i64 = 1_767_225_600_000;

fuzz_target!(|data: &[u8]| {
    match check_csv(data, NOW_MS, &IngestLimits::default()) {
        Ok(checked) => assert!(checked.points() > 0 || checked.series.is_empty()),
        Err(rejection) => assert!(!rejection.problems.is_empty()),
    }
});
