//! `kooagent seller call` (issue 20 item 2): the seller's own signed test call, in both
//! signature styles, against the real server; it prints the request and the answer and
//! says whether `Body-Sign` verifies.

use std::process::Command;

use crate::harness::{TestAgent, BIN};
use crate::license::device_code;
use crate::seller_server::{write_private, SellerServer};

fn call(s: &SellerServer, key: &str, args: &[&str]) -> (bool, String) {
    let d = s.dir.path();
    let out = Command::new(BIN)
        .args(["seller", "call"])
        .args(args)
        .arg("--url")
        .arg(format!("https://localhost:{}/koogallery/sku-pro", s.port))
        .arg("--key")
        .arg(d.join(key))
        .arg("--ca")
        .arg(&s.ca_pem)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn seller_call_signs_both_styles_and_checks_body_sign() {
    let s = SellerServer::start("");
    let a = TestAgent::start("");
    let code = device_code(&a);
    let d = s.dir.path();
    let lic = d.join("ordered.lic");
    let fp = format!("deviceFingerprint={code}");
    let save = format!("license={}", lic.display());
    let (ok, out) = call(
        &s,
        "interconnection.key",
        &[
            "getLicense",
            "--set",
            "instanceId=inst-call-1",
            "--set",
            "eventId=ev-call-1",
            "--set",
            "effectiveTime=2026-01-01 00:00:00 z",
            "--set",
            "expireTime=2036-01-01 00:00:00 z",
            "--set",
            &fp,
            "--save",
            &save,
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("> POST https://localhost:"), "{out}");
    assert!(
        out.contains("signature=") && out.contains("nonce="),
        "{out}"
    );
    assert!(out.contains("\"activity\":\"getLicense\""), "{out}");
    assert!(out.contains("< HTTP 200"), "{out}");
    assert!(
        out.contains("< Body-Sign: sign_type=\"HMAC-SHA256\""),
        "{out}"
    );
    assert!(out.contains("\"resultCode\":\"000000\""), "{out}");
    assert!(out.contains("Body-Sign: verifies"), "{out}");
    let text = std::fs::read_to_string(&lic).unwrap();
    assert!(text.starts_with("kl1."), "{text}");

    // The legacy style (§4.2) on the same endpoint: freeze the instance.
    let (ok, out) = call(
        &s,
        "interconnection.key",
        &[
            "updateInstanceStatus",
            "--style",
            "legacy",
            "--set",
            "instanceId=inst-call-1",
            "--set",
            "status=FREEZE",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("> GET https://localhost:"), "{out}");
    assert!(
        out.contains("timeStamp=") && out.contains("authToken="),
        "{out}"
    );
    assert!(out.contains("Body-Sign: verifies"), "{out}");
    // Fetched as a device does: signed with a device key, saying the device code.
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).unwrap();
    let device_key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let target = format!("/v1/licenses/kg-inst-call-1/status?device_code={code}");
    let (status, _, body) = s.device_get(&device_key, &target);
    assert_eq!(status, 200);
    assert!(
        body.starts_with(b"kst1."),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // A wrong key: the server refuses (000001), and its Body-Sign (made with the right
    // key) does not verify with ours; exit status 1.
    write_private(&d.join("wrong.key"), "not-the-interconnection-key\n");
    let (ok, out) = call(
        &s,
        "wrong.key",
        &["expireLicense", "--set", "instanceId=inst-call-1"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("\"resultCode\":\"000001\""), "{out}");
    assert!(out.contains("Body-Sign: DOES NOT VERIFY"), "{out}");

    // A key file anyone may read is refused before anything is sent.
    std::fs::write(d.join("open.key"), "k\n").unwrap();
    let (ok, out) = call(&s, "open.key", &["expireLicense"]);
    assert!(!ok && out.contains("chmod 600"), "{out}");
}
