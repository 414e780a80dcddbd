//! Device authentication of the relay protocol (agent ↔ the seller's own server), shared by
//! both sides: the agent signs every relay request with its ed25519 device key, the seller
//! server verifies it. The signed bytes are
//!
//! ```text
//! "kooagent-relay-v1\n" METHOD "\n" PATH "\n" ts "\n" nonce "\n" lowercase-hex(sha256(body))
//! ```
//!
//! and travel in four headers (`HEADER_*`). The verifier checks the signature, a ±300 s
//! window around its own clock, and asks the caller whether the nonce is fresh (the server
//! keeps seen nonces in its database; this module keeps no state).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Base64 (standard) of the 32-byte ed25519 public key.
/// The header carrying the seller's enrollment token (docs/seller-server.md "Security").
pub const HEADER_ENROLLMENT: &str = "x-kooagent-enrollment";

pub const HEADER_DEVICE_KEY: &str = "x-kooagent-device-key";
/// Unix milliseconds, decimal.
pub const HEADER_TS: &str = "x-kooagent-ts";
/// 32 lowercase hex characters, random per request.
pub const HEADER_NONCE: &str = "x-kooagent-nonce";
/// Base64 (standard) of the 64-byte ed25519 signature.
pub const HEADER_SIGNATURE: &str = "x-kooagent-signature";
/// Domain separation: a relay signature can never be replayed as anything else.
pub const DOMAIN: &str = "kooagent-relay-v1";
/// Accepted distance between the request's timestamp and the verifier's clock.
pub const WINDOW_MS: i64 = 300_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayAuthError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {header}: {message}")]
    BadHeader {
        header: &'static str,
        message: String,
    },
    #[error(
        "request timestamp is {skew_ms} ms away from the server clock (allowed ±{WINDOW_MS} ms)"
    )]
    Stale { skew_ms: i64 },
    #[error("nonce already used")]
    Replay,
    #[error("signature does not verify")]
    BadSignature,
}

/// The four authentication headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHeaders {
    pub device_key: String,
    pub ts: String,
    pub nonce: String,
    pub signature: String,
}

