//! The socket protocol: framing, pipelining, errors that keep the connection usable,
//! limits, and many idle connections.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Conn, TestAgent};

#[test]
fn pipelined_requests_are_answered_in_order() {
    let a = TestAgent::start("");
    let mut c = a.connect();
    let mut batch = Vec::new();
    for i in 0..200 {
        let op = if i % 3 == 0 { "agent.status" } else { "ping" };
        batch.extend_from_slice(format!("{{\"v\":1,\"id\":{i},\"op\":\"{op}\"}}\n").as_bytes());
    }
    c.send_raw(&batch);
    for i in 0..200 {
        let v = c.read_json();
        assert_eq!(v["id"], json!(i));
        assert_eq!(v["ok"], json!(true), "{v}");
    }
}

#[test]
fn errors_are_answers_and_the_connection_stays_usable() {
    let a = TestAgent::start("");
    let mut c = a.connect();
    c.send_raw(b"{not json\n");
    let v = c.read_json();
    assert_eq!(
        (v["ok"].clone(), v["error"]["code"].clone()),
        (json!(false), json!("parse_error"))
    );
    c.send_raw(b"\xff\xfe\n");
    assert_eq!(c.read_json()["error"]["code"], json!("parse_error"));
    c.send_raw(b"{\"v\":9,\"id\":\"x\",\"op\":\"ping\"}\n");
    let v = c.read_json();
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!("x"), json!("unsupported_version"))
    );
    c.send_raw(b"{\"v\":1,\"op\":\"ping\"}\n");
    assert_eq!(c.read_json()["error"]["code"], json!("invalid_request"));
    let e = c.call("no.such.op", json!({})).unwrap_err();
    assert_eq!(e["code"], json!("unknown_op"));
    assert!(e["message"].as_str().unwrap().contains("no.such.op"));
    let e = c
        .call("device.code", json!({"explain": "yes"}))
        .unwrap_err();
    assert_eq!(e["code"], json!("invalid_params"));
    assert_eq!(c.call("ping", json!({})).unwrap(), json!({"pong": true}));
}

#[test]
fn big_numeric_ids_are_echoed_exactly() {
    let a = TestAgent::start("");
    let mut c = a.connect();
    let id = "123456789012345678901234567890";
    c.send_raw(format!("{{\"v\":1,\"id\":{id},\"op\":\"ping\"}}\n").as_bytes());
    c.send_raw(format!("{{\"v\":1,\"id\":{id},\"op\":\"no.such\"}}\n").as_bytes());
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut c.reader, &mut line).unwrap();
        assert!(
            line.starts_with(&format!("{{\"v\":1,\"id\":{id},")),
            "{line}"
        );
    }
}

#[test]
fn oversized_line_is_refused_and_the_connection_survives() {
    let a = TestAgent::start("");
    let mut c = a.connect();
    let mut big = b"{\"v\":1,\"id\":1,\"op\":\"ping\",\"params\":{\"pad\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70 * 1024));
    big.extend_from_slice(b"\"}}\n");
    c.send_raw(&big);
    let v = c.read_json();
    assert_eq!(v["error"]["code"], json!("line_too_long"), "{v}");
    // Just under the limit is fine.
    let mut ok = b"{\"v\":1,\"id\":2,\"op\":\"ping\",\"params\":{}}".to_vec();
    ok.extend(std::iter::repeat_n(b' ', 60 * 1024));
    ok.push(b'\n');
    c.send_raw(&ok);
    assert_eq!(c.read_json()["id"], json!(2));
    assert!(c.call("ping", json!({})).is_ok());
}

