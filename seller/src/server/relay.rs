//! The relay for authorization-code products (docs/seller-server.md "Relay"): agents
//! hold no AK/SK; they post the open-API body to `POST /v1/authcode/{activate,heartbeat,
//! usage}` signed with their ed25519 device key, and the server forwards it to KooGallery
//! signed with the seller's AK/SK, answering the marketplace's body unchanged.
//!
//! - [`verify`]: the device signature, byte for byte as the relay protocol says (the
//!   agent's signer lives on the agent side; the lead moves both into
//!   `authcode::relay_auth` at merge);
//! - [`parse_body`]: the body checked with the `authcode::api` types, re-serialised for
//!   forwarding (only documented fields reach the marketplace);
//! - [`gate`] / [`bind`]: nonce replay and trust on first use, inside a DB transaction;
//! - [`Relay`]: the forwarding client and its AK/SK.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::db::{CodeRow, DbError, Tx};
use super::limits::{self, LimitsConfig, Rate};
use kooagent_core::authcode::api::{self, ActivateRequest, HeartbeatRequest, UsageRequest};
use kooagent_core::authcode::apig_sign::AkSk;
use kooagent_core::authcode::relay_auth::{self, RelayAuthError, RelayHeaders};
use kooagent_core::clock::Clock;
use kooagent_edge::marketplace::{Client, ClientError};

pub const PREFIX: &str = "/v1/authcode/";
/// How far a request's `x-kooagent-ts` may be from our clock (the protocol's window).
pub const WINDOW_SECS: i64 = relay_auth::WINDOW_MS / 1000;

/// `error_code`s of the relay's own answers.
pub const ERR_BAD_REQUEST: &str = "KOOAGENT.RELAY.0400";
pub const ERR_UNAUTHENTICATED: &str = "KOOAGENT.RELAY.0401";
pub const ERR_FORBIDDEN: &str = "KOOAGENT.RELAY.0403";
pub const ERR_LIMITED: &str = "KOOAGENT.RELAY.0429";
pub const ERR_BUSY: &str = "KOOAGENT.RELAY.0503";
/// The seller's enrollment token, for a device key the server does not know yet.
pub const HEADER_ENROLLMENT: &str = kooagent_core::authcode::relay_auth::HEADER_ENROLLMENT;
pub const ERR_UNREACHABLE: &str = "KOOAGENT.RELAY.0502";

/// Each host gets this long before the next is tried (the agent waits for the relay).
const MARKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The three endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Activate,
    Heartbeat,
    Usage,
}

impl Endpoint {
    /// From the part of the path after [`PREFIX`].
    /// The `endpoint` label of `kooagent_seller_relay_calls_total`.
    pub fn metrics_name(self) -> &'static str {
        match self {
            Endpoint::Activate => "authcode_activate",
            Endpoint::Heartbeat => "authcode_heartbeat",
            Endpoint::Usage => "authcode_usage",
        }
    }

    pub fn from_name(name: &str) -> Option<Endpoint> {
        match name {
            "activate" => Some(Endpoint::Activate),
            "heartbeat" => Some(Endpoint::Heartbeat),
            "usage" => Some(Endpoint::Usage),
            _ => None,
        }
    }

    /// The marketplace's open API it forwards to.
    pub fn market_path(self) -> &'static str {
        match self {
            Endpoint::Activate => api::PATH_ACTIVATE,
            Endpoint::Heartbeat => api::PATH_HEARTBEAT,
            Endpoint::Usage => api::PATH_USAGE,
        }
    }
}

/// An authenticated request's device: its key (base64, as sent) and nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub key: String,
    pub nonce: String,
}

/// Checks the four headers (`header(name)` gives a header's value) against the request,
/// with the protocol's own verifier (`authcode::relay_auth`, shared with the agent). The
/// nonce is checked afterwards, in the database transaction (`gate`), so replicas share it.
pub fn verify<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<Device, RelayAuthError> {
    let headers = RelayHeaders::from_lookup(header)?;
    relay_auth::verify(&headers, method, path, body, now_ms, |_| true)?;
    Ok(Device::from(headers))
}

