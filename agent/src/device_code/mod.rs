//! Device identification code (being written: see docs/device-code.md once it lands).

use serde::{Deserialize, Serialize};

/// `[identity]` section of the agent config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {}
