//! The running agent's authorization codes: activated codes kept in
//! `<state_dir>/authcodes.json`, `license.check` answered for their products from memory,
//! and every network call (activation, the daily query, the daily usage report) made on
//! one dedicated thread, never on a check's path: a check only compares the day of the
//! last query with today and, the first time each day, signals the thread.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::api::{self, ActivateRequest, ApiError, CodeStatus, ErrorCode, HeartbeatRequest};
use super::client::ClientError;
use super::config::AuthcodeConfig;
use super::logic::{self, day_of, query_due, CodeRecord};
use super::transport::Transport;
use crate::clock::{format_rfc3339, Clock};
use crate::config::Config;
use crate::protocol::OpError;
use crate::services::{done, Service, Step};

/// The code is not a valid authorization code (empty, too long, not printable ASCII).
pub const INVALID_CODE: &str = "invalid_code";
/// KooGallery refused the activation (its `error_code` in the details).
pub const ACTIVATION_REFUSED: &str = "activation_refused";
/// Neither the marketplace (direct) nor the seller's server (relay) could be reached.
pub const UNREACHABLE: &str = "marketplace_unreachable";
/// `[authcode]` is not usable (AK/SK file, relay URL, device key).
pub const AUTHCODE_CONFIG: &str = "authcode_config";
/// The answer could not be understood, or another failure of the call.
pub const AUTHCODE_FAILED: &str = "authcode_failed";
/// No activated code for the product.
pub const NO_CODE: &str = "no_authcode";
/// Could not save `authcodes.json`.
pub const STORE_FAILED: &str = "store_failed";

const FILE: &str = "authcodes.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    codes: Vec<CodeRecord>,
    /// Clients not reported yet: code → UTC day → ids.
    #[serde(default)]
    clients: Clients,
    /// Direct mode: activations sent whose answer has not been seen (code → record).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    in_flight: InFlight,
}

/// An activation this device sent and has no answer for yet, saved (fsynced) before the
/// request leaves: the proof, on `92020003`, that the code was activated by this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The product asked for (`--product`), if any.
    pub product: Option<String>,
    pub sent_at: i64,
}

type InFlight = BTreeMap<String, Pending>;

/// What `kooagent license activate` says when a lost answer was recovered.
pub const RECOVERED: &str =
    "recovered: the marketplace had already activated this code for this device (the earlier answer was lost)";

type Clients = BTreeMap<String, BTreeMap<i64, BTreeSet<String>>>;

/// How often the thread saves newly seen clients (a restart loses at most this much).
const CLIENTS_SAVE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

type Reply<T> = tokio::sync::oneshot::Sender<T>;

enum Job {
    Activate(String, Option<String>, Reply<Result<Value, OpError>>),
    /// The daily query and usage report for these codes; `force`: also today's usage.
    Daily(Vec<String>, bool, Option<Reply<()>>),
    /// The code's state changed with time (grace ended, offline too long): tell the
    /// freeze lifecycle.
    Feed(String),
    /// A client was seen for the first time today: report the day's usage now, on the
    /// day of use (the usage call has no date field; a report tomorrow counts tomorrow).
    Usage(String),
}

pub struct AuthcodeService {
    path: PathBuf,
    state_dir: PathBuf,
    clock: Arc<dyn Clock>,
    cfg: RwLock<Arc<AuthcodeConfig>>,
    records: RwLock<BTreeMap<String, CodeRecord>>,
    /// Product → UTC day of the last daily query signalled (memory only).
    queried: Mutex<HashMap<String, i64>>,
    /// Code → UTC day → distinct client ids not reported yet.
    clients: Mutex<Clients>,
    /// A client was seen since the last save.
    clients_dirty: std::sync::atomic::AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    pub heartbeats: AtomicU64,
    /// The daily query's health (directly to the marketplace or through the relay).
    pub source: crate::source_health::SourceHealth,
    pub usage_reports: AtomicU64,
    load_error: Option<String>,
    freeze: std::sync::OnceLock<Arc<crate::freeze::FreezeService>>,
    /// Code → the state last given to the freeze lifecycle.
    fed: Mutex<HashMap<String, &'static str>>,
    /// Activations sent without an answer yet (direct mode; saved with the records).
    in_flight: Mutex<InFlight>,
    /// Code → (UTC day, ids already reported that day): a client seen again the same
    /// day is not reported again (memory only: after a restart an id may be reported
    /// twice in a day, which a count of distinct ids absorbs).
    reported: Mutex<HashMap<String, (i64, BTreeSet<String>)>>,
}

/// The relay's own answers (relay protocol): the code belongs to another device's key,
/// or the seller's server could not reach KooGallery.
pub const RELAY_FORBIDDEN: &str = "KOOAGENT.RELAY.0403";
pub const RELAY_UNREACHABLE: &str = "KOOAGENT.RELAY.0502";