/// [`verify`] with the device keys kept decompressed in `keys` and the signature checked
/// by `signatures` together with other requests' (`sig_batch`): the same checks in the
/// same order with the same errors.
pub async fn verify_batched<'a>(
    keys: &super::key_cache::KeyCache,
    signatures: &super::sig_batch::BatchVerifier,
    header: impl Fn(&str) -> Option<&'a str>,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<Device, RelayAuthError> {
    let headers = RelayHeaders::from_lookup(header)?;
    let unverified = relay_auth::prepare(&headers, |k| keys.parse(k), method, path, body, now_ms)?;
    if !signatures.verify(unverified).await {
        return Err(RelayAuthError::BadSignature);
    }
    Ok(Device::from(headers))
}

impl From<RelayHeaders> for Device {
    fn from(h: RelayHeaders) -> Device {
        Device {
            key: h.device_key,
            nonce: h.nonce,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    license: String,
    #[serde(default)]
    real_effect_time: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    license: String,
}

/// The codes a request is about and the body to forward, or why it is refused.
pub fn parse_body(ep: Endpoint, body: &[u8]) -> Result<(Vec<String>, Vec<u8>), String> {
    let json = |e: serde_json::Error| format!("the body is not a valid {ep:?} request: {e}");
    match ep {
        Endpoint::Activate => {
            let b: ActivateBody = serde_json::from_slice(body).map_err(json)?;
            let effect = match &b.real_effect_time {
                None => None,
                Some(t) => Some(
                    kooagent_core::clock::parse_digits14(t)
                        .ok_or_else(|| format!("real_effect_time: {t:?} is not yyyyMMddHHmmss"))?,
                ),
            };
            let req = ActivateRequest::new(&b.license, effect).map_err(|e| e.to_string())?;
            Ok((
                vec![req.license.clone()],
                serde_json::to_vec(&req).expect("request types serialise"),
            ))
        }
        Endpoint::Heartbeat => {
            let b: HeartbeatBody = serde_json::from_slice(body).map_err(json)?;
            let req = HeartbeatRequest::new(&b.license).map_err(|e| e.to_string())?;
            Ok((
                vec![req.license.clone()],
                serde_json::to_vec(&req).expect("request types serialise"),
            ))
        }
        Endpoint::Usage => {
            let req: UsageRequest = serde_json::from_slice(body).map_err(json)?;
            req.validate().map_err(|e| e.to_string())?;
            let codes = req.usage_info.iter().map(|u| u.license.clone()).collect();
            Ok((
                codes,
                serde_json::to_vec(&req).expect("request types serialise"),
            ))
        }
    }
}

/// Which queue a forwarded call waits in: devices already bound (a license fetched, a
/// code activated) before devices that only enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Bound,
    Enrolled,
}

/// What the transaction decided before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Forward. `claimed`: this activation just recorded the caller as the code's
    /// activator (undone if the marketplace refuses it).
    Forward {
        claimed: bool,
        priority: Priority,
    },
    Replay,
    Forbidden(String),
    /// A device key the server does not know (no binding, no enrollment).
    Unknown(String),
    /// Over a rate limit: the bucket's name.
    Limited(String),
}

/// The nonces table is shared with the marketplace's: ours are prefixed.
fn nonce_key(nonce: &str) -> String {
    format!("relay:{nonce}")
}

/// The buckets a forwarded call draws from: per device key, per source address, global.
pub fn buckets(device: &Device, address: &str, limits: &LimitsConfig) -> Vec<(String, Rate)> {
    vec![
        (format!("relay:key:{}", device.key), limits.relay_per_key),
        (format!("relay:addr:{address}"), limits.relay_per_address),
        ("relay:all".to_string(), limits.relay_global),
    ]
}

/// An enrollment token as stored: lowercase hex SHA-256 (the token itself is never kept).
pub fn enrollment_hash(token: &str) -> String {
    use sha2::Digest;
    relay_auth::hex(&sha2::Sha256::digest(token.trim().as_bytes()))
}

