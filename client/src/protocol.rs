//! The local socket's wire format: newline-delimited JSON, one request per line, one
//! response per line, in order. See docs/protocol.md. Shared by the agent (which parses
//! requests and writes answers) and this client.
//!
//! Request:  `{"v":1,"id":7,"op":"ping","params":{}}`
//! Response: `{"v":1,"id":7,"ok":true,"result":{...}}`
//!        or `{"v":1,"id":7,"ok":false,"error":{"code":"unknown_op","message":"..."}}`

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

pub const VERSION: u64 = 1;
/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;

/// Stable, machine-readable error codes shared by every operation. Operations add their
/// own codes next to their code; these are the protocol-level ones.
pub mod codes {
    pub const PARSE_ERROR: &str = "parse_error";
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    pub const UNKNOWN_OP: &str = "unknown_op";
    pub const INVALID_PARAMS: &str = "invalid_params";
    pub const LINE_TOO_LONG: &str = "line_too_long";
    pub const BUSY: &str = "busy";
    pub const NOT_READY: &str = "not_ready";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const INTERNAL: &str = "internal";
}

/// An error answer: a stable code plus a message for people.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl OpError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        OpError::new(codes::INVALID_PARAMS, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        OpError::new(codes::INTERNAL, message)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A request's `id`, kept as the exact JSON text the client sent, so it is echoed byte for
/// byte: read into a `Value`, `123456789012345678901234567890` would come back as
/// `1.2345678901234568e+29` and the client could not match its answer.
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// The id of an answer to a line whose id could not be read.
    pub fn null() -> Id {
        Id::from_value(&Value::Null)
    }

    pub fn from_value(v: &Value) -> Id {
        Id(RawValue::from_string(v.to_string()).expect("a Value is valid JSON"))
    }

    /// A string or a number: the only ids a request may carry.
    fn is_valid(&self) -> bool {
        Id::raw_is_valid(&self.0)
    }

    fn raw_is_valid(raw: &RawValue) -> bool {
        matches!(
            raw.get().as_bytes().first(),
            Some(b'"' | b'-' | b'0'..=b'9')
        )
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.get() == other.get()
    }
}

impl PartialEq<Value> for Id {
    fn eq(&self, other: &Value) -> bool {
        serde_json::from_str::<Value>(self.get()).is_ok_and(|v| v == *other)
    }
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Id,
    pub op: String,
    pub params: Value,
}

/// Parses one request line. On failure the error carries the request's `id` when it could
/// be read, so the client can still match the answer.
pub fn parse_request(line: &[u8]) -> Result<Request, (Id, OpError)> {
    match serde_json::from_slice::<Fields>(line) {
        Ok(Fields {
            v: Some(Value::Number(v)),
            id: Some(id),
            op: Some(Value::String(op)),
            params,
            unknown: false,
        }) if v.as_u64() == Some(VERSION)
            && id.is_valid()
            && matches!(params, None | Some(Value::Null | Value::Object(_))) =>
        {
            let params = match params {
                Some(p @ Value::Object(_)) => p,
                _ => Value::Object(Default::default()),
            };
            Ok(Request { id, op, params })
        }
        // Anything else is refused; the general path below says exactly why.
        _ => parse_request_slow(line),
    }
}

/// A well-formed request read in place: nothing copied out of the line. The agent serves
/// its hot operations (`ping`, `license.check`) from this without allocating; everything
/// else becomes a [`Request`] ([`RequestRef::to_request`]).
#[derive(Debug, Clone, Copy)]
pub struct RequestRef<'a> {
    /// The id exactly as sent (a string or a number).
    pub id: &'a RawValue,
    pub op: &'a str,
    /// The params object as sent; None when absent or null.
    pub params: Option<&'a RawValue>,
}

impl RequestRef<'_> {
    /// The same request as [`parse_request`] gives it.
    pub fn to_request(&self) -> Request {
        let params = match self.params {
            Some(raw) => serde_json::from_str(raw.get()).expect("checked to be a JSON object"),
            None => Value::Object(Default::default()),
        };
        Request {
            id: Id(self.id.to_owned()),
            op: self.op.to_owned(),
            params,
        }
    }
}

