//! The device identification code through the real agent: fake `/etc`, `/sys`, `/proc`
//! trees stand in for a VM, its clone, a NIC added, and a first boot.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::TestAgent;

const MACHINE_ID: &str = "3f1c2d4e5a6b7c8d9e0f112233445566";
const UUID: &str = "4c4c4544-0042-3510-8052-b4c04f4b4e32";
const SERIAL: &str = "BSN-77-XYZ-0042";

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn nic(root: &Path, name: &str, mac: &str) {
    write(
        root,
        &format!("sys/class/net/{name}/address"),
        &format!("{mac}\n"),
    );
    write(
        root,
        &format!("sys/class/net/{name}/addr_assign_type"),
        "0\n",
    );
    std::fs::create_dir_all(root.join(format!("sys/class/net/{name}/device"))).unwrap();
}

/// A VM as the agent sees it through `identity.root`.
fn fake_vm(root: &Path) {
    write(root, "etc/machine-id", &format!("{MACHINE_ID}\n"));
    write(root, "sys/class/dmi/id/product_uuid", &format!("{UUID}\n"));
    write(
        root,
        "sys/class/dmi/id/board_serial",
        &format!("{SERIAL}\n"),
    );
    write(
        root,
        "proc/cpuinfo",
        "vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n",
    );
    nic(root, "eth0", "fa:16:3e:11:22:33");
}

fn agent_on(root: &Path, product: &str) -> TestAgent {
    TestAgent::start(&format!(
        "[agent]\nproduct_id = \"{product}\"\n[identity]\nroot = \"{}\"\n",
        root.display()
    ))
}

fn code(a: &TestAgent) -> Value {
    a.call("device.code", json!({"explain": true})).unwrap()
}

