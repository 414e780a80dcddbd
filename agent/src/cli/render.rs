//! Every human and JSON rendering of the CLI, in one place: each function takes an answer
//! (the socket's JSON, or a local report) and returns the text to print, so that the verb
//! modules only choose what to ask and where the text goes, and the text can be tested
//! without an agent.

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};

/// One line into a rendering. Writing into a `String` cannot fail.
macro_rules! w {
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
}

/// `--json` and `kooagent call`: the answer, pretty-printed, with a newline.
pub(crate) fn json_text(v: &impl Serialize) -> Result<String> {
    Ok(format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// Prints the answer as JSON when asked, else the human rendering.
pub(crate) fn emit(v: &Value, as_json: bool, human: fn(&Value) -> String) -> Result<()> {
    if as_json {
        print!("{}", json_text(v)?);
    } else {
        print!("{}", human(v));
    }
    Ok(())
}

/// A string field as is; null as "-"; anything else as JSON.
fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn str_or<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().unwrap_or(default)
}

/// `kooagent status` (`agent.status`).
pub(crate) fn status(v: &Value) -> String {
    let mut o = String::new();
    let f = |k: &str| s(&v[k]);
    w!(
        o,
        "kooagent {} (pid {}), up {}s since {}",
        f("version"),
        f("pid"),
        f("uptime_secs"),
        f("started_at")
    );
    w!(o, "socket:     {}", f("socket"));
    w!(o, "state dir:  {}", f("state_dir"));
    w!(o, "config:     {}", f("config_file"));
    w!(o, "product:    {}", f("product_id"));
    let id = &v["identity"];
    w!(
        o,
        "identity:   {} {} {}",
        str_or(&id["state"], "?"),
        str_or(&id["code"], ""),
        id["status"]
            .as_str()
            .map(|s| format!("({s})"))
            .unwrap_or_default()
    );
    if let Some(d) = id["detail"].as_str() {
        w!(o, "            {d}");
    }
    let lic = &v["license"];
    if lic.is_object() {
        w!(
            o,
            "licenses:   {} installed, {} usable{}",
            lic["installed"],
            lic["usable"],
            lic["next_boundary"]
                .as_str()
                .map(|t| format!("; next change {t}"))
                .unwrap_or_default()
        );
        let source = str_or(&lic["trusted_time_source"], "?");
        let clock = match lic["clock_behind_secs"].as_i64() {
            Some(s) => format!(
                "CLOCK ROLLBACK: the clock is {} behind it",
                crate::license::verdict::human_secs(s)
            ),
            None => "clock OK".into(),
        };
        w!(
            o,
            "trusted time: {} ({source}); {clock}",
            str_or(&lic["trusted_time"], "-")
        );
        if let Some(e) = lic["time_file_error"].as_str() {
            w!(o, "            time.json was unreadable: {e}");
        }
    }
    if let Some(sources) = v["sources"].as_object() {
        for (name, h) in sources {
            if h["configured"] == json!(true) || !h["last_attempt_at"].is_null() {
                health(&mut o, name, h);
            }
        }
    }
    o
}

/// One online source's health (`source_health::Health`) on one or two lines.
fn health(o: &mut String, name: &str, h: &Value) {
    let t = |k: &str| str_or(&h[k], "never").to_string();
    let state = if h["last_attempt_at"].is_null() {
        "not tried yet"
    } else if h["failing"] == json!(true) || h["consecutive_failures"].as_u64().unwrap_or(0) > 0 {
        "FAILING"
    } else {
        "ok"
    };
    w!(
        o,
        "{:<16} {state}; last attempt {}, last success {}",
        format!("{name}:"),
        t("last_attempt_at"),
        t("last_success_at")
    );
    if let Some(e) = h["last_error"].as_str() {
        w!(
            o,
            "                 last error ({}): {e}",
            t("last_error_at")
        );
    }
}

/// `kooagent id` (`device.code`, or the local resolver's report): the answer for `--json`,
/// without the explanation unless asked.
pub(crate) fn id_json(v: &Value, explain: bool) -> Value {
    let mut v = v.clone();
    if !explain {
        if let Some(o) = v.as_object_mut() {
            o.retain(|k, _| {
                matches!(
                    k.as_str(),
                    "code" | "status" | "accepted_codes" | "product_id"
                )
            });
        }
    }
    v
}

/// `kooagent id [--explain]`, human.
pub(crate) fn id(v: &Value, explain: bool) -> String {
    let mut o = String::new();
    w!(o, "{}", str_or(&v["code"], "?"));
    if !explain {
        return o;
    }
    w!(o, "status:  {}", str_or(&v["status"], "?"));
    if let Some(d) = v["detail"].as_str() {
        w!(o, "detail:  {d}");
    }
    if let Some(b) = v["baseline_code"].as_str() {
        w!(o, "baseline code: {b}");
    }
    w!(o, "product: {}", str_or(&v["product_id"], "?"));
    w!(o, "components (keyed hashes, never raw values):");
    for c in v["components"].as_array().into_iter().flatten() {
        let f = |k: &str| {
            c[k].as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| c[k].to_string())
        };
        w!(
            o,
            "  {:<18} {:<9} {:<12} {}",
            f("name"),
            f("class"),
            f("state"),
            str_or(&c["hash"], "-")
        );
    }
    o
}

