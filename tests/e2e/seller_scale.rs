//! Scale-out (issue 16): three `seller serve` processes on one PostgreSQL database, the
//! way a seller runs replicas behind a load balancer. Every order is answered `000000`,
//! exactly one license per order, the same bytes from every process; a replay is refused
//! by another process than the one that saw it first; a process killed with -9 mid-load
//! leaves the others answering and nothing half-written. Runs when KOOAGENT_TEST_PG_URL
//! is set (scripts/pg-test.sh); without PostgreSQL there is nothing to scale out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::seller_hardening::device_code;
use crate::seller_server::{digits14, market_time, now_ms, sign, SellerServer, KEY};

fn pg() -> Option<(String, String)> {
    let url = std::env::var("KOOAGENT_TEST_PG_URL").ok()?;
    if url.is_empty() {
        return None;
    }
    let schema = format!("scale_{}_{}", std::process::id(), now_ms());
    Some((url, schema))
}

/// The order for `instance`, the same body every time it is made (a resend).
fn order_body(instance: &str, code: &str) -> Value {
    static START: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let now = *START.get_or_init(|| now_ms() / 1000);
    json!({
        "activity": "getLicense", "instanceId": instance, "eventId": format!("ev-{instance}"),
        "effectiveTime": market_time(now - 60), "expireTime": digits14(now + 30 * 86_400),
        "deviceFingerprint": code, "testFlag": "1"
    })
}

/// The marketplace's call, or None when the process is not there (killed).
fn try_market(s: &SellerServer, body: &Value) -> Option<Value> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.market(body)));
    r.ok().map(|(_, v)| v)
}

/// (licenses per license id, instances without their license or event, events) in the
/// schema: what "nothing half-written" is checked against. An instance holds its license
/// itself or references it (`license_sha256`, the order path).
fn tally(url: &str, schema: &str) -> (BTreeMap<String, i64>, i64, i64) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("SET search_path TO {schema}"))
        .unwrap();
    let per: BTreeMap<String, i64> = c
        .query(
            "SELECT license_id, COUNT(*) FROM licenses GROUP BY license_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let orphans: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM instances i WHERE NOT EXISTS \
             (SELECT 1 FROM licenses l WHERE l.license_id = i.license_id \
              AND (l.text = i.license OR l.sha256 = i.license_sha256)) \
             OR NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = 'ev-' || i.instance_id)",
            &[],
        )
        .unwrap()
        .get(0);
    let events: i64 = c
        .query_one("SELECT COUNT(*) FROM events", &[])
        .unwrap()
        .get(0);
    (per, orphans, events)
}

