//! The authorization-code relay end to end: a test device signs its calls as the relay
//! protocol says (written here from the protocol text, not with the server's code) →
//! the real `kooagent seller serve` → the KooGallery stand-in of `authcode.rs`, which
//! checks the seller's AK/SK signature on every forwarded request. On SQLite, and on
//! PostgreSQL when KOOAGENT_TEST_PG_URL is set.

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use kooagent::authcode::api::{self, CodeStatus};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::authcode::{Market, AK, SK};
use crate::harness::{short_tempdir, BIN};
use crate::seller_server::{storages, write_private, SellerServer};

pub struct Device(pub SigningKey);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn random_nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Device {
    pub fn new() -> Device {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).unwrap();
        Device(SigningKey::from_bytes(&seed))
    }

    /// The four headers over `"kooagent-relay-v1\n" METHOD "\n" PATH "\n" ts "\n" nonce
    /// "\n" hex(sha256(body))`.
    fn headers(&self, path: &str, body: &[u8], ts: i64, nonce: &str) -> Vec<(String, String)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let digest: String = Sha256::digest(body)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        let signed = format!("kooagent-relay-v1\nPOST\n{path}\n{ts}\n{nonce}\n{digest}");
        vec![
            (
                "X-Kooagent-Device-Key".into(),
                b64.encode(self.0.verifying_key().as_bytes()),
            ),
            ("X-Kooagent-Ts".into(), ts.to_string()),
            ("X-Kooagent-Nonce".into(), nonce.into()),
            (
                "X-Kooagent-Signature".into(),
                b64.encode(self.0.sign(signed.as_bytes()).to_bytes()),
            ),
        ]
    }
}

fn send(
    server: &SellerServer,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, raw) = server.request_with("POST", path, headers, body);
    (status, String::from_utf8(raw).unwrap())
}

/// A fresh, correctly signed call from an enrolled device.
pub fn call(server: &SellerServer, dev: &Device, ep: &str, body: &Value) -> (u16, String) {
    call_as(server, dev, ep, body, true)
}

pub fn code_of(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    v["error_code"].as_str().unwrap_or_default().to_string()
}

pub fn start(market: &Market, storage: &str, dir: &std::path::Path) -> SellerServer {
    start_with(market, storage, "", dir)
}

