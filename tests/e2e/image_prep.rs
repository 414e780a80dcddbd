//! `kooagent image-prep`: per-instance state goes, undelivered usage stops it, a running
//! agent stops it, and the next start computes a fresh identity.

use std::process::Output;

use serde_json::json;

use crate::harness::TestAgent;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn image_prep_clears_per_instance_state() {
    let mut a = TestAgent::start("[usage.meters.m]\ninstance_id = \"inst-1\"\n");
    let code = a.call("device.code", json!({})).unwrap();
    assert!(a.state.join("identity.json").exists());
    let now = kooagent::clock::Clock::now_secs(&kooagent::clock::SystemClock);
    a.call(
        "usage.record",
        json!({"meter": "m", "value": "3", "at": now - 7200}),
    )
    .unwrap();

    let out = a.cli(&["image-prep"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("agent is running"), "{}", text(&out));

    a.stop();
    let out = a.cli(&["image-prep"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not delivered"), "{}", text(&out));
    assert!(
        a.state.join("usage").exists(),
        "a refused prep removes nothing"
    );

    let out = a.cli(&["image-prep", "--force", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("would remove"), "{}", text(&out));
    assert!(
        a.state.join("identity.json").exists(),
        "a dry run removes nothing"
    );

    let out = a.cli(&["image-prep", "--force", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed = report["removed"].to_string();
    assert!(
        removed.contains("identity.json") && removed.contains("usage"),
        "{report}"
    );
    assert!(!a.state.join("identity.json").exists());
    assert!(!a.state.join("usage").exists());

    // The first start after the prep is a first sighting, with the same machine.
    a.spawn(&[]);
    let again = a.call("device.code", json!({})).unwrap();
    assert_eq!(again["status"], json!("first_seen"));
    assert_eq!(again["code"], code["code"]);
    let st = a.call("usage.status", json!({})).unwrap();
    assert_eq!(st["pending"]["records"], json!(0), "{st}");
}

/// Issue 20 item 3: `--dry-run` shows everything even when the prep would refuse
/// (uploading off, usage undelivered), and `--root DIR` prepares an image tree: its own
/// agent.toml, state and machine-id, not the host's.
#[test]
fn dry_run_never_refuses_and_root_prepares_an_image_tree() {
    let mut a = TestAgent::start("[usage.meters.m]\ninstance_id = \"inst-1\"\n");
    let now = kooagent::clock::Clock::now_secs(&kooagent::clock::SystemClock);
    a.call(
        "usage.record",
        json!({"meter": "m", "value": "3", "at": now - 7200}),
    )
    .unwrap();
    a.stop();
    let out = a.cli(&["image-prep", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("would remove"), "{}", text(&out));
    assert!(
        text(&out).contains("without --force the prep would stop here"),
        "{}",
        text(&out)
    );
    assert!(a.state.join("usage").exists(), "a dry run removes nothing");

    // An image tree: /etc/kooagent/agent.toml naming no paths (the image's defaults apply,
    // inside the tree), a state directory with a device key, and an empty machine-id.
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    std::fs::create_dir_all(t.join("etc/kooagent")).unwrap();
    std::fs::create_dir_all(t.join("var/lib/kooagent/licenses")).unwrap();
    std::fs::write(
        t.join("etc/kooagent/agent.toml"),
        "[agent]\nproduct_id = \"sku\"\n",
    )
    .unwrap();
    std::fs::write(t.join("var/lib/kooagent/device.key"), [7u8; 32]).unwrap();
    std::fs::write(t.join("etc/machine-id"), "").unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["image-prep", "--root"])
        .arg(t)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "removed {}",
            t.join("var/lib/kooagent/device.key").display()
        )),
        "{}",
        text(&out)
    );
    assert!(!t.join("var/lib/kooagent/device.key").exists());
    assert!(
        !text(&out).contains("machine-id is set"),
        "the tree's empty machine-id is checked, not the host's: {}",
        text(&out)
    );
}

/// A clone of the image must not inherit the device's freeze state: both copies of it go
/// with the device key (the second lives in `licenses/`, next to an unbound license the
/// prep keeps), and so does the freeze anchor sealed into `time.json`, whose mark stays.
/// Left there, the anchor (sealed under the deleted key) read as damage on every clone.
#[test]
fn image_prep_leaves_no_freeze_state_and_a_clone_starts_clean() {
    let seller = crate::license::Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let lic = seller.issue(&[
        "--unbound",
        "--product",
        "p",
        "--instance",
        "i",
        "--perpetual",
        "--id",
        "trial",
    ]);
    crate::license::install(&a, &lic).unwrap();
    let backup = a.state.join("licenses/.lifecycle.json");
    let time = a.state.join("time.json");
    let t0 = std::time::Instant::now();
    while !(backup.exists()
        && std::fs::read_to_string(&time)
            .unwrap_or_default()
            .contains("freeze_anchor"))
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "no freeze state saved"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    a.stop();
    let out = a.cli(&["image-prep", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("freeze anchor"), "{}", text(&out));
    assert!(!a.state.join("lifecycle.json").exists());
    assert!(!backup.exists(), "{}", text(&out));
    let kept = std::fs::read_to_string(&time).unwrap();
    assert!(
        kept.contains("\"mark\"") && !kept.contains("freeze_anchor"),
        "{kept}"
    );
    assert!(
        a.state.join("licenses/trial.lic").exists(),
        "{}",
        text(&out)
    );

    // The clone's first start: a new device key, nothing taken for damage or tampering.
    let before = a.log().len();
    a.spawn(&[]);
    let s = a.call("freeze.status", json!({})).unwrap();
    assert_eq!(s["tampered"], false, "{s}");
    let v = crate::license::check(&a, "p");
    assert_eq!(v["allowed"], true, "{v}");
    let log = a.log()[before..].to_string();
    assert!(!log.contains("anchor"), "{log}");
}
