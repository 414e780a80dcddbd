//! The usage relay (issue 19, docs/usage.md "Relay mode"): devices post their closed hourly
//! records to `POST /v1/usage/records` signed with their device key; this server checks
//! them, holds them in its outbox (`db::usage`) and uploads them to the marketplace's
//! usage-data API signed with the interconnection key, which never leaves this server.
//!
//! - [`store`]: the per-request decision, in one database transaction: nonce, known
//!   device, every record's instance bound to that device, meter allowed for the
//!   instance's product, resends answered from the stored row. Any refusal stores nothing.
//! - requests per device key: a token bucket in the database (`limits`), shared by every
//!   server process.
//! - [`worker`]: the delivery thread: claims due rows, uploads them with the agent's own
//!   delivery code (`usage::upload`: fallback host, 413 splitting, parking on refusals),
//!   backs off on transient failures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::db::usage::{OutboxRow, OutboxState};
use super::db::{Db, DbError, Tx};
use super::limits::{self, Rate};
use kooagent_core::clock::Clock;
use kooagent_core::usage::hours::HourRecord;
use kooagent_core::usage::relay::{self, codes, RecordResult};
use kooagent_edge::secret::Secret;
use kooagent_edge::upload::{self, Client, Sink, MAX_RECORDS};

/// `[seller_server.usage]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageRelayConfig {
    /// The usage-data API's hosts in the order tried (the second is the documented
    /// fallback domain).
    pub upstreams: Vec<String>,
    /// A CA (PEM) trusted for those hosts besides the web PKI; empty: none.
    pub extra_ca_file: PathBuf,
    pub upload_timeout_secs: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Records per upload (the marketplace takes at most 1000).
    pub batch_size: usize,
    /// Records whose hour is older than this are refused (the device's own bound).
    pub max_age_days: u64,
    /// Requests per second one device key may make, sustained, and the burst above it.
    pub device_rate_per_sec: f64,
    pub device_burst: u32,
    /// License product → the meter names its instances may bill. A product not listed
    /// may bill any meter name.
    pub meters: BTreeMap<String, Vec<String>>,
}

impl Default for UsageRelayConfig {
    fn default() -> Self {
        UsageRelayConfig {
            upstreams: kooagent_edge::upload::DEFAULT_UPSTREAMS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            extra_ca_file: PathBuf::new(),
            upload_timeout_secs: 30,
            backoff_initial_ms: 5_000,
            backoff_max_ms: 900_000,
            batch_size: MAX_RECORDS,
            max_age_days: 35,
            device_rate_per_sec: 1.0,
            device_burst: 30,
            meters: BTreeMap::new(),
        }
    }
}

impl UsageRelayConfig {
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        let bad = |k: &str, m: &str| {
            Err(super::ConfigError {
                key: format!("seller_server.usage.{k}"),
                message: m.to_string(),
            })
        };
        if self.upstreams.is_empty() || self.upstreams.iter().any(|u| !u.starts_with("https://")) {
            return bad("upstreams", "give at least one https:// URL, https:// only");
        }
        if !self.extra_ca_file.as_os_str().is_empty() && !self.extra_ca_file.is_absolute() {
            return bad("extra_ca_file", "must be an absolute path");
        }
        if !(1..=600).contains(&self.upload_timeout_secs) {
            return bad("upload_timeout_secs", "must be between 1 and 600");
        }
        if self.backoff_initial_ms == 0 || self.backoff_max_ms < self.backoff_initial_ms {
            return bad(
                "backoff_initial_ms",
                "must be at least 1 and at most backoff_max_ms",
            );
        }
        if !(1..=MAX_RECORDS).contains(&self.batch_size) {
            return bad("batch_size", "must be between 1 and 1000");
        }
        if !(1..=3650).contains(&self.max_age_days) {
            return bad("max_age_days", "must be between 1 and 3650");
        }
        if !(self.device_rate_per_sec > 0.0 && self.device_rate_per_sec.is_finite())
            || self.device_burst == 0
        {
            return bad(
                "device_rate_per_sec",
                "rate and device_burst must be positive",
            );
        }
        for (product, meters) in &self.meters {
            if let Some(m) = meters
                .iter()
                .find(|m| !kooagent_core::usage::names::valid_meter_name(m))
            {
                return bad(
                    &format!("meters.{product}"),
                    &format!("{m:?} is not a meter name (letters, digits, _ - . :)"),
                );
            }
        }
        Ok(())
    }

    fn extra_ca(&self) -> Option<&std::path::Path> {
        (!self.extra_ca_file.as_os_str().is_empty()).then_some(self.extra_ca_file.as_path())
    }
}

