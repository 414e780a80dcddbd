//! `ping`: liveness, the cheapest round trip.

use serde_json::json;

use super::{OpSpec, Reply};

pub const OPS: &[OpSpec] = &[OpSpec {
    name: "ping",
    handler: |_, _| Box::pin(async { Ok(Reply::Value(json!({"pong": true}))) }),
}];