/// Whether the relay may spend anything for `key`: bound already, enrolled already, or
/// enrolling now with a valid token that has quota left (which enrolls it).
fn known(
    tx: &mut dyn Tx,
    key: &str,
    enrollment: Option<&str>,
    now: i64,
) -> Result<Result<Priority, String>, DbError> {
    if tx.key_bound(key)? {
        return Ok(Ok(Priority::Bound));
    }
    if tx.key_enrolled(key)? {
        return Ok(Ok(Priority::Enrolled));
    }
    let Some(hash) = enrollment else {
        return Ok(Err(format!(
            "unknown device key: fetch a license from this server first, or enroll with the \
             seller's enrollment token ({HEADER_ENROLLMENT})"
        )));
    };
    match tx.enrollment(hash)? {
        Some(mut e) if !e.revoked && e.used < e.quota => {
            e.used += 1;
            tx.put_enrollment(&e)?;
            tx.put_enrolled_key(key, hash, now)?;
            log::info!(
                "relay: device key {key} enrolled with token {:?} ({}/{})",
                e.label,
                e.used,
                e.quota
            );
            Ok(Ok(Priority::Enrolled))
        }
        Some(e) if e.revoked => Ok(Err(format!("enrollment token {:?} was revoked", e.label))),
        Some(e) => Ok(Err(format!(
            "enrollment token {:?} has no quota left ({} devices enrolled)",
            e.label, e.used
        ))),
        None => Ok(Err("unknown enrollment token".into())),
    }
}

/// Records the nonce; checks the device key is known (see [`known`]) and every code is
/// bound to it (activate: or to nobody yet); takes a token from each of `buckets`; and,
/// for the activation of an unbound code, records the caller as its activator before
/// anything is forwarded. A call refused anyway costs no token.
pub fn gate(
    tx: &mut dyn Tx,
    ep: Endpoint,
    codes: &[String],
    device: &Device,
    enrollment: Option<&str>,
    buckets: &[(String, Rate)],
    now_ms: i64,
) -> Result<Gate, DbError> {
    let now = now_ms.div_euclid(1000);
    if !tx.nonce_fresh(&nonce_key(&device.nonce), now)? {
        return Ok(Gate::Replay);
    }
    let priority = match known(tx, &device.key, enrollment, now)? {
        Ok(p) => p,
        Err(m) => return Ok(Gate::Unknown(m)),
    };
    let mut unbound = Vec::new();
    for code in codes {
        match tx.code(code)?.and_then(|r| r.device_key) {
            Some(k) if k == device.key => {}
            Some(_) => {
                return Ok(Gate::Forbidden(format!(
                    "authorization code {code} is bound to another device"
                )))
            }
            None if ep == Endpoint::Activate => unbound.push(code),
            None => {
                return Ok(Gate::Forbidden(format!(
                    "authorization code {code} was not activated through this relay"
                )))
            }
        }
    }
    if let Some(b) = limits::take_all(tx, buckets, now_ms)? {
        return Ok(Gate::Limited(b));
    }
    for code in &unbound {
        bind(tx, code, &device.key, now)?;
    }
    Ok(Gate::Forward {
        claimed: !unbound.is_empty(),
        priority,
    })
}

/// Records `device_key` as the code's activator unless one is recorded; false when
/// another key is.
pub fn bind(tx: &mut dyn Tx, code: &str, device_key: &str, now: i64) -> Result<bool, DbError> {
    let mut row = tx.code(code)?.unwrap_or(CodeRow {
        code: code.into(),
        status: "active".into(),
        frozen: false,
        expire_at: None,
        seq: 0,
        updated_at: now,
        device_key: None,
    });
    match &row.device_key {
        Some(k) => Ok(k == device_key),
        None => {
            row.device_key = Some(device_key.into());
            row.updated_at = now;
            tx.put_code(&row)?;
            log::info!("relay: authorization code {code} bound to device key {device_key}");
            Ok(true)
        }
    }
}

/// Undoes this request's claim: the marketplace refused the activation, so the code is
/// free for its buyer's device.
pub fn unclaim(tx: &mut dyn Tx, code: &str, device_key: &str, now: i64) -> Result<(), DbError> {
    if let Some(mut row) = tx.code(code)? {
        if row.device_key.as_deref() == Some(device_key) {
            row.device_key = None;
            row.updated_at = now;
            tx.put_code(&row)?;
        }
    }
    Ok(())
}

/// What the relay does with the marketplace's answer to an activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterActivate {
    /// Answer it as it is.
    Pass,
    /// The marketplace refused: undo the claim, answer as it is.
    Unclaim,
    /// `92020003` for a code activated elsewhere (not by this key through this server):
    /// undo the claim, answer without `data`.
    UnclaimStripped,
    /// `92020003` and this key was the recorded activator before this request: the
    /// earlier answer was lost; query the code.
    Recover,
}