/// The relay's state in the server.
pub struct UsageRelay {
    pub cfg: UsageRelayConfig,
    /// Device keys decompressed once, not per request.
    pub keys: super::key_cache::KeyCache,
    /// Device signatures of concurrent requests checked together.
    pub signatures: super::sig_batch::BatchVerifier,
    wake: Mutex<Option<mpsc::Sender<()>>>,
}

impl UsageRelay {
    pub fn new(cfg: &UsageRelayConfig) -> UsageRelay {
        UsageRelay {
            cfg: cfg.clone(),
            keys: Default::default(),
            signatures: Default::default(),
            wake: Mutex::new(None),
        }
    }

    /// The requests one device key may make: a token bucket in the database (`limits`),
    /// so every server process draws from the same one.
    pub fn device_rate(&self) -> Rate {
        Rate::new(
            self.cfg.device_burst,
            (self.cfg.device_rate_per_sec * 60.0)
                .round()
                .clamp(1.0, u32::MAX as f64) as u32,
        )
    }

    /// Tells the delivery worker new records are due.
    pub fn wake(&self) {
        if let Some(w) = self.wake.lock().expect("wake lock").as_ref() {
            let _ = w.send(());
        }
    }
}

/// What [`store`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every record is held: its state.
    Held(Vec<RecordResult>),
    /// Over the device's rate: retry after this many seconds. Nothing stored.
    Limited(u64),
    Refused {
        http: u16,
        code: &'static str,
        msg: String,
        sn: Option<String>,
    },
}

fn refused(http: u16, code: &'static str, msg: String, sn: Option<&str>) -> Decision {
    Decision::Refused {
        http,
        code,
        msg,
        sn: sn.map(str::to_string),
    }
}

/// The nonces table is shared with the marketplace's and the authorization-code relay's.
fn nonce_key(nonce: &str) -> String {
    format!("usage:{nonce}")
}

fn result_of(row: &OutboxRow) -> RecordResult {
    RecordResult {
        metering_sn: row.rec.sn.clone(),
        state: row.state.name().to_string(),
        reason: match &row.state {
            OutboxState::Parked { reason, .. } => Some(reason.clone()),
            _ => None,
        },
    }
}

