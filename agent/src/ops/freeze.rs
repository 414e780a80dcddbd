//! `freeze.status`, `token.apply`, `watch`: the freeze state of each license, the seller's
//! status tokens, and a stream of transitions for the seller's software.

use std::sync::Arc;

use serde::Deserialize;

use super::{Call, OpFuture, OpSpec, Reply};
use crate::agent::Agent;
use crate::protocol::{params, OpError};

pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "freeze.status",
        handler: status,
    },
    OpSpec {
        name: "token.apply",
        handler: apply,
    },
    OpSpec {
        name: "watch",
        handler: watch,
    },
];

fn status(agent: Arc<Agent>, _call: Call) -> OpFuture {
    Box::pin(async move { Ok(Reply::Value(agent.freeze.status())) })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyParams {
    /// The token text (`kst1.…`).
    token: String,
}

fn apply(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: ApplyParams = params(&call.params)?;
        let a = agent.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = a.freeze.apply_token(
                p.token.as_bytes(),
                &a.license.trusted_keys(),
                a.license.time_view(),
            );
            if r.is_ok() {
                a.license.refresh_blocking();
            }
            r
        })
        .await
        .map_err(|e| OpError::internal(format!("token task failed: {e}")))?;
        result
            .map(Reply::Value)
            .map_err(|e| OpError::new(e.code, e.message))
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WatchParams {
    /// Also stream the license verdict table (for clients that answer checks from memory).
    #[serde(default)]
    verdicts: bool,
}

fn watch(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: WatchParams = if call.params.is_null() {
            WatchParams::default()
        } else {
            params(&call.params)?
        };
        if p.verdicts {
            let license = agent.license.clone();
            let table = move || license.verdicts().cache_event();
            return Ok(Reply::Stream(agent.freeze.subscribe_verdicts(&table)));
        }
        Ok(Reply::Stream(agent.freeze.subscribe()))
    })
}
