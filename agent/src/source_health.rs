//! How an online source is doing: its last attempt, last success and last error, shared by
//! every part of the agent that talks to a server (freeze poll, license refresh, usage
//! upload, authorization-code calls) so `status` answers alike for all of them.
//!
//! A failure is logged at warn level once per change of error (a source failing the same way
//! every poll would otherwise flood the journal, and one failing silently was hours of a
//! seller's guessing); the first success after failures is logged at info level.

use std::sync::Mutex;

use serde::Serialize;

use crate::clock::format_rfc3339;

/// A snapshot, as `status` answers show it (times RFC 3339 UTC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    pub last_attempt_at: Option<String>,
    pub last_success_at: Option<String>,
    /// The last failure's message; kept after a success (see `failing`).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// True when the last attempt failed.
    pub failing: bool,
    pub consecutive_failures: u32,
}

/// One online source's health, updated from any thread.
#[derive(Debug)]
pub struct SourceHealth {
    /// Names the source in log lines ("freeze poll", "usage upload").
    name: &'static str,
    inner: Mutex<Health>,
}

impl SourceHealth {
    pub fn new(name: &'static str) -> Self {
        SourceHealth {
            name,
            inner: Mutex::new(Health::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An attempt that worked, at Unix second `now`.
    pub fn success(&self, now: i64) {
        let mut h = self.lock();
        if h.failing {
            log::info!("{}: working again", self.name);
        }
        let at = format_rfc3339(now);
        h.last_attempt_at = Some(at.clone());
        h.last_success_at = Some(at);
        h.failing = false;
        h.consecutive_failures = 0;
    }

    /// An attempt that failed with `error`, at Unix second `now`. Logged at warn level when
    /// the error differs from the previous attempt's (or the previous attempt worked).
    pub fn failure(&self, now: i64, error: impl std::fmt::Display) {
        let error = error.to_string();
        let mut h = self.lock();
        if !h.failing || h.last_error.as_deref() != Some(error.as_str()) {
            log::warn!("{}: {error}", self.name);
        }
        let at = format_rfc3339(now);
        h.last_attempt_at = Some(at.clone());
        h.last_error_at = Some(at);
        h.last_error = Some(error);
        h.failing = true;
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
    }

    /// Records `result` (its error via `Display`) and passes it on.
    pub fn record<T, E: std::fmt::Display>(&self, now: i64, result: Result<T, E>) -> Result<T, E> {
        match &result {
            Ok(_) => self.success(now),
            Err(e) => self.failure(now, e),
        }
        result
    }

    pub fn snapshot(&self) -> Health {
        self.lock().clone()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The current Unix second from the system clock.
pub fn now() -> i64 {
    use crate::clock::Clock;
    crate::clock::SystemClock.now_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_attempts_successes_and_errors() {
        let h = SourceHealth::new("test source");
        assert_eq!(h.snapshot(), Health::default());
        h.failure(1_700_000_000, "connection refused");
        h.failure(1_700_000_060, "connection refused");
        let s = h.snapshot();
        assert!(s.failing);
        assert_eq!(s.consecutive_failures, 2);
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert_eq!(s.last_attempt_at.as_deref(), Some("2023-11-14T22:14:20Z"));
        assert_eq!(s.last_success_at, None);
        h.success(1_700_000_120);
        let s = h.snapshot();
        assert!(!s.failing);
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!(s.last_success_at.as_deref(), Some("2023-11-14T22:15:20Z"));
        assert_eq!(s.last_attempt_at, s.last_success_at);
        // The last error stays visible after the source recovers.
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert_eq!(s.last_error_at.as_deref(), Some("2023-11-14T22:14:20Z"));
    }

    #[test]
    fn record_passes_the_result_through() {
        let h = SourceHealth::new("test source");
        assert_eq!(h.record(5, Err::<(), _>("bad")), Err("bad"));
        assert_eq!(h.record(6, Ok::<_, String>(7)), Ok(7));
        assert_eq!(
            h.snapshot().last_success_at.as_deref(),
            Some("1970-01-01T00:00:06Z")
        );
    }
}