/// `kooagent prestart`, human.
pub(crate) fn prestart(report: &crate::device_code::PrestartReport) -> String {
    let mut o = String::new();
    w!(
        o,
        "wrote {} ({})",
        report.hashes_file.display(),
        report.components.join(", ")
    );
    if let Some(b) = &report.boot_id_file {
        w!(o, "wrote {}", b.display());
    }
    o
}

/// `kooagent image-prep [--dry-run]`, human.
pub(crate) fn image_prep(report: &crate::image_prep::Report, dry_run: bool) -> String {
    let mut o = String::new();
    let verb = if dry_run { "would remove" } else { "removed" };
    for p in &report.removed {
        w!(o, "{verb} {}", p.display());
    }
    if report.removed.is_empty() {
        w!(o, "nothing per-instance to remove");
    }
    for k in &report.kept {
        w!(o, "kept {k}");
    }
    for n in &report.notes {
        w!(o, "note: {n}");
    }
    o
}

/// `kooagent usage status` (`usage.status`).
pub(crate) fn usage_status(v: &Value) -> String {
    let mut o = String::new();
    let up = &v["uploading"];
    if up["mode"] == json!("relay") {
        w!(o, "uploading:  on, relay mode through {}", s(&up["relay"]));
    } else if up["enabled"] == json!(true) {
        w!(o, "uploading:  on, DIRECT mode to {}", s(&up["upstreams"]));
        w!(o, "            WARNING: {}", s(&up["warning"]));
    } else {
        w!(o, "uploading:  OFF: {}", s(&up["reason"]));
    }
    let l = &v["ledger"];
    w!(
        o,
        "ledger:     {} ({} bytes, {} commits, {} compactions)",
        s(&l["path"]),
        s(&l["bytes"]),
        s(&l["commits"]),
        s(&l["rotations"])
    );
    if let Some(e) = l["error"].as_str() {
        w!(o, "            ERROR: {e}");
    }
    if let Some(e) = l["last_write_error"].as_str() {
        w!(o, "            last write failed: {e}");
    }
    let torn = l["recovery"]["torn_bytes"].as_u64().unwrap_or(0);
    if torn > 0 {
        w!(
            o,
            "            recovered from a torn write: {torn} bytes cut, {} whole entries among them (kept in {})",
            l["recovery"]["torn_entries"].as_u64().unwrap_or(0),
            s(&l["recovery"]["torn_saved_as"])
        );
    }
    w!(o, "closed up to {}", s(&v["closed_before"]));
    if let Some(open) = v["open"].as_object() {
        for (meter, m) in open {
            w!(
                o,
                "open:       {meter}: {} in {} hour(s) since {}",
                s(&m["value"]),
                s(&m["hours"]),
                s(&m["oldest_hour"])
            );
        }
    }
    w!(
        o,
        "pending:    {} (oldest hour {})",
        s(&v["pending"]["records"]),
        s(&v["pending"]["oldest_hour"])
    );
    w!(
        o,
        "delivered:  {} (last {} via {})",
        s(&v["delivered"]["records"]),
        s(&v["delivered"]["last_at"]),
        s(&v["delivered"]["last_upstream"])
    );
    if v["relayed"]["records"].as_u64().unwrap_or(0) > 0 {
        w!(
            o,
            "relayed:    {} (held by the seller's server, outcome not reported yet)",
            s(&v["relayed"]["records"])
        );
    }
    w!(o, "parked:     {}", s(&v["parked"]["records"]));
    for p in v["parked"]["list"].as_array().into_iter().flatten() {
        w!(
            o,
            "            {} {} {} = {}: {}",
            s(&p["hour"]),
            s(&p["meter"]),
            s(&p["instance_id"]),
            s(&p["usage_value"]),
            s(&p["reason"])
        );
    }
    let u = &v["upload"];
    w!(
        o,
        "last try:   {} ({} consecutive failures; next {})",
        s(&u["last_attempt_at"]),
        s(&u["consecutive_failures"]),
        s(&u["next_attempt_at"])
    );
    if let Some(t) = u["last_round"]["transient"].as_str() {
        w!(o, "            {t}");
    }
    if let Some(e) = u["last_error"].as_str() {
        w!(o, "last error: {e} ({})", s(&u["last_error_at"]));
    }
    if let Some(b) = u["close_blocked"].as_str() {
        w!(o, "hours open: {b}");
    }
    if let Some(t) = v["totals"].as_object() {
        for (meter, t) in t {
            w!(
                o,
                "recorded:   {meter}: {} in {} records",
                s(&t["value"]),
                s(&t["records"])
            );
        }
    }
    let d = &v["dropped"];
    for kind in ["unsent", "unclosed"] {
        if let Some(m) = d[kind].as_object() {
            for (meter, t) in m {
                w!(
                    o,
                    "DROPPED:    {meter}: {} in {} {kind} records (older than usage.max_age_days or over usage.max_bytes)",
                    s(&t["value"]),
                    s(&t["records"])
                );
            }
        }
    }
    o
}

