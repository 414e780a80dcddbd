//! `kooagent run`: load and check the configuration, bind the socket (before detaching, so
//! a second agent fails in the foreground), optionally detach, then serve until SIGTERM or
//! SIGINT; SIGHUP reloads the configuration.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::clock::{Clock, SystemClock};
use crate::config::{self, Origin, Overrides};
use crate::notify::{monotonic_usec, notify_logged};
use crate::ops::Dispatcher;
use crate::state_lock::StateLock;
use crate::{logging, socket, store};

pub struct RunOptions {
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    pub daemon: bool,
    /// Where logs go when detached (default: `<state_dir>/agent.log`).
    pub log_file: Option<PathBuf>,
}

pub fn run(opts: RunOptions) -> Result<()> {
    // Everything the agent creates is its own (state, log, pidfile directory); the one
    // thing shared with the group, the socket, gets its mode set explicitly.
    crate::sys::set_umask(0o077);
    let loaded = config::load(opts.config.as_deref(), &opts.overrides)?;
    let cfg = loaded.config.clone();
    logging::init(cfg.log_level(), None);
    // Clients can connect as soon as the socket is bound, before the runtime has installed
    // its signal handlers; hold SIGTERM/SIGINT/SIGHUP pending until then, so an early
    // SIGHUP reloads instead of killing the agent with the default action.
    crate::sys::block_daemon_signals();
    // The config check lets an unreadable keys file pass (for CLI users); the agent needs it.
    if let Err(e) = cfg.license.trusted_keys() {
        anyhow::bail!("config: {}: {}", e.key, e.message);
    }
    let nofile = raise_fd_limit();
    let max_connections = socket::connection_cap(cfg.socket.max_connections, nofile);
    if max_connections < cfg.socket.max_connections {
        log::warn!(
            "socket.max_connections {} does not fit RLIMIT_NOFILE {nofile} (with {} descriptors \
             kept for files); serving at most {max_connections} connections, the rest get `busy`",
            cfg.socket.max_connections,
            socket::FD_RESERVE
        );
    }
    store::ensure_dir(&cfg.agent.state_dir, 0o700).context("preparing the state directory")?;
    // Before the socket: the lock, not the socket, keeps a second agent off this state.
    let state_lock = StateLock::acquire(&cfg.agent.state_dir)?;
    let group_required = loaded.origin("socket.group") != Origin::Default;
    let mut ready_pipe: Option<std::os::unix::net::UnixStream> = None;
    let bound = socket::bind(
        &cfg.socket.path,
        cfg.socket_mode()?,
        &cfg.socket.group,
        group_required,
    )?;
    if opts.daemon {
        let log_path = opts
            .log_file
            .clone()
            .unwrap_or_else(|| cfg.agent.state_dir.join("agent.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        if let Some(dir) = cfg.agent.pidfile.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The parent returns only once the detached agent is ready (pidfile written,
        // signals handled), so init scripts and tests never race the start: the child
        // reports over a socket pair, and a child that dies reports by closing it.
        let (mut parent_end, child_end) =
            std::os::unix::net::UnixStream::pair().context("creating the readiness pipe")?;
        let d = daemonize::Daemonize::new()
            .pid_file(&cfg.agent.pidfile)
            // Its default (027) would leave the pidfile group-readable.
            .umask(0o077)
            .working_directory("/")
            .stderr(log);
        match d.execute() {
            daemonize::Outcome::Parent(Ok(_)) => {
                drop(child_end);
                let mut buf = [0u8; 1];
                let ready = matches!(std::io::Read::read(&mut parent_end, &mut buf), Ok(1));
                std::process::exit(if ready { 0 } else { 1 });
            }
            daemonize::Outcome::Parent(Err(e)) => {
                bound.remove();
                return Err(anyhow::anyhow!("could not detach: {e}"));
            }
            daemonize::Outcome::Child(Err(e)) => {
                bound.remove();
                return Err(anyhow::anyhow!("could not detach: {e}"));
            }
            daemonize::Outcome::Child(Ok(_)) => {
                drop(parent_end);
                state_lock
                    .record_pid()
                    .context("recording the detached pid in the state lock")?;
                ready_pipe = Some(child_end);
            }
        }
    }
    // One worker: the event loop runs on this thread (current-thread scheduler: no task
    // handoff between threads, no atomics on the hot path), as Redis runs its one loop.
    let mut builder = if cfg.agent.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.agent.worker_threads);
        b
    };
    let rt = builder
        .max_blocking_threads(8)
        .thread_name("kooagent")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(serve_until_signal(
        loaded,
        opts,
        &bound,
        ready_pipe,
        max_connections,
    ));
    bound.remove();
    // Released only once everything queued for the ledger is written.
    drop(state_lock);
    result
}

async fn serve_until_signal(
    loaded: config::Loaded,
    opts: RunOptions,
    bound: &socket::Bound,
    ready_pipe: Option<std::os::unix::net::UnixStream>,
    max_connections: usize,
) -> Result<()> {
    // Handlers first (the signals were held pending since before the bind), then let
    // them through.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    crate::sys::unblock_daemon_signals();
    let cfg = loaded.config.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let agent = Agent::new(cfg.clone(), loaded.file.clone(), clock);
    agent.services.start(&agent.config()).await;
    let dispatcher = Arc::new(Dispatcher::new());
    let listener = {
        let std_listener = bound.listener.try_clone().context("cloning the listener")?;
        std_listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(std_listener)?
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let limits = socket::Limits {
        max_connections,
        per_uid: cfg.socket.per_uid_cap(max_connections),
        idle_timeout: cfg.socket.idle_timeout(),
    };
    let server = tokio::spawn(socket::serve(
        listener,
        agent.clone(),
        dispatcher,
        limits,
        shutdown_rx,
    ));
    log::info!(
        "kooagent {} listening on {} (state {})",
        env!("CARGO_PKG_VERSION"),
        bound.path.display(),
        cfg.agent.state_dir.display()
    );
    notify_logged("READY=1");
    if let Some(mut pipe) = ready_pipe {
        let _ = std::io::Write::write_all(&mut pipe, b"1");
    }
    loop {
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { log::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                notify_logged(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                reload(&agent, &opts);
                notify_logged("READY=1");
            }
        }
    }
    notify_logged("STOPPING=1");
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    // In the reverse start order, the usage ledger last: its queued writes finish and
    // nothing acknowledged is pending in memory.
    agent.services.shutdown().await;
    if opts.daemon {
        let _ = std::fs::remove_file(&cfg.agent.pidfile);
    }
    log::info!("stopped");
    Ok(())
}

fn reload(agent: &Agent, opts: &RunOptions) {
    // Without --config the default location is looked at again: a file created since the
    // start is picked up, like a file edited in place.
    match config::load(opts.config.as_deref(), &opts.overrides) {
        Err(e) => log::error!("SIGHUP: configuration not reloaded, keeping the old one: {e}"),
        Ok(loaded) => {
            let old = agent.config();
            let new = loaded.config;
            if old.socket != new.socket || old.agent.state_dir != new.agent.state_dir {
                log::warn!("SIGHUP: socket and state_dir changes take effect after a restart");
            }
            logging::set_level(new.log_level());
            agent.replace_config(new);
            log::info!("SIGHUP: configuration reloaded");
        }
    }
}

/// Thousands of idle clients need thousands of descriptors: lift the soft limit to the
/// hard one (under the systemd unit, `LimitNOFILE=` has done it and setrlimit is filtered).
/// Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    crate::sys::raise_fd_limit()
}
