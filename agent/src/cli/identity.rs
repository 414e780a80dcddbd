//! The device identity: `id` (asks the running agent, else computes it) and `prestart` (the
//! privileged start step).

use std::process::ExitCode;

use anyhow::Result;
use serde_json::{json, Value};

use super::flags::Global;
use super::render;
use crate::client::{Client, ClientError};
use crate::device_code::Resolver;

pub(crate) fn id(g: &Global, explain: bool, as_json: bool, local: bool) -> Result<ExitCode> {
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
        print!("{}", render::json_text(&render::id_json(v, explain))?);
    } else {
        print!("{}", render::id(v, explain));
    }
    Ok(())
}

pub(crate) fn prestart(g: &Global, json: bool) -> Result<ExitCode> {
    let cfg = g.load()?.config;
    let report = Resolver::new(cfg.identity, cfg.agent.product_id, None).prestart()?;
    if json {
        print!("{}", render::json_text(&report)?);
    } else {
        print!("{}", render::prestart(&report));
    }
    Ok(ExitCode::SUCCESS)
}
