//! Reading what others drop into `tokens/` and `licenses/`. Whoever can write there is not
//! trusted with the agent's memory or its blocking thread: a symlink to `/dev/zero`, a
//! FIFO nobody writes, a file that keeps growing. So a dropped file is opened without
//! following symlinks and without blocking, must be a regular file, and is read up to a cap.
//! What is refused is renamed `<name>.rejected`, so the refusal is logged once.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DropError {
    #[error("it is a symbolic link; dropped files are never followed")]
    Symlink,
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it is larger than the {cap}-byte limit")]
    TooLarge { cap: usize },
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
}

impl DropError {
    /// The file went away between listing and reading: nothing to refuse.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DropError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Reads the regular file at `path`, at most `cap` bytes.
pub fn read(path: &Path, cap: usize) -> Result<Vec<u8>, DropError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(crate::sys::O_NOFOLLOW | crate::sys::O_NONBLOCK_NOCTTY)
        .open(path)
        .map_err(|e| {
            if crate::sys::is_symlink_refused(&e) {
                DropError::Symlink
            } else {
                DropError::Io(e)
            }
        })?;
    let meta = f.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        return Err(DropError::NotRegular(if t.is_fifo() {
            "FIFO"
        } else if t.is_dir() {
            "directory"
        } else if t.is_char_device() || t.is_block_device() {
            "device"
        } else if t.is_socket() {
            "socket"
        } else {
            "special file"
        }));
    }
    if meta.len() > cap as u64 {
        return Err(DropError::TooLarge { cap });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // The file may grow while being read: never take more than the cap.
    f.take(cap as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > cap {
        return Err(DropError::TooLarge { cap });
    }
    Ok(buf)
}

/// Renames `path` to `<path>.rejected` (the symlink or FIFO itself, never its target).
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(".rejected");
    let to = PathBuf::from(to);
    std::fs::rename(path, &to)?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("a.tok");
        std::fs::write(&ok, b"hello").unwrap();
        assert_eq!(read(&ok, 5).unwrap(), b"hello");
        assert!(matches!(read(&ok, 4), Err(DropError::TooLarge { cap: 4 })));

        let link = d.path().join("zero.tok");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(read(&link, 1 << 20), Err(DropError::Symlink)));

        let fifo = d.path().join("fifo.tok");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Returns at once (O_NONBLOCK) instead of waiting for a writer.
        assert!(matches!(
            read(&fifo, 1 << 20),
            Err(DropError::NotRegular("FIFO"))
        ));
        let aside = set_aside(&fifo).unwrap();
        assert!(aside.ends_with("fifo.tok.rejected"));
        assert!(std::fs::symlink_metadata(&aside)
            .unwrap()
            .file_type()
            .is_fifo());

        assert!(read(&d.path().join("gone.tok"), 10)
            .unwrap_err()
            .is_not_found());
    }
}
