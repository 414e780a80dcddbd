//! `freeze.status`, `token.apply`, `watch`: the freeze state of each license, the seller's
//! status tokens, and a stream of transitions for the seller's software.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;

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
struct WatchParams {}

fn watch(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        if !call.params.is_null() && call.params != json!({}) {
            let _: WatchParams = params(&call.params)?;
        }
        Ok(Reply::Stream(agent.freeze.subscribe()))
    })
}
