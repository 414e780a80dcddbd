//! Offline licenses end to end: the seller's CLI issues, the agent verifies, installs,
//! answers `license.check`, follows the licenses directory and time boundaries, and
//! notices a clock turned back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::docs::block;
use crate::harness::{base_config, run_ok, short_tempdir, TestAgent, BIN};

/// A seller: a key pair made with `kooagent seller keygen`.
pub(crate) struct Seller {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) key: PathBuf,
    trust: String,
}

impl Seller {
    pub(crate) fn new() -> Seller {
        let dir = short_tempdir();
        let key = dir.path().join("seller.key");
        run_ok(
            Command::new(BIN)
                .args(["seller", "keygen", "--out"])
                .arg(&key),
        );
        let trust = std::fs::read_to_string(dir.path().join("seller.key.pub"))
            .unwrap()
            .trim()
            .to_string();
        Seller { dir, key, trust }
    }

    pub(crate) fn config(&self) -> String {
        format!("[license]\ntrusted_keys = [\"{}\"]\n", self.trust)
    }

    /// `kooagent seller issue --key K <args>`: the license text.
    pub(crate) fn issue(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(BIN)
                .args(["seller", "issue", "--key"])
                .arg(&self.key)
                .args(args),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A license bound to `code` for `product` (instance "i"), plus `extra` flags.
    pub(crate) fn bound(&self, code: &str, product: &str, extra: &[&str]) -> String {
        let base = [
            "--device-code",
            code,
            "--product",
            product,
            "--instance",
            "i",
        ];
        self.issue(&[&base[..], extra].concat())
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub(crate) fn device_code(a: &TestAgent) -> String {
    a.call("device.code", json!({})).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string()
}

pub(crate) fn utc_in(secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    kooagent::clock::format_rfc3339(now + secs)
}

pub(crate) fn check(a: &TestAgent, product: &str) -> Value {
    a.call("license.check", json!({"product": product}))
        .unwrap_or_else(|e| panic!("license.check {product}: {e}"))
}

/// Waits (generously; the machine is shared) until `product`'s state is `want`.
pub(crate) fn wait_state(a: &TestAgent, product: &str, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        if let Ok(v) = a.call("license.check", json!({"product": product})) {
            if v["state"] == want {
                return v;
            }
            if t0.elapsed() > Duration::from_secs(15) {
                panic!("{product} still {v} after 15 s; log:\n{}", a.log());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn install(a: &TestAgent, text: &str) -> Result<Value, Value> {
    a.call("license.install", json!({"text": text}))
}

fn installed_files(state: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state.join("licenses"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        // Hidden files are the agent's own (the freeze state's second copy).
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn issue_install_check_with_entitlements() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let text = seller.issue(&[
        "--device-code",
        &code,
        "--product",
        "sku-pro",
        "--instance",
        "inst-1",
        "--days",
        "30",
        "--grace-days",
        "7",
        "--feature",
        "export",
        "--feature",
        "sso",
        "--limit",
        "cores=8",
        "--limit",
        "users=100",
        "--meta",
        "order=CS1",
        "--id",
        "L-100",
    ]);
    let file = seller.write("pro.lic", &text);
    let out = a.cli(&["license", "install", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("L-100 installed") && said.contains("valid"),
        "{said}"
    );
    // Bytes kept exactly.
    assert_eq!(
        std::fs::read_to_string(a.state.join("licenses/L-100.lic")).unwrap(),
        text
    );

    let v = check(&a, "sku-pro");
    assert_eq!(v["state"], "valid");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["license_id"], "L-100");
    assert_eq!(v["instance"], "inst-1");
    assert_eq!(v["features"], json!(["export", "sso"]));
    assert_eq!(v["limits"], json!({"cores": 8, "users": 100}));
    let days = v["days_left"].as_i64().unwrap();
    assert!((29..=30).contains(&days), "{v}");

    let v = a
        .call(
            "license.check",
            json!({"product": "sku-pro", "feature": "sso"}),
        )
        .unwrap();
    assert_eq!(v["feature"], json!({"name": "sso", "granted": true}));
    assert_eq!(v["allowed"], true);
    let v = a
        .call(
            "license.check",
            json!({"product": "sku-pro", "feature": "audit"}),
        )
        .unwrap();
    assert_eq!(v["feature"]["granted"], false);
    assert_eq!(v["allowed"], false);
    assert_eq!(v["state"], "valid");
    let out = a.cli(&["license", "check", "sku-pro", "--feature", "audit"]);
    assert_eq!(out.status.code(), Some(2));

    let e = a
        .call("license.check", json!({"product": "sku-basic"}))
        .unwrap_err();
    assert_eq!(e["code"], "no_license");
    let e = a.call("license.check", json!({"sku": "x"})).unwrap_err();
    assert_eq!(e["code"], "invalid_params");

    let s = a.call("license.status", json!({})).unwrap();
    assert_eq!(s["licenses"][0]["license_id"], "L-100");
    assert_eq!(s["licenses"][0]["state"], "valid");
    assert_eq!(s["licenses"][0]["meta"], json!({"order": "CS1"}));
    assert_eq!(s["clock_rollback"], false);

    let status = a.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("trusted time:") && text.contains("clock OK"),
        "{text}"
    );

    // Reinstalling the same bytes is a no-op; removing works.
    assert_eq!(
        install(&a, &v_text(&a, "L-100")).unwrap()["action"],
        "unchanged"
    );
    a.call("license.remove", json!({"license_id": "L-100"}))
        .unwrap();
    assert_eq!(
        a.call("license.check", json!({"product": "sku-pro"}))
            .unwrap_err()["code"],
        "no_license"
    );
    assert!(installed_files(&a.state).is_empty());
}

fn v_text(a: &TestAgent, id: &str) -> String {
    std::fs::read_to_string(a.state.join(format!("licenses/{id}.lic"))).unwrap()
}

#[test]
fn license_for_another_device_is_wrong_device() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let text = seller.issue(&[
        "--device-code",
        "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZT",
        "--product",
        "p",
        "--instance",
        "i",
        "--days",
        "10",
    ]);
    let r = install(&a, &text).unwrap();
    assert_eq!(r["state"], "wrong_device");
    let v = check(&a, "p");
    assert_eq!(v["state"], "wrong_device");
    assert_eq!(v["allowed"], false);
    assert!(v["reason"].as_str().unwrap().contains("ZZZZ-ZZZZ"), "{v}");
    // An explicitly unbound license runs anywhere.
    let text = seller.issue(&[
        "--unbound",
        "--product",
        "p",
        "--instance",
        "i",
        "--perpetual",
        "--id",
        "any",
    ]);
    install(&a, &text).unwrap();
    let v = check(&a, "p");
    assert_eq!(
        (v["state"].as_str(), v["license_id"].as_str()),
        (Some("valid"), Some("any"))
    );
    assert_eq!(v["days_left"], Value::Null);
}

#[test]
fn bad_licenses_never_displace_a_good_one() {
    let seller = Seller::new();
    let other = Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let args = [
        "--device-code",
        code.as_str(),
        "--product",
        "p",
        "--instance",
        "i",
        "--days",
        "10",
        "--id",
        "L-1",
        "--issued-at",
    ];
    let good = seller.issue(&[&args[..], &[utc_in(-100).as_str()]].concat());
    install(&a, &good).unwrap();

    let mut tampered = good.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let older = seller.issue(&[&args[..], &[utc_in(-200).as_str()]].concat());
    let foreign = other.issue(&[&args[..], &[utc_in(-50).as_str()]].concat());
    let cases: Vec<(String, &str, &str)> = vec![
        (tampered, "", ""),
        (
            good[..good.len() / 2].to_string(),
            "malformed_license",
            "truncated",
        ),
        (good.replacen("kl1.", "kl7.", 1), "malformed_license", "kl7"),
        (good.replacen('.', ".!", 1), "malformed_license", "base64"),
        (foreign, "untrusted_key", "not among the trusted keys"),
        (older, "stale_license", "older than the installed copy"),
    ];
    for (text, code, words) in cases {
        let e = install(&a, &text).unwrap_err();
        if !code.is_empty() {
            assert_eq!(e["code"], code, "{e}");
            assert!(e["message"].as_str().unwrap().contains(words), "{e}");
        } else {
            assert!(
                matches!(
                    e["code"].as_str(),
                    Some("bad_signature" | "malformed_license")
                ),
                "{e}"
            );
        }
    }
    let e = a
        .call("license.install", json!({"text": good, "product": "other"}))
        .unwrap_err();
    assert_eq!(e["code"], "wrong_product");
    // Not UTF-8 and oversized are refused by the CLI before they reach the agent.
    let bin = seller.dir.path().join("bin.lic");
    std::fs::write(&bin, b"kl1.\xff\xfe").unwrap();
    let out = a.cli(&["license", "install", bin.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not UTF-8"),
        "{out:?}"
    );
    let big = seller.dir.path().join("big.lic");
    std::fs::write(&big, vec![b'k'; 2 << 20]).unwrap();
    let out = a.cli(&["license", "install", big.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 MiB"),
        "{out:?}"
    );
    // Bad files dropped into the directory, even over the installed one, change nothing.
    std::fs::write(a.state.join("licenses/L-1.lic"), b"garbage").unwrap();
    std::fs::write(a.state.join("licenses/x.lic"), b"kl1.AAAA").unwrap();
    let t0 = Instant::now();
    while !a.state.join("licenses/x.lic.rejected").exists() {
        assert!(t0.elapsed() < Duration::from_secs(15), "{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    while std::fs::read_to_string(a.state.join("licenses/L-1.lic")).unwrap() != good {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not restored: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(check(&a, "p")["state"], "valid");
    let s = a.call("license.status", json!({})).unwrap();
    assert_eq!(s["licenses"].as_array().unwrap().len(), 1);
    assert!(s["rejected"].as_array().unwrap().len() >= 2, "{s}");
    assert!(a.log().contains("L-1.lic refused"), "{}", a.log());
}

#[test]
fn dropped_file_is_picked_up_and_restart_keeps_licenses() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    for (product, id) in [("alpha", "A-1"), ("beta", "B-1")] {
        let text = seller.bound(&code, product, &["--days", "5", "--id", id]);
        if product == "alpha" {
            install(&a, &text).unwrap();
        } else {
            // Written elsewhere, then moved in (as an operator or a config tool would).
            let tmp = a.state.join("incoming.tmp");
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, a.state.join("licenses/from-mail.lic")).unwrap();
        }
    }
    wait_state(&a, "beta", "valid");
    assert_eq!(check(&a, "alpha")["state"], "valid");
    assert_eq!(installed_files(&a.state), vec!["A-1.lic", "B-1.lic"]);

    a.stop();
    a.spawn(&[]);
    assert_eq!(check(&a, "alpha")["state"], "valid");
    assert_eq!(check(&a, "beta")["state"], "valid");
    // Deleting the file removes the license without a restart.
    std::fs::remove_file(a.state.join("licenses/B-1.lic")).unwrap();
    let t0 = Instant::now();
    while a.call("license.check", json!({"product": "beta"})).is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(15), "{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn expiry_is_noticed_without_being_asked() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let soon = utc_in(4);
    let text = seller.bound(
        &code,
        "p",
        &[
            "--not-after",
            &soon,
            "--not-before",
            &utc_in(-60),
            "--grace-secs",
            "3",
        ],
    );
    let r = install(&a, &text).unwrap();
    // On a very slow machine it may already be in grace; never expired this early.
    assert!(
        matches!(r["state"].as_str(), Some("valid" | "grace")),
        "{r}"
    );
    let v = wait_state(&a, "p", "grace");
    assert_eq!(v["allowed"], true);
    assert!(v["secs_left"].as_i64().unwrap() <= 3, "{v}");
    // Grace over: the lifecycle freezes it (docs/freeze.md), saying why and since when.
    let v = wait_state(&a, "p", "frozen");
    assert_eq!(v["allowed"], false);
    assert!(
        v["reason"].as_str().unwrap().contains("grace period ended"),
        "{v}"
    );
    assert!(v["since"].is_string(), "{v}");
}

/// Issue 13 items 12 and 13: a license whose `devices` hold the code as a buyer typed
/// it (lower case, spaces) is this device's; identical bytes again are `unchanged`; a
/// license over the socket's line limit is sent to the licenses directory by the CLI.
#[test]
fn typed_codes_identical_reinstalls_and_oversized_licenses() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let key = kooagent_seller::issue::read_signing_key(&seller.key).unwrap();
    let base =
        kooagent::license::format::parse(seller.bound(&code, "p", &["--days", "30"]).as_bytes())
            .unwrap()
            .license;
    let mut lic = base.clone();
    lic.id = "typed".into();
    lic.devices = vec![format!(" {} ", code.to_lowercase().replace('-', " "))];
    let text = kooagent::license::format::sign(&lic, &key).unwrap();
    let r = install(&a, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r["action"].as_str(), r["state"].as_str()),
        (Some("installed"), Some("valid")),
        "{r}"
    );
    let r = install(&a, &text).unwrap();
    assert_eq!(r["action"], "unchanged", "{r}");
    // The same license as the seller server's JSON carries it, without the file's final
    // newline (or with Windows line ends): still the same license.
    for same in [text.trim_end().to_string(), text.replace('\n', "\r\n")] {
        let r = install(&a, &same).unwrap();
        assert_eq!(r["action"], "unchanged", "{r}");
    }
    // The same through the CLI, from a file, twice.
    let f = seller.write("typed.lic", &text);
    for _ in 0..2 {
        let out = a.cli(&["license", "install", f.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("unchanged"), "{said}");
    }

    // 64 device codes of 1,000 characters: a valid license of about 90 KB.
    let mut big = base.clone();
    big.id = "big".into();
    big.devices = (0..63)
        .map(|i| format!("OTHER{i:02}-{}", "X".repeat(990)))
        .chain([code.clone()])
        .collect();
    let text = kooagent::license::format::sign(&big, &key).unwrap();
    assert!(text.len() > 64 * 1024);
    let f = seller.write("big.lic", &text);
    let out = a.cli(&["license", "install", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("licenses directory") && !err.contains("answer for id"),
        "{err}"
    );
    // Where it says: the agent picks it up from there.
    std::fs::copy(&f, a.state.join("licenses").join("big.lic")).unwrap();
    let t0 = Instant::now();
    while a.call("license.status", json!({})).unwrap()["licenses"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["license_id"] != "big")
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn future_issue_time_reveals_a_rolled_back_clock() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let good = seller.bound(&code, "p", &["--days", "30", "--not-before", &utc_in(-60)]);
    install(&a, &good).unwrap();
    assert_eq!(check(&a, "p")["state"], "valid");
    // The seller's clock says three days from now: this machine's clock must be behind.
    let future = seller.bound(
        &code,
        "q",
        &[
            "--days",
            "30",
            "--issued-at",
            &utc_in(3 * 86_400),
            "--not-before",
            &utc_in(-60),
        ],
    );
    let r = install(&a, &future).unwrap();
    assert_eq!(r["state"], "clock_rollback");
    let v = check(&a, "p");
    assert_eq!(v["state"], "clock_rollback");
    assert_eq!(v["allowed"], false);
    assert!(v["reason"].as_str().unwrap().contains("behind"), "{v}");
    let s = a.call("agent.status", json!({})).unwrap();
    assert_eq!(s["license"]["clock_rollback"], true, "{s}");
    assert_eq!(s["license"]["trusted_time_source"], "license_issue_time");
    let out = a.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("CLOCK ROLLBACK"));
    // Removing the license does not forget the time it taught: the mark is persisted.
    let id = r["license_id"].as_str().unwrap().to_string();
    a.call("license.remove", json!({"license_id": id})).unwrap();
    a.stop();
    a.spawn(&[]);
    assert_eq!(check(&a, "p")["state"], "clock_rollback");
    let time: Value =
        serde_json::from_slice(&std::fs::read(a.state.join("time.json")).unwrap()).unwrap();
    assert_eq!(time["source"], "license_issue_time");
}

#[test]
fn untrusted_and_revoked_keys_after_a_reload() {
    let seller = Seller::new();
    let mut a = TestAgent::start(&seller.config());
    let code = device_code(&a);
    let text = seller.bound(&code, "p", &["--days", "3"]);
    install(&a, &text).unwrap();
    // Revoke the key and reload: the installed license reports it, and stays installed.
    let kid = seller.trust.split(':').next().unwrap();
    let revoked = format!("{}revoked_key_ids = [\"{kid}\"]\n", seller.config());
    std::fs::write(&a.config, base_config(a.dir.path(), &revoked)).unwrap();
    a.signal(libc::SIGHUP);
    let v = wait_state(&a, "p", "untrusted_key");
    assert!(v["reason"].as_str().unwrap().contains("revoked"), "{v}");
    a.stop();
    a.spawn(&[]);
    assert_eq!(check(&a, "p")["state"], "untrusted_key");
    assert_eq!(installed_files(&a.state).len(), 1);
}

#[test]
fn a_license_from_an_independent_python_issuer_verifies() {
    if !has_python_cryptography() {
        return;
    }
    let probe = TestAgent::start("");
    let code = device_code(&probe);
    drop(probe);
    let out_dir = short_tempdir();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/fixtures/issue_license.py"
    );
    run_ok(
        Command::new("python3")
            .arg(script)
            .arg(out_dir.path())
            .arg(&code)
            .arg("py-product"),
    );
    let trust = std::fs::read_to_string(out_dir.path().join("trust.txt")).unwrap();
    let a = TestAgent::start(&format!(
        "[license]\ntrusted_keys = [\"{}\"]\n",
        trust.trim()
    ));
    let lic = out_dir.path().join("license.lic");
    // The seller tool verifies it too.
    let out = a.cli(&["seller", "inspect", lic.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("signature  valid"),
        "{said}"
    );
    let out = a.cli(&["license", "install", lic.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = check(&a, "py-product");
    assert_eq!(v["state"], "valid", "{v}");
    assert_eq!(v["license_id"], "py-0001");
    assert_eq!(v["features"], json!(["python"]));
    assert_eq!(v["limits"], json!({"users": 25}));
}

/// Whether the independent Python issuer can run; says why not when it cannot.
fn has_python_cryptography() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: python3 with the cryptography package is not installed (pip install cryptography)");
    }
    ok
}

fn format_doc() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/license-format.md"
    ))
    .unwrap()
}

/// The worked example of docs/license-format.md: the documented license verifies with the
/// documented key, carries the documented payload, and the documented command reproduces
/// it byte for byte from the documented seed.
#[test]
fn documented_example_is_exact() {
    let doc = format_doc();
    let license = block(&doc, "text", "kl1.").trim().to_string();
    let trust = block(&doc, "text", "56475aa75463474c:").trim().to_string();
    let payload = block(&doc, "json", "\"kid\"").trim().to_string();
    let dir = short_tempdir();
    // The seed 00 01 .. 1f as a PKCS#8 key file.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend(0u8..32);
    use base64::Engine;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    let key = dir.path().join("example.key");
    std::fs::write(&key, pem).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cmd = block(&doc, "sh", "kooagent seller issue");
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(cmd.replace("kooagent ", &format!("{BIN} ")))
            .current_dir(dir.path()),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), license);

    let parsed = kooagent::license::format::parse(license.as_bytes()).unwrap();
    assert_eq!(String::from_utf8(parsed.payload.clone()).unwrap(), payload);
    assert_eq!(parsed.payload.len(), 388);
    let (kid, pk) = kooagent::license::keys::parse_entry(&trust).unwrap();
    assert_eq!(kid, parsed.license.key_id);
    assert!(parsed.verify(&pk));
    assert_eq!(
        kooagent_seller::issue::read_verifying_key(&key).unwrap(),
        pk,
        "the trust line belongs to the seed"
    );
}

#[test]
fn documented_python_issuer_reproduces_the_example() {
    if !has_python_cryptography() {
        return;
    }
    let doc = format_doc();
    let code = block(&doc, "python", "def issue");
    let out = run_ok(Command::new("python3").arg("-c").arg(&code));
    let license = block(&doc, "text", "kl1.").trim().to_string();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), license);
}

