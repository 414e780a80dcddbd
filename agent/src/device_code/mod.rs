//! Device identification code. PLACEHOLDER with the agreed API; the real module is being
//! written on the `device` branch and replaces this file when merged.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[identity]` section of the agent config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    pub root: PathBuf,
    pub metadata: bool,
    pub source: Vec<VendorSource>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VendorSource {
    pub name: String,
}

impl IdentityConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStatus {
    FirstSeen,
    Same,
    Drift,
    Clone,
    NewDevice,
    Settling,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    pub name: String,
    pub hash: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub code: String,
    pub accepted_codes: Vec<String>,
    pub status: IdentityStatus,
    pub settled: bool,
    pub product_id: String,
    pub components: Vec<ComponentReport>,
    pub baseline_code: Option<String>,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no identity source found")]
    NoIdentity,
}

pub struct Resolver {
    product_id: String,
}

impl Resolver {
    pub fn new(_cfg: IdentityConfig, product_id: String, _state_dir: Option<PathBuf>) -> Self {
        Resolver { product_id }
    }
    pub fn resolve(&self, _now_unix: i64, _persist: bool) -> Result<DeviceReport, DeviceError> {
        Ok(DeviceReport {
            code: "0000-0000-0000-0000-0000".into(),
            accepted_codes: vec![],
            status: IdentityStatus::FirstSeen,
            settled: true,
            product_id: self.product_id.clone(),
            components: vec![],
            baseline_code: None,
            detail: String::new(),
        })
    }
    pub fn refresh_instance_id(&self) -> Result<bool, DeviceError> {
        Ok(false)
    }
}

/// A typed code that is not a device identification code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a device identification code (expected XXXX-XXXX-XXXX-XXXX-XXXX)")]
pub struct CodeError(pub String);

/// Canonicalises a code as a person typed it: case, spaces and hyphens do not matter.
/// MINIMAL VERSION for the license branch; the device branch's module replaces it.
pub fn parse_code(s: &str) -> Result<String, CodeError> {
    let chars: Vec<char> = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if chars.len() != 20 || !chars.iter().all(|c| c.is_ascii_alphanumeric()) {
        return Err(CodeError(s.to_string()));
    }
    Ok(chars
        .chunks(4)
        .map(|g| g.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-"))
}
