//! Pure hourly aggregation: which hour a record lands in, when an hour closes, what its
//! marketplace record says, and the `metering_sn` that makes every resend the same record.
//! No I/O and no clock: callers pass `now`.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::decimal::{Amount, WIRE_UNIT};

pub const HOUR: i64 = 3600;

/// What usage is billed to: the marketplace instance, the seller's meter name, and the
/// package instance for "stop when used up" packages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    #[serde(rename = "i")]
    pub instance: String,
    #[serde(rename = "m")]
    pub meter: String,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub pkg: Option<String>,
}

/// A closed hour's record, frozen when the hour closed: every resend carries exactly
/// these values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourRecord {
    pub sn: String,
    pub key: Key,
    /// Start of the hour (Unix seconds, on the hour); the end is one hour later.
    pub begin: i64,
    /// When the record was made (the hour's close).
    pub record_time: i64,
    /// The marketplace's `usage_value`: > 0, at most 4 decimals.
    pub usage_value: String,
}

impl HourRecord {
    pub fn end(&self) -> i64 {
        self.begin + HOUR
    }
}

pub fn hour_of(t: i64) -> i64 {
    t.div_euclid(HOUR) * HOUR
}

/// Hours starting before this are closable at `now`: each hour gets `lateness` seconds
/// after its end for stragglers.
pub fn closable_before(now: i64, lateness: i64) -> i64 {
    hour_of(now - lateness)
}

/// The hour a record at `at` goes into. Hours before `closed_before` have been closed and
/// possibly sent, so late usage goes into the current hour instead of rewriting them.
pub fn effective_hour(at: i64, closed_before: i64, now: i64) -> i64 {
    let h = hour_of(at);
    if h >= closed_before {
        h
    } else {
        hour_of(now).max(closed_before)
    }
}

/// The idempotency key of one (device, instance, meter, package, hour) record: the same
/// inputs always give the same value, so a resend, a restart or a restored snapshot can
/// never produce a second bill. Keyed by the device code so two devices that report the
/// same instance and meter never collide. 64 lowercase hex characters (the field's max).
pub fn metering_sn(device_code: &str, key: &Key, begin: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(device_code.as_bytes()).expect("any key size");
    for part in [
        "kooagent-usage-v1",
        &key.instance,
        &key.meter,
        key.pkg.as_deref().unwrap_or(""),
        &crate::clock::format_compact(begin),
    ] {
        mac.update(part.as_bytes());
        // A separator that cannot appear in the parts keeps ("ab","c") apart from ("a","bc").
        mac.update(&[0]);
    }
    let tag = mac.finalize().into_bytes();
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

/// The result of closing every closable hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    /// The new watermark: every hour before it is closed.
    pub closed_before: i64,
    pub records: Vec<HourRecord>,
    /// The complete carry table after the close (sub-10^-4 remainders and anything above
    /// the marketplace's per-record maximum).
    pub carry: Vec<(Key, i128)>,
}

