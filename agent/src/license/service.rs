//! The running agent's license service: the installed licenses, the trusted keys and time,
//! and a table of verdicts computed ahead of time so `license.check` is a map lookup.
//!
//! The table is rebuilt (never patched) when something it depends on changes: a license
//! installed or removed (socket or the licenses directory, watched with inotify), the
//! device identity, the configuration, and time itself — one `timerfd` armed at the next
//! boundary (a license starting, expiring or leaving grace, a rolled-back clock catching
//! up, the hourly trusted-time save). The timer is on CLOCK_REALTIME with
//! TFD_TIMER_CANCEL_ON_SET, so setting the clock (back or forward) wakes the agent at
//! once. Idle, nothing runs.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};

use super::format::License;
use super::keys::{Integrity, TrustedKeys};
use super::store::{InstallError, Installed, LicenseStore, Rejected};
use super::timer::{Alarm, Rang, TimerFd};
use super::trusted_time::{Source, TrustedTime};
use super::verdict::{self, DeviceView, State, TimeView};
use super::LicenseConfig;
use crate::clock::{format_rfc3339, Clock};
use crate::config::Config;
use crate::device_service::DeviceState;
use crate::dir_watch::DirWatch;
use crate::services::{done, Service, Step};

/// The freeze capability's say about one license: why it may not run, since when, and its
/// lifecycle phase (`frozen` or `released`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreezeVerdict {
    pub reason: String,
    pub since: i64,
    pub lifecycle: &'static str,
}

/// Frozen licenses by id, and the next time the freeze state may change by itself.
pub type FreezeView = (HashMap<String, FreezeVerdict>, Option<i64>);

/// What the license service asks at each rebuild of the verdict table: given each
/// installed license and its verdict before any freeze, which are frozen.
pub trait FreezeHook: Send + Sync {
    fn observe(&self, licenses: &[(&License, State)], time: TimeView) -> FreezeView;
    /// The verdict table now shows what the last `observe` decided (watch events wait
    /// for this); `table` is that table (`watch` subscribers that asked for verdicts get it).
    fn verdicts_updated(&self, _table: &Verdicts) {}
    /// The freeze state's sealed high-water mark, kept in the trusted-time file too.
    fn anchor(&self) -> Option<String> {
        None
    }
}

/// One license's verdict, with its answers prepared.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub id: String,
    pub product: String,
    pub state: State,
    pub reason: String,
    not_after: Option<i64>,
    grace_end: Option<i64>,
    /// Sorted, for binary search.
    features: Vec<String>,
    /// The `license.check` answer without the time-dependent fields.
    answer: Map<String, Value>,
    /// The same, serialised without `allowed` and without the closing brace: what
    /// [`Verdicts::check_json`] completes per request.
    answer_head: String,
    /// The `license.status` entry.
    pub status: Value,
}

impl Evaluated {
    /// When the license stops allowing use (expiry, or the end of grace).
    fn ends_at(&self) -> Option<i64> {
        match self.state {
            State::Valid => self.not_after,
            State::Grace => self.grace_end,
            _ => None,
        }
    }

    /// Seconds until the license stops allowing use (expiry, or the end of grace).
    fn secs_left(&self, now: i64) -> Option<i64> {
        self.ends_at().map(|t| (t - now).max(0))
    }

    fn grants(&self, feature: &str) -> bool {
        self.features
            .binary_search_by(|f| f.as_str().cmp(feature))
            .is_ok()
    }
}

/// The verdict table: immutable, replaced as a whole.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub computed_at: i64,
    pub time: Option<TimeView>,
    pub time_source: Option<Source>,
    pub time_error: Option<String>,
    /// The device identity was still being computed: bound licenses wait for it.
    pub device_pending: bool,
    /// Next time a verdict changes by itself (licenses only).
    pub next_boundary: Option<i64>,
    /// When the timer must fire (boundaries and the trusted-time save).
    pub wake_at: Option<i64>,
    /// Every license, grouped by product, best first within a product.
    pub licenses: Vec<Evaluated>,
    by_product: HashMap<String, std::ops::Range<usize>>,
    pub rejected: Vec<Rejected>,
}

