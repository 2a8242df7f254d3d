//! The push ingest's JSON parser on arbitrary bodies: never a panic; a rejection
//! names at least one problem; an accepted batch holds points.
#![no_main]

use edge_agent::ingest::wire::check_json;
use edge_agent::ingest::IngestLimits;
use libfuzzer_sys::fuzz_target;

/// 2026-01-01T00:00:00Z, fixed so a failure reproduces.
const NOW_MS: i64 = 1_767_225_600_000;

fuzz_target!(|data: &[u8]| {
    let limits = IngestLimits::default();
    for topic in [None, Some("m1")] {
        match check_json(data, topic, NOW_MS, &limits) {
            Ok(checked) => assert!(checked.points() > 0 || checked.series.is_empty()),
            Err(rejection) => assert!(!rejection.problems.is_empty()),
        }
    }
});
