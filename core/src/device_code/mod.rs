//! Device-code rules: normalizing hardware readings, deriving the code from them and its
//! human-readable encoding with a check symbol. Reading the hardware and the baseline
//! files stays in the agent.
pub mod derive;
pub mod encode;
pub mod normalize;

pub use encode::{canonical, parse_code, CodeError};