#[test]
fn peer_credentials_are_logged_at_debug() {
    let a = TestAgent::start("");
    a.call("ping", json!({})).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    assert!(
        a.log().contains(&format!("connection from uid={uid} ")),
        "{}",
        a.log()
    );
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain rlimit calls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

#[test]
fn thousands_of_idle_connections_do_not_starve_an_active_one() {
    raise_nofile();
    let a = TestAgent::start("");
    let idle: Vec<Conn> = (0..3000).map(|_| a.connect()).collect();
    let mut c = a.connect();
    for _ in 0..100 {
        assert_eq!(c.call("ping", json!({})).unwrap(), json!({"pong": true}));
    }
    assert!(a.call("agent.status", json!({})).is_ok());
    drop(idle);
}

#[test]
fn connections_beyond_the_limit_get_busy() {
    let a = TestAgent::start("[socket]\nmax_connections = 4\nmax_connections_per_uid = 4\n");
    let _held: Vec<Conn> = (0..4)
        .map(|_| {
            let mut c = a.connect();
            c.call("ping", json!({})).unwrap();
            c
        })
        .collect();
    let mut extra = a.connect();
    let v = extra.read_json();
    assert_eq!(v["error"]["code"], json!("busy"), "{v}");
    assert!(extra.closed());
}

#[test]
fn under_a_low_descriptor_limit_every_extra_client_gets_busy() {
    raise_nofile();
    // One uid may take every slot here (the per-uid cap is another test's subject).
    let mut a = TestAgent::prepare("[socket]\nmax_connections_per_uid = 16384\n");
    let log = std::fs::File::create(a.dir.path().join("agent.log")).unwrap();
    // A hard limit of 256 descriptors and the default max_connections (16,384).
    a.child = Some(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 256 && exec '{}' run --config '{}'",
                crate::harness::BIN,
                a.config.display()
            ))
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    a.wait_ready();
    let mut conns: Vec<Conn> = (0..400).map(|_| a.connect()).collect();
    let mut served = 0;
    let mut busy = 0;
    for c in &mut conns {
        // A refused client already has `busy` waiting (its ping may meet a closed socket).
        let _ = std::io::Write::write_all(&mut c.writer, b"{\"v\":1,\"id\":1,\"op\":\"ping\"}\n");
        let v = c.read_json();
        if v["ok"] == json!(true) {
            served += 1;
        } else {
            assert_eq!(v["error"]["code"], json!("busy"), "{v}");
            busy += 1;
        }
    }
    // None was left hanging (read_json has a timeout), and the budget was kept.
    assert!(served > 100 && served <= 256 - 64, "{served} served");
    assert_eq!(served + busy, 400);
    let log = a.log();
    assert!(log.contains("does not fit RLIMIT_NOFILE"), "{log}");
    assert!(log.matches("accept failed").count() < 3, "{log}");
}

#[test]
fn status_reports_what_is_configured() {
    let a = TestAgent::start("");
    let s = a.call("agent.status", json!({})).unwrap();
    assert_eq!(s["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(s["state_dir"], json!(a.state));
    assert_eq!(s["socket"], json!(a.socket));
    assert!(s["uptime_secs"].is_u64());
    let out = a.cli(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("state dir:"));
}

/// Issue 20 item 5: "cannot reach the agent" names the OS error once.
#[test]
fn unreachable_agent_error_says_the_os_error_once() {
    let dir = crate::harness::short_tempdir();
    let out = std::process::Command::new(crate::harness::BIN)
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("ping")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn idle_connections_are_closed_after_the_timeout_but_watch_streams_stay() {
    let a = TestAgent::start("[socket]\nidle_timeout_secs = 1\n");
    let mut idle = a.connect();
    let mut busy = a.connect();
    let mut w = a.connect();
    w.send_raw(b"{\"v\":1,\"id\":\"w\",\"op\":\"watch\",\"params\":{}}\n");
    // A connection that keeps asking is never idle for a whole second.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(busy.call("ping", json!({})).unwrap(), json!({"pong": true}));
    }
    assert!(idle.closed(), "the idle connection was not closed");
    // The watch stream is still open: a read waits (times out) instead of seeing EOF.
    w.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = std::io::Read::read(&mut w.reader, &mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "watch stream ended: {r:?}"
    );
    assert!(a.log().contains("socket.idle_timeout_secs"), "{}", a.log());
}

#[test]
fn idle_timeout_default_keeps_connections_open() {
    let a = TestAgent::start("");
    let mut c = a.connect();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.call("ping", json!({})).unwrap(), json!({"pong": true}));
}

#[test]
fn one_uid_gets_at_most_a_quarter_of_the_connections() {
    let a = TestAgent::start("[socket]\nmax_connections = 12\n");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut held: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = a.connect();
            c.call("ping", json!({})).unwrap();
            c
        })
        .collect();
    let mut extra = a.connect();
    let v = extra.read_json();
    assert_eq!(v["error"]["code"], json!("busy"), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("uid {uid}")) && msg.contains("at most 3"),
        "{msg}"
    );
    assert!(extra.closed());
    // A slot given back is usable again.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(100));
    let mut again = a.connect();
    assert_eq!(
        again.call("ping", json!({})).unwrap(),
        json!({"pong": true})
    );
}

