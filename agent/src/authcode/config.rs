//! `[authcode]`: where the AK/SK live (relay: the seller's server; direct: a root-only
//! file on the device), and the product's policies for expiry and lost connectivity.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The agent calls the seller's server, which signs with the AK/SK it keeps.
    #[default]
    Relay,
    /// The agent signs the open-API calls itself with the AK/SK in `aksk_file`.
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OfflinePolicy {
    /// Keep the last answer's verdict however long the marketplace is unreachable.
    Keep,
    /// Freeze once `offline_days` pass without a successful daily query.
    #[default]
    Freeze,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthcodeConfig {
    pub mode: Mode,
    /// Relay mode: the seller's server, `https://host[:port]` (paths `/v1/authcode/...`).
    pub relay_url: String,
    /// Direct mode: the open-API hosts in the order tried.
    pub bases: Vec<String>,
    /// Direct mode: two lines `AK` / `SK`, mode 0600, owned by root or the agent.
    pub aksk_file: PathBuf,
    /// A CA (PEM) trusted besides the web PKI roots (relay server or marketplace stand-in).
    pub extra_ca_file: PathBuf,
    /// Relay mode: the seller's enrollment token (one line), sent until the seller's
    /// server knows this device's key; "" = none (docs/seller-server.md "Security").
    pub enrollment_token_file: PathBuf,
    pub timeout_secs: u64,
    /// Marketplace `product_id` → the product name `license.check` is asked about;
    /// a product id not listed is used as is.
    pub products: BTreeMap<String, String>,
    /// After the marketplace reports a code EXPIRED (or its expiry passes): days still usable.
    pub grace_days: u64,
    /// Days without a successful daily query before `offline_policy` applies.
    pub offline_days: u64,
    pub offline_policy: OfflinePolicy,
}

impl Default for AuthcodeConfig {
    fn default() -> Self {
        AuthcodeConfig {
            mode: Mode::Relay,
            relay_url: String::new(),
            bases: super::client::DEFAULT_BASES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            aksk_file: "/etc/kooagent/authcode-aksk".into(),
            extra_ca_file: PathBuf::new(),
            enrollment_token_file: PathBuf::new(),
            timeout_secs: 30,
            products: BTreeMap::new(),
            grace_days: 7,
            offline_days: 7,
            offline_policy: OfflinePolicy::Freeze,
        }
    }
}

impl AuthcodeConfig {
    /// Checks every value: `Err((key, message))`. Files are read when used, not here.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("authcode.{k}"), m.to_string()));
        if !self.relay_url.is_empty() && !self.relay_url.starts_with("https://") {
            return err("relay_url", "must be an https:// URL");
        }
        if self.bases.is_empty() {
            return err("bases", "must list at least one https:// host");
        }
        if let Some(b) = self.bases.iter().find(|b| !b.starts_with("https://")) {
            return Err((
                "authcode.bases".into(),
                format!("{b:?} is not an https:// URL"),
            ));
        }
        if !self.aksk_file.is_absolute() {
            return err("aksk_file", "must be an absolute path");
        }
        if !self.extra_ca_file.as_os_str().is_empty() && !self.extra_ca_file.is_absolute() {
            return err("extra_ca_file", "must be an absolute path");
        }
        if !self.enrollment_token_file.as_os_str().is_empty()
            && !self.enrollment_token_file.is_absolute()
        {
            return err("enrollment_token_file", "must be an absolute path");
        }
        if !(1..=300).contains(&self.timeout_secs) {
            return err("timeout_secs", "must be between 1 and 300");
        }
        if self.grace_days > 3650 {
            return err("grace_days", "must be at most 3650");
        }
        if self.offline_days > 3650 {
            return err("offline_days", "must be at most 3650");
        }
        for (k, v) in &self.products {
            if k.is_empty() || v.is_empty() {
                return err("products", "product ids and names must not be empty");
            }
        }
        Ok(())
    }

    /// The product name a marketplace product id is checked under.
    pub fn product_for(&self, product_id: &str) -> String {
        self.products
            .get(product_id)
            .cloned()
            .unwrap_or_else(|| product_id.to_string())
    }

    pub fn extra_ca(&self) -> Option<&std::path::Path> {
        (!self.extra_ca_file.as_os_str().is_empty()).then_some(self.extra_ca_file.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_values_are_checked() {
        let c = AuthcodeConfig::default();
        assert_eq!(c.mode, Mode::Relay);
        assert!(c.validate().is_ok());
        let bad = AuthcodeConfig {
            relay_url: "http://x".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "authcode.relay_url");
        let bad = AuthcodeConfig {
            timeout_secs: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "authcode.timeout_secs");
        let mut c = AuthcodeConfig::default();
        c.products.insert("123".into(), "ours".into());
        assert_eq!(c.product_for("123"), "ours");
        assert_eq!(c.product_for("9"), "9");
    }
}
