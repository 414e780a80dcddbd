//! The activities against both storage backends (PostgreSQL when KOOAGENT_TEST_PG_URL is
//! set), without a server.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use super::activities::{self, license_id_for, parse_time, Ctx};
use super::db::{self, Db, DbError};
use super::tokens::{NotConfigured, StatusTokens, TokenAction, NOT_CONFIGURED};
use super::ProductConfig;
use kooagent_core::license::format;

/// Test tokens: the fields in plain text (the real format belongs to the freeze module).
struct TestTokens;

impl StatusTokens for TestTokens {
    fn issue(
        &self,
        license_id: &str,
        action: TokenAction,
        seq: u64,
        devices: &[String],
        issued_at: i64,
    ) -> Result<String, String> {
        Ok(format!(
            "test-token {license_id} {} #{seq} {devices:?} @{issued_at}",
            action.as_str()
        ))
    }
}

/// A device code with a valid check symbol.
pub fn code(prefix: &str) -> String {
    kooagent_core::testing::test_code(prefix)
}

fn product() -> ProductConfig {
    ProductConfig {
        path: "/kg/sku".into(),
        product: "sku-pro".into(),
        grace_secs: 3600,
        features: vec!["sso".into()],
        limits: [("cores".to_string(), 8)].into(),
        require_device: true,
    }
}

struct Harness {
    /// `license_upload` on.
    upload: bool,
    db: Db,
    key: SigningKey,
    tokens: Arc<dyn StatusTokens>,
    product: ProductConfig,
    now: i64,
}

const NOW: i64 = 1_800_000_000;

impl Harness {
    fn all(dir: &std::path::Path, tokens: Arc<dyn StatusTokens>) -> Vec<(&'static str, Harness)> {
        db::tests::backends(dir)
            .into_iter()
            .map(|(name, b)| {
                (
                    name,
                    Harness {
                        upload: false,
                        db: Db::start(b),
                        key: SigningKey::from_bytes(&[7; 32]),
                        tokens: tokens.clone(),
                        product: product(),
                        now: NOW,
                    },
                )
            })
            .collect()
    }

    fn raw(&self, body: &[u8]) -> Result<String, DbError> {
        self.raw_with(body, true)
    }

    /// `presign`: as the server does, the license signed before the transaction.
    fn raw_with(&self, body: &[u8], presign: bool) -> Result<String, DbError> {
        let (key, tokens, product, now, upload) = (
            self.key.clone(),
            self.tokens.clone(),
            self.product.clone(),
            self.now,
            self.upload,
        );
        let body = body.to_vec();
        let presigned = presign
            .then(|| {
                activities::presign(
                    &Ctx {
                        now,
                        product: &product,
                        key: &key,
                        tokens: tokens.as_ref(),
                        presigned: None,
                        upload: false,
                    },
                    &body,
                )
            })
            .flatten();
        self.db.run_blocking(move |tx| {
            let ctx = Ctx {
                now,
                product: &product,
                key: &key,
                tokens: tokens.as_ref(),
                presigned: presigned.as_ref(),
                upload,
            };
            activities::handle(tx, &ctx, &body)
        })
    }

    /// (resultCode, whole answer, raw body)
    fn call(&self, body: Value) -> (String, Value, String) {
        let raw = self
            .raw(body.to_string().as_bytes())
            .unwrap_or_else(|e| activities::failure_answer(&e));
        let v: Value = serde_json::from_str(&raw).unwrap();
        (v["resultCode"].as_str().unwrap().to_string(), v, raw)
    }
}

fn order(instance: &str, event: &str, device: &str) -> Value {
    json!({
        "activity": "getLicense", "instanceId": instance, "eventId": event,
        "effectiveTime": "2027-01-15 08:00:00 z", "expireTime": "20280115080000",
        "deviceFingerprint": device, "testFlag": "0", "someNewField": 1
    })
}

fn license_of(v: &Value) -> format::License {
    format::parse(v["license"].as_str().unwrap().as_bytes())
        .unwrap()
        .license
}

