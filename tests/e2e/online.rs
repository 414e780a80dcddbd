//! The freeze capability's online source: the agent polls the seller's HTTPS endpoint for
//! each license's newest status token and renewed license; offline changes nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::freeze::token;
use crate::harness::TestAgent;
use crate::license::{device_code, install, utc_in, Seller};
use crate::upstream::TestCa;

/// An HTTPS server answering GET `path` with what `routes` holds (404 otherwise), counting
/// requests.
struct SellerEndpoint {
    port: u16,
    routes: Arc<Mutex<HashMap<String, String>>>,
    hits: Arc<Mutex<usize>>,
}

impl SellerEndpoint {
    fn start(ca: &TestCa) -> SellerEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = ca.server_config();
        let routes = Arc::new(Mutex::new(HashMap::<String, String>::new()));
        let hits = Arc::new(Mutex::new(0usize));
        let (r, h) = (routes.clone(), hits.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                let (cfg, r, h) = (cfg.clone(), r.clone(), h.clone());
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                    loop {
                        let mut line = String::new();
                        if tls.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        // The agent adds ?device_code=... (the seller's server binds on it).
                        let target = line.split_whitespace().nth(1).unwrap_or("");
                        let path = target.split('?').next().unwrap_or("").to_string();
                        loop {
                            let mut hdr = String::new();
                            if tls.read_line(&mut hdr).unwrap_or(0) == 0 || hdr == "\r\n" {
                                break;
                            }
                        }
                        *h.lock().unwrap() += 1;
                        let body = r.lock().unwrap().get(&path).cloned();
                        let resp = match body {
                            Some(b) => {
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{b}", b.len())
                            }
                            None => {
                                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string()
                            }
                        };
                        if tls.get_mut().write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                        let _ = tls.get_mut().flush();
                    }
                });
            }
        });
        SellerEndpoint { port, routes, hits }
    }

    fn set(&self, path: &str, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), body.to_string());
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state(a: &TestAgent, product: &str) -> String {
    a.call("license.check", json!({"product": product}))
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn online_source_freezes_unfreezes_and_renews() {
    let seller = Seller::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let ep = SellerEndpoint::start(&ca);
    let base = format!("https://localhost:{}", ep.port);
    let a = TestAgent::start(&format!(
        "{}[freeze]\ntoken_url = \"{base}/tokens/{{license_id}}\"\nlicense_url = \"{base}/licenses/{{license_id}}\"\n\
         poll_interval_secs = 1\npoll_jitter_secs = 0\npoll_extra_ca_file = \"{}\"\n",
        seller.config(),
        ca.pem_path.display()
    ));
    let code = device_code(&a);
    let issue = |not_after: &str, issued_at: &str| {
        seller.issue(&[
            "--device-code",
            &code,
            "--product",
            "sku-o",
            "--instance",
            "i",
            "--id",
            "L-online",
            "--not-after",
            not_after,
            "--issued-at",
            issued_at,
        ])
    };
    install(&a, &issue(&utc_in(86_400), &utc_in(-60))).unwrap();
    assert_eq!(state(&a, "sku-o"), "valid");

    // Nothing served yet: polls happen and change nothing.
    wait_for("a few polls", || *ep.hits.lock().unwrap() >= 4);
    assert_eq!(state(&a, "sku-o"), "valid");

    // The seller freezes the instance: the device hears it on its next poll.
    ep.set(
        "/tokens/L-online",
        &token(&seller, "L-online", "freeze", 1, &[]),
    );
    wait_for("frozen through the online source", || {
        state(&a, "sku-o") == "frozen"
    });

    // Unfreeze with a newer token.
    ep.set(
        "/tokens/L-online",
        &token(&seller, "L-online", "unfreeze", 2, &[]),
    );
    wait_for("unfrozen through the online source", || {
        state(&a, "sku-o") == "valid"
    });

    // Renewal: a newer license with a later expiry reaches the device by itself.
    let renewed = issue(&utc_in(90 * 86_400), &utc_in(-30));
    ep.set("/licenses/L-online", &renewed);
    wait_for("the renewed license", || {
        let c = a
            .call("license.check", json!({"product": "sku-o"}))
            .unwrap();
        c["days_left"].as_i64().unwrap_or(0) > 80
    });

    // Polls that bring the same license again change nothing and say so only at debug
    // level: "fetched" is logged at info once, for the renewal.
    let hits = *ep.hits.lock().unwrap();
    wait_for("more polls of the same license", || {
        *ep.hits.lock().unwrap() >= hits + 6
    });
    let log = a.log();
    let info = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("INFO"))
            .count()
    };
    assert_eq!(info("fetched from the online source"), 1, "{log}");
    assert_eq!(info("from the online source applied"), 2, "{log}");
    assert!(log.contains("the online source has nothing newer"), "{log}");

    // A token that does not verify is never applied.
    ep.set("/tokens/L-online", "kst1.garbage.garbage");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(state(&a, "sku-o"), "valid");
}