/// Decides, from the answer's HTTP status and body, and whether this request claimed the
/// code.
pub fn after_activate(http: u16, body: &str, claimed: bool) -> AfterActivate {
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error_code"].as_str().map(str::to_string));
    match code.as_deref() {
        Some(api::SUCCESS) if (200..300).contains(&http) => AfterActivate::Pass,
        Some("92020003") if !claimed => AfterActivate::Recover,
        Some("92020003") => AfterActivate::UnclaimStripped,
        _ if claimed => AfterActivate::Unclaim,
        _ => AfterActivate::Pass,
    }
}

/// The marketplace's answer without `data` (order and product ids stay with the buyer).
pub fn strip_data(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("data");
            serde_json::Value::Object(m).to_string()
        }
        _ => error_body("92020003", "the code is already activated"),
    }
}

/// The activate-success answer rebuilt from a query's answer (`data` of the heartbeat
/// API), marked `kooagent_recovered` (docs/authorization-codes.md "Recovery"); None when
/// the code is not ALIVE or the answer is not a query success.
pub fn recovered_answer(code: &str, http: u16, query_body: &str) -> Option<String> {
    let info = api::parse_heartbeat(http, query_body).ok()?;
    if info.status != api::CodeStatus::Alive || info.license_code != code {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(query_body).ok()?;
    let data = &v["data"];
    let mut ci = serde_json::Map::new();
    ci.insert("license_code".into(), code.into());
    ci.insert("status".into(), "ALIVE".into());
    for k in ["expire_time", "product_id", "order_id", "amount"] {
        if !data[k].is_null() {
            ci.insert(k.into(), data[k].clone());
        }
    }
    Some(
        serde_json::json!({
            "error_code": api::SUCCESS,
            "error_msg": "success",
            "data": {"license_code_info": serde_json::Value::Object(ci).to_string()},
            "kooagent_recovered": true,
        })
        .to_string(),
    )
}

/// What the console's codes page keeps of a forwarded call (`code_activity`): for a daily
/// query, the status the marketplace answered (or its error); for a usage report, the
/// entries per code and the marketplace's verdict. Activations are not kept here (the
/// code's row holds its binding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeNote {
    Query {
        code: String,
        status: String,
    },
    Usage {
        code: String,
        entries: i64,
        result: String,
    },
}

pub fn code_notes(
    ep: Endpoint,
    codes: &[String],
    forward: &[u8],
    http: u16,
    answer: &str,
) -> Vec<CodeNote> {
    let short = |e: String| -> String { e.chars().take(200).collect() };
    match ep {
        Endpoint::Activate => vec![],
        Endpoint::Heartbeat => {
            let status = match api::parse_heartbeat(http, answer) {
                Ok(info) => match info.status {
                    api::CodeStatus::Alive => "ALIVE".to_string(),
                    api::CodeStatus::Expired => "EXPIRED".to_string(),
                    api::CodeStatus::Released => "RELEASED".to_string(),
                    api::CodeStatus::Other(o) => o,
                },
                Err(e) => short(format!("error: {e}")),
            };
            codes
                .iter()
                .map(|c| CodeNote::Query {
                    code: c.clone(),
                    status: status.clone(),
                })
                .collect()
        }
        Endpoint::Usage => {
            let result = match api::parse_usage(http, answer) {
                Ok(()) => "accepted".to_string(),
                Err(e) => short(format!("error: {e}")),
            };
            let Ok(req) = serde_json::from_slice::<UsageRequest>(forward) else {
                return vec![];
            };
            req.usage_info
                .iter()
                .map(|u| CodeNote::Usage {
                    code: u.license.clone(),
                    entries: u.software_usage_info.len() as i64,
                    result: result.clone(),
                })
                .collect()
        }
    }
}

/// Writes [`code_notes`] (the caller's transaction).
pub fn record_notes(tx: &mut dyn Tx, notes: &[CodeNote], now: i64) -> Result<(), DbError> {
    for n in notes {
        match n {
            CodeNote::Query { code, status } => tx.note_code_query(code, now, status)?,
            CodeNote::Usage {
                code,
                entries,
                result,
            } => tx.note_code_usage(code, now, *entries, result)?,
        }
    }
    Ok(())
}

/// The relay's own JSON answer body.
pub fn error_body(code: &str, msg: &str) -> String {
    serde_json::json!({"error_code": code, "error_msg": msg}).to_string()
}

/// The forwarding side: the seller's AK/SK and the marketplace hosts.
pub struct Relay {
    pub client: Client,
    /// The marketplace workers and their queue.
    pub pool: super::pool::Pool,
}

