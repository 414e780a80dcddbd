//! The seller's side: key files and building a license from issue parameters. Used by
//! `kooagent seller keygen|issue|inspect` (and the bench); a seller's license server can
//! run the same commands, or implement docs/license-format.md itself.
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the form `openssl genpkey
//! -algorithm ed25519` and Python's `cryptography` write, so keys move freely between
//! tools. Public keys are one trust line, `<kid>:<base64>`, pasted into the agent config.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::format::{self, License};
use super::keys;

/// DER prefix of a PKCS#8 Ed25519 private key; the 32-byte seed follows (RFC 8410).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum SellerError {
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SellerError + '_ {
    move |source| SellerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A new key from the kernel's CSPRNG.
pub fn generate() -> Result<SigningKey, SellerError> {
    let seed: [u8; 32] = crate::sys::random_array()
        .map_err(|e| SellerError::Invalid(format!("getrandom failed: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn pem(label: &str, der: &[u8]) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        STANDARD.encode(der)
    )
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(b64).ok()
}

/// The private key as PKCS#8 PEM.
pub fn private_pem(key: &SigningKey) -> String {
    let mut der = PKCS8_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    pem("PRIVATE KEY", &der)
}

/// Writes `path` (private key, mode 0600) and `path.pub` (trust line). Refuses to
/// overwrite either. Returns the public key file and the trust line.
pub fn write_keypair(path: &Path) -> Result<(PathBuf, String), SellerError> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    for p in [path, pub_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(SellerError::Exists(p.to_path_buf()));
        }
    }
    let key = generate()?;
    let create = |p: &Path, mode: u32, bytes: &[u8]| -> Result<(), SellerError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => SellerError::Exists(p.to_path_buf()),
                _ => SellerError::Io {
                    path: p.to_path_buf(),
                    source: e,
                },
            })?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(io_err(p))
    };
    create(path, 0o600, private_pem(&key).as_bytes())?;
    let line = keys::entry_for(&key.verifying_key());
    if let Err(e) = create(&pub_path, 0o644, format!("{line}\n").as_bytes()) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok((pub_path, line))
}

/// Reads a private key (PKCS#8 PEM). Refuses a file others can read.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, SellerError> {
    let bad = |message: String| SellerError::BadKey {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "the private key is readable by others (mode {mode:04o}); chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let der = pem_body(&text, "PRIVATE KEY")
        .ok_or_else(|| bad("not a PEM \"PRIVATE KEY\" (PKCS#8) file".into()))?;
    match der.strip_prefix(&PKCS8_PREFIX[..]) {
        Some(seed) if seed.len() == 32 => {
            Ok(SigningKey::from_bytes(seed.try_into().expect("32 bytes")))
        }
        _ => Err(bad("not an unencrypted Ed25519 PKCS#8 key".into())),
    }
}

/// Reads a public key from a trust-line file (`<kid>:<base64>`, what keygen writes as
/// `.pub`), a PEM public key, or a private key (its public half).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, SellerError> {
    let bad = |message: String| SellerError::BadKey {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    if text.contains("-----BEGIN PRIVATE KEY-----") {
        return Ok(read_signing_key(path)?.verifying_key());
    }
    if let Some(der) = pem_body(&text, "PUBLIC KEY") {
        return match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(k) if k.len() == 32 => VerifyingKey::from_bytes(k.try_into().expect("32"))
                .map_err(|_| bad("not a valid Ed25519 public key".into())),
            _ => Err(bad("not an Ed25519 public key".into())),
        };
    }
    let entries = keys::parse_file_text(&text).map_err(bad)?;
    match entries.as_slice() {
        [(_, k)] => Ok(*k),
        [] => Err(bad("no key in the file".into())),
        _ => Err(bad("more than one key in the file".into())),
    }
}

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
pub fn build(req: &IssueRequest) -> Result<License, SellerError> {
    let mut devices = Vec::new();
    for d in &req.devices {
        let code = crate::device_code::parse_code(d)
            .map_err(|e| SellerError::Invalid(format!("--device-code: {e}")))?;
        devices.push(code);
    }
    devices.sort();
    devices.dedup();
    if req.unbound && !devices.is_empty() {
        return Err(SellerError::Invalid(
            "--unbound and --device-code exclude each other".into(),
        ));
    }
    if !req.unbound && devices.is_empty() {
        return Err(SellerError::Invalid(
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
                return Err(SellerError::Invalid("--days must be 1..36600".into()));
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
    format::payload_bytes(&lic).map_err(|e| SellerError::Invalid(e.to_string()))?;
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
pub fn issue(req: &IssueRequest, key: &SigningKey) -> Result<String, SellerError> {
    let lic = build(req)?;
    format::sign(&lic, key).map_err(|e| SellerError::Invalid(e.to_string()))
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
        std::sync::LazyLock::new(|| crate::device_code::test_code("ABCD"));

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

    #[test]
    fn keypair_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seller.key");
        let (pub_path, line) = write_keypair(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(write_keypair(&p), Err(SellerError::Exists(_))));
        let sk = read_signing_key(&p).unwrap();
        assert_eq!(keys::entry_for(&sk.verifying_key()), line);
        assert_eq!(read_verifying_key(&pub_path).unwrap(), sk.verifying_key());
        assert_eq!(read_verifying_key(&p).unwrap(), sk.verifying_key());
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(sk.verifying_key().as_bytes());
        let pem_pub = d.path().join("pub.pem");
        std::fs::write(&pem_pub, pem("PUBLIC KEY", &spki)).unwrap();
        assert_eq!(read_verifying_key(&pem_pub).unwrap(), sk.verifying_key());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_signing_key(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
    }
}