/// `kooagent usage flush` (`usage.flush`), human.
pub(crate) fn usage_flush(v: &Value) -> String {
    let mut o = String::new();
    let round = &v["round"];
    w!(
        o,
        "closed {} hourly records; requeued {}; sent {} requests: {} delivered, {} parked; {} pending",
        v["closed_records"],
        v["requeued"],
        round["requests"].as_u64().unwrap_or(0),
        round["delivered"].as_u64().unwrap_or(0),
        round["parked"].as_u64().unwrap_or(0),
        v["pending"]
    );
    if let Some(why) = v["not_sent_because"].as_str() {
        w!(o, "not everything was sent: {why}");
    }
    o
}

/// `kooagent usage record` (`usage.record`).
pub(crate) fn usage_recorded(v: &Value) -> String {
    format!(
        "recorded in the hour starting {}{}\n",
        str_or(&v["hour"], "?"),
        if v["moved"] == json!(true) {
            " (its own hour was already closed)"
        } else {
            ""
        }
    )
}

/// The activated authorization codes (`authcode.status`, `authcode.sync`).
pub(crate) fn codes(v: &Value) -> String {
    let mut o = String::new();
    let list = v["codes"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        w!(o, "no authorization code activated");
    }
    for c in &list {
        w!(
            o,
            "{:<24} {:<16} {:<9} {:<9} last query {} {}",
            str_or(&c["code"], "?"),
            str_or(&c["product"], "?"),
            str_or(&c["status"], "?"),
            str_or(&c["state"], "?"),
            str_or(&c["last_query_at"], "never"),
            c["last_error"]
                .as_str()
                .map(|e| format!("(failed: {e})"))
                .unwrap_or_default()
        );
    }
    o
}

/// `kooagent authcode status` (`authcode.status`), human.
pub(crate) fn authcode_status(v: &Value) -> String {
    let mut o = format!("mode: {}\n", str_or(&v["mode"], "?"));
    o.push_str(&codes(v));
    if !v["source"]["last_attempt_at"].is_null() {
        health(&mut o, "daily query", &v["source"]);
    }
    o
}

