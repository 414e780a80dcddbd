//! Status tokens (FREEZE / UNFREEZE / release) come from the freeze module, which owns
//! their format; this server only decides when one is due and allocates its sequence
//! number (in the same database transaction that records it and changes the state).
//!
//! [`FreezeTokens`] issues them with the seller's signing key in the freeze module's
//! `kst1` format; [`NotConfigured`] (tests of the refusal path) refuses, and every
//! activity that needs a token then answers `000005` instead of pretending.

/// What a status token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAction {
    Freeze,
    Unfreeze,
    Release,
}

impl TokenAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenAction::Freeze => "freeze",
            TokenAction::Unfreeze => "unfreeze",
            TokenAction::Release => "release",
        }
    }
}

/// Makes a signed status token. `seq` is strictly increasing per license id.
pub trait StatusTokens: Send + Sync {
    fn issue(
        &self,
        license_id: &str,
        action: TokenAction,
        seq: u64,
        devices: &[String],
        issued_at: i64,
    ) -> Result<String, String>;
}

/// No token issuer built in: every token request fails, with a message saying so.
pub struct NotConfigured;

pub const NOT_CONFIGURED: &str =
    "status tokens are not configured on this server (the freeze module is not built in); \
     freeze, unfreeze and release cannot be delivered to devices";

impl StatusTokens for NotConfigured {
    fn issue(
        &self,
        _: &str,
        _: TokenAction,
        _: u64,
        _: &[String],
        _: i64,
    ) -> Result<String, String> {
        Err(NOT_CONFIGURED.into())
    }
}

/// Tokens in the freeze module's format, signed with the seller's key.
pub struct FreezeTokens {
    pub key: ed25519_dalek::SigningKey,
}

impl StatusTokens for FreezeTokens {
    fn issue(
        &self,
        license_id: &str,
        action: TokenAction,
        seq: u64,
        devices: &[String],
        issued_at: i64,
    ) -> Result<String, String> {
        use kooagent_core::freeze::token::{issue, Action, TokenRequest};
        let action = match action {
            TokenAction::Freeze => Action::Freeze,
            TokenAction::Unfreeze => Action::Unfreeze,
            TokenAction::Release => Action::Release,
        };
        let req = TokenRequest {
            license_id: license_id.to_string(),
            action,
            seq,
            issued_at,
            devices: devices.to_vec(),
            reason: None,
        };
        issue(&req, &self.key).map_err(|e| e.to_string())
    }
}
