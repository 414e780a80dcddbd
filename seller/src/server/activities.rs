//! The marketplace's activities (koogallery.md §2, §3.3, Part B §B3): from a request body
//! and the stored state to an answer, inside one database transaction. No I/O here but
//! through [`Tx`], so every rule is tested on both backends without a server.
//!
//! Idempotency (the marketplace resends after timeouts, and retries failed calls 60
//! times every 2 minutes):
//! - license requests are remembered with a digest of their content and the exact
//!   response body, under their key: `eventId` together with the (canonical)
//!   `deviceFingerprint` (§2), or for the synchronous new purchase without `instanceId`
//!   (§2.1) the `orderId`. A resend gets the same bytes (so the same license and the same
//!   `Body-Sign`); the same key with another fingerprint is a new request (a buyer
//!   correcting a mistyped code): a new license bound to the new code, for the same
//!   instance; the same key and fingerprint with other content is refused `000002`;
//! - `refreshLicense` with an `eventId` is remembered the same way;
//! - the others are idempotent by state: expiring an expired instance, freezing a frozen
//!   one, renewing to the expiry already in force... succeed without a new license or token.
//!
//! [UNCONFIRMED] response fields: the pages do not show what `getLicense` returns besides
//! `resultCode`/`resultMsg`. We answer the license text in `license` (and `licenseId`,
//! `instanceId`); renaming the field is a change to [`license_answer`] only.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::db::{CodeRow, DbError, EventRow, InstanceRow, InstanceStatus, TokenRow, Tx, UploadRow};
use super::tokens::{StatusTokens, TokenAction};
use super::ProductConfig;
use crate::issue as seller;
use kooagent_core::license::format;

/// `resultCode` values (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultCode {
    Success,
    AuthFailed,
    BadParams,
    NotFound,
    Internal,
}

impl ResultCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultCode::Success => "000000",
            ResultCode::AuthFailed => "000001",
            ResultCode::BadParams => "000002",
            ResultCode::NotFound => "000003",
            ResultCode::Internal => "000005",
        }
    }
}

/// A response body: `resultCode`, `resultMsg`, then `extra` in order.
pub fn answer(code: ResultCode, msg: &str, extra: &[(&str, Value)]) -> String {
    // resultMsg is at most 255 characters.
    let msg = msg.char_indices().nth(255).map_or(msg, |(i, _)| &msg[..i]);
    // Written straight into one buffer sized for the license it usually carries: going
    // through `Value`'s Display (a formatter per value) cost a license answer about 10 µs.
    let room: usize = extra
        .iter()
        .map(|(k, v)| k.len() + v.as_str().map_or(16, str::len) + 8)
        .sum();
    let mut out = Vec::with_capacity(48 + msg.len() + room);
    out.extend_from_slice(b"{\"resultCode\":");
    write_json(&mut out, code.as_str());
    out.extend_from_slice(b",\"resultMsg\":");
    write_json(&mut out, msg);
    for (k, v) in extra {
        out.push(b',');
        write_json(&mut out, k);
        out.push(b':');
        write_json(&mut out, v);
    }
    out.push(b'}');
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Compact JSON, as `Value`'s Display writes it.
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("strings and JSON values serialise");
}

fn refuse(code: ResultCode, msg: impl AsRef<str>) -> String {
    answer(code, msg.as_ref(), &[])
}

fn success() -> String {
    answer(ResultCode::Success, "success", &[])
}

/// The answer for a request whose work was rolled back.
pub fn failure_answer(e: &DbError) -> String {
    match e {
        DbError::Abort(msg) => answer(ResultCode::Internal, msg, &[]),
        e => {
            log::error!("marketplace request failed: {e}");
            answer(ResultCode::Internal, "internal error; please retry", &[])
        }
    }
}

/// What one request may use besides the database.
pub struct Ctx<'a> {
    /// Unix seconds.
    pub now: i64,
    pub product: &'a ProductConfig,
    pub key: &'a SigningKey,
    pub tokens: &'a dyn StatusTokens,
    /// What [`presign`] made of this very request, if anything: `getLicense` then
    /// neither parses, checks nor signs on the database thread.
    pub presigned: Option<&'a Presigned>,
    /// `license_upload` is on: a `getLicenseAsync` license also goes into the upload
    /// outbox, in the same transaction (see `super::upload`).
    pub upload: bool,
}

/// Signs, off the database thread, the license a `getLicense` body would issue: its
/// content depends on the request, the product and the time only, never on stored state
/// (the checks that do, replay and released instance, stay in the transaction, which
/// discards this text when they decide otherwise). Ed25519 is deterministic, so the
/// text is the one [`handle`] would sign itself. None: not a well-formed `getLicense`
/// (then [`handle`] answers it as usual).
pub fn presign(ctx: &Ctx<'_>, body: &[u8]) -> Option<Presigned> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let f = Fields(&obj);
    let activity = f.req("activity", 32).ok()?;
    if !matches!(activity, "getLicense" | "getLicenseAsync") {
        return None;
    }
    let order = license_order(ctx, activity, &f).ok()?;
    let text = seller::issue(&order.request, ctx.key).ok()?;
    let answer = answer_for(
        &order.instance_id,
        &license_id_for(&order.instance_id),
        &text,
    );
    Some(Presigned {
        obj,
        order,
        text,
        answer,
    })
}

