//! One agent per state directory. Two agents appending to one ledger segment, each at its
//! own idea of the segment's length, overwrite each other's acknowledged records; the
//! socket cannot guard against that (two configs can name one state directory and two
//! sockets). So whatever writes the state directory takes an exclusive `flock` on
//! `<state_dir>/agent.lock` first: the daemon for its whole life, `image-prep` while it
//! works. The holder writes its pid into the file so a refused second agent can name it.
//!
//! flock rather than fcntl locks: an fcntl lock is dropped when *any* descriptor of the
//! file is closed by the process, and it is not inherited across the `--daemon` fork.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "state directory {dir} is in use by another agent (pid {pid}); stop it first, \
         or give this one its own agent.state_dir"
    )]
    Held { dir: PathBuf, pid: String },
    #[error("locking state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The held lock; released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
pub struct StateLock {
    file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock on `state_dir` without waiting, and records this process's pid in it.
    ///
    /// When the holder named in the file has already exited, the lock is waited for a moment
    /// (up to [`DEAD_HOLDER_WAIT`]): a child the old agent was starting (a freeze action, a
    /// hook) shares its descriptors between fork and exec, so on a loaded machine a restart
    /// can find the lock still held for a few milliseconds after the old agent is gone.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let deadline = std::time::Instant::now() + DEAD_HOLDER_WAIT;
        let lock = loop {
            match StateLock::open(state_dir, true) {
                Err(LockError::Held { pid, .. })
                    if !holder_alive(&pid) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        lock.record_pid().map_err(|source| LockError::Io {
            path: lock.path.clone(),
            source,
        })?;
        Ok(lock)
    }

    /// Fails with [`LockError::Held`] when an agent holds the lock; creates nothing (for
    /// dry runs and read-only checks). The lock is released again on return.
    pub fn check(state_dir: &Path) -> Result<(), LockError> {
        match StateLock::open(state_dir, false) {
            Err(LockError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.map(drop),
        }
    }

    fn open(state_dir: &Path, create: bool) -> Result<StateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .custom_flags(crate::sys::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        if !crate::sys::try_lock_exclusive(&file).map_err(io_err)? {
            return Err(LockError::Held {
                dir: state_dir.to_path_buf(),
                pid: holder_pid(&file),
            });
        }
        Ok(StateLock { file, path })
    }

    /// Writes this process's pid into the lock file (again after the `--daemon` fork: the
    /// detached child inherits the lock, and its pid is the one to name).
    pub fn record_pid(&self) -> io::Result<()> {
        let mut f = &self.file;
        f.set_len(0)?;
        f.seek(io::SeekFrom::Start(0))?;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How long a start waits for a lock whose named holder has exited.
pub const DEAD_HOLDER_WAIT: Duration = Duration::from_secs(3);

/// Whether the process `pid` (as the holder wrote it) still exists; "unknown" counts as
/// alive, so only a holder known to be gone is waited for.
fn holder_alive(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(pid) => Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => true,
    }
}

/// The pid the holder wrote. It writes right after locking, so an empty file is read again
/// briefly before giving up.
fn holder_pid(file: &File) -> String {
    for _ in 0..20 {
        let mut text = String::new();
        let mut f = file;
        if f.seek(io::SeekFrom::Start(0)).is_ok() && f.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse::<u32>() {
                return pid.to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(held.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // A second open file description conflicts with the first, even in one process.
        assert!(StateLock::check(dir.path()).is_err());
        let err = StateLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(held);
        StateLock::check(dir.path()).unwrap();
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_lock_left_by_an_exited_holder_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        // Another open file description holds the lock, and the pid it names has exited
        // (a child of the old agent between fork and exec holds it like this).
        let held = StateLock::open(dir.path(), true).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        std::fs::write(held.path(), format!("{}\n", gone.id())).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let t0 = std::time::Instant::now();
        StateLock::acquire(dir.path()).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(150));
        release.join().unwrap();
    }

    #[test]
    fn a_live_holder_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let _held = StateLock::acquire(dir.path()).unwrap();
        let t0 = std::time::Instant::now();
        assert!(matches!(
            StateLock::acquire(dir.path()),
            Err(LockError::Held { .. })
        ));
        assert!(t0.elapsed() < DEAD_HOLDER_WAIT);
    }

    #[test]
    fn a_symlinked_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(
            StateLock::acquire(dir.path()),
            Err(LockError::Io { .. })
        ));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
