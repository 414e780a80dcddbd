//! The console's HTML: escaped text in fixed templates, one embedded stylesheet, no
//! script. Every answer forbids framing, caching and inline code (`Content-Security-Policy`).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

use super::auth;
use super::Health;
use crate::seller_server::http::Resp;

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
        "<header><nav><a href=\"/console/instances\">Orders and instances</a>\
         <a href=\"/console/devices\">Devices</a><a href=\"/console/health\">Health</a></nav>\
         <form method=\"post\" action=\"/console/logout\" class=\"inline\">\
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
    let body = format!(
        "{}<main><h1>Health</h1>\
         <table><tbody>\
         <tr><th>Database</th>{db}</tr>\
         <tr><th>Signing key id</th><td colspan=\"2\"><code>{}</code></td></tr>\
         <tr><th>License uploads</th>{uploads}<td></td></tr>\
         <tr><th>Answer time p50</th><td colspan=\"2\">{}</td></tr>\
         <tr><th>Answer time p99</th><td colspan=\"2\">{}</td></tr>\
         </tbody></table>\
         <h2>Marketplace calls by result code</h2>\
         <p class=\"note\">Since this server process started.</p>\
         <table><thead><tr><th>resultCode</th><th>calls</th></tr></thead><tbody>{calls}</tbody></table>\
         </main>",
        nav(csrf),
        esc(&h.key_id),
        seconds(h.p50),
        seconds(h.p99),
    );
    page(StatusCode::OK, "Health", &body)
}

fn time(t: i64) -> String {
    crate::clock::format_rfc3339(t)
}

/// The instance search: by instance id, license id or device code.
pub fn instances(q: &str, rows: &[crate::seller_server::db::InstanceRow], csrf: &str) -> Resp {
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
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td><code>{}</code></td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
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
                "<tr><td colspan=\"7\"><form method=\"post\" action=\"/console/instances/status\">\
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
         <label for=\"q\">Instance id, license id or device code</label>\
         <input id=\"q\" name=\"q\" value=\"{}\" maxlength=\"200\">\
         <button type=\"submit\">Search</button></form>{results}</main>",
        nav(csrf),
        esc(q)
    );
    page(StatusCode::OK, "Orders and instances", &body)
}

/// A device not seen for this long is highlighted.
const STALE_SECS: i64 = 7 * 86_400;

/// The device registry: codes bound to device keys, last seen.
pub fn devices(rows: &[crate::seller_server::db::DeviceRow], now: i64, csrf: &str) -> Resp {
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