/// Reads a plain well-formed request in place: `v` 1, a string or number `id`, an `op`
/// without escapes, `params` an object, null or absent, no other field. None for anything
/// else, which [`parse_request`] then reads (and names what is wrong with it): the two
/// agree on every line this accepts.
pub fn parse_request_ref(line: &[u8]) -> Option<RequestRef<'_>> {
    let f: BorrowedFields = serde_json::from_slice(line).ok()?;
    if f.v != Some(VERSION) || f.unknown {
        return None;
    }
    let id = f.id?;
    if !Id::raw_is_valid(id) {
        return None;
    }
    let params = match f.params {
        None => None,
        Some(p) if p.get() == "null" => None,
        Some(p) if p.get().starts_with('{') => Some(p),
        Some(_) => return None,
    };
    Some(RequestRef {
        id,
        op: f.op?,
        params,
    })
}

/// The request fields borrowed from the line ([`parse_request_ref`]).
#[derive(Default)]
struct BorrowedFields<'a> {
    v: Option<u64>,
    id: Option<&'a RawValue>,
    op: Option<&'a str>,
    params: Option<&'a RawValue>,
    unknown: bool,
}

impl<'de> serde::Deserialize<'de> for BorrowedFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = BorrowedFields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a request object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<BorrowedFields<'de>, A::Error> {
                let mut f = BorrowedFields::default();
                // A duplicate field keeps its last value, as in [`Fields`].
                while let Some(key) = m.next_key::<Key>()? {
                    match key {
                        Key::V => f.v = Some(m.next_value()?),
                        Key::Id => f.id = Some(m.next_value()?),
                        Key::Op => f.op = Some(m.next_value()?),
                        Key::Params => f.params = Some(m.next_value()?),
                        Key::Other => {
                            f.unknown = true;
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(f)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Appends the start of a success line, up to its result (which the caller appends, then
/// [`write_ok_end`]): for answers written straight into the output buffer.
pub fn write_ok_start(out: &mut Vec<u8>, id: &RawValue) {
    out.extend_from_slice(b"{\"v\":1,\"id\":");
    out.extend_from_slice(id.get().as_bytes());
    out.extend_from_slice(b",\"ok\":true,\"result\":");
}

/// Ends a line begun with [`write_ok_start`].
pub fn write_ok_end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"}\n");
}

/// The four fields of a request as they appear on the line, read without building a map
/// of the whole object (the common case, a well-formed request, costs no key allocations).
/// A duplicate field keeps its last value, as a JSON map would.
#[derive(Default)]
struct Fields {
    v: Option<Value>,
    id: Option<Id>,
    op: Option<Value>,
    params: Option<Value>,
    unknown: bool,
}

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a request object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Fields, A::Error> {
        let mut f = Fields::default();
        while let Some(key) = m.next_key::<Key>()? {
            let slot = match key {
                Key::V => &mut f.v,
                Key::Id => {
                    f.id = Some(Id(m.next_value()?));
                    continue;
                }
                Key::Op => &mut f.op,
                Key::Params => &mut f.params,
                Key::Other => {
                    f.unknown = true;
                    m.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(m.next_value()?);
        }
        Ok(f)
    }
}

/// A request field name, matched in place.
enum Key {
    V,
    Id,
    Op,
    Params,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "v" => Key::V,
                    "id" => Key::Id,
                    "op" => Key::Op,
                    "params" => Key::Params,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Every request the fast path does not take: builds the whole object to name exactly
/// what is wrong with it.
fn parse_request_slow(line: &[u8]) -> Result<Request, (Id, OpError)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        let msg = match std::str::from_utf8(line) {
            Err(_) => "request is not valid UTF-8".to_string(),
            Ok(_) => format!("request is not valid JSON: {e}"),
        };
        (Id::null(), OpError::new(codes::PARSE_ERROR, msg))
    })?;
    let Value::Object(mut obj) = value else {
        return Err((
            Id::null(),
            OpError::new(codes::INVALID_REQUEST, "request must be a JSON object"),
        ));
    };
    let id_value = obj.remove("id").unwrap_or(Value::Null);
    // The id as sent (the line is a JSON object, so this reads it again exactly).
    let id = serde_json::from_slice::<Fields>(line)
        .ok()
        .and_then(|f| f.id)
        .unwrap_or_else(|| Id::from_value(&id_value));
    let fail = |code, msg: String| Err((id.clone(), OpError::new(code, msg)));
    if !matches!(id_value, Value::String(_) | Value::Number(_)) {
        return fail(
            codes::INVALID_REQUEST,
            "request needs an \"id\" (a string or a number) to echo back".into(),
        );
    }
    match obj.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return fail(
                codes::UNSUPPORTED_VERSION,
                format!("protocol version {v} is not supported; this agent speaks v={VERSION}"),
            )
        }
        None => {
            return fail(
                codes::INVALID_REQUEST,
                format!("request needs the protocol version, \"v\":{VERSION}"),
            )
        }
    }
    let op = match obj.remove("op") {
        Some(Value::String(s)) => s,
        _ => {
            return fail(
                codes::INVALID_REQUEST,
                "request needs an \"op\" string naming the operation".into(),
            )
        }
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => {
            return fail(
                codes::INVALID_PARAMS,
                "\"params\" must be a JSON object".into(),
            )
        }
    };
    for key in obj.keys() {
        if key != "v" {
            return fail(
                codes::INVALID_REQUEST,
                format!("unknown request field {key:?} (expected v, id, op, params)"),
            );
        }
    }
    Ok(Request { id, op, params })
}