#[test]
fn orders_issue_bound_licenses_and_resends_get_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let (c, v, raw) = h.call(order("inst-1", "ev-1", &dev.to_lowercase()));
        assert_eq!(c, "000000", "{name}: {v}");
        let p = format::parse(v["license"].as_str().unwrap().as_bytes()).unwrap();
        assert!(p.verify(&h.key.verifying_key()), "{name}");
        let lic = p.license;
        assert_eq!(lic.id, "kg-inst-1");
        assert_eq!(v["licenseId"], "kg-inst-1");
        assert_eq!(lic.product, "sku-pro");
        assert_eq!(lic.instance, "inst-1");
        assert_eq!(lic.devices, vec![dev.clone()]);
        assert_eq!(
            lic.not_before,
            parse_time("t", "2027-01-15T08:00:00Z").unwrap()
        );
        assert_eq!(lic.not_after, Some(lic.not_before + 365 * 86_400));
        assert_eq!(lic.issued_at, NOW);
        assert_eq!(
            (lic.grace_secs, lic.features.clone()),
            (3600, vec!["sso".into()])
        );
        assert_eq!(lic.meta["kg_event"], "ev-1");

        // A resend, even later, gets the same bytes; the field order in the body does not matter.
        let mut later = Harness {
            now: NOW + 500,
            ..h
        };
        let mut resend = order("inst-1", "ev-1", &dev);
        resend["testFlag"] = json!("0");
        let (_, _, raw2) = later.call(resend);
        assert_eq!(raw2, raw, "{name}");
        // A different request under the same eventId and fingerprint is refused.
        let mut changed = order("inst-1", "ev-1", &dev);
        changed["expireTime"] = json!("20290115080000");
        let (c, v, _) = later.call(changed);
        assert_eq!(c, "000002", "{name}: {v}");
        assert!(v["resultMsg"].as_str().unwrap().contains("ev-1"), "{v}");
        // The same eventId with another fingerprint is a new request (§2): the instance
        // is rebound to the corrected code; resends of both keep their answers.
        let (c, v, fixed) = later.call(order("inst-1", "ev-1", &code("WXYZ")));
        assert_eq!(c, "000000", "{name}: {v}");
        assert_eq!(license_of(&v).devices, vec![code("WXYZ")]);
        let row = later
            .db
            .run_blocking(|tx| tx.instance("inst-1"))
            .unwrap()
            .unwrap();
        assert_eq!(row.devices, vec![code("WXYZ")], "{name}");
        assert_eq!(later.call(order("inst-1", "ev-1", &code("WXYZ"))).2, fixed);
        assert_eq!(later.call(order("inst-1", "ev-1", &dev)).2, raw);
        // A new order for the instance replaces the license (same id, newer).
        let (c, v, _) = later.call(order("inst-1", "ev-2", &dev));
        assert_eq!(c, "000000");
        let l2 = license_of(&v);
        assert_eq!((l2.id.as_str(), l2.issued_at), ("kg-inst-1", NOW + 500));
        assert_eq!(
            later.db.run_blocking(|tx| tx.count_licenses()).unwrap(),
            3,
            "{name}"
        );
        // The async variant issues the same way.
        later.now += 1;
        let mut a = order("inst-2", "ev-3", &dev);
        a["activity"] = json!("getLicenseAsync");
        a.as_object_mut().unwrap().remove("expireTime");
        let (c, v, _) = later.call(a);
        assert_eq!(c, "000000", "{v}");
        assert_eq!(license_of(&v).not_after, None, "no expireTime: perpetual");
    }
}

/// §2.1: no instanceId; the first businessId becomes it; idempotent by orderId.
#[test]
fn purchases_without_instance_are_idempotent_by_order() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    let purchase = |order: &str, business: &str, device: &str| {
        json!({
            "activity": "getLicense", "customerId": "cust-1", "customerName": "n",
            "businessId": business, "orderId": order, "skuCode": "sku-1y",
            "timeStamp": "20261130093015123", "deviceFingerprint": device
        })
    };
    for (name, h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let (c, v, raw) = h.call(purchase("O-1", "B-1", &dev));
        assert_eq!(c, "000000", "{name}: {v}");
        assert_eq!(v["instanceId"], "B-1");
        let lic = license_of(&v);
        assert_eq!((lic.instance.as_str(), lic.not_before), ("B-1", NOW));
        assert_eq!(lic.meta["kg_order"], "O-1");
        let later = Harness {
            now: NOW + 3600,
            ..h
        };
        assert_eq!(later.call(purchase("O-1", "B-2", &dev)).2, raw, "{name}");
        // Signed on the database thread (no presigned text) the same.
        let (_, v, _) = later.call(purchase("O-2", "B-1", &dev));
        assert_eq!(
            v["instanceId"], "O-2",
            "{name}: a known businessId is not reused: {v}"
        );
        assert_eq!(license_of(&v).instance, "O-2");
        // Another customer under a known orderId is not this order.
        let mut other = purchase("O-1", "B-9", &dev);
        other["customerId"] = json!("cust-2");
        assert_eq!(later.call(other).0, "000002", "{name}");
        for missing in ["orderId", "businessId", "customerId"] {
            let mut p = purchase("O-3", "B-3", &dev);
            p.as_object_mut().unwrap().remove(missing);
            let (c, v, _) = later.call(p);
            assert_eq!(c, "000002", "{name}");
            assert!(v["resultMsg"].as_str().unwrap().contains(missing), "{v}");
        }
    }
}

