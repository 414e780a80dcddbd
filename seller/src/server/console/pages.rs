//! The console's HTML: escaped text in fixed templates, one embedded stylesheet, no
//! script. Every answer forbids framing, caching and inline code (`Content-Security-Policy`).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

use super::auth;
use super::Health;
use crate::server::db::{CodeActivityRow, CodeRow, EventRow, InstanceRow};
use crate::server::http::Resp;

const CSS: &str = include_str!("console.css");

/// Text for HTML (element content and quoted attribute values).
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (k, v) in [
        ("content-type", content_type),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; \
             base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        h.insert(k, v.parse().expect("valid header"));
    }
    r
}

fn page(status: StatusCode, title: &str, body: &str) -> Resp {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · KooAgent seller console</title>\
         <link rel=\"stylesheet\" href=\"/console/console.css\"></head>\n<body>{body}</body></html>\n",
        esc(title)
    );
    respond(status, "text/html; charset=utf-8", html)
}

pub fn stylesheet() -> Resp {
    let mut r = respond(StatusCode::OK, "text/css; charset=utf-8", CSS.to_string());
    r.headers_mut().insert(
        "cache-control",
        "private, max-age=3600".parse().expect("valid"),
    );
    r
}

pub fn redirect(to: &str, cookie: Option<String>) -> Resp {
    let mut r = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        String::new(),
    );
    r.headers_mut()
        .insert("location", to.parse().expect("a fixed path"));
    if let Some(c) = cookie {
        r.headers_mut()
            .insert("set-cookie", c.parse().expect("token characters"));
    }
    r
}

/// The sign-in form, with a fresh CSRF token in the form and in its cookie.
pub fn sign_in(message: Option<&str>) -> Resp {
    let token = auth::random_token();
    let msg = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    let status = if message.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    let body = format!(
        "<main class=\"narrow\"><h1>Seller console</h1>{msg}\
         <form method=\"post\" action=\"/console/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{token}\">\
         <label for=\"password\">Admin password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <button type=\"submit\">Sign in</button></form></main>"
    );
    let mut r = page(status, "Sign in", &body);
    r.headers_mut().insert(
        "set-cookie",
        auth::set_cookie(auth::LOGIN_COOKIE, &token, 600)
            .parse()
            .expect("token characters"),
    );
    r
}

fn nav(csrf: &str) -> String {
    format!(
        "<header><nav><a href=\"/console/instances\" id=\"nav-instances\">Orders and instances</a>\
         <a href=\"/console/codes\" id=\"nav-codes\">Authorization codes</a>\
         <a href=\"/console/devices\" id=\"nav-devices\">Devices</a>\
         <a href=\"/console/health\" id=\"nav-health\">Health</a></nav>\
         <form method=\"post\" action=\"/console/logout\" class=\"inline\" id=\"sign-out\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Sign out</button></form></header>",
        esc(csrf)
    )
}

fn seconds(v: Option<f64>) -> String {
    match v {
        None => "no calls yet".into(),
        Some(s) if s.is_infinite() => "over 5 s".into(),
        Some(s) => format!("≤ {} ms", s * 1000.0),
    }
}

