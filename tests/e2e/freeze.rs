//! Freeze state end to end: seller tokens freeze and unfreeze, `watch` streams every
//! transition in order, actions run once per transition, and the state survives restarts
//! and resists casual tampering.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{run_ok, TestAgent, BIN};
use crate::license::{check, device_code, install, utc_in, wait_state, Seller};

/// A fake systemctl and hook that append their arguments / environment to `log`.
fn fakes(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let log = dir.join("actions.log");
    let systemctl = dir.join("systemctl");
    let hook = dir.join("hook");
    std::fs::write(
        &systemctl,
        format!("#!/bin/sh\necho \"systemctl $*\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"hook $KOOAGENT_LICENSE_ID $KOOAGENT_STATE\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in [&systemctl, &hook] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (log, systemctl, hook)
}

fn config(seller: &Seller, systemctl: &Path, hook: &Path) -> String {
    format!(
        "{}[freeze]\nunits = [\"app.service\"]\nsystemctl = \"{}\"\ncommand = [\"{}\"]\n",
        seller.config(),
        systemctl.display(),
        hook.display()
    )
}

pub fn token(seller: &Seller, license: &str, action: &str, seq: u64, extra: &[&str]) -> String {
    let out = run_ok(
        Command::new(BIN)
            .args(["seller", "token", "--key"])
            .arg(&seller.key)
            .args([
                "--license",
                license,
                "--action",
                action,
                "--seq",
                &seq.to_string(),
            ])
            .args(extra),
    );
    String::from_utf8(out.stdout).unwrap()
}

fn apply(a: &TestAgent, text: &str) -> Result<Value, Value> {
    a.call("token.apply", json!({"token": text}))
}

/// Waits until the action log has `n` lines.
fn wait_log(log: &Path, n: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let lines: Vec<String> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= n || t0.elapsed() > Duration::from_secs(20) {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `freeze.status` shows the first license's actions journaled as done.
fn wait_actions_journaled(a: &TestAgent) {
    let t0 = Instant::now();
    loop {
        let s = a.call("freeze.status", json!({})).unwrap();
        if s["licenses"][0]["actions"]["ok"] == true {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "actions never journaled: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_event(c: &mut crate::harness::Conn) -> Value {
    let v = c.read_json();
    assert_eq!(v["ok"], true, "{v}");
    v["event"].clone()
}

#[test]
fn tokens_freeze_and_unfreeze_in_order_with_watch_and_actions() {
    let seller = Seller::new();
    let (log, systemctl, hook) = fakes(seller.dir.path());
    let a = TestAgent::start(&config(&seller, &systemctl, &hook));
    let code = device_code(&a);
    let lic = seller.bound(
        &code,
        "p",
        &["--days", "30", "--id", "L-F", "--not-before", &utc_in(-60)],
    );
    install(&a, &lic).unwrap();
    assert_eq!(check(&a, "p")["state"], "valid");

    let mut w = a.connect();
    w.send_raw(b"{\"v\":1,\"id\":\"w\",\"op\":\"watch\",\"params\":{}}\n");
    let first = read_event(&mut w);
    assert_eq!(
        (first["type"].as_str(), first["state"].as_str()),
        (Some("state"), Some("active")),
        "{first}"
    );
    assert_eq!(first["license_id"], "L-F");

    // Freeze, through the CLI from a file.
    let f1 = seller.write(
        "f1.tok",
        &token(
            &seller,
            "L-F",
            "freeze",
            1,
            &["--device-code", &code, "--reason", "overdue"],
        ),
    );
    let out = a.cli(&["token", "apply", f1.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = check(&a, "p");
    assert_eq!(
        (v["state"].as_str(), v["allowed"].as_bool()),
        (Some("frozen"), Some(false)),
        "{v}"
    );
    assert!(v["reason"].as_str().unwrap().contains("overdue"), "{v}");
    assert!(v["since"].is_string(), "{v}");
    // The same token again changes nothing; an older one is refused.
    let text1 = std::fs::read_to_string(&f1).unwrap();
    let r = apply(&a, &text1).unwrap();
    assert_eq!(
        (r["replayed"].as_bool(), r["state"].as_str()),
        (Some(true), Some("frozen"))
    );
    let e = apply(&a, &token(&seller, "L-F", "unfreeze", 0, &[])).unwrap_err();
    assert_eq!(e["code"], "stale_token", "{e}");
    // Another device, another license: refused with the reason.
    let e = apply(
        &a,
        &token(
            &seller,
            "L-F",
            "unfreeze",
            5,
            &["--device-code", "7K2M-Q9XD-4HPA-V3NE-R8T5"],
        ),
    )
    .unwrap_err();
    assert_eq!(e["code"], "wrong_device", "{e}");
    let e = apply(&a, &token(&seller, "L-NONE", "unfreeze", 5, &[])).unwrap_err();
    assert_eq!(e["code"], "unknown_license", "{e}");
    assert_eq!(check(&a, "p")["state"], "frozen");
    // Unfreeze.
    let r = apply(&a, &token(&seller, "L-F", "unfreeze", 2, &[])).unwrap();
    assert_eq!(r["state"], "active", "{r}");
    assert_eq!(check(&a, "p")["state"], "valid");

    // Watch saw every transition in order, with increasing sequence numbers.
    let e1 = read_event(&mut w);
    let e2 = read_event(&mut w);
    assert_eq!(
        (e1["from"].as_str(), e1["state"].as_str()),
        (Some("active"), Some("frozen")),
        "{e1}"
    );
    assert_eq!(
        (e2["from"].as_str(), e2["state"].as_str()),
        (Some("frozen"), Some("active")),
        "{e2}"
    );
    let seqs: Vec<u64> = [&first, &e1, &e2]
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");

    // Each action ran once per transition.
    let lines = wait_log(&log, 4);
    assert_eq!(
        lines,
        vec![
            "systemctl stop app.service",
            "hook L-F frozen",
            "systemctl start app.service",
            "hook L-F active"
        ],
        "{}",
        a.log()
    );
    let s = a.call("freeze.status", json!({})).unwrap();
    assert_eq!(s["licenses"][0]["actions"]["ok"], true, "{s}");
    assert_eq!(s["tampered"], false, "{s}");
}

#[test]
fn restart_keeps_frozen_and_tampering_does_not_unfreeze() {
    let seller = Seller::new();
    let (log, systemctl, hook) = fakes(seller.dir.path());
    let mut a = TestAgent::start(&config(&seller, &systemctl, &hook));
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
    apply(
        &a,
        &token(
            &seller,
            "L-T",
            "freeze",
            1,
            &["--issued-at", &utc_in(-1800)],
        ),
    )
    .unwrap();
    assert_eq!(wait_log(&log, 2).len(), 2);
    // Actions run at least once: the journal that says they ran is written after them, so
    // stop only once it is (a stop in between would rightly run them again).
    wait_actions_journaled(&a);

    // A restart (same boot): still frozen, and the actions do not run again.
    a.stop();
    a.spawn(&[]);
    assert_eq!(wait_state(&a, "p", "frozen")["allowed"], false);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(wait_log(&log, 2).len(), 2);

    // Edit the state file to say active and delete the second copy.
    a.stop();
    let primary = a.state.join("lifecycle.json");
    let text = std::fs::read_to_string(&primary).unwrap();
    assert!(text.contains("\"frozen\""));
    std::fs::write(&primary, text.replace("\"frozen\"", "\"active\"")).unwrap();
    std::fs::remove_file(a.state.join("licenses/.lifecycle.json")).unwrap();
    a.spawn(&[]);
    let v = wait_state(&a, "p", "frozen");
    assert!(
        v["reason"].as_str().unwrap().contains("edited or removed"),
        "{v}"
    );
    let s = a.call("freeze.status", json!({})).unwrap();
    assert_eq!(s["tampered"], true, "{s}");
    let out = a.cli(&["freeze", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("STATE TAMPERED"));

    // Deleting everything again (both copies) keeps it frozen too.
    a.stop();
    std::fs::remove_file(&primary).unwrap();
    let _ = std::fs::remove_file(a.state.join("licenses/.lifecycle.json"));
    a.spawn(&[]);
    wait_state(&a, "p", "frozen");
    // An old token (issued before the tampering) does not lift it; a fresh one does.
    apply(
        &a,
        &token(
            &seller,
            "L-T",
            "unfreeze",
            2,
            &["--issued-at", &utc_in(-1700)],
        ),
    )
    .unwrap();
    assert_eq!(check(&a, "p")["state"], "frozen");
    let r = apply(&a, &token(&seller, "L-T", "unfreeze", 3, &[])).unwrap();
    assert_eq!(r["state"], "active", "{r}");
    assert_eq!(check(&a, "p")["state"], "valid");
}

#[test]
fn dropped_token_is_applied_and_a_bad_one_rejected() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    install(
        &a,
        &seller.bound(
            &code,
            "p",
            &["--days", "30", "--id", "L-D", "--not-before", &utc_in(-60)],
        ),
    )
    .unwrap();
    let dir = a.state.join("tokens");
    let mut f = std::fs::File::create(dir.join("x.tok.part")).unwrap();
    f.write_all(token(&seller, "L-D", "freeze", 1, &[]).as_bytes())
        .unwrap();
    drop(f);
    std::fs::rename(dir.join("x.tok.part"), dir.join("x.tok")).unwrap();
    wait_state(&a, "p", "frozen");
    std::fs::write(dir.join("bad.tok"), "kst1.nope").unwrap();
    let t0 = Instant::now();
    while !dir.join("bad.tok.rejected").exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.join("x.tok").exists());
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn hostile_drops_are_set_aside_and_tokens_keep_flowing() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    install(
        &a,
        &seller.bound(
            &code,
            "p",
            &["--days", "30", "--id", "L-H", "--not-before", &utc_in(-60)],
        ),
    )
    .unwrap();
    let tokens = a.state.join("tokens");
    let licenses = a.state.join("licenses");
    // A FIFO nobody writes (blocked the token thread for good), a symlink to an endless
    // device, a file past the 64 KiB cap; the same in licenses/.
    mkfifo(&tokens.join("a-fifo.tok"));
    std::os::unix::fs::symlink("/dev/zero", tokens.join("b-zero.tok")).unwrap();
    std::fs::write(tokens.join("c-big.tok"), vec![b'k'; 64 * 1024 + 1]).unwrap();
    mkfifo(&licenses.join("f.lic"));
    std::os::unix::fs::symlink("/dev/zero", licenses.join("z.lic")).unwrap();
    // A good token sorted after the hostile ones still gets through.
    std::fs::write(
        tokens.join("d-good.tok"),
        token(&seller, "L-H", "freeze", 1, &[]),
    )
    .unwrap();
    wait_state(&a, "p", "frozen");
    let t0 = Instant::now();
    for p in [
        tokens.join("a-fifo.tok"),
        tokens.join("b-zero.tok"),
        tokens.join("c-big.tok"),
        licenses.join("f.lic"),
        licenses.join("z.lic"),
    ] {
        let mut aside = p.clone().into_os_string();
        aside.push(".rejected");
        while std::fs::symlink_metadata(&aside).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{} not set aside; log:\n{}",
                p.display(),
                a.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(std::fs::symlink_metadata(&p).is_err());
    }
    let log = a.log();
    assert!(
        log.contains("symbolic link") && log.contains("FIFO"),
        "{log}"
    );
    // Nothing blocked: SIGTERM is prompt.
    let (status, took) = a.stop();
    assert!(
        status.success() && took < Duration::from_secs(3),
        "{status} {took:?}"
    );
}

/// An agent with license `L-R` for product `p` installed (issued an hour ago), stopped
/// after a snapshot of both lifecycle copies was taken, restarted, then frozen by a token.
/// Returns the agent (running, frozen) and the pre-freeze copies.
fn frozen_after_snapshot(seller: &Seller) -> (TestAgent, Vec<u8>, Vec<u8>) {
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let lic = seller.bound(
        &code,
        "p",
        &[
            "--days",
            "30",
            "--id",
            "L-R",
            "--not-before",
            &utc_in(-60),
            "--issued-at",
            &utc_in(-3600),
        ],
    );
    install(&a, &lic).unwrap();
    assert_eq!(check(&a, "p")["state"], "valid");
    a.stop();
    let primary = std::fs::read(a.state.join("lifecycle.json")).unwrap();
    let backup = std::fs::read(a.state.join("licenses/.lifecycle.json")).unwrap();
    a.spawn(&[]);
    // Right after a start the device code may not be known yet (token.apply answers
    // device_pending, "try again in a moment"): wait for the bound license to be valid.
    crate::license::wait_state(&a, "p", "valid");
    apply(
        &a,
        &token(seller, "L-R", "freeze", 1, &["--issued-at", &utc_in(-1800)]),
    )
    .unwrap();
    assert_eq!(check(&a, "p")["state"], "frozen");
    (a, primary, backup)
}

fn assert_stays_frozen_as_tampered(a: &TestAgent) {
    let v = check(a, "p");
    assert_eq!(
        (v["state"].as_str(), v["allowed"].as_bool()),
        (Some("frozen"), Some(false)),
        "{v}"
    );
    let s = a.call("freeze.status", json!({})).unwrap();
    assert_eq!(s["tampered"], true, "{s}");
    assert!(
        s.to_string().contains("older copy was put back"),
        "the reason does not say what happened: {s}"
    );
}

#[test]
fn putting_back_both_pre_freeze_lifecycle_copies_is_detected() {
    let seller = Seller::new();
    let (mut a, primary, backup) = frozen_after_snapshot(&seller);
    a.stop();
    std::fs::write(a.state.join("lifecycle.json"), &primary).unwrap();
    std::fs::write(a.state.join("licenses/.lifecycle.json"), &backup).unwrap();
    a.spawn(&[]);
    assert_stays_frozen_as_tampered(&a);
    // Still so after another restart (the tamper mark is saved past the high-water mark).
    a.stop();
    a.spawn(&[]);
    assert_eq!(check(&a, "p")["state"], "frozen");
    // A token issued now lifts it.
    let r = apply(&a, &token(&seller, "L-R", "unfreeze", 2, &[])).unwrap();
    assert_eq!(r["state"], "active", "{r}");
    assert_eq!(check(&a, "p")["state"], "valid");
}

#[test]
fn one_pre_freeze_copy_put_back_and_the_other_deleted_is_detected() {
    let seller = Seller::new();
    for keep_primary in [true, false] {
        let (mut a, primary, backup) = frozen_after_snapshot(&seller);
        a.stop();
        if keep_primary {
            std::fs::write(a.state.join("lifecycle.json"), &primary).unwrap();
            std::fs::remove_file(a.state.join("licenses/.lifecycle.json")).unwrap();
        } else {
            std::fs::remove_file(a.state.join("lifecycle.json")).unwrap();
            std::fs::write(a.state.join("licenses/.lifecycle.json"), &backup).unwrap();
        }
        a.spawn(&[]);
        assert_stays_frozen_as_tampered(&a);
    }
}

#[test]
fn removing_the_anchors_with_the_restore_is_detected_too() {
    let seller = Seller::new();
    let (mut a, primary, backup) = frozen_after_snapshot(&seller);
    a.stop();
    std::fs::write(a.state.join("lifecycle.json"), &primary).unwrap();
    std::fs::write(a.state.join("licenses/.lifecycle.json"), &backup).unwrap();
    std::fs::remove_file(a.state.join("usage/freeze.anchor")).unwrap();
    std::fs::remove_file(a.state.join("time.json")).unwrap();
    a.spawn(&[]);
    let v = check(&a, "p");
    assert_eq!(v["allowed"], false, "{v}");
    let s = a.call("freeze.status", json!({})).unwrap();
    assert_eq!(s["tampered"], true, "{s}");
    assert!(s.to_string().contains("anchor"), "{s}");
}

#[test]
fn a_license_that_expired_during_a_clock_rollback_stays_expired_without_time_json() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    // Valid for one more day by this machine's clock.
    let lic = seller.bound(
        &code,
        "p",
        &[
            "--days",
            "2",
            "--not-before",
            &utc_in(-86_400),
            "--issued-at",
            &utc_in(-86_400),
        ],
    );
    install(&a, &lic).unwrap();
    assert_eq!(check(&a, "p")["state"], "valid");
    // The seller's clock says three days from now: this clock was rolled back, and by the
    // trusted time `p` has expired.
    let future = seller.bound(
        &code,
        "q",
        &[
            "--days",
            "30",
            "--issued-at",
            &utc_in(3 * 86_400),
            "--not-before",
            &utc_in(-60),
        ],
    );
    let r = install(&a, &future).unwrap();
    assert_eq!(r["state"], "clock_rollback");
    a.call("license.remove", json!({"license_id": r["license_id"]}))
        .unwrap();
    let st = a.call("freeze.status", json!({})).unwrap();
    assert!(
        st.to_string().contains("grace period ended"),
        "the expired license is not tracked: {st}"
    );
    a.stop();
    std::fs::remove_file(a.state.join("time.json")).unwrap();
    a.spawn(&[]);
    let v = check(&a, "p");
    assert_eq!(v["allowed"], false, "came back usable: {v}");
    assert_ne!(v["state"], "valid", "{v}");
}
