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
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Configuration file (default: /etc/kooagent/agent.toml as root, ~/.config/kooagent/agent.toml otherwise)
    #[arg(long, global = true, env = "KOOAGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Socket path (overrides socket.path)
    #[arg(long, global = true, env = "KOOAGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory (overrides agent.state_dir)
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace (overrides agent.log_level)
    #[arg(long, global = true)]
    log_level: Option<String>,
}

impl Global {
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

#[derive(Subcommand)]
enum Command {
    /// Run the agent (foreground; --daemon detaches)
    Run {
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
    /// Show the running agent's status
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Check that the agent answers
    Ping,
    /// Configuration
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Send one raw request to the agent and print the result as JSON
    Call {
        /// Operation name, e.g. agent.status
        op: String,
        /// Params as a JSON object
        #[arg(default_value = "{}")]
        params: String,
    },
    /// Start an agent and measure it; prints a table
    Bench(crate::bench::BenchArgs),
    /// Usage metering: what is recorded, pending, delivered, parked
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let g = cli.global;
    match cli.command {
        Command::Run {
            daemon,
            pidfile,
            log_file,
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
        } => id(&g, explain, json, local),
        Command::Status { json } => {
            let v = g.client()?.call("agent.status", json!({}))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ping => {
            let start = std::time::Instant::now();
            g.client()?.call("ping", json!({}))?;
            println!("pong in {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { command } => {
            let loaded = g.load()?;
            match command {
                ConfigCommand::Show => print!("{}", loaded.show()),
                ConfigCommand::Check => println!(
                    "configuration OK ({})",
                    loaded
                        .file
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "embedded defaults".into())
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Call { op, params } => {
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
        Command::Usage { command } => usage(&g, command),
        Command::Bench(args) => {
            crate::bench::run(args, g.config.clone())?;
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
    if up["enabled"] == json!(true) {
        println!("uploading:  on, to {}", s(&up["upstreams"]));
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
            "            recovered from a torn write: {torn} bytes cut (kept in {})",
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
}
