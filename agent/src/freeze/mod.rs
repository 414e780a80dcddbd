//! Freeze state (docs/freeze.md): status tokens signed by the seller, the per-license
//! lifecycle (active, grace, frozen, released), its tamper-evident state file, the
//! actions run on transitions, and the service that ties them to the license verdicts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod actions;
pub mod anchor;
pub use kooagent_core::freeze::lifecycle;
pub mod online;
pub mod service;
pub mod state_file;
pub mod tpm_anchor;
pub use kooagent_core::freeze::token;

pub use service::FreezeService;

/// `[freeze]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreezeConfig {
    /// systemd units stopped when a license freezes (or is released) and started again
    /// when it unfreezes.
    pub units: Vec<String>,
    /// A command (argv) run on every freeze and unfreeze, with `KOOAGENT_LICENSE_ID` and
    /// `KOOAGENT_STATE` in its environment; empty: none.
    pub command: Vec<String>,
    /// The `systemctl` the units are stopped and started with.
    pub systemctl: PathBuf,
    /// How long one action may run before it is killed and reported as failed.
    pub action_timeout_secs: u64,
    /// The seller's status-token endpoint, polled for each license held: an `https://`
    /// URL with `{license_id}` in it; empty: no online source.
    pub token_url: String,
    /// Where a renewed license is fetched from, same form; empty: not fetched.
    pub license_url: String,
    /// Time between polls, with up to `poll_jitter_secs` added at random.
    pub poll_interval_secs: u64,
    pub poll_jitter_secs: u64,
    /// One poll request's time limit.
    pub poll_timeout_secs: u64,
    /// A CA (PEM) trusted for the seller's endpoint besides the web PKI roots.
    pub poll_extra_ca_file: PathBuf,
    /// Whether the freeze high-water mark is anchored in a TPM 2.0 NV counter
    /// (docs/threat-model.md "TPM 2.0 anchor"). Read at start.
    pub tpm: tpm_anchor::Mode,
    /// The TPM: a device, or a Unix socket speaking the raw command stream (a swtpm
    /// sidecar); empty: `/dev/tpmrm0`, else `/dev/tpm0`.
    pub tpm_device: PathBuf,
    /// The NV index of the counter (owner range 0x01800000-0x01BFFFFF).
    pub tpm_nv_index: u32,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig {
            units: vec![],
            command: vec![],
            systemctl: "/usr/bin/systemctl".into(),
            action_timeout_secs: 60,
            token_url: String::new(),
            license_url: String::new(),
            poll_interval_secs: 6 * 3600,
            poll_jitter_secs: 1800,
            poll_timeout_secs: 10,
            poll_extra_ca_file: PathBuf::new(),
            tpm: tpm_anchor::Mode::Auto,
            tpm_device: PathBuf::new(),
            tpm_nv_index: tpm_anchor::DEFAULT_NV_INDEX,
        }
    }
}

impl FreezeConfig {
    /// Checks every value: `Err((key, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (i, u) in self.units.iter().enumerate() {
            let ok = !u.is_empty()
                && u.len() <= 256
                && !u.starts_with('-')
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b));
            if !ok {
                return Err((
                    format!("freeze.units[{i}]"),
                    format!("{u:?} is not a systemd unit name"),
                ));
            }
        }
        if let Some(p) = self.command.first() {
            if !Path::new(p).is_absolute() {
                return Err((
                    "freeze.command".into(),
                    format!("the program {p:?} must be an absolute path"),
                ));
            }
        }
        if !self.systemctl.is_absolute() {
            return Err(("freeze.systemctl".into(), "must be an absolute path".into()));
        }
        if self.action_timeout_secs == 0 || self.action_timeout_secs > 3600 {
            return Err((
                "freeze.action_timeout_secs".into(),
                "must be between 1 and 3600".into(),
            ));
        }
        for (key, url) in [
            ("freeze.token_url", &self.token_url),
            ("freeze.license_url", &self.license_url),
        ] {
            if !url.is_empty() && (!url.starts_with("https://") || !url.contains("{license_id}")) {
                return Err((
                    key.into(),
                    format!("{url:?} must be an https:// URL containing {{license_id}}"),
                ));
            }
        }
        if !(1..=7 * 86_400).contains(&self.poll_interval_secs) {
            return Err((
                "freeze.poll_interval_secs".into(),
                "must be between 1 and 604800".into(),
            ));
        }
        if !(1..=300).contains(&self.poll_timeout_secs) {
            return Err((
                "freeze.poll_timeout_secs".into(),
                "must be between 1 and 300".into(),
            ));
        }
        if !self.tpm_device.as_os_str().is_empty() && !self.tpm_device.is_absolute() {
            return Err((
                "freeze.tpm_device".into(),
                "must be an absolute path".into(),
            ));
        }
        if !tpm_anchor::OWNER_NV_RANGE.contains(&self.tpm_nv_index) {
            return Err((
                "freeze.tpm_nv_index".into(),
                format!(
                    "{:#010x} is not in the owner's NV range 0x01800000-0x01bfffff",
                    self.tpm_nv_index
                ),
            ));
        }
        Ok(())
    }

    pub fn actions(&self) -> actions::ActionConfig {
        actions::ActionConfig {
            systemctl: self.systemctl.clone(),
            units: self.units.clone(),
            command: self.command.clone(),
            timeout: std::time::Duration::from_secs(self.action_timeout_secs),
        }
    }
}

/// Where dropped status tokens are picked up.
pub fn tokens_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("tokens")
}
