//! KooAgent's seller side: the tools a seller runs (`kooagent-seller keygen|issue|inspect|
//! token|call`) and the seller license server (`kooagent-seller serve`, its SQLite or
//! PostgreSQL storage, the authorization-code and usage relays).
//!
//! Imports point down only: this crate uses `kooagent-core` (the shared rules) and
//! `kooagent-edge` (the shared I/O), never the device agent (docs/architecture.md).
pub mod cli;
pub mod files;
pub mod issue;
pub mod server;