/// The console's call history (issue 16): every call is in `events` with what it was
/// about and the code answered, in the request's own transaction; a resend counts as a
/// retry of the stored row; calls are found by instance, order and customer.
#[test]
fn every_call_is_in_the_history_with_its_result_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("HIST");
    for (name, mut h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let first = h.call(order("inst-1", "e1", &dev));
        assert_eq!(first.0, "000000", "{name}");
        h.now = NOW + 10;
        assert_eq!(h.call(order("inst-1", "e1", &dev)).2, first.2, "{name}");
        h.now = NOW + 20;
        assert_eq!(h.call(order("inst-1", "e1", &dev)).2, first.2, "{name}");
        h.now = NOW + 30;
        let freeze =
            json!({"activity": "updateInstanceStatus", "instanceId": "inst-1", "status": "FREEZE"});
        assert_eq!(h.call(freeze).0, "000000", "{name}");
        h.now = NOW + 40;
        let bad =
            json!({"activity": "updateInstanceStatus", "instanceId": "inst-1", "status": "MELT"});
        assert_eq!(h.call(bad).0, "000002", "{name}");
        let unknown = json!({"activity": "expireLicense", "instanceId": "inst-9"});
        assert_eq!(h.call(unknown).0, "000003", "{name}");
        let purchase = json!({
            "activity": "getLicense", "customerId": "cust-1", "customerName": "n",
            "businessId": "B-1", "orderId": "O-1", "skuCode": "sku-1y",
            "timeStamp": "20261130093015123", "deviceFingerprint": dev
        });
        assert_eq!(h.call(purchase).0, "000000", "{name}");
        let calls =
            |by: db::CallsBy<'static>| h.db.run_blocking(move |tx| tx.calls(by, 50)).unwrap();
        let inst = calls(db::CallsBy::Instance("inst-1"));
        let seen: Vec<_> = inst
            .iter()
            .map(|e| {
                (
                    e.activity.as_str(),
                    e.result_code.as_deref(),
                    e.retries,
                    e.last_at,
                    e.created_at - NOW,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("updateInstanceStatus", Some("000002"), 0, None, 40),
                ("updateInstanceStatus", Some("000000"), 0, None, 30),
                ("getLicense", Some("000000"), 2, Some(NOW + 20), 0),
            ],
            "{name}"
        );
        assert_eq!(inst[2].response, first.2, "{name}: the answer we gave");
        assert!(inst[1].event_id.starts_with("call:"), "{name}");
        assert_eq!(
            calls(db::CallsBy::Instance("inst-9"))[0]
                .result_code
                .as_deref(),
            Some("000003")
        );
        for by in [db::CallsBy::Order("O-1"), db::CallsBy::Customer("cust-1")] {
            let rows = calls(by);
            assert_eq!(rows.len(), 1, "{name} {by:?}");
            assert_eq!(
                (
                    rows[0].instance_id.as_deref(),
                    rows[0].order_id.as_deref(),
                    rows[0].customer_id.as_deref()
                ),
                (Some("B-1"), Some("O-1"), Some("cust-1")),
                "{name}"
            );
        }
        assert!(calls(db::CallsBy::Order("O-2")).is_empty());
        // The stored answer still replays (the key and digest untouched).
        assert_eq!(h.call(order("inst-1", "e1", &dev)).2, first.2, "{name}");
    }
}

