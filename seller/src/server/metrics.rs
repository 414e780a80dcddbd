//! `GET /metrics`: the seller server's counters in the Prometheus text format
//! (docs/seller-server.md "Metrics"), served only to a bearer of the metrics token
//! (`metrics_token_file`): a token of its own, so that the marketplace's interconnection
//! key never opens it and the metrics token never signs a marketplace call.
//!
//! The counters are per process (each replica is scraped on its own, as Prometheus
//! expects); the outbox depths are read from the database at each scrape, so every
//! replica reports the shared outboxes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use sha2::{Digest, Sha256};

use super::http::{plain, Resp, State};
use kooagent_edge::prom::{Counters, Histogram, Text};

/// The path; product paths may not take it (`SellerServerConfig::validate`).
pub const PATH: &str = "/metrics";

/// Answer times: the marketplace gives up after 5 s.
static ANSWER_BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Transaction times (a whole group-commit batch).
static TX_BOUNDS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The marketplace's activities (anything else is counted as `other`, so that a caller
/// cannot grow the label set).
const ACTIVITIES: &[&str] = &[
    "getLicense",
    "getLicenseAsync",
    "refreshLicense",
    "expireLicense",
    "releaseLicense",
    "updateInstanceStatus",
    "updateLicenseCodeStatus",
    "releaseLicenseCode",
    "refreshLicenseCode",
];

/// This process's counters.
pub struct Metrics {
    /// (activity, resultCode).
    pub marketplace: Counters<2>,
    pub answer: Histogram,
    pub transaction: Histogram,
    pub db_errors: AtomicU64,
    pub db_conflicts: AtomicU64,
    /// (endpoint, HTTP status) of the agents' calls: the authorization-code relay, the
    /// usage relay, license and status fetches.
    pub relay: Counters<2>,
    started: Instant,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        marketplace: Counters::default(),
        answer: Histogram::new(&ANSWER_BOUNDS),
        transaction: Histogram::new(&TX_BOUNDS),
        db_errors: AtomicU64::new(0),
        db_conflicts: AtomicU64::new(0),
        relay: Counters::default(),
        started: Instant::now(),
    })
}

/// The activity label of a request body (already authenticated): a known activity or
/// `other`.
pub fn activity_of(body: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct A<'a> {
        #[serde(borrow)]
        activity: Option<std::borrow::Cow<'a, str>>,
    }
    let a = serde_json::from_slice::<A<'_>>(body)
        .ok()
        .and_then(|a| a.activity);
    activity_label(a.as_deref())
}

/// The label of a request's `activity` field: a known activity or `other`.
pub fn activity_label(activity: Option<&str>) -> &'static str {
    activity
        .and_then(|a| ACTIVITIES.iter().find(|k| **k == a))
        .copied()
        .unwrap_or("other")
}

/// The `resultCode` of one of our answers ([`super::activities::answer`] writes it first).
pub fn result_code_of(answer: &str) -> &str {
    answer
        .strip_prefix("{\"resultCode\":\"")
        .and_then(|r| r.get(..6))
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("other")
}

/// One marketplace call answered.
pub fn marketplace_call(activity: &str, answer: &str, took: Duration) {
    let m = global();
    m.marketplace.inc([activity, result_code_of(answer)]);
    m.answer.observe(took);
    super::console::recent::record(result_code_of(answer), took);
}

/// One agent call answered; `endpoint` is one of a fixed set.
pub fn relay_call(endpoint: &'static str, status: StatusCode) {
    global().relay.inc([endpoint, status.as_str()]);
}