/// `kooagent license activate` (`license.activate`), human.
pub(crate) fn activated(v: &Value) -> String {
    let mut o = String::new();
    if let Some(m) = v["message"].as_str() {
        w!(o, "{m}");
    }
    w!(
        o,
        "authorization code {} {} for product {}: {} (expires {})",
        str_or(&v["code"], "?"),
        if v["already_activated"] == json!(true) {
            "was already activated"
        } else {
            "activated"
        },
        str_or(&v["product"], "?"),
        str_or(&v["state"], "?"),
        str_or(&v["expire_time"], "unknown")
    );
    o
}

/// `kooagent license install` (`license.install`).
pub(crate) fn installed(v: &Value) -> String {
    format!(
        "license {} {} for product {}: {} ({})\n",
        str_or(&v["license_id"], "?"),
        str_or(&v["action"], "?"),
        str_or(&v["product"], "?"),
        str_or(&v["state"], "?"),
        str_or(&v["reason"], "")
    )
}

/// `kooagent license status` (`license.status`), human.
pub(crate) fn license_status(v: &Value) -> String {
    let mut o = String::new();
    let list = v["licenses"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        w!(o, "no license installed");
    }
    for l in &list {
        w!(
            o,
            "{:<24} {:<16} {:<14} {}",
            str_or(&l["license_id"], "?"),
            str_or(&l["product"], "?"),
            str_or(&l["state"], "?"),
            str_or(&l["reason"], "")
        );
    }
    for r in v["rejected"].as_array().into_iter().flatten() {
        w!(
            o,
            "rejected {} at {}: {}",
            str_or(&r["file"], "?"),
            str_or(&r["at"], "?"),
            str_or(&r["error"], "")
        );
    }
    w!(
        o,
        "trusted time {}{}",
        str_or(&v["trusted_time"], "-"),
        if v["clock_rollback"] == json!(true) {
            " — CLOCK ROLLBACK detected"
        } else {
            ""
        }
    );
    o
}

/// `kooagent license check PRODUCT` (`license.check`), human.
pub(crate) fn license_check(product: &str, v: &Value) -> String {
    let mut o = String::new();
    w!(
        o,
        "{}: {} (license {}){}",
        product,
        str_or(&v["state"], "?"),
        str_or(&v["license_id"], "?"),
        v["days_left"]
            .as_i64()
            .map(|d| format!(", {d} days left"))
            .unwrap_or_default()
    );
    w!(o, "  {}", str_or(&v["reason"], ""));
    if let Some(f) = v.get("feature") {
        w!(
            o,
            "  feature {}: {}",
            str_or(&f["name"], "?"),
            if f["granted"] == json!(true) {
                "granted"
            } else {
                "NOT granted"
            }
        );
    }
    o
}

/// `kooagent freeze status` (`freeze.status`), human.
pub(crate) fn freeze_status(v: &Value) -> String {
    let mut o = String::new();
    if v["tampered"] == json!(true) {
        w!(
            o,
            "STATE TAMPERED (detected {}): {}",
            str_or(&v["tampered_at"], "-"),
            str_or(&v["tamper"], "the freeze state was edited or removed")
        );
    }
    let list = v["licenses"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        w!(o, "no license known");
    }
    for l in &list {
        w!(
            o,
            "{:<24} {:<10} since {}  {}",
            str_or(&l["license_id"], "?"),
            str_or(&l["state"], "?"),
            str_or(&l["since"], "?"),
            str_or(&l["reason"], "")
        );
        if let Some(errs) = l["actions"]["errors"].as_array().filter(|e| !e.is_empty()) {
            for e in errs {
                w!(o, "    action failed: {}", str_or(e, "?"));
            }
        }
    }
    if let Some(e) = v["save_error"].as_str() {
        w!(o, "cannot save the freeze state: {e}");
    }
    let t = &v["tpm"];
    if t["in_use"] == json!(true) {
        w!(
            o,
            "TPM anchor: in use ({}, NV index {}, counter {}){}",
            str_or(&t["device"], "?"),
            str_or(&t["nv_index"], "?"),
            t["counter"],
            t["note"]
                .as_str()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        );
    } else if t.is_object() {
        w!(
            o,
            "TPM anchor: not in use ({}); a restore of the whole state directory is not detected",
            str_or(&t["note"], str_or(&t["mode"], "?"))
        );
    }
    for (name, key) in [("freeze poll", "tokens"), ("license refresh", "licenses")] {
        let h = &v["online"][key];
        if !h["last_attempt_at"].is_null() {
            health(&mut o, name, h);
        }
    }
    o
}

