//! Usage operations:
//! - `usage.record {meter, value, at?}` → `{hour, moved}` once the record is durable.
//! - `usage.record_batch {records: [{meter, value, at?}, ...]}` → `{recorded, moved}`;
//!   all or nothing: one bad record refuses the batch, naming its index.
//! - `usage.status {records?: bool}` → ledger, pending/delivered/parked, last attempt.
//! - `usage.flush {retry_parked?: bool}` → closes what can be closed, delivers now, and
//!   answers with the outcome.
//!
//! `value` is a decimal string (exact) or a JSON number; `at` is RFC 3339 UTC
//! (`2026-01-02T03:04:05Z`) or Unix seconds, default now.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Call, GroupFuture, GroupSpec, OpFuture, OpResult, OpSpec, Reply};
use crate::agent::Agent;
use crate::clock::{format_rfc3339, parse_rfc3339};
use crate::protocol::{codes, params, OpError};
use crate::usage::decimal;
use crate::usage::ledger::{Item, LedgerError};
use crate::usage::service::RecordError;
use crate::usage::UsageConfig;

pub const INVALID_VALUE: &str = "invalid_value";
pub const INVALID_TIME: &str = "invalid_time";
pub const UNKNOWN_METER: &str = "unknown_meter";
pub const DISK_FULL: &str = "disk_full";
pub const LEDGER_FULL: &str = "ledger_full";
pub const LEDGER_UNAVAILABLE: &str = "ledger_unavailable";
pub const LEDGER_IO: &str = "ledger_io_error";

/// Largest batch accepted in one call.
pub const MAX_BATCH: usize = 10_000;
/// How far ahead of the agent's clock `at` may be (clock skew between processes).
const FUTURE_SKEW_SECS: i64 = 300;

pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "usage.record",
        handler: record,
    },
    OpSpec {
        name: "usage.record_batch",
        handler: record_batch,
    },
    OpSpec {
        name: "usage.status",
        handler: status,
    },
    OpSpec {
        name: "usage.flush",
        handler: flush,
    },
];

/// Pipelined `usage.record` calls on one connection share one ledger commit (one fsync);
/// each is still validated and answered on its own, and only once the commit is durable.
pub const RECORD_GROUP: GroupSpec = GroupSpec {
    name: "usage.record",
    handler: record_group,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordParams {
    meter: String,
    value: Value,
    #[serde(default)]
    at: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchParams {
    records: Vec<RecordParams>,
}

fn parse_at(v: Option<&Value>, now: i64, cfg: &UsageConfig) -> Result<i64, String> {
    let at = match v {
        None | Some(Value::Null) => return Ok(now),
        Some(Value::String(s)) => parse_rfc3339(s).ok_or_else(|| {
            format!("at {s:?} is not an RFC 3339 UTC time such as \"2026-01-02T03:04:05Z\"")
        })?,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(s) if s > 100_000_000_000 => {
                return Err(format!("at {s} looks like milliseconds; give Unix seconds"))
            }
            Some(s) if s >= 0 => s,
            _ => return Err(format!("at {n} is not a whole number of Unix seconds")),
        },
        Some(other) => {
            return Err(format!(
                "at {other} must be an RFC 3339 string or Unix seconds"
            ))
        }
    };
    if at > now + FUTURE_SKEW_SECS {
        return Err(format!(
            "at {} is in the future (the agent's clock says {})",
            format_rfc3339(at),
            format_rfc3339(now)
        ));
    }
    let oldest = now - cfg.max_age_days as i64 * 86_400;
    if at < oldest {
        return Err(format!(
            "at {} is older than usage.max_age_days ({} days)",
            format_rfc3339(at),
            cfg.max_age_days
        ));
    }
    Ok(at)
}

/// Validates and resolves one record; errors are prefixed with `prefix` (the batch index).
fn item(
    agent: &Agent,
    cfg: &UsageConfig,
    now: i64,
    p: &RecordParams,
    prefix: &str,
) -> Result<Item, OpError> {
    let value = decimal::parse_json(&p.value)
        .map_err(|e| OpError::new(INVALID_VALUE, format!("{prefix}value {e}")))?;
    let at = parse_at(p.at.as_ref(), now, cfg)
        .map_err(|e| OpError::new(INVALID_TIME, format!("{prefix}{e}")))?;
    let key = agent.usage.resolve(cfg, &p.meter).map_err(|e| match e {
        RecordError::UnknownMeter(_) => OpError::new(UNKNOWN_METER, format!("{prefix}{e}")),
        other => OpError::new(UNKNOWN_METER, format!("{prefix}{other}")),
    })?;
    Ok(Item {
        key,
        at,
        value: value.0,
    })
}

fn record_error(e: RecordError) -> OpError {
    match e {
        RecordError::Ledger(l) => {
            let code = match &l {
                LedgerError::DiskFull(_) => DISK_FULL,
                LedgerError::Full(_) => LEDGER_FULL,
                LedgerError::Io(_) => LEDGER_IO,
                LedgerError::Unavailable(_) => LEDGER_UNAVAILABLE,
                LedgerError::Busy => codes::BUSY,
            };
            OpError::new(code, l.to_string())
        }
        RecordError::NotStarted => OpError::new(codes::NOT_READY, e.to_string()),
        other => OpError::new(UNKNOWN_METER, other.to_string()),
    }
}

fn record(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: RecordParams = params(&call.params)?;
        let cfg = agent.config();
        let now = agent.clock.now_secs();
        let it = item(&agent, &cfg.usage, now, &p, "")?;
        let at_hour = crate::usage::hours::hour_of(it.at);
        let hours = agent.usage.record(vec![it]).await.map_err(record_error)?;
        Ok(recorded(hours[0], at_hour))
    })
}