/// `getLicenseAsync` with `license_upload` on: the license enters the upload outbox in
/// the same transaction; `getLicense` and the option off do not.
#[test]
fn async_licenses_enter_the_upload_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let mut a = order("inst-a", "ev-a", &dev);
        a["activity"] = json!("getLicenseAsync");
        h.call(a.clone());
        assert_eq!(
            h.db.run_blocking(|tx| tx.upload("ev-a")).unwrap(),
            None,
            "off by default"
        );
        let h = Harness { upload: true, ..h };
        let mut b = a.clone();
        b["eventId"] = json!("ev-b");
        let (c, v, _) = h.call(b);
        assert_eq!(c, "000000", "{name}: {v}");
        let up = h.db.run_blocking(|tx| tx.upload("ev-b")).unwrap().unwrap();
        assert_eq!(up.license, v["license"].as_str().unwrap());
        assert_eq!(
            (up.instance_id.as_str(), up.attempts, up.done_at),
            ("inst-a", 0, None)
        );
        h.call(order("inst-c", "ev-c", &dev));
        assert_eq!(
            h.db.run_blocking(|tx| tx.upload("ev-c")).unwrap(),
            None,
            "{name}"
        );
    }
}

#[test]
fn bad_requests_are_named_000002() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"instanceId": "i"}), "activity: required"),
            (json!({"activity": "launchRocket"}), "unknown activity"),
            (
                json!({"activity": "getLicense", "eventId": "e"}),
                "orderId: required",
            ),
            (
                {
                    let mut o = order("i", "e", "nope");
                    o["deviceFingerprint"] = json!("nope");
                    o
                },
                "deviceFingerprint",
            ),
            (
                {
                    let mut o = order("i", "e", &dev);
                    o.as_object_mut().unwrap().remove("deviceFingerprint");
                    o
                },
                "deviceFingerprint: required",
            ),
            (
                {
                    let mut o = order("i", "e", &dev);
                    o["effectiveTime"] = json!("yesterday");
                    o
                },
                "effectiveTime",
            ),
            (
                {
                    let mut o = order("i", "e", &dev);
                    o["expireTime"] = json!("20200101000000");
                    o
                },
                "not_after",
            ),
            (
                {
                    let mut o = order("i", "e", &dev);
                    o["instanceId"] = json!("x".repeat(65));
                    o
                },
                "instanceId: longer than 64",
            ),
            (
                {
                    let mut o = order("i", "e", &dev);
                    o["eventId"] = json!(5);
                    o
                },
                "eventId: must be a string",
            ),
            (
                json!({"activity": "updateInstanceStatus", "instanceId": "i", "status": "PAUSE"}),
                "neither FREEZE nor UNFREEZE",
            ),
        ];
        for (body, want) in cases {
            let (c, v, _) = h.call(body.clone());
            assert_eq!(c, "000002", "{name}: {body} → {v}");
            let msg = v["resultMsg"].as_str().unwrap();
            assert!(msg.contains(want), "{name}: {body}: {msg:?} lacks {want:?}");
        }
        for raw in [&b"not json"[..], b"[1]", b""] {
            let v: Value = serde_json::from_str(&h.raw(raw).unwrap()).unwrap();
            assert_eq!(v["resultCode"], "000002", "{v}");
        }
        // Nothing was stored by the refusals.
        assert_eq!(h.db.run_blocking(|tx| tx.count_licenses()).unwrap(), 0);
        assert_eq!(h.db.run_blocking(|tx| tx.event("e")).unwrap(), None);
    }
}