/// Closes every hour before `closable_before(now, lateness)`. `open` holds the totals of
/// open hours per (hour start, key); `carry` the remainders from earlier closes. Returns
/// `None` when no new hour is closable.
pub fn close(
    open: &BTreeMap<(i64, Key), i128>,
    carry: &BTreeMap<Key, i128>,
    closed_before: i64,
    now: i64,
    lateness: i64,
    device_code: &str,
) -> Option<Closing> {
    let limit = closable_before(now, lateness);
    if limit <= closed_before {
        return None;
    }
    let mut carry = carry.clone();
    let mut records = Vec::new();
    let mut emitted_last_hour: Vec<&Key> = Vec::new();
    let last_hour = limit - HOUR;
    for ((h, key), v) in open.iter().take_while(|((h, _), _)| *h < limit) {
        let total = Amount(v + carry.remove(key).unwrap_or(0));
        let (wire, rest) = total.split_wire();
        if !wire.is_zero() {
            records.push(HourRecord {
                sn: metering_sn(device_code, key, *h),
                key: key.clone(),
                begin: *h,
                record_time: now,
                usage_value: wire.to_wire(),
            });
            if *h == last_hour {
                emitted_last_hour.push(key);
            }
        }
        if rest.0 != 0 {
            carry.insert(key.clone(), rest.0);
        }
    }
    // A carry of a whole 10^-4 or more exists only when an hour went over the maximum;
    // send it in the last newly closed hour (it has no record for this key yet).
    let mut extra = Vec::new();
    for (key, c) in carry.iter_mut() {
        if *c >= WIRE_UNIT && !emitted_last_hour.contains(&key) {
            let (wire, rest) = Amount(*c).split_wire();
            extra.push(HourRecord {
                sn: metering_sn(device_code, key, last_hour),
                key: key.clone(),
                begin: last_hour,
                record_time: now,
                usage_value: wire.to_wire(),
            });
            *c = rest.0;
        }
    }
    records.extend(extra);
    carry.retain(|_, c| *c != 0);
    Some(Closing {
        closed_before: limit,
        records,
        carry: carry.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::decimal::{parse, MAX_WIRE, SCALE};

    fn key(m: &str) -> Key {
        Key {
            instance: "inst-1".into(),
            meter: m.into(),
            pkg: None,
        }
    }

    const T0: i64 = 1_700_000_000 / HOUR * HOUR; // on the hour

    #[test]
    fn late_usage_goes_to_the_current_hour() {
        // Hour T0 is still open: usage goes there.
        assert_eq!(effective_hour(T0 + 10, T0, T0 + 7200), T0);
        // Hour T0 closed: usage for it goes into the current hour.
        assert_eq!(
            effective_hour(T0 + 10, T0 + HOUR, T0 + 2 * HOUR + 5),
            T0 + 2 * HOUR
        );
        // A clock that went back never lands before the watermark.
        assert_eq!(effective_hour(T0 - HOUR, T0 + HOUR, T0), T0 + HOUR);
    }

    #[test]
    fn hours_close_after_the_lateness_allowance() {
        assert_eq!(closable_before(T0 + HOUR + 299, 300), T0);
        assert_eq!(closable_before(T0 + HOUR + 300, 300), T0 + HOUR);
        let mut open = BTreeMap::new();
        open.insert((T0, key("cpu")), parse("1.5").unwrap().0);
        assert_eq!(
            close(&open, &BTreeMap::new(), T0, T0 + HOUR + 299, 300, "dev"),
            None
        );
        let c = close(&open, &BTreeMap::new(), T0, T0 + HOUR + 300, 300, "dev").unwrap();
        assert_eq!(c.closed_before, T0 + HOUR);
        assert_eq!(c.records.len(), 1);
        let r = &c.records[0];
        assert_eq!((r.begin, r.end()), (T0, T0 + HOUR));
        assert_eq!(r.usage_value, "1.5");
        assert_eq!(r.record_time, T0 + HOUR + 300);
        assert!(c.carry.is_empty());
    }

    #[test]
    fn remainders_carry_into_the_next_hour() {
        let mut open = BTreeMap::new();
        open.insert((T0, key("cpu")), parse("0.00015").unwrap().0);
        open.insert((T0 + HOUR, key("cpu")), parse("0.00005").unwrap().0);
        open.insert((T0, key("tiny")), parse("0.00001").unwrap().0);
        let c = close(&open, &BTreeMap::new(), 0, T0 + 2 * HOUR, 0, "dev").unwrap();
        let vals: Vec<_> = c
            .records
            .iter()
            .map(|r| (r.key.meter.as_str(), r.begin, r.usage_value.as_str()))
            .collect();
        assert_eq!(
            vals,
            vec![("cpu", T0, "0.0001"), ("cpu", T0 + HOUR, "0.0001")]
        );
        // Nothing lost: 0.00001 of "tiny" waits for more usage.
        assert_eq!(c.carry, vec![(key("tiny"), parse("0.00001").unwrap().0)]);
    }

    #[test]
    fn an_hour_over_the_maximum_carries_the_excess() {
        let mut open = BTreeMap::new();
        open.insert((T0, key("bytes")), MAX_WIRE + 2 * SCALE);
        let c = close(&open, &BTreeMap::new(), 0, T0 + HOUR, 0, "dev").unwrap();
        assert_eq!(c.records.len(), 1);
        assert_eq!(c.records[0].usage_value, "99999999.9999");
        // The excess goes out with the next closed hour, even one without usage.
        let carry: BTreeMap<_, _> = c.carry.into_iter().collect();
        let c2 = close(&BTreeMap::new(), &carry, T0 + HOUR, T0 + 3 * HOUR, 0, "dev").unwrap();
        assert_eq!(c2.records.len(), 1);
        assert_eq!(c2.records[0].usage_value, "2");
        assert_eq!(c2.records[0].begin, T0 + 2 * HOUR);
        assert!(c2.carry.is_empty());
    }

    #[test]
    fn metering_sn_is_deterministic_and_distinct() {
        let a = metering_sn("dev-a", &key("cpu"), T0);
        assert_eq!(a, metering_sn("dev-a", &key("cpu"), T0));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, metering_sn("dev-b", &key("cpu"), T0));
        assert_ne!(a, metering_sn("dev-a", &key("mem"), T0));
        assert_ne!(a, metering_sn("dev-a", &key("cpu"), T0 + HOUR));
        let mut pk = key("cpu");
        pk.pkg = Some("pkg".into());
        assert_ne!(a, metering_sn("dev-a", &pk, T0));
    }
}
