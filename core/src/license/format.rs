//! The license file format (docs/license-format.md is the contract): parse, serialise, sign
//! and verify. Pure: no files, no clock.
//!
//! `kl1.<base64url(payload)>.<base64url(signature)>`, where the payload is a UTF-8 JSON
//! object and the signature is ed25519 over `"kooagent-license-v1\n" || payload`. The
//! signed bytes are the decoded payload itself, so nothing is ever re-serialised before
//! verification.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::{format_rfc3339, parse_rfc3339};

/// The envelope's prefix: format `kl`, version 1.
pub const PREFIX: &str = "kl1.";
/// Prepended to the payload bytes before signing, so a signature made for anything else
/// (another protocol using the same key) can never pass as a license signature.
pub const DOMAIN: &[u8] = b"kooagent-license-v1\n";
/// Largest license file accepted.
pub const MAX_LICENSE_BYTES: usize = 1 << 20;
pub const FORMAT_VERSION: u64 = 1;

const MAX_DEVICES: usize = 64;
const MAX_DEVICE_LEN: usize = 1024;
const MAX_NAMES: usize = 256;
const MAX_META: usize = 64;
const MAX_META_VALUE: usize = 4096;
/// Largest integer every JSON implementation represents exactly (2^53 - 1).
pub const MAX_SAFE_INT: u64 = (1 << 53) - 1;
/// Ten years: a longer grace period is certainly a mistake in the issuer.
const MAX_GRACE_SECS: u64 = 10 * 366 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the license is empty")]
    Empty,
    #[error("the license is {0} bytes; at most 1 MiB (1048576 bytes) is accepted")]
    TooLarge(usize),
    #[error("the license is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    #[error("the license is version {0:?}; this agent reads version \"kl1\"")]
    UnknownVersion(String),
    #[error("this is not a KooAgent license: it must start with \"kl1.\"")]
    NotALicense,
    #[error("the license is truncated: expected kl1.<payload>.<signature>, the signature part is missing")]
    Truncated,
    #[error("the license has {0} parts separated by '.'; expected kl1.<payload>.<signature>")]
    Parts(usize),
    #[error("the license's {part} is not valid base64url (unpadded): {detail}")]
    Base64 { part: &'static str, detail: String },
    #[error("the license's signature is {0} bytes; an ed25519 signature is 64 (truncated?)")]
    SignatureLength(usize),
    #[error("the license payload is not valid JSON: {0}")]
    Json(String),
    #[error("the license payload has the field {0:?} more than once")]
    DuplicateField(String),
    #[error("the license payload must be a JSON object")]
    NotAnObject,
    #[error("the license payload's format version is {0}; this agent reads version 1")]
    UnsupportedVersion(String),
    #[error("the license payload has an unknown field {0:?}")]
    UnknownField(String),
    #[error("the license payload lacks the required field {0:?}")]
    MissingField(&'static str),
    #[error("license field {field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field_err(field: &'static str, message: impl Into<String>) -> FormatError {
    FormatError::Field {
        field,
        message: message.into(),
    }
}

/// A license's contents, typed. Times are Unix seconds (UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct License {
    /// Key id of the key that signed it: see [`key_id`].
    pub key_id: String,
    pub id: String,
    pub product: String,
    /// The marketplace instance id (usage reports carry it).
    pub instance: String,
    /// True only for a license explicitly issued for any device.
    pub unbound: bool,
    /// Device identification codes the license is bound to (empty when unbound).
    pub devices: Vec<String>,
    pub not_before: i64,
    /// `None`: perpetual.
    pub not_after: Option<i64>,
    pub grace_secs: u64,
    pub features: Vec<String>,
    pub limits: BTreeMap<String, u64>,
    pub issued_at: i64,
    pub meta: BTreeMap<String, String>,
}

