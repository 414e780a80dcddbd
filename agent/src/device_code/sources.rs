//! Reading raw identifiers from the (possibly fake) file-system root. All reads go through
//! `IdentityConfig.root`; nothing here hashes, classifies or touches the network.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::normalize::{self, clean, is_placeholder};
use super::vendor;
use super::{IdentityConfig, VendorSource};

/// Largest file we read (identifier files are tiny; this bounds surprises such as a FIFO).
const MAX_READ: u64 = 64 * 1024;

/// What one source yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reading {
    /// A usable, normalised value (raw: hash it and drop it).
    Found(String),
    /// Already the keyed component hash: read by the privileged start step
    /// (`privileged.rs`), which hands over hashes only.
    Hashed(String),
    /// The file or entry does not exist here.
    Absent(Option<String>),
    /// It exists but could not be read (permissions, I/O error, command failure).
    Unreadable(String),
    /// A vendor filler value such as "To be filled by O.E.M.".
    Placeholder(String),
    /// machine-id empty or `uninitialized`: first boot of a prepared image.
    Uninitialized,
}

/// One raw component before hashing.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub name: String,
    /// Where it was read from (a path as seen by the machine, or a command), for `--explain`.
    pub source: String,
    pub reading: Reading,
    /// Set-valued components (MACs): the individual normalised values.
    pub items: Vec<String>,
}

impl Raw {
    fn new(name: &str, source: impl Into<String>, reading: Reading) -> Self {
        Raw {
            name: name.to_string(),
            source: source.into(),
            reading,
            items: Vec::new(),
        }
    }
}

/// Everything read from the local machine in one pass.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub components: Vec<Raw>,
    pub container: bool,
}

/// `<root>/<abs>` for an absolute path as seen by the machine.
pub(crate) fn rooted(root: &Path, abs: impl AsRef<Path>) -> PathBuf {
    let abs = abs.as_ref();
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Reads a small text file. `Ok(None)` when it does not exist.
pub(crate) fn read_small(path: &Path) -> Result<Option<String>, String> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(describe(&e)),
    };
    let mut buf = Vec::new();
    match file.take(MAX_READ).read_to_end(&mut buf) {
        Ok(_) => Ok(Some(String::from_utf8_lossy(&buf).into_owned())),
        Err(e) => Err(describe(&e)),
    }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "permission denied (root-only file)".to_string(),
        _ => e.to_string(),
    }
}

/// A plain identifier file: absent / unreadable / placeholder / found (cleaned).
fn read_value(root: &Path, name: &str, abs: &str, normalize: fn(&str) -> Option<String>) -> Raw {
    let reading = match read_small(&rooted(root, abs)) {
        Ok(None) => Reading::Absent(None),
        Err(e) => Reading::Unreadable(e),
        Ok(Some(text)) => {
            let v = clean(&text);
            match normalize(&v) {
                Some(n) => Reading::Found(n),
                None => Reading::Placeholder(format!("placeholder value {:?}", short(&v))),
            }
        }
    };
    Raw::new(name, abs, reading)
}

/// At most 40 chars of a placeholder, for notes (placeholders are not identifying).
fn short(v: &str) -> String {
    v.chars().take(40).collect()
}

fn serial(v: &str) -> Option<String> {
    if is_placeholder(v) {
        None
    } else {
        Some(v.to_string())
    }
}

/// True when DMI names an OpenStack-based cloud: Huawei Cloud ECS reports
/// `OpenStack Foundation` / `OpenStack Nova` and the chassis asset tag `HUAWEICLOUD`.
pub(crate) fn on_openstack_cloud(root: &Path) -> bool {
    [
        "sys_vendor",
        "product_name",
        "chassis_asset_tag",
        "chassis_vendor",
    ]
    .iter()
    .filter_map(|f| {
        read_small(&rooted(root, format!("/sys/class/dmi/id/{f}")))
            .ok()
            .flatten()
    })
    .any(|v| {
        let v = v.to_ascii_lowercase();
        v.contains("openstack") || v.contains("huaweicloud")
    })
}

/// Container markers left by docker, podman and systemd-nspawn / LXC.
pub(crate) fn in_container(root: &Path) -> bool {
    [
        "/.dockerenv",
        "/run/.containerenv",
        "/run/systemd/container",
    ]
    .iter()
    .any(|p| rooted(root, p).exists())
}

