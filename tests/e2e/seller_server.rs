//! The seller license server end to end: a test plays the marketplace (signing its calls
//! as koogallery.md §4.1 says, checking `Body-Sign` on every answer as §4.3 says), orders
//! a license for a real agent's device code, and the agent installs it and reports
//! `valid`; renewal reaches the agent through the download endpoint; replays and bad
//! signatures are refused; a resent order gets the same bytes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::harness::{run_ok, short_tempdir, TestAgent, BIN};

pub(crate) const KEY: &str = "test-interconnection-key-0123456789";
const PATH: &str = "/koogallery/sku-pro";

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn write_private(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A running `kooagent seller serve` with its own CA, keys and SQLite database.
pub struct SellerServer {
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub port: u16,
    pub trust: String,
    /// The CA of the server's certificate, for agents that poll it.
    pub ca_pem: PathBuf,
    roots: Arc<rustls::RootCertStore>,
}

impl SellerServer {
    pub fn start(extra: &str) -> SellerServer {
        Self::start_limited(extra, None)
    }

    /// The same, the server run with its descriptor limit (soft and hard) at `nofile`.
    pub fn start_limited(extra: &str, nofile: Option<u64>) -> SellerServer {
        let dir = short_tempdir();
        let d = dir.path();
        // The seller's license key, made with the seller's own tool.
        run_ok(
            Command::new(BIN)
                .args(["seller", "keygen", "--out"])
                .arg(d.join("seller.key")),
        );
        let trust = std::fs::read_to_string(d.join("seller.key.pub"))
            .unwrap()
            .trim()
            .to_string();
        // A CA and a certificate for localhost.
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        std::fs::write(
            d.join("tls.crt"),
            format!("{}{}", leaf.pem(), ca_cert.pem()),
        )
        .unwrap();
        write_private(&d.join("tls.key"), &leaf_key.serialize_pem());
        std::fs::write(d.join("ca.pem"), ca_cert.pem()).unwrap();
        write_private(&d.join("interconnection.key"), &format!("{KEY}\n"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let config = format!(
            "[seller_server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{d}/tls.crt\"\n\
             key_file = \"{d}/tls.key\"\nsigning_key_file = \"{d}/seller.key\"\n\
             interconnection_key_file = \"{d}/interconnection.key\"\nstate_dir = \"{d}/state\"\n\
             {extra}\n[[seller_server.products]]\npath = \"{PATH}\"\nproduct = \"sku-pro\"\n\
             grace_secs = 86400\nfeatures = [\"export\"]\n",
            d = d.display()
        );
        std::fs::write(d.join("seller.toml"), config).unwrap();
        let (child, port) = spawn(d, nofile);
        SellerServer {
            ca_pem: dir.path().join("ca.pem"),
            dir,
            child,
            port,
            trust,
            roots: Arc::new(roots),
        }
    }

    /// Another `seller serve` process with this one's keys, certificate and database (a
    /// replica behind a load balancer: meaningful with PostgreSQL storage).
    pub fn replica(&self) -> SellerServer {
        self.replica_with(false)
    }

    /// The same, and with SQLite storage on this one's database file too (`state_dir`
    /// kept): two processes on one file, which SQLite's locking serialises.
    pub fn replica_sharing_state(&self) -> SellerServer {
        self.replica_with(true)
    }

    fn replica_with(&self, share_state: bool) -> SellerServer {
        let dir = short_tempdir();
        let (from, d) = (self.dir.path(), dir.path());
        for f in [
            "seller.key",
            "tls.crt",
            "tls.key",
            "ca.pem",
            "interconnection.key",
        ] {
            std::fs::copy(from.join(f), d.join(f)).unwrap();
        }
        let cfg = std::fs::read_to_string(from.join("seller.toml")).unwrap();
        let state = format!("state_dir = \"{}/state\"", from.display());
        let cfg = cfg
            .replace(&state, if share_state { "SHARED_STATE" } else { &state })
            .replace(&from.display().to_string(), &d.display().to_string())
            .replace("SHARED_STATE", &state)
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                "listen = \"127.0.0.1:0\"",
            );
        std::fs::write(d.join("seller.toml"), cfg).unwrap();
        let (child, port) = spawn(d, None);
        SellerServer {
            ca_pem: d.join("ca.pem"),
            dir,
            child,
            port,
            trust: self.trust.clone(),
            roots: self.roots.clone(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// kill -9, then the same server again on the same port (agents keep their URL).
    pub fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let d = self.dir.path();
        let cfg = std::fs::read_to_string(d.join("seller.toml")).unwrap();
        let cfg = cfg.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", self.port),
        );
        std::fs::write(d.join("seller.toml"), cfg).unwrap();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join("server.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["seller", "serve", "--config"])
            .arg(d.join("seller.toml"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            format!("listening on 127.0.0.1:{}", self.port),
            "log:\n{}",
            self.log()
        );
        self.child = child;
    }

    /// One HTTPS request; (status, headers lower-cased, body).
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        self.request_with(method, target, &[], body)
    }

    /// The same with extra request headers.
    pub fn request_with(
        &self,
        method: &str,
        target: &str,
        extra: &[(String, String)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let (status, headers, body, _) = self.exchange(method, target, extra, body);
        (status, headers, body)
    }

    /// The same, with the response head exactly as it came off the socket.
    pub fn exchange(
        &self,
        method: &str,
        target: &str,
        extra: &[(String, String)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>, String) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json;charset=utf8\r\n\
             Accept: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).unwrap();
        tls.write_all(body).unwrap();
        let mut raw = Vec::new();
        // The server closes after answering (Connection: close); a TLS close_notify-less
        // EOF is fine here.
        let _ = tls.read_to_end(&mut raw);
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response: {:?}", String::from_utf8_lossy(&raw)));
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        (status, headers, raw[split + 4..].to_vec(), head)
    }

    /// A GET signed with a device key as the relay protocol says (over `GET` and the
    /// path with its query), written here from the protocol text.
    pub fn device_get(
        &self,
        key: &ed25519_dalek::SigningKey,
        target: &str,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let h = device_headers(key, "GET", target, b"", now_ms(), &random_nonce());
        self.request_with("GET", target, &h, b"")
    }

    /// The marketplace's call: signed as §4.1 says, with a fresh nonce. Checks Body-Sign
    /// and returns (raw body, parsed).
    pub fn market(&self, body: &Value) -> (String, Value) {
        let body = body.to_string();
        let ts = now_ms().to_string();
        // §4.1: a secure random value per call. (A millisecond clock plus 16 random bits
        // repeated among the scale test's parallel orders: "nonce already used".)
        let nonce = random_nonce();
        self.market_signed(&body, &ts, &nonce, &sign(KEY, &nonce, &ts, &body))
    }

    pub fn market_signed(&self, body: &str, ts: &str, nonce: &str, sig: &str) -> (String, Value) {
        let target = format!("{PATH}?signature={sig}&timestamp={ts}&nonce={nonce}");
        self.market_target("POST", &target, body)
    }

    /// A marketplace call to `target` (any signature style): checks the status, and
    /// `Body-Sign` as §4.3 says, spelled exactly so on the wire.
    pub fn market_target(&self, method: &str, target: &str, body: &str) -> (String, Value) {
        let (status, headers, raw, head) = self.exchange(method, target, &[], body.as_bytes());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));
        // The header name is case-sensitive (§4.3): exactly `Body-Sign`, read off the socket.
        assert!(
            head.split("\r\n").any(|l| l.starts_with("Body-Sign: ")),
            "no header spelled Body-Sign in {head:?}"
        );
        let sign = headers
            .iter()
            .find(|(k, _)| k == "body-sign")
            .map(|(_, v)| v.clone())
            .expect("every answer carries Body-Sign");
        let want = base64::engine::general_purpose::STANDARD.encode(hmac(KEY.as_bytes(), &raw));
        assert_eq!(
            sign,
            format!("sign_type=\"HMAC-SHA256\", signature=\"{want}\"")
        );
        let text = String::from_utf8(raw).unwrap();
        let v = serde_json::from_str(&text).unwrap();
        (text, v)
    }
}

/// Starts `seller serve` on `d/seller.toml`, logging to `d/server.log` (with its
/// descriptor limit at `nofile` if given): the child and the port it listens on.
fn spawn(d: &Path, nofile: Option<u64>) -> (Child, u16) {
    let log = std::fs::File::create(d.join("server.log")).unwrap();
    let mut command = match nofile {
        None => {
            let mut c = Command::new(BIN);
            c.args(["seller", "serve", "--config"])
                .arg(d.join("seller.toml"));
            c
        }
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "ulimit -n {n} && exec '{BIN}' seller serve --config '{}'",
                d.join("seller.toml").display()
            ));
            c
        }
    };
    let mut child = command.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .unwrap_or_else(|| {
            panic!(
                "no listening line ({line:?}); log:\n{}",
                std::fs::read_to_string(d.join("server.log")).unwrap_or_default()
            )
        })
        .parse()
        .unwrap();
    (child, port)
}

