//! Clone awareness: the remembered baseline (`<state_dir>/identity.json`), classification of a
//! reading against it, and the baseline update rule. Classification and update are pure; only
//! [`load`] and [`save`] touch the disk.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ComponentClass, ComponentState, IdentityStatus};

/// Current identity.json format.
pub const FILE_VERSION: u32 = 1;
/// Transitions kept in `history`.
pub const MAX_HISTORY: usize = 20;
/// Earlier codes of the same device kept as still acceptable (see [`Baseline::aliases`]).
pub const MAX_ALIASES: usize = 8;

/// The whole `identity.json`. Holds hashes and codes only, never raw identifiers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityFile {
    pub version: u32,
    /// Product the hashes are keyed with; a file for another product is ignored.
    pub product_id: String,
    /// Last instance id fetched from the metadata service, as a component hash.
    pub instance_id: Option<CachedInstance>,
    pub baseline: Option<Baseline>,
    pub history: Vec<Transition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedInstance {
    pub hash: String,
    pub fetched_at: i64,
}

/// The reading a device is compared against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Baseline {
    pub code: String,
    /// Component name → hash, for every component that had a hash.
    pub components: BTreeMap<String, String>,
    /// Hash of each permanent MAC (a removed one is a change, an added one is not).
    pub macs: Vec<String>,
    /// Earlier codes of this same device, still accepted: codes replaced while the status was
    /// `same` (a new source appeared, e.g. the instance id was fetched for the first time, or a
    /// vendor source was added to the config). Cleared on `clone` / `new_device`.
    pub aliases: Vec<String>,
    pub first_seen: i64,
    pub last_seen: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at: i64,
    pub status: IdentityStatus,
    pub from: Option<String>,
    pub to: String,
}

/// A hashed component as classified here.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub name: String,
    pub class: ComponentClass,
    pub state: ComponentState,
    pub hash: Option<String>,
    /// Per-item hashes of set-valued components (MACs).
    pub items: Vec<String>,
    pub source: String,
    pub note: Option<String>,
    pub changed: bool,
    /// Not looked at this time (instance id with `metadata = false` or not fetched yet): like
    /// an unreadable component, the baseline hash is carried.
    pub not_consulted: bool,
}

/// Components whose change (with machine-id kept) means "this is a clone".
pub const ANCHORS: &[&str] = &["dmi_product_uuid", "instance_id"];

/// Uses the baseline's hash for a component that exists but is unreadable right now (e.g. a
/// root-only DMI file read by an unprivileged `kooagent id`) or was not consulted (instance id
/// not fetched / metadata off), so that it neither changes the code nor counts as a change.
pub fn carry_unreadable(components: &mut [Component], baseline: Option<&Baseline>) {
    let Some(b) = baseline else { return };
    for c in components.iter_mut() {
        let carry = c.state == ComponentState::Unreadable || c.not_consulted;
        if !carry || c.hash.is_some() {
            continue;
        }
        if let Some(h) = b.components.get(&c.name) {
            c.hash = Some(h.clone());
            if c.name == "macs" {
                c.items = b.macs.clone();
            }
            let why = c.note.take().unwrap_or_default();
            c.note = Some(
                format!("{why}; baseline hash used")
                    .trim_start_matches("; ")
                    .to_string(),
            );
        }
    }
}