pub fn health(h: &Health, csrf: &str) -> Resp {
    let db = match &h.database {
        Ok(n) => format!("<td class=\"ok\">reachable</td><td>{n} licenses issued</td>"),
        Err(e) => format!("<td class=\"bad\">unreachable</td><td>{}</td>", esc(e)),
    };
    let uploads = match h.uploads_pending {
        Some(0) => "<td class=\"ok\">none</td>".to_string(),
        Some(n) => format!("<td class=\"bad\">{n} undelivered</td>"),
        None => "<td>unknown</td>".to_string(),
    };
    let mut calls: String = h
        .calls
        .iter()
        .map(|(code, n)| {
            let class = if code == "000000" { "ok" } else { "bad" };
            format!(
                "<tr><td class=\"{class}\">{}</td><td>{n}</td></tr>",
                esc(code)
            )
        })
        .collect();
    if calls.is_empty() {
        calls = "<tr><td colspan=\"2\">none yet</td></tr>".into();
    }
    let mut hour = code_rows(&h.hour.codes);
    if hour.is_empty() {
        hour = "<tr><td colspan=\"2\">none in the last hour</td></tr>".into();
    }
    let body = format!(
        "{}<main><h1>Health</h1>\
         <table><tbody>\
         <tr><th>Database</th>{db}</tr>\
         <tr><th>Signing key id</th><td colspan=\"2\"><code>{}</code></td></tr>\
         <tr><th>License uploads</th>{uploads}<td></td></tr>\
         <tr><th>Answer time p50</th><td colspan=\"2\">{}</td></tr>\
         <tr><th>Answer time p99</th><td colspan=\"2\">{}</td></tr>\
         </tbody></table>\
         <h2>Marketplace calls in the last hour</h2>\
         <p class=\"note\">This server process; answer time p50 {}, p99 {}.</p>\
         <table id=\"calls-last-hour\"><thead><tr><th>resultCode</th><th>calls</th></tr></thead>\
         <tbody>{hour}</tbody></table>\
         <h2>Marketplace calls by result code</h2>\
         <p class=\"note\">Since this server process started.</p>\
         <table id=\"calls-since-start\"><thead><tr><th>resultCode</th><th>calls</th></tr></thead><tbody>{calls}</tbody></table>\
         </main>",
        nav(csrf),
        esc(&h.key_id),
        seconds(h.p50),
        seconds(h.p99),
        seconds(h.hour.p50),
        seconds(h.hour.p99),
    );
    page(StatusCode::OK, "Health", &body)
}

fn code_rows(codes: &[(String, u64)]) -> String {
    codes
        .iter()
        .map(|(code, n)| {
            let class = if code == "000000" { "ok" } else { "bad" };
            format!(
                "<tr><td class=\"{class}\">{}</td><td>{n}</td></tr>",
                esc(code)
            )
        })
        .collect()
}

fn time(t: i64) -> String {
    kooagent_core::clock::format_rfc3339(t)
}

/// The instance search: by instance id, license id or device code.
pub fn instances(q: &str, rows: &[crate::server::db::InstanceRow], csrf: &str) -> Resp {
    let mut list = String::new();
    for r in rows {
        let state = if r.frozen {
            format!("{} (frozen)", r.status.as_str())
        } else {
            r.status.as_str().to_string()
        };
        let class = if r.frozen || r.status.as_str() != "active" {
            "bad"
        } else {
            "ok"
        };
        list.push_str(&format!(
            "<tr><td><a href=\"/console/instance?id={}\">{}</a></td><td>{}</td>\
             <td class=\"{class}\">{}</td><td><code>{}</code></td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&url(&r.instance_id)),
            esc(&r.instance_id),
            esc(&r.product),
            esc(&state),
            esc(&r.license_id),
            esc(&r.devices.join(", ")),
            r.not_after.map(time).unwrap_or_else(|| "perpetual".into()),
            time(r.updated_at),
        ));
        if r.status.as_str() != "released" {
            let (status, label) = if r.frozen {
                ("UNFREEZE", "Unfreeze")
            } else {
                ("FREEZE", "Freeze")
            };
            list.push_str(&format!(
                "<tr><td colspan=\"7\"><form method=\"post\" action=\"/console/instances/status\" class=\"freeze\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"instance\" value=\"{}\">\
                 <input type=\"hidden\" name=\"status\" value=\"{status}\">\
                 <label><input type=\"checkbox\" name=\"confirm\" value=\"yes\" required> \
                 {label} {} (agents get a signed status token)</label>\
                 <button type=\"submit\">{label}</button></form></td></tr>",
                esc(csrf),
                esc(&r.instance_id),
                esc(&r.instance_id),
            ));
        }
    }
    let results = if q.is_empty() {
        String::new()
    } else if rows.is_empty() {
        format!("<p>No instance matches <code>{}</code>.</p>", esc(q))
    } else {
        format!(
            "<table><thead><tr><th>Instance</th><th>Product</th><th>State</th><th>License</th>\
             <th>Device codes</th><th>Expires</th><th>Updated</th></tr></thead><tbody>{list}</tbody></table>"
        )
    };
    let body = format!(
        "{}<main><h1>Orders and instances</h1>\
         <form method=\"get\" action=\"/console/instances\">\
         <label for=\"q\">Instance id, license id, device code, order id or customer id</label>\
         <input id=\"q\" name=\"q\" value=\"{}\" maxlength=\"200\">\
         <button type=\"submit\">Search</button></form>{results}</main>",
        nav(csrf),
        esc(q)
    );
    page(StatusCode::OK, "Orders and instances", &body)
}

