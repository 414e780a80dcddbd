//! The running agent's shared state: configuration (swapped on reload), the clock, and the
//! services the socket operations answer from. One `Arc<Agent>` is shared by every
//! connection.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::clock::Clock;
use crate::config::Config;
use crate::device_service::DeviceService;
use crate::freeze::FreezeService;
use crate::license::LicenseService;
use crate::usage::license_meters::LicenseMeters;
use crate::usage::service::{Chain, ConfigMeters};
use crate::usage::UsageService;

pub struct Agent {
    config: RwLock<Arc<Config>>,
    pub config_file: Option<PathBuf>,
    pub clock: Arc<dyn Clock>,
    pub started: Instant,
    pub started_unix: i64,
    pub device: DeviceService,
    pub usage: UsageService,
    pub license: Arc<LicenseService>,
    pub freeze: Arc<FreezeService>,
    pub authcode: Arc<crate::authcode::service::AuthcodeService>,
    /// Connections open on the socket (`agent.status`, the metrics).
    pub connections: Arc<crate::socket_limits::Live>,
    /// Woken when `[metrics]` changes: the textfile writer sleeps on it (no timer) while no
    /// textfile is configured, so an idle agent stays asleep.
    pub metrics_changed: Arc<tokio::sync::Notify>,
}

impl Agent {
    pub fn new(config: Config, config_file: Option<PathBuf>, clock: Arc<dyn Clock>) -> Arc<Agent> {
        let device = DeviceService::new(&config);
        let license = LicenseService::new(
            &config.agent.state_dir,
            &config.license,
            clock.clone(),
            device.subscribe(),
        );
        let freeze = FreezeService::new(
            &config.agent.state_dir,
            &config.freeze,
            clock.now_secs(),
            device.subscribe(),
        );
        license.set_freeze_hook(freeze.clone());
        if let Some(t) = freeze.anchored_time() {
            license.restore_trusted_time(t);
        }
        // Where a meter's usage is billed: `[usage.meters]` first, then the installed
        // license's instance id.
        let usage = UsageService::new(Box::new(Chain(vec![
            Box::new(ConfigMeters),
            Box::new(LicenseMeters(license.clone())),
        ])));
        let authcode = crate::authcode::service::AuthcodeService::new(
            &config.agent.state_dir,
            &config.authcode,
            clock.clone(),
        );
        authcode.set_freeze(freeze.clone());
        Arc::new(Agent {
            authcode,
            license,
            freeze,
            started_unix: clock.now_secs(),
            config: RwLock::new(Arc::new(config)),
            config_file,
            clock,
            started: Instant::now(),
            device,
            usage,
            connections: Default::default(),
            metrics_changed: Default::default(),
        })
    }

    /// The configuration in force now (cheap: an `Arc` clone).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// Installs a reloaded configuration and lets services react to what changed.
    pub fn replace_config(self: &Arc<Self>, new: Config) {
        let old = {
            let mut guard = self.config.write().expect("config lock");
            std::mem::replace(&mut *guard, Arc::new(new.clone()))
        };
        if old.identity != new.identity || old.agent.product_id != new.agent.product_id {
            self.device.reconfigure(&new, self.clock.clone());
        }
        // Always: the keys file may have changed under the same path.
        self.license.reconfigure(&new.license);
        self.freeze.reconfigure(&new.freeze);
        self.authcode.reconfigure(&new.authcode);
        if old.metrics != new.metrics {
            self.metrics_changed.notify_one();
        }
    }
}
