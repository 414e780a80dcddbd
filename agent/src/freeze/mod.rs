//! Freeze state (docs/freeze.md): status tokens signed by the seller, the per-license
//! lifecycle (active, grace, frozen, released), its tamper-evident state file, the
//! actions run on transitions, and the service that ties them to the license verdicts.

pub mod actions;
pub mod lifecycle;
pub mod state_file;
pub mod token;