/// A `getLicense` body parsed, checked and signed on the workers, in parallel: the
/// database thread, which runs a batch's requests one after the other, then only decides
/// and stores.
pub struct Presigned {
    obj: Map<String, Value>,
    order: LicenseOrder,
    /// The license for `order.instance_id`.
    text: String,
    /// The answer when the order gets that instance (the usual case).
    answer: String,
}

impl Presigned {
    /// The request's activity, as [`super::metrics::activity_of`] names it (without
    /// parsing the body a second time).
    pub fn activity(&self) -> &'static str {
        super::metrics::activity_label(self.obj.get("activity").and_then(Value::as_str))
    }
}

/// Handles one authenticated request body; `Ok` is the response body (refusals
/// included), `Err` rolls this request back (`Abort`: its message is answered with
/// `000005`).
pub fn handle(tx: &mut dyn Tx, ctx: &Ctx<'_>, body: &[u8]) -> Result<String, DbError> {
    handle_from(tx, ctx, body, "")
}

/// [`handle`] for an action the seller took in the console, run through the marketplace
/// callback's own activity: the call history marks it `(console)`.
pub fn handle_for_console(tx: &mut dyn Tx, ctx: &Ctx<'_>, body: &[u8]) -> Result<String, DbError> {
    handle_from(tx, ctx, body, " (console)")
}

fn handle_from(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    body: &[u8],
    origin: &str,
) -> Result<String, DbError> {
    // Presigned: parsed on the workers already.
    let parsed;
    let obj = match ctx.presigned {
        Some(p) => &p.obj,
        None => {
            parsed = match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(o)) => o,
                Ok(_) => {
                    return Ok(refuse(
                        ResultCode::BadParams,
                        "the body must be a JSON object",
                    ))
                }
                Err(e) => {
                    return Ok(refuse(
                        ResultCode::BadParams,
                        format!("the body is not JSON: {e}"),
                    ))
                }
            };
            &parsed
        }
    };
    let f = Fields(obj);
    let activity = match f.req("activity", 32) {
        Ok(a) => a,
        Err(m) => return Ok(refuse(ResultCode::BadParams, m)),
    };
    let mut journal = Journal::default();
    let r = match activity {
        "getLicense" | "getLicenseAsync" => get_license(tx, ctx, activity, &f, &mut journal),
        "refreshLicense" => refresh_license(tx, ctx, &f, &mut journal),
        "expireLicense" => expire_license(tx, ctx, &f),
        "releaseLicense" => release_license(tx, ctx, &f),
        "updateInstanceStatus" => update_instance_status(tx, ctx, &f),
        "updateLicenseCodeStatus" => update_code_status(tx, ctx, &f),
        "releaseLicenseCode" => release_code(tx, ctx, &f),
        "refreshLicenseCode" => refresh_code(tx, ctx, &f),
        other => Err(Refusal::params(format!("unknown activity {other:?}"))),
    };
    let body = match r {
        Ok(body) => body,
        Err(Refusal::Answer(code, msg)) => refuse(code, msg),
        Err(Refusal::Db(e)) => return Err(e),
    };
    if !journal.stored {
        let label = format!("{activity}{origin}");
        note_call(tx, ctx, &label, obj, journal.instance, &body)?;
    }
    Ok(body)
}

/// What a request's own path already wrote into the call history.
#[derive(Default)]
struct Journal {
    /// Its `events` row is written (a remembered answer) or updated (a resend).
    stored: bool,
    /// The instance it turned out to be about, when not the one its fields name (a
    /// §2.1 order's, a rebind's).
    instance: Option<String>,
}

/// A string field as sent, for the history only (cut to `max` characters; the
/// activity's own checks refuse an over-long one).
fn raw_field(obj: &Map<String, Value>, name: &str, max: usize) -> Option<String> {
    obj.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| s.chars().take(max).collect())
}

/// The instance a call is about, as the call names it: `instanceId`, a §2.1 order's
/// `businessId`, or for the authorization-code activities the code (`license`).
fn subject(obj: &Map<String, Value>, journal_instance: Option<String>) -> Option<String> {
    journal_instance
        .or_else(|| raw_field(obj, "instanceId", 64))
        .or_else(|| raw_field(obj, "businessId", 64))
        .or_else(|| raw_field(obj, "license", 64))
}

/// Writes a call that is not remembered for idempotency (a refusal, a freeze, an
/// expiry…) into the call history, in the request's transaction, under a key of its own
/// (`call:` and 128 random bits) that no `eventId` lookup ever reads.
fn note_call(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    activity: &str,
    obj: &Map<String, Value>,
    instance: Option<String>,
    body: &str,
) -> Result<(), DbError> {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| DbError::Backend(format!("random: {e}")))?;
    tx.put_event(&EventRow {
        event_id: format!("call:{}", format::hex(&id)),
        activity: activity.chars().take(48).collect(),
        digest: String::new(),
        response: body.into(),
        created_at: ctx.now,
        instance_id: subject(obj, instance),
        order_id: raw_field(obj, "orderId", 64),
        customer_id: raw_field(obj, "customerId", 100),
        result_code: Some(super::metrics::result_code_of(body).into()),
        retries: 0,
        last_at: None,
        license_sha256: None,
    })
}