/// Issue 20 item 1: a failing poll is reported in `freeze.status`, `agent.status` and the
/// CLI, and logged at warn level once per change of error, not once per poll.
#[test]
fn failing_polls_are_reported_and_warned_once() {
    let seller = Seller::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let ep = SellerEndpoint::start(&ca);
    let base = format!("https://localhost:{}", ep.port);
    // No poll_extra_ca_file: the endpoint's certificate is not trusted.
    let mut a = TestAgent::start(&format!(
        "{}[freeze]\ntoken_url = \"{base}/tokens/{{license_id}}\"\nlicense_url = \"{base}/licenses/{{license_id}}\"\n\
         poll_interval_secs = 1\npoll_jitter_secs = 0\n",
        seller.config(),
    ));
    let code = device_code(&a);
    let lic = seller.issue(&[
        "--device-code",
        &code,
        "--product",
        "sku-h",
        "--instance",
        "i",
        "--id",
        "L-health",
        "--not-after",
        &utc_in(86_400),
    ]);
    install(&a, &lic).unwrap();
    let online = |a: &TestAgent| a.call("freeze.status", json!({})).unwrap()["online"].clone();
    wait_for("three failed polls", || {
        online(&a)["tokens"]["consecutive_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    let o = online(&a);
    for src in ["tokens", "licenses"] {
        let h = &o[src];
        assert_eq!(h["failing"], json!(true), "{o}");
        assert!(h["last_attempt_at"].is_string(), "{o}");
        assert!(h["last_success_at"].is_null(), "{o}");
        let err = h["last_error"].as_str().unwrap();
        assert!(
            err.contains(&format!("{base}/")),
            "the error names the URL: {err}"
        );
        assert!(err.contains("L-health"), "{err}");
    }
    let log = a.log();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("freeze poll"))
        .count();
    assert_eq!(warns, 1, "one warning for one unchanged error:\n{log}");
    let st = a.call("agent.status", json!({})).unwrap();
    assert_eq!(st["sources"]["freeze_poll"]["configured"], json!(true));
    assert_eq!(st["sources"]["freeze_poll"]["failing"], json!(true));
    assert_eq!(st["sources"]["usage_upload"]["configured"], json!(false));
    let out = a.cli(&["freeze", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("freeze poll") && text.contains("FAILING"),
        "{text}"
    );
    assert!(text.contains("last error"), "{text}");

    // Trusting the CA (SIGHUP) fixes it: the next poll succeeds and says so.
    std::fs::write(
        &a.config,
        crate::harness::base_config(
            a.dir.path(),
            &format!(
                "{}[freeze]\ntoken_url = \"{base}/tokens/{{license_id}}\"\nlicense_url = \"{base}/licenses/{{license_id}}\"\n\
                 poll_interval_secs = 1\npoll_jitter_secs = 0\npoll_extra_ca_file = \"{}\"\n",
                seller.config(),
                ca.pem_path.display()
            ),
        ),
    )
    .unwrap();
    a.signal(libc::SIGHUP);
    wait_for("a successful poll", || {
        online(&a)["tokens"]["failing"] == json!(false)
    });
    let h = &online(&a)["tokens"];
    assert!(h["last_success_at"].is_string(), "{h}");
    assert_eq!(h["consecutive_failures"], json!(0));
    assert!(a
        .log()
        .contains("freeze poll (freeze.token_url): working again"));
    a.stop();
}