#[test]
fn renewal_extends_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, mut h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let refresh = |exp: &str| json!({"activity": "refreshLicense", "instanceId": "inst-1", "expireTime": exp, "orderId": "o2"});
        let (c, _, _) = h.call(refresh("20290115080000"));
        assert_eq!(c, "000003", "{name}: unknown instance");
        let (_, v, _) = h.call(order("inst-1", "ev-1", &dev));
        let first = license_of(&v);
        h.now += 100;
        let (c, v, raw) = h.call(refresh("20290115080000"));
        assert_eq!(c, "000000", "{v}");
        let l = license_of(&v);
        assert_eq!(l.id, first.id);
        assert_eq!(l.not_before, first.not_before);
        assert_eq!(
            l.not_after,
            Some(parse_time("t", "20290115080000").unwrap())
        );
        assert_eq!(l.issued_at, NOW + 100);
        assert_eq!(l.devices, first.devices);
        assert_eq!(l.meta["kg_renewal"], "o2");
        // Sent again: the same license, not a new one.
        h.now += 100;
        let (_, _, raw2) = h.call(refresh("20290115080000"));
        assert_eq!(raw2, raw, "{name}");
        assert_eq!(h.db.run_blocking(|tx| tx.count_licenses()).unwrap(), 2);
        // The download serves the renewed license.
        let cur =
            h.db.run_blocking(|tx| tx.instance_by_license("kg-inst-1"))
                .unwrap()
                .unwrap();
        assert_eq!(cur.license, v["license"].as_str().unwrap());
        // An expiry before the start is refused.
        let (c, v, _) = h.call(refresh("20200101000000"));
        assert_eq!(c, "000002", "{v}");
        // With an eventId: remembered like an order.
        let mut r = refresh("20300115080000");
        r["eventId"] = json!("ev-r");
        let (c, _, raw3) = h.call(r.clone());
        assert_eq!(c, "000000");
        h.now += 100;
        assert_eq!(h.call(r).2, raw3);
        let mut other = refresh("20310115080000");
        other["eventId"] = json!("ev-r");
        assert_eq!(h.call(other).0, "000002");
    }
}

fn status(instance: &str, s: &str) -> Value {
    json!({"activity": "updateInstanceStatus", "instanceId": instance, "status": s, "testFlag": "1"})
}

#[test]
fn without_status_tokens_freeze_and_release_fail_000005_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, h) in Harness::all(dir.path(), Arc::new(NotConfigured)) {
        h.call(order("inst-1", "ev-1", &dev));
        for body in [
            status("inst-1", "FREEZE"),
            json!({"activity": "releaseLicense", "instanceId": "inst-1"}),
            json!({"activity": "updateLicenseCodeStatus", "license": "PL1", "status": "FREEZE"}),
        ] {
            let (c, v, _) = h.call(body.clone());
            assert_eq!(c, "000005", "{name}: {body} → {v}");
            assert_eq!(v["resultMsg"], NOT_CONFIGURED);
        }
        let row =
            h.db.run_blocking(|tx| tx.instance("inst-1"))
                .unwrap()
                .unwrap();
        assert!(
            !row.frozen && row.status == db::InstanceStatus::Active && row.seq == 0,
            "{name}"
        );
        assert_eq!(
            h.db.run_blocking(|tx| tx.latest_token("kg-inst-1"))
                .unwrap(),
            None
        );
        assert_eq!(h.db.run_blocking(|tx| tx.code("PL1")).unwrap(), None);
        // Expiry needs no token.
        let (c, _, _) = h.call(json!({"activity": "expireLicense", "instanceId": "inst-1"}));
        assert_eq!(c, "000000");
    }
}

#[test]
fn freeze_unfreeze_release_issue_tokens_with_increasing_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let dev = code("ABCD");
    for (name, mut h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        assert_eq!(h.call(status("nope", "FREEZE")).0, "000003", "{name}");
        h.call(order("inst-1", "ev-1", &dev));
        let latest = |h: &Harness| {
            h.db.run_blocking(|tx| tx.latest_token("kg-inst-1"))
                .unwrap()
                .map(|t| t.token)
        };
        assert_eq!(h.call(status("inst-1", "UNFREEZE")).0, "000000");
        assert_eq!(latest(&h), None, "{name}: not frozen: nothing to lift");
        h.now += 1;
        assert_eq!(h.call(status("inst-1", "FREEZE")).0, "000000");
        let t1 = format!("test-token kg-inst-1 freeze #1 [{dev:?}] @{}", NOW + 1);
        assert_eq!(latest(&h), Some(t1.clone()));
        // Retried by the marketplace: no second token.
        assert_eq!(h.call(status("inst-1", "FREEZE")).0, "000000");
        assert_eq!(latest(&h), Some(t1));
        h.now += 1;
        assert_eq!(h.call(status("inst-1", "UNFREEZE")).0, "000000");
        assert!(latest(&h).unwrap().contains("unfreeze #2"), "{name}");
        // A renewal keeps the sequence and the freeze state.
        h.call(status("inst-1", "FREEZE"));
        h.call(json!({"activity": "refreshLicense", "instanceId": "inst-1", "expireTime": "20300101000000"}));
        let row =
            h.db.run_blocking(|tx| tx.instance("inst-1"))
                .unwrap()
                .unwrap();
        assert!(row.frozen && row.seq == 3, "{name}: {row:?}");
        let rel = json!({"activity": "releaseLicense", "instanceId": "inst-1"});
        assert_eq!(h.call(rel.clone()).0, "000000");
        assert!(latest(&h).unwrap().contains("release #4"));
        assert_eq!(h.call(rel).0, "000000", "release is idempotent");
        assert!(latest(&h).unwrap().contains("release #4"));
        // Released: no freeze, renewal or new order.
        assert_eq!(h.call(status("inst-1", "UNFREEZE")).0, "000002");
        assert_eq!(
            h.call(json!({"activity": "refreshLicense", "instanceId": "inst-1", "expireTime": "20310101000000"})).0,
            "000002"
        );
        assert_eq!(h.call(order("inst-1", "ev-9", &dev)).0, "000002");
        // Expire on an unknown instance is 000003, on a known one idempotent.
        assert_eq!(
            h.call(json!({"activity": "expireLicense", "instanceId": "zz"}))
                .0,
            "000003"
        );
    }
}