enum Refusal {
    Answer(ResultCode, String),
    Db(DbError),
}

impl Refusal {
    fn params(m: impl Into<String>) -> Refusal {
        Refusal::Answer(ResultCode::BadParams, m.into())
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Self {
        Refusal::Db(e)
    }
}

impl From<String> for Refusal {
    fn from(m: String) -> Self {
        Refusal::params(m)
    }
}

/// Typed access to the request's fields. Fields we do not use are ignored: the
/// marketplace may add some, and refusing them would fail every order.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt(&self, name: &str, max: usize) -> Result<Option<&str>, String> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.chars().count() > max => {
                Err(format!("{name}: longer than {max} characters"))
            }
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("{name}: must be a string")),
        }
    }

    fn req(&self, name: &str, max: usize) -> Result<&str, String> {
        self.opt(name, max)?
            .ok_or_else(|| format!("{name}: required"))
    }
}

/// Marketplace times: `2023-10-27 10:30:15 z` (the getLicense example) with the zone
/// written `z`, `Z`, `UTC`, `GMT` or `+00:00` (or left out: the marketplace's times are
/// UTC), a `T` instead of the space, `yyyyMMddHHmmss` (the SaaS and authorization-code
/// APIs), `yyyyMMddHHmmssSSS` (the §2.1 `timeStamp`) or Unix milliseconds. Any other zone
/// is refused naming the field: guessing would shift a license's term.
pub fn parse_time(name: &str, s: &str) -> Result<i64, String> {
    let t = s.trim();
    let bad = || {
        format!(
            "{name}: {s:?} is not a UTC time (yyyy-MM-dd HH:mm:ss with z, Z, UTC, GMT or +00:00; \
             yyyyMMddHHmmss; or Unix milliseconds)"
        )
    };
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return match t.len() {
            14 => kooagent_core::clock::parse_digits14(t).ok_or_else(bad),
            17 => kooagent_core::clock::parse_digits14(&t[..14]).ok_or_else(bad),
            13 => t.parse::<i64>().map(|ms| ms / 1000).map_err(|_| bad()),
            _ => Err(bad()),
        };
    }
    let core = ["UTC", "GMT", "+00:00", "z", "Z"]
        .iter()
        .find_map(|zone| t.strip_suffix(zone))
        .map(str::trim_end)
        .unwrap_or(t);
    if core.len() != 19 || !core.is_char_boundary(10) || !core.is_char_boundary(11) {
        return Err(bad());
    }
    let (date, time) = (&core[..10], &core[11..]);
    if !matches!(core.as_bytes()[10], b' ' | b'T') {
        return Err(bad());
    }
    kooagent_core::clock::parse_rfc3339(&format!("{date}T{time}Z")).ok_or_else(bad)
}

/// The license id for a marketplace instance: stable, so a renewal replaces the license
/// on the device. The instance id itself when it fits the license id alphabet.
pub fn license_id_for(instance: &str) -> String {
    let ok = instance.len() <= 100
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:@+=".contains(&b));
    if ok {
        format!("kg-{instance}")
    } else {
        format!(
            "kg-{}",
            &format::hex(&Sha256::digest(instance.as_bytes()))[..32]
        )
    }
}

fn digest(parts: &[Option<&str>]) -> String {
    format::hex(&Sha256::digest(
        serde_json::to_string(parts).expect("strings serialise"),
    ))
}

/// A remembered answer for `event_id` (counted as a resend), or a refusal if the request
/// differs.
fn replay(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    event_id: &str,
    digest: &str,
) -> Result<Option<String>, Refusal> {
    match tx.event(event_id)? {
        Some(e) if e.digest == digest => {
            tx.event_resent(event_id, ctx.now)?;
            Ok(Some(e.response))
        }
        Some(e) => Err(Refusal::params(format!(
            "eventId {event_id:?} was already used for a different {} request",
            e.activity
        ))),
        None => Ok(None),
    }
}

/// Stores a license answer under its idempotency key, with what the call history shows.
struct Remember<'a> {
    event_id: &'a str,
    activity: &'a str,
    digest: String,
    response: &'a str,
    instance_id: &'a str,
    order_id: Option<&'a str>,
    customer_id: Option<&'a str>,
    /// `response` is the license answer for the license stored under this key in
    /// `licenses`: the row references it instead of holding a second copy.
    license_sha256: Option<String>,
}

fn remember(tx: &mut dyn Tx, ctx: &Ctx<'_>, r: Remember<'_>) -> Result<(), DbError> {
    tx.put_event(&EventRow {
        event_id: r.event_id.into(),
        activity: r.activity.into(),
        digest: r.digest,
        // By reference, the answer is not stored: no copy of it to make.
        response: match r.license_sha256 {
            Some(_) => String::new(),
            None => r.response.into(),
        },
        created_at: ctx.now,
        instance_id: Some(r.instance_id.into()),
        order_id: r.order_id.map(Into::into),
        customer_id: r.customer_id.map(Into::into),
        result_code: Some(super::metrics::result_code_of(r.response).into()),
        retries: 0,
        last_at: None,
        license_sha256: r.license_sha256,
    })
}

fn license_answer(row: &InstanceRow) -> String {
    answer_for(&row.instance_id, &row.license_id, &row.license)
}

