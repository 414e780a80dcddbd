//! Ed25519 key files, shared by the seller's tools (`kooagent-seller keygen|issue|inspect`,
//! the seller server's signing key) and the agent (its relay device key). Building a
//! license from issue parameters is `kooagent_core::license::issue` (pure).
//!
//! Private keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the form `openssl genpkey
//! -algorithm ed25519` and Python's `cryptography` write, so keys move freely between
//! tools. Public keys are one trust line, `<kid>:<base64>`, pasted into the agent config.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{SigningKey, VerifyingKey};

use kooagent_core::license::keys;

/// DER prefix of a PKCS#8 Ed25519 private key; the 32-byte seed follows (RFC 8410).
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A new key from the kernel's CSPRNG.
pub fn generate() -> Result<SigningKey, KeyFileError> {
    let seed: [u8; 32] = crate::random::array()
        .map_err(|e| KeyFileError::Invalid(format!("getrandom failed: {e}")))?;
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
pub fn write_keypair(path: &Path) -> Result<(PathBuf, String), KeyFileError> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    for p in [path, pub_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyFileError::Exists(p.to_path_buf()));
        }
    }
    let key = generate()?;
    let create = |p: &Path, mode: u32, bytes: &[u8]| -> Result<(), KeyFileError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => KeyFileError::Exists(p.to_path_buf()),
                _ => KeyFileError::Io {
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
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let bad = |message: String| KeyFileError::BadKey {
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
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let bad = |message: String| KeyFileError::BadKey {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keypair_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("seller.key");
        let (pub_path, line) = write_keypair(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(write_keypair(&p), Err(KeyFileError::Exists(_))));
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
