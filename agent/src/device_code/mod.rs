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