/// A query value percent-encoded.
fn url(s: &str) -> String {
    super::url_escape(s)
}

fn state_of(r: &InstanceRow) -> (String, &'static str) {
    let state = if r.frozen {
        format!("{} (frozen)", r.status.as_str())
    } else {
        r.status.as_str().to_string()
    };
    let class = if r.frozen || r.status.as_str() != "active" {
        "bad"
    } else {
        "ok"
    };
    (state, class)
}

fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
        esc(value)
    )
}

/// One instance: its state and license, the actions, and every marketplace call about it.
pub fn instance(r: &InstanceRow, calls: &[EventRow], csrf: &str) -> Resp {
    let (state, class) = state_of(r);
    let lic_head: String = r.license.chars().take(48).collect();
    let mut actions = String::new();
    if r.status.as_str() != "released" {
        let (status, label) = if r.frozen {
            ("UNFREEZE", "Unfreeze")
        } else {
            ("FREEZE", "Freeze")
        };
        actions.push_str(&format!(
            "<h2>Actions</h2>\
             <form method=\"post\" action=\"/console/instances/status\" id=\"freeze-form\">{}{}{}\
             <label><input type=\"checkbox\" name=\"confirm\" value=\"yes\" required> \
             {label} this instance (agents get a signed status token)</label>\
             <button type=\"submit\" id=\"freeze-submit\">{label}</button></form>\
             <form method=\"post\" action=\"/console/instances/reissue\" id=\"reissue-form\">{}{}\
             <label for=\"device\">Reissue the license to a corrected device code</label>\
             <input id=\"device\" name=\"device\" required maxlength=\"64\" \
             placeholder=\"XXXX-XXXX-XXXX-XXXX-XXXX\" autocomplete=\"off\">\
             <button type=\"submit\" id=\"reissue-submit\">Reissue…</button></form>\
             <form method=\"post\" action=\"/console/instances/revoke\" id=\"revoke-form\">{}{}\
             <button type=\"submit\" id=\"revoke-submit\" class=\"danger\">Revoke…</button></form>",
            hidden("csrf", csrf),
            hidden("instance", &r.instance_id),
            hidden("status", status),
            hidden("csrf", csrf),
            hidden("instance", &r.instance_id),
            hidden("csrf", csrf),
            hidden("instance", &r.instance_id),
        ));
    }
    let mut history = String::new();
    for c in calls {
        let code = c.result_code.as_deref().unwrap_or("—");
        let cclass = if code == "000000" { "ok" } else { "bad" };
        let retries = match (c.retries, c.last_at) {
            (0, _) => "0".to_string(),
            (n, Some(at)) => format!("{n} (last {})", time(at)),
            (n, None) => n.to_string(),
        };
        let answer: String = c.response.chars().take(4000).collect();
        history.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=\"{cclass}\">{}</td><td>{}</td>\
             <td>{}</td><td><details><summary>answer</summary><pre>{}</pre></details></td></tr>",
            time(c.created_at),
            esc(&c.activity),
            esc(code),
            retries,
            esc(c.order_id.as_deref().unwrap_or("")),
            esc(&answer),
        ));
    }
    if history.is_empty() {
        history = "<tr><td colspan=\"6\">No call recorded (calls before the call history \
                   existed are not listed).</td></tr>"
            .into();
    }
    let body = format!(
        "{}<main><h1>Instance {}</h1>\
         <table id=\"instance\"><tbody>\
         <tr><th>Product</th><td>{}</td></tr>\
         <tr><th>State</th><td class=\"{class}\">{}</td></tr>\
         <tr><th>License id</th><td><code>{}</code></td></tr>\
         <tr><th>License</th><td><code>{}…</code> (issued to the agents at \
         <code>/v1/licenses/{}</code>)</td></tr>\
         <tr><th>Device codes</th><td>{}</td></tr>\
         <tr><th>Valid from</th><td>{}</td></tr>\
         <tr><th>Expires</th><td>{}</td></tr>\
         <tr><th>Status tokens issued</th><td>{}</td></tr>\
         <tr><th>Updated</th><td>{}</td></tr>\
         </tbody></table>{actions}\
         <h2>Marketplace calls</h2>\
         <table id=\"call-history\"><thead><tr><th>Time</th><th>Activity</th><th>resultCode</th>\
         <th>Retries</th><th>Order</th><th>Our answer</th></tr></thead><tbody>{history}</tbody></table>\
         </main>",
        nav(csrf),
        esc(&r.instance_id),
        esc(&r.product),
        esc(&state),
        esc(&r.license_id),
        esc(&lic_head),
        esc(&r.license_id),
        esc(&r.devices.join(", ")),
        time(r.not_before),
        r.not_after.map(time).unwrap_or_else(|| "perpetual".into()),
        r.seq,
        time(r.updated_at),
    );
    page(
        StatusCode::OK,
        &format!("Instance {}", r.instance_id),
        &body,
    )
}

