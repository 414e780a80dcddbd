//! The seller SDK against a real agent with a license installed: the C example linked
//! against libkooagent_ffi, the Python and shell examples, and the Rust client surviving
//! an agent restart.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;

use crate::harness::{TestAgent, BIN};
use crate::license::{device_code, Seller};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// An agent trusting a fresh seller key, with a license for `sku-sdk` (feature `export`)
/// bound to its own device code, and a meter `api`.
fn licensed_agent() -> (TestAgent, Seller) {
    let seller = Seller::new();
    let a = TestAgent::start(&format!(
        "{}[usage.meters.api]\ninstance_id = \"inst-sdk\"\n",
        seller.config()
    ));
    let text = seller.issue(&[
        "--device-code",
        &device_code(&a),
        "--product",
        "sku-sdk",
        "--instance",
        "inst-sdk",
        "--days",
        "30",
        "--feature",
        "export",
    ]);
    let lic = seller.write("sku.lic", &text);
    let out = a.cli(&["license", "install", lic.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (a, seller)
}

fn target_dir() -> PathBuf {
    // The libraries cargo built next to its own kooagent (not KOOAGENT_E2E_BIN's).
    Path::new(env!("CARGO_BIN_EXE_kooagent"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The static library, brought up to date first (a no-op after a workspace build; this
/// package's tests alone would not rebuild it).
fn static_lib() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-q", "-p", "kooagent-ffi"])
        .current_dir(ROOT)
        .status()
        .unwrap();
    assert!(st.success());
    target_dir().join("libkooagent_ffi.a")
}

fn run(cmd: &mut Command, a: &TestAgent) -> Output {
    cmd.env("KOOAGENT_SOCKET", &a.socket).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn c_example_checks_and_records_through_the_c_abi() {
    let (a, seller) = licensed_agent();
    let dir = &seller.dir;
    let exe = compile("check", dir.path());

    let out = run(
        Command::new(&exe).args(["sku-sdk", "export", "api", "1.5"]),
        &a,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("state: 1 allowed: 1 days_left: 29")
            || t.contains("state: 1 allowed: 1 days_left: 30"),
        "{t}"
    );
    assert!(t.contains("recorded api 1.5"), "{t}");
    assert!(t.contains("device code: "), "{t}");

    // A feature the license does not grant, and a product with no license: refused.
    let out = run(Command::new(&exe).args(["sku-sdk", "sso"]), &a);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = run(Command::new(&exe).arg("other-product"), &a);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("state: 10 allowed: 0"),
        "{}",
        text(&out)
    );

    // The recorded usage is in the ledger.
    let st = a.call("usage.status", json!({})).unwrap();
    assert!(st.to_string().contains("1.5"), "{st}");

    // No agent: a clear error, exit 2.
    let out = Command::new(&exe)
        .arg("sku-sdk")
        .env("KOOAGENT_SOCKET", dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot reach the agent"),
        "{}",
        text(&out)
    );
}

pub(crate) fn compile(example: &str, dir: &Path) -> PathBuf {
    let exe = dir.join(example);
    let out = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(format!("{ROOT}/examples/c/{example}.c"))
        .arg(format!("-I{ROOT}/client-ffi/include"))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {}", text(&out));
    exe
}

#[test]
fn watch_streams_freeze_and_unfreeze_to_rust_and_c() {
    let (a, seller) = licensed_agent();
    let (dir, key) = (&seller.dir, seller.key.clone());
    let lic_id = a
        .call("license.check", json!({"product": "sku-sdk"}))
        .unwrap()["license_id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = |action: &str, seq: &str| {
        let out = Command::new(BIN)
            .args(["seller", "token", "--key"])
            .arg(&key)
            .args(["--license", &lic_id, "--action", action, "--seq", seq])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // C: the current state, then the freeze and the unfreeze, in order.
    let exe = compile("watch", dir.path());
    let mut child = Command::new(&exe)
        .arg("3")
        .env("KOOAGENT_SOCKET", &a.socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its first line (the current state) means it is subscribed before anything changes.
    let mut c_out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut c_lines = vec![String::new()];
    std::io::BufRead::read_line(&mut c_out, &mut c_lines[0]).unwrap();
    // Rust: the same stream through kooagent-client.
    let mut w = kooagent_client::Client::new(&a.socket)
        .watch(json!({}))
        .unwrap();
    let first = w.next_event().unwrap();
    assert_eq!(first["state"], json!("active"), "{first}");
    a.call("token.apply", json!({"token": token("freeze", "1")}))
        .unwrap();
    let ev = w.next_event().unwrap();
    assert_eq!(ev["state"], json!("frozen"), "{ev}");
    a.call("token.apply", json!({"token": token("unfreeze", "2")}))
        .unwrap();
    let ev = w.next_event().unwrap();
    assert_eq!(ev["state"], json!("active"), "{ev}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut c_out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    c_lines.extend(rest.lines().map(str::to_owned));
    let states: Vec<String> = c_lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(states, ["active", "frozen", "active"]);
}

#[test]
fn python_example_uses_only_the_standard_library() {
    let (a, _seller) = licensed_agent();
    let script = format!("{ROOT}/examples/python/check.py");
    let out = run(
        Command::new("python3").args(["-I", &script, "sku-sdk", "export", "api", "2"]),
        &a,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("state: valid allowed: True"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("recorded api 2"), "{}", text(&out));
    let out = run(
        Command::new("python3").args(["-I", &script, "nothing-here"]),
        &a,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn shell_example_with_socat() {
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed (scripts/deps.sh installs it)");
        return;
    }
    let (a, _seller) = licensed_agent();
    let script = format!("{ROOT}/examples/shell/check.sh");
    let out = run(Command::new("sh").args([&script, "sku-sdk", "export"]), &a);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = run(Command::new("sh").args([&script, "sku-sdk", "sso"]), &a);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = run(Command::new("sh").args([&script, "none"]), &a);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn rust_client_survives_an_agent_restart() {
    let (mut a, _seller) = licensed_agent();
    let mut c = kooagent_client::Client::new(&a.socket);
    let check = c.check("sku-sdk", Some("export")).unwrap();
    assert_eq!((check.state.as_str(), check.allowed), ("valid", true));
    assert_eq!(check.features, vec!["export".to_string()]);
    a.stop();
    a.spawn(&[]);
    // Same client object: it reconnects by itself; a read-only check is simply sent again.
    let check = c.check("sku-sdk", None).unwrap();
    assert!(check.allowed, "{check:?}");
    let none = c.check("other", None).unwrap();
    assert_eq!((none.state.as_str(), none.allowed), ("no_license", false));
    c.record_usage("api", "0.25").unwrap();
    let e = c.record_usage("api", "-1").unwrap_err();
    assert_eq!(e.code(), Some("invalid_value"), "{e}");
}

/// The seller application examples (Python and C, issue 20): serve while licensed,
/// record usage while serving, stop at once on a freeze and resume on an unfreeze.
fn seller_app_follows_the_license(app: &mut Command) {
    use std::io::BufRead;
    let (a, seller) = licensed_agent();
    let lic_id = a
        .call("license.check", json!({"product": "sku-sdk"}))
        .unwrap()["license_id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = |action: &str, seq: &str| {
        let out = Command::new(BIN)
            .args(["seller", "token", "--key"])
            .arg(&seller.key)
            .args(["--license", &lic_id, "--action", action, "--seq", seq])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let mut child = app
        .args(["sku-sdk", "api"])
        .env("KOOAGENT_SOCKET", &a.socket)
        .env("SELLER_APP_INTERVAL", "0.05")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
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
    let mut seen = vec![];
    let mut expect = |want: &str| loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no {want:?} from the app; so far: {seen:?}"));
        seen.push(line.clone());
        if line.starts_with(want) {
            return;
        }
    };
    let recorded = |a: &TestAgent| {
        let st = a.call("usage.status", json!({})).unwrap();
        st["totals"]["api"]["value"]
            .as_str()
            .map(|v| v.parse::<f64>().unwrap())
            .unwrap_or(0.0)
    };
    expect("serving (license ");
    expect("recording usage of api");
    a.call("token.apply", json!({"token": token("freeze", "1")}))
        .unwrap();
    expect("not serving: frozen");
    // Frozen: nothing more is recorded (the app's loop runs every 50 ms).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let at_freeze = recorded(&a);
    assert!(at_freeze >= 1.0, "usage was recorded while serving");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(recorded(&a), at_freeze, "usage recorded while frozen");
    a.call("token.apply", json!({"token": token("unfreeze", "2")}))
        .unwrap();
    expect("serving (license ");
    let t0 = std::time::Instant::now();
    while recorded(&a) <= at_freeze {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "no usage after unfreeze"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn python_seller_app_serves_meters_and_follows_freezes() {
    seller_app_follows_the_license(
        Command::new("python3").arg(format!("{ROOT}/examples/python/seller_app.py")),
    );
}

#[test]
fn c_seller_app_serves_meters_and_follows_freezes() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile("seller_app", dir.path());
    seller_app_follows_the_license(&mut Command::new(exe));
}
