//! The lifecycle state on disk, tamper-evident (docs/threat-model.md): written to
//! `<state_dir>/lifecycle.json` and a second copy `<state_dir>/licenses/.lifecycle.json`,
//! each the JSON body on one line followed by a line with the hex HMAC-SHA256 of that body
//! under a device-local key `<state_dir>/device.key` (32 random bytes, 0600).
//!
//! The buyer is root: this makes an edited, truncated or deleted file visible and makes it
//! freeze rather than unfreeze; it cannot make tampering impossible.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::lifecycle::Machine;
use crate::license::format::hex;
use crate::store::{self, StoreError};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone)]
pub struct Paths {
    pub key: PathBuf,
    pub primary: PathBuf,
    pub backup: PathBuf,
    /// The usage directory's anchor (see `anchor.rs`); the other is in the time file.
    pub anchor: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Paths {
        Paths {
            key: state_dir.join("device.key"),
            primary: state_dir.join("lifecycle.json"),
            backup: crate::license::licenses_dir(state_dir).join(".lifecycle.json"),
            anchor: state_dir.join("usage").join("freeze.anchor"),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    v: u32,
    generation: u64,
    machine: Machine,
    /// The places that held an anchor when this was written (all must still hold one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    anchors: Vec<String>,
    /// The TPM counter value this state is anchored at (`tpm_anchor.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tpm: Option<u64>,
}

/// What was found on disk.
#[derive(Debug)]
pub struct Loaded {
    pub machine: Machine,
    pub generation: u64,
    /// Tampering detected: what was wrong (for status and the log).
    pub tamper: Option<String>,
    /// The anchor places the state lists.
    pub anchors: Vec<String>,
    /// The TPM counter value the state sealed.
    pub tpm: Option<u64>,
}

/// One copy's verdict.
#[derive(Debug)]
enum Copy {
    Missing,
    Bad(String),
    Good(Decoded),
}

fn mac(key: &[u8; 32], body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(body);
    m
}

/// Reads the device key, creating it (0600) on first start: `(key, created)`.
pub fn device_key(path: &Path) -> Result<([u8; 32], bool), StoreError> {
    if let Some(bytes) = store::read_optional(path)? {
        if let Ok(k) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok((k, false));
        }
        // A damaged key is as good as a deleted one: keep it aside as evidence.
        let _ = store::quarantine(path, 0);
    }
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k)
        .map_err(|e| StoreError::new("generate", path, std::io::Error::other(e.to_string())))?;
    store::atomic_write(path, &k, 0o600)?;
    Ok((k, true))
}

fn encode(
    key: &[u8; 32],
    generation: u64,
    machine: &Machine,
    anchors: &[String],
    tpm: Option<u64>,
) -> Vec<u8> {
    let body = serde_json::to_vec(&Body {
        v: 1,
        generation,
        machine: machine.clone(),
        anchors: anchors.to_vec(),
        tpm,
    })
    .expect("state encodes");
    let tag = mac(key, &body).finalize().into_bytes();
    let mut out = body;
    out.push(b'\n');
    out.extend_from_slice(hex(&tag).as_bytes());
    out.push(b'\n');
    out
}

#[derive(Debug)]
struct Decoded {
    generation: u64,
    machine: Machine,
    anchors: Vec<String>,
    tpm: Option<u64>,
}

fn decode(key: &[u8; 32], bytes: &[u8]) -> Result<Decoded, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut lines = text.split('\n');
    let (Some(body), Some(tag)) = (lines.next(), lines.next()) else {
        return Err("truncated (no MAC line)".into());
    };
    if lines.any(|l| !l.is_empty()) {
        return Err("extra lines after the MAC".into());
    }
    let tag = (0..tag.len())
        .step_by(2)
        .map(|i| {
            tag.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|t| t.len() == 32)
        .ok_or_else(|| "the MAC line is damaged".to_string())?;
    mac(key, body.as_bytes()).verify_slice(&tag).map_err(|_| {
        "the MAC does not match: the file was edited or written with another key".to_string()
    })?;
    let b: Body = serde_json::from_str(body).map_err(|e| format!("unreadable: {e}"))?;
    Ok(Decoded {
        generation: b.generation,
        machine: b.machine,
        anchors: b.anchors,
        tpm: b.tpm,
    })
}

