//! The latest trustworthy time the agent has seen: a high-water mark fed by the system
//! clock while running, license issue times (signed by the seller) and the `Date` of
//! upstream responses. It only moves forward and survives restarts
//! (`<state_dir>/time.json`), so turning the clock back — even with the agent stopped —
//! is noticed: a clock more than the tolerance behind the mark is a rollback.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::format_rfc3339;
use crate::store;

/// Where a mark came from (shown in `kooagent status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    SystemClock,
    LicenseIssueTime,
    UpstreamDate,
    /// The freeze state's sealed anchor (the time file was removed or put back older).
    FreezeAnchor,
}

/// How far the in-memory mark may run ahead of the file before it is written again: the
/// clock advancing is not worth an fsync per second, and losing up to this much at a
/// crash only makes a rollback that much easier to miss.
pub const PERSIST_STEP: i64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    v: u32,
    mark: i64,
    /// For people reading the file; `mark` is authoritative.
    mark_utc: String,
    source: Source,
    /// The freeze state's high-water mark, sealed under the device key (freeze/anchor.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    freeze_anchor: Option<String>,
}

#[derive(Debug)]
pub struct TrustedTime {
    path: PathBuf,
    mark: i64,
    source: Source,
    persisted: i64,
    /// The freeze anchor to write with the mark, and the one last written.
    anchor: Option<String>,
    persisted_anchor: Option<String>,
    /// A problem with the file found at load time (kept for `status`).
    pub load_error: Option<String>,
}

