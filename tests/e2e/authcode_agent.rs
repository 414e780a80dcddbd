//! Authorization codes through the real daemon in direct mode, against the KooGallery
//! stand-in of `authcode.rs`: activation and its refusals through the socket and the CLI,
//! `license.check` answers, one daily query after many checks, EXPIRED → frozen, RELEASED,
//! the fallback host, counting distinct clients, and the offline policy.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kooagent::authcode::api;
use kooagent::authcode::apig_sign::AkSk;
use kooagent::authcode::client::Client;
use kooagent::authcode::relay_auth::{self, RelayHeaders};
use kooagent::clock::{Clock, SystemClock};
use serde_json::{json, Value};

use crate::authcode::{Market, AK, SK};
use crate::harness::TestAgent;
use crate::upstream::{read_request, Request};

fn config(m: &Market, dir: &std::path::Path, extra: &str) -> String {
    let aksk = dir.join("aksk");
    std::fs::write(&aksk, format!("{AK}\n{SK}\n")).unwrap();
    std::fs::set_permissions(&aksk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bases: Vec<String> = m.bases().iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[authcode]\nmode = \"direct\"\nbases = [{}]\naksk_file = \"{}\"\nextra_ca_file = \"{}\"\n\
         {extra}\n[authcode.products]\n\"12345\" = \"myapp\"\n",
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
    let a = TestAgent::start(&config(&m, keydir.path(), "grace_days = 0"));

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
    // Reported on the day of use, at each client's first use that day (issue 13 item 10:
    // the call has no date, so a report tomorrow would count tomorrow), without a sync.
    let uid = unsafe { libc::getuid() };
    let want: HashSet<String> = ["alice".to_string(), "bob".into(), format!("uid:{uid}")]
        .into_iter()
        .collect();
    eventually("today's clients reported today", || {
        m.with(|s| s.ids.get("CODE-OK").cloned()) == Some(want.clone())
    });
    let reports = count(&m, api::PATH_USAGE);
    assert!((1..=4).contains(&reports), "{reports} usage calls");
    // A client seen again the same day is not reported again.
    a.call(
        "authcode.client_seen",
        json!({"product": "myapp", "client": "alice"}),
    )
    .unwrap();
    let out = a.cli(&["authcode", "sync"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(m.with(|s| s.ids.get("CODE-OK").cloned()), Some(want));
    assert_eq!(count(&m, api::PATH_USAGE), reports);
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

    // Kept across a restart: the code, and the clients not reported yet.
    a.call(
        "authcode.client_seen",
        json!({"product": "myapp", "client": "carol"}),
    )
    .unwrap();
    let mut a = a;
    a.stop();
    a.spawn(&[]);
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(c["state"], "released");
    a.call("authcode.sync", json!({})).unwrap();
    assert!(m.with(|s| s.ids["CODE-OK"].contains("carol")));
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
        "grace_days = 0\noffline_days = 0\noffline_policy = \"freeze\"",
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

/// A stand-in of the seller's relay (relay protocol): checks the device signature with
/// `relay_auth`, binds each code to the first key that activates it, forwards to the
/// marketplace stand-in with the AK/SK, and answers its body unchanged.
struct Relay {
    port: u16,
    /// Requests refused for their authentication (must stay 0 for the agent's requests).
    bad_auth: Arc<Mutex<Vec<String>>>,
}

fn start_relay(m: &Market) -> Relay {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = m.ca.server_config();
    let client = Arc::new(
        Client::new(
            &m.bases(),
            Some(&m.ca.pem_path),
            "test",
            Duration::from_secs(60),
            AkSk::new(AK, SK),
            Arc::new(SystemClock),
        )
        .unwrap(),
    );
    let bound: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let nonces: Arc<Mutex<HashSet<String>>> = Arc::default();
    let bad_auth: Arc<Mutex<Vec<String>>> = Arc::default();
    let bad = bad_auth.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let (cfg, client, bound, nonces, bad) = (
                cfg.clone(),
                client.clone(),
                bound.clone(),
                nonces.clone(),
                bad.clone(),
            );
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                while let Some(req) = read_request(&mut tls) {
                    let (status, body) = relay_handle(&req, &client, &bound, &nonces, &bad);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.get_mut().write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    let _ = tls.get_mut().flush();
                }
            });
        }
    });
    Relay {
        port,
        bad_auth: bad_auth.clone(),
    }
}

