//! Pure decisions of the authorization-code service, as functions of explicit times: when
//! the daily query is due, and what a code's last known answers mean now.

use serde::{Deserialize, Serialize};

use super::config::OfflinePolicy;
use crate::clock::format_rfc3339;

pub const DAY: i64 = 86_400;

/// The UTC day number of a Unix time.
pub fn day_of(t: i64) -> i64 {
    t.div_euclid(DAY)
}

/// The daily query is due when none was attempted yet on this UTC day.
pub fn query_due(last_query_day: Option<i64>, now: i64) -> bool {
    last_query_day.is_none_or(|d| day_of(now) > d)
}

/// What the service remembers of one code (persisted in `authcodes.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub code: String,
    /// The name `license.check` is asked about.
    pub product: String,
    pub product_id: Option<String>,
    pub order_id: Option<String>,
    pub amount: Option<String>,
    pub activated_at: i64,
    /// `ALIVE`, `EXPIRED`, `RELEASED` or another value the marketplace sent.
    pub status: String,
    pub expire_time: Option<i64>,
    /// The last successful answer (activation or daily query).
    pub last_ok_at: i64,
    /// When EXPIRED was first reported (grace counts from there).
    pub expired_seen_at: Option<i64>,
    /// The last daily query attempted, and its error when it failed.
    pub last_query_at: Option<i64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// `valid`, `grace`, `frozen`, `released`.
    pub state: &'static str,
    pub allowed: bool,
    pub reason: String,
    /// Until the state changes by itself (expiry or grace end), when known.
    pub until: Option<i64>,
}

/// The verdict for a code at `now`.
pub fn derive(
    r: &CodeRecord,
    now: i64,
    grace_days: u64,
    offline_days: u64,
    policy: OfflinePolicy,
) -> Derived {
    if r.status == "RELEASED" {
        return Derived {
            state: "released",
            allowed: false,
            reason: "the marketplace reports the authorization code released".into(),
            until: None,
        };
    }
    let expired_since = match (r.expired_seen_at, r.expire_time) {
        (Some(s), _) => Some(s),
        (None, Some(e)) if now >= e => Some(e),
        _ => None,
    };
    if let Some(since) = expired_since {
        let grace_end = since.saturating_add(grace_days as i64 * DAY);
        return if now < grace_end {
            Derived {
                state: "grace",
                allowed: true,
                reason: format!(
                    "expired since {}; usable until {}",
                    format_rfc3339(since),
                    format_rfc3339(grace_end)
                ),
                until: Some(grace_end),
            }
        } else {
            Derived {
                state: "frozen",
                allowed: false,
                reason: format!(
                    "expired since {}, grace ended {}; renew the authorization code",
                    format_rfc3339(since),
                    format_rfc3339(grace_end)
                ),
                until: None,
            }
        };
    }
    if r.status != "ALIVE" {
        return Derived {
            state: "frozen",
            allowed: false,
            reason: format!("the marketplace reports status {:?}", r.status),
            until: None,
        };
    }
    let offline_limit = r.last_ok_at.saturating_add(offline_days as i64 * DAY);
    if policy == OfflinePolicy::Freeze && now > offline_limit {
        return Derived {
            state: "frozen",
            allowed: false,
            reason: format!(
                "no successful daily query since {} ({} days allowed offline)",
                format_rfc3339(r.last_ok_at),
                offline_days
            ),
            until: None,
        };
    }
    Derived {
        state: "valid",
        allowed: true,
        reason: "the marketplace reports the authorization code alive".into(),
        until: r.expire_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23T10:00:00Z
    const T: i64 = 1_795_428_000;

    fn rec() -> CodeRecord {
        CodeRecord {
            code: "C".into(),
            product: "p".into(),
            product_id: None,
            order_id: None,
            amount: None,
            activated_at: T,
            status: "ALIVE".into(),
            expire_time: Some(T + 30 * DAY),
            last_ok_at: T,
            expired_seen_at: None,
            last_query_at: None,
            last_error: None,
        }
    }

    #[test]
    fn once_per_utc_day() {
        assert!(query_due(None, T));
        let today = day_of(T);
        assert!(!query_due(Some(today), T));
        // Later the same day, up to the last second.
        let midnight = (today + 1) * DAY;
        assert!(!query_due(Some(today), midnight - 1));
        assert!(query_due(Some(today), midnight));
        assert!(query_due(Some(today - 3), T));
        // A clock set back does not trigger extra queries.
        assert!(!query_due(Some(today), T - DAY));
        assert_eq!(day_of(-1), -1);
    }

    #[test]
    fn alive_expired_grace_frozen_released() {
        let f = OfflinePolicy::Freeze;
        let r = rec();
        let d = derive(&r, T + DAY, 7, 7, f);
        assert_eq!(
            (d.state, d.allowed, d.until),
            ("valid", true, Some(T + 30 * DAY))
        );
        // The expiry passes without an answer: grace from the expiry.
        let mut r2 = r.clone();
        r2.last_ok_at = T + 29 * DAY;
        assert_eq!(derive(&r2, T + 31 * DAY, 7, 7, f).state, "grace");
        assert_eq!(derive(&r2, T + 37 * DAY, 7, 7, f).state, "frozen");
        // EXPIRED reported: grace from then, frozen after.
        let mut e = r.clone();
        e.status = "EXPIRED".into();
        e.expired_seen_at = Some(T + DAY);
        let g = derive(&e, T + 2 * DAY, 7, 7, f);
        assert_eq!(
            (g.state, g.allowed, g.until),
            ("grace", true, Some(T + 8 * DAY))
        );
        let z = derive(&e, T + 8 * DAY, 7, 7, f);
        assert_eq!((z.state, z.allowed), ("frozen", false));
        assert_eq!(derive(&e, T + DAY, 0, 7, f).state, "frozen");
        let mut rel = r.clone();
        rel.status = "RELEASED".into();
        let d = derive(&rel, T, 7, 7, f);
        assert_eq!((d.state, d.allowed), ("released", false));
        let mut odd = r;
        odd.status = "SUSPENDED".into();
        assert_eq!(derive(&odd, T, 7, 7, f).state, "frozen");
    }

    #[test]
    fn offline_policy() {
        let r = rec();
        assert_eq!(
            derive(&r, T + 7 * DAY, 7, 7, OfflinePolicy::Freeze).state,
            "valid"
        );
        let d = derive(&r, T + 7 * DAY + 1, 7, 7, OfflinePolicy::Freeze);
        assert_eq!((d.state, d.allowed), ("frozen", false));
        assert!(
            d.reason.contains("no successful daily query"),
            "{}",
            d.reason
        );
        assert_eq!(
            derive(&r, T + 20 * DAY, 7, 7, OfflinePolicy::Keep).state,
            "valid"
        );
        // A successful query resets the count.
        let mut back = r;
        back.last_ok_at = T + 19 * DAY;
        assert_eq!(
            derive(&back, T + 20 * DAY, 7, 7, OfflinePolicy::Freeze).state,
            "valid"
        );
    }
}
