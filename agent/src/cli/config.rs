//! `kooagent config show|check`: the effective configuration and whether a file is valid.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use super::flags::Global;

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// The effective configuration, with where each value came from
    Show,
    /// Check a configuration file and exit non-zero naming the first problem
    Check,
}

pub(crate) fn run(g: &Global, command: ConfigCommand) -> Result<ExitCode> {
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
