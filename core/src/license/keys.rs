//! The seller public keys the agent trusts, from the configuration only (never from a
//! license): inline `[license] trusted_keys` entries and/or a `trusted_keys_file`, minus
//! `revoked_key_ids`. Several keys at once make rotation possible: a license names its
//! signer by key id.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;

use super::format::{key_id, Parsed};

/// How far a license's signature can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Integrity {
    Verified,
    BadSignature,
    /// Signed by a key that is not configured, or revoked: the reason says which.
    UntrustedKey(String),
}

#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    revoked: BTreeSet<String>,
}

/// Parses one trust entry: `<kid>:<base64 public key>` (the line `seller keygen` writes)
/// or just `<base64 public key>`. A kid that does not match the key is refused: it is
/// how a mistyped key shows up.
pub fn parse_entry(entry: &str) -> Result<(String, VerifyingKey), String> {
    let entry = entry.trim();
    let (kid, b64) = match entry.split_once(':') {
        Some((k, b)) => (Some(k.trim()), b.trim()),
        None => (None, entry),
    };
    let raw = STANDARD
        .decode(b64)
        .map_err(|e| format!("{b64:?} is not base64: {e}"))?;
    let raw: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
        format!(
            "an ed25519 public key is 32 bytes, this one is {}",
            raw.len()
        )
    })?;
    let key =
        VerifyingKey::from_bytes(&raw).map_err(|_| "not a valid ed25519 public key".to_string())?;
    if key.is_weak() {
        return Err("a weak (small-order) ed25519 key cannot be trusted".into());
    }
    let actual = key_id(&key);
    if let Some(kid) = kid {
        if kid != actual {
            return Err(format!(
                "key id {kid:?} does not match the key (its id is {actual})"
            ));
        }
    }
    Ok((actual, key))
}

/// The trust line for a key: `<kid>:<base64>`.
pub fn entry_for(key: &VerifyingKey) -> String {
    format!("{}:{}", key_id(key), STANDARD.encode(key.as_bytes()))
}

/// Entries of a keys file: one per line; blank lines and `#` comments are skipped.
/// Errors carry the line number.
pub fn parse_file_text(text: &str) -> Result<Vec<(String, VerifyingKey)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        out.push(parse_entry(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(out)
}

/// Which configuration key an error is about, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfigError {
    pub key: String,
    pub message: String,
    /// The keys file exists but this process may not read it (a CLI user who is not the
    /// agent's user): only the agent needs the keys.
    pub unreadable: bool,
}

