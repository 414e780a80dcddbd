//! The usage service held by `Agent`: resolves meters, hands records to the ledger, and
//! runs the upload thread (close hours at each hour boundary plus the lateness allowance,
//! deliver what is pending, back off with jitter after transient failures). With nothing
//! recorded (or everything recorded pruned), the thread sleeps until the next record: an
//! idle agent does not wake every hour to close nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use super::config::{UsageConfig, UsageMode};
use super::hours::{self, Key, HOUR};
use super::ledger::{Item, Ledger, LedgerConfig, LedgerError};
use super::relay::RelayClient;
use super::secret::Secret;
use super::state::{amount, Delivery, Entry};
use super::upload::{self, Client, Round};
use crate::clock::{format_rfc3339, Clock};
use crate::config::Config;
use crate::device_service::DeviceState;
use crate::services::{Service, Step};
use crate::source_health::SourceHealth;

/// Resolves a meter name to what its usage is billed to.
///
/// Today [`ConfigMeters`] answers from `[usage.meters]`. The license module (another
/// branch) plugs in here: a `LicenseMeters` implementing this trait that answers with the
/// installed license's instance id, placed after `ConfigMeters` in a [`Chain`] built in
/// `Agent::new` (see `UsageService::new`'s caller).
pub trait MeterResolver: Send + Sync {
    /// `Ok(None)`: this source does not know the meter (the next source is asked).
    fn resolve(&self, cfg: &UsageConfig, meter: &str) -> Result<Option<Key>, String>;
}

/// Meters from `[usage.meters]`.
pub struct ConfigMeters;

impl MeterResolver for ConfigMeters {
    fn resolve(&self, cfg: &UsageConfig, meter: &str) -> Result<Option<Key>, String> {
        Ok(cfg.meters.get(meter).map(|m| Key {
            instance: m.instance_id.clone(),
            meter: meter.to_string(),
            pkg: m.package_instance_id.clone(),
        }))
    }
}

/// Asks each source in turn; the first that knows the meter wins.
pub struct Chain(pub Vec<Box<dyn MeterResolver>>);

impl MeterResolver for Chain {
    fn resolve(&self, cfg: &UsageConfig, meter: &str) -> Result<Option<Key>, String> {
        for r in &self.0 {
            if let Some(k) = r.resolve(cfg, meter)? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }
}

/// How the last delivery attempt went (memory only; the ledger keeps per-record facts).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadInfo {
    pub last_attempt_at: Option<String>,
    pub last_round: Option<Round>,
    pub last_success_at: Option<String>,
    pub consecutive_failures: u32,
    /// The last failed attempt's reason and time (kept after a later success).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub last_close_at: Option<String>,
    /// Why hours are not being closed right now, if they are not.
    pub close_blocked: Option<String>,
}

/// What `usage.flush` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlushResult {
    pub closed_records: usize,
    pub requeued: usize,
    pub round: Option<Round>,
    pub pending: usize,
    pub not_sent_because: Option<String>,
}

enum Wake {
    Flush {
        retry_parked: bool,
        reply: oneshot::Sender<FlushResult>,
    },
    Stop,
    /// Usage was recorded while the thread slept with nothing to close.
    Recorded,
}

struct Running {
    ledger: Ledger,
    wake: Mutex<mpsc::Sender<Wake>>,
    upload: Arc<Mutex<UploadInfo>>,
    /// Set by `stop`: the upload thread ends even before the ledger is open.
    stopped: Arc<AtomicBool>,
    /// The upload thread sleeps with nothing to close: the next record wakes it.
    asleep: Arc<AtomicBool>,
}

/// What the usage service needs from the rest of the agent, handed over when it is built.
pub struct UsageInputs {
    /// The configuration in force (the upload thread reads it before every round).
    pub config: watch::Receiver<Arc<Config>>,
    pub clock: Arc<dyn Clock>,
    /// The device identity: closing an hour needs the device code (metering_sn).
    pub device: watch::Receiver<DeviceState>,
    /// Told the `Date` of every upstream answer (a trusted time for the licenses).
    pub time_seen: Arc<dyn Fn(i64) + Send + Sync>,
}