fn read_copy(path: &Path, key: &[u8; 32]) -> Copy {
    match store::read_optional(path) {
        Ok(None) => Copy::Missing,
        Ok(Some(b)) => match decode(key, &b) {
            Ok(d) => Copy::Good(d),
            Err(e) => Copy::Bad(format!("{}: {e}", path.display())),
        },
        Err(e) => Copy::Bad(e.to_string()),
    }
}

/// Loads the state. `key_created`: the device key did not exist (first start, or it was
/// deleted); `now`: the trusted time, the detection time of any tampering.
pub fn load(paths: &Paths, key: &[u8; 32], key_created: bool, now: i64) -> Loaded {
    let a = read_copy(&paths.primary, key);
    let b = read_copy(&paths.backup, key);
    let lost = |why: String| Loaded {
        machine: Machine::tampered(now),
        generation: 0,
        tamper: Some(why),
        anchors: vec![],
        tpm: None,
    };
    match (a, b) {
        (Copy::Missing, Copy::Missing) if key_created => Loaded {
            machine: Machine::default(),
            generation: 0,
            tamper: None,
            anchors: vec![],
            tpm: None,
        },
        (Copy::Missing, Copy::Missing) => {
            lost("both copies of the freeze state were deleted".into())
        }
        (Copy::Good(d1), Copy::Good(d2)) => {
            let tpm = d1.tpm.max(d2.tpm);
            let d = if d1.generation >= d2.generation {
                d1
            } else {
                d2
            };
            Loaded {
                machine: d.machine,
                generation: d.generation,
                tamper: None,
                anchors: d.anchors,
                tpm,
            }
        }
        // The first save writes the primary, then the backup: a crash in between leaves
        // generation 1, listing no anchor yet, and no backup. Not a deletion (found by the
        // crash harness); and the surviving copy is the state either way.
        (Copy::Good(d), Copy::Missing) if d.generation <= 1 && d.anchors.is_empty() => Loaded {
            machine: d.machine,
            generation: d.generation,
            tamper: None,
            anchors: d.anchors,
            tpm: d.tpm,
        },
        (Copy::Good(d), other) | (other, Copy::Good(d)) => {
            let what = match other {
                Copy::Missing => "one copy of the freeze state was deleted".to_string(),
                Copy::Bad(e) => e,
                Copy::Good(..) => unreachable!("handled above"),
            };
            let mut machine = d.machine;
            // The surviving copy is trusted; a tamper mark stays on the record.
            machine.tampered_at = machine.tampered_at.or(Some(now));
            Loaded {
                machine,
                generation: d.generation,
                tamper: Some(format!("{what}; restored from the other copy")),
                anchors: d.anchors,
                tpm: d.tpm,
            }
        }
        (a, b) => {
            let mut why: Vec<String> = [a, b]
                .into_iter()
                .filter_map(|c| match c {
                    Copy::Bad(e) => Some(e),
                    _ => None,
                })
                .collect();
            if key_created {
                why.push("the device key was deleted or damaged".into());
            }
            lost(why.join("; "))
        }
    }
}

/// Writes both copies (primary first). `anchors`: the places holding an anchor already;
/// `tpm`: the TPM counter value sealed with it.
pub fn save(
    paths: &Paths,
    key: &[u8; 32],
    generation: u64,
    machine: &Machine,
    anchors: &[String],
    tpm: Option<u64>,
) -> Result<(), StoreError> {
    let bytes = encode(key, generation, machine, anchors, tpm);
    store::atomic_write(&paths.primary, &bytes, 0o600)?;
    if let Some(dir) = paths.backup.parent() {
        store::ensure_dir(dir, 0o700)?;
    }
    store::atomic_write(&paths.backup, &bytes, 0o600)
}

/// The usage directory's anchor as found at start.
pub fn read_anchor(path: &Path, key: &[u8; 32]) -> super::anchor::Found {
    use super::anchor::{unseal, Found};
    match store::read_optional(path) {
        Ok(None) => Found::Missing,
        Ok(Some(b)) => match std::str::from_utf8(&b) {
            Ok(t) => unseal(key, t).map_or_else(Found::Bad, Found::Good),
            Err(_) => Found::Bad("not UTF-8 text".into()),
        },
        Err(e) => Found::Bad(e.to_string()),
    }
}

