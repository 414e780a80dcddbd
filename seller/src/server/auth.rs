//! Signatures on the marketplace's calls (koogallery.md §4.1) and on our answers (§4.3).
//!
//! The two [UNCONFIRMED] points of §4.1 are decided here and only here:
//!
//! 1. **The key.** The formula names `accessKey`; the text leaves out which key the two
//!    HMACs use. Choice: the seller's interconnection key (the key shown in the seller
//!    console for this product's production interface) is both the `accessKey` string at
//!    the start of the canonical request and the HMAC key of both HMACs:
//!    ```text
//!    canonical = key + nonce + timestamp + lower(hex(HMAC_SHA256(key, body)))
//!    signature = hex(HMAC_SHA256(key, canonical))
//!    ```
//!    `timestamp` is the query parameter exactly as sent; `body` the raw request bytes.
//!    The signature is compared case-insensitively (examples show both cases), in
//!    constant time.
//! 2. **The time unit.** The text says seconds, every example has 13-digit milliseconds.
//!    Choice: a value of 12 or more digits is milliseconds, fewer is seconds; either way
//!    the request must be within ±`window` seconds of our clock.
//!
//! If Huawei's seller demo project shows otherwise, change [`canonical_request`],
//! [`request_signature`] or [`timestamp_ms`].
//!
//! The legacy style (§4.2, sellers onboarded earlier) is [`legacy_verify`]: `authToken` and
//! `timeStamp` among the request's parameters, wherever those arrive (a GET query string,
//! or the fields of a JSON POST body, or both):
//! ```text
//! authToken = base64(HMAC_SHA256(key + timeStamp, "a=1&b=2&...&timeStamp=..."))
//! ```
//! over every parameter but `authToken`, sorted by name, values decoded.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn hex_lower(b: &[u8]) -> String {
    kooagent_core::license::format::hex(b)
}

/// The string the outer HMAC signs.
pub fn canonical_request(key: &[u8], nonce: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut c = key.to_vec();
    c.extend_from_slice(nonce.as_bytes());
    c.extend_from_slice(timestamp.as_bytes());
    c.extend_from_slice(hex_lower(&hmac(key, body)).as_bytes());
    c
}

/// The `signature` query parameter the marketplace sends for `body` (lower-case hex).
pub fn request_signature(key: &[u8], nonce: &str, timestamp: &str, body: &[u8]) -> String {
    hex_lower(&hmac(key, &canonical_request(key, nonce, timestamp, body)))
}

/// The `timestamp` parameter in milliseconds (see the module comment for the unit).
pub fn timestamp_ms(timestamp: &str) -> Option<i64> {
    if timestamp.is_empty()
        || timestamp.len() > 16
        || !timestamp.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let v: i64 = timestamp.parse().ok()?;
    Some(if timestamp.len() >= 12 { v } else { v * 1000 })
}

/// Why a request was refused (`000001`). The text goes to the log and to `resultMsg`;
/// it never contains the key or the expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing parameter {0}")]
    Missing(&'static str),
    #[error("timeStamp {0:?} is not yyyyMMddHHmmssSSS (UTC)")]
    BadTimeStamp(String),
    #[error("authToken does not match")]
    BadToken,
    #[error("timestamp {0:?} is not a Unix time in milliseconds")]
    BadTimestamp(String),
    #[error("timestamp is {0} s away from the server's clock (allowed: {1} s)")]
    Skew(i64, i64),
    #[error("nonce must be 1 to 128 printable ASCII characters")]
    BadNonce,
    #[error("signature does not match")]
    BadSignature,
    #[error("nonce already used (replayed request)")]
    Replay,
}

/// The authentication parameters of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub signature: Option<String>,
    pub timestamp: Option<String>,
    pub nonce: Option<String>,
}

impl Params {
    /// From the URL query string (`a=b&c=d`, percent-decoded).
    pub fn from_query(query: Option<&str>) -> Params {
        let mut p = Params {
            signature: None,
            timestamp: None,
            nonce: None,
        };
        for pair in query.unwrap_or("").split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "signature" => p.signature = Some(v),
                "timestamp" => p.timestamp = Some(v),
                "nonce" => p.nonce = Some(v),
                _ => {}
            }
        }
        p
    }
}

