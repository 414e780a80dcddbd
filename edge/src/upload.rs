//! Delivery of closed hours to the marketplace's usage-data API (koogallery.md §1.1):
//! HTTPS with web PKI roots (plus an optional extra CA), verification always on,
//! `HTTPS_PROXY` honoured, every request bounded in time, at most 1000 records each,
//! the next configured host tried when one cannot be reached, 413 answered by splitting,
//! other refusals parked with the upstream's reason.

use std::path::Path;
use std::time::Duration;

use kooagent_core::clock::Clock;
use kooagent_core::usage::hours::HourRecord;
use kooagent_core::usage::sign;

use crate::secret::Secret;

/// The API's path, appended to each configured base URL.
pub const PATH: &str = "/api/mkp-openapi-public/global/v1/isv/usage-data";
/// The usage-data API's hosts, the documented one first.
pub const DEFAULT_UPSTREAMS: &[&str] = &[
    "https://mkt.myhuaweicloud.com",
    // The documented fallback when the first host cannot be reached.
    "https://mkt.myhuaweicloud.cn",
];
/// The marketplace's limit per request.
pub const MAX_RECORDS: usize = 1000;
/// How much of an upstream's answer is kept as a reason.
const REASON_CHARS: usize = 300;

pub struct Client {
    agent: ureq::Agent,
    upstreams: Vec<String>,
    /// Told the `Date` of every answer: a certificate-checked upstream's clock is a
    /// trustworthy time for the clock-rollback guard.
    on_date: Option<Box<dyn Fn(i64) + Send + Sync>>,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        upstream: String,
        http: u16,
    },
    /// 413: the batch was too large for the upstream.
    TooLarge {
        upstream: String,
    },
    /// Worth retrying later: no upstream reachable, 408/429/5xx, a temporary error code.
    Transient(String),
    /// Refused for a reason retrying will not fix (kept with the record).
    Rejected(String),
}

impl Client {
    pub fn new(
        upstreams: Vec<String>,
        extra_ca: Option<&Path>,
        timeout: Duration,
    ) -> Result<Client, String> {
        Ok(Client {
            agent: crate::https::agent(extra_ca, "usage.extra_ca_file", timeout)?,
            upstreams,
            on_date: None,
        })
    }

    /// Calls `f` with the time in each answer's `Date` header.
    pub fn with_date_observer(mut self, f: impl Fn(i64) + Send + Sync + 'static) -> Client {
        self.on_date = Some(Box::new(f));
        self
    }

    pub fn upstreams(&self) -> &[String] {
        &self.upstreams
    }

