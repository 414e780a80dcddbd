//! The usage relay's wire (docs/usage.md "Relay mode"): what a device posts to the
//! seller's server and what the server answers, the error codes, and the per-record checks
//! (the usage-data API's own limits, koogallery.md §1.1). Both sides use this: the agent's
//! `usage::relay` (its client) and the seller server's `usage_relay` (its intake).

use serde::{Deserialize, Serialize};

use super::decimal::{self, WIRE_UNIT};
use super::hours::{HourRecord, Key, HOUR};
use super::names::{valid_id, valid_meter_name};
use crate::clock::{format_compact, parse_compact};

/// The relay's endpoint on the seller's server.
pub const PATH: &str = "/v1/usage/records";
/// How far in the future a `record_time` may be (clocks differ).
pub const FUTURE_SKEW_SECS: i64 = 300;

/// The relay's `error_code`s (HTTP status in brackets).
pub mod codes {
    /// [200] Every record is held (see each result's `state`).
    pub const OK: &str = "KOOAGENT.USAGE.0000";
    /// [400] The body or a record is malformed or outside the usage-data API's limits.
    pub const INVALID: &str = "KOOAGENT.USAGE.INVALID";
    /// [401] The device signature, its time or its nonce was refused.
    pub const UNAUTHENTICATED: &str = "KOOAGENT.USAGE.UNAUTHENTICATED";
    /// [403] The server does not know this device key yet (it learns it when the device
    /// fetches its license, signed): the device retries later.
    pub const UNKNOWN_DEVICE: &str = "KOOAGENT.USAGE.UNKNOWN_DEVICE";
    /// [403] A record bills an instance this device is not bound to.
    pub const NOT_BOUND: &str = "KOOAGENT.USAGE.NOT_BOUND";
    /// [403] A record's meter is not one the instance's product may bill.
    pub const METER_NOT_ALLOWED: &str = "KOOAGENT.USAGE.METER_NOT_ALLOWED";
    /// [409] A record's `metering_sn` is already held with other values.
    pub const CONFLICT: &str = "KOOAGENT.USAGE.CONFLICT";
    /// [413] More records than the batch limit (1000), or a body too large.
    pub const TOO_LARGE: &str = "KOOAGENT.USAGE.TOO_LARGE";
    /// [429] This device sends too often: retry after the `Retry-After` seconds.
    pub const RATE_LIMITED: &str = "KOOAGENT.USAGE.RATE_LIMITED";
    /// [503] The server cannot store records right now.
    pub const UNAVAILABLE: &str = "KOOAGENT.USAGE.UNAVAILABLE";
}

/// One record on the wire: the usage-data API's fields plus the device's meter name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireRecord {
    pub metering_sn: String,
    pub instance_id: String,
    pub meter: String,
    pub begin_time: String,
    pub end_time: String,
    pub record_time: String,
    pub usage_value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relate_pkg_instance: Option<String>,
}

