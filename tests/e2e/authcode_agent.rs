//! Authorization codes through the real daemon in direct mode, against the KooGallery
//! stand-in of `authcode.rs`: activation and its refusals through the socket and the CLI,
//! `license.check` answers, one daily query after many checks, EXPIRED → frozen, RELEASED,
//! the fallback host, counting distinct clients, and the offline policy.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use kooagent::authcode::api;
use serde_json::{json, Value};

use crate::authcode::{Market, AK, SK};
use crate::harness::TestAgent;

fn config(m: &Market, dir: &std::path::Path, extra: &str) -> String {
    let aksk = dir.join("aksk");
    std::fs::write(&aksk, format!("{AK}\n{SK}\n")).unwrap();
    std::fs::set_permissions(&aksk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bases: Vec<String> = m.bases().iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[authcode]\nmode = \"direct\"\nbases = [{}]\naksk_file = \"{}\"\nextra_ca_file = \"{}\"\n\
         grace_days = 0\n{extra}\n[authcode.products]\n\"12345\" = \"myapp\"\n",
        bases.join(", "),
        aksk.display(),
        m.ca.pem_path.display()
    )
}

fn count(m: &Market, path: &str) -> usize {
    m.seen().iter().filter(|s| s.path == path).count()
}

/// Waits (without a time assertion: the machines are noisy) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn refusal(a: &TestAgent, code: &str) -> Value {
    let e = a
        .call("license.activate", json!({"code": code}))
        .unwrap_err();
    assert_eq!(e["code"], "activation_refused", "{e}");
    e
}

