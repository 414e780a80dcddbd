//! `agent.status`: version, uptime, where things are, what is configured, and the device
//! identity's state (including clone/drift detection).

use std::sync::Arc;

use serde_json::{json, Value};

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
            "socket_connections": agent.connections.open(),
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
            "sources": sources(&agent, &cfg),
        })))
    })
}

/// Every online source: whether it is configured, its last attempt, success and error.
fn sources(agent: &Agent, cfg: &crate::config::Config) -> Value {
    let with = |configured: bool, health: Value| {
        let mut v = health;
        v["configured"] = json!(configured);
        v
    };
    let upload = agent.usage.upload_info().unwrap_or_default();
    let authcode_used = !agent.authcode.status()["codes"]
        .as_array()
        .is_none_or(|c| c.is_empty());
    json!({
        "freeze_poll": with(!cfg.freeze.token_url.is_empty(),
            json!(agent.freeze.online.tokens.snapshot())),
        "license_refresh": with(!cfg.freeze.license_url.is_empty(),
            json!(agent.freeze.online.licenses.snapshot())),
        "usage_upload": with(cfg.usage.key_file().is_some(), json!({
            "last_attempt_at": upload.last_attempt_at,
            "last_success_at": upload.last_success_at,
            "last_error": upload.last_error,
            "last_error_at": upload.last_error_at,
            "consecutive_failures": upload.consecutive_failures,
            "next_attempt_at": upload.next_attempt_at,
        })),
        "authcode": with(authcode_used, json!(agent.authcode.source.snapshot())),
    })
}
