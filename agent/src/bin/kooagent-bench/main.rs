//! `kooagent-bench`: starts a private agent from the `kooagent` binary beside this one (or
//! `--agent`) and prints a table of what it measured (`bench.rs`; `bench_cached.rs` for the
//! cached check, `bench_conns.rs` for idle connections). Its own binary and module tree, so
//! that neither the shipped `kooagent` nor its library carries benchmark or Redis-comparison
//! code: the bench only uses the library, as a client of the agent would.

mod bench;
mod bench_cached;
mod bench_conns;

// The bench modules name the library's modules as `crate::clock`, `crate::license`, …
use kooagent::{authcode, client, clock, freeze, license, store};

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
    args: bench::BenchArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let agent = match cli.agent {
        Some(p) => Ok(p),
        None => std::env::current_exe()
            .context("locating this program")
            .map(|me| me.with_file_name("kooagent")),
    };
    match agent.and_then(|a| bench::run(cli.args, &a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kooagent-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
