//! The agent's system edge: every call into the operating system that std does not wrap
//! goes through here, so the rest of the agent (and `kooagent-core`, which makes none) has
//! no `libc` and no `unsafe`. Where `rustix` offers the call safely it is used (it is
//! already in the tree through tempfile, and its raw-syscall backend adds no C code):
//! timerfd, inotify, flock, rlimit, kill, the socket's bind and listen, errno tests. What
//! only glibc has (its user and group databases, the NSS override of the static build,
//! malloc_trim) and the signal mask stay on `libc` here, each block with its SAFETY note.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;

/// `open(2)` flags for `OpenOptionsExt::custom_flags`: refuse a symbolic link as the last
/// component (the open fails with ELOOP, see [`is_symlink_refused`]).
pub const O_NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32;
/// Do not wait for a FIFO's writer; do not become the controlling terminal.
pub const O_NONBLOCK_NOCTTY: i32 = (OFlags::NONBLOCK.bits() | OFlags::NOCTTY.bits()) as i32;

fn errno_of(e: &io::Error) -> Option<Errno> {
    Errno::from_io_error(e)
}

/// The disk (or the user's quota) is full: ENOSPC, EDQUOT.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(errno_of(e), Some(Errno::NOSPC | Errno::DQUOT))
}

/// The process or the system ran out of descriptors: EMFILE, ENFILE.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(errno_of(e), Some(Errno::MFILE | Errno::NFILE))
}

/// An open with [`O_NOFOLLOW`] met a symbolic link: ELOOP.
pub fn is_symlink_refused(e: &io::Error) -> bool {
    errno_of(e) == Some(Errno::LOOP)
}

/// A `CANCEL_ON_SET` timerfd read after the wall clock was set: ECANCELED.
pub fn is_clock_set(e: &io::Error) -> bool {
    errno_of(e) == Some(Errno::CANCELED)
}

