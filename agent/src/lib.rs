//! edge-agent: reads energy meters over Modbus, stores every reading durably, and
//! publishes live state on an MQTT broker embedded in the process.
//!
//! Pipeline: `acquire` (one task per bus) → `store` (sled, CRC, gap-free seq, group
//! commit) → `broker` (embedded rumqttd: retained state, status). `lib.rs` wires them.

pub mod acquire;
pub mod config;
pub mod model;
pub mod store;
