//! The agent's system edge: calls into the operating system that the rest of the agent and
//! `kooagent-core` (which draws no randomness itself) go through.

/// `N` bytes from the kernel's secure random source (the `getrandom` crate: getrandom(2)
/// with its fallbacks, so no hand-written syscall).
pub fn random_array<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_arrays_differ() {
        let a: [u8; 16] = super::random_array().unwrap();
        let b: [u8; 16] = super::random_array().unwrap();
        assert_ne!(a, b);
    }
}