/// The same with `tail` (TOML tables such as `[seller_server.limits]`) after the keys.
pub fn start_with(
    market: &Market,
    storage: &str,
    tail: &str,
    dir: &std::path::Path,
) -> SellerServer {
    let aksk = dir.join("aksk");
    write_private(&aksk, &format!("{AK}\n{SK}\n"));
    let server = SellerServer::start(&format!(
        "{storage}aksk_file = \"{}\"\nmarketplace_bases = [\"https://localhost:{}\"]\n\
         marketplace_extra_ca_file = \"{}\"\n{tail}",
        aksk.display(),
        market.primary,
        market.ca.pem_path.display()
    ));
    // The seller's enrollment token: test devices present it (docs/seller-server.md).
    let out = crate::harness::run_ok(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(server.dir.path().join("seller.toml"))
            .args([
                "seller", "enroll", "create", "--label", "tests", "--quota", "1000",
            ]),
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    write_private(&enrollment_file(&server), &format!("{token}\n"));
    server
}

/// Where `start` left the server's enrollment token.
pub fn enrollment_file(server: &SellerServer) -> std::path::PathBuf {
    server.dir.path().join("enrollment.token")
}

/// A signed call presenting the enrollment token (or not).
pub fn call_as(
    server: &SellerServer,
    dev: &Device,
    ep: &str,
    body: &Value,
    enroll: bool,
) -> (u16, String) {
    let path = format!("/v1/authcode/{ep}");
    let body = body.to_string();
    let mut h = dev.headers(&path, body.as_bytes(), now_ms(), &random_nonce());
    // (A server started without the relay has no token.)
    if let Some(token) = enroll
        .then(|| std::fs::read_to_string(enrollment_file(server)).ok())
        .flatten()
    {
        h.push(("X-Kooagent-Enrollment".into(), token.trim().to_string()));
    }
    send(server, &path, &h, body.as_bytes())
}

#[test]
fn relay_forwards_signed_calls_and_binds_each_code_to_its_first_device() {
    for storage in storages() {
        relay_round(&storage);
    }
}

fn relay_round(storage: &str) {
    let market = Market::start();
    market.add("CODE-1", true);
    market.add("CODE-2", true);
    let dir = short_tempdir();
    let server = start(&market, storage, dir.path());
    let (a, b) = (Device::new(), Device::new());
    let forwarded = || market.seen().len();
    let mut answers = Vec::new();

    // Activation: forwarded with the seller's AK/SK (the stand-in verifies it), the
    // marketplace's answer unchanged.
    let (status, text) = call(&server, &a, "activate", &json!({"license": "CODE-1"}));
    assert_eq!(
        (status, code_of(&text)),
        (200, api::SUCCESS.into()),
        "{text}"
    );
    let act = api::parse_activate(status, &text).unwrap();
    assert_eq!(act.info.unwrap().status, "ALIVE");
    let seen = market.seen();
    assert_eq!(
        (seen.len(), seen[0].path.as_str(), seen[0].answer.as_str()),
        (1, api::PATH_ACTIVATE, api::SUCCESS)
    );
    answers.push(text);

    // The daily query and the usage report from the same device.
    let (status, text) = call(&server, &a, "heartbeat", &json!({"license": "CODE-1"}));
    let info = api::parse_heartbeat(status, &text).unwrap();
    assert_eq!(info.status, CodeStatus::Alive, "{text}");
    answers.push(text);
    let usage = json!({"usage_info": [{"license": "CODE-1",
        "software_usage_Info": [{"id": "client-1"}, {"id": "client-2"}]}]});
    let (status, text) = call(&server, &a, "usage", &usage);
    api::parse_usage(status, &text).unwrap();
    assert_eq!(
        market.with(|s| s.ids["CODE-1"].len()),
        2,
        "the usage reached the marketplace"
    );
    answers.push(text);
    assert_eq!(forwarded(), 3);

    // Another device: refused for that code, whatever the call, and nothing is forwarded.
    for (ep, body) in [
        ("heartbeat", json!({"license": "CODE-1"})),
        ("activate", json!({"license": "CODE-1"})),
        ("usage", usage.clone()),
    ] {
        let (status, text) = call(&server, &b, ep, &body);
        assert_eq!(
            (status, code_of(&text)),
            (403, "KOOAGENT.RELAY.0403".into()),
            "{ep}: {text}"
        );
        answers.push(text);
    }
    // A code nobody activated through the relay: no query, no usage for it.
    let (status, text) = call(&server, &b, "heartbeat", &json!({"license": "CODE-2"}));
    assert_eq!(status, 403, "{text}");
    assert_eq!(forwarded(), 3);

    // The same device activating again (its first answer lost): the marketplace says
    // 92020003, the relay queries the code and answers the activation as recovered.
    let (status, text) = call(&server, &a, "activate", &json!({"license": "CODE-1"}));
    assert_eq!(
        (status, code_of(&text)),
        (200, api::SUCCESS.into()),
        "{text}"
    );
    let act = api::parse_activate(status, &text).unwrap();
    assert!(act.recovered, "{text}");
    assert_eq!(forwarded(), 5, "the activation and the query");

    // B takes CODE-2, and A is then refused on it.
    let (status, text) = call(&server, &b, "activate", &json!({"license": "CODE-2"}));
    assert_eq!(code_of(&text), api::SUCCESS, "{status} {text}");
    let (status, _) = call(&server, &a, "heartbeat", &json!({"license": "CODE-2"}));
    assert_eq!(status, 403);
    // Usage naming both codes needs both bound to the caller.
    let both = json!({"usage_info": [
        {"license": "CODE-1", "software_usage_Info": [{"active_num": 3}]},
        {"license": "CODE-2", "software_usage_Info": [{"active_num": 4}]}]});
    assert_eq!(call(&server, &a, "usage", &both).0, 403);
    assert_eq!(forwarded(), 6);

    // A replayed request (same nonce, same signature) is refused.
    let path = "/v1/authcode/heartbeat";
    let body = json!({"license": "CODE-1"}).to_string();
    let h = a.headers(path, body.as_bytes(), now_ms(), &random_nonce());
    assert_eq!(send(&server, path, &h, body.as_bytes()).0, 200);
    let (status, text) = send(&server, path, &h, body.as_bytes());
    assert_eq!(
        (status, code_of(&text)),
        (401, "KOOAGENT.RELAY.0401".into())
    );
    assert!(text.contains("nonce"), "{text}");
    // Stale or future timestamps, a body or path other than the signed one, no headers.
    for ts in [now_ms() - 301_000, now_ms() + 301_000] {
        let h = a.headers(path, body.as_bytes(), ts, &random_nonce());
        let (status, text) = send(&server, path, &h, body.as_bytes());
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("clock"), "{text}");
    }
    let h = a.headers(path, body.as_bytes(), now_ms(), &random_nonce());
    let other = json!({"license": "CODE-2"}).to_string();
    assert_eq!(send(&server, path, &h, other.as_bytes()).0, 401);
    assert_eq!(
        send(&server, "/v1/authcode/activate", &h, body.as_bytes()).0,
        401
    );
    assert_eq!(send(&server, path, &[], body.as_bytes()).0, 401);
    // A body the open API would refuse never leaves.
    let bad = json!({"license": "CODE-1", "extra": 1});
    let (status, text) = call(&server, &a, "heartbeat", &bad);
    assert_eq!(
        (status, code_of(&text)),
        (400, "KOOAGENT.RELAY.0400".into())
    );
    assert_eq!(forwarded(), 7);
    assert_eq!(server.request("GET", path, b"").0, 405);
    assert_eq!(server.request("POST", "/v1/authcode/other", b"{}").0, 404);

    // The marketplace cannot be reached: 502.
    market.with(|s| s.primary_down = true);
    let (status, text) = call(&server, &a, "heartbeat", &json!({"license": "CODE-1"}));
    assert_eq!(
        (status, code_of(&text)),
        (502, "KOOAGENT.RELAY.0502".into()),
        "{text}"
    );
    assert!(text.contains("marketplace unreachable"), "{text}");
    answers.push(text);

    market.assert_no_violations();
    let log = server.log();
    for secret in [AK, SK] {
        assert!(!log.contains(secret), "the log shows the AK/SK:\n{log}");
        assert!(answers.iter().all(|a| !a.contains(secret)));
    }
}

