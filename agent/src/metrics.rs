//! `kooagent metrics`: the agent's state in the Prometheus text format, for
//! node_exporter's textfile collector (docs/operations.md "Metrics"). No port is opened on
//! the device: the command prints the page (or writes it atomically to a file), and with
//! `[metrics] textfile` set the running agent rewrites that file every `interval_secs`.
//!
//! The page is made from the answers of `agent.status`, `license.status`, `usage.status`
//! and `freeze.status` ([`render`], pure), the same whether the command asks the agent
//! over its socket or the agent writes the file itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::Config;
use crate::prom::Text;
use crate::services::{done, Service, Step};

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// The running agent writes the metrics here every `interval_secs` (write to a
    /// temporary file, then rename); empty: never (`kooagent metrics` still prints them).
    pub textfile: PathBuf,
    pub interval_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            textfile: PathBuf::new(),
            interval_secs: 60,
        }
    }
}

impl MetricsConfig {
    /// Checks the values: (key, what is wrong).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.textfile.as_os_str().is_empty() {
            if !self.textfile.is_absolute() {
                return Err(("metrics.textfile", "must be an absolute path".into()));
            }
            if self.textfile.extension().is_none_or(|e| e != "prom") {
                return Err((
                    "metrics.textfile",
                    "must end in .prom (node_exporter reads only those)".into(),
                ));
            }
        }
        if !(5..=3600).contains(&self.interval_secs) {
            return Err(("metrics.interval_secs", "must be between 5 and 3600".into()));
        }
        Ok(())
    }
}

/// The operations' answers a page is made from.
pub struct Inputs {
    pub status: Value,
    pub licenses: Value,
    pub usage: Value,
    pub freeze: Value,
}

/// The operations asked, in order (the same for the socket and in process).
pub const OPS: [&str; 4] = [
    "agent.status",
    "license.status",
    "usage.status",
    "freeze.status",
];

impl Inputs {
    /// From the answers to [`OPS`], in that order.
    pub fn from_answers(mut answers: Vec<Value>) -> Inputs {
        answers.resize(4, Value::Null);
        let mut it = answers.into_iter();
        let mut next = || it.next().unwrap_or(Value::Null);
        Inputs {
            status: next(),
            licenses: next(),
            usage: next(),
            freeze: next(),
        }
    }
}