/// The code's phase in the freeze lifecycle (`freeze.status`).
fn phase(a: &TestAgent, code: &str) -> Value {
    let st = a.call("freeze.status", json!({})).unwrap();
    st["licenses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["license_id"] == format!("code:{code}"))
        .map(|l| l["state"].clone())
        .unwrap_or(Value::Null)
}

fn set_status(m: &Market, code: &str, status: &'static str) {
    m.with(|s| s.codes.get_mut(code).unwrap().status = status);
}

#[test]
fn activation_check_daily_query_usage_and_lifecycle() {
    let m = Market::start();
    m.add("CODE-OK", true);
    m.add("CODE-NR", false);
    let keydir = tempfile::tempdir().unwrap();
    let a = TestAgent::start(&config(&m, keydir.path(), ""));

    // Unknown product before activation: still no license.
    assert_eq!(
        a.call("license.check", json!({"product": "myapp"}))
            .unwrap_err()["code"],
        "no_license"
    );

    // Activation through the CLI: code info parsed, product mapped.
    let out = a.cli(&["license", "activate", "CODE-OK", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["product"], "myapp");
    assert_eq!(v["product_id"], "12345");
    assert_eq!(v["order_id"], "CS123");
    assert_eq!(v["amount"], "2");
    assert_eq!(v["status"], "ALIVE");
    assert_eq!(v["expire_time"], "2027-07-26T12:16:46Z");
    assert_eq!(v["already_activated"], false);
    let stored = a.state.join("authcodes.json");
    assert_eq!(
        std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Again: the marketplace says 92020003, and the agent knows the code is its own.
    let again = a
        .call("license.activate", json!({"code": "CODE-OK"}))
        .unwrap();
    assert_eq!(again["already_activated"], true);
    assert_eq!(phase(&a, "CODE-OK"), "active");

    // Each documented refusal, named.
    let e = refusal(&a, "CODE-NR");
    assert_eq!(e["details"]["error_code"], "92020004");
    assert!(
        e["message"].as_str().unwrap().contains("not received"),
        "{e}"
    );
    let e = refusal(&a, "NO-SUCH-CODE");
    assert_eq!(e["details"]["error_code"], "92020005");
    assert!(
        e["message"].as_str().unwrap().contains("does not exist"),
        "{e}"
    );
    for (code, words) in [
        ("92020001", "internal error"),
        ("92020002", "parameters"),
        ("92020011", "not been activated"),
        ("92020020", "not valid"),
        ("95000001", "parameters"),
    ] {
        m.with(|s| s.inject = Some((200, code.to_string())));
        let e = refusal(&a, "CODE-NR");
        assert_eq!(e["details"]["error_code"], code);
        assert!(e["message"].as_str().unwrap().contains(words), "{e}");
    }
    let e = a
        .call("license.activate", json!({"code": "x".repeat(65)}))
        .unwrap_err();
    assert_eq!(e["code"], "invalid_code");
    let out = a.cli(&["license", "activate", "NO-SUCH-CODE"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let activations = count(&m, api::PATH_ACTIVATE);

    // Checks: answered from memory; the first one of the day starts one daily query.
    assert_eq!(count(&m, api::PATH_HEARTBEAT), 0);
    for _ in 0..5 {
        let c = a
            .call("license.check", json!({"product": "myapp"}))
            .unwrap();
        assert_eq!(c["kind"], "authorization_code");
        assert_eq!(c["license_id"], "code:CODE-OK");
        assert_eq!(c["state"], "valid");
        assert_eq!(c["allowed"], true);
        assert!(c["days_left"].as_i64().unwrap() > 0, "{c}");
    }
    eventually("the daily query", || {
        a.call("authcode.status", json!({})).unwrap()["codes"][0]["last_query_at"].is_string()
    });
    for _ in 0..5 {
        a.call("license.check", json!({"product": "myapp"}))
            .unwrap();
    }
    let st = a.call("authcode.status", json!({})).unwrap();
    assert_eq!(st["heartbeats"], 1, "{st}");
    assert_eq!(count(&m, api::PATH_HEARTBEAT), 1);
    // The heartbeat's expiry replaces the activation's estimate.
    assert_eq!(st["codes"][0]["expire_time"], "2027-01-01T08:00:00Z");
    assert_eq!(count(&m, api::PATH_ACTIVATE), activations);

    // Distinct clients: named by the seller's software, or the caller's uid.
    for c in ["alice", "bob", "alice"] {
        let r = a
            .call(
                "authcode.client_seen",
                json!({"product": "myapp", "client": c}),
            )
            .unwrap();
        assert_eq!(r["license_id"], "code:CODE-OK");
    }
    a.call("authcode.client_seen", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        a.call("authcode.client_seen", json!({"product": "other"}))
            .unwrap_err()["code"],
        "no_authcode"
    );
    // Nothing reported during the day by itself: once a day, completed days.
    assert_eq!(count(&m, api::PATH_USAGE), 0);
    let out = a.cli(&["authcode", "sync"]);
    assert!(out.status.success(), "{out:?}");
    let uid = unsafe { libc::getuid() };
    let want: HashSet<String> = ["alice".to_string(), "bob".into(), format!("uid:{uid}")]
        .into_iter()
        .collect();
    assert_eq!(m.with(|s| s.ids.get("CODE-OK").cloned()), Some(want));
    assert_eq!(count(&m, api::PATH_USAGE), 1);
    let st = a.call("authcode.status", json!({})).unwrap();
    assert_eq!(st["codes"][0]["clients_pending"], 0);

    // Fallback host when the primary cannot be reached.
    m.with(|s| s.primary_down = true);
    a.call("authcode.sync", json!({})).unwrap();
    assert!(m
        .seen()
        .iter()
        .any(|s| s.path == api::PATH_HEARTBEAT && s.listener == "fallback"));
    m.with(|s| s.primary_down = false);

    // EXPIRED: grace (0 days here) then frozen.
    set_status(&m, "CODE-OK", "EXPIRED");
    a.call("authcode.sync", json!({})).unwrap();
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["allowed"].as_bool()),
        (Some("frozen"), Some(false)),
        "{c}"
    );
    assert_eq!(phase(&a, "CODE-OK"), "frozen");
    // ALIVE again (renewed): valid.
    set_status(&m, "CODE-OK", "ALIVE");
    a.call("authcode.sync", json!({})).unwrap();
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(c["state"], "valid", "{c}");
    assert_eq!(phase(&a, "CODE-OK"), "active");
    // RELEASED.
    set_status(&m, "CODE-OK", "RELEASED");
    a.call("authcode.sync", json!({})).unwrap();
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["allowed"].as_bool()),
        (Some("released"), Some(false)),
        "{c}"
    );
    assert_eq!(phase(&a, "CODE-OK"), "released");
    let out = a.cli(&["authcode", "status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("RELEASED"),
        "{out:?}"
    );
    m.assert_no_violations();

    // Kept across a restart.
    let mut a = a;
    a.stop();
    a.spawn(&[]);
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(c["state"], "released");
    eventually("the code back in the lifecycle", || {
        phase(&a, "CODE-OK") == "released"
    });
}

#[test]
fn offline_policy_freezes_after_the_allowed_days() {
    let m = Market::start();
    m.add("CODE-OFF", true);
    let keydir = tempfile::tempdir().unwrap();
    // 0 days allowed offline: frozen as soon as a second passes without a successful query.
    let a = TestAgent::start(&config(
        &m,
        keydir.path(),
        "offline_days = 0\noffline_policy = \"freeze\"",
    ));
    a.call("license.activate", json!({"code": "CODE-OFF"}))
        .unwrap();
    m.with(|s| (s.primary_down, s.fallback_down) = (true, true));
    a.call("authcode.sync", json!({})).unwrap();
    let st = a.call("authcode.status", json!({})).unwrap();
    assert!(
        st["codes"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("no KooGallery host could be reached"),
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(c["state"], "frozen", "{c}");
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .contains("no successful daily query"),
        "{c}"
    );
    // The freeze lifecycle is told on the authcode thread.
    eventually("frozen in the lifecycle", || {
        phase(&a, "CODE-OFF") == "frozen"
    });
}