#[test]
fn authorization_code_callbacks() {
    let dir = tempfile::tempdir().unwrap();
    for (name, mut h) in Harness::all(dir.path(), Arc::new(TestTokens)) {
        let st = |s: &str| json!({"activity": "updateLicenseCodeStatus", "license": "PL-1", "status": s});
        assert_eq!(h.call(st("FREEZE")).0, "000000", "{name}");
        assert_eq!(h.call(st("FREEZE")).0, "000000");
        h.now += 1;
        assert_eq!(h.call(st("UNFREEZE")).0, "000000");
        let t =
            h.db.run_blocking(|tx| tx.latest_token("PL-1"))
                .unwrap()
                .unwrap();
        assert_eq!((t.seq, t.action.as_str()), (2, "unfreeze"));
        let refresh = |exp: &str, scene: &str| {
            json!({"activity": "refreshLicenseCode", "expireTime": exp, "license": "PL-1",
                   "orderId": "o", "orderLineId": "ol", "scene": scene, "testFlag": "1"})
        };
        assert_eq!(h.call(refresh("20230523201932", "RENEWAL")).0, "000000");
        let c = h.db.run_blocking(|tx| tx.code("PL-1")).unwrap().unwrap();
        assert_eq!(
            c.expire_at,
            Some(parse_time("t", "20230523201932").unwrap())
        );
        assert!(h.call(refresh("2023-05-23", "RENEWAL")).1["resultMsg"]
            .as_str()
            .unwrap()
            .contains("yyyyMMddHHmmss"));
        assert_eq!(h.call(refresh("20230523201932", "LATER")).0, "000002");
        let rel = json!({"activity": "releaseLicenseCode", "license": "PL-1", "orderId": "o", "orderLineId": "l"});
        assert_eq!(h.call(rel.clone()).0, "000000");
        assert_eq!(h.call(rel).0, "000000");
        let t =
            h.db.run_blocking(|tx| tx.latest_token("PL-1"))
                .unwrap()
                .unwrap();
        assert_eq!((t.seq, t.action.as_str()), (3, "release"));
        assert_eq!(h.call(st("FREEZE")).0, "000002", "released");
        assert_eq!(h.call(refresh("20240523201932", "RENEWAL")).0, "000002");
    }
}

#[test]
fn times_and_ids() {
    let t = 1_698_395_415; // 2023-10-27T08:30:15Z
    for s in [
        "2023-10-27 08:30:15 z",
        "2023-10-27 08:30:15Z",
        "2023-10-27T08:30:15Z",
        "2023-10-27 08:30:15",
        "2023-10-27 08:30:15 UTC",
        "2023-10-27 08:30:15 GMT",
        "2023-10-27 08:30:15 +00:00",
        "2023-10-27T08:30:15+00:00",
        "20231027083015",
        "20231027083015123",
        "1698395415000",
    ] {
        assert_eq!(parse_time("t", s), Ok(t), "{s}");
    }
    for s in [
        "2023-10-27",
        "2023-13-27 08:30:15 z",
        "x",
        "2023-10-27_08:30:15",
        "é023-10-27 08:30:15",
        "2023-10-27 08:30:15 +08:00",
        "2023-10-27 08:30:15 CST",
        "2023-10-27 08:30:15 utc+1",
    ] {
        assert!(parse_time("effectiveTime", s)
            .unwrap_err()
            .contains("effectiveTime"));
    }
    assert_eq!(license_id_for("RA2-4LVS"), "kg-RA2-4LVS");
    let odd = license_id_for("a b/c");
    assert!(odd.starts_with("kg-") && odd.len() == 35, "{odd}");
    assert_eq!(odd, license_id_for("a b/c"));
}

