//! `kooagent seller call`: one signed call to a seller server, as the marketplace makes it,
//! so a seller can try their server before KooGallery does. The signatures come from
//! `auth.rs`, the module the server verifies with: the two can only disagree where the
//! marketplace's own documentation does.

use std::time::Duration;

use serde_json::{Map, Value};

use super::auth;

/// Which of the marketplace's two signature styles (koogallery.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// §4.1: JSON POST, `signature`, `timestamp` (Unix ms), `nonce` in the query.
    V2,
    /// §4.2: GET with every field, `timeStamp` (`yyyyMMddHHmmssSSS`) and `authToken` in
    /// the query.
    Legacy,
}

/// A call before it is signed.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// The product's production URL (`https://host:port/koogallery/sku-pro`).
    pub url: String,
    pub activity: String,
    /// Body fields besides `activity`, in the order given.
    pub fields: Vec<(String, String)>,
    pub style: Style,
}

/// A signed request, ready to send and to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub method: &'static str,
    pub url: String,
    pub body: Option<String>,
}

/// What the server answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body_sign: Option<String>,
    pub body: String,
}

impl Answer {
    /// Whether `Body-Sign` is exactly what the server's own signer makes of the body.
    pub fn body_sign_verifies(&self, key: &[u8]) -> bool {
        self.body_sign.as_deref() == Some(auth::body_sign(key, self.body.as_bytes()).as_str())
    }

    /// The answer's `resultCode`, when the body is a JSON object that has one.
    pub fn result_code(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.body).ok()?;
        v["resultCode"].as_str().map(str::to_string)
    }
}

/// Percent-encodes a query value (unreserved characters stay).
fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `yyyyMMddHHmmssSSS`, UTC.
fn legacy_time(now_ms: i64) -> String {
    let c = kooagent_core::clock::Civil::from_unix(now_ms.div_euclid(1000));
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}{:03}",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        now_ms.rem_euclid(1000)
    )
}

/// Signs `spec` with `key` at `now_ms`; `nonce` is used by the §4.1 style only.
pub fn prepare(key: &[u8], spec: &CallSpec, now_ms: i64, nonce: &str) -> Prepared {
    let sep = if spec.url.contains('?') { '&' } else { '?' };
    match spec.style {
        Style::V2 => {
            let mut body = Map::new();
            body.insert("activity".into(), Value::String(spec.activity.clone()));
            for (k, v) in &spec.fields {
                body.insert(k.clone(), Value::String(v.clone()));
            }
            let body = Value::Object(body).to_string();
            let timestamp = now_ms.to_string();
            let signature = auth::request_signature(key, nonce, &timestamp, body.as_bytes());
            Prepared {
                method: "POST",
                url: format!(
                    "{}{sep}signature={signature}&timestamp={timestamp}&nonce={}",
                    spec.url,
                    pct(nonce)
                ),
                body: Some(body),
            }
        }
        Style::Legacy => {
            let mut params = vec![("activity".to_string(), spec.activity.clone())];
            params.extend(spec.fields.iter().cloned());
            params.push(("timeStamp".into(), legacy_time(now_ms)));
            let token = auth::legacy_token(key, &params);
            params.push(("authToken".into(), token));
            let query = params
                .iter()
                .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
                .collect::<Vec<_>>()
                .join("&");
            Prepared {
                method: "GET",
                url: format!("{}{sep}{query}", spec.url),
                body: None,
            }
        }
    }
}

/// Sends a prepared request (HTTPS with the web PKI roots plus `extra_ca`).
pub fn send(
    p: &Prepared,
    extra_ca: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<Answer, String> {
    let agent = kooagent_edge::https::agent(extra_ca, "--ca", timeout)?;
    let resp = match &p.body {
        Some(body) => agent
            .post(&p.url)
            .header("Content-Type", "application/json;charset=utf8")
            .header("Accept", "application/json")
            .send(body.as_bytes()),
        None => agent
            .get(&p.url)
            .header("Accept", "application/json")
            .call(),
    };
    let mut resp = resp.map_err(|e| format!("{} {}: {e}", p.method, p.url))?;
    let status = resp.status().as_u16();
    let body_sign = resp
        .headers()
        .get("Body-Sign")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .body_mut()
        .with_config()
        .limit(4 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(Answer {
        status,
        body_sign,
        body,
    })
}

/// A random nonce: 32 hex digits.
pub fn nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the OS random source");
    kooagent_core::license::format::hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"interconnection-key";

    fn spec(style: Style) -> CallSpec {
        CallSpec {
            url: "https://127.0.0.1:8443/koogallery/sku-pro".into(),
            activity: "getLicense".into(),
            fields: vec![
                ("instanceId".into(), "i-1".into()),
                ("effectiveTime".into(), "2026-11-30 09:00:00 z".into()),
            ],
            style,
        }
    }

    /// The server's own checks accept what `prepare` makes.
    #[test]
    fn v2_requests_verify_with_the_servers_check() {
        let now = 1_780_000_000_123;
        let p = prepare(KEY, &spec(Style::V2), now, "n0nce");
        assert_eq!(p.method, "POST");
        let body = p.body.clone().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["activity"],
            "getLicense"
        );
        let query = p.url.split_once('?').unwrap().1;
        let params = auth::Params::from_query(Some(query));
        assert_eq!(
            auth::verify(KEY, &params, body.as_bytes(), now, 60),
            Ok("n0nce".into())
        );
        assert!(auth::verify(b"other key", &params, body.as_bytes(), now, 60).is_err());
    }

    #[test]
    fn legacy_requests_verify_with_the_servers_check() {
        let now = 1_780_000_000_123;
        let p = prepare(KEY, &spec(Style::Legacy), now, "unused");
        assert_eq!((p.method, p.body.as_deref()), ("GET", None));
        let query = p.url.split_once('?').unwrap().1;
        assert!(
            query.contains("effectiveTime=2026-11-30%2009%3A00%3A00%20z"),
            "{query}"
        );
        let pairs = auth::query_pairs(Some(query));
        assert!(auth::legacy_verify(KEY, &pairs, now, 60).is_ok());
        assert!(auth::legacy_verify(b"other key", &pairs, now, 60).is_err());
        assert_eq!(legacy_time(now), "20260528202640123");
    }

    #[test]
    fn body_sign_is_checked_against_the_body() {
        let body = r#"{"resultCode":"000000","resultMsg":"success"}"#;
        let mut a = Answer {
            status: 200,
            body_sign: Some(auth::body_sign(KEY, body.as_bytes())),
            body: body.into(),
        };
        assert!(a.body_sign_verifies(KEY));
        assert_eq!(a.result_code().as_deref(), Some("000000"));
        assert!(!a.body_sign_verifies(b"other key"));
        a.body.push(' ');
        assert!(!a.body_sign_verifies(KEY));
        a.body_sign = None;
        assert!(!a.body_sign_verifies(KEY));
    }
}
