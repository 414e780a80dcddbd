//! Issue 16: the seller console's sign-in (argon2id password set by the CLI, session
//! cookie flags, CSRF, rate limit, audit log) and health page, over real HTTPS; a console
//! session opens nothing else, and nothing else opens the console.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::harness::{short_tempdir, BIN};
use crate::seller_server::{write_private, SellerServer, KEY};

pub(crate) const PASSWORD: &str = "correct horse battery staple";
const METRICS: &str = "metrics-token-for-console-test";

pub(crate) fn set_password(out: &std::path::Path, password: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(["seller", "console-password", "--out"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub(crate) fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The value of `name="csrf" value="..."` in a page.
pub(crate) fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// `name=value` of a Set-Cookie header.
pub(crate) fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

pub(crate) fn get(
    s: &SellerServer,
    path: &str,
    cookie: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let h: Vec<(String, String)> = cookie
        .map(|c| vec![("Cookie".to_string(), c.to_string())])
        .unwrap_or_default();
    let (st, hd, b) = s.request_with("GET", path, &h, b"");
    (st, hd, String::from_utf8(b).unwrap())
}

pub(crate) fn post(
    s: &SellerServer,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> (u16, Vec<(String, String)>, String) {
    let h: Vec<(String, String)> = cookie
        .map(|c| vec![("Cookie".to_string(), c.to_string())])
        .unwrap_or_default();
    let (st, hd, b) = s.request_with("POST", path, &h, form.as_bytes());
    (st, hd, String::from_utf8(b).unwrap())
}

fn page_of(s: &SellerServer, session: &str) -> String {
    get(s, "/console/instances?q=CONSOLE-INST-1", Some(session)).2
}

pub(crate) fn login_form(s: &SellerServer) -> (String, String) {
    let (status, h, html) = get(s, "/console/login", None);
    assert_eq!(status, 200, "{html}");
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("width=device-width"));
    assert!(header(&h, "content-security-policy").is_some());
    let set = header(&h, "set-cookie").expect("the sign-in form's cookie");
    (cookie_pair(set), csrf_in(&html))
}

#[test]
fn console_sign_in_health_sign_out_and_its_boundaries() {
    // The CLI: a short password is refused; the hash is argon2id, mode 0600.
    let keys = short_tempdir();
    let pw = keys.path().join("console.pw");
    let out = set_password(&pw, "short");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));
    let out = set_password(&pw, PASSWORD);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = std::fs::read_to_string(&pw).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PASSWORD));
    assert_eq!(
        std::fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = keys.path().join("metrics.token");
    write_private(&token, METRICS);

    let s = SellerServer::start(&format!(
        "console_password_file = \"{}\"\nmetrics_token_file = \"{}\"",
        pw.display(),
        token.display()
    ));
    let (_, v) = s.market(&json!({"activity": "expireLicense", "instanceId": "none"}));
    assert_eq!(v["resultCode"], "000003");

    // Not signed in: the pages send to the sign-in form.
    let (status, h, _) = get(&s, "/console/health", None);
    assert_eq!(status, 303);
    assert_eq!(header(&h, "location"), Some("/console/login"));

    // A form without its cookie (another site's page posting): refused, not even checked.
    let (login_cookie, csrf) = login_form(&s);
    let form = format!("csrf={csrf}&password=correct+horse+battery+staple");
    assert_eq!(post(&s, "/console/login", None, &form).0, 403);
    // A wrong password.
    let wrong = format!("csrf={csrf}&password=not+the+password");
    let (status, _, html) = post(&s, "/console/login", Some(&login_cookie), &wrong);
    assert_eq!(status, 401);
    assert!(html.contains("Wrong password"), "{html}");
    // The right one: a session cookie scripts cannot read, sent only over HTTPS, never
    // from another site.
    let (status, h, _) = post(&s, "/console/login", Some(&login_cookie), &form);
    assert_eq!(status, 303);
    assert_eq!(header(&h, "location"), Some("/console/health"));
    let set = header(&h, "set-cookie").unwrap();
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(set.starts_with("kooagent_console="), "{set}");
    let session = cookie_pair(set);

    let (status, h, html) = get(&s, "/console/health", Some(&session));
    assert_eq!(status, 200, "{html}");
    assert_eq!(header(&h, "cache-control"), Some("no-store"));
    assert!(html.contains("reachable"), "{html}");
    assert!(html.contains("000003"), "{html}");
    assert!(html.contains("Signing key id"), "{html}");
    // An order, then the instance found by its id, its license id and its device code
    // (as a buyer types it), with its state; the device that fetched it on the devices page.
    let code = crate::seller_server::valid_code("CNSL");
    let now = crate::seller_server::now_ms() / 1000;
    let (_, v) = s.market(&json!({
        "activity": "getLicense", "instanceId": "CONSOLE-INST-1", "eventId": "console-ev-1",
        "effectiveTime": crate::seller_server::market_time(now - 60),
        "expireTime": crate::seller_server::digits14(now + 86_400),
        "deviceFingerprint": code, "testFlag": "1"
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    for q in [
        "CONSOLE-INST-1".to_string(),
        "kg-CONSOLE-INST-1".to_string(),
        code.to_lowercase().replace('-', "+"),
    ] {
        let (status, _, page) = get(&s, &format!("/console/instances?q={q}"), Some(&session));
        assert_eq!(status, 200, "{page}");
        assert!(
            page.contains("CONSOLE-INST-1") && page.contains(&code),
            "{q}: {page}"
        );
        assert!(page.contains(">active<"), "{page}");
    }
    // Freeze from the console: confirmed, CSRF-checked, audited; the agents' status
    // endpoint then serves a freeze token, as after the marketplace's callback.
    let page_csrf = csrf_in(&page_of(&s, &session));
    let no_confirm = format!("csrf={page_csrf}&instance=CONSOLE-INST-1&status=FREEZE");
    assert_eq!(
        post(&s, "/console/instances/status", Some(&session), &no_confirm).0,
        400
    );
    let forged = "csrf=forged&instance=CONSOLE-INST-1&status=FREEZE&confirm=yes";
    assert_eq!(
        post(&s, "/console/instances/status", Some(&session), forged).0,
        403
    );
    let freeze = format!("{no_confirm}&confirm=yes");
    let (status, h, _) = post(&s, "/console/instances/status", Some(&session), &freeze);
    assert_eq!(status, 303);
    assert_eq!(
        header(&h, "location"),
        Some("/console/instances?q=CONSOLE-INST-1")
    );
    let (_, _, page) = get(&s, "/console/instances?q=CONSOLE-INST-1", Some(&session));
    assert!(
        page.contains("active (frozen)") && page.contains(">Unfreeze<"),
        "{page}"
    );
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let target = format!("/v1/licenses/kg-CONSOLE-INST-1/status?device_code={code}");
    let (status, _, token) = s.device_get(&key, &target);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&token));
    let t =
        kooagent::freeze::token::parse(String::from_utf8_lossy(&token).trim().as_bytes()).unwrap();
    assert_eq!(t.req.action, kooagent::freeze::token::Action::Freeze);
    assert_eq!(t.req.license_id, "kg-CONSOLE-INST-1");

    let (_, _, page) = get(&s, "/console/instances?q=%3Cscript%3E", Some(&session));
    assert!(
        page.contains("No instance matches <code>&lt;script&gt;</code>"),
        "{page}"
    );
    let target = format!("/v1/licenses/kg-CONSOLE-INST-1?device_code={code}");
    assert_eq!(s.device_get(&key, &target).0, 200);
    let (status, _, page) = get(&s, "/console/devices", Some(&session));
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(&code), "{page}");
    assert_eq!(get(&s, "/console/devices", None).0, 303);

    let (status, _, css) = get(&s, "/console/console.css", None);
    assert_eq!(status, 200);
    assert!(css.contains("@media"));

    // The console's session opens neither the marketplace's endpoint nor /metrics, and
    // neither the marketplace's key nor the metrics token opens the console.
    let (status, _, body) = post(&s, "/koogallery/sku-pro", Some(&session), "{}");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["resultCode"], "000001", "{v}");
    assert_eq!(get(&s, "/metrics", Some(&session)).0, 401);
    for bearer in [METRICS, KEY] {
        let h = vec![("Authorization".to_string(), format!("Bearer {bearer}"))];
        assert_eq!(s.request_with("GET", "/console/health", &h, b"").0, 303);
    }

    // Sign-out needs the session's CSRF token.
    assert_eq!(
        post(&s, "/console/logout", Some(&session), "csrf=forged").0,
        403
    );
    let form = format!("csrf={}", csrf_in(&html));
    let (status, h, _) = post(&s, "/console/logout", Some(&session), &form);
    assert_eq!(status, 303);
    assert!(header(&h, "set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(get(&s, "/console/health", Some(&session)).0, 303);

    // Sign-in attempts from one address: 5 a minute (two used above), then 429 even
    // with the right password.
    let (login_cookie, csrf) = login_form(&s);
    let wrong = format!("csrf={csrf}&password=still+not+it");
    for _ in 0..3 {
        assert_eq!(
            post(&s, "/console/login", Some(&login_cookie), &wrong).0,
            401
        );
    }
    let right = format!("csrf={csrf}&password=correct+horse+battery+staple");
    let (status, h, _) = post(&s, "/console/login", Some(&login_cookie), &right);
    assert_eq!(status, 429);
    assert_eq!(header(&h, "retry-after"), Some("60"));

    // The audit log: who, what, when, from where, for each.
    let audit = std::fs::read_to_string(s.dir.path().join("state/console-audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |what: &str, ok: bool| {
        lines
            .iter()
            .any(|l| l["what"] == what && l["ok"] == ok && l["from"] == "127.0.0.1")
    };
    assert!(has("sign in", true), "{audit}");
    assert!(has("sign in", false), "{audit}");
    assert!(has("sign out", true), "{audit}");
    assert!(has("sign in (rate limited)", false), "{audit}");
    assert!(has("freeze instance CONSOLE-INST-1", true), "{audit}");
    assert!(lines
        .iter()
        .all(|l| l["who"] == "admin" && l["at"].is_string()));
    assert!(!audit.contains(PASSWORD) && !s.log().contains(PASSWORD));
}

#[test]
fn console_is_off_without_a_password_file() {
    let s = SellerServer::start("");
    assert_eq!(get(&s, "/console/login", None).0, 404);
    assert_eq!(get(&s, "/console/health", None).0, 404);
}