fn flag(v: &Value) -> f64 {
    if v.as_bool() == Some(true) {
        1.0
    } else {
        0.0
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Seconds from the RFC 3339 time `v` to `now`, if `v` is a time.
fn age(v: &Value, now: i64) -> Option<f64> {
    v.as_str()
        .and_then(crate::clock::parse_rfc3339)
        .map(|t| (now - t).max(0) as f64)
}

/// The page, at `now` (Unix seconds).
pub fn render(i: &Inputs, now: i64) -> String {
    let mut t = Text::new();
    let s = &i.status;
    let version = s["version"].as_str().unwrap_or(env!("CARGO_PKG_VERSION"));
    t.family(
        "kooagent_agent_info",
        "gauge",
        "The agent's version (always 1).",
    )
    .sample("kooagent_agent_info", &[("version", version)], 1.0);
    if let Some(up) = num(&s["uptime_secs"]) {
        t.single(
            "kooagent_agent_uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
            up,
        );
    }
    if let Some(n) = num(&s["socket_connections"]) {
        t.single(
            "kooagent_socket_connections",
            "gauge",
            "Connections open on the agent's socket (this collection's own included).",
            n,
        );
    }
    let identity = s["identity"]["state"].as_str().unwrap_or("unknown");
    t.family(
        "kooagent_identity_state",
        "gauge",
        "The device identity's state (pending, ready, settling, failed).",
    )
    .sample("kooagent_identity_state", &[("state", identity)], 1.0);

    // Licenses.
    let l = &i.licenses;
    for (name, key, help) in [
        (
            "kooagent_licenses_installed",
            "installed",
            "Licenses installed.",
        ),
        (
            "kooagent_licenses_usable",
            "usable",
            "Licenses that may be used now.",
        ),
    ] {
        if let Some(n) = num(&l[key]) {
            t.single(name, "gauge", help, n);
        }
    }
    t.single(
        "kooagent_clock_rollback",
        "gauge",
        "1 when the clock was found set back (licenses judged by the trusted time).",
        flag(&l["clock_rollback"]),
    );
    let list = l["licenses"].as_array().cloned().unwrap_or_default();
    let name = "kooagent_license_state";
    t.family(
        name,
        "gauge",
        "Each installed license's state (valid, grace, expired, ...), always 1.",
    );
    for lic in &list {
        t.sample(
            name,
            &[
                ("license_id", lic["license_id"].as_str().unwrap_or("")),
                ("product", lic["product"].as_str().unwrap_or("")),
                ("state", lic["state"].as_str().unwrap_or("unknown")),
            ],
            1.0,
        );
    }
    let name = "kooagent_license_expiry_timestamp_seconds";
    t.family(
        name,
        "gauge",
        "When each license expires (Unix seconds; perpetual licenses have none).",
    );
    for lic in &list {
        if let Some(at) = lic["not_after"]
            .as_str()
            .and_then(crate::clock::parse_rfc3339)
        {
            t.sample(
                name,
                &[
                    ("license_id", lic["license_id"].as_str().unwrap_or("")),
                    ("product", lic["product"].as_str().unwrap_or("")),
                ],
                at as f64,
            );
        }
    }

    // Freeze.
    let f = &i.freeze;
    let frozen = f["licenses"].as_array().cloned().unwrap_or_default();
    let name = "kooagent_freeze_state";
    t.family(
        name,
        "gauge",
        "Each license's lifecycle state (active, grace, frozen, released), always 1.",
    );
    for lic in &frozen {
        t.sample(
            name,
            &[
                ("license_id", lic["license_id"].as_str().unwrap_or("")),
                ("product", lic["product"].as_str().unwrap_or("")),
                ("state", lic["state"].as_str().unwrap_or("unknown")),
            ],
            1.0,
        );
    }
    t.single(
        "kooagent_licenses_frozen",
        "gauge",
        "Licenses frozen now.",
        frozen.iter().filter(|l| l["state"] == "frozen").count() as f64,
    );
    t.single(
        "kooagent_freeze_state_tampered",
        "gauge",
        "1 when the lifecycle state file was found tampered with.",
        flag(&f["tampered"]),
    );

    // Usage.
    let u = &i.usage;
    if u["started"] != json!(false) && u.is_object() {
        let name = "kooagent_usage_records";
        t.family(
            name,
            "gauge",
            "Closed hourly usage records by state: pending (to send), relayed (accepted by \
             the seller's relay), delivered, parked (refused by the upstream).",
        );
        for state in ["pending", "relayed", "delivered", "parked"] {
            if let Some(n) = num(&u[state]["records"]) {
                t.sample(name, &[("state", state)], n);
            }
        }
    }
    let up = &s["sources"]["usage_upload"];
    if let Some(n) = num(&up["consecutive_failures"]) {
        t.single(
            "kooagent_usage_upload_consecutive_failures",
            "gauge",
            "Usage upload attempts failed in a row.",
            n,
        );
    }
    if let Some(a) = age(&up["last_error_at"], now) {
        t.single(
            "kooagent_usage_upload_last_error_age_seconds",
            "gauge",
            "Seconds since the last failed usage upload (absent: none failed).",
            a,
        );
    }
    if let Some(a) = age(&up["last_success_at"], now) {
        t.single(
            "kooagent_usage_upload_last_success_age_seconds",
            "gauge",
            "Seconds since the last successful usage upload (absent: none yet).",
            a,
        );
    }

    // Online sources.
    let name = "kooagent_online_source_failing";
    t.family(
        name,
        "gauge",
        "1 when a configured online source (freeze_poll, license_refresh, usage_upload, \
         authcode) is failing.",
    );
    if let Some(sources) = s["sources"].as_object() {
        for (k, v) in sources {
            if v["configured"] == json!(true) {
                let failing = v["failing"] == json!(true)
                    || v["consecutive_failures"].as_u64().unwrap_or(0) > 0;
                t.sample(name, &[("source", k)], if failing { 1.0 } else { 0.0 });
            }
        }
    }
    t.single(
        "kooagent_metrics_collected_timestamp_seconds",
        "gauge",
        "When this page was made (a stale textfile shows here).",
        now as f64,
    );
    t.finish()
}

/// Writes `text` to `path` whole or not at all (a temporary file beside it, then a
/// rename): node_exporter never reads half a page.
pub fn write_file(path: &Path, text: &str) -> Result<(), crate::store::StoreError> {
    crate::store::atomic_write(path, text.as_bytes(), 0o644)
}

/// The page made in the agent itself, through the same operations a client calls.
pub async fn collect(agent: &Arc<crate::agent::Agent>) -> Inputs {
    let d = crate::ops::Dispatcher::new();
    let peer = crate::ops::Peer {
        uid: crate::sys::euid(),
        gid: 0,
        pid: None,
    };
    let mut answers = Vec::new();
    for op in OPS {
        let call = crate::ops::Call {
            params: json!({}),
            peer,
        };
        let v = match d.dispatch(agent.clone(), op, call).await {
            Ok(crate::ops::Reply::Value(v)) => v,
            _ => Value::Null,
        };
        answers.push(v);
    }
    Inputs::from_answers(answers)
}

/// The textfile writer's lifecycle. It renders what the socket operations answer, so it
/// reads the whole agent (a face, like the CLI's `metrics`), through a weak reference.
pub struct Textfile {
    agent: std::sync::Weak<crate::agent::Agent>,
    /// Woken when `[metrics]` changes: the writer sleeps on it (no timer) while no textfile
    /// is configured, so an idle agent stays asleep.
    changed: Arc<tokio::sync::Notify>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Textfile {
    pub fn new(agent: std::sync::Weak<crate::agent::Agent>) -> Textfile {
        Textfile {
            agent,
            changed: Default::default(),
            task: Default::default(),
        }
    }
}

impl Service for Textfile {
    fn name(&self) -> &'static str {
        "metrics textfile"
    }

    fn start(self: Arc<Self>, _cfg: Arc<Config>) -> Step {
        let task = tokio::spawn(run_textfile(self.agent.clone(), self.changed.clone()));
        *self.task.lock().expect("task lock") = Some(task);
        done()
    }

    fn reconfigure(&self, old: &Config, new: &Config) {
        if old.metrics != new.metrics {
            self.changed.notify_one();
        }
    }

    fn shutdown(self: Arc<Self>) -> Step {
        if let Some(t) = self.task.lock().expect("task lock").take() {
            t.abort();
        }
        done()
    }
}

/// With `[metrics] textfile` set: rewrites it every `interval_secs` (reading the
/// configuration again each time, so a reload applies) until the agent stops.
async fn run_textfile(
    agent: std::sync::Weak<crate::agent::Agent>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut last_error: Option<String> = None;
    loop {
        let Some(a) = agent.upgrade() else { return };
        let cfg = a.config().metrics.clone();
        if cfg.textfile.as_os_str().is_empty() {
            // Nothing to write: no timer (an idle agent must not wake); a reload that sets
            // a textfile wakes this.
            drop(a);
            changed.notified().await;
            continue;
        }
        {
            let page = render(&collect(&a).await, a.clock.now_secs());
            match write_file(&cfg.textfile, &page) {
                Ok(()) => last_error = None,
                Err(e) => {
                    let e = format!("metrics.textfile: {e}");
                    // Once per distinct failure, not every interval.
                    if last_error.as_ref() != Some(&e) {
                        log::warn!("{e}");
                    }
                    last_error = Some(e);
                }
            }
        }
        drop(a);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(cfg.interval_secs.max(1))) => {}
            _ = changed.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_from_the_answers() {
        let now = 1_800_000_000;
        let i = Inputs {
            status: json!({"version": "9.9.9", "uptime_secs": 42, "socket_connections": 3,
                "identity": {"state": "ready"},
                "sources": {"usage_upload": {"configured": true, "consecutive_failures": 2,
                    "last_error_at": crate::clock::format_rfc3339(now - 30),
                    "last_success_at": null},
                  "freeze_poll": {"configured": false, "failing": true}}}),
            licenses: json!({"installed": 1, "usable": 1, "clock_rollback": false,
                "licenses": [{"license_id": "L-1", "product": "p", "state": "valid",
                  "not_after": crate::clock::format_rfc3339(now + 100)}]}),
            usage: json!({"started": true, "pending": {"records": 4}, "relayed": {"records": 0},
                "delivered": {"records": 7}, "parked": {"records": 1}}),
            freeze: json!({"licenses": [{"license_id": "L-1", "product": "p", "state": "frozen"}],
                "tampered": false}),
        };
        let page = render(&i, now);
        for line in [
            "kooagent_agent_info{version=\"9.9.9\"} 1",
            "kooagent_socket_connections 3",
            "kooagent_license_state{license_id=\"L-1\",product=\"p\",state=\"valid\"} 1",
            &format!(
                "kooagent_license_expiry_timestamp_seconds{{license_id=\"L-1\",product=\"p\"}} {}",
                now + 100
            ),
            "kooagent_freeze_state{license_id=\"L-1\",product=\"p\",state=\"frozen\"} 1",
            "kooagent_licenses_frozen 1",
            "kooagent_usage_records{state=\"pending\"} 4",
            "kooagent_usage_records{state=\"parked\"} 1",
            "kooagent_usage_upload_last_error_age_seconds 30",
            "kooagent_online_source_failing{source=\"usage_upload\"} 1",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
        // Not configured: not reported; never succeeded: no age.
        assert!(!page.contains("source=\"freeze_poll\""));
        assert!(!page.contains("last_success_age"));
    }

    #[test]
    fn textfile_must_be_absolute_and_prom() {
        let mut c = MetricsConfig::default();
        assert!(c.validate().is_ok());
        c.textfile = "rel.prom".into();
        assert_eq!(c.validate().unwrap_err().0, "metrics.textfile");
        c.textfile = "/var/lib/node_exporter/kooagent.txt".into();
        assert_eq!(c.validate().unwrap_err().0, "metrics.textfile");
        c.textfile = "/var/lib/node_exporter/kooagent.prom".into();
        assert!(c.validate().is_ok());
        c.interval_secs = 1;
        assert_eq!(c.validate().unwrap_err().0, "metrics.interval_secs");
    }
}
