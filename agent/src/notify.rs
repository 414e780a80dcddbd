//! systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`. Not running under systemd: a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. "READY=1"). Returns false when there is no notify socket.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET"), state)
}

/// Sends `state` to the notify socket `path` (`$NOTIFY_SOCKET`'s syntax).
fn notify_to(path: Option<std::ffi::OsString>, state: &str) -> io::Result<bool> {
    let Some(path) = path else {
        return Ok(false);
    };
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name)?
    } else {
        SocketAddr::from_pathname(&path)?
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Sends and logs (at debug) a failure; readiness notification must never stop the agent.
pub fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("sd_notify {state:?} failed: {e}");
    }
}

/// `MONOTONIC_USEC` for RELOADING=1 (systemd ≥ 253 wants it with Type=notify-reload).
pub fn monotonic_usec() -> u64 {
    crate::sys::monotonic_usec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.into_os_string()), "READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify_to(None, "READY=1").unwrap());
    }
}