fn relay_handle(
    req: &Request,
    client: &Client,
    bound: &Mutex<HashMap<String, String>>,
    nonces: &Mutex<HashSet<String>>,
    bad: &Mutex<Vec<String>>,
) -> (u16, String) {
    let forbidden = |why: &str| {
        (
            403,
            json!({"error_code": "KOOAGENT.RELAY.0403", "error_msg": why}).to_string(),
        )
    };
    let now_ms = SystemClock.now_ms();
    let verified =
        RelayHeaders::from_lookup(|h| req.headers.get(h).map(String::as_str)).and_then(|h| {
            relay_auth::verify(&h, &req.method, &req.path, &req.body, now_ms, |n| {
                nonces.lock().unwrap().insert(n.to_string())
            })
        });
    let key = match verified {
        Ok(k) => STANDARD.encode(k.as_bytes()),
        Err(e) => {
            bad.lock()
                .unwrap()
                .push(format!("{} {}: {e}", req.method, req.path));
            return forbidden(&e.to_string());
        }
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let codes: Vec<String> = match req.path.as_str() {
        "/v1/authcode/usage" => body["usage_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["license"].as_str().map(str::to_string))
            .collect(),
        _ => body["license"]
            .as_str()
            .map(str::to_string)
            .into_iter()
            .collect(),
    };
    let path = match req.path.as_str() {
        "/v1/authcode/activate" => api::PATH_ACTIVATE,
        "/v1/authcode/heartbeat" => api::PATH_HEARTBEAT,
        "/v1/authcode/usage" => api::PATH_USAGE,
        _ => return (404, json!({"error_msg": "not found"}).to_string()),
    };
    {
        let b = bound.lock().unwrap();
        if codes.iter().any(|c| b.get(c).is_some_and(|k| *k != key)) {
            return forbidden("the authorization code is bound to another device");
        }
    }
    match client.post(path, &req.body) {
        Ok((_, http, text)) => {
            if path == api::PATH_ACTIVATE && text.contains("\"92020000\"") {
                let mut b = bound.lock().unwrap();
                for c in codes {
                    b.insert(c, key.clone());
                }
            } else if path == api::PATH_ACTIVATE
                && text.contains("\"92020003\"")
                && codes.len() == 1
                && bound.lock().unwrap().get(&codes[0]) == Some(&key)
            {
                // The contract (helpers' contracts.md, issue 13 item 8): this key made the
                // first activation; query, and answer the activation's success shape
                // with `kooagent_recovered: true`.
                let q = json!({"license": codes[0]}).to_string();
                if let Ok((_, 200, qt)) = client.post(api::PATH_HEARTBEAT, q.as_bytes()) {
                    let d: Value = serde_json::from_str(&qt).unwrap();
                    let info = json!({"status": d["data"]["status"], "expire_time": d["data"]["expire_time"]});
                    let body = json!({"error_code": "92020000", "error_msg": "success",
                        "data": {"license_code_info": info.to_string()}, "kooagent_recovered": true});
                    return (200, body.to_string());
                }
            }
            (http, text)
        }
        Err(e) => (
            502,
            json!({"error_code": "KOOAGENT.RELAY.0502", "error_msg": format!("marketplace unreachable: {e}")})
                .to_string(),
        ),
    }
}

fn relay_config(m: &Market, r: &Relay) -> String {
    format!(
        "[authcode]\nmode = \"relay\"\nrelay_url = \"https://localhost:{}\"\nextra_ca_file = \"{}\"\n\
         [authcode.products]\n\"12345\" = \"myapp\"\n",
        r.port,
        m.ca.pem_path.display()
    )
}

#[test]
fn relay_mode_signs_with_the_device_key_and_adopts_its_own_code() {
    let m = Market::start();
    m.add("CODE-R", true);
    let r = start_relay(&m);
    let mut a = TestAgent::start(&relay_config(&m, &r));
    let v = a
        .call("license.activate", json!({"code": "CODE-R"}))
        .unwrap();
    assert_eq!(
        (v["product"].as_str(), v["state"].as_str()),
        (Some("myapp"), Some("valid")),
        "{v}"
    );
    let key = a.state.join("relay.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    a.call(
        "authcode.client_seen",
        json!({"product": "myapp", "client": "c1"}),
    )
    .unwrap();
    a.call("authcode.sync", json!({})).unwrap();
    let st = a.call("authcode.status", json!({})).unwrap();
    assert!(st["codes"][0]["last_error"].is_null(), "{st}");
    assert_eq!(st["mode"], "relay");
    assert!(m.with(|s| s.ids["CODE-R"].contains("c1")));

    // Another device (another key) cannot take the code.
    let b = TestAgent::start(&relay_config(&m, &r));
    let e = b
        .call("license.activate", json!({"code": "CODE-R"}))
        .unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("another device"),
        "{e}"
    );

    // The first device loses its record (not its key): KooGallery says 92020003, the
    // relay vouches it is this device's (`kooagent_recovered`), and the code is
    // recovered after the same product check as in direct mode.
    a.stop();
    std::fs::remove_file(a.state.join("authcodes.json")).unwrap();
    a.spawn(&[]);
    let e = a
        .call(
            "license.activate",
            json!({"code": "CODE-R", "product": "not-mine"}),
        )
        .unwrap_err();
    assert_eq!(e["code"], "activation_refused", "{e}");
    let out = a.cli(&["license", "activate", "CODE-R"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("recovered: the marketplace had already activated this code for this device (the earlier answer was lost)"),
        "{out:?}"
    );
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(c["state"], "valid", "{c}");
    assert!(r.bad_auth.lock().unwrap().is_empty());
    m.assert_no_violations();
}

/// Issue 13 item 8 (direct mode): the marketplace activates the code but the answer is
/// lost. The agent recorded the activation before sending it; the fallback host is not
/// used to resend it; a retry gets 92020003, queries the code and recovers it. A code
/// someone else activated is never adopted. Item 9: APIGW errors name the AK/SK. Item 7:
/// an answer about another code is not applied. Item 11: nothing secret in a trace log.
#[test]
fn a_lost_activation_answer_is_recovered_and_nothing_else_is_adopted() {
    let m = Market::start();
    m.add("CODE-LOST", true);
    m.add("CODE-THEIRS", true);
    let keydir = tempfile::tempdir().unwrap();
    let a = TestAgent::start(&format!(
        "{}\n[agent]\nlog_level = \"trace\"\n",
        config(&m, keydir.path(), "timeout_secs = 2")
    ));

    m.with(|s| s.lose_activation_answer = Some(Duration::from_secs(5)));
    let e = a
        .call("license.activate", json!({"code": "CODE-LOST"}))
        .unwrap_err();
    assert_eq!(e["code"], "marketplace_unreachable", "{e}");
    assert!(m.with(|s| s.codes["CODE-LOST"].activated));
    // Not resent to the fallback host after the timeout.
    assert!(
        !m.seen()
            .iter()
            .any(|s| s.path == api::PATH_ACTIVATE && s.listener == "fallback"),
        "{:?}",
        m.seen()
    );
    // The in-flight record was on disk before the answer was awaited.
    let stored: Value =
        serde_json::from_slice(&std::fs::read(a.state.join("authcodes.json")).unwrap()).unwrap();
    assert!(
        stored["in_flight"]["CODE-LOST"]["sent_at"].is_i64(),
        "{stored}"
    );

    // The retry: 92020003, then the query (ALIVE), then adopted, and said so.
    let out = a.cli(&["license", "activate", "CODE-LOST"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("recovered: the marketplace had already activated this code for this device (the earlier answer was lost)"),
        "{said}"
    );
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["license_id"].as_str()),
        (Some("valid"), Some("code:CODE-LOST")),
        "{c}"
    );
    let stored: Value =
        serde_json::from_slice(&std::fs::read(a.state.join("authcodes.json")).unwrap()).unwrap();
    assert!(stored["in_flight"].is_null(), "{stored}");

    // Activated by someone else (no activation of ours in flight): refused, not adopted.
    m.with(|s| s.codes.get_mut("CODE-THEIRS").unwrap().activated = true);
    let e = refusal(&a, "CODE-THEIRS");
    assert_eq!(e["details"]["error_code"], "92020003", "{e}");
    let e = refusal(&a, "CODE-THEIRS");
    assert_eq!(
        e["details"]["error_code"], "92020003",
        "a second try adopts nothing: {e}"
    );
    let st = a.call("authcode.status", json!({})).unwrap();
    assert_eq!(st["codes"].as_array().unwrap().len(), 1, "{st}");

    // APIGW gateway errors are credential errors with a hint about the AK/SK.
    m.with(|s| s.inject = Some((401, "APIGW.0301".into())));
    let e = a
        .call("license.activate", json!({"code": "CODE-THEIRS"}))
        .unwrap_err();
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("APIGW.0301") && msg.contains("AK/SK"), "{e}");

    // A daily query answered about another code changes nothing of ours.
    set_status(&m, "CODE-LOST", "EXPIRED");
    m.with(|s| s.answer_about = Some("CODE-THEIRS".into()));
    a.call("authcode.sync", json!({})).unwrap();
    let st = a.call("authcode.status", json!({})).unwrap();
    let code = &st["codes"][0];
    assert_eq!(code["status"], "ALIVE", "{st}");
    assert!(
        code["last_error"].as_str().unwrap().contains("CODE-THEIRS"),
        "{st}"
    );

    // With log_level = "trace": no AK, no SK, no signature anywhere in the log.
    let log = a.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging is on"
    );
    for secret in [AK, SK, "Signature="] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
    m.assert_no_violations();
}

