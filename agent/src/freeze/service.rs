//! The running agent's freeze service: holds the lifecycle, saves it (MAC'd, two copies),
//! answers the license service's freeze hook at every verdict rebuild, applies status
//! tokens (socket and drop directory), streams transitions to `watch` subscribers and hands
//! transitions to the action thread.
//!
//! Lock order: the license service's lock, then this one; this service never calls the
//! license service while holding its own lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::actions::{self, ActionConfig, Journal, Side, Want};
use super::anchor;
use super::lifecycle::{External, Input, Lease, LicenseFacts, Machine, Outcome, Phase, Refusal};
use super::state_file::{self, Paths};
use super::token::{self, TokenError};
use super::tpm_anchor::{self, Mode as TpmMode, Verdict as TpmVerdict};
use super::FreezeConfig;
use crate::clock::format_rfc3339;
use crate::config::Config;
use crate::device_service::DeviceState;
use crate::dir_watch::DirWatch;
use crate::license::format::License;
use crate::license::service::{FreezeHook, FreezeVerdict, FreezeView, Verdicts};
use crate::license::verdict::{State, TimeView};
use crate::license::LicenseService;
use crate::services::{done, Service, Step};

/// Error codes of token application (stable, snake_case).
pub mod codes {
    pub const MALFORMED_TOKEN: &str = "malformed_token";
    pub const UNTRUSTED_KEY: &str = "untrusted_key";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const WRONG_DEVICE: &str = "wrong_device";
    pub const DEVICE_PENDING: &str = "device_pending";
    pub const UNKNOWN_LICENSE: &str = "unknown_license";
    pub const STALE_TOKEN: &str = "stale_token";
    pub const TOKEN_FROM_FUTURE: &str = "token_from_future";
    pub const LICENSE_RELEASED: &str = "license_released";
}

/// Why a token was refused: a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRefused {
    pub code: &'static str,
    pub message: String,
}

/// Events a subscriber may fall behind by before it is dropped (it reconnects and gets
/// the current state first).
const SUBSCRIBER_BUFFER: usize = 1024;
/// A status token is a few hundred bytes; a dropped file past this is not one.
pub const MAX_TOKEN_FILE: usize = 64 * 1024;

/// Meta keys of a license that ask for a lease (decimal seconds).
pub const LEASE_SECS: &str = "lease_secs";
pub const LEASE_GRACE_SECS: &str = "lease_grace_secs";

struct Inner {
    machine: Machine,
    /// The installed licenses' facts at the last rebuild of the verdict table.
    real: Vec<LicenseFacts>,
    /// Authorization codes (`code:<CODE>`), fed by the authcode service.
    extra: BTreeMap<String, LicenseFacts>,
    generation: u64,
    products: HashMap<String, String>,
    tamper: Option<String>,
    save_error: Option<String>,
    event_seq: u64,
    subscribers: Vec<Subscriber>,
    /// Transition events not sent yet: they go out once the license verdict table shows
    /// them ([`FreezeHook::verdicts_updated`]), so a watcher that reacts to `frozen` by
    /// calling `license.check` never reads the verdict from before the freeze.
    unpublished: Vec<Value>,
    /// The last trusted time seen (tokens are judged against it).
    now: i64,
    tolerance: i64,
    /// Places known to hold an anchor (listed in the next save).
    anchors: Vec<String>,
    /// The anchor sealed at the last save (the trusted-time file takes it from here).
    sealed: Option<String>,
    /// The TPM counter in use, if any.
    tpm: Option<tpm_anchor::Anchor>,
    /// Without a TPM in use: the value the state sealed, carried on (so a TPM that comes
    /// back finds the state it anchored).
    tpm_carried: Option<u64>,
    /// What the TPM anchor did or why it is not in use (`freeze.status`).
    tpm_note: Option<String>,
    /// The wishes last handed to the action thread: the same list again plans nothing (the
    /// journal already holds its outcome), so it is not sent and the thread sleeps through
    /// every verdict rebuild that changed no phase.
    wants_sent: Vec<Want>,
    /// How many lists were handed to the action thread (tests).
    wants_sends: u64,
}

/// A `watch` subscriber; `verdicts` when it asked for the verdict table too.
struct Subscriber {
    tx: mpsc::Sender<Value>,
    verdicts: bool,
}

pub struct FreezeService {
    paths: Paths,
    key: [u8; 32],
    tokens_dir: PathBuf,
    inner: Mutex<Inner>,
    journal: Arc<Mutex<Journal>>,
    actions_tx: Mutex<std_mpsc::Sender<Vec<Want>>>,
    action_cfg: Arc<Mutex<ActionConfig>>,
    device: watch::Receiver<DeviceState>,
    /// The online source's health (the poller in `online.rs` updates it).
    pub online: super::online::OnlineHealth,
    /// The highest trusted time the anchors recorded at start.
    anchored_time: Option<i64>,
    tpm_mode: TpmMode,
    tpm_index: u32,
}

fn lease_of(lic: &License) -> Option<Lease> {
    let every = lic.meta.get(LEASE_SECS)?.parse::<i64>().ok()?;
    let grace = lic
        .meta
        .get(LEASE_GRACE_SECS)
        .and_then(|g| g.parse::<i64>().ok())
        .unwrap_or(0);
    (every > 0 && grace >= 0).then_some(Lease {
        every_secs: every,
        grace_secs: grace,
    })
}

