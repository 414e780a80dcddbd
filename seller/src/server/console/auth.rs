//! The console's sign-in: the admin password (argon2id), sessions, CSRF tokens, the
//! sign-in rate limit. No I/O but the password file; every rule is tested here.
//!
//! Sessions are kept in the database (`console_sessions`, by the SHA-256 of the cookie;
//! `super::sessions`), so every `seller serve` process on one database knows them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The session cookie (path `/console`).
pub const COOKIE: &str = "kooagent_console";
/// The pre-sign-in cookie the sign-in form's CSRF token is checked against.
pub const LOGIN_COOKIE: &str = "kooagent_console_login";
/// A session ends this long after sign-in.
pub const SESSION_SECS: i64 = 8 * 3600;
/// Shortest admin password accepted.
pub const MIN_PASSWORD: usize = 12;
/// Sign-in attempts per source address per [`WINDOW_SECS`], and for all addresses.
pub const ATTEMPTS_PER_ADDRESS: u32 = 5;
pub const ATTEMPTS_TOTAL: u32 = 50;
pub const WINDOW_SECS: i64 = 60;
/// Sessions held at once, at most (oldest signed out first).
pub const MAX_SESSIONS: i64 = 64;
/// Addresses remembered by the rate limit at most (a flood of addresses forgets the oldest
/// windows, never grows the map).
const MAX_ADDRESSES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the password must have at least {MIN_PASSWORD} characters")]
    TooShort,
    #[error("hashing the password: {0}")]
    Hash(String),
    #[error("{0}: not an argon2id password hash (set it with `kooagent seller console-password`)")]
    BadFile(String),
}

/// The argon2id PHC string of `password` (the crate's defaults: m=19 MiB, t=2, p=1,
/// OWASP's recommendation).
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(PasswordError::TooShort);
    }
    // 16 random bytes from the system (the crate's OsRng needs a feature we do not pull in).
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| PasswordError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Reads and checks a password file (one argon2id PHC string).
pub fn load_hash(path: &Path) -> Result<String, PasswordError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| PasswordError::BadFile(format!("{name}: {e}")))?;
    let text = text.trim().to_string();
    match PasswordHash::new(&text) {
        Ok(h) if h.algorithm.as_str() == "argon2id" => Ok(text),
        _ => Err(PasswordError::BadFile(name)),
    }
}

/// Whether `password` matches the stored hash (constant time inside the crate).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// 32 random bytes, base64url.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the system's random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Equal, compared as SHA-256 digests (the time says nothing about a common prefix).
pub fn same_secret(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

/// One signed-in console user.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    pub address: String,
    pub created: i64,
}

/// A session cookie's database key: its SHA-256 (a database dump shows no usable cookie).
pub fn session_key(cookie: &str) -> String {
    hex(&Sha256::digest(cookie.as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fixed windows of sign-in attempts, per address and in all.
#[derive(Default)]
pub struct SignInLimit(Mutex<LimitState>);

#[derive(Default)]
pub struct LimitState {
    /// address → (window start, attempts).
    by_address: HashMap<String, (i64, u32)>,
    total: (i64, u32),
}

impl SignInLimit {
    /// Counts one attempt; false: over the limit (the attempt is refused unchecked).
    pub fn attempt(&self, address: &str, now: i64) -> bool {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if now - s.total.0 >= WINDOW_SECS {
            s.total = (now, 0);
        }
        if s.by_address.len() >= MAX_ADDRESSES {
            s.by_address
                .retain(|_, (start, _)| now - *start < WINDOW_SECS);
            if s.by_address.len() >= MAX_ADDRESSES {
                s.by_address.clear();
            }
        }
        let w = s.by_address.entry(address.to_string()).or_insert((now, 0));
        if now - w.0 >= WINDOW_SECS {
            *w = (now, 0);
        }
        if w.1 >= ATTEMPTS_PER_ADDRESS {
            return false;
        }
        w.1 += 1;
        if s.total.1 >= ATTEMPTS_TOTAL {
            return false;
        }
        s.total.1 += 1;
        true
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// `Set-Cookie` for the console: never readable by scripts, never sent over plain HTTP or
/// from another site's page.
pub fn set_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/console; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_as_argon2id_and_verify() {
        assert!(matches!(
            hash_password("short"),
            Err(PasswordError::TooShort)
        ));
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password(&h, "correct horse battery"));
        assert!(!verify_password(&h, "correct horse batterY"));
        assert!(!verify_password("not a hash", "x"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, format!("{h}\n")).unwrap();
        assert_eq!(load_hash(&p).unwrap(), h);
        std::fs::write(&p, "plain text").unwrap();
        assert!(load_hash(&p).is_err());
    }

    #[test]
    fn sign_in_is_limited_per_address_and_in_all() {
        let l = SignInLimit::default();
        for _ in 0..ATTEMPTS_PER_ADDRESS {
            assert!(l.attempt("a", 0));
        }
        assert!(!l.attempt("a", 1));
        assert!(l.attempt("b", 1));
        assert!(l.attempt("a", WINDOW_SECS));
        let l = SignInLimit::default();
        for i in 0..ATTEMPTS_TOTAL {
            assert!(l.attempt(&format!("x{i}"), 0));
        }
        assert!(!l.attempt("fresh", 0));
    }

    #[test]
    fn cookies() {
        assert_eq!(
            cookie(Some("a=1; kooagent_console=xyz"), COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie(Some("kooagent_console_login=q"), COOKIE), None);
        let c = set_cookie(COOKIE, "v", 60);
        for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
            assert!(c.contains(flag), "{c}");
        }
    }
}