/// The answer that carries a license: also what an `events` row stored by reference
/// is rebuilt with (`super::db::stored_response`), so its bytes must not depend on
/// anything else.
pub(super) fn answer_for(instance_id: &str, license_id: &str, license: &str) -> String {
    answer(
        ResultCode::Success,
        "success",
        &[
            ("instanceId", Value::from(instance_id)),
            ("licenseId", Value::from(license_id)),
            ("license", Value::from(license)),
        ],
    )
}

/// What identifies a license request (its idempotency key, see the module comment).
#[derive(Debug, Clone, PartialEq, Eq)]
enum RequestKey {
    /// `eventId` (§2: `getLicense` with `instanceId`, `getLicenseAsync`).
    Event(String),
    /// `orderId` of a synchronous new purchase without `instanceId` (§2.1).
    Order(String),
}

impl RequestKey {
    /// The events-table key of the first request under this key.
    fn base(&self) -> String {
        match self {
            RequestKey::Event(e) => e.clone(),
            RequestKey::Order(o) => format!("order:{o}"),
        }
    }

    /// The events-table key of a later request with another fingerprint.
    fn with_device(&self, device: Option<&str>) -> String {
        format!("{}|{}", self.base(), device.unwrap_or(""))
    }

    fn describe(&self) -> String {
        match self {
            RequestKey::Event(e) => format!("eventId {e:?}"),
            RequestKey::Order(o) => format!("orderId {o:?}"),
        }
    }
}

/// A `getLicense` request, checked, and the license it asks for.
struct LicenseOrder {
    /// The instance a new order gets (for `orderId` orders: the first `businessId`).
    instance_id: String,
    key: RequestKey,
    /// `v2:<sha256 of the content but the fingerprint>:<canonical fingerprint>`.
    digest: String,
    /// The digest this request had before the fingerprint was split out (rows stored
    /// by earlier versions).
    legacy_digest: String,
    request: seller::IssueRequest,
}

impl LicenseOrder {
    fn device(&self) -> Option<&str> {
        self.request.devices.first().map(String::as_str)
    }

    /// The digest without its fingerprint part.
    fn content(digest: &str) -> Option<&str> {
        let rest = digest.strip_prefix("v2:")?;
        rest.split_once(':').map(|(c, _)| c)
    }
}

fn license_order(ctx: &Ctx<'_>, activity: &str, f: &Fields<'_>) -> Result<LicenseOrder, Refusal> {
    let fingerprint = f.opt("deviceFingerprint", 1024)?;
    let test_flag = f.opt("testFlag", 2)?;
    let (instance_id, key, content): (&str, RequestKey, Vec<Option<String>>) =
        match f.opt("instanceId", 64)? {
            Some(instance_id) => {
                let event_id = f.req("eventId", 64)?;
                (instance_id, RequestKey::Event(event_id.into()), vec![])
            }
            None if activity == "getLicense" => {
                // §2.1: the marketplace sends no instanceId; the order's first businessId
                // becomes it, and the orderId is the idempotency key.
                let order_id = f.opt("orderId", 64)?.ok_or_else(|| {
                    Refusal::params("orderId: required (or instanceId and eventId)")
                })?;
                let business_id = f.req("businessId", 64)?;
                let customer = f.req("customerId", 100)?;
                f.opt("customerName", 64)?;
                let sku = f.opt("skuCode", 64)?;
                (
                    business_id,
                    RequestKey::Order(order_id.into()),
                    vec![Some(customer.into()), sku.map(Into::into)],
                )
            }
            None => return Err(Refusal::params("instanceId: required")),
        };
    let (not_before, not_after) = match &key {
        RequestKey::Event(_) => {
            let effective = f.req("effectiveTime", 32)?;
            (
                parse_time("effectiveTime", effective)?,
                f.opt("expireTime", 32)?
                    .map(|e| parse_time("expireTime", e))
                    .transpose()?,
            )
        }
        // [UNCONFIRMED] §2.1's term fields: the older page's table stops at skuCode.
        // Read them when present; otherwise the license starts now and is perpetual.
        RequestKey::Order(_) => (
            f.opt("effectiveTime", 32)?
                .map(|e| parse_time("effectiveTime", e))
                .transpose()?
                .unwrap_or(ctx.now),
            f.opt("expireTime", 32)?
                .map(|e| parse_time("expireTime", e))
                .transpose()?,
        ),
    };
    let devices = match fingerprint {
        Some(fp) => vec![kooagent_core::device_code::parse_code(fp)
            .map_err(|e| format!("deviceFingerprint: {e}"))?],
        None if ctx.product.require_device => {
            return Err(Refusal::params(format!(
                "deviceFingerprint: required for product {} (licenses are bound to a device code)",
                ctx.product.product
            )))
        }
        None => vec![],
    };
    let device = devices.first().map(String::as_str);
    let legacy_digest = digest(&[
        Some(activity),
        Some(&ctx.product.product),
        Some(instance_id),
        Some(&not_before.to_string()),
        not_after.map(|t| t.to_string()).as_deref(),
        device,
        test_flag,
    ]);
    let digest = {
        let mut parts: Vec<Option<&str>> = vec![Some(activity), Some(&ctx.product.product)];
        let nb = not_before.to_string();
        let na = not_after.map(|t| t.to_string());
        match &key {
            // A resend of an order has a new businessId and timeStamp: neither counts.
            RequestKey::Order(o) => {
                parts.push(Some(o));
                parts.extend(content.iter().map(Option::as_deref));
            }
            RequestKey::Event(_) => {
                parts.extend([Some(instance_id), Some(&nb), na.as_deref(), test_flag]);
            }
        }
        format!("v2:{}:{}", digest(&parts), device.unwrap_or(""))
    };
    let event_meta = match &key {
        RequestKey::Event(e) => ("kg_event", e.clone()),
        RequestKey::Order(o) => ("kg_order", o.clone()),
    };
    let mut meta = BTreeMap::new();
    meta.insert(event_meta.0.to_string(), event_meta.1);
    let request = seller::IssueRequest {
        id: Some(license_id_for(instance_id)),
        product: ctx.product.product.clone(),
        instance: instance_id.to_string(),
        unbound: devices.is_empty(),
        devices,
        issued_at: ctx.now,
        not_before: Some(not_before),
        term: not_after.map_or(seller::Term::Perpetual, seller::Term::Until),
        grace_secs: ctx.product.grace_secs,
        features: ctx.product.features.clone(),
        limits: ctx.product.limits.clone(),
        meta,
    };
    Ok(LicenseOrder {
        instance_id: instance_id.to_string(),
        key,
        digest,
        legacy_digest,
        request,
    })
}