impl RelayHeaders {
    /// `(name, value)` pairs in a stable order, ready to put on a request.
    pub fn pairs(&self) -> [(&'static str, &str); 4] {
        [
            (HEADER_DEVICE_KEY, &self.device_key),
            (HEADER_TS, &self.ts),
            (HEADER_NONCE, &self.nonce),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }

    /// Collects the headers through `get` (a case-insensitive lookup on the server's request).
    pub fn from_lookup<'a>(
        mut get: impl FnMut(&'static str) -> Option<&'a str>,
    ) -> Result<Self, RelayAuthError> {
        let mut one = |h: &'static str| {
            get(h)
                .map(|v| v.trim().to_string())
                .ok_or(RelayAuthError::MissingHeader(h))
        };
        Ok(RelayHeaders {
            device_key: one(HEADER_DEVICE_KEY)?,
            ts: one(HEADER_TS)?,
            nonce: one(HEADER_NONCE)?,
            signature: one(HEADER_SIGNATURE)?,
        })
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The exact bytes that are signed.
pub fn signing_bytes(method: &str, path: &str, ts: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    format!(
        "{DOMAIN}\n{method}\n{path}\n{ts}\n{nonce}\n{}",
        hex(&Sha256::digest(body))
    )
    .into_bytes()
}

/// A nonce from 16 random bytes the caller draws: 32 lowercase hex characters.
pub fn nonce_from(random: [u8; 16]) -> String {
    hex(&random)
}

/// Signs one request with an explicit timestamp and nonce (tests and the agent's client,
/// which passes a fresh [`nonce_from`]).
pub fn sign(
    key: &SigningKey,
    method: &str,
    path: &str,
    body: &[u8],
    ts_ms: i64,
    nonce: &str,
) -> RelayHeaders {
    let ts = ts_ms.to_string();
    let sig = key.sign(&signing_bytes(method, path, &ts, nonce, body));
    RelayHeaders {
        device_key: STANDARD.encode(key.verifying_key().as_bytes()),
        ts,
        nonce: nonce.to_string(),
        signature: STANDARD.encode(sig.to_bytes()),
    }
}

fn bad(header: &'static str, message: impl Into<String>) -> RelayAuthError {
    RelayAuthError::BadHeader {
        header,
        message: message.into(),
    }
}

/// Parses the device key header into a usable (not small-order) ed25519 key.
pub fn parse_device_key(b64: &str) -> Result<VerifyingKey, RelayAuthError> {
    let raw = STANDARD
        .decode(b64)
        .map_err(|_| bad(HEADER_DEVICE_KEY, "not standard base64"))?;
    let raw: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad(HEADER_DEVICE_KEY, format!("{} bytes, want 32", raw.len())))?;
    let key = VerifyingKey::from_bytes(&raw)
        .map_err(|_| bad(HEADER_DEVICE_KEY, "not a valid ed25519 public key"))?;
    if key.is_weak() {
        return Err(bad(HEADER_DEVICE_KEY, "a weak (small-order) key"));
    }
    Ok(key)
}

/// Verifies one request. Checks, in order: header syntax, the time window around
/// `now_ms`, the signature, and last `nonce_fresh(nonce)`, which the caller answers
/// (and records the nonce) only for a request that is otherwise authentic, so that
/// forged requests cannot fill its nonce store. Returns the device key.
pub fn verify(
    headers: &RelayHeaders,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
    nonce_fresh: impl FnOnce(&str) -> bool,
) -> Result<VerifyingKey, RelayAuthError> {
    verify_with(
        headers,
        parse_device_key,
        method,
        path,
        body,
        now_ms,
        nonce_fresh,
    )
}

/// [`verify`] with the caller's parser of `headers.device_key` (a [`parse_device_key`]
/// behind a cache: decompressing a key costs a field inversion per request, and a
/// server sees the same devices again and again).
pub fn verify_with(
    headers: &RelayHeaders,
    parse_key: impl FnOnce(&str) -> Result<VerifyingKey, RelayAuthError>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
    nonce_fresh: impl FnOnce(&str) -> bool,
) -> Result<VerifyingKey, RelayAuthError> {
    let p = prepare(headers, parse_key, method, path, body, now_ms)?;
    if !p.verify() {
        return Err(RelayAuthError::BadSignature);
    }
    if !nonce_fresh(&headers.nonce) {
        return Err(RelayAuthError::Replay);
    }
    Ok(p.key)
}

/// A request whose headers passed every check but the signature itself: what the
/// signature must verify against. A server checking many requests at once verifies these
/// together (`ed25519_dalek::verify_batch`); [`verify_with`] checks one.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub key: VerifyingKey,
    /// The signed bytes ([`signing_bytes`]).
    pub message: Vec<u8>,
    pub signature: Signature,
}

impl Unverified {
    /// The signature alone (the verdict [`verify_with`] gives).
    pub fn verify(&self) -> bool {
        self.key.verify(&self.message, &self.signature).is_ok()
    }
}

/// Every check of [`verify_with`] before the signature (key, timestamp window, nonce
/// format, signature encoding), in the same order with the same errors; the nonce's
/// freshness is the caller's, after the signature.
pub fn prepare(
    headers: &RelayHeaders,
    parse_key: impl FnOnce(&str) -> Result<VerifyingKey, RelayAuthError>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<Unverified, RelayAuthError> {
    let key = parse_key(&headers.device_key)?;
    if headers.ts.is_empty()
        || headers.ts.len() > 15
        || !headers.ts.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad(HEADER_TS, "not unix milliseconds"));
    }
    let ts: i64 = headers
        .ts
        .parse()
        .map_err(|_| bad(HEADER_TS, "not unix milliseconds"))?;
    if headers.nonce.len() != 32
        || !headers
            .nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(HEADER_NONCE, "not 32 lowercase hex characters"));
    }
    let sig = STANDARD
        .decode(&headers.signature)
        .map_err(|_| bad(HEADER_SIGNATURE, "not standard base64"))?;
    let sig: [u8; 64] = sig
        .as_slice()
        .try_into()
        .map_err(|_| bad(HEADER_SIGNATURE, format!("{} bytes, want 64", sig.len())))?;
    let skew_ms = ts - now_ms;
    if skew_ms.abs() > WINDOW_MS {
        return Err(RelayAuthError::Stale { skew_ms });
    }
    Ok(Unverified {
        key,
        message: signing_bytes(method, path, &headers.ts, &headers.nonce, body),
        signature: Signature::from_bytes(&sig),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000_000;
    const NONCE: &str = "0123456789abcdef0123456789abcdef";
    const PATH: &str = "/v1/authcode/heartbeat";
    const BODY: &[u8] = br#"{"license":"ABC"}"#;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn fresh(_: &str) -> bool {
        true
    }

    #[test]
    fn round_trip_and_fixed_bytes() {
        let k = key(7);
        let h = sign(&k, "POST", PATH, BODY, NOW, NONCE);
        assert_eq!(h.ts, NOW.to_string());
        let got = verify(&h, "POST", PATH, BODY, NOW + 1000, fresh).unwrap();
        assert_eq!(got, k.verifying_key());
        let text = String::from_utf8(signing_bytes("POST", PATH, &h.ts, NONCE, b"")).unwrap();
        assert_eq!(
            text,
            format!(
                "kooagent-relay-v1\nPOST\n{PATH}\n{NOW}\n{NONCE}\n\
                 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        );
        let names: Vec<_> = h.pairs().iter().map(|p| p.0).collect();
        assert_eq!(
            names,
            [
                "x-kooagent-device-key",
                "x-kooagent-ts",
                "x-kooagent-nonce",
                "x-kooagent-signature"
            ]
        );
    }

    #[test]
    fn tampering_is_refused() {
        let h = sign(&key(7), "POST", PATH, BODY, NOW, NONCE);
        let e = RelayAuthError::BadSignature;
        assert_eq!(
            verify(&h, "POST", PATH, br#"{"license":"ABD"}"#, NOW, fresh),
            Err(e.clone())
        );
        assert_eq!(
            verify(&h, "POST", "/v1/authcode/usage", BODY, NOW, fresh),
            Err(e.clone())
        );
        assert_eq!(verify(&h, "PUT", PATH, BODY, NOW, fresh), Err(e.clone()));
        let mut t = h.clone();
        t.ts = (NOW + 1).to_string();
        assert_eq!(verify(&t, "POST", PATH, BODY, NOW, fresh), Err(e.clone()));
        let mut n = h.clone();
        n.nonce = "f123456789abcdef0123456789abcdef".into();
        assert_eq!(verify(&n, "POST", PATH, BODY, NOW, fresh), Err(e.clone()));
        // Another device's key in the header: the signature was not made by it.
        let mut w = h.clone();
        w.device_key = STANDARD.encode(key(8).verifying_key().as_bytes());
        assert_eq!(verify(&w, "POST", PATH, BODY, NOW, fresh), Err(e));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let h = sign(&key(7), "POST", PATH, BODY, NOW, NONCE);
        assert!(verify(&h, "POST", PATH, BODY, NOW + WINDOW_MS, fresh).is_ok());
        assert!(verify(&h, "POST", PATH, BODY, NOW - WINDOW_MS, fresh).is_ok());
        assert_eq!(
            verify(&h, "POST", PATH, BODY, NOW + WINDOW_MS + 1, fresh),
            Err(RelayAuthError::Stale {
                skew_ms: -WINDOW_MS - 1
            })
        );
        assert!(matches!(
            verify(&h, "POST", PATH, BODY, NOW - WINDOW_MS - 1, fresh),
            Err(RelayAuthError::Stale { .. })
        ));
    }

    #[test]
    fn nonce_is_checked_last_and_replay_refused() {
        let h = sign(&key(7), "POST", PATH, BODY, NOW, NONCE);
        let mut seen = std::collections::HashSet::new();
        let mut check = |n: &str| seen.insert(n.to_string());
        assert!(verify(&h, "POST", PATH, BODY, NOW, &mut check).is_ok());
        assert_eq!(
            verify(&h, "POST", PATH, BODY, NOW, &mut check),
            Err(RelayAuthError::Replay)
        );
        // A forged request never reaches the nonce store.
        let mut called = false;
        let _ = verify(&h, "POST", PATH, b"x", NOW, |_| {
            called = true;
            true
        });
        assert!(!called);
    }

    #[test]
    fn malformed_headers_are_named() {
        let h = sign(&key(7), "POST", PATH, BODY, NOW, NONCE);
        let mut a = h.clone();
        a.device_key = "%%%".into();
        assert!(matches!(
            verify(&a, "POST", PATH, BODY, NOW, fresh),
            Err(RelayAuthError::BadHeader {
                header: HEADER_DEVICE_KEY,
                ..
            })
        ));
        let mut b = h.clone();
        b.nonce = NONCE.to_uppercase();
        assert!(matches!(
            verify(&b, "POST", PATH, BODY, NOW, fresh),
            Err(RelayAuthError::BadHeader {
                header: HEADER_NONCE,
                ..
            })
        ));
        let mut c = h.clone();
        c.ts = "-5".into();
        assert!(matches!(
            verify(&c, "POST", PATH, BODY, NOW, fresh),
            Err(RelayAuthError::BadHeader {
                header: HEADER_TS,
                ..
            })
        ));
        let mut d = h.clone();
        d.signature = STANDARD.encode([0u8; 10]);
        assert!(matches!(
            verify(&d, "POST", PATH, BODY, NOW, fresh),
            Err(RelayAuthError::BadHeader {
                header: HEADER_SIGNATURE,
                ..
            })
        ));
        let missing = RelayHeaders::from_lookup(|h| (h != HEADER_NONCE).then_some("x"));
        assert_eq!(missing, Err(RelayAuthError::MissingHeader(HEADER_NONCE)));
    }

    #[test]
    fn nonces_are_lowercase_hex() {
        let n = nonce_from([0xab; 16]);
        assert_eq!(n, "ab".repeat(16));
    }
}
