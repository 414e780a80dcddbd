//! Usage through the seller's relay (issue 19) end to end: real agents in relay mode →
//! the real `kooagent seller serve` → the usage-data stand-in of `upstream.rs`, which
//! checks the interconnection-key signature, the fields and `metering_sn` uniqueness.
//! The agents hold no interconnection key. On SQLite, and on PostgreSQL when
//! KOOAGENT_TEST_PG_URL is set.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::harness::{base_config, TestAgent};
use crate::seller_server::{digits14, market_time, storages, SellerServer, KEY};
use crate::upstream::{TestCa, Upstream};

const HOUR: i64 = 3600;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[seller_server.usage]` towards `upstreams`, fast retries, meters of sku-pro.
fn server_usage(upstreams: &[String], ca: &TestCa, extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[seller_server.usage]\nupstreams = [{}]\nextra_ca_file = {:?}\nupload_timeout_secs = 2\n\
         backoff_initial_ms = 50\nbackoff_max_ms = 300\n{extra}\n\
         [seller_server.usage.meters]\nsku-pro = [\"cpu\", \"steal\", \"rej\"]\n",
        ups.join(", "),
        ca.pem_path.display().to_string()
    )
}

/// An agent in relay mode (no key file anywhere) with `meters` (name → instance).
fn relay_agent(server: &SellerServer, product_id: &str, meters: &[(&str, &str)]) -> TestAgent {
    let mut a = TestAgent::prepare("");
    let mut t = format!(
        "[agent]\nproduct_id = {product_id:?}\n[usage]\nrelay_url = \"https://localhost:{}\"\n\
         extra_ca_file = {:?}\nlateness_secs = 0\nbackoff_initial_ms = 50\nbackoff_max_ms = 300\n\
         upload_timeout_secs = 5\nrelay_poll_secs = 1\n",
        server.port,
        server.ca_pem.display().to_string()
    );
    for (m, i) in meters {
        t.push_str(&format!("[usage.meters.{m}]\ninstance_id = {i:?}\n"));
    }
    std::fs::write(&a.config, base_config(a.dir.path(), &t)).unwrap();
    a.spawn(&[]);
    a
}

fn code(a: &TestAgent) -> String {
    a.call("device.code", json!({})).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The marketplace orders `instance` for `device`.
fn order(server: &SellerServer, instance: &str, device: &str) {
    let t = now();
    let (_, v) = server.market(&json!({
        "activity": "getLicense", "instanceId": instance, "eventId": format!("ev-{instance}"),
        "effectiveTime": market_time(t - 60), "expireTime": digits14(t + 30 * 86_400),
        "deviceFingerprint": device, "testFlag": "1"
    }));
    assert_eq!(v["resultCode"], "000000", "{v}; log:\n{}", server.log());
}

/// Binds the agent's device key to its device code the way the agent's own license fetch
/// does (trust on first use): a fetch of the instance's license signed with the device key.
fn register(server: &SellerServer, a: &TestAgent, instance: &str) {
    let p = a.state.join("relay.key");
    let key = kooagent::authcode::relay_auth::load_or_create_key(&p).unwrap();
    let target = format!("/v1/licenses/kg-{instance}?device_code={}", code(a));
    let (status, _, body) = server.device_get(&key, &target);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

fn record(a: &TestAgent, meter: &str, value: &str, at: i64) {
    a.call(
        "usage.record",
        json!({"meter": meter, "value": value, "at": at}),
    )
    .unwrap_or_else(|e| panic!("record {meter}: {e}"));
}

fn flush(a: &TestAgent) -> Value {
    a.call("usage.flush", json!({})).unwrap()
}

/// metering_sn → the record as `usage.status` shows it.
fn ledger(a: &TestAgent) -> HashMap<String, Value> {
    let st = a.call("usage.status", json!({"records": true})).unwrap();
    st["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["metering_sn"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

fn states(a: &TestAgent) -> HashMap<String, String> {
    ledger(a)
        .into_iter()
        .map(|(sn, r)| (sn, r["delivery"]["state"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn usage_goes_through_the_relay_checked_held_and_delivered_once() {
    for storage in storages() {
        through_the_relay(&storage);
    }
}

fn through_the_relay(storage: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let server = SellerServer::start(&format!("{storage}{}", server_usage(&[up.url()], &ca, "")));
    let a = relay_agent(
        &server,
        "default",
        &[("cpu", "RA2-U-A"), ("steal", "RA2-U-B")],
    );
    let b = relay_agent(&server, "other", &[("cpu", "RA2-U-B")]);
    let (code_a, code_b) = (code(&a), code(&b));
    assert_ne!(code_a, code_b);
    order(&server, "RA2-U-A", &code_a);
    order(&server, "RA2-U-B", &code_b);
    assert!(
        !a.cli(&["config", "check"]).stderr.starts_with(b"WARNING"),
        "relay mode gives no direct-mode warning"
    );
    let check = String::from_utf8(a.cli(&["config", "check"]).stdout).unwrap();
    assert!(check.contains("usage: relay mode"), "{check}");

    let t = now();
    record(&a, "cpu", "1.5", t - 3 * HOUR);
    record(&a, "cpu", "2", t - 2 * HOUR);
    record(&a, "steal", "99", t - 2 * HOUR);
    record(&b, "cpu", "7.25", t - 2 * HOUR);

    // Not known to the server yet: nothing is stored, the records stay pending.
    let f = flush(&a);
    assert!(
        f["not_sent_because"]
            .as_str()
            .unwrap_or("")
            .contains("UNKNOWN_DEVICE"),
        "{f}"
    );
    assert!(states(&a).values().all(|s| s == "pending"));

    register(&server, &a, "RA2-U-A");
    register(&server, &b, "RA2-U-B");
    let f = flush(&a);
    assert_eq!(f["not_sent_because"], Value::Null, "{f}\n{}", server.log());
    flush(&b);

    // A's record for B's instance is refused by the server and parked on the device with
    // the reason; everything else reaches the marketplace, once.
    let sa = ledger(&a);
    let steal = sa
        .values()
        .find(|r| r["meter"] == "steal")
        .expect("the steal record");
    assert_eq!(steal["delivery"]["state"], "parked", "{steal}");
    assert!(
        steal["delivery"]["reason"]
            .as_str()
            .unwrap()
            .contains("NOT_BOUND"),
        "{steal}"
    );
    let want: HashMap<String, (String, String)> = ledger(&a)
        .into_iter()
        .chain(ledger(&b))
        .filter(|(_, r)| r["meter"] == "cpu")
        .map(|(sn, r)| {
            (
                sn,
                (
                    r["instance_id"].as_str().unwrap().to_string(),
                    r["usage_value"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    assert_eq!(want.len(), 3);
    wait_for("the upstream to get every record", 30, || up.unique() == 3);
    let got = up.records();
    for (sn, (inst, value)) in &want {
        let (r, n) = &got[sn];
        assert_eq!(*n, 1, "{sn} sent {n} times");
        assert_eq!(r["instance_id"], json!(inst));
        assert_eq!(r["usage_value"], json!(value));
    }
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    assert!(!got.values().any(|(r, _)| r["usage_value"] == "99"));
    // The devices learn the outcome.
    wait_for("the agents to learn the records were delivered", 30, || {
        let (sa, sb) = (states(&a), states(&b));
        sa.values().filter(|s| *s == "delivered").count() == 2
            && sb.values().all(|s| s == "delivered")
    });
    assert_eq!(up.unique(), 3);
    // The interconnection key is never on the devices and never in the server's log.
    let log = server.log();
    assert!(!log.contains(KEY), "the key is in the server log");
    for ag in [&a, &b] {
        assert!(!ag.log().contains(KEY));
    }
}

#[test]
fn direct_mode_is_warned_about_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("usage.key");
    crate::seller_server::write_private(&key, "k\n");
    let mut a = TestAgent::prepare(&format!(
        "[usage]\nkey_file = {:?}\n",
        key.display().to_string()
    ));
    let out = a.cli(&["config", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(
        err.contains("WARNING") && err.contains("DIRECT MODE") && err.contains("relay"),
        "{err}"
    );
    a.spawn(&[]);
    a.call("device.code", json!({})).unwrap();
    let st = a.call("usage.status", json!({})).unwrap();
    assert_eq!(st["uploading"]["mode"], "direct", "{st}");
    assert!(st["uploading"]["warning"]
        .as_str()
        .unwrap()
        .contains("DIRECT MODE"));
    wait_for("the start-up warning", 10, || {
        a.log().contains("DIRECT MODE")
    });
    // A relay URL makes relay the default, the key file unused (and said so).
    let mut r = TestAgent::prepare(&format!(
        "[usage]\nkey_file = {:?}\n[authcode]\nrelay_url = \"https://seller.example\"\n",
        key.display().to_string()
    ));
    let out = String::from_utf8(r.cli(&["config", "check"]).stdout).unwrap();
    assert!(
        out.contains("usage: relay mode through the seller's server https://seller.example"),
        "{out}"
    );
    r.spawn(&[]);
    wait_for("the unused key warning", 10, || {
        r.log()
            .contains("usage.key_file is set but unused in relay mode")
    });
}

/// A port nothing listens on (the primary host "down").
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("https://localhost:{port}")
}

#[test]
fn marketplace_faults_fallback_and_parking_reach_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let server = SellerServer::start(&server_usage(&[dead_url(), up.url()], &ca, ""));
    let a = relay_agent(&server, "default", &[("cpu", "RA2-F-A")]);
    let b = relay_agent(&server, "other", &[("rej", "RA2-F-REJ")]);
    order(&server, "RA2-F-A", &code(&a));
    order(&server, "RA2-F-REJ", &code(&b));
    register(&server, &a, "RA2-F-A");
    register(&server, &b, "RA2-F-REJ");
    // 500 twice, then 413 above two records, the primary host down throughout.
    up.set(|f| {
        f.status = Some((500, 2));
        f.max_records = Some(2);
    });
    let t = now();
    for h in 3..8 {
        record(&a, "cpu", &format!("{h}.5"), t - h * HOUR);
    }
    let f = flush(&a);
    assert_eq!(f["not_sent_because"], Value::Null, "{f}");
    wait_for(
        "five records delivered through the fallback host",
        30,
        || up.unique() == 5,
    );
    // Then 429 once, and the marketplace refuses one instance's record (400): parked on
    // the server with the reason, and the device learns it.
    up.set(|f| {
        f.status = Some((429, 1));
        f.reject_instance = Some("RA2-F-REJ".into());
    });
    record(&b, "rej", "1", t - 2 * HOUR);
    let f = flush(&b);
    assert_eq!(f["not_sent_because"], Value::Null, "{f}");
    wait_for("the device to learn every outcome", 30, || {
        states(&a).values().filter(|s| *s == "delivered").count() == 5
            && states(&b).values().all(|s| s == "parked")
    });
    let rej = ledger(&b)
        .into_values()
        .find(|r| r["meter"] == "rej")
        .unwrap();
    let reason = rej["delivery"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("parked by the seller's relay") && reason.contains("92020002"),
        "{reason}"
    );
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    assert!(up.records().values().all(|(_, n)| *n == 1));
    let statuses: Vec<u16> = up.requests().iter().map(|r| r.status).collect();
    for s in [500, 413, 429, 400, 200] {
        assert!(statuses.contains(&s), "{s} not seen: {statuses:?}");
    }
}

/// kill -9 of the agent and of the server at moments spread over a delivery (bounded):
/// every acknowledged record reaches the marketplace, each under one metering_sn with
/// its value, none lost.
#[test]
fn kill_9_of_either_side_loses_nothing_and_bills_nothing_twice() {
    for storage in storages() {
        kill_loop(&storage);
    }
}

fn kill_loop(storage: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let mut server = SellerServer::start(&format!(
        "{storage}{}",
        server_usage(&[up.url()], &ca, "batch_size = 2\n")
    ));
    let mut a = relay_agent(&server, "default", &[("cpu", "RA2-K-A")]);
    let c = code(&a);
    order(&server, "RA2-K-A", &c);
    register(&server, &a, "RA2-K-A");
    // Each upload waits, so kills land mid-delivery; some answers are lost after storing.
    up.set(|f| {
        f.slow = Duration::from_millis(150);
        f.slow_count = 1000;
        f.reset_after = 2;
    });
    let t = now();
    let mut expect: HashMap<i64, String> = HashMap::new();
    for h in 2..22 {
        let v = format!("{h}.25");
        record(&a, "cpu", &v, t - h * HOUR);
        expect.insert(kooagent::usage::hours::hour_of(t - h * HOUR), v);
    }
    // The agent sends one batch of 2 per request.
    let cfg = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(
        &a.config,
        cfg.replace("[usage]\n", "[usage]\nbatch_size = 2\n"),
    )
    .unwrap();
    for round in 0..6u64 {
        // Flush in the background (it may die with the agent) and kill someone mid-way.
        let sock = a.socket.clone();
        let bg = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(|| {
                crate::harness::Conn::open(&sock).call("usage.flush", json!({}))
            });
        });
        std::thread::sleep(Duration::from_millis(100 + 70 * round));
        if round % 2 == 0 {
            a.kill9();
            let _ = bg.join();
            a.spawn(&[]);
        } else {
            server.kill9_and_restart();
            let _ = bg.join();
        }
    }
    up.set(|f| f.slow_count = 0);
    wait_for("every record at the marketplace", 60, || {
        let _ = a.call("usage.flush", json!({}));
        up.unique() == expect.len()
    });
    wait_for("the device to learn every record was delivered", 30, || {
        states(&a).values().all(|s| s == "delivered")
    });
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    let got = up.records();
    assert_eq!(got.len(), expect.len());
    let mut hours: Vec<i64> = Vec::new();
    for (r, _) in got.values() {
        let begin = kooagent::clock::parse_compact(r["begin_time"].as_str().unwrap()).unwrap();
        assert_eq!(r["usage_value"], json!(expect[&begin]), "{r}");
        hours.push(begin);
    }
    hours.sort();
    hours.dedup();
    assert_eq!(hours.len(), expect.len(), "one record per hour");
    assert_eq!(ledger(&a).len(), expect.len());
}

/// A device key's usage rate is one bucket in the database, not one per process: two
/// `seller serve` processes on one database (the same SQLite file; PostgreSQL when
/// KOOAGENT_TEST_PG_URL is set), requests alternating between them, refuse the request
/// after the burst whichever process gets it, and store nothing of it.
#[test]
fn the_device_rate_limit_holds_across_two_server_processes() {
    for storage in storages() {
        rate_across_processes(&storage);
    }
}

fn rate_across_processes(storage: &str) {
    use kooagent::usage::relay::{codes, Request, WireRecord, PATH};
    const BURST: usize = 4;
    // One token a minute after the burst: the test's few seconds refill nothing.
    let cfg = format!(
        "{storage}[seller_server.usage]\nupstreams = [{:?}]\nbackoff_initial_ms = 600000\n\
         backoff_max_ms = 600000\ndevice_rate_per_sec = 0.01\ndevice_burst = {BURST}\n",
        dead_url()
    );
    let a = SellerServer::start(&cfg);
    let b = a.replica_sharing_state();
    // A device code (its last character is a check) and its key, bound the way an
    // agent's license fetch binds it.
    let code = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        .chars()
        .map(|c| format!("RATE-LIMT-ACRS-PROC-ESS{c}"))
        .find(|c| kooagent::device_code::parse_code(c).is_ok())
        .unwrap();
    order(&a, "RA2-R-A", &code);
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let target = format!("/v1/licenses/kg-RA2-R-A?device_code={code}");
    let (status, _, body) = b.device_get(&key, &target);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let hour = now() / HOUR * HOUR - HOUR;
    let send = |server: &SellerServer, n: usize| {
        let body = serde_json::to_vec(&Request {
            records: vec![WireRecord {
                metering_sn: format!("rate-{n}"),
                instance_id: "RA2-R-A".into(),
                meter: "cpu".into(),
                begin_time: kooagent::clock::format_compact(hour),
                end_time: kooagent::clock::format_compact(hour + HOUR),
                record_time: kooagent::clock::format_compact(now()),
                usage_value: "1".into(),
                relate_pkg_instance: None,
            }],
        })
        .unwrap();
        let h = crate::seller_server::device_headers(
            &key,
            "POST",
            PATH,
            &body,
            crate::seller_server::now_ms(),
            &crate::seller_server::random_nonce(),
        );
        let (status, headers, body) = server.request_with("POST", PATH, &h, &body);
        let v: Value = serde_json::from_slice(&body).unwrap();
        (status, headers, v)
    };
    for n in 0..BURST {
        let server = if n % 2 == 0 { &a } else { &b };
        let (status, _, v) = send(server, n);
        assert_eq!(status, 200, "request {n}: {v}");
        assert_eq!(v["results"][0]["state"], "pending", "request {n}: {v}");
    }
    // Each process has served only half the burst: a per-process bucket would still
    // let these through.
    for (n, server) in [(BURST, &a), (BURST + 1, &b)] {
        let (status, headers, v) = send(server, n);
        assert_eq!(status, 429, "request {n}: {v}");
        assert_eq!(v["error_code"], codes::RATE_LIMITED, "{v}");
        assert!(
            headers.iter().any(|(k, v)| k == "retry-after" && v == "60"),
            "{headers:?}"
        );
    }
    let held = |db: &std::path::Path| -> Vec<String> {
        let c = rusqlite::Connection::open(db).unwrap();
        let mut s = c
            .prepare("SELECT metering_sn FROM usage_outbox ORDER BY metering_sn")
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    if storage.is_empty() {
        let want: Vec<String> = (0..BURST).map(|n| format!("rate-{n}")).collect();
        assert_eq!(held(&a.dir.path().join("state/seller.db")), want);
    }
}