/// Decides one request in a transaction and stores what it accepts. Checks, in order: the
/// device key's rate (`rate`, a bucket in the database); the nonce; the device key is known; each record's instance is bound to this device and
/// its meter allowed for the instance's product; a `metering_sn` already held must hold
/// the same record from the same device. Nothing is written when anything is refused.
pub fn store(
    tx: &mut dyn Tx,
    device_key: &str,
    nonce: &str,
    records: &[HourRecord],
    meters: &BTreeMap<String, Vec<String>>,
    rate: Rate,
    now_ms: i64,
) -> Result<Decision, DbError> {
    let now = now_ms.div_euclid(1000);
    if limits::take_all(tx, &[(format!("usage:{device_key}"), rate)], now_ms)?.is_some() {
        // A whole token comes back in 60 / per_minute seconds.
        let secs = (60 + rate.per_minute as u64 - 1) / rate.per_minute.max(1) as u64;
        return Ok(Decision::Limited(secs.max(1)));
    }
    if !tx.nonce_fresh(&nonce_key(nonce), now)? {
        let m = "x-kooagent-nonce was already used (replayed request)".to_string();
        return Ok(refused(401, codes::UNAUTHENTICATED, m, None));
    }
    let bound: HashMap<String, String> =
        tx.usage().usage_billable(device_key)?.into_iter().collect();
    // A key bound to an instance is known: the registry is read apart only to tell an
    // unknown key from a known one bound to nothing (one query less per request).
    if bound.is_empty() && tx.device(device_key)?.is_none() {
        let m = "this device key is not known to the seller's server yet: the device must \
                 fetch its license from this server first"
            .to_string();
        return Ok(refused(403, codes::UNKNOWN_DEVICE, m, None));
    }
    for r in records {
        let Some(product) = bound.get(&r.key.instance) else {
            let m = format!(
                "record {}: instance {} is not bound to this device",
                r.sn, r.key.instance
            );
            return Ok(refused(403, codes::NOT_BOUND, m, Some(&r.sn)));
        };
        if let Some(allowed) = meters.get(product) {
            if !allowed.contains(&r.key.meter) {
                let m = format!(
                    "record {}: meter {:?} is not one product {product} bills ({})",
                    r.sn,
                    r.key.meter,
                    allowed.join(", ")
                );
                return Ok(refused(403, codes::METER_NOT_ALLOWED, m, Some(&r.sn)));
            }
        }
    }
    // Insert-or-ignore first, then read only the records already held: a fresh record
    // costs one insert, a resend one lookup.
    let inserted = tx
        .usage()
        .usage_insert_new(records, device_key, now, now_ms)?;
    let resent: Vec<&str> = records
        .iter()
        .zip(&inserted)
        .filter(|(_, new)| !**new)
        .map(|(r, _)| r.sn.as_str())
        .collect();
    let held: HashMap<String, OutboxRow> = if resent.is_empty() {
        HashMap::new()
    } else {
        tx.usage()
            .usage_get(&resent)?
            .into_iter()
            .map(|r| (r.rec.sn.clone(), r))
            .collect()
    };
    let mut results = Vec::with_capacity(records.len());
    for (r, new) in records.iter().zip(&inserted) {
        if *new {
            results.push(RecordResult {
                metering_sn: r.sn.clone(),
                state: "pending".into(),
                reason: None,
            });
            continue;
        }
        match held.get(&r.sn) {
            Some(row) if row.rec == *r && row.device_key == device_key => {
                results.push(result_of(row))
            }
            Some(_) => {
                // Refused whole: this request's own inserts are taken back.
                let mine: Vec<&str> = records
                    .iter()
                    .zip(&inserted)
                    .filter(|(_, new)| **new)
                    .map(|(r, _)| r.sn.as_str())
                    .collect();
                tx.usage().usage_forget(&mine)?;
                let m = format!(
                    "record {}: this metering_sn is already held with other values",
                    r.sn
                );
                return Ok(refused(409, codes::CONFLICT, m, Some(&r.sn)));
            }
            // Skipped as held but not visible: only a concurrent writer can do that.
            None => return Err(DbError::Retry),
        }
    }
    Ok(Decision::Held(results))
}

/// Parses and checks a request body: every record inside the API's limits, no
/// `metering_sn` twice, at most 1000 records. Err: (HTTP status, code, message, sn).
#[allow(clippy::type_complexity)]
pub fn parse(
    body: &[u8],
    now: i64,
    max_age_days: u64,
) -> Result<Vec<HourRecord>, (u16, &'static str, String, Option<String>)> {
    let req: relay::Request = serde_json::from_slice(body).map_err(|e| {
        (
            400,
            codes::INVALID,
            format!("the body is not a usage request: {e}"),
            None,
        )
    })?;
    if req.records.is_empty() {
        return Err((400, codes::INVALID, "no records".into(), None));
    }
    if req.records.len() > MAX_RECORDS {
        let m = format!(
            "{} records in one request; at most {MAX_RECORDS}",
            req.records.len()
        );
        return Err((413, codes::TOO_LARGE, m, None));
    }
    let max_age = max_age_days as i64 * 86_400;
    let mut out = Vec::with_capacity(req.records.len());
    for (i, w) in req.records.into_iter().enumerate() {
        match relay::check_fields(&w, now, max_age) {
            Ok((begin, record_time)) => out.push(w.into_record(begin, record_time)),
            Err(e) => {
                let m = format!("records[{i}] ({}): {e}", w.metering_sn);
                return Err((400, codes::INVALID, m, Some(w.metering_sn)));
            }
        }
    }
    let mut seen = HashSet::with_capacity(out.len());
    for (i, r) in out.iter().enumerate() {
        if !seen.insert(r.sn.as_str()) {
            let m = format!("records[{i}]: metering_sn {} appears twice", r.sn);
            return Err((400, codes::INVALID, m, Some(r.sn.clone())));
        }
    }
    Ok(out)
}

