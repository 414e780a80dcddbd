//! The license service's wake-up: a `CLOCK_REALTIME` timerfd armed at an absolute Unix time,
//! with a 64-bit time on every target.
//!
//! 32-bit glibc targets (armv7) bind `timerfd_settime` with a 32-bit `time_t` by default: a
//! boundary past 2038-01-19 (a license valid for 15 years, a grace period) would wrap negative
//! and the timer would be refused or fire at once. There the kernel's `timerfd_settime64`
//! (Linux ≥ 5.1) is called directly; an older kernel (ENOSYS) gets the time clamped to
//! `i32::MAX`: the timer fires early, finds nothing to change, and is armed again.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The latest time armed: the kernel refuses times past 2262; farther boundaries fire early
/// and are re-armed.
pub const MAX_ARM: i64 = 1 << 33;

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A non-blocking, close-on-exec `CLOCK_REALTIME` timerfd.
pub fn timerfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::timerfd_create(libc::CLOCK_REALTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms the timer at `at` (Unix seconds, wall clock), cancelled by any clock change.
pub fn arm(fd: &OwnedFd, at: i64) -> std::io::Result<()> {
    settime_abs(
        fd.as_raw_fd(),
        libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET,
        at.clamp(1, MAX_ARM),
    )
}

#[cfg(target_pointer_width = "64")]
fn settime_abs(fd: libc::c_int, flags: libc::c_int, at: i64) -> std::io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: at,
            tv_nsec: 0,
        },
    };
    // SAFETY: valid fd and itimerspec; the old value is not wanted.
    cvt(unsafe { libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()) }).map(|_| ())
}

/// The kernel's `struct __kernel_itimerspec` (64-bit seconds and nanoseconds).
#[cfg(any(target_pointer_width = "32", test))]
#[repr(C)]
#[derive(Default)]
struct Itimerspec64 {
    interval_sec: i64,
    interval_nsec: i64,
    value_sec: i64,
    value_nsec: i64,
}

/// `timerfd_settime64` / `timerfd_gettime64`: the same numbers on every 32-bit architecture
/// (the y2038 calls were numbered together in Linux 5.1); the libc crate names them only for
/// some targets.
#[cfg(target_pointer_width = "32")]
const SYS_TIMERFD_SETTIME64: libc::c_long = 411;
#[cfg(all(target_pointer_width = "32", test))]
const SYS_TIMERFD_GETTIME64: libc::c_long = 410;

#[cfg(target_pointer_width = "32")]
fn settime_abs(fd: libc::c_int, flags: libc::c_int, at: i64) -> std::io::Result<()> {
    let spec = Itimerspec64 {
        value_sec: at,
        ..Default::default()
    };
    // SAFETY: valid fd and a kernel itimerspec64; the old value is not wanted.
    let r = unsafe {
        libc::syscall(
            SYS_TIMERFD_SETTIME64,
            fd,
            flags,
            &spec as *const Itimerspec64,
            std::ptr::null_mut::<Itimerspec64>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: narrow_secs(at),
            tv_nsec: 0,
        },
    };
    // SAFETY: valid fd and itimerspec; the old value is not wanted.
    cvt(unsafe { libc::timerfd_settime(fd, flags, &spec, std::ptr::null_mut()) }).map(|_| ())
}

/// Seconds for a `time_t` of the target's width: clamped, never wrapped.
#[cfg(any(target_pointer_width = "32", test))]
fn narrow_secs(at: i64) -> libc::time_t {
    libc::time_t::try_from(at).unwrap_or(libc::time_t::MAX)
}

/// Seconds until the timer fires (for tests), read with a 64-bit time on every target.
#[cfg(test)]
fn remaining_secs(fd: &OwnedFd) -> i64 {
    #[cfg(target_pointer_width = "64")]
    {
        // SAFETY: all-zero is a valid itimerspec.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut cur) }).unwrap();
        cur.it_value.tv_sec
    }
    #[cfg(target_pointer_width = "32")]
    {
        let mut cur = Itimerspec64::default();
        // SAFETY: valid fd and a kernel itimerspec64 to fill.
        let r = unsafe {
            libc::syscall(
                SYS_TIMERFD_GETTIME64,
                fd.as_raw_fd(),
                &mut cur as *mut Itimerspec64,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        cur.value_sec
    }
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

    #[test]
    fn word_size_narrowing_clamps_instead_of_wrapping() {
        assert_eq!(narrow_secs(5), 5);
        let past_2038 = i64::from(i32::MAX) + 10;
        if std::mem::size_of::<libc::time_t>() == 4 {
            assert_eq!(narrow_secs(past_2038) as i64, i64::from(i32::MAX));
        } else {
            assert_eq!(narrow_secs(past_2038) as i64, past_2038);
        }
        // The kernel's 64-bit spec is four 64-bit words whatever the target.
        assert_eq!(std::mem::size_of::<Itimerspec64>(), 32);
    }
}