fn refusal(r: Refusal) -> TokenRefused {
    let code = match r {
        Refusal::UnknownLicense(_) => codes::UNKNOWN_LICENSE,
        Refusal::Stale { .. } => codes::STALE_TOKEN,
        Refusal::FromFuture { .. } => codes::TOKEN_FROM_FUTURE,
        Refusal::Released(_) => codes::LICENSE_RELEASED,
    };
    TokenRefused {
        code,
        message: r.to_string(),
    }
}

impl FreezeService {
    /// Loads (or creates) the device key and the state. Blocking; call before serving.
    pub fn new(
        state_dir: &Path,
        cfg: &FreezeConfig,
        now: i64,
        device: watch::Receiver<DeviceState>,
    ) -> Arc<FreezeService> {
        let paths = Paths::new(state_dir);
        let _ = crate::store::ensure_dir(state_dir, 0o700);
        let (key, created) = match state_file::device_key(&paths.key) {
            Ok(k) => k,
            Err(e) => {
                // Without a key nothing can be verified: run with a throw-away one, and the
                // next start finds the state unverifiable (frozen), which is the safe side.
                log::error!("freeze: {e}; using a temporary device key");
                let mut k = [0u8; 32];
                let _ = getrandom::getrandom(&mut k);
                (k, false)
            }
        };
        let first = created || interrupted_first_start(state_dir, &paths);
        let mut loaded = state_file::load(&paths, &key, first, now);
        let (anchors, anchored_time, anchored_tpm) = if created {
            // Nothing sealed under the old key can be verified; the lifecycle copies
            // already tell a deleted key from a first start.
            (vec![], None, None)
        } else {
            check_anchors(state_dir, &paths, &key, &mut loaded, now)
        };
        let now = anchored_time.map_or(now, |t| t.max(now));
        let sealed = loaded.tpm.max(anchored_tpm);
        let tpm = start_tpm(cfg, sealed, &mut loaded, now);
        if let Some(t) = &loaded.tamper {
            log::warn!("freeze state tampered with: {t}; affected licenses stay frozen until a status token or a license issued from now on arrives");
        }
        let journal_path = actions::journal_path(state_dir);
        let journal = Arc::new(Mutex::new(actions::load_journal(&journal_path)));
        let action_cfg = Arc::new(Mutex::new(cfg.actions()));
        let (tx, rx) = std_mpsc::channel::<Vec<Want>>();
        {
            let journal = journal.clone();
            let cfg = action_cfg.clone();
            std::thread::Builder::new()
                .name("freeze-actions".into())
                .spawn(move || action_thread(rx, journal, journal_path, cfg))
                .expect("spawn the freeze action thread");
        }
        let svc = Arc::new(FreezeService {
            tokens_dir: super::tokens_dir(state_dir),
            paths,
            key,
            inner: Mutex::new(Inner {
                machine: loaded.machine,
                real: vec![],
                extra: BTreeMap::new(),
                generation: loaded.generation,
                products: HashMap::new(),
                tamper: loaded.tamper,
                save_error: None,
                event_seq: 0,
                subscribers: vec![],
                unpublished: vec![],
                now,
                tolerance: 86_400,
                anchors,
                sealed: None,
                tpm: tpm.anchor,
                tpm_carried: sealed,
                tpm_note: tpm.note,
                wants_sent: vec![],
                wants_sends: 0,
            }),
            journal,
            actions_tx: Mutex::new(tx),
            action_cfg,
            device,
            online: Default::default(),
            anchored_time,
            tpm_mode: cfg.tpm,
            tpm_index: cfg.tpm_nv_index,
        });
        // Written at once: the next start expects the files (missing means deleted). The
        // mark rises if tampering was found or the TPM needs (re)anchoring.
        let mut inner = svc.lock();
        let raise = tpm.raise || inner.tamper.is_some();
        svc.save(&mut inner, raise);
        drop(inner);
        svc
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `raise`: the high-water mark rises (a phase changed, tampering was found): with a
    /// TPM, the state seals the counter's next value and the counter is incremented after.
    fn save(&self, inner: &mut Inner, raise: bool) {
        inner.generation += 1;
        // Raise from the counter as it is now: an earlier increment may have acted though
        // its answer was lost. A TPM that does not answer is not raised (logged).
        let raise = raise
            && inner.tpm.as_mut().is_some_and(|a| match a.refresh() {
                Ok(()) => true,
                Err(e) => {
                    log::error!(
                    "freeze: cannot read the TPM counter: {e}; the mark is not raised in the TPM"
                );
                    false
                }
            });
        let tpm_value = match &inner.tpm {
            Some(a) => Some(a.sealed() + u64::from(raise)),
            None => inner.tpm_carried,
        };
        match state_file::save(
            &self.paths,
            &self.key,
            inner.generation,
            &inner.machine,
            &inner.anchors,
            tpm_value,
        ) {
            Ok(()) => inner.save_error = None,
            Err(e) => {
                log::error!("freeze: cannot save the state: {e}");
                inner.save_error = Some(e.to_string());
                return;
            }
        }
        // Only after the state: an anchor ahead of the state means an older state was put
        // back, so it must never be ahead after a crash.
        let sealed = anchor::seal(
            &self.key,
            &anchor::Anchor {
                generation: inner.generation,
                time_mark: inner.now,
                stopped: inner
                    .machine
                    .records
                    .iter()
                    .filter(|(_, r)| !r.phase.running())
                    .map(|(id, _)| id.clone())
                    .collect(),
                tpm: tpm_value,
            },
        );
        match state_file::write_anchor(&self.paths.anchor, &sealed) {
            Ok(()) => {
                if !inner.anchors.iter().any(|a| a == anchor::USAGE) {
                    inner.anchors.push(anchor::USAGE.into());
                }
            }
            Err(e) => log::error!("freeze: cannot write the state's anchor: {e}"),
        }
        inner.sealed = Some(sealed);
        // Last: the counter must never be ahead of what was saved (that reads as a restore).
        if let (true, Some(a)) = (raise, inner.tpm.as_mut()) {
            // The state sealed the counter + 1 read just above.
            match a.increment() {
                Ok(()) => {
                    inner.tpm_carried = Some(a.counter);
                    log::debug!("freeze: TPM counter raised to {}", a.counter);
                }
                Err(e) => {
                    // The state is one ahead of the counter: the next start catches up.
                    log::error!("freeze: cannot increment the TPM counter: {e}");
                    inner.tpm_note = Some(format!("the last increment failed: {e}"));
                }
            }
        }
    }

    /// The highest trusted time the freeze anchors recorded (the time file may be behind).
    pub fn anchored_time(&self) -> Option<i64> {
        self.anchored_time
    }

    /// A marketplace status for an authorization code (`facts.id` = `code:<CODE>`), which
    /// joins the lifecycle like an installed license: transitions, events and actions.
    pub fn external(&self, facts: LicenseFacts, product: &str, status: External, at: i64) {
        let mut inner = self.lock();
        let now = inner.now.max(at);
        let tol = inner.tolerance;
        let id = facts.id.clone();
        inner.products.insert(id.clone(), product.to_string());
        inner.extra.insert(id.clone(), facts);
        let mut all = inner.real.clone();
        all.extend(inner.extra.values().cloned());
        let mut out = inner
            .machine
            .apply(Input::Licenses(all), now, tol)
            .unwrap_or_default();
        match inner.machine.apply(
            Input::External {
                license_id: id.clone(),
                status,
                at,
            },
            now,
            tol,
        ) {
            Ok(o) => {
                out.changed |= o.changed;
                out.transitions.extend(o.transitions);
            }
            Err(e) => log::warn!("freeze: marketplace status for {id} not applied: {e}"),
        }
        self.after(&mut inner, &out);
        // Codes are not in the license verdict table: nothing to wait for.
        publish(&mut inner);
    }

    pub fn reconfigure(&self, cfg: &FreezeConfig) {
        *self.action_cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg.actions();
    }

    /// Saves, publishes and acts on what an input did.
    fn after(&self, inner: &mut Inner, out: &Outcome) {
        if out.changed {
            // A phase change is the mark rising (rare); other changes are not (NV wear).
            self.save(inner, !out.transitions.is_empty());
        }
        for t in &out.transitions {
            log::info!(
                "license {}: {} -> {} ({})",
                t.license_id,
                t.from.map_or("new", Phase::as_str),
                t.to.as_str(),
                t.reason
            );
            inner.event_seq += 1;
            let ev = json!({
                "seq": inner.event_seq,
                "type": "transition",
                "license_id": t.license_id,
                "product": inner.products.get(&t.license_id),
                "from": t.from,
                "state": t.to,
                "reason": t.reason,
                "since": format_rfc3339(t.since),
                "causes": t.causes,
            });
            inner.unpublished.push(ev);
        }
        // The action thread compares with its journal: only what is not done yet runs.
        let wants: Vec<Want> = inner
            .machine
            .present()
            .filter_map(|id| inner.machine.records.get(id).map(|r| (id, r)))
            .map(|(id, r)| Want {
                license_id: id.clone(),
                side: if r.phase.running() {
                    Side::Running
                } else {
                    Side::Stopped
                },
                state: r.phase.as_str().to_string(),
                since: r.since,
            })
            .collect();
        // Nothing sent yet plans nothing for an empty list either.
        if wants != inner.wants_sent {
            inner.wants_sent = wants.clone();
            inner.wants_sends += 1;
            let _ = self
                .actions_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(wants);
        }
    }

    /// Applies a status token (blocking). The caller refreshes the license verdicts after;
    /// the token's watch events go out with that refresh.
    pub fn apply_token(
        &self,
        bytes: &[u8],
        keys: &crate::license::keys::TrustedKeys,
        time: TimeView,
    ) -> Result<Value, TokenRefused> {
        let tok = token::parse(bytes).map_err(|e| TokenRefused {
            code: codes::MALFORMED_TOKEN,
            message: e.to_string(),
        })?;
        tok.verify(keys).map_err(|e| TokenRefused {
            code: match e {
                TokenError::UntrustedKey(_) => codes::UNTRUSTED_KEY,
                _ => codes::BAD_SIGNATURE,
            },
            message: e.to_string(),
        })?;
        if !tok.req.devices.is_empty() {
            let codes_here = match &*self.device.borrow() {
                DeviceState::Ready(r) => {
                    let mut c = vec![r.code.clone()];
                    c.extend(r.accepted_codes.iter().cloned());
                    c
                }
                _ => {
                    return Err(TokenRefused {
                        code: codes::DEVICE_PENDING,
                        message: "the device code is not known yet; try again in a moment".into(),
                    })
                }
            };
            if !tok.binds(&codes_here) {
                return Err(TokenRefused {
                    code: codes::WRONG_DEVICE,
                    message: format!(
                        "the token is for device(s) {} and this device is {}",
                        tok.req.devices.join(", "),
                        codes_here[0]
                    ),
                });
            }
        }
        let mut inner = self.lock();
        let now = time.now.max(time.trusted);
        inner.now = now;
        inner.tolerance = time.tolerance;
        let req = tok.req.clone();
        let out = inner
            .machine
            .apply(Input::Token(req.clone()), now, time.tolerance)
            .map_err(refusal)?;
        self.after(&mut inner, &out);
        let rec = inner.machine.records.get(&req.license_id);
        Ok(json!({
            "license_id": req.license_id,
            "action": req.action,
            "seq": req.seq,
            "issued_at": format_rfc3339(req.issued_at),
            "applied": !out.replayed,
            "replayed": out.replayed,
            "state": rec.map(|r| r.phase),
            "reason": rec.map(|r| r.reason.clone()),
        }))
    }

    /// Subscribes to transitions: the current state of every license first, then each
    /// transition in order, every event with an increasing `seq`.
    pub fn subscribe(&self) -> mpsc::Receiver<Value> {
        self.subscribe_with(None)
    }

    /// [`FreezeService::subscribe`], plus a `verdicts` event with the current verdict table
    /// (`table()`, [`Verdicts::cache_event`]) after the states and another at every
    /// rebuild of the table. `table` is read under this service's lock, so no rebuild can
    /// fall between it and the subscription.
    ///
    /// [`Verdicts::cache_event`]: crate::license::service::Verdicts::cache_event
    pub fn subscribe_verdicts(&self, table: &dyn Fn() -> Value) -> mpsc::Receiver<Value> {
        self.subscribe_with(Some(table))
    }

    fn subscribe_with(&self, table: Option<&dyn Fn() -> Value>) -> mpsc::Receiver<Value> {
        let mut inner = self.lock();
        // Older events first, to the older subscribers: the new one's snapshot has them.
        publish(&mut inner);
        let present: Vec<String> = inner.machine.present().cloned().collect();
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER + present.len() + 1);
        for id in present {
            let Some(r) = inner.machine.records.get(&id).cloned() else {
                continue;
            };
            inner.event_seq += 1;
            let _ = tx.try_send(json!({
                "seq": inner.event_seq,
                "type": "state",
                "license_id": id,
                "product": inner.products.get(&id),
                "state": r.phase,
                "reason": r.reason,
                "since": format_rfc3339(r.since),
                "causes": r.causes,
            }));
        }
        if let Some(table) = table {
            let _ = tx.try_send(verdicts_event(&mut inner, table()));
        }
        inner.subscribers.push(Subscriber {
            tx,
            verdicts: table.is_some(),
        });
        rx
    }