/// The reissue's confirmation step: the code as it will be bound.
pub fn confirm_reissue(instance: &str, code: &str, csrf: &str) -> Resp {
    let body = format!(
        "{}<main class=\"narrow\"><h1>Reissue the license?</h1>\
         <p>Instance <code>{}</code> gets a new license with the same terms, bound to device \
         code <code id=\"reissue-code\">{}</code>. Its agent fetches it from \
         <code>/v1/licenses/…</code>; the license bound to the old code keeps its term.</p>\
         <form method=\"post\" action=\"/console/instances/reissue\" id=\"confirm-reissue-form\">\
         {}{}{}{}<button type=\"submit\" id=\"confirm-reissue\">Reissue</button></form>\
         <p><a href=\"/console/instance?id={}\">Cancel</a></p></main>",
        nav(csrf),
        esc(instance),
        esc(code),
        hidden("csrf", csrf),
        hidden("instance", instance),
        hidden("device", code),
        hidden("confirm", "yes"),
        esc(&url(instance)),
    );
    page(StatusCode::OK, "Confirm reissue", &body)
}

/// The revoke's confirmation step.
pub fn confirm_revoke(instance: &str, csrf: &str) -> Resp {
    let body = format!(
        "{}<main class=\"narrow\"><h1>Revoke this instance?</h1>\
         <p>Instance <code>{}</code> is released as the marketplace's <code>releaseLicense</code> \
         does: its agents get a signed <code>release</code> status token and stop running the \
         license; the instance gets no new license or renewal. This cannot be undone.</p>\
         <form method=\"post\" action=\"/console/instances/revoke\" id=\"confirm-revoke-form\">\
         {}{}{}<button type=\"submit\" id=\"confirm-revoke\" class=\"danger\">Revoke</button></form>\
         <p><a href=\"/console/instance?id={}\">Cancel</a></p></main>",
        nav(csrf),
        esc(instance),
        hidden("csrf", csrf),
        hidden("instance", instance),
        hidden("confirm", "yes"),
        esc(&url(instance)),
    );
    page(StatusCode::OK, "Confirm revoke", &body)
}

