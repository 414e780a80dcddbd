//! The freeze state anchored in a TPM 2.0 NV counter (issue 14 item 11): a software TPM
//! (Debian's `swtpm`) on a Unix socket stands in for `/dev/tpmrm0`. A restore of the whole
//! state directory is detected; without a restore nothing is flagged; a TPM that is gone
//! (auto) or new (a clone's) never locks the device out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::freeze::token;
use crate::harness::{short_tempdir, TestAgent};
use crate::license::{check, device_code, install, utc_in, wait_state, Seller};

/// A running `swtpm socket`, its state in its own directory (killed on drop).
struct Swtpm {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Swtpm {
    /// `None` (with the reason printed) where swtpm is not installed; CI installs it
    /// (scripts/deps.sh).
    fn start() -> Option<Swtpm> {
        if Command::new("swtpm")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipped: swtpm is not installed (apt-get install swtpm swtpm-tools)");
            return None;
        }
        let dir = short_tempdir();
        let state = dir.path().join("tpm");
        std::fs::create_dir(&state).unwrap();
        let socket = dir.path().join("tpm.sock");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}.ctrl", socket.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "swtpm did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Swtpm {
            child,
            socket,
            _dir: dir,
        })
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(seller: &Seller, tpm: &Path) -> String {
    format!(
        "{}[freeze]\ntpm = \"auto\"\ntpm_device = \"{}\"\n",
        seller.config(),
        tpm.display()
    )
}

fn apply(a: &TestAgent, text: &str) -> Value {
    a.call("token.apply", json!({"token": text})).unwrap()
}

fn status(a: &TestAgent) -> Value {
    a.call("freeze.status", json!({})).unwrap()
}