    /// For `freeze.status`.
    pub fn status(&self) -> Value {
        let inner = self.lock();
        let journal = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let licenses: Vec<Value> = inner
            .machine
            .records
            .iter()
            .map(|(id, r)| {
                json!({
                    "license_id": id,
                    "product": inner.products.get(id),
                    "installed": inner.machine.is_present(id),
                    "state": r.phase,
                    "reason": r.reason,
                    "since": format_rfc3339(r.since),
                    "causes": r.causes,
                    "last_token": r.token.as_ref().map(|t| json!({
                        "action": t.action, "seq": t.seq,
                        "issued_at": format_rfc3339(t.issued_at), "reason": t.reason,
                    })),
                    "lease_deadline": r.lease_deadline.map(format_rfc3339),
                    "actions": journal.get(id).map(|d| json!({
                        "side": d.side, "state": d.state, "at": format_rfc3339(d.at),
                        "ok": d.errors.is_empty(), "errors": d.errors,
                    })),
                })
            })
            .collect();
        json!({
            "licenses": licenses,
            "tampered": inner.tamper.is_some() || inner.machine.tampered_at.is_some(),
            "tamper": inner.tamper,
            "tampered_at": inner.machine.tampered_at.map(format_rfc3339),
            "state_file": self.paths.primary,
            "tpm": {
                "mode": self.tpm_mode.as_str(),
                "in_use": inner.tpm.is_some(),
                "device": inner.tpm.as_ref().map(|a| a.path.clone()),
                "nv_index": format!("{:#010x}", self.tpm_index),
                "counter": inner.tpm.as_ref().map(|a| a.counter),
                "note": inner.tpm_note,
            },
            "save_error": inner.save_error,
            "tokens_dir": self.tokens_dir,
            "online": {
                "tokens": self.online.tokens.snapshot(),
                "licenses": self.online.licenses.snapshot(),
            },
        })
    }