impl WireRecord {
    pub fn from_record(r: &HourRecord) -> WireRecord {
        WireRecord {
            metering_sn: r.sn.clone(),
            instance_id: r.key.instance.clone(),
            meter: r.key.meter.clone(),
            begin_time: format_compact(r.begin),
            end_time: format_compact(r.end()),
            record_time: format_compact(r.record_time),
            usage_value: r.usage_value.clone(),
            relate_pkg_instance: r.key.pkg.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub records: Vec<WireRecord>,
}

/// Where the server holds one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResult {
    pub metering_sn: String,
    /// `pending` (held, not uploaded yet), `delivered` or `parked`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub error_code: String,
    #[serde(default)]
    pub error_msg: String,
    #[serde(default)]
    pub results: Vec<RecordResult>,
    /// For a refusal about one record: which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metering_sn: Option<String>,
}

/// Checks one record against the usage-data API's limits: ids of 1..64 printable
/// characters, whole aligned hours, a `usage_value` > 0 with at most 4 decimals and at
/// most 99999999.9999, a `record_time` not before the hour's end nor in the future, an
/// hour not older than `max_age_secs`. The error names the field.
pub fn check_record(r: &WireRecord, now: i64, max_age_secs: i64) -> Result<HourRecord, String> {
    let (begin, record_time) = check_fields(r, now, max_age_secs)?;
    Ok(r.clone().into_record(begin, record_time))
}

/// [`check_record`]'s checks alone: the hour's start and the record time, parsed.
pub fn check_fields(r: &WireRecord, now: i64, max_age_secs: i64) -> Result<(i64, i64), String> {
    let id = |name: &str, v: &str| {
        if valid_id(v) {
            Ok(())
        } else {
            Err(format!("{name} must be 1..64 printable ASCII characters"))
        }
    };
    id("metering_sn", &r.metering_sn)?;
    id("instance_id", &r.instance_id)?;
    if let Some(p) = &r.relate_pkg_instance {
        id("relate_pkg_instance", p)?;
    }
    if !valid_meter_name(&r.meter) {
        return Err("meter must be 1..64 characters of letters, digits, _ - . :".into());
    }
    let time = |name: &str, v: &str| {
        parse_compact(v).ok_or_else(|| format!("{name} {v:?} is not yyyyMMdd'T'HHmmss'Z'"))
    };
    let begin = time("begin_time", &r.begin_time)?;
    let end = time("end_time", &r.end_time)?;
    let record_time = time("record_time", &r.record_time)?;
    if begin % HOUR != 0 || end != begin + HOUR {
        return Err("begin_time and end_time must span one whole UTC hour".into());
    }
    if record_time < end {
        return Err("record_time is before end_time".into());
    }
    if record_time > now + FUTURE_SKEW_SECS {
        return Err("record_time is in the future".into());
    }
    if begin < now - max_age_secs {
        return Err(format!(
            "the hour is older than {} days",
            max_age_secs / 86_400
        ));
    }
    let v = decimal::parse(&r.usage_value).map_err(|e| format!("usage_value: {e}"))?;
    if v.0 % WIRE_UNIT != 0 {
        return Err("usage_value has more than 4 decimals".into());
    }
    if v.to_wire() != r.usage_value {
        return Err(format!(
            "usage_value {:?} is not in the API's form ({:?})",
            r.usage_value,
            v.to_wire()
        ));
    }
    Ok((begin, record_time))
}

impl WireRecord {
    /// The record, its strings moved rather than copied (the relay takes up to 1000 per
    /// request); `begin` and `record_time` as [`check_fields`] parsed them.
    pub fn into_record(self, begin: i64, record_time: i64) -> HourRecord {
        HourRecord {
            sn: self.metering_sn,
            key: Key {
                instance: self.instance_id,
                meter: self.meter,
                pkg: self.relate_pkg_instance,
            },
            begin,
            record_time,
            usage_value: self.usage_value,
        }
    }
}

/// What one POST to the relay ended as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server holds the records: their states.
    Held(Vec<RecordResult>),
    /// The server cannot take them now (unreachable, 5xx, 429, device not known yet,
    /// clock off): retry later.
    Transient(String),
    /// The batch is too large for the server: split it.
    TooLarge,
    /// Refused for a reason a resend will not fix: nothing was stored. `sn`: the one
    /// record the refusal is about, if the server said.
    Refused { sn: Option<String>, reason: String },
}

/// Classifies the relay's answer.
pub fn classify(status: u16, body: &str) -> Outcome {
    let a: Option<Answer> = serde_json::from_str(body).ok();
    let why = |a: &Option<Answer>| match a {
        Some(a) => format!("HTTP {status} {}: {}", a.error_code, a.error_msg),
        None => format!(
            "HTTP {status}: {}",
            body.trim().chars().take(300).collect::<String>()
        ),
    };
    match (status, &a) {
        (200..=299, Some(ans)) if ans.error_code == codes::OK => Outcome::Held(ans.results.clone()),
        (200..=299, _) => Outcome::Transient(format!("unexpected answer: {}", why(&a))),
        (413, _) => Outcome::TooLarge,
        (403, Some(ans)) if ans.error_code == codes::UNKNOWN_DEVICE => Outcome::Transient(why(&a)),
        (400 | 403 | 409, Some(ans)) => Outcome::Refused {
            sn: ans.metering_sn.clone(),
            reason: format!("refused by the seller's relay: {}", why(&a)),
        },
        // 401 (clock off, replay), 404 (an older server), 429, 5xx, anything else: later.
        _ => Outcome::Transient(why(&a)),
    }
}
