//! The running agent's state: `status`, `ping`, `freeze status`, `token apply`, `watch`, and
//! the raw `call`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::flags::Global;
use super::render;
use crate::client::ClientError;

#[derive(Subcommand)]
pub(crate) enum FreezeCommand {
    /// Each license's lifecycle state, why, since when, and its actions' results
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Apply a status token file (`-` reads standard input)
    Apply { file: std::path::PathBuf },
}

pub(crate) fn status(g: &Global, json: bool) -> Result<ExitCode> {
    let v = g.client()?.call("agent.status", json!({}))?;
    render::emit(&v, json, render::status)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn ping(g: &Global) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    g.client()?.call("ping", json!({}))?;
    println!("pong in {:.3} ms", start.elapsed().as_secs_f64() * 1e3);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn freeze(g: &Global, command: FreezeCommand) -> Result<ExitCode> {
    let FreezeCommand::Status { json } = command;
    let v = g.client()?.call("freeze.status", json!({}))?;
    render::emit(&v, json, render::freeze_status)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn token(g: &Global, command: TokenCommand) -> Result<ExitCode> {
    let TokenCommand::Apply { file } = command;
    token_apply(g, &file)
}

fn token_apply(g: &Global, file: &Path) -> Result<ExitCode> {
    let bytes = super::license::read_input(file)?;
    crate::freeze::token::parse(&bytes).with_context(|| format!("{}", file.display()))?;
    let text = String::from_utf8(bytes).expect("checked by the parser");
    let v = g
        .client()?
        .call("token.apply", json!({"token": text.trim()}))?;
    print!("{}", render::token_applied(&v));
    Ok(ExitCode::SUCCESS)
}

/// `kooagent call OP [PARAMS]`: exit status 3 when the agent answers with an error.
pub(crate) fn call(g: &Global, op: &str, params: &str) -> Result<ExitCode> {
    let params: Value = serde_json::from_str(params).context("params must be a JSON object")?;
    match g.client()?.call(op, params) {
        Ok(v) => {
            print!("{}", render::json_text(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Op {
            code,
            message,
            details,
        }) => {
            print!("{}", render::call_error(&code, &message, &details)?);
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}

/// `kooagent watch`: one JSON line per freeze-state change, flushed as it comes.
pub(crate) fn watch(g: &Global) -> Result<ExitCode> {
    use std::io::Write;
    let w = g.client()?.watch(json!({}))?;
    let mut out = std::io::stdout().lock();
    for ev in w {
        writeln!(out, "{}", serde_json::to_string(&ev?)?)?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `kooagent call --help`: the operations, from the protocol catalogue.
pub(crate) fn operations_help() -> String {
    format!(
        "Operations (docs/protocol.md):\n{}",
        kooagent_client::catalogue::listing("  ")
    )
}
