//! Offline signed licenses (docs/license-format.md): the format, the seller's tools, trusted
//! keys, the trusted-time guard against clock rollback, the installed-license store, and
//! the service that keeps a verdict per license ready for `license.check`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use kooagent_core::license::{format, fuzz, keys};
pub mod service;
pub mod store;
mod timer;
pub mod trusted_time;
pub use kooagent_core::license::verdict;

pub use fuzz::fuzz_parse;
pub use service::LicenseService;

/// `[license]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LicenseConfig {
    /// Seller public keys, `"<kid>:<base64>"` (what `kooagent seller keygen` prints).
    pub trusted_keys: Vec<String>,
    /// A file of such lines (`#` comments allowed); empty: none.
    pub trusted_keys_file: PathBuf,
    /// Key ids no longer trusted, even when listed above.
    pub revoked_key_ids: Vec<String>,
    /// Products licenses may be installed for; empty: any.
    pub products: Vec<String>,
    /// How far the clock may be behind the trusted time before licenses report
    /// `clock_rollback`.
    pub rollback_tolerance_secs: u64,
}

impl Default for LicenseConfig {
    fn default() -> Self {
        LicenseConfig {
            trusted_keys: vec![],
            trusted_keys_file: PathBuf::new(),
            revoked_key_ids: vec![],
            products: vec![],
            rollback_tolerance_secs: 86_400,
        }
    }
}

impl LicenseConfig {
    pub fn keys_file(&self) -> Option<&std::path::Path> {
        (!self.trusted_keys_file.as_os_str().is_empty()).then_some(self.trusted_keys_file.as_path())
    }

    /// Builds the trusted key set (reads `trusted_keys_file`).
    pub fn trusted_keys(&self) -> Result<keys::TrustedKeys, keys::KeyConfigError> {
        let file = self.keys_file().map(|p| (p, std::fs::read_to_string(p)));
        keys::TrustedKeys::new(&self.trusted_keys, file, &self.revoked_key_ids)
    }

    /// Checks every value: `Err((key, message))`. A keys file this process may not read
    /// passes (CLI users load the config only to find the socket); the agent itself
    /// refuses to start without its keys, see [`LicenseConfig::trusted_keys`].
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(f) = self.keys_file() {
            if !f.is_absolute() {
                return Err((
                    "license.trusted_keys_file".into(),
                    "must be an absolute path".into(),
                ));
            }
        }
        match self.trusted_keys() {
            Err(e) if !e.unreadable => return Err((e.key, e.message)),
            _ => {}
        }
        for (i, p) in self.products.iter().enumerate() {
            if p.is_empty() || p.len() > 128 || !p.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    format!("license.products[{i}]"),
                    format!("{p:?} must be 1..128 printable ASCII characters without spaces"),
                ));
            }
        }
        if self.rollback_tolerance_secs < 60 || self.rollback_tolerance_secs > 366 * 86_400 {
            return Err((
                "license.rollback_tolerance_secs".into(),
                "must be between 60 (a minute) and 31622400 (a year)".into(),
            ));
        }
        Ok(())
    }

    pub fn tolerance(&self) -> i64 {
        self.rollback_tolerance_secs as i64
    }
}

/// Where installed licenses live.
pub fn licenses_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("licenses")
}

/// Where the trusted-time mark lives.
pub fn time_file(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("time.json")
}
