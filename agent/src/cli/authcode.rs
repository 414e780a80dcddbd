//! `kooagent authcode …`: the activated authorization codes (`authcode.*` operations).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use super::flags::Global;
use super::render;

#[derive(Subcommand)]
pub(crate) enum AuthcodeCommand {
    /// Each activated authorization code: product, marketplace status, state, last query
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run the daily query and usage report now (today's clients included)
    Sync,
}

pub(crate) fn run(g: &Global, command: AuthcodeCommand) -> Result<ExitCode> {
    match command {
        AuthcodeCommand::Status { json } => {
            let v = g.client()?.call("authcode.status", json!({}))?;
            render::emit(&v, json, render::authcode_status)?;
        }
        AuthcodeCommand::Sync => {
            let v = g.client()?.call("authcode.sync", json!({}))?;
            print!("{}", render::codes(&v));
        }
    }
    Ok(ExitCode::SUCCESS)
}
