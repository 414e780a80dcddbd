//! The seller's web console under `/console` (docs/seller-server.md "Console"):
//! server-rendered HTML, no script, the stylesheet embedded in the binary, usable at a
//! phone's width. Signed in with the admin password (`kooagent seller console-password`,
//! argon2id); the session cookie is `HttpOnly; Secure; SameSite=Strict` and every form that
//! changes state carries a CSRF token; sign-in attempts are rate-limited; every sign-in,
//! refusal and sign-out is appended to the audit log (who, what, when, from where).
//!
//! A console session is only ever looked at under `/console`: it opens no marketplace or
//! agent endpoint, and neither the marketplace's signature nor the metrics token opens
//! the console.
//!
//! Pages: health (with the last hour's calls), the instance search (by instance, license,
//! device code, order, customer) and an instance's page (state, license, call history,
//! actions), authorization codes, devices. Actions, each confirmed and audited:
//! freeze/unfreeze and revoke (through the marketplace callback's own activities:
//! `updateInstanceStatus`, `releaseLicense`), reissue to a corrected device code.

pub mod auth;
mod pages;
pub mod recent;
pub mod sessions;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};

use super::db::{CallsBy, CodeActivityRow, CodeRow, EventRow, InstanceRow};
use super::http::{Resp, State};

pub const PREFIX: &str = "/console";

/// The console's parts held by the server; None in [`State`]: no `console_password_file`,
/// every `/console` path answers 404.
pub struct Console {
    pub hash: String,
    pub limit: auth::SignInLimit,
    /// The audit log (JSON lines, appended, mode 0600).
    pub audit: PathBuf,
}

impl Console {
    /// From the configuration: the password file must hold an argon2id hash.
    pub fn load(password_file: &Path, audit: PathBuf) -> Result<Console, String> {
        super::http::private_file_mode("seller_server.console_password_file", password_file)?;
        let hash = auth::load_hash(password_file)
            .map_err(|e| format!("seller_server.console_password_file: {e}"))?;
        Ok(Console {
            hash,
            limit: Default::default(),
            audit,
        })
    }