fn is_code(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().all(|g| {
            g.len() == 4
                && g.chars()
                    .all(|c| "0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(c))
        })
}

#[test]
fn stable_across_restarts_and_an_added_nic_but_not_a_clone() {
    let tree = tempfile::tempdir().unwrap();
    fake_vm(tree.path());
    let mut a = agent_on(tree.path(), "sku-1");
    let first = code(&a);
    let c1 = first["code"].as_str().unwrap().to_string();
    assert!(is_code(&c1), "{c1}");
    assert_eq!(first["status"], json!("first_seen"));

    // The CLI asks the agent, or computes the same code itself.
    let out = a.cli(&["id"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), c1);
    let out = a.cli(&["id", "--local", "--json"]);
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(local["code"], json!(c1));

    // Reboot.
    a.stop();
    a.spawn(&[]);
    let again = code(&a);
    assert_eq!(
        (again["code"].as_str().unwrap(), again["status"].clone()),
        (c1.as_str(), json!("same"))
    );

    // A NIC is added.
    nic(tree.path(), "eth1", "fa:16:3e:44:55:66");
    a.stop();
    a.spawn(&[]);
    let more = code(&a);
    assert_eq!(more["code"], json!(c1));
    assert_eq!(more["status"], json!("same"));

    // The VM is cloned: same machine-id, new DMI UUID.
    write(
        tree.path(),
        "sys/class/dmi/id/product_uuid",
        "9d2e6a1b-7f3c-4e5d-8a9b-0c1d2e3f4a5b\n",
    );
    a.stop();
    a.spawn(&[]);
    let cloned = code(&a);
    assert_ne!(cloned["code"], json!(c1));
    assert_eq!(cloned["status"], json!("clone"));
    let status = a.call("agent.status", json!({})).unwrap();
    assert_eq!(status["identity"]["status"], json!("clone"), "{status}");
    let out = a.cli(&["id", "--explain"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("clone"), "{text}");
}

#[test]
fn raw_identifiers_never_leave_the_machine() {
    let tree = tempfile::tempdir().unwrap();
    fake_vm(tree.path());
    let a = agent_on(tree.path(), "sku-1");
    let answer = code(&a).to_string();
    let state = std::fs::read_to_string(a.state.join("identity.json")).unwrap();
    let explained =
        String::from_utf8_lossy(&a.cli(&["id", "--explain", "--json"]).stdout).to_string();
    for raw in [
        MACHINE_ID,
        UUID,
        SERIAL,
        "fa:16:3e:11:22:33",
        "GenuineIntel",
    ] {
        for (what, text) in [
            ("answer", &answer),
            ("identity.json", &state),
            ("explain", &explained),
        ] {
            assert!(
                !text.to_lowercase().contains(&raw.to_lowercase()),
                "{raw} leaked in {what}: {text}"
            );
        }
    }
}

#[test]
fn two_products_get_unrelated_codes() {
    let tree = tempfile::tempdir().unwrap();
    fake_vm(tree.path());
    let a = agent_on(tree.path(), "product-a");
    let b = agent_on(tree.path(), "product-b");
    let (ca, cb) = (code(&a), code(&b));
    assert_ne!(ca["code"], cb["code"]);
}

#[test]
fn first_boot_waits_for_the_machine_id_to_settle() {
    let tree = tempfile::tempdir().unwrap();
    fake_vm(tree.path());
    write(tree.path(), "etc/machine-id", "");
    let a = agent_on(tree.path(), "sku-1");
    let e = a.call("device.code", json!({})).unwrap_err();
    assert_eq!(e["code"], json!("identity_settling"), "{e}");
    assert!(
        !a.state.join("identity.json").exists(),
        "nothing cached before the identity settles"
    );
    let status = a.call("agent.status", json!({})).unwrap();
    assert_eq!(status["identity"]["state"], json!("settling"), "{status}");
    // systemd fills the machine id in; the agent picks it up by itself.
    write(tree.path(), "etc/machine-id", &format!("{MACHINE_ID}\n"));
    let t0 = Instant::now();
    loop {
        match a.call("device.code", json!({})) {
            Ok(v) => {
                assert!(is_code(v["code"].as_str().unwrap()));
                break;
            }
            Err(e) => assert_eq!(e["code"], json!("identity_settling")),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "identity never settled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn no_identity_at_all_is_a_clear_error() {
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tree.path().join("etc")).unwrap();
    let a = agent_on(tree.path(), "sku-1");
    let e = a.call("device.code", json!({})).unwrap_err();
    assert_eq!(e["code"], json!("identity_unavailable"), "{e}");
    assert!(e["message"].as_str().unwrap().contains("machine"), "{e}");
    // The agent itself keeps serving.
    assert!(a.call("ping", json!({})).is_ok());
}

/// The systemd unit's split: `kooagent prestart` (root, `ExecStartPre=+`) reads the root-only
/// sources and hands over hashes; the agent, which cannot read them (removed here: the tests
/// run as root, so a mode cannot hide a file), still computes the same code.
#[test]
fn prestart_hands_the_sandboxed_agent_its_privileged_sources() {
    let tree = tempfile::tempdir().unwrap();
    fake_vm(tree.path());
    let a = agent_on(tree.path(), "sku-1");
    let full = code(&a);
    std::fs::create_dir_all(tree.path().join("run/kooagent")).unwrap();
    let out = crate::harness::run_ok(
        std::process::Command::new(crate::harness::BIN)
            .arg("--config")
            .arg(&a.config)
            .args(["prestart", "--json"]),
    );
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = tree.path().join("run/kooagent/identity-hashes.json");
    assert_eq!(rep["hashes_file"], file.display().to_string(), "{rep}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(SERIAL) && !text.to_lowercase().contains(&UUID[..8]),
        "{text}"
    );
    for rel in [
        "sys/class/dmi/id/product_uuid",
        "sys/class/dmi/id/board_serial",
        "proc/cpuinfo",
    ] {
        std::fs::remove_file(tree.path().join(rel)).unwrap();
    }
    let out = crate::harness::run_ok(
        std::process::Command::new(crate::harness::BIN)
            .arg("--config")
            .arg(&a.config)
            .args(["id", "--local", "--json", "--explain"]),
    );
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(local["code"], full["code"], "{local}");
    let dmi = local["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "dmi_product_uuid")
        .unwrap();
    assert_eq!(dmi["state"], "found", "{dmi}");
}
