//! Status tokens (docs/license-format.md §10 is the contract): the seller's signed word that
//! a license is frozen, unfrozen or released. Pure: no files, no clock.
//!
//! `kst1.<base64url(payload)>.<base64url(signature)>`, the signature ed25519 over
//! `"kooagent-status-token-v1\n" || payload` with the same seller keys as licenses. The
//! different prefix keeps a license signature from ever passing as a token and back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::format_rfc3339;
use crate::license::format::{check_id, key_id, strict_json, time, MAX_SAFE_INT};
use crate::license::keys::TrustedKeys;

pub const PREFIX: &str = "kst1.";
pub const DOMAIN: &[u8] = b"kooagent-status-token-v1\n";
pub const FORMAT_VERSION: u64 = 1;
/// Largest token accepted (real ones are a few hundred bytes).
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
const MAX_DEVICES: usize = 64;
const MAX_DEVICE_LEN: usize = 1024;
const MAX_REASON: usize = 1024;

/// What the seller says about the license.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Freeze,
    Unfreeze,
    Release,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Freeze => "freeze",
            Action::Unfreeze => "unfreeze",
            Action::Release => "release",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "freeze" => Ok(Action::Freeze),
            "unfreeze" => Ok(Action::Unfreeze),
            "release" => Ok(Action::Release),
            other => Err(format!(
                "{other:?} is not an action: freeze, unfreeze or release"
            )),
        }
    }
}

/// Everything a token says; the seller chooses `seq` (strictly increasing per license).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    pub license_id: String,
    pub action: Action,
    pub seq: u64,
    /// Unix seconds.
    pub issued_at: i64,
    /// Device codes the token is bound to; empty: any device holding the license.
    pub devices: Vec<String>,
    pub reason: Option<String>,
}

/// A parsed token: its contents, the signer's key id and exactly the signed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusToken {
    pub key_id: String,
    pub req: TokenRequest,
    pub payload: Vec<u8>,
    pub signature: [u8; 64],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the status token is empty")]
    Empty,
    #[error("the status token is {0} bytes; at most 65536 are accepted")]
    TooLarge(usize),
    #[error("the status token is not UTF-8 text")]
    NotUtf8,
    #[error("this is not a KooAgent status token: it must start with \"kst1.\"")]
    NotAToken,
    #[error("the status token must be kst1.<payload>.<signature> (found {0} parts)")]
    Parts(usize),
    #[error("the status token's {part} is not valid base64url (unpadded): {detail}")]
    Base64 { part: &'static str, detail: String },
    #[error("the status token's signature is {0} bytes; an ed25519 signature is 64")]
    SignatureLength(usize),
    #[error("the status token payload is not valid: {0}")]
    Json(String),
    #[error("the status token payload has an unknown field {0:?}")]
    UnknownField(String),
    #[error("the status token payload lacks the required field {0:?}")]
    MissingField(&'static str),
    #[error("status token field {field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("the status token's signing key is not trusted: {0}")]
    UntrustedKey(String),
    #[error(
        "the status token's signature does not match key {0}: altered, or signed by another key"
    )]
    BadSignature(String),
}

fn field(field: &'static str, message: impl Into<String>) -> TokenError {
    TokenError::Field {
        field,
        message: message.into(),
    }
}

/// The payload as our issuer writes it: this field order, compact, `reason` omitted when
/// there is none.
#[derive(Serialize)]
struct Wire<'a> {
    v: u64,
    kid: &'a str,
    license: &'a str,
    action: Action,
    seq: u64,
    issued_at: String,
    devices: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

const REQUIRED: &[&str] = &[
    "v",
    "kid",
    "license",
    "action",
    "seq",
    "issued_at",
    "devices",
];
const OPTIONAL: &[&str] = &["reason"];

fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    [DOMAIN, payload].concat()
}