#[test]
fn the_per_uid_cap_is_configurable() {
    let a = TestAgent::start("[socket]\nmax_connections = 12\nmax_connections_per_uid = 5\n");
    let _held: Vec<Conn> = (0..5)
        .map(|_| {
            let mut c = a.connect();
            c.call("ping", json!({})).unwrap();
            c
        })
        .collect();
    let mut extra = a.connect();
    assert_eq!(extra.read_json()["error"]["code"], json!("busy"));
}

/// `ping` and `license.check` are answered in place when their request is plain
/// (`ops::InlineSpec`); the same request written so that it cannot be read in place (an
/// escape in its `op`) goes through the operation's handler. Both answer byte for byte
/// alike, in order, whichever way each is served, errors included.
#[test]
fn hot_operations_answer_in_place_exactly_as_their_handlers() {
    let seller = crate::license::Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = crate::license::device_code(&a);
    let text = seller.bound(
        &code,
        "sku-pro",
        &["--days", "30", "--feature", "sso", "--id", "L-1"],
    );
    crate::license::install(&a, &text).unwrap();
    let mut c = a.connect();
    let cases = [
        ("ping", r#""params":{}"#),
        ("ping", r#""params":{ }"#),
        ("ping", r#""params":null"#),
        ("ping", r#""params":{"x":1}"#),
        ("license.check", r#""params":{"product":"sku-pro"}"#),
        (
            "license.check",
            r#""params":{"product":"sku-pro","feature":"sso"}"#,
        ),
        (
            "license.check",
            r#""params":{"feature":"audit","product":"sku-pro"}"#,
        ),
        (
            "license.check",
            r#""params":{"product":"sku-pro","feature":null}"#,
        ),
        (
            "license.check",
            r#""params":{"product":"sku-pro","feature":"a\"b"}"#,
        ),
        ("license.check", r#""params":{"product":"sku-\u0070ro"}"#),
        ("license.check", r#""params":{"product":"sku-basic"}"#),
        ("license.check", r#""params":{"product":"sku-pro","x":1}"#),
        ("license.check", r#""params":{}"#),
        ("license.check", ""),
    ];
    for (op, params) in cases {
        let escaped = op.replacen('i', "\\u0069", 1);
        let sep = if params.is_empty() { "" } else { "," };
        let line =
            |op: &str, id: &str| format!("{{\"v\":1,\"id\":{id},\"op\":\"{op}\"{sep}{params}}}\n");
        // Both in one write: served in one wakeup, so a time-dependent answer (secs_left)
        // rarely straddles a second; a pair that did is sent again.
        let mut same = false;
        for _ in 0..5 {
            c.send_raw(format!("{}{}", line(op, "\"k\""), line(&escaped, "\"k\"")).as_bytes());
            let mut in_place = String::new();
            let mut handled = String::new();
            std::io::BufRead::read_line(&mut c.reader, &mut in_place).unwrap();
            std::io::BufRead::read_line(&mut c.reader, &mut handled).unwrap();
            assert!(in_place.starts_with("{\"v\":1,\"id\":\"k\","), "{in_place}");
            if in_place == handled {
                same = true;
                break;
            }
        }
        assert!(
            same,
            "{op} {params}: in place and through the handler differ"
        );
    }
}
