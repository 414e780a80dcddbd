//! Authorization-code (授权码) products, License guide 2.0 (koogallery.md Part B): the
//! buyer's code is activated, queried on the first use each day, and the day's active
//! clients are reported, all through KooGallery's open APIs signed with APIG AK/SK.
//!
//! - `apig_sign`: the `SDK-HMAC-SHA256` signer and the server-side verifier (§1.3).
//! - `api`: request/answer types, validation and pure parsing, typed errors (B1, B2, B4, B5).
//! - `client`: the blocking HTTPS client with host fallback.
//! - `relay_auth`: device-key signing and verification of the relay protocol (agent ↔ seller server).
pub use kooagent_core::authcode::{api, apig_sign};
pub use kooagent_edge::marketplace as client;
pub mod config;
pub mod logic;
pub mod relay_auth;
pub mod service;
pub mod transport;
