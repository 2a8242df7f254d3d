//! Acquisition: meter profiles, register decoding, block planning and one polling
//! task per bus.

pub mod profile;
