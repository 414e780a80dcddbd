//! KooAgent library: everything the `kooagent` binary does, as testable modules.
pub mod device_code;
