//! Issue 16: the seller server's `GET /metrics` (Prometheus text format), behind a token of
//! its own.

use std::process::Command;

use serde_json::json;

use crate::harness::BIN;
use crate::seller_server::{digits14, market_time, now_ms, sign, write_private, SellerServer, KEY};

const TOKEN: &str = "metrics-token-9f8e7d6c5b4a";

/// The value of the sample `name{labels}` (labels exactly as printed), if present.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

fn scrape(server: &SellerServer, auth: Option<&str>) -> (u16, String) {
    let h: Vec<(String, String)> = auth
        .map(|a| vec![("Authorization".to_string(), a.to_string())])
        .unwrap_or_default();
    let (status, _, body) = server.request_with("GET", "/metrics", &h, b"");
    (status, String::from_utf8(body).unwrap())
}

fn with_token() -> SellerServer {
    // The token file is written before the server starts (it reads it at start).
    let dir = crate::harness::short_tempdir();
    let token = dir.path().join("metrics.token");
    write_private(&token, &format!("{TOKEN}\n"));
    let server = SellerServer::start(&format!("metrics_token_file = \"{}\"", token.display()));
    // Keep the token's directory as long as the server.
    std::mem::forget(dir);
    server
}

#[test]
fn metrics_count_orders_and_need_their_own_token() {
    let server = with_token();
    let now = now_ms() / 1000;
    for i in 0..3 {
        let order = json!({
            "activity": "getLicense", "instanceId": format!("MET-{i}"),
            "eventId": format!("met-ev-{i}"), "effectiveTime": market_time(now - 60),
            "expireTime": digits14(now + 86_400), "deviceFingerprint": "", "testFlag": "1"
        });
        // No device code: refused 000002 (require_device), still counted.
        let (_, v) = server.market(&order);
        assert_eq!(v["resultCode"], "000002", "{v}");
    }
    let (_, v) = server.market(&json!({"activity": "expireLicense", "instanceId": "none"}));
    assert_eq!(v["resultCode"], "000003", "{v}");

    // A marketplace call signed with the metrics token is not the marketplace's.
    let body = json!({"activity": "expireLicense", "instanceId": "none"}).to_string();
    let ts = now_ms().to_string();
    let (_, v) = server.market_signed(
        &body,
        &ts,
        "n-metrics",
        &sign(TOKEN, "n-metrics", &ts, &body),
    );
    assert_eq!(v["resultCode"], "000001", "{v}");

    let (status, page) = scrape(&server, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(status, 200, "{page}");
    let calls = "kooagent_seller_marketplace_calls_total";
    assert_eq!(
        sample(
            &page,
            &format!("{calls}{{activity=\"getLicense\",result_code=\"000002\"}}")
        ),
        Some(3.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            &format!("{calls}{{activity=\"expireLicense\",result_code=\"000003\"}}")
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            &format!("{calls}{{activity=\"unauthenticated\",result_code=\"000001\"}}")
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "kooagent_seller_marketplace_answer_seconds_count"),
        Some(5.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "kooagent_seller_marketplace_answer_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(5.0)
    );
    assert!(
        sample(&page, "kooagent_seller_db_transaction_seconds_count").unwrap() >= 1.0,
        "{page}"
    );
    assert_eq!(sample(&page, "kooagent_seller_db_errors_total"), Some(0.0));
    assert_eq!(sample(&page, "kooagent_seller_database_up"), Some(1.0));
    assert_eq!(
        sample(&page, "kooagent_seller_license_upload_pending"),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "kooagent_seller_usage_outbox{state=\"pending\"}"),
        Some(0.0),
        "{page}"
    );
    assert!(page.contains("# TYPE kooagent_seller_marketplace_answer_seconds histogram"));

    // An unsigned license fetch is an agent call refused 401: counted by endpoint.
    assert_eq!(server.request("GET", "/v1/licenses/none", b"").0, 401);
    let (_, page) = scrape(&server, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(
        sample(
            &page,
            "kooagent_seller_relay_calls_total{endpoint=\"license\",status=\"401\"}"
        ),
        Some(1.0),
        "{page}"
    );

    // No token, a wrong one, and the marketplace's key: 401, and no counter leaks.
    for auth in [
        None,
        Some("Bearer wrong-token-000000000".to_string()),
        Some(format!("Bearer {KEY}")),
        Some(TOKEN.to_string()),
    ] {
        let (status, page) = scrape(&server, auth.as_deref());
        assert_eq!(status, 401, "{auth:?}");
        assert!(!page.contains("kooagent_seller"), "{page}");
    }
    assert!(!server.log().contains(TOKEN));
}

#[test]
fn metrics_are_off_without_a_token_and_refuse_the_interconnection_key() {
    let server = SellerServer::start("");
    let (status, _) = scrape(&server, Some(&format!("Bearer {KEY}")));
    assert_eq!(status, 404);

    // A token file holding the interconnection key: the server does not start.
    let d = server.dir.path();
    write_private(&d.join("same.token"), &format!("{KEY}\n"));
    let cfg = std::fs::read_to_string(d.join("seller.toml"))
        .unwrap()
        .replacen(
            "[seller_server]\n",
            &format!(
                "[seller_server]\nmetrics_token_file = \"{}\"\n",
                d.join("same.token").display()
            ),
            1,
        );
    std::fs::write(d.join("same.toml"), cfg).unwrap();
    let out = Command::new(BIN)
        .args(["seller", "serve", "--config"])
        .arg(d.join("same.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("seller_server.metrics_token_file") && err.contains("interconnection key"),
        "{err}"
    );
}
