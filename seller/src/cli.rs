//! `kooagent-seller`'s command line: the seller's tools (keys, licenses, status tokens,
//! signed test calls) and the seller license server with its registries and outboxes.
//! Parsing and printing live here; the work is done by [`crate::issue`] and
//! [`crate::server`]. `kooagent seller ARGS` runs this binary with the same ARGS.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "kooagent-seller",
    version,
    about = "KooGallery seller tools: keys, licenses, status tokens and the seller license server"
)]
struct Cli {
    #[command(flatten)]
    first: FirstFlags,
    #[command(subcommand)]
    command: SellerCommand,
}

/// Flags written before the command (`kooagent-seller --config FILE serve`, or
/// `kooagent --config FILE seller serve`, which runs this binary with them).
#[derive(Args, Clone, Default)]
struct FirstFlags {
    /// Configuration file for the command that follows: for `serve|device|enroll|outbox`
    /// the seller server's, for `inspect` the agent's (its trusted keys)
    #[arg(long)]
    config: Option<PathBuf>,
    /// error, warn, info, debug or trace
    #[arg(long)]
    log_level: Option<String>,
}

/// An environment variable's value, unset and empty alike meaning "not given".
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
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
    fn config_file(&self, first: &FirstFlags) -> PathBuf {
        self.config
            .clone()
            .or_else(|| first.config.clone())
            .or_else(|| env_path("KOOAGENT_SELLER_CONFIG"))
            .unwrap_or_else(crate::server::default_config_file)
    }

    fn load(&self, first: &FirstFlags) -> Result<crate::server::SellerServerConfig> {
        let path = self.config_file(first);
        if !path.exists() && self.config.is_none() && first.config.is_none() {
            anyhow::bail!(
                "no seller server configuration at {} (the default); write one \
                 (docs/seller-server.md) or give it with --config FILE",
                path.display()
            );
        }
        Ok(crate::server::SellerServerConfig::load(&path)?)
    }
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
    action: kooagent_core::freeze::token::Action,
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match seller_cmd(&cli.first, cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kooagent-seller: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn seller_cmd(first: &FirstFlags, command: SellerCommand) -> Result<ExitCode> {
    use crate::issue as seller;
    use kooagent_core::license::{format, keys};
    match command {
        SellerCommand::Token(a) => {
            let key = seller::read_signing_key(&a.key)?;
            let req = kooagent_core::freeze::token::TokenRequest {
                license_id: a.license.clone(),
                action: a.action,
                seq: a.seq,
                issued_at: match &a.issued_at {
                    Some(s) => utc("--issued-at", s)?,
                    None => {
                        kooagent_core::clock::Clock::now_secs(&kooagent_core::clock::SystemClock)
                    }
                },
                devices: a.device_code.clone(),
                reason: a.reason.clone(),
            };
            let text = kooagent_core::freeze::token::issue(&req, &key)?;
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
        SellerCommand::Serve { server } => {
            let cfg = server.load(first)?;
            let level = server
                .log_level
                .as_deref()
                .or(first.log_level.as_deref())
                .unwrap_or("info");
            let level = kooagent_edge::logging::parse_level(level).with_context(|| {
                format!("--log-level {level:?}: use error, warn, info, debug or trace")
            })?;
            kooagent_edge::logging::init(level, None);
            // SIGHUP reads the same file again.
            let path = server.config_file(first);
            crate::server::http::run(
                &cfg,
                Some(&path),
                std::sync::Arc::new(kooagent_core::clock::SystemClock),
            )
            .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        SellerCommand::Enroll { server, command } => {
            let cfg = server.load(first)?;
            let db = cfg.open_db()?;
            let now =
                kooagent_core::clock::Clock::now_ms(&kooagent_core::clock::SystemClock) / 1000;
            match command {
                EnrollCommand::Create { label, quota } => {
                    anyhow::ensure!(quota > 0, "--quota must be at least 1");
                    let mut raw = [0u8; 24];
                    getrandom::getrandom(&mut raw)
                        .map_err(|e| anyhow::anyhow!("the kernel's random source: {e}"))?;
                    let token = format!("ket1-{}", kooagent_core::authcode::relay_auth::hex(&raw));
                    let row = crate::server::db::EnrollmentRow {
                        token_sha256: crate::server::relay::enrollment_hash(&token),
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
                            kooagent_core::clock::format_rfc3339(e.created_at),
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
        SellerCommand::Device { server, command } => {
            let cfg = server.load(first)?;
            let db = cfg.open_db()?;
            let canonical = |c: &str| {
                kooagent_core::device_code::parse_code(c)
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
                            kooagent_core::clock::format_rfc3339(d.first_seen),
                            kooagent_core::clock::format_rfc3339(d.last_seen)
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SellerCommand::Outbox {
            server,
            delivered,
            json,
        } => {
            use crate::server::upload;
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
        SellerCommand::Call(a) => seller_call(&a),
        SellerCommand::ConsolePassword { out } => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\n', '\r']);
            let hash = crate::server::console::auth::hash_password(password)?;
            crate::files::atomic_write(&out, format!("{hash}\n").as_bytes(), 0o600)
                .map_err(anyhow::Error::msg)?;
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
                    None => {
                        kooagent_core::clock::Clock::now_secs(&kooagent_core::clock::SystemClock)
                    }
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
            let bytes = kooagent_edge::input::read_license_input(&file)?;
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
                None => match agent_trusted_keys(first) {
                    Some(t) if !t.active_ids().is_empty() => {
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
                let t = kooagent_core::clock::format_rfc3339;
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
                    kooagent_core::license::verdict::human_secs(l.grace_secs as i64)
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

fn integrity_text(i: &kooagent_core::license::keys::Integrity, against: &str) -> (String, bool) {
    use kooagent_core::license::keys::Integrity;
    match i {
        Integrity::Verified => (format!("valid ({against})"), true),
        Integrity::BadSignature => (format!("INVALID: does not verify with {against}"), false),
        Integrity::UntrustedKey(why) => (format!("NOT VERIFIED: {why}"), false),
    }
}

fn seller_call(a: &CallArgs) -> Result<ExitCode> {
    use crate::server::call;
    let key =
        kooagent_edge::secret::Secret::load_as(&a.key, "--key").map_err(anyhow::Error::msg)?;
    let pairs = |flag: &str, list: &[String]| -> Result<Vec<(String, String)>> {
        list.iter()
            .map(|s| crate::issue::parse_pair(s).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
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
    let now = kooagent_core::clock::Clock::now_ms(&kooagent_core::clock::SystemClock);
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

/// The agent's trusted keys, for `inspect` without `--key` on a machine that runs an
/// agent: the `[license]` section of the agent's configuration (`--config`, else
/// $KOOAGENT_CONFIG, else the agent's default path). None when there is none to read.
fn agent_trusted_keys(first: &FirstFlags) -> Option<kooagent_core::license::keys::TrustedKeys> {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct AgentFile {
        license: LicenseSection,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct LicenseSection {
        trusted_keys: Vec<String>,
        trusted_keys_file: PathBuf,
        revoked_key_ids: Vec<String>,
    }
    let path = first
        .config
        .clone()
        .or_else(|| env_path("KOOAGENT_CONFIG"))
        .or_else(default_agent_config)?;
    let text = std::fs::read_to_string(path).ok()?;
    let l = toml::from_str::<AgentFile>(&text).ok()?.license;
    let file = (!l.trusted_keys_file.as_os_str().is_empty()).then(|| {
        let text = std::fs::read_to_string(&l.trusted_keys_file);
        (l.trusted_keys_file.as_path(), text)
    });
    kooagent_core::license::keys::TrustedKeys::new(&l.trusted_keys, file, &l.revoked_key_ids).ok()
}

/// The agent's default configuration file (as the agent picks it: /etc as root, the
/// user's configuration directory otherwise).
fn default_agent_config() -> Option<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Some("/etc/kooagent/agent.toml".into());
    }
    directories::ProjectDirs::from("", "", "kooagent").map(|d| d.config_dir().join("agent.toml"))
}

fn utc(flag: &str, s: &str) -> Result<i64> {
    kooagent_core::clock::parse_rfc3339(s)
        .filter(|_| s.ends_with('Z'))
        .with_context(|| format!("{flag}: {s:?} is not a UTC time written YYYY-MM-DDTHH:MM:SSZ"))
}