#[test]
fn a_day_passed_since_the_last_query_queries_at_start_without_a_check() {
    let m = Market::start();
    m.add("CODE-Y", true);
    m.with(|s| s.codes.get_mut("CODE-Y").unwrap().activated = true);
    let keydir = tempfile::tempdir().unwrap();
    let mut a = TestAgent::prepare(&config(&m, keydir.path(), "grace_days = 0"));
    let yesterday = SystemClock.now_secs() - 86_400;
    std::fs::create_dir_all(&a.state).unwrap();
    let rec = json!({"version": 1, "codes": [{
        "code": "CODE-Y", "product": "myapp", "product_id": "12345", "order_id": null,
        "amount": null, "activated_at": yesterday - 86_400, "status": "ALIVE",
        "expire_time": null, "last_ok_at": yesterday, "expired_seen_at": null,
        "last_query_at": yesterday, "last_error": null}]});
    std::fs::write(a.state.join("authcodes.json"), rec.to_string()).unwrap();
    a.spawn(&[]);
    eventually("the query at start", || {
        a.call("authcode.status", json!({})).unwrap()["heartbeats"] == 1
    });
    // Today's query is done: the checks that follow do not start another.
    for _ in 0..3 {
        let c = a
            .call("license.check", json!({"product": "myapp"}))
            .unwrap();
        assert_eq!(c["state"], "valid");
    }
    let st = a.call("authcode.status", json!({})).unwrap();
    assert_eq!(st["heartbeats"], 1, "{st}");
    assert_eq!(count(&m, api::PATH_HEARTBEAT), 1);
}

#[test]
fn expired_gives_grace_days_before_freezing() {
    let m = Market::start();
    m.add("CODE-G", true);
    let keydir = tempfile::tempdir().unwrap();
    let a = TestAgent::start(&config(&m, keydir.path(), "grace_days = 3"));
    a.call("license.activate", json!({"code": "CODE-G"}))
        .unwrap();
    set_status(&m, "CODE-G", "EXPIRED");
    a.call("authcode.sync", json!({})).unwrap();
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["allowed"].as_bool()),
        (Some("grace"), Some(true)),
        "{c}"
    );
    // Three days from the first EXPIRED, less the seconds the test took.
    let secs = c["secs_left"].as_i64().unwrap();
    assert!(secs <= 3 * 86_400 && secs > 2 * 86_400, "{c}");
    assert_eq!(phase(&a, "CODE-G"), "grace");
}
