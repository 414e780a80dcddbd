//! The optional online source: the seller's HTTPS endpoint, polled for the newest status
//! token (and, optionally, a renewed license) of every license this device holds.
//!
//! Offline first: an unreachable endpoint, an error or "nothing new" changes nothing; only
//! a token or license that verifies against the trusted keys does, through the same paths
//! as `token.apply` and `license.install` (so an older token or license is refused there).
//! Polls are spread with random jitter so a fleet does not hit the seller at once, and the
//! poller sleeps between them (no wake-ups otherwise).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::watch;

use super::{FreezeConfig, FreezeService};
use crate::authcode::relay_auth;
use crate::backoff::jitter;
use crate::config::Config;
use crate::device_code::DeviceReport;
use crate::device_service::DeviceState;
use crate::license::store::{InstallError, Installed};
use crate::license::LicenseService;
use crate::services::{done, Service, Step};
use crate::source_health::SourceHealth;

/// Who asks: every fetch is signed with the device key (the relay protocol's headers) and
/// says the device code the license is bound to, so the seller's server can bind the key
/// to the code on first use and serve nobody else (docs/seller-server.md "Security").
pub struct Asker {
    pub key: SigningKey,
    /// The device's identity, when computed.
    pub device: Option<Arc<DeviceReport>>,
}

impl Asker {
    /// The code to say for a license bound to `devices`: the one this device accepts, else
    /// the device's current code.
    fn code_for(&self, devices: &[String]) -> Option<String> {
        let report = self.device.as_ref()?;
        devices
            .iter()
            .find(|d| report.accepts(d))
            .cloned()
            .or_else(|| report.settled.then(|| report.code.clone()))
    }
}

/// `url` with `device_code` added to its query, and the part signed (path and query).
fn signed_target(url: &str, code: Option<&str>) -> (String, String) {
    let url = match code {
        Some(c) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}device_code={c}")
        }
        None => url.to_string(),
    };
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    let target = url[after_scheme..]
        .find('/')
        .map(|i| url[after_scheme + i..].to_string())
        .unwrap_or_else(|| "/".into());
    (url, target)
}

/// What one poll did, for the log and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Poll {
    pub asked: usize,
    pub tokens_applied: usize,
    pub licenses_installed: usize,
    pub failures: usize,
}

/// `{license_id}` filled in, percent-encoded so any license id is one path segment.
pub fn url_for(template: &str, license_id: &str) -> String {
    let mut enc = String::new();
    for b in license_id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    template.replace("{license_id}", &enc)
}

fn agent(cfg: &FreezeConfig) -> Result<ureq::Agent, String> {
    let extra = (!cfg.poll_extra_ca_file.as_os_str().is_empty())
        .then_some(cfg.poll_extra_ca_file.as_path());
    crate::https::agent(
        extra,
        "freeze.poll_extra_ca_file",
        Duration::from_secs(cfg.poll_timeout_secs),
    )
}

/// GET `url`, signed: `Ok(Some(body))` on 200, `Ok(None)` on 204/404 (nothing for this
/// license).
fn fetch(
    agent: &ureq::Agent,
    url: &str,
    asker: &Asker,
    code: Option<&str>,
) -> Result<Option<Vec<u8>>, String> {
    let (url, target) = signed_target(url, code);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let h = relay_auth::sign(
        &asker.key,
        "GET",
        &target,
        b"",
        now_ms,
        &relay_auth::new_nonce(),
    );
    let mut req = agent.get(&url);
    for (k, v) in h.pairs() {
        req = req.header(k, v);
    }
    let mut resp = req.call().map_err(|e| e.to_string())?;
    match resp.status().as_u16() {
        200 => resp
            .body_mut()
            .with_config()
            .limit(1024 * 1024)
            .read_to_vec()
            .map(Some)
            .map_err(|e| e.to_string()),
        204 | 404 => Ok(None),
        s => Err(format!("HTTP {s}")),
    }
}

