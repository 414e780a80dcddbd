//! `kooagent image-prep`: run by the seller right before capturing a private image. Every
//! VM started from the image must compute its own identity and start with its own keys and
//! an empty ledger, so everything per-instance is removed; usage not yet delivered stops
//! it (unless forced), because the image would otherwise bill it from every clone, or lose
//! it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::clock::SystemClock;
use crate::config::Config;
use crate::usage::ledger::{Ledger, LedgerConfig};

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("the agent is running (it answers on {0}); stop it first (systemctl stop kooagent), so nothing is written back")]
    AgentRunning(PathBuf),
    #[error(transparent)]
    Locked(#[from] crate::state_lock::LockError),
    #[error("{0} of usage not delivered yet; run `kooagent usage flush` while the agent runs, or pass --force to drop it")]
    Undelivered(String),
    #[error("usage ledger: {0}")]
    Ledger(String),
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What was (or, with `dry_run`, would be) removed and kept.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub removed: Vec<PathBuf>,
    pub kept: Vec<String>,
    pub notes: Vec<String>,
}

/// Per-instance state, relative to the state directory.
const PER_INSTANCE: &[&str] = &[
    "identity.json",
    "identity.lock",
    "device.key",
    "relay.key",
    "authcodes.json",
    "lifecycle.json",
    "lifecycle.json.bak",
    "tokens",
    "usage",
    "agent.log",
];

pub fn run(cfg: &Config, force: bool, dry_run: bool) -> Result<Report, PrepError> {
    if std::os::unix::net::UnixStream::connect(&cfg.socket.path).is_ok() {
        return Err(PrepError::AgentRunning(cfg.socket.path.clone()));
    }
    let state = &cfg.agent.state_dir;
    // An agent on another socket still owns this state: the lock is the real guard, held
    // while the files go so none can start half-way.
    let _lock = if dry_run || !state.is_dir() {
        crate::state_lock::StateLock::check(state)?;
        None
    } else {
        Some(crate::state_lock::StateLock::acquire(state)?)
    };
    let mut report = Report::default();
    if let Some(undelivered) = undelivered_usage(&state.join("usage"), cfg.usage.max_bytes)? {
        if !force && dry_run {
            // A dry run shows everything, the refusal included (issue 20: on a build VM
            // with uploading off it refused before showing anything).
            report.notes.push(format!(
                "without --force the prep would stop here: {undelivered} of usage not \
                 delivered yet (run `kooagent usage flush` while the agent runs, or pass \
                 --force to drop it)"
            ));
        } else if !force {
            return Err(PrepError::Undelivered(undelivered));
        } else {
            report.notes.push(format!(
                "dropped undelivered usage (--force): {undelivered}"
            ));
        }
    }
    let mut targets: Vec<PathBuf> = PER_INSTANCE.iter().map(|p| state.join(p)).collect();
    targets.extend(bound_licenses(&state.join("licenses"), &mut report));
    targets.push(cfg.socket.path.clone());
    targets.push(cfg.agent.pidfile.clone());
    for path in targets {
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        if !dry_run {
            let r = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(|source| PrepError::Remove {
                path: path.clone(),
                source,
            })?;
        }
        report.removed.push(path);
    }
    let time_file = crate::license::time_file(state);
    if time_file.exists() {
        // The mark stays; the freeze anchor sealed with it is this device's (under the key
        // removed above) and would read as damage on every clone.
        let stripped = if dry_run {
            crate::license::trusted_time::read_anchor(&time_file).is_ok_and(|a| a.is_some())
        } else {
            crate::license::trusted_time::strip_anchor(&time_file).map_err(|e| {
                PrepError::Remove {
                    path: time_file.clone(),
                    source: e.source,
                }
            })?
        };
        report.kept.push(format!(
            "time.json: the trusted-time mark (clones can only be later than the capture){}",
            if stripped {
                "; its freeze anchor (this device's) removed"
            } else {
                ""
            }
        ));
    }
    let mid = cfg.identity.root.join("etc/machine-id");
    if std::fs::metadata(&mid)
        .map(|m| m.len() > 0)
        .unwrap_or(false)
    {
        report.notes.push(format!(
            "{} is set: every clone would share it. systemd advises images to ship it empty \
             (truncate -s 0 /etc/machine-id) so each instance gets its own on first boot",
            mid.display()
        ));
    }
    Ok(report)
}

/// A description of the usage still to deliver, or `None` when everything was delivered.
fn undelivered_usage(dir: &Path, max_bytes: u64) -> Result<Option<String>, PrepError> {
    if !dir.exists() {
        return Ok(None);
    }
    let ledger = Ledger::start(
        LedgerConfig {
            dir: dir.to_path_buf(),
            max_bytes,
        },
        Arc::new(SystemClock),
    );
    if !ledger.wait_open(Duration::from_secs(30)) {
        ledger.stop();
        return Err(PrepError::Ledger("could not be opened within 30 s".into()));
    }
    let (pending, open_hours) = {
        let st = ledger.state();
        (st.count().0, st.open.len())
    };
    ledger.stop();
    Ok((pending > 0 || open_hours > 0).then(|| {
        format!("{pending} hourly record(s) pending and {open_hours} meter-hour(s) still open")
    }))
}

/// Licenses bound to this device: useless on a clone (they answer `wrong_device` there),
/// so they go. Unbound licenses (a trial for every instance, say) stay.
fn bound_licenses(dir: &Path, report: &mut Report) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let unbound = std::fs::read(&path)
            .ok()
            .and_then(|b| crate::license::format::parse(&b).ok())
            .map(|p| p.license.unbound);
        match unbound {
            Some(true) => report
                .kept
                .push(format!("{}: an unbound license", path.display())),
            _ => out.push(path),
        }
    }
    out
}

/// The agent configuration of the image tree at `root` (`--root`): its
/// `etc/kooagent/agent.toml` (or `file`), with every path moved inside the tree. Paths the
/// file leaves out take the image's defaults, the FHS ones (its agent runs as root), not
/// the defaults of whoever runs the prep.
pub fn config_for_root(
    root: &Path,
    file: Option<&Path>,
) -> Result<crate::config::Config, crate::config::ConfigError> {
    use crate::config::{Origin, Overrides};
    let in_tree = root.join("etc/kooagent/agent.toml");
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| in_tree.exists().then_some(in_tree));
    let loaded = match &file {
        Some(f) => crate::config::load(Some(f), &Overrides::default())?,
        None => crate::config::load(Some(Path::new("/dev/null")), &Overrides::default())?,
    };
    let mut cfg = loaded.config.clone();
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let pick = |key: &str, set: &Path, fhs: &str| {
        if loaded.origin(key) == Origin::Default {
            inside(Path::new(fhs))
        } else {
            inside(set)
        }
    };
    cfg.agent.state_dir = pick("agent.state_dir", &cfg.agent.state_dir, "/var/lib/kooagent");
    cfg.socket.path = pick("socket.path", &cfg.socket.path, "/run/kooagent/agent.sock");
    cfg.agent.pidfile = pick(
        "agent.pidfile",
        &cfg.agent.pidfile,
        "/run/kooagent/kooagent.pid",
    );
    cfg.identity.root = inside(&cfg.identity.root);
    Ok(cfg)
}