    /// Starts watching the drop directory. Call inside the runtime, after the license
    /// service started. Returns the watching task.
    fn watch_drop_dir(
        self: &Arc<Self>,
        license: Arc<LicenseService>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if let Err(e) = crate::store::ensure_dir(&self.tokens_dir, 0o770) {
            log::error!("freeze: {e}; dropped tokens are not picked up");
            return None;
        }
        let mut watch = match DirWatch::new(&self.tokens_dir, "tokens directory", 16 * 1024) {
            Ok(w) => w,
            Err(e) => {
                log::error!("cannot watch {}: {e}", self.tokens_dir.display());
                return None;
            }
        };
        let me = self.clone();
        Some(tokio::spawn(async move {
            let scan = move || me.scan_drop_dir(&license);
            let _ = tokio::task::spawn_blocking(scan.clone()).await;
            // Any change: every `*.tok` file is looked at again.
            while watch.next().await.is_some() {
                let _ = tokio::task::spawn_blocking(scan.clone()).await;
            }
        }))
    }

    /// Applies every `*.tok` file in the drop directory: applied (or replayed) ones are
    /// removed, refused ones renamed `*.rejected` with the reason logged.
    fn scan_drop_dir(&self, license: &LicenseService) {
        let Ok(rd) = std::fs::read_dir(&self.tokens_dir) else {
            return;
        };
        let names: BTreeSet<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tok"))
            .collect();
        for path in names {
            let bytes = match crate::drop_dir::read(&path, MAX_TOKEN_FILE) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    match crate::drop_dir::set_aside(&path) {
                        Ok(to) => log::warn!(
                            "token {} refused: {e} (kept as {})",
                            path.display(),
                            to.display()
                        ),
                        Err(re) => log::warn!(
                            "token {} refused: {e}; could not set it aside: {re}",
                            path.display()
                        ),
                    }
                    continue;
                }
            };
            match self.apply_token(&bytes, &license.trusted_keys(), license.time_view()) {
                Ok(v) => {
                    log::info!("token {} applied: {v}", path.display());
                    let _ = std::fs::remove_file(&path);
                    license.refresh_blocking();
                }
                Err(e) => {
                    log::warn!(
                        "token {} refused: {} ({})",
                        path.display(),
                        e.message,
                        e.code
                    );
                    let mut rejected = path.clone().into_os_string();
                    rejected.push(".rejected");
                    let _ = std::fs::rename(&path, rejected);
                }
            }
        }
    }
}

