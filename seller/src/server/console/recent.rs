//! The marketplace calls of the last hour, for the console's health page: per minute, the
//! calls by result code and a histogram of answer times, in this process's memory (the
//! Prometheus counters run since the start; an hour's window is what an operator looking
//! at the page asks about). With several processes each shows its own (as `/metrics`).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Upper bounds of the answer-time buckets, in seconds (the marketplace gives up after 5 s).
const BOUNDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const WINDOW_MINUTES: u64 = 60;

#[derive(Default, Clone)]
struct Minute {
    /// Minutes since the window's origin.
    at: u64,
    codes: BTreeMap<String, u64>,
    /// One count per bound, and one over the last.
    times: [u64; BOUNDS.len() + 1],
}

/// A ring of the last [`WINDOW_MINUTES`] minutes.
pub struct Recent {
    origin: Instant,
    minutes: Mutex<Vec<Minute>>,
}

/// The last hour as the health page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// (resultCode, calls).
    pub codes: Vec<(String, u64)>,
    /// Upper bounds of the buckets holding the median and the 99th percentile (seconds;
    /// infinite: over 5 s); None: no call.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl Recent {
    pub fn new(origin: Instant) -> Recent {
        Recent {
            origin,
            minutes: Mutex::new(vec![Minute::default(); WINDOW_MINUTES as usize]),
        }
    }

    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs() / 60
    }

    pub fn record_at(&self, at: Instant, code: &str, took: Duration) {
        let m = self.minute(at);
        let mut ring = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut ring[(m % WINDOW_MINUTES) as usize];
        if slot.at != m {
            *slot = Minute {
                at: m,
                ..Minute::default()
            };
        }
        *slot.codes.entry(code.to_string()).or_default() += 1;
        let secs = took.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        slot.times[i] += 1;
    }

    /// The calls of the hour up to `now` (the current minute and the 59 before it).
    pub fn summary_at(&self, now: Instant) -> Summary {
        let m = self.minute(now);
        let ring = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let mut codes = BTreeMap::<String, u64>::new();
        let mut times = [0u64; BOUNDS.len() + 1];
        for slot in ring
            .iter()
            .filter(|s| s.at <= m && m - s.at < WINDOW_MINUTES)
        {
            for (c, n) in &slot.codes {
                *codes.entry(c.clone()).or_default() += n;
            }
            for (t, n) in times.iter_mut().zip(slot.times) {
                *t += n;
            }
        }
        let total: u64 = times.iter().sum();
        let quantile = |q: f64| -> Option<f64> {
            if total == 0 {
                return None;
            }
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, n) in times.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Some(BOUNDS.get(i).copied().unwrap_or(f64::INFINITY));
                }
            }
            Some(f64::INFINITY)
        };
        Summary {
            codes: codes.into_iter().collect(),
            p50: quantile(0.5),
            p99: quantile(0.99),
        }
    }
}

/// This process's window.
pub fn global() -> &'static Recent {
    static R: OnceLock<Recent> = OnceLock::new();
    R.get_or_init(|| Recent::new(Instant::now()))
}

/// One marketplace call answered now.
pub fn record(code: &str, took: Duration) {
    global().record_at(Instant::now(), code, took);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_holds_the_last_hour_only() {
        let t0 = Instant::now();
        let r = Recent::new(t0);
        let min = |m: u64| t0 + Duration::from_secs(m * 60 + 5);
        r.record_at(min(0), "000000", Duration::from_millis(2));
        r.record_at(min(0), "000005", Duration::from_millis(400));
        for _ in 0..98 {
            r.record_at(min(30), "000000", Duration::from_millis(3));
        }
        let s = r.summary_at(min(59));
        assert_eq!(
            s.codes,
            [("000000".to_string(), 99), ("000005".to_string(), 1)]
        );
        assert_eq!((s.p50, s.p99), (Some(0.005), Some(0.005)));
        // An hour on, minute 0 has left the window (its slot is reused for minute 60).
        let s = r.summary_at(min(60));
        assert_eq!(s.codes, [("000000".to_string(), 98)]);
        r.record_at(min(60), "000003", Duration::from_secs(9));
        let s = r.summary_at(min(60));
        assert_eq!(
            s.codes,
            [("000000".to_string(), 98), ("000003".to_string(), 1)]
        );
        assert_eq!(s.p99, Some(f64::INFINITY));
        assert_eq!(r.summary_at(min(200)).p50, None);
    }
}