/// Marks `changed` on each component and returns the status of this reading.
///
/// * `settling`: machine-id uninitialized (first boot of a prepared image).
/// * `first_seen`: no baseline.
/// * `same`: nothing changed. A component that appeared (no hash in the baseline) is not a
///   change, nor is an added MAC.
/// * `clone`: machine-id kept, DMI product UUID or instance id changed or gone.
/// * `drift`: exactly one change, and it is not such a clone (one hardware component with
///   machine-id kept, or machine-id alone with all hardware the same).
/// * `new_device`: anything more.
pub fn classify(
    components: &mut [Component],
    baseline: Option<&Baseline>,
    settling: bool,
) -> IdentityStatus {
    if settling {
        return IdentityStatus::Settling;
    }
    let Some(b) = baseline else {
        return IdentityStatus::FirstSeen;
    };
    let mut changed: Vec<String> = Vec::new();
    for c in components.iter_mut() {
        let Some(old) = b.components.get(&c.name) else {
            continue; // new source: not a change
        };
        c.changed = match &c.hash {
            None => true, // was there, now absent or placeholder
            Some(_) if c.name == "macs" => b.macs.iter().any(|m| !c.items.contains(m)),
            Some(h) => h != old,
        };
        if c.changed {
            changed.push(c.name.clone());
        }
    }
    let has = |n: &str| changed.iter().any(|c| c == n);
    if changed.is_empty() {
        IdentityStatus::Same
    } else if !has("machine_id") && ANCHORS.iter().any(|a| has(a)) {
        IdentityStatus::Clone
    } else if changed.len() == 1 {
        IdentityStatus::Drift
    } else {
        IdentityStatus::NewDevice
    }
}