/// Every `name=value` pair of a query string, percent-decoded, in order.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The legacy `timeStamp` (`yyyyMMddHHmmssSSS`, UTC; 13 digits are Unix milliseconds) in
/// Unix milliseconds.
pub fn legacy_timestamp_ms(t: &str) -> Option<i64> {
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match t.len() {
        17 => {
            let secs = kooagent_core::clock::parse_digits14(&t[..14])?;
            Some(secs * 1000 + t[14..].parse::<i64>().ok()?)
        }
        13 => t.parse().ok(),
        _ => None,
    }
}

/// The `authToken` (§4.2) for a request's parameters (`authToken` itself is left out).
pub fn legacy_token(key: &[u8], params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> =
        params.iter().filter(|(k, _)| k != "authToken").collect();
    sorted.sort();
    let text = sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let time = params
        .iter()
        .find(|(k, _)| k == "timeStamp")
        .map_or("", |(_, v)| v.as_str());
    let mut hkey = key.to_vec();
    hkey.extend_from_slice(time.as_bytes());
    STANDARD.encode(hmac(&hkey, text.as_bytes()))
}

/// Checks a legacy-signed request (§4.2): returns the string to remember as its nonce
/// (the token: the same request twice is a replay).
pub fn legacy_verify(
    key: &[u8],
    params: &[(String, String)],
    now_ms: i64,
    window_secs: i64,
) -> Result<String, AuthError> {
    let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let token = get("authToken").ok_or(AuthError::Missing("authToken"))?;
    let time = get("timeStamp").ok_or(AuthError::Missing("timeStamp"))?;
    let ts = legacy_timestamp_ms(time).ok_or_else(|| AuthError::BadTimeStamp(time.into()))?;
    let skew = (ts - now_ms) / 1000;
    if skew.abs() > window_secs {
        return Err(AuthError::Skew(skew, window_secs));
    }
    let want = legacy_token(key, params);
    if !constant_time_eq(want.as_bytes(), token.as_bytes()) {
        return Err(AuthError::BadToken);
    }
    Ok(format!("authToken:{token}"))
}

