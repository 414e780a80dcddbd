//! Command-line faces of the agent: the clap root and the dispatch to one module per verb.
//! Parsing lives in the verb modules, every rendering of an answer in `render`; the work is
//! done by the library modules or, for anything about the running agent, through the socket.

mod authcode;
mod config;
mod flags;
mod identity;
mod license;
mod metrics;
mod render;
mod run;
mod seller;
mod status;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use authcode::AuthcodeCommand;
use config::ConfigCommand;
use flags::{FirstFlags, Global};
use license::LicenseCommand;
use status::{operations_help, FreezeCommand, TokenCommand};
use usage::UsageCommand;

#[derive(Parser)]
#[command(
    name = "kooagent",
    version,
    about = "KooGallery edge agent: device code, licenses, usage, freeze"
)]
struct Cli {
    #[command(flatten)]
    first: FirstFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (foreground; --daemon detaches)
    Run {
        #[command(flatten)]
        g: Global,
        /// Detach from the terminal and write a pidfile (for boards without systemd)
        #[arg(long)]
        daemon: bool,
        /// Pidfile for --daemon (overrides agent.pidfile)
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Log file for --daemon (default: <state_dir>/agent.log)
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Print the device identification code (asks the running agent, or computes it)
    Id {
        #[command(flatten)]
        g: Global,
        /// List the identity sources found (hashes only) and the clone/drift verdict
        #[arg(long)]
        explain: bool,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Compute locally even when an agent is running
        #[arg(long)]
        local: bool,
    },
    /// Privileged start step (root; systemd `ExecStartPre=+`): read the root-only identity
    /// sources once and leave their keyed hashes and the boot id in /run/kooagent for an agent
    /// that runs with no capability
    Prestart {
        #[command(flatten)]
        g: Global,
        #[arg(long)]
        json: bool,
    },
    /// Show the running agent's status
    Status {
        #[command(flatten)]
        g: Global,
        #[arg(long)]
        json: bool,
    },
    /// Check that the agent answers
    Ping {
        #[command(flatten)]
        g: Global,
    },
    /// Configuration
    Config {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Send one raw request to the agent and print the result as JSON
    #[command(after_help = operations_help())]
    Call {
        #[command(flatten)]
        g: Global,
        /// Operation name, e.g. agent.status
        op: String,
        /// Params as a JSON object
        #[arg(default_value = "{}")]
        params: String,
    },
    /// Before capturing an image: remove everything per-instance (agent stopped)
    ImagePrep {
        #[command(flatten)]
        g: Global,
        /// Drop usage that was not delivered yet
        #[arg(long)]
        force: bool,
        /// Only print what would be removed (never refuses; says what would stop the prep)
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Prepare the image tree mounted at DIR instead of this machine: its
        /// etc/kooagent/agent.toml (or --config), state and etc/machine-id inside DIR
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Usage metering: what is recorded, pending, delivered, parked
    Usage {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// Installed licenses: install, status, check, remove
    License {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: LicenseCommand,
    },
    /// Authorization codes (KooGallery License guide 2.0)
    Authcode {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: AuthcodeCommand,
    },
    /// Freeze state of each license: state, why, since when
    Freeze {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: FreezeCommand,
    },
    /// The seller's status tokens (freeze / unfreeze / release)
    Token {
        #[command(flatten)]
        g: Global,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Stream freeze-state changes as JSON lines (the current state first)
    Watch {
        #[command(flatten)]
        g: Global,
    },
    /// Print the agent's state in the Prometheus text format (node_exporter's textfile
    /// collector; docs/operations.md "Metrics")
    Metrics {
        #[command(flatten)]
        g: Global,
        /// Write the page to FILE (whole, by a rename) instead of printing it
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The seller's tools and license server: runs `kooagent-seller ARGS` (installed next
    /// to kooagent, or in PATH; `kooagent seller --help` lists its commands)
    #[command(disable_help_flag = true)]
    Seller {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kooagent: {e:#}");
            ExitCode::from(1)
        }
    }
}

impl Command {
    /// The agent's flags given to this command; None for the seller's commands.
    fn agent_flags(&self) -> Option<&Global> {
        match self {
            Command::Run { g, .. }
            | Command::Id { g, .. }
            | Command::Prestart { g, .. }
            | Command::Status { g, .. }
            | Command::Ping { g }
            | Command::Config { g, .. }
            | Command::Call { g, .. }
            | Command::ImagePrep { g, .. }
            | Command::Usage { g, .. }
            | Command::License { g, .. }
            | Command::Authcode { g, .. }
            | Command::Freeze { g, .. }
            | Command::Token { g, .. }
            | Command::Watch { g }
            | Command::Metrics { g, .. } => Some(g),
            Command::Seller { .. } => None,
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let first = cli.first;
    let g = cli
        .command
        .agent_flags()
        .cloned()
        .unwrap_or_default()
        .merged(&first);
    match cli.command {
        Command::Run {
            daemon,
            pidfile,
            log_file,
            ..
        } => run::run(&g, daemon, pidfile, log_file),
        Command::Id {
            explain,
            json,
            local,
            ..
        } => identity::id(&g, explain, json, local),
        Command::Prestart { json, .. } => identity::prestart(&g, json),
        Command::Status { json, .. } => status::status(&g, json),
        Command::Ping { .. } => status::ping(&g),
        Command::Config { command, .. } => config::run(&g, command),
        Command::Call { op, params, .. } => status::call(&g, &op, &params),
        Command::Usage { command, .. } => usage::run(&g, command),
        Command::ImagePrep {
            force,
            dry_run,
            json,
            root,
            ..
        } => run::image_prep(&g, force, dry_run, json, root),
        Command::License { command, .. } => license::run(&g, command),
        Command::Authcode { command, .. } => authcode::run(&g, command),
        Command::Seller { args } => Err(seller::forward(&first, args)),
        Command::Freeze { command, .. } => status::freeze(&g, command),
        Command::Token { command, .. } => status::token(&g, command),
        Command::Metrics { out, .. } => metrics::run(&g, out),
        Command::Watch { .. } => status::watch(&g),
    }
}
