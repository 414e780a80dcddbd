//! `kooagent license …`: install, status, check, remove, activate (`license.*` operations).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use super::flags::Global;
use super::render;
use crate::client::ClientError;

#[derive(Subcommand)]
pub(crate) enum LicenseCommand {
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

pub(crate) fn run(g: &Global, command: LicenseCommand) -> Result<ExitCode> {
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
            render::emit(&v, json, render::activated)?;
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::Install { file, product } => install(g, &file, product),
        LicenseCommand::Status { json } => {
            let v = g.client()?.call("license.status", json!({}))?;
            render::emit(&v, json, render::license_status)?;
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
                print!("{}", render::json_text(&v)?);
            } else {
                print!("{}", render::license_check(&product, &v));
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

fn install(g: &Global, file: &Path, product: Option<String>) -> Result<ExitCode> {
    let bytes = read_input(file)?;
    // Fail here for what the agent would refuse anyway (and what JSON cannot carry).
    crate::license::format::license_text(&bytes).with_context(|| format!("{}", file.display()))?;
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
    print!("{}", render::installed(&v));
    Ok(ExitCode::SUCCESS)
}

/// A license or token file, or standard input for `-` (bounded: see
/// `kooagent_edge::input`).
pub(crate) fn read_input(file: &Path) -> Result<Vec<u8>> {
    Ok(kooagent_edge::input::read_license_input(file)?)
}
