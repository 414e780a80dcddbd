//! Offline license rules: the signed format, the trusted seller keys and the verdict.
pub mod format;
pub mod fuzz;
pub mod issue;
pub mod keys;
pub mod verdict;

pub use fuzz::fuzz_parse;
