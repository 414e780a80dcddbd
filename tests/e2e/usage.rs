//! Usage metering end to end: recording over the socket, the ledger across kill -9 and a
//! full disk, hourly records delivered to a checking HTTPS upstream exactly once per
//! metering_sn, fallback host, retries, 413 splitting, parking.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::harness::TestAgent;
use crate::upstream::{TestCa, Upstream};

const KEY: &str = "test-interconnection-key-7f3a";
const HOUR: i64 = 3600;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn write_key(dir: &Path, mode: u32) -> PathBuf {
    let p = dir.join("usage.key");
    std::fs::write(&p, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// `[usage]` for a test: the given upstreams, the test CA, fast retries, no lateness.
fn usage_toml(upstreams: &[String], key: Option<&Path>, ca: Option<&Path>, extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    let timeout = if extra.contains("upload_timeout_secs") {
        ""
    } else {
        "upload_timeout_secs = 5\n"
    };
    let mut t = format!(
        "[usage]\nupstreams = [{}]\nlateness_secs = 0\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\n\
         {timeout}{extra}\n",
        ups.join(", ")
    );
    if let Some(k) = key {
        t.push_str(&format!("key_file = {:?}\n", k.display().to_string()));
    }
    if let Some(c) = ca {
        t.push_str(&format!("extra_ca_file = {:?}\n", c.display().to_string()));
    }
    t.push_str(
        "[usage.meters.cpu]\ninstance_id = \"inst-cpu\"\n\
         [usage.meters.mem]\ninstance_id = \"inst-mem\"\npackage_instance_id = \"pkg-mem\"\n\
         [usage.meters.bad]\ninstance_id = \"inst-refused\"\n",
    );
    t
}

/// An agent whose config dir also holds the key and the CA, started against `upstreams`
/// (a closure, since the URLs may need the directory first).
fn agent_with(upstreams: &[String], ca: &TestCa, key_mode: u32, extra: &str) -> TestAgent {
    let mut a = TestAgent::prepare("");
    let key = write_key(a.dir.path(), key_mode);
    let cfg = crate::harness::base_config(
        a.dir.path(),
        &usage_toml(upstreams, Some(&key), Some(&ca.pem_path), extra),
    );
    std::fs::write(&a.config, cfg).unwrap();
    a.spawn(&[]);
    // Hours close only once the device identity (part of every metering_sn) is known: on
    // a loaded machine that can take a moment after start.
    a.call("device.code", json!({})).unwrap();
    a
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(a: &TestAgent) -> Value {
    a.call("usage.status", json!({"records": true})).unwrap()
}

fn record(a: &TestAgent, meter: &str, value: &str, at: i64) -> Value {
    a.call(
        "usage.record",
        json!({"meter": meter, "value": value, "at": at}),
    )
    .unwrap_or_else(|e| panic!("record {meter} {value} at {at}: {e}"))
}

fn hour_start(rfc: &str) -> i64 {
    kooagent::clock::parse_rfc3339(rfc).unwrap()
}

/// Expected hourly totals (in 10^-9 units) per (meter, hour start) from what the agent
/// said about each record.
type Expected = BTreeMap<(String, i64), i128>;

fn units(v: &str) -> i128 {
    kooagent::usage::decimal::parse(v).unwrap().0
}

fn add(exp: &mut Expected, meter: &str, answer: &Value, value: &str) {
    let h = hour_start(answer["hour"].as_str().unwrap());
    *exp.entry((meter.to_string(), h)).or_default() += units(value);
}

fn instance_of(meter: &str) -> &'static str {
    match meter {
        "cpu" => "inst-cpu",
        "mem" => "inst-mem",
        _ => "inst-refused",
    }
}

#[test]
fn usage_is_aggregated_signed_and_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let mut a = agent_with(&[up.url()], &ca, 0o600, "");
    let t = now();
    let mut exp = Expected::new();
    for (meter, value, at) in [
        ("cpu", "0.5", t - 3 * HOUR),
        ("cpu", "0.5", t - 3 * HOUR + 1),
        ("cpu", "0.50003", t - 3 * HOUR + 2),
        ("mem", "2.25", t - 2 * HOUR),
        ("cpu", "7", t),
    ] {
        let r = record(&a, meter, value, at);
        add(&mut exp, meter, &r, value);
    }
    // The batch form, numbers included.
    let r = a
        .call(
            "usage.record_batch",
            json!({"records": [
                {"meter": "mem", "value": 0.75, "at": t - 2 * HOUR},
                {"meter": "mem", "value": "1", "at": kooagent::clock::format_rfc3339(t - 2 * HOUR)},
            ]}),
        )
        .unwrap();
    assert_eq!(r["recorded"], json!(2));
    let moved = r["moved"].as_u64().unwrap();
    let h = if moved == 0 {
        kooagent::usage::hours::hour_of(t - 2 * HOUR)
    } else {
        kooagent::usage::hours::hour_of(t)
    };
    *exp.entry(("mem".into(), h)).or_default() += units("1.75");

    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(f["not_sent_because"].is_null(), "{f}");
    let st = status(&a);
    let closed_before = hour_start(st["closed_before"].as_str().unwrap());
    // What the upstream holds is exactly the closed hours' totals, cut to 4 decimals.
    let got: BTreeMap<(String, i64), (String, Value)> = up
        .records()
        .into_values()
        .map(|(r, n)| {
            assert_eq!(n, 1, "sent once: {r}");
            let b = r["begin_time"].as_str().unwrap().to_string();
            let begin = kooagent::clock::parse_compact(&b).unwrap();
            let meter = if r["instance_id"] == json!("inst-cpu") {
                "cpu"
            } else {
                "mem"
            };
            (
                (meter.to_string(), begin),
                (r["usage_value"].as_str().unwrap().to_string(), r),
            )
        })
        .collect();
    let closed: Vec<_> = exp
        .iter()
        .filter(|((_, h), _)| *h < closed_before)
        .collect();
    assert_eq!(got.len(), closed.len(), "{got:?} vs {closed:?}");
    for ((meter, h), v) in closed {
        let (val, rec) = &got[&(meter.clone(), *h)];
        let (wire, _) = kooagent::usage::decimal::Amount(*v).split_wire();
        assert_eq!(val, &wire.to_wire(), "{meter} at {h}");
        assert_eq!(rec["instance_id"], json!(instance_of(meter)));
        if meter == "mem" {
            assert_eq!(rec["relate_pkg_instance"], json!("pkg-mem"));
        } else {
            assert!(rec.get("relate_pkg_instance").is_none());
        }
    }
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    // The 0.00003 of cpu is carried, not lost.
    if exp
        .keys()
        .any(|(m, h)| m == "cpu" && *h == kooagent::usage::hours::hour_of(t - 3 * HOUR))
    {
        assert!(
            st["carry"].to_string().contains("0.00003"),
            "{}",
            st["carry"]
        );
    }
    // What the agent keeps is what was sent: same sn, same payload.
    for r in st["records"].as_array().unwrap() {
        let sn = r["metering_sn"].as_str().unwrap();
        let (sent, _) = &up.records()[sn];
        for k in [
            "begin_time",
            "end_time",
            "record_time",
            "usage_value",
            "instance_id",
        ] {
            assert_eq!(sent[k], r[k], "{k}");
        }
        assert_eq!(r["delivery"]["state"], json!("delivered"));
        assert_eq!(r["delivery"]["upstream"], json!(up.url()));
    }

    // Again, and after a restart: nothing is sent twice.
    let requests = up.requests().len();
    a.call("usage.flush", json!({})).unwrap();
    a.stop();
    a.spawn(&[]);
    let f = a.call("usage.flush", json!({})).unwrap();
    assert_eq!(f["round"]["delivered"], json!(0), "{f}");
    assert_eq!(up.requests().len(), requests);
    assert!(up.records().values().all(|(_, n)| *n == 1));
    let st = status(&a);
    assert_eq!(st["totals"]["cpu"]["records"], json!(4));
    assert_eq!(st["totals"]["mem"]["value"], json!("4"));

    // The CLI's view.
    let out = a.cli(&["usage", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("uploading:  on") && text.contains("delivered:"),
        "{text}"
    );
    let out = a.cli(&["usage", "record", "cpu", "0.25"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = a.cli(&["usage", "flush"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The key never shows: not in the log, not in config show.
    let shown = String::from_utf8_lossy(&a.cli(&["config", "show"]).stdout).into_owned();
    assert!(
        shown.contains("usage.key_file") && !shown.contains(KEY),
        "{shown}"
    );
    assert!(!a.log().contains(KEY));
}

#[test]
fn refusals_are_parked_with_the_reason_and_not_retried_until_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    up.set(|f| f.reject_instance = Some("inst-refused".into()));
    let a = agent_with(&[up.url()], &ca, 0o600, "");
    let r = record(&a, "bad", "3", now() - 2 * HOUR);
    let f = a.call("usage.flush", json!({})).unwrap();
    let hour_closed = r["moved"] == json!(false);
    if !hour_closed {
        return; // an hour boundary passed between start and record; nothing to check here
    }
    assert_eq!(f["round"]["parked"], json!(1), "{f}");
    let st = status(&a);
    assert_eq!(st["parked"]["records"], json!(1));
    let reason = st["parked"]["list"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("inst-refused"),
        "{reason}"
    );
    let out = a.cli(&["usage", "status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("invalid param"));
    // Not retried by later flushes.
    let n = up.requests().len();
    a.call("usage.flush", json!({})).unwrap();
    assert_eq!(up.requests().len(), n);
    // Fixed upstream side; asked to retry: delivered.
    up.set(|f| f.reject_instance = None);
    let f = a
        .call("usage.flush", json!({"retry_parked": true}))
        .unwrap();
    assert_eq!(f["requeued"], json!(1), "{f}");
    assert_eq!(f["round"]["delivered"], json!(1), "{f}");
    assert_eq!(up.unique(), 1);
    assert!(up.violations().is_empty(), "{:?}", up.violations());
}

#[test]
fn transient_failures_back_off_and_413_splits_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    up.set(|f| {
        f.status = Some((503, 2));
        f.max_records = Some(2);
    });
    let a = agent_with(&[up.url()], &ca, 0o600, "");
    let t = now();
    for i in 2..8 {
        record(&a, "cpu", "1", t - i * HOUR);
    }
    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(
        f["not_sent_because"].as_str().unwrap_or("").contains("503"),
        "{f}"
    );
    let closed = f["closed_records"].as_u64().unwrap() as usize;
    // The upload thread retries on its own after the backoff.
    wait_for("all records delivered", || up.unique() == closed);
    wait_for("status settled", || {
        status(&a)["pending"]["records"] == json!(0)
    });
    let reqs = up.requests();
    assert!(reqs.iter().any(|r| r.status == 413), "a 413 was answered");
    assert!(reqs
        .iter()
        .filter(|r| r.status == 200)
        .all(|r| r.records.len() <= 2));
    assert!(up.records().values().all(|(_, n)| *n == 1));
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    let st = status(&a);
    assert_eq!(st["upload"]["consecutive_failures"], json!(0));
}

#[test]
fn the_fallback_host_is_used_when_the_first_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let mut primary = Upstream::start(&ca, KEY);
    let secondary = Upstream::start(&ca, KEY);
    primary.shutdown();
    let a = agent_with(&[primary.url(), secondary.url()], &ca, 0o600, "");
    record(&a, "cpu", "5", now() - 2 * HOUR);
    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(f["not_sent_because"].is_null(), "{f}");
    assert_eq!(
        secondary.unique(),
        f["closed_records"].as_u64().unwrap() as usize
    );
    let st = status(&a);
    assert_eq!(st["delivered"]["last_upstream"], json!(secondary.url()));
    assert!(secondary.violations().is_empty());
}

#[test]
fn after_a_long_outage_everything_is_delivered_oldest_first_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let mut up = Upstream::start(&ca, KEY);
    let port = up.port;
    up.shutdown();
    // Two days of hourly usage for two meters, while the upstream is unreachable.
    let a = agent_with(
        &[format!("https://localhost:{port}")],
        &ca,
        0o600,
        "batch_size = 10\nupload_timeout_secs = 1",
    );
    let t = now();
    let mut batch = Vec::new();
    for i in 2..50 {
        batch.push(json!({"meter": "cpu", "value": "1.5", "at": t - i * HOUR}));
        batch.push(json!({"meter": "mem", "value": "0.0001", "at": t - i * HOUR}));
    }
    a.call("usage.record_batch", json!({"records": batch}))
        .unwrap();
    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(
        f["not_sent_because"]
            .as_str()
            .unwrap_or("")
            .contains("no upstream reachable"),
        "{f}"
    );
    let closed = f["closed_records"].as_u64().unwrap() as usize;
    wait_for("several retries", || {
        status(&a)["upload"]["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    // The upstream comes back on the same port, flaky at first: resets before and after
    // storing, a 500, an answer slower than the agent waits (stored all the same).
    let listener_up = Upstream::start_on(&ca, KEY, port);
    listener_up.set(|f| {
        f.reset_before = 1;
        f.reset_after = 1;
        f.status = Some((500, 1));
        f.slow = Duration::from_millis(2500);
        f.slow_count = 1;
    });
    wait_for("everything delivered", || listener_up.unique() == closed);
    wait_for("no pending", || {
        status(&a)["pending"]["records"] == json!(0)
    });
    assert!(
        listener_up.violations().is_empty(),
        "{:?}",
        listener_up.violations()
    );
    // Oldest first: hours arrive in order.
    let recs = listener_up.records();
    let begins: Vec<String> = listener_up
        .order()
        .iter()
        .map(|sn| recs[sn].0["begin_time"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = begins.clone();
    sorted.sort();
    assert_eq!(begins, sorted);
    // A record the upstream stored but whose answer was lost came again, identical (the
    // upstream checks the payload); nothing else was received twice.
    let twice = recs.values().filter(|(_, n)| *n > 1).count();
    assert!((1..=20).contains(&twice), "{twice}");
}

#[test]
fn a_kill_during_recording_loses_nothing_acknowledged_and_a_torn_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let mut a = agent_with(&[up.url()], &ca, 0o600, "");
    let at = now() - 2 * HOUR;
    let acked = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..16 {
        let (socket, acked, sent, stop) =
            (a.socket.clone(), acked.clone(), sent.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = crate::harness::Conn::open(&socket);
            while !stop.load(Ordering::SeqCst) {
                sent.fetch_add(1, Ordering::SeqCst);
                let line = format!(
                    "{{\"v\":1,\"id\":1,\"op\":\"usage.record\",\"params\":{{\"meter\":\"cpu\",\"value\":\"0.5\",\"at\":{at}}}}}\n"
                );
                if std::io::Write::write_all(&mut c.writer, line.as_bytes()).is_err() {
                    return;
                }
                let mut resp = String::new();
                match std::io::BufRead::read_line(&mut c.reader, &mut resp) {
                    Ok(n) if n > 0 && resp.contains("\"ok\":true") => {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    wait_for("some records acknowledged", || {
        acked.load(Ordering::SeqCst) >= 500
    });
    a.kill9();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let (acked, sent) = (acked.load(Ordering::SeqCst), sent.load(Ordering::SeqCst));
    a.spawn(&[]);
    let st = status(&a);
    let got = st["totals"]["cpu"]["records"].as_u64().unwrap();
    assert!(
        got >= acked && got <= sent,
        "acked {acked}, sent {sent}, ledger {got}"
    );

    // A write torn by a crash: garbage after the last entry.
    a.stop();
    let seg = std::fs::read_dir(a.state.join("usage"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, b"\x40\x00\x00\x00garbage-of-a-torn-write").unwrap();
    drop(f);
    a.spawn(&[]);
    let st = status(&a);
    assert_eq!(st["ledger"]["recovery"]["torn_bytes"], json!(27));
    assert_eq!(st["totals"]["cpu"]["records"].as_u64().unwrap(), got);
    let text = String::from_utf8_lossy(&a.cli(&["usage", "status"]).stdout).into_owned();
    assert!(text.contains("torn write"), "{text}");
    // And the upstream gets exactly what the ledger holds for that hour.
    let f = a.call("usage.flush", json!({})).unwrap();
    if f["closed_records"].as_u64().unwrap_or(0) > 0 || up.unique() > 0 {
        let total: i128 = up
            .records()
            .values()
            .map(|(r, _)| units(r["usage_value"].as_str().unwrap()))
            .sum();
        assert_eq!(total, got as i128 * units("0.5"));
    }
}

#[test]
fn bad_records_are_refused_with_clear_errors() {
    let a = TestAgent::start(&usage_toml(&["https://localhost:1".into()], None, None, ""));
    let t = now();
    let cases = [
        (
            json!({"meter": "cpu", "value": "-1"}),
            "invalid_value",
            "negative",
        ),
        (
            json!({"meter": "cpu", "value": "0"}),
            "invalid_value",
            "zero",
        ),
        (
            json!({"meter": "cpu", "value": "NaN"}),
            "invalid_value",
            "not a number",
        ),
        (
            json!({"meter": "cpu", "value": "1e3"}),
            "invalid_value",
            "exponent",
        ),
        (
            json!({"meter": "cpu", "value": "0.0000000001"}),
            "invalid_value",
            "digits after",
        ),
        (
            json!({"meter": "cpu", "value": "100000000"}),
            "invalid_value",
            "maximum",
        ),
        (
            json!({"meter": "cpu", "value": true}),
            "invalid_value",
            "not a number",
        ),
        (
            json!({"meter": "gpu", "value": "1"}),
            "unknown_meter",
            "gpu",
        ),
        (
            json!({"meter": "cpu", "value": "1", "at": t + 3600}),
            "invalid_time",
            "future",
        ),
        (
            json!({"meter": "cpu", "value": "1", "at": t - 40 * 86400}),
            "invalid_time",
            "max_age_days",
        ),
        (
            json!({"meter": "cpu", "value": "1", "at": "noon"}),
            "invalid_time",
            "RFC 3339",
        ),
        (
            json!({"meter": "cpu", "value": "1", "extra": 1}),
            "invalid_params",
            "extra",
        ),
    ];
    for (params, code, text) in cases {
        let e = a.call("usage.record", params.clone()).unwrap_err();
        assert_eq!(e["code"], json!(code), "{params}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(text),
            "{params}: {e}"
        );
    }
    // A batch is all or nothing, and the error names the record.
    let e = a
        .call(
            "usage.record_batch",
            json!({"records": [{"meter": "cpu", "value": "1"}, {"meter": "cpu", "value": "-2"}]}),
        )
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("records[1]"), "{e}");
    let st = status(&a);
    assert!(st["totals"].as_object().unwrap().is_empty(), "{st}");
    // Without a key file nothing is uploaded, and status says why.
    assert_eq!(st["uploading"]["enabled"], json!(false));
    assert!(st["uploading"]["reason"]
        .as_str()
        .unwrap()
        .contains("usage.key_file"));
}

/// Pipelined `usage.record` calls on one connection are committed as one group (one
/// fsync, not one each), yet each is answered on its own, in order, with its own id: a bad
/// call in the middle gets its own error and the others are recorded; the request of
/// another operation after them sees them all.
#[test]
fn a_pipelined_burst_is_one_commit_answered_in_order() {
    let a = TestAgent::start(&usage_toml(&["https://localhost:1".into()], None, None, ""));
    let commits = |a: &TestAgent| status(a)["ledger"]["commits"].as_u64().unwrap();
    let before = commits(&a);
    let mut burst = Vec::new();
    let mut expect = Vec::new();
    for i in 0..32 {
        let (params, want) = match i {
            9 => (json!({"meter": "cpu", "value": "-1"}), Err("invalid_value")),
            17 => (json!({"meter": "gpu", "value": "1"}), Err("unknown_meter")),
            23 => (
                json!({"meter": "cpu", "value": "1", "x": 1}),
                Err("invalid_params"),
            ),
            _ => (json!({"meter": "cpu", "value": "0.5"}), Ok(())),
        };
        let id = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("r{i}"))
        };
        let line = json!({"v": 1, "id": id, "op": "usage.record", "params": params});
        burst.extend_from_slice(format!("{line}\n").as_bytes());
        expect.push((id, want));
        if i == 12 {
            // A line that is not JSON, in the middle: its own parse error, nothing else.
            burst.extend_from_slice(b"{not json\n");
            expect.push((Value::Null, Err("parse_error")));
        }
    }
    burst.extend_from_slice(b"{\"v\":1,\"id\":\"after\",\"op\":\"usage.status\"}\n");
    let mut c = a.connect();
    c.send_raw(&burst);
    for (id, want) in &expect {
        let v = c.read_json();
        assert_eq!(&v["id"], id, "answer out of order: {v}");
        match want {
            Ok(()) => {
                assert_eq!(v["ok"], json!(true), "{v}");
                assert!(v["result"]["hour"].is_string(), "{v}");
            }
            Err(code) => assert_eq!(v["error"]["code"], json!(code), "{v}"),
        }
    }
    let after = c.read_json();
    assert_eq!(after["id"], json!("after"), "{after}");
    assert_eq!(
        after["result"]["totals"]["cpu"]["records"],
        json!(29),
        "{after}"
    );
    assert_eq!(
        after["result"]["totals"]["cpu"]["value"],
        json!("14.5"),
        "{after}"
    );
    // 29 durable records: one commit when the burst arrives at once, a few if it is
    // split across reads; one per record without grouping.
    let n = commits(&a) - before;
    assert!(n <= 3, "{n} ledger commits for one pipelined burst");
}

#[test]
fn a_key_file_others_can_read_is_refused_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let a = agent_with(&[up.url()], &ca, 0o644, "");
    let st = status(&a);
    assert_eq!(st["uploading"]["enabled"], json!(false));
    let reason = st["uploading"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("chmod 600") && !reason.contains(KEY),
        "{reason}"
    );
    record(&a, "cpu", "1", now() - 2 * HOUR);
    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(
        f["not_sent_because"]
            .as_str()
            .unwrap()
            .contains("usage.key_file"),
        "{f}"
    );
    assert_eq!(up.requests().len(), 0);
    // Fixed: the next flush sends.
    std::fs::set_permissions(
        a.dir.path().join("usage.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let f = a.call("usage.flush", json!({})).unwrap();
    assert!(f["not_sent_because"].is_null(), "{f}");
    assert!(!a.log().contains(KEY));
}

/// A small tmpfs for the state directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_refuses_records_and_corrupts_nothing() {
    let mut a = TestAgent::prepare("");
    let fs = match Tmpfs::mount(&a.state, "2m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED a_full_disk_refuses_records_and_corrupts_nothing: cannot mount a tmpfs ({e})");
            return;
        }
    };
    std::fs::write(
        &a.config,
        crate::harness::base_config(
            a.dir.path(),
            &usage_toml(&["https://localhost:1".into()], None, None, ""),
        ),
    )
    .unwrap();
    a.spawn(&[]);
    let t = now();
    for _ in 0..10 {
        record(&a, "cpu", "1", t);
    }
    // Fill the filesystem.
    let filler = fs.0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        let small = [0u8; 512];
        while std::io::Write::write_all(&mut f, &small).is_ok() {}
        while std::io::Write::write_all(&mut f, &small[..1]).is_ok() {}
    }
    // The last page of the ledger file may still take a few records; then the disk is
    // full for it too.
    let mut ok = 10;
    let mut refused = 0;
    for _ in 0..100_000 {
        match a.call(
            "usage.record",
            json!({"meter": "cpu", "value": "1", "at": t}),
        ) {
            Ok(_) if refused == 0 => ok += 1,
            Ok(_) => panic!("recorded on a full disk after refusing"),
            Err(e) => {
                assert_eq!(e["code"], json!("disk_full"), "{e}");
                assert!(e["message"].as_str().unwrap().contains("full"), "{e}");
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 5, "the full disk was never noticed");
    let st = status(&a);
    assert!(
        st["ledger"]["last_write_error"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{st}"
    );
    assert_eq!(st["totals"]["cpu"]["records"], json!(ok));
    // Space again: recording works, and a restart finds everything.
    std::fs::remove_file(&filler).unwrap();
    record(&a, "cpu", "1", t);
    a.stop();
    a.spawn(&[]);
    let st = status(&a);
    assert_eq!(st["totals"]["cpu"]["records"], json!(ok + 1));
    assert_eq!(st["totals"]["cpu"]["value"], json!((ok + 1).to_string()));
    assert_eq!(st["ledger"]["recovery"]["torn_bytes"], json!(0));
    a.stop();
    drop(fs);
}

#[test]
fn an_upstream_date_ahead_of_the_clock_reveals_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    // The upstream's certificate-checked clock says it is three days later than ours.
    let later = now() + 3 * 86_400;
    let c = kooagent::clock::Civil::from_unix(later);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let date = format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(later.div_euclid(86_400).rem_euclid(7)) as usize],
        c.day,
        MONTHS[c.month as usize - 1],
        c.year,
        c.hour,
        c.minute,
        c.second
    );
    up.set(|f| f.date = Some(date));
    let a = agent_with(&[up.url()], &ca, 0o600, "");
    record(&a, "cpu", "1", now() - 7200);
    a.call("usage.flush", json!({})).unwrap();
    wait_for("the upstream Date to reach the trusted-time mark", || {
        let s = a.call("agent.status", json!({})).unwrap();
        s["license"]["clock_rollback"] == json!(true)
    });
    let s = a.call("agent.status", json!({})).unwrap();
    assert_eq!(
        s["license"]["trusted_time_source"],
        json!("upstream_date"),
        "{s}"
    );
}

/// The soak (`scripts/soak.sh`): `KOOAGENT_SOAK_CYCLES` kill -9 cycles (default 3) during
/// mixed ingest (single records and batches, two meters, 8 clients), then everything is
/// flushed to the upstream stand-in. Nothing acknowledged may be missing from the ledger,
/// the upstream must get exactly what the ledger holds, and a metering_sn received twice
/// must carry the same payload (the stand-in checks). Prints one summary line.
#[test]
fn soak_kill9_cycles_during_mixed_ingest_lose_nothing_acknowledged() {
    let cycles: u64 = std::env::var("KOOAGENT_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let mut a = agent_with(&[up.url()], &ca, 0o600, "");
    let at = now() - 2 * HOUR;
    let (half, quarter) = (units("0.5") as u64, units("0.25") as u64);
    // Units acknowledged and sent, per meter: [cpu, mem].
    let acked = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sent = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut kills = 0;
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let acks_now = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for client in 0..8u64 {
            let (socket, acked, sent, stop, acks_now) = (
                a.socket.clone(),
                acked.clone(),
                sent.clone(),
                stop.clone(),
                acks_now.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut c = crate::harness::Conn::open(&socket);
                let mut i = 0u64;
                // Two clients pipeline 8 records at a time (committed as one group).
                let depth = if client < 2 { 8 } else { 1 };
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    // cpu: one record of 0.5; mem: a batch of 5 × 0.25 every third request.
                    let (line, m, u) = if depth == 1 && (i + client).is_multiple_of(3) {
                        let one = format!(r#"{{"meter":"mem","value":"0.25","at":{at}}}"#);
                        let list = vec![one; 5].join(",");
                        (
                            format!(
                                "{{\"v\":1,\"id\":1,\"op\":\"usage.record_batch\",\"params\":{{\"records\":[{list}]}}}}\n"
                            ),
                            1,
                            5 * quarter,
                        )
                    } else {
                        (
                            format!(
                                "{{\"v\":1,\"id\":1,\"op\":\"usage.record\",\"params\":{{\"meter\":\"cpu\",\"value\":\"0.5\",\"at\":{at}}}}}\n"
                            ),
                            0,
                            half,
                        )
                    };
                    sent[m].fetch_add(u * depth, Ordering::SeqCst);
                    let burst = line.repeat(depth as usize);
                    if std::io::Write::write_all(&mut c.writer, burst.as_bytes()).is_err() {
                        return;
                    }
                    for _ in 0..depth {
                        let mut resp = String::new();
                        match std::io::BufRead::read_line(&mut c.reader, &mut resp) {
                            Ok(n) if n > 0 && resp.contains("\"ok\":true") => {
                                acked[m].fetch_add(u, Ordering::SeqCst);
                                acks_now.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => return,
                        }
                    }
                }
            }));
        }
        // Kill at a different point each cycle.
        let want = 50 + (cycle * 37) % 200;
        wait_for("records acknowledged", || {
            acks_now.load(Ordering::SeqCst) >= want
        });
        a.kill9();
        kills += 1;
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        a.spawn(&[]);
    }
    let st = status(&a);
    let ledger = |m: &str| units(st["totals"][m]["value"].as_str().unwrap_or("0")) as u64;
    let (acked_cpu, acked_mem) = (
        acked[0].load(Ordering::SeqCst),
        acked[1].load(Ordering::SeqCst),
    );
    let (sent_cpu, sent_mem) = (
        sent[0].load(Ordering::SeqCst),
        sent[1].load(Ordering::SeqCst),
    );
    assert!(
        ledger("cpu") >= acked_cpu && ledger("cpu") <= sent_cpu,
        "cpu: acked {acked_cpu}, sent {sent_cpu}, ledger {}: {st}",
        ledger("cpu")
    );
    assert!(
        ledger("mem") >= acked_mem && ledger("mem") <= sent_mem,
        "mem: acked {acked_mem}, sent {sent_mem}, ledger {}: {st}",
        ledger("mem")
    );
    let flushed = a.call("usage.flush", json!({})).unwrap();
    let what = format!("the upstream got every closed hour (flush: {flushed})");
    wait_for(&what, || {
        let got: i128 = up
            .records()
            .values()
            .map(|(r, _)| units(r["usage_value"].as_str().unwrap()))
            .sum();
        got == (ledger("cpu") + ledger("mem")) as i128
    });
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    let dup = up.records().values().filter(|(_, n)| *n > 1).count();
    let v = |u: u64| u as f64 / units("1") as f64;
    println!(
        "soak: {kills} kill -9 cycles; usage acknowledged {}, sent {}, in the ledger {}; \
         delivered {} hourly records ({} metering_sn received more than once, same payload)",
        v(acked_cpu + acked_mem),
        v(sent_cpu + sent_mem),
        v(ledger("cpu") + ledger("mem")),
        up.unique(),
        dup
    );
}

/// First boot of a prepared image: usage is recorded and flushed while the machine-id is
/// still empty, so no hour can be closed (every metering_sn carries the device identity).
/// The flush says so, and once systemd fills the machine-id in, the hours are closed and
/// delivered by themselves, not an hour later at the next boundary.
#[test]
fn a_flush_before_the_identity_settles_is_carried_out_once_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let up = Upstream::start(&ca, KEY);
    let tree = dir.path().join("root");
    let put = |rel: &str, text: &str| {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    put("etc/machine-id", "");
    put(
        "sys/class/dmi/id/product_uuid",
        "6f1c2a0e-3b4d-4c5e-9f60-718293a4b5c6\n",
    );
    let mut a = TestAgent::prepare("");
    let key = write_key(a.dir.path(), 0o600);
    let extra = format!("[identity]\nroot = {:?}\n", tree.display().to_string());
    let usage = usage_toml(&[up.url()], Some(&key), Some(&ca.pem_path), "");
    let cfg = crate::harness::base_config(a.dir.path(), &format!("{usage}{extra}"));
    std::fs::write(&a.config, cfg).unwrap();
    a.spawn(&[]);
    let at = now() - 2 * HOUR;
    a.call(
        "usage.record",
        json!({"meter": "cpu", "value": "1.5", "at": at}),
    )
    .unwrap();
    let f = a.call("usage.flush", json!({})).unwrap();
    let why = f["not_sent_because"].as_str().unwrap_or_default();
    assert!(why.contains("settling"), "{f}");
    assert_eq!(up.unique(), 0, "nothing can be sent without the identity");
    put("etc/machine-id", "0123456789abcdef0123456789abcdef\n");
    wait_for(
        "the hour closed and delivered without a second flush",
        || {
            up.records()
                .values()
                .any(|(r, _)| r["usage_value"] == json!("1.5"))
        },
    );
    assert!(up.violations().is_empty(), "{:?}", up.violations());
}
