//! `kooagent seller ARGS`: a forward to the `kooagent-seller` binary.

use std::path::PathBuf;

use super::flags::FirstFlags;

/// `kooagent seller ARGS`: the seller's tools left the device binary for their own,
/// `kooagent-seller` (docs/seller-server.md); this runs it with the same arguments, the
/// flags written before `seller` first, so that scripts keep working. Only returns on
/// failure.
pub(crate) fn forward(first: &FirstFlags, args: Vec<std::ffi::OsString>) -> anyhow::Error {
    if first.socket.is_some() || first.state_dir.is_some() {
        return anyhow::anyhow!(
            "--socket and --state-dir are the agent's flags; the seller's commands do \
             not take them"
        );
    }
    use std::os::unix::process::CommandExt;
    const SELLER_BIN: &str = "kooagent-seller";
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(SELLER_BIN)))
        .filter(|p| p.is_file());
    let program = beside.clone().unwrap_or_else(|| PathBuf::from(SELLER_BIN));
    let mut cmd = std::process::Command::new(&program);
    if let Some(c) = &first.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(l) = &first.log_level {
        cmd.arg("--log-level").arg(l);
    }
    let e = cmd.args(args).exec();
    if e.kind() == std::io::ErrorKind::NotFound && beside.is_none() {
        anyhow::anyhow!(
            "the seller's commands are the {SELLER_BIN} binary, found neither next to kooagent \
             nor in PATH: install it (docs/seller-server.md) or run it directly"
        )
    } else {
        anyhow::anyhow!("running {}: {e}", program.display())
    }
}
