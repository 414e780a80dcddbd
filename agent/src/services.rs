//! One lifecycle for the daemon's services: each is started with the configuration in
//! force, told about every reloaded configuration, and shut down, through the same three
//! calls. The daemon holds them in one list, starts them in order and shuts them down in
//! the reverse order, so a service that others feed (the usage ledger) is the last to stop
//! and nothing written to it during shutdown is lost.
//!
//! A service gets what it needs from others when it is built (`Agent::new`): narrow
//! handles (a `watch` receiver of the configuration or of the device identity, a callback),
//! never the `Agent` itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::Config;

/// A lifecycle step that may wait (loading files off the workers, joining a thread).
pub type Step = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A step with nothing to wait for.
pub fn done() -> Step {
    Box::pin(std::future::ready(()))
}

pub trait Service: Send + Sync {
    /// For the log.
    fn name(&self) -> &'static str;
    /// Starts the service's threads and tasks; resolves once it can answer. Called once,
    /// inside the runtime, before the socket serves.
    fn start(self: Arc<Self>, cfg: Arc<Config>) -> Step;
    /// A configuration reloaded by SIGHUP; the service picks what concerns it.
    fn reconfigure(&self, old: &Config, new: &Config);
    /// Stops its threads and tasks and saves what must survive a restart; resolves when
    /// that is done. Called once, after the socket stopped serving.
    fn shutdown(self: Arc<Self>) -> Step;
}

/// The daemon's services, in start order.
#[derive(Default)]
pub struct Services(Vec<Arc<dyn Service>>);

impl Services {
    pub fn new(list: Vec<Arc<dyn Service>>) -> Services {
        Services(list)
    }

    pub async fn start(&self, cfg: &Arc<Config>) {
        for s in &self.0 {
            log::debug!("starting {}", s.name());
            s.clone().start(cfg.clone()).await;
        }
    }

    pub fn reconfigure(&self, old: &Config, new: &Config) {
        for s in &self.0 {
            s.reconfigure(old, new);
        }
    }

    /// In the reverse start order.
    pub async fn shutdown(&self) {
        for s in self.0.iter().rev() {
            log::debug!("stopping {}", s.name());
            s.clone().shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Service for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        fn start(self: Arc<Self>, _: Arc<Config>) -> Step {
            Box::pin(async move {
                tokio::task::yield_now().await;
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("start {}", self.name));
            })
        }
        fn reconfigure(&self, _: &Config, _: &Config) {
            self.log
                .lock()
                .unwrap()
                .push(format!("reload {}", self.name));
        }
        fn shutdown(self: Arc<Self>) -> Step {
            self.log.lock().unwrap().push(format!("stop {}", self.name));
            done()
        }
    }

    #[tokio::test]
    async fn started_in_order_stopped_in_reverse() {
        let log = Arc::new(Mutex::new(vec![]));
        let probe = |name| -> Arc<dyn Service> {
            Arc::new(Probe {
                name,
                log: log.clone(),
            })
        };
        let s = Services::new(vec![probe("ledger"), probe("license"), probe("poller")]);
        let cfg = Arc::new(Config::default());
        s.start(&cfg).await;
        s.reconfigure(&cfg, &cfg);
        s.shutdown().await;
        assert_eq!(
            *log.lock().unwrap(),
            [
                "start ledger",
                "start license",
                "start poller",
                "reload ledger",
                "reload license",
                "reload poller",
                "stop poller",
                "stop license",
                "stop ledger"
            ]
        );
    }
}
