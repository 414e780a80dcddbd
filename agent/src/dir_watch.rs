//! Watching a drop directory (`licenses/`, `tokens/`) for files others put there: inotify
//! (through `sys`) registered with the runtime, so a quiet directory costs no wakeup. Each
//! service that has a drop directory owns one `DirWatch` and decides what a change means.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;

pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    dir: PathBuf,
    buf: Vec<u8>,
    what: &'static str,
}

/// The names that changed in one batch of events; `None` when the kernel's event queue
/// overflowed (look at the whole directory).
pub type Changed = Option<BTreeSet<String>>;

impl DirWatch {
    /// Watches `dir` (call inside the runtime); `what` names it in the log; `buf` bytes are
    /// read per batch.
    pub fn new(dir: &Path, what: &'static str, buf: usize) -> io::Result<DirWatch> {
        let fd = crate::sys::inotify_watch(dir)?;
        let fd = crate::sys::register(fd, what)
            .ok_or_else(|| io::Error::other("cannot register it with the runtime"))?;
        Ok(DirWatch {
            fd,
            dir: dir.to_path_buf(),
            buf: vec![0; buf],
            what,
        })
    }

    /// Waits for the next batch of events that names something (a regular file still
    /// being written does not). `None` when the watch broke (logged).
    pub async fn next(&mut self) -> Option<Changed> {
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    log::error!("{} watch failed: {e}", self.what);
                    return None;
                }
            };
            let mut names = Some(BTreeSet::new());
            let mut got = false;
            loop {
                match guard.try_io(|fd| crate::sys::read_fd(fd.get_ref(), &mut self.buf)) {
                    Ok(Ok(n)) => {
                        crate::sys::parse_inotify(&self.buf[..n], &mut names, &self.dir);
                        got = true;
                    }
                    Ok(Err(e)) => {
                        log::error!("reading {} events: {e}", self.what);
                        return None;
                    }
                    Err(_would_block) => break,
                }
            }
            if got && names.as_ref().is_none_or(|n| !n.is_empty()) {
                return Some(names);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_written_file_is_named_and_a_file_being_written_is_not() {
        let d = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new(d.path(), "test directory", 4096).unwrap();
        // Created and still open: nothing yet.
        let f = std::fs::File::create(d.path().join("a.tok")).unwrap();
        let early = tokio::time::timeout(Duration::from_millis(100), w.next()).await;
        assert!(early.is_err(), "woke for a file still being written");
        drop(f);
        let names = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("the closed file is reported")
            .expect("the watch works")
            .expect("no overflow");
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["a.tok"]);
    }
}
