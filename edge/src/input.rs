//! Reading a license or token the operator names on the command line: a file, or standard
//! input for `-`. Both the agent's CLI (`license install|inspect`, `status --license`) and
//! the seller's (`kooagent-seller inspect|verify`) take them, so they read them alike.

use std::io::Read;
use std::path::{Path, PathBuf};

use kooagent_core::license::format::MAX_LICENSE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading standard input")]
    Stdin(#[source] std::io::Error),
}

/// The bytes of `file` (`-` is standard input), read up to the largest license the format
/// allows plus one byte: an oversized file is not read whole, yet the parser still sees
/// that it is too large and names it.
pub fn read_license_input(file: &Path) -> Result<Vec<u8>, InputError> {
    let limit = MAX_LICENSE_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(InputError::Stdin)?;
    } else {
        let path = || file.to_path_buf();
        std::fs::File::open(file)
            .map_err(|source| InputError::Open {
                path: path(),
                source,
            })?
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(|source| InputError::Read {
                path: path(),
                source,
            })?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_file_is_read_one_byte_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.lic");
        std::fs::write(&big, vec![b'x'; MAX_LICENSE_BYTES * 2]).unwrap();
        assert_eq!(
            read_license_input(&big).unwrap().len(),
            MAX_LICENSE_BYTES + 1
        );
        let small = dir.path().join("small.lic");
        std::fs::write(&small, b"abc").unwrap();
        assert_eq!(read_license_input(&small).unwrap(), b"abc");
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = read_license_input(Path::new("/nonexistent/koo.lic")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/koo.lic"), "{err}");
    }
}