/// Authorization codes (License 2.0): the marketplace's status of each, and what the
/// relay forwarded (last daily query, usage reports).
pub fn codes(rows: &[(CodeRow, Option<CodeActivityRow>)], csrf: &str) -> Resp {
    let mut list = String::new();
    for (c, a) in rows {
        let status = if c.frozen {
            format!("{} (frozen)", c.status)
        } else {
            c.status.clone()
        };
        let class = if c.frozen || c.status != "active" {
            "bad"
        } else {
            "ok"
        };
        let a = a.clone().unwrap_or_default();
        let query = match (a.query_at, &a.query_status) {
            (Some(at), Some(st)) => format!("{} — {}", time(at), esc(st)),
            _ => "never".into(),
        };
        let usage = match a.usage_at {
            Some(at) => format!(
                "{} reports, {} entries; last {} — {}",
                a.usage_calls,
                a.usage_entries,
                time(at),
                esc(a.usage_result.as_deref().unwrap_or(""))
            ),
            None => "none".into(),
        };
        list.push_str(&format!(
            "<tr><td><code>{}</code></td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.code),
            esc(&status),
            c.expire_at.map(time).unwrap_or_else(|| "—".into()),
            if c.device_key.is_some() { "yes" } else { "no" },
            query,
            usage,
            time(c.updated_at),
        ));
    }
    if list.is_empty() {
        list = "<tr><td colspan=\"7\">No authorization code yet (they are learnt from the \
                marketplace's calls and the relay).</td></tr>"
            .into();
    }
    let body = format!(
        "{}<main><h1>Authorization codes</h1><p class=\"note\">License 2.0 codes: the status \
         the marketplace's callbacks set, whether a device activated the code through this \
         server's relay, its last daily query and the usage reports relayed.</p>\
         <table id=\"codes\"><thead><tr><th>Code</th><th>Status</th><th>Expires</th>\
         <th>Activated via relay</th><th>Last daily query</th><th>Usage relayed</th>\
         <th>Updated</th></tr></thead><tbody>{list}</tbody></table></main>",
        nav(csrf)
    );
    page(StatusCode::OK, "Authorization codes", &body)
}

/// A device not seen for this long is highlighted.
const STALE_SECS: i64 = 7 * 86_400;

/// The device registry: codes bound to device keys, last seen.
pub fn devices(rows: &[crate::server::db::DeviceRow], now: i64, csrf: &str) -> Resp {
    let mut list = String::new();
    for d in rows {
        let stale = now - d.last_seen > STALE_SECS;
        let key: String = d.device_key.chars().take(12).collect();
        list.push_str(&format!(
            "<tr{}><td><code>{}</code></td><td><code>{}…</code></td><td>{}</td><td class=\"{}\">{}{}</td></tr>",
            if stale { " class=\"stale\"" } else { "" },
            esc(&d.device_code),
            esc(&key),
            time(d.first_seen),
            if stale { "bad" } else { "ok" },
            time(d.last_seen),
            if stale { " (stale)" } else { "" },
        ));
    }
    if list.is_empty() {
        list = "<tr><td colspan=\"4\">No device has fetched a license yet.</td></tr>".into();
    }
    let body = format!(
        "{}<main><h1>Devices</h1><p class=\"note\">Agents that fetched a license or status \
         token (trust on first use binds a device code to its key). Not seen for 7 days: stale.</p>\
         <table><thead><tr><th>Device code</th><th>Device key</th><th>First seen</th><th>Last seen</th></tr>\
         </thead><tbody>{list}</tbody></table></main>",
        nav(csrf)
    );
    page(StatusCode::OK, "Devices", &body)
}

pub fn bad_action(m: &str) -> Resp {
    page(
        StatusCode::BAD_REQUEST,
        "Not done",
        &format!(
            "<main class=\"narrow\"><h1>Not done</h1><p>{}</p>\
             <p><a href=\"/console/instances\">Orders and instances</a></p></main>",
            esc(m)
        ),
    )
}

pub fn unavailable(e: &str) -> Resp {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Database unavailable",
        &format!(
            "<main class=\"narrow\"><h1>Database unavailable</h1><p>{}</p></main>",
            esc(e)
        ),
    )
}

pub fn forbidden() -> Resp {
    page(
        StatusCode::FORBIDDEN,
        "Refused",
        "<main class=\"narrow\"><h1>Refused</h1><p>The form's security token is missing or \
         stale. <a href=\"/console/login\">Start again</a>.</p></main>",
    )
}

pub fn limited() -> Resp {
    let mut r = page(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many attempts",
        "<main class=\"narrow\"><h1>Too many attempts</h1><p>Wait a minute, then \
         <a href=\"/console/login\">try again</a>.</p></main>",
    );
    r.headers_mut()
        .insert("retry-after", "60".parse().expect("valid"));
    r
}

pub fn not_found() -> Resp {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        "<main class=\"narrow\"><h1>Not found</h1><p><a href=\"/console/health\">Health</a></p></main>",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
    }
}