/// Reads `[seller_server] aksk_file`: two lines, the AK then the SK, mode 0600. Errors
/// name the file, never its content.
pub fn load_aksk(path: &Path) -> Result<AkSk, String> {
    let key = "seller_server.aksk_file";
    let secret = kooagent_edge::secret::Secret::load_as(path, key)?;
    let text = std::str::from_utf8(secret.expose())
        .map_err(|_| format!("{key} {}: not UTF-8 text", path.display()))?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    match lines.as_slice() {
        [ak, sk] if !ak.is_empty() && !sk.is_empty() => Ok(AkSk::new(*ak, sk.as_bytes())),
        _ => Err(format!(
            "{key} {}: must hold two non-empty lines, the AK then the SK",
            path.display()
        )),
    }
}

impl Relay {
    pub fn new(
        cfg: &super::SellerServerConfig,
        extra_ca: Option<&Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Relay, String> {
        let key = load_aksk(&cfg.aksk_file)?;
        let client = Client::new(
            &cfg.marketplace_bases,
            extra_ca,
            "seller_server.marketplace_extra_ca_file",
            MARKET_TIMEOUT,
            key,
            clock,
        )
        .map_err(|e| match e {
            ClientError::Config(m) => format!("seller_server.marketplace_bases: {m}"),
            e => e.to_string(),
        })?;
        let pool = super::pool::Pool::new(
            cfg.relay_workers,
            cfg.relay_queue,
            Duration::from_secs(cfg.relay_queue_wait_secs),
        );
        Ok(Relay { client, pool })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::{self, Db};
    use base64::Engine;
    use ed25519_dalek::{Signer, SigningKey};
    use kooagent_core::authcode::relay_auth::{
        HEADER_DEVICE_KEY, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TS,
    };

    const NOW: i64 = 1_800_000_000_000;

    fn headers(
        sk: &SigningKey,
        path: &str,
        ts: i64,
        nonce: &str,
        body: &[u8],
    ) -> Vec<(String, String)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let ts = ts.to_string();
        let sig = sk.sign(&relay_auth::signing_bytes("POST", path, &ts, nonce, body));
        vec![
            (
                HEADER_DEVICE_KEY.into(),
                b64.encode(sk.verifying_key().as_bytes()),
            ),
            (HEADER_TS.into(), ts),
            (HEADER_NONCE.into(), nonce.into()),
            (HEADER_SIGNATURE.into(), b64.encode(sig.to_bytes())),
        ]
    }

    fn check(
        h: &[(String, String)],
        path: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Device, RelayAuthError> {
        verify(
            |n| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str()),
            "POST",
            path,
            body,
            now,
        )
    }

    #[test]
    fn the_signed_bytes_are_the_protocols() {
        let m = relay_auth::signing_bytes(
            "POST",
            "/v1/authcode/activate",
            "1700000000000",
            "00ff",
            b"{}",
        );
        assert_eq!(
            String::from_utf8(m).unwrap(),
            "kooagent-relay-v1\nPOST\n/v1/authcode/activate\n1700000000000\n00ff\n\
             44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn signatures_times_and_headers_are_checked() {
        let sk = SigningKey::from_bytes(&[7; 32]);
        let (path, body, nonce) = (
            "/v1/authcode/heartbeat",
            br#"{"license":"C"}"#,
            "0123456789abcdef0123456789abcdef",
        );
        let h = headers(&sk, path, NOW, nonce, body);
        let d = check(&h, path, body, NOW + 299_000).unwrap();
        assert_eq!(d.nonce, nonce.to_ascii_lowercase());
        assert_eq!(d.key, h[0].1);
        // Another body, path, or a time outside the window.
        assert_eq!(
            check(&h, path, br#"{"license":"D"}"#, NOW),
            Err(RelayAuthError::BadSignature)
        );
        assert_eq!(
            check(&h, "/v1/authcode/usage", body, NOW),
            Err(RelayAuthError::BadSignature)
        );
        assert!(matches!(
            check(&h, path, body, NOW + 301_000),
            Err(RelayAuthError::Stale { skew_ms: -301_000 })
        ));
        assert!(matches!(
            check(&h, path, body, NOW - 301_000),
            Err(RelayAuthError::Stale { .. })
        ));
        // Another key's signature under this key.
        let other = SigningKey::from_bytes(&[8; 32]);
        let mut h2 = headers(&other, path, NOW, nonce, body);
        h2[0] = h[0].clone();
        assert_eq!(
            check(&h2, path, body, NOW),
            Err(RelayAuthError::BadSignature)
        );
        for (i, bad, want) in [
            (0, "AAAA", HEADER_DEVICE_KEY),
            (1, "12x", HEADER_TS),
            (2, "0123", HEADER_NONCE),
            (2, "0123456789abcdef0123456789abcdeg", HEADER_NONCE),
            (3, "!!", HEADER_SIGNATURE),
        ] {
            let mut h3 = h.clone();
            h3[i].1 = bad.into();
            assert!(
                matches!(check(&h3, path, body, NOW), Err(RelayAuthError::BadHeader { header, .. }) if header == want),
                "{bad}"
            );
            h3.remove(i);
            assert_eq!(
                check(&h3, path, body, NOW),
                Err(RelayAuthError::MissingHeader(want))
            );
        }
    }

    #[test]
    fn bodies_are_checked_with_the_api_types() {
        let (codes, fwd) = parse_body(
            Endpoint::Activate,
            br#"{"license":" C1 ","real_effect_time":"20260101000000"}"#,
        )
        .unwrap();
        assert_eq!(codes, ["C1"]);
        assert_eq!(
            fwd,
            br#"{"license":"C1","real_effect_time":"20260101000000"}"#
        );
        assert!(parse_body(Endpoint::Activate, br#"{"license":"C1","x":1}"#).is_err());
        assert!(parse_body(
            Endpoint::Activate,
            br#"{"license":"C1","real_effect_time":"2026"}"#
        )
        .is_err());
        assert!(parse_body(Endpoint::Heartbeat, br#"{"license":""}"#).is_err());
        let (codes, _) = parse_body(
            Endpoint::Usage,
            br#"{"usage_info":[{"license":"A","software_usage_Info":[{"id":"x"}]},{"license":"B","software_usage_Info":[{"active_num":3}]}]}"#,
        )
        .unwrap();
        assert_eq!(codes, ["A", "B"]);
        assert!(parse_body(Endpoint::Usage, br#"{"usage_info":[]}"#).is_err());
        assert!(parse_body(Endpoint::Heartbeat, b"nope").is_err());
    }

    #[test]
    fn known_keys_claim_codes_before_forwarding_and_nonces_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            let dev = |key: &str, nonce: &str| Device {
                key: key.into(),
                nonce: nonce.into(),
            };
            let run = |ep, codes: &[&str], d: Device, enroll: Option<&str>| {
                let codes: Vec<String> = codes.iter().map(|c| c.to_string()).collect();
                let enroll = enroll.map(enrollment_hash);
                db.run_blocking(move |tx| gate(tx, ep, &codes, &d, enroll.as_deref(), &[], 100_000))
                    .unwrap()
            };
            let fwd = |claimed, priority| Gate::Forward { claimed, priority };
            // An unknown key gets nothing; a token enrolls up to its quota.
            assert!(matches!(
                run(Endpoint::Activate, &["C"], dev("K1", "n0"), None),
                Gate::Unknown(_)
            ));
            db.run_blocking(|tx| {
                tx.put_enrollment(&db::EnrollmentRow {
                    token_sha256: enrollment_hash("TOKEN"),
                    label: "image-1".into(),
                    quota: 2,
                    used: 0,
                    created_at: 1,
                    revoked: false,
                })
            })
            .unwrap();
            assert!(matches!(
                run(Endpoint::Activate, &["C"], dev("K1", "n1"), Some("WRONG")),
                Gate::Unknown(_)
            ));
            // K1 enrolls and claims C before anything is forwarded.
            assert_eq!(
                run(Endpoint::Activate, &["C"], dev("K1", "n2"), Some("TOKEN")),
                fwd(true, Priority::Enrolled),
                "{name}"
            );
            assert_eq!(
                db.run_blocking(|tx| tx.code("C"))
                    .unwrap()
                    .unwrap()
                    .device_key
                    .as_deref(),
                Some("K1")
            );
            assert_eq!(
                run(Endpoint::Activate, &["C"], dev("K1", "n2"), None),
                Gate::Replay
            );
            // Its retry is not a fresh claim (a 92020003 then means: recover), and holding
            // a code makes the key bound (served first).
            assert_eq!(
                run(Endpoint::Activate, &["C"], dev("K1", "n3"), None),
                fwd(false, Priority::Bound)
            );
            assert_eq!(
                run(Endpoint::Heartbeat, &["C"], dev("K1", "n4"), None),
                fwd(false, Priority::Bound)
            );
            // K2 enrolls (quota 2 of 2) but C is K1's.
            assert!(matches!(
                run(Endpoint::Activate, &["C"], dev("K2", "n5"), Some("TOKEN")),
                Gate::Forbidden(_)
            ));
            assert_eq!(
                run(Endpoint::Heartbeat, &["D"], dev("K2", "n6"), None).clone(),
                Gate::Forbidden("authorization code D was not activated through this relay".into())
            );
            assert!(matches!(
                run(Endpoint::Activate, &["D"], dev("K3", "n7"), Some("TOKEN")),
                Gate::Unknown(m) if m.contains("quota")
            ));
            // The claim is undone when the marketplace refuses: K2 may then take D.
            assert_eq!(
                run(Endpoint::Activate, &["D"], dev("K2", "n8"), None),
                fwd(true, Priority::Enrolled)
            );
            db.run_blocking(|tx| unclaim(tx, "D", "K2", 1)).unwrap();
            assert_eq!(
                db.run_blocking(|tx| tx.code("D"))
                    .unwrap()
                    .unwrap()
                    .device_key,
                None
            );
            assert!(matches!(
                run(Endpoint::Usage, &["C", "D"], dev("K1", "n9"), None),
                Gate::Forbidden(m) if m.contains(" D ")
            ));
            // The marketplace's own nonces do not collide with the relay's.
            assert!(db.run_blocking(|tx| tx.nonce_fresh("n10", 100)).unwrap());
            assert_eq!(
                run(Endpoint::Heartbeat, &["C"], dev("K1", "n10"), None),
                fwd(false, Priority::Bound)
            );
        }
    }

    #[test]
    fn what_an_activation_answer_does_to_the_claim() {
        use AfterActivate::*;
        let ok = r#"{"error_code":"92020000","error_msg":"success"}"#;
        let again = r#"{"error_code":"92020003","error_msg":"illegal state","data":{"x":1}}"#;
        assert_eq!(after_activate(200, ok, true), Pass);
        assert_eq!(after_activate(200, again, true), UnclaimStripped);
        assert_eq!(after_activate(200, again, false), Recover);
        assert_eq!(
            after_activate(200, r#"{"error_code":"92020005"}"#, true),
            Unclaim
        );
        assert_eq!(after_activate(401, ok, true), Unclaim);
        assert_eq!(after_activate(200, "x", false), Pass);
        assert_eq!(
            strip_data(again),
            r#"{"error_code":"92020003","error_msg":"illegal state"}"#
        );
        let q = r#"{"error_code":"92020000","error_msg":"ok","data":{"license_code":"C1","status":"ALIVE","activate_time":"20260101000000","expire_time":"20270101000000","order_id":"CS1","product_id":"P1"}}"#;
        let a = recovered_answer("C1", 200, q).unwrap();
        let act = api::parse_activate(200, &a).unwrap();
        assert!(act.recovered);
        let info = act.info.unwrap();
        assert_eq!(
            (
                info.status.as_str(),
                info.order_id.as_deref(),
                info.product_id.as_deref()
            ),
            ("ALIVE", Some("CS1"), Some("P1"))
        );
        assert_eq!(recovered_answer("C2", 200, q), None);
        let expired = q.replace("ALIVE", "EXPIRED");
        assert_eq!(recovered_answer("C1", 200, &expired), None);
    }

    #[test]
    fn the_aksk_file_is_two_private_lines() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("aksk");
        std::fs::write(&p, "MYAK\nMY-SECRET-SK\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = load_aksk(&p).unwrap();
        assert_eq!((k.ak.as_str(), k.sk()), ("MYAK", &b"MY-SECRET-SK"[..]));
        for bad in ["ONLYSECRET\n", "A\nSECRET\nC\n", "A\n\n"] {
            std::fs::write(&p, bad).unwrap();
            let e = load_aksk(&p).unwrap_err();
            assert!(
                e.contains("seller_server.aksk_file") && !e.contains("SECRET"),
                "{e}"
            );
        }
        std::fs::write(&p, "MYAK\nMY-SECRET-SK\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_aksk(&p).unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("SECRET"), "{e}");
    }
}
