//! The agent's command-line flags and what they resolve to: a configuration, a socket client.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::client::Client;
use crate::config::{self, Overrides};

/// Flags written before the command (`kooagent --config FILE status`). They are not global:
/// a global flag reaches every subcommand, and the seller's commands must not offer the
/// agent's socket, state directory or configuration path. Each command declares its own
/// flags instead; these are the fallback for scripts that put them first.
#[derive(Args, Clone, Default)]
pub(crate) struct FirstFlags {
    /// Configuration file for the command that follows: the agent's, or for `seller
    /// serve|device|enroll|outbox` the seller server's
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Socket path (agent commands)
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// State directory (agent commands)
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace
    #[arg(long)]
    pub log_level: Option<String>,
}

/// The agent's flags, accepted by every agent command (and its subcommands).
#[derive(Args, Clone, Default)]
pub(crate) struct Global {
    /// Configuration file [env: KOOAGENT_CONFIG] (default: /etc/kooagent/agent.toml as root,
    /// ~/.config/kooagent/agent.toml otherwise)
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Socket path (overrides socket.path) [env: KOOAGENT_SOCKET]
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// State directory (overrides agent.state_dir)
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace (overrides agent.log_level)
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

/// An environment variable's value, unset and empty alike meaning "not given".
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Global {
    /// This command's flags, else those written before the command, else the environment
    /// (a flag always beats the environment, wherever it is written).
    pub fn merged(self, first: &FirstFlags) -> Global {
        Global {
            config: self
                .config
                .or_else(|| first.config.clone())
                .or_else(|| env_path("KOOAGENT_CONFIG")),
            socket: self
                .socket
                .or_else(|| first.socket.clone())
                .or_else(|| env_path("KOOAGENT_SOCKET")),
            state_dir: self.state_dir.or_else(|| first.state_dir.clone()),
            log_level: self.log_level.or_else(|| first.log_level.clone()),
        }
    }

    pub fn overrides(&self) -> Overrides {
        Overrides {
            log_level: self.log_level.clone(),
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            pidfile: None,
        }
    }

    pub fn load(&self) -> Result<config::Loaded> {
        Ok(config::load(self.config.as_deref(), &self.overrides())?)
    }

    pub fn client(&self) -> Result<Client> {
        let cfg = self.load()?.config;
        Ok(Client::connect(&cfg.socket.path)?)
    }
}
