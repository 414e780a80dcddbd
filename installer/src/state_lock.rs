//! The agent's state-directory lock (`<state_dir>/agent.lock`, an exclusive flock the
//! running agent holds for its life and whose file holds its pid): the installer checks it
//! before removing the state directory, so `--purge` never deletes a live agent's ledger.
//! Same protocol as `kooagent`'s `state_lock` module; the installer does not link the agent.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The pid of the agent holding `state_dir`'s lock (`"unknown"` if it wrote none), or
/// `None` when nobody holds it. Creates and changes nothing.
pub fn holder(state_dir: &Path) -> io::Result<Option<String>> {
    let path = state_dir.join("agent.lock");
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    // SAFETY: flock(2) on a descriptor owned by `f`; closing `f` releases it.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(None);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let pid = text.trim();
    Ok(Some(if pid.is_empty() {
        "unknown".into()
    } else {
        pid.to_string()
    }))
}