#[test]
fn answers_are_well_formed() {
    let a = activities::answer(
        activities::ResultCode::Success,
        &"é".repeat(300),
        &[("license", json!("kl1.\"x"))],
    );
    let v: Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["resultMsg"].as_str().unwrap().chars().count(), 255);
    assert_eq!(v["license"], "kl1.\"x");
    assert!(a.starts_with("{\"resultCode\":\"000000\",\"resultMsg\":"));
}

#[test]
fn config_is_checked_naming_the_key() {
    let base = |extra: &str| {
        format!(
            "[seller_server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n\
             signing_key_file = \"/s\"\ninterconnection_key_file = \"/i\"\nstate_dir = \"/tmp/x\"\n{extra}"
        )
    };
    let prod = "[[seller_server.products]]\npath = \"/kg/a\"\nproduct = \"sku-a\"\n";
    let parse = |t: &str| -> Result<(), String> {
        let f: super::SellerFile = toml::from_str(t).map_err(|e| e.to_string())?;
        f.seller_server.validate().map_err(|e| e.to_string())
    };
    parse(&base(prod)).unwrap();
    let cases = [
        (base(""), "seller_server.products"),
        (
            base(prod).replace("127.0.0.1:0", "nowhere"),
            "seller_server.listen",
        ),
        (
            base(prod).replace("key_file = \"/k\"\n", ""),
            "seller_server.key_file",
        ),
        (
            base(prod).replace("/tmp/x", "rel"),
            "seller_server.state_dir",
        ),
        (format!("{}{prod}", base(prod)), "is configured twice"),
        (base(&prod.replace("/kg/a", "/v1/x")), "reserved"),
        (base(&prod.replace("sku-a", "sku a")), "products[0].product"),
        (
            base(&format!("{prod}features = [\"bad feature\"]\n")),
            "products[0].product",
        ),
        (
            base(&format!("timestamp_window_secs = 0\n{prod}")),
            "timestamp_window_secs",
        ),
        (
            base(&format!("database_schema = \"X\"\n{prod}")),
            "database_schema",
        ),
        (
            base(&format!("database_connections = 0\n{prod}")),
            "seller_server.database_connections",
        ),
        (base(&format!("colour = 1\n{prod}")), "colour"),
        (
            base(&format!("marketplace_bases = []\n{prod}")),
            "seller_server.marketplace_bases",
        ),
        (
            base(&format!(
                "marketplace_bases = [\"https://a\", \"http://b\"]\n{prod}"
            )),
            "seller_server.marketplace_bases[1]",
        ),
    ];
    for (text, want) in cases {
        let e = parse(&text).unwrap_err();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
}

#[test]
fn the_documented_configuration_is_valid() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/seller-server.md"
    ))
    .unwrap();
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let f: super::SellerFile = toml::from_str(block).unwrap();
    f.seller_server.validate().unwrap();
    assert_eq!(f.seller_server.products[0].limits["cores"], 8);
    // The relay's hosts default to the documented marketplace hosts.
    assert_eq!(
        f.seller_server.marketplace_bases,
        kooagent_edge::marketplace::DEFAULT_BASES
    );
}