#[test]
fn only_root_or_the_agent_user_removes_licenses() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let seller = Seller::new();
    let a = TestAgent::start(&format!("{}[socket]\nmode = \"0666\"\n", seller.config()));
    let code = device_code(&a);
    let text = seller.bound(&code, "p", &["--days", "3", "--id", "L-keep"]);
    install(&a, &text).unwrap();
    // The socket's directory must be reachable for the other user.
    std::fs::set_permissions(
        a.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    use std::os::unix::process::CommandExt;
    let out = Command::new(BIN)
        .args(["--socket"])
        .arg(&a.socket)
        .args(["call", "license.remove", r#"{"license_id":"L-keep"}"#])
        .env("HOME", "/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("permission_denied"),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(check(&a, "p")["state"], "valid");
    // A check from that user works.
    let out = Command::new(BIN)
        .args(["--socket"])
        .arg(&a.socket)
        .args(["license", "check", "p"])
        .env("HOME", "/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_is_billed_to_the_installed_licenses_instance() {
    let seller = Seller::new();
    let a = TestAgent::start(&seller.config());
    let now = kooagent::clock::parse_rfc3339(&utc_in(0)).unwrap();
    let at = now - 7200;
    let e = a
        .call(
            "usage.record",
            json!({"meter": "api_calls", "value": "2", "at": at}),
        )
        .unwrap_err();
    assert_eq!(e["code"], json!("unknown_meter"), "{e}");
    let text = seller.issue(&[
        "--device-code",
        &device_code(&a),
        "--product",
        "sku-m",
        "--instance",
        "inst-from-license",
        "--days",
        "30",
    ]);
    install(&a, &text).unwrap();
    // One product installed: any meter name bills to its instance; PRODUCT/NAME too.
    a.call(
        "usage.record",
        json!({"meter": "api_calls", "value": "2", "at": at}),
    )
    .unwrap();
    a.call(
        "usage.record",
        json!({"meter": "sku-m/cpu", "value": "1.5", "at": at}),
    )
    .unwrap();
    let flushed = a.call("usage.flush", json!({})).unwrap();
    assert_eq!(flushed["closed_records"], json!(2), "{flushed}");
    let status = a.call("usage.status", json!({"records": true})).unwrap();
    let text = status.to_string();
    assert!(text.contains("inst-from-license"), "{status}");
    assert!(!text.contains("\"instance_id\":\"i\""), "{status}");
}

/// docs/license-format.md §10: the documented token payload is what our issuer writes, and
/// the documented Python issuer produces exactly the token our library does.
#[test]
fn documented_status_token_matches_the_python_issuer() {
    use kooagent::freeze::token::{issue, parse, Action, TokenRequest};
    let doc = format_doc();
    let req = TokenRequest {
        license_id: "L-2026-0001".into(),
        action: Action::Freeze,
        seq: 7,
        issued_at: kooagent::clock::parse_rfc3339("2027-12-09T00:00:00Z").unwrap(),
        devices: vec!["7K2M-Q9XD-4HPA-V3NE-R8T5".into()],
        reason: Some("grace period over".into()),
    };
    let key = ed25519_dalek::SigningKey::from_bytes(&std::array::from_fn(|i| i as u8));
    let token = issue(&req, &key).unwrap();
    let payload = block(&doc, "json", "\"license\":").trim().to_string();
    assert_eq!(
        String::from_utf8(parse(token.as_bytes()).unwrap().payload).unwrap(),
        payload
    );
    if !has_python_cryptography() {
        return;
    }
    let issuer = block(&doc, "python", "def issue(");
    let token_fn = block(&doc, "python", "def issue_token");
    // The §9 script's imports and key, then §10's function on the same request.
    let script = format!(
        "{}\n{token_fn}\nprint(issue_token(key, {{\"license\": \"L-2026-0001\", \"action\": \"freeze\", \"seq\": 7, \
         \"issued_at\": \"2027-12-09T00:00:00Z\", \"devices\": [\"7K2M-Q9XD-4HPA-V3NE-R8T5\"], \
         \"reason\": \"grace period over\"}}))\n",
        issuer.split("print(issue(").next().unwrap()
    );
    let out = run_ok(Command::new("python3").arg("-c").arg(&script));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), token);
}
