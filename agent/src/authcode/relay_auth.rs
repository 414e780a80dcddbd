//! The relay's device authentication: the rules (signed bytes, headers, verification) are
//! `kooagent_core::authcode::relay_auth`; here are the agent's I/O edges for it: a fresh
//! nonce from the kernel's random source and the device key file.

use std::path::Path;

use ed25519_dalek::SigningKey;

pub use kooagent_core::authcode::relay_auth::*;

/// A fresh nonce: 16 random bytes as 32 lowercase hex characters.
pub fn new_nonce() -> String {
    nonce_from(crate::sys::random_array().expect("the kernel's random source is available"))
}

/// The device key at `path` (PKCS#8 PEM, mode 0600), created on first use.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, String> {
    if path.exists() {
        return kooagent_edge::keyfile::read_signing_key(path).map_err(|e| e.to_string());
    }
    let key = kooagent_edge::keyfile::generate().map_err(|e| e.to_string())?;
    crate::store::atomic_write(
        path,
        kooagent_edge::keyfile::private_pem(&key).as_bytes(),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_random_hex() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn key_file_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("relay.key");
        let k1 = load_or_create_key(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k2 = load_or_create_key(&p).unwrap();
        assert_eq!(k1.to_bytes(), k2.to_bytes());
    }
}
