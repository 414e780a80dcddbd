//! The daemon's life cycle: configuration errors, readiness, signals, a second agent,
//! stale sockets, detaching.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{run_ok, short_tempdir, TestAgent, BIN};

#[test]
fn unknown_key_stops_start_and_names_the_key() {
    let mut a = TestAgent::prepare("[socket]\nmod = \"0600\"\n");
    let err = a.run_refused();
    assert!(err.contains("unknown field `mod`"), "{err}");
    assert!(!a.socket.exists(), "no half-started agent");
    a.child = None;
}

#[test]
fn bad_value_stops_start_and_names_the_key() {
    let a = TestAgent::prepare("[agent]\nlog_level = \"chatty\"\n");
    let err = a.run_refused();
    assert!(err.contains("agent.log_level"), "{err}");
}

#[test]
fn config_show_names_origins() {
    let a = TestAgent::prepare("");
    let out = a.cli(&["config", "show"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("socket.path")).unwrap();
    assert!(
        line.contains(&a.socket.display().to_string()) && line.contains("# file"),
        "{line}"
    );
    let line = text.lines().find(|l| l.starts_with("socket.mode")).unwrap();
    assert!(
        line.contains("\"0660\"") && line.contains("# default"),
        "{line}"
    );
}

/// The agent's flags are the agent commands' own (not clap globals, which would leak into
/// `seller`): written before or after the command they work alike, and a flag beats
/// `KOOAGENT_CONFIG` wherever it is written.
#[test]
fn config_flag_before_or_after_the_command_beats_the_environment() {
    let a = TestAgent::prepare("");
    let cfg = a.config.to_str().unwrap();
    let check = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(args).env_remove("KOOAGENT_CONFIG");
        if let Some(e) = env {
            c.env("KOOAGENT_CONFIG", e);
        }
        String::from_utf8_lossy(&run_ok(&mut c).stdout).into_owned()
    };
    let missing = "/nonexistent/agent.toml";
    for args in [
        &["--config", cfg, "config", "check"][..],
        &["config", "check", "--config", cfg][..],
    ] {
        let out = check(args, Some(missing));
        assert!(
            out.contains(&format!("configuration OK ({cfg})")),
            "{args:?}: {out}"
        );
    }
    let out = check(&["config", "check"], Some(cfg));
    assert!(out.contains(&format!("configuration OK ({cfg})")), "{out}");
    // The socket flag after a nested command reaches it too.
    let out = Command::new(BIN)
        .args(["license", "status", "--socket", "/nonexistent/x.sock"])
        .args(["--config", cfg])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.sock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seller's commands left the device binary: `kooagent seller ARGS` runs the
/// `kooagent-seller` beside it with the flags written before `seller` and the same ARGS
/// (its exit code and output are the seller binary's), and says what to install when
/// there is none beside it nor in PATH.
#[test]
fn seller_commands_run_the_seller_binary_beside_the_agent() {
    let dir = short_tempdir();
    let key = dir.path().join("seller.key");
    let out = run_ok(
        Command::new(BIN)
            .args(["--log-level", "warn", "seller", "keygen", "--out"])
            .arg(&key),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("trusted_keys"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(key.is_file());
    // The seller binary's own help and its refusals come through unchanged.
    let out = run_ok(Command::new(BIN).args(["seller", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("kooagent-seller") && help.contains("serve"),
        "{help}"
    );
    let out = Command::new(BIN)
        .args(["seller", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A kooagent alone (no kooagent-seller beside it, none in PATH).
    let alone = dir.path().join("kooagent");
    std::fs::copy(BIN.path(), &alone).unwrap();
    let out = Command::new(&alone)
        .args(["seller", "keygen", "--out"])
        .arg(dir.path().join("other.key"))
        .env("PATH", dir.path().join("empty"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("kooagent-seller") && err.contains("PATH"),
        "{err}"
    );
}

#[test]
fn embedded_defaults_without_a_config_file() {
    // With no file at all the agent still has a full configuration: FHS paths as root,
    // the user's XDG directories otherwise.
    let home = short_tempdir();
    let out = run_ok(
        Command::new(BIN)
            .args(["config", "show"])
            .env_remove("KOOAGENT_CONFIG")
            .env("HOME", home.path())
            .env("XDG_RUNTIME_DIR", home.path().join("run"))
            .env("XDG_CONFIG_HOME", home.path().join("cfg"))
            .env("XDG_DATA_HOME", home.path().join("data")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            text.contains("socket.path = \"/run/kooagent/agent.sock\""),
            "{text}"
        );
        assert!(
            text.contains("agent.state_dir = \"/var/lib/kooagent\""),
            "{text}"
        );
    } else {
        assert!(
            text.contains(&format!(
                "{}/run/kooagent/agent.sock",
                home.path().display()
            )),
            "{text}"
        );
    }
    assert!(!text.contains("# file"), "{text}");
}

#[test]
fn second_agent_on_the_same_socket_is_refused() {
    let a = TestAgent::start("");
    let err = a.run_refused();
    // The state lock is taken before the socket is bound: it is what refuses.
    assert!(err.contains("in use by another agent"), "{err}");
    // The first one is untouched.
    assert_eq!(a.call("ping", json!({})).unwrap(), json!({"pong": true}));
}

#[test]
fn second_agent_on_the_same_state_dir_is_refused_naming_the_holder() {
    let a = TestAgent::start("");
    let holder = a.child.as_ref().unwrap().id();
    // Its own socket, the first agent's state directory.
    let b = TestAgent::prepare(&format!("[agent]\nstate_dir = \"{}\"\n", a.state.display()));
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&b.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {holder}")) && err.contains(&a.state.display().to_string()),
        "{err}"
    );
    assert!(!b.socket.exists(), "the refused agent bound nothing");
    // image-prep on that config is refused too, and removes nothing.
    let per_instance = a.state.join("agent.log");
    std::fs::write(&per_instance, b"kept").unwrap();
    let out = b.cli(&["image-prep", "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("pid {holder}")),
        "{err}"
    );
    assert!(per_instance.exists(), "a refused prep removed state");
    assert_eq!(a.call("ping", json!({})).unwrap(), json!({"pong": true}));
}

#[test]
fn detached_agent_names_its_own_pid_in_the_state_lock() {
    let a = TestAgent::prepare("");
    run_ok(
        Command::new(BIN)
            .args(["run", "--daemon", "--config"])
            .arg(&a.config),
    );
    let pid: u32 = std::fs::read_to_string(a.dir.path().join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let err = a.run_refused();
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while a.socket.exists() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(err.contains(&format!("pid {pid})")), "{err}");
}

#[test]
fn stale_socket_after_a_crash_is_replaced() {
    let mut a = TestAgent::start("");
    a.kill9();
    assert!(a.socket.exists(), "a crash leaves the socket file");
    a.spawn(&[]);
    assert_eq!(a.call("ping", json!({})).unwrap(), json!({"pong": true}));
}

#[test]
fn sigterm_exits_zero_quickly_even_with_idle_clients() {
    let mut a = TestAgent::start("");
    let _idle: Vec<_> = (0..50).map(|_| a.connect()).collect();
    let mut busy = a.connect();
    busy.call("ping", json!({})).unwrap();
    let (status, took) = a.stop();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(!a.socket.exists(), "socket removed on a clean exit");
}

#[test]
fn notify_socket_gets_ready_and_stopping() {
    let mut a = TestAgent::prepare("");
    let notify_path = a.dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify_path).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&a.config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    a.child = Some(child);
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // READY means the socket answers.
    assert!(a.call("ping", json!({})).is_ok());
    a.signal(libc::SIGHUP);
    let n = rx.recv(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"RELOADING=1\nMONOTONIC_USEC="));
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    a.signal(libc::SIGTERM);
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(a.child.take().unwrap().wait().unwrap().success());
}

#[test]
fn sighup_reloads_and_a_bad_reload_keeps_the_old_config() {
    let a = TestAgent::start("");
    let text = crate::harness::base_config(a.dir.path(), "[agent]\nproduct_id = \"sku-2\"\n");
    std::fs::write(&a.config, text).unwrap();
    a.signal(libc::SIGHUP);
    let t0 = Instant::now();
    loop {
        let s = a.call("agent.status", json!({})).unwrap();
        if s["product_id"] == json!("sku-2") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "reload not applied: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&a.config, "[agent]\nbogus = 1\n").unwrap();
    a.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    let s = a.call("agent.status", json!({})).unwrap();
    assert_eq!(s["product_id"], json!("sku-2"));
    assert!(a.log().contains("not reloaded"), "{}", a.log());
}

#[test]
fn daemon_mode_detaches_and_writes_a_pidfile() {
    let mut a = TestAgent::prepare("");
    run_ok(
        Command::new(BIN)
            .args(["run", "--daemon", "--config"])
            .arg(&a.config),
    );
    a.wait_ready();
    let pidfile = a.dir.path().join("agent.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        a.call("agent.status", json!({})).unwrap()["pid"],
        json!(pid)
    );
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while a.socket.exists() || pidfile.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "daemon did not clean up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::fs::read_to_string(a.state.join("agent.log"))
        .unwrap()
        .contains("listening"));
}

#[test]
fn socket_has_mode_0660() {
    let a = TestAgent::start("");
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn explicit_missing_socket_group_is_an_error() {
    let mut a = TestAgent::prepare("[socket]\ngroup = \"no-such-group-x\"\n");
    let err = a.run_refused();
    assert!(
        err.contains("no-such-group-x") && err.contains("socket.group"),
        "{err}"
    );
    assert!(!a.socket.exists());
    assert!(
        err.contains("socket.group = \"\""),
        "the way out is named: {err}"
    );
    a.child = None;
}

/// Issue 20 item 5: on a host without a `kooagent` group, `group = ""` keeps the agent's
/// own group instead of failing.
#[test]
fn empty_socket_group_keeps_the_agents_group() {
    let a = TestAgent::start("[socket]\ngroup = \"\"\n");
    let meta = std::fs::metadata(&a.socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), unsafe {
        libc::getegid()
    });
    assert!(a.call("ping", serde_json::json!({})).is_ok());
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn under_umask_000_state_log_and_pidfile_directory_stay_private() {
    let mut a = TestAgent::prepare("");
    let run = a.dir.path().join("run/sub");
    std::fs::write(
        &a.config,
        crate::harness::base_config(
            a.dir.path(),
            &format!("[agent]\npidfile = \"{}/agent.pid\"\n", run.display()),
        ),
    )
    .unwrap();
    // A state directory left loose by someone else is tightened too.
    std::fs::create_dir_all(&a.state).unwrap();
    std::fs::set_permissions(&a.state, std::fs::Permissions::from_mode(0o755)).unwrap();
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "umask 000 && exec '{BIN}' run --daemon --config '{}'",
        a.config.display()
    )));
    a.wait_ready();
    // Device key, freeze state, drop directories: created while serving the first calls.
    a.call("license.status", json!({})).unwrap();
    let pid: i32 = std::fs::read_to_string(run.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let modes = [
        ("state dir", mode(&a.state)),
        ("agent.log", mode(&a.state.join("agent.log"))),
        ("pidfile dir", mode(&run)),
        ("pidfile", mode(&run.join("agent.pid"))),
    ];
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while a.socket.exists() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(modes[0].1, 0o700, "state dir is {:o}", modes[0].1);
    for (what, m) in modes {
        assert_eq!(m & 0o077, 0, "{what} is {m:o}");
    }
}

#[test]
fn numeric_socket_group_is_a_gid() {
    // Root can give the socket any gid, even one without an /etc/group entry.
    // SAFETY: plain getters.
    let gid = if unsafe { libc::geteuid() } == 0 {
        54321
    } else {
        unsafe { libc::getegid() }
    };
    let a = TestAgent::start(&format!("[socket]\ngroup = \"{gid}\"\n"));
    let meta = std::fs::metadata(&a.socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

/// Context switches of every thread of `pid`, by thread name.
fn switches(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let n = field("voluntary_ctxt_switches:")
            .parse::<u64>()
            .unwrap_or(0)
            + field("nonvoluntary_ctxt_switches:")
                .parse::<u64>()
                .unwrap_or(0);
        out.push((
            format!("{}/{}", field("Name:"), t.file_name().to_string_lossy()),
            n,
        ));
    }
    out.sort();
    out
}

#[test]
fn an_idle_agent_does_not_wake_up_for_a_minute() {
    let a = TestAgent::start("");
    let pid = a.child.as_ref().unwrap().id();
    // The socket accepts from the bind, before the services start (slow on a loaded
    // machine): an answer means they have; then let start-up work (identity, first
    // scans) settle.
    a.call("ping", json!({})).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let before = switches(pid);
    std::thread::sleep(Duration::from_secs(61));
    let after = switches(pid);
    let woke: Vec<String> = after
        .iter()
        .filter_map(|(name, n)| {
            let was = before.iter().find(|(b, _)| b == name).map_or(0, |b| b.1);
            (*n != was).then(|| format!("{name}: {}", n - was))
        })
        .collect();
    // The log (debug) names what woke it: a timer, a clock set, the device identity.
    assert!(
        woke.is_empty(),
        "threads woke while idle: {woke:?}; agent log:\n{}",
        a.log()
    );
}

/// The bench is not part of the shipped binary: `kooagent bench` is unknown, and the
/// separate `kooagent-bench` measures the agent binary it is given.
#[test]
fn the_bench_is_its_own_binary_and_measures_the_agent() {
    let out = Command::new(BIN).arg("bench").output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand 'bench'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_kooagent-bench")).args([
        "--agent",
        BIN.path(),
        "--seconds",
        "0.05",
        "--clients",
        "1",
        "--starts",
        "1",
        "--no-redis",
        "--idle-connections",
        "0",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["scenario"] == "ping" && r["requests"].as_u64().unwrap() > 0),
        "{report}"
    );
    assert!(report["idle_rss_kib"].as_u64().unwrap() > 0, "{report}");
    // What tells a loaded run from a real miss, printed beside the figures.
    assert!(report["load_start"].as_f64().is_some(), "{report}");
    assert!(report["load_end"].as_f64().is_some(), "{report}");
    assert!(
        report["fdatasync_us_median"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    // Group commit's group sizes: one record per commit for one client waiting for each
    // answer, several when one connection pipelines 32 deep.
    let per_commit = |scenario: &str| {
        rows.iter()
            .find(|r| r["scenario"] == scenario)
            .and_then(|r| r["records_per_commit"].as_f64())
            .unwrap_or_else(|| panic!("no group size for {scenario}: {report}"))
    };
    let single = per_commit("usage.record (durable)");
    assert!(single > 0.0 && single <= 1.0, "{report}");
    assert!(
        per_commit("usage.record (durable), pipelined 32 deep") > 1.0,
        "{report}"
    );
}