/// One database transaction attempt (a batch) and how it ended.
pub fn transaction(took: Duration, outcome: TxOutcome) {
    let m = global();
    m.transaction.observe(took);
    match outcome {
        TxOutcome::Done => {}
        TxOutcome::Conflict => {
            m.db_conflicts.fetch_add(1, Ordering::Relaxed);
        }
        TxOutcome::Error => {
            m.db_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A database error outside a transaction attempt (giving up after conflicts).
pub fn db_error() {
    global().db_errors.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    Done,
    Conflict,
    Error,
}

/// What the scrape reads from the database.
pub struct Outboxes {
    /// License uploads not done, and the age of the oldest (seconds).
    pub uploads_pending: i64,
    pub uploads_oldest_secs: i64,
    pub usage: super::db::usage::OutboxCounts,
}

fn outboxes(tx: &mut dyn super::db::Tx, now: i64) -> Result<Outboxes, super::db::DbError> {
    let (pending, _) = tx.count_uploads()?;
    let oldest = if pending > 0 {
        tx.list_uploads(0)?
            .iter()
            .filter(|r| r.done_at.is_none())
            .map(|r| now - r.created_at)
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    Ok(Outboxes {
        uploads_pending: pending,
        uploads_oldest_secs: oldest.max(0),
        usage: tx.usage().usage_counts()?,
    })
}

/// The page: this process's counters, and the outboxes (None: the database did not
/// answer).
pub fn render(m: &Metrics, outboxes: Option<&Outboxes>) -> String {
    let mut t = Text::new();
    let name = "kooagent_seller_marketplace_calls_total";
    t.family(
        name,
        "counter",
        "Marketplace calls answered by this process, by activity and resultCode.",
    );
    m.marketplace
        .write(&mut t, name, ["activity", "result_code"]);
    let name = "kooagent_seller_marketplace_answer_seconds";
    t.family(
        name,
        "histogram",
        "Time from a marketplace request's arrival to its answer.",
    );
    m.answer.write(&mut t, name, &[]);
    let name = "kooagent_seller_db_transaction_seconds";
    t.family(
        name,
        "histogram",
        "Database transaction attempts (one group-commit batch each).",
    );
    m.transaction.write(&mut t, name, &[]);
    t.single(
        "kooagent_seller_db_errors_total",
        "counter",
        "Database transactions that failed (not counting serialization conflicts retried).",
        m.db_errors.load(Ordering::Relaxed) as f64,
    );
    t.single(
        "kooagent_seller_db_conflicts_total",
        "counter",
        "Serialization conflicts (the transaction was run again).",
        m.db_conflicts.load(Ordering::Relaxed) as f64,
    );
    let name = "kooagent_seller_relay_calls_total";
    t.family(
        name,
        "counter",
        "Agents' calls (authorization-code relay, usage relay, license fetches) by endpoint \
         and HTTP status.",
    );
    m.relay.write(&mut t, name, ["endpoint", "status"]);
    t.single(
        "kooagent_seller_database_up",
        "gauge",
        "Whether the database answered this scrape's queries.",
        if outboxes.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(o) = outboxes {
        t.single(
            "kooagent_seller_license_upload_pending",
            "gauge",
            "getLicenseAsync licenses not yet accepted by the marketplace (undelivered orders).",
            o.uploads_pending as f64,
        );
        t.single(
            "kooagent_seller_license_upload_oldest_pending_seconds",
            "gauge",
            "Age of the oldest undelivered license upload (0: none).",
            o.uploads_oldest_secs as f64,
        );
        let name = "kooagent_seller_usage_outbox";
        t.family(
            name,
            "gauge",
            "Usage records in the relay's outbox by state.",
        );
        t.sample(name, &[("state", "pending")], o.usage.pending as f64);
        t.sample(name, &[("state", "parked")], o.usage.parked as f64);
        t.sample(name, &[("state", "delivered")], o.usage.delivered as f64);
    }
    t.single(
        "kooagent_seller_uptime_seconds",
        "gauge",
        "Seconds since this process started serving.",
        m.started.elapsed().as_secs() as f64,
    );
    t.finish()
}

/// Whether `header` (the `Authorization` value) carries `token` as a bearer token.
/// Compared as SHA-256 digests: the comparison's time says nothing about how much of
/// the token matched.
pub fn authorized(header: Option<&str>, token: &[u8]) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    Sha256::digest(given.trim().as_bytes()) == Sha256::digest(token)
}

/// `GET /metrics`. No token configured: 404, as for any unknown path.
pub async fn handle(state: &State, req: &Request<Incoming>) -> Resp {
    let Some(token) = state.metrics_token.as_ref() else {
        return plain(StatusCode::NOT_FOUND, "no such endpoint\n");
    };
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if !authorized(auth, token.expose()) {
        let mut r = plain(StatusCode::UNAUTHORIZED, "metrics need the metrics token\n");
        r.headers_mut()
            .insert("www-authenticate", "Bearer".parse().expect("valid"));
        return r;
    }
    if req.method() != hyper::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    let now = state.clock.now_ms().div_euclid(1000);
    let read = state.db.run(move |tx| outboxes(tx, now));
    let o = match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok(o)) => Some(o),
        Ok(Err(e)) => {
            log::warn!("metrics: reading the outboxes: {e}");
            None
        }
        Err(_) => {
            log::warn!("metrics: the database did not answer within 3 s");
            None
        }
    };
    let mut r = plain(StatusCode::OK, &render(global(), o.as_ref()));
    r.headers_mut().insert(
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8"
            .parse()
            .expect("valid"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_code_and_activity_labels() {
        let a = super::super::activities::answer(
            super::super::activities::ResultCode::NotFound,
            "no",
            &[],
        );
        assert_eq!(result_code_of(&a), "000003");
        assert_eq!(result_code_of("garbage"), "other");
        assert_eq!(activity_of(br#"{"activity":"getLicense"}"#), "getLicense");
        assert_eq!(activity_of(br#"{"activity":"x\"y"}"#), "other");
        assert_eq!(activity_of(b"not json"), "other");
    }

    #[test]
    fn bearer_token_only() {
        assert!(authorized(Some("Bearer s3cret"), b"s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), b"s3cret"));
        assert!(!authorized(Some("s3cret"), b"s3cret"));
        assert!(!authorized(None, b"s3cret"));
    }
}
