//! Retry delays with random jitter, one rule for every retry loop (the usage upload on
//! the device, the usage relay's delivery, the freeze poll's spread, the seller server's
//! database conflicts): many parties that failed together must not come back together.

/// A uniformly random whole number in `0..=max` (0 when the system has no randomness to
/// give: a fixed delay is still a delay).
pub fn jitter(max: u64) -> u64 {
    let mut b = [0u8; 8];
    if max == 0 || getrandom::getrandom(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b) % (max + 1)
}

/// Exponential backoff with "equal jitter" for the `attempt`th retry (1 = first):
/// the delay doubles from `initial` up to `max`, and is half fixed, half random.
pub fn equal_jitter(initial: u64, max: u64, attempt: u32) -> u64 {
    let exp = initial
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(max);
    let half = exp / 2;
    half + jitter(exp - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_bounded_and_vary() {
        for attempt in 0..40 {
            let d = equal_jitter(1000, 10_000, attempt);
            let cap = (1000u64 << attempt.saturating_sub(1).min(20)).min(10_000);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d}");
        }
        let seen: std::collections::HashSet<u64> =
            (0..50).map(|_| equal_jitter(1000, 1000, 1)).collect();
        assert!(seen.len() > 1, "no jitter: {seen:?}");
        assert_eq!(equal_jitter(0, 0, 3), 0);
        assert!(jitter(5) <= 5);
    }
}
