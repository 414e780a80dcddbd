//! `device.code`: the device identification code the buyer types into the marketplace.
//! Params: `{"explain": bool}` adds the component list (hashes only, never raw values).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{Call, OpFuture, OpSpec, Reply};
use crate::agent::Agent;
use crate::device_service::DeviceState;
use crate::protocol::{params, OpError};

pub const IDENTITY_SETTLING: &str = "identity_settling";
pub const IDENTITY_UNAVAILABLE: &str = "identity_unavailable";

pub const OPS: &[OpSpec] = &[OpSpec {
    name: "device.code",
    handler: code,
}];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    explain: bool,
}

fn code(agent: Arc<Agent>, call: Call) -> OpFuture {
    Box::pin(async move {
        let p: Params = params(&call.params)?;
        let report = match agent.device.current() {
            DeviceState::Ready(r) => r,
            DeviceState::Pending => match agent.device.wait_ready(Duration::from_secs(5)).await {
                DeviceState::Ready(r) => r,
                DeviceState::Pending => {
                    return Err(OpError::new(
                        crate::protocol::codes::NOT_READY,
                        "the device identity is still being computed; retry shortly",
                    ))
                }
                DeviceState::Failed(e) => return Err(OpError::new(IDENTITY_UNAVAILABLE, e)),
            },
            DeviceState::Failed(e) => return Err(OpError::new(IDENTITY_UNAVAILABLE, e)),
        };
        if !report.settled {
            return Err(OpError::new(IDENTITY_SETTLING, report.detail.clone())
                .with_details(json!({"status": report.status})));
        }
        let answer = || {
            json!({
                "code": report.code,
                "status": report.status,
                "accepted_codes": report.accepted_codes,
                "product_id": report.product_id,
            })
        };
        if !p.explain {
            let text = report.answer_json.get_or_init(|| answer().to_string());
            return Ok(Reply::Json(text.clone().into()));
        }
        let mut v = answer();
        v["components"] = serde_json::to_value(&report.components)
            .map_err(|e| OpError::internal(e.to_string()))?;
        v["baseline_code"] = json!(report.baseline_code);
        v["detail"] = json!(report.detail);
        Ok(Reply::Value(v))
    })
}