/// A copy of the whole state directory (the agent stopped), or putting one back.
fn copy_dir(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// An agent with license `L-T` (product `p`, issued an hour ago) installed and valid.
fn agent_with_license(seller: &Seller, tpm: &Path) -> TestAgent {
    let a = TestAgent::start(&config(seller, tpm));
    let code = device_code(&a);
    let lic = seller.bound(
        &code,
        "p",
        &[
            "--days",
            "30",
            "--id",
            "L-T",
            "--not-before",
            &utc_in(-60),
            "--issued-at",
            &utc_in(-3600),
        ],
    );
    install(&a, &lic).unwrap();
    assert_eq!(check(&a, "p")["state"], "valid");
    a
}

fn restart(a: &mut TestAgent) {
    a.stop();
    a.spawn(&[]);
}

fn assert_frozen_by_the_tpm(a: &TestAgent) {
    let v = check(a, "p");
    assert_eq!(v["allowed"], false, "{v}");
    let s = status(a);
    assert_eq!(s["tampered"], true, "{s}");
    assert!(
        s["tamper"].as_str().unwrap().contains("TPM's counter"),
        "the reason does not name the TPM: {s}"
    );
}

#[test]
fn a_restore_of_the_whole_state_directory_is_detected_by_the_tpm_counter() {
    let Some(tpm) = Swtpm::start() else { return };
    let seller = Seller::new();
    let mut a = agent_with_license(&seller, &tpm.socket);
    let s = status(&a);
    assert_eq!(s["tpm"]["in_use"], true, "{s}");
    let snapshots = short_tempdir();
    let (before_freeze, frozen) = (
        snapshots.path().join("before"),
        snapshots.path().join("frozen"),
    );
    a.stop();
    copy_dir(&a.state, &before_freeze);
    a.spawn(&[]);
    wait_state(&a, "p", "valid");
    let at = |s: i64| utc_in(s);
    apply(
        &a,
        &token(&seller, "L-T", "freeze", 1, &["--issued-at", &at(-1800)]),
    );
    assert_eq!(check(&a, "p")["state"], "frozen");
    a.stop();
    copy_dir(&a.state, &frozen);
    a.spawn(&[]);
    wait_state(&a, "p", "frozen");
    let r = apply(
        &a,
        &token(&seller, "L-T", "unfreeze", 2, &["--issued-at", &at(-1700)]),
    );
    assert_eq!(r["state"], "active", "{r}");
    let counter = status(&a)["tpm"]["counter"].as_u64().unwrap();

    // The whole directory as it was while frozen (the brief's order: a restore behind an
    // unfreeze), then as it was before the freeze (what a buyer would want back).
    for snapshot in [&frozen, &before_freeze] {
        a.stop();
        copy_dir(snapshot, &a.state);
        a.spawn(&[]);
        assert_frozen_by_the_tpm(&a);
        // Still so after another restart: the detection raised the mark.
        restart(&mut a);
        assert_eq!(check(&a, "p")["allowed"], false);
        assert_eq!(status(&a)["tampered"], true);
        assert!(status(&a)["tpm"]["counter"].as_u64().unwrap() > counter);
    }
    // A token issued after the detection lifts it, as for any tampering.
    let r = apply(&a, &token(&seller, "L-T", "unfreeze", 3, &[]));
    assert_eq!(r["state"], "active", "{r}");
    assert_eq!(check(&a, "p")["allowed"], true);
}

#[test]
fn without_a_restore_nothing_is_flagged_and_a_lost_or_new_tpm_does_not_lock_out() {
    let Some(tpm) = Swtpm::start() else { return };
    let seller = Seller::new();
    let mut a = agent_with_license(&seller, &tpm.socket);
    let c0 = status(&a)["tpm"]["counter"].as_u64().unwrap();
    apply(
        &a,
        &token(
            &seller,
            "L-T",
            "freeze",
            1,
            &["--issued-at", &utc_in(-1800)],
        ),
    );
    restart(&mut a);
    wait_state(&a, "p", "frozen");
    apply(
        &a,
        &token(
            &seller,
            "L-T",
            "unfreeze",
            2,
            &["--issued-at", &utc_in(-1700)],
        ),
    );
    for _ in 0..2 {
        restart(&mut a);
        wait_state(&a, "p", "valid");
    }
    let s = status(&a);
    assert_eq!(
        (&s["tampered"], &s["tpm"]["in_use"]),
        (&json!(false), &json!(true)),
        "{s}"
    );
    // The counter rose with the two transitions, not with every save or start.
    let c1 = s["tpm"]["counter"].as_u64().unwrap();
    assert_eq!(c1, c0 + 2, "{s}");

    // The TPM is gone: with `auto`, a warning and the agent works as without one.
    let sock = tpm.socket.clone();
    drop(tpm);
    restart(&mut a);
    wait_state(&a, "p", "valid");
    let s = status(&a);
    assert_eq!(
        (&s["tampered"], &s["tpm"]["in_use"]),
        (&json!(false), &json!(false)),
        "{s}"
    );
    assert!(a.log().contains("TPM anchor not in use"), "{}", a.log());

    // A new TPM (a clone's fresh vTPM): anchored anew, not tampering.
    let fresh = Swtpm::start().unwrap();
    a.stop();
    let cfg = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        cfg.replace(&*sock.to_string_lossy(), &fresh.socket.to_string_lossy()),
    )
    .unwrap();
    a.spawn(&[]);
    wait_state(&a, "p", "valid");
    let s = status(&a);
    assert_eq!(
        (&s["tampered"], &s["tpm"]["in_use"]),
        (&json!(false), &json!(true)),
        "{s}"
    );
    assert!(
        s["tpm"]["note"].as_str().unwrap().contains("re-anchored"),
        "{s}"
    );
    restart(&mut a);
    let s = status(&a);
    assert_eq!(s["tampered"], false, "{s}");

    // `required` with no TPM reachable: a restore cannot be ruled out, so frozen as tampered.
    a.stop();
    drop(fresh);
    let cfg = std::fs::read_to_string(&a.config).unwrap();
    assert!(cfg.contains("tpm = \"auto\""), "{cfg}");
    std::fs::write(
        &a.config,
        cfg.replace("tpm = \"auto\"", "tpm = \"required\""),
    )
    .unwrap();
    a.spawn(&[]);
    assert_eq!(check(&a, "p")["allowed"], false);
    let s = status(&a);
    assert_eq!(s["tampered"], true, "{s}");
    assert!(s["tamper"].as_str().unwrap().contains("required"), "{s}");
}