/// What the stored requests say about this one.
enum Seen {
    /// Answered before under this events key: these bytes again.
    Answered { key: String, body: String },
    /// New: store the answer under this events key, for this instance (None: the
    /// order's own).
    New {
        event_key: String,
        instance: Option<String>,
    },
}

/// Looks `order` up: the same key and fingerprint answered before (the same bytes, or a
/// refusal when the content differs), the same key with another fingerprint (a new
/// license for the instance the key already has), or nothing.
fn seen(tx: &mut dyn Tx, order: &LicenseOrder) -> Result<Seen, Refusal> {
    let base_key = order.key.base();
    let Some(base) = tx.event(&base_key)? else {
        return Ok(Seen::New {
            event_key: base_key,
            instance: None,
        });
    };
    if base.digest == order.digest || base.digest == order.legacy_digest {
        return Ok(Seen::Answered {
            key: base_key,
            body: base.response,
        });
    }
    let differs = || {
        Refusal::params(format!(
            "{} was already used for a different {} request",
            order.key.describe(),
            base.activity
        ))
    };
    let same_content = LicenseOrder::content(&base.digest).is_some()
        && LicenseOrder::content(&base.digest) == LicenseOrder::content(&order.digest);
    if !same_content || base.digest.rsplit(':').next() == Some(order.device().unwrap_or("")) {
        return Err(differs());
    }
    // Another fingerprint under a known key: the instance the first answer named.
    let instance = serde_json::from_str::<Value>(&base.response)
        .ok()
        .and_then(|v| v["instanceId"].as_str().map(str::to_string))
        .ok_or_else(|| {
            DbError::Backend(format!("stored answer of {base_key} has no instanceId"))
        })?;
    let event_key = order.key.with_device(order.device());
    match tx.event(&event_key)? {
        Some(e) if e.digest == order.digest => Ok(Seen::Answered {
            key: event_key,
            body: e.response,
        }),
        Some(_) => Err(differs()),
        None => Ok(Seen::New {
            event_key,
            instance: Some(instance),
        }),
    }
}

