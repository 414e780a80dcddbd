//! Token buckets kept in the database, so every server process behind a load balancer
//! draws from the same ones (docs/seller-server.md "Security"). A bucket holds up to
//! `burst` tokens and refills at `per_minute`; it is stored as milli-tokens and the time
//! it was last written, and a bucket nobody touched for long enough is simply full (rows
//! are pruned).

use serde::{Deserialize, Serialize};

use super::db::{BucketRow, DbError, Tx};

/// One bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Most tokens held (what a quiet caller may spend at once).
    pub burst: u32,
    /// Tokens added per minute.
    pub per_minute: u32,
}

impl Rate {
    pub const fn new(burst: u32, per_minute: u32) -> Rate {
        Rate { burst, per_minute }
    }

    fn full(self) -> i64 {
        self.burst as i64 * 1000
    }

    /// How long an untouched bucket takes to refill completely (rows older are pruned).
    pub fn refill_ms(self) -> i64 {
        if self.per_minute == 0 {
            return i64::MAX / 4;
        }
        self.full() * 60 / self.per_minute as i64
    }

    pub fn validate(self, key: &str) -> Result<(), String> {
        if self.burst == 0 || self.per_minute == 0 {
            return Err(format!("{key}: burst and per_minute must be at least 1"));
        }
        if self.burst > 1_000_000 || self.per_minute > 6_000_000 {
            return Err(format!(
                "{key}: burst at most 1000000, per_minute at most 6000000"
            ));
        }
        Ok(())
    }
}

/// The level (milli-tokens) of a bucket last stored as `row`, at `now_ms`.
pub fn level(row: Option<BucketRow>, now_ms: i64, rate: Rate) -> i64 {
    match row {
        None => rate.full(),
        Some(r) => {
            let elapsed = (now_ms - r.at_ms).max(0);
            // milli-tokens per ms = per_minute / 60.
            let added = elapsed.saturating_mul(rate.per_minute as i64) / 60;
            r.level.saturating_add(added).min(rate.full())
        }
    }
}

/// Takes one token from every bucket in `buckets`, or from none: `Ok(None)` when taken,
/// `Ok(Some(name))` naming the first empty bucket (nothing is taken then).
pub fn take_all(
    tx: &mut dyn Tx,
    buckets: &[(String, Rate)],
    now_ms: i64,
) -> Result<Option<String>, DbError> {
    let mut levels = Vec::with_capacity(buckets.len());
    for (name, rate) in buckets {
        let l = level(tx.bucket(name)?, now_ms, *rate);
        if l < 1000 {
            return Ok(Some(name.clone()));
        }
        levels.push(l);
    }
    for ((name, _), l) in buckets.iter().zip(levels) {
        tx.put_bucket(
            name,
            BucketRow {
                level: l - 1000,
                at_ms: now_ms,
            },
        )?;
    }
    Ok(None)
}

/// Whether every bucket holds a token, without taking any.
pub fn all_have(
    tx: &mut dyn Tx,
    buckets: &[(String, Rate)],
    now_ms: i64,
) -> Result<Option<String>, DbError> {
    for (name, rate) in buckets {
        if level(tx.bucket(name)?, now_ms, *rate) < 1000 {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// `[seller_server.limits]`: every rate the server applies, with defaults a seller can
/// start with (docs/seller-server.md "Security" explains each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// License and status-token fetches that find nothing for the caller (unknown id,
    /// another device's license, a device code bound to another key), per device key,
    /// per source address and for the whole server.
    pub miss_per_key: Rate,
    pub miss_per_address: Rate,
    pub miss_global: Rate,
    /// Relay calls forwarded to the marketplace (each costs an AK/SK call).
    pub relay_per_key: Rate,
    pub relay_per_address: Rate,
    pub relay_global: Rate,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            miss_per_key: Rate::new(10, 2),
            miss_per_address: Rate::new(30, 10),
            miss_global: Rate::new(300, 600),
            relay_per_key: Rate::new(20, 10),
            relay_per_address: Rate::new(60, 60),
            relay_global: Rate::new(200, 1200),
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (k, r) in [
            ("miss_per_key", self.miss_per_key),
            ("miss_per_address", self.miss_per_address),
            ("miss_global", self.miss_global),
            ("relay_per_key", self.relay_per_key),
            ("relay_per_address", self.relay_per_address),
            ("relay_global", self.relay_global),
        ] {
            r.validate(&format!("seller_server.limits.{k}"))?;
        }
        Ok(())
    }

    /// The longest refill time: buckets older than this are full and can be forgotten.
    pub fn longest_refill_ms(&self) -> i64 {
        [
            self.miss_per_key,
            self.miss_per_address,
            self.miss_global,
            self.relay_per_key,
            self.relay_per_address,
            self.relay_global,
        ]
        .iter()
        .map(|r| r.refill_ms())
        .max()
        .unwrap_or(0)
    }
}

/// A source address as a bucket name: IPv6 by its /64 (one host usually holds a whole
/// /64, so per-address limits on single addresses would be free to dodge).
pub fn address_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::{self, Db};

    #[test]
    fn buckets_refill_cap_and_take_all_or_nothing() {
        let r = Rate::new(2, 60); // one token a second
        assert_eq!(level(None, 0, r), 2000);
        let row = BucketRow { level: 0, at_ms: 0 };
        assert_eq!(level(Some(row), 500, r), 500);
        assert_eq!(level(Some(row), 10_000, r), 2000);
        assert_eq!(level(Some(row), -5, r), 0);
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            let buckets = vec![("a".to_string(), r), ("b".to_string(), Rate::new(3, 60))];
            let take = |now: i64| {
                let b = buckets.clone();
                db.run_blocking(move |tx| take_all(tx, &b, now)).unwrap()
            };
            assert_eq!(take(0), None, "{name}");
            assert_eq!(take(0), None, "{name}");
            // a is empty: nothing is taken from b either.
            assert_eq!(take(0), Some("a".into()), "{name}");
            assert_eq!(
                db.run_blocking(|tx| tx.bucket("b")).unwrap().unwrap().level,
                1000
            );
            assert_eq!(take(1000), None, "{name}");
            assert_eq!(take(1000), Some("a".into()), "{name}");
            assert_eq!(db.run_blocking(|tx| tx.prune_buckets(1001)).unwrap(), 2);
            assert_eq!(take(1000), None, "{name}");
        }
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_eq!(address_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(address_key("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }
}