/// One round over every license held (blocking). Each URL's outcome goes into the
/// service's source health (`freeze.status` → `online`): a transport error, an HTTP error
/// or an answer that does not verify is a failure; "nothing new" is a success.
pub fn poll_once(
    cfg: &FreezeConfig,
    freeze: &FreezeService,
    license: &LicenseService,
    asker: &Asker,
) -> Poll {
    let mut out = Poll::default();
    let now = crate::source_health::now;
    let agent = match agent(cfg) {
        Ok(a) => a,
        Err(e) => {
            let health = if cfg.token_url.is_empty() {
                &freeze.online.licenses
            } else {
                &freeze.online.tokens
            };
            health.failure(now(), &e);
            out.failures += 1;
            return out;
        }
    };
    // Each license id once, with the device codes its license is bound to.
    let ids: BTreeMap<String, Vec<String>> = license
        .verdicts()
        .licenses
        .iter()
        .map(|e| {
            let devices = e.status["devices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            (e.id.clone(), devices)
        })
        .collect();
    // One verdict per source and round: the first failure of the round, else success.
    let mut token_err: Option<String> = None;
    let mut license_err: Option<String> = None;
    for (id, devices) in ids {
        out.asked += 1;
        let code = asker.code_for(&devices);
        let code = code.as_deref();
        if !cfg.token_url.is_empty() {
            let url = url_for(&cfg.token_url, &id);
            match fetch(&agent, &url, asker, code) {
                Ok(Some(body)) => {
                    match freeze.apply_token(&body, &license.trusted_keys(), license.time_view()) {
                        Ok(v) => {
                            if v["replayed"] != serde_json::json!(true) {
                                log::info!(
                                    "freeze: token for {id} from the online source applied: {v}"
                                );
                                out.tokens_applied += 1;
                            }
                            license.refresh_blocking();
                        }
                        // An older token than the one applied is the endpoint lagging,
                        // not an error of this device.
                        Err(e) if e.code == super::service::codes::STALE_TOKEN => {
                            log::debug!("freeze: online token for {id}: {}", e.message)
                        }
                        Err(e) => {
                            out.failures += 1;
                            token_err.get_or_insert(format!(
                                "token for {id} from {url} refused ({}): {}",
                                e.code, e.message
                            ));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    out.failures += 1;
                    token_err.get_or_insert(format!("GET {url}: {e}"));
                }
            }
        }
        if !cfg.license_url.is_empty() {
            let url = url_for(&cfg.license_url, &id);
            match fetch(&agent, &url, asker, code) {
                Ok(Some(body)) => match license.install(&body, None) {
                    // The same license as installed: every poll of a quiet endpoint.
                    Ok((Installed::Unchanged(_), _)) => {
                        log::debug!("license {id}: the online source has nothing newer")
                    }
                    Ok((installed, _)) => {
                        log::info!("license {} fetched from the online source", installed.id());
                        out.licenses_installed += 1;
                    }
                    // An older one: the endpoint lags behind what the device has.
                    Err(InstallError::Stale { .. }) => {}
                    Err(e) => {
                        out.failures += 1;
                        license_err.get_or_insert(format!(
                            "license for {id} from {url} refused ({}): {e}",
                            e.code()
                        ));
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    out.failures += 1;
                    license_err.get_or_insert(format!("GET {url}: {e}"));
                }
            }
        }
    }
    if out.asked > 0 {
        for (url, err, health) in [
            (&cfg.token_url, token_err, &freeze.online.tokens),
            (&cfg.license_url, license_err, &freeze.online.licenses),
        ] {
            if url.is_empty() {
                continue;
            }
            match err {
                Some(e) => health.failure(now(), e),
                None => health.success(now()),
            }
        }
    }
    out
}

/// The health of the two online sources (`freeze.status` → `online`).
#[derive(Debug)]
pub struct OnlineHealth {
    /// `token_url`: the freeze poll.
    pub tokens: SourceHealth,
    /// `license_url`: the license refresh.
    pub licenses: SourceHealth,
}

impl Default for OnlineHealth {
    fn default() -> Self {
        OnlineHealth {
            tokens: SourceHealth::new("freeze poll (freeze.token_url)"),
            licenses: SourceHealth::new("license refresh (freeze.license_url)"),
        }
    }
}

/// Starts the poller thread when an endpoint is configured. The configuration (and the
/// device identity) is read again before every round (SIGHUP changes take effect at the
/// next one). `key_file`: the device key (`relay.key` in the state directory, created on
/// first use).
fn start(
    freeze: Arc<FreezeService>,
    license: Arc<LicenseService>,
    key_file: PathBuf,
    config: impl Fn() -> Option<(FreezeConfig, Option<Arc<DeviceReport>>)> + Send + 'static,
) {
    let Some((first, _)) = config() else { return };
    if first.token_url.is_empty() && first.license_url.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("kooagent-poll".into())
        .spawn(move || {
            // A first round soon after start, spread a little so a rebooted fleet does not
            // arrive together.
            std::thread::sleep(Duration::from_millis(
                200 + jitter(first.poll_jitter_secs.min(30) * 1000),
            ));
            while let Some((cfg, device)) = config() {
                if cfg.token_url.is_empty() && cfg.license_url.is_empty() {
                    return;
                }
                match relay_auth::load_or_create_key(&key_file) {
                    Ok(key) => {
                        let p = poll_once(&cfg, &freeze, &license, &Asker { key, device });
                        log::debug!("freeze online source: {p:?}");
                    }
                    Err(e) => {
                        let e = format!("device key {}: {e}", key_file.display());
                        let now = crate::source_health::now();
                        freeze.online.tokens.failure(now, &e);
                        log::warn!("freeze online source: {e}");
                    }
                }
                std::thread::sleep(Duration::from_secs(
                    cfg.poll_interval_secs + jitter(cfg.poll_jitter_secs),
                ));
            }
        });
    if let Err(e) = spawned {
        log::error!("freeze: cannot start the online source poller: {e}");
    }
}

/// The online source's lifecycle: the poller thread runs while an endpoint is configured
/// (started with the agent; a reload that sets one applies at the next start), reading the
/// configuration and the device identity before every round, and stops at shutdown.
pub struct Poller {
    freeze: Arc<FreezeService>,
    license: Arc<LicenseService>,
    config: watch::Receiver<Arc<Config>>,
    device: watch::Receiver<DeviceState>,
    stopped: Arc<AtomicBool>,
}

impl Poller {
    pub fn new(
        freeze: Arc<FreezeService>,
        license: Arc<LicenseService>,
        config: watch::Receiver<Arc<Config>>,
        device: watch::Receiver<DeviceState>,
    ) -> Poller {
        Poller {
            freeze,
            license,
            config,
            device,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Service for Poller {
    fn name(&self) -> &'static str {
        "freeze online source"
    }

    fn start(self: Arc<Self>, cfg: Arc<Config>) -> Step {
        let key_file = crate::authcode::transport::relay_key_path(&cfg.agent.state_dir);
        let (config, device, stopped) = (
            self.config.clone(),
            self.device.clone(),
            self.stopped.clone(),
        );
        start(
            self.freeze.clone(),
            self.license.clone(),
            key_file,
            move || {
                if stopped.load(Ordering::Relaxed) {
                    return None;
                }
                let device = match &*device.borrow() {
                    DeviceState::Ready(r) => Some(r.clone()),
                    _ => None,
                };
                Some((config.borrow().freeze.clone(), device))
            },
        );
        done()
    }

    fn reconfigure(&self, _old: &Config, _new: &Config) {
        // Read again before every round.
    }

    /// The thread ends before its next round.
    fn shutdown(self: Arc<Self>) -> Step {
        self.stopped.store(true, Ordering::Relaxed);
        done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_ids_are_one_path_segment() {
        assert_eq!(
            url_for("https://s/t/{license_id}", "L-2026-0001"),
            "https://s/t/L-2026-0001"
        );
        assert_eq!(
            url_for("https://s/t/{license_id}", "a/b c"),
            "https://s/t/a%2Fb%20c"
        );
    }

    #[test]
    fn the_signed_target_is_the_path_and_query_with_the_device_code() {
        assert_eq!(
            signed_target("https://s:8443/v1/licenses/L-1", Some("AB-CD")),
            (
                "https://s:8443/v1/licenses/L-1?device_code=AB-CD".into(),
                "/v1/licenses/L-1?device_code=AB-CD".into()
            )
        );
        assert_eq!(
            signed_target("https://s/t?x=1", Some("C")).1,
            "/t?x=1&device_code=C"
        );
        assert_eq!(signed_target("https://s/t", None).1, "/t");
    }

    #[test]
    fn jitter_stays_in_bounds() {
        assert_eq!(jitter(0), 0);
        assert!((0..100).all(|_| jitter(5) <= 5));
    }
}