pub fn random_nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).unwrap();
    hex(&b)
}

/// The relay protocol's four headers over `"kooagent-relay-v1\n" METHOD "\n" TARGET "\n"
/// ts "\n" nonce "\n" hex(sha256(body))`.
pub fn device_headers(
    key: &ed25519_dalek::SigningKey,
    method: &str,
    target: &str,
    body: &[u8],
    ts: i64,
    nonce: &str,
) -> Vec<(String, String)> {
    use ed25519_dalek::Signer;
    use sha2::Digest;
    let b64 = base64::engine::general_purpose::STANDARD;
    let digest = hex(&sha2::Sha256::digest(body));
    let signed = format!("kooagent-relay-v1\n{method}\n{target}\n{ts}\n{nonce}\n{digest}");
    vec![
        (
            "X-Kooagent-Device-Key".into(),
            b64.encode(key.verifying_key().as_bytes()),
        ),
        ("X-Kooagent-Ts".into(), ts.to_string()),
        ("X-Kooagent-Nonce".into(), nonce.into()),
        (
            "X-Kooagent-Signature".into(),
            b64.encode(key.sign(signed.as_bytes()).to_bytes()),
        ),
    ]
}

/// §4.1 as documented, written independently of the server's code.
pub fn sign(key: &str, nonce: &str, ts: &str, body: &str) -> String {
    let inner = hex(&hmac(key.as_bytes(), body.as_bytes())).to_lowercase();
    let canonical = format!("{key}{nonce}{ts}{inner}");
    hex(&hmac(key.as_bytes(), canonical.as_bytes())).to_uppercase()
}

