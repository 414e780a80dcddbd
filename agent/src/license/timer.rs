//! The license service's wake-up: a `CLOCK_REALTIME` timerfd armed at an absolute Unix time,
//! with a 64-bit time on every target.
//!
//! 32-bit glibc targets (armv7) bind `timerfd_settime` with a 32-bit `time_t` by default: a
//! boundary past 2038-01-19 (a license valid for 15 years, a grace period) would wrap negative
//! and the timer would be refused or fire at once. `sys` arms it through rustix, which calls
//! the kernel's `timerfd_settime64` (Linux ≥ 5.1) there; an older kernel gets the time
//! clamped to `i32::MAX`: the timer fires early, finds nothing to change, and is armed again.

use std::os::fd::OwnedFd;

/// The latest time armed: the kernel refuses times past 2262; farther boundaries fire early
/// and are re-armed.
pub const MAX_ARM: i64 = 1 << 33;

/// A non-blocking, close-on-exec `CLOCK_REALTIME` timerfd.
pub fn timerfd() -> std::io::Result<OwnedFd> {
    crate::sys::timerfd()
}

/// Arms the timer at `at` (Unix seconds, wall clock), cancelled by any clock change.
pub fn arm(fd: &OwnedFd, at: i64) -> std::io::Result<()> {
    crate::sys::timerfd_arm_abs(fd, at.clamp(1, MAX_ARM))
}

/// Seconds until the timer fires (for tests), read with a 64-bit time on every target.
#[cfg(test)]
fn remaining_secs(fd: &OwnedFd) -> i64 {
    crate::sys::timerfd_remaining_secs(fd).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// 32-bit hazard: a license boundary past 2038-01-19 03:14:07 UTC (i32::MAX) must arm the
    /// timer at that time, not at a wrapped (negative or early) one. Run on armv7 under qemu by
    /// scripts/cross-test.sh.
    #[test]
    fn word_size_a_boundary_past_2038_is_armed_at_its_time() {
        let fd = timerfd().unwrap();
        let in_20_years = now() + 20 * 365 * 86_400;
        assert!(in_20_years > i64::from(i32::MAX));
        arm(&fd, in_20_years).unwrap();
        let left = remaining_secs(&fd);
        let want = in_20_years - now();
        assert!(
            (want - 5..=want + 1).contains(&left),
            "{left} s left, want {want}"
        );
        // Past the kernel's limit: clamped, not refused.
        arm(&fd, i64::MAX).unwrap();
        assert!(remaining_secs(&fd) > 200 * 365 * 86_400);
    }
}
