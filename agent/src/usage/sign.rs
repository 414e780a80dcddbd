//! The usage-data API's request signature: the rules are `kooagent_core::usage::sign`;
//! the nonce's randomness comes from here (core draws none).

pub use kooagent_core::usage::sign::*;

/// A fresh `nonce`: 32 hex characters from the OS's secure random source.
pub fn nonce() -> Result<String, getrandom::Error> {
    let b: [u8; 16] = crate::sys::random_array()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nonces_are_fresh_hex() {
        let n = super::nonce().unwrap();
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(n, super::nonce().unwrap());
    }
}
