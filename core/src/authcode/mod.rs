//! The marketplace authorization-code rules: APIG request signing, the SaaS/authcode API's
//! request building and answer parsing, and the relay's device authentication.
pub mod api;
pub mod apig_sign;
pub mod relay_auth;
