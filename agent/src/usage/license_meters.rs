//! Meters billed to an installed license's marketplace instance, for sellers who do not
//! configure `[usage.meters]`: the instance id travels inside the signed license.
//!
//! A meter `PRODUCT/NAME` (or just `PRODUCT`) is billed to the instance of PRODUCT's
//! license. Any other meter name is billed to the one installed product's instance when
//! exactly one product has a license; with several, the name must say which.

use std::sync::Arc;

use super::hours::Key;
use super::service::MeterResolver;
use super::UsageConfig;
use crate::license::LicenseService;

pub struct LicenseMeters(pub Arc<LicenseService>);

impl MeterResolver for LicenseMeters {
    fn resolve(&self, _cfg: &UsageConfig, meter: &str) -> Result<Option<Key>, String> {
        let verdicts = self.0.verdicts();
        let product = meter.split_once('/').map_or(meter, |(p, _)| p);
        let instance = verdicts
            .instance_for(product)
            .or_else(|| match verdicts.products()[..] {
                [only] => verdicts.instance_for(only),
                _ => None,
            });
        Ok(instance.map(|instance| Key {
            instance,
            meter: meter.to_string(),
            pkg: None,
        }))
    }
}