/// Codes a license check should accept for this reading, current code first.
pub fn accepted_codes(
    code: &str,
    status: IdentityStatus,
    baseline: Option<&Baseline>,
) -> Vec<String> {
    let mut out = vec![code.to_string()];
    if let Some(b) = baseline {
        let extra: Vec<&String> = match status {
            IdentityStatus::Same => b.aliases.iter().chain(std::iter::once(&b.code)).collect(),
            IdentityStatus::Drift => std::iter::once(&b.code).chain(b.aliases.iter()).collect(),
            _ => Vec::new(),
        };
        for c in extra {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

fn snapshot(code: &str, components: &[Component], now: i64) -> Baseline {
    Baseline {
        code: code.to_string(),
        components: components
            .iter()
            .filter_map(|c| c.hash.clone().map(|h| (c.name.clone(), h)))
            .collect(),
        macs: components
            .iter()
            .find(|c| c.name == "macs")
            .map(|c| c.items.clone())
            .unwrap_or_default(),
        aliases: Vec::new(),
        first_seen: now,
        last_seen: now,
    }
}

fn push_history(file: &mut IdentityFile, t: Transition) {
    file.history.push(t);
    let excess = file.history.len().saturating_sub(MAX_HISTORY);
    file.history.drain(..excess);
}

/// Applies the baseline update rule to `file` (already checked to be for this product).
///
/// Written on `first_seen` / `same` / `clone` / `new_device`; on `drift` only `last_seen`
/// moves, so drift cannot accumulate one component at a time; on `settling` nothing changes.
pub fn update(
    file: &mut IdentityFile,
    code: &str,
    status: IdentityStatus,
    components: &[Component],
    now: i64,
) {
    let old = file.baseline.take();
    let new = match (status, old) {
        (IdentityStatus::Settling, old) => old,
        (IdentityStatus::Drift, Some(mut b)) => {
            b.last_seen = now;
            let repeat = file
                .history
                .last()
                .is_some_and(|t| t.status == status && t.to == code);
            if !repeat {
                push_history(
                    file,
                    Transition {
                        at: now,
                        status,
                        from: Some(b.code.clone()),
                        to: code.to_string(),
                    },
                );
            }
            Some(b)
        }
        (IdentityStatus::Same, Some(b)) => {
            let mut n = snapshot(code, components, now);
            n.first_seen = b.first_seen;
            n.aliases = b.aliases.clone();
            if b.code != code {
                n.aliases.retain(|a| a != code);
                if !n.aliases.contains(&b.code) {
                    n.aliases.push(b.code.clone());
                }
                let excess = n.aliases.len().saturating_sub(MAX_ALIASES);
                n.aliases.drain(..excess);
                push_history(
                    file,
                    Transition {
                        at: now,
                        status,
                        from: Some(b.code.clone()),
                        to: code.to_string(),
                    },
                );
            }
            Some(n)
        }
        (_, old) => {
            push_history(
                file,
                Transition {
                    at: now,
                    status,
                    from: old.map(|b| b.code),
                    to: code.to_string(),
                },
            );
            Some(snapshot(code, components, now))
        }
    };
    file.baseline = new;
}

/// Reads `identity.json`. `Ok(None)` when missing; `Err(InvalidData)` when it does not parse.
pub fn load(path: &Path) -> io::Result<Option<IdentityFile>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `identity.json` atomically (mode 0600).
pub fn save(path: &Path, file: &IdentityFile) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    bytes.push(b'\n');
    crate::store::atomic_write(path, &bytes, 0o600).map_err(|e| e.source)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, hash: Option<&str>) -> Component {
        Component {
            name: name.into(),
            class: ComponentClass::Identity,
            state: if hash.is_some() {
                ComponentState::Found
            } else {
                ComponentState::Absent
            },
            hash: hash.map(String::from),
            items: Vec::new(),
            source: String::new(),
            note: None,
            changed: false,
            not_consulted: false,
        }
    }

    fn vm(mid: &str, uuid: &str, macs: &[&str], disk: &str) -> Vec<Component> {
        let mut m = comp("macs", Some(&macs.join(",")));
        m.items = macs.iter().map(|s| s.to_string()).collect();
        vec![
            comp("machine_id", Some(mid)),
            comp("dmi_product_uuid", Some(uuid)),
            comp("instance_id", None),
            comp("cpu", Some("cpu1")),
            m,
            comp("root_fs_uuid", Some(disk)),
        ]
    }

    fn base(c: &[Component]) -> Baseline {
        snapshot("CODE", c, 1)
    }

    #[test]
    fn classification_table() {
        let b = base(&vm("m1", "u1", &["a", "b"], "d1"));
        let cases: &[(Vec<Component>, IdentityStatus)] = &[
            (vm("m1", "u1", &["a", "b"], "d1"), IdentityStatus::Same),
            (vm("m1", "u1", &["a", "b", "c"], "d1"), IdentityStatus::Same),
            (vm("m1", "u1", &["a"], "d1"), IdentityStatus::Drift),
            (vm("m1", "u1", &["a", "b"], "d2"), IdentityStatus::Drift),
            (vm("m2", "u1", &["a", "b"], "d1"), IdentityStatus::Drift),
            (vm("m1", "u2", &["a", "b"], "d1"), IdentityStatus::Clone),
            (vm("m1", "u2", &["x"], "d2"), IdentityStatus::Clone),
            (vm("m2", "u2", &["a", "b"], "d1"), IdentityStatus::NewDevice),
            (vm("m1", "u1", &["x"], "d2"), IdentityStatus::NewDevice),
            (vm("m2", "u1", &["a", "b"], "d2"), IdentityStatus::NewDevice),
        ];
        for (i, (c, want)) in cases.iter().enumerate() {
            let mut c = c.clone();
            assert_eq!(classify(&mut c, Some(&b), false), *want, "case {i}");
        }
        let mut c = vm("m1", "u1", &["a", "b"], "d1");
        assert_eq!(classify(&mut c, None, false), IdentityStatus::FirstSeen);
        assert_eq!(classify(&mut c, Some(&b), true), IdentityStatus::Settling);
    }

    #[test]
    fn removed_component_is_a_change_added_is_not() {
        let b = base(&vm("m1", "u1", &["a"], "d1"));
        let mut gone = vm("m1", "u1", &["a"], "d1");
        gone[5].hash = None; // root_fs_uuid gone
        assert_eq!(classify(&mut gone, Some(&b), false), IdentityStatus::Drift);
        assert!(gone[5].changed);
        let mut added = vm("m1", "u1", &["a"], "d1");
        added[2].hash = Some("i1".into()); // instance id appeared
        assert_eq!(classify(&mut added, Some(&b), false), IdentityStatus::Same);
        let mut dmi_gone = vm("m1", "u1", &["a"], "d1");
        dmi_gone[1].hash = None;
        assert_eq!(
            classify(&mut dmi_gone, Some(&b), false),
            IdentityStatus::Clone
        );
    }

    #[test]
    fn unreadable_components_carry_the_baseline_hash() {
        let b = base(&vm("m1", "u1", &["a"], "d1"));
        let mut c = vm("m1", "u1", &["a"], "d1");
        c[1].hash = None;
        c[1].state = ComponentState::Unreadable;
        c[1].note = Some("permission denied".into());
        carry_unreadable(&mut c, Some(&b));
        assert_eq!(c[1].hash.as_deref(), Some("u1"));
        assert_eq!(c[1].state, ComponentState::Unreadable);
        assert_eq!(classify(&mut c, Some(&b), false), IdentityStatus::Same);
    }

    #[test]
    fn update_rules() {
        let c1 = vm("m1", "u1", &["a", "b"], "d1");
        let mut f = IdentityFile::default();
        update(&mut f, "C1", IdentityStatus::FirstSeen, &c1, 10);
        let b = f.baseline.clone().unwrap();
        assert_eq!((b.code.as_str(), b.first_seen), ("C1", 10));
        assert_eq!(b.macs, vec!["a", "b"]);

        // drift keeps the baseline (so a second drift is measured against the original).
        let c2 = vm("m1", "u1", &["a"], "d1");
        update(&mut f, "C1", IdentityStatus::Drift, &c2, 20);
        update(&mut f, "C1", IdentityStatus::Drift, &c2, 21);
        let b = f.baseline.clone().unwrap();
        assert_eq!(b.macs, vec!["a", "b"]);
        assert_eq!(b.last_seen, 21);
        assert_eq!(f.history.len(), 2, "repeated drift recorded once");

        // same with a new code keeps the old one as an alias.
        update(&mut f, "C2", IdentityStatus::Same, &c1, 30);
        let b = f.baseline.clone().unwrap();
        assert_eq!(b.code, "C2");
        assert_eq!(b.aliases, vec!["C1"]);
        assert_eq!(b.first_seen, 10);
        assert_eq!(
            accepted_codes("C2", IdentityStatus::Same, Some(&b)),
            vec!["C2", "C1"]
        );
        assert_eq!(
            accepted_codes("C3", IdentityStatus::Drift, Some(&b)),
            vec!["C3", "C2", "C1"]
        );

        // clone replaces the baseline and forgets aliases.
        let c3 = vm("m1", "u2", &["x"], "d1");
        update(&mut f, "C9", IdentityStatus::Clone, &c3, 40);
        let b = f.baseline.clone().unwrap();
        assert_eq!((b.code.as_str(), b.first_seen), ("C9", 40));
        assert!(b.aliases.is_empty());
        let last = f.history.last().unwrap();
        assert_eq!(last.from.as_deref(), Some("C2"));
        assert_eq!(last.status, IdentityStatus::Clone);
        assert_eq!(
            accepted_codes("C9", IdentityStatus::Clone, Some(&b)),
            vec!["C9"]
        );

        // settling changes nothing.
        let before = f.clone();
        update(&mut f, "CX", IdentityStatus::Settling, &c1, 50);
        assert_eq!(f, before);

        for i in 0..50 {
            update(
                &mut f,
                &format!("N{i}"),
                IdentityStatus::NewDevice,
                &c1,
                60 + i,
            );
        }
        assert_eq!(f.history.len(), MAX_HISTORY);
    }

    #[test]
    fn file_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("identity.json");
        assert_eq!(load(&p).unwrap(), None);
        let mut f = IdentityFile {
            version: FILE_VERSION,
            product_id: "p".into(),
            ..Default::default()
        };
        update(
            &mut f,
            "C1",
            IdentityStatus::FirstSeen,
            &vm("m", "u", &["a"], "d"),
            1,
        );
        save(&p, &f).unwrap();
        assert_eq!(load(&p).unwrap(), Some(f));
        std::fs::write(&p, "{not json").unwrap();
        assert_eq!(load(&p).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
