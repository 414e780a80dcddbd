//! How many connections the server holds, and for whom (docs/seller-server.md
//! "Connections"). Three rules, decided without I/O:
//!
//! - at most `max` connections in all, `max` fitted under `RLIMIT_NOFILE` with descriptors
//!   kept for the database, the relay's and uploads' HTTPS connections and the runtime;
//! - at most `per_address` from one source address (IPv6 by /64), so one host cannot take
//!   them all;
//! - device requests (license and status fetches, relay, usage) are served only while at
//!   most `max - reserve` connections are open: the last `reserve` are kept for the
//!   marketplace's calls, which are told apart only once their request head is read.
//!
//! Connections over a limit are accepted and closed at once rather than left in the
//! backlog, where their clients would hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Descriptors kept out of the connection budget besides the relay's: the database (the
/// SQLite file, its WAL and shared memory, or PostgreSQL's socket), the TLS files read at
/// reload, the log, the runtime's own (epoll, eventfd, signal pipe), spare.
pub const FD_RESERVE: u64 = 64;

/// The connection limits in force (`[seller_server]` `max_connections`,
/// `max_connections_per_address`, `marketplace_reserved_connections`, reconciled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max: usize,
    /// 0: no per-address cap.
    pub per_address: usize,
    pub reserve: usize,
}

impl Limits {
    /// `configured` fitted under the descriptor limit `nofile`, keeping [`FD_RESERVE`] and
    /// two per relay worker (one per marketplace host) for other files; the reserve for
    /// the marketplace at most half of what is left.
    pub fn fit(
        configured: usize,
        per_address: usize,
        reserve: usize,
        nofile: u64,
        relay_workers: usize,
    ) -> Limits {
        let kept = FD_RESERVE + 2 * relay_workers as u64;
        let fit = usize::try_from(nofile.saturating_sub(kept)).unwrap_or(usize::MAX);
        let max = configured.min(fit).max(2);
        Limits {
            max,
            per_address,
            reserve: reserve.min(max / 2),
        }
    }

    /// Open connections up to which device requests are still served.
    pub fn device_room(&self) -> usize {
        self.max - self.reserve
    }
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// `max_connections` were open.
    Full,
    /// Its address held `max_connections_per_address`.
    Address,
    /// The process was out of file descriptors (the spare one let it be closed).
    Descriptors,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<String, usize>,
}

/// The counters, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Conns {
    limits: Mutex<Limits>,
    open: Mutex<Open>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Slot {
    conns: Arc<Conns>,
    address: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.address);
            }
        }
    }
}

impl Conns {
    pub fn new(limits: Limits) -> Arc<Conns> {
        Arc::new(Conns {
            limits: Mutex::new(limits),
            open: Mutex::new(Open::default()),
        })
    }

    pub fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits (reload); connections already open stay.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    /// Admits a connection from `address` (a [`super::limits::address_key`]) or says why not.
    pub fn admit(self: &Arc<Self>, address: &str) -> Result<Slot, Refusal> {
        let limits = self.limits();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= limits.max {
            return Err(Refusal::Full);
        }
        let mine = open.by_address.get(address).copied().unwrap_or(0);
        if limits.per_address > 0 && mine >= limits.per_address {
            return Err(Refusal::Address);
        }
        open.total += 1;
        *open.by_address.entry(address.to_string()).or_insert(0) += 1;
        Ok(Slot {
            conns: self.clone(),
            address: address.to_string(),
        })
    }

    /// Whether a device request may be served now (the marketplace's share is free).
    pub fn device_room(&self) -> bool {
        let room = self.limits().device_room();
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total <= room
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// Refusals counted between warnings: the first is logged at once, later ones at most once
/// per `every`, as one line with the counts (an attacker must not fill the disk with them).
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    last: Option<Instant>,
    counts: std::collections::BTreeMap<Refusal, u64>,
}

impl RefusalLog {
    pub fn new(every: Duration) -> RefusalLog {
        RefusalLog {
            every,
            last: None,
            counts: Default::default(),
        }
    }

