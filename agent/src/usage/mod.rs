//! Usage metering: the seller's software reports what the buyer used; the agent keeps it
//! in a durable ledger, turns it into the marketplace's hourly records and delivers them
//! (koogallery.md §1.1). Nothing acknowledged is lost; nothing is billed twice.
//!
//! - `decimal`: fixed-point amounts (no float drift), parse/format with clear errors.
//! - `hours`: pure hourly aggregation, closing rules, carries, `metering_sn`.
//! - `state`: the ledger's in-memory model and its entries.
//! - `ledger`: the crash-safe append-only store with group commit.
//! - `sign`: the API's signature recipe (with its open question).
//! - `secret`: the interconnection key file.
//! - `upload`: HTTPS delivery, answer classification, 413 splitting, parking.
//! - `relay`: relay mode: records to the seller's server, signed with the device key.
//! - `service`: meters, the upload thread, status.
//! - `config`: the `[usage]` section.
pub mod config;
pub use kooagent_core::usage::{decimal, hours};
pub mod ledger;
pub mod license_meters;
pub mod relay;
pub use kooagent_edge::secret;
pub mod service;
pub mod sign;
pub mod state;
pub mod upload;

pub use config::UsageConfig;
pub use service::UsageService;
