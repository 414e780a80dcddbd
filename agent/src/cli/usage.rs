//! `kooagent usage …`: what is recorded, pending, delivered, parked (`usage.*` operations).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;

use super::flags::Global;
use super::render;

#[derive(Subcommand)]
pub(crate) enum UsageCommand {
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

pub(crate) fn run(g: &Global, command: UsageCommand) -> Result<ExitCode> {
    let mut c = g.client()?;
    match command {
        UsageCommand::Status { json } => {
            let v = c.call("usage.status", json!({}))?;
            render::emit(&v, json, render::usage_status)?;
        }
        UsageCommand::Flush { retry_parked, json } => {
            let v = c.call("usage.flush", json!({"retry_parked": retry_parked}))?;
            render::emit(&v, json, render::usage_flush)?;
            // Only the human face signals it by its exit status: a script reading --json
            // has the reason in the answer.
            if !json && v["not_sent_because"].is_string() {
                return Ok(ExitCode::from(2));
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
            print!("{}", render::usage_recorded(&v));
        }
    }
    Ok(ExitCode::SUCCESS)
}
