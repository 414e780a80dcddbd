//! The freeze high-water mark anchored in a TPM 2.0 NV monotonic counter (issue 14 item 11,
//! docs/threat-model.md "TPM 2.0 anchor"): the one anchor a restore of the whole state
//! directory cannot put back.
//!
//! When the mark rises (a license changes phase, or tampering was found), the save seals
//! the counter's *next* value c+1 into the state and the anchors, and only then increments
//! the counter: a crash in between leaves the state one ahead of the TPM (caught up at the
//! next start), never behind. At start, a state sealing a value *below* the counter was put
//! back from an older copy. Saves in between seal the current value: the counter is
//! written only when the mark rises (NV wear), never per save.
//!
//! Pure: the judgement ([`judge`]). The TPM is spoken to by [`Anchor`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tpm::{self, Tpm};

/// Owner-defined NV indices (TCG handle registry).
pub const OWNER_NV_RANGE: std::ops::RangeInclusive<u32> = 0x0180_0000..=0x01BF_FFFF;
/// "KA" in the owner range.
pub const DEFAULT_NV_INDEX: u32 = 0x0180_4B41;

/// `[freeze] tpm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Use a TPM where one answers; without one, as if off (logged).
    #[default]
    Auto,
    Off,
    /// Without a reachable TPM a restore cannot be ruled out: every license is frozen as
    /// tampered until a newer token or license arrives.
    Required,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Off => "off",
            Mode::Required => "required",
        }
    }
}

/// The state's sealed value against the counter, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The state is the one the counter last anchored.
    Match,
    /// The state never sealed a value (first use of the TPM): anchor it now.
    First,
    /// One ahead: a crash between saving the state and incrementing. Catch up.
    CatchUp,
    /// Not the counter the state was anchored in (a clone's new vTPM, a replaced or
    /// cleared TPM, the index deleted and defined again): anchor anew, not tampering.
    Reanchor(String),
    /// The state is older than the counter: restored from an older copy.
    Restored(String),
}

impl Verdict {
    /// Whether the first save must raise the mark (seal c+1 and increment).
    pub fn raise(&self) -> bool {
        !matches!(self, Verdict::Match)
    }
}

/// `sealed`: the highest value the state and its anchors sealed; `counter`: the TPM's.
pub fn judge(sealed: Option<u64>, counter: tpm::Counter) -> Verdict {
    let c = counter.value;
    match sealed {
        None => Verdict::First,
        Some(s) if counter.fresh => Verdict::Reanchor(format!(
            "the state was anchored at TPM counter value {s} but this TPM had no counter \
             (a clone's new TPM, or a replaced or cleared one)"
        )),
        Some(s) if s < c => Verdict::Restored(format!(
            "the freeze state was sealed at TPM counter value {s} but the TPM's counter is \
             at {c}: the state directory was put back from an older copy"
        )),
        Some(s) if s == c => Verdict::Match,
        Some(s) if s == c + 1 => Verdict::CatchUp,
        Some(s) => Verdict::Reanchor(format!(
            "the state was sealed at TPM counter value {s} but the TPM's counter is only at \
             {c}: not the counter the state was anchored in"
        )),
    }
}

/// A TPM counter in use.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub path: PathBuf,
    pub index: u32,
    /// The counter's value as last read or incremented.
    pub counter: u64,
    /// An increment failed and the value could not be read back: the counter is `counter`
    /// or one more (an answer lost after the TPM acted).
    pub unsure: bool,
}

impl Anchor {
    /// Opens the TPM `configured` names (or the default devices) and reads (defining if
    /// needed) the counter.
    pub fn open(configured: &Path, index: u32) -> Result<(Anchor, tpm::Counter), tpm::TpmError> {
        let path = tpm::locate(configured).ok_or(tpm::TpmError::NoDevice)?;
        let mut t = Tpm::open(&path)?;
        let c = t.counter(index)?;
        Ok((
            Anchor {
                path,
                index,
                counter: c.value,
                unsure: false,
            },
            c,
        ))
    }

    /// The value a save that does not raise the mark seals: never below the counter (that
    /// would read as a restore), so the higher one when unsure.
    pub fn sealed(&self) -> u64 {
        self.counter + u64::from(self.unsure)
    }

    /// Reads the counter again (before a raise: the last increment may have been lost).
    pub fn refresh(&mut self) -> Result<(), tpm::TpmError> {
        let mut t = Tpm::open(&self.path)?;
        self.counter = t.read(self.index)?;
        self.unsure = false;
        Ok(())
    }

    /// After the state sealing `counter + 1` is saved: increments the counter. On an error
    /// the counter is read back if possible; else it is unsure (see [`Anchor::sealed`]).
    pub fn increment(&mut self) -> Result<(), tpm::TpmError> {
        let done = Tpm::open(&self.path).and_then(|mut t| {
            t.increment(self.index)?;
            t.read(self.index)
        });
        match done {
            Ok(v) => {
                self.counter = v;
                self.unsure = false;
                Ok(())
            }
            Err(e) => {
                if self.refresh().is_err() {
                    self.unsure = true;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(value: u64, fresh: bool) -> tpm::Counter {
        tpm::Counter { value, fresh }
    }

    #[test]
    fn below_the_counter_is_a_restore_one_ahead_a_crash() {
        assert_eq!(judge(Some(7), c(7, false)), Verdict::Match);
        assert!(!Verdict::Match.raise());
        assert!(
            matches!(judge(Some(6), c(7, false)), Verdict::Restored(w) if w.contains("older copy"))
        );
        assert_eq!(judge(Some(8), c(7, false)), Verdict::CatchUp);
        assert!(Verdict::CatchUp.raise());
        assert!(matches!(judge(Some(12), c(7, false)), Verdict::Reanchor(_)));
    }

    #[test]
    fn a_new_tpm_or_a_first_use_is_anchored_not_tampering() {
        assert_eq!(judge(None, c(3, false)), Verdict::First);
        assert_eq!(judge(None, c(0, true)), Verdict::First);
        // A clone's fresh vTPM: the state sealed 9, the new counter starts anywhere.
        assert!(matches!(judge(Some(9), c(0, true)), Verdict::Reanchor(w) if w.contains("clone")));
        assert!(matches!(judge(Some(1), c(40, true)), Verdict::Reanchor(_)));
    }

    #[test]
    fn mode_is_lowercase_in_the_config() {
        #[derive(Deserialize)]
        struct T {
            tpm: Mode,
        }
        let t: T = toml::from_str("tpm = \"required\"").unwrap();
        assert_eq!(t.tpm, Mode::Required);
        assert!(toml::from_str::<T>("tpm = \"yes\"").is_err());
    }
}
