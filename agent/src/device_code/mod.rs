//! Device identification code: the hardware code a buyer copies into KooGallery
//! (`deviceFingerprint`) to bind a license to this machine. See docs/device-code.md.
//!
//! Layout (pure logic apart from I/O):
//! * [`sources`](self) – file reads through the configurable root (no hashing, no network);
//! * `vendor` – vendor identity commands with a time limit;
//! * `metadata` – OpenStack metadata fetch (blocking, network);
//! * `normalize` – placeholder detection, UUID/MAC/cpuinfo/mountinfo parsing (pure);
//! * `derive` – keyed component hashes and the code (pure);
//! * `encode` – Crockford base32 and the GF(32) check symbol (pure);
//! * `baseline` – classification, baseline update rule (pure) and identity.json I/O;
//! * `privileged` – the hashes `kooagent prestart` hands a sandboxed agent (root-only DMI,
//!   `/proc/cpuinfo`).

mod baseline;
mod metadata;
mod privileged;
mod sources;
mod vendor;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

// The pure rules live in kooagent-core; the hardware reads and the baseline file stay here.
pub use kooagent_core::device_code::{canonical, derive, encode, normalize, parse_code, CodeError};
pub use privileged::{PrestartReport, BOOT_ID_FILE, HASHES_FILE};

use baseline::{Baseline, CachedInstance, Component, IdentityFile};
use sources::{Raw, Reading};

/// Default OpenStack metadata document (Huawei Cloud ECS).
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254/openstack/latest/meta_data.json";
/// Name of the state file inside the state directory.
pub const IDENTITY_FILE: &str = "identity.json";
const LOCK_FILE: &str = "identity.lock";

/// `[identity]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// File-system root all identity files are read through (tests use a fake tree). Default "/".
    pub root: PathBuf,
    /// Fetch the cloud instance id from the metadata service (in the background). Default true.
    pub metadata: bool,
    /// OpenStack metadata document with a `uuid` field.
    pub metadata_url: String,
    /// Time limit for the whole metadata request, in ms (1..=60000). Default 300.
    pub metadata_timeout_ms: u64,
    /// Time limit for each vendor `command` source, in ms (1..=60000). Default 2000.
    pub command_timeout_ms: u64,
    /// Vendor identity sources (`[[identity.source]]`).
    pub source: Vec<VendorSource>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            root: PathBuf::from("/"),
            metadata: true,
            metadata_url: DEFAULT_METADATA_URL.to_string(),
            metadata_timeout_ms: 300,
            command_timeout_ms: 2000,
            source: Vec::new(),
        }
    }
}

/// A vendor identity source: exactly one of `file` (read through `root`) or `command`
/// (argv, no shell; stdout trimmed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VendorSource {
    /// `[a-z0-9_-]{1,32}`; the component is reported as `vendor.<name>`.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

