//! The license upload of the asynchronous flow (koogallery.md §2, `getLicenseAsync`): the
//! seller answers the request, then uploads the license to KooGallery. The licenses to
//! upload wait in a durable outbox (the `uploads` table, written in the same transaction
//! as the license), and one task sends them, retrying with backoff.
//!
//! What is confirmed and what is not (docs/seller-server.md "License upload"):
//! - confirmed: in the async flow the seller uploads the license to KooGallery;
//! - [UNCONFIRMED]: that the call is the string/file upload open API
//!   `POST /api/mkp-openapi-public/global/v1/market-event/{event_id}/file` ([`DEFAULT_PATH`],
//!   configurable), signed with the seller's AK/SK like the other open APIs, and its body
//!   ([`body`]) and answer ([`accepted`]). Off by default (`license_upload = false`) until
//!   confirmed; each guess is one item here.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::db::{Db, UploadRow};
use super::relay::Relay;
use kooagent_core::clock::Clock;

/// [UNCONFIRMED] the upload's path (`{event_id}` is replaced by the request's eventId).
pub const DEFAULT_PATH: &str = "/api/mkp-openapi-public/global/v1/market-event/{event_id}/file";
/// How often the outbox is looked at.
const POLL: Duration = Duration::from_secs(5);
/// Uploads sent per look.
const BATCH: i64 = 16;
/// Retries wait `license_upload_retry_secs`, doubling, at most this long.
const MAX_BACKOFF_SECS: i64 = 3600;

/// [UNCONFIRMED] the body: the license text as a string upload.
pub fn body(row: &UploadRow) -> Vec<u8> {
    serde_json::to_vec(&json!({"content": row.license})).expect("JSON serialises")
}

/// [UNCONFIRMED] the answer: a 2xx whose `error_code`, if any, is the open APIs' success.
pub fn accepted(http: u16, text: &str) -> Result<(), String> {
    let code = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error_code"].as_str().map(str::to_string));
    match (http, code.as_deref()) {
        (200..=299, None | Some(kooagent_core::authcode::api::SUCCESS)) => Ok(()),
        _ => {
            let snippet: String = text.chars().take(200).collect();
            Err(format!("HTTP {http}: {snippet}"))
        }
    }
}

/// The wait before attempt `attempts + 1` (after `attempts` failures): `first`, doubling,
/// at most an hour; never given up (each failure is logged, see the module comment).
pub fn backoff(attempts: i64, first: i64) -> i64 {
    let shift = attempts.clamp(1, 20) - 1;
    (first.clamp(1, MAX_BACKOFF_SECS) << shift).min(MAX_BACKOFF_SECS)
}

/// What the task needs besides the database.
pub struct Uploader {
    pub relay: Arc<Relay>,
    /// `license_upload_path`.
    pub template: String,
    /// `license_upload_retry_secs`.
    pub first_backoff: i64,
    pub clock: Arc<dyn Clock>,
}

/// The path for one event: `{event_id}` percent-encoded into `template`.
pub fn path_for(template: &str, event_id: &str) -> String {
    let enc: String = event_id
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect();
    template.replace("{event_id}", &enc)
}

