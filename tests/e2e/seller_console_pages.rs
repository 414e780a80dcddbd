//! Issue 16: the console's call history and search by order and customer, the reissue and
//! revoke actions (each confirmed, audited, and seen by the agents' endpoints), the
//! authorization-code page with what the relay forwarded, and the health page's last hour
//! — over real HTTPS, with the marketplace's calls and the relay's stand-in marketplace.

use serde_json::{json, Value};

use crate::authcode::Market;
use crate::harness::short_tempdir;
use crate::relay::{call, Device};
use crate::seller_console::{
    cookie_pair, csrf_in, get, header, login_form, post, set_password, PASSWORD,
};
use crate::seller_server::{digits14, market_time, now_ms, valid_code, SellerServer};

/// Signs in; the session cookie.
fn sign_in(s: &SellerServer) -> String {
    let (login_cookie, csrf) = login_form(s);
    let form = format!("csrf={csrf}&password={}", PASSWORD.replace(' ', "+"));
    let (status, h, body) = post(s, "/console/login", Some(&login_cookie), &form);
    assert_eq!(status, 303, "{body}");
    cookie_pair(header(&h, "set-cookie").unwrap())
}

fn license_of(body: &[u8]) -> kooagent::license::format::License {
    kooagent::license::format::parse(body).unwrap().license
}