/// Sends the queued transition events to the subscribers, in order.
fn publish(inner: &mut Inner) {
    for ev in std::mem::take(&mut inner.unpublished) {
        inner
            .subscribers
            .retain(|s| s.tx.try_send(ev.clone()).is_ok());
    }
}

/// A `verdicts` event with the next `seq`.
fn verdicts_event(inner: &mut Inner, mut table: Value) -> Value {
    inner.event_seq += 1;
    table["type"] = json!("verdicts");
    table["seq"] = json!(inner.event_seq);
    table
}

impl FreezeHook for FreezeService {
    fn verdicts_updated(&self, table: &Verdicts) {
        let mut inner = self.lock();
        publish(&mut inner);
        if inner.subscribers.iter().any(|s| s.verdicts) {
            let ev = verdicts_event(&mut inner, table.cache_event());
            inner
                .subscribers
                .retain(|s| !s.verdicts || s.tx.try_send(ev.clone()).is_ok());
        }
    }

    fn observe(&self, licenses: &[(&License, State)], time: TimeView) -> FreezeView {
        let now = time.now.max(time.trusted);
        let facts: Vec<LicenseFacts> = licenses
            .iter()
            .filter(|(_, s)| {
                // A rolled-back clock does not take a license out of tracking: its expiry
                // is judged on the trusted time (`now` below), and freezing is sticky.
                matches!(
                    s,
                    State::Valid
                        | State::Grace
                        | State::Expired
                        | State::NotYetValid
                        | State::ClockRollback
                )
            })
            .map(|(l, _)| LicenseFacts {
                id: l.id.clone(),
                issued_at: l.issued_at,
                not_after: l.not_after,
                grace_end: l.grace_end(),
                lease: lease_of(l),
            })
            .collect();
        let mut inner = self.lock();
        inner.now = now;
        inner.tolerance = time.tolerance;
        for (l, _) in licenses {
            inner.products.insert(l.id.clone(), l.product.clone());
        }
        inner.real = facts.clone();
        let mut facts = facts;
        facts.extend(inner.extra.values().cloned());
        let out = inner
            .machine
            .apply(Input::Licenses(facts), now, time.tolerance)
            .unwrap_or_default();
        self.after(&mut inner, &out);
        let frozen: HashMap<String, FreezeVerdict> = inner
            .machine
            .present()
            .filter_map(|id| inner.machine.frozen(id).map(|(r, p)| (id, r, p)))
            .map(|(id, r, p)| {
                (
                    id.clone(),
                    FreezeVerdict {
                        reason: r.reason.clone(),
                        since: r.since,
                        lifecycle: p.as_str(),
                    },
                )
            })
            .collect();
        (frozen, inner.machine.next_boundary(now))
    }