impl IdentityConfig {
    /// Checks the section; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.root.is_absolute() {
            return Err(format!(
                "identity.root: must be an absolute path, got {:?}",
                self.root
            ));
        }
        let url = self.metadata_url.as_str();
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') && !url.contains(char::is_whitespace) => {}
            _ => {
                return Err(format!(
                    "identity.metadata_url: must be an http:// or https:// URL with a host, got {url:?}"
                ))
            }
        }
        if !(1..=60_000).contains(&self.metadata_timeout_ms) {
            return Err(format!(
                "identity.metadata_timeout_ms: must be 1..=60000, got {}",
                self.metadata_timeout_ms
            ));
        }
        if !(1..=60_000).contains(&self.command_timeout_ms) {
            return Err(format!(
                "identity.command_timeout_ms: must be 1..=60000, got {}",
                self.command_timeout_ms
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, s) in self.source.iter().enumerate() {
            let key = format!("identity.source[{i}]");
            let ok_name = !s.name.is_empty()
                && s.name.len() <= 32
                && s.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok_name {
                return Err(format!(
                    "{key}.name: must match [a-z0-9_-]{{1,32}}, got {:?}",
                    s.name
                ));
            }
            if names.contains(&s.name.as_str()) {
                return Err(format!("{key}.name: duplicate source name {:?}", s.name));
            }
            names.push(&s.name);
            match (&s.file, &s.command) {
                (Some(f), None) if f.is_absolute() => {}
                (Some(f), None) => {
                    return Err(format!("{key}.file: must be an absolute path, got {f:?}"))
                }
                (None, Some(c)) if c.first().is_some_and(|p| !p.is_empty()) => {}
                (None, Some(_)) => {
                    return Err(format!("{key}.command: must be a non-empty argv list"))
                }
                _ => {
                    return Err(format!(
                        "{key}: set exactly one of `file` or `command` (source {:?})",
                        s.name
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Whether a component enters the code (`identity`) or is only watched for changes (`drift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentClass {
    Identity,
    Drift,
}

/// What reading a component gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    Found,
    Absent,
    Unreadable,
    Placeholder,
}

/// How this reading compares with the remembered baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityStatus {
    /// No baseline yet (first run, or the state was for another product).
    FirstSeen,
    /// Same device.
    Same,
    /// One component changed, identity kept: current and baseline codes both accepted.
    Drift,
    /// machine-id kept but DMI UUID / instance id changed: a cloned VM or image.
    Clone,
    /// More than one thing changed: a different machine.
    NewDevice,
    /// machine-id not initialized yet (first boot of a prepared image): check again later.
    Settling,
}

impl IdentityStatus {
    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityStatus::FirstSeen => "first_seen",
            IdentityStatus::Same => "same",
            IdentityStatus::Drift => "drift",
            IdentityStatus::Clone => "clone",
            IdentityStatus::NewDevice => "new_device",
            IdentityStatus::Settling => "settling",
        }
    }
}

impl std::fmt::Display for IdentityStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component of the identity as reported (hash only, never the raw value).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentReport {
    /// `machine_id`, `dmi_product_uuid`, `board_serial`, `devicetree_serial`, `instance_id`,
    /// `vendor.<name>`, `cpu`, `macs`, `root_fs_uuid`.
    pub name: String,
    pub class: ComponentClass,
    pub state: ComponentState,
    /// 16 hex chars of the keyed hash; `None` when absent/placeholder (or unreadable without a
    /// baseline to carry).
    pub hash: Option<String>,
    /// Differs from the baseline (always false without a baseline).
    pub changed: bool,
    /// Where it was read from (path as seen by the machine, command, or metadata URL).
    pub source: String,
    /// Why it is absent/unreadable/placeholder, or other remarks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Result of [`Resolver::resolve`].
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// The code to show the buyer: `XXXX-XXXX-XXXX-XXXX-XXXC`.
    pub code: String,
    /// Codes a license bound to this device may carry (current first). See the matching policy
    /// in docs/device-code.md.
    pub accepted_codes: Vec<String>,
    pub status: IdentityStatus,
    /// False while `settling`: the code will change once machine-id is initialized.
    pub settled: bool,
    pub product_id: String,
    pub components: Vec<ComponentReport>,
    /// Code of the baseline this reading was compared with (before any update).
    pub baseline_code: Option<String>,
    /// One human sentence explaining the status.
    pub detail: String,
    /// Container markers were found (no DMI expected).
    pub container: bool,
    /// identity.json was written by this call.
    pub persisted: bool,
    /// The `device.code` answer, rendered once on first use (the report never changes;
    /// a new reading is a new report).
    #[serde(skip)]
    pub answer_json: std::sync::OnceLock<String>,
}

impl DeviceReport {
    /// Whether a code typed or carried by a license (any accepted spelling, see [`parse_code`])
    /// matches this device: it must be one of [`DeviceReport::accepted_codes`]. Always false
    /// while `settling`, so a license is not bound or checked against a provisional code.
    pub fn accepts(&self, code: &str) -> bool {
        self.settled && self.accepted_codes.contains(&canonical(code))
    }

    /// Multi-line human explanation for `kooagent id --explain`: the code, the status sentence,
    /// and one line per component (state, class, hash prefix, change, source, note).
    pub fn explain(&self) -> String {
        let mut out = format!(
            "Device code: {}\nStatus: {}{}\n{}\n",
            self.code,
            self.status,
            if self.settled { "" } else { " (provisional)" },
            self.detail
        );
        if self.accepted_codes.len() > 1 {
            out.push_str(&format!(
                "Accepted codes: {}\n",
                self.accepted_codes.join(", ")
            ));
        }
        if let Some(b) = &self.baseline_code {
            out.push_str(&format!("Baseline code: {b}\n"));
        }
        out.push_str(&format!(
            "Product: {}{}\nComponents (identity ones make up the code; raw values never leave this machine):\n",
            self.product_id,
            if self.container { " (container)" } else { "" }
        ));
        for c in &self.components {
            let class = match c.class {
                ComponentClass::Identity => "identity",
                ComponentClass::Drift => "drift",
            };
            out.push_str(&format!(
                "  {:<18} {:<11} {:<8} {:<16} {:<7} {}",
                c.name,
                state_str(c.state),
                class,
                c.hash.as_deref().unwrap_or("-"),
                if c.changed { "CHANGED" } else { "" },
                c.source
            ));
            if let Some(n) = &c.note {
                out.push_str(&format!(" ({n})"));
            }
            out.push('\n');
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Nothing to build a code from.
    #[error("no device identity source available (tried: {}){}", tried.join("; "),
        if *machine_id_uninitialized { "; machine-id is not initialized yet (first boot of a prepared image): try again later" } else { "" })]
    NoIdentity {
        /// Each source tried with what it gave, e.g. "dmi_product_uuid: absent".
        tried: Vec<String>,
        machine_id_uninitialized: bool,
    },
    #[error("invalid product id: {0}")]
    InvalidProductId(String),
    #[error("{0}")]
    Config(String),
    #[error("identity state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata service: {0}")]
    Metadata(String),
}

/// Computes the device code and classifies it against the remembered baseline.
///
/// Thread-safe (`Send + Sync`): the daemon may call [`Resolver::resolve`] and
/// [`Resolver::refresh_instance_id`] from different threads; state-file updates are serialised
/// with an in-process mutex and an flock on `<state_dir>/identity.lock`.
pub struct Resolver {
    cfg: IdentityConfig,
    product_id: String,
    state_dir: Option<PathBuf>,
    /// Instance id hash known to this process (from the last refresh).
    instance: Mutex<Option<CachedInstance>>,
    io: Mutex<()>,
}

impl Resolver {
    /// `state_dir`: where identity.json lives; `None` = no memory (read-only use, every call
    /// is `first_seen`).
    pub fn new(cfg: IdentityConfig, product_id: String, state_dir: Option<PathBuf>) -> Self {
        Resolver {
            cfg,
            product_id,
            state_dir,
            instance: Mutex::new(None),
            io: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.cfg
    }

    pub fn product_id(&self) -> &str {
        &self.product_id
    }

    /// Path of identity.json, when there is a state directory.
    pub fn state_file(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(IDENTITY_FILE))
    }

    /// Writes the privileged hand-over for a sandboxed agent (`kooagent prestart`, run as
    /// root): keyed hashes of the root-only sources, and this boot's id. See `privileged`.
    pub fn prestart(&self) -> Result<PrestartReport, DeviceError> {
        self.check()?;
        privileged::write(&self.cfg, &self.product_id)
    }

    fn check(&self) -> Result<(), DeviceError> {
        self.cfg.validate().map_err(DeviceError::Config)?;
        let p = self.product_id.as_str();
        if p.trim().is_empty() || p.len() > 64 || p.chars().any(char::is_control) {
            return Err(DeviceError::InvalidProductId(format!(
                "{p:?}: must be 1..=64 printable characters"
            )));
        }
        Ok(())
    }

    fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| DeviceError::State {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Reads the local sources (blocking file reads, vendor commands; no network), uses the
    /// cached instance id, and classifies the reading. With `persist` (and a state dir) the
    /// baseline is created/updated in identity.json per the update rule.
    pub fn resolve(&self, now_unix: i64, persist: bool) -> Result<DeviceReport, DeviceError> {
        self.check()?;
        let mut snapshot = sources::read_all(&self.cfg);
        let hand_over_note =
            privileged::fill_gaps(&mut snapshot.components, &self.cfg.root, &self.product_id);
        let persist = persist && self.state_dir.is_some();
        let _guard = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let mut notes: Vec<String> = hand_over_note.into_iter().collect();
        let mut lock = None;
        let mut file: Option<IdentityFile> = None;
        if let Some(path) = self.state_file() {
            if persist {
                let dir = path.parent().unwrap_or(Path::new("/"));
                std::fs::create_dir_all(dir).map_err(Self::state_err(dir))?;
                let lp = dir.join(LOCK_FILE);
                lock = Some(crate::store::FileLock::acquire(&lp).map_err(Self::state_err(&lp))?);
            }
            match baseline::load(&path) {
                Ok(f) => file = f,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    notes.push(format!(
                        "{} was unreadable JSON and is ignored",
                        path.display()
                    ));
                    if persist {
                        let aside = path.with_extension(format!("json.corrupt-{now_unix}"));
                        let _ = std::fs::rename(&path, aside);
                    }
                }
                Err(e) if persist => return Err(Self::state_err(&path)(e)),
                Err(e) => notes.push(format!("{} not readable ({e})", path.display())),
            }
        }
        let mut file = file
            .filter(|f| f.product_id == self.product_id)
            .unwrap_or_else(|| IdentityFile {
                version: baseline::FILE_VERSION,
                product_id: self.product_id.clone(),
                ..Default::default()
            });
        let fresh_in_memory = self.memory_instance().is_some();
        let cached = self.cached_instance(&file);
        let had_cache = cached.is_some();
        let (mut components, settling) =
            self.hash_components(snapshot.components.clone(), cached.clone());
        let old = file.baseline.clone();
        baseline::carry_unreadable(&mut components, old.as_ref());
        assign_classes(&mut components);
        let status = baseline::classify(&mut components, old.as_ref(), settling);

        // A clone / new device starts its own baseline: recompute without values that belong
        // to the old device, i.e. without carried hashes and without an instance id cached on
        // disk (it came with the copied disk; only a fetch made by this process is trusted).
        let mut drop_file_cache = false;
        if matches!(status, IdentityStatus::Clone | IdentityStatus::NewDevice) {
            let keep = if fresh_in_memory { cached } else { None };
            let (mut fresh, _) = self.hash_components(snapshot.components.clone(), keep);
            assign_classes(&mut fresh);
            let has_identity = fresh
                .iter()
                .any(|c| c.class == ComponentClass::Identity && c.hash.is_some());
            if has_identity {
                for c in fresh.iter_mut() {
                    c.changed = components.iter().any(|o| o.name == c.name && o.changed);
                    if c.name == "instance_id" && had_cache && !fresh_in_memory {
                        c.note = Some(
                            "cached value dropped (it predates this clone); waiting for a fresh fetch"
                                .into(),
                        );
                    }
                }
                components = fresh;
                drop_file_cache = had_cache && !fresh_in_memory;
            }
        }

        let identity: Vec<(&str, &str)> = components
            .iter()
            .filter(|c| c.class == ComponentClass::Identity)
            .filter_map(|c| c.hash.as_deref().map(|h| (c.name.as_str(), h)))
            .collect();
        if identity.is_empty() {
            return Err(DeviceError::NoIdentity {
                tried: components
                    .iter()
                    .filter(|c| c.class == ComponentClass::Identity)
                    .map(|c| {
                        let mut s = format!("{} ({}): {}", c.name, c.source, state_str(c.state));
                        if let Some(n) = &c.note {
                            s.push_str(&format!(" - {n}"));
                        }
                        s
                    })
                    .collect(),
                machine_id_uninitialized: settling,
            });
        }
        let code = derive::device_code(&self.product_id, &identity);
        let accepted = baseline::accepted_codes(&code, status, old.as_ref());
        let mut detail = describe(status, &code, old.as_ref(), &components, persist);
        let uncarried: Vec<&str> = components
            .iter()
            .filter(|c| {
                c.class == ComponentClass::Identity
                    && c.state == ComponentState::Unreadable
                    && c.hash.is_none()
            })
            .map(|c| c.name.as_str())
            .collect();
        if !uncarried.is_empty() {
            notes.push(format!(
                "unreadable identity sources left out of the code: {} (run as root, or ask the daemon)",
                uncarried.join(", ")
            ));
        }
        if !notes.is_empty() {
            detail = format!("{detail} Note: {}.", notes.join("; "));
        }

        let mut persisted = false;
        if persist && status != IdentityStatus::Settling {
            baseline::update(&mut file, &code, status, &components, now_unix);
            if drop_file_cache {
                file.instance_id = None;
            }
            let path = self.state_file().expect("persist implies a state dir");
            match baseline::save(&path, &file) {
                Ok(()) => persisted = true,
                Err(e) => {
                    log::warn!("could not save {}: {e}", path.display());
                    detail = format!("{detail} (identity.json not saved: {e})");
                }
            }
        }
        drop(lock);

        Ok(DeviceReport {
            code,
            accepted_codes: accepted,
            status,
            settled: status != IdentityStatus::Settling,
            product_id: self.product_id.clone(),
            components: components.into_iter().map(report).collect(),
            baseline_code: old.map(|b| b.code),
            detail,
            container: snapshot.container,
            persisted,
            answer_json: Default::default(),
        })
    }

    /// Fetches the instance id from the metadata service (blocking, bounded by
    /// `metadata_timeout_ms`) and caches its keyed hash in memory and in identity.json.
    /// Returns whether the cached value changed (then the caller should `resolve` again).
    /// `Ok(false)` without any request when `metadata = false`. On failure the cache is kept.
    pub fn refresh_instance_id(&self) -> Result<bool, DeviceError> {
        self.check()?;
        if !self.cfg.metadata {
            return Ok(false);
        }
        // The default address is link-local: only worth asking (and only polite to ask)
        // on a VM whose firmware says it runs on an OpenStack cloud such as Huawei Cloud
        // ECS. Bare metal, boards and laptops never send that request. A configured URL
        // is always asked.
        if self.cfg.metadata_url == DEFAULT_METADATA_URL
            && !sources::on_openstack_cloud(&self.cfg.root)
        {
            return Ok(false);
        }
        let uuid = metadata::fetch_instance_id(
            &self.cfg.metadata_url,
            Duration::from_millis(self.cfg.metadata_timeout_ms),
        )
        .map_err(DeviceError::Metadata)?;
        let hash = derive::component_hash(&self.product_id, "instance_id", &uuid);
        drop(uuid);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let entry = CachedInstance {
            hash,
            fetched_at: now,
        };
        let _guard = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let mut previous = self
            .instance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(entry.clone());
        if let Some(path) = self.state_file() {
            let dir = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(dir).map_err(Self::state_err(dir))?;
            let lp = dir.join(LOCK_FILE);
            let _lock = crate::store::FileLock::acquire(&lp).map_err(Self::state_err(&lp))?;
            let mut file = match baseline::load(&path) {
                Ok(Some(f)) if f.product_id == self.product_id => f,
                Ok(_) => IdentityFile {
                    version: baseline::FILE_VERSION,
                    product_id: self.product_id.clone(),
                    ..Default::default()
                },
                Err(e) => return Err(Self::state_err(&path)(e)),
            };
            if previous.is_none() {
                previous = file.instance_id.clone();
            }
            file.instance_id = Some(entry.clone());
            baseline::save(&path, &file).map_err(Self::state_err(&path))?;
        }
        Ok(previous.map(|p| p.hash) != Some(entry.hash))
    }

    fn memory_instance(&self) -> Option<CachedInstance> {
        self.instance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn cached_instance(&self, file: &IdentityFile) -> Option<CachedInstance> {
        self.memory_instance().or_else(|| file.instance_id.clone())
    }

    /// Hashes the raw readings (raw values are dropped here) and inserts the cached instance id
    /// after the built-in identity sources. Returns the components and whether machine-id is
    /// uninitialized.
    fn hash_components(
        &self,
        raws: Vec<Raw>,
        cached: Option<CachedInstance>,
    ) -> (Vec<Component>, bool) {
        let pid = self.product_id.as_str();
        let mut settling = false;
        let mut out: Vec<Component> = Vec::with_capacity(raws.len() + 1);
        for raw in raws {
            let before_instance = raw.name == "cpu" || raw.name.starts_with("vendor.");
            if before_instance && !out.iter().any(|c| c.name == "instance_id") {
                out.push(self.instance_component(cached.clone()));
            }
            let (state, hash, note) = match raw.reading {
                Reading::Found(v) => (
                    ComponentState::Found,
                    Some(derive::component_hash(pid, &raw.name, &v)),
                    None,
                ),
                Reading::Hashed(h) => (
                    ComponentState::Found,
                    Some(h),
                    Some(format!("read by the privileged start step ({HASHES_FILE})")),
                ),
                Reading::Absent(n) => (ComponentState::Absent, None, n),
                Reading::Unreadable(n) => (ComponentState::Unreadable, None, Some(n)),
                Reading::Placeholder(n) => (ComponentState::Placeholder, None, Some(n)),
                Reading::Uninitialized => {
                    settling = true;
                    (
                        ComponentState::Placeholder,
                        None,
                        Some("uninitialized: first boot of a prepared image".to_string()),
                    )
                }
            };
            let items = raw
                .items
                .iter()
                .map(|m| derive::component_hash(pid, "mac", m))
                .collect();
            out.push(Component {
                name: raw.name,
                class: ComponentClass::Drift,
                state,
                hash,
                items,
                source: raw.source,
                note,
                changed: false,
                not_consulted: false,
            });
        }
        if !out.iter().any(|c| c.name == "instance_id") {
            out.push(self.instance_component(cached));
        }
        (out, settling)
    }

    fn instance_component(&self, cached: Option<CachedInstance>) -> Component {
        let (state, hash, note) = match (self.cfg.metadata, cached) {
            (false, _) => (
                ComponentState::Absent,
                None,
                Some("metadata = false".to_string()),
            ),
            (true, Some(c)) => (ComponentState::Found, Some(c.hash), None),
            (true, None) => (
                ComponentState::Absent,
                None,
                Some("not fetched yet (no cached value)".to_string()),
            ),
        };
        let not_consulted = hash.is_none();
        Component {
            name: "instance_id".into(),
            class: ComponentClass::Drift,
            state,
            hash,
            items: Vec::new(),
            source: self.cfg.metadata_url.clone(),
            note,
            changed: false,
            not_consulted,
        }
    }
}

/// Identity class: machine-id, DMI product UUID, board serial, device-tree serial, vendor
/// sources, and the instance id only when there is no DMI product UUID. Everything else drifts.
fn assign_classes(components: &mut [Component]) {
    let has_dmi = components
        .iter()
        .any(|c| c.name == "dmi_product_uuid" && c.hash.is_some());
    for c in components.iter_mut() {
        let identity = match c.name.as_str() {
            "instance_id" => !has_dmi,
            n => derive::code_order(n).is_some(),
        };
        c.class = if identity {
            ComponentClass::Identity
        } else {
            ComponentClass::Drift
        };
    }
}

fn state_str(s: ComponentState) -> &'static str {
    match s {
        ComponentState::Found => "found",
        ComponentState::Absent => "absent",
        ComponentState::Unreadable => "unreadable",
        ComponentState::Placeholder => "placeholder",
    }
}

fn report(c: Component) -> ComponentReport {
    ComponentReport {
        name: c.name,
        class: c.class,
        state: c.state,
        hash: c.hash,
        changed: c.changed,
        source: c.source,
        note: c.note,
    }
}

fn describe(
    status: IdentityStatus,
    code: &str,
    old: Option<&Baseline>,
    components: &[Component],
    persist: bool,
) -> String {
    let changed: Vec<&str> = components
        .iter()
        .filter(|c| c.changed)
        .map(|c| c.name.as_str())
        .collect();
    let list = changed.join(", ");
    match status {
        IdentityStatus::Settling => "machine-id is not initialized yet (first boot of a prepared image): this code is provisional, check again once the system has finished booting.".to_string(),
        IdentityStatus::FirstSeen if persist => format!("First reading for this product on this machine: {code} is now the baseline."),
        IdentityStatus::FirstSeen => "No baseline to compare with (nothing remembered).".to_string(),
        IdentityStatus::Same => match old {
            Some(b) if b.code != code => format!("Same device; a new identity source appeared, so the code changed from {} (still accepted).", b.code),
            _ => "Same device as the baseline.".to_string(),
        },
        IdentityStatus::Drift => match old {
            Some(b) if b.code != code => format!(
                "One component changed ({list}) while the device identity is kept: the baseline code {} stays accepted.",
                b.code
            ),
            _ => format!(
                "One component changed ({list}) while the device identity is kept: the code is unchanged."
            ),
        },
        IdentityStatus::Clone => format!(
            "Cloned machine: machine-id is shared with the original but {list} changed, so this is a different device (was {}); consider regenerating /etc/machine-id.",
            old.map(|b| b.code.as_str()).unwrap_or("-")
        ),
        IdentityStatus::NewDevice => format!(
            "Different device: {} components changed ({list}); was {}.",
            changed.len(),
            old.map(|b| b.code.as_str()).unwrap_or("-")
        ),
    }
}
