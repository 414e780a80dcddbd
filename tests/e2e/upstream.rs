//! A test upstream for the usage-data API: HTTPS on loopback with a CA made at test time,
//! checking every request the way koogallery.md §1.1 describes it (headers, signature over
//! the raw body, body shape and limits, field formats), storing records by metering_sn,
//! and failing on demand (status codes, 413 above N records, slow answers, reset
//! connections, refusals).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use sha2::Sha256;

pub const PATH: &str = "/api/mkp-openapi-public/global/v1/isv/usage-data";

/// A CA made for one test, and its PEM file for `usage.extra_ca_file`.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pub pem_path: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kooagent test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem_path = dir.join("test-ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            pem_path,
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), self.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Arc::new(cfg)
    }
}

/// Faults to inject; counts are decremented as they are used.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Answer this status to the next `n` requests.
    pub status: Option<(u16, usize)>,
    /// Answer 413 to requests with more than this many records.
    pub max_records: Option<usize>,
    /// Wait `slow` before answering the next `slow_count` requests.
    pub slow: Duration,
    pub slow_count: usize,
    /// Reset the connection after reading the next `n` requests, storing nothing.
    pub reset_before: usize,
    /// Store the next `n` requests' records, then reset instead of answering.
    pub reset_after: usize,
    /// Refuse (HTTP 400 with an error_code) requests holding this instance id.
    pub reject_instance: Option<String>,
    /// A `Date` header to send with every answer.
    pub date: Option<String>,
}

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub records: Vec<Value>,
    pub status: u16,
}

#[derive(Default)]
pub struct Log {
    /// metering_sn → (record, times received)
    pub records: HashMap<String, (Value, usize)>,
    /// sns in the order first received.
    pub order: Vec<String>,
    pub requests: Vec<Seen>,
    pub violations: Vec<String>,
    nonces: HashSet<String>,
}

pub struct Upstream {
    pub port: u16,
    pub log: Arc<Mutex<Log>>,
    pub faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start(ca: &TestCa, key: &str) -> Upstream {
        Upstream::start_on(ca, key, 0)
    }

