//! The running agent's shared state: configuration (swapped on reload), the clock, and the
//! services the socket operations answer from. One `Arc<Agent>` is shared by every
//! connection.
//!
//! The services are built here, each handed what it needs from the others (narrow handles,
//! never the `Agent`), and listed once in `services` in their start order: the daemon
//! starts, reconfigures and shuts them down through that list (`services.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::device_service::DeviceService;
use crate::freeze::FreezeService;
use crate::license::LicenseService;
use crate::services::{Service, Services};
use crate::usage::license_meters::LicenseMeters;
use crate::usage::service::{Chain, ConfigMeters, UsageInputs};
use crate::usage::UsageService;

pub struct Agent {
    /// The configuration in force; services that read it as they go hold a receiver.
    config: watch::Sender<Arc<Config>>,
    pub config_file: Option<PathBuf>,
    pub clock: Arc<dyn Clock>,
    pub started: Instant,
    pub started_unix: i64,
    pub device: Arc<DeviceService>,
    pub usage: Arc<UsageService>,
    pub license: Arc<LicenseService>,
    pub freeze: Arc<FreezeService>,
    pub authcode: Arc<crate::authcode::service::AuthcodeService>,
    /// Connections open on the socket (`agent.status`, the metrics).
    pub connections: Arc<crate::socket_limits::Live>,
    /// Every service above (and the pollers and writers that only run), in start order.
    pub services: Services,
}

impl Agent {
    pub fn new(config: Config, config_file: Option<PathBuf>, clock: Arc<dyn Clock>) -> Arc<Agent> {
        let (config_tx, _) = watch::channel(Arc::new(config.clone()));
        let device = Arc::new(DeviceService::new(clock.clone()));
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
        let usage = Arc::new(UsageService::new(
            Box::new(Chain(vec![
                Box::new(ConfigMeters),
                Box::new(LicenseMeters(license.clone())),
            ])),
            UsageInputs {
                config: config_tx.subscribe(),
                clock: clock.clone(),
                device: device.subscribe(),
                time_seen: {
                    let license = license.clone();
                    Arc::new(move |t| {
                        license.observe_time(t, crate::license::trusted_time::Source::UpstreamDate)
                    })
                },
            },
        ));
        let authcode = crate::authcode::service::AuthcodeService::new(
            &config.agent.state_dir,
            &config.authcode,
            clock.clone(),
        );
        authcode.set_freeze(freeze.clone());
        let drop_dir = Arc::new(crate::freeze::service::TokensDir::new(
            freeze.clone(),
            license.clone(),
        ));
        let poller = Arc::new(crate::freeze::online::Poller::new(
            freeze.clone(),
            license.clone(),
            config_tx.subscribe(),
            device.subscribe(),
        ));
        Arc::new_cyclic(|me| {
            // The usage ledger first, so that it is the last to stop: everything the
            // others still record during the shutdown is written.
            let services: Vec<Arc<dyn Service>> = vec![
                usage.clone(),
                device.clone(),
                license.clone(),
                drop_dir,
                authcode.clone(),
                poller,
                Arc::new(crate::metrics::Textfile::new(me.clone())),
            ];
            Agent {
                authcode,
                license,
                freeze,
                started_unix: clock.now_secs(),
                config: config_tx,
                config_file,
                clock,
                started: Instant::now(),
                device,
                usage,
                connections: Default::default(),
                services: Services::new(services),
            }
        })
    }

    /// The configuration in force now (cheap: an `Arc` clone).
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Installs a reloaded configuration and lets every service react to what changed.
    pub fn replace_config(&self, new: Config) {
        let old = self.config.send_replace(Arc::new(new.clone()));
        self.services.reconfigure(&old, &new);
    }
}