/// `/etc/machine-id`, falling back to `/var/lib/dbus/machine-id` only when the former is missing
/// (an empty `/etc/machine-id` means "first boot": the dbus copy would be the image's, shared by
/// every clone).
pub(crate) fn machine_id(root: &Path, container: bool) -> Raw {
    let mut last = Raw::new("machine_id", "/etc/machine-id", Reading::Absent(None));
    for abs in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        let reading = match read_small(&rooted(root, abs)) {
            Ok(None) => {
                last = Raw::new("machine_id", abs, Reading::Absent(None));
                continue;
            }
            Err(e) => Reading::Unreadable(e),
            Ok(Some(text)) => {
                let v = clean(&text).to_ascii_lowercase();
                if v.is_empty() || v == "uninitialized" {
                    if container {
                        Reading::Absent(Some(
                            "empty in a container (no systemd to fill it): ignored".into(),
                        ))
                    } else {
                        Reading::Uninitialized
                    }
                } else if is_placeholder(&v) {
                    Reading::Placeholder("all-zero machine-id".into())
                } else {
                    Reading::Found(v)
                }
            }
        };
        return Raw::new("machine_id", abs, reading);
    }
    last.source = "/etc/machine-id, /var/lib/dbus/machine-id".into();
    last
}

pub(crate) fn dmi_product_uuid(root: &Path) -> Raw {
    read_value(
        root,
        "dmi_product_uuid",
        "/sys/class/dmi/id/product_uuid",
        normalize::normalize_uuid,
    )
}

pub(crate) fn board_serial(root: &Path) -> Raw {
    read_value(
        root,
        "board_serial",
        "/sys/class/dmi/id/board_serial",
        serial,
    )
}

pub(crate) fn devicetree_serial(root: &Path) -> Raw {
    let first = read_value(
        root,
        "devicetree_serial",
        "/proc/device-tree/serial-number",
        serial,
    );
    if matches!(first.reading, Reading::Absent(_)) {
        let second = read_value(
            root,
            "devicetree_serial",
            "/sys/firmware/devicetree/base/serial-number",
            serial,
        );
        if !matches!(second.reading, Reading::Absent(_)) {
            return second;
        }
    }
    first
}

/// CPU vendor + brand from `/proc/cpuinfo`, read through the root. (There used to be a
/// `sysinfo` fallback for systems without that file: on Linux, the only system the agent
/// supports, sysinfo reads the same file, so it could only ever find nothing.)
pub(crate) fn cpu(root: &Path) -> Raw {
    let abs = "/proc/cpuinfo";
    match read_small(&rooted(root, abs)) {
        Ok(Some(text)) => match normalize::cpu_from_cpuinfo(&text) {
            Some(v) => Raw::new("cpu", abs, Reading::Found(v)),
            None => Raw::new(
                "cpu",
                abs,
                Reading::Absent(Some("no vendor or model fields".into())),
            ),
        },
        Err(e) => Raw::new("cpu", abs, Reading::Unreadable(e)),
        Ok(None) => Raw::new("cpu", abs, Reading::Absent(None)),
    }
}

/// Permanent MAC addresses of physical NICs (entries of `/sys/class/net` that have a `device`
/// link and `addr_assign_type` 0), sorted.
pub(crate) fn macs(root: &Path) -> Raw {
    let abs = "/sys/class/net";
    let dir = match fs::read_dir(rooted(root, abs)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Raw::new("macs", abs, Reading::Absent(None))
        }
        Err(e) => return Raw::new("macs", abs, Reading::Unreadable(describe(&e))),
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let nic = entry.path();
        if fs::symlink_metadata(nic.join("device")).is_err() {
            continue; // virtual: lo, bridges, veth, tun, bonds, …
        }
        let permanent =
            matches!(read_small(&nic.join("addr_assign_type")), Ok(Some(t)) if t.trim() == "0");
        if !permanent {
            continue;
        }
        if let Ok(Some(addr)) = read_small(&nic.join("address")) {
            if let Some(mac) = normalize::normalize_mac(&addr) {
                if !found.contains(&mac) {
                    found.push(mac);
                }
            }
        }
    }
    found.sort();
    let mut raw = if found.is_empty() {
        Raw::new(
            "macs",
            abs,
            Reading::Absent(Some("no physical NIC with a permanent address".into())),
        )
    } else {
        Raw::new("macs", abs, Reading::Found(found.join(",")))
    };
    raw.items = found;
    raw
}