/// Appends a success line.
pub fn write_ok(out: &mut Vec<u8>, id: &(impl Serialize + ?Sized), result: &Value) {
    out.extend_from_slice(b"{\"v\":1,\"id\":");
    serde_json::to_writer(&mut *out, id).expect("ids serialise");
    out.extend_from_slice(b",\"ok\":true,\"result\":");
    serde_json::to_writer(&mut *out, result).expect("values serialise");
    out.extend_from_slice(b"}\n");
}

/// Appends a success line whose result is already JSON text (the agent's prepared answers).
pub fn write_ok_json(out: &mut Vec<u8>, id: &(impl Serialize + ?Sized), result: &str) {
    out.extend_from_slice(b"{\"v\":1,\"id\":");
    serde_json::to_writer(&mut *out, id).expect("ids serialise");
    out.extend_from_slice(b",\"ok\":true,\"result\":");
    out.extend_from_slice(result.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends a streamed event line (for `watch`-style operations).
pub fn write_event(out: &mut Vec<u8>, id: &(impl Serialize + ?Sized), event: &Value) {
    out.extend_from_slice(b"{\"v\":1,\"id\":");
    serde_json::to_writer(&mut *out, id).expect("ids serialise");
    out.extend_from_slice(b",\"ok\":true,\"event\":");
    serde_json::to_writer(&mut *out, event).expect("values serialise");
    out.extend_from_slice(b"}\n");
}

/// Appends an error line.
pub fn write_err(out: &mut Vec<u8>, id: &(impl Serialize + ?Sized), err: &OpError) {
    out.extend_from_slice(b"{\"v\":1,\"id\":");
    serde_json::to_writer(&mut *out, id).expect("ids serialise");
    out.extend_from_slice(b",\"ok\":false,\"error\":");
    serde_json::to_writer(&mut *out, err).expect("errors serialise");
    out.extend_from_slice(b"}\n");
}

/// Typed access to a request's params: `params::<MyParams>(&call.params)`.
pub fn params<T: serde::de::DeserializeOwned>(params: &Value) -> Result<T, OpError> {
    T::deserialize(params).map_err(|e| OpError::invalid_params(format!("bad params: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_request() {
        let r = parse_request(br#"{"v":1,"id":"a","op":"ping"}"#).unwrap();
        assert_eq!(r.op, "ping");
        assert_eq!(r.id, json!("a"));
        assert_eq!(r.params, json!({}));
    }

    #[test]
    fn bad_requests_keep_the_id_when_they_can() {
        let (id, e) = parse_request(br#"{"v":2,"id":5,"op":"ping"}"#).unwrap_err();
        assert_eq!((id.get(), e.code), ("5", codes::UNSUPPORTED_VERSION));
        let (id, e) = parse_request(br#"{"v":1,"id":5}"#).unwrap_err();
        assert_eq!((id.get(), e.code), ("5", codes::INVALID_REQUEST));
        let (_, e) = parse_request(br#"{"v":1,"op":"ping"}"#).unwrap_err();
        assert_eq!(e.code, codes::INVALID_REQUEST);
        let (_, e) = parse_request(b"{nope").unwrap_err();
        assert_eq!(e.code, codes::PARSE_ERROR);
        let (_, e) = parse_request(b"\xff\xfe").unwrap_err();
        assert!(e.message.contains("UTF-8"));
        let (_, e) = parse_request(br#"[1]"#).unwrap_err();
        assert_eq!(e.code, codes::INVALID_REQUEST);
        let (_, e) = parse_request(br#"{"v":1,"id":1,"op":"ping","params":[]}"#).unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
        let (_, e) = parse_request(br#"{"v":1,"id":1,"op":"ping","extra":1}"#).unwrap_err();
        assert!(e.message.contains("extra"));
    }

    #[test]
    fn the_fast_path_and_the_general_one_agree() {
        let cases: &[&[u8]] = &[
            br#"{"v":1,"id":"a","op":"ping"}"#,
            br#"{"op":"license.check","params":{"product":"p"},"id":7,"v":1}"#,
            br#" {"v":1,"id":7,"op":"x","params":null} "#,
            br#"{"v":1,"id":7,"op":"x","params":{},"v":1}"#,
            br#"{"v":1,"id":7,"op":"x","id":8}"#,
            br#"{"v":1,"id":7,"o\u0070":"escaped key"}"#,
            br#"{"v":1.0,"id":7,"op":"x"}"#,
            br#"{"v":1,"id":null,"op":"x"}"#,
            br#"{"v":1,"id":7,"op":3}"#,
            br#"{"v":1,"id":7,"op":"x","zz":1,"aa":2}"#,
            br#"{"v":1,"id":7,"op":"x"} trailing"#,
            br#""v""#,
            b"",
        ];
        for c in cases {
            assert_eq!(
                parse_request(c),
                parse_request_slow(c),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    /// Every line read in place is the request the general path reads; lines it does not
    /// take are left to the general path.
    #[test]
    fn the_borrowed_path_agrees_with_the_general_one() {
        let taken: &[&[u8]] = &[
            br#"{"v":1,"id":"a","op":"ping"}"#,
            br#"{"op":"license.check","params":{"product":"p","feature":"f"},"id":7,"v":1}"#,
            br#" {"v":1,"id":7,"op":"x","params":null} "#,
            br#"{"v":1,"id":7,"op":"x","params":{},"v":1}"#,
            br#"{"v":1,"id":7,"op":"x","id":8}"#,
            br#"{"v":1,"id":123456789012345678901234567890,"op":"x"}"#,
            br#"{"v":1,"id":7,"o\u0070":"escaped key"}"#,
            br#"{"v":1,"id":"caf\u00e9","op":"x","params":{"a":[1,{"b":null}]}}"#,
        ];
        for c in taken {
            let r =
                parse_request_ref(c).unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(c)));
            assert_eq!(
                Ok(r.to_request()),
                parse_request(c),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
        let left: &[&[u8]] = &[
            br#"{"v":1,"id":7,"op":"p\u0069ng"}"#,
            br#"{"v":1.0,"id":7,"op":"x"}"#,
            br#"{"v":2,"id":7,"op":"x"}"#,
            br#"{"v":1,"id":null,"op":"x"}"#,
            br#"{"v":1,"id":true,"op":"x"}"#,
            br#"{"v":1,"id":7,"op":3}"#,
            br#"{"v":1,"id":7,"op":"x","params":[]}"#,
            br#"{"v":1,"id":7,"op":"x","params":"{}"}"#,
            br#"{"v":1,"id":7,"op":"x","zz":1}"#,
            br#"{"v":1,"op":"x"}"#,
            br#"{"v":1,"id":7}"#,
            br#"{"v":1,"id":7,"op":"x"} trailing"#,
            b"{nope",
            b"",
        ];
        for c in left {
            assert!(
                parse_request_ref(c).is_none(),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn ids_are_echoed_exactly_as_sent() {
        for id in [
            "123456789012345678901234567890",
            "-98765432109876543210",
            "1.50",
            "1e2",
            "\"caf\\u00e9\"",
        ] {
            let line = format!(r#"{{"v":1,"id":{id},"op":"ping"}}"#);
            let r = parse_request(line.as_bytes()).unwrap();
            let mut out = Vec::new();
            write_ok(&mut out, &r.id, &json!(true));
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.starts_with(&format!("{{\"v\":1,\"id\":{id},")),
                "{text}"
            );
            // Refused requests echo it exactly too.
            let bad = format!(r#"{{"v":2,"id":{id},"op":"ping"}}"#);
            assert_eq!(parse_request(bad.as_bytes()).unwrap_err().0.get(), id);
        }
    }

    #[test]
    fn writes_lines() {
        let mut out = Vec::new();
        write_ok(&mut out, &json!(1), &json!({"pong":true}));
        write_err(
            &mut out,
            &json!("x"),
            &OpError::new(codes::UNKNOWN_OP, "no"),
        );
        write_ok_json(&mut out, &json!(2), r#"{"pong":true}"#);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"v\":1,\"id\":1,\"ok\":true,\"result\":{\"pong\":true}}\n\
             {\"v\":1,\"id\":\"x\",\"ok\":false,\"error\":{\"code\":\"unknown_op\",\"message\":\"no\"}}\n\
             {\"v\":1,\"id\":2,\"ok\":true,\"result\":{\"pong\":true}}\n"
        );
    }
}
