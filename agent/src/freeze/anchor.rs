//! The freeze state's high-water mark, kept outside the lifecycle files so that putting
//! back older copies of them is noticed (issue 14 item 10, docs/threat-model.md).
//!
//! Every save of the lifecycle state (generation N) is followed by writing an anchor —
//! generation N, the trusted time, the licenses not running — sealed (HMAC-SHA256) under
//! the device key into places the lifecycle files do not live in: the trusted-time file and
//! the usage directory. The lifecycle body lists the places that held an anchor when it was
//! written. At start, an anchor *ahead* of the lifecycle state, or a listed place whose
//! anchor is gone or does not verify, means a subset of the state was restored or removed.
//! An anchor *behind* is normal (a crash between the two writes).
//!
//! Pure: sealing, unsealing and the judgement; the files are read and written by the
//! callers.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::license::format::hex;

/// Domain separation: an anchor's MAC can never pass for a lifecycle file's, or the reverse.
const CONTEXT: &[u8] = b"kooagent freeze anchor v1\n";

/// The places: the trusted-time file, and `usage/freeze.anchor`.
pub const TIME: &str = "time";
pub const USAGE: &str = "usage";

/// One anchor's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The lifecycle generation just saved.
    pub generation: u64,
    /// The trusted time then (restores the rollback mark if the time file goes).
    pub time_mark: i64,
    /// Licenses not allowed to run at that generation (for the tamper reason).
    pub stopped: Vec<String>,
    /// The TPM counter value sealed with that generation (`tpm_anchor.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
}

fn tag(key: &[u8; 32], body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(CONTEXT);
    m.update(body);
    m
}

/// `<json body> <hex MAC>` on one line.
pub fn seal(key: &[u8; 32], a: &Anchor) -> String {
    let body = serde_json::to_string(a).expect("anchor encodes");
    let mac = tag(key, body.as_bytes()).finalize().into_bytes();
    format!("{body} {}", hex(&mac))
}

pub fn unseal(key: &[u8; 32], text: &str) -> Result<Anchor, String> {
    let text = text.trim_end_matches('\n');
    let (body, mac) = text
        .rsplit_once(' ')
        .ok_or_else(|| "no MAC (truncated)".to_string())?;
    let mac = (0..mac.len())
        .step_by(2)
        .map(|i| {
            mac.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|t| t.len() == 32)
        .ok_or_else(|| "the MAC is damaged".to_string())?;
    tag(key, body.as_bytes())
        .verify_slice(&mac)
        .map_err(|_| "the MAC does not match (edited, or sealed under another device key)")?;
    serde_json::from_str(body).map_err(|e| format!("unreadable: {e}"))
}

/// What one place held at start.
#[derive(Debug)]
pub enum Found {
    Missing,
    Bad(String),
    Good(Anchor),
}

/// The verdict over the lifecycle state and every place's anchor.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// The highest generation anywhere: the next save must go past it.
    pub high_water: u64,
    /// The highest trusted time any anchor recorded.
    pub time_mark: Option<i64>,
    /// Why the state is not to be trusted.
    pub tamper: Option<String>,
    /// The highest TPM counter value any valid anchor sealed.
    pub tpm: Option<u64>,
}

/// `generation`: the lifecycle state's; `expected`: the places its body lists; `found`:
/// each place's name and what it held.
pub fn judge(generation: u64, expected: &[String], found: &[(&str, Found)]) -> Judgement {
    let mut j = Judgement {
        high_water: generation,
        ..Judgement::default()
    };
    let mut why = Vec::new();
    for (place, f) in found {
        let listed = expected.iter().any(|e| e == place);
        match f {
            Found::Good(a) => {
                j.high_water = j.high_water.max(a.generation);
                j.time_mark = Some(j.time_mark.map_or(a.time_mark, |t| t.max(a.time_mark)));
                j.tpm = j.tpm.max(a.tpm);
                if a.generation > generation {
                    let stopped = if a.stopped.is_empty() {
                        String::new()
                    } else {
                        format!(" (then not running: {})", a.stopped.join(", "))
                    };
                    why.push(format!(
                        "the freeze state is generation {generation} but the {place} anchor \
                         records generation {}{stopped}: an older copy was put back",
                        a.generation
                    ));
                }
            }
            Found::Missing if listed => why.push(format!(
                "the {place} anchor of the freeze state was removed"
            )),
            Found::Bad(e) if listed => why.push(format!(
                "the {place} anchor of the freeze state is invalid: {e}"
            )),
            // Not listed: written after this state (a crash in between) or never yet.
            Found::Missing | Found::Bad(_) => {}
        }
    }
    if !why.is_empty() {
        j.tamper = Some(why.join("; "));
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(generation: u64) -> Anchor {
        Anchor {
            generation,
            time_mark: 1000 + generation as i64,
            stopped: vec!["L".into()],
            tpm: None,
        }
    }

    #[test]
    fn seal_round_trips_and_edits_fail() {
        let k = [7; 32];
        let s = seal(&k, &a(3));
        assert_eq!(unseal(&k, &s).unwrap(), a(3));
        assert!(unseal(&[8; 32], &s)
            .unwrap_err()
            .contains("MAC does not match"));
        let edited = s.replace("\"generation\":3", "\"generation\":9");
        assert!(unseal(&k, &edited).is_err());
        assert!(unseal(&k, &s[..s.len() / 2]).is_err());
    }

    #[test]
    fn anchors_behind_are_a_crash_anchors_ahead_a_restore() {
        let exp = vec!["time".to_string(), "usage".to_string()];
        let j = judge(
            5,
            &exp,
            &[("time", Found::Good(a(4))), ("usage", Found::Good(a(5)))],
        );
        assert_eq!((j.high_water, j.tamper), (5, None));
        assert_eq!(j.time_mark, Some(1005));
        let j = judge(
            3,
            &exp,
            &[("time", Found::Good(a(5))), ("usage", Found::Good(a(5)))],
        );
        assert_eq!(j.high_water, 5);
        assert!(j.tamper.unwrap().contains("older copy"));
    }

    #[test]
    fn a_listed_place_missing_or_bad_is_tamper_an_unlisted_one_is_not() {
        let exp = vec!["usage".to_string()];
        let j = judge(
            2,
            &exp,
            &[("time", Found::Missing), ("usage", Found::Missing)],
        );
        assert!(j.tamper.unwrap().contains("usage anchor"));
        let j = judge(2, &exp, &[("usage", Found::Bad("x".into()))]);
        assert!(j.tamper.unwrap().contains("invalid"));
        let j = judge(
            2,
            &[],
            &[("time", Found::Missing), ("usage", Found::Bad("x".into()))],
        );
        assert_eq!(j.tamper, None);
    }
}