/// `kooagent token apply` (`token.apply`).
pub(crate) fn token_applied(v: &Value) -> String {
    format!(
        "token {} seq {} for license {}: {}; now {} ({})\n",
        str_or(&v["action"], "?"),
        v["seq"],
        str_or(&v["license_id"], "?"),
        if v["replayed"] == json!(true) {
            "already applied, nothing changed"
        } else {
            "applied"
        },
        str_or(&v["state"], "?"),
        str_or(&v["reason"], "")
    )
}

/// `kooagent call`: an error answer, in the same JSON envelope a script would read.
pub(crate) fn call_error(code: &str, message: &str, details: &Option<Value>) -> Result<String> {
    let err = json!({"code": code, "message": message, "details": details});
    json_text(&json!({ "error": err }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_source_is_named_with_its_last_error() {
        let v = json!({"sources": {"freeze_poll": {
            "configured": true, "last_attempt_at": "2026-11-30T10:00:00Z",
            "consecutive_failures": 2, "last_error": "timed out",
            "last_error_at": "2026-11-30T10:00:01Z"}}});
        let text = status(&v);
        assert!(
            text.contains(
                "freeze_poll:     FAILING; last attempt 2026-11-30T10:00:00Z, last success never\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("                 last error (2026-11-30T10:00:01Z): timed out\n"),
            "{text}"
        );
    }

    #[test]
    fn freeze_status_says_whether_the_tpm_anchor_is_in_use() {
        let v = json!({"licenses": [], "tpm": {"mode": "auto", "in_use": true,
            "device": "/dev/tpmrm0", "nv_index": "0x01804b41", "counter": 7, "note": null}});
        assert!(
            freeze_status(&v)
                .contains("TPM anchor: in use (/dev/tpmrm0, NV index 0x01804b41, counter 7)\n"),
            "{}",
            freeze_status(&v)
        );
        let v = json!({"licenses": [], "tpm": {"mode": "off", "in_use": false,
            "note": "[freeze] tpm = \"off\""}});
        assert!(freeze_status(&v).contains("TPM anchor: not in use ([freeze] tpm = \"off\")"));
    }

    #[test]
    fn an_unconfigured_source_never_tried_is_not_shown() {
        let v = json!({"sources": {"license_refresh": {"configured": false}}});
        assert!(!status(&v).contains("license_refresh"));
    }

    #[test]
    fn id_json_keeps_the_explanation_only_when_asked() {
        let v = json!({"code": "C", "status": "ok", "product_id": "p",
                       "accepted_codes": [], "components": [], "detail": "d"});
        let short = id_json(&v, false);
        assert_eq!(
            short.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["accepted_codes", "code", "product_id", "status"]
        );
        assert_eq!(id_json(&v, true), v);
        assert_eq!(id(&v, false), "C\n");
    }

    #[test]
    fn flush_says_why_not_everything_was_sent() {
        let v = json!({"closed_records": 3, "requeued": 0, "pending": 1,
                       "round": {"requests": 1, "delivered": 2, "parked": 0},
                       "not_sent_because": "no upstream"});
        assert_eq!(
            usage_flush(&v),
            "closed 3 hourly records; requeued 0; sent 1 requests: 2 delivered, 0 parked; 1 pending\n\
             not everything was sent: no upstream\n"
        );
    }

    #[test]
    fn a_refused_feature_is_shown_as_not_granted() {
        let v = json!({"state": "valid", "license_id": "L1", "days_left": 3, "reason": "ok",
                       "feature": {"name": "pro", "granted": false}});
        assert_eq!(
            license_check("p", &v),
            "p: valid (license L1), 3 days left\n  ok\n  feature pro: NOT granted\n"
        );
    }

    #[test]
    fn call_errors_keep_the_wire_envelope() {
        let text = call_error("no_license", "none", &None).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["error"]["code"], "no_license");
        assert!(back["error"]["details"].is_null());
    }
}
