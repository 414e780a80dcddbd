//! The license service's wake-up: a `CLOCK_REALTIME` timerfd armed at an absolute Unix time,
//! with a 64-bit time on every target.
//!
//! 32-bit glibc targets (armv7) bind `timerfd_settime` with a 32-bit `time_t` by default: a
//! boundary past 2038-01-19 (a license valid for 15 years, a grace period) would wrap negative
//! and the timer would be refused or fire at once. `sys` arms it through rustix, which calls
//! the kernel's `timerfd_settime64` (Linux ≥ 5.1) there; an older kernel gets the time
//! clamped to `i32::MAX`: the timer fires early, finds nothing to change, and is armed again.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

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

/// How a wait on an [`Alarm`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rang {
    /// The armed time came.
    Due,
    /// The wall clock was set (back or forward).
    ClockSet,
}

/// The license service's wake-up: the timerfd below in the agent, a fake in tests.
pub trait Alarm: Send {
    /// Arms at `at` (Unix seconds, wall clock). An error that
    /// [`is_clock_set`](crate::sys::is_clock_set) says the clock was set since the last
    /// wait, with the alarm armed all the same (`timerfd_settime`'s ECANCELED).
    fn arm(&mut self, at: i64) -> io::Result<()>;
    /// Waits until the alarm rings. Cancel-safe (the caller selects on it).
    fn wait(&mut self) -> impl Future<Output = io::Result<Rang>> + Send;
}

/// The timerfd registered with the runtime.
pub struct TimerFd(AsyncFd<OwnedFd>);

impl TimerFd {
    /// Call inside the runtime.
    pub fn new() -> io::Result<TimerFd> {
        let fd = timerfd()?;
        // SAFETY: the OwnedFd stays open, and is the same descriptor, as long as the AsyncFd.
        Ok(TimerFd(unsafe { AsyncFd::register(fd)? }))
    }
}

impl Alarm for TimerFd {
    fn arm(&mut self, at: i64) -> io::Result<()> {
        arm(self.0.get_ref(), at)
    }

    async fn wait(&mut self) -> io::Result<Rang> {
        let mut buf = [0u8; 8];
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| crate::sys::read_fd(fd.get_ref(), &mut buf)) {
                Ok(Ok(_)) => return Ok(Rang::Due),
                Ok(Err(e)) if crate::sys::is_clock_set(&e) => return Ok(Rang::ClockSet),
                Ok(Err(e)) => return Err(e),
                // Readiness left over from the last read: wait for the next edge.
                Err(_would_block) => continue,
            }
        }
    }
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
