//! Resolver tests on fake `/etc`, `/sys`, `/proc`, `/dev` trees.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::metadata::testserver;
use super::*;

const MID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const UUID: &str = "4C4C4544-0042-3510-8052-B4C04F4E4E32";
const UUID_SWAPPED: &str = "44454C4C-4200-1035-8052-B4C04F4E4E32";
const MAC0: &str = "fa:16:3e:11:22:33";
const FS_UUID: &str = "7d3a1c2e-95b1-4f5e-8a7b-0c1d2e3f4a5b";

struct Fake {
    root: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Fake {
    /// An empty tree.
    fn empty() -> Fake {
        Fake {
            root: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// A plain KVM/ECS-like VM: machine-id, DMI UUID + board serial, x86 cpuinfo, one physical
    /// NIC plus lo and a bridge, an ext4 root on /dev/vda1.
    fn vm() -> Fake {
        let f = Fake::empty();
        f.write("etc/machine-id", &format!("{MID}\n"));
        f.write("etc/hostname", "ecs-a\n");
        f.write("sys/class/dmi/id/product_uuid", &format!("{UUID}\n"));
        f.write("sys/class/dmi/id/board_serial", "BSN-12345\n");
        f.write(
            "proc/cpuinfo",
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6278C CPU @ 2.60GHz\ncpu cores\t: 2\n",
        );
        f.nic("eth0", MAC0, true, "0");
        f.nic("lo", "00:00:00:00:00:00", false, "0");
        f.nic("br0", "02:42:ac:11:00:01", false, "3");
        f.write(
            "proc/self/mountinfo",
            "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n25 22 0:5 / /dev rw - devtmpfs udev rw\n",
        );
        f.mkdir("dev/disk/by-uuid");
        symlink("../../vda1", f.path("dev/disk/by-uuid").join(FS_UUID)).unwrap();
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.path(rel)).unwrap();
    }

    fn remove(&self, rel: &str) {
        let p = self.path(rel);
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }

    fn nic(&self, name: &str, mac: &str, physical: bool, assign_type: &str) {
        let dir = format!("sys/class/net/{name}");
        self.write(&format!("{dir}/address"), &format!("{mac}\n"));
        self.write(
            &format!("{dir}/addr_assign_type"),
            &format!("{assign_type}\n"),
        );
        if physical {
            self.mkdir(&format!("{dir}/device"));
        }
    }

    fn cfg(&self) -> IdentityConfig {
        IdentityConfig {
            root: self.root.path().to_path_buf(),
            metadata: false,
            ..Default::default()
        }
    }

    fn resolver(&self) -> Resolver {
        self.resolver_with(self.cfg(), "prod-1")
    }

    fn resolver_with(&self, cfg: IdentityConfig, product: &str) -> Resolver {
        Resolver::new(cfg, product.into(), Some(self.state.path().to_path_buf()))
    }

    fn state_file(&self) -> PathBuf {
        self.state.path().join(IDENTITY_FILE)
    }
}

fn comp<'a>(r: &'a DeviceReport, name: &str) -> &'a ComponentReport {
    r.components
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no component {name} in {:?}", r.components))
}

fn run(r: &Resolver, now: i64) -> DeviceReport {
    r.resolve(now, true).unwrap()
}