    fn anchor(&self) -> Option<String> {
        self.lock().sealed.clone()
    }
}

/// The first start creates the device key and then saves the first freeze state; a crash
/// between the two leaves a key and nothing else: no copy of the state and no anchor
/// anywhere. That is a first start to finish, not a deletion (found by the crash harness,
/// tests/e2e/crash.rs). Deleting all of it on purpose gains nothing that deleting the key
/// with the copies does not already give (a fresh state, see docs/threat-model.md).
fn interrupted_first_start(state_dir: &Path, paths: &Paths) -> bool {
    let missing = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let fresh = missing(&paths.primary)
        && missing(&paths.backup)
        && missing(&paths.anchor)
        && matches!(
            crate::license::trusted_time::read_anchor(&crate::license::time_file(state_dir)),
            Ok(None)
        );
    if fresh {
        log::info!("freeze state: a device key and nothing saved with it yet (a first start cut short); starting fresh");
    }
    fresh
}

/// Reads both anchors and judges the loaded state against them: marks every license
/// tampered when a subset of the state was put back or removed, and raises the generation
/// past the high-water mark. Returns the places holding a valid anchor and the highest
/// trusted time they recorded.
fn check_anchors(
    state_dir: &Path,
    paths: &Paths,
    key: &[u8; 32],
    loaded: &mut state_file::Loaded,
    now: i64,
) -> (Vec<String>, Option<i64>, Option<u64>) {
    use anchor::Found;
    let time =
        match crate::license::trusted_time::read_anchor(&crate::license::time_file(state_dir)) {
            Ok(None) => Found::Missing,
            Ok(Some(text)) => anchor::unseal(key, &text).map_or_else(Found::Bad, Found::Good),
            Err(e) => Found::Bad(e),
        };
    let usage = state_file::read_anchor(&paths.anchor, key);
    let found = [(anchor::TIME, time), (anchor::USAGE, usage)];
    // One the state does not list is not relied on, but a crash never leaves an anchor
    // unreadable (each is replaced atomically): damage or an edit, so say so.
    for (place, f) in &found {
        if let Found::Bad(e) = f {
            if !loaded.anchors.iter().any(|a| a == place) {
                let file = if *place == anchor::TIME {
                    crate::license::time_file(state_dir)
                } else {
                    paths.anchor.clone()
                };
                log::warn!(
                    "the {place} anchor of the freeze state in {} is invalid ({e}); not relied on",
                    file.display()
                );
            }
        }
    }
    let held = found
        .iter()
        .filter(|(_, f)| matches!(f, Found::Good(_)))
        .map(|(p, _)| p.to_string())
        .collect();
    let j = anchor::judge(loaded.generation, &loaded.anchors, &found);
    loaded.generation = j.high_water;
    if let Some(why) = j.tamper {
        mark_tampered(loaded, why, j.time_mark.map_or(now, |t| t.max(now)));
    }
    (held, j.time_mark, j.tpm)
}

/// Every license the state knew stays frozen until a newer token or license; those it
/// did not know (issued before `at`) start frozen.
fn mark_tampered(loaded: &mut state_file::Loaded, why: String, at: i64) {
    for rec in loaded.machine.records.values_mut() {
        rec.tampered_at = Some(at);
    }
    loaded.machine.tampered_at = Some(at);
    loaded.tamper = Some(match loaded.tamper.take() {
        Some(t) => format!("{t}; {why}"),
        None => why,
    });
}

/// The TPM anchor at start.
struct TpmStart {
    anchor: Option<tpm_anchor::Anchor>,
    note: Option<String>,
    raise: bool,
}

/// Opens the TPM (`[freeze] tpm`) and judges the state's sealed value against its counter:
/// a state behind the counter is marked tampered.
fn start_tpm(
    cfg: &FreezeConfig,
    sealed: Option<u64>,
    loaded: &mut state_file::Loaded,
    now: i64,
) -> TpmStart {
    if cfg.tpm == TpmMode::Off {
        return TpmStart {
            anchor: None,
            note: Some("[freeze] tpm = \"off\"".into()),
            raise: false,
        };
    }
    let (anchor, counter) = match tpm_anchor::Anchor::open(&cfg.tpm_device, cfg.tpm_nv_index) {
        Ok(x) => x,
        Err(e) => {
            if cfg.tpm == TpmMode::Required {
                let why = format!(
                    "[freeze] tpm = \"required\" but the TPM is unreachable ({e}): a restore \
                     of the state directory cannot be ruled out"
                );
                log::error!("freeze: {why}");
                mark_tampered(loaded, why, now);
            } else if matches!(e, crate::tpm::TpmError::NoDevice) {
                log::info!("freeze: {e}: the freeze state is not anchored in a TPM");
            } else {
                log::warn!("freeze: TPM anchor not in use: {e}; a restore of the whole state directory is not detected");
            }
            return TpmStart {
                anchor: None,
                note: Some(e.to_string()),
                raise: false,
            };
        }
    };
    let verdict = tpm_anchor::judge(sealed, counter);
    let note = match &verdict {
        TpmVerdict::Match => None,
        TpmVerdict::First => {
            log::info!(
                "freeze: anchoring the freeze state in the TPM counter {:#010x} on {}",
                anchor.index,
                anchor.path.display()
            );
            None
        }
        TpmVerdict::CatchUp => {
            log::info!("freeze: the state is one step ahead of the TPM counter (an interrupted save); catching up");
            None
        }
        TpmVerdict::Reanchor(why) => {
            log::warn!("freeze: {why}; anchoring the state in this TPM anew");
            Some(format!("re-anchored: {why}"))
        }
        TpmVerdict::Restored(why) => {
            mark_tampered(loaded, why.clone(), now);
            None
        }
    };
    TpmStart {
        raise: verdict.raise(),
        anchor: Some(anchor),
        note,
    }
}