    /// Sends `body` to the first upstream that can be reached, starting at `first`.
    /// Returns the outcome and the index of the upstream that answered (or `first`).
    pub fn send(
        &self,
        body: &[u8],
        key: &Secret,
        clock: &dyn Clock,
        first: usize,
    ) -> (Outcome, usize) {
        let n = self.upstreams.len();
        let mut unreachable = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let base = &self.upstreams[idx];
            match self.post(base, body, key, clock) {
                Ok((status, text)) => return (classify(base, status, &text), idx),
                Err(e) => {
                    log::info!("usage upload: {base} cannot be reached: {e}");
                    unreachable.push(format!("{base}: {e}"));
                }
            }
        }
        (
            Outcome::Transient(format!(
                "no upstream reachable ({})",
                unreachable.join("; ")
            )),
            first,
        )
    }

    fn post(
        &self,
        base: &str,
        body: &[u8],
        key: &Secret,
        clock: &dyn Clock,
    ) -> Result<(u16, String), String> {
        let url = format!("{}{PATH}", base.trim_end_matches('/'));
        let ts = clock.now_ms().to_string();
        let nonce =
            crate::random::hex_nonce().map_err(|e| format!("no secure random source: {e}"))?;
        let signature = sign::sign(key.expose(), &ts, &nonce, body);
        let mut resp = self
            .agent
            .post(&url)
            .header("signature", &signature)
            .header("ts", &ts)
            .header("nonce", &nonce)
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        if let Some(on_date) = &self.on_date {
            let date = resp.headers().get("date").and_then(|d| d.to_str().ok());
            if let Some(t) = date.and_then(kooagent_core::clock::parse_http_date) {
                on_date(t);
            }
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        Ok((status, text))
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= REASON_CHARS {
        s.to_string()
    } else {
        s.chars().take(REASON_CHARS).collect::<String>() + "…"
    }
}

/// What an answer means. **[UNCONFIRMED]** (koogallery.md §1.1/§8 item 2): the API's
/// answer format is not documented where we could read it. Sibling open APIs answer HTTP
/// 200 with `{"error_code": "...", "error_msg": "..."}`, `92020000` = success,
/// `92020001` = internal error, anything else a refusal; we read it that way, and a 2xx
/// without an `error_code` as success. Remember that success here is not proof of
/// billing: the marketplace validates records later.
pub fn classify(upstream: &str, status: u16, body: &str) -> Outcome {
    match status {
        200..=299 => {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let code = match &v["error_code"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            match code.as_deref() {
                None | Some("92020000") | Some("MKT.0000") | Some("0") => Outcome::Delivered {
                    upstream: upstream.to_string(),
                    http: status,
                },
                Some("92020001") => Outcome::Transient(format!(
                    "HTTP {status} error_code 92020001: {}",
                    snippet(v["error_msg"].as_str().unwrap_or(""))
                )),
                Some(c) => Outcome::Rejected(format!(
                    "HTTP {status} error_code {c}: {}",
                    snippet(v["error_msg"].as_str().unwrap_or(body))
                )),
            }
        }
        413 => Outcome::TooLarge {
            upstream: upstream.to_string(),
        },
        408 | 425 | 429 | 500..=599 => {
            Outcome::Transient(format!("HTTP {status} from {upstream}: {}", snippet(body)))
        }
        _ => Outcome::Rejected(format!("HTTP {status} from {upstream}: {}", snippet(body))),
    }
}

/// What one delivery round achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Round {
    pub requests: u64,
    pub delivered: u64,
    pub parked: u64,
    /// Records the seller's relay took into its outbox (relay mode).
    pub relayed: u64,
    /// Why the round stopped early (retry later), if it did.
    pub transient: Option<String>,
    /// The upstream that answered last.
    pub upstream: Option<String>,
}

/// Where delivery outcomes are kept: the agent's ledger (direct mode) or the seller
/// server's outbox (relay mode). One delivery loop serves both, so 413 splitting,
/// parking and host preference behave the same on either side.
pub trait Sink {
    type Error;
    /// Up to `limit` records waiting for delivery, oldest first.
    fn pending(&self, limit: usize) -> Result<Vec<HourRecord>, Self::Error>;
    fn delivered(
        &self,
        sns: Vec<String>,
        at: i64,
        upstream: &str,
        http: u16,
    ) -> Result<(), Self::Error>;
    fn parked(&self, sns: Vec<String>, at: i64, reason: String) -> Result<(), Self::Error>;
}

/// Delivers pending records, oldest first, until none are left or an attempt fails in a
/// way worth retrying later.
pub fn deliver<S: Sink + ?Sized>(
    sink: &S,
    client: &Client,
    key: &Secret,
    clock: &dyn Clock,
    batch: usize,
) -> Result<Round, S::Error> {
    let mut round = Round::default();
    let mut preferred = 0;
    loop {
        let pending = sink.pending(batch.clamp(1, MAX_RECORDS))?;
        if pending.is_empty() {
            return Ok(round);
        }
        let refs: Vec<&HourRecord> = pending.iter().collect();
        if !send_records(sink, client, key, clock, &refs, &mut preferred, &mut round)? {
            return Ok(round);
        }
    }
}

/// Sends `records` (splitting on 413); false when a transient failure ended the round.
fn send_records<S: Sink + ?Sized>(
    sink: &S,
    client: &Client,
    key: &Secret,
    clock: &dyn Clock,
    records: &[&HourRecord],
    preferred: &mut usize,
    round: &mut Round,
) -> Result<bool, S::Error> {
    let body = sign::encode_body(records);
    let (outcome, idx) = client.send(&body, key, clock, *preferred);
    round.requests += 1;
    let sns = || records.iter().map(|r| r.sn.clone()).collect::<Vec<_>>();
    let now = clock.now_secs();
    match outcome {
        Outcome::Delivered { upstream, http } => {
            // Stay with the host that answered for the rest of this round.
            *preferred = idx;
            sink.delivered(sns(), now, &upstream, http)?;
            round.delivered += records.len() as u64;
            round.upstream = Some(upstream);
            Ok(true)
        }
        Outcome::TooLarge { upstream } => {
            *preferred = idx;
            round.upstream = Some(upstream.clone());
            if records.len() == 1 {
                let reason = format!("HTTP 413 from {upstream} for a single record");
                sink.parked(sns(), now, reason)?;
                round.parked += 1;
                return Ok(true);
            }
            let (a, b) = records.split_at(records.len() / 2);
            log::info!(
                "usage upload: {upstream} answered 413 for {} records; sending {} and {}",
                records.len(),
                a.len(),
                b.len()
            );
            Ok(send_records(sink, client, key, clock, a, preferred, round)?
                && send_records(sink, client, key, clock, b, preferred, round)?)
        }
        Outcome::Rejected(reason) => {
            *preferred = idx;
            log::warn!("usage upload: {} records parked: {reason}", records.len());
            sink.parked(sns(), now, reason)?;
            round.parked += records.len() as u64;
            Ok(true)
        }
        Outcome::Transient(reason) => {
            log::info!("usage upload: will retry: {reason}");
            round.transient = Some(reason);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        let d = |s, b| classify("u", s, b);
        assert!(matches!(d(200, ""), Outcome::Delivered { http: 200, .. }));
        assert!(matches!(
            d(200, r#"{"error_code":"92020000","error_msg":"success"}"#),
            Outcome::Delivered { .. }
        ));
        assert!(matches!(
            d(200, r#"{"error_code":"92020001","error_msg":"internal"}"#),
            Outcome::Transient(_)
        ));
        match d(
            200,
            r#"{"error_code":"92020002","error_msg":"invalid param"}"#,
        ) {
            Outcome::Rejected(r) => assert!(r.contains("invalid param"), "{r}"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(d(413, ""), Outcome::TooLarge { .. }));
        assert!(matches!(d(429, ""), Outcome::Transient(_)));
        assert!(matches!(d(503, ""), Outcome::Transient(_)));
        match d(400, &"x".repeat(1000)) {
            Outcome::Rejected(r) => assert!(r.len() < 400 && r.starts_with("HTTP 400")),
            o => panic!("{o:?}"),
        }
    }
}