    /// On a given port (0: any), e.g. the port of an upstream that was shut down.
    pub fn start_on(ca: &TestCa, key: &str, port: u16) -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = ca.server_config();
        let log = Arc::new(Mutex::new(Log::default()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, f, s, key) = (log.clone(), faults.clone(), stop.clone(), key.to_string());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                let (cfg, l, f, key) = (cfg.clone(), l.clone(), f.clone(), key.clone());
                std::thread::spawn(move || serve(tcp, cfg, l, f, &key));
            }
        });
        Upstream {
            port,
            log,
            faults,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().unwrap());
    }

    /// Closes the listening port: connections are refused from now on.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
    }

    pub fn unique(&self) -> usize {
        self.log.lock().unwrap().records.len()
    }

    pub fn violations(&self) -> Vec<String> {
        self.log.lock().unwrap().violations.clone()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap().requests.clone()
    }

    /// Records received, by metering_sn.
    pub fn records(&self) -> HashMap<String, (Value, usize)> {
        self.log.lock().unwrap().records.clone()
    }

    pub fn order(&self) -> Vec<String> {
        self.log.lock().unwrap().order.clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

pub fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

pub fn reset(tcp: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a valid struct; SO_LINGER 0 makes the
    // close send a RST.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn serve(
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    log: Arc<Mutex<Log>>,
    faults: Arc<Mutex<Faults>>,
    key: &str,
) {
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let raw = tcp.try_clone().unwrap();
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    while let Some(req) = read_request(&mut tls) {
        let (status, body, action) = handle(&req, &log, &faults, key);
        match action {
            Action::Reset => {
                reset(&raw);
                return;
            }
            Action::Answer => {}
        }
        let date = faults
            .lock()
            .unwrap()
            .date
            .as_ref()
            .map(|d| format!("date: {d}\r\n"))
            .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{date}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        if tls.get_mut().write_all(resp.as_bytes()).is_err() || tls.get_mut().flush().is_err() {
            return;
        }
    }
}

enum Action {
    Answer,
    Reset,
}

fn handle(
    req: &Request,
    log: &Mutex<Log>,
    faults: &Mutex<Faults>,
    key: &str,
) -> (u16, String, Action) {
    let mut f = faults.lock().unwrap().clone();
    let consume = |g: &mut Faults| {
        *faults.lock().unwrap() = g.clone();
    };
    if f.reset_before > 0 {
        f.reset_before -= 1;
        consume(&mut f);
        log.lock().unwrap().requests.push(Seen {
            records: vec![],
            status: 0,
        });
        return (0, String::new(), Action::Reset);
    }
    let records = match verify(req, key, &mut log.lock().unwrap()) {
        Ok(r) => r,
        Err(v) => {
            let mut l = log.lock().unwrap();
            l.violations.push(v.clone());
            l.requests.push(Seen {
                records: vec![],
                status: 400,
            });
            return (
                400,
                json!({"error_code": "95000001", "error_msg": v}).to_string(),
                Action::Answer,
            );
        }
    };
    if f.slow_count > 0 {
        f.slow_count -= 1;
        consume(&mut f);
        std::thread::sleep(f.slow);
    }
    let seen = |status: u16| Seen {
        records: records.clone(),
        status,
    };
    if let Some((status, n)) = f.status {
        if n > 0 {
            f.status = Some((status, n - 1));
            consume(&mut f);
            log.lock().unwrap().requests.push(seen(status));
            return (
                status,
                json!({"error_msg": "injected"}).to_string(),
                Action::Answer,
            );
        }
    }
    if let Some(max) = f.max_records {
        if records.len() > max {
            log.lock().unwrap().requests.push(seen(413));
            return (413, String::new(), Action::Answer);
        }
    }
    if let Some(bad) = &f.reject_instance {
        if records.iter().any(|r| r["instance_id"] == json!(bad)) {
            log.lock().unwrap().requests.push(seen(400));
            return (
                400,
                json!({"error_code": "92020002", "error_msg": format!("invalid param: instance_id {bad}")})
                    .to_string(),
                Action::Answer,
            );
        }
    }
    {
        let mut l = log.lock().unwrap();
        for r in &records {
            let sn = r["metering_sn"].as_str().unwrap().to_string();
            match l.records.get_mut(&sn) {
                Some((prev, n)) => {
                    *n += 1;
                    if prev != r {
                        let v = format!(
                            "metering_sn {sn} resent with a different payload: {prev} then {r}"
                        );
                        l.violations.push(v);
                    }
                }
                None => {
                    l.records.insert(sn.clone(), (r.clone(), 1));
                    l.order.push(sn);
                }
            }
        }
        l.requests.push(seen(200));
    }
    if f.reset_after > 0 {
        f.reset_after -= 1;
        consume(&mut f);
        return (0, String::new(), Action::Reset);
    }
    (
        200,
        json!({"error_code": "92020000", "error_msg": "success"}).to_string(),
        Action::Answer,
    )
}

/// JSON with object keys sorted at every level and no whitespace.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `yyyyMMdd'T'HHmmss'Z'` → Unix seconds (own parser, independent of the agent's).
fn compact_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let d = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &s[r];
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, da, h, mi, se) = (
        d(0..4)?,
        d(4..6)?,
        d(6..8)?,
        d(9..11)?,
        d(11..13)?,
        d(13..15)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

fn verify(req: &Request, key: &str, log: &mut Log) -> Result<Vec<Value>, String> {
    if req.method != "POST" || req.path != PATH {
        return Err(format!("{} {} is not POST {PATH}", req.method, req.path));
    }
    let h = |name: &str| {
        req.headers
            .get(name)
            .cloned()
            .ok_or_else(|| format!("header {name} missing"))
    };
    let (sig, ts, nonce) = (h("signature")?, h("ts")?, h("nonce")?);
    if !h("content-type")?.starts_with("application/json") {
        return Err("content-type is not application/json".into());
    }
    if sig.len() > 1000 {
        return Err("signature longer than 1000".into());
    }
    if ts.len() > 20 || ts.len() != 13 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("ts {ts:?} is not Unix milliseconds"));
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    if (ts.parse::<i64>().unwrap() - now_ms).abs() > 300_000 {
        return Err(format!("ts {ts} is more than 5 minutes from now"));
    }
    if nonce.is_empty() || nonce.len() > 64 {
        return Err(format!("nonce {nonce:?} is not 1..64 characters"));
    }
    if !log.nonces.insert(nonce.clone()) {
        return Err(format!("nonce {nonce} reused"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("ts={ts}&nonce={nonce}&body=").as_bytes());
    mac.update(&req.body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if sig != expected {
        return Err("signature does not match the body".into());
    }
    let body: Value =
        serde_json::from_slice(&req.body).map_err(|e| format!("body is not JSON: {e}"))?;
    let mut canon = String::new();
    canonical(&body, &mut canon);
    if canon.as_bytes() != req.body.as_slice() {
        return Err("body is not sorted-key JSON without whitespace".into());
    }
    let obj = body.as_object().ok_or("body is not an object")?;
    if obj.len() != 1 {
        return Err(format!(
            "body has keys other than usage_records: {:?}",
            obj.keys()
        ));
    }
    let recs = obj
        .get("usage_records")
        .and_then(Value::as_array)
        .ok_or("usage_records is not a list")?;
    if recs.is_empty() || recs.len() > 1000 {
        return Err(format!("{} records (1..1000 allowed)", recs.len()));
    }
    for r in recs {
        let o = r.as_object().ok_or("a record is not an object")?;
        for k in o.keys() {
            if ![
                "instance_id",
                "record_time",
                "begin_time",
                "end_time",
                "usage_value",
                "metering_sn",
                "relate_pkg_instance",
            ]
            .contains(&k.as_str())
            {
                return Err(format!("unknown record field {k}"));
            }
        }
        let s = |k: &str, max: usize, required: bool| -> Result<Option<String>, String> {
            match o.get(k) {
                None if !required => Ok(None),
                None => Err(format!("record field {k} missing")),
                Some(Value::String(v)) if !v.is_empty() && v.len() <= max => Ok(Some(v.clone())),
                Some(v) => Err(format!(
                    "record field {k} = {v} is not a string of 1..{max}"
                )),
            }
        };
        s("instance_id", 64, true)?;
        s("metering_sn", 64, true)?;
        s("relate_pkg_instance", 64, false)?;
        let t = |k: &str| -> Result<i64, String> {
            let v = s(k, 17, true)?.unwrap();
            compact_time(&v).ok_or(format!("{k} {v:?} is not yyyyMMdd'T'HHmmss'Z'"))
        };
        let (begin, end, rt) = (t("begin_time")?, t("end_time")?, t("record_time")?);
        if begin % 3600 != 0 || end != begin + 3600 {
            return Err(format!("begin/end {begin}/{end} are not one whole hour"));
        }
        if rt < end {
            return Err("record_time before end_time".into());
        }
        let v = s("usage_value", 17, true)?.unwrap();
        let (int, frac) = v.split_once('.').unwrap_or((&v, ""));
        let ok = !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() <= 4
            && frac.bytes().all(|b| b.is_ascii_digit())
            && !(v.contains('.') && frac.is_empty())
            && v.bytes().any(|b| (b'1'..=b'9').contains(&b));
        if !ok {
            return Err(format!(
                "usage_value {v:?} is not > 0 with at most 4 decimals"
            ));
        }
    }
    Ok(recs.clone())
}