fn opt_time(t: Option<i64>) -> Value {
    t.map(|t| Value::String(format_rfc3339(t)))
        .unwrap_or(Value::Null)
}

impl Verdicts {
    /// The `license.check` answer for `product` (and `feature`), or `None` when no
    /// license for it is installed, built as a map: the reference [`Verdicts::check_json`]
    /// (what the socket answers with) is tested against.
    #[cfg(test)]
    pub fn check(&self, product: &str, feature: Option<&str>, now: i64) -> Option<Value> {
        let pick = self.pick(product, feature)?;
        let mut ans = pick.answer.clone();
        let left = pick.secs_left(now);
        ans.insert("secs_left".into(), json!(left));
        ans.insert("days_left".into(), json!(left.map(|s| s / 86_400)));
        if let Some(f) = feature {
            let granted = pick.grants(f);
            ans.insert("feature".into(), json!({"name": f, "granted": granted}));
            ans.insert("allowed".into(), json!(pick.state.allows_use() && granted));
        }
        Some(Value::Object(ans))
    }

    /// The `license.check` answer for `product` (and `feature`) as JSON text, or `None`
    /// when no license for it is installed ([`Verdicts::write_check`]).
    pub fn check_json(&self, product: &str, feature: Option<&str>, now: i64) -> Option<String> {
        let mut out = Vec::new();
        self.write_check(&mut out, product, feature, now)
            .then(|| String::from_utf8(out).expect("the answer is JSON text"))
    }

    /// Appends the `license.check` answer for `product` (and `feature`) to `out` as JSON
    /// text; false (nothing appended) when no license for it is installed. Picks the best
    /// license: one that allows use (and grants the feature, when asked) first, then by
    /// state, then the longest running. Built from the answer serialised in advance: no map
    /// is built and nothing allocated per request.
    pub fn write_check(
        &self,
        out: &mut Vec<u8>,
        product: &str,
        feature: Option<&str>,
        now: i64,
    ) -> bool {
        use std::io::Write;
        let Some(pick) = self.pick(product, feature) else {
            return false;
        };
        out.extend_from_slice(pick.answer_head.as_bytes());
        if pick.answer_head.len() > 1 {
            out.push(b',');
        }
        let allowed = match feature {
            Some(f) => pick.state.allows_use() && pick.grants(f),
            None => pick.state.allows_use(),
        };
        let _ = write!(out, "\"allowed\":{allowed},");
        match pick.secs_left(now) {
            Some(s) => {
                let _ = write!(out, "\"secs_left\":{s},\"days_left\":{}", s / 86_400);
            }
            None => out.extend_from_slice(b"\"secs_left\":null,\"days_left\":null"),
        }
        if let Some(f) = feature {
            out.extend_from_slice(b",\"feature\":{\"name\":");
            serde_json::to_writer(&mut *out, f).expect("strings serialise");
            let _ = write!(out, ",\"granted\":{}}}", pick.grants(f));
        }
        out.push(b'}');
        true
    }

    /// The license `license.check` answers with for `product` (and `feature`).
    fn pick(&self, product: &str, feature: Option<&str>) -> Option<&Evaluated> {
        let candidates = &self.licenses[self.by_product.get(product)?.clone()];
        Some(match feature {
            Some(f) => candidates
                .iter()
                .find(|e| e.state.allows_use() && e.grants(f))
                .unwrap_or(&candidates[0]),
            None => &candidates[0],
        })
    }

    pub fn rollback(&self) -> Option<i64> {
        self.time.and_then(|t| t.rollback())
    }