#[test]
fn console_history_search_reissue_revoke_codes_and_the_last_hour() {
    let market = Market::start();
    market.add("CODE-C1", true);
    let dir = short_tempdir();
    let pw = dir.path().join("console.pw");
    assert!(set_password(&pw, PASSWORD).status.success());
    let s = crate::relay::start_with(
        &market,
        "",
        &format!("console_password_file = \"{}\"", pw.display()),
        dir.path(),
    );
    let session = sign_in(&s);

    // A §2 order, resent once by the marketplace; a §2.1 purchase (order and customer).
    let now = now_ms() / 1000;
    let code1 = valid_code("HIS1");
    let order = json!({
        "activity": "getLicense", "instanceId": "HIST-INST-1", "eventId": "hist-ev-1",
        "effectiveTime": market_time(now - 60), "expireTime": digits14(now + 86_400),
        "deviceFingerprint": code1, "testFlag": "1"
    });
    let (first, v) = s.market(&order);
    assert_eq!(v["resultCode"], "000000", "{v}");
    assert_eq!(s.market(&order).0, first);
    let (_, v) = s.market(&json!({
        "activity": "getLicense", "customerId": "CUST-9", "customerName": "n",
        "businessId": "BIZ-9", "orderId": "ORD-77", "skuCode": "sku-1y",
        "timeStamp": "20261130093015123", "deviceFingerprint": valid_code("HIS2")
    }));
    assert_eq!(v["resultCode"], "000000", "{v}");
    let (_, v) = s.market(&json!({"activity": "expireLicense", "instanceId": "HIST-NONE"}));
    assert_eq!(v["resultCode"], "000003");

    // Search by order and by customer finds the purchase's instance.
    for q in ["ORD-77", "CUST-9"] {
        let (status, _, page) = get(&s, &format!("/console/instances?q={q}"), Some(&session));
        assert_eq!(status, 200, "{page}");
        assert!(page.contains("/console/instance?id=BIZ-9"), "{q}: {page}");
    }
    // The instance's page: its call history with the result, the resend and our answer.
    let (status, _, page) = get(&s, "/console/instance?id=HIST-INST-1", Some(&session));
    assert_eq!(status, 200, "{page}");
    let history = &page[page.find("id=\"call-history\"").expect("the history")..];
    assert!(history.contains(">getLicense<"), "{history}");
    assert!(history.contains(">000000<"), "{history}");
    assert!(history.contains("<td>1 (last "), "retries: {history}");
    assert!(
        history.contains("&quot;licenseId&quot;:&quot;kg-HIST-INST-1&quot;"),
        "the answer we gave: {history}"
    );
    let (_, _, page9) = get(&s, "/console/instance?id=BIZ-9", Some(&session));
    assert!(page9.contains("ORD-77"), "{page9}");

    // Reissue to a corrected device code, typed in lower case with spaces: a confirmation
    // page with the canonical code first, nothing done yet.
    let code2 = valid_code("HIS3");
    let typed = code2.to_lowercase().replace('-', "+");
    let csrf = csrf_in(&page);
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let (status, _, confirm) = post(
        &s,
        "/console/instances/reissue",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1&device={typed}"),
    );
    assert_eq!(status, 200, "{confirm}");
    assert!(
        confirm.contains(&format!("id=\"reissue-code\">{code2}<")),
        "{confirm}"
    );
    assert!(
        confirm.contains("name=\"confirm\" value=\"yes\""),
        "{confirm}"
    );
    let target2 = format!("/v1/licenses/kg-HIST-INST-1?device_code={code2}");
    assert_ne!(
        s.device_get(&key, &target2).0,
        200,
        "not reissued before confirming"
    );
    // A code that is not one, and a forged form: refused.
    let (status, _, bad) = post(
        &s,
        "/console/instances/reissue",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1&device=NOT-A-CODE&confirm=yes"),
    );
    assert_eq!(status, 400, "{bad}");
    let forged = format!("csrf=forged&instance=HIST-INST-1&device={code2}&confirm=yes");
    assert_eq!(
        post(&s, "/console/instances/reissue", Some(&session), &forged).0,
        403
    );
    let (status, h, _) = post(
        &s,
        "/console/instances/reissue",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1&device={code2}&confirm=yes"),
    );
    assert_eq!(status, 303);
    assert_eq!(
        header(&h, "location"),
        Some("/console/instance?id=HIST-INST-1")
    );
    // The agent with the corrected code fetches a license bound to it, same terms.
    let (status, _, lic) = s.device_get(&key, &target2);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&lic));
    let new = license_of(&lic);
    let old = license_of(v_license(&first).as_bytes());
    assert_eq!(new.devices, std::slice::from_ref(&code2));
    assert_eq!(
        (new.id.as_str(), new.not_after, &new.features),
        (old.id.as_str(), old.not_after, &old.features)
    );

    // Revoke: a confirmation step, then a release token for the agents.
    let (status, _, confirm) = post(
        &s,
        "/console/instances/revoke",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1"),
    );
    assert_eq!(status, 200, "{confirm}");
    assert!(confirm.contains("id=\"confirm-revoke\""), "{confirm}");
    let status_target = format!("/v1/licenses/kg-HIST-INST-1/status?device_code={code2}");
    assert_ne!(s.device_get(&key, &status_target).0, 200, "no token yet");
    let (status, _, _) = post(
        &s,
        "/console/instances/revoke",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1&confirm=yes"),
    );
    assert_eq!(status, 303);
    let (status, _, token) = s.device_get(&key, &status_target);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&token));
    let t =
        kooagent::freeze::token::parse(String::from_utf8_lossy(&token).trim().as_bytes()).unwrap();
    assert_eq!(t.req.action, kooagent::freeze::token::Action::Release);
    let (_, _, page) = get(&s, "/console/instance?id=HIST-INST-1", Some(&session));
    assert!(page.contains(">released<"), "{page}");
    assert!(
        !page.contains("id=\"reissue-form\""),
        "no actions on a released instance"
    );
    assert!(page.contains(">releaseLicense (console)<"), "{page}");
    assert!(page.contains(">reissue (console)<"), "{page}");
    // A released instance gets no new license from the console either.
    let (status, _, _) = post(
        &s,
        "/console/instances/reissue",
        Some(&session),
        &format!("csrf={csrf}&instance=HIST-INST-1&device={code1}&confirm=yes"),
    );
    assert_eq!(status, 400);

    // Authorization codes: the marketplace's status (a freeze callback), and the relay's
    // daily query and usage report for a code a device activated through it.
    let dev = Device::new();
    assert_eq!(
        call(&s, &dev, "activate", &json!({"license": "CODE-C1"})).0,
        200
    );
    assert_eq!(
        call(&s, &dev, "heartbeat", &json!({"license": "CODE-C1"})).0,
        200
    );
    let usage = json!({"usage_info": [{"license": "CODE-C1",
        "software_usage_Info": [{"id": "client-1"}, {"id": "client-2"}]}]});
    assert_eq!(call(&s, &dev, "usage", &usage).0, 200);
    let (_, v) = s.market(
        &json!({"activity": "updateLicenseCodeStatus", "license": "CODE-F",
        "status": "FREEZE"}),
    );
    assert_eq!(v["resultCode"], "000000", "{v}");
    // The relay records after answering: wait for it (bounded).
    let mut codes = String::new();
    for _ in 0..100 {
        codes = get(&s, "/console/codes", Some(&session)).2;
        if codes.contains("accepted") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let row = |code: &str| -> String {
        let at = codes
            .find(&format!("<code>{code}</code>"))
            .unwrap_or_else(|| panic!("{code}: {codes}"));
        codes[at..].split("</tr>").next().unwrap().to_string()
    };
    let c1 = row("CODE-C1");
    assert!(c1.contains("ALIVE"), "the daily query's answer: {c1}");
    assert!(c1.contains("1 reports, 2 entries"), "{c1}");
    assert!(c1.contains("accepted"), "{c1}");
    assert!(
        c1.contains("<td>yes</td>"),
        "activated through the relay: {c1}"
    );
    assert!(row("CODE-F").contains("active (frozen)"), "{codes}");

    // Health: the last hour's marketplace calls by result code (this process; the
    // console's own actions are not marketplace calls), answer times.
    let (_, _, health) = get(&s, "/console/health", Some(&session));
    let hour = &health[health
        .find("id=\"calls-last-hour\"")
        .expect("the last hour")..];
    let hour = hour.split("</table>").next().unwrap();
    assert!(hour.contains(">000000</td><td>4<"), "{hour}");
    assert!(hour.contains(">000003</td><td>1<"), "{hour}");
    assert!(health.contains("p50 ≤"), "{health}");

    // Every page is reachable from the navigation.
    for link in [
        "/console/instances",
        "/console/codes",
        "/console/devices",
        "/console/health",
    ] {
        assert!(health.contains(&format!("href=\"{link}\"")), "{link}");
    }
    // The audit log has both actions.
    let audit = std::fs::read_to_string(s.dir.path().join("state/console-audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |what: &str, ok: bool| lines.iter().any(|l| l["what"] == what && l["ok"] == ok);
    assert!(
        has(
            &format!("reissue instance HIST-INST-1 to device code {code2}"),
            true
        ),
        "{audit}"
    );
    assert!(has("revoke instance HIST-INST-1", true), "{audit}");
    assert!(
        has(
            &format!("reissue instance HIST-INST-1 to device code {code1}"),
            false
        ),
        "{audit}"
    );
}

/// The license text of a `getLicense` answer.
fn v_license(raw: &str) -> String {
    let v: Value = serde_json::from_str(raw).unwrap();
    v["license"].as_str().unwrap().to_string()
}

/// Sessions are in the database: two `seller serve` processes on one database (the same
/// SQLite file) both know a session made on either, and a sign-out on one ends it on both
/// — no sticky routing needed.
#[test]
fn console_sessions_hold_across_processes_on_one_database() {
    let keys = short_tempdir();
    let pw = keys.path().join("console.pw");
    assert!(set_password(&pw, PASSWORD).status.success());
    let a = SellerServer::start(&format!("console_password_file = \"{}\"", pw.display()));
    let b = a.replica_sharing_state();
    let session = sign_in(&a);
    let (status, _, page) = get(&b, "/console/health", Some(&session));
    assert_eq!(status, 200, "the other process knows the session: {page}");
    let form = format!("csrf={}", csrf_in(&page));
    assert_eq!(post(&b, "/console/logout", Some(&session), &form).0, 303);
    assert_eq!(get(&a, "/console/health", Some(&session)).0, 303);
    assert_eq!(get(&b, "/console/health", Some(&session)).0, 303);
}
