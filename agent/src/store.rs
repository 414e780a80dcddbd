//! The state directory's durability primitives: every file that matters is replaced
//! atomically (write a temporary sibling, fsync it, rename over, fsync the directory), so a
//! crash leaves either the old or the new content, never a torn mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct StoreError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl StoreError {
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// True when the failure was the disk being full (or over quota).
    pub fn is_disk_full(&self) -> bool {
        crate::sys::is_disk_full(&self.source)
    }
}

/// Creates `dir` (and parents) and sets its mode. An existing directory keeps its owner
/// but gets the mode, so a state directory created loosely is tightened on start.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|e| StoreError::new("create directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::new("set mode of", dir, e))
}

/// Atomically replaces `path` with `bytes`, created with `mode`.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| StoreError::new("create", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| StoreError::new("write", &tmp, e))?;
        f.sync_all()
            .map_err(|e| StoreError::new("fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| StoreError::new("rename into", path, e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory so a rename or create inside it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::new("fsync directory", dir, e))
}

/// Reads a file, mapping "not found" to `None`.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::new("read", path, e)),
    }
}

/// Moves a file that failed to parse aside (`name.corrupt.<unix>`), so the evidence is
/// kept and never silently overwritten by defaults.
pub fn quarantine(path: &Path, now_unix: i64) -> Result<PathBuf, StoreError> {
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt.{now_unix}"));
    let target = PathBuf::from(target);
    fs::rename(path, &target).map_err(|e| StoreError::new("quarantine", path, e))?;
    Ok(target)
}

/// An exclusive advisory lock (flock) held until dropped.
pub struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    /// Blocks until the lock on `path` (created if needed, mode 0600) is held.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        crate::sys::lock_exclusive(&f)?;
        Ok(FileLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        atomic_write(&p, b"one", 0o600).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let _l = FileLock::acquire(&dir.path().join("state.lock")).unwrap();
        assert_eq!(read_optional(&dir.path().join("nope")).unwrap(), None);
    }

    #[test]
    fn quarantine_keeps_evidence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        fs::write(&p, b"garbage").unwrap();
        let q = quarantine(&p, 42).unwrap();
        assert!(q.ends_with("x.json.corrupt.42"));
        assert_eq!(fs::read(q).unwrap(), b"garbage");
    }
}
