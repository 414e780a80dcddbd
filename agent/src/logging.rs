//! A small stderr logger: journald captures stderr under systemd, and a log file can take
//! its place for `--daemon` on boards without one. Under journald (`JOURNAL_STREAM` set) each
//! line carries a `<N>` syslog priority prefix instead of a timestamp, so levels survive.

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
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.journald {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}\n", record.args())
        } else {
            let now = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
            format!(
                "{} {:5} {}\n",
                crate::clock::format_rfc3339(now),
                record.level(),
                record.args()
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
