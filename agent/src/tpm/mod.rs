//! A minimal TPM 2.0 client: an NV monotonic counter, and nothing else (the freeze
//! anchor, docs/threat-model.md "TPM 2.0 anchor"). Written out rather than linking the C
//! TSS (`tss-esapi` needs libtss2, which the static build cannot take): five commands.
//!
//! The transport is the kernel's device (`/dev/tpmrm0`, `/dev/tpm0`): one write of a
//! command, one read of its response; or a Unix socket speaking the same raw command
//! stream (`swtpm socket --server type=unixio,...`), for tests and for machines whose TPM
//! is a software sidecar.

pub mod command;

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// The devices tried, in order, when none is configured.
pub const DEVICES: [&str; 2] = ["/dev/tpmrm0", "/dev/tpm0"];
/// Largest response accepted (a TPM's is at most a few KiB).
const MAX_RESPONSE: usize = 8192;
/// A TPM that does not answer within this is treated as unreachable.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum TpmError {
    #[error("no TPM device ({})", DEVICES.join(", "))]
    NoDevice,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: command::ParseError,
    },
    #[error("{path}: TPM2_{command} failed with response code {rc:#x}{hint}")]
    Rc {
        path: PathBuf,
        command: &'static str,
        rc: u32,
        hint: &'static str,
    },
    #[error("{path}: NV index {index:#010x} exists and is not a counter the agent can use (attributes {attributes:#010x}, {size} bytes)")]
    NotOurCounter {
        path: PathBuf,
        index: u32,
        attributes: u32,
        size: u16,
    },
}

enum Link {
    Device(std::fs::File),
    Socket(UnixStream),
}

/// One open TPM.
pub struct Tpm {
    path: PathBuf,
    link: Link,
}

/// The counter as found by [`Tpm::counter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub value: u64,
    /// Defined or first incremented just now: it never held a value before.
    pub fresh: bool,
}

/// The device to use: `configured` when set, else the first of [`DEVICES`] that exists.
pub fn locate(configured: &Path) -> Option<PathBuf> {
    if !configured.as_os_str().is_empty() {
        return Some(configured.to_path_buf());
    }
    DEVICES
        .iter()
        .map(PathBuf::from)
        .find(|p| std::fs::symlink_metadata(p).is_ok())
}

impl Tpm {
    /// Opens the device file, or connects to the socket (and starts the TPM there, which a
    /// simulator may not have been).
    pub fn open(path: &Path) -> Result<Tpm, TpmError> {
        let io = |source| TpmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let link = if meta.file_type().is_socket() {
            let s = UnixStream::connect(path).map_err(io)?;
            s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
            s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
            Link::Socket(s)
        } else {
            Link::Device(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io)?,
            )
        };
        let mut tpm = Tpm {
            path: path.to_path_buf(),
            link,
        };
        if matches!(tpm.link, Link::Socket(_)) {
            let r = tpm.transact(&command::startup_clear())?;
            if r.rc != command::RC_SUCCESS && r.rc != command::RC_INITIALIZE {
                return Err(tpm.rc("Startup", r.rc));
            }
        }
        Ok(tpm)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn rc(&self, command: &'static str, rc: u32) -> TpmError {
        TpmError::Rc {
            path: self.path.clone(),
            command,
            rc,
            hint: if command::is_auth_failure(rc) {
                " (the owner hierarchy has a password: the agent defines its counter with the empty one)"
            } else {
                ""
            },
        }
    }

    fn transact(&mut self, cmd: &[u8]) -> Result<command::Response, TpmError> {
        let io = |source| TpmError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = match &mut self.link {
            Link::Device(f) => {
                f.write_all(cmd).map_err(io)?;
                // A device returns the whole response to one read (older kernels drop
                // what a short read leaves), so read it at once.
                let mut buf = vec![0u8; MAX_RESPONSE];
                let n = f.read(&mut buf).map_err(io)?;
                buf.truncate(n);
                buf
            }
            Link::Socket(s) => {
                s.write_all(cmd).map_err(io)?;
                let mut buf = vec![0u8; 10];
                s.read_exact(&mut buf).map_err(io)?;
                let len = command::response_len(&buf)
                    .map_err(|source| TpmError::Parse {
                        path: self.path.clone(),
                        source,
                    })?
                    .min(MAX_RESPONSE);
                buf.resize(len, 0);
                s.read_exact(&mut buf[10..]).map_err(io)?;
                buf
            }
        };
        command::parse_response(&bytes).map_err(|source| TpmError::Parse {
            path: self.path.clone(),
            source,
        })
    }

    fn parse<T>(&self, r: Result<T, command::ParseError>) -> Result<T, TpmError> {
        r.map_err(|source| TpmError::Parse {
            path: self.path.clone(),
            source,
        })
    }

    /// The counter at `index`: defined (empty authorisation) if missing, incremented once
    /// if it never was (a counter reads only after its first increment), then read.
    pub fn counter(&mut self, index: u32) -> Result<Counter, TpmError> {
        let r = self.transact(&command::nv_read_public(index))?;
        let mut fresh = false;
        if command::is_missing_handle(r.rc) {
            let d = self.transact(&command::nv_define_counter(index))?;
            if d.rc != command::RC_SUCCESS && d.rc != command::RC_NV_DEFINED {
                return Err(self.rc("NV_DefineSpace", d.rc));
            }
            fresh = true;
        } else if r.rc != command::RC_SUCCESS {
            return Err(self.rc("NV_ReadPublic", r.rc));
        } else {
            let p = self.parse(command::parse_nv_public(&r.body))?;
            if !p.is_counter() || !p.agent_usable() {
                return Err(TpmError::NotOurCounter {
                    path: self.path.clone(),
                    index,
                    attributes: p.attributes,
                    size: p.data_size,
                });
            }
        }
        match self.read(index) {
            Err(TpmError::Rc { rc, .. }) if rc == command::RC_NV_UNINITIALIZED => {
                self.increment(index)?;
                Ok(Counter {
                    value: self.read(index)?,
                    fresh: true,
                })
            }
            r => Ok(Counter { value: r?, fresh }),
        }
    }

    pub fn read(&mut self, index: u32) -> Result<u64, TpmError> {
        let r = self.transact(&command::nv_read_counter(index))?;
        if r.rc != command::RC_SUCCESS {
            return Err(self.rc("NV_Read", r.rc));
        }
        self.parse(command::parse_counter(&r.body))
    }

    pub fn increment(&mut self, index: u32) -> Result<(), TpmError> {
        let r = self.transact(&command::nv_increment(index))?;
        if r.rc != command::RC_SUCCESS {
            return Err(self.rc("NV_Increment", r.rc));
        }
        Ok(())
    }
}