impl TrustedKeys {
    /// `file`: the keys file's path and what reading it gave (the caller reads it; core
    /// does no I/O).
    pub fn new(
        inline: &[String],
        file: Option<(&Path, std::io::Result<String>)>,
        revoked: &[String],
    ) -> Result<TrustedKeys, KeyConfigError> {
        let mut keys = BTreeMap::new();
        for (i, e) in inline.iter().enumerate() {
            let (kid, key) = parse_entry(e).map_err(|message| KeyConfigError {
                key: format!("license.trusted_keys[{i}]"),
                message,
                unreadable: false,
            })?;
            keys.insert(kid, key);
        }
        if let Some((path, text)) = file {
            let err = |message: String| KeyConfigError {
                key: "license.trusted_keys_file".into(),
                message: format!("{}: {message}", path.display()),
                unreadable: false,
            };
            let text = text.map_err(|e| KeyConfigError {
                unreadable: e.kind() == std::io::ErrorKind::PermissionDenied,
                ..err(e.to_string())
            })?;
            for (kid, key) in parse_file_text(&text).map_err(err)? {
                keys.insert(kid, key);
            }
        }
        let mut rev = BTreeSet::new();
        for (i, r) in revoked.iter().enumerate() {
            if r.len() != 16 || !r.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(KeyConfigError {
                    key: format!("license.revoked_key_ids[{i}]"),
                    message: format!("{r:?} is not a key id (16 lowercase hex digits)"),
                    unreadable: false,
                });
            }
            rev.insert(r.clone());
        }
        Ok(TrustedKeys { keys, revoked: rev })
    }

    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>, revoked: &[&str]) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
            revoked: revoked.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Key ids that would verify a license now (trusted and not revoked).
    pub fn active_ids(&self) -> Vec<&str> {
        self.keys
            .keys()
            .filter(|k| !self.revoked.contains(*k))
            .map(String::as_str)
            .collect()
    }

    /// The trusted, unrevoked key with id `kid`, or why there is none.
    pub fn lookup(&self, kid: &str) -> Result<&VerifyingKey, String> {
        if self.revoked.contains(kid) {
            return Err(format!("signing key {kid} is revoked"));
        }
        self.keys.get(kid).ok_or_else(|| {
            format!("signing key {kid} is not among the trusted keys ([license] trusted_keys)")
        })
    }

    /// Checks a parsed license's signer and signature.
    pub fn check(&self, parsed: &Parsed) -> Integrity {
        let key = match self.lookup(&parsed.license.key_id) {
            Ok(k) => k,
            Err(why) => return Integrity::UntrustedKey(why),
        };
        if parsed.verify(key) {
            Integrity::Verified
        } else {
            Integrity::BadSignature
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::format::{parse, sign};
    use crate::testing::{sample, test_key};

    #[test]
    fn entries_round_trip_and_mismatched_kid_is_refused() {
        let k = test_key(9).verifying_key();
        let line = entry_for(&k);
        assert_eq!(parse_entry(&line).unwrap().1, k);
        let bare = line.split_once(':').unwrap().1;
        assert_eq!(parse_entry(bare).unwrap().0, key_id(&k));
        let wrong = format!("0000000000000000:{bare}");
        assert!(parse_entry(&wrong).unwrap_err().contains("does not match"));
        assert!(parse_entry("abc:!!").unwrap_err().contains("base64"));
        assert!(parse_entry("AAAA").unwrap_err().contains("32 bytes"));
    }

    #[test]
    fn rotation_and_revocation() {
        let (old, new) = (test_key(1), test_key(2));
        let lic_old = parse(sign(&sample(), &old).unwrap().as_bytes()).unwrap();
        let lic_new = parse(sign(&sample(), &new).unwrap().as_bytes()).unwrap();
        let both = TrustedKeys::from_keys([old.verifying_key(), new.verifying_key()], &[]);
        assert_eq!(both.check(&lic_old), Integrity::Verified);
        assert_eq!(both.check(&lic_new), Integrity::Verified);
        let old_id = key_id(&old.verifying_key());
        let revoked = TrustedKeys::from_keys(
            [old.verifying_key(), new.verifying_key()],
            &[old_id.as_str()],
        );
        assert!(
            matches!(revoked.check(&lic_old), Integrity::UntrustedKey(m) if m.contains("revoked"))
        );
        assert_eq!(revoked.check(&lic_new), Integrity::Verified);
        assert_eq!(revoked.active_ids(), vec![key_id(&new.verifying_key())]);
        let only_new = TrustedKeys::from_keys([new.verifying_key()], &[]);
        assert!(
            matches!(only_new.check(&lic_old), Integrity::UntrustedKey(m) if m.contains("not among"))
        );
    }

    #[test]
    fn a_key_claiming_another_kid_fails_the_signature() {
        // A license naming a trusted kid but signed by another key: bad signature.
        let (good, evil) = (test_key(1), test_key(6));
        let mut p = parse(sign(&sample(), &evil).unwrap().as_bytes()).unwrap();
        p.license.key_id = key_id(&good.verifying_key());
        let keys = TrustedKeys::from_keys([good.verifying_key()], &[]);
        assert_eq!(keys.check(&p), Integrity::BadSignature);
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = TrustedKeys::new(&["nope".into()], None, &[]).unwrap_err();
        assert_eq!(e.key, "license.trusted_keys[0]");
        let e = TrustedKeys::new(&[], None, &["XYZ".into()]).unwrap_err();
        assert_eq!(e.key, "license.revoked_key_ids[0]");
        let f = Path::new("/etc/kooagent/keys");
        let text = format!(
            "# seller keys\n{}\n\nbad line\n",
            entry_for(&test_key(1).verifying_key())
        );
        let e = TrustedKeys::new(&[], Some((f, Ok(text))), &[]).unwrap_err();
        assert_eq!(e.key, "license.trusted_keys_file");
        assert!(e.message.contains("line 4"), "{}", e.message);
        assert!(
            e.message.starts_with("/etc/kooagent/keys: "),
            "{}",
            e.message
        );
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = TrustedKeys::new(&[], Some((f, Err(denied))), &[]).unwrap_err();
        assert!(e.unreadable);
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(
            !TrustedKeys::new(&[], Some((f, Err(missing))), &[])
                .unwrap_err()
                .unreadable
        );
        let text = entry_for(&test_key(1).verifying_key());
        let k = TrustedKeys::new(&[], Some((f, Ok(text))), &[]).unwrap();
        assert_eq!(k.active_ids().len(), 1);
    }
}