/// Sends what is due, for ever (a task of the server's runtime).
pub async fn run(db: Db, up: Uploader) {
    match db.run(|tx| tx.count_uploads()).await {
        Ok((pending, done)) => {
            log::info!("license upload: on; {pending} to upload, {done} uploaded")
        }
        Err(e) => log::error!("license upload: {e}"),
    }
    loop {
        let now = up.clock.now_secs();
        let due = db.run(move |tx| tx.due_uploads(now, BATCH)).await;
        let due = due.unwrap_or_else(|e| {
            log::error!("license upload: reading the outbox: {e}");
            vec![]
        });
        for row in due {
            send(&db, &up, row).await;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn send(db: &Db, up: &Uploader, row: UploadRow) {
    let path = path_for(&up.template, &row.event_id);
    let data = body(&row);
    let r = up.relay.clone();
    let outcome = match tokio::task::spawn_blocking(move || r.client.post(&path, &data)).await {
        Ok(Ok((_, http, text))) => accepted(http, &text),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("upload task: {e}")),
    };
    let now = up.clock.now_secs();
    let attempts = row.attempts + 1;
    let wait = backoff(attempts, up.first_backoff);
    match &outcome {
        Ok(()) => log::info!(
            "license upload: event {} (instance {}) uploaded after {attempts} attempt(s)",
            row.event_id,
            row.instance_id
        ),
        Err(e) => log::warn!(
            "license upload: event {} (instance {}) attempt {attempts} failed: {e}; next in {} s",
            row.event_id,
            row.instance_id,
            wait
        ),
    }
    let sent = row.license.clone();
    let id = row.event_id.clone();
    let r = db
        .run(move |tx| {
            // Only the license that was sent: a newer one (a rebound order) stays due.
            let Some(mut cur) = tx.upload(&id)? else {
                return Ok(());
            };
            if cur.license != sent || cur.done_at.is_some() {
                return Ok(());
            }
            cur.attempts = attempts;
            match &outcome {
                Ok(()) => {
                    cur.done_at = Some(now);
                    cur.last_error = None;
                }
                Err(e) => {
                    cur.last_error = Some(e.chars().take(1000).collect());
                    cur.next_at = now + wait;
                }
            }
            tx.put_upload(&cur)
        })
        .await;
    if let Err(e) = r {
        log::error!("license upload: recording the attempt: {e}");
    }
}

/// One outbox row's state for `seller outbox`: `pending` (not tried yet), `retrying` (a
/// failed attempt, waiting for `next_at`), `delivered`. Uploads are never given up, so
/// there is no parked state (a failing one keeps retrying at most hourly, logged).
pub fn state(row: &UploadRow) -> &'static str {
    match (row.done_at, row.attempts) {
        (Some(_), _) => "delivered",
        (None, 0) => "pending",
        (None, _) => "retrying",
    }
}

/// What `seller outbox --json` prints: the counts, then one object per row (the license
/// text itself is left out: it is in the licenses table and can be long).
pub fn status_json(
    counts: (i64, i64),
    rows: &[UploadRow],
    usage: super::db::usage::OutboxCounts,
) -> Value {
    let t = kooagent_core::clock::format_rfc3339;
    json!({
        "license_uploads": {
            "not_delivered": counts.0,
            "delivered": counts.1,
            "rows": rows.iter().map(|r| json!({
                "event_id": r.event_id,
                "instance_id": r.instance_id,
                "state": state(r),
                "attempts": r.attempts,
                "next_try": r.done_at.is_none().then(|| t(r.next_at)),
                "delivered_at": r.done_at.map(t),
                "last_error": r.last_error,
                "created_at": t(r.created_at),
            })).collect::<Vec<_>>(),
        },
        "usage_records": usage,
    })
}

/// The same for people: a summary line each, then one tab-separated line per upload.
pub fn status_text(
    counts: (i64, i64),
    rows: &[UploadRow],
    usage: super::db::usage::OutboxCounts,
) -> String {
    let t = kooagent_core::clock::format_rfc3339;
    let mut out = format!(
        "license uploads: {} not delivered, {} delivered\n\
         usage records:   {} pending, {} delivered, {} parked\n",
        counts.0, counts.1, usage.pending, usage.delivered, usage.parked
    );
    if !rows.is_empty() {
        out.push_str("event\tinstance\tstate\tattempts\tnext try / delivered\tlast error\n");
    }
    for r in rows {
        let when = match r.done_at {
            Some(d) => t(d),
            None => t(r.next_at),
        };
        let err: String = r
            .last_error
            .as_deref()
            .unwrap_or("-")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{when}\t{err}\n",
            r.event_id,
            r.instance_id,
            state(r),
            r.attempts
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_an_hour() {
        assert_eq!(
            (1..=9).map(|n| backoff(n, 30)).collect::<Vec<_>>(),
            vec![30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
        );
        assert_eq!(backoff(1000, 30), 3600);
        assert_eq!(backoff(2, 1), 2);
    }

    #[test]
    fn paths_bodies_and_answers() {
        assert_eq!(
            path_for(DEFAULT_PATH, "8e5694 c8/1"),
            "/api/mkp-openapi-public/global/v1/market-event/8e5694%20c8%2F1/file"
        );
        let row = UploadRow {
            event_id: "e".into(),
            instance_id: "i".into(),
            license: "kl1.a.b\n".into(),
            attempts: 0,
            next_at: 0,
            done_at: None,
            last_error: None,
            created_at: 0,
        };
        assert_eq!(body(&row), br#"{"content":"kl1.a.b\n"}"#.to_vec());
        assert!(accepted(200, r#"{"error_code":"92020000","error_msg":"ok"}"#).is_ok());
        assert!(accepted(204, "").is_ok());
        assert!(accepted(200, r#"{"error_code":"92020002"}"#).is_err());
        assert!(accepted(401, r#"{"error_code":"APIGW.0301"}"#)
            .unwrap_err()
            .contains("401"));
    }

    #[test]
    fn status_names_each_state_and_hides_license_text() {
        let row = |id: &str, attempts, done_at, err: Option<&str>| UploadRow {
            event_id: id.into(),
            instance_id: "i".into(),
            license: "kl1.secret-ish".into(),
            attempts,
            next_at: 60,
            done_at,
            last_error: err.map(str::to_string),
            created_at: 0,
        };
        let rows = [
            row("e1", 0, None, None),
            row("e2", 2, None, Some("HTTP 500:\nboom")),
            row("e3", 1, Some(120), None),
        ];
        let usage = crate::server::db::usage::OutboxCounts {
            pending: 1,
            delivered: 2,
            parked: 3,
        };
        let v = status_json((2, 1), &rows, usage);
        let states: Vec<_> = v["license_uploads"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["pending", "retrying", "delivered"]);
        assert_eq!(v["license_uploads"]["rows"][1]["attempts"], 2);
        assert_eq!(
            v["license_uploads"]["rows"][1]["next_try"],
            "1970-01-01T00:01:00Z"
        );
        assert_eq!(v["license_uploads"]["rows"][2]["next_try"], Value::Null);
        assert_eq!(v["usage_records"]["parked"], 3);
        assert!(!v.to_string().contains("secret-ish"));
        let text = status_text((2, 1), &rows, usage);
        assert!(text.contains("2 not delivered, 1 delivered"), "{text}");
        assert!(text.contains("1 pending, 2 delivered, 3 parked"), "{text}");
        assert!(
            text.contains("e2\ti\tretrying\t2\t1970-01-01T00:01:00Z\tHTTP 500: boom\n"),
            "{text}"
        );
        assert!(!text.contains("secret-ish"));
    }
}
