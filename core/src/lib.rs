//! KooAgent's shared rules, used by the device agent (`agent/`), the seller's tools and
//! server, and the fuzz targets: values in, values out.
//!
//! Nothing here reads or writes files, opens sockets, starts threads or draws randomness:
//! callers read the bytes, pass the random values and the time, and persist what comes back.
//! That keeps every rule testable on its own and the crate free of I/O dependencies.
#![forbid(unsafe_code)]

pub mod authcode;
pub mod clock;
pub mod device_code;
pub mod freeze;
pub mod license;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod usage;
