//! KooAgent's shared I/O edges: what both the device agent (`agent/`) and the seller's
//! tools and server (`seller/`) do with files, the network and randomness, in one place so
//! that neither imports the other (docs/architecture.md, "Crates").
//!
//! - [`https`]: outgoing HTTPS (rustls, web PKI plus an extra CA, bounded in time);
//! - [`marketplace`]: the authorization-code open-API client (APIG-signed, host fallback);
//! - [`upload`]: the usage-data API client and the delivery loop over a [`upload::Sink`]
//!   (the agent's ledger, the seller server's outbox);
//! - [`secret`]: secret files (interconnection key, AK/SK): mode and owner checked;
//! - [`keyfile`]: Ed25519 key files (PKCS#8 PEM, trust lines); [`input`]: a license or
//!   token named on the command line (a file or standard input), bounded in size;
//! - [`backoff`]: retry delays with jitter; [`random`]: the kernel's random source;
//! - [`logging`]: the stderr/journald logger; [`prom`]: the Prometheus text format of
//!   both `/metrics` endpoints.
//!
//! The rules these apply (request building, answer parsing, signing) are in
//! `kooagent-core`; this crate is the thin transport around them.
pub mod backoff;
pub mod https;
pub mod input;
pub mod keyfile;
pub mod logging;
pub mod marketplace;
pub mod prom;
pub mod random;
pub mod secret;
pub mod upload;
