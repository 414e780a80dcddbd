//! `license.status`, `license.check`, `license.install`, `license.remove`: the seller's
//! software asks whether it may run; the operator installs licenses. Checks answer from
//! the precomputed verdict table (no signature work per check).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Call, Inline, InlineSpec, OpFuture, OpSpec, Reply};
use crate::agent::Agent;
use crate::license::store::Installed;
use crate::protocol::{params, OpError};

/// No license is installed for the product asked about.
pub const NO_LICENSE: &str = "no_license";
/// `license.remove`: no license with that id.
pub const LICENSE_NOT_FOUND: &str = "license_not_found";
/// Could not write or remove a license file.
pub const STORE_FAILED: &str = "store_failed";

pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "license.status",
        handler: status,
    },
    OpSpec {
        name: "license.check",
        handler: check,
    },
    OpSpec {
        name: "license.install",
        handler: install,
    },
    OpSpec {
        name: "license.remove",
        handler: remove,
    },
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckParams {
    product: String,
    #[serde(default)]
    feature: Option<String>,
}

pub const CHECK_INLINE: InlineSpec = InlineSpec {
    name: "license.check",
    handler: check_inline,
};

/// [`CheckParams`] borrowed from the request line; a string with escapes does not borrow
/// and leaves the request to [`check`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRef<'a> {
    product: &'a str,
    #[serde(default)]
    feature: Option<&'a str>,
}

/// `license.check` answered in place from the verdict table, borrowed under its read lock
/// and written straight into `out`. Left to [`check`]: params it cannot borrow or that are
/// wrong (which [`check`] names), a table still waiting for the device code, and products
/// without a license (the authorization-code lookup and the `no_license` error).
fn check_inline(agent: &Agent, req: &Inline<'_>, out: &mut Vec<u8>) -> bool {
    let Some(Ok(p)) = req
        .params
        .map(|raw| serde_json::from_str::<CheckRef>(raw.get()))
    else {
        return false;
    };
    let v = agent.license.verdicts_ref();
    if v.device_pending {
        return false;
    }
    let start = out.len();
    crate::protocol::write_ok_start(out, req.id);
    if !v.write_check(out, p.product, p.feature, agent.clock.now_secs()) {
        out.truncate(start);
        return false;
    }
    crate::protocol::write_ok_end(out);
    true
}

fn check(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: CheckParams = params(&call.params)?;
        let mut v = agent.license.verdicts();
        if v.device_pending {
            // Just started: bound licenses need the device code, which is moments away.
            agent.device.wait_ready(Duration::from_secs(5)).await;
            v = agent.license.refresh().await;
        }
        let now = agent.clock.now_secs();
        match v.check_json(&p.product, p.feature.as_deref(), now) {
            Some(answer) => Ok(Reply::Json(answer.into())),
            None => match agent.authcode.check(&p.product, call.peer.uid, now) {
                Some(answer) => Ok(Reply::Value(answer)),
                None => Err(OpError::new(
                    NO_LICENSE,
                    format!("no license is installed for product {:?}", p.product),
                )
                .with_details(json!({"product": p.product}))),
            },
        }
    })
}

fn status(agent: Arc<Agent>, _call: Call) -> OpFuture {
    Box::pin(async move {
        let v = agent.license.verdicts();
        let licenses: Vec<&Value> = v.licenses.iter().map(|e| &e.status).collect();
        let mut summary = agent.license.summary();
        summary["licenses"] = json!(licenses);
        summary["rejected"] = json!(v.rejected);
        summary["computed_at"] = json!(crate::clock::format_rfc3339(v.computed_at));
        Ok(Reply::Value(summary))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallParams {
    /// The license file's content, exactly.
    text: String,
    /// Refuse the license unless it is for this product.
    #[serde(default)]
    product: Option<String>,
}

fn install(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: InstallParams = params(&call.params)?;
        let svc = agent.license.clone();
        let result = tokio::task::spawn_blocking(move || {
            svc.install(p.text.as_bytes(), p.product.as_deref())
        })
        .await
        .map_err(|e| OpError::internal(format!("install task failed: {e}")))?;
        let (outcome, verdict) = result.map_err(|e| OpError::new(e.code(), e.to_string()))?;
        let action = match outcome {
            Installed::New(_) => "installed",
            Installed::Replaced(_) => "replaced",
            Installed::Unchanged(_) => "unchanged",
        };
        let mut answer = json!({"license_id": outcome.id(), "action": action});
        if let Some(e) = verdict {
            answer["product"] = json!(e.product);
            answer["state"] = json!(e.state);
            answer["reason"] = json!(e.reason);
        }
        Ok(Reply::Value(answer))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveParams {
    license_id: String,
}

fn remove(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        // Only root or the agent's user get here (the catalogue's `Caller::Owner`, enforced
        // by the dispatcher): installing is harmless (only verified licenses go in), removing
        // would let any member of the socket group switch the seller's software off.
        let p: RemoveParams = params(&call.params)?;
        let svc = agent.license.clone();
        let id = p.license_id.clone();
        let removed = tokio::task::spawn_blocking(move || svc.remove(&id))
            .await
            .map_err(|e| OpError::internal(format!("remove task failed: {e}")))?
            .map_err(|e| OpError::new(STORE_FAILED, e.to_string()))?;
        if !removed {
            return Err(OpError::new(
                LICENSE_NOT_FOUND,
                format!("no installed license has the id {:?}", p.license_id),
            ));
        }
        Ok(Reply::Value(
            json!({"license_id": p.license_id, "removed": true}),
        ))
    })
}
