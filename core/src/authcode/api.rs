//! The authorization-code open APIs' requests and answers (koogallery.md B1, B2, B4, B5):
//! types, validation before sending, pure parsing of answers, and a typed error for every
//! documented error code. No I/O here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{parse_digits14, Civil};

pub const PATH_ACTIVATE: &str = "/api/mkp-openapi-public/global/v1/license/activate";
pub const PATH_HEARTBEAT: &str = "/api/mkp-openapi-public/global/v1/license/heartbeat";
pub const PATH_USAGE: &str = "/api/mkp-openapi-public/global/v2/license/software-usage-info";

/// `error_code` of a successful call.
pub const SUCCESS: &str = "92020000";
pub const MAX_CODE_LEN: usize = 64;
/// Licenses per usage call, and entries per license.
pub const MAX_USAGE_LICENSES: usize = 100;
pub const MAX_USAGE_ENTRIES: usize = 100;
pub const MAX_ID_LEN: usize = 256;
/// `active_num` has at most 9 digits.
pub const MAX_ACTIVE_NUM: u64 = 999_999_999;
/// How much of an unexpected answer is kept in an error.
const SNIPPET: usize = 300;

/// A documented `error_code` (B5), or another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    Internal,
    InvalidParam,
    AlreadyActivated,
    NotYetReceived,
    UnknownCode,
    NotActivated,
    InvalidCodeInBatch,
    BadRequestParam,
    MethodNotSupported,
    ContentTypeNotSupported,
    BodyNotReadable,
    Other(String),
}

const TABLE: &[(&str, ErrorCode, &str)] = &[
    ("92020001", ErrorCode::Internal, "KooGallery internal error; try again later"),
    ("92020002", ErrorCode::InvalidParam, "invalid request parameter"),
    (
        "92020003",
        ErrorCode::AlreadyActivated,
        "the authorization code is in a state that does not allow this (already activated: do not activate twice)",
    ),
    (
        "92020004",
        ErrorCode::NotYetReceived,
        "the buyer has not received the authorization code yet; it cannot be activated before",
    ),
    ("92020005", ErrorCode::UnknownCode, "the authorization code does not exist"),
    (
        "92020011",
        ErrorCode::NotActivated,
        "the authorization code has not been activated",
    ),
    (
        "92020020",
        ErrorCode::InvalidCodeInBatch,
        "the request holds an invalid authorization code",
    ),
    (
        "95000001",
        ErrorCode::BadRequestParam,
        "a request field failed the format, length or required check",
    ),
    ("95000002", ErrorCode::MethodNotSupported, "HTTP method not supported"),
    (
        "95000003",
        ErrorCode::ContentTypeNotSupported,
        "Content-Type is not application/json",
    ),
    ("95000004", ErrorCode::BodyNotReadable, "the request body is not readable JSON"),
];

impl ErrorCode {
    pub fn from_code(code: &str) -> ErrorCode {
        TABLE
            .iter()
            .find(|(c, _, _)| *c == code)
            .map(|(_, e, _)| e.clone())
            .unwrap_or_else(|| ErrorCode::Other(code.to_string()))
    }

    pub fn code(&self) -> &str {
        match self {
            ErrorCode::Other(c) => c,
            e => TABLE
                .iter()
                .find(|(_, x, _)| x == e)
                .map(|(c, _, _)| *c)
                .unwrap(),
        }
    }

