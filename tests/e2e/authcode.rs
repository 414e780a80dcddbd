//! Authorization-code open APIs (koogallery.md B0–B5) against a stand-in of KooGallery:
//! HTTPS on loopback with a test CA, a primary and a fallback listener, every request's
//! AK/SK signature checked twice (the library's verifier and a recomputation written here
//! from the spec text), answers in the documented shapes, error codes on demand.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use kooagent::authcode::api::{
    self, ActivateRequest, ApiError, CodeStatus, ErrorCode, HeartbeatRequest, SoftwareUsageInfo,
    UsageRequest,
};
use kooagent::authcode::apig_sign::{self, AkSk};
use kooagent::authcode::client::{Client, ClientError};
use kooagent::clock::{Clock, FakeClock, SystemClock};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::upstream::{read_request, reset, Request, TestCa};

pub(crate) const AK: &str = "TESTAK0001";
pub(crate) const SK: &str = "test-sk/with+odd=chars";

#[derive(Clone)]
pub(crate) struct Code {
    pub(crate) received: bool,
    pub(crate) activated: bool,
    pub(crate) status: &'static str,
}

#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) listener: &'static str,
    pub(crate) path: String,
    pub(crate) answer: String,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) codes: HashMap<String, Code>,
    pub(crate) primary_down: bool,
    pub(crate) fallback_down: bool,
    /// Answer the next request with (HTTP status, error_code).
    pub(crate) inject: Option<(u16, String)>,
    /// The next activation is carried out but its answer is lost: the connection hangs
    /// this long, then closes without a word.
    pub(crate) lose_activation_answer: Option<Duration>,
    /// Daily queries answer about this code instead of the one asked.
    pub(crate) answer_about: Option<String>,
    /// License uploads received (path, body), `getLicenseAsync`.
    pub(crate) uploads: Vec<(String, Value)>,
    pub(crate) seen: Vec<Seen>,
    pub(crate) violations: Vec<String>,
    /// code → distinct ids, and the reported active_num totals.
    pub(crate) ids: HashMap<String, HashSet<String>>,
    pub(crate) active: HashMap<String, u64>,
    /// Answer every request this much later (a slow marketplace).
    pub(crate) delay: Duration,
}

pub(crate) struct Market {
    pub(crate) primary: u16,
    pub(crate) fallback: u16,
    pub(crate) state: Arc<Mutex<State>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) ca: TestCa,
}

impl Market {
    pub(crate) fn start() -> Market {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new(dir.path());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        for name in ["primary", "fallback"] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            ports.push(l.local_addr().unwrap().port());
            let (cfg, st, stop) = (ca.server_config(), state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(tcp) = conn else { continue };
                    let down = {
                        let s = st.lock().unwrap();
                        if name == "primary" {
                            s.primary_down
                        } else {
                            s.fallback_down
                        }
                    };
                    if down {
                        reset(&tcp);
                        continue;
                    }
                    let (cfg, st) = (cfg.clone(), st.clone());
                    std::thread::spawn(move || serve(name, tcp, cfg, st));
                }
            });
        }
        Market {
            primary: ports[0],
            fallback: ports[1],
            state,
            stop,
            _dir: dir,
            ca,
        }
    }

    pub(crate) fn bases(&self) -> Vec<String> {
        vec![
            format!("https://localhost:{}", self.primary),
            format!("https://localhost:{}", self.fallback),
        ]
    }

    pub(crate) fn client_with(&self, key: AkSk, clock: Arc<dyn Clock>) -> Client {
        Client::new(
            &self.bases(),
            Some(&self.ca.pem_path),
            "authcode.extra_ca_file",
            Duration::from_secs(60),
            key,
            clock,
        )
        .unwrap()
    }

    pub(crate) fn client(&self) -> Client {
        self.client_with(AkSk::new(AK, SK), Arc::new(SystemClock))
    }

    pub(crate) fn add(&self, code: &str, received: bool) {
        self.state.lock().unwrap().codes.insert(
            code.into(),
            Code {
                received,
                activated: false,
                status: "ALIVE",
            },
        );
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.with(|s| s.seen.clone())
    }

    pub(crate) fn assert_no_violations(&self) {
        let v = self.with(|s| s.violations.clone());
        assert!(v.is_empty(), "stand-in saw violations: {v:?}");
    }
}

impl Drop for Market {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for p in [self.primary, self.fallback] {
            let _ = TcpStream::connect(("127.0.0.1", p));
        }
    }
}