impl License {
    /// End of the grace period (`not_after + grace`), `None` when perpetual.
    pub fn grace_end(&self) -> Option<i64> {
        self.not_after
            .map(|t| t.saturating_add(self.grace_secs.min(i64::MAX as u64) as i64))
    }

    /// The file name the agent stores this license under.
    pub fn file_name(&self) -> String {
        format!("{}.lic", self.id)
    }
}

/// The payload as it is on the wire. Field order here is the order our issuer writes.
#[derive(Serialize)]
struct Wire<'a> {
    v: u64,
    kid: &'a str,
    id: &'a str,
    product: &'a str,
    instance: &'a str,
    unbound: bool,
    devices: &'a [String],
    not_before: String,
    not_after: Option<String>,
    grace_secs: u64,
    features: &'a [String],
    limits: &'a BTreeMap<String, u64>,
    issued_at: String,
    meta: &'a BTreeMap<String, String>,
}

const REQUIRED: &[&str] = &[
    "v",
    "kid",
    "id",
    "product",
    "instance",
    "devices",
    "not_before",
    "not_after",
    "issued_at",
];
const OPTIONAL: &[&str] = &["unbound", "grace_secs", "features", "limits", "meta"];

/// A parsed license: its contents plus exactly the bytes that were signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub license: License,
    /// The decoded payload (without the domain prefix).
    pub payload: Vec<u8>,
    pub signature: [u8; 64],
}

impl Parsed {
    /// Checks the signature against `key` (strict ed25519: no malleable signatures, no
    /// weak keys).
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&signed_bytes(&self.payload), &sig)
            .is_ok()
    }
}

fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + payload.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(payload);
    m
}

/// Key id: the first 8 bytes of SHA-256 of the 32-byte public key, lowercase hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Checks size and encoding of license bytes and returns the text without surrounding
/// whitespace. Shared by the parser and by the CLI (to fail before talking to the agent).
pub fn license_text(bytes: &[u8]) -> Result<&str, FormatError> {
    if bytes.len() > MAX_LICENSE_BYTES {
        return Err(FormatError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| FormatError::NotUtf8(e.valid_up_to()))?;
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        return Err(FormatError::Empty);
    }
    Ok(text)
}

/// Parses a license file's bytes (envelope and payload). Does not verify the signature:
/// that needs the trusted keys, see [`Parsed::verify`].
pub fn parse(bytes: &[u8]) -> Result<Parsed, FormatError> {
    let text = license_text(bytes)?;
    let Some(rest) = text.strip_prefix(PREFIX) else {
        // "kl2.…" is a license from a newer issuer: say so rather than "garbage".
        let head = text.split('.').next().unwrap_or("");
        if head.len() > 2
            && head.len() <= 8
            && head.starts_with("kl")
            && head[2..].bytes().all(|b| b.is_ascii_digit())
        {
            return Err(FormatError::UnknownVersion(head.to_string()));
        }
        return Err(FormatError::NotALicense);
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let (payload_b64, sig_b64) = match parts.as_slice() {
        [_] => return Err(FormatError::Truncated),
        [p, s] => (*p, *s),
        more => return Err(FormatError::Parts(more.len() + 1)),
    };
    let decode = |part: &'static str, s: &str| {
        URL_SAFE_NO_PAD.decode(s).map_err(|e| FormatError::Base64 {
            part,
            detail: e.to_string(),
        })
    };
    let payload = decode("payload", payload_b64)?;
    let sig = decode("signature", sig_b64)?;
    if payload.is_empty() {
        return Err(FormatError::Truncated);
    }
    let signature: [u8; 64] = sig
        .as_slice()
        .try_into()
        .map_err(|_| FormatError::SignatureLength(sig.len()))?;
    let license = parse_payload(&payload)?;
    Ok(Parsed {
        license,
        payload,
        signature,
    })
}