    /// The table as a `watch` `verdicts` event (without `type` and `seq`): every license's
    /// `license.check` answer without its time-dependent fields, grouped by product, best
    /// first, with the time its `secs_left` counts down to. A client that keeps it answers
    /// `license.check` from memory exactly as [`Verdicts::check_json`] would
    /// (`kooagent_client::cached`).
    pub fn cache_event(&self) -> Value {
        let licenses: Vec<Value> = self
            .licenses
            .iter()
            .map(|e| json!({"check": e.answer, "ends_at": e.ends_at()}))
            .collect();
        json!({"device_pending": self.device_pending, "licenses": licenses})
    }

    /// The marketplace instance id usage of `product` is billed to: that of its best
    /// license (the one `license.check` answers with).
    pub fn instance_for(&self, product: &str) -> Option<String> {
        let range = self.by_product.get(product)?.clone();
        self.licenses[range]
            .first()?
            .answer
            .get("instance")?
            .as_str()
            .map(str::to_owned)
    }

    /// The products with at least one installed license.
    pub fn products(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_product.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// Builds the verdict table. Pure.
pub fn build_verdicts<'a>(
    entries: impl Iterator<Item = &'a super::store::Entry>,
    device: DeviceView<'_>,
    time: TimeView,
    frozen: &dyn Fn(&License) -> Option<FreezeVerdict>,
) -> Verdicts {
    let mut list: Vec<(Evaluated, i64)> = Vec::new();
    let mut next_boundary: Option<i64> = None;
    for e in entries {
        let lic = &e.parsed.license;
        let why_frozen = frozen(lic);
        let v = verdict::evaluate(
            lic,
            &e.integrity,
            device,
            time,
            why_frozen.as_ref().map(|f| f.reason.as_str()),
        );
        if let Some(b) = v.next_boundary {
            next_boundary = Some(next_boundary.map_or(b, |n| n.min(b)));
        }
        let mut features = lic.features.clone();
        features.sort();
        let common = json!({
            "product": lic.product,
            "license_id": lic.id,
            "state": v.state,
            "allowed": v.state.allows_use(),
            "reason": v.reason,
            "instance": lic.instance,
            "not_before": format_rfc3339(lic.not_before),
            "not_after": opt_time(lic.not_after),
            "grace_end": opt_time(lic.grace_end()),
            "features": lic.features,
            "limits": lic.limits,
        });
        let Value::Object(mut answer) = common else {
            unreachable!("json! object")
        };
        if let (State::Frozen, Some(f)) = (v.state, &why_frozen) {
            answer.insert("since".into(), json!(format_rfc3339(f.since)));
            answer.insert("lifecycle".into(), json!(f.lifecycle));
        }
        let mut status = answer.clone();
        status.remove("allowed");
        status.insert("key_id".into(), json!(lic.key_id));
        status.insert("devices".into(), json!(lic.devices));
        status.insert("unbound".into(), json!(lic.unbound));
        status.insert("grace_secs".into(), json!(lic.grace_secs));
        status.insert("issued_at".into(), json!(format_rfc3339(lic.issued_at)));
        status.insert("meta".into(), json!(lic.meta));
        status.insert("file".into(), json!(e.file));
        // Longest-running first among equal states; perpetual counts as forever.
        let runs_until = lic.grace_end().unwrap_or(i64::MAX);
        list.push((
            Evaluated {
                id: lic.id.clone(),
                product: lic.product.clone(),
                state: v.state,
                reason: v.reason,
                not_after: lic.not_after,
                grace_end: lic.grace_end(),
                features,
                answer_head: {
                    let mut head = answer.clone();
                    head.remove("allowed");
                    let mut text = Value::Object(head).to_string();
                    text.pop(); // the closing brace
                    text
                },
                answer,
                status: Value::Object(status),
            },
            runs_until,
        ));
    }
    list.sort_by(|(a, ra), (b, rb)| {
        (
            a.product.as_str(),
            a.state.rank(),
            std::cmp::Reverse(*ra),
            a.id.as_str(),
        )
            .cmp(&(
                b.product.as_str(),
                b.state.rank(),
                std::cmp::Reverse(*rb),
                b.id.as_str(),
            ))
    });
    let licenses: Vec<Evaluated> = list.into_iter().map(|(e, _)| e).collect();
    let mut by_product = HashMap::new();
    let mut start = 0;
    for i in 1..=licenses.len() {
        if i == licenses.len() || licenses[i].product != licenses[start].product {
            by_product.insert(licenses[start].product.clone(), start..i);
            start = i;
        }
    }
    Verdicts {
        computed_at: time.now,
        time: Some(time),
        next_boundary,
        licenses,
        by_product,
        ..Verdicts::default()
    }
}

struct Inner {
    store: LicenseStore,
    keys: TrustedKeys,
    time: TrustedTime,
    tolerance: i64,
}

pub struct LicenseService {
    clock: Arc<dyn Clock>,
    device: watch::Receiver<DeviceState>,
    verdicts: RwLock<Arc<Verdicts>>,
    inner: Mutex<Inner>,
    /// Tells the timer task the wake-up time may have changed.
    rearm: Notify,
    freeze: OnceLock<Arc<dyn FreezeHook>>,
}

fn device_view<R>(state: &DeviceState, f: impl FnOnce(DeviceView<'_>) -> R) -> R {
    match state {
        DeviceState::Pending => f(DeviceView::Unknown("it is still being computed")),
        DeviceState::Failed(e) => f(DeviceView::Unknown(e)),
        DeviceState::Ready(r) if !r.settled => f(DeviceView::Unknown(&r.detail)),
        DeviceState::Ready(r) => {
            let mut codes = vec![r.code.clone()];
            codes.extend(r.accepted_codes.iter().filter(|c| **c != r.code).cloned());
            f(DeviceView::Known(&codes))
        }
    }
}

impl LicenseService {
    /// Builds the service with nothing loaded yet (see [`LicenseService::load_and_watch`]). Reads
    /// the trusted-time file. Keys that fail to load (the file vanished since the config
    /// check) leave the agent trusting none, loudly.
    pub fn new(
        state_dir: &Path,
        cfg: &LicenseConfig,
        clock: Arc<dyn Clock>,
        device: watch::Receiver<DeviceState>,
    ) -> Arc<LicenseService> {
        let keys = cfg.trusted_keys().unwrap_or_else(|e| {
            log::error!("{}: {}; no license key is trusted", e.key, e.message);
            TrustedKeys::default()
        });
        let time = TrustedTime::load(&super::time_file(state_dir), clock.now_secs());
        Arc::new(LicenseService {
            device,
            verdicts: RwLock::new(Arc::new(Verdicts::default())),
            inner: Mutex::new(Inner {
                store: LicenseStore::new(super::licenses_dir(state_dir), cfg.products.clone()),
                keys,
                time,
                tolerance: cfg.tolerance(),
            }),
            rearm: Notify::new(),
            freeze: OnceLock::new(),
            clock,
        })
    }

    /// The current verdict table (cheap: an `Arc` clone).
    pub fn verdicts(&self) -> Arc<Verdicts> {
        self.verdicts.read().expect("verdicts lock").clone()
    }

    /// The current verdict table, borrowed under the read lock (no reference count
    /// touched): for a lookup that ends at once, as a socket check's does. Holding it
    /// blocks the table's replacement.
    pub fn verdicts_ref(&self) -> std::sync::RwLockReadGuard<'_, Arc<Verdicts>> {
        self.verdicts.read().expect("verdicts lock")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets the freeze capability decide which licenses are frozen (set once, before
    /// [`LicenseService::load_and_watch`]).
    pub fn set_freeze_hook(&self, hook: Arc<dyn FreezeHook>) {
        let _ = self.freeze.set(hook);
    }

    /// The trusted keys in force (status tokens are signed by the same keys).
    pub fn trusted_keys(&self) -> TrustedKeys {
        self.lock().keys.clone()
    }

    /// The clock and the trusted-time mark now.
    pub fn time_view(&self) -> TimeView {
        let inner = self.lock();
        TimeView {
            now: self.clock.now_secs(),
            trusted: inner.time.mark(),
            tolerance: inner.tolerance,
        }
    }

    /// Rebuilds the verdict table from `inner` and publishes it. Blocking (may save the
    /// trusted time): call off the runtime's workers.
    fn recompute(&self, inner: &mut Inner) {
        let now = self.clock.now_secs();
        inner.time.observe(now, Source::SystemClock);
        // Issue times are signed by the seller: a license from the future moves the mark.
        for e in inner.store.entries() {
            if e.integrity == Integrity::Verified {
                inner
                    .time
                    .observe(e.parsed.license.issued_at, Source::LicenseIssueTime);
            }
        }
        inner.time.persist_if_due();
        let time = TimeView {
            now,
            trusted: inner.time.mark(),
            tolerance: inner.tolerance,
        };
        let device = self.device.borrow().clone();
        let (frozen, freeze_boundary) = match self.freeze.get() {
            Some(hook) => {
                let raw = device_view(&device, |d| {
                    build_verdicts(inner.store.entries(), d, time, &|_| None)
                });
                let states: HashMap<&str, State> = raw
                    .licenses
                    .iter()
                    .map(|e| (e.id.as_str(), e.state))
                    .collect();
                let list: Vec<(&License, State)> = inner
                    .store
                    .entries()
                    .filter_map(|e| {
                        let l = &e.parsed.license;
                        states.get(l.id.as_str()).map(|s| (l, *s))
                    })
                    .collect();
                let view = hook.observe(&list, time);
                // After the lifecycle files: an anchor never runs ahead of the state.
                inner.time.set_anchor(hook.anchor());
                inner.time.persist_if_due();
                view
            }
            None => (HashMap::new(), None),
        };
        let mut v = device_view(&device, |d| {
            build_verdicts(inner.store.entries(), d, time, &|l| {
                frozen.get(&l.id).cloned()
            })
        });
        if let Some(b) = freeze_boundary {
            v.next_boundary = Some(v.next_boundary.map_or(b, |n| n.min(b)));
        }
        v.device_pending = matches!(device, DeviceState::Pending);
        v.time_source = Some(inner.time.source());
        v.time_error = inner.time.load_error.clone();
        v.rejected = inner.store.rejected().cloned().collect();
        let persist = inner.time.next_persist();
        v.wake_at = Some(v.next_boundary.map_or(persist, |b| b.min(persist)));
        let v = Arc::new(v);
        *self.verdicts.write().expect("verdicts lock") = v.clone();
        if let Some(hook) = self.freeze.get() {
            hook.verdicts_updated(&v);
        }
        self.rearm.notify_one();
    }

    /// Recomputes now (blocking).
    pub fn refresh_blocking(&self) {
        let mut inner = self.lock();
        self.recompute(&mut inner);
    }

    /// Recomputes off the workers and returns the new table.
    pub async fn refresh(self: &Arc<Self>) -> Arc<Verdicts> {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.refresh_blocking()).await;
        self.verdicts()
    }

    /// Loads the installed licenses and starts watching the directory, the clock and the
    /// device identity. Call from inside the runtime, before serving.
    pub async fn load_and_watch(self: &Arc<Self>) {
        let me = self.clone();
        let dir = tokio::task::spawn_blocking(move || {
            let mut inner = me.lock();
            let now = me.clock.now_secs();
            let keys = inner.keys.clone();
            if let Err(e) = inner.store.load_all(&keys, now) {
                log::error!("licenses: {e}");
            }
            me.recompute(&mut inner);
            let n = inner.store.entries().count();
            log::info!(
                "{n} license(s) loaded from {}; {} trusted key(s)",
                inner.store.dir().display(),
                keys.active_ids().len()
            );
            inner.store.dir().to_path_buf()
        })
        .await
        .expect("license load task");
        match DirWatch::new(&dir, "licenses directory", 64 * 1024) {
            Ok(w) => {
                tokio::spawn(watch_dir(self.clone(), w));
            }
            Err(e) => log::error!(
                "cannot watch {} ({e}): dropped licenses are picked up at the next start only",
                dir.display()
            ),
        }
        match TimerFd::new() {
            Ok(alarm) => {
                tokio::spawn(run_timer(self.clone(), alarm));
            }
            Err(e) => log::error!("cannot create the license timer: {e}"),
        }
        let me = self.clone();
        let mut rx = self.device.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                log::debug!("device identity changed; rebuilding the verdicts");
                me.refresh().await;
            }
        });
    }

    /// Applies a reloaded `[license]` section.
    pub fn apply_config(&self, cfg: &LicenseConfig) {
        let mut inner = self.lock();
        match cfg.trusted_keys() {
            Ok(k) => inner.keys = k,
            Err(e) => log::error!(
                "{}: {}; keeping the previously trusted keys",
                e.key,
                e.message
            ),
        }
        inner.tolerance = cfg.tolerance();
        inner.store.set_products(cfg.products.clone());
        let keys = inner.keys.clone();
        inner.store.reverify(&keys);
        self.recompute(&mut inner);
    }

    /// Installs license bytes (blocking). Returns what happened and the license's verdict.
    pub fn install(
        &self,
        bytes: &[u8],
        product: Option<&str>,
    ) -> Result<(Installed, Option<Evaluated>), InstallError> {
        let mut inner = self.lock();
        let keys = inner.keys.clone();
        let outcome = inner.store.install(bytes, &keys, product)?;
        self.recompute(&mut inner);
        let v = self.verdicts();
        let e = v.licenses.iter().find(|e| e.id == outcome.id()).cloned();
        Ok((outcome, e))
    }

    /// Removes an installed license (blocking).
    pub fn remove(&self, id: &str) -> Result<bool, crate::store::StoreError> {
        let mut inner = self.lock();
        let removed = inner.store.remove(id)?;
        if removed {
            log::info!("license {id} removed");
            self.recompute(&mut inner);
        }
        Ok(removed)
    }

    /// Files in the licenses directory changed (`None`: events were lost, rescan all).
    fn files_changed(&self, names: Option<BTreeSet<String>>) {
        let mut inner = self.lock();
        let now = self.clock.now_secs();
        let keys = inner.keys.clone();
        let names = match names {
            Some(n) => n,
            None => {
                let mut all: BTreeSet<String> = std::fs::read_dir(inner.store.dir())
                    .map(|rd| {
                        rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                all.extend(
                    inner
                        .store
                        .entries()
                        .filter_map(|e| e.file.file_name()?.to_str().map(str::to_owned)),
                );
                all
            }
        };
        let mut changed = false;
        let rejected_before = inner.store.rejected().count();
        for n in &names {
            changed |= inner.store.on_file(n, &keys, now);
        }
        if changed || inner.store.rejected().count() != rejected_before {
            self.recompute(&mut inner);
        }
    }

    /// Saves the trusted time at shutdown, so a restart starts from the latest mark.
    pub fn save_time(&self) {
        let mut inner = self.lock();
        inner
            .time
            .observe(self.clock.now_secs(), Source::SystemClock);
        if let Err(e) = inner.time.persist() {
            log::warn!("could not save the trusted time: {e}");
        }
    }

    /// For `agent.status`.
    pub fn summary(&self) -> Value {
        let v = self.verdicts();
        let t = v.time;
        json!({
            "installed": v.licenses.len(),
            "usable": v.licenses.iter().filter(|e| e.state.allows_use()).count(),
            "trusted_time": t.map(|t| format_rfc3339(t.trusted)),
            "trusted_time_source": v.time_source,
            "clock_rollback": v.rollback().is_some(),
            "clock_behind_secs": v.rollback(),
            "rollback_tolerance_secs": t.map(|t| t.tolerance),
            "time_file_error": v.time_error,
            "next_boundary": opt_time(v.next_boundary),
        })
    }

    /// Raises the trusted time to a mark the freeze anchors kept (before the first
    /// verdicts; no rebuild).
    pub fn restore_trusted_time(&self, t: i64) {
        let mut inner = self.lock();
        if inner.time.observe(t, Source::FreezeAnchor) {
            log::warn!(
                "trusted time restored from the freeze anchors to {} (the time file was behind)",
                format_rfc3339(t)
            );
        }
    }

    /// Feeds a trustworthy time seen elsewhere (the `Date` of an upstream HTTPS answer).
    pub fn observe_time(&self, t: i64, source: Source) {
        let mut inner = self.lock();
        if inner.time.observe(t, source) {
            self.recompute(&mut inner);
        }
    }
}

impl Service for LicenseService {
    fn name(&self) -> &'static str {
        "licenses"
    }

    fn start(self: Arc<Self>, _cfg: Arc<Config>) -> Step {
        Box::pin(async move { self.load_and_watch().await })
    }

    fn reconfigure(&self, _old: &Config, new: &Config) {
        // Always: the keys file may have changed under the same path.
        self.apply_config(&new.license);
    }

    fn shutdown(self: Arc<Self>) -> Step {
        self.save_time();
        done()
    }
}

