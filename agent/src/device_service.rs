//! Keeps the device identification code ready for the socket: computed off the runtime's
//! workers at start (file reads, then the metadata service, never blocking readiness),
//! re-checked while the identity is settling (first boot of a prepared image), and
//! recomputed when the configuration changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::device_code::{DeviceReport, Resolver};
use crate::services::{done, Service, Step};

/// What the service knows right now.
#[derive(Debug, Clone)]
pub enum DeviceState {
    /// The first computation has not finished yet.
    Pending,
    Ready(Arc<DeviceReport>),
    Failed(String),
}

pub struct DeviceService {
    state: watch::Sender<DeviceState>,
    /// Bumped on reconfiguration and shutdown so an older background task stops publishing.
    generation: Arc<Mutex<u64>>,
    clock: Arc<dyn Clock>,
}

/// How long a first-boot identity may take to settle before the agent stops re-checking
/// often (it keeps re-checking once a minute after that).
const SETTLE_FAST_CHECKS: u32 = 30;

impl DeviceService {
    pub fn new(clock: Arc<dyn Clock>) -> DeviceService {
        let (state, _) = watch::channel(DeviceState::Pending);
        DeviceService {
            state,
            generation: Arc::new(Mutex::new(0)),
            clock,
        }
    }

    /// A new generation: the task of the previous one stops at its next step.
    fn next_generation(&self) -> u64 {
        let mut g = self.generation.lock().expect("generation lock");
        *g += 1;
        *g
    }

    pub fn current(&self) -> DeviceState {
        self.state.borrow().clone()
    }

    /// Follows the state as it changes (the license service re-checks bindings).
    pub fn subscribe(&self) -> watch::Receiver<DeviceState> {
        self.state.subscribe()
    }

    /// Waits until the first computation is done (or `timeout` passes).
    pub async fn wait_ready(&self, timeout: Duration) -> DeviceState {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| !matches!(s, DeviceState::Pending)))
            .await;
        let s = rx.borrow().clone();
        s
    }

    /// Starts the background computation for `config`. Call from inside the runtime.
    fn compute(&self, config: &Config) {
        let generation = self.next_generation();
        let clock = self.clock.clone();
        let resolver = Arc::new(Resolver::new(
            config.identity.clone(),
            config.agent.product_id.clone(),
            Some(config.agent.state_dir.clone()),
        ));
        let state = self.state.clone();
        let current_gen = self.generation.clone();
        let still_current = move || *current_gen.lock().expect("generation lock") == generation;
        tokio::spawn(async move {
            let mut checks = 0u32;
            let mut metadata_done = false;
            loop {
                let r = resolver.clone();
                let now = clock.now_secs();
                let result = tokio::task::spawn_blocking(move || r.resolve(now, true)).await;
                if !still_current() {
                    return;
                }
                let settled = match result {
                    Ok(Ok(report)) => {
                        let settled = report.settled;
                        if !settled {
                            log::info!("device identity not settled yet: {}", report.detail);
                        } else {
                            log::info!("device code {} ({:?})", report.code, report.status);
                        }
                        state.send_replace(DeviceState::Ready(Arc::new(report)));
                        settled
                    }
                    Ok(Err(e)) => {
                        log::warn!("device identity: {e}");
                        state.send_replace(DeviceState::Failed(e.to_string()));
                        false
                    }
                    Err(e) => {
                        state.send_replace(DeviceState::Failed(format!(
                            "identity task failed: {e}"
                        )));
                        false
                    }
                };
                if settled && !metadata_done {
                    // The metadata service may add or confirm the cloud instance id; ask
                    // once, off the workers, and recompute only if it changed anything.
                    metadata_done = true;
                    let r = resolver.clone();
                    match tokio::task::spawn_blocking(move || r.refresh_instance_id()).await {
                        Ok(Ok(true)) => continue,
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => log::debug!("metadata service: {e}"),
                        Err(e) => log::debug!("metadata task failed: {e}"),
                    }
                }
                if settled {
                    return;
                }
                checks += 1;
                let wait = if checks < SETTLE_FAST_CHECKS { 1 } else { 60 };
                tokio::time::sleep(Duration::from_secs(wait)).await;
                if !still_current() {
                    return;
                }
            }
        });
    }
}

impl Service for DeviceService {
    fn name(&self) -> &'static str {
        "device identity"
    }

    fn start(self: Arc<Self>, cfg: Arc<Config>) -> Step {
        self.compute(&cfg);
        done()
    }

    fn reconfigure(&self, old: &Config, new: &Config) {
        if old.identity != new.identity || old.agent.product_id != new.agent.product_id {
            self.state.send_replace(DeviceState::Pending);
            self.compute(new);
        }
    }

    fn shutdown(self: Arc<Self>) -> Step {
        self.next_generation();
        done()
    }
}
