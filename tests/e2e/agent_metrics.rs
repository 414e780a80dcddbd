//! Issue 16: `kooagent metrics` (Prometheus text format for node_exporter's textfile
//! collector) and the agent's periodic write of that file; no port on the device.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::TestAgent;
use crate::license::{device_code, install, utc_in, Seller};

fn has_line(page: &str, line: &str) -> bool {
    page.lines().any(|l| l == line)
}

/// Socket inodes the process `pid` holds.
fn socket_inodes(pid: u32) -> HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// TCP sockets in LISTEN (state 0A) or UDP sockets among `inodes`.
fn listening(inodes: &HashSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let listens = table.starts_with("udp") || f.get(3) == Some(&"0A");
            if listens && f.get(9).is_some_and(|i| inodes.contains(*i)) {
                found.push(format!("{table}: {l}"));
            }
        }
    }
    found
}

#[test]
fn metrics_print_license_freeze_and_usage_state_and_the_agent_writes_the_file() {
    let seller = Seller::new();
    let dir = crate::harness::short_tempdir();
    let textfile = dir.path().join("kooagent.prom");
    let a = TestAgent::start(&format!(
        "{}[metrics]\ntextfile = \"{}\"\ninterval_secs = 5\n",
        seller.config(),
        textfile.display()
    ));
    let code = device_code(&a);
    let lic = seller.bound(
        &code,
        "p",
        &[
            "--days",
            "30",
            "--id",
            "L-MET",
            "--not-before",
            &utc_in(-60),
        ],
    );
    install(&a, &lic).unwrap();

    let out = a.cli(&["metrics"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8(out.stdout).unwrap();
    for line in [
        "kooagent_licenses_installed 1",
        "kooagent_licenses_usable 1",
        "kooagent_license_state{license_id=\"L-MET\",product=\"p\",state=\"valid\"} 1",
        "kooagent_freeze_state{license_id=\"L-MET\",product=\"p\",state=\"active\"} 1",
        "kooagent_licenses_frozen 0",
        "kooagent_usage_records{state=\"pending\"} 0",
        "kooagent_usage_records{state=\"parked\"} 0",
        "kooagent_identity_state{state=\"ready\"} 1",
        "# TYPE kooagent_license_state gauge",
    ] {
        assert!(has_line(&page, line), "{line:?} not in\n{page}");
    }
    // The collection's own connection at least.
    let conns = page
        .lines()
        .find_map(|l| l.strip_prefix("kooagent_socket_connections "))
        .unwrap_or_else(|| panic!("no socket connections in\n{page}"));
    assert!(conns.parse::<u64>().unwrap() >= 1, "{page}");

    // The seller freezes the license: the metrics say so.
    let token = crate::freeze::token(&seller, "L-MET", "freeze", 1, &[]);
    a.call("token.apply", json!({"token": token.trim()}))
        .unwrap_or_else(|e| panic!("token.apply: {e}"));
    let out_file = dir.path().join("by-cli.prom");
    let out = a.cli(&["metrics", "--out", out_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let page = std::fs::read_to_string(&out_file).unwrap();
    assert!(has_line(&page, "kooagent_licenses_frozen 1"), "{page}");
    assert!(
        has_line(
            &page,
            "kooagent_freeze_state{license_id=\"L-MET\",product=\"p\",state=\"frozen\"} 1"
        ),
        "{page}"
    );

    // The agent rewrites its textfile on its own (every 5 s here), whole: it shows the
    // freeze within a couple of intervals, and no temporary file is left beside it.
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        if has_line(&text, "kooagent_licenses_frozen 1") {
            assert!(text.ends_with('\n') && text.contains("kooagent_metrics_collected"));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{textfile:?} never showed the freeze:\n{text}\nlog:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // No listening port on the device.
    let pid = a.child.as_ref().unwrap().id();
    let l = listening(&socket_inodes(pid));
    assert!(l.is_empty(), "the agent listens: {l:?}");
}

#[test]
fn metrics_textfile_is_checked_at_start() {
    let a = TestAgent::prepare("[metrics]\ntextfile = \"relative.prom\"\n");
    let err = a.run_refused();
    assert!(err.contains("metrics.textfile"), "{err}");
}