fn op_error(e: &ClientError) -> OpError {
    match e {
        ClientError::Api(ApiError::Refused { code, msg, .. })
            if code.code() == RELAY_UNREACHABLE =>
        {
            OpError::new(
                UNREACHABLE,
                format!("the seller's server could not reach KooGallery: {msg}"),
            )
        }
        ClientError::Config(m) => OpError::new(AUTHCODE_CONFIG, m.clone()),
        ClientError::Unreachable(m) => OpError::new(UNREACHABLE, m.clone()),
        ClientError::Api(ApiError::Invalid(m)) => OpError::new(INVALID_CODE, m.clone()),
        ClientError::Api(ApiError::Refused { code, msg, .. }) => OpError::new(
            ACTIVATION_REFUSED,
            format!("activation refused: {}", activation_message(code)),
        )
        .with_details(json!({"error_code": code.code(), "error_msg": msg})),
        ClientError::Api(a) => OpError::new(AUTHCODE_FAILED, a.to_string()),
    }
}

/// What a refused activation means for the person typing the code.
pub fn activation_message(code: &ErrorCode) -> String {
    let what = match code {
        ErrorCode::AlreadyActivated => {
            "this authorization code is already activated (on this or another device)"
        }
        ErrorCode::NotYetReceived => {
            "the buyer has not received this authorization code yet; confirm receipt in KooGallery first"
        }
        ErrorCode::UnknownCode => "this authorization code does not exist; check what was typed",
        ErrorCode::NotActivated => "this authorization code has not been activated",
        ErrorCode::InvalidCodeInBatch => "the authorization code is not valid",
        ErrorCode::Internal => "KooGallery had an internal error; try again later",
        ErrorCode::InvalidParam | ErrorCode::BadRequestParam => {
            "KooGallery rejected the request's parameters (is the code complete?)"
        }
        ErrorCode::Other(c) if c == RELAY_FORBIDDEN => {
            "the seller's server refused this device: the authorization code is bound to another device"
        }
        _ => code.meaning(),
    };
    format!("{what} [{}]", code.code())
}

impl AuthcodeService {
    pub fn new(state_dir: &Path, cfg: &AuthcodeConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        let path = state_dir.join(FILE);
        let ((codes, clients, in_flight), load_error) = match load(&path) {
            Ok(c) => (c, None),
            Err(e) => {
                log::error!("authcode: {e}; the file is set aside and no code is known");
                let _ = crate::store::quarantine(&path, clock.now_secs());
                ((BTreeMap::new(), BTreeMap::new(), BTreeMap::new()), Some(e))
            }
        };
        let mut queried = HashMap::new();
        for r in codes.values() {
            if let Some(q) = r.last_query_at {
                let d = queried.entry(r.product.clone()).or_insert(day_of(q));
                *d = (*d).max(day_of(q));
            }
        }
        Arc::new(AuthcodeService {
            path,
            state_dir: state_dir.to_path_buf(),
            clock,
            cfg: RwLock::new(Arc::new(cfg.clone())),
            records: RwLock::new(codes),
            queried: Mutex::new(queried),
            clients: Mutex::new(clients),
            clients_dirty: std::sync::atomic::AtomicBool::new(false),
            tx: Mutex::new(None),
            heartbeats: AtomicU64::new(0),
            source: crate::source_health::SourceHealth::new("authorization-code daily query"),
            usage_reports: AtomicU64::new(0),
            load_error,
            freeze: std::sync::OnceLock::new(),
            fed: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(in_flight),
            reported: Mutex::new(HashMap::new()),
        })
    }

    /// Codes join the freeze lifecycle as licenses `code:<CODE>`.
    pub fn set_freeze(&self, freeze: Arc<crate::freeze::FreezeService>) {
        let _ = self.freeze.set(freeze);
    }

    /// Gives the code's current state to the freeze lifecycle: valid → ALIVE, grace →
    /// ALIVE with the grace period as the license's end, frozen → EXPIRED, released →
    /// RELEASED. On the authcode thread (the freeze state is saved to disk).
    fn feed(&self, code: &str) {
        let Some(freeze) = self.freeze.get() else {
            return;
        };
        let Some(r) = self.records.read().expect("records").get(code).cloned() else {
            return;
        };
        let now = self.clock.now_secs();
        let cfg = self.cfg();
        let d = logic::derive(
            &r,
            now,
            cfg.grace_days,
            cfg.offline_days,
            cfg.offline_policy,
        );
        let (not_after, grace_end, status) = match d.state {
            "grace" => (
                r.expired_seen_at.or(r.expire_time),
                d.until,
                crate::freeze::lifecycle::External::Alive,
            ),
            "released" => (None, None, crate::freeze::lifecycle::External::Released),
            "frozen" => (None, None, crate::freeze::lifecycle::External::Expired),
            _ => (None, None, crate::freeze::lifecycle::External::Alive),
        };
        let facts = crate::freeze::lifecycle::LicenseFacts {
            id: format!("code:{code}"),
            issued_at: r.activated_at,
            not_after,
            grace_end,
            lease: None,
        };
        self.fed
            .lock()
            .expect("fed")
            .insert(code.to_string(), d.state);
        freeze.external(facts, &r.product, status, now);
    }

