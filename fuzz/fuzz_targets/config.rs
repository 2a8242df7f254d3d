//! The config loader on arbitrary text: parsing and validation never panic, and
//! every error names a field.
#![no_main]

use edge_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            if let Err(errors) = config.validate() {
                assert!(!errors.0.is_empty());
                assert!(errors
                    .0
                    .iter()
                    .all(|e| !e.field.is_empty() && !e.reason.is_empty()));
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            assert!(errors.0.iter().all(|e| !e.reason.is_empty()));
        }
    }
});