    /// One line in the audit log; a failure to write it is logged (the action stands).
    pub fn audit(&self, now: i64, who: &str, what: &str, from: &str, ok: bool) {
        let line = serde_json::json!({
            "at": kooagent_core::clock::format_rfc3339(now),
            "who": who,
            "what": what,
            "from": from,
            "ok": ok,
        });
        log::info!("console audit: {line}");
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.audit)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = r {
            log::error!("console audit log {}: {e}", self.audit.display());
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Every `/console…` request.
pub async fn handle(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let Some(console) = state.console.as_ref() else {
        return super::http::plain(StatusCode::NOT_FOUND, "no such endpoint\n");
    };
    let path = req.uri().path().to_string();
    let now = state.clock.now_ms().div_euclid(1000);
    let address = peer.ip().to_string();
    let cookies = req
        .headers()
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let session_cookie = auth::cookie(cookies.as_deref(), auth::COOKIE).map(str::to_string);
    let session = match session_cookie.as_deref() {
        Some(c) => sessions::get(&state.db, c, now).await,
        None => None,
    };
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/console/console.css") => pages::stylesheet(),
        (Method::GET, "/console" | "/console/" | "/console/login") => match session {
            Some(_) => pages::redirect("/console/health", None),
            None => pages::sign_in(None),
        },
        (Method::POST, "/console/login") => {
            let form = match form(state, req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            sign_in(console, &state.db, &form, cookies.as_deref(), &address, now).await
        }
        (Method::POST, "/console/logout") => {
            let form = match form(state, req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            let (Some(s), Some(c)) = (session, session_cookie) else {
                return pages::redirect("/console/login", None);
            };
            if !csrf_ok(&form, &s.csrf) {
                console.audit(now, "admin", "sign out", &address, false);
                return pages::forbidden();
            }
            if let Err(e) = sessions::remove(&state.db, &c).await {
                log::error!("console sign-out: {e}");
            }
            console.audit(now, "admin", "sign out", &address, true);
            pages::redirect(
                "/console/login",
                Some(auth::set_cookie(auth::COOKIE, "", 0)),
            )
        }
        (Method::GET, "/console/health") => match session {
            Some(s) => pages::health(&health(state).await, &s.csrf),
            None => pages::redirect("/console/login", None),
        },
        (Method::GET, "/console/instances") => match session {
            Some(s) => {
                let q = query_field(req.uri().query(), "q");
                match search(state, &q).await {
                    Ok(rows) => pages::instances(&q, &rows, &s.csrf),
                    Err(e) => pages::unavailable(&e),
                }
            }
            None => pages::redirect("/console/login", None),
        },
        (Method::POST, "/console/instances/status") => {
            let form = match form(state, req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            let Some(s) = session else {
                return pages::redirect("/console/login", None);
            };
            if !csrf_ok(&form, &s.csrf) {
                console.audit(
                    now,
                    "admin",
                    "instance status (no CSRF token)",
                    &address,
                    false,
                );
                return pages::forbidden();
            }
            let instance = field(&form, "instance").unwrap_or("").to_string();
            let status = field(&form, "status").unwrap_or("");
            if !matches!(status, "FREEZE" | "UNFREEZE") || field(&form, "confirm") != Some("yes") {
                return pages::bad_action("Tick the confirmation box to freeze or unfreeze.");
            }
            let what = format!("{} instance {instance}", status.to_lowercase());
            match set_frozen(state, &instance, status == "FREEZE", now).await {
                Ok(()) => {
                    console.audit(now, "admin", &what, &address, true);
                    pages::redirect(
                        &format!("/console/instances?q={}", url_escape(&instance)),
                        None,
                    )
                }
                Err(m) => {
                    console.audit(now, "admin", &what, &address, false);
                    pages::bad_action(&m)
                }
            }
        }
        (Method::GET, "/console/instance") => match session {
            Some(s) => {
                let id = query_field(req.uri().query(), "id");
                match instance_page(state, &id).await {
                    Ok(Some((row, calls))) => pages::instance(&row, &calls, &s.csrf),
                    Ok(None) => pages::bad_action(&format!("No instance {id}.")),
                    Err(e) => pages::unavailable(&e),
                }
            }
            None => pages::redirect("/console/login", None),
        },
        (Method::POST, "/console/instances/reissue" | "/console/instances/revoke") => {
            let form = match form(state, req).await {
                Ok(f) => f,
                Err(r) => return r,
            };
            let Some(s) = session else {
                return pages::redirect("/console/login", None);
            };
            let reissue = path.ends_with("/reissue");
            let verb = if reissue { "reissue" } else { "revoke" };
            if !csrf_ok(&form, &s.csrf) {
                console.audit(
                    now,
                    "admin",
                    &format!("{verb} (no CSRF token)"),
                    &address,
                    false,
                );
                return pages::forbidden();
            }
            let instance = field(&form, "instance").unwrap_or("").to_string();
            let device = field(&form, "device").unwrap_or("").trim().to_string();
            if field(&form, "confirm") != Some("yes") {
                // The confirmation step: what will happen, with the code as it will be bound.
                return if reissue {
                    match kooagent_core::device_code::parse_code(&device) {
                        Ok(code) => pages::confirm_reissue(&instance, &code, &s.csrf),
                        Err(e) => pages::bad_action(&format!("Device code {device:?}: {e}")),
                    }
                } else {
                    pages::confirm_revoke(&instance, &s.csrf)
                };
            }
            let (what, done) = if reissue {
                (
                    format!("reissue instance {instance} to device code {device}"),
                    reissue_license(state, &instance, &device, now).await,
                )
            } else {
                (
                    format!("revoke instance {instance}"),
                    revoke(state, &instance, now).await,
                )
            };
            console.audit(now, "admin", &what, &address, done.is_ok());
            match done {
                Ok(()) => pages::redirect(
                    &format!("/console/instance?id={}", url_escape(&instance)),
                    None,
                ),
                Err(m) => pages::bad_action(&m),
            }
        }
        (Method::GET, "/console/codes") => match session {
            Some(s) => match codes(state).await {
                Ok(rows) => pages::codes(&rows, &s.csrf),
                Err(e) => pages::unavailable(&e),
            },
            None => pages::redirect("/console/login", None),
        },
        (Method::GET, "/console/devices") => match session {
            Some(s) => match devices(state).await {
                Ok(rows) => pages::devices(&rows, now, &s.csrf),
                Err(e) => pages::unavailable(&e),
            },
            None => pages::redirect("/console/login", None),
        },
        (Method::GET | Method::POST, _) => pages::not_found(),
        _ => super::http::plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n"),
    }
}

type Form = Vec<(String, String)>;

/// One query-string field, at most 200 characters.
fn query_field(query: Option<&str>, name: &str) -> String {
    let q = query.map(|q| q.replace('+', "%20"));
    super::auth::query_pairs(q.as_deref())
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim().chars().take(200).collect())
        .unwrap_or_default()
}

/// Instances matching `q` as an instance id, a license id, a device code (as typed or
/// in capitals), an order id or a customer id (through the call history).
async fn search(state: &State, q: &str) -> Result<Vec<super::db::InstanceRow>, String> {
    if q.is_empty() {
        return Ok(vec![]);
    }
    let q = q.to_string();
    let read = state.db.run(move |tx| {
        let mut out: Vec<super::db::InstanceRow> = Vec::new();
        let mut add = |rows: Vec<super::db::InstanceRow>| {
            for r in rows {
                if !out.iter().any(|o| o.instance_id == r.instance_id) {
                    out.push(r);
                }
            }
        };
        add(tx.instance(&q)?.into_iter().collect());
        add(tx.instance_by_license(&q)?.into_iter().collect());
        add(tx.instances_with_device(&q)?);
        let upper = q.to_uppercase().replace(' ', "-");
        if upper != q {
            add(tx.instances_with_device(&upper)?);
        }
        let mut named = Vec::new();
        for by in [CallsBy::Order(&q), CallsBy::Customer(&q)] {
            for call in tx.calls(by, SEARCH_CALLS)? {
                if let Some(i) = call.instance_id {
                    if !named.contains(&i) {
                        named.push(i);
                    }
                }
            }
        }
        for i in named {
            add(tx.instance(&i)?.into_iter().collect());
        }
        Ok(out)
    });
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

/// Calls read per order or customer when searching, and shown on an instance's page.
const SEARCH_CALLS: i64 = 200;

/// An instance and its call history (latest first).
async fn instance_page(
    state: &State,
    id: &str,
) -> Result<Option<(InstanceRow, Vec<EventRow>)>, String> {
    let id = id.to_string();
    let read = state.db.run(move |tx| {
        let Some(row) = tx.instance(&id)? else {
            return Ok(None);
        };
        let calls = tx.calls(CallsBy::Instance(&id), SEARCH_CALLS)?;
        Ok(Some((row, calls)))
    });
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

/// Every authorization code with what the relay forwarded for it.
async fn codes(state: &State) -> Result<Vec<(CodeRow, Option<CodeActivityRow>)>, String> {
    let read = state.db.run(|tx| {
        let mut out = Vec::new();
        for c in tx.all_codes(500)? {
            let a = tx.code_activity(&c.code)?;
            out.push((c, a));
        }
        Ok(out)
    });
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

/// `/` and the characters a query value may hold as they are; the rest percent-encoded.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Freezes or unfreezes an instance exactly as the marketplace's `updateInstanceStatus`
/// callback does (the same activity code, a new status token for the agents).
async fn set_frozen(state: &State, instance: &str, freeze: bool, now: i64) -> Result<(), String> {
    let body = serde_json::json!({
        "activity": "updateInstanceStatus",
        "instanceId": instance,
        "status": if freeze { "FREEZE" } else { "UNFREEZE" },
    });
    run_activity(state, instance, body, now).await
}

/// Revokes an instance as the marketplace's `releaseLicense` callback does: the instance
/// is released for good (no new license, no renewal) and agents get a signed `release`
/// status token, after which the license may not run (docs/freeze.md).
async fn revoke(state: &State, instance: &str, now: i64) -> Result<(), String> {
    let body = serde_json::json!({"activity": "releaseLicense", "instanceId": instance});
    run_activity(state, instance, body, now).await
}

/// Reissues the instance's license to the corrected device code `device`
/// ([`super::activities::reissue`]).
async fn reissue_license(
    state: &State,
    instance: &str,
    device: &str,
    now: i64,
) -> Result<(), String> {
    let device = device.to_string();
    with_instance(state, instance, now, move |tx, ctx, id| {
        Ok(super::activities::reissue(tx, ctx, id, &device)?.map(drop))
    })
    .await
}

/// Runs a marketplace activity for the console (marked so in the call history).
async fn run_activity(
    state: &State,
    instance: &str,
    body: serde_json::Value,
    now: i64,
) -> Result<(), String> {
    let body = body.to_string();
    with_instance(state, instance, now, move |tx, ctx, _| {
        let answer = super::activities::handle_for_console(tx, ctx, body.as_bytes())?;
        Ok(match super::metrics::result_code_of(&answer) {
            "000000" => Ok(()),
            _ => Err(serde_json::from_str::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["resultMsg"].as_str().map(str::to_string))
                .unwrap_or(answer)),
        })
    })
    .await
}

/// Runs `act` on the database thread for `instance`, with the activity context its
/// product gives a marketplace callback (its answer within 5 s, or an error saying so).
async fn with_instance<F>(state: &State, instance: &str, now: i64, mut act: F) -> Result<(), String>
where
    F: FnMut(
            &mut dyn super::db::Tx,
            &super::activities::Ctx<'_>,
            &str,
        ) -> Result<Result<(), String>, super::db::DbError>
        + Send
        + 'static,
{
    let (key, tokens, products) = (
        state.signing_key.clone(),
        state.tokens.clone(),
        state.products.clone(),
    );
    let id = instance.to_string();
    let run = state.db.run(move |tx| {
        let Some(row) = tx.instance(&id)? else {
            return Ok(Err(format!("no instance {id}")));
        };
        let Some(product) = products.iter().find(|p| p.product == row.product) else {
            return Ok(Err(format!("product {} is not configured", row.product)));
        };
        let ctx = super::activities::Ctx {
            now,
            product,
            key: &key,
            tokens: tokens.as_ref(),
            presigned: None,
            upload: false,
        };
        act(tx, &ctx, &id)
    });
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the database did not answer within 5 s".into()),
    }
}

async fn devices(state: &State) -> Result<Vec<super::db::DeviceRow>, String> {
    let read = state.db.run(|tx| tx.all_devices());
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the database did not answer within 3 s".into()),
    }
}

/// An `application/x-www-form-urlencoded` body (`+` is a space there).
async fn form(state: &State, req: Request<Incoming>) -> Result<Form, Resp> {
    let body = super::http::read_body(state, req)
        .await
        .map_err(|m| super::http::plain(StatusCode::BAD_REQUEST, &format!("{m}\n")))?;
    let text = String::from_utf8_lossy(&body).replace('+', "%20");
    Ok(super::auth::query_pairs(Some(&text)))
}

fn field<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn csrf_ok(form: &Form, want: &str) -> bool {
    field(form, "csrf").is_some_and(|c| auth::same_secret(c, want))
}

async fn sign_in(
    console: &Console,
    db: &super::db::Db,
    form: &Form,
    cookies: Option<&str>,
    address: &str,
    now: i64,
) -> Resp {
    // The sign-in form's token against its own cookie (double submit): another site's
    // page cannot sign the browser in to an account of the attacker's choosing.
    let login = auth::cookie(cookies, auth::LOGIN_COOKIE);
    if !login.is_some_and(|l| csrf_ok(form, l)) {
        console.audit(now, "admin", "sign in (no CSRF token)", address, false);
        return pages::forbidden();
    }
    if !console.limit.attempt(address, now) {
        console.audit(now, "admin", "sign in (rate limited)", address, false);
        return pages::limited();
    }
    let password = field(form, "password").unwrap_or("").to_string();
    let hash = console.hash.clone();
    // argon2id takes tens of milliseconds of CPU: off the runtime's threads.
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password))
        .await
        .unwrap_or(false);
    if !ok {
        console.audit(now, "admin", "sign in", address, false);
        return pages::sign_in(Some("Wrong password."));
    }
    let (cookie, _) = match sessions::create(db, address, now).await {
        Ok(c) => c,
        Err(e) => return pages::unavailable(&e),
    };
    console.audit(now, "admin", "sign in", address, true);
    pages::redirect(
        "/console/health",
        Some(auth::set_cookie(auth::COOKIE, &cookie, auth::SESSION_SECS)),
    )
}

/// What the health page shows.
pub struct Health {
    pub database: Result<i64, String>,
    pub key_id: String,
    pub uploads_pending: Option<i64>,
    /// (resultCode, calls) since this process started.
    pub calls: Vec<(String, u64)>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// The last hour's calls, by result code, and answer times.
    pub hour: recent::Summary,
}

async fn health(state: &State) -> Health {
    let read = state.db.run(|tx| {
        let licenses = tx.count_licenses()?;
        let (pending, _) = tx.count_uploads()?;
        Ok((licenses, pending))
    });
    let (database, uploads_pending) = match tokio::time::timeout(Duration::from_secs(3), read).await
    {
        Ok(Ok((n, p))) => (Ok(n), Some(p)),
        Ok(Err(e)) => (Err(e.to_string()), None),
        Err(_) => (Err("no answer within 3 s".into()), None),
    };
    let m = super::metrics::global();
    let mut by_code = std::collections::BTreeMap::<String, u64>::new();
    for ([_, code], n) in m.marketplace.snapshot() {
        *by_code.entry(code).or_default() += n;
    }
    Health {
        database,
        key_id: kooagent_core::license::format::key_id(&state.signing_key.verifying_key()),
        uploads_pending,
        calls: by_code.into_iter().collect(),
        p50: m.answer.quantile(0.5),
        p99: m.answer.quantile(0.99),
        hour: recent::global().summary_at(std::time::Instant::now()),
    }
}