/// Issues a token: one line `kst1.<payload>.<signature>` without a line break.
/// Deterministic (ed25519 uses no randomness; devices are canonicalised and sorted), so
/// a resent request gets the same bytes.
pub fn issue(req: &TokenRequest, key: &SigningKey) -> Result<String, TokenError> {
    let mut devices = Vec::with_capacity(req.devices.len());
    for d in &req.devices {
        let code =
            crate::device_code::parse_code(d).map_err(|e| field("devices", e.to_string()))?;
        devices.push(code);
    }
    devices.sort();
    devices.dedup();
    let kid = key_id(&key.verifying_key());
    let wire = Wire {
        v: FORMAT_VERSION,
        kid: &kid,
        license: &req.license_id,
        action: req.action,
        seq: req.seq,
        issued_at: format_rfc3339(req.issued_at),
        devices: &devices,
        reason: req.reason.as_deref(),
    };
    let payload = serde_json::to_vec(&wire).map_err(|e| TokenError::Json(e.to_string()))?;
    // Never sign what we would refuse to read.
    let back = parse_payload(&payload)?;
    if back.1.issued_at != req.issued_at {
        return Err(field("issued_at", "a time outside the years 0000..9999"));
    }
    let sig = key.sign(&signed_bytes(&payload));
    Ok(format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    ))
}

/// Parses token bytes (surrounding ASCII whitespace ignored). Does not verify the
/// signature: see [`StatusToken::verify`].
pub fn parse(bytes: &[u8]) -> Result<StatusToken, TokenError> {
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| TokenError::NotUtf8)?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    let rest = text.strip_prefix(PREFIX).ok_or(TokenError::NotAToken)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [p, s] = parts.as_slice() else {
        return Err(TokenError::Parts(parts.len() + 1));
    };
    let decode = |part: &'static str, s: &str| {
        URL_SAFE_NO_PAD.decode(s).map_err(|e| TokenError::Base64 {
            part,
            detail: e.to_string(),
        })
    };
    let payload = decode("payload", p)?;
    let sig = decode("signature", s)?;
    let signature: [u8; 64] = sig
        .as_slice()
        .try_into()
        .map_err(|_| TokenError::SignatureLength(sig.len()))?;
    let (key_id, req) = parse_payload(&payload)?;
    Ok(StatusToken {
        key_id,
        req,
        payload,
        signature,
    })
}