fn percent_decode(s: &str) -> String {
    let hexval = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hexval(b[i + 1]), hexval(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks everything but the nonce's freshness (that needs the database): returns the
/// nonce to remember.
pub fn verify(
    key: &[u8],
    p: &Params,
    body: &[u8],
    now_ms: i64,
    window_secs: i64,
) -> Result<String, AuthError> {
    let signature = p
        .signature
        .as_deref()
        .ok_or(AuthError::Missing("signature"))?;
    let timestamp = p
        .timestamp
        .as_deref()
        .ok_or(AuthError::Missing("timestamp"))?;
    let nonce = p.nonce.as_deref().ok_or(AuthError::Missing("nonce"))?;
    let ts = timestamp_ms(timestamp).ok_or_else(|| AuthError::BadTimestamp(timestamp.into()))?;
    let skew = (ts - now_ms) / 1000;
    if skew.abs() > window_secs {
        return Err(AuthError::Skew(skew, window_secs));
    }
    if nonce.is_empty() || nonce.len() > 128 || !nonce.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::BadNonce);
    }
    let want = request_signature(key, nonce, timestamp, body);
    let got = signature.to_ascii_lowercase();
    if !constant_time_eq(want.as_bytes(), got.as_bytes()) {
        return Err(AuthError::BadSignature);
    }
    Ok(nonce.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Body-Sign` header value for a response body (§4.3).
pub fn body_sign(key: &[u8], body: &[u8]) -> String {
    format!(
        "sign_type=\"HMAC-SHA256\", signature=\"{}\"",
        STANDARD.encode(hmac(key, body))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"interconnection-key";

    fn params(sig: &str, ts: &str, nonce: &str) -> Params {
        Params {
            signature: Some(sig.into()),
            timestamp: Some(ts.into()),
            nonce: Some(nonce.into()),
        }
    }

    #[test]
    fn signature_recipe() {
        let body = br#"{"activity":"getLicense"}"#;
        // Independent computation of the documented recipe.
        let inner = hex_lower(&hmac(KEY, body));
        let canon = format!("interconnection-keyN11680508066618{inner}");
        let want = hex_lower(&hmac(KEY, canon.as_bytes()));
        assert_eq!(request_signature(KEY, "N1", "1680508066618", body), want);
        assert_eq!(want.len(), 64);
        let now = 1_680_508_066_618 + 30_000;
        let ok = verify(
            KEY,
            &params(&want.to_uppercase(), "1680508066618", "N1"),
            body,
            now,
            60,
        );
        assert_eq!(ok, Ok("N1".into()), "upper-case hex is accepted");
        // Seconds are accepted too.
        let s = request_signature(KEY, "N2", "1680508066", body);
        assert!(verify(KEY, &params(&s, "1680508066", "N2"), body, now, 60).is_ok());
    }

    #[test]
    fn refusals_are_named() {
        let body = b"{}";
        let now = 1_700_000_000_000;
        let ts = now.to_string();
        let sig = request_signature(KEY, "n", &ts, body);
        assert_eq!(
            verify(KEY, &params(&sig, &ts, "n"), b"{} ", now, 60),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(b"other", &params(&sig, &ts, "n"), body, now, 60),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(KEY, &params(&sig, &ts, "n"), body, now + 61_000, 60),
            Err(AuthError::Skew(-61, 60))
        );
        assert!(verify(KEY, &params(&sig, &ts, "n"), body, now - 59_000, 60).is_ok());
        assert_eq!(
            verify(KEY, &params(&sig, "12x", "n"), body, now, 60),
            Err(AuthError::BadTimestamp("12x".into()))
        );
        let mut p = params(&sig, &ts, "n");
        p.nonce = None;
        assert_eq!(
            verify(KEY, &p, body, now, 60),
            Err(AuthError::Missing("nonce"))
        );
        assert_eq!(
            verify(KEY, &params(&sig, &ts, "a b"), body, now, 60),
            Err(AuthError::BadNonce)
        );
    }

    #[test]
    fn legacy_token_recipe() {
        let params: Vec<(String, String)> = [
            ("timeStamp", "20261130093015123"),
            ("activity", "getLicense"),
            ("orderId", "CS1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // Independent computation: sorted by name, key + timeStamp as the HMAC key.
        let want = STANDARD.encode(hmac(
            b"interconnection-key20261130093015123",
            b"activity=getLicense&orderId=CS1&timeStamp=20261130093015123",
        ));
        assert_eq!(legacy_token(KEY, &params), want);
        let now = 1_796_031_015_123; // 2026-11-30T09:30:15.123Z
        assert_eq!(legacy_timestamp_ms("20261130093015123"), Some(now));
        let mut signed = params.clone();
        signed.push(("authToken".into(), want.clone()));
        assert_eq!(
            legacy_verify(KEY, &signed, now + 5_000, 60),
            Ok(format!("authToken:{want}"))
        );
        assert_eq!(
            legacy_verify(b"other", &signed, now, 60),
            Err(AuthError::BadToken)
        );
        assert_eq!(
            legacy_verify(KEY, &signed, now + 120_000, 60),
            Err(AuthError::Skew(-120, 60))
        );
        assert_eq!(
            legacy_verify(KEY, &params, now, 60),
            Err(AuthError::Missing("authToken"))
        );
        assert_eq!(legacy_timestamp_ms("2026-11-30"), None);
    }

    #[test]
    fn query_and_body_sign() {
        let p = Params::from_query(Some("signature=AB&timestamp=1&nonce=x%2By&other=1"));
        assert_eq!(p, params("AB", "1", "x+y"));
        assert_eq!(Params::from_query(None).signature, None);
        assert_eq!(percent_decode("%zz%4é%"), "%zz%4é%");
        let h = body_sign(KEY, b" {\"resultCode\":\"000000\"}\t");
        let want = STANDARD.encode(hmac(KEY, b" {\"resultCode\":\"000000\"}\t"));
        assert_eq!(
            h,
            format!("sign_type=\"HMAC-SHA256\", signature=\"{want}\"")
        );
    }
}
