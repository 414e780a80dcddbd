//! The `[usage]` configuration section.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a meter's usage is billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// The pay-per-use instance id from the marketplace (≤ 64 characters).
    pub instance_id: String,
    /// For "stop when used up" packages: the package instance the usage is deducted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_instance_id: Option<String>,
}

/// The marketplace's usage-data hosts (shared with the seller server's relay).
pub use kooagent_edge::upload::DEFAULT_UPSTREAMS;

/// How closed hours reach the marketplace (docs/usage.md "Relay mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UsageMode {
    /// Relay when a relay URL is known (`usage.relay_url`, else `authcode.relay_url`);
    /// otherwise direct when `key_file` is set; otherwise record only.
    #[default]
    Auto,
    /// Through the seller's server, signed with the device key.
    Relay,
    /// Straight to the marketplace, signed with the interconnection key in `key_file`:
    /// for sellers shipping sealed hardware only (the key must not sit on a buyer's machine).
    Direct,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    pub mode: UsageMode,
    /// The seller's server, `https://host[:port]`; empty: `authcode.relay_url`.
    pub relay_url: String,
    /// Relay mode: how often records the relay holds are asked about again until it
    /// reports them delivered or parked.
    pub relay_poll_secs: u64,
    /// Base URLs tried in order (the API path is appended): the marketplace's hosts, or a
    /// seller relay speaking the same protocol.
    pub upstreams: Vec<String>,
    /// File holding the seller's interconnection key (mode 0600, owned by root or the
    /// agent). Empty: usage is recorded but not uploaded.
    pub key_file: PathBuf,
    /// PEM file with an extra CA trusted besides the web PKI roots (a relay's private CA).
    pub extra_ca_file: PathBuf,
    /// Seconds after an hour ends before it is closed and sent.
    pub lateness_secs: u64,
    /// Records and hours older than this are forgotten (counted when never delivered);
    /// usage with an `at` older than this is refused.
    pub max_age_days: u64,
    /// Upper bound of the ledger on disk.
    pub max_bytes: u64,
    /// Bound on one upload request, connection included.
    pub upload_timeout_secs: u64,
    /// First retry delay after a transient failure; doubles up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Records per request (the marketplace takes at most 1000).
    pub batch_size: usize,
    /// Meter name → where its usage is billed.
    pub meters: BTreeMap<String, MeterConfig>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            mode: UsageMode::Auto,
            relay_url: String::new(),
            relay_poll_secs: 600,
            upstreams: DEFAULT_UPSTREAMS.iter().map(|s| s.to_string()).collect(),
            key_file: PathBuf::new(),
            extra_ca_file: PathBuf::new(),
            lateness_secs: 300,
            max_age_days: 35,
            max_bytes: 64 << 20,
            upload_timeout_secs: 30,
            backoff_initial_ms: 5_000,
            backoff_max_ms: 900_000,
            batch_size: super::upload::MAX_RECORDS,
            meters: BTreeMap::new(),
        }
    }
}

/// The marketplace's string fields: 1..=64 printable ASCII characters.
pub use kooagent_core::usage::names::{valid_id, valid_meter_name};

impl UsageConfig {
    /// Checks every value; the error is (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("usage.{k}"), m));
        if self.upstreams.is_empty() {
            return bad("upstreams", "needs at least one base URL".into());
        }
        for u in &self.upstreams {
            let rest = match u.strip_prefix("https://") {
                Some(r) => r,
                None => {
                    return bad(
                        "upstreams",
                        format!("{u:?} must start with https:// (usage is never sent unencrypted)"),
                    )
                }
            };
            let host = rest.split('/').next().unwrap_or("");
            if host.is_empty() || u.contains(char::is_whitespace) || u.contains(['?', '#']) {
                return bad(
                    "upstreams",
                    format!("{u:?} is not a base URL such as \"https://mkt.myhuaweicloud.com\""),
                );
            }
        }
        if !self.relay_url.is_empty()
            && (!self.relay_url.starts_with("https://")
                || self.relay_url.contains(char::is_whitespace))
        {
            return bad("relay_url", "must be an https:// URL".into());
        }
        if !(1..=86_400).contains(&self.relay_poll_secs) {
            return bad("relay_poll_secs", "must be between 1 and 86400".into());
        }
        for (k, p) in [
            ("key_file", &self.key_file),
            ("extra_ca_file", &self.extra_ca_file),
        ] {
            if !p.as_os_str().is_empty() && !p.is_absolute() {
                return bad(k, "must be an absolute path".into());
            }
        }
        if self.lateness_secs > 86_400 {
            return bad("lateness_secs", "must be at most 86400 (one day)".into());
        }
        if !(1..=3650).contains(&self.max_age_days) {
            return bad("max_age_days", "must be between 1 and 3650".into());
        }
        if self.max_bytes < 1 << 20 {
            return bad("max_bytes", "must be at least 1048576 (1 MiB)".into());
        }
        if !(1..=600).contains(&self.upload_timeout_secs) {
            return bad("upload_timeout_secs", "must be between 1 and 600".into());
        }
        if self.backoff_initial_ms == 0 {
            return bad("backoff_initial_ms", "must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return bad(
                "backoff_max_ms",
                "must be at least usage.backoff_initial_ms".into(),
            );
        }
        if !(1..=super::upload::MAX_RECORDS).contains(&self.batch_size) {
            return bad(
                "batch_size",
                "must be between 1 and 1000 (the marketplace's limit)".into(),
            );
        }
        for (name, m) in &self.meters {
            if !valid_meter_name(name) {
                return bad(
                    &format!("meters.{name}"),
                    "meter names are 1..64 characters of letters, digits, _ - . :".into(),
                );
            }
            if !valid_id(&m.instance_id) {
                return bad(
                    &format!("meters.{name}.instance_id"),
                    "must be 1..64 printable ASCII characters".into(),
                );
            }
            if let Some(p) = &m.package_instance_id {
                if !valid_id(p) {
                    return bad(
                        &format!("meters.{name}.package_instance_id"),
                        "must be 1..64 printable ASCII characters".into(),
                    );
                }
            }
        }
        Ok(())
    }

    pub fn key_file(&self) -> Option<&std::path::Path> {
        (!self.key_file.as_os_str().is_empty()).then_some(self.key_file.as_path())
    }

    pub fn extra_ca_file(&self) -> Option<&std::path::Path> {
        (!self.extra_ca_file.as_os_str().is_empty()).then_some(self.extra_ca_file.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        UsageConfig::default().validate().unwrap();
        let c = UsageConfig {
            upstreams: vec!["http://x".into()],
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "usage.upstreams");
        let c = UsageConfig {
            batch_size: 1001,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "usage.batch_size");
        let mut c = UsageConfig::default();
        c.meters.insert(
            "cpu".into(),
            MeterConfig {
                instance_id: "x".repeat(65),
                package_instance_id: None,
            },
        );
        assert_eq!(c.validate().unwrap_err().0, "usage.meters.cpu.instance_id");
        let c = UsageConfig {
            key_file: "relative".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "usage.key_file");
    }
}
