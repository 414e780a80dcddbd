//! The privileged start step's hand-over. Under systemd the agent runs with no capability and
//! `ProcSubset=pid`: it can read neither the root-only DMI files (`product_uuid`,
//! `board_serial`) nor `/proc/cpuinfo`. `kooagent prestart` (the unit's `ExecStartPre=+`, run
//! as root before the agent starts) reads those sources once and leaves only their keyed
//! hashes in `/run/kooagent/identity-hashes.json`; the resolver fills the gaps of its own
//! reading from that file. Raw values never reach the file, so the agent ends up with exactly
//! what it would have computed with the capability.
//!
//! This boot's id (`/proc/sys/kernel/random/boot_id`, hidden by `ProcSubset=pid`) goes to
//! `/run/kooagent/boot_id` for the freeze journal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::derive::{self, COMPONENT_HASH_HEX};
use super::sources::{self, rooted, Raw, Reading};
use super::{ComponentState, DeviceError, IdentityConfig};

/// Where the hand-over lives, as seen by the machine (read and written through `identity.root`).
pub const HASHES_FILE: &str = "/run/kooagent/identity-hashes.json";
/// This boot's id, for an agent that cannot see `/proc/sys`.
pub const BOOT_ID_FILE: &str = "/run/kooagent/boot_id";
const FILE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HashesFile {
    version: u32,
    product_id: String,
    components: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    name: String,
    source: String,
    state: ComponentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// The sources a sandboxed agent may be unable to read; the same readers it uses itself.
fn privileged_readings(root: &Path) -> Vec<Raw> {
    vec![
        sources::dmi_product_uuid(root),
        sources::board_serial(root),
        sources::devicetree_serial(root),
        sources::cpu(root),
    ]
}

fn entry(product_id: &str, raw: Raw) -> Entry {
    let (state, hash, note) = match raw.reading {
        Reading::Found(v) => (
            ComponentState::Found,
            Some(derive::component_hash(product_id, &raw.name, &v)),
            None,
        ),
        Reading::Hashed(h) => (ComponentState::Found, Some(h), None),
        Reading::Absent(n) => (ComponentState::Absent, None, n),
        Reading::Unreadable(n) => (ComponentState::Unreadable, None, Some(n)),
        Reading::Placeholder(n) => (ComponentState::Placeholder, None, Some(n)),
        // Only machine-id can be uninitialized, and it is not a privileged source.
        Reading::Uninitialized => (ComponentState::Absent, None, None),
    };
    Entry {
        name: raw.name,
        source: raw.source,
        state,
        hash,
        note,
    }
}

/// What `kooagent prestart` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PrestartReport {
    pub hashes_file: PathBuf,
    /// `name: state` of each source read.
    pub components: Vec<String>,
    /// Where the boot id went (`None`: this system has no boot id to hand over).
    pub boot_id_file: Option<PathBuf>,
}

/// Reads the privileged sources and writes their keyed hashes (and the boot id) for the
/// agent. The files take the owner of their directory (the agent's `RuntimeDirectory=`), so
/// the unprivileged agent can read them; mode 0640.
pub(super) fn write(cfg: &IdentityConfig, product_id: &str) -> Result<PrestartReport, DeviceError> {
    let root = cfg.root.as_path();
    let path = rooted(root, HASHES_FILE);
    let file = HashesFile {
        version: FILE_VERSION,
        product_id: product_id.to_string(),
        components: privileged_readings(root)
            .into_iter()
            .map(|r| entry(product_id, r))
            .collect(),
    };
    let components = file
        .components
        .iter()
        .map(|e| format!("{}: {}", e.name, super::state_str(e.state)))
        .collect();
    let bytes = serde_json::to_vec_pretty(&file).expect("hashes file encodes");
    hand_over(&path, &bytes)?;
    let boot_id_file = match sources::read_small(&rooted(root, "/proc/sys/kernel/random/boot_id")) {
        Ok(Some(id)) if !id.trim().is_empty() => {
            let p = rooted(root, BOOT_ID_FILE);
            hand_over(&p, format!("{}\n", id.trim()).as_bytes())?;
            Some(p)
        }
        _ => None,
    };
    Ok(PrestartReport {
        hashes_file: path,
        components,
        boot_id_file,
    })
}

/// Atomically writes `bytes` to `path`, mode 0640, owned like its directory. Root writes here
/// into a directory the agent's user owns, so nothing is followed: the temporary file is
/// created new with `O_NOFOLLOW`, given its owner and mode through its descriptor, and
/// renamed over `path` (a rename replaces a symlink, never writes through it).
fn hand_over(path: &Path, bytes: &[u8]) -> Result<(), DeviceError> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source: std::io::Error| DeviceError::State { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let owner = std::fs::symlink_metadata(dir).map_err(err(dir))?;
    if !owner.is_dir() {
        return Err(err(dir)(std::io::Error::other("not a directory")));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp); // a leftover; removes a symlink itself, not its target
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(crate::sys::O_NOFOLLOW)
            .open(&tmp)?;
        let me = f.metadata()?;
        if (me.uid(), me.gid()) != (owner.uid(), owner.gid()) {
            std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
        }
        // Explicit: the unit's UMask=0077 would take the group's read bit away.
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(path)(e)
    })
}

fn valid_hash(h: &str) -> bool {
    h.len() == COMPONENT_HASH_HEX
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Fills the gaps of the agent's own reading (a privileged source it found absent or could
/// not read) from the hand-over file. A source the agent read itself wins. Returns a note when
/// the file exists but cannot be used.
pub(crate) fn fill_gaps(components: &mut [Raw], root: &Path, product_id: &str) -> Option<String> {
    let path = rooted(root, HASHES_FILE);
    let text = match sources::read_small(&path) {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => return Some(format!("{HASHES_FILE}: {e}")),
    };
    let file: HashesFile = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => return Some(format!("{HASHES_FILE} ignored: {e}")),
    };
    if file.version != FILE_VERSION {
        return Some(format!(
            "{HASHES_FILE} ignored: version {} (expected {FILE_VERSION})",
            file.version
        ));
    }
    if file.product_id != product_id {
        // Written before a reload changed agent.product_id: the next start rewrites it.
        return Some(format!(
            "{HASHES_FILE} ignored: written for product {:?}",
            file.product_id
        ));
    }
    for raw in components.iter_mut() {
        if matches!(raw.reading, Reading::Found(_) | Reading::Placeholder(_)) {
            continue;
        }
        let Some(e) = file.components.iter().find(|e| e.name == raw.name) else {
            continue;
        };
        raw.reading = match (e.state, &e.hash) {
            (ComponentState::Found, Some(h)) if valid_hash(h) => Reading::Hashed(h.clone()),
            (ComponentState::Found, _) => continue,
            (ComponentState::Absent, _) => Reading::Absent(e.note.clone()),
            (ComponentState::Unreadable, _) => {
                Reading::Unreadable(e.note.clone().unwrap_or_else(|| "unreadable".into()))
            }
            (ComponentState::Placeholder, _) => {
                Reading::Placeholder(e.note.clone().unwrap_or_else(|| "placeholder".into()))
            }
        };
        raw.source = e.source.clone();
    }
    None
}
