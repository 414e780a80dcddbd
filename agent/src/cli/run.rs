//! `kooagent run` (the daemon) and `kooagent image-prep` (the agent stopped, before an image
//! is captured).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::flags::Global;
use super::render;
use crate::daemon::{self, RunOptions};

pub(crate) fn run(
    g: &Global,
    daemon: bool,
    pidfile: Option<PathBuf>,
    log_file: Option<PathBuf>,
) -> Result<ExitCode> {
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

pub(crate) fn image_prep(
    g: &Global,
    force: bool,
    dry_run: bool,
    json: bool,
    root: Option<PathBuf>,
) -> Result<ExitCode> {
    let cfg = match &root {
        Some(r) => crate::image_prep::config_for_root(r, g.config.as_deref())?,
        None => g.load()?.config,
    };
    let report = crate::image_prep::run(&cfg, force, dry_run)?;
    if json {
        print!("{}", render::json_text(&report)?);
    } else {
        print!("{}", render::image_prep(&report, dry_run));
    }
    Ok(ExitCode::SUCCESS)
}