/// The answer body.
pub fn answer_body(code: &str, msg: &str, results: &[RecordResult], sn: Option<&str>) -> String {
    serde_json::to_string(&relay::Answer {
        error_code: code.to_string(),
        error_msg: msg.to_string(),
        results: results.to_vec(),
        metering_sn: sn.map(str::to_string),
    })
    .expect("strings serialise")
}

/// Largest request body: 1000 records of at most ~600 bytes each.
pub const MAX_BODY: usize = 1 << 20;
/// The device waits for this answer; a database slower than this is answered 503.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

fn relay_answer(http: u16, code: &str, msg: &str, sn: Option<&str>) -> super::http::Resp {
    let status = hyper::StatusCode::from_u16(http).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    super::http::json(status, answer_body(code, msg, &[], sn))
}

/// `POST /v1/usage/records`.
pub async fn handle(
    state: Arc<super::http::State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> super::http::Resp {
    use http_body_util::{BodyExt, Limited};
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let m = format!("request body unreadable or larger than {MAX_BODY} bytes: {e}");
            return relay_answer(413, codes::TOO_LARGE, &m, None);
        }
    };
    let now_ms = state.clock.now_ms();
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let usage = state.usage.clone();
    // The signature is checked together with other requests' (`sig_batch`); the nonce's
    // freshness in the transaction.
    let checked = super::relay::verify_batched(
        &usage.keys,
        &usage.signatures,
        header,
        "POST",
        relay::PATH,
        &body,
        now_ms,
    )
    .await;
    let device = match checked {
        Ok(d) => d,
        Err(e) => {
            log::warn!("usage relay: refused: {e}");
            return relay_answer(401, codes::UNAUTHENTICATED, &e.to_string(), None);
        }
    };
    let records = match parse(&body, now_ms.div_euclid(1000), usage.cfg.max_age_days) {
        Ok(r) => r,
        Err((http, code, msg, sn)) => {
            log::info!("usage relay: refused from device key {}: {msg}", device.key);
            return relay_answer(http, code, &msg, sn.as_deref());
        }
    };
    // The configuration is shared with the job, not copied per request. So are the
    // request's records and device: this worker holds them until the answer is back and
    // frees them itself, the database thread drops only its references (glibc's free of
    // another thread's memory takes that thread's arena lock: the same finding as the
    // getLicense path's, `http::marketplace_answer`).
    let cfg = usage.clone();
    let rate = usage.device_rate();
    let request = Arc::new((device, records));
    let shared = request.clone();
    let job = state.db.run(move |tx| {
        let (device, records) = &*shared;
        store(
            tx,
            &device.key,
            &device.nonce,
            records,
            &cfg.cfg.meters,
            rate,
            now_ms,
        )
    });
    let answer = tokio::time::timeout(ANSWER_WITHIN, job).await;
    let device = &request.0;
    match answer {
        Ok(Ok(Decision::Held(results))) => {
            if results.iter().any(|r| r.state == "pending") {
                usage.wake();
            }
            super::http::json(
                hyper::StatusCode::OK,
                answer_body(codes::OK, "", &results, None),
            )
        }
        Ok(Ok(Decision::Limited(secs))) => {
            let mut r = relay_answer(
                429,
                codes::RATE_LIMITED,
                &format!("too many requests from this device; retry in {secs} s"),
                None,
            );
            r.headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("digits"));
            r
        }
        Ok(Ok(Decision::Refused {
            http,
            code,
            msg,
            sn,
        })) => {
            log::warn!("usage relay: refused from device key {}: {msg}", device.key);
            relay_answer(http, code, &msg, sn.as_deref())
        }
        Ok(Err(e)) => {
            log::error!("usage relay: database: {e}");
            relay_answer(503, codes::UNAVAILABLE, "try again later", None)
        }
        Err(_) => {
            log::error!("usage relay: no answer from the database within {ANSWER_WITHIN:?}");
            relay_answer(503, codes::UNAVAILABLE, "try again later", None)
        }
    }
}

/// The outbox as the delivery loop's [`Sink`]: `pending` claims due rows (leased, so a
/// replica does not send them too); outcomes are written as they come.
struct Outbox<'a> {
    db: &'a Db,
    clock: &'a dyn Clock,
    lease_ms: i64,
    /// Every row claimed this round (to back off those still pending on a failure).
    claimed: Mutex<Vec<String>>,
}