#[test]
fn three_processes_on_one_postgresql_answer_every_order_once() {
    let Some((url, schema)) = pg() else {
        eprintln!("KOOAGENT_TEST_PG_URL not set (scripts/pg-test.sh): scale-out test skipped");
        return;
    };
    let storage = format!(
        "database_url = \"{url}\"\ndatabase_schema = \"{schema}\"\ndatabase_connections = 3\n\
         [seller_server.limits]\nmiss_per_key = {{ burst = 2, per_minute = 1 }}\n"
    );
    let first = SellerServer::start(&storage);
    let servers = Arc::new(vec![first.replica(), first.replica()]);
    let all = |i: usize| -> &SellerServer {
        if i == 0 {
            &first
        } else {
            &servers[i - 1]
        }
    };

    // (a) The same order to all three at once, 50 orders: one license each, same bytes.
    std::thread::scope(|sc| {
        for n in 0..50 {
            let code = device_code(&format!("SAME-0000-0000-0000-{n:03}"));
            let body = order_body(&format!("SAME-{n}"), &code);
            let answers: Vec<_> = (0..3)
                .map(|i| {
                    let (s, body) = (all(i), body.clone());
                    sc.spawn(move || s.market(&body))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            for (raw, v) in &answers {
                assert_eq!(v["resultCode"], "000000", "order {n}: {v}\n{}", first.log());
                assert_eq!(*raw, answers[0].0, "order {n}: different answers");
            }
        }
    });

    // (b) 1,000 distinct orders spread over the three, 12 at a time.
    let licenses = spread(12, 1000, |n| {
        let code = device_code(&format!("MANY-0000-0000-{n:04}-000"));
        let (_, v) = all(n % 3).market(&order_body(&format!("MANY-{n}"), &code));
        assert_eq!(v["resultCode"], "000000", "order {n}: {v}");
        v["license"].as_str().unwrap().to_string()
    });
    assert_eq!(licenses.len(), 1000);
    // Resent to another process: the same bytes.
    for (n, text) in licenses.iter().filter(|(n, _)| n % 97 == 0) {
        let code = device_code(&format!("MANY-0000-0000-{n:04}-000"));
        let (_, v) = all((n + 1) % 3).market(&order_body(&format!("MANY-{n}"), &code));
        assert_eq!(v["license"].as_str(), Some(text.as_str()), "order {n}");
    }
    let (per, orphans, _) = tally(&url, &schema);
    assert_eq!(per.len(), 1050, "one license id per order");
    assert!(per.values().all(|c| *c == 1), "a second license: {per:?}");
    assert_eq!(orphans, 0);

    // A nonce seen by one process is a replay to the others.
    let body = json!({"activity": "expireLicense", "instanceId": "nope"}).to_string();
    let ts = now_ms().to_string();
    let sig = sign(KEY, "scale-nonce", &ts, &body);
    let (_, v) = all(0).market_signed(&body, &ts, "scale-nonce", &sig);
    assert_eq!(v["resultCode"], "000003", "{v}");
    for i in [1, 2] {
        let (_, v) = all(i).market_signed(&body, &ts, "scale-nonce", &sig);
        assert_eq!(v["resultCode"], "000001", "process {i}: {v}");
    }
    // A device key's miss budget (2) is one across the processes.
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let answers: Vec<u16> = (0..4)
        .map(|i| {
            all(i % 3)
                .device_get(&key, &format!("/v1/licenses/kg-NONE-{i}"))
                .0
        })
        .collect();
    assert_eq!(answers, [404, 404, 429, 429]);

    // (c) kill -9 one process mid-load: the others answer everything, every order ends
    // with one license and nothing half-written.
    let killer = {
        let pid = first.child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
    };
    let answered: HashMap<usize, String> = spread(9, 300, |n| {
        let code = device_code(&format!("DEAD-0000-0000-{n:04}-000"));
        let body = order_body(&format!("DEAD-{n}"), &code);
        // The marketplace retries an order that got no answer elsewhere.
        let v = (0..3)
            .find_map(|k| try_market(all((n + k) % 3), &body))
            .unwrap_or_else(|| panic!("order {n}: no process answered"));
        assert_eq!(v["resultCode"], "000000", "order {n}: {v}");
        v["license"].as_str().unwrap().to_string()
    })
    .into_iter()
    .collect();
    killer.join().unwrap();
    assert_eq!(answered.len(), 300);
    for (n, text) in answered.iter().filter(|(n, _)| *n % 13 == 0) {
        let code = device_code(&format!("DEAD-0000-0000-{n:04}-000"));
        let (_, v) = all(1 + n % 2).market(&order_body(&format!("DEAD-{n}"), &code));
        assert_eq!(v["license"].as_str(), Some(text.as_str()), "order {n}");
    }
    let (per, orphans, _) = tally(&url, &schema);
    assert_eq!(per.len(), 1350);
    assert!(per.values().all(|c| *c == 1), "a second license: {per:?}");
    assert_eq!(orphans, 0, "an instance without its license or event");
}

/// Orders `0..count` sent by `threads` threads taking the next number from one counter;
/// each order's license, by order number.
fn spread(
    threads: usize,
    count: usize,
    order: impl Fn(usize) -> String + Sync,
) -> Vec<(usize, String)> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let (next, order) = (&next, &order);
                sc.spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= count {
                            return got;
                        }
                        got.push((n, order(n)));
                    }
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}
