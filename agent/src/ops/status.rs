//! `agent.status`: version, uptime, where things are, what is configured, and the device
//! identity's state (including clone/drift detection).

use std::sync::Arc;

use serde_json::json;

use super::{Call, OpFuture, OpSpec, Reply};
use crate::agent::Agent;
use crate::device_service::DeviceState;

pub const OPS: &[OpSpec] = &[OpSpec {
    name: "agent.status",
    handler: status,
}];

fn status(agent: Arc<Agent>, _call: Call) -> OpFuture {
    Box::pin(async move {
        let cfg = agent.config();
        let identity = match agent.device.current() {
            DeviceState::Pending => json!({"state": "pending"}),
            DeviceState::Failed(e) => json!({"state": "failed", "error": e}),
            DeviceState::Ready(r) => json!({
                "state": if r.settled { "ready" } else { "settling" },
                "status": r.status,
                "code": if r.settled { json!(r.code) } else { json!(null) },
                "detail": r.detail,
            }),
        };
        Ok(Reply::Value(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": crate::protocol::VERSION,
            "pid": std::process::id(),
            "started_at": crate::clock::format_rfc3339(agent.started_unix),
            "uptime_secs": agent.started.elapsed().as_secs(),
            "config_file": agent.config_file,
            "state_dir": cfg.agent.state_dir,
            "socket": cfg.socket.path,
            "product_id": cfg.agent.product_id,
            "configured": {
                "identity_sources": cfg.identity.source.len(),
                "metadata": cfg.identity.metadata,
            },
            "identity": identity,
            "license": agent.license.summary(),
        })))
    })
}