    pub fn meaning(&self) -> &'static str {
        TABLE
            .iter()
            .find(|(_, x, _)| x == self)
            .map(|(_, _, m)| *m)
            .unwrap_or("undocumented error code")
    }

    /// Worth trying again later unchanged.
    pub fn is_transient(&self) -> bool {
        *self == ErrorCode::Internal
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.meaning())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Refused before sending: the request breaks a documented limit.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// KooGallery answered with an error code (HTTP 200 for business errors).
    #[error("KooGallery refused the request (HTTP {http}): error_code {code}; error_msg {msg:?}")]
    Refused {
        http: u16,
        code: ErrorCode,
        msg: String,
    },
    /// The API gateway refused it (signature, date, key: codes `APIG.xxxx`, and
    /// `APIGW.xxxx` such as `APIGW.0301` for a wrong secret key).
    #[error("the API gateway refused the request (HTTP {http}, {code}): {msg:?}; check the AK/SK and the clock")]
    Gateway {
        http: u16,
        code: String,
        msg: String,
    },
    /// Any other HTTP error.
    #[error("HTTP {http} from KooGallery: {body:?}")]
    Http { http: u16, body: String },
    #[error("KooGallery's answer is not understood: {0}")]
    Malformed(String),
}

impl ApiError {
    /// Worth trying again later unchanged.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Refused { code, .. } => code.is_transient(),
            ApiError::Http { http, .. } => matches!(http, 408 | 425 | 429 | 500..=599),
            _ => false,
        }
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(SNIPPET) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Strings, or numbers where a string is documented (tolerated: the pages show both).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The common envelope: `data` on success, a typed error otherwise.
pub fn parse_envelope(http: u16, body: &str) -> Result<Value, ApiError> {
    let v: Option<Value> = serde_json::from_str(body).ok();
    let code = v.as_ref().and_then(|v| text(&v["error_code"]));
    let msg = v
        .as_ref()
        .and_then(|v| text(&v["error_msg"]))
        .unwrap_or_default();
    match (http, code) {
        (200..=299, Some(c)) if c == SUCCESS => Ok(v.unwrap()["data"].clone()),
        (_, Some(c)) if c.starts_with("APIG.") || c.starts_with("APIGW.") => {
            Err(ApiError::Gateway {
                http,
                code: c,
                msg: snippet(&msg),
            })
        }
        (_, Some(c)) => Err(ApiError::Refused {
            http,
            code: ErrorCode::from_code(&c),
            msg: snippet(&msg),
        }),
        (200..=299, None) => Err(ApiError::Malformed(format!(
            "HTTP {http} without error_code: {:?}",
            snippet(body)
        ))),
        (_, None) => Err(ApiError::Http {
            http,
            body: snippet(body),
        }),
    }
}

/// An authorization code as typed: trimmed, 1..64 printable ASCII characters.
pub fn check_code(code: &str) -> Result<String, ApiError> {
    let c = code.trim();
    if c.is_empty() || c.len() > MAX_CODE_LEN || !c.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::Invalid(format!(
            "authorization code {code:?} must be 1..{MAX_CODE_LEN} printable ASCII characters"
        )));
    }
    Ok(c.to_string())
}