impl Drop for SellerServer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn market_time(secs: i64) -> String {
    // The getLicense example's form: "2023-10-27 10:30:15 z".
    kooagent::clock::format_rfc3339(secs)
        .replace('T', " ")
        .replace('Z', " z")
}

pub fn digits14(secs: i64) -> String {
    kooagent::clock::format_rfc3339(secs)
        .chars()
        .filter(char::is_ascii_digit)
        .collect()
}

fn wait_agent_state(a: &TestAgent, want: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let c = check(a);
        if c["state"] == want {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the agent never reported {want}: {c}\n{}",
            a.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn check(a: &TestAgent) -> Value {
    a.call("license.check", json!({"product": "sku-pro"}))
        .unwrap()
}

/// The storage configurations the end-to-end tests run on: SQLite, and PostgreSQL when
/// KOOAGENT_TEST_PG_URL is set (scripts/pg-test.sh), each in a schema of its own.
pub fn storages() -> Vec<String> {
    let mut v = vec![String::new()];
    if let Ok(url) = std::env::var("KOOAGENT_TEST_PG_URL") {
        if !url.is_empty() {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let schema = format!("e2e_{}_{}_{n}", std::process::id(), now_ms());
            v.push(format!(
                "database_url = \"{url}\"\ndatabase_schema = \"{schema}\"\n"
            ));
        }
    }
    v
}

#[test]
fn marketplace_orders_renews_and_the_agent_runs_the_license() {
    for storage in storages() {
        orders_renews_and_runs(&storage);
    }
}

fn orders_renews_and_runs(storage: &str) {
    let server = SellerServer::start(storage);
    // The agent also polls the server's agent endpoints (the freeze online source).
    let base = format!("https://localhost:{}/v1/licenses", server.port);
    let agent = TestAgent::start(&format!(
        "[license]\ntrusted_keys = [\"{}\"]\n[freeze]\ntoken_url = \"{base}/{{license_id}}/status\"\n\
         poll_interval_secs = 1\npoll_jitter_secs = 0\npoll_extra_ca_file = \"{}\"\n",
        server.trust,
        server.ca_pem.display()
    ));
    let code = agent.call("device.code", json!({})).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    // The agent's device key (made at its first poll): fetches are signed with it.
    let key_file = agent.state.join("relay.key");
    let t0 = std::time::Instant::now();
    while !key_file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no {key_file:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let device_key = kooagent_seller::issue::read_signing_key(&key_file).unwrap();
    let now = now_ms() / 1000;
    let order = json!({
        "activity": "getLicense", "instanceId": "RA2-4LVS-0001", "eventId": "8e5694c8-0001",
        "effectiveTime": market_time(now - 60), "expireTime": digits14(now + 30 * 86_400),
        "deviceFingerprint": code, "testFlag": "1"
    });
    let (raw, v) = server.market(&order);
    assert_eq!(v["resultCode"], "000000", "{v}; log:\n{}", server.log());
    let license = v["license"].as_str().unwrap().to_string();
    assert_eq!(v["licenseId"], "kg-RA2-4LVS-0001");

    agent
        .call("license.install", json!({"text": license}))
        .unwrap_or_else(|e| panic!("install: {e}"));
    let c = check(&agent);
    assert_eq!(c["state"], "valid", "{c}");
    assert_eq!(c["license_id"], "kg-RA2-4LVS-0001");

    // The marketplace resends (new nonce, new timestamp): the same bytes.
    let (raw2, _) = server.market(&order);
    assert_eq!(raw2, raw);
    // A changed request under the same eventId is refused.
    let mut changed = order.clone();
    changed["expireTime"] = json!(digits14(now + 40 * 86_400));
    assert_eq!(server.market(&changed).1["resultCode"], "000002");

    // Renewal: a new license with the new expiry, fetched by license id the way an agent
    // would, installed over the old one.
    let new_expiry = now + 400 * 86_400;
    let (_, v) = server.market(&json!({
        "activity": "refreshLicense", "instanceId": "RA2-4LVS-0001",
        "expireTime": digits14(new_expiry), "orderId": "CS-renew-1"
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    let target = format!("/v1/licenses/kg-RA2-4LVS-0001?device_code={code}");
    let (status, _, body) = server.device_get(&device_key, &target);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let renewed = String::from_utf8(body).unwrap();
    assert_eq!(renewed, v["license"].as_str().unwrap());
    assert_ne!(renewed, license);
    agent
        .call("license.install", json!({"text": renewed}))
        .unwrap_or_else(|e| panic!("install renewed: {e}"));
    let c = check(&agent);
    assert_eq!(c["state"], "valid", "{c}");
    let status = agent.call("license.status", json!({})).unwrap();
    assert!(
        status
            .to_string()
            .contains(&kooagent::clock::format_rfc3339(new_expiry)),
        "the agent runs the renewed license: {status}"
    );

    // The marketplace freezes the instance: the server signs a status token, the agent
    // hears it from the online source and reports `frozen`; UNFREEZE lifts it.
    let (_, v) = server.market(&json!({
        "activity": "updateInstanceStatus", "instanceId": "RA2-4LVS-0001", "status": "FREEZE"
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    let target = format!("/v1/licenses/kg-RA2-4LVS-0001/status?device_code={code}");
    assert_eq!(server.device_get(&device_key, &target).0, 200);
    wait_agent_state(&agent, "frozen");
    let (_, v) = server.market(&json!({
        "activity": "updateInstanceStatus", "instanceId": "RA2-4LVS-0001", "status": "UNFREEZE"
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    wait_agent_state(&agent, "valid");
    let (_, v) = server.market(&json!({"activity": "expireLicense", "instanceId": "nope"}));
    assert_eq!(v["resultCode"], "000003");
}

#[test]
fn replays_bad_signatures_and_stale_timestamps_are_refused() {
    for storage in storages() {
        refusals(&storage);
    }
}

fn refusals(storage: &str) {
    let server = SellerServer::start(storage);
    let body = json!({"activity": "expireLicense", "instanceId": "nope"}).to_string();
    let ts = now_ms().to_string();
    let sig = sign(KEY, "nonce-1", &ts, &body);
    // First use: authenticated (the instance is unknown: 000003, not 000001).
    let (_, v) = server.market_signed(&body, &ts, "nonce-1", &sig);
    assert_eq!(v["resultCode"], "000003", "{v}");
    // The very same request again: a replay.
    let (_, v) = server.market_signed(&body, &ts, "nonce-1", &sig);
    assert_eq!(v["resultCode"], "000001", "{v}");
    assert!(v["resultMsg"].as_str().unwrap().contains("replay"));
    // Lower-case hex is as good as upper-case.
    let sig2 = sign(KEY, "nonce-2", &ts, &body).to_lowercase();
    assert_eq!(
        server.market_signed(&body, &ts, "nonce-2", &sig2).1["resultCode"],
        "000003"
    );
    // Signed with another key, or over another body.
    let bad = sign("another-key", "nonce-3", &ts, &body);
    let (_, v) = server.market_signed(&body, &ts, "nonce-3", &bad);
    assert_eq!(v["resultCode"], "000001");
    assert!(v["resultMsg"].as_str().unwrap().contains("signature"));
    let tampered = body.replace("nope", "nopf");
    let (_, v) = server.market_signed(&tampered, &ts, "nonce-4", &sign(KEY, "nonce-4", &ts, &body));
    assert_eq!(v["resultCode"], "000001");
    // Two minutes old.
    let old = (now_ms() - 120_000).to_string();
    let (_, v) = server.market_signed(&body, &old, "nonce-5", &sign(KEY, "nonce-5", &old, &body));
    assert_eq!(v["resultCode"], "000001");
    assert!(
        v["resultMsg"].as_str().unwrap().contains("timestamp"),
        "{v}"
    );
    // No signature at all.
    let (status, headers, raw) = server.request("POST", PATH, body.as_bytes());
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(k, _)| k == "body-sign"));
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["resultCode"], "000001");
    // Not the marketplace's endpoint.
    assert_eq!(server.request("POST", "/other", b"{}").0, 404);
    // GET is the legacy style's method (§4.2): unsigned, it is refused like any other.
    let (status, _, raw) = server.request("GET", PATH, b"");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&raw).unwrap()["resultCode"],
        "000001"
    );
    assert_eq!(server.request("PUT", PATH, b"{}").0, 405);
    // Licenses go to signed device requests only.
    assert_eq!(server.request("GET", "/v1/licenses/none", b"").0, 401);
    // The key never reaches the log.
    assert!(!server.log().contains(KEY));
}

/// §4.2 as documented, written independently of the server's code: every parameter but
/// `authToken`, sorted by name, `k=v` joined by `&`, HMAC-SHA256 keyed with key + timeStamp.
fn legacy_token(key: &str, params: &[(&str, String)]) -> String {
    let mut p: Vec<_> = params.iter().filter(|(k, _)| *k != "authToken").collect();
    p.sort();
    let text: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let ts = &params.iter().find(|(k, _)| *k == "timeStamp").unwrap().1;
    base64::engine::general_purpose::STANDARD.encode(hmac(
        format!("{key}{ts}").as_bytes(),
        text.join("&").as_bytes(),
    ))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `yyyyMMddHHmmssSSS`, UTC (§2.1 `timeStamp`).
fn time_stamp17(ms: i64) -> String {
    format!("{}{:03}", digits14(ms / 1000), ms % 1000)
}

/// A §2.1 purchase, as the marketplace sends it: no instanceId, no eventId.
fn purchase(order: &str, business: &str, device: &str) -> Vec<(&'static str, String)> {
    vec![
        ("activity", "getLicense".into()),
        ("customerId", "68cbc86abc2018ab880d92f36422fa0e".into()),
        ("customerName", "buyer-1".into()),
        ("businessId", business.into()),
        ("orderId", order.into()),
        ("skuCode", "sku-pro-1y".into()),
        ("timeStamp", time_stamp17(now_ms())),
        ("deviceFingerprint", device.into()),
    ]
}

fn as_json(params: &[(&str, String)]) -> Value {
    Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
            .collect(),
    )
}

/// A device code as a buyer types it: lower case, spaces instead of hyphens.
fn typed(code: &str) -> String {
    code.to_lowercase().replace('-', " ")
}

fn lic_payload(text: &str) -> kooagent::license::format::License {
    kooagent::license::format::parse(text.as_bytes())
        .unwrap()
        .license
}

/// A well-formed device code `{prefix}-EFGH-JKMN-PQRS-TVW?` (the check symbol found by trying).
pub(crate) fn valid_code(prefix: &str) -> String {
    "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        .chars()
        .find_map(|c| {
            kooagent::device_code::parse_code(&format!("{prefix}-EFGH-JKMN-PQRS-TVW{c}")).ok()
        })
        .unwrap()
}

/// Issue 13 items 1, 3, 12: a §2.1 purchase (no instanceId: the first businessId becomes
/// it; idempotent by orderId across new businessIds), the fingerprint as a buyer typed it,
/// and the same eventId with a corrected fingerprint rebinding the instance.
#[test]
fn purchases_as_the_marketplace_sends_them() {
    let server = SellerServer::start("");
    let agent = TestAgent::start(&format!(
        "[license]\ntrusted_keys = [\"{}\"]\n",
        server.trust
    ));
    let code = agent.call("device.code", json!({})).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_string();
    // §2.1, signed the new way (§4.1).
    let first = purchase("CS-ORDER-1", "BIZ-0001", &typed(&code));
    let (raw, v) = server.market(&as_json(&first));
    assert_eq!(v["resultCode"], "000000", "{v}; log:\n{}", server.log());
    assert_eq!(
        v["instanceId"], "BIZ-0001",
        "the first businessId is the instance"
    );
    let license = v["license"].as_str().unwrap().to_string();
    assert_eq!(lic_payload(&license).devices, vec![code.clone()]);
    // The marketplace resends an hour later: a new businessId and timeStamp, the same
    // instance and the same bytes.
    let resend = purchase("CS-ORDER-1", "BIZ-0002", &code);
    let (raw2, v2) = server.market(&as_json(&resend));
    assert_eq!(v2["instanceId"], "BIZ-0001", "{v2}");
    assert_eq!(raw2, raw);
    // Another order never shares the instance.
    let (_, v3) = server.market(&as_json(&purchase("CS-ORDER-2", "BIZ-0003", &code)));
    assert_eq!(v3["instanceId"], "BIZ-0003", "{v3}");
    // The agent runs the license issued for the typed code.
    agent
        .call("license.install", json!({"text": license}))
        .unwrap_or_else(|e| panic!("install: {e}"));
    assert_eq!(check(&agent)["state"], "valid");

    // §2: eventId + fingerprint. A buyer corrects a mistyped code under the same eventId.
    let other = code.clone();
    let wrong = valid_code("WRNG");
    let now = now_ms() / 1000;
    let ev = |fp: &str| {
        json!({
            "activity": "getLicense", "instanceId": "RA2-EDGE-0001", "eventId": "ev-edge-1",
            "effectiveTime": market_time(now - 60), "expireTime": digits14(now + 86_400),
            "deviceFingerprint": fp
        })
    };
    let (_, v) = server.market(&ev(&wrong));
    assert_eq!(v["resultCode"], "000000", "{v}");
    let (raw_fixed, v) = server.market(&ev(&other));
    assert_eq!(
        v["resultCode"], "000000",
        "a corrected fingerprint is a new request: {v}"
    );
    assert_eq!(v["instanceId"], "RA2-EDGE-0001");
    assert_eq!(
        lic_payload(v["license"].as_str().unwrap()).devices,
        vec![other.clone()]
    );
    // The instance is rebound: an agent fetching it gets the license for the new code.
    // (Signed with a device key, saying the code: docs/seller-server.md "Security".)
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).unwrap();
    let device_key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let target = format!("/v1/licenses/kg-RA2-EDGE-0001?device_code={other}");
    let (status, _, body) = server.device_get(&device_key, &target);
    assert_eq!(status, 200);
    assert_eq!(body, v["license"].as_str().unwrap().as_bytes());
    // Resends of either are answered as before; a changed term under the same pair is not.
    assert_eq!(server.market(&ev(&typed(&other))).0, raw_fixed);
    let mut changed = ev(&other);
    changed["expireTime"] = json!(digits14(now + 2 * 86_400));
    assert_eq!(server.market(&changed).1["resultCode"], "000002");
}

/// Issue 13 item 2: the legacy authToken style (§4.2), as a GET query string and as a
/// JSON POST body, on the same endpoint as §4.1.
#[test]
fn both_signature_styles_on_one_endpoint() {
    let server = SellerServer::start("");
    let code = valid_code("LEGA");
    // GET with the parameters in the query string.
    let mut p = purchase("CS-LEGACY-1", "BIZ-L1", &typed(&code));
    p.push(("authToken", legacy_token(KEY, &p)));
    let query: Vec<String> = p
        .iter()
        .map(|(k, v)| format!("{k}={}", url_encode(v)))
        .collect();
    let (_, v) = server.market_target("GET", &format!("{PATH}?{}", query.join("&")), "");
    assert_eq!(v["resultCode"], "000000", "{v}; log:\n{}", server.log());
    assert_eq!(v["instanceId"], "BIZ-L1");
    // JSON POST with authToken and timeStamp in the body.
    let mut p = purchase("CS-LEGACY-2", "BIZ-L2", &code);
    p.push(("authToken", legacy_token(KEY, &p)));
    let (_, v) = server.market_target("POST", PATH, &as_json(&p).to_string());
    assert_eq!(v["resultCode"], "000000", "{v}");
    assert_eq!(v["instanceId"], "BIZ-L2");
    // A bad token, and a stale timeStamp, are refused 000001.
    let mut p = purchase("CS-LEGACY-3", "BIZ-L3", &code);
    p.push(("authToken", legacy_token("another-key", &p)));
    let (_, v) = server.market_target("POST", PATH, &as_json(&p).to_string());
    assert_eq!(v["resultCode"], "000001", "{v}");
    let mut p = purchase("CS-LEGACY-3", "BIZ-L3", &code);
    p[6].1 = time_stamp17(now_ms() - 600_000);
    p.push(("authToken", legacy_token(KEY, &p)));
    let (_, v) = server.market_target("POST", PATH, &as_json(&p).to_string());
    assert_eq!(v["resultCode"], "000001", "{v}");
    assert!(
        v["resultMsg"].as_str().unwrap().contains("timestamp"),
        "{v}"
    );
    // The same legacy request twice is a replay.
    let mut p = purchase("CS-LEGACY-4", "BIZ-L4", &code);
    p.push(("authToken", legacy_token(KEY, &p)));
    let body = as_json(&p).to_string();
    assert_eq!(
        server.market_target("POST", PATH, &body).1["resultCode"],
        "000000"
    );
    assert_eq!(
        server.market_target("POST", PATH, &body).1["resultCode"],
        "000001"
    );
    assert!(!server.log().contains(KEY));
}

/// Issue 13 item 5: every spelling of UTC the marketplace uses is UTC; any other zone is
/// refused 000002 naming the field.
#[test]
fn marketplace_time_formats() {
    let server = SellerServer::start("");
    let code = valid_code("TIME");
    let start = "2026-12-01 10:30:15";
    let want = kooagent::clock::parse_rfc3339("2026-12-01T10:30:15Z").unwrap();
    for (i, zone) in [" UTC", " GMT", " Z", " z", "Z", " +00:00", "+00:00"]
        .iter()
        .enumerate()
    {
        let (_, v) = server.market(&json!({
            "activity": "getLicense", "instanceId": format!("T-{i}"), "eventId": format!("t-{i}"),
            "effectiveTime": format!("{start}{zone}"), "expireTime": "2027-12-01 10:30:15 UTC",
            "deviceFingerprint": code
        }));
        assert_eq!(v["resultCode"], "000000", "{zone:?}: {v}");
        let lic = lic_payload(v["license"].as_str().unwrap());
        assert_eq!(lic.not_before, want, "{zone:?}");
    }
    for (field, bad) in [
        ("effectiveTime", "2026-12-01 10:30:15 +08:00"),
        ("expireTime", "2027-12-01 10:30:15 CST"),
        ("expireTime", "01/12/2027"),
    ] {
        let mut body = json!({
            "activity": "getLicense", "instanceId": "T-bad", "eventId": "t-bad",
            "effectiveTime": "2026-12-01 10:30:15 z", "expireTime": "2027-12-01 10:30:15 z",
            "deviceFingerprint": code
        });
        body[field] = json!(bad);
        let (_, v) = server.market(&body);
        assert_eq!(v["resultCode"], "000002", "{bad}: {v}");
        assert!(v["resultMsg"].as_str().unwrap().contains(field), "{v}");
    }
}

#[test]
fn serve_refuses_a_readable_key_file_naming_it() {
    let dir = short_tempdir();
    let d = dir.path();
    std::fs::write(d.join("ik"), "k").unwrap();
    std::fs::set_permissions(d.join("ik"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(BIN)
        .args(["seller", "keygen", "--out"])
        .arg(d.join("s.key"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg: PathBuf = d.join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "[seller_server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{d}/c\"\nkey_file = \"{d}/k\"\n\
             signing_key_file = \"{d}/s.key\"\ninterconnection_key_file = \"{d}/ik\"\n\
             state_dir = \"{d}/state\"\n[[seller_server.products]]\npath = \"/p\"\nproduct = \"x\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["seller", "serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("seller_server.interconnection_key_file") && err.contains("chmod 600"),
        "{err}"
    );
}

/// Issue 20 item 5: `seller serve` is the seller's command, not the agent's: its help offers
/// neither the agent's configuration path nor the agent's socket or state directory, and
/// without --config it reads its own default file, never the agent's (even with
/// KOOAGENT_CONFIG set, as a developer's shell often has).
#[test]
fn seller_serve_has_its_own_flags_and_config_default() {
    let help = run_ok(Command::new(BIN).args(["seller", "serve", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    for agent_only in ["agent.toml", "--socket", "--state-dir", "KOOAGENT_CONFIG"] {
        assert!(!help.contains(agent_only), "{agent_only} in:\n{help}");
    }
    assert!(
        help.contains("--config") && help.contains("/etc/kooagent-seller/server.toml"),
        "{help}"
    );
    // The agent's commands still take the agent's flags, before or after the command.
    let status = run_ok(Command::new(BIN).args(["status", "--help"]));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("--socket") && status.contains("agent.toml"),
        "{status}"
    );

    let home = short_tempdir();
    let agent_cfg = home.path().join("agent.toml");
    std::fs::write(&agent_cfg, "[agent]\n").unwrap();
    let out = Command::new(BIN)
        .args(["seller", "serve"])
        .env("KOOAGENT_CONFIG", &agent_cfg)
        .env_remove("KOOAGENT_SELLER_CONFIG")
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("cfg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // SAFETY: geteuid cannot fail.
    let default = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/etc/kooagent-seller/server.toml")
    } else {
        home.path().join("cfg/kooagent-seller/server.toml")
    };
    assert!(
        err.contains(&format!(
            "no seller server configuration at {} (the default)",
            default.display()
        )) && err.contains("--config FILE"),
        "{err}"
    );
    // The agent's flags are refused by the seller's commands, wherever they are written.
    let out = Command::new(BIN)
        .args(["seller", "serve", "--socket", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args(["--state-dir", "/tmp/x", "seller", "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the agent's flags"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