fn get_license(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    activity: &str,
    f: &Fields<'_>,
    journal: &mut Journal,
) -> Result<String, Refusal> {
    // Presigned: checked on the workers already (a presigned request is a getLicense).
    let checked;
    let order = match ctx.presigned {
        Some(p) => &p.order,
        None => {
            checked = license_order(ctx, activity, f)?;
            &checked
        }
    };
    let (event_key, rebind) = match seen(tx, order)? {
        Seen::Answered { key, body } => {
            tx.event_resent(&key, ctx.now)?;
            journal.stored = true;
            return Ok(body);
        }
        Seen::New {
            event_key,
            instance,
        } => (event_key, instance),
    };
    let mut instance_id = rebind.clone().unwrap_or_else(|| order.instance_id.clone());
    journal.instance = Some(instance_id.clone());
    let previous = match (&order.key, &rebind) {
        // A new order never shares an instance: its businessId should be new, but
        // should it name a known instance, the orderId (also unique) is used instead.
        (RequestKey::Order(o), None) => match tx.instance(&instance_id)? {
            None => None,
            Some(_) if tx.instance(o)?.is_none() => {
                instance_id = o.clone();
                journal.instance = Some(instance_id.clone());
                None
            }
            Some(_) => {
                return Err(Refusal::params(format!(
                    "businessId {instance_id:?} and orderId {o:?} both name existing instances"
                )))
            }
        },
        _ => tx.instance(&instance_id)?,
    };
    if let Some(p) = &previous {
        if p.status == InstanceStatus::Released {
            return Err(Refusal::params(format!(
                "instance {instance_id} was released; a released instance gets no new license"
            )));
        }
        if p.product != ctx.product.product {
            return Err(Refusal::params(format!(
                "instance {instance_id} belongs to product {}, not {}",
                p.product, ctx.product.product
            )));
        }
    }
    let license_id = license_id_for(&instance_id);
    let req = &order.request;
    // Signed on the workers for the instance the order names; another one (a rebind, a
    // businessId already taken) is signed here.
    let presigned = ctx.presigned.filter(|_| req.instance == instance_id);
    let text = match presigned {
        Some(p) => p.text.clone(),
        None => {
            let mut req = req.clone();
            req.instance = instance_id.clone();
            req.id = Some(license_id.clone());
            seller::issue(&req, ctx.key).map_err(|e| Refusal::params(e.to_string()))?
        }
    };
    let not_before = req.not_before.unwrap_or(ctx.now);
    let not_after = match req.term {
        seller::Term::Until(t) => Some(t),
        _ => None,
    };
    let devices = req.devices.clone();
    let row = InstanceRow {
        instance_id: instance_id.clone(),
        product: ctx.product.product.clone(),
        license_id: license_id.clone(),
        devices,
        not_before,
        not_after,
        status: InstanceStatus::Active,
        frozen: previous.as_ref().is_some_and(|p| p.frozen),
        license: text.clone(),
        seq: previous.as_ref().map_or(0, |p| p.seq),
        updated_at: ctx.now,
    };
    let event_ref = match &order.key {
        RequestKey::Event(e) => e.clone(),
        RequestKey::Order(o) => format!("order:{o}"),
    };
    let sha = tx.record_license(&license_id, Some(&event_ref), &text, ctx.now)?;
    if previous.is_some() {
        tx.put_instance(&row)?;
    } else {
        tx.put_new_instance(&row, &sha)?;
    }
    let body = match presigned {
        Some(p) => p.answer.clone(),
        None => license_answer(&row),
    };
    // Stored by reference: reading rebuilds it from the license with answer_for.
    debug_assert_eq!(body, answer_for(&instance_id, &license_id, &text));
    remember(
        tx,
        ctx,
        Remember {
            event_id: &event_key,
            activity,
            digest: order.digest.clone(),
            response: &body,
            instance_id: &instance_id,
            order_id: f.opt("orderId", 64)?,
            customer_id: f.opt("customerId", 100)?,
            license_sha256: Some(sha),
        },
    )?;
    journal.stored = true;
    if let (true, "getLicenseAsync", RequestKey::Event(e)) = (ctx.upload, activity, &order.key) {
        // Durable with the license itself: the upload cannot be forgotten by a crash.
        tx.put_upload(&UploadRow {
            event_id: e.clone(),
            instance_id: instance_id.clone(),
            license: text.clone(),
            attempts: 0,
            next_at: ctx.now,
            done_at: None,
            last_error: None,
            created_at: ctx.now,
        })?;
    }
    let how = if rebind.is_some() {
        "rebound to a new device code"
    } else {
        "issued"
    };
    log::info!(
        "{activity}: {how} {license_id} for instance {instance_id} ({})",
        order.key.describe()
    );
    Ok(body)
}

/// The console's reissue (issue 16): the instance's license signed again with the same
/// terms, bound to the corrected device code `device` (canonicalised as every device code
/// is), recorded and made the instance's current license; the call history gets a
/// `reissue (console)` row. `Ok(Err(..))`: refused, nothing written. A frozen instance is
/// refused: the agent lifts a seller freeze for a license issued after it (docs/freeze.md),
/// so a reissue would unfreeze it on the device; unfreeze first.
pub fn reissue(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    instance_id: &str,
    device: &str,
) -> Result<Result<InstanceRow, String>, DbError> {
    let code = match kooagent_core::device_code::parse_code(device) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("device code {device:?}: {e}"))),
    };
    let Some(mut row) = tx.instance(instance_id)? else {
        return Ok(Err(format!("no instance {instance_id}")));
    };
    if row.product != ctx.product.product {
        return Ok(Err(format!(
            "instance {instance_id} belongs to product {}",
            row.product
        )));
    }
    if row.status == InstanceStatus::Released {
        return Ok(Err(format!(
            "instance {instance_id} was released; a released instance gets no new license"
        )));
    }
    if row.frozen {
        return Ok(Err(format!(
            "instance {instance_id} is frozen: a new license would lift the freeze on the \
             device; unfreeze it first"
        )));
    }
    if row.devices == [code.clone()] {
        return Ok(Err(format!(
            "the license of {instance_id} is already bound to {code}"
        )));
    }
    let parsed = format::parse(row.license.as_bytes())
        .map_err(|e| DbError::Backend(format!("stored license of {instance_id}: {e}")))?;
    let mut lic = parsed.license;
    lic.devices = vec![code.clone()];
    lic.unbound = false;
    lic.issued_at = ctx.now.max(lic.issued_at);
    lic.meta.insert(
        "kg_reissue".into(),
        kooagent_core::clock::format_rfc3339(ctx.now),
    );
    let text = match format::sign(&lic, ctx.key) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e.to_string())),
    };
    tx.record_license(&row.license_id, None, &text, lic.issued_at)?;
    row.license = text;
    row.devices = vec![code];
    row.updated_at = ctx.now;
    tx.put_instance(&row)?;
    let body = license_answer(&row);
    let mut obj = Map::new();
    obj.insert("instanceId".into(), Value::from(instance_id));
    note_call(tx, ctx, "reissue (console)", &obj, None, &body)?;
    log::info!(
        "console: reissued {} for instance {instance_id} bound to {}",
        row.license_id,
        row.devices[0]
    );
    Ok(Ok(row))
}

