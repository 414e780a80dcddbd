//! Time as the agent sees it: a `Clock` trait so every rule that depends on "now" can be
//! tested with a fake clock, plus UTC calendar helpers (no timezone database needed: the
//! marketplace speaks UTC only).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Source of wall-clock time, in Unix milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
    fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        }
    }
}

/// A clock tests move by hand.
#[derive(Debug, Default)]
pub struct FakeClock(AtomicI64);

impl FakeClock {
    pub fn new(ms: i64) -> Self {
        FakeClock(AtomicI64::new(ms))
    }
    pub fn set_ms(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst)
    }
    pub fn advance_secs(&self, secs: i64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Inverse of [`days_from_civil`].
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Civil {
    pub fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    pub fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + self.hour as i64 * 3600
            + self.minute as i64 * 60
            + self.second as i64
    }

    fn valid(self) -> bool {
        (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// `2026-11-23T12:00:00Z`
pub fn format_rfc3339(secs: i64) -> String {
    let c = Civil::from_unix(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// The marketplace's compact UTC form `yyyyMMdd'T'HHmmss'Z'`, e.g. `20220809T091000Z`.
pub fn format_compact(secs: i64) -> String {
    let c = Civil::from_unix(secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC only, seconds precision; `z` accepted).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || !(b[19] == b'Z' || b[19] == b'z') {
        return None;
    }
    let c = Civil {
        year: digits(&s[0..4])? as i64,
        month: digits(&s[5..7])?,
        day: digits(&s[8..10])?,
        hour: digits(&s[11..13])?,
        minute: digits(&s[14..16])?,
        second: digits(&s[17..19])?,
    };
    c.valid().then(|| c.to_unix())
}

/// Parses the compact `yyyyMMdd'T'HHmmss'Z'` form.
pub fn parse_compact(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    parse_digits14(&format!("{}{}", &s[0..8], &s[9..15]))
}

/// Parses `yyyyMMddHHmmss` (the authorization-code APIs' form).
pub fn parse_digits14(s: &str) -> Option<i64> {
    if s.len() != 14 {
        return None;
    }
    let c = Civil {
        year: digits(&s[0..4])? as i64,
        month: digits(&s[4..6])?,
        day: digits(&s[6..8])?,
        hour: digits(&s[8..10])?,
        minute: digits(&s[10..12])?,
        second: digits(&s[12..14])?,
    };
    c.valid().then(|| c.to_unix())
}

/// Parses an HTTP `Date` (IMF-fixdate, RFC 9110): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut f = s.split_ascii_whitespace();
    let (_weekday, day, month, year, time, zone) = (
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
        f.next()?,
    );
    if zone != "GMT" || f.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let t: Vec<&str> = time.split(':').collect();
    if t.len() != 3 || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let c = Civil {
        year: digits(year)? as i64,
        month,
        day: digits(day)?,
        hour: digits(t[0])?,
        minute: digits(t[1])?,
        second: digits(t[2])?,
    };
    c.valid().then(|| c.to_unix())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32-bit hazards (run on armv7 under qemu by scripts/cross-test.sh): times past
    /// 2038-01-19 (i32) and 2106-02-07 (u32) format, parse and read the clock right.
    #[test]
    fn word_size_times_past_2038() {
        let y2038 = i64::from(i32::MAX) + 1;
        assert_eq!(format_rfc3339(y2038), "2038-01-19T03:14:08Z");
        assert_eq!(parse_rfc3339("2038-01-19T03:14:08Z"), Some(y2038));
        let y2106 = i64::from(u32::MAX) + 1;
        assert_eq!(format_rfc3339(y2106), "2106-02-07T06:28:16Z");
        assert_eq!(parse_compact("21060207T062816Z"), Some(y2106));
        assert_eq!(Civil::from_unix(y2106).to_unix(), y2106);
        let now = SystemClock.now_secs();
        assert!(now > 1_700_000_000 && now < y2106, "{now}");
        assert_eq!(
            parse_rfc3339(&format_rfc3339(now + 20 * 365 * 86_400)),
            Some(now + 20 * 365 * 86_400)
        );
    }

    #[test]
    fn round_trips_dates() {
        for secs in [0i64, 951_782_400, 1_660_036_200, 4_102_444_799, -86_400] {
            let c = Civil::from_unix(secs);
            assert_eq!(c.to_unix(), secs);
            assert_eq!(parse_rfc3339(&format_rfc3339(secs)), Some(secs));
            if secs >= 0 {
                assert_eq!(parse_compact(&format_compact(secs)), Some(secs));
            }
        }
    }

    #[test]
    fn formats_marketplace_example() {
        // 2022-08-09 09:10:00 UTC, the spec's record_time example.
        assert_eq!(format_compact(1_660_036_200), "20220809T091000Z");
        assert_eq!(parse_digits14("20230726121646"), Some(1_690_373_806));
    }

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 31 Feb 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn rejects_impossible_dates() {
        assert_eq!(parse_rfc3339("2023-02-29T00:00:00Z"), None);
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01 00:00:00Z"), None);
        assert_eq!(parse_compact("20240101T250000Z"), None);
        assert_eq!(parse_digits14("2024010100000"), None);
    }
}