impl Sink for Outbox<'_> {
    type Error = DbError;
    fn pending(&self, limit: usize) -> Result<Vec<HourRecord>, DbError> {
        let now = self.clock.now_ms();
        let lease = now + self.lease_ms;
        let rows = self
            .db
            .run_blocking(move |tx| tx.usage().usage_claim(limit, now, lease))?;
        self.claimed
            .lock()
            .expect("claimed lock")
            .extend(rows.iter().map(|r| r.sn.clone()));
        Ok(rows)
    }
    fn delivered(
        &self,
        sns: Vec<String>,
        at: i64,
        upstream: &str,
        http: u16,
    ) -> Result<(), DbError> {
        let st = OutboxState::Delivered {
            at,
            upstream: upstream.to_string(),
            http,
        };
        self.db
            .run_blocking(move |tx| tx.usage().usage_finish(&sns, &st))
    }
    fn parked(&self, sns: Vec<String>, at: i64, reason: String) -> Result<(), DbError> {
        let st = OutboxState::Parked { at, reason };
        self.db
            .run_blocking(move |tx| tx.usage().usage_finish(&sns, &st))
    }
}

/// How long the worker sleeps at most between looks at the outbox (a replica's rows, or
/// rows whose lease ran out after a crash).
const IDLE_POLL_MS: i64 = 30_000;
/// How often delivered rows past the age limit are forgotten.
const PRUNE_EVERY_MS: i64 = 3_600_000;

/// Starts the delivery thread.
pub fn start_worker(
    relay: Arc<UsageRelay>,
    db: Db,
    key: Arc<Secret>,
    clock: Arc<dyn Clock>,
) -> Result<(), String> {
    let cfg = relay.cfg.clone();
    let client = Client::new(
        cfg.upstreams.clone(),
        cfg.extra_ca(),
        Duration::from_secs(cfg.upload_timeout_secs),
    )
    .map_err(|e| format!("seller_server.usage: {e}"))?;
    let (tx, rx) = mpsc::channel();
    *relay.wake.lock().expect("wake lock") = Some(tx);
    std::thread::Builder::new()
        .name("usage-delivery".into())
        .spawn(move || worker(cfg, client, db, key, clock, rx))
        .map_err(|e| format!("starting the usage delivery thread: {e}"))?;
    Ok(())
}