fn action_thread(
    rx: std_mpsc::Receiver<Vec<Want>>,
    journal: Arc<Mutex<Journal>>,
    path: PathBuf,
    cfg: Arc<Mutex<ActionConfig>>,
) {
    let boot = actions::boot_id();
    // Every wish in order: a freeze quickly followed by an unfreeze runs both.
    while let Ok(wants) = rx.recv() {
        let todo = {
            let j = journal.lock().unwrap_or_else(|p| p.into_inner());
            actions::plan(&j, &wants, &boot)
        };
        if todo.is_empty() {
            continue;
        }
        let cfg = cfg.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut done: BTreeMap<String, actions::Done> = BTreeMap::new();
        for w in todo {
            let errors = actions::execute(&cfg, &w);
            for e in &errors {
                log::error!("freeze action for license {}: {e}", w.license_id);
            }
            done.insert(
                w.license_id.clone(),
                actions::Done {
                    side: w.side,
                    state: w.state.clone(),
                    since: w.since,
                    boot_id: boot.clone(),
                    at: crate::clock::Clock::now_secs(&crate::clock::SystemClock),
                    errors,
                },
            );
        }
        let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
        j.extend(done);
        if let Err(e) = actions::save_journal(&path, &j) {
            log::error!("freeze: cannot save the action journal: {e}");
        }
    }
}

/// The freeze service's lifecycle: its state is saved by every change; what runs is the
/// watch of the tokens drop directory (a dropped token is checked against the licenses,
/// hence the license service), and reloads change the configured actions.
pub struct TokensDir {
    freeze: Arc<FreezeService>,
    license: Arc<LicenseService>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TokensDir {
    pub fn new(freeze: Arc<FreezeService>, license: Arc<LicenseService>) -> TokensDir {
        TokensDir {
            freeze,
            license,
            watcher: Mutex::new(None),
        }
    }
}

impl Service for TokensDir {
    fn name(&self) -> &'static str {
        "freeze"
    }

    fn start(self: Arc<Self>, _cfg: Arc<Config>) -> Step {
        let task = self.freeze.watch_drop_dir(self.license.clone());
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = task;
        done()
    }

    fn reconfigure(&self, _old: &Config, new: &Config) {
        self.freeze.reconfigure(&new.freeze);
    }

