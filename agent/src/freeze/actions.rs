//! What the agent does to make a freeze real: stop systemd units (and start them again on
//! unfreeze) and run a command with the license id and state in its environment.
//!
//! Once per transition: a journal (`<state_dir>/freeze-actions.json`) remembers, per
//! license, which side (stopped / running) the actions last brought it to, in which boot,
//! and with what result. After a reboot a frozen license's actions run again (the units may
//! have started at boot); an agent restart alone runs nothing that already ran.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Stopped,
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub side: Side,
    /// The lifecycle phase and its `since`, identifying the transition acted on.
    pub state: String,
    pub since: i64,
    pub boot_id: String,
    pub at: i64,
    /// Failures of the last run (empty: all succeeded).
    pub errors: Vec<String>,
}

pub type Journal = BTreeMap<String, Done>;

/// One license's wanted side now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub license_id: String,
    pub side: Side,
    pub state: String,
    pub since: i64,
}

/// Which licenses need their actions run: a transition not yet acted on, or (after a
/// reboot) a license that should be stopped. Running licenses never acted on need nothing:
/// the units run by default.
pub fn plan(journal: &Journal, wants: &[Want], boot_id: &str) -> Vec<Want> {
    wants
        .iter()
        .filter(|w| match journal.get(&w.license_id) {
            None => w.side == Side::Stopped,
            Some(d) => {
                d.side != w.side
                    || (w.side == Side::Stopped && (d.since != w.since || d.boot_id != boot_id))
            }
        })
        .cloned()
        .collect()
}

/// `[freeze]` action settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionConfig {
    pub systemctl: PathBuf,
    pub units: Vec<String>,
    pub command: Vec<String>,
    pub timeout: Duration,
}

impl ActionConfig {
    pub fn is_empty(&self) -> bool {
        self.units.is_empty() && self.command.is_empty()
    }
}

fn run(mut cmd: Command, what: &str, timeout: Duration) -> Result<(), String> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.by_ref().take(2048).read_to_string(&mut err);
                }
                return Err(format!("{what}: {status}: {}", err.trim()));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after {timeout:?}, killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// Runs the actions for one license (blocking). Returns the failures.
pub fn execute(cfg: &ActionConfig, w: &Want) -> Vec<String> {
    let mut errors = Vec::new();
    let verb = match w.side {
        Side::Stopped => "stop",
        Side::Running => "start",
    };
    for unit in &cfg.units {
        let mut c = Command::new(&cfg.systemctl);
        c.arg(verb).arg(unit);
        if let Err(e) = run(c, &format!("systemctl {verb} {unit}"), cfg.timeout) {
            errors.push(e);
        }
    }
    if let Some((prog, args)) = cfg.command.split_first() {
        let mut c = Command::new(prog);
        c.args(args)
            .env("KOOAGENT_LICENSE_ID", &w.license_id)
            .env("KOOAGENT_STATE", &w.state);
        if let Err(e) = run(c, prog, cfg.timeout) {
            errors.push(e);
        }
    }
    errors
}

pub fn journal_path(state_dir: &Path) -> PathBuf {
    state_dir.join("freeze-actions.json")
}

pub fn load_journal(path: &Path) -> Journal {
    match store::read_optional(path) {
        Ok(Some(b)) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            // Losing the journal only means actions run once more: safe.
            log::warn!("{}: {e}; actions will be re-applied", path.display());
            Journal::new()
        }),
        Ok(None) => Journal::new(),
        Err(e) => {
            log::warn!("{e}; actions will be re-applied");
            Journal::new()
        }
    }
}

pub fn save_journal(path: &Path, j: &Journal) -> Result<(), store::StoreError> {
    store::atomic_write(
        path,
        &serde_json::to_vec_pretty(j).expect("journal encodes"),
        0o600,
    )
}

/// This boot's id (changes at every reboot). Under systemd's `ProcSubset=pid` /proc/sys is
/// hidden: then the copy `kooagent prestart` left in /run/kooagent (a tmpfs: gone at reboot).
pub fn boot_id() -> String {
    [
        "/proc/sys/kernel/random/boot_id",
        crate::device_code::BOOT_ID_FILE,
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .map(|s| s.trim().to_string())
    .find(|s| !s.is_empty())
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(side: Side, since: i64) -> Want {
        Want {
            license_id: "L".into(),
            side,
            state: if side == Side::Stopped {
                "frozen"
            } else {
                "active"
            }
            .into(),
            since,
        }
    }

    fn done(side: Side, since: i64, boot: &str) -> Journal {
        [(
            "L".to_string(),
            Done {
                side,
                state: String::new(),
                since,
                boot_id: boot.into(),
                at: 0,
                errors: vec![],
            },
        )]
        .into_iter()
        .collect()
    }

    #[test]
    fn once_per_transition_and_again_after_reboot() {
        // Never acted on: a freeze acts, a running license does not.
        assert_eq!(
            plan(&Journal::new(), &[want(Side::Stopped, 5)], "b1").len(),
            1
        );
        assert!(plan(&Journal::new(), &[want(Side::Running, 5)], "b1").is_empty());
        // Already acted on in this boot: nothing (an agent restart).
        let j = done(Side::Stopped, 5, "b1");
        assert!(plan(&j, &[want(Side::Stopped, 5)], "b1").is_empty());
        // Rebooted while frozen: again.
        assert_eq!(plan(&j, &[want(Side::Stopped, 5)], "b2").len(), 1);
        // Unfrozen: the start actions, once.
        assert_eq!(plan(&j, &[want(Side::Running, 9)], "b1").len(), 1);
        let j = done(Side::Running, 9, "b1");
        assert!(plan(&j, &[want(Side::Running, 9)], "b2").is_empty());
        // Frozen again later (another transition): acts.
        let j = done(Side::Stopped, 5, "b1");
        assert_eq!(plan(&j, &[want(Side::Stopped, 20)], "b1").len(), 1);
    }

    #[test]
    fn runs_units_and_the_command_with_env_and_reports_failures() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let fake = d.path().join("systemctl");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n[ \"$2\" != bad.service ]\n",
                log.display()
            ),
        )
        .unwrap();
        let hook = d.path().join("hook");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"hook $1 $KOOAGENT_LICENSE_ID $KOOAGENT_STATE\" >> {}\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for f in [&fake, &hook] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let cfg = ActionConfig {
            systemctl: fake,
            units: vec!["app.service".into(), "bad.service".into()],
            command: vec![hook.display().to_string(), "x".into()],
            timeout: Duration::from_secs(30),
        };
        let errors = execute(&cfg, &want(Side::Stopped, 1));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("systemctl stop bad.service"),
            "{errors:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "stop app.service\nstop bad.service\nhook x L frozen\n"
        );
        let missing = ActionConfig {
            command: vec!["/nonexistent/hook".into()],
            units: vec![],
            ..cfg
        };
        assert!(execute(&missing, &want(Side::Running, 1))[0].contains("cannot start"));
    }
}