#[test]
fn without_an_aksk_file_there_is_no_relay() {
    let server = SellerServer::start("");
    let dev = Device::new();
    let (status, _) = call(&server, &dev, "activate", &json!({"license": "C"}));
    assert_eq!(status, 404);
}

#[test]
fn serve_refuses_a_readable_aksk_file_without_showing_it() {
    let dir = short_tempdir();
    let aksk = dir.path().join("aksk");
    std::fs::write(&aksk, format!("{AK}\n{SK}\n")).unwrap();
    std::fs::set_permissions(&aksk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server_dir = short_tempdir();
    let d = server_dir.path();
    let out = std::process::Command::new(BIN)
        .args(["seller", "keygen", "--out"])
        .arg(d.join("s.key"))
        .output()
        .unwrap();
    assert!(out.status.success());
    write_private(&d.join("ik"), "k");
    let cfg = d.join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "[seller_server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{d}/c\"\nkey_file = \"{d}/k\"\n\
             signing_key_file = \"{d}/s.key\"\ninterconnection_key_file = \"{d}/ik\"\n\
             state_dir = \"{d}/state\"\naksk_file = \"{a}\"\n\
             [[seller_server.products]]\npath = \"/p\"\nproduct = \"x\"\n",
            d = d.display(),
            a = aksk.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["seller", "serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("seller_server.aksk_file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(SK) && !err.contains(AK), "{err}");
}

/// The whole relay path with the real pieces: an agent in relay mode → `kooagent seller
/// serve` (signing with the AK/SK only it holds) → the marketplace stand-in.
#[test]
fn a_real_agent_in_relay_mode_activates_and_reports_through_the_seller_server() {
    let market = Market::start();
    market.add("CODE-E2E", true);
    let dir = crate::harness::short_tempdir();
    let server = start(&market, "", dir.path());
    let agent_config = format!(
        "[authcode]\nmode = \"relay\"\nrelay_url = \"https://localhost:{}\"\nextra_ca_file = \"{}\"\n\
         enrollment_token_file = \"{}\"\n[authcode.products]\n\"12345\" = \"myapp\"\n",
        server.port,
        server.ca_pem.display(),
        enrollment_file(&server).display()
    );
    let a = crate::harness::TestAgent::start(&agent_config);
    let v = a
        .call("license.activate", json!({"code": "CODE-E2E"}))
        .unwrap_or_else(|e| panic!("activate through the relay: {e}\n{}", server.log()));
    assert_eq!(v["state"], "valid", "{v}");
    let c = a
        .call("license.check", json!({"product": "myapp"}))
        .unwrap();
    assert_eq!(
        (c["state"].as_str(), c["allowed"].as_bool()),
        (Some("valid"), Some(true)),
        "{c}"
    );
    a.call(
        "authcode.client_seen",
        json!({"product": "myapp", "client": "user-7"}),
    )
    .unwrap();
    a.call("authcode.sync", json!({})).unwrap();
    assert!(market.with(|s| s.ids["CODE-E2E"].contains("user-7")));
    // Another device cannot take the code through the relay.
    let b = crate::harness::TestAgent::start(&agent_config);
    let e = b
        .call("license.activate", json!({"code": "CODE-E2E"}))
        .unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("another device"),
        "{e}"
    );
    // The AK/SK never reached the device side.
    assert!(!a.log().contains(SK) && !b.log().contains(SK));
    market.assert_no_violations();
}