fn worker(
    cfg: UsageRelayConfig,
    client: Client,
    db: Db,
    key: Arc<Secret>,
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<()>,
) {
    // A request (connection included) is bounded by the timeout per host; the lease covers
    // every host and the marking.
    let lease_ms = (cfg.upload_timeout_secs * 1000 * (cfg.upstreams.len() as u64 + 1)) as i64;
    let mut attempt: u32 = 0;
    let mut next_try = 0i64;
    let mut next_prune = 0i64;
    loop {
        let now = clock.now_ms();
        if now >= next_prune {
            next_prune = now + PRUNE_EVERY_MS;
            // A day beyond the age limit: no device can resend these any more.
            let before = now / 1000 - (cfg.max_age_days as i64 + 1) * 86_400;
            match db.run_blocking(move |tx| tx.usage().usage_prune(before)) {
                Ok(0) => {}
                Ok(n) => {
                    log::info!("usage relay: forgot {n} delivered records older than the age limit")
                }
                Err(e) => log::error!("usage relay: pruning the outbox: {e}"),
            }
        }
        if now >= next_try {
            let sink = Outbox {
                db: &db,
                clock: clock.as_ref(),
                lease_ms,
                claimed: Mutex::new(Vec::new()),
            };
            match upload::deliver(&sink, &client, &key, clock.as_ref(), cfg.batch_size) {
                Ok(round) if round.transient.is_none() => {
                    if round.requests > 0 {
                        log::info!(
                            "usage relay: {} records delivered, {} parked in {} requests",
                            round.delivered,
                            round.parked,
                            round.requests
                        );
                    }
                    attempt = 0;
                    next_try = 0;
                }
                result => {
                    attempt = attempt.saturating_add(1);
                    let delay = backoff_ms(&cfg, attempt);
                    next_try = clock.now_ms() + delay;
                    match &result {
                        Ok(r) => log::warn!(
                            "usage relay: upload will be retried in {delay} ms: {}",
                            r.transient.as_deref().unwrap_or("")
                        ),
                        Err(e) => log::error!("usage relay: {e}; retrying in {delay} ms"),
                    }
                    let sns = std::mem::take(&mut *sink.claimed.lock().expect("claimed lock"));
                    if !sns.is_empty() {
                        if let Err(e) =
                            db.run_blocking(move |tx| tx.usage().usage_retry_at(&sns, next_try))
                        {
                            log::error!("usage relay: recording the retry time: {e}");
                        }
                    }
                }
            }
        }
        // Sleep until the next due row, a wake-up, or the idle poll.
        let now = clock.now_ms();
        let due = db
            .run_blocking(|tx| tx.usage().usage_next_due())
            .ok()
            .flatten()
            .unwrap_or(i64::MAX);
        let until = due.max(next_try).min(now + IDLE_POLL_MS);
        let wait = Duration::from_millis((until - now).clamp(0, IDLE_POLL_MS) as u64);
        match rx.recv_timeout(wait) {
            Ok(()) => while rx.try_recv().is_ok() {},
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Exponential backoff with equal jitter (the agent's rule).
fn backoff_ms(cfg: &UsageRelayConfig, attempt: u32) -> i64 {
    kooagent_edge::backoff::equal_jitter(cfg.backoff_initial_ms, cfg.backoff_max_ms, attempt) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::server::db::{self, Db, InstanceRow, InstanceStatus};
    use kooagent_core::usage::hours::Key;

    const NOW_MS: i64 = 1_800_000_000_000;

    fn instance(id: &str, product: &str, device: &str) -> InstanceRow {
        InstanceRow {
            instance_id: id.into(),
            product: product.into(),
            license_id: format!("kg-{id}"),
            devices: vec![device.into()],
            not_before: 0,
            not_after: None,
            status: InstanceStatus::Active,
            frozen: false,
            license: "kl1.x".into(),
            seq: 0,
            updated_at: 0,
        }
    }

    /// Binds `key` to `code` the way the device registry does.
    fn bind_device(db: &Db, key: &'static str, code: &'static str) {
        db.run_blocking(move |tx| {
            tx.put_device(&db::DeviceRow {
                device_code: code.into(),
                device_key: key.into(),
                first_seen: 1,
                last_seen: 1,
            })
        })
        .unwrap();
    }

    fn rec(sn: &str, instance: &str, meter: &str, value: &str) -> HourRecord {
        HourRecord {
            sn: sn.into(),
            key: Key {
                instance: instance.into(),
                meter: meter.into(),
                pkg: None,
            },
            begin: NOW_MS / 1000 / 3600 * 3600 - 3600,
            record_time: NOW_MS / 1000,
            usage_value: value.into(),
        }
    }

    fn run(db: &Db, key: &'static str, nonce: &str, recs: Vec<HourRecord>) -> Decision {
        let mut meters = BTreeMap::new();
        meters.insert("metered".to_string(), vec!["cpu".to_string()]);
        let nonce = nonce.to_string();
        db.run_blocking(move |tx| {
            store(
                tx,
                key,
                &nonce,
                &recs,
                &meters,
                Rate::new(1000, 1000),
                NOW_MS,
            )
        })
        .unwrap()
    }

    fn code_of(d: &Decision) -> &'static str {
        match d {
            Decision::Refused { code, .. } => code,
            Decision::Held(_) => codes::OK,
            Decision::Limited(_) => codes::RATE_LIMITED,
        }
    }

    #[test]
    fn records_are_held_once_and_refusals_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            for i in [
                instance("i-a", "metered", "DEV-A"),
                instance("i-b", "metered", "DEV-B"),
                instance("i-free", "free", "DEV-A"),
            ] {
                db.run_blocking(move |tx| tx.put_instance(&i)).unwrap();
            }
            // Unknown device: refused, nothing stored.
            let d = run(&db, "KA", "n0", vec![rec("s1", "i-a", "cpu", "1")]);
            assert_eq!(code_of(&d), codes::UNKNOWN_DEVICE, "{name}");
            bind_device(&db, "KA", "DEV-A");
            bind_device(&db, "KB", "DEV-B");
            // A known key whose code no license names: not bound (the key is known).
            bind_device(&db, "KC", "DEV-C");
            let d = run(&db, "KC", "n00", vec![rec("s1", "i-a", "cpu", "1")]);
            assert_eq!(code_of(&d), codes::NOT_BOUND, "{name}");
            // Another device's instance, a meter the product does not bill: refused whole.
            let d = run(
                &db,
                "KA",
                "n1",
                vec![rec("s1", "i-a", "cpu", "1"), rec("s2", "i-b", "cpu", "1")],
            );
            assert_eq!(code_of(&d), codes::NOT_BOUND, "{name}");
            assert!(matches!(&d, Decision::Refused { sn: Some(s), http: 403, .. } if s == "s2"));
            let d = run(&db, "KA", "n2", vec![rec("s1", "i-a", "gpu", "1")]);
            assert_eq!(code_of(&d), codes::METER_NOT_ALLOWED, "{name}");
            let c = db.run_blocking(|tx| tx.usage().usage_counts()).unwrap();
            assert_eq!(c.pending, 0, "{name}: a refusal stored something");
            // Accepted; a product without a meter list bills any meter.
            let d = run(
                &db,
                "KA",
                "n3",
                vec![rec("s1", "i-a", "cpu", "1"), rec("s3", "i-free", "x", "2")],
            );
            match &d {
                Decision::Held(r) => {
                    assert_eq!(r.len(), 2);
                    assert!(r.iter().all(|r| r.state == "pending"));
                }
                d => panic!("{name}: {d:?}"),
            }
            // The same nonce again: a replay.
            let d = run(&db, "KA", "n3", vec![rec("s1", "i-a", "cpu", "1")]);
            assert_eq!(code_of(&d), codes::UNAUTHENTICATED, "{name}");
            // A resend is answered from the stored row; other values are a conflict.
            let d = run(&db, "KA", "n4", vec![rec("s1", "i-a", "cpu", "1")]);
            assert!(
                matches!(&d, Decision::Held(r) if r[0].state == "pending"),
                "{name}"
            );
            let d = run(&db, "KA", "n5", vec![rec("s1", "i-a", "cpu", "2")]);
            assert_eq!(code_of(&d), codes::CONFLICT, "{name}");
            // A fresh record before the conflicting one is not kept either.
            let d = run(
                &db,
                "KA",
                "n5b",
                vec![rec("s7", "i-a", "cpu", "1"), rec("s1", "i-a", "cpu", "2")],
            );
            assert_eq!(code_of(&d), codes::CONFLICT, "{name}");
            let c = db.run_blocking(|tx| tx.usage().usage_counts()).unwrap();
            assert_eq!(c.pending, 2, "{name}: a refused request left a record");
            // Delivery outcomes show in the answers to resends.
            let now = NOW_MS;
            let claimed = db
                .run_blocking(move |tx| tx.usage().usage_claim(10, now, now + 1000))
                .unwrap();
            assert_eq!(claimed.len(), 2, "{name}");
            let again = db
                .run_blocking(move |tx| tx.usage().usage_claim(10, now, now + 1000))
                .unwrap();
            assert!(again.is_empty(), "{name}: leased rows were claimed twice");
            db.run_blocking(|tx| {
                tx.usage().usage_finish(
                    &["s1".to_string()],
                    &OutboxState::Parked {
                        at: 5,
                        reason: "HTTP 400: bad".into(),
                    },
                )?;
                tx.usage().usage_retry_at(&["s3".to_string()], 7)
            })
            .unwrap();
            let d = run(
                &db,
                "KA",
                "n6",
                vec![rec("s1", "i-a", "cpu", "1"), rec("s3", "i-free", "x", "2")],
            );
            match d {
                Decision::Held(r) => {
                    assert_eq!(r[0].state, "parked", "{name}");
                    assert_eq!(r[0].reason.as_deref(), Some("HTTP 400: bad"));
                    assert_eq!(r[1].state, "pending");
                }
                d => panic!("{name}: {d:?}"),
            }
            assert_eq!(
                db.run_blocking(|tx| tx.usage().usage_next_due()).unwrap(),
                Some(7)
            );
            let parked = db.run_blocking(|tx| tx.usage().usage_parked(10)).unwrap();
            assert_eq!(parked.len(), 1);
            assert_eq!(parked[0].device_key, "KA");
            // Old delivered rows are forgotten, parked ones kept.
            let begin = rec("x", "i", "m", "1").begin;
            db.run_blocking(move |tx| {
                tx.usage().usage_finish(
                    &["s3".to_string()],
                    &OutboxState::Delivered {
                        at: 9,
                        upstream: "u".into(),
                        http: 200,
                    },
                )
            })
            .unwrap();
            assert_eq!(
                db.run_blocking(move |tx| tx.usage().usage_prune(begin + 1))
                    .unwrap(),
                1,
                "{name}"
            );
            let c = db.run_blocking(|tx| tx.usage().usage_counts()).unwrap();
            assert_eq!((c.delivered, c.parked), (0, 1), "{name}");
            // Another device cannot claim a record it did not send.
            let d = run(&db, "KB", "n7", vec![rec("s9", "i-b", "cpu", "1")]);
            assert!(matches!(d, Decision::Held(_)), "{name}");
            let d = run(&db, "KB", "n8", vec![rec("s1", "i-b", "cpu", "1")]);
            assert_eq!(code_of(&d), codes::CONFLICT, "{name}");
        }
    }

    #[test]
    fn bodies_are_checked_before_anything_else() {
        let now = NOW_MS / 1000;
        let w = relay::WireRecord::from_record(&rec("s1", "i-a", "cpu", "1"));
        let body = |recs: Vec<relay::WireRecord>| {
            serde_json::to_vec(&relay::Request { records: recs }).unwrap()
        };
        assert_eq!(parse(&body(vec![w.clone()]), now, 35).unwrap().len(), 1);
        assert_eq!(parse(b"{}", now, 35).unwrap_err().1, codes::INVALID);
        assert_eq!(parse(&body(vec![]), now, 35).unwrap_err().1, codes::INVALID);
        let e = parse(&body(vec![w.clone(), w.clone()]), now, 35).unwrap_err();
        assert!(e.2.contains("twice"), "{e:?}");
        let mut bad = w.clone();
        bad.usage_value = "0".into();
        let e = parse(&body(vec![w.clone(), bad]), now, 35).unwrap_err();
        assert!(
            e.2.starts_with("records[1]") && e.3.as_deref() == Some("s1"),
            "{e:?}"
        );
        let many: Vec<_> = (0..1001)
            .map(|i| {
                let mut x = w.clone();
                x.metering_sn = format!("s{i}");
                x
            })
            .collect();
        let e = parse(&body(many), now, 35).unwrap_err();
        assert_eq!((e.0, e.1), (413, codes::TOO_LARGE));
    }

    #[test]
    fn the_device_rate_is_a_bucket_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            db.run_blocking(|tx| tx.put_instance(&instance("i-a", "metered", "DEV-A")))
                .unwrap();
            bind_device(&db, "KA", "DEV-A");
            let meters = BTreeMap::new();
            // Burst 2, one a minute: two requests, then a wait of a minute, nothing stored.
            let rate = Rate::new(2, 1);
            let go = |nonce: &str, sn: &str, at: i64| {
                let (nonce, recs, m) = (
                    nonce.to_string(),
                    vec![rec(sn, "i-a", "cpu", "1")],
                    meters.clone(),
                );
                db.run_blocking(move |tx| store(tx, "KA", &nonce, &recs, &m, rate, at))
                    .unwrap()
            };
            assert!(
                matches!(go("r1", "t1", NOW_MS), Decision::Held(_)),
                "{name}"
            );
            assert!(
                matches!(go("r2", "t2", NOW_MS), Decision::Held(_)),
                "{name}"
            );
            assert_eq!(
                go("r3", "t3", NOW_MS + 1000),
                Decision::Limited(60),
                "{name}"
            );
            let c = db.run_blocking(|tx| tx.usage().usage_counts()).unwrap();
            assert_eq!(c.pending, 2, "{name}");
            // The nonce of a limited request was not used up.
            assert!(
                matches!(go("r3", "t3", NOW_MS + 61_000), Decision::Held(_)),
                "{name}"
            );
        }
    }
}
