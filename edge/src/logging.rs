//! A small stderr logger: journald captures stderr under systemd, and a log file can take
//! its place for `--daemon` on boards without one. Under journald (`JOURNAL_STREAM` set) each
//! line carries a `<N>` syslog priority prefix instead of a timestamp, so levels survive.

use std::borrow::Cow;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    journald: bool,
    sink: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Parses a `--log-level` / `agent.log_level` value.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// Installs the logger once; later calls only change the level (SIGHUP reload).
pub fn init(level: LevelFilter, sink: Option<Box<dyn Write + Send>>) {
    let logger = LOGGER.get_or_init(|| Logger {
        journald: std::env::var_os("JOURNAL_STREAM").is_some(),
        sink: Mutex::new(sink.unwrap_or_else(|| Box::new(std::io::stderr()))),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) || wire_dump(record) {
            return;
        }
        let text = record.args().to_string();
        let text = redact(&text);
        let line = if self.journald {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{text}\n")
        } else {
            let now = kooagent_core::clock::Clock::now_secs(&kooagent_core::clock::SystemClock);
            format!(
                "{} {:5} {text}\n",
                kooagent_core::clock::format_rfc3339(now),
                record.level(),
            )
        };
        if let Ok(mut w) = self.sink.lock() {
            let _ = w.write_all(line.as_bytes());
            let _ = w.flush();
        }
    }

    fn flush(&self) {
        if let Ok(mut w) = self.sink.lock() {
            let _ = w.flush();
        }
    }
}

/// The HTTP library's byte dumps (`ureq_proto` at trace: 16 bytes a line, hex and ASCII)
/// carry whole requests, headers and bodies, split at arbitrary places: no value in them
/// can be recognised to be masked, so they are not written at all.
fn wire_dump(record: &Record) -> bool {
    record.level() == Level::Trace && record.target().starts_with("ureq_proto")
}

/// Header names whose values are secrets or signatures made with one (the AK/SK
/// `Authorization`, the relay's device signature, proxy credentials).
const SECRET_NAMES: [&str; 3] = [
    "authorization",
    "x-kooagent-signature",
    "proxy-authorization",
];

/// Masks the value after every secret header name in a log line, whatever the library
/// printing it (`name: value`, `"name": "value"`, `name=value`): the filter sits in the
/// logging backend, so no caller, ours or a dependency's, can leak one at any level.
pub fn redact(line: &str) -> Cow<'_, str> {
    let lower = line.to_ascii_lowercase();
    if !SECRET_NAMES.iter().any(|n| lower.contains(n)) {
        return Cow::Borrowed(line);
    }
    let b = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < b.len() {
        let hit = SECRET_NAMES
            .iter()
            .find(|n| lower.as_bytes()[i..].starts_with(n.as_bytes()));
        let Some(name) = hit else {
            let ch = line[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
            continue;
        };
        let mut j = i + name.len();
        out.push_str(&line[i..j]);
        // The separator: quotes, spaces, one ':' or '='.
        let sep_start = j;
        while j < b.len() && matches!(b[j], b'"' | b'\'' | b' ' | b':' | b'=') && j - sep_start < 6
        {
            j += 1;
        }
        if j == sep_start || !line[sep_start..j].contains([':', '=']) {
            i = sep_start;
            continue;
        }
        out.push_str(&line[sep_start..j]);
        let quoted = line[sep_start..j].ends_with(['"', '\'']);
        let end = b[j..]
            .iter()
            .position(|&c| c == b'\r' || c == b'\n' || (quoted && (c == b'"' || c == b'\'')))
            .map_or(b.len(), |p| j + p);
        if end > j {
            out.push_str("[redacted]");
        }
        i = end;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_are_masked_in_any_spelling() {
        let cases = [
            (
                r#"Request { headers: {"content-type": "application/json", "authorization": "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=host, Signature=abc"} }"#,
                r#"Request { headers: {"content-type": "application/json", "authorization": "[redacted]"} }"#,
            ),
            (
                "Authorization: SDK-HMAC-SHA256 Access=AK1, Signature=abc\r\nHost: x",
                "Authorization: [redacted]\r\nHost: x",
            ),
            (
                "x-kooagent-signature=c2ln end",
                "x-kooagent-signature=[redacted]",
            ),
            ("no secret here", "no secret here"),
            (
                "the authorization code PL1 was activated",
                "the authorization code PL1 was activated",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(redact(line), want, "{line}");
        }
    }
}