fn known_instance(tx: &mut dyn Tx, ctx: &Ctx<'_>, id: &str) -> Result<InstanceRow, Refusal> {
    match tx.instance(id)? {
        Some(r) if r.product == ctx.product.product => Ok(r),
        _ => Err(Refusal::Answer(
            ResultCode::NotFound,
            format!(
                "instance {id} is not known for product {}",
                ctx.product.product
            ),
        )),
    }
}

fn refresh_license(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    f: &Fields<'_>,
    journal: &mut Journal,
) -> Result<String, Refusal> {
    let instance_id = f.req("instanceId", 64)?;
    let expire = parse_time("expireTime", f.req("expireTime", 32)?)?;
    let event_id = f.opt("eventId", 64)?;
    let order_id = f.opt("orderId", 64)?;
    let digest = digest(&[
        Some("refreshLicense"),
        Some(&ctx.product.product),
        Some(instance_id),
        Some(&expire.to_string()),
        order_id,
    ]);
    if let Some(e) = event_id {
        if let Some(stored) = replay(tx, ctx, e, &digest)? {
            journal.stored = true;
            return Ok(stored);
        }
    }
    let mut row = known_instance(tx, ctx, instance_id)?;
    if row.status == InstanceStatus::Released {
        return Err(Refusal::params(format!(
            "instance {instance_id} was released; it cannot be renewed"
        )));
    }
    if row.not_after != Some(expire) || row.status != InstanceStatus::Active {
        let parsed = format::parse(row.license.as_bytes())
            .map_err(|e| DbError::Backend(format!("stored license of {instance_id}: {e}")))?;
        let mut lic = parsed.license;
        if expire <= lic.not_before {
            return Err(Refusal::params(format!(
                "expireTime: {} is not after the license's start {}",
                kooagent_core::clock::format_rfc3339(expire),
                kooagent_core::clock::format_rfc3339(lic.not_before)
            )));
        }
        lic.not_after = Some(expire);
        // Never older than the license it replaces: the agent keeps the newer one.
        lic.issued_at = ctx.now.max(lic.issued_at);
        if let Some(r) = event_id.or(order_id) {
            lic.meta.insert("kg_renewal".into(), r.into());
        }
        let text = format::sign(&lic, ctx.key).map_err(|e| Refusal::params(e.to_string()))?;
        tx.record_license(&row.license_id, event_id, &text, lic.issued_at)?;
        row.license = text;
        row.not_after = Some(expire);
        row.status = InstanceStatus::Active;
        row.updated_at = ctx.now;
        tx.put_instance(&row)?;
        log::info!(
            "refreshLicense: {} now runs until {}",
            row.license_id,
            kooagent_core::clock::format_rfc3339(expire)
        );
    }
    let body = license_answer(&row);
    if let Some(e) = event_id {
        remember(
            tx,
            ctx,
            Remember {
                event_id: e,
                activity: "refreshLicense",
                digest,
                response: &body,
                instance_id,
                order_id,
                customer_id: None,
                license_sha256: None,
            },
        )?;
        journal.stored = true;
    }
    Ok(body)
}