/// Issue 13 item 6: `getLicenseAsync` with `license_upload` on. The license is answered
/// as always, and uploaded from the outbox to the stand-in's (unconfirmed) upload API,
/// AK/SK-signed; a failed attempt is retried after the configured backoff.
#[test]
fn async_licenses_are_uploaded_and_retried() {
    let market = Market::start();
    let dir = short_tempdir();
    let server = start(
        &market,
        "license_upload = true\nlicense_upload_retry_secs = 1\n",
        dir.path(),
    );
    // The first attempt fails (the marketplace has an internal error).
    market.with(|s| s.inject = Some((500, "92020001".into())));
    let code = a_device_code();
    let now = now_ms() / 1000;
    let (_, v) = server.market(&json!({
        "activity": "getLicenseAsync", "instanceId": "RA2-ASYNC-1", "eventId": "8e5694c8-async-1",
        "effectiveTime": kooagent::clock::format_rfc3339(now - 60).replace('T', " ").replace('Z', " z"),
        "deviceFingerprint": code
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    let license = v["license"].as_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    while market.with(|s| s.uploads.is_empty()) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no upload; log:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (path, body) = market.with(|s| s.uploads[0].clone());
    assert_eq!(
        path,
        "/api/mkp-openapi-public/global/v1/market-event/8e5694c8-async-1/file"
    );
    assert_eq!(body["content"], license.as_str());
    let log = server.log();
    assert!(log.contains("attempt 1 failed"), "{log}");
    // Uploaded once: the outbox row is done.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(market.with(|s| s.uploads.len()), 1);
    assert!(
        server.log().contains("uploaded after 2 attempt(s)"),
        "{}",
        server.log()
    );
    let v = outbox(&server);
    assert_eq!(v["license_uploads"]["delivered"], 1, "{v}");
    let row = &v["license_uploads"]["rows"][0];
    assert_eq!(row["event_id"], "8e5694c8-async-1", "{v}");
    assert_eq!(row["state"], "delivered", "{v}");
    assert_eq!(row["attempts"], 2, "{v}");
    assert!(row["delivered_at"].is_string(), "{v}");
    market.assert_no_violations();
}

/// A valid device code (the last character is a check character).
fn a_device_code() -> String {
    let code = "AAAA-BBBB-CCCC-DDDD-EEEE";
    (0..32)
        .map(|i| "0123456789ABCDEFGHJKMNPQRSTVWXYZ".as_bytes()[i] as char)
        .find_map(|c| kooagent::device_code::parse_code(&format!("{}{c}", &code[..23])).ok())
        .unwrap()
}

/// `kooagent seller outbox --json` against the server's database.
fn outbox(server: &SellerServer) -> Value {
    let out = crate::harness::run_ok(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(server.dir.path().join("seller.toml"))
            .args(["seller", "outbox", "--json"]),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Issue 13 item 6: the outbox's status command shows an upload the marketplace keeps
/// refusing as retrying, with its attempts, last error and next try (and the text form
/// one line per upload).
#[test]
fn seller_outbox_shows_a_failing_upload_with_its_error() {
    let market = Market::start();
    let dir = short_tempdir();
    let server = start(
        &market,
        "license_upload = true\nlicense_upload_retry_secs = 3600\n",
        dir.path(),
    );
    let v = outbox(&server);
    assert_eq!(v["license_uploads"]["not_delivered"], 0, "{v}");
    assert_eq!(v["usage_records"]["parked"], 0, "{v}");
    market.with(|s| s.inject = Some((500, "92020001".into())));
    let now = now_ms() / 1000;
    let (_, a) = server.market(&json!({
        "activity": "getLicenseAsync", "instanceId": "RA2-ASYNC-2", "eventId": "ev-outbox-2",
        "effectiveTime": kooagent::clock::format_rfc3339(now - 60).replace('T', " ").replace('Z', " UTC"),
        "deviceFingerprint": a_device_code()
    }));
    assert_eq!(a["resultCode"], "000000", "{a}");
    let t0 = std::time::Instant::now();
    while !server.log().contains("attempt 1 failed") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let v = outbox(&server);
    assert_eq!(v["license_uploads"]["not_delivered"], 1, "{v}");
    let row = &v["license_uploads"]["rows"][0];
    assert_eq!(row["instance_id"], "RA2-ASYNC-2", "{v}");
    assert_eq!(row["state"], "retrying", "{v}");
    assert_eq!(row["attempts"], 1, "{v}");
    assert!(
        row["last_error"].as_str().unwrap().contains("HTTP 500"),
        "{v}"
    );
    let next = kooagent::clock::parse_rfc3339(row["next_try"].as_str().unwrap()).unwrap();
    assert!((3500..3700).contains(&(next - now)), "{v}");
    assert!(!v.to_string().contains("kl1."), "license text listed: {v}");
    let out = crate::harness::run_ok(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(server.dir.path().join("seller.toml"))
            .args(["seller", "outbox"]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("license uploads: 1 not delivered, 0 delivered"),
        "{text}"
    );
    assert!(
        text.contains("ev-outbox-2\tRA2-ASYNC-2\tretrying\t1\t"),
        "{text}"
    );
}
