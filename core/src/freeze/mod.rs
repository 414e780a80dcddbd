//! Freeze rules: the seller-signed status token and the lifecycle machine it drives.
pub mod lifecycle;
pub mod token;
