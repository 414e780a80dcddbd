//! Command-line faces of the agent. Parsing and printing live here; the work is done by the
//! library modules or, for anything about the running agent, through the socket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::config::{self, Overrides};
use crate::daemon::{self, RunOptions};
use crate::device_code::Resolver;

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

/// Flags written before the command (`kooagent --config FILE status`). They are not global:
/// a global flag reaches every subcommand, and the seller's commands must not offer the
/// agent's socket, state directory or configuration path. Each command declares its own
/// flags instead; these are the fallback for scripts that put them first.
#[derive(Args, Clone, Default)]
struct FirstFlags {
    /// Configuration file for the command that follows: the agent's, or for `seller
    /// serve|device|enroll|outbox` the seller server's
    #[arg(long)]
    config: Option<PathBuf>,
    /// Socket path (agent commands)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory (agent commands)
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace
    #[arg(long)]
    log_level: Option<String>,
}

/// The agent's flags, accepted by every agent command (and its subcommands).
#[derive(Args, Clone, Default)]
struct Global {
    /// Configuration file [env: KOOAGENT_CONFIG] (default: /etc/kooagent/agent.toml as root,
    /// ~/.config/kooagent/agent.toml otherwise)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Socket path (overrides socket.path) [env: KOOAGENT_SOCKET]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// State directory (overrides agent.state_dir)
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace (overrides agent.log_level)
    #[arg(long, global = true)]
    log_level: Option<String>,
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
    fn merged(self, first: &FirstFlags) -> Global {
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

    fn overrides(&self) -> Overrides {
        Overrides {
            log_level: self.log_level.clone(),
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            pidfile: None,
        }
    }

    fn load(&self) -> Result<config::Loaded> {
        Ok(config::load(self.config.as_deref(), &self.overrides())?)
    }

    fn client(&self) -> Result<Client> {
        let cfg = self.load()?.config;
        Ok(Client::connect(&cfg.socket.path)?)
    }
}

/// The seller server's flags (`seller serve`, `seller device`, `seller enroll`, `seller outbox`).
#[derive(Args, Clone, Default)]
struct ServerFlags {
    /// The seller server's configuration file [env: KOOAGENT_SELLER_CONFIG] (default:
    /// /etc/kooagent-seller/server.toml as root, ~/.config/kooagent-seller/server.toml otherwise)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// error, warn, info, debug or trace (default: info)
    #[arg(long, global = true)]
    log_level: Option<String>,
}

impl ServerFlags {
    /// The server configuration file: this command's --config, else one written before
    /// the command, else $KOOAGENT_SELLER_CONFIG, else the default path. Never the agent's
    /// KOOAGENT_CONFIG: a developer's shell often has that set for the agent.
    #[cfg(feature = "seller-server")]
    fn config_file(&self, first: &FirstFlags) -> PathBuf {
        self.config
            .clone()
            .or_else(|| first.config.clone())
            .or_else(|| env_path("KOOAGENT_SELLER_CONFIG"))
            .unwrap_or_else(crate::seller_server::default_config_file)
    }

