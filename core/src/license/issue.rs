//! Issuing a license: the seller's request (`kooagent-seller issue`, the seller server's
//! activities, the bench) turned into a canonical [`License`] and signed. The same request
//! gives the same bytes; the id, when not given, is derived from the other fields.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use super::format::{self, License};

/// A request the rules refuse; the message names the flag (`--device-code`, `--days`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

/// How long a license runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    Days(u64),
    Until(i64),
    Perpetual,
}

/// Everything `seller issue` takes. The same request gives the same license bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// `None`: derived from the other fields (so a resent request gets the same id).
    pub id: Option<String>,
    pub product: String,
    pub instance: String,
    pub devices: Vec<String>,
    pub unbound: bool,
    pub issued_at: i64,
    /// `None`: the issue time.
    pub not_before: Option<i64>,
    pub term: Term,
    pub grace_secs: u64,
    pub features: Vec<String>,
    pub limits: BTreeMap<String, u64>,
    pub meta: BTreeMap<String, String>,
}

/// Parses `name=value` pairs (`--limit cores=8`, `--meta order=CS1`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not name=value"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// Builds the license for a request (not yet signed). Device codes are canonicalised;
/// features and devices are sorted, so the order of flags does not change the bytes.
pub fn build(req: &IssueRequest) -> Result<License, IssueError> {
    let mut devices = Vec::new();
    for d in &req.devices {
        let code = crate::device_code::parse_code(d)
            .map_err(|e| IssueError(format!("--device-code: {e}")))?;
        devices.push(code);
    }
    devices.sort();
    devices.dedup();
    if req.unbound && !devices.is_empty() {
        return Err(IssueError(
            "--unbound and --device-code exclude each other".into(),
        ));
    }
    if !req.unbound && devices.is_empty() {
        return Err(IssueError(
            "give at least one --device-code, or --unbound for a license valid on any device"
                .into(),
        ));
    }
    let mut features = req.features.clone();
    features.sort();
    features.dedup();
    let not_before = req.not_before.unwrap_or(req.issued_at);
    let not_after = match req.term {
        Term::Perpetual => None,
        Term::Until(t) => Some(t),
        Term::Days(d) => {
            if d == 0 || d > 100 * 366 {
                return Err(IssueError("--days must be 1..36600".into()));
            }
            Some(not_before + d as i64 * 86_400)
        }
    };
    let mut lic = License {
        key_id: "0000000000000000".into(),
        id: String::new(),
        product: req.product.clone(),
        instance: req.instance.clone(),
        unbound: req.unbound,
        devices,
        not_before,
        not_after,
        grace_secs: req.grace_secs,
        features,
        limits: req.limits.clone(),
        issued_at: req.issued_at,
        meta: req.meta.clone(),
    };
    lic.id = match &req.id {
        Some(id) => id.clone(),
        None => derived_id(&lic),
    };
    // Validate everything now, with the format's own rules and messages.
    format::check_fields(&lic).map_err(|e| IssueError(e.to_string()))?;
    Ok(lic)
}

fn derived_id(lic: &License) -> String {
    let material = serde_json::json!([
        lic.product,
        lic.instance,
        lic.unbound,
        lic.devices,
        lic.not_before,
        lic.not_after,
        lic.grace_secs,
        lic.features,
        lic.limits,
        lic.issued_at,
        lic.meta
    ]);
    let digest = Sha256::digest(material.to_string().as_bytes());
    format!("L-{}", &format::hex(&digest)[..20])
}

/// Issues: builds and signs.
pub fn issue(req: &IssueRequest, key: &SigningKey) -> Result<String, IssueError> {
    let lic = build(req)?;
    format::sign_checked(lic, key).map_err(|e| IssueError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> IssueRequest {
        IssueRequest {
            id: None,
            product: "sku".into(),
            instance: "inst".into(),
            devices: vec![CODE.to_lowercase()],
            unbound: false,
            issued_at: 1_800_000_000,
            not_before: None,
            term: Term::Days(30),
            grace_secs: 0,
            features: vec!["b".into(), "a".into()],
            limits: BTreeMap::new(),
            meta: BTreeMap::new(),
        }
    }

    /// A device code with a valid check symbol.
    static CODE: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::testing::test_code("ABCD"));

    #[test]
    fn same_request_same_bytes_and_derived_id() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let a = issue(&req(), &key).unwrap();
        let mut r = req();
        r.features.reverse();
        assert_eq!(a, issue(&r, &key).unwrap(), "flag order does not matter");
        let p = format::parse(a.as_bytes()).unwrap();
        assert!(p.license.id.starts_with("L-"));
        assert_eq!(p.license.devices, vec![CODE.as_str()]);
        assert_eq!(p.license.not_after, Some(1_800_000_000 + 30 * 86_400));
        r.issued_at += 1;
        assert_ne!(
            format::parse(issue(&r, &key).unwrap().as_bytes())
                .unwrap()
                .license
                .id,
            p.license.id
        );
    }

    #[test]
    fn bad_requests_are_named() {
        let mut r = req();
        r.devices = vec!["nope".into()];
        assert!(build(&r).unwrap_err().to_string().contains("--device-code"));
        let mut r = req();
        r.devices.clear();
        assert!(build(&r).unwrap_err().to_string().contains("--unbound"));
        let mut r = req();
        r.term = Term::Until(r.issued_at - 1);
        assert!(build(&r).unwrap_err().to_string().contains("not_after"));
        assert!(parse_pair("cores").is_err());
        assert_eq!(parse_pair("cores=8").unwrap(), ("cores".into(), "8".into()));
    }
}
