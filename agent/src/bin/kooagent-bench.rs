//! `kooagent-bench`: starts a private agent from the `kooagent` binary beside this one (or
//! `--agent`) and prints a table of what it measured (agent/src/bench.rs). Its own binary so
//! that the shipped `kooagent` carries no benchmark or Redis-comparison code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "kooagent-bench",
    version,
    about = "Start a private KooAgent and measure it; prints a table"
)]
struct Cli {
    /// The agent binary to measure [default: kooagent beside this program]
    #[arg(long)]
    agent: Option<PathBuf>,
    #[command(flatten)]
    args: kooagent::bench::BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent = match cli.agent {
        Some(p) => Ok(p),
        None => std::env::current_exe()
            .context("locating this program")
            .map(|me| me.with_file_name("kooagent")),
    };
    match agent.and_then(|a| kooagent::bench::run(cli.args, &a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kooagent-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
