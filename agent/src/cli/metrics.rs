//! `kooagent metrics [--out FILE]`: the agent's state in the Prometheus text format.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

use super::flags::Global;

pub(crate) fn run(g: &Global, out: Option<PathBuf>) -> Result<ExitCode> {
    let mut c = g.client()?;
    let mut answers = Vec::new();
    for op in crate::metrics::OPS {
        answers.push(c.call(op, json!({}))?);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let page = crate::metrics::render(&crate::metrics::Inputs::from_answers(answers), now);
    match out {
        Some(path) => crate::metrics::write_file(&path, &page)?,
        None => print!("{page}"),
    }
    Ok(ExitCode::SUCCESS)
}
