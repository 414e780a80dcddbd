//! `ping`: liveness, the cheapest round trip.

use super::{OpSpec, Reply};

pub const OPS: &[OpSpec] = &[OpSpec {
    name: "ping",
    handler: |_, _| Box::pin(async { Ok(Reply::Json(r#"{"pong":true}"#.into())) }),
}];