#[test]
fn plain_vm_is_stable_and_stores_no_raw_ids() {
    let f = Fake::vm();
    let a = run(&f.resolver(), 100);
    assert_eq!(a.status, IdentityStatus::FirstSeen);
    assert!(a.settled && a.persisted && !a.container);
    assert_eq!(parse_code(&a.code).unwrap(), a.code);
    assert_eq!(a.accepted_codes, vec![a.code.clone()]);
    assert_eq!(a.baseline_code, None);
    for (name, class, state) in [
        (
            "machine_id",
            ComponentClass::Identity,
            ComponentState::Found,
        ),
        (
            "dmi_product_uuid",
            ComponentClass::Identity,
            ComponentState::Found,
        ),
        (
            "board_serial",
            ComponentClass::Identity,
            ComponentState::Found,
        ),
        (
            "devicetree_serial",
            ComponentClass::Identity,
            ComponentState::Absent,
        ),
        ("instance_id", ComponentClass::Drift, ComponentState::Absent),
        ("cpu", ComponentClass::Drift, ComponentState::Found),
        ("macs", ComponentClass::Drift, ComponentState::Found),
        ("root_fs_uuid", ComponentClass::Drift, ComponentState::Found),
    ] {
        let c = comp(&a, name);
        assert_eq!((c.class, c.state), (class, state), "{name}");
        assert_eq!(c.hash.is_some(), state == ComponentState::Found, "{name}");
    }

    // Reboot with another hostname (and a new kernel): nothing we read changes.
    f.write("etc/hostname", "renamed-host\n");
    let b = run(&f.resolver(), 200);
    assert_eq!(b.status, IdentityStatus::Same);
    assert_eq!(b.code, a.code);
    assert_eq!(b.baseline_code.as_deref(), Some(a.code.as_str()));
    assert!(b.components.iter().all(|c| !c.changed));

    let text = fs::read_to_string(f.state_file()).unwrap().to_lowercase();
    for raw in [
        MID,
        "4c4c4544",
        "44454c4c",
        "bsn-12345",
        MAC0,
        FS_UUID,
        "genuineintel",
    ] {
        assert!(!text.contains(raw), "identity.json leaks {raw}");
    }
    let json = serde_json::to_string(&b).unwrap().to_lowercase();
    for raw in [MID, "4c4c4544", "bsn-12345", MAC0, FS_UUID] {
        assert!(!json.contains(raw), "report leaks {raw}");
    }
    assert!(json.contains("\"status\":\"same\""));
    assert!(b.accepts(&b.code.to_lowercase().replace('-', "")));
    assert!(!b.accepts("0000-0000-0000-0000-0000"));
    assert!(!b.accepts("garbage"));
    let text = b.explain();
    assert!(
        text.contains(&b.code) && text.contains("dmi_product_uuid"),
        "{text}"
    );
    assert!(!text.to_lowercase().contains(MID));
    let mode = fs::metadata(f.state_file()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn cloned_vm_gets_a_new_code() {
    let f = Fake::vm();
    let orig = run(&f.resolver(), 1);
    // The clone: same disk (machine-id, identity.json, root fs), new DMI UUID and NIC.
    f.write(
        "sys/class/dmi/id/product_uuid",
        "9B0E8A4C-1D2F-4E3A-8B7C-6D5E4F3A2B1C\n",
    );
    f.remove("sys/class/net/eth0");
    f.nic("eth0", "fa:16:3e:99:88:77", true, "0");
    let c = run(&f.resolver(), 2);
    assert_eq!(c.status, IdentityStatus::Clone);
    assert_ne!(c.code, orig.code);
    assert_eq!(c.accepted_codes, vec![c.code.clone()]);
    assert_eq!(c.baseline_code.as_deref(), Some(orig.code.as_str()));
    assert!(comp(&c, "dmi_product_uuid").changed);
    assert!(!comp(&c, "machine_id").changed);
    assert!(c.detail.contains("Cloned"), "{}", c.detail);
    // The clone's reading is its own baseline from now on.
    let again = run(&f.resolver(), 3);
    assert_eq!(again.status, IdentityStatus::Same);
    assert_eq!(again.code, c.code);
    let file = baseline::load(&f.state_file()).unwrap().unwrap();
    let last = file.history.last().unwrap();
    assert_eq!(last.status, IdentityStatus::Clone);
    assert_eq!(last.from.as_deref(), Some(orig.code.as_str()));
}

#[test]
fn nic_added_is_same_nic_removed_is_drift() {
    let f = Fake::vm();
    let a = run(&f.resolver(), 1);
    f.nic("eth1", "fa:16:3e:44:55:66", true, "0");
    let b = run(&f.resolver(), 2);
    assert_eq!(b.status, IdentityStatus::Same);
    assert_eq!(b.code, a.code);

    // Remove the original NIC: drift, same code, baseline kept.
    f.remove("sys/class/net/eth0");
    let c = run(&f.resolver(), 3);
    assert_eq!(c.status, IdentityStatus::Drift);
    assert_eq!(c.code, a.code);
    assert!(comp(&c, "macs").changed);
    assert_eq!(c.accepted_codes, vec![a.code.clone()]);

    // A second change is measured against the kept baseline: drift does not accumulate.
    fs::remove_file(f.path("dev/disk/by-uuid").join(FS_UUID)).unwrap();
    symlink(
        "../../vda1",
        f.path("dev/disk/by-uuid/11111111-2222-3333-4444-555555555555"),
    )
    .unwrap();
    let d = run(&f.resolver(), 4);
    assert_eq!(d.status, IdentityStatus::NewDevice);
}

#[test]
fn machine_id_regenerated_on_same_hardware_is_drift() {
    let f = Fake::vm();
    let a = run(&f.resolver(), 1);
    f.write("etc/machine-id", "aaaabbbbccccddddeeeeffff00001111\n");
    let b = run(&f.resolver(), 2);
    assert_eq!(b.status, IdentityStatus::Drift);
    assert_ne!(b.code, a.code);
    assert_eq!(b.accepted_codes, vec![b.code.clone(), a.code.clone()]);
    assert!(b.settled);
}

#[test]
fn container_without_dmi() {
    let f = Fake::empty();
    f.write(".dockerenv", "");
    f.write("etc/machine-id", &format!("{MID}\n"));
    f.write(
        "proc/self/mountinfo",
        "600 500 0:52 / / rw,relatime - overlay overlay rw,lowerdir=/a\n",
    );
    let r = run(&f.resolver(), 1);
    assert!(r.container);
    assert_eq!(r.status, IdentityStatus::FirstSeen);
    assert_eq!(comp(&r, "dmi_product_uuid").state, ComponentState::Absent);
    assert_eq!(comp(&r, "instance_id").class, ComponentClass::Identity);
    let rootfs = comp(&r, "root_fs_uuid");
    assert_eq!(rootfs.state, ComponentState::Absent);
    assert!(rootfs.note.as_deref().unwrap().contains("overlay"));

    // A container image with an empty machine-id (no systemd will ever fill it) is not
    // "settling" forever: the component is just absent.
    f.write("etc/machine-id", "");
    let err = f.resolver().resolve(2, true).unwrap_err();
    match &err {
        DeviceError::NoIdentity {
            tried,
            machine_id_uninitialized,
        } => {
            assert!(!machine_id_uninitialized);
            assert!(tried.iter().any(|t| t.starts_with("machine_id")));
            assert!(tried.iter().any(|t| t.starts_with("dmi_product_uuid")));
            assert!(tried.iter().any(|t| t.starts_with("instance_id")));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("no device identity source"));
}

#[test]
fn empty_or_uninitialized_machine_id_is_settling() {
    for content in ["", "\n", "uninitialized\n"] {
        let f = Fake::vm();
        f.write("etc/machine-id", content);
        // The image's stale dbus copy must not be used instead.
        f.write(
            "var/lib/dbus/machine-id",
            "11112222333344445555666677778888\n",
        );
        let r = run(&f.resolver(), 1);
        assert_eq!(r.status, IdentityStatus::Settling, "{content:?}");
        assert!(!r.settled && !r.persisted);
        assert_eq!(comp(&r, "machine_id").state, ComponentState::Placeholder);
        assert!(!f.state_file().exists(), "baseline written while settling");
        assert!(!r.accepts(&r.code), "a provisional code is never accepted");
        assert!(r.explain().contains("provisional"));
        // systemd fills machine-id: first_seen now.
        f.write("etc/machine-id", &format!("{MID}\n"));
        let s = run(&f.resolver(), 2);
        assert_eq!(s.status, IdentityStatus::FirstSeen);
        assert_ne!(s.code, r.code);
    }
    // Settling with nothing else: a typed error that says so.
    let f = Fake::empty();
    f.write("etc/machine-id", "uninitialized\n");
    match f.resolver().resolve(1, true).unwrap_err() {
        DeviceError::NoIdentity {
            machine_id_uninitialized,
            ..
        } => assert!(machine_id_uninitialized),
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn missing_machine_id() {
    let f = Fake::vm();
    let with = run(&f.resolver(), 1);
    f.remove("etc/machine-id");
    f.write("var/lib/dbus/machine-id", &format!("{MID}\n"));
    let dbus = f.resolver().resolve(2, false).unwrap();
    assert_eq!(dbus.code, with.code, "dbus fallback reads the same id");
    assert_eq!(comp(&dbus, "machine_id").source, "/var/lib/dbus/machine-id");
    f.remove("var/lib/dbus/machine-id");
    let without = f.resolver().resolve(3, false).unwrap();
    assert_eq!(comp(&without, "machine_id").state, ComponentState::Absent);
    assert_ne!(without.code, with.code);
    // Hardware still there: one component gone is drift.
    assert_eq!(without.status, IdentityStatus::Drift);
}

#[test]
fn vmware_byteswapped_uuid_gives_the_same_code() {
    let a = Fake::vm();
    let b = Fake::vm();
    b.write(
        "sys/class/dmi/id/product_uuid",
        &format!("{}\n", UUID_SWAPPED.to_lowercase()),
    );
    let ra = a.resolver().resolve(1, false).unwrap();
    let rb = b.resolver().resolve(1, false).unwrap();
    assert_eq!(ra.code, rb.code);
    // And on one machine after an SMBIOS version change.
    run(&a.resolver(), 1);
    a.write("sys/class/dmi/id/product_uuid", UUID_SWAPPED);
    let r = run(&a.resolver(), 2);
    assert_eq!(r.status, IdentityStatus::Same);
    assert_eq!(r.code, ra.code);
}

#[test]
fn unreadable_dmi_files() {
    // A directory in place of the file gives EISDIR: "unreadable" even for root.
    let f = Fake::vm();
    let full = run(&f.resolver(), 1);
    f.remove("sys/class/dmi/id/board_serial");
    f.mkdir("sys/class/dmi/id/board_serial");
    let r = f.resolver().resolve(2, false).unwrap();
    let c = comp(&r, "board_serial");
    assert_eq!(c.state, ComponentState::Unreadable);
    // The baseline hash is carried: same code, not a change.
    assert_eq!(c.hash, comp(&full, "board_serial").hash);
    assert!(!c.changed);
    assert_eq!(r.code, full.code);
    assert_eq!(r.status, IdentityStatus::Same);
    // Without a baseline the component is simply left out, and the detail says so.
    let fresh = Resolver::new(f.cfg(), "prod-1".into(), None);
    let r = fresh.resolve(3, true).unwrap();
    assert_eq!(comp(&r, "board_serial").hash, None);
    assert_ne!(r.code, full.code);
    assert!(r.detail.contains("board_serial"), "{}", r.detail);
    assert!(!r.persisted);

    // chmod 000: only meaningful when not running as root (root reads anyway).
    let g = Fake::vm();
    let p = g.path("sys/class/dmi/id/product_uuid");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    let r = g.resolver().resolve(1, false).unwrap();
    if !crate::sys::is_root() {
        let c = comp(&r, "dmi_product_uuid");
        assert_eq!(c.state, ComponentState::Unreadable);
        assert!(c.note.as_deref().unwrap().contains("permission denied"));
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn placeholder_serials_are_ignored() {
    let f = Fake::vm();
    f.write("sys/class/dmi/id/board_serial", "To be filled by O.E.M.\n");
    let r = f.resolver().resolve(1, false).unwrap();
    let c = comp(&r, "board_serial");
    assert_eq!(
        (c.state, c.hash.as_deref()),
        (ComponentState::Placeholder, None)
    );
    let base = {
        let g = Fake::vm();
        g.remove("sys/class/dmi/id/board_serial");
        g.resolver().resolve(1, false).unwrap()
    };
    assert_eq!(r.code, base.code, "a placeholder is the same as no serial");
    for p in ["None", "Default string", "Not Specified", "0", ""] {
        f.write("sys/class/dmi/id/board_serial", p);
        let r = f.resolver().resolve(1, false).unwrap();
        assert_eq!(
            comp(&r, "board_serial").state,
            ComponentState::Placeholder,
            "{p:?}"
        );
    }
    f.write(
        "sys/class/dmi/id/product_uuid",
        "00000000-0000-0000-0000-000000000000",
    );
    let r = f.resolver().resolve(1, false).unwrap();
    assert_eq!(
        comp(&r, "dmi_product_uuid").state,
        ComponentState::Placeholder
    );
    f.write(
        "sys/class/dmi/id/product_uuid",
        "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
    );
    let r = f.resolver().resolve(1, false).unwrap();
    assert_eq!(
        comp(&r, "dmi_product_uuid").state,
        ComponentState::Placeholder
    );
}

#[test]
fn devicetree_serial_on_arm_boards() {
    let f = Fake::empty();
    f.write("proc/device-tree/serial-number", "10000000abcdef01\0");
    f.write(
        "proc/cpuinfo",
        "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n",
    );
    let r = f.resolver().resolve(1, false).unwrap();
    assert_eq!(comp(&r, "devicetree_serial").state, ComponentState::Found);
    assert_eq!(comp(&r, "cpu").state, ComponentState::Found);
    let g = Fake::empty();
    g.write(
        "sys/firmware/devicetree/base/serial-number",
        "10000000abcdef01\0\0",
    );
    let s = g.resolver().resolve(1, false).unwrap();
    assert_eq!(s.code, r.code, "both device-tree paths give the same value");
}

#[test]
fn vendor_file_and_command_sources() {
    let f = Fake::vm();
    let plain = f.resolver().resolve(1, false).unwrap();
    f.write("opt/vendor/board-id", "  BOARD-7781  \n");
    let mut cfg = f.cfg();
    cfg.source = vec![
        VendorSource {
            name: "board".into(),
            file: Some("/opt/vendor/board-id".into()),
            command: None,
        },
        VendorSource {
            name: "tpm".into(),
            file: None,
            command: Some(vec!["echo".into(), "ek-42".into()]),
        },
    ];
    let r = f
        .resolver_with(cfg.clone(), "prod-1")
        .resolve(1, false)
        .unwrap();
    for n in ["vendor.board", "vendor.tpm"] {
        let c = comp(&r, n);
        assert_eq!(
            (c.class, c.state),
            (ComponentClass::Identity, ComponentState::Found),
            "{n}"
        );
    }
    assert_eq!(comp(&r, "vendor.tpm").source, "echo ek-42");
    assert_ne!(r.code, plain.code);
    // Config order does not matter.
    let mut rev = cfg.clone();
    rev.source.reverse();
    let r2 = f.resolver_with(rev, "prod-1").resolve(1, false).unwrap();
    assert_eq!(r2.code, r.code);

    // A failing / slow command is unreadable (carried from the baseline), not an error.
    run(&f.resolver_with(cfg.clone(), "prod-1"), 1);
    let mut slow = cfg.clone();
    slow.command_timeout_ms = 200;
    slow.source[1].command = Some(vec!["sh".into(), "-c".into(), "sleep 5".into()]);
    let start = Instant::now();
    let r3 = f.resolver_with(slow, "prod-1").resolve(2, false).unwrap();
    assert!(start.elapsed() < Duration::from_secs(3));
    let c = comp(&r3, "vendor.tpm");
    assert_eq!(c.state, ComponentState::Unreadable);
    assert!(c.note.as_deref().unwrap().contains("timed out"));
    assert_eq!(r3.code, r.code);
    assert_eq!(r3.status, IdentityStatus::Same);
    // A vendor file that disappears is a change.
    f.remove("opt/vendor/board-id");
    let r4 = f.resolver_with(cfg, "prod-1").resolve(3, false).unwrap();
    assert_eq!(r4.status, IdentityStatus::Drift);
    assert!(comp(&r4, "vendor.board").changed);
}

#[test]
fn metadata_instance_id_is_fetched_cached_and_used() {
    let f = Fake::vm();
    let (url, server) = testserver::serve(
        200,
        r#"{"uuid":"3f2504e0-4f89-11d3-9a0c-0305e82c3301","hostname":"ecs"}"#,
        2,
    );
    let mut cfg = f.cfg();
    cfg.metadata = true;
    cfg.metadata_url = url;
    cfg.metadata_timeout_ms = 2000;
    let r = f.resolver_with(cfg.clone(), "prod-1");
    let before = r.resolve(1, true).unwrap();
    assert_eq!(comp(&before, "instance_id").state, ComponentState::Absent);
    assert!(r.refresh_instance_id().unwrap(), "first fetch is a change");
    assert!(!r.refresh_instance_id().unwrap(), "same id again");
    server.join().unwrap();
    let after = r.resolve(2, true).unwrap();
    let c = comp(&after, "instance_id");
    assert_eq!(c.state, ComponentState::Found);
    // With a DMI UUID present the instance id only drifts: the code is unchanged.
    assert_eq!(c.class, ComponentClass::Drift);
    assert_eq!(after.code, before.code);
    assert_eq!(after.status, IdentityStatus::Same);
    let text = fs::read_to_string(f.state_file()).unwrap();
    assert!(!text.contains("3f2504e0"), "raw instance id cached");
    // A later run without network (new process) uses the cache.
    let mut offline = cfg.clone();
    offline.metadata_url = "http://127.0.0.1:9/".into();
    let later = f
        .resolver_with(offline, "prod-1")
        .resolve(3, false)
        .unwrap();
    assert_eq!(comp(&later, "instance_id").hash, c.hash);
    // metadata = false ignores the cache and never calls out.
    let off = f.resolver().resolve(4, false).unwrap();
    assert_eq!(comp(&off, "instance_id").state, ComponentState::Absent);
    assert!(!f.resolver().refresh_instance_id().unwrap());
}

#[test]
fn instance_id_in_a_container_enters_the_code_and_keeps_the_old_code() {
    let f = Fake::empty();
    f.write(".dockerenv", "");
    f.write("etc/machine-id", &format!("{MID}\n"));
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-0123"}"#, 1);
    let mut cfg = f.cfg();
    cfg.metadata = true;
    cfg.metadata_url = url;
    cfg.metadata_timeout_ms = 2000;
    let r = f.resolver_with(cfg, "prod-1");
    let first = r.resolve(1, true).unwrap();
    assert!(r.refresh_instance_id().unwrap());
    server.join().unwrap();
    let second = r.resolve(2, true).unwrap();
    assert_eq!(comp(&second, "instance_id").class, ComponentClass::Identity);
    assert_ne!(second.code, first.code);
    assert_eq!(second.status, IdentityStatus::Same);
    assert_eq!(
        second.accepted_codes,
        vec![second.code.clone(), first.code.clone()]
    );
    let third = r.resolve(3, true).unwrap();
    assert_eq!(third.accepted_codes, second.accepted_codes);
    // Turning metadata off later is a config change, not a device change: the recorded
    // instance id hash is carried.
    let off = f.resolver().resolve(4, true).unwrap();
    assert_eq!(off.status, IdentityStatus::Same);
    assert_eq!(off.code, second.code);
    let c = comp(&off, "instance_id");
    assert_eq!(c.state, ComponentState::Absent);
    assert!(c.note.as_deref().unwrap().contains("baseline hash used"));
}

#[test]
fn metadata_timeout_keeps_the_cache() {
    let f = Fake::vm();
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-1"}"#, 1);
    let mut cfg = f.cfg();
    cfg.metadata = true;
    cfg.metadata_url = url;
    cfg.metadata_timeout_ms = 2000;
    assert!(f
        .resolver_with(cfg.clone(), "prod-1")
        .refresh_instance_id()
        .unwrap());
    server.join().unwrap();
    let (silent_url, _listener) = testserver::silent();
    cfg.metadata_url = silent_url;
    cfg.metadata_timeout_ms = 300;
    let r = f.resolver_with(cfg, "prod-1");
    let start = Instant::now();
    let err = r.refresh_instance_id().unwrap_err();
    assert!(matches!(err, DeviceError::Metadata(_)), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let rep = r.resolve(1, false).unwrap();
    assert_eq!(comp(&rep, "instance_id").state, ComponentState::Found);
}

#[test]
fn two_products_are_uncorrelated() {
    let f = Fake::vm();
    let a = f
        .resolver_with(f.cfg(), "prod-a")
        .resolve(1, false)
        .unwrap();
    let b = f
        .resolver_with(f.cfg(), "prod-b")
        .resolve(1, false)
        .unwrap();
    assert_ne!(a.code, b.code);
    for (ca, cb) in a.components.iter().zip(&b.components) {
        if ca.hash.is_some() {
            assert_ne!(ca.hash, cb.hash, "{}", ca.name);
        }
    }
    // A state file of another product is not this product's baseline.
    run(&f.resolver_with(f.cfg(), "prod-a"), 1);
    let b2 = run(&f.resolver_with(f.cfg(), "prod-b"), 2);
    assert_eq!(b2.status, IdentityStatus::FirstSeen);
}

#[test]
fn root_fs_uuid_through_device_mapper() {
    let f = Fake::vm();
    f.write(
        "proc/self/mountinfo",
        "22 1 253:0 / / rw - xfs /dev/mapper/vg-root rw\n",
    );
    f.mkdir("sys/dev/block");
    symlink(
        "../../devices/virtual/block/dm-0",
        f.path("sys/dev/block/253:0"),
    )
    .unwrap();
    fs::remove_file(f.path("dev/disk/by-uuid").join(FS_UUID)).unwrap();
    symlink("../../dm-0", f.path("dev/disk/by-uuid").join(FS_UUID)).unwrap();
    let r = f.resolver().resolve(1, false).unwrap();
    assert_eq!(comp(&r, "root_fs_uuid").state, ComponentState::Found);
    let g = Fake::vm();
    let s = g.resolver().resolve(1, false).unwrap();
    assert_eq!(comp(&r, "root_fs_uuid").hash, comp(&s, "root_fs_uuid").hash);
}

#[test]
fn corrupt_state_file_is_set_aside() {
    let f = Fake::vm();
    fs::write(f.state_file(), "{garbage").unwrap();
    let r = run(&f.resolver(), 7);
    assert_eq!(r.status, IdentityStatus::FirstSeen);
    assert!(r.persisted);
    assert!(r.detail.contains("ignored"), "{}", r.detail);
    assert!(f.state.path().join("identity.json.corrupt-7").exists());
    assert_eq!(run(&f.resolver(), 8).status, IdentityStatus::Same);
}

#[test]
fn no_state_dir_means_no_memory() {
    let f = Fake::vm();
    let r = Resolver::new(f.cfg(), "prod-1".into(), None);
    let a = r.resolve(1, true).unwrap();
    let b = r.resolve(2, true).unwrap();
    assert_eq!(a.status, IdentityStatus::FirstSeen);
    assert_eq!(b.status, IdentityStatus::FirstSeen);
    assert_eq!(a.code, b.code);
    assert!(!b.persisted);
}

#[test]
fn empty_tree_is_a_typed_error_not_a_panic() {
    let f = Fake::empty();
    let err = f.resolver().resolve(1, true).unwrap_err();
    assert!(matches!(err, DeviceError::NoIdentity { .. }));
    assert!(!f.state_file().exists());
    let err = f
        .resolver_with(Fake::vm().cfg(), "")
        .resolve(1, false)
        .unwrap_err();
    assert!(matches!(err, DeviceError::InvalidProductId(_)));
}

#[test]
fn config_parses_and_validates() {
    #[derive(serde::Deserialize)]
    struct Top {
        identity: IdentityConfig,
    }
    let t: Top = toml::from_str(
        r#"
        [identity]
        metadata = false
        metadata_timeout_ms = 500
        [[identity.source]]
        name = "board"
        file = "/etc/board-id"
        [[identity.source]]
        name = "x"
        command = ["prog", "arg"]
        "#,
    )
    .unwrap();
    let c = t.identity;
    assert_eq!(c.root, Path::new("/"));
    assert_eq!(c.metadata_url, DEFAULT_METADATA_URL);
    assert_eq!(c.source.len(), 2);
    c.validate().unwrap();
    IdentityConfig::default().validate().unwrap();
    assert!(toml::from_str::<Top>("[identity]\nbogus = 1\n").is_err());

    let bad = |f: &dyn Fn(&mut IdentityConfig), key: &str| {
        let mut c = IdentityConfig::default();
        f(&mut c);
        let e = c.validate().unwrap_err();
        assert!(e.starts_with(key), "{e}");
    };
    bad(&|c| c.root = "rel".into(), "identity.root");
    bad(
        &|c| c.metadata_url = "ftp://x".into(),
        "identity.metadata_url",
    );
    bad(
        &|c| c.metadata_url = "http://".into(),
        "identity.metadata_url",
    );
    bad(
        &|c| c.metadata_timeout_ms = 0,
        "identity.metadata_timeout_ms",
    );
    bad(
        &|c| c.command_timeout_ms = 100_000,
        "identity.command_timeout_ms",
    );
    let src = |name: &str, file: Option<&str>, cmd: Option<Vec<&str>>| VendorSource {
        name: name.into(),
        file: file.map(PathBuf::from),
        command: cmd.map(|v| v.into_iter().map(String::from).collect()),
    };
    bad(
        &|c| c.source = vec![src("Bad Name", Some("/x"), None)],
        "identity.source[0].name",
    );
    bad(
        &|c| c.source = vec![src("a", Some("/x"), None), src("a", Some("/y"), None)],
        "identity.source[1].name",
    );
    bad(
        &|c| c.source = vec![src("a", None, None)],
        "identity.source[0]",
    );
    bad(
        &|c| c.source = vec![src("a", Some("/x"), Some(vec!["p"]))],
        "identity.source[0]",
    );
    bad(
        &|c| c.source = vec![src("a", Some("x"), None)],
        "identity.source[0].file",
    );
    bad(
        &|c| c.source = vec![src("a", None, Some(vec![]))],
        "identity.source[0].command",
    );
    let r = Resolver::new(
        IdentityConfig {
            metadata_timeout_ms: 0,
            ..Default::default()
        },
        "p".into(),
        None,
    );
    assert!(matches!(r.resolve(1, false), Err(DeviceError::Config(_))));
}

fn metadata_cfg(f: &Fake, url: String) -> IdentityConfig {
    IdentityConfig {
        metadata: true,
        metadata_url: url,
        metadata_timeout_ms: 2000,
        ..f.cfg()
    }
}

#[test]
fn cloned_vm_drops_the_instance_id_cached_on_the_copied_disk() {
    let f = Fake::vm();
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-original"}"#, 1);
    let r = f.resolver_with(metadata_cfg(&f, url), "prod-1");
    assert!(r.refresh_instance_id().unwrap());
    server.join().unwrap();
    let orig = r.resolve(1, true).unwrap();

    // Clone: new DMI UUID, same disk (machine-id, identity.json with the cached instance id).
    f.write(
        "sys/class/dmi/id/product_uuid",
        "9B0E8A4C-1D2F-4E3A-8B7C-6D5E4F3A2B1C\n",
    );
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-clone"}"#, 1);
    let clone = f.resolver_with(metadata_cfg(&f, url), "prod-1");
    let c = clone.resolve(2, true).unwrap();
    assert_eq!(c.status, IdentityStatus::Clone);
    assert_ne!(c.code, orig.code);
    let inst = comp(&c, "instance_id");
    assert_eq!(inst.hash, None);
    assert!(inst.note.as_deref().unwrap().contains("dropped"));
    let file = baseline::load(&f.state_file()).unwrap().unwrap();
    assert!(file.instance_id.is_none());
    // The clone's own instance id arrives: not another clone, same code.
    assert!(clone.refresh_instance_id().unwrap());
    server.join().unwrap();
    let d = clone.resolve(3, true).unwrap();
    assert_eq!(d.status, IdentityStatus::Same);
    assert_eq!(d.code, c.code);
    let file = baseline::load(&f.state_file()).unwrap().unwrap();
    assert_eq!(
        file.history
            .iter()
            .filter(|t| t.status == IdentityStatus::Clone)
            .count(),
        1
    );
}

#[test]
fn cloned_container_is_detected_once_the_instance_id_is_fetched() {
    let f = Fake::empty();
    f.write(".dockerenv", "");
    f.write("etc/machine-id", &format!("{MID}\n"));
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-original"}"#, 1);
    let r = f.resolver_with(metadata_cfg(&f, url), "prod-1");
    assert!(r.refresh_instance_id().unwrap());
    server.join().unwrap();
    let orig = r.resolve(1, true).unwrap();

    // Same container image and state on another instance: indistinguishable until the fetch.
    let (url, server) = testserver::serve(200, r#"{"uuid":"i-other"}"#, 1);
    let clone = f.resolver_with(metadata_cfg(&f, url), "prod-1");
    assert_eq!(clone.resolve(2, true).unwrap().status, IdentityStatus::Same);
    assert!(clone.refresh_instance_id().unwrap());
    server.join().unwrap();
    let c = clone.resolve(3, true).unwrap();
    assert_eq!(c.status, IdentityStatus::Clone);
    assert_ne!(c.code, orig.code);
    assert!(!c.accepts(&orig.code));
    assert_eq!(comp(&c, "instance_id").state, ComponentState::Found);
}

#[test]
fn resolver_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Resolver>();
    shared::<DeviceReport>();
    shared::<DeviceError>();
}

#[test]
fn default_metadata_address_is_only_asked_on_an_openstack_cloud() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    assert!(!super::sources::on_openstack_cloud(root));
    // No cloud DMI: the link-local default is never contacted.
    let cfg = IdentityConfig {
        root: root.to_path_buf(),
        metadata: true,
        ..IdentityConfig::default()
    };
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let r = Resolver::new(cfg, "p".into(), None);
    assert!(!r.refresh_instance_id().unwrap());
    fs::create_dir_all(root.join("sys/class/dmi/id")).unwrap();
    fs::write(
        root.join("sys/class/dmi/id/chassis_asset_tag"),
        "HUAWEICLOUD\n",
    )
    .unwrap();
    assert!(super::sources::on_openstack_cloud(root));
    fs::write(root.join("sys/class/dmi/id/chassis_asset_tag"), "\n").unwrap();
    fs::write(
        root.join("sys/class/dmi/id/sys_vendor"),
        "OpenStack Foundation\n",
    )
    .unwrap();
    assert!(super::sources::on_openstack_cloud(root));
}

/// The unprivileged, `ProcSubset=pid` agent: DMI unreadable and /proc/cpuinfo hidden. The
/// fake tree cannot make files unreadable for root (tests run as root), so those files are
/// removed instead: the resolver treats absent and unreadable gaps alike.
fn sandbox(f: &Fake) {
    f.remove("sys/class/dmi/id/product_uuid");
    f.remove("sys/class/dmi/id/board_serial");
    f.remove("proc/cpuinfo");
}

#[test]
fn prestart_hands_over_hashes_only_and_the_sandboxed_agent_gets_the_same_code() {
    let f = Fake::vm();
    f.write("proc/sys/kernel/random/boot_id", "6c2b1f4e-boot\n");
    f.mkdir("run/kooagent"); // the unit's RuntimeDirectory=
    let full = f.resolver().resolve(100, false).unwrap();
    let rep = f.resolver().prestart().unwrap();
    assert_eq!(rep.hashes_file, f.path("run/kooagent/identity-hashes.json"));
    assert_eq!(
        fs::read_to_string(f.path("run/kooagent/boot_id")).unwrap(),
        "6c2b1f4e-boot\n"
    );
    let text = fs::read_to_string(&rep.hashes_file).unwrap().to_lowercase();
    for raw in ["4c4c4544", "44454c4c", "bsn-12345", "genuineintel", "xeon"] {
        assert!(!text.contains(raw), "hand-over leaks {raw}: {text}");
    }
    let mode = fs::metadata(&rep.hashes_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);

    sandbox(&f);
    let alone = {
        let f2 = Fake::vm();
        sandbox(&f2);
        f2.resolver().resolve(100, false).unwrap()
    };
    assert_ne!(
        alone.code, full.code,
        "without the hand-over DMI is missing"
    );
    let got = f.resolver().resolve(100, false).unwrap();
    assert_eq!(got.code, full.code);
    for name in ["dmi_product_uuid", "board_serial", "cpu"] {
        let (a, b) = (comp(&got, name), comp(&full, name));
        assert_eq!((a.state, &a.hash), (b.state, &b.hash), "{name}");
        assert!(a.note.as_deref().unwrap().contains("privileged"), "{a:?}");
    }
    assert_eq!(
        comp(&got, "devicetree_serial").state,
        ComponentState::Absent
    );
}

#[test]
fn the_agents_own_reading_wins_and_a_foreign_or_bad_hand_over_is_ignored() {
    let f = Fake::vm();
    let full = f.resolver().resolve(100, false).unwrap();
    f.mkdir("run/kooagent");
    f.resolver().prestart().unwrap();
    let path = f.path("run/kooagent/identity-hashes.json");
    let good = fs::read_to_string(&path).unwrap();
    let uuid_hash = comp(&full, "dmi_product_uuid").hash.clone().unwrap();

    // A readable source is read again, whatever the file says.
    fs::write(&path, good.replace(&uuid_hash, "0123456789abcdef")).unwrap();
    let r = f.resolver().resolve(100, false).unwrap();
    assert_eq!(r.code, full.code);

    // Another product's hand-over (written before a reload changed product_id): ignored,
    // and said so.
    f.resolver_with(f.cfg(), "other-product")
        .prestart()
        .unwrap();
    sandbox(&f);
    let r = f.resolver().resolve(100, false).unwrap();
    assert_ne!(r.code, full.code);
    assert_eq!(comp(&r, "dmi_product_uuid").state, ComponentState::Absent);
    assert!(r.detail.contains("other-product"), "{}", r.detail);

    // A malformed hash or file is never used as one.
    fs::write(&path, good.replace(&uuid_hash, "NOT-A-HASH")).unwrap();
    let r = f.resolver().resolve(100, false).unwrap();
    assert_eq!(comp(&r, "dmi_product_uuid").state, ComponentState::Absent);
    assert_eq!(comp(&r, "board_serial").state, ComponentState::Found);
    fs::write(&path, "{not json").unwrap();
    let r = f.resolver().resolve(100, false).unwrap();
    assert!(
        r.detail.contains("identity-hashes.json ignored"),
        "{}",
        r.detail
    );
    assert_eq!(comp(&r, "board_serial").state, ComponentState::Absent);
}

/// Root writes the hand-over into a directory the agent's user owns: links planted there
/// (at the file or at its temporary name) are replaced, never written through.
#[test]
fn prestart_never_writes_through_a_planted_link() {
    let f = Fake::vm();
    f.mkdir("run/kooagent");
    f.write("victim", "precious\n");
    let victim = f.path("victim");
    let dir = f.path("run/kooagent");
    symlink(&victim, dir.join("identity-hashes.json")).unwrap();
    symlink(
        &victim,
        dir.join(format!(".identity-hashes.json.tmp.{}", std::process::id())),
    )
    .unwrap();
    symlink(&victim, dir.join("boot_id")).unwrap();
    f.write("proc/sys/kernel/random/boot_id", "b00t\n");
    f.resolver().prestart().unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    for name in ["identity-hashes.json", "boot_id"] {
        let m = fs::symlink_metadata(dir.join(name)).unwrap();
        assert!(m.file_type().is_file(), "{name} is {m:?}");
        assert_eq!(m.permissions().mode() & 0o777, 0o640, "{name}");
    }
}