    /// No token is applied from the drop directory once the socket stopped serving.
    fn shutdown(self: Arc<Self>) -> Step {
        if let Some(t) = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use crate::license::LicenseConfig;
    use kooagent_core::testing::{sample, test_key};

    /// A license service on a fake clock with the freeze service as its hook, trusting
    /// `key`; `lic` (unbound, not installed) is an hour into its validity at `now`. Bind
    /// `_dir` and `_device_tx` by name: the state directory and the device channel must
    /// live as long as the test.
    struct Services {
        _dir: tempfile::TempDir,
        _device_tx: watch::Sender<DeviceState>,
        key: ed25519_dalek::SigningKey,
        lic: License,
        now: i64,
        clock: Arc<FakeClock>,
        license: Arc<LicenseService>,
        freeze: Arc<FreezeService>,
    }

    fn services() -> Services {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key(1);
        let mut lic = sample();
        lic.unbound = true;
        lic.devices.clear();
        let now = lic.not_before + 3600;
        let (device_tx, device) = watch::channel(DeviceState::Pending);
        let cfg = LicenseConfig {
            trusted_keys: vec![crate::license::keys::entry_for(&key.verifying_key())],
            ..Default::default()
        };
        let clock = Arc::new(FakeClock::new(now * 1000));
        let license = LicenseService::new(dir.path(), &cfg, clock.clone(), device.clone());
        let freeze = FreezeService::new(dir.path(), &FreezeConfig::default(), now, device);
        license.set_freeze_hook(freeze.clone());
        Services {
            _dir: dir,
            _device_tx: device_tx,
            key,
            lic,
            now,
            clock,
            license,
            freeze,
        }
    }

    /// [`services`] with the fixture's license (unbound, valid `now`) installed.
    fn installed_services() -> Services {
        let s = services();
        let text = crate::license::format::sign(&s.lic, &s.key).unwrap();
        s.license.install(text.as_bytes(), None).unwrap();
        s
    }

    /// A watcher that reacts to `frozen` by asking `license.check` must read the frozen
    /// verdict: no event is out before the verdict table shows it.
    #[test]
    fn watch_events_go_out_after_the_verdicts_show_them() {
        let Services {
            key,
            lic,
            now,
            license,
            freeze,
            _dir,
            _device_tx,
            ..
        } = installed_services();
        let allowed = |l: &LicenseService| {
            l.verdicts().check("sku-pro", None, now).unwrap()["allowed"].clone()
        };
        assert_eq!(allowed(&license), json!(true));

        let mut events = freeze.subscribe();
        while events.try_recv().is_ok() {}
        let token = token::issue(
            &token::TokenRequest {
                license_id: lic.id.clone(),
                action: token::Action::Freeze,
                seq: 1,
                issued_at: now,
                devices: vec![],
                reason: Some("unpaid".into()),
            },
            &key,
        )
        .unwrap();
        freeze
            .apply_token(
                token.as_bytes(),
                &license.trusted_keys(),
                license.time_view(),
            )
            .unwrap();
        // Applied, but the verdict table is not refreshed yet: nothing may be out.
        if let Ok(ev) = events.try_recv() {
            assert_eq!(
                allowed(&license),
                json!(false),
                "event {ev} sent while license.check still allows"
            );
        }
        license.refresh_blocking();
        let ev = events.try_recv().expect("the transition after the refresh");
        assert_eq!(ev["state"], json!("frozen"), "{ev}");
        assert_eq!(allowed(&license), json!(false));
    }

    /// Every verdict rebuild (a timer, a clock set, the device identity, a reload) runs the
    /// freeze hook; one that changes no phase must not wake the action thread: an idle
    /// agent whose verdicts are rebuilt often (a clock set again and again on a busy host)
    /// woke it at each rebuild.
    #[test]
    fn rebuilds_that_change_no_phase_do_not_wake_the_action_thread() {
        let Services {
            key,
            lic,
            now,
            clock,
            license,
            freeze,
            _dir,
            _device_tx,
            ..
        } = services();
        let sends = || freeze.lock().wants_sends;
        // No license: nothing to act on, nothing sent however often the table is rebuilt.
        for _ in 0..5 {
            license.refresh_blocking();
        }
        assert_eq!(sends(), 0);
        let text = crate::license::format::sign(&lic, &key).unwrap();
        license.install(text.as_bytes(), None).unwrap();
        let installed = sends();
        assert_eq!(
            installed, 1,
            "a new license is the action thread's to judge"
        );
        for _ in 0..5 {
            clock.advance_secs(1);
            license.refresh_blocking();
        }
        assert_eq!(
            sends(),
            installed,
            "rebuilds that changed nothing were sent"
        );
        let token = token::issue(
            &token::TokenRequest {
                license_id: lic.id.clone(),
                action: token::Action::Freeze,
                seq: 1,
                issued_at: now,
                devices: vec![],
                reason: None,
            },
            &key,
        )
        .unwrap();
        freeze
            .apply_token(
                token.as_bytes(),
                &license.trusted_keys(),
                license.time_view(),
            )
            .unwrap();
        license.refresh_blocking();
        assert_eq!(sends(), installed + 1, "the freeze is sent once");
        assert_eq!(
            freeze.lock().wants_sent[0].side,
            Side::Stopped,
            "{:?}",
            freeze.lock().wants_sent
        );
    }

    /// `watch` `{"verdicts": true}`: the table after the states, then a new one at every
    /// rebuild, each showing what `license.check` answers at that moment.
    #[test]
    fn verdict_subscribers_get_every_table() {
        let Services {
            key,
            lic,
            now,
            license,
            freeze,
            _dir,
            _device_tx,
            ..
        } = installed_services();

        let mut plain = freeze.subscribe();
        let l = license.clone();
        let mut events = freeze.subscribe_verdicts(&move || l.verdicts().cache_event());
        let state = events.try_recv().unwrap();
        assert_eq!(state["type"], json!("state"), "{state}");
        let table = events.try_recv().unwrap();
        assert_eq!(table["type"], json!("verdicts"), "{table}");
        assert!(table["seq"].as_u64().unwrap() > state["seq"].as_u64().unwrap());
        let entry = &table["licenses"][0];
        assert_eq!(entry["check"]["license_id"], json!(lic.id));
        assert_eq!(entry["check"]["allowed"], json!(true));
        assert_eq!(entry["ends_at"], json!(lic.not_after));
        assert!(events.try_recv().is_err());

        let token = token::issue(
            &token::TokenRequest {
                license_id: lic.id.clone(),
                action: token::Action::Freeze,
                seq: 1,
                issued_at: now,
                devices: vec![],
                reason: None,
            },
            &key,
        )
        .unwrap();
        let time = license.time_view();
        freeze
            .apply_token(token.as_bytes(), &license.trusted_keys(), time)
            .unwrap();
        license.refresh_blocking();
        let transition = events.try_recv().unwrap();
        assert_eq!(transition["state"], json!("frozen"));
        let table = events.try_recv().unwrap();
        assert_eq!(table["type"], json!("verdicts"));
        let check = &table["licenses"][0]["check"];
        assert_eq!(
            (&check["state"], &check["allowed"]),
            (&json!("frozen"), &json!(false))
        );
        assert_eq!(table["licenses"][0]["ends_at"], Value::Null);
        // Subscribers that did not ask get no tables.
        while let Ok(ev) = plain.try_recv() {
            assert_ne!(ev["type"], json!("verdicts"), "{ev}");
        }
    }
}
