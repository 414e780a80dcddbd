//! Usage metering rules: exact decimals, hour records and the marketplace's request signing.
pub mod decimal;
pub mod hours;
pub mod names;
pub mod relay;
pub mod sign;
