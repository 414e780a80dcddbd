//! The seller's issuing toolkit in one place: key files (generate, PKCS#8 PEM, trust
//! lines: `kooagent_edge::keyfile`, which the agent shares for its device key) and the
//! license builder (`kooagent_core::license::issue`, pure, which the bench shares).
//! `kooagent-seller keygen|issue|inspect|token` and the server's activities use this.

pub use kooagent_core::license::issue::*;
pub use kooagent_edge::keyfile::*;