/// Parses and checks the payload JSON strictly: duplicate fields, unknown fields, wrong
/// types and out-of-range values are errors naming the field.
pub fn parse_payload(payload: &[u8]) -> Result<License, FormatError> {
    let value = strict_json(payload)?;
    let Value::Object(mut map) = value else {
        return Err(FormatError::NotAnObject);
    };
    match map.get("v") {
        None => return Err(FormatError::MissingField("v")),
        Some(Value::Number(n)) if n.as_u64() == Some(FORMAT_VERSION) => {}
        Some(other) => return Err(FormatError::UnsupportedVersion(other.to_string())),
    }
    if let Some(k) = map
        .keys()
        .find(|k| !REQUIRED.contains(&k.as_str()) && !OPTIONAL.contains(&k.as_str()))
    {
        return Err(FormatError::UnknownField(k.clone()));
    }
    if let Some(k) = REQUIRED.iter().find(|k| !map.contains_key(**k)) {
        return Err(FormatError::MissingField(k));
    }
    let license = License {
        key_id: take(&mut map, "kid")?,
        id: take(&mut map, "id")?,
        product: take(&mut map, "product")?,
        instance: take(&mut map, "instance")?,
        unbound: take_or_default(&mut map, "unbound")?,
        devices: take(&mut map, "devices")?,
        not_before: time(&take::<String>(&mut map, "not_before")?, "not_before")?,
        not_after: match take::<Option<String>>(&mut map, "not_after")? {
            None => None,
            Some(s) => Some(time(&s, "not_after")?),
        },
        grace_secs: take_or_default(&mut map, "grace_secs")?,
        features: take_or_default(&mut map, "features")?,
        limits: take_or_default(&mut map, "limits")?,
        issued_at: time(&take::<String>(&mut map, "issued_at")?, "issued_at")?,
        meta: take_or_default(&mut map, "meta")?,
    };
    check_fields(&license)?;
    Ok(license)
}

/// The rules a license's fields obey beyond their JSON types: the parser's, once it has
/// read them, and the issuer's, before it signs (so it never signs what a device would
/// refuse, without writing the payload out and parsing it back).
pub fn check_fields(l: &License) -> Result<(), FormatError> {
    if l.key_id.len() != 16
        || !l
            .key_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(field_err("kid", "must be 16 lowercase hex digits"));
    }
    check_id(&l.id)?;
    check_token("product", &l.product, 128)?;
    check_token("instance", &l.instance, 64)?;
    check_devices(l.unbound, &l.devices)?;
    // Times travel as YYYY-MM-DDTHH:MM:SSZ: one outside the years 0000..9999 would not
    // read back as itself.
    for (field, t) in [
        ("not_before", Some(l.not_before)),
        ("not_after", l.not_after),
        ("issued_at", Some(l.issued_at)),
    ] {
        if let Some(t) = t {
            if parse_rfc3339(&format_rfc3339(t)) != Some(t) {
                return Err(field_err(field, "a time outside the years 0000..9999"));
            }
        }
    }
    if let Some(na) = l.not_after {
        if na <= l.not_before {
            return Err(field_err("not_after", "must be later than not_before"));
        }
    }
    if l.grace_secs > MAX_GRACE_SECS {
        return Err(field_err(
            "grace_secs",
            format!("{} is more than ten years", l.grace_secs),
        ));
    }
    check_names("features", l.features.iter())?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = l.features.iter().find(|f| !seen.insert(f.as_str())) {
        return Err(field_err("features", format!("lists {dup:?} twice")));
    }
    check_names("limits", l.limits.keys())?;
    if let Some((k, v)) = l.limits.iter().find(|(_, v)| **v > MAX_SAFE_INT) {
        return Err(field_err(
            "limits",
            format!("{k} = {v} is above 2^53-1, the largest exact JSON integer"),
        ));
    }
    if l.meta.len() > MAX_META {
        return Err(field_err("meta", format!("more than {MAX_META} entries")));
    }
    check_names("meta", l.meta.keys())?;
    if let Some((k, _)) = l.meta.iter().find(|(_, v)| v.len() > MAX_META_VALUE) {
        return Err(field_err(
            "meta",
            format!("the value of {k:?} is longer than {MAX_META_VALUE} bytes"),
        ));
    }
    Ok(())
}

fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    name: &'static str,
) -> Result<T, FormatError> {
    let v = map.remove(name).ok_or(FormatError::MissingField(name))?;
    serde_json::from_value(v).map_err(|e| field_err(name, e.to_string()))
}

fn take_or_default<T: DeserializeOwned + Default>(
    map: &mut Map<String, Value>,
    name: &'static str,
) -> Result<T, FormatError> {
    match map.contains_key(name) {
        true => take(map, name),
        false => Ok(T::default()),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, UTC, exactly 20 characters.
pub(crate) fn time(s: &str, field: &'static str) -> Result<i64, FormatError> {
    match parse_rfc3339(s) {
        Some(t) if s.ends_with('Z') => Ok(t),
        _ => Err(field_err(
            field,
            format!("{s:?} is not a UTC time written YYYY-MM-DDTHH:MM:SSZ"),
        )),
    }
}

/// License ids become file names: a conservative alphabet, never starting with a dot.
pub(crate) fn check_id(id: &str) -> Result<(), FormatError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@+=-".contains(&b));
    if !ok {
        return Err(field_err(
            "id",
            format!("{id:?} must be 1..128 characters from A-Z a-z 0-9 . _ : @ + = - and not start with '.'"),
        ));
    }
    Ok(())
}

fn check_token(field: &'static str, s: &str, max: usize) -> Result<(), FormatError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field_err(
            field,
            format!("{s:?} must be 1..{max} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

fn check_devices(unbound: bool, devices: &[String]) -> Result<(), FormatError> {
    if unbound {
        if !devices.is_empty() {
            return Err(field_err(
                "devices",
                "an unbound license (\"unbound\": true) must have an empty device list",
            ));
        }
        return Ok(());
    }
    if devices.is_empty() {
        return Err(field_err(
            "devices",
            "is empty: bind the license to at least one device code, or mark it \"unbound\": true",
        ));
    }
    if devices.len() > MAX_DEVICES {
        return Err(field_err(
            "devices",
            format!("more than {MAX_DEVICES} device codes"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    // As buyers type them: spaces are allowed (docs/license-format.md §5); codes are
    // compared, and so told apart, in canonical form.
    for d in devices {
        let printable = d.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        if d.len() > MAX_DEVICE_LEN || !printable || d.trim().is_empty() {
            return Err(field_err(
                "devices",
                format!(
                    "{d:?} is not a device code (1..{MAX_DEVICE_LEN} printable ASCII characters)"
                ),
            ));
        }
        if !seen.insert(crate::device_code::canonical(d)) {
            return Err(field_err("devices", format!("lists {d:?} twice")));
        }
    }
    Ok(())
}

fn check_names<'a>(
    field: &'static str,
    names: impl ExactSizeIterator<Item = &'a String>,
) -> Result<(), FormatError> {
    if names.len() > MAX_NAMES {
        return Err(field_err(field, format!("more than {MAX_NAMES} entries")));
    }
    for n in names {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        if !ok {
            return Err(field_err(
                field,
                format!("{n:?} must be 1..64 characters from A-Z a-z 0-9 . _ : -"),
            ));
        }
    }
    Ok(())
}

/// JSON parsing that refuses duplicate object keys at any depth (serde_json silently keeps
/// the last one, which would let two readers of the same bytes disagree).
pub(crate) fn strict_json(bytes: &[u8]) -> Result<Value, FormatError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = StrictValue::deserialize(&mut de)
        .and_then(|v| de.end().map(|_| v))
        .map_err(|e| {
            let msg = e.to_string();
            match msg.strip_prefix(DUP_MARK) {
                Some(rest) => {
                    // "<name>\u{1}" + serde_json's " at line … column …"
                    let name = rest.split('\u{1}').next().unwrap_or("").to_string();
                    FormatError::DuplicateField(name)
                }
                None => FormatError::Json(msg),
            }
        })?;
    Ok(v.0)
}

const DUP_MARK: &str = "\u{1}duplicate field:";

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(StrictValue(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format!("{DUP_MARK}{k}\u{1}")));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// The payload bytes our issuer writes for `license`: compact JSON, fields in a fixed
/// order, maps sorted by key. Checked with the parser's own rules ([`check_fields`]), so
/// we never sign what we would refuse to read.
pub fn payload_bytes(license: &License) -> Result<Vec<u8>, FormatError> {
    check_fields(license)?;
    wire_bytes(license)
}

/// [`payload_bytes`] without the check. In debug builds (every test) it also parses what
/// it wrote back and asserts it reads as `license`: the writer and the parser agree.
fn wire_bytes(license: &License) -> Result<Vec<u8>, FormatError> {
    let wire = Wire {
        v: FORMAT_VERSION,
        kid: &license.key_id,
        id: &license.id,
        product: &license.product,
        instance: &license.instance,
        unbound: license.unbound,
        devices: &license.devices,
        not_before: format_rfc3339(license.not_before),
        not_after: license.not_after.map(format_rfc3339),
        grace_secs: license.grace_secs,
        features: &license.features,
        limits: &license.limits,
        issued_at: format_rfc3339(license.issued_at),
        meta: &license.meta,
    };
    let bytes = serde_json::to_vec(&wire).map_err(|e| FormatError::Json(e.to_string()))?;
    #[cfg(debug_assertions)]
    if check_fields(license).is_ok() {
        assert_eq!(
            parse_payload(&bytes).as_ref(),
            Ok(license),
            "the payload reads back"
        );
    }
    Ok(bytes)
}

/// Signs `license` with `key` (its `key_id` is set from the key) and returns the license
/// text, `kl1.<payload>.<signature>` followed by a newline. Deterministic: ed25519
/// signatures do not use randomness, so the same inputs give the same bytes.
pub fn sign(license: &License, key: &SigningKey) -> Result<String, FormatError> {
    let mut license = license.clone();
    license.key_id = key_id(&key.verifying_key());
    let payload = payload_bytes(&license)?;
    Ok(signed_text(&payload, key))
}

/// [`sign`] for a license that passed [`check_fields`] with another `key_id` (the issuer
/// checks it with a placeholder): the id [`key_id`] makes is always valid, so the fields
/// are not checked a second time (the seller server signs one license per order).
pub(crate) fn sign_checked(mut license: License, key: &SigningKey) -> Result<String, FormatError> {
    license.key_id = key_id(&key.verifying_key());
    let payload = wire_bytes(&license)?;
    Ok(signed_text(&payload, key))
}

fn signed_text(payload: &[u8], key: &SigningKey) -> String {
    let sig = key.sign(&signed_bytes(payload));
    format!(
        "{PREFIX}{}.{}\n",
        URL_SAFE_NO_PAD.encode(payload),
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample, test_key};

    fn envelope(payload: &[u8], key: &SigningKey) -> String {
        let sig = key.sign(&signed_bytes(payload));
        format!(
            "kl1.{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        )
    }

    #[test]
    fn round_trip_and_verify() {
        let key = test_key(7);
        let text = sign(&sample(), &key).unwrap();
        let p = parse(text.as_bytes()).unwrap();
        let mut expect = sample();
        expect.key_id = key_id(&key.verifying_key());
        assert_eq!(p.license, expect);
        assert!(p.verify(&key.verifying_key()));
        assert!(!p.verify(&test_key(8).verifying_key()));
    }

    #[test]
    fn sign_checked_gives_the_bytes_sign_gives() {
        let key = test_key(7);
        let mut lic = sample();
        lic.key_id = "0000000000000000".into();
        assert_eq!(
            sign_checked(lic.clone(), &key).unwrap(),
            sign(&lic, &key).unwrap()
        );
    }

    #[test]
    fn signing_is_byte_exact_and_deterministic() {
        let key = test_key(7);
        let a = sign(&sample(), &key).unwrap();
        let b = sign(&sample(), &key).unwrap();
        assert_eq!(a, b);
        let p = parse(a.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(p.payload).unwrap(),
            format!(
                "{{\"v\":1,\"kid\":\"{}\",\"id\":\"L-1\",\"product\":\"sku-pro\",\"instance\":\"inst-1\",\
                 \"unbound\":false,\"devices\":[\"AAAA-BBBB-CCCC-DDDD-EEEE\"],\
                 \"not_before\":\"2027-01-15T08:00:00Z\",\"not_after\":\"2027-02-14T08:00:00Z\",\
                 \"grace_secs\":604800,\"features\":[\"export\",\"sso\"],\
                 \"limits\":{{\"cores\":8,\"users\":100}},\"issued_at\":\"2027-01-15T07:43:20Z\",\
                 \"meta\":{{\"order\":\"CS123\"}}}}",
                key_id(&key.verifying_key())
            )
        );
    }

    #[test]
    fn key_id_is_sha256_prefix() {
        // RFC 8032 test 1 public key.
        let pk: [u8; 32] = [
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ];
        let k = VerifyingKey::from_bytes(&pk).unwrap();
        assert_eq!(key_id(&k), hex(&Sha256::digest(pk)[..8]));
        assert_eq!(key_id(&k).len(), 16);
    }

    #[test]
    fn whitespace_around_is_ignored_and_other_orders_verify() {
        let key = test_key(3);
        // Another issuer: different field order, whitespace, perpetual, unbound.
        let payload = format!(
            "{{ \"issued_at\": \"2026-01-01T00:00:00Z\", \"v\": 1, \"id\": \"x\", \"kid\": \"{}\",\n\
             \"product\": \"p\", \"instance\": \"i\", \"unbound\": true, \"devices\": [],\n\
             \"not_before\": \"2026-01-01T00:00:00Z\", \"not_after\": null }}",
            key_id(&key.verifying_key())
        );
        let text = format!("\n  {}\r\n", envelope(payload.as_bytes(), &key));
        let p = parse(text.as_bytes()).unwrap();
        assert!(p.verify(&key.verifying_key()));
        assert!(p.license.unbound && p.license.not_after.is_none());
        assert_eq!(p.license.grace_secs, 0);
        assert!(p.license.features.is_empty() && p.license.meta.is_empty());
    }

    fn payload_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
        let mut l = sample();
        l.key_id = "0123456789abcdef".into();
        let mut v: Value = serde_json::from_slice(&payload_bytes(&l).unwrap()).unwrap();
        edit(v.as_object_mut().unwrap());
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn bad_envelopes_are_named() {
        let key = test_key(1);
        let good = sign(&sample(), &key).unwrap();
        let cases: Vec<(Vec<u8>, FormatError)> = vec![
            (b"".to_vec(), FormatError::Empty),
            (b" \n".to_vec(), FormatError::Empty),
            (
                vec![b'k'; MAX_LICENSE_BYTES + 1],
                FormatError::TooLarge(MAX_LICENSE_BYTES + 1),
            ),
            (b"kl1.\xff\xfe".to_vec(), FormatError::NotUtf8(4)),
            (
                b"kl2.abc.def".to_vec(),
                FormatError::UnknownVersion("kl2".into()),
            ),
            (b"-----BEGIN".to_vec(), FormatError::NotALicense),
            (
                good.as_bytes()[..good.find('.').unwrap() + 10].to_vec(),
                FormatError::Truncated,
            ),
            (
                format!("{}.x", good.trim()).into_bytes(),
                FormatError::Parts(4),
            ),
            (
                good.as_bytes()[..good.len() - 3].to_vec(),
                FormatError::SignatureLength(63),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(&input).unwrap_err(),
                want,
                "{:?}",
                String::from_utf8_lossy(&input[..input.len().min(40)])
            );
        }
        let e = parse(b"kl1.@@@@.AAAA").unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Base64 {
                    part: "payload",
                    ..
                }
            ),
            "{e}"
        );
        let padded = good.trim().to_string() + "==";
        let e = parse(padded.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                FormatError::Base64 {
                    part: "signature",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_payloads_are_named() {
        let key = test_key(1);
        let check = |payload: &[u8]| parse(envelope(payload, &key).as_bytes()).unwrap_err();
        assert!(matches!(check(b"{nope"), FormatError::Json(_)));
        assert_eq!(check(b"[1,2]"), FormatError::NotAnObject);
        assert_eq!(
            check(br#"{"v":1,"v":1}"#),
            FormatError::DuplicateField("v".into())
        );
        // A duplicate deep inside is caught too.
        let mut dup = payload_with(|_| {});
        let s = String::from_utf8(dup.clone())
            .unwrap()
            .replace("\"cores\":8", "\"cores\":8,\"cores\":9999");
        dup = s.into_bytes();
        assert_eq!(check(&dup), FormatError::DuplicateField("cores".into()));
        assert_eq!(
            check(&payload_with(|m| {
                m.insert("v".into(), 2.into());
            })),
            FormatError::UnsupportedVersion("2".into())
        );
        assert_eq!(
            check(&payload_with(|m| {
                m.insert("extra".into(), 1.into());
            })),
            FormatError::UnknownField("extra".into())
        );
        assert_eq!(
            check(&payload_with(|m| {
                m.remove("not_after");
            })),
            FormatError::MissingField("not_after")
        );
        let field = |e: FormatError| match e {
            FormatError::Field { field, .. } => field,
            other => panic!("not a field error: {other}"),
        };
        let cases: Vec<(&str, Value, &str)> = vec![
            ("kid", "ABC".into(), "kid"),
            ("id", ".hidden".into(), "id"),
            ("id", "a/b".into(), "id"),
            ("product", "".into(), "product"),
            ("devices", serde_json::json!([]), "devices"),
            ("devices", serde_json::json!(["A", "A"]), "devices"),
            ("devices", serde_json::json!([1]), "devices"),
            ("not_before", "2027-01-15 08:00:00".into(), "not_before"),
            ("not_after", "2020-01-01T00:00:00Z".into(), "not_after"),
            ("grace_secs", (-1).into(), "grace_secs"),
            ("grace_secs", "7d".into(), "grace_secs"),
            ("features", serde_json::json!(["a b"]), "features"),
            ("features", serde_json::json!(["a", "a"]), "features"),
            ("limits", serde_json::json!({"cores": 1.5}), "limits"),
            (
                "limits",
                serde_json::json!({"cores": 9007199254740992u64}),
                "limits",
            ),
            ("meta", serde_json::json!({"k": 1}), "meta"),
            ("issued_at", Value::Null, "issued_at"),
        ];
        for (k, v, want) in cases {
            let e = check(&payload_with(|m| {
                m.insert(k.into(), v.clone());
            }));
            assert_eq!(field(e.clone()), want, "{k}={v}: {e}");
        }
        // Unbound must be explicit and then carry no devices.
        let e = check(&payload_with(|m| {
            m.insert("unbound".into(), true.into());
        }));
        assert_eq!(field(e), "devices");
    }

    #[test]
    fn errors_read_well() {
        let e = FormatError::DuplicateField("devices".into()).to_string();
        assert!(e.contains("\"devices\" more than once"), "{e}");
        assert!(FormatError::TooLarge(2 << 20).to_string().contains("1 MiB"));
    }
}