/// Two servers (replicas) on one database get the same order at the same time: one
/// license, and both answer the same bytes.
#[test]
fn replicas_sharing_a_database_answer_one_license_per_event() {
    let dir = tempfile::tempdir().unwrap();
    type Pair = (&'static str, Box<dyn db::Backend>, Box<dyn db::Backend>);
    let mut pairs: Vec<Pair> = vec![(
        "sqlite",
        Box::new(db::sqlite::Sqlite::open(&dir.path().join("s.db")).unwrap()),
        Box::new(db::sqlite::Sqlite::open(&dir.path().join("s.db")).unwrap()),
    )];
    if let Some(url) = db::tests::pg_url() {
        let schema = db::postgres::tests::fresh_schema(&url);
        pairs.push((
            "postgres",
            Box::new(db::postgres::Postgres::connect(&url, &schema).unwrap()),
            Box::new(db::postgres::Postgres::connect(&url, &schema).unwrap()),
        ));
    }
    let dev = code("ABCD");
    for (name, a, b) in pairs {
        let mk = |backend| Harness {
            upload: false,
            db: Db::start(backend),
            key: SigningKey::from_bytes(&[7; 32]),
            tokens: Arc::new(TestTokens),
            product: product(),
            now: NOW,
        };
        let (ha, hb) = (Arc::new(mk(a)), Arc::new(mk(b)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = if t % 2 == 0 { ha.clone() } else { hb.clone() };
                let dev = dev.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|i| h.call(order(&format!("i{i}"), &format!("e{i}"), &dev)).2)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let answers: Vec<Vec<String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for i in 0..10 {
            for a in &answers {
                assert_eq!(a[i], answers[0][i], "{name}: order {i}");
                assert!(a[i].contains("000000"), "{name}: {}", a[i]);
            }
        }
        assert_eq!(
            ha.db.run_blocking(|tx| tx.count_licenses()).unwrap(),
            10,
            "{name}"
        );
        // Freeze from both replicas at once: one token, sequence 1.
        let t: Vec<_> = [ha.clone(), hb.clone()]
            .into_iter()
            .map(|h| std::thread::spawn(move || h.call(status("i0", "FREEZE")).1))
            .collect();
        for t in t {
            let v = t.join().unwrap();
            assert_eq!(v["resultCode"], "000000", "{name}: {v}");
        }
        let tok = hb
            .db
            .run_blocking(|tx| tx.latest_token("kg-i0"))
            .unwrap()
            .unwrap();
        assert_eq!(tok.seq, 1, "{name}");
    }
}

#[test]
fn a_license_signed_before_the_transaction_is_the_one_signed_inside() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_, pre) = Harness::all(d1.path(), Arc::new(TestTokens)).remove(0);
    let (_, inline) = Harness::all(d2.path(), Arc::new(TestTokens)).remove(0);
    let order = json!({"activity": "getLicense", "instanceId": "i-pre", "eventId": "e-pre",
        "effectiveTime": "2027-01-01 00:00:00 z", "expireTime": "20280101000000",
        "deviceFingerprint": code("ABCD"), "testFlag": "0"})
    .to_string();
    let a = pre.raw_with(order.as_bytes(), true).unwrap();
    let b = inline.raw_with(order.as_bytes(), false).unwrap();
    assert_eq!(a, b);
    assert!(a.contains("\"resultCode\":\"000000\""), "{a}");
    // Other activities and refusals have nothing to sign ahead.
    let ctx = Ctx {
        now: NOW,
        product: &pre.product,
        key: &pre.key,
        tokens: pre.tokens.as_ref(),
        presigned: None,
        upload: false,
    };
    assert!(activities::presign(&ctx, order.as_bytes()).is_some());
    for body in [
        json!({"activity": "expireLicense", "instanceId": "i-pre"}).to_string(),
        json!({"activity": "getLicense", "instanceId": "i-pre"}).to_string(),
        "not json".to_string(),
    ] {
        assert!(
            activities::presign(&ctx, body.as_bytes()).is_none(),
            "{body}"
        );
    }
}

#[test]
fn a_reload_names_the_keys_that_need_a_restart_and_applies_the_rest() {
    use super::http::{restart_keys, Live};
    use super::SellerServerConfig;
    let a = SellerServerConfig::default();
    let mut b = a.clone();
    b.body_timeout_secs = 30;
    b.timestamp_window_secs = 120;
    b.limits.miss_per_key = super::limits::Rate::new(1, 1);
    b.max_connections = 10;
    b.max_connections_per_address = 0;
    b.cert_file = "/new/tls.crt".into();
    assert!(restart_keys(&a, &b).is_empty());
    let live = Live::from(&b);
    assert_eq!(live.body_timeout, std::time::Duration::from_secs(30));
    assert_eq!(live.window_secs, 120);
    assert_eq!(live.limits.miss_per_key, super::limits::Rate::new(1, 1));
    b.listen = "127.0.0.1:1".into();
    b.relay_queue = 3;
    b.usage.batch_size = 5;
    b.license_upload_retry_secs = 7;
    assert_eq!(
        restart_keys(&a, &b),
        [
            "listen",
            "usage",
            "license_upload",
            "relay_workers/relay_queue/relay_queue_wait_secs"
        ]
    );
}