    pub fn apply_config(&self, cfg: &AuthcodeConfig) {
        *self.cfg.write().expect("authcode cfg") = Arc::new(cfg.clone());
    }

    fn cfg(&self) -> Arc<AuthcodeConfig> {
        self.cfg.read().expect("authcode cfg").clone()
    }

    /// Starts the network thread, and the daily query of codes whose last query (or
    /// activation) was on an earlier day.
    pub fn begin(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel();
        *self.tx.lock().expect("tx") = Some(tx);
        let me = self.clone();
        std::thread::Builder::new()
            .name("authcode".into())
            .spawn(move || me.run(rx))
            .expect("spawn the authcode thread");
        for code in self.records.read().expect("records").keys() {
            self.send(Job::Feed(code.clone()));
        }
        let now = self.clock.now_secs();
        let due: Vec<String> = self
            .records
            .read()
            .expect("records")
            .values()
            .filter(|r| day_of(r.last_query_at.unwrap_or(r.activated_at)) < day_of(now))
            .map(|r| r.code.clone())
            .collect();
        if !due.is_empty() {
            let mut q = self.queried.lock().expect("queried");
            for code in &due {
                if let Some(r) = self.records.read().expect("records").get(code) {
                    q.insert(r.product.clone(), day_of(now));
                }
            }
            drop(q);
            self.send(Job::Daily(due, false, None));
        }
    }

    /// Stops the thread and saves the clients seen since the last save.
    pub fn stop(&self) {
        self.tx.lock().expect("tx").take();
        self.save_clients();
    }

    /// Saves after a report removed what it delivered.
    fn save_clients_now(&self) {
        self.clients_dirty.store(true, Ordering::SeqCst);
        self.save_clients();
    }