/// The answer to one durable `usage.record`: the hour it went into.
fn recorded(hour: i64, at_hour: i64) -> Reply {
    Reply::Value(json!({
        "hour": format_rfc3339(hour),
        // The hour of `at` was already closed: the usage went into the current hour.
        "moved": hour != at_hour,
    }))
}

/// Several `usage.record` calls as one ledger command: a call refused on its own (bad
/// params, unknown meter) gets its error and takes nothing from the others; the valid ones
/// are committed together and share the commit's outcome, as commands of one group commit
/// always do.
fn record_group(agent: Arc<Agent>, calls: Vec<Result<Call, OpError>>) -> GroupFuture {
    Box::pin(async move {
        let cfg = agent.config();
        let now = agent.clock.now_secs();
        let mut items = Vec::with_capacity(calls.len());
        let checked: Vec<Result<i64, OpError>> = calls
            .into_iter()
            .map(|call| {
                let p: RecordParams = params(&call?.params)?;
                let it = item(&agent, &cfg.usage, now, &p, "")?;
                let at_hour = crate::usage::hours::hour_of(it.at);
                items.push(it);
                Ok(at_hour)
            })
            .collect();
        let committed = if items.is_empty() {
            Ok(Vec::new())
        } else {
            agent.usage.record(items).await.map_err(record_error)
        };
        let mut hours = committed.as_deref().unwrap_or_default().iter();
        checked
            .into_iter()
            .map(|c| -> OpResult {
                let at_hour = c?;
                match &committed {
                    Ok(_) => {
                        let h = *hours.next().expect("one hour per committed item");
                        Ok(recorded(h, at_hour))
                    }
                    Err(e) => Err(e.clone()),
                }
            })
            .collect()
    })
}

fn record_batch(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: BatchParams = params(&call.params)?;
        if p.records.is_empty() {
            return Err(OpError::invalid_params("records is empty"));
        }
        if p.records.len() > MAX_BATCH {
            return Err(OpError::invalid_params(format!(
                "{} records in one batch; at most {MAX_BATCH}",
                p.records.len()
            )));
        }
        let cfg = agent.config();
        let now = agent.clock.now_secs();
        let mut items = Vec::with_capacity(p.records.len());
        let mut at_hours = Vec::with_capacity(p.records.len());
        for (i, r) in p.records.iter().enumerate() {
            let it = item(&agent, &cfg.usage, now, r, &format!("records[{i}]: "))?;
            at_hours.push(crate::usage::hours::hour_of(it.at));
            items.push(it);
        }
        let n = items.len();
        let hours = agent.usage.record(items).await.map_err(record_error)?;
        let moved = hours.iter().zip(&at_hours).filter(|(h, a)| h != a).count();
        Ok(Reply::Value(json!({"recorded": n, "moved": moved})))
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatusParams {
    #[serde(default)]
    records: bool,
}

fn status(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: StatusParams = params(&call.params)?;
        agent.usage.wait_open().await;
        let cfg = agent.config();
        Ok(Reply::Value(agent.usage.status(&cfg, p.records)))
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FlushParams {
    #[serde(default)]
    retry_parked: bool,
}

fn flush(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: FlushParams = params(&call.params)?;
        let r = agent
            .usage
            .flush(p.retry_parked)
            .await
            .map_err(record_error)?;
        serde_json::to_value(r)
            .map(Reply::Value)
            .map_err(|e| OpError::internal(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_checked() {
        let cfg = UsageConfig::default();
        let now = 1_700_000_000;
        assert_eq!(parse_at(None, now, &cfg), Ok(now));
        assert_eq!(parse_at(Some(&json!(now - 10)), now, &cfg), Ok(now - 10));
        assert_eq!(
            parse_at(Some(&json!("2023-11-14T22:13:20Z")), now, &cfg),
            Ok(1_700_000_000)
        );
        assert!(parse_at(Some(&json!(now + 3600)), now, &cfg)
            .unwrap_err()
            .contains("future"));
        assert!(parse_at(Some(&json!(now - 40 * 86_400)), now, &cfg)
            .unwrap_err()
            .contains("max_age_days"));
        assert!(parse_at(Some(&json!(now * 1000)), now, &cfg)
            .unwrap_err()
            .contains("milliseconds"));
        assert!(parse_at(Some(&json!("yesterday")), now, &cfg)
            .unwrap_err()
            .contains("RFC 3339"));
        assert!(parse_at(Some(&json!(1.5)), now, &cfg).is_err());
    }
}
