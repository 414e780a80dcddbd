//! The cached license check (issue 18 item 2): `kooagent_client::CachedClient` against the
//! real agent. It answers from the verdict table the agent streams on `watch`
//! `{"verdicts": true}`, follows installs, freezes and expiries, falls back to the socket
//! when the agent is gone and resumes when it is back.

use std::time::{Duration, Instant};

use kooagent_client::cached::Source;
use kooagent_client::{CachedClient, Client, ClientError};
use serde_json::{json, Value};

use crate::harness::TestAgent;
use crate::license::{device_code, utc_in, Seller};

/// Waits (bounded) until the cached answer for `product` / `feature` satisfies `ok`.
#[track_caller]
fn wait_cached(
    c: &CachedClient,
    product: &str,
    feature: Option<&str>,
    what: &str,
    ok: impl Fn(&kooagent_client::Verdict) -> bool,
) -> kooagent_client::Verdict {
    let t0 = Instant::now();
    loop {
        if let Some(v) = c.cached(product, feature) {
            if ok(&v) {
                return v;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the cache never showed {what}: {:?}",
            c.cached(product, feature)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The fields of a `license.check` answer both ways must agree on (`secs_left` and
/// `days_left` count down with the clock: compared apart).
fn comparable(mut v: Value) -> Value {
    let obj = v.as_object_mut().unwrap();
    obj.remove("secs_left");
    obj.remove("days_left");
    v
}

fn install(a: &TestAgent, seller: &Seller, text: &str) {
    let lic = seller.write("cached.lic", text);
    let out = a.cli(&["license", "install", lic.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cached_check_follows_install_freeze_and_agent_restarts() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let cache =
        CachedClient::with_client(Client::new(&a.socket).reconnect_for(Duration::from_millis(300)));
    assert!(cache.wait_live(Duration::from_secs(15)), "{}", a.log());

    // Nothing installed: not the cache's to answer; the socket says no_license.
    assert!(cache.cached("sku-c", None).is_none());
    let v = cache.check("sku-c", None).unwrap();
    assert_eq!(
        (v.state(), v.allowed, v.source),
        ("no_license", false, Source::Socket)
    );

    // Install: the cached answer flips to licensed, as the socket answers it.
    let text = seller.bound(
        &device_code(&a),
        "sku-c",
        &["--days", "30", "--feature", "export", "--limit", "cores=8"],
    );
    install(&a, &seller, &text);
    let v = wait_cached(&cache, "sku-c", None, "the installed license", |v| {
        v.allowed
    });
    assert_eq!((v.state(), v.source), ("valid", Source::Cache));
    assert!(matches!(v.days_left, Some(29 | 30)), "{v:?}");
    for feature in [None, Some("export"), Some("sso")] {
        let mut params = json!({"product": "sku-c"});
        if let Some(f) = feature {
            params["feature"] = json!(f);
        }
        let socket = a.call("license.check", params).unwrap();
        let cached = cache.check("sku-c", feature).unwrap();
        assert_eq!(cached.source, Source::Cache);
        let as_check = serde_json::to_value(cached.to_check().extra).unwrap();
        let mut whole = as_check.clone();
        whole["state"] = json!(cached.state());
        whole["allowed"] = json!(cached.allowed);
        whole["license_id"] = json!(cached.license_id());
        whole["reason"] = json!(cached.reason());
        whole["features"] = json!(cached.features());
        whole["limits"] = json!(cached.to_check().limits);
        assert_eq!(comparable(whole), comparable(socket.clone()), "{feature:?}");
        let left = socket["secs_left"].as_i64().unwrap();
        assert!(
            (left - cached.secs_left.unwrap()).abs() <= 2,
            "{socket} vs {cached:?}"
        );
    }
    let lic_id = cache
        .cached("sku-c", None)
        .unwrap()
        .license_id()
        .unwrap()
        .to_string();

    // Freeze, then unfreeze: the cached answer follows, without a round trip.
    let token = crate::freeze::token(&seller, &lic_id, "freeze", 1, &[]);
    a.call("token.apply", json!({"token": token.trim()}))
        .unwrap();
    let v = wait_cached(&cache, "sku-c", None, "the freeze", |v| !v.allowed);
    assert_eq!(v.state(), "frozen");
    assert_eq!(
        a.call("license.check", json!({"product": "sku-c"}))
            .unwrap()["state"],
        "frozen"
    );
    let token = crate::freeze::token(&seller, &lic_id, "unfreeze", 2, &[]);
    a.call("token.apply", json!({"token": token.trim()}))
        .unwrap();
    wait_cached(&cache, "sku-c", None, "the unfreeze", |v| {
        v.allowed && v.state() == "valid"
    });

    // The agent killed: the cache stops answering and the check reports what the
    // uncached one reports.
    a.kill9();
    let t0 = Instant::now();
    while cache.is_live() {
        assert!(t0.elapsed() < Duration::from_secs(10), "still live");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(cache.cached("sku-c", None).is_none());
    let plain = Client::new(&a.socket)
        .reconnect_for(Duration::from_millis(300))
        .check("sku-c", None)
        .unwrap_err();
    let cached = cache.check("sku-c", None).unwrap_err();
    assert!(matches!(plain, ClientError::Connect { .. }), "{plain}");
    assert!(matches!(cached, ClientError::Connect { .. }), "{cached}");
    assert_eq!(cached.to_string(), plain.to_string());

    // Restarted: the cache subscribes again by itself and answers from memory again.
    a.spawn(&[]);
    let v = wait_cached(
        &cache,
        "sku-c",
        Some("export"),
        "the restarted agent",
        |v| v.allowed,
    );
    assert_eq!((v.source, v.granted), (Source::Cache, Some(true)));
}

#[test]
fn cached_check_sees_an_expiry_without_a_request() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let cache = CachedClient::new(&a.socket);
    let text = seller.bound(
        &device_code(&a),
        "p",
        &[
            "--not-after",
            &utc_in(3),
            "--not-before",
            &utc_in(-60),
            "--grace-secs",
            "2",
        ],
    );
    install(&a, &seller, &text);
    wait_cached(&cache, "p", None, "the license", |v| v.allowed);
    // The agent's timer rebuilds the table at each boundary and streams it.
    wait_cached(&cache, "p", None, "grace", |v| v.state() == "grace");
    let v = wait_cached(&cache, "p", None, "the end of grace", |v| !v.allowed);
    assert_eq!(v.state(), "frozen", "{v:?}");
    assert_eq!(v.source, Source::Cache);
}

/// The C ABI's cached check (examples/c/cached.c linked against libkooagent_ffi): answers
/// from memory like `kooagent_check` over the socket, follows a freeze, and a handle
/// inherited through fork() is refused while the child's own works.
#[test]
fn c_cached_check_follows_a_freeze_and_refuses_a_forked_handle() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};

    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let text = seller.bound(
        &device_code(&a),
        "sku-c",
        &["--days", "30", "--feature", "export"],
    );
    install(&a, &seller, &text);
    let exe = crate::sdk::compile("cached", seller.dir.path());
    let mut child = Command::new(&exe)
        .args(["sku-c", "export"])
        .env("KOOAGENT_SOCKET", &a.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a line from the C program")
    };
    let mut say = |cmd: &str| writeln!(stdin, "{cmd}").unwrap();
    assert_eq!(next(), "live: 1");

    say("check");
    let (cached, socket) = (next(), next());
    assert!(
        cached.starts_with("cached status: 0 live: 1 state: 1 allowed: 1 days_left: 29")
            || cached.starts_with("cached status: 0 live: 1 state: 1 allowed: 1 days_left: 30"),
        "{cached}"
    );
    // The same answer as over the socket (the license id too).
    assert_eq!(
        cached.replace("cached", "").replace("live: 1", ""),
        socket.replace("socket", "").replace("live: 0", ""),
    );
    let lic_id = cached.rsplit("license: ").next().unwrap().to_string();

    let token = crate::freeze::token(&seller, &lic_id, "freeze", 1, &[]);
    a.call("token.apply", json!({"token": token.trim()}))
        .unwrap();
    say("until 0");
    let line = next();
    assert!(
        line.starts_with("cached status: 0 live: 1 state: 9 allowed: 0"),
        "{line}"
    );

    say("fork");
    let line = next();
    assert_eq!(
        line,
        "child inherited: -10 own live: 1 own status: 0 allowed: 0"
    );
    assert_eq!(next(), "parent live: 1 child exit: 0");

    let token = crate::freeze::token(&seller, &lic_id, "unfreeze", 2, &[]);
    a.call("token.apply", json!({"token": token.trim()}))
        .unwrap();
    say("until 1");
    let line = next();
    assert!(
        line.starts_with("cached status: 0 live: 1 state: 1 allowed: 1"),
        "{line}"
    );
    say("quit");
    assert!(child.wait().unwrap().success());
}