fn serve(
    name: &'static str,
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    st: Arc<Mutex<State>>,
) {
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn = rustls::ServerConnection::new(cfg).unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    while let Some(req) = read_request(&mut tls) {
        // Down means down for kept-alive connections too: hang up without an answer.
        let down = {
            let s = st.lock().unwrap();
            if name == "primary" {
                s.primary_down
            } else {
                s.fallback_down
            }
        };
        if down {
            return;
        }
        let delay = st.lock().unwrap().delay;
        std::thread::sleep(delay);
        let (status, body, lose) = {
            let mut s = st.lock().unwrap();
            let (status, body) = handle(&req, &mut s);
            let answer = body["error_code"].as_str().unwrap_or("").to_string();
            s.seen.push(Seen {
                listener: name,
                path: req.path.clone(),
                answer,
            });
            let lose = if req.path == api::PATH_ACTIVATE {
                s.lose_activation_answer.take()
            } else {
                None
            };
            (status, body.to_string(), lose)
        };
        if let Some(hang) = lose {
            std::thread::sleep(hang);
            return;
        }
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if tls.get_mut().write_all(resp.as_bytes()).is_err() || tls.get_mut().flush().is_err() {
            return;
        }
    }
}

fn err(code: &str, msg: &str) -> Value {
    json!({"error_code": code, "error_msg": msg})
}

