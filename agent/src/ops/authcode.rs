//! `license.activate`, `authcode.status`, `authcode.client_seen`, `authcode.sync`: products
//! sold by authorization code. The network calls run on the authcode service's thread.

use std::sync::Arc;

use serde::Deserialize;

use super::{Call, OpFuture, OpSpec, Reply};
use crate::agent::Agent;
use crate::protocol::params;

pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "license.activate",
        handler: activate,
    },
    OpSpec {
        name: "authcode.status",
        handler: status,
    },
    OpSpec {
        name: "authcode.client_seen",
        handler: client_seen,
    },
    OpSpec {
        name: "authcode.sync",
        handler: sync,
    },
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateParams {
    code: String,
    /// Relay mode: the product of a code this device activated before (state lost).
    #[serde(default)]
    product: Option<String>,
}

fn activate(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: ActivateParams = params(&call.params)?;
        Ok(Reply::Value(
            agent
                .authcode
                .activate(&p.code, p.product.as_deref())
                .await?,
        ))
    })
}

fn status(agent: Arc<Agent>, _call: Call) -> OpFuture {
    Box::pin(async move { Ok(Reply::Value(agent.authcode.status())) })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSeenParams {
    product: String,
    /// The seller's own name for the client; absent: the caller's uid.
    #[serde(default)]
    client: Option<String>,
}

fn client_seen(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: ClientSeenParams = params(&call.params)?;
        let client = p.client.unwrap_or_else(|| format!("uid:{}", call.peer.uid));
        let code = agent.authcode.client_seen(&p.product, &client)?;
        Ok(Reply::Value(serde_json::json!({
            "license_id": format!("code:{code}"),
            "client": client,
        })))
    })
}

fn sync(agent: Arc<Agent>, _call: Call) -> OpFuture {
    Box::pin(async move {
        agent.authcode.sync().await?;
        Ok(Reply::Value(agent.authcode.status()))
    })
}
