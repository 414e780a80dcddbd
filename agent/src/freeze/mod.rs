//! Freeze state (docs/freeze.md): status tokens signed by the seller, the per-license
//! lifecycle (active, grace, frozen, released), its tamper-evident state file, the
//! actions run on transitions, and the service that ties them to the license verdicts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod actions;
pub mod lifecycle;
pub mod service;
pub mod state_file;
pub mod token;

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
}

impl Default for FreezeConfig {
    fn default() -> Self {
        FreezeConfig {
            units: vec![],
            command: vec![],
            systemctl: "/usr/bin/systemctl".into(),
            action_timeout_secs: 60,
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