async fn watch_dir(svc: Arc<LicenseService>, mut w: DirWatch) {
    while let Some(names) = w.next().await {
        let me = svc.clone();
        let _ = tokio::task::spawn_blocking(move || me.files_changed(names)).await;
    }
}

async fn run_timer(svc: Arc<LicenseService>, mut alarm: impl Alarm) {
    loop {
        if let Some(at) = svc.verdicts().wake_at {
            match alarm.arm(at) {
                Ok(()) => {}
                // The clock was set after the last wait (during a rebuild, or twice in a
                // row): the alarm is armed all the same; judge the licenses again. Giving
                // up here left them without a timer until the next restart.
                Err(e) if crate::sys::is_clock_set(&e) => {
                    log::info!("the system clock was set; re-checking licenses");
                    svc.refresh().await;
                    continue;
                }
                Err(e) => {
                    log::error!("license timer: cannot arm it: {e}");
                    return;
                }
            }
        }
        tokio::select! {
            r = alarm.wait() => {
                match r {
                    Ok(Rang::Due) => log::debug!("license timer: due; rebuilding the verdicts"),
                    Ok(Rang::ClockSet) => {
                        log::info!("the system clock was set; re-checking licenses");
                    }
                    Err(e) => {
                        log::error!("license timer: {e}");
                        return;
                    }
                }
                svc.refresh().await;
            }
            _ = svc.rearm.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::format::{parse, sign};
    use crate::license::store::Entry;
    use kooagent_core::testing::{sample, test_key};

    fn entry(lic: &License) -> Entry {
        let text = sign(lic, &test_key(1)).unwrap();
        Entry {
            parsed: parse(text.as_bytes()).unwrap(),
            bytes: text.into_bytes(),
            file: "/l/x.lic".into(),
            integrity: Integrity::Verified,
        }
    }

    #[test]
    fn the_prepared_check_answer_equals_the_built_one() {
        let base = sample();
        let mut other = sample();
        other.id = "L-2".into();
        other.features = vec!["audit".into()];
        other.not_after = None;
        let mut odd = sample();
        odd.id = "L-3".into();
        odd.product = "we\"ird\\product".into();
        let entries = [entry(&base), entry(&other), entry(&odd)];
        let codes = vec!["AAAA-BBBB-CCCC-DDDD-EEEE".to_string()];
        let na = base.not_after.unwrap();
        // Before, during, in grace, after grace, and a rolled-back clock.
        for (now, trusted) in [
            (base.not_before - 10, base.not_before - 10),
            (base.not_before + 100, base.not_before + 100),
            (na + 3600, na + 3600),
            (na + 30 * 86_400, na + 30 * 86_400),
            (base.not_before + 100, na + 10 * 86_400),
        ] {
            let time = TimeView {
                now,
                trusted,
                tolerance: 86_400,
            };
            for device in [DeviceView::Known(&codes), DeviceView::Unknown("settling")] {
                let frozen = |l: &License| {
                    (l.id == "L-2").then(|| FreezeVerdict {
                        reason: "frozen by the seller".into(),
                        since: 5,
                        lifecycle: "frozen",
                    })
                };
                let v = build_verdicts(entries.iter(), device, time, &frozen);
                for product in ["sku-pro", "we\"ird\\product", "none"] {
                    for feature in [None, Some("sso"), Some("audit"), Some("x\"y")] {
                        let built = v.check(product, feature, now);
                        let text = v.check_json(product, feature, now);
                        let parsed = text.as_deref().map(|t| {
                            serde_json::from_str::<Value>(t).unwrap_or_else(|e| panic!("{t}: {e}"))
                        });
                        assert_eq!(parsed, built, "{product} {feature:?} at {now}");
                    }
                }
            }
        }
    }

    /// An alarm that refuses its first arming with ECANCELED (the clock was set while the
    /// verdicts were being rebuilt) and then rings when the test says.
    struct SetClockAlarm {
        arms: Arc<Mutex<Vec<i64>>>,
        refused: bool,
        ring: tokio::sync::mpsc::UnboundedReceiver<Rang>,
    }

    impl Alarm for SetClockAlarm {
        fn arm(&mut self, at: i64) -> std::io::Result<()> {
            self.arms.lock().unwrap().push(at);
            if !self.refused {
                self.refused = true;
                return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
            }
            Ok(())
        }

        async fn wait(&mut self) -> std::io::Result<Rang> {
            match self.ring.recv().await {
                Some(r) => Ok(r),
                None => std::future::pending().await,
            }
        }
    }

    /// timerfd_settime answers ECANCELED when the clock was set after the last read: the
    /// timer is armed all the same and the licenses are judged again. The timer task used
    /// to end there, and no boundary (an expiry, a grace period's end) fired again.
    #[tokio::test]
    async fn a_clock_set_seen_while_arming_keeps_the_timer() {
        let dir = tempfile::tempdir().unwrap();
        let (_device_tx, device) = watch::channel(DeviceState::Pending);
        let clock = Arc::new(crate::clock::FakeClock::new(1_800_000_000_000));
        let svc = LicenseService::new(dir.path(), &LicenseConfig::default(), clock, device);
        svc.refresh().await;
        let arms = Arc::new(Mutex::new(vec![]));
        let (ring, rx) = tokio::sync::mpsc::unbounded_channel();
        let alarm = SetClockAlarm {
            arms: arms.clone(),
            refused: false,
            ring: rx,
        };
        let task = tokio::spawn(run_timer(svc.clone(), alarm));
        let armed = |n: usize| {
            let arms = arms.clone();
            async move {
                for _ in 0..500 {
                    if arms.lock().unwrap().len() >= n {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                false
            }
        };
        let before = svc.verdicts();
        assert!(
            armed(2).await,
            "not armed again after ECANCELED: {:?}",
            arms.lock().unwrap()
        );
        assert!(
            !Arc::ptr_eq(&before, &svc.verdicts()),
            "the verdicts were not rebuilt after the clock was set"
        );
        assert!(!task.is_finished(), "the timer task ended");
        // And it still rings.
        let n = arms.lock().unwrap().len();
        let before = svc.verdicts();
        ring.send(Rang::Due).unwrap();
        assert!(armed(n + 1).await, "not armed after ringing");
        assert!(!Arc::ptr_eq(&before, &svc.verdicts()));
        assert_eq!(
            *arms.lock().unwrap().last().unwrap(),
            svc.verdicts().wake_at.unwrap()
        );
        task.abort();
    }
}
