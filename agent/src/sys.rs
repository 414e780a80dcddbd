//! The agent's system edge: every call into the operating system that std does not wrap
//! goes through here, so the rest of the agent (and `kooagent-core`, which makes none) has
//! no `libc` and almost no `unsafe`. Where `rustix` offers the call safely it is used (it is
//! already in the tree through tempfile, and its raw-syscall backend adds no C code);
//! what it does not offer safely (the signal mask, glibc's group database, the raw socket
//! setup, timerfd over the runtime) stays on `libc` here, each block with its SAFETY note.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::FlockOperation;
use tokio::io::unix::AsyncFd;

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

/// Blocks or unblocks the signals the daemon handles, for the calling thread (threads
/// started later inherit it; a blocked signal stays pending for a thread that unblocks it).
pub fn set_signal_mask(how: libc::c_int) {
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