/// `yyyyMMddHHmmss` (UTC), the license APIs' time format.
pub fn format_digits14(secs: i64) -> String {
    let c = Civil::from_unix(secs);
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivateRequest {
    pub license: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_effect_time: Option<String>,
}

impl ActivateRequest {
    /// `real_effect_time`: when delivery took effect (Unix seconds), not before the order.
    pub fn new(code: &str, real_effect_time: Option<i64>) -> Result<ActivateRequest, ApiError> {
        Ok(ActivateRequest {
            license: check_code(code)?,
            real_effect_time: real_effect_time.map(format_digits14),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeartbeatRequest {
    pub license: String,
}

impl HeartbeatRequest {
    pub fn new(code: &str) -> Result<HeartbeatRequest, ApiError> {
        Ok(HeartbeatRequest {
            license: check_code(code)?,
        })
    }
}

/// A code's details as activation reports them (`license_code_info`, a JSON string).
/// Its expiry is an estimate: the daily query's answer is authoritative (B1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeInfo {
    /// The code the answer is about, when it says (`license_code` or `license`; not in
    /// the documented example).
    pub license_code: Option<String>,
    pub status: String,
    pub expire_time: Option<i64>,
    pub product_id: Option<String>,
    pub order_id: Option<String>,
    pub amount: Option<String>,
}

/// What activation answered; `data` is optional in the documented answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub info: Option<CodeInfo>,
    /// The seller's relay says the marketplace had already activated the code for this
    /// very device and the first answer was lost (top-level `kooagent_recovered: true`,
    /// docs/authorization-codes.md "Recovery"); never set by KooGallery itself.
    pub recovered: bool,
}

/// An answer about another code than the one asked is never applied to ours (a proxy
/// or gateway mixing answers up must not hand one buyer's state to another's code).
pub fn check_answer_code(asked: &str, answered: Option<&str>) -> Result<(), ApiError> {
    match answered {
        Some(a) if a.trim() != asked => Err(ApiError::Malformed(format!(
            "the answer is about authorization code {a:?}, not {asked:?}; not applied"
        ))),
        _ => Ok(()),
    }
}

/// **[UNCONFIRMED]** time format for fields the pages do not show: `yyyyMMddHHmmss` (what
/// every other license field uses); Unix milliseconds are accepted too. `None` = absent.
pub fn parse_time(field: &str, v: &Value) -> Result<Option<i64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => parse_digits14(s)
            .map(Some)
            .ok_or_else(|| ApiError::Malformed(format!("{field} {s:?} is not yyyyMMddHHmmss"))),
        Value::Number(n) => n
            .as_i64()
            .map(|ms| Some(ms.div_euclid(1000)))
            .ok_or_else(|| ApiError::Malformed(format!("{field} {n} is not a time"))),
        other => Err(ApiError::Malformed(format!(
            "{field} {other} is not a time"
        ))),
    }
}

pub fn parse_code_info(raw: &str) -> Result<CodeInfo, ApiError> {
    let v: Value = serde_json::from_str(raw).map_err(|e| {
        ApiError::Malformed(format!(
            "license_code_info is not JSON ({e}): {:?}",
            snippet(raw)
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::Malformed(
            "license_code_info is not an object".into(),
        ));
    }
    Ok(CodeInfo {
        license_code: text(&v["license_code"]).or_else(|| text(&v["license"])),
        status: text(&v["status"])
            .ok_or_else(|| ApiError::Malformed("license_code_info has no status".into()))?,
        expire_time: parse_time("license_code_info.expire_time", &v["expire_time"])?,
        product_id: text(&v["product_id"]),
        order_id: text(&v["order_id"]),
        amount: text(&v["amount"]),
    })
}

pub fn parse_activate(http: u16, body: &str) -> Result<Activation, ApiError> {
    let data = parse_envelope(http, body)?;
    let info = match &data["license_code_info"] {
        Value::Null => None,
        Value::String(s) => Some(parse_code_info(s)?),
        // Documented as a string; an object is read the same way.
        o @ Value::Object(_) => Some(parse_code_info(&o.to_string())?),
        other => {
            return Err(ApiError::Malformed(format!(
                "license_code_info is {other}, not a JSON string"
            )))
        }
    };
    let recovered = serde_json::from_str::<Value>(body)
        .is_ok_and(|v| v["kooagent_recovered"] == Value::Bool(true));
    Ok(Activation { info, recovered })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeStatus {
    Alive,
    Expired,
    Released,
    /// A value the pages do not list: not usable.
    Other(String),
}

impl CodeStatus {
    pub fn parse(s: &str) -> CodeStatus {
        match s {
            "ALIVE" => CodeStatus::Alive,
            "EXPIRED" => CodeStatus::Expired,
            "RELEASED" => CodeStatus::Released,
            o => CodeStatus::Other(o.to_string()),
        }
    }
}

/// The daily query's `data` (`LicenseInfo`); unknown fields are kept in `extra`.
#[derive(Debug, Clone, PartialEq)]
pub struct LicenseInfo {
    pub license_code: String,
    pub status: CodeStatus,
    /// As received (format [UNCONFIRMED]) and parsed when it is a known format.
    pub activate_time: String,
    pub activate_time_unix: Option<i64>,
    /// **[UNCONFIRMED]** field: read when present.
    pub expire_time: Option<i64>,
    pub extra: BTreeMap<String, Value>,
}

pub fn parse_heartbeat(http: u16, body: &str) -> Result<LicenseInfo, ApiError> {
    let data = parse_envelope(http, body)?;
    let Value::Object(mut m) = data else {
        return Err(ApiError::Malformed(
            "heartbeat answer has no data object".into(),
        ));
    };
    let mut take = |k: &str| m.remove(k).unwrap_or(Value::Null);
    let license_code = text(&take("license_code"))
        .ok_or_else(|| ApiError::Malformed("data.license_code missing".into()))?;
    let status = text(&take("status"))
        .map(|s| CodeStatus::parse(&s))
        .ok_or_else(|| ApiError::Malformed("data.status missing".into()))?;
    let at = take("activate_time");
    let activate_time = text(&at).unwrap_or_default();
    let activate_time_unix = parse_time("data.activate_time", &at).ok().flatten();
    let expire_time = parse_time("data.expire_time", &take("expire_time"))?;
    Ok(LicenseInfo {
        license_code,
        status,
        activate_time,
        activate_time_unix,
        expire_time,
        extra: m.into_iter().collect(),
    })
}

/// One day's usage by one client (`id`) or a day's total (`active_num`): exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftwareUsageInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_num: Option<u64>,
}

impl SoftwareUsageInfo {
    pub fn id(id: &str) -> SoftwareUsageInfo {
        SoftwareUsageInfo {
            id: Some(id.to_string()),
            active_num: None,
        }
    }
    pub fn active_num(n: u64) -> SoftwareUsageInfo {
        SoftwareUsageInfo {
            id: None,
            active_num: Some(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub license: String,
    /// The capital I is the API's spelling.
    #[serde(rename = "software_usage_Info")]
    pub software_usage_info: Vec<SoftwareUsageInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRequest {
    pub usage_info: Vec<Usage>,
}

impl UsageRequest {
    /// Every documented limit, checked before sending.
    pub fn validate(&self) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::Invalid(m));
        let n = self.usage_info.len();
        if n == 0 || n > MAX_USAGE_LICENSES {
            return bad(format!(
                "usage_info has {n} licenses (1..{MAX_USAGE_LICENSES})"
            ));
        }
        for (i, u) in self.usage_info.iter().enumerate() {
            check_code(&u.license)?;
            if self.usage_info[..i].iter().any(|x| x.license == u.license) {
                return bad(format!("license {} appears twice in usage_info", u.license));
            }
            let k = u.software_usage_info.len();
            if k == 0 || k > MAX_USAGE_ENTRIES {
                return bad(format!(
                    "license {}: software_usage_Info has {k} entries (1..{MAX_USAGE_ENTRIES})",
                    u.license
                ));
            }
            for (i, e) in u.software_usage_info.iter().enumerate() {
                let at = format!("license {} software_usage_Info[{i}]", u.license);
                match (&e.id, e.active_num) {
                    (Some(id), None) => {
                        if id.is_empty() || id.len() > MAX_ID_LEN {
                            return bad(format!("{at}: id must be 1..{MAX_ID_LEN} bytes"));
                        }
                    }
                    (None, Some(n)) if n > MAX_ACTIVE_NUM => {
                        return bad(format!("{at}: active_num {n} has more than 9 digits"))
                    }
                    (None, Some(_)) => {}
                    _ => return bad(format!("{at}: needs exactly one of id and active_num")),
                }
            }
        }
        Ok(())
    }

    /// Groups `(code, entry)` pairs by code and splits them into requests within the
    /// limits, in the order given. Each result is validated.
    pub fn batches(entries: &[(String, SoftwareUsageInfo)]) -> Result<Vec<UsageRequest>, ApiError> {
        let mut by_code: Vec<(String, Vec<SoftwareUsageInfo>)> = Vec::new();
        for (code, e) in entries {
            let code = check_code(code)?;
            match by_code.iter_mut().find(|(c, _)| *c == code) {
                Some((_, list)) => list.push(e.clone()),
                None => by_code.push((code, vec![e.clone()])),
            }
        }
        let usages: Vec<Usage> = by_code
            .into_iter()
            .flat_map(|(code, list)| {
                list.chunks(MAX_USAGE_ENTRIES)
                    .map(|c| Usage {
                        license: code.clone(),
                        software_usage_info: c.to_vec(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        // A code appears at most once per request: how the API would merge two is unknown.
        let mut reqs: Vec<UsageRequest> = Vec::new();
        for u in usages {
            match reqs.last_mut() {
                Some(r)
                    if r.usage_info.len() < MAX_USAGE_LICENSES
                        && r.usage_info.iter().all(|x| x.license != u.license) =>
                {
                    r.usage_info.push(u)
                }
                _ => reqs.push(UsageRequest {
                    usage_info: vec![u],
                }),
            }
        }
        for r in &reqs {
            r.validate()?;
        }
        Ok(reqs)
    }
}

/// The usage API's answer: **[UNCONFIRMED]** shape, read as the common envelope.
pub fn parse_usage(http: u16, body: &str) -> Result<(), ApiError> {
    parse_envelope(http, body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documented_activation_answer() {
        let body = r#"{"error_code":"92020000","error_msg":"success","data":{"license_code_info":"{\"status\":\"ALIVE\",\"expire_time\":\"20230726121646\",\"product_id\":\"12345\",\"amount\":2,\"order_id\":\"CS123\"}"}}"#;
        let a = parse_activate(200, body).unwrap();
        let info = a.info.unwrap();
        assert_eq!(info.status, "ALIVE");
        assert_eq!(
            info.expire_time,
            crate::clock::parse_rfc3339("2023-07-26T12:16:46Z")
        );
        assert_eq!(info.product_id.as_deref(), Some("12345"));
        assert_eq!(info.order_id.as_deref(), Some("CS123"));
        assert_eq!(info.amount.as_deref(), Some("2"));
        let no_data = parse_activate(200, r#"{"error_code":"92020000","error_msg":"ok"}"#);
        assert_eq!(
            no_data,
            Ok(Activation {
                info: None,
                recovered: false
            })
        );
        let bad =
            r#"{"error_code":"92020000","error_msg":"","data":{"license_code_info":"{oops"}}"#;
        assert!(matches!(
            parse_activate(200, bad),
            Err(ApiError::Malformed(_))
        ));
    }

    #[test]
    fn every_documented_code_is_typed_with_a_message() {
        for (code, kind, meaning) in TABLE {
            let body = json!({"error_code": code, "error_msg": "m"}).to_string();
            let http = if code.starts_with("95") { 400 } else { 200 };
            match parse_envelope(http, &body) {
                Err(ApiError::Refused {
                    code: c, http: h, ..
                }) => {
                    assert_eq!(&c, kind);
                    assert_eq!(h, http);
                    assert_eq!(c.code(), *code);
                    let shown = ApiError::Refused {
                        http,
                        code: c,
                        msg: "m".into(),
                    }
                    .to_string();
                    assert!(shown.contains(code) && shown.contains(meaning), "{shown}");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        assert_eq!(
            ErrorCode::from_code("92020003"),
            ErrorCode::AlreadyActivated
        );
        assert_eq!(ErrorCode::from_code("92020005"), ErrorCode::UnknownCode);
        assert!(ErrorCode::Internal.is_transient() && !ErrorCode::UnknownCode.is_transient());
        let other = parse_envelope(200, r#"{"error_code":92029999,"error_msg":"new"}"#);
        assert!(
            matches!(other, Err(ApiError::Refused { code: ErrorCode::Other(ref c), .. }) if c == "92029999")
        );
    }

    #[test]
    fn error_table_is_documented() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/authorization-codes.md"
        ));
        for (code, kind, meaning) in TABLE {
            let row = format!("| {code} | `{kind:?}` | {meaning}");
            assert!(
                doc.contains(&row),
                "docs/authorization-codes.md lacks {row:?}"
            );
        }
    }

    #[test]
    fn gateway_and_http_errors() {
        let g = parse_envelope(
            401,
            r#"{"error_code":"APIG.0303","error_msg":"Incorrect app key"}"#,
        );
        assert!(
            matches!(g, Err(ApiError::Gateway { http: 401, ref code, .. }) if code == "APIG.0303")
        );
        let gw = parse_envelope(
            401,
            r#"{"error_code":"APIGW.0301","error_msg":"Incorrect IAM authentication information"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(gw, ApiError::Gateway { http: 401, ref code, .. } if code == "APIGW.0301"),
            "{gw:?}"
        );
        assert!(gw.to_string().contains("AK/SK"), "{gw}");
        assert!(check_answer_code("PL1", Some("PL2")).is_err());
        assert!(check_answer_code("PL1", Some("PL1")).is_ok());
        assert!(check_answer_code("PL1", None).is_ok());
        let h = parse_envelope(502, "<html>bad gateway</html>").unwrap_err();
        assert!(h.is_transient() && h.to_string().contains("502"), "{h}");
        assert!(!parse_envelope(404, "").unwrap_err().is_transient());
        assert!(matches!(
            parse_envelope(200, "not json"),
            Err(ApiError::Malformed(_))
        ));
        let long = parse_envelope(500, &"x".repeat(5000))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 400, "{long}");
    }

    #[test]
    fn heartbeat_statuses_and_unknown_fields() {
        let body = |status: &str| {
            json!({"error_code":"92020000","error_msg":"success","data":{
                "license_code":"PL1","status":status,"activate_time":"20240101000000",
                "expire_time":"20250101000000","new_field":{"x":1}}})
            .to_string()
        };
        let i = parse_heartbeat(200, &body("ALIVE")).unwrap();
        assert_eq!(i.status, CodeStatus::Alive);
        assert_eq!(i.license_code, "PL1");
        assert_eq!(
            i.activate_time_unix,
            crate::clock::parse_rfc3339("2024-01-01T00:00:00Z")
        );
        assert_eq!(
            i.expire_time,
            crate::clock::parse_rfc3339("2025-01-01T00:00:00Z")
        );
        assert_eq!(i.extra["new_field"], json!({"x":1}));
        assert_eq!(
            parse_heartbeat(200, &body("EXPIRED")).unwrap().status,
            CodeStatus::Expired
        );
        assert_eq!(
            parse_heartbeat(200, &body("RELEASED")).unwrap().status,
            CodeStatus::Released
        );
        assert_eq!(
            parse_heartbeat(200, &body("FROZEN")).unwrap().status,
            CodeStatus::Other("FROZEN".into())
        );
        // expire_time is optional; activate_time in an unknown format is kept raw.
        let minimal = r#"{"error_code":"92020000","error_msg":"","data":{"license_code":"PL1","status":"ALIVE","activate_time":"2024-01-01 00:00"}}"#;
        let i = parse_heartbeat(200, minimal).unwrap();
        assert_eq!((i.expire_time, i.activate_time_unix), (None, None));
        assert_eq!(i.activate_time, "2024-01-01 00:00");
        let no_status = r#"{"error_code":"92020000","error_msg":"","data":{"license_code":"PL1"}}"#;
        assert!(matches!(
            parse_heartbeat(200, no_status),
            Err(ApiError::Malformed(_))
        ));
    }

    #[test]
    fn requests_serialise_as_documented() {
        let a = ActivateRequest::new(" PL123 ", Some(1_767_368_155)).unwrap();
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"license":"PL123","real_effect_time":"20260102153555"}"#
        );
        assert_eq!(
            serde_json::to_string(&ActivateRequest::new("PL1", None).unwrap()).unwrap(),
            r#"{"license":"PL1"}"#
        );
        assert!(ActivateRequest::new("", None).is_err());
        assert!(HeartbeatRequest::new(&"P".repeat(65)).is_err());
        assert!(HeartbeatRequest::new("PL 1").is_err());
        let u = UsageRequest {
            usage_info: vec![Usage {
                license: "PL1".into(),
                software_usage_info: vec![
                    SoftwareUsageInfo::id("account1"),
                    SoftwareUsageInfo::active_num(3),
                ],
            }],
        };
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            r#"{"usage_info":[{"license":"PL1","software_usage_Info":[{"id":"account1"},{"active_num":3}]}]}"#
        );
        assert_eq!(u.validate(), Ok(()));
    }

    #[test]
    fn usage_limits() {
        let one = |e: SoftwareUsageInfo| UsageRequest {
            usage_info: vec![Usage {
                license: "PL1".into(),
                software_usage_info: vec![e],
            }],
        };
        let both = SoftwareUsageInfo {
            id: Some("a".into()),
            active_num: Some(1),
        };
        let neither = SoftwareUsageInfo {
            id: None,
            active_num: None,
        };
        for bad in [both, neither] {
            let e = one(bad).validate().unwrap_err().to_string();
            assert!(e.contains("exactly one"), "{e}");
        }
        assert!(one(SoftwareUsageInfo::active_num(MAX_ACTIVE_NUM))
            .validate()
            .is_ok());
        assert!(one(SoftwareUsageInfo::active_num(MAX_ACTIVE_NUM + 1))
            .validate()
            .is_err());
        assert!(one(SoftwareUsageInfo::id(&"i".repeat(257)))
            .validate()
            .is_err());
        assert!(one(SoftwareUsageInfo::id("")).validate().is_err());
        assert!(UsageRequest { usage_info: vec![] }.validate().is_err());
        let mut many = one(SoftwareUsageInfo::id("x"));
        many.usage_info[0].software_usage_info = vec![SoftwareUsageInfo::id("x"); 101];
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("101 entries"));
        many.usage_info = vec![
            Usage {
                license: "PL1".into(),
                software_usage_info: vec![SoftwareUsageInfo::id("x")]
            };
            2
        ];
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        many.usage_info = (0..101)
            .map(|i| Usage {
                license: format!("PL{i}"),
                software_usage_info: vec![SoftwareUsageInfo::id("x")],
            })
            .collect();
        assert!(many
            .validate()
            .unwrap_err()
            .to_string()
            .contains("101 licenses"));
    }

    #[test]
    fn batches_respect_the_limits() {
        let mut entries = Vec::new();
        for i in 0..250 {
            entries.push((
                "PL-A".to_string(),
                SoftwareUsageInfo::id(&format!("dev{i}")),
            ));
        }
        for c in 0..150 {
            entries.push((format!("PL-{c}"), SoftwareUsageInfo::active_num(c)));
        }
        let reqs = UsageRequest::batches(&entries).unwrap();
        // PL-A: 100 + 100 + 50 entries, one request each (a code once per request), the
        // third shared with PL-0..PL-98, then PL-99..PL-149.
        let shape: Vec<usize> = reqs.iter().map(|r| r.usage_info.len()).collect();
        assert_eq!(shape, [1, 1, 100, 51]);
        assert_eq!(reqs[2].usage_info[0].software_usage_info.len(), 50);
        let total: usize = reqs
            .iter()
            .flat_map(|r| &r.usage_info)
            .map(|u| u.software_usage_info.len())
            .sum();
        assert_eq!(total, 400);
        assert!(UsageRequest::batches(&[("PL1".into(), SoftwareUsageInfo::id(""))]).is_err());
    }
}