/// The freeze anchor kept in the time file at `path`: None when the file or the field is
/// missing, Err when the file is unreadable.
pub fn read_anchor(path: &Path) -> Result<Option<String>, String> {
    match store::read_optional(path) {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => serde_json::from_slice::<File>(&bytes)
            .map(|f| f.freeze_anchor)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Removes the freeze anchor from the time file at `path`, keeping the mark (for
/// `image-prep`: the anchor is sealed under the device key the prep deletes, and records
/// this device's freeze state, which a clone must not inherit). Whether one was removed;
/// a missing or unreadable file is left as it is (the agent reports the latter at start).
pub fn strip_anchor(path: &Path) -> Result<bool, store::StoreError> {
    let Some(bytes) = store::read_optional(path)? else {
        return Ok(false);
    };
    let Ok(mut f) = serde_json::from_slice::<File>(&bytes) else {
        return Ok(false);
    };
    if f.freeze_anchor.take().is_none() {
        return Ok(false);
    }
    let mut bytes = serde_json::to_vec_pretty(&f).expect("time file serialises");
    bytes.push(b'\n');
    store::atomic_write(path, &bytes, 0o600)?;
    Ok(true)
}

impl TrustedTime {
    /// Loads the mark from `path`. A missing file starts at `now`; a corrupt one is moved
    /// aside (evidence kept) and reported, and the mark restarts from `now`: nothing
    /// better is known, and license issue times raise it again as licenses load.
    pub fn load(path: &Path, now: i64) -> TrustedTime {
        let mut t = TrustedTime {
            path: path.to_path_buf(),
            mark: i64::MIN,
            source: Source::SystemClock,
            persisted: i64::MIN,
            anchor: None,
            persisted_anchor: None,
            load_error: None,
        };
        match store::read_optional(path) {
            Ok(None) => {}
            Ok(Some(bytes)) => match serde_json::from_slice::<File>(&bytes) {
                // The two spellings of the mark must agree: a damaged digit in either
                // (found by the crash harness's damage check) is not silently a new mark.
                Ok(f) if f.v == 1 && f.mark_utc != format_rfc3339(f.mark) => {
                    t.load_error = Some(format!(
                        "mark {} and mark_utc {:?} disagree (damaged or edited)",
                        f.mark, f.mark_utc
                    ))
                }
                Ok(f) if f.v == 1 => {
                    t.mark = f.mark;
                    t.source = f.source;
                    t.persisted = f.mark;
                    t.anchor = f.freeze_anchor.clone();
                    t.persisted_anchor = f.freeze_anchor;
                }
                Ok(f) => t.load_error = Some(format!("unknown version {}", f.v)),
                Err(e) => t.load_error = Some(e.to_string()),
            },
            Err(e) => t.load_error = Some(e.to_string()),
        }
        if let Some(e) = &t.load_error {
            let kept = store::quarantine(path, now)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|q| format!("(could not move it aside: {q})"));
            log::error!(
                "trusted time file {} is unreadable ({e}); kept as {kept}; restarting the mark from the clock",
                path.display()
            );
        }
        t.observe(now, Source::SystemClock);
        t
    }

    pub fn mark(&self) -> i64 {
        self.mark
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// Raises the mark to `t` when it is later. Returns whether it moved.
    pub fn observe(&mut self, t: i64, source: Source) -> bool {
        if t > self.mark {
            self.mark = t;
            self.source = source;
            true
        } else {
            false
        }
    }

    /// Sets the freeze anchor written with the mark (at once: see [`Self::needs_persist`]).
    pub fn set_anchor(&mut self, anchor: Option<String>) {
        if anchor.is_some() {
            self.anchor = anchor;
        }
    }

    /// Whether the file is behind the mark by enough to be written, or behind the anchor.
    pub fn needs_persist(&self) -> bool {
        self.mark.saturating_sub(self.persisted) >= PERSIST_STEP
            || (self.source != Source::SystemClock && self.mark > self.persisted)
            || self.anchor != self.persisted_anchor
    }

    /// When the mark (driven by a running clock) will next need writing.
    pub fn next_persist(&self) -> i64 {
        self.persisted.max(self.mark).saturating_add(PERSIST_STEP)
    }

    /// Writes the mark durably.
    pub fn persist(&mut self) -> Result<(), store::StoreError> {
        let f = File {
            v: 1,
            mark: self.mark,
            mark_utc: format_rfc3339(self.mark),
            source: self.source,
            freeze_anchor: self.anchor.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&f).expect("time file serialises");
        bytes.push(b'\n');
        store::atomic_write(&self.path, &bytes, 0o600)?;
        self.persisted = self.mark;
        self.persisted_anchor = self.anchor.clone();
        Ok(())
    }

    /// Persists when due, logging a failure (the in-memory mark still protects this run).
    pub fn persist_if_due(&mut self) {
        if self.needs_persist() {
            if let Err(e) = self.persist() {
                log::warn!("could not save the trusted time: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::verdict::TimeView;

    const DAY: i64 = 86_400;

    #[test]
    fn mark_only_moves_forward_and_survives_restart() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("time.json");
        let mut t = TrustedTime::load(&p, 1_000_000);
        assert_eq!(t.mark(), 1_000_000);
        assert!(t.needs_persist());
        t.persist().unwrap();
        assert!(!t.observe(999_000, Source::SystemClock));
        assert!(t.observe(1_000_000 + 10 * DAY, Source::LicenseIssueTime));
        assert!(t.needs_persist(), "a license issue time is written at once");
        t.persist_if_due();
        // Restart with the clock turned back 9 days: the mark is still 10 days ahead.
        let t2 = TrustedTime::load(&p, 1_000_000 + DAY);
        assert_eq!(t2.mark(), 1_000_000 + 10 * DAY);
        assert_eq!(t2.source(), Source::LicenseIssueTime);
        let view = TimeView {
            now: 1_000_000 + DAY,
            trusted: t2.mark(),
            tolerance: DAY,
        };
        assert_eq!(view.rollback(), Some(9 * DAY));
        // The clock set right again: no rollback.
        let view = TimeView {
            now: 1_000_000 + 9 * DAY,
            ..view
        };
        assert_eq!(view.rollback(), None);
    }

    #[test]
    fn running_clock_is_written_hourly_not_every_second() {
        let d = tempfile::tempdir().unwrap();
        let mut t = TrustedTime::load(&d.path().join("time.json"), 0);
        t.persist().unwrap();
        t.observe(PERSIST_STEP - 1, Source::SystemClock);
        assert!(!t.needs_persist());
        assert_eq!(t.next_persist(), 2 * PERSIST_STEP - 1);
        t.observe(PERSIST_STEP, Source::SystemClock);
        assert!(t.needs_persist());
    }

    #[test]
    fn corrupt_file_is_kept_aside_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("time.json");
        std::fs::write(&p, b"{garbage").unwrap();
        let t = TrustedTime::load(&p, 5000);
        assert!(t.load_error.is_some());
        // A flipped digit still parses: the two spellings of the mark disagree.
        let mut t = TrustedTime::load(&p, 1_000_000);
        t.persist().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replace("1000000", "1000009")).unwrap();
        let t = TrustedTime::load(&p, 5000);
        assert!(
            t.load_error.as_deref().unwrap().contains("disagree"),
            "{:?}",
            t.load_error
        );
        assert_eq!(t.mark(), 5000);
        assert!(std::fs::read_dir(d.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("corrupt")));
    }
}