/// The §1.3 recipe, written again from the spec text: canonical URI with a trailing
/// slash, empty query, `name:value\n` for the signed headers in order (then the line
/// break that separates every part, hence a blank line), hex SHA-256s,
/// hex HMAC with the SK.
fn spec_signature(req: &Request, signed: &str, sk: &str) -> String {
    let mut uri = req.path.clone();
    if !uri.ends_with('/') {
        uri.push('/');
    }
    let mut names: Vec<&str> = signed.split(';').collect();
    names.sort();
    let headers: String = names
        .iter()
        .map(|n| {
            format!(
                "{n}:{}\n",
                req.headers.get(*n).map(|v| v.trim()).unwrap_or("")
            )
        })
        .collect();
    let hexs = |b: &[u8]| -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let canonical = format!(
        "POST\n{uri}\n\n{headers}\n{}\n{}",
        names.join(";"),
        hexs(&req.body)
    );
    let date = req.headers.get("x-sdk-date").cloned().unwrap_or_default();
    let sts = format!("SDK-HMAC-SHA256\n{date}\n{}", hexs(canonical.as_bytes()));
    let mut mac = Hmac::<Sha256>::new_from_slice(sk.as_bytes()).unwrap();
    mac.update(sts.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn check_signature(req: &Request, s: &mut State) -> Result<(), Value> {
    let headers: Vec<(String, String)> = req.headers.clone().into_iter().collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let keys = |ak: &str| (ak == AK).then(|| SK.as_bytes().to_vec());
    let lib = apig_sign::verify("POST", &req.path, &[], &headers, &req.body, now, keys);
    // The independent recomputation must agree with the verifier whenever the key is ours.
    let auth = req
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default();
    if let Ok(a) = apig_sign::parse_authorization(&auth) {
        if a.access == AK {
            let same = spec_signature(req, &a.signed_headers.join(";"), SK) == a.signature;
            let lib_ok = !matches!(lib, Err(apig_sign::VerifyError::Mismatch));
            if same != lib_ok {
                s.violations.push(format!(
                    "verifier ({lib:?}) and spec recomputation ({same}) disagree"
                ));
            }
            if !a.signed_headers.iter().any(|h| h == "content-type") {
                s.violations.push("content-type is not signed".into());
            }
        }
    }
    match lib {
        Ok(_) => Ok(()),
        Err(apig_sign::VerifyError::Skew { .. }) => Err(err(
            "APIG.0303",
            "Incorrect app authentication information: the request has expired",
        )),
        Err(e) => Err(err(
            "APIG.0301",
            &format!("Incorrect app authentication information: {e}"),
        )),
    }
}

fn handle(req: &Request, s: &mut State) -> (u16, Value) {
    if let Err(e) = check_signature(req, s) {
        return (401, e);
    }
    if let Some((http, code)) = s.inject.take() {
        return (http, err(&code, "injected"));
    }
    if req.method != "POST" {
        return (405, err("95000002", "Request method not supported"));
    }
    if !req
        .headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
    {
        return (415, err("95000003", "Content type not supported"));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return (400, err("95000004", "req message is not readable"));
    };
    let bad = || (400, err("95000001", "req param is invalid"));
    let code_of = |v: &Value| {
        v.as_str()
            .filter(|c| !c.is_empty() && c.len() <= 64)
            .map(str::to_string)
    };
    match req.path.as_str() {
        api::PATH_ACTIVATE => {
            let Some(code) = code_of(&body["license"]) else {
                return bad();
            };
            let Some(c) = s.codes.get_mut(&code) else {
                return (200, err("92020005", "license code notexist"));
            };
            if !c.received {
                return (200, err("92020004", "can not active before user received."));
            }
            if c.activated {
                return (200, err("92020003", "illegal state"));
            }
            c.activated = true;
            let info = json!({"status": "ALIVE", "expire_time": "20270726121646", "product_id": "12345", "amount": 2, "order_id": "CS123"});
            (
                200,
                json!({"error_code": "92020000", "error_msg": "success", "data": {"license_code_info": info.to_string()}}),
            )
        }
        api::PATH_HEARTBEAT => {
            let Some(code) = code_of(&body["license"]) else {
                return bad();
            };
            match s.codes.get(&code) {
                None => (200, err("92020005", "license code notexist")),
                Some(c) if !c.activated => {
                    (200, err("92020011", "license code has been not activated."))
                }
                Some(c) => (
                    200,
                    json!({"error_code": "92020000", "error_msg": "success", "data": {
                    "license_code": s.answer_about.clone().unwrap_or(code), "status": c.status, "activate_time": "20260101080000",
                    "expire_time": "20270101080000", "some_new_field": [1, 2]}}),
                ),
            }
        }
        api::PATH_USAGE => {
            let Some(list) = body["usage_info"]
                .as_array()
                .filter(|l| !l.is_empty() && l.len() <= 100)
            else {
                return bad();
            };
            for u in list {
                let Some(code) = code_of(&u["license"]) else {
                    return bad();
                };
                let Some(entries) = u["software_usage_Info"]
                    .as_array()
                    .filter(|l| !l.is_empty() && l.len() <= 100)
                else {
                    return bad();
                };
                for e in entries {
                    let id = e.get("id").and_then(Value::as_str);
                    let n = e.get("active_num").and_then(Value::as_u64);
                    if id.is_some() == n.is_some() || n.is_some_and(|n| n > 999_999_999) {
                        return bad();
                    }
                }
                if !s.codes.get(&code).is_some_and(|c| c.activated) {
                    return (200, err("92020020", "Invalid license code exists."));
                }
            }
            for u in list {
                let code = u["license"].as_str().unwrap().to_string();
                for e in u["software_usage_Info"].as_array().unwrap() {
                    match (e["id"].as_str(), e["active_num"].as_u64()) {
                        (Some(id), _) => {
                            s.ids
                                .entry(code.clone())
                                .or_default()
                                .insert(id.to_string());
                        }
                        (_, Some(n)) => *s.active.entry(code.clone()).or_default() += n,
                        _ => unreachable!(),
                    }
                }
            }
            (200, err("92020000", "success"))
        }
        p if p.starts_with("/api/mkp-openapi-public/global/v1/market-event/")
            && p.ends_with("/file") =>
        {
            if !body["content"].is_string() {
                return bad();
            }
            s.uploads.push((p.to_string(), body.clone()));
            (200, err("92020000", "success"))
        }
        _ => (404, json!({"error_msg": "not found"})),
    }
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorCode, String) {
    match r {
        Err(ClientError::Api(e @ ApiError::Refused { .. })) => {
            let shown = e.to_string();
            let ApiError::Refused { http, code, .. } = e else {
                unreachable!()
            };
            (http, code, shown)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn activation_succeeds_once_and_names_each_refusal() {
    let m = Market::start();
    m.add("PL-OK", true);
    m.add("PL-PENDING", false);
    let c = m.client();
    let a = c
        .activate(&ActivateRequest::new("PL-OK", Some(1_767_368_155)).unwrap())
        .unwrap();
    assert_eq!(a.base, m.bases()[0]);
    let info = a.value.info.expect("license_code_info");
    assert_eq!(info.status, "ALIVE");
    assert_eq!(
        info.expire_time,
        kooagent::clock::parse_rfc3339("2027-07-26T12:16:46Z")
    );
    assert_eq!(
        (
            info.product_id.as_deref(),
            info.order_id.as_deref(),
            info.amount.as_deref()
        ),
        (Some("12345"), Some("CS123"), Some("2"))
    );

    let (http, code, shown) = refused(c.activate(&ActivateRequest::new("PL-OK", None).unwrap()));
    assert_eq!((http, code), (200, ErrorCode::AlreadyActivated));
    assert!(
        shown.contains("92020003") && shown.contains("already activated"),
        "{shown}"
    );
    let (_, code, shown) = refused(c.activate(&ActivateRequest::new("PL-NOPE", None).unwrap()));
    assert_eq!(code, ErrorCode::UnknownCode);
    assert!(shown.contains("does not exist"), "{shown}");
    let (_, code, _) = refused(c.activate(&ActivateRequest::new("PL-PENDING", None).unwrap()));
    assert_eq!(code, ErrorCode::NotYetReceived);

    // The stand-in's own checks, reached by bypassing the client's types.
    let raw = |body: &[u8]| {
        let (_, http, text) = c.post(api::PATH_ACTIVATE, body).unwrap();
        refused(api::parse_activate(http, &text).map_err(ClientError::Api))
    };
    assert_eq!(raw(br#"{"license":""}"#).1, ErrorCode::BadRequestParam);
    assert_eq!(raw(b"not json").1, ErrorCode::BodyNotReadable);

    // Every other documented code, as the marketplace would send it.
    for (http, code, kind) in [
        (200, "92020001", ErrorCode::Internal),
        (200, "92020002", ErrorCode::InvalidParam),
        (200, "92020011", ErrorCode::NotActivated),
        (200, "92020020", ErrorCode::InvalidCodeInBatch),
        (405, "95000002", ErrorCode::MethodNotSupported),
        (415, "95000003", ErrorCode::ContentTypeNotSupported),
    ] {
        m.with(|s| s.inject = Some((http, code.into())));
        let r = c.activate(&ActivateRequest::new("PL-OK", None).unwrap());
        let transient = matches!(&r, Err(e) if e.is_transient());
        let (h, k, shown) = refused(r);
        assert_eq!((h, &k), (http, &kind), "{shown}");
        assert!(
            shown.contains(code) && shown.contains(kind.meaning()),
            "{shown}"
        );
        assert_eq!(transient, code == "92020001");
    }
    // Refused locally: nothing sent.
    let before = m.seen().len();
    assert!(ActivateRequest::new(&"P".repeat(65), None).is_err());
    assert_eq!(m.seen().len(), before);
    m.assert_no_violations();
}

#[test]
fn heartbeat_reports_each_status() {
    let m = Market::start();
    m.add("PL-1", true);
    let c = m.client();
    let hb = || c.heartbeat(&HeartbeatRequest::new("PL-1").unwrap());
    assert_eq!(refused(hb()).1, ErrorCode::NotActivated);
    c.activate(&ActivateRequest::new("PL-1", None).unwrap())
        .unwrap();
    for (wire, status) in [
        ("ALIVE", CodeStatus::Alive),
        ("EXPIRED", CodeStatus::Expired),
        ("RELEASED", CodeStatus::Released),
    ] {
        m.with(|s| s.codes.get_mut("PL-1").unwrap().status = wire);
        let i = hb().unwrap().value;
        assert_eq!((i.license_code.as_str(), &i.status), ("PL-1", &status));
        assert_eq!(
            i.expire_time,
            kooagent::clock::parse_rfc3339("2027-01-01T08:00:00Z")
        );
        assert_eq!(
            i.activate_time_unix,
            kooagent::clock::parse_rfc3339("2026-01-01T08:00:00Z")
        );
        assert_eq!(i.extra["some_new_field"], json!([1, 2]));
    }
    assert_eq!(
        refused(c.heartbeat(&HeartbeatRequest::new("PL-X").unwrap())).1,
        ErrorCode::UnknownCode
    );
    m.assert_no_violations();
}

#[test]
fn usage_is_validated_and_counted() {
    let m = Market::start();
    for code in ["PL-A", "PL-B"] {
        m.add(code, true);
    }
    let c = m.client();
    for code in ["PL-A", "PL-B"] {
        c.activate(&ActivateRequest::new(code, None).unwrap())
            .unwrap();
    }
    // 150 distinct clients of PL-A (some reported twice), a daily total for PL-B.
    let mut entries: Vec<(String, SoftwareUsageInfo)> = (0..180)
        .map(|i| {
            (
                "PL-A".to_string(),
                SoftwareUsageInfo::id(&format!("device-{}", i % 150)),
            )
        })
        .collect();
    entries.push(("PL-B".into(), SoftwareUsageInfo::active_num(42)));
    let reqs = UsageRequest::batches(&entries).unwrap();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        c.report_usage(r).unwrap();
    }
    assert_eq!(m.with(|s| s.ids["PL-A"].len()), 150);
    assert_eq!(m.with(|s| s.active["PL-B"]), 42);

    // The exactly-one rule and the limits are enforced before anything is sent.
    let sent = m.seen().len();
    let one = |e: SoftwareUsageInfo| UsageRequest {
        usage_info: vec![api::Usage {
            license: "PL-A".into(),
            software_usage_info: vec![e],
        }],
    };
    for bad in [
        one(SoftwareUsageInfo {
            id: Some("d".into()),
            active_num: Some(1),
        }),
        one(SoftwareUsageInfo {
            id: None,
            active_num: None,
        }),
        UsageRequest {
            usage_info: vec![api::Usage {
                license: "PL-A".into(),
                software_usage_info: vec![SoftwareUsageInfo::id("d"); 101],
            }],
        },
    ] {
        match c.report_usage(&bad) {
            Err(ClientError::Api(ApiError::Invalid(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(m.seen().len(), sent);
    // The stand-in enforces the same rule when a request gets past the client.
    let raw = serde_json::to_vec(&one(SoftwareUsageInfo {
        id: Some("d".into()),
        active_num: Some(1),
    }))
    .unwrap();
    let (_, http, text) = c.post(api::PATH_USAGE, &raw).unwrap();
    assert!(matches!(
        api::parse_usage(http, &text),
        Err(ApiError::Refused {
            code: ErrorCode::BadRequestParam,
            ..
        })
    ));
    let unknown = UsageRequest {
        usage_info: vec![api::Usage {
            license: "PL-Z".into(),
            software_usage_info: vec![SoftwareUsageInfo::id("d")],
        }],
    };
    assert_eq!(
        refused(c.report_usage(&unknown)).1,
        ErrorCode::InvalidCodeInBatch
    );
    m.assert_no_violations();
}

#[test]
fn fallback_host_only_when_the_primary_cannot_be_reached() {
    let m = Market::start();
    m.add("PL-1", true);
    let c = m.client();
    m.with(|s| s.primary_down = true);
    let a = c
        .activate(&ActivateRequest::new("PL-1", None).unwrap())
        .unwrap();
    assert_eq!(a.base, m.bases()[1]);
    assert_eq!(m.seen().last().unwrap().listener, "fallback");
    m.with(|s| s.primary_down = false);
    let h = c
        .heartbeat(&HeartbeatRequest::new("PL-1").unwrap())
        .unwrap();
    assert_eq!(h.base, m.bases()[0]);
    // An HTTP answer, even an error, is final: no second host.
    m.with(|s| s.inject = Some((503, "92020001".into())));
    let before = m.seen().len();
    let e = c
        .heartbeat(&HeartbeatRequest::new("PL-1").unwrap())
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    let seen = m.seen();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(
        (seen[before].listener, seen[before].path.as_str()),
        ("primary", api::PATH_HEARTBEAT)
    );
    assert_eq!(seen[before].answer, "92020001");
    m.assert_no_violations();
}

#[test]
fn bad_signatures_and_untrusted_certificates_are_refused() {
    let m = Market::start();
    m.add("PL-1", true);
    let gateway = |r: Result<_, ClientError>| match r {
        Err(ClientError::Api(ApiError::Gateway { http, code, .. })) => (http, code),
        other => panic!("expected a gateway refusal, got {other:?}"),
    };
    let req = ActivateRequest::new("PL-1", None).unwrap();
    let wrong_sk = m.client_with(AkSk::new(AK, "not-the-sk"), Arc::new(SystemClock));
    assert_eq!(
        gateway(wrong_sk.activate(&req)),
        (401, "APIG.0301".to_string())
    );
    let wrong_ak = m.client_with(AkSk::new("OTHER", SK), Arc::new(SystemClock));
    assert_eq!(
        gateway(wrong_ak.activate(&req)),
        (401, "APIG.0301".to_string())
    );
    let late = SystemClock.now_ms() - 16 * 60 * 1000;
    let skewed = m.client_with(AkSk::new(AK, SK), Arc::new(FakeClock::new(late)));
    let e = skewed.activate(&req).unwrap_err();
    assert!(e.to_string().contains("clock"), "{e}");
    assert_eq!(gateway(Err(e)), (401, "APIG.0303".to_string()));
    assert!(m.with(|s| !s.codes["PL-1"].activated));
    // Without the test CA the stand-in is not trusted: nothing reaches it, on either host.
    let before = m.seen().len();
    let untrusted = Client::new(
        &m.bases(),
        None,
        "k",
        Duration::from_secs(60),
        AkSk::new(AK, SK),
        Arc::new(SystemClock),
    )
    .unwrap();
    match untrusted.activate(&req) {
        Err(ClientError::Unreachable(why)) => assert!(why.contains(&m.bases()[1]), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(m.seen().len(), before);
    // The right key still works.
    m.client().activate(&req).unwrap();
    m.assert_no_violations();
}
