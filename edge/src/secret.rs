//! The seller's interconnection key: read from a root-only file, held only in memory,
//! never printed (its `Debug` is redacted; errors name the file, never the content).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Reads the key from `path`. Refused: a file others can read or write, a file owned
    /// by another user, an empty file. Surrounding whitespace (a trailing newline) is not
    /// part of the key.
    pub fn load(path: &Path) -> Result<Secret, String> {
        Secret::load_as(path, "usage.key_file")
    }

    /// The same, with errors naming the configuration key `key`.
    pub fn load_as(path: &Path, key: &str) -> Result<Secret, String> {
        let name = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("{key} {name}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{key} {name}: not a regular file"));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{key} {name}: readable or writable by group or others (mode {mode:04o}); \
                 run chmod 600 on it"
            ));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(format!(
                "{key} {name}: owned by uid {}, not by root or the agent (uid {me})",
                meta.uid()
            ));
        }
        let mut raw = std::fs::read(path).map_err(|e| format!("{key} {name}: {e}"))?;
        let secret = raw.trim_ascii().to_vec();
        raw.iter_mut().for_each(|b| *b = 0);
        if secret.is_empty() {
            return Err(format!("{key} {name}: is empty"));
        }
        Ok(Secret(secret))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Don't leave the key in freed memory (zeroize: writes the compiler cannot drop).
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn loads_a_private_key_file_and_never_shows_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        std::fs::write(&p, "s3cret-key\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::load(&p).unwrap_err();
        assert!(e.contains("0644") && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = Secret::load(&p).unwrap();
        assert_eq!(k.expose(), b"s3cret-key");
        assert!(!format!("{k:?}").contains("s3cret"));
        std::fs::write(&p, "\n").unwrap();
        assert!(Secret::load(&p).unwrap_err().contains("empty"));
        assert!(Secret::load(&d.path().join("none"))
            .unwrap_err()
            .contains("usage.key_file"));
    }
}