fn expire_license(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<String, Refusal> {
    let instance_id = f.req("instanceId", 64)?;
    let mut row = known_instance(tx, ctx, instance_id)?;
    if row.status == InstanceStatus::Active {
        row.status = InstanceStatus::Expired;
        row.updated_at = ctx.now;
        tx.put_instance(&row)?;
        log::info!("expireLicense: {} expired", row.license_id);
    }
    Ok(success())
}

/// Allocates the next sequence number for `license_id` and records the token, in the
/// caller's transaction; `Abort` (rolling back the whole request) when no token can be
/// made.
fn new_token(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    license_id: &str,
    last_seq: i64,
    action: TokenAction,
    devices: &[String],
) -> Result<i64, Refusal> {
    let seq = last_seq + 1;
    let token = ctx
        .tokens
        .issue(license_id, action, seq as u64, devices, ctx.now)
        .map_err(DbError::Abort)?;
    tx.put_token(&TokenRow {
        license_id: license_id.into(),
        seq,
        action: action.as_str().into(),
        token,
        issued_at: ctx.now,
    })?;
    log::info!("{}: {license_id} status token #{seq}", action.as_str());
    Ok(seq)
}

fn release_license(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<String, Refusal> {
    let instance_id = f.req("instanceId", 64)?;
    let mut row = known_instance(tx, ctx, instance_id)?;
    if row.status != InstanceStatus::Released {
        row.seq = new_token(
            tx,
            ctx,
            &row.license_id,
            row.seq,
            TokenAction::Release,
            &row.devices,
        )?;
        row.status = InstanceStatus::Released;
        row.updated_at = ctx.now;
        tx.put_instance(&row)?;
    }
    Ok(success())
}

fn freeze_status(f: &Fields<'_>) -> Result<bool, Refusal> {
    match f.req("status", 32)? {
        "FREEZE" => Ok(true),
        "UNFREEZE" => Ok(false),
        other => Err(Refusal::params(format!(
            "status: {other:?} is neither FREEZE nor UNFREEZE"
        ))),
    }
}

fn action(freeze: bool) -> TokenAction {
    if freeze {
        TokenAction::Freeze
    } else {
        TokenAction::Unfreeze
    }
}

fn update_instance_status(
    tx: &mut dyn Tx,
    ctx: &Ctx<'_>,
    f: &Fields<'_>,
) -> Result<String, Refusal> {
    let instance_id = f.req("instanceId", 64)?;
    let freeze = freeze_status(f)?;
    let mut row = known_instance(tx, ctx, instance_id)?;
    if row.status == InstanceStatus::Released {
        return Err(Refusal::params(format!(
            "instance {instance_id} was released"
        )));
    }
    if row.frozen != freeze {
        row.seq = new_token(
            tx,
            ctx,
            &row.license_id,
            row.seq,
            action(freeze),
            &row.devices,
        )?;
        row.frozen = freeze;
        row.updated_at = ctx.now;
        tx.put_instance(&row)?;
    }
    Ok(success())
}

/// Authorization codes are learnt from the marketplace's calls: the marketplace is the
/// authority on which codes exist, and answering `000003` for a code no device has
/// activated yet would only make it retry.
fn code_row(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<CodeRow, Refusal> {
    let code = f.req("license", 64)?;
    Ok(tx.code(code)?.unwrap_or(CodeRow {
        code: code.into(),
        status: "active".into(),
        frozen: false,
        expire_at: None,
        seq: 0,
        updated_at: ctx.now,
        device_key: None,
    }))
}

fn update_code_status(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<String, Refusal> {
    let freeze = freeze_status(f)?;
    let mut row = code_row(tx, ctx, f)?;
    if row.status == "released" {
        return Err(Refusal::params(format!(
            "authorization code {} was released",
            row.code
        )));
    }
    if row.frozen != freeze {
        row.seq = new_token(tx, ctx, &row.code, row.seq, action(freeze), &[])?;
        row.frozen = freeze;
        row.updated_at = ctx.now;
        tx.put_code(&row)?;
    }
    Ok(success())
}

fn release_code(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<String, Refusal> {
    f.opt("orderId", 64)?;
    f.opt("orderLineId", 64)?;
    let mut row = code_row(tx, ctx, f)?;
    if row.status != "released" {
        row.seq = new_token(tx, ctx, &row.code, row.seq, TokenAction::Release, &[])?;
        row.status = "released".into();
        row.updated_at = ctx.now;
        tx.put_code(&row)?;
    }
    Ok(success())
}

fn refresh_code(tx: &mut dyn Tx, ctx: &Ctx<'_>, f: &Fields<'_>) -> Result<String, Refusal> {
    match f.req("scene", 32)? {
        "RENEWAL" | "UNSUBSCRIBE_RENEWAL_PERIOD" => {}
        other => {
            return Err(Refusal::params(format!(
                "scene: {other:?} is neither RENEWAL nor UNSUBSCRIBE_RENEWAL_PERIOD"
            )))
        }
    }
    f.req("orderId", 64)?;
    f.req("orderLineId", 64)?;
    let raw = f.req("expireTime", 20)?;
    let expire = kooagent_core::clock::parse_digits14(raw)
        .ok_or_else(|| format!("expireTime: {raw:?} is not yyyyMMddHHmmss"))?;
    let mut row = code_row(tx, ctx, f)?;
    if row.status == "released" {
        return Err(Refusal::params(format!(
            "authorization code {} was released",
            row.code
        )));
    }
    if row.expire_at != Some(expire) {
        row.expire_at = Some(expire);
        row.updated_at = ctx.now;
        tx.put_code(&row)?;
    }
    Ok(success())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How answers were written before (through `Value`'s Display): the bytes must not
    /// change, the marketplace's resends compare them.
    fn answer_via_value(code: ResultCode, msg: &str, extra: &[(&str, Value)]) -> String {
        let mut out = String::from("{\"resultCode\":");
        out.push_str(&Value::from(code.as_str()).to_string());
        out.push_str(",\"resultMsg\":");
        let msg: String = msg.chars().take(255).collect();
        out.push_str(&Value::from(msg).to_string());
        for (k, v) in extra {
            out.push_str(&format!(",{}:{}", Value::from(*k), v));
        }
        out.push('}');
        out
    }

    #[test]
    fn answers_keep_their_bytes() {
        let long = "é\"\\\n\u{1}x".repeat(100);
        type Case<'a> = (ResultCode, String, Vec<(&'a str, Value)>);
        let cases: Vec<Case<'_>> = vec![
            (ResultCode::Success, "success".into(), vec![]),
            (ResultCode::BadParams, long.clone(), vec![]),
            (
                ResultCode::Success,
                "ok".into(),
                vec![
                    ("instanceId", Value::from("inst-\"1")),
                    ("license", Value::from("kl1.abc.def\n")),
                    ("n", serde_json::json!({"a": [1, null, true], "b": 2.5})),
                ],
            ),
            (
                ResultCode::AuthFailed,
                "x".repeat(300),
                vec![("k\u{7f}", Value::from(long))],
            ),
        ];
        for (code, msg, extra) in cases {
            assert_eq!(
                answer(code, &msg, &extra),
                answer_via_value(code, &msg, &extra)
            );
        }
    }
}