fn take<T: serde::de::DeserializeOwned>(
    map: &mut serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<T, TokenError> {
    let v = map.remove(name).ok_or(TokenError::MissingField(name))?;
    serde_json::from_value(v).map_err(|e| field(name, e.to_string()))
}

fn parse_payload(payload: &[u8]) -> Result<(String, TokenRequest), TokenError> {
    let Value::Object(mut map) =
        strict_json(payload).map_err(|e| TokenError::Json(e.to_string()))?
    else {
        return Err(TokenError::Json("the payload must be a JSON object".into()));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !REQUIRED.contains(&k.as_str()) && !OPTIONAL.contains(&k.as_str()))
    {
        return Err(TokenError::UnknownField(k.clone()));
    }
    if let Some(k) = REQUIRED.iter().find(|k| !map.contains_key(**k)) {
        return Err(TokenError::MissingField(k));
    }
    let v: u64 = take(&mut map, "v")?;
    if v != FORMAT_VERSION {
        return Err(field("v", format!("format version {v} is not supported")));
    }
    let kid: String = take(&mut map, "kid")?;
    if kid.len() != 16 || !kid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(field("kid", "must be 16 lowercase hex digits"));
    }
    let license_id: String = take(&mut map, "license")?;
    check_id(&license_id).map_err(|_| {
        field(
            "license",
            format!("{license_id:?} is not a license id (1..128 characters from A-Z a-z 0-9 . _ : @ + = -, not starting with '.')"),
        )
    })?;
    let action: Action = take(&mut map, "action")?;
    let seq: u64 = take(&mut map, "seq")?;
    if seq > MAX_SAFE_INT {
        return Err(field(
            "seq",
            "is above 2^53-1, the largest exact JSON integer",
        ));
    }
    let at: String = take(&mut map, "issued_at")?;
    let issued_at = time(&at, "issued_at").map_err(|_| {
        field(
            "issued_at",
            format!("{at:?} is not a UTC time written YYYY-MM-DDTHH:MM:SSZ"),
        )
    })?;
    let devices: Vec<String> = take(&mut map, "devices")?;
    if devices.len() > MAX_DEVICES {
        return Err(field(
            "devices",
            format!("more than {MAX_DEVICES} device codes"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for d in &devices {
        if d.is_empty() || d.len() > MAX_DEVICE_LEN || !d.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(field("devices", format!("{d:?} is not a device code")));
        }
        if !seen.insert(d.as_str()) {
            return Err(field("devices", format!("lists {d:?} twice")));
        }
    }
    let reason: Option<String> = match map.contains_key("reason") {
        true => take(&mut map, "reason")?,
        false => None,
    };
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(field("reason", format!("longer than {MAX_REASON} bytes")));
    }
    Ok((
        kid,
        TokenRequest {
            license_id,
            action,
            seq,
            issued_at,
            devices,
            reason,
        },
    ))
}

impl StatusToken {
    pub fn verify_with(&self, key: &VerifyingKey) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&signed_bytes(&self.payload), &sig)
            .is_ok()
    }

    /// Checks signer and signature against the agent's trusted keys.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<(), TokenError> {
        let key = keys
            .lookup(&self.key_id)
            .map_err(TokenError::UntrustedKey)?;
        match self.verify_with(key) {
            true => Ok(()),
            false => Err(TokenError::BadSignature(self.key_id.clone())),
        }
    }

    /// Whether the token applies on a device whose accepted codes are `codes`.
    pub fn binds(&self, codes: &[String]) -> bool {
        self.req.devices.is_empty()
            || self.req.devices.iter().any(|d| {
                codes
                    .iter()
                    .any(|c| crate::license::verdict::same_code(d, c))
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub fn req(action: Action, seq: u64) -> TokenRequest {
        TokenRequest {
            license_id: "L-1".into(),
            action,
            seq,
            issued_at: 1_800_000_000,
            devices: vec![],
            reason: None,
        }
    }

    #[test]
    fn round_trip_byte_exact_and_deterministic() {
        let k = key(7);
        let mut r = req(Action::Freeze, 3);
        r.reason = Some("payment overdue".into());
        let a = issue(&r, &k).unwrap();
        assert_eq!(a, issue(&r, &k).unwrap());
        assert!(!a.contains('\n'));
        let t = parse(format!("  {a}\n").as_bytes()).unwrap();
        assert_eq!(t.req, r);
        assert_eq!(
            String::from_utf8(t.payload.clone()).unwrap(),
            format!(
                "{{\"v\":1,\"kid\":\"{}\",\"license\":\"L-1\",\"action\":\"freeze\",\"seq\":3,\
                 \"issued_at\":\"2027-01-15T08:00:00Z\",\"devices\":[],\"reason\":\"payment overdue\"}}",
                key_id(&k.verifying_key())
            )
        );
        let keys = TrustedKeys::from_keys([k.verifying_key()], &[]);
        t.verify(&keys).unwrap();
        let other = TrustedKeys::from_keys([key(8).verifying_key()], &[]);
        assert!(matches!(t.verify(&other), Err(TokenError::UntrustedKey(_))));
    }

    #[test]
    fn devices_are_canonical_and_bind() {
        let k = key(1);
        let mut r = req(Action::Unfreeze, 1);
        r.devices = vec!["7k2m q9xd 4hpa v3ne r8t5".into()];
        let t = parse(issue(&r, &k).unwrap().as_bytes()).unwrap();
        assert_eq!(t.req.devices, vec!["7K2M-Q9XD-4HPA-V3NE-R8T5".to_string()]);
        assert!(t.binds(&["7K2M-Q9XD-4HPA-V3NE-R8T5".into()]));
        assert!(!t.binds(&["AAAA-BBBB-CCCC-DDDD-EEEE".into()]));
        r.devices = vec!["not a code".into()];
        assert!(matches!(
            issue(&r, &k),
            Err(TokenError::Field {
                field: "devices",
                ..
            })
        ));
    }

    #[test]
    fn a_license_signature_never_passes_as_a_token() {
        let k = key(2);
        let t = issue(&req(Action::Release, 9), &k).unwrap();
        let (head, sig) = t.rsplit_once('.').unwrap();
        let p = parse(t.as_bytes()).unwrap();
        // Same payload signed under the license domain: refused.
        let lic_sig = k.sign(&[b"kooagent-license-v1\n".as_slice(), &p.payload].concat());
        let forged = format!("{head}.{}", URL_SAFE_NO_PAD.encode(lic_sig.to_bytes()));
        assert_ne!(sig, forged.rsplit_once('.').unwrap().1);
        let keys = TrustedKeys::from_keys([k.verifying_key()], &[]);
        assert!(matches!(
            parse(forged.as_bytes()).unwrap().verify(&keys),
            Err(TokenError::BadSignature(_))
        ));
        // A flipped payload byte fails too.
        let mut p2 = p.clone();
        p2.payload[10] ^= 1;
        assert!(p2.verify(&keys).is_err());
    }

    #[test]
    fn bad_tokens_are_named() {
        let k = key(3);
        let good = issue(&req(Action::Freeze, 1), &k).unwrap();
        assert_eq!(parse(b" ").unwrap_err(), TokenError::Empty);
        assert_eq!(parse(b"kl1.a.b").unwrap_err(), TokenError::NotAToken);
        assert_eq!(parse(b"kst1.abc").unwrap_err(), TokenError::Parts(2));
        assert_eq!(
            parse(&good.as_bytes()[..good.len() - 2]).unwrap_err(),
            TokenError::SignatureLength(63)
        );
        let sign = |payload: &str| {
            let sig = k.sign(&signed_bytes(payload.as_bytes()));
            format!(
                "kst1.{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(sig.to_bytes())
            )
        };
        let kid = key_id(&k.verifying_key());
        let base = |extra: &str| {
            format!(
                "{{\"v\":1,\"kid\":\"{kid}\",\"license\":\"L-1\",\"action\":\"freeze\",\"issued_at\":\"2027-01-15T08:00:00Z\",\"devices\":[]{extra}}}"
            )
        };
        assert_eq!(
            parse(sign(&base("")).as_bytes()).unwrap_err(),
            TokenError::MissingField("seq")
        );
        assert_eq!(
            parse(sign(&base(",\"seq\":1,\"x\":1")).as_bytes()).unwrap_err(),
            TokenError::UnknownField("x".into())
        );
        assert!(matches!(
            parse(sign(&base(",\"seq\":-1")).as_bytes()).unwrap_err(),
            TokenError::Field { field: "seq", .. }
        ));
        assert!(matches!(
            parse(sign(&base(",\"seq\":1,\"seq\":2")).as_bytes()).unwrap_err(),
            TokenError::Json(_)
        ));
        let bad_action = base(",\"seq\":1").replace("\"freeze\"", "\"thaw\"");
        assert!(matches!(
            parse(sign(&bad_action).as_bytes()).unwrap_err(),
            TokenError::Field {
                field: "action",
                ..
            }
        ));
        let ok = parse(sign(&base(",\"seq\":1,\"reason\":null")).as_bytes()).unwrap();
        assert_eq!(ok.req.reason, None);
        let mut r = req(Action::Freeze, 1);
        r.license_id = "../etc".into();
        assert!(matches!(
            issue(&r, &k),
            Err(TokenError::Field {
                field: "license",
                ..
            })
        ));
    }
}