pub struct UsageService {
    resolver: Box<dyn MeterResolver>,
    inputs: UsageInputs,
    running: OnceLock<Running>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("unknown meter {0:?}: add it under [usage.meters] with its instance_id")]
    UnknownMeter(String),
    #[error("meter {0:?}: {1}")]
    Resolve(String, String),
    #[error("the usage service has not started")]
    NotStarted,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl UsageService {
    pub fn new(resolver: Box<dyn MeterResolver>, inputs: UsageInputs) -> UsageService {
        UsageService {
            resolver,
            inputs,
            running: OnceLock::new(),
        }
    }

    /// Opens the ledger (on its own thread) and starts the upload thread.
    fn open(&self, cfg: &Config) {
        let ledger = Ledger::start(
            LedgerConfig {
                dir: cfg.agent.state_dir.join("usage"),
                max_bytes: cfg.usage.max_bytes,
            },
            self.inputs.clock.clone(),
        );
        let (tx, rx) = mpsc::channel();
        let upload = Arc::new(Mutex::new(UploadInfo::default()));
        let stopped = Arc::new(AtomicBool::new(false));
        let asleep = Arc::new(AtomicBool::new(false));
        let uploader = Uploader {
            asleep: asleep.clone(),
            config: self.inputs.config.clone(),
            device: self.inputs.device.clone(),
            time_seen: self.inputs.time_seen.clone(),
            stopped: stopped.clone(),
            clock: self.inputs.clock.clone(),
            ledger: ledger.clone(),
            info: upload.clone(),
            health: SourceHealth::new("usage upload"),
            client: None,
            relay: None,
            attempt: 0,
            retry_at_ms: Some(0),
            close_wanted: false,
        };
        std::thread::Builder::new()
            .name("usage-upload".into())
            .spawn(move || uploader.run(rx))
            .expect("spawning the upload thread");
        match route(cfg) {
            Ok(Route::Relay { base, .. }) => {
                log::info!("usage: relay mode: closed hours go to the seller's server {base}");
                if cfg.usage.key_file().is_some() {
                    log::warn!(
                        "usage: usage.key_file is set but unused in relay mode: remove the \
                         interconnection key from this device (docs/usage.md)"
                    );
                }
            }
            Ok(Route::Direct(_)) => log::warn!(
                "usage: {DIRECT_WARNING}; uploading to {}",
                cfg.usage.upstreams.join(", ")
            ),
            // Recording without uploading is a valid setup; a key file that is set but
            // unusable is a mistake worth a warning.
            Err(why) if cfg.usage.key_file().is_none() => {
                log::info!("usage: uploading is off: {why}")
            }
            Err(why) => log::warn!("usage: uploading is off: {why}"),
        }
        let _ = self.running.set(Running {
            ledger,
            wake: Mutex::new(tx),
            upload,
            stopped,
            asleep,
        });
    }

    /// Finishes queued ledger writes and stops both threads (an upload in flight is
    /// abandoned; its records stay pending and are resent with the same metering_sn).
    pub fn stop(&self) {
        if let Some(r) = self.running.get() {
            r.stopped.store(true, Ordering::Relaxed);
            let _ = r.wake.lock().expect("wake lock").send(Wake::Stop);
            r.ledger.stop();
        }
    }

    pub fn resolve(&self, cfg: &UsageConfig, meter: &str) -> Result<Key, RecordError> {
        match self.resolver.resolve(cfg, meter) {
            Ok(Some(k)) => Ok(k),
            Ok(None) => Err(RecordError::UnknownMeter(meter.into())),
            Err(e) => Err(RecordError::Resolve(meter.into(), e)),
        }
    }

    /// Records items durably; answers each item's hour.
    pub async fn record(&self, items: Vec<Item>) -> Result<Vec<i64>, RecordError> {
        let r = self.running.get().ok_or(RecordError::NotStarted)?;
        let hours = r.ledger.record(items).await?;
        // The ledger's state shows the record before this: an upload thread that found it
        // empty raised the flag first (see `Uploader::run`), so it is seen here.
        if r.asleep.load(Ordering::Relaxed) && r.asleep.swap(false, Ordering::SeqCst) {
            let _ = r.wake.lock().expect("wake lock").send(Wake::Recorded);
        }
        Ok(hours)
    }

    /// Closes what can be closed and delivers now; waits for the outcome.
    pub async fn flush(&self, retry_parked: bool) -> Result<FlushResult, RecordError> {
        let r = self.running.get().ok_or(RecordError::NotStarted)?;
        let (tx, rx) = oneshot::channel();
        r.wake
            .lock()
            .expect("wake lock")
            .send(Wake::Flush {
                retry_parked,
                reply: tx,
            })
            .map_err(|_| RecordError::NotStarted)?;
        rx.await.map_err(|_| RecordError::NotStarted)
    }

    /// Waits (bounded) for the ledger to be opened, so status never shows an empty model
    /// for a ledger still being replayed.
    pub async fn wait_open(&self) {
        if let Some(r) = self.running.get() {
            if r.ledger.wait_open(Duration::ZERO) {
                return;
            }
            let l = r.ledger.clone();
            let _ = tokio::task::spawn_blocking(move || l.wait_open(Duration::from_secs(10))).await;
        }
    }

    /// How the last delivery attempts went; `None` before the service started.
    pub fn upload_info(&self) -> Option<UploadInfo> {
        let r = self.running.get()?;
        let info = r.upload.lock().expect("upload lock").clone();
        Some(info)
    }

    pub fn status(&self, full: &crate::config::Config, with_records: bool) -> Value {
        let cfg = &full.usage;
        let Some(r) = self.running.get() else {
            return json!({"started": false});
        };
        let info = r.ledger.info();
        let upload = r.upload.lock().expect("upload lock").clone();
        let uploading = match route(full) {
            Ok(Route::Relay { base, .. }) => {
                json!({"enabled": true, "mode": "relay", "relay": base})
            }
            Ok(Route::Direct(_)) => json!({"enabled": true, "mode": "direct",
                "upstreams": cfg.upstreams, "warning": DIRECT_WARNING}),
            Err(why) => json!({"enabled": false, "reason": why, "upstreams": cfg.upstreams}),
        };
        let st = r.ledger.state();
        let (pending, delivered, parked_n) = st.count();
        let mut oldest_pending: Option<i64> = None;
        let mut last_delivered: Option<(i64, String)> = None;
        let mut parked = Vec::new();
        for s in st.records.values() {
            match &s.delivery {
                Delivery::Pending => {
                    oldest_pending =
                        Some(oldest_pending.map_or(s.rec.begin, |o| o.min(s.rec.begin)))
                }
                Delivery::Delivered { at, upstream, .. } => {
                    if last_delivered.as_ref().is_none_or(|(t, _)| at > t) {
                        last_delivered = Some((*at, upstream.clone()));
                    }
                }
                Delivery::Relayed { .. } => {}
                Delivery::Parked { at, reason } => parked.push(json!({
                    "metering_sn": s.rec.sn,
                    "meter": s.rec.key.meter,
                    "instance_id": s.rec.key.instance,
                    "hour": format_rfc3339(s.rec.begin),
                    "usage_value": s.rec.usage_value,
                    "parked_at": format_rfc3339(*at),
                    "reason": reason,
                })),
            }
        }
        let mut open = serde_json::Map::new();
        for ((h, k), v) in &st.open {
            let e = open.entry(k.meter.clone()).or_insert_with(
                || json!({"hours": 0, "value": "0", "oldest_hour": format_rfc3339(*h)}),
            );
            e["hours"] = json!(e["hours"].as_u64().unwrap_or(0) + 1);
            let prev = super::decimal::parse(e["value"].as_str().unwrap_or("0"))
                .map(|a| a.0)
                .unwrap_or(0);
            e["value"] = json!(amount(prev + v));
        }
        let totals: serde_json::Map<String, Value> = st
            .totals
            .iter()
            .map(|(m, t)| {
                (
                    m.clone(),
                    json!({"records": t.records, "value": amount(t.value)}),
                )
            })
            .collect();
        let carry: Vec<Value> = st
            .carry
            .iter()
            .map(|(k, v)| json!({"meter": k.meter, "instance_id": k.instance, "value": amount(*v)}))
            .collect();
        let dropped_t = |m: &std::collections::BTreeMap<String, super::state::Totals>| -> Value {
            m.iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        json!({"records": t.records, "value": amount(t.value)}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let mut v = json!({
            "started": true,
            "ledger": info,
            "uploading": uploading,
            "closed_before": (st.closed_before > 0).then(|| format_rfc3339(st.closed_before)),
            "open": open,
            "carry": carry,
            "pending": {"records": pending, "oldest_hour": oldest_pending.map(format_rfc3339)},
            "relayed": {"records": st.relayed()},
            "delivered": {
                "records": delivered,
                "last_at": last_delivered.as_ref().map(|(t, _)| format_rfc3339(*t)),
                "last_upstream": last_delivered.map(|(_, u)| u),
            },
            "parked": {"records": parked_n, "list": parked},
            "totals": totals,
            "dropped": {
                "unsent": dropped_t(&st.dropped.unsent),
                "unclosed": dropped_t(&st.dropped.unclosed),
                "delivered_history": st.dropped.delivered_history,
            },
            "upload": upload,
        });
        if with_records {
            let recs: Vec<Value> = st
                .records
                .values()
                .map(|s| {
                    json!({
                        "metering_sn": s.rec.sn,
                        "meter": s.rec.key.meter,
                        "instance_id": s.rec.key.instance,
                        "package_instance_id": s.rec.key.pkg,
                        "begin_time": crate::clock::format_compact(s.rec.begin),
                        "end_time": crate::clock::format_compact(s.rec.end()),
                        "record_time": crate::clock::format_compact(s.rec.record_time),
                        "usage_value": s.rec.usage_value,
                        "delivery": s.delivery,
                    })
                })
                .collect();
            v["records"] = json!(recs);
        }
        v
    }
}

/// Said in the log, `usage.status` and `config check` whenever direct mode is on.
pub const DIRECT_WARNING: &str = "DIRECT MODE: the seller's interconnection key is on this \
    device (usage.key_file); whoever is root here can read it and sign usage for any \
    instance of this seller. Use relay mode (usage.relay_url) unless this is sealed \
    hardware (docs/usage.md)";

/// Where closed hours go.
pub enum Route {
    /// The seller's server, signed with the device key.
    Relay {
        base: String,
        extra_ca: Option<std::path::PathBuf>,
        ca_key: &'static str,
    },
    /// The marketplace, signed with the interconnection key.
    Direct(Secret),
}

/// The route this configuration gives, or why nothing is uploaded.
pub fn route(cfg: &crate::config::Config) -> Result<Route, String> {
    let u = &cfg.usage;
    let (relay, from_authcode) = if !u.relay_url.is_empty() {
        (u.relay_url.as_str(), false)
    } else {
        (cfg.authcode.relay_url.as_str(), true)
    };
    let relay_route = || {
        let (extra_ca, ca_key) = match (u.extra_ca_file(), cfg.authcode.extra_ca()) {
            (Some(p), _) => (Some(p.to_path_buf()), "usage.extra_ca_file"),
            (None, Some(p)) if from_authcode => (Some(p.to_path_buf()), "authcode.extra_ca_file"),
            _ => (None, "usage.extra_ca_file"),
        };
        Route::Relay {
            base: relay.trim_end_matches('/').to_string(),
            extra_ca,
            ca_key,
        }
    };
    match planned(cfg)? {
        Planned::Relay(_) => Ok(relay_route()),
        Planned::Direct => match u.key_file() {
            Some(path) => Secret::load(path).map(Route::Direct),
            None => Err("usage.key_file is not set (direct mode)".to_string()),
        },
    }
}

/// The mode a configuration selects, without reading any file (`config check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    Relay(String),
    Direct,
}

pub fn planned(cfg: &crate::config::Config) -> Result<Planned, String> {
    let u = &cfg.usage;
    let relay = if u.relay_url.is_empty() {
        cfg.authcode.relay_url.trim_end_matches('/')
    } else {
        u.relay_url.trim_end_matches('/')
    };
    match u.mode {
        UsageMode::Relay if relay.is_empty() => Err(
            "usage.mode = \"relay\" needs usage.relay_url (or authcode.relay_url): usage is \
             recorded durably but not uploaded"
                .into(),
        ),
        UsageMode::Relay => Ok(Planned::Relay(relay.to_string())),
        UsageMode::Direct => Ok(Planned::Direct),
        UsageMode::Auto if !relay.is_empty() => Ok(Planned::Relay(relay.to_string())),
        UsageMode::Auto if u.key_file().is_some() => Ok(Planned::Direct),
        UsageMode::Auto => Err(
            "no relay URL (usage.relay_url, authcode.relay_url) and no usage.key_file: usage \
             is recorded durably but not uploaded"
                .into(),
        ),
    }
}

struct Uploader {
    config: watch::Receiver<Arc<Config>>,
    device: watch::Receiver<DeviceState>,
    time_seen: Arc<dyn Fn(i64) + Send + Sync>,
    stopped: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
    ledger: Ledger,
    info: Arc<Mutex<UploadInfo>>,
    /// Logs a failure once per change of error; its last error goes into `info`.
    health: SourceHealth,
    /// Rebuilt when its configuration changes.
    client: Option<(ClientKey, Client)>,
    relay: Option<(ClientKey, RelayClient)>,
    /// Consecutive transient failures.
    attempt: u32,
    /// When to try delivering again (Unix ms); `None` = only on a new closed hour.
    retry_at_ms: Option<i64>,
    /// A flush found the hours could not be closed (no device identity yet): close and
    /// deliver as soon as they can be, not only at the next hour boundary.
    close_wanted: bool,
    /// Raised while the thread sleeps with nothing to close (`Running::asleep`).
    asleep: Arc<AtomicBool>,
}

#[derive(PartialEq)]
struct ClientKey {
    upstreams: Vec<String>,
    extra_ca: std::path::PathBuf,
    timeout: u64,
}

/// How long to wait for the identity before trying to close hours again.
const IDENTITY_RETRY_MS: i64 = 30_000;
/// How often a flush that could not close hours tries again.
const FLUSH_CLOSE_RETRY_MS: i64 = 1_000;
/// How long a flush waits for the device identity still being computed at start.
const FLUSH_IDENTITY_WAIT: Duration = Duration::from_secs(5);

impl Uploader {
    fn run(mut self, rx: mpsc::Receiver<Wake>) {
        // What is pending is known only once the ledger is replayed.
        while !self.ledger.wait_open(Duration::from_secs(1)) {
            if self.stopped.load(Ordering::Relaxed) {
                return;
            }
        }
        let mut close_at_ms = None::<i64>;
        loop {
            let full = self.config.borrow().clone();
            let cfg = full.usage.clone();
            let lateness_ms = cfg.lateness_secs as i64 * 1000;
            let now = self.clock.now_ms();
            // Next close: the end of the current hour plus the lateness allowance. Hours
            // already closable at start are closed at the first boundary (or by a flush),
            // so late usage for them can still arrive while the agent catches up.
            let due = *close_at_ms.get_or_insert_with(|| next_close_ms(now, lateness_ms));
            if !self.close_wanted && self.nothing_recorded() {
                self.asleep.store(true, Ordering::SeqCst);
                // A record that landed before the flag went up is seen here; one after it
                // finds the flag and wakes this thread. A close that fell due meanwhile
                // runs then (it finds only the hours closable by then).
                if self.nothing_recorded() {
                    match rx.recv() {
                        Ok(Wake::Stop) | Err(_) => return,
                        Ok(Wake::Recorded) => {}
                        Ok(Wake::Flush {
                            retry_parked,
                            reply,
                        }) => {
                            self.asleep.store(false, Ordering::SeqCst);
                            let r = self.flush(&full, retry_parked);
                            let _ = reply.send(r);
                        }
                    }
                }
                self.asleep.store(false, Ordering::SeqCst);
                continue;
            }
            let mut wake_at = due;
            if self.close_wanted {
                wake_at = wake_at.min(now + FLUSH_CLOSE_RETRY_MS);
            }
            if let Some(r) = self.retry_at_ms {
                let st = self.ledger.state();
                let waiting = st.count().0 > 0 || st.relayed() > 0;
                drop(st);
                if waiting {
                    wake_at = wake_at.min(r);
                }
            }
            let timeout = Duration::from_millis((wake_at - now).clamp(0, 3_600_000) as u64);
            match rx.recv_timeout(timeout) {
                Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Wake::Recorded) => {}
                Ok(Wake::Flush {
                    retry_parked,
                    reply,
                }) => {
                    let r = self.flush(&full, retry_parked);
                    let _ = reply.send(r);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.clock.now_ms();
                    if now >= due || self.close_wanted {
                        match self.close(&cfg) {
                            Ok(_) => {
                                self.close_wanted = false;
                                close_at_ms = Some(next_close_ms(now, lateness_ms));
                            }
                            Err(_) if now >= due => close_at_ms = Some(now + IDENTITY_RETRY_MS),
                            Err(_) => {}
                        }
                        self.prune(&cfg);
                        self.retry_at_ms.get_or_insert(now);
                    }
                    if self.retry_at_ms.is_some_and(|r| now >= r) {
                        let _ = self.deliver(&full);
                    }
                }
            }
        }
    }

    /// Nothing open, carried or kept: no hour to close, nothing to deliver or prune.
    fn nothing_recorded(&self) -> bool {
        let st = self.ledger.state();
        st.open.is_empty() && st.carry.is_empty() && st.records.is_empty()
    }

    /// Closes every closable hour. Needs the device code for metering_sn.
    fn close(&mut self, cfg: &UsageConfig) -> Result<usize, String> {
        let device = self.device.borrow().clone();
        let code = match device {
            DeviceState::Ready(r) if r.settled => r.code.clone(),
            DeviceState::Ready(r) => {
                return self.blocked(format!("device identity settling: {}", r.detail))
            }
            DeviceState::Pending => return self.blocked("device identity not computed yet".into()),
            DeviceState::Failed(e) => {
                return self.blocked(format!("device identity unavailable: {e}"))
            }
        };
        match self.ledger.close_hours(&code, cfg.lateness_secs as i64) {
            Ok(n) => {
                let mut i = self.info.lock().expect("upload lock");
                i.close_blocked = None;
                i.last_close_at = Some(format_rfc3339(self.clock.now_secs()));
                if n > 0 {
                    log::info!("usage: closed {n} hourly records");
                }
                Ok(n)
            }
            Err(e) => self.blocked(format!("closing hours failed: {e}")),
        }
    }

    /// Right after start the identity is still being computed (a second or two, longer on
    /// a loaded machine): a flush then waits for it rather than leaving the hours open.
    /// Settling (machine-id not initialized) can last minutes, so that is not waited for.
    fn wait_for_identity(&self, limit: Duration) {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            if !matches!(*self.device.borrow(), DeviceState::Pending) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn blocked(&self, why: String) -> Result<usize, String> {
        let mut info = self.info.lock().expect("upload lock");
        // A flush waiting for the identity retries every second: log each reason once.
        if info.close_blocked.as_deref() != Some(why.as_str()) {
            log::info!("usage: hours stay open: {why}");
        }
        info.close_blocked = Some(why.clone());
        Err(why)
    }

    fn prune(&self, cfg: &UsageConfig) {
        let cutoff = self.clock.now_secs() - cfg.max_age_days as i64 * 86_400;
        if let Err(e) = self.ledger.prune(cutoff) {
            log::warn!("usage: pruning old records failed: {e}");
        }
    }

    fn client(&mut self, cfg: &UsageConfig) -> Result<&Client, String> {
        let key = ClientKey {
            upstreams: cfg.upstreams.clone(),
            extra_ca: cfg.extra_ca_file.clone(),
            timeout: cfg.upload_timeout_secs,
        };
        if self.client.as_ref().is_none_or(|(k, _)| *k != key) {
            let seen = self.time_seen.clone();
            let c = Client::new(
                cfg.upstreams.clone(),
                cfg.extra_ca_file(),
                Duration::from_secs(cfg.upload_timeout_secs),
            )?
            .with_date_observer(move |t| seen(t));
            self.client = Some((key, c));
        }
        Ok(&self.client.as_ref().expect("just set").1)
    }

    fn relay_client(
        &mut self,
        base: &str,
        extra_ca: Option<&std::path::Path>,
        ca_key: &str,
        cfg: &UsageConfig,
    ) -> Result<&RelayClient, String> {
        let key = ClientKey {
            upstreams: vec![base.to_string()],
            extra_ca: extra_ca.map(|p| p.to_path_buf()).unwrap_or_default(),
            timeout: cfg.upload_timeout_secs,
        };
        if self.relay.as_ref().is_none_or(|(k, _)| *k != key) {
            let state_dir = self.config.borrow().agent.state_dir.clone();
            let path = crate::authcode::transport::relay_key_path(&state_dir);
            let device_key = crate::authcode::relay_auth::load_or_create_key(&path)
                .map_err(|e| format!("the device key {}: {e}", path.display()))?;
            let c = RelayClient::new(
                base,
                extra_ca,
                ca_key,
                Duration::from_secs(cfg.upload_timeout_secs),
                device_key,
            )?;
            self.relay = Some((key, c));
        }
        Ok(&self.relay.as_ref().expect("just set").1)
    }

    /// One delivery round; schedules the next try. Returns the round or why none ran.
    fn deliver(&mut self, full: &crate::config::Config) -> Result<Round, String> {
        let cfg = &full.usage;
        let (pending, relayed) = {
            let st = self.ledger.state();
            (st.count().0, st.relayed())
        };
        if pending == 0 && relayed == 0 {
            self.retry_at_ms = None;
            return Ok(Round::default());
        }
        let route = match route(full) {
            Ok(r) => r,
            Err(e) => {
                // Nothing to retry until the configuration changes or a flush asks.
                self.retry_at_ms = None;
                return Err(e);
            }
        };
        let clock = self.clock.clone();
        let ledger = self.ledger.clone();
        let batch = cfg.batch_size;
        let result = match &route {
            Route::Direct(key) => match self.client(cfg) {
                Ok(client) => upload::deliver(&ledger, client, key, clock.as_ref(), batch)
                    .map_err(|e| format!("recording the outcome failed: {e}")),
                Err(e) => Err(e),
            },
            Route::Relay {
                base,
                extra_ca,
                ca_key,
            } => match self.relay_client(base, extra_ca.as_deref(), ca_key, cfg) {
                Ok(client) => super::relay::deliver(&ledger, client, clock.as_ref(), batch)
                    .map_err(|e| format!("recording the outcome failed: {e}")),
                Err(e) => Err(e),
            },
        };
        let now = self.clock.now_ms();
        let mut info = self.info.lock().expect("upload lock");
        info.last_attempt_at = Some(format_rfc3339(now / 1000));
        let failed = match &result {
            Ok(round) => {
                info.last_round = Some(round.clone());
                if round.delivered > 0 || round.relayed > 0 {
                    info.last_success_at = Some(format_rfc3339(now / 1000));
                }
                match &round.transient {
                    Some(t) => self.health.failure(now / 1000, t),
                    None => self.health.success(now / 1000),
                }
                round.transient.is_some()
            }
            Err(e) => {
                self.health.failure(now / 1000, e);
                true
            }
        };
        let h = self.health.snapshot();
        info.last_error = h.last_error;
        info.last_error_at = h.last_error_at;
        if failed {
            self.attempt = self.attempt.saturating_add(1);
            let delay = backoff_ms(cfg, self.attempt);
            self.retry_at_ms = Some(now + delay);
            info.consecutive_failures = self.attempt;
            info.next_attempt_at = Some(format_rfc3339((now + delay) / 1000));
        } else {
            self.attempt = 0;
            info.consecutive_failures = 0;
            // Records the relay holds: ask again later until it reports them done.
            if self.ledger.state().relayed() > 0 {
                let at = now + cfg.relay_poll_secs as i64 * 1000;
                self.retry_at_ms = Some(at);
                info.next_attempt_at = Some(format_rfc3339(at / 1000));
            } else {
                self.retry_at_ms = None;
                info.next_attempt_at = None;
            }
        }
        result
    }

    fn flush(&mut self, full: &crate::config::Config, retry_parked: bool) -> FlushResult {
        let cfg = &full.usage;
        let mut out = FlushResult::default();
        self.wait_for_identity(FLUSH_IDENTITY_WAIT);
        match self.close(cfg) {
            Ok(n) => {
                out.closed_records = n;
                self.close_wanted = false;
            }
            Err(e) => {
                out.not_sent_because = Some(format!(
                    "hours stay open: {e}; they are closed and sent as soon as it is known"
                ));
                self.close_wanted = true;
            }
        }
        if retry_parked {
            let sns: Vec<String> = self
                .ledger
                .state()
                .records
                .values()
                .filter(|s| matches!(s.delivery, Delivery::Parked { .. }))
                .map(|s| s.rec.sn.clone())
                .collect();
            if !sns.is_empty() {
                out.requeued = sns.len();
                if let Err(e) = self.ledger.mark(Entry::Requeued(sns)) {
                    out.requeued = 0;
                    out.not_sent_because = Some(e.to_string());
                }
            }
        }
        match self.deliver(full) {
            Ok(round) => {
                if let Some(t) = &round.transient {
                    out.not_sent_because = Some(t.clone());
                }
                out.round = Some(round);
            }
            Err(e) => out.not_sent_because = Some(e),
        }
        out.pending = self.ledger.state().count().0;
        out
    }
}

/// The end of the hour containing `now - lateness`, plus the lateness: when the next hour
/// becomes closable.
fn next_close_ms(now_ms: i64, lateness_ms: i64) -> i64 {
    let h = hours::hour_of((now_ms - lateness_ms).div_euclid(1000));
    (h + HOUR) * 1000 + lateness_ms
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so many
/// agents that lost the upstream together do not come back together.
fn backoff_ms(cfg: &UsageConfig, attempt: u32) -> i64 {
    crate::backoff::equal_jitter(cfg.backoff_initial_ms, cfg.backoff_max_ms, attempt) as i64
}

impl Service for UsageService {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn start(self: Arc<Self>, cfg: Arc<Config>) -> Step {
        self.open(&cfg);
        crate::services::done()
    }

    fn reconfigure(&self, _old: &Config, _new: &Config) {
        // The upload thread reads the configuration before every round.
    }

    /// Waits for every queued ledger write (off the runtime's workers).
    fn shutdown(self: Arc<Self>) -> Step {
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || self.stop()).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle agent sleeps: with nothing recorded the upload thread does not wake at the
    /// hour's close (it used to, every hour, to close nothing); the first record wakes it
    /// and the hour it lands in is closed at the boundary after it.
    #[tokio::test]
    async fn nothing_recorded_no_hourly_wakeup_and_a_record_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.agent.state_dir = dir.path().to_path_buf();
        let cfg = Arc::new(cfg);
        let (_cfg_tx, config) = watch::channel(cfg.clone());
        // The device identity is not known: every close attempt says so in close_blocked.
        let (_device_tx, device) = watch::channel(DeviceState::Pending);
        let hour = 1_800_000_000 / HOUR * HOUR;
        let lateness = cfg.usage.lateness_secs as i64;
        // The real clock, shifted to half a second before this hour's close.
        struct Shifted(i64);
        impl Clock for Shifted {
            fn now_ms(&self) -> i64 {
                crate::clock::SystemClock.now_ms() + self.0
            }
        }
        let close_ms = (hour + lateness) * 1000;
        let clock = Arc::new(Shifted(close_ms - 500 - crate::clock::SystemClock.now_ms()));
        let svc = UsageService::new(
            Box::new(ConfigMeters),
            UsageInputs {
                config,
                clock: clock.clone(),
                device,
                time_seen: Arc::new(|_| {}),
            },
        );
        svc.open(&cfg);
        svc.wait_open().await;
        let attempted = || svc.upload_info().unwrap().close_blocked.is_some();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(clock.now_ms() > close_ms);
        assert!(!attempted(), "woke at the close with nothing recorded");
        svc.record(vec![Item {
            key: Key {
                instance: "i-1".into(),
                meter: "cpu".into(),
                pkg: None,
            },
            at: clock.now_secs(),
            value: 1_000_000_000,
        }])
        .await
        .unwrap();
        let t0 = std::time::Instant::now();
        while !attempted() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "a record did not wake the upload thread"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        svc.stop();
    }

    #[test]
    fn next_close_is_the_hour_end_plus_lateness() {
        let t0 = 1_700_000_000 / 3600 * 3600 * 1000;
        assert_eq!(next_close_ms(t0 + 10, 300_000), t0 + 300_000);
        assert_eq!(
            next_close_ms(t0 + 300_000, 300_000),
            t0 + 3_600_000 + 300_000
        );
        assert_eq!(next_close_ms(t0 + 1, 0), t0 + 3_600_000);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let cfg = UsageConfig {
            backoff_initial_ms: 1000,
            backoff_max_ms: 10_000,
            ..Default::default()
        };
        for attempt in 1..40 {
            let d = backoff_ms(&cfg, attempt);
            let cap = (1000u64 << (attempt - 1).min(20)).min(10_000) as i64;
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn resolver_chain_asks_in_order() {
        struct Fixed;
        impl MeterResolver for Fixed {
            fn resolve(&self, _: &UsageConfig, m: &str) -> Result<Option<Key>, String> {
                Ok(Some(Key {
                    instance: "from-license".into(),
                    meter: m.into(),
                    pkg: None,
                }))
            }
        }
        let mut cfg = UsageConfig::default();
        cfg.meters.insert(
            "cpu".into(),
            super::super::config::MeterConfig {
                instance_id: "from-config".into(),
                package_instance_id: None,
            },
        );
        let c = Chain(vec![Box::new(ConfigMeters), Box::new(Fixed)]);
        assert_eq!(
            c.resolve(&cfg, "cpu").unwrap().unwrap().instance,
            "from-config"
        );
        assert_eq!(
            c.resolve(&cfg, "gpu").unwrap().unwrap().instance,
            "from-license"
        );
        assert_eq!(ConfigMeters.resolve(&cfg, "gpu").unwrap(), None);
    }
}