fn link_basename(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// UUID of the file system mounted on `/`: the root mount's source device (from mountinfo),
/// matched among the `/dev/disk/by-uuid/*` symlink targets by basename.
pub(crate) fn root_fs_uuid(root: &Path) -> Raw {
    let abs = "/proc/self/mountinfo";
    let name = "root_fs_uuid";
    let text = match read_small(&rooted(root, abs)) {
        Ok(Some(t)) => t,
        Ok(None) => return Raw::new(name, abs, Reading::Absent(None)),
        Err(e) => return Raw::new(name, abs, Reading::Unreadable(e)),
    };
    let Some((majmin, source)) = normalize::root_mount(&text) else {
        return Raw::new(name, abs, Reading::Absent(Some("no / mount".into())));
    };
    if !source.starts_with("/dev/") {
        return Raw::new(
            name,
            abs,
            Reading::Absent(Some(format!("root is not a block device ({source})"))),
        );
    }
    let mut candidates: Vec<String> = Vec::new();
    if let Some(b) = Path::new(&source).file_name() {
        candidates.push(b.to_string_lossy().into_owned());
    }
    // /dev/mapper/vg-root -> ../dm-0 ; /dev/root -> the device behind major:minor.
    candidates.extend(link_basename(&rooted(root, &source)));
    candidates.extend(link_basename(&rooted(
        root,
        format!("/sys/dev/block/{majmin}"),
    )));
    let by_uuid = "/dev/disk/by-uuid";
    let entries = match fs::read_dir(rooted(root, by_uuid)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Raw::new(
                name,
                by_uuid,
                Reading::Absent(Some(format!("no {by_uuid} (needed to name {source})"))),
            )
        }
        Err(e) => return Raw::new(name, by_uuid, Reading::Unreadable(describe(&e))),
    };
    let mut matches: Vec<String> = entries
        .flatten()
        .filter(|e| link_basename(&e.path()).is_some_and(|b| candidates.contains(&b)))
        .map(|e| e.file_name().to_string_lossy().to_ascii_lowercase())
        .collect();
    matches.sort();
    match matches.first() {
        Some(uuid) => Raw::new(name, by_uuid, Reading::Found(uuid.clone())),
        None => Raw::new(
            name,
            by_uuid,
            Reading::Absent(Some(format!("no by-uuid link for {source}"))),
        ),
    }
}

/// A `[[identity.source]]` entry.
pub(crate) fn vendor_source(root: &Path, src: &VendorSource, timeout_ms: u64) -> Raw {
    let name = format!("vendor.{}", src.name);
    if let Some(file) = &src.file {
        let shown = file.display().to_string();
        let mut raw = read_value(root, &name, &shown, serial);
        raw.name = name;
        return raw;
    }
    let argv = src.command.clone().unwrap_or_default();
    let shown = argv.join(" ");
    let reading = match vendor::run(&argv, std::time::Duration::from_millis(timeout_ms)) {
        Ok(out) => {
            let v = clean(&out);
            if is_placeholder(&v) {
                Reading::Placeholder(format!("placeholder output {:?}", short(&v)))
            } else {
                Reading::Found(v)
            }
        }
        Err(e) => Reading::Unreadable(e),
    };
    Raw::new(&name, shown, reading)
}

/// Reads every local source (no network). The instance id comes from the cache, not from here.
pub(crate) fn read_all(cfg: &IdentityConfig) -> Snapshot {
    let root = cfg.root.as_path();
    let container = in_container(root);
    let mut components = vec![
        machine_id(root, container),
        dmi_product_uuid(root),
        board_serial(root),
        devicetree_serial(root),
    ];
    for src in &cfg.source {
        components.push(vendor_source(root, src, cfg.command_timeout_ms));
    }
    components.push(cpu(root));
    components.push(macs(root));
    components.push(root_fs_uuid(root));
    Snapshot {
        components,
        container,
    }
}