/// SIGKILL to the process group `pgid` leads (a child started with `process_group(0)`).
pub fn kill_process_group(pgid: u32) -> io::Result<()> {
    let pid = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::kill_process_group(
        pid,
        rustix::process::Signal::KILL,
    )?)
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`; elsewhere
/// nothing): after a burst of connections the idle agent shrinks back.
pub fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `CLOCK_MONOTONIC` in microseconds (systemd's `MONOTONIC_USEC`).
pub fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// A non-blocking, close-on-exec `CLOCK_REALTIME` timerfd.
pub fn timerfd() -> io::Result<OwnedFd> {
    use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
    Ok(timerfd_create(
        TimerfdClockId::Realtime,
        TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
    )?)
}

/// Arms `fd` at `at` (Unix seconds, wall clock, absolute), cancelled by any change of the
/// clock. rustix uses `timerfd_settime64` on 32-bit targets (a time past 2038 as is); a
/// 32-bit kernel older than 5.1 cannot take such a time (EOVERFLOW): it is armed at the
/// latest time it can take and fires early, which the caller handles by arming again.
pub fn timerfd_arm_abs(fd: impl AsFd, at: i64) -> io::Result<()> {
    use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
    let spec = |sec: i64| Itimerspec {
        it_interval: Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: Timespec {
            tv_sec: sec,
            tv_nsec: 0,
        },
    };
    let flags = TimerfdTimerFlags::ABSTIME | TimerfdTimerFlags::CANCEL_ON_SET;
    match timerfd_settime(&fd, flags, &spec(at)) {
        Err(Errno::OVERFLOW) => {
            timerfd_settime(&fd, flags, &spec(at.min(i64::from(i32::MAX))))?;
        }
        r => {
            r?;
        }
    }
    Ok(())
}

/// Seconds until `fd` fires.
pub fn timerfd_remaining_secs(fd: impl AsFd) -> io::Result<i64> {
    Ok(rustix::time::timerfd_gettime(fd)?.it_value.tv_sec)
}

/// The gid of a group by name from the group database (`None`: no such group).
pub fn group_id(name: &str) -> Result<Option<u32>, String> {
    let cname = std::ffi::CString::new(name).map_err(|_| "contains a NUL byte".to_string())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter; every pointer is valid for the sizes
    // given; getgrnam_r writes only into `grp` and `buf`, and `result` points at `grp` or
    // is null.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 {
            return Err(format!(
                "group lookup failed: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        Ok((!result.is_null()).then_some(grp.gr_gid))
    }
}

/// A Unix stream socket (close-on-exec) bound to `path`, not listening yet (the caller
/// sets the file's owner and mode first).
pub fn unix_socket_bound(path: &Path) -> io::Result<OwnedFd> {
    use rustix::net::{bind, socket_with, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path).map_err(|e| match e {
        Errno::NAMETOOLONG | Errno::INVAL => {
            io::Error::new(io::ErrorKind::InvalidInput, "socket path too long")
        }
        e => e.into(),
    })?;
    let fd = socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    bind(&fd, &addr)?;
    Ok(fd)
}

/// listen(2) on a bound socket.
pub fn listen(fd: impl AsFd, backlog: i32) -> io::Result<()> {
    Ok(rustix::net::listen(fd, backlog)?)
}

/// Pins the static binary's NSS databases to the modules built into glibc (see main.rs).
/// Gated on glibc, not on `crt-static`: scripts/release.sh links the binary alone
/// statically (`cargo rustc … -C target-feature=+crt-static`), so this library is built
/// without that feature and only main.rs can tell a static link.
#[cfg(target_env = "gnu")]
pub fn static_nss() {
    extern "C" {
        // glibc, <nss.h>: overrides the service line of one database, for "static
        // binaries" in the header's words.
        fn __nss_configure_lookup(
            db: *const std::ffi::c_char,
            line: *const std::ffi::c_char,
        ) -> std::ffi::c_int;
    }
    for (db, line) in [
        (c"group", c"files"),
        (c"passwd", c"files"),
        (c"hosts", c"files dns"),
    ] {
        // SAFETY: both are NUL-terminated static strings; called before any thread
        // exists, as the function is not thread-safe.
        unsafe { __nss_configure_lookup(db.as_ptr(), line.as_ptr()) };
    }
}

/// `N` bytes from the kernel's secure random source (the `getrandom` crate: getrandom(2)
/// with its fallbacks, so no hand-written syscall).
pub fn random_array<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)?;
    Ok(b)
}

/// The effective user id.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The effective user's name from the password database (`None`: no entry).
pub fn effective_user_name() -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes only into `pw` and
    // `buf` (its length passed), and `result` points at `pw` or is null.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pw.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Sets the process's file mode creation mask; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask)).as_raw_mode()
}

/// Takes the exclusive `flock(2)` lock on `file`, waiting for it (retried on EINTR).
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        match rustix::fs::flock(file, FlockOperation::LockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Tries the exclusive `flock(2)` lock on `file`: `Ok(false)` when another holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Holds the signals the daemon handles (SIGTERM, SIGINT, SIGHUP) pending, for the calling
/// thread and the threads it starts later, until [`unblock_daemon_signals`].
pub fn block_daemon_signals() {
    set_signal_mask(libc::SIG_BLOCK);
}

/// Lets the daemon's signals through again (their handlers are installed).
pub fn unblock_daemon_signals() {
    set_signal_mask(libc::SIG_UNBLOCK);
}

/// Blocks or unblocks the signals the daemon handles, for the calling thread (threads
/// started later inherit it; a blocked signal stays pending for a thread that unblocks it).
fn set_signal_mask(how: libc::c_int) {
    // SAFETY: the sigset is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// CPU time (user + system, all threads) of process `pid` so far, in µs: its CPU clock,
/// the nanosecond sum of what /proc/<pid>/stat counts in 10 ms ticks. None once it is
/// gone. The bench measures the agent with it.
pub fn process_cpu_us(pid: u32) -> Option<f64> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: plain libc calls on local values; rustix has no clock_getcpuclockid.
    unsafe {
        let mut clock: libc::clockid_t = 0;
        if libc::clock_getcpuclockid(pid, &mut clock) != 0 {
            return None;
        }
        let mut t: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(clock, &mut t) != 0 {
            return None;
        }
        Some(t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3)
    }
}

/// This thread's CPU time so far, µs.
pub fn thread_cpu_us() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

/// Asks process `pid` to stop (SIGTERM); gone already is not an error.
pub fn terminate(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Lifts the soft limit on open descriptors to the hard one; returns the soft limit in
/// force (`u64::MAX`: unlimited).
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum || (lim.current.is_some() && lim.maximum.is_none()) {
        let raised = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return raised.current.unwrap_or(u64::MAX);
        }
    }
    lim.current.unwrap_or(u64::MAX)
}

/// An inotify descriptor (non-blocking, close-on-exec) watching `dir` for files written
/// and closed, moved in or out, deleted or created.
pub fn inotify_watch(dir: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
    // CREATE: a symlink or FIFO is never closed after writing; see `parse_inotify`.
    let mask = WatchFlags::CLOSE_WRITE
        | WatchFlags::MOVED_TO
        | WatchFlags::MOVED_FROM
        | WatchFlags::DELETE
        | WatchFlags::CREATE;
    inotify::add_watch(&fd, dir, mask)?;
    Ok(fd)
}

/// Reads what is ready on a non-blocking descriptor into `buf`.
pub fn read_fd(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

/// File names in a buffer of inotify events; `None` when the queue overflowed. A mere
/// creation counts only for what is not a regular file (a symlink, a FIFO: refused at
/// once); a regular file is looked at when its writer closes it or it is moved in.
pub fn parse_inotify(
    buf: &[u8],
    names: &mut Option<std::collections::BTreeSet<String>>,
    dir: &Path,
) {
    // struct inotify_event: wd (i32), mask (u32), cookie (u32), len (u32), name[len].
    const HEADER: usize = 16;
    use rustix::fs::inotify::ReadFlags;
    const IN_CREATE: u32 = ReadFlags::CREATE.bits();
    const IN_Q_OVERFLOW: u32 = ReadFlags::QUEUE_OVERFLOW.bits();
    let mut off = 0;
    while off + HEADER <= buf.len() {
        let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
        let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().expect("4 bytes")) as usize;
        let name = &buf[(off + HEADER).min(buf.len())..(off + HEADER + len).min(buf.len())];
        if mask & IN_Q_OVERFLOW != 0 {
            *names = None;
        } else if let Some(set) = names.as_mut() {
            let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
            if let Ok(s) = std::str::from_utf8(name) {
                let created_regular = mask == IN_CREATE
                    && std::fs::symlink_metadata(dir.join(s)).map_or(true, |m| m.is_file());
                if !s.is_empty() && !created_regular {
                    set.insert(s.to_string());
                }
            }
        }
        off += HEADER + len;
    }
}

/// Registers `fd` with the runtime's reactor; `what` names it in the error log.
pub fn register(fd: OwnedFd, what: &str) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open, and is the same descriptor, as long as the AsyncFd.
    match unsafe { AsyncFd::register(fd) } {
        Ok(a) => Some(a),
        Err(e) => {
            log::error!("{what}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_arrays_differ() {
        let a: [u8; 16] = random_array().unwrap();
        let b: [u8; 16] = random_array().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn ids_and_umask() {
        assert_eq!(is_root(), euid() == 0);
        let old = set_umask(0o077);
        assert_eq!(set_umask(old), 0o077);
    }

    #[test]
    fn flock_is_exclusive_across_descriptions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let a = File::create(&p).unwrap();
        let b = File::open(&p).unwrap();
        lock_exclusive(&a).unwrap();
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    #[test]
    fn errno_tests_name_the_right_errors() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(is_disk_full(&e(Errno::NOSPC.raw_os_error())));
        assert!(is_disk_full(&e(Errno::DQUOT.raw_os_error())));
        assert!(!is_disk_full(&e(Errno::IO.raw_os_error())));
        assert!(is_out_of_descriptors(&e(Errno::MFILE.raw_os_error())));
        assert!(!is_out_of_descriptors(&io::Error::other("x")));
        assert!(is_symlink_refused(&e(Errno::LOOP.raw_os_error())));
        assert!(is_clock_set(&e(Errno::CANCELED.raw_os_error())));
    }

    #[test]
    fn a_symlink_is_refused_with_nofollow() {
        use std::os::unix::fs::OpenOptionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("t"), "x").unwrap();
        std::os::unix::fs::symlink(d.path().join("t"), d.path().join("l")).unwrap();
        let e = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NOFOLLOW | O_NONBLOCK_NOCTTY)
            .open(d.path().join("l"))
            .unwrap_err();
        assert!(is_symlink_refused(&e), "{e}");
    }

    #[test]
    fn a_bound_socket_listens_and_accepts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let fd = unix_socket_bound(&p).unwrap();
        listen(&fd, 8).unwrap();
        let l = std::os::unix::net::UnixListener::from(fd);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        let long = d.path().join("x".repeat(200));
        assert!(unix_socket_bound(&long).is_err());
    }

    #[test]
    fn groups_by_name() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-kooagent").unwrap(), None);
        assert!(group_id("a\u{0}b").is_err());
    }

    #[test]
    fn monotonic_time_moves_forward() {
        let a = monotonic_usec();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_usec() >= a + 1_000);
    }

    #[test]
    fn inotify_reports_a_written_file() {
        let d = tempfile::tempdir().unwrap();
        let fd = inotify_watch(d.path()).unwrap();
        std::fs::write(d.path().join("a.lic"), "x").unwrap();
        let mut buf = vec![0u8; 4096];
        let n = read_fd(&fd, &mut buf).unwrap();
        let mut names = Some(Default::default());
        parse_inotify(&buf[..n], &mut names, d.path());
        assert_eq!(
            names.unwrap().into_iter().collect::<Vec<_>>(),
            vec!["a.lic"]
        );
    }
}