    /// Counts one refusal; returns the line to log, if one is due.
    pub fn note(&mut self, why: Refusal, now: Instant) -> Option<String> {
        *self.counts.entry(why).or_insert(0) += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        let parts: Vec<String> = std::mem::take(&mut self.counts)
            .into_iter()
            .map(|(why, n)| {
                let what = match why {
                    Refusal::Full => "over max_connections",
                    Refusal::Address => "over max_connections_per_address",
                    Refusal::Descriptors => {
                        "out of file descriptors (raise LimitNOFILE or lower max_connections)"
                    }
                };
                format!("{n} {what}")
            })
            .collect();
        Some(format!(
            "connections closed at once since the last such line: {} (at most one line per {} s)",
            parts.join(", "),
            self.every.as_secs()
        ))
    }
}

/// Lifts the soft descriptor limit to the hard one (under systemd `LimitNOFILE=` has done
/// it already); returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // rustix: `None` is unlimited.
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum || (lim.current.is_some() && lim.maximum.is_none()) {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return raised.current.unwrap_or(u64::MAX);
        }
    }
    lim.current.unwrap_or(u64::MAX)
}

/// The process or the system ran out of descriptors (EMFILE, ENFILE).
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_under_the_descriptor_limit() {
        let l = Limits::fit(4096, 64, 64, 256, 8);
        assert_eq!(l.max, 256 - 64 - 16);
        assert_eq!(l.reserve, 64);
        assert_eq!(l.device_room(), 176 - 64);
        assert_eq!(Limits::fit(100, 0, 64, u64::MAX, 8).max, 100);
        // The reserve never takes more than half.
        assert_eq!(Limits::fit(100, 0, 90, 1 << 20, 8).reserve, 50);
        assert_eq!(Limits::fit(4096, 0, 8, 10, 8).max, 2);
    }

    #[test]
    fn admission_caps_totals_and_addresses_and_keeps_the_reserve() {
        let c = Conns::new(Limits {
            max: 4,
            per_address: 2,
            reserve: 1,
        });
        let a1 = c.admit("a").unwrap();
        let _a2 = c.admit("a").unwrap();
        assert_eq!(c.admit("a").unwrap_err(), Refusal::Address);
        let _b1 = c.admit("b").unwrap();
        assert!(c.device_room(), "3 open, room for devices up to 3");
        let b2 = c.admit("b").unwrap();
        assert!(!c.device_room(), "the last one is the marketplace's");
        assert_eq!(c.admit("c").unwrap_err(), Refusal::Full);
        drop(b2);
        drop(a1);
        assert_eq!(c.open(), 2);
        let _a3 = c.admit("a").unwrap();
        c.set_limits(Limits {
            max: 10,
            per_address: 0,
            reserve: 0,
        });
        let more: Vec<_> = (0..5).map(|_| c.admit("a").unwrap()).collect();
        assert_eq!(c.open(), 8);
        drop(more);
        assert_eq!(c.open(), 3);
    }

    #[test]
    fn refusals_are_logged_once_per_period_with_counts() {
        let mut log = RefusalLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let first = log.note(Refusal::Address, t0).unwrap();
        assert!(
            first.contains("1 over max_connections_per_address"),
            "{first}"
        );
        for i in 0..1000 {
            assert_eq!(log.note(Refusal::Full, t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            log.note(Refusal::Address, t0 + Duration::from_secs(59)),
            None
        );
        let next = log
            .note(Refusal::Descriptors, t0 + Duration::from_secs(61))
            .unwrap();
        assert!(next.contains("1000 over max_connections,"), "{next}");
        assert!(
            next.contains("1 over max_connections_per_address"),
            "{next}"
        );
        assert!(next.contains("1 out of file descriptors"), "{next}");
    }
}
