//! KooAgent library: everything the `kooagent` binary does, as testable modules.
//!
//! Layers (imports point down): `cli` → `daemon`/`socket`/`client` → `ops` →
//! `agent` + services → core logic (`device_code`, `clock`, `config`) → `store`. The wire
//! format and the operation catalogue come from `kooagent-client`.
pub mod agent;
/// The I/O both the agent and the seller crate do (HTTPS, marketplace clients, key and
/// secret files, logging) lives in `kooagent-edge`, re-exported at the agent's old paths.
pub use kooagent_edge::{backoff, https, logging, prom};
pub mod authcode;
pub mod cli;
pub mod client;
pub use kooagent_core::clock;
pub mod config;
pub mod daemon;
pub mod device_code;
pub mod device_service;
pub mod dir_watch;
pub mod drop_dir;
pub mod freeze;
pub mod image_prep;
pub mod license;
pub mod metrics;
pub mod notify;
pub mod ops;
/// The wire format lives in the client crate (shared with the seller's software).
pub use kooagent_client::protocol;
pub mod services;
pub mod socket;
pub mod socket_buffers;
pub mod socket_limits;
pub mod source_health;
pub mod state_lock;
pub mod store;
pub mod sys;
pub mod tpm;
pub mod usage;