/// Writes the usage directory's anchor (its directory made 0700 if missing).
pub fn write_anchor(path: &Path, sealed: &str) -> Result<(), StoreError> {
    if let Some(dir) = path.parent() {
        store::ensure_dir(dir, 0o700)?;
    }
    store::atomic_write(path, format!("{sealed}\n").as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::lifecycle::{Input, LicenseFacts, Phase};

    fn frozen_machine() -> Machine {
        let mut m = Machine::default();
        let f = LicenseFacts {
            id: "L".into(),
            issued_at: 100,
            not_after: Some(200),
            grace_end: Some(300),
            lease: None,
        };
        m.apply(Input::Licenses(vec![f]), 400, 10).unwrap();
        assert_eq!(m.records["L"].phase, Phase::Frozen);
        m
    }

    fn setup() -> (tempfile::TempDir, Paths, [u8; 32]) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        let (k, created) = device_key(&p.key).unwrap();
        assert!(created);
        assert_eq!(device_key(&p.key).unwrap(), (k, false));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        (d, p, k)
    }

    #[test]
    fn round_trip_and_first_start() {
        let (_d, p, k) = setup();
        let l = load(&p, &k, true, 1000);
        assert!(l.tamper.is_none() && l.machine.records.is_empty());
        let m = frozen_machine();
        save(&p, &k, 3, &m, &[], None).unwrap();
        let l = load(&p, &k, false, 1000);
        assert_eq!((l.generation, l.tamper), (3, None));
        assert_eq!(l.machine.records, m.records);
    }

    #[test]
    fn a_first_save_cut_before_the_backup_is_not_tamper_a_later_one_is() {
        let (_d, p, k) = setup();
        save(&p, &k, 1, &Machine::default(), &[], None).unwrap();
        std::fs::remove_file(&p.backup).unwrap();
        let l = load(&p, &k, false, 1000);
        assert_eq!((l.generation, l.tamper), (1, None));
        // Past the first save (or with anchors listed) a missing copy is deleted.
        save(&p, &k, 2, &Machine::default(), &[], None).unwrap();
        std::fs::remove_file(&p.backup).unwrap();
        assert!(load(&p, &k, false, 1000).tamper.is_some());
        save(&p, &k, 1, &Machine::default(), &["time".into()], None).unwrap();
        std::fs::remove_file(&p.backup).unwrap();
        assert!(load(&p, &k, false, 1000).tamper.is_some());
        // The primary missing is never a crash: it is written first.
        save(&p, &k, 1, &Machine::default(), &[], None).unwrap();
        std::fs::remove_file(&p.primary).unwrap();
        assert!(load(&p, &k, false, 1000).tamper.is_some());
    }

    #[test]
    fn edited_truncated_or_deleted_is_tamper() {
        let (_d, p, k) = setup();
        let m = frozen_machine();
        save(&p, &k, 1, &m, &[], None).unwrap();
        // Edit the primary to say active: the backup keeps it frozen, tamper noted.
        let text = std::fs::read_to_string(&p.primary).unwrap();
        std::fs::write(&p.primary, text.replace("\"frozen\"", "\"active\"")).unwrap();
        let l = load(&p, &k, false, 1000);
        assert!(
            l.tamper.as_deref().unwrap().contains("MAC does not match"),
            "{:?}",
            l.tamper
        );
        assert_eq!(l.machine.records["L"].phase, Phase::Frozen);
        // Truncate one, delete the other: everything lost, marked tampered now.
        std::fs::write(&p.primary, &text[..text.len() / 2]).unwrap();
        std::fs::remove_file(&p.backup).unwrap();
        let l = load(&p, &k, false, 1000);
        assert_eq!(l.machine.tampered_at, Some(1000));
        assert!(l.tamper.unwrap().contains("truncated"));
        // Both deleted while the key survives.
        std::fs::remove_file(&p.primary).unwrap();
        let l = load(&p, &k, false, 1000);
        assert!(l.tamper.unwrap().contains("deleted"));
        // A forged file with a fresh key (the old key deleted) does not verify either.
        save(&p, &[9; 32], 5, &Machine::default(), &[], None).unwrap();
        let l = load(&p, &k, true, 1000);
        assert_eq!(l.machine.tampered_at, Some(1000));
    }
}
