//! The kernel's secure random source, for nonces and keys (core draws no randomness).

/// `N` random bytes.
pub fn array<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)?;
    Ok(b)
}

/// A fresh nonce: 32 hex characters.
pub fn hex_nonce() -> Result<String, getrandom::Error> {
    let b: [u8; 16] = array()?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nonces_are_fresh_hex() {
        let n = super::hex_nonce().unwrap();
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(n, super::hex_nonce().unwrap());
    }
}