    #[cfg(feature = "seller-server")]
    fn load(&self, first: &FirstFlags) -> Result<crate::seller_server::SellerServerConfig> {
        let path = self.config_file(first);
        if !path.exists() && self.config.is_none() && first.config.is_none() {
            anyhow::bail!(
                "no seller server configuration at {} (the default); write one \
                 (docs/seller-server.md) or give it with --config FILE",
                path.display()
            );
        }
        Ok(crate::seller_server::SellerServerConfig::load(&path)?)
    }
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
    /// The seller's tools: keys, issuing and inspecting licenses (no agent needed)
    Seller {
        #[command(subcommand)]
        command: SellerCommand,
    },
}

#[derive(Subcommand)]
enum UsageCommand {
    /// Pending, delivered and parked records, the last upload attempt, the ledger
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Close the hours that can be closed and deliver everything pending now
    Flush {
        /// Put records the upstream refused back in the queue first
        #[arg(long)]
        retry_parked: bool,
        #[arg(long)]
        json: bool,
    },
    /// Record usage of a meter (durable when this returns)
    Record {
        meter: String,
        /// A decimal amount, e.g. 1.5
        value: String,
        /// When it was used: RFC 3339 UTC or Unix seconds (default now)
        #[arg(long)]
        at: Option<String>,
    },
}

#[derive(Subcommand)]
enum LicenseCommand {
    /// Verify and install a license file (`-` reads standard input)
    Install {
        file: PathBuf,
        /// Refuse the license unless it is for this product
        #[arg(long)]
        product: Option<String>,
    },
    /// Every installed license with its state and reason
    Status {
        #[arg(long)]
        json: bool,
    },
    /// May PRODUCT (and FEATURE) be used? Exit status 0: yes, 2: no
    Check {
        product: String,
        #[arg(long)]
        feature: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove an installed license by id
    Remove { license_id: String },
    /// Activate a KooGallery authorization code (the agent calls the marketplace, or the
    /// seller's relay, and keeps the code)
    Activate {
        code: String,
        /// Relay mode: adopt a code this device activated before (its record was lost)
        /// for this product
        #[arg(long)]
        product: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuthcodeCommand {
    /// Each activated authorization code: product, marketplace status, state, last query
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the daily query and usage report now (today's clients included)
    Sync,
}

#[derive(Subcommand)]
enum FreezeCommand {
    /// Each license's lifecycle state, why, since when, and its actions' results
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Apply a status token file (`-` reads standard input)
    Apply { file: PathBuf },
}

#[derive(Args)]
struct TokenArgs {
    /// The seller's private key (PKCS#8 PEM)
    #[arg(long)]
    key: PathBuf,
    /// The license id the token is about
    #[arg(long)]
    license: String,
    /// freeze, unfreeze or release
    #[arg(long)]
    action: crate::freeze::token::Action,
    /// Sequence number, strictly increasing per license
    #[arg(long)]
    seq: u64,
    /// Device code the token is bound to (repeatable; none: any device holding the license)
    #[arg(long = "device-code")]
    device_code: Vec<String>,
    /// Reason shown to the buyer
    #[arg(long)]
    reason: Option<String>,
    /// Issue time, UTC (default: now)
    #[arg(long)]
    issued_at: Option<String>,
    /// Output file (default: standard output)
    #[arg(long, short)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SellerCommand {
    /// Issue a signed status token (freeze / unfreeze / release a license)
    Token(TokenArgs),
    /// Write a new key pair: FILE (private, PKCS#8 PEM, mode 0600) and FILE.pub (trust line)
    Keygen {
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Set the seller console's admin password: reads it from standard input (one line,
    /// at least 12 characters) and writes its argon2id hash to FILE (mode 0600), the
    /// server's seller_server.console_password_file
    ConsolePassword {
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Issue a signed license; the same inputs give the same bytes
    Issue(Box<IssueArgs>),
    /// Print a license's contents and whether it verifies
    Inspect {
        file: PathBuf,
        /// Key to verify with: a .pub trust line, a PEM public key or the private key
        /// (default: the agent configuration's trusted keys)
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run the seller license server (the marketplace's production interface) with the
    /// `[seller_server]` configuration (docs/seller-server.md)
    Serve {
        #[command(flatten)]
        server: ServerFlags,
    },
    /// The seller server's device registry: which device key each
    /// device code is bound to, and releasing a code so another key can bind it
    Device {
        #[command(flatten)]
        server: ServerFlags,
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// The relay's enrollment tokens: a device key the server
    /// does not know yet may use the relay only with one, up to its quota
    Enroll {
        #[command(flatten)]
        server: ServerFlags,
        #[command(subcommand)]
        command: EnrollCommand,
    },
    /// The server's outboxes: each getLicenseAsync license
    /// upload (pending, retrying or delivered, with attempts, next try and last error)
    /// and the usage relay's counts
    Outbox {
        #[command(flatten)]
        server: ServerFlags,
        /// Delivered uploads to list, latest first (every undelivered one is listed)
        #[arg(long, default_value_t = 20)]
        delivered: u32,
        #[arg(long)]
        json: bool,
    },
    /// Make one signed call to a seller server as the marketplace does; prints the
    /// request, the answer and whether its Body-Sign verifies (exit 0: it does and
    /// resultCode is 000000)
    Call(CallArgs),
}

#[derive(Subcommand)]
enum EnrollCommand {
    /// Make a token (printed once; only its hash is stored) for up to --quota devices
    Create {
        /// A name for the token (e.g. the image it is baked into)
        #[arg(long)]
        label: String,
        #[arg(long)]
        quota: u32,
    },
    /// Print every token: label, used/quota, created, revoked
    List,
    /// Revoke the tokens with this label: no more devices enroll with them
    Revoke { label: String },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Print each binding of a device code (or every binding): code, key, first and last seen
    List {
        #[arg(long = "device-code")]
        device_code: Option<String>,
    },
    /// Release a device code: the next device key that fetches a license for it, signed,
    /// is bound to it instead
    Release { device_code: String },
}

#[derive(Args)]
struct CallArgs {
    /// The activity (getLicense, refreshLicense, expireLicense, releaseLicense,
    /// updateInstanceStatus, ...): the body's `activity` field
    activity: String,
    /// The product's production URL, e.g. https://licenses.example.com:8443/koogallery/sku-pro
    #[arg(long)]
    url: String,
    /// The interconnection key file (the key itself on one line, mode 0600), the
    /// server's seller_server.interconnection_key_file
    #[arg(long)]
    key: PathBuf,
    /// A request field, name=value (repeatable), e.g. --set instanceId=i-1
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Signature style: v2 (§4.1: POST, signature/timestamp/nonce) or legacy (§4.2: GET,
    /// timeStamp/authToken)
    #[arg(long, default_value = "v2", value_parser = ["v2", "legacy"])]
    style: String,
    /// A CA or self-signed certificate (PEM) to trust besides the web PKI roots
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Write an answer field to a file, FIELD=FILE (repeatable), e.g. --save license=my.lic
    #[arg(long, value_name = "FIELD=FILE")]
    save: Vec<String>,
    /// Seconds to wait for the answer
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("term").required(true).args(["days", "not_after", "perpetual"])))]
#[command(group(clap::ArgGroup::new("binding").required(true).args(["device_code", "unbound"])))]
struct IssueArgs {
    /// The seller's private key (PKCS#8 PEM)
    #[arg(long)]
    key: PathBuf,
    /// Device identification code to bind to (repeatable)
    #[arg(long = "device-code")]
    device_code: Vec<String>,
    /// Valid on any device (must be explicit)
    #[arg(long)]
    unbound: bool,
    /// Product / SKU code
    #[arg(long)]
    product: String,
    /// Marketplace instance id
    #[arg(long)]
    instance: String,
    /// Valid for N days from --not-before
    #[arg(long)]
    days: Option<u64>,
    /// Valid until this UTC time (YYYY-MM-DDTHH:MM:SSZ)
    #[arg(long)]
    not_after: Option<String>,
    /// Never expires
    #[arg(long)]
    perpetual: bool,
    /// Valid from this UTC time (default: the issue time)
    #[arg(long)]
    not_before: Option<String>,
    /// Grace period after expiry, in days
    #[arg(long, conflicts_with = "grace_secs")]
    grace_days: Option<u64>,
    /// Grace period after expiry, in seconds
    #[arg(long)]
    grace_secs: Option<u64>,
    /// Entitled feature (repeatable)
    #[arg(long)]
    feature: Vec<String>,
    /// Numeric limit, name=value (repeatable)
    #[arg(long)]
    limit: Vec<String>,
    /// Seller metadata, key=value (repeatable)
    #[arg(long)]
    meta: Vec<String>,
    /// License id (default: derived from the other inputs)
    #[arg(long)]
    id: Option<String>,
    /// Issue time, UTC (default: now); give it to reproduce a license byte for byte
    #[arg(long)]
    issued_at: Option<String>,
    /// Output file (default: standard output)
    #[arg(long, short)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The effective configuration, with where each value came from
    Show,
    /// Check a configuration file and exit non-zero naming the first problem
    Check,
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
        } => {
            let mut overrides = g.overrides();
            overrides.pidfile = pidfile;
            daemon::run(RunOptions {
                config: g.config.clone(),
                overrides,
                daemon,
                log_file,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Id {
            explain,
            json,
            local,
            ..
        } => id(&g, explain, json, local),
        Command::Prestart { json, .. } => {
            let cfg = g.load()?.config;
            let report = Resolver::new(cfg.identity, cfg.agent.product_id, None).prestart()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "wrote {} ({})",
                    report.hashes_file.display(),
                    report.components.join(", ")
                );
                if let Some(b) = &report.boot_id_file {
                    println!("wrote {}", b.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, .. } => {
            let v = g.client()?.call("agent.status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ping { .. } => {
            let start = std::time::Instant::now();
            g.client()?.call("ping", json!({}))?;
            println!("pong in {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { command, .. } => {
            let loaded = g.load()?;
            match command {
                ConfigCommand::Show => print!("{}", loaded.show()),
                ConfigCommand::Check => {
                    println!(
                        "configuration OK ({})",
                        loaded
                            .file
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "embedded defaults".into())
                    );
                    use crate::usage::service::{planned, Planned, DIRECT_WARNING};
                    match planned(&loaded.config) {
                        Ok(Planned::Relay(url)) => {
                            println!("usage: relay mode through the seller's server {url}")
                        }
                        Ok(Planned::Direct) => eprintln!("WARNING: usage: {DIRECT_WARNING}"),
                        Err(why) => println!("usage: not uploaded: {why}"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Call { op, params, .. } => {
            let params: Value =
                serde_json::from_str(&params).context("params must be a JSON object")?;
            match g.client()?.call(&op, params) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(ClientError::Op {
                    code,
                    message,
                    details,
                }) => {
                    let err = json!({"code": code, "message": message, "details": details});
                    println!("{}", serde_json::to_string_pretty(&json!({"error": err}))?);
                    Ok(ExitCode::from(3))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Usage { command, .. } => usage(&g, command),
        Command::ImagePrep {
            force,
            dry_run,
            json,
            root,
            ..
        } => {
            let cfg = match &root {
                Some(r) => crate::image_prep::config_for_root(r, g.config.as_deref())?,
                None => g.load()?.config,
            };
            let report = crate::image_prep::run(&cfg, force, dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for p in &report.removed {
                    println!("{verb} {}", p.display());
                }
                if report.removed.is_empty() {
                    println!("nothing per-instance to remove");
                }
                for k in &report.kept {
                    println!("kept {k}");
                }
                for n in &report.notes {
                    println!("note: {n}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::License { command, .. } => license_cmd(&g, command),
        Command::Authcode { command, .. } => authcode_cmd(&g, command),
        Command::Seller { command } => {
            if first.socket.is_some() || first.state_dir.is_some() {
                anyhow::bail!(
                    "--socket and --state-dir are the agent's flags; the seller's commands do \
                     not take them"
                );
            }
            seller_cmd(&g, &first, command)
        }
        Command::Freeze {
            command: FreezeCommand::Status { json },
            ..
        } => freeze_status(&g, json),
        Command::Token {
            command: TokenCommand::Apply { file },
            ..
        } => {
            let bytes = read_input(&file)?;
            crate::freeze::token::parse(&bytes).with_context(|| format!("{}", file.display()))?;
            let text = String::from_utf8(bytes).expect("checked by the parser");
            let v = g
                .client()?
                .call("token.apply", json!({"token": text.trim()}))?;
            println!(
                "token {} seq {} for license {}: {}; now {} ({})",
                v["action"].as_str().unwrap_or("?"),
                v["seq"],
                v["license_id"].as_str().unwrap_or("?"),
                if v["replayed"] == json!(true) {
                    "already applied, nothing changed"
                } else {
                    "applied"
                },
                v["state"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics { out, .. } => {
            let mut c = g.client()?;
            let mut answers = Vec::new();
            for op in crate::metrics::OPS {
                answers.push(c.call(op, json!({}))?);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let page = crate::metrics::render(&crate::metrics::Inputs::from_answers(answers), now);
            match out {
                Some(path) => crate::metrics::write_file(&path, &page)?,
                None => print!("{page}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { .. } => {
            let c = g.client()?;
            let w = c.watch(json!({}))?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for ev in w {
                writeln!(out, "{}", serde_json::to_string(&ev?)?)?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn usage(g: &Global, command: UsageCommand) -> Result<ExitCode> {
    let mut c = g.client()?;
    match command {
        UsageCommand::Status { json } => {
            let v = c.call("usage.status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_usage_status(&v);
            }
        }
        UsageCommand::Flush { retry_parked, json } => {
            let v = c.call("usage.flush", json!({"retry_parked": retry_parked}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let round = &v["round"];
                println!(
                    "closed {} hourly records; requeued {}; sent {} requests: {} delivered, {} parked; {} pending",
                    v["closed_records"],
                    v["requeued"],
                    round["requests"].as_u64().unwrap_or(0),
                    round["delivered"].as_u64().unwrap_or(0),
                    round["parked"].as_u64().unwrap_or(0),
                    v["pending"]
                );
                if let Some(why) = v["not_sent_because"].as_str() {
                    println!("not everything was sent: {why}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        UsageCommand::Record { meter, value, at } => {
            let at = at.map(|a| match a.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => json!(a),
            });
            let mut p = json!({"meter": meter, "value": value});
            if let Some(at) = at {
                p["at"] = at;
            }
            let v = c.call("usage.record", p)?;
            println!(
                "recorded in the hour starting {}{}",
                v["hour"].as_str().unwrap_or("?"),
                if v["moved"] == json!(true) {
                    " (its own hour was already closed)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_usage_status(v: &Value) {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let up = &v["uploading"];
    if up["mode"] == json!("relay") {
        println!("uploading:  on, relay mode through {}", s(&up["relay"]));
    } else if up["enabled"] == json!(true) {
        println!("uploading:  on, DIRECT mode to {}", s(&up["upstreams"]));
        println!("            WARNING: {}", s(&up["warning"]));
    } else {
        println!("uploading:  OFF: {}", s(&up["reason"]));
    }
    let l = &v["ledger"];
    println!(
        "ledger:     {} ({} bytes, {} commits, {} compactions)",
        s(&l["path"]),
        s(&l["bytes"]),
        s(&l["commits"]),
        s(&l["rotations"])
    );
    if let Some(e) = l["error"].as_str() {
        println!("            ERROR: {e}");
    }
    if let Some(e) = l["last_write_error"].as_str() {
        println!("            last write failed: {e}");
    }
    let torn = l["recovery"]["torn_bytes"].as_u64().unwrap_or(0);
    if torn > 0 {
        println!(
            "            recovered from a torn write: {torn} bytes cut, {} whole entries among them (kept in {})",
            l["recovery"]["torn_entries"].as_u64().unwrap_or(0),
            s(&l["recovery"]["torn_saved_as"])
        );
    }
    println!("closed up to {}", s(&v["closed_before"]));
    if let Some(open) = v["open"].as_object() {
        for (meter, o) in open {
            println!(
                "open:       {meter}: {} in {} hour(s) since {}",
                s(&o["value"]),
                s(&o["hours"]),
                s(&o["oldest_hour"])
            );
        }
    }
    println!(
        "pending:    {} (oldest hour {})",
        s(&v["pending"]["records"]),
        s(&v["pending"]["oldest_hour"])
    );
    println!(
        "delivered:  {} (last {} via {})",
        s(&v["delivered"]["records"]),
        s(&v["delivered"]["last_at"]),
        s(&v["delivered"]["last_upstream"])
    );
    if v["relayed"]["records"].as_u64().unwrap_or(0) > 0 {
        println!(
            "relayed:    {} (held by the seller's server, outcome not reported yet)",
            s(&v["relayed"]["records"])
        );
    }
    println!("parked:     {}", s(&v["parked"]["records"]));
    for p in v["parked"]["list"].as_array().into_iter().flatten() {
        println!(
            "            {} {} {} = {}: {}",
            s(&p["hour"]),
            s(&p["meter"]),
            s(&p["instance_id"]),
            s(&p["usage_value"]),
            s(&p["reason"])
        );
    }
    let u = &v["upload"];
    println!(
        "last try:   {} ({} consecutive failures; next {})",
        s(&u["last_attempt_at"]),
        s(&u["consecutive_failures"]),
        s(&u["next_attempt_at"])
    );
    if let Some(t) = u["last_round"]["transient"].as_str() {
        println!("            {t}");
    }
    if let Some(e) = u["last_error"].as_str() {
        println!("last error: {e} ({})", s(&u["last_error_at"]));
    }
    if let Some(b) = u["close_blocked"].as_str() {
        println!("hours open: {b}");
    }
    if let Some(t) = v["totals"].as_object() {
        for (meter, t) in t {
            println!(
                "recorded:   {meter}: {} in {} records",
                s(&t["value"]),
                s(&t["records"])
            );
        }
    }
    let d = &v["dropped"];
    for kind in ["unsent", "unclosed"] {
        if let Some(m) = d[kind].as_object() {
            for (meter, t) in m {
                println!(
                    "DROPPED:    {meter}: {} in {} {kind} records (older than usage.max_age_days or over usage.max_bytes)",
                    s(&t["value"]),
                    s(&t["records"])
                );
            }
        }
    }
}

fn id(g: &Global, explain: bool, as_json: bool, local: bool) -> Result<ExitCode> {
    let loaded = g.load()?;
    let cfg = loaded.config;
    // The running agent is the authority: it may read root-only DMI files this user can't.
    if !local {
        if let Ok(mut c) = Client::connect(&cfg.socket.path) {
            match c.call("device.code", json!({"explain": true})) {
                Ok(v) => {
                    print_id(&v, explain, as_json)?;
                    return Ok(ExitCode::SUCCESS);
                }
                Err(ClientError::Op { code, message, .. }) => {
                    anyhow::bail!("the agent could not give the device code ({code}): {message}")
                }
                Err(e) => log::debug!("agent unreachable, computing locally: {e}"),
            }
        }
    }
    let state_dir = cfg.agent.state_dir.clone();
    let resolver = Resolver::new(
        cfg.identity.clone(),
        cfg.agent.product_id.clone(),
        state_dir.exists().then_some(state_dir),
    );
    let now = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
    let report = resolver.resolve(now, false)?;
    if !report.settled {
        eprintln!(
            "kooagent: the device identity has not settled: {}",
            report.detail
        );
        return Ok(ExitCode::from(4));
    }
    let v = serde_json::to_value(&report)?;
    print_id(&v, explain, as_json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_id(v: &Value, explain: bool, as_json: bool) -> Result<()> {
    if as_json {
        let mut v = v.clone();
        if !explain {
            if let Some(o) = v.as_object_mut() {
                o.retain(|k, _| {
                    matches!(
                        k.as_str(),
                        "code" | "status" | "accepted_codes" | "product_id"
                    )
                });
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", v["code"].as_str().unwrap_or("?"));
    if explain {
        println!("status:  {}", v["status"].as_str().unwrap_or("?"));
        if let Some(d) = v["detail"].as_str() {
            println!("detail:  {d}");
        }
        if let Some(b) = v["baseline_code"].as_str() {
            println!("baseline code: {b}");
        }
        println!("product: {}", v["product_id"].as_str().unwrap_or("?"));
        println!("components (keyed hashes, never raw values):");
        for c in v["components"].as_array().into_iter().flatten() {
            let s = |k: &str| {
                c[k].as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| c[k].to_string())
            };
            println!(
                "  {:<18} {:<9} {:<12} {}",
                s("name"),
                s("class"),
                s("state"),
                c["hash"].as_str().unwrap_or("-")
            );
        }
    }
    Ok(())
}

fn print_status(v: &Value) {
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!(
        "kooagent {} (pid {}), up {}s since {}",
        s("version"),
        s("pid"),
        s("uptime_secs"),
        s("started_at")
    );
    println!("socket:     {}", s("socket"));
    println!("state dir:  {}", s("state_dir"));
    println!("config:     {}", s("config_file"));
    println!("product:    {}", s("product_id"));
    let id = &v["identity"];
    println!(
        "identity:   {} {} {}",
        id["state"].as_str().unwrap_or("?"),
        id["code"].as_str().unwrap_or(""),
        id["status"]
            .as_str()
            .map(|s| format!("({s})"))
            .unwrap_or_default()
    );
    if let Some(d) = id["detail"].as_str() {
        println!("            {d}");
    }
    let lic = &v["license"];
    if lic.is_object() {
        println!(
            "licenses:   {} installed, {} usable{}",
            lic["installed"],
            lic["usable"],
            lic["next_boundary"]
                .as_str()
                .map(|t| format!("; next change {t}"))
                .unwrap_or_default()
        );
        let source = lic["trusted_time_source"].as_str().unwrap_or("?");
        let clock = match lic["clock_behind_secs"].as_i64() {
            Some(s) => format!(
                "CLOCK ROLLBACK: the clock is {} behind it",
                crate::license::verdict::human_secs(s)
            ),
            None => "clock OK".into(),
        };
        println!(
            "trusted time: {} ({source}); {clock}",
            lic["trusted_time"].as_str().unwrap_or("-")
        );
        if let Some(e) = lic["time_file_error"].as_str() {
            println!("            time.json was unreadable: {e}");
        }
    }
    if let Some(sources) = v["sources"].as_object() {
        for (name, h) in sources {
            if h["configured"] == json!(true) || !h["last_attempt_at"].is_null() {
                print_health(name, h);
            }
        }
    }
}

/// One online source's health (`source_health::Health`) on one or two lines.
fn print_health(name: &str, h: &Value) {
    let t = |k: &str| h[k].as_str().unwrap_or("never").to_string();
    let state = if h["last_attempt_at"].is_null() {
        "not tried yet"
    } else if h["failing"] == json!(true) || h["consecutive_failures"].as_u64().unwrap_or(0) > 0 {
        "FAILING"
    } else {
        "ok"
    };
    println!(
        "{:<16} {state}; last attempt {}, last success {}",
        format!("{name}:"),
        t("last_attempt_at"),
        t("last_success_at")
    );
    if let Some(e) = h["last_error"].as_str() {
        println!("                 last error ({}): {e}", t("last_error_at"));
    }
}

fn read_input(file: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let limit = crate::license::format::MAX_LICENSE_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut bytes)?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("opening {}", file.display()))?
            .take(limit)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", file.display()))?;
    }
    Ok(bytes)
}

fn print_codes(v: &Value) {
    let list = v["codes"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no authorization code activated");
    }
    for c in &list {
        println!(
            "{:<24} {:<16} {:<9} {:<9} last query {} {}",
            c["code"].as_str().unwrap_or("?"),
            c["product"].as_str().unwrap_or("?"),
            c["status"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["last_query_at"].as_str().unwrap_or("never"),
            c["last_error"]
                .as_str()
                .map(|e| format!("(failed: {e})"))
                .unwrap_or_default()
        );
    }
}

fn authcode_cmd(g: &Global, command: AuthcodeCommand) -> Result<ExitCode> {
    match command {
        AuthcodeCommand::Status { json } => {
            let v = g.client()?.call("authcode.status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("mode: {}", v["mode"].as_str().unwrap_or("?"));
                print_codes(&v);
                if !v["source"]["last_attempt_at"].is_null() {
                    print_health("daily query", &v["source"]);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuthcodeCommand::Sync => {
            let v = g.client()?.call("authcode.sync", json!({}))?;
            print_codes(&v);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn license_cmd(g: &Global, command: LicenseCommand) -> Result<ExitCode> {
    match command {
        LicenseCommand::Activate {
            code,
            product,
            json,
        } => {
            let mut p = json!({"code": code});
            if let Some(product) = product {
                p["product"] = json!(product);
            }
            let v = g.client()?.call("license.activate", p)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if let Some(m) = v["message"].as_str() {
                    println!("{m}");
                }
                println!(
                    "authorization code {} {} for product {}: {} (expires {})",
                    v["code"].as_str().unwrap_or("?"),
                    if v["already_activated"] == json!(true) {
                        "was already activated"
                    } else {
                        "activated"
                    },
                    v["product"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?"),
                    v["expire_time"].as_str().unwrap_or("unknown")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::Install { file, product } => {
            let bytes = read_input(&file)?;
            // Fail here for what the agent would refuse anyway (and what JSON cannot carry).
            crate::license::format::license_text(&bytes)
                .with_context(|| format!("{}", file.display()))?;
            let text = String::from_utf8(bytes).expect("checked above");
            let mut params = json!({"text": text});
            if let Some(p) = product {
                params["product"] = json!(p);
            }
            // The socket takes one line of at most MAX_LINE bytes (with the envelope);
            // a larger license goes in through the licenses directory instead.
            let line = serde_json::to_string(&params)?.len() + 64;
            if line > crate::protocol::MAX_LINE {
                let cfg = g.load()?.config;
                anyhow::bail!(
                    "{}: the license is {} bytes, over the agent socket's {} KiB request limit; \
                     copy the file into the agent's licenses directory instead ({}), where the \
                     agent picks it up by itself",
                    file.display(),
                    text.len(),
                    crate::protocol::MAX_LINE / 1024,
                    crate::license::licenses_dir(&cfg.agent.state_dir).display()
                );
            }
            let v = g.client()?.call("license.install", params)?;
            println!(
                "license {} {} for product {}: {} ({})",
                v["license_id"].as_str().unwrap_or("?"),
                v["action"].as_str().unwrap_or("?"),
                v["product"].as_str().unwrap_or("?"),
                v["state"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            );
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::Status { json } => {
            let v = g.client()?.call("license.status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let list = v["licenses"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no license installed");
            }
            for l in &list {
                println!(
                    "{:<24} {:<16} {:<14} {}",
                    l["license_id"].as_str().unwrap_or("?"),
                    l["product"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?"),
                    l["reason"].as_str().unwrap_or("")
                );
            }
            for r in v["rejected"].as_array().into_iter().flatten() {
                println!(
                    "rejected {} at {}: {}",
                    r["file"].as_str().unwrap_or("?"),
                    r["at"].as_str().unwrap_or("?"),
                    r["error"].as_str().unwrap_or("")
                );
            }
            println!(
                "trusted time {}{}",
                v["trusted_time"].as_str().unwrap_or("-"),
                if v["clock_rollback"] == json!(true) {
                    " — CLOCK ROLLBACK detected"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::Check {
            product,
            feature,
            json,
        } => {
            let mut params = json!({"product": product});
            if let Some(f) = &feature {
                params["feature"] = json!(f);
            }
            let v = match g.client()?.call("license.check", params) {
                Ok(v) => v,
                Err(ClientError::Op { code, message, .. }) if code == "no_license" => {
                    eprintln!("kooagent: {message}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: {} (license {}){}",
                    product,
                    v["state"].as_str().unwrap_or("?"),
                    v["license_id"].as_str().unwrap_or("?"),
                    v["days_left"]
                        .as_i64()
                        .map(|d| format!(", {d} days left"))
                        .unwrap_or_default()
                );
                println!("  {}", v["reason"].as_str().unwrap_or(""));
                if let Some(f) = v.get("feature") {
                    println!(
                        "  feature {}: {}",
                        f["name"].as_str().unwrap_or("?"),
                        if f["granted"] == json!(true) {
                            "granted"
                        } else {
                            "NOT granted"
                        }
                    );
                }
            }
            Ok(if v["allowed"] == json!(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        LicenseCommand::Remove { license_id } => {
            g.client()?
                .call("license.remove", json!({"license_id": license_id}))?;
            println!("license {license_id} removed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn utc(flag: &str, s: &str) -> Result<i64> {
    crate::clock::parse_rfc3339(s)
        .filter(|_| s.ends_with('Z'))
        .with_context(|| format!("{flag}: {s:?} is not a UTC time written YYYY-MM-DDTHH:MM:SSZ"))
}

fn freeze_status(g: &Global, json: bool) -> Result<ExitCode> {
    let v = g.client()?.call("freeze.status", json!({}))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if v["tampered"] == json!(true) {
        println!(
            "STATE TAMPERED (detected {}): {}",
            v["tampered_at"].as_str().unwrap_or("-"),
            v["tamper"]
                .as_str()
                .unwrap_or("the freeze state was edited or removed")
        );
    }
    let list = v["licenses"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no license known");
    }
    for l in &list {
        println!(
            "{:<24} {:<10} since {}  {}",
            l["license_id"].as_str().unwrap_or("?"),
            l["state"].as_str().unwrap_or("?"),
            l["since"].as_str().unwrap_or("?"),
            l["reason"].as_str().unwrap_or("")
        );
        if let Some(errs) = l["actions"]["errors"].as_array().filter(|e| !e.is_empty()) {
            for e in errs {
                println!("    action failed: {}", e.as_str().unwrap_or("?"));
            }
        }
    }
    if let Some(e) = v["save_error"].as_str() {
        println!("cannot save the freeze state: {e}");
    }
    for (name, key) in [("freeze poll", "tokens"), ("license refresh", "licenses")] {
        let h = &v["online"][key];
        if !h["last_attempt_at"].is_null() {
            print_health(name, h);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn seller_cmd(g: &Global, first: &FirstFlags, command: SellerCommand) -> Result<ExitCode> {
    use crate::license::{format, keys, seller};
    match command {
        SellerCommand::Token(a) => {
            let key = seller::read_signing_key(&a.key)?;
            let req = crate::freeze::token::TokenRequest {
                license_id: a.license.clone(),
                action: a.action,
                seq: a.seq,
                issued_at: match &a.issued_at {
                    Some(s) => utc("--issued-at", s)?,
                    None => crate::clock::Clock::now_secs(&crate::clock::SystemClock),
                },
                devices: a.device_code.clone(),
                reason: a.reason.clone(),
            };
            let text = crate::freeze::token::issue(&req, &key)?;
            match &a.out {
                Some(p) => {
                    std::fs::write(p, format!("{text}\n"))
                        .with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("token written to {}", p.display());
                }
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::Serve { .. } => {
            let _ = first;
            anyhow::bail!(
                "this kooagent was built without the seller server; build it with \
                 `cargo build --release -p kooagent --features seller-server`"
            )
        }
        #[cfg(feature = "seller-server")]
        SellerCommand::Serve { server } => {
            let cfg = server.load(first)?;
            let level = server
                .log_level
                .as_deref()
                .or(first.log_level.as_deref())
                .unwrap_or("info");
            let level = crate::logging::parse_level(level).with_context(|| {
                format!("--log-level {level:?}: use error, warn, info, debug or trace")
            })?;
            crate::logging::init(level, None);
            // SIGHUP reads the same file again.
            let path = server.config_file(first);
            crate::seller_server::http::run(
                &cfg,
                Some(&path),
                std::sync::Arc::new(crate::clock::SystemClock),
            )
            .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::Enroll { .. } => {
            anyhow::bail!(
                "this kooagent was built without the seller server; build it with \
                 `cargo build --release -p kooagent --features seller-server`"
            )
        }
        #[cfg(feature = "seller-server")]
        SellerCommand::Enroll { server, command } => {
            let cfg = server.load(first)?;
            let db = cfg.open_db()?;
            let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock) / 1000;
            match command {
                EnrollCommand::Create { label, quota } => {
                    anyhow::ensure!(quota > 0, "--quota must be at least 1");
                    let mut raw = [0u8; 24];
                    getrandom::getrandom(&mut raw)
                        .map_err(|e| anyhow::anyhow!("the kernel's random source: {e}"))?;
                    let token = format!("ket1-{}", crate::authcode::relay_auth::hex(&raw));
                    let row = crate::seller_server::db::EnrollmentRow {
                        token_sha256: crate::seller_server::relay::enrollment_hash(&token),
                        label: label.clone(),
                        quota: quota as i64,
                        used: 0,
                        created_at: now,
                        revoked: false,
                    };
                    db.run_blocking(move |tx| tx.put_enrollment(&row))?;
                    println!("{token}");
                    eprintln!(
                        "enrollment token {label:?} for up to {quota} devices: put it in the \
                         image's authcode.enrollment_token_file (it is not shown again)"
                    );
                }
                EnrollCommand::List => {
                    for e in db.run_blocking(|tx| tx.all_enrollments())? {
                        println!(
                            "{}\t{}/{}\t{}\t{}",
                            e.label,
                            e.used,
                            e.quota,
                            crate::clock::format_rfc3339(e.created_at),
                            if e.revoked { "revoked" } else { "active" }
                        );
                    }
                }
                EnrollCommand::Revoke { label } => {
                    let l = label.clone();
                    let n = db.run_blocking(move |tx| {
                        let mut n = 0;
                        for mut e in tx.all_enrollments()? {
                            if e.label == l && !e.revoked {
                                e.revoked = true;
                                tx.put_enrollment(&e)?;
                                n += 1;
                            }
                        }
                        Ok(n)
                    })?;
                    anyhow::ensure!(n > 0, "no active enrollment token labelled {label:?}");
                    println!("revoked {n} token(s) labelled {label:?}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::Device { .. } => {
            anyhow::bail!(
                "this kooagent was built without the seller server; build it with \
                 `cargo build --release -p kooagent --features seller-server`"
            )
        }
        #[cfg(feature = "seller-server")]
        SellerCommand::Device { server, command } => {
            let cfg = server.load(first)?;
            let db = cfg.open_db()?;
            let canonical = |c: &str| {
                crate::device_code::parse_code(c)
                    .with_context(|| format!("{c:?} is not a device code"))
            };
            match command {
                DeviceCommand::Release { device_code } => {
                    let code = canonical(&device_code)?;
                    let c = code.clone();
                    if db.run_blocking(move |tx| tx.release_device(&c))? {
                        println!("released {code}: the next device key to fetch its license, signed, is bound to it");
                    } else {
                        println!("{code} was not bound to any device key");
                    }
                }
                DeviceCommand::List { device_code } => {
                    let code = device_code.as_deref().map(canonical).transpose()?;
                    let rows = db.run_blocking(move |tx| match &code {
                        Some(c) => Ok(tx.device_by_code(c)?.into_iter().collect()),
                        None => tx.all_devices(),
                    })?;
                    for d in rows {
                        println!(
                            "{}\t{}\t{}\t{}",
                            d.device_code,
                            d.device_key,
                            crate::clock::format_rfc3339(d.first_seen),
                            crate::clock::format_rfc3339(d.last_seen)
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::Outbox { .. } => anyhow::bail!(
            "this kooagent was built without the seller server; build it with \
             `cargo build --release -p kooagent --features seller-server`"
        ),
        #[cfg(feature = "seller-server")]
        SellerCommand::Outbox {
            server,
            delivered,
            json,
        } => {
            use crate::seller_server::upload;
            let cfg = server.load(first)?;
            let db = cfg.open_db()?;
            let (counts, rows, usage) = db.run_blocking(move |tx| {
                Ok((
                    tx.count_uploads()?,
                    tx.list_uploads(delivered.into())?,
                    tx.usage().usage_counts()?,
                ))
            })?;
            if json {
                println!("{}", upload::status_json(counts, &rows, usage));
            } else {
                print!("{}", upload::status_text(counts, &rows, usage));
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::Call(_) => anyhow::bail!(
            "this kooagent was built without the seller server's tools; build it with \
             `cargo build --release -p kooagent --features seller-server`"
        ),
        #[cfg(feature = "seller-server")]
        SellerCommand::Call(a) => seller_call(&a),
        #[cfg(not(feature = "seller-server"))]
        SellerCommand::ConsolePassword { .. } => anyhow::bail!(
            "this kooagent was built without the seller server; build it with \
             `cargo build --release -p kooagent --features seller-server`"
        ),
        #[cfg(feature = "seller-server")]
        SellerCommand::ConsolePassword { out } => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\n', '\r']);
            let hash = crate::seller_server::console::auth::hash_password(password)?;
            crate::store::atomic_write(&out, format!("{hash}\n").as_bytes(), 0o600)?;
            println!(
                "console password hash written to {} (mode 0600); set \
                 seller_server.console_password_file to it and restart the server",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        SellerCommand::Keygen { out } => {
            let (pub_path, line) = seller::write_keypair(&out)?;
            println!("private key: {} (mode 0600; keep it secret)", out.display());
            println!("public key:  {}", pub_path.display());
            println!("trust it in the agent config:\n[license]\ntrusted_keys = [\"{line}\"]");
            Ok(ExitCode::SUCCESS)
        }
        SellerCommand::Issue(a) => {
            let key = seller::read_signing_key(&a.key)?;
            let pairs = |flag: &str, list: &[String]| -> Result<Vec<(String, String)>> {
                list.iter()
                    .map(|s| seller::parse_pair(s).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
                    .collect()
            };
            let mut limits = std::collections::BTreeMap::new();
            for (k, v) in pairs("--limit", &a.limit)? {
                let n: u64 = v.parse().with_context(|| {
                    format!("--limit {k}={v}: the value must be a whole number")
                })?;
                limits.insert(k, n);
            }
            let req = seller::IssueRequest {
                id: a.id.clone(),
                product: a.product.clone(),
                instance: a.instance.clone(),
                devices: a.device_code.clone(),
                unbound: a.unbound,
                issued_at: match &a.issued_at {
                    Some(s) => utc("--issued-at", s)?,
                    None => crate::clock::Clock::now_secs(&crate::clock::SystemClock),
                },
                not_before: a
                    .not_before
                    .as_deref()
                    .map(|s| utc("--not-before", s))
                    .transpose()?,
                term: match (a.days, &a.not_after) {
                    (Some(d), _) => seller::Term::Days(d),
                    (None, Some(t)) => seller::Term::Until(utc("--not-after", t)?),
                    (None, None) => seller::Term::Perpetual,
                },
                grace_secs: a
                    .grace_secs
                    .unwrap_or(a.grace_days.unwrap_or(0).saturating_mul(86_400)),
                features: a.feature.clone(),
                limits,
                meta: pairs("--meta", &a.meta)?.into_iter().collect(),
            };
            let text = seller::issue(&req, &key)?;
            match &a.out {
                Some(p) => {
                    std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
                    let id = format::parse(text.as_bytes())?.license.id;
                    eprintln!("license {id} written to {}", p.display());
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        SellerCommand::Inspect { file, key, json } => {
            let bytes = read_input(&file)?;
            let parsed = format::parse(&bytes).with_context(|| format!("{}", file.display()))?;
            let (verdict, ok) = match &key {
                Some(k) => {
                    let vk = seller::read_verifying_key(k)?;
                    let kid = format::key_id(&vk);
                    if parsed.license.key_id != kid {
                        let signer = &parsed.license.key_id;
                        (
                            format!("NOT VERIFIED: signed by key {signer}, not by key {kid}"),
                            false,
                        )
                    } else {
                        let t = keys::TrustedKeys::from_keys([vk], &[]);
                        integrity_text(&t.check(&parsed), &format!("key {kid}"))
                    }
                }
                None => match g.load().map(|l| l.config.license.trusted_keys()) {
                    Ok(Ok(t)) if !t.active_ids().is_empty() => {
                        integrity_text(&t.check(&parsed), "the agent's trusted keys")
                    }
                    _ => (
                        "not checked: no --key and no trusted key configured".to_string(),
                        true,
                    ),
                },
            };
            let l = &parsed.license;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "license": serde_json::from_slice::<Value>(&parsed.payload)?,
                        "signature": verdict,
                        "verified": ok,
                    }))?
                );
            } else {
                let t = crate::clock::format_rfc3339;
                println!("license    {}", l.id);
                println!("product    {}", l.product);
                println!("instance   {}", l.instance);
                if l.unbound {
                    println!("devices    any (unbound)");
                } else {
                    println!("devices    {}", l.devices.join(", "));
                }
                println!(
                    "valid      {} .. {}",
                    t(l.not_before),
                    l.not_after.map(t).unwrap_or_else(|| "perpetual".into())
                );
                println!(
                    "grace      {}",
                    crate::license::verdict::human_secs(l.grace_secs as i64)
                );
                println!("features   {}", l.features.join(", "));
                for (k, v) in &l.limits {
                    println!("limit      {k} = {v}");
                }
                println!("issued     {}", t(l.issued_at));
                for (k, v) in &l.meta {
                    println!("meta       {k} = {v}");
                }
                println!("key id     {}", l.key_id);
                println!("signature  {verdict}");
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

fn integrity_text(i: &crate::license::keys::Integrity, against: &str) -> (String, bool) {
    use crate::license::keys::Integrity;
    match i {
        Integrity::Verified => (format!("valid ({against})"), true),
        Integrity::BadSignature => (format!("INVALID: does not verify with {against}"), false),
        Integrity::UntrustedKey(why) => (format!("NOT VERIFIED: {why}"), false),
    }
}

#[cfg(feature = "seller-server")]
fn seller_call(a: &CallArgs) -> Result<ExitCode> {
    use crate::seller_server::call;
    let key = crate::usage::secret::Secret::load_as(&a.key, "--key").map_err(anyhow::Error::msg)?;
    let pairs = |flag: &str, list: &[String]| -> Result<Vec<(String, String)>> {
        list.iter()
            .map(|s| {
                crate::license::seller::parse_pair(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
            })
            .collect()
    };
    let fields = pairs("--set", &a.set)?;
    if fields.iter().any(|(k, _)| k == "activity") {
        anyhow::bail!("--set activity=...: the activity is the first argument");
    }
    let saves = pairs("--save", &a.save)?;
    let spec = call::CallSpec {
        url: a.url.clone(),
        activity: a.activity.clone(),
        fields,
        style: if a.style == "legacy" {
            call::Style::Legacy
        } else {
            call::Style::V2
        },
    };
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let p = call::prepare(key.expose(), &spec, now, &call::nonce());
    println!("> {} {}", p.method, p.url);
    if let Some(body) = &p.body {
        println!("> Content-Type: application/json;charset=utf8");
        println!(">");
        println!("> {body}");
    }
    let answer = call::send(
        &p,
        a.ca.as_deref(),
        std::time::Duration::from_secs(a.timeout),
    )
    .map_err(anyhow::Error::msg)?;
    println!("< HTTP {}", answer.status);
    match &answer.body_sign {
        Some(h) => println!("< Body-Sign: {h}"),
        None => println!("< (no Body-Sign header)"),
    }
    println!("<");
    println!("< {}", answer.body);
    let verifies = answer.body_sign_verifies(key.expose());
    println!(
        "Body-Sign: {}",
        if verifies {
            "verifies (HMAC-SHA256 of the body under the interconnection key)"
        } else {
            "DOES NOT VERIFY with this key"
        }
    );
    let body: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
    for (field, file) in &saves {
        let Some(v) = body[field.as_str()].as_str() else {
            anyhow::bail!("--save {field}={file}: the answer has no string field {field:?}");
        };
        std::fs::write(file, format!("{}\n", v.trim_end()))
            .with_context(|| format!("writing {file}"))?;
        println!("saved {field} to {file}");
    }
    let code = answer.result_code();
    if verifies && code.as_deref() == Some("000000") {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "the call did not succeed: resultCode {}, Body-Sign {}",
            code.as_deref().unwrap_or("missing"),
            if verifies {
                "verifies"
            } else {
                "does not verify"
            }
        );
        Ok(ExitCode::from(1))
    }
}

/// `kooagent call --help`: the operations, from the protocol catalogue.
fn operations_help() -> String {
    format!(
        "Operations (docs/protocol.md):\n{}",
        kooagent_client::catalogue::listing("  ")
    )
}