    fn save_clients(&self) {
        if self.clients_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.persist() {
                log::error!("authcode: could not save {}: {e}", self.path.display());
            }
        }
    }

    fn send(&self, job: Job) -> bool {
        match self.tx.lock().expect("tx").as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }

    fn run(&self, rx: mpsc::Receiver<Job>) {
        loop {
            // Idle means asleep: the save timer is armed only while something is unsaved
            // (a usage report that could not be made leaves the clients dirty).
            let job = if self.clients_dirty.load(Ordering::SeqCst) {
                match rx.recv_timeout(CLIENTS_SAVE_EVERY) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.save_clients();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(job) => job,
                    Err(mpsc::RecvError) => return,
                }
            };
            match job {
                Job::Activate(code, product, reply) => {
                    let r = self.activate_blocking(&code, product.as_deref());
                    if r.is_ok() {
                        self.feed(&code);
                    }
                    let _ = reply.send(r);
                }
                Job::Feed(code) => self.feed(&code),
                Job::Usage(code) => match self.transport() {
                    Ok(t) => {
                        self.report_usage_one(&t, &code, true);
                        self.save_clients_now();
                    }
                    Err(e) => log::warn!("authcode: usage report of {code} not possible: {e}"),
                },
                Job::Daily(codes, force, reply) => {
                    self.daily_blocking(&codes, force);
                    for c in &codes {
                        self.feed(c);
                    }
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                }
            }
        }
    }

    fn transport(&self) -> Result<Transport, ClientError> {
        Transport::from_config(&self.cfg(), &self.state_dir, self.clock.clone())
    }

    /// Activates `code` (on the network thread; the caller awaits the answer). `product`
    /// is used only to adopt a code the relay reports as already activated by this device
    /// (its state was lost): KooGallery does not repeat the product id then.
    pub async fn activate(&self, code: &str, product: Option<&str>) -> Result<Value, OpError> {
        let code = api::check_code(code).map_err(|e| OpError::new(INVALID_CODE, e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(Job::Activate(code, product.map(str::to_string), tx)) {
            return Err(OpError::internal(
                "the authorization-code thread is not running",
            ));
        }
        rx.await
            .map_err(|_| OpError::internal("the authorization-code thread stopped"))?
    }

    fn activate_blocking(&self, code: &str, product: Option<&str>) -> Result<Value, OpError> {
        let req = ActivateRequest::new(code, None).map_err(|e| op_error(&e.into()))?;
        let transport = self.transport().map_err(|e| op_error(&e))?;
        let now = self.clock.now_secs();
        let direct = matches!(transport, Transport::Direct(_));
        let known = self.records.read().expect("records").contains_key(code);
        // An activation of this code sent earlier whose answer never came.
        let had_pending = self.in_flight.lock().expect("in_flight").contains_key(code);
        if direct && !known {
            // Durably before sending: if the answer is lost, this record is what lets a
            // retry recover the code instead of finding it "already activated" for ever.
            let first = self.in_flight.lock().expect("in_flight").insert(
                code.to_string(),
                Pending {
                    product: product.map(str::to_string),
                    sent_at: now,
                },
            );
            if first.is_none() {
                self.persist().map_err(|e| {
                    self.in_flight.lock().expect("in_flight").remove(code);
                    OpError::new(
                        STORE_FAILED,
                        format!("could not record the activation before sending it (nothing was sent): {e}"),
                    )
                })?;
            }
        }
        let answered = match transport.activate(&req) {
            Ok(a) => a,
            Err(ClientError::Api(ApiError::Refused {
                code: ErrorCode::AlreadyActivated,
                ..
            })) if known => {
                // Ours already (a repeated command, or the relay forwarding our own key).
                let r = self.records.read().expect("records")[code].clone();
                let mut v = self.describe(&r, now);
                v["already_activated"] = json!(true);
                return Ok(v);
            }
            Err(ClientError::Api(ApiError::Refused {
                code: ErrorCode::AlreadyActivated,
                ..
            })) if direct && had_pending => {
                let pending = self.in_flight.lock().expect("in_flight").get(code).cloned();
                let asked = product
                    .map(str::to_string)
                    .or(pending.and_then(|p| p.product));
                return self.recover(&transport, code, asked.as_deref(), now);
            }
            Err(ClientError::Api(ApiError::Refused {
                code: ErrorCode::AlreadyActivated,
                ..
            })) if !direct => {
                // The relay forwards a second activation only from the key that made the
                // first: this device activated it before and lost its state.
                return self.adopt(&transport, code, product, now);
            }
            Err(e) => {
                log::warn!("authcode: activation of {code} failed: {e}");
                if answer_settled(&e) {
                    self.forget_in_flight(code);
                }
                return Err(op_error(&e));
            }
        };
        let info = answered.value.info;
        let cfg = self.cfg();
        let product_id = info.as_ref().and_then(|i| i.product_id.clone());
        let mapped = cfg.product_for(product_id.as_deref().unwrap_or(code));
        let recovered = answered.value.recovered;
        let product_name = if recovered {
            // The relay vouches for this device; the product must still fit.
            if info.as_ref().is_some_and(|i| i.status != "ALIVE") {
                return Err(OpError::new(
                    ACTIVATION_REFUSED,
                    format!(
                        "the code was activated before but is {} now; not recovered",
                        info.as_ref().map_or("?", |i| i.status.as_str())
                    ),
                ));
            }
            let from_market = product_id.as_deref().map(|id| cfg.product_for(id));
            self.recovered_product(code, product, from_market)?
        } else {
            mapped
        };
        let rec = CodeRecord {
            code: code.to_string(),
            product: product_name,
            product_id,
            order_id: info.as_ref().and_then(|i| i.order_id.clone()),
            amount: info.as_ref().and_then(|i| i.amount.clone()),
            activated_at: now,
            status: info
                .as_ref()
                .map(|i| i.status.clone())
                .unwrap_or_else(|| "ALIVE".into()),
            expire_time: info.as_ref().and_then(|i| i.expire_time),
            last_ok_at: now,
            expired_seen_at: None,
            last_query_at: None,
            last_error: None,
        };
        self.remember(code, &rec, "activated")?;
        log::info!(
            "authcode: {code} {} for product {} (via {})",
            if recovered { "recovered" } else { "activated" },
            rec.product,
            answered.base
        );
        let mut v = self.describe(&rec, now);
        v["already_activated"] = json!(recovered);
        if recovered {
            v["recovered"] = json!(true);
            v["message"] = json!(RECOVERED);
        }
        Ok(v)
    }

    /// Drops the in-flight record of an activation the marketplace answered (a refusal
    /// is an answer: nothing was activated).
    fn forget_in_flight(&self, code: &str) {
        if self
            .in_flight
            .lock()
            .expect("in_flight")
            .remove(code)
            .is_some()
        {
            if let Err(e) = self.persist() {
                log::warn!("authcode: could not save {}: {e}", self.path.display());
            }
        }
    }

    /// The product a recovered code is checked under: the one asked for (now or when the
    /// activation was sent), the marketplace's product id when it names one (they must
    /// agree), or the only product this agent is configured for.
    fn recovered_product(
        &self,
        code: &str,
        asked: Option<&str>,
        from_market: Option<String>,
    ) -> Result<String, OpError> {
        let cfg = self.cfg();
        let only = (cfg.products.len() == 1)
            .then(|| cfg.products.values().next().cloned())
            .flatten();
        let configured = |p: &str| cfg.products.is_empty() || cfg.products.values().any(|v| v == p);
        match (asked.filter(|p| !p.is_empty()), from_market) {
            (Some(a), _) if !configured(a) => Err(OpError::new(
                ACTIVATION_REFUSED,
                format!(
                    "product {a} is not one of this agent's products ([authcode.products]); \
                     authorization code {code} not recovered"
                ),
            )),
            (Some(a), Some(m)) if a != m => Err(OpError::new(
                ACTIVATION_REFUSED,
                format!("authorization code {code} is for product {m}, not {a}; not recovered"),
            )),
            (Some(a), _) => Ok(a.to_string()),
            (None, Some(m)) => Ok(m),
            (None, None) => only.ok_or_else(|| {
                OpError::new(
                    ACTIVATION_REFUSED,
                    "this device activated the authorization code but its answer was lost; \
                     say which product it is for: kooagent license activate CODE --product NAME",
                )
                .with_details(json!({"error_code": ErrorCode::AlreadyActivated.code()}))
            }),
        }
    }

    /// Direct mode, `92020003` for a code this device had an activation in flight for
    /// (saved before an earlier attempt whose answer was lost): query it, and adopt it
    /// when it is ALIVE and its product fits. Without such a record the code was
    /// activated by someone else: never adopted (the caller refuses).
    fn recover(
        &self,
        transport: &Transport,
        code: &str,
        asked: Option<&str>,
        now: i64,
    ) -> Result<Value, OpError> {
        let req = HeartbeatRequest::new(code).map_err(|e| op_error(&e.into()))?;
        let info = transport.heartbeat(&req).map_err(|e| op_error(&e))?.value;
        if info.status != CodeStatus::Alive {
            return Err(OpError::new(
                ACTIVATION_REFUSED,
                format!(
                    "the code was activated but the marketplace reports it {:?}; not recovered",
                    info.status
                ),
            ));
        }
        let cfg = self.cfg();
        let from_market = info
            .extra
            .get("product_id")
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .map(|id| cfg.product_for(&id));
        let product = self.recovered_product(code, asked, from_market)?;
        let rec = CodeRecord {
            code: code.to_string(),
            product,
            product_id: None,
            order_id: None,
            amount: None,
            activated_at: info.activate_time_unix.unwrap_or(now),
            expired_seen_at: None,
            status: "ALIVE".into(),
            expire_time: info.expire_time,
            last_ok_at: now,
            last_query_at: Some(now),
            last_error: None,
        };
        self.remember(code, &rec, "recovered")?;
        log::info!(
            "authcode: {code} recovered for product {} ({RECOVERED})",
            rec.product
        );
        let mut v = self.describe(&rec, now);
        v["already_activated"] = json!(true);
        v["recovered"] = json!(true);
        v["message"] = json!(RECOVERED);
        Ok(v)
    }

    fn adopt(
        &self,
        transport: &Transport,
        code: &str,
        product: Option<&str>,
        now: i64,
    ) -> Result<Value, OpError> {
        let Some(product) = product.filter(|p| !p.is_empty()) else {
            return Err(OpError::new(
                ACTIVATION_REFUSED,
                "this device activated the authorization code before but no longer has its \
                 record; say which product it is for: kooagent license activate CODE --product NAME",
            )
            .with_details(json!({"error_code": ErrorCode::AlreadyActivated.code()})));
        };
        let req = HeartbeatRequest::new(code).map_err(|e| op_error(&e.into()))?;
        let info = transport.heartbeat(&req).map_err(|e| op_error(&e))?.value;
        let status = match &info.status {
            CodeStatus::Alive => "ALIVE".to_string(),
            CodeStatus::Expired => "EXPIRED".into(),
            CodeStatus::Released => "RELEASED".into(),
            CodeStatus::Other(s) => s.clone(),
        };
        let rec = CodeRecord {
            code: code.to_string(),
            product: product.to_string(),
            product_id: None,
            order_id: None,
            amount: None,
            activated_at: info.activate_time_unix.unwrap_or(now),
            expired_seen_at: (status == "EXPIRED").then_some(now),
            status,
            expire_time: info.expire_time,
            last_ok_at: now,
            last_query_at: Some(now),
            last_error: None,
        };
        self.records
            .write()
            .expect("records")
            .insert(code.to_string(), rec.clone());
        self.persist()
            .map_err(|e| OpError::new(STORE_FAILED, format!("adopted, but not saved: {e}")))?;
        log::info!(
            "authcode: {code} adopted for product {product} (activated by this device before)"
        );
        let mut v = self.describe(&rec, now);
        v["already_activated"] = json!(true);
        v["adopted"] = json!(true);
        Ok(v)
    }

    fn daily_blocking(&self, codes: &[String], force: bool) {
        let transport = match self.transport() {
            Ok(t) => t,
            Err(e) => {
                let now = self.clock.now_secs();
                self.source
                    .failure(now, format!("daily query not possible: {e}"));
                self.update(codes, |r| {
                    r.last_query_at = Some(now);
                    r.last_error = Some(e.to_string());
                });
                return;
            }
        };
        for code in codes {
            self.heartbeat_one(&transport, code);
            self.report_usage_one(&transport, code, force);
        }
        if let Err(e) = self.persist() {
            log::error!("authcode: could not save {}: {e}", self.path.display());
        }
    }

    fn update(&self, codes: &[String], mut f: impl FnMut(&mut CodeRecord)) {
        let mut recs = self.records.write().expect("records");
        for c in codes {
            if let Some(r) = recs.get_mut(c) {
                f(r);
            }
        }
    }

    fn heartbeat_one(&self, transport: &Transport, code: &str) {
        let Ok(req) = HeartbeatRequest::new(code) else {
            return;
        };
        let result = transport.heartbeat(&req);
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_secs();
        self.update(&[code.to_string()], |r| {
            r.last_query_at = Some(now);
            match &result {
                Ok(a) => {
                    let info = &a.value;
                    r.status = match &info.status {
                        CodeStatus::Alive => "ALIVE".into(),
                        CodeStatus::Expired => "EXPIRED".into(),
                        CodeStatus::Released => "RELEASED".into(),
                        CodeStatus::Other(s) => s.clone(),
                    };
                    if info.expire_time.is_some() {
                        r.expire_time = info.expire_time;
                    }
                    r.expired_seen_at = match info.status {
                        CodeStatus::Expired => Some(r.expired_seen_at.unwrap_or(now)),
                        _ => None,
                    };
                    r.last_ok_at = now;
                    r.last_error = None;
                }
                Err(e) => r.last_error = Some(e.to_string()),
            }
        });
        match &result {
            Ok(a) => {
                self.source.success(now);
                log::info!("authcode: daily query of {code}: {:?}", a.value.status)
            }
            Err(e) => self.source.failure(now, format!("{code}: {e}")),
        }
    }

    /// Reports the distinct clients of completed days (and today's with `force`), at most
    /// `MAX_USAGE_ENTRIES` ids per call; what was not delivered is kept for the next day.
    fn report_usage_one(&self, transport: &Transport, code: &str, force: bool) {
        let today = day_of(self.clock.now_secs());
        let days: Vec<(i64, Vec<String>)> = {
            let c = self.clients.lock().expect("clients");
            let Some(per_day) = c.get(code) else { return };
            per_day
                .iter()
                .filter(|(d, _)| force || **d < today)
                .map(|(d, ids)| (*d, ids.iter().cloned().collect()))
                .collect()
        };
        for (day, ids) in days {
            let mut ok = true;
            for chunk in ids.chunks(api::MAX_USAGE_ENTRIES) {
                let req = api::UsageRequest {
                    usage_info: vec![api::Usage {
                        license: code.to_string(),
                        software_usage_info: chunk
                            .iter()
                            .map(|id| api::SoftwareUsageInfo::id(id))
                            .collect(),
                    }],
                };
                match transport.report_usage(&req) {
                    Ok(_) => {
                        self.usage_reports.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        log::warn!("authcode: usage report of {code} failed: {e}");
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                let mut c = self.clients.lock().expect("clients");
                if let Some(per_day) = c.get_mut(code) {
                    if day == today {
                        let mut r = self.reported.lock().expect("reported");
                        let e = r.entry(code.to_string()).or_insert((day, BTreeSet::new()));
                        if e.0 != day {
                            *e = (day, BTreeSet::new());
                        }
                        e.1.extend(ids.iter().cloned());
                    }
                    // Ids seen while the report was in flight stay for the next one.
                    if let Some(set) = per_day.get_mut(&day) {
                        for id in &ids {
                            set.remove(id);
                        }
                        if set.is_empty() {
                            per_day.remove(&day);
                        }
                    }
                }
            }
        }
    }

    /// Keeps `rec` for `code`, ends the code's in-flight marker and saves the store; `what`
    /// (activated, recovered) names what happened when saving fails.
    fn remember(&self, code: &str, rec: &CodeRecord, what: &str) -> Result<(), OpError> {
        self.records
            .write()
            .expect("records")
            .insert(code.to_string(), rec.clone());
        self.in_flight.lock().expect("in_flight").remove(code);
        self.persist()
            .map_err(|e| OpError::new(STORE_FAILED, format!("{what}, but not saved: {e}")))
    }

    fn persist(&self) -> Result<(), crate::store::StoreError> {
        // One lock at a time (status() holds the records while it reads the clients).
        let clients = self.clients.lock().expect("clients").clone();
        let in_flight = self.in_flight.lock().expect("in_flight").clone();
        let stored = Stored {
            clients,
            in_flight,
            version: 1,
            codes: self
                .records
                .read()
                .expect("records")
                .values()
                .cloned()
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&stored).expect("records serialise");
        crate::store::ensure_dir(&self.state_dir, 0o700)?;
        crate::store::atomic_write(&self.path, &bytes, 0o600)
    }

    fn best_for(&self, product: &str, now: i64) -> Option<(CodeRecord, logic::Derived)> {
        let cfg = self.cfg();
        let recs = self.records.read().expect("records");
        recs.values()
            .filter(|r| r.product == product)
            .map(|r| {
                let d = logic::derive(r, now, cfg.grace_days, cfg.offline_days, cfg.offline_policy);
                (r.clone(), d)
            })
            .max_by_key(|(r, d)| (d.allowed, r.activated_at))
    }

    /// Counts `client` as a user of `product` today.
    pub fn client_seen(&self, product: &str, client: &str) -> Result<String, OpError> {
        let now = self.clock.now_secs();
        let (rec, _) = self.best_for(product, now).ok_or_else(|| {
            OpError::new(
                NO_CODE,
                format!("no authorization code is activated for product {product:?}"),
            )
        })?;
        if client.is_empty() || client.len() > api::MAX_ID_LEN {
            return Err(OpError::new(
                crate::protocol::codes::INVALID_PARAMS,
                format!("client must be 1..{} bytes", api::MAX_ID_LEN),
            ));
        }
        self.note_client(&rec.code, client, now);
        Ok(rec.code)
    }

    fn note_client(&self, code: &str, client: &str, now: i64) {
        let today = day_of(now);
        if self
            .reported
            .lock()
            .expect("reported")
            .get(code)
            .is_some_and(|(d, ids)| *d == today && ids.contains(client))
        {
            return;
        }
        let mut c = self.clients.lock().expect("clients");
        let set = c
            .entry(code.to_string())
            .or_default()
            .entry(day_of(now))
            .or_default();
        if !set.contains(client) {
            set.insert(client.to_string());
            self.clients_dirty.store(true, Ordering::Relaxed);
            drop(c);
            self.send(Job::Usage(code.to_string()));
        }
    }

    /// The `license.check` answer for a product sold by authorization code, or `None`.
    /// A lookup: the first check of the day only signals the network thread.
    pub fn check(&self, product: &str, peer_uid: u32, now: i64) -> Option<Value> {
        let (rec, d) = self.best_for(product, now)?;
        self.note_client(&rec.code, &format!("uid:{peer_uid}"), now);
        let due = {
            let mut q = self.queried.lock().expect("queried");
            let due = query_due(q.get(product).copied(), now);
            if due {
                q.insert(product.to_string(), day_of(now));
            }
            due
        };
        if due {
            let codes = self.codes_of(product);
            self.send(Job::Daily(codes, false, None));
        }
        let changed = {
            let mut fed = self.fed.lock().expect("fed");
            let changed = fed.get(&rec.code).is_some_and(|s| *s != d.state);
            if changed {
                fed.insert(rec.code.clone(), d.state);
            }
            changed
        };
        if changed {
            self.send(Job::Feed(rec.code.clone()));
        }
        let left = d.until.map(|t| (t - now).max(0));
        Some(json!({
            "product": rec.product,
            "license_id": format!("code:{}", rec.code),
            "kind": "authorization_code",
            "state": d.state,
            "allowed": d.allowed,
            "reason": d.reason,
            "not_after": rec.expire_time.map(format_rfc3339),
            "secs_left": left,
            "days_left": left.map(|s| s / logic::DAY),
        }))
    }

    fn codes_of(&self, product: &str) -> Vec<String> {
        self.records
            .read()
            .expect("records")
            .values()
            .filter(|r| r.product == product)
            .map(|r| r.code.clone())
            .collect()
    }

    /// Runs the daily query and usage report now, today's usage included, and waits.
    pub async fn sync(&self) -> Result<(), OpError> {
        let codes: Vec<String> = self
            .records
            .read()
            .expect("records")
            .keys()
            .cloned()
            .collect();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(Job::Daily(codes, true, Some(tx))) {
            return Err(OpError::internal(
                "the authorization-code thread is not running",
            ));
        }
        rx.await
            .map_err(|_| OpError::internal("the authorization-code thread stopped"))
    }

    fn describe(&self, r: &CodeRecord, now: i64) -> Value {
        let cfg = self.cfg();
        let d = logic::derive(r, now, cfg.grace_days, cfg.offline_days, cfg.offline_policy);
        let pending: usize = self
            .clients
            .lock()
            .expect("clients")
            .get(&r.code)
            .map(|m| m.values().map(BTreeSet::len).sum())
            .unwrap_or(0);
        json!({
            "code": r.code,
            "license_id": format!("code:{}", r.code),
            "product": r.product,
            "product_id": r.product_id,
            "order_id": r.order_id,
            "amount": r.amount,
            "status": r.status,
            "expire_time": r.expire_time.map(format_rfc3339),
            "state": d.state,
            "allowed": d.allowed,
            "reason": d.reason,
            "activated_at": format_rfc3339(r.activated_at),
            "last_ok_at": format_rfc3339(r.last_ok_at),
            "last_query_at": r.last_query_at.map(format_rfc3339),
            "last_error": r.last_error,
            "clients_pending": pending,
        })
    }

    pub fn status(&self) -> Value {
        let now = self.clock.now_secs();
        let cfg = self.cfg();
        let codes: Vec<Value> = self
            .records
            .read()
            .expect("records")
            .values()
            .map(|r| self.describe(r, now))
            .collect();
        json!({
            "mode": cfg.mode,
            "codes": codes,
            "heartbeats": self.heartbeats.load(Ordering::Relaxed),
            "usage_reports": self.usage_reports.load(Ordering::Relaxed),
            "load_error": self.load_error,
            "source": self.source.snapshot(),
        })
    }
}

type Loaded = (BTreeMap<String, CodeRecord>, Clients, InFlight);

/// Whether a failed activation was answered (so nothing is in flight any more): a
/// refusal, a gateway error or a bad request. Timeouts and unreadable answers may hide
/// an activation that happened.
fn answer_settled(e: &ClientError) -> bool {
    match e {
        ClientError::Api(ApiError::Refused { code, .. }) => !code.is_transient(),
        ClientError::Api(ApiError::Gateway { .. } | ApiError::Invalid(_)) => true,
        ClientError::Config(_) => true,
        _ => false,
    }
}

fn load(path: &Path) -> Result<Loaded, String> {
    let Some(bytes) = crate::store::read_optional(path).map_err(|e| e.to_string())? else {
        return Ok(Default::default());
    };
    let s: Stored = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not readable: {e}", path.display()))?;
    Ok((
        s.codes.into_iter().map(|r| (r.code.clone(), r)).collect(),
        s.clients,
        s.in_flight,
    ))
}

impl Service for AuthcodeService {
    fn name(&self) -> &'static str {
        "authorization codes"
    }

    fn start(self: Arc<Self>, _cfg: Arc<Config>) -> Step {
        self.begin();
        done()
    }

    fn reconfigure(&self, _old: &Config, new: &Config) {
        self.apply_config(&new.authcode);
    }

    fn shutdown(self: Arc<Self>) -> Step {
        self.stop();
        done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(http: u16, code: &str) -> ClientError {
        ClientError::Api(ApiError::Refused {
            http,
            code: ErrorCode::from_code(code),
            msg: "m".into(),
        })
    }

    #[test]
    fn each_refusal_gets_a_message_and_its_code() {
        for (code, words) in [
            ("92020001", "try again later"),
            ("92020002", "parameters"),
            ("92020003", "already activated"),
            ("92020004", "not received"),
            ("92020005", "does not exist"),
            ("92020011", "not been activated"),
            ("92020020", "not valid"),
            ("95000001", "parameters"),
            ("95000003", "Content-Type"),
            (RELAY_FORBIDDEN, "another device"),
            ("99999999", "undocumented"),
        ] {
            let e = op_error(&refused(200, code));
            assert_eq!(e.code, ACTIVATION_REFUSED);
            assert!(e.message.contains(words), "{code}: {}", e.message);
            assert!(e.message.contains(code), "{}", e.message);
            assert_eq!(e.details.as_ref().unwrap()["error_code"], code);
        }
        assert_eq!(op_error(&refused(502, RELAY_UNREACHABLE)).code, UNREACHABLE);
        assert_eq!(
            op_error(&ClientError::Unreachable("x".into())).code,
            UNREACHABLE
        );
        assert_eq!(
            op_error(&ClientError::Config("x".into())).code,
            AUTHCODE_CONFIG
        );
    }
}
