//! The usage ledger's in-memory model and the entries that change it. Replaying the
//! entries of the ledger in order rebuilds the model exactly; `apply` is the only way it
//! changes, so what is on disk and what is in memory cannot disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::decimal::Amount;
use super::hours::{Closing, HourRecord, Key, HOUR};

/// `i128` as a JSON string: serde's buffered formats cannot carry 128-bit integers, and
/// strings keep every digit whatever reads the file.
mod i128_str {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Usage added to one open hour by one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub k: Key,
    pub h: i64,
    #[serde(with = "i128_str")]
    pub v: i128,
    /// How many records the commit aggregated into this delta.
    pub n: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarryItem {
    pub k: Key,
    #[serde(with = "i128_str")]
    pub v: i128,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenItem {
    pub k: Key,
    pub h: i64,
    #[serde(with = "i128_str")]
    pub v: i128,
}

/// One change to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// The whole model: the first entry of every segment.
    Snapshot(Box<Snapshot>),
    /// Acknowledged usage, aggregated per (hour, key) over one group commit.
    Usage(Vec<Delta>),
    /// Hours closed: their records are frozen from here on.
    Close {
        closed_before: i64,
        records: Vec<HourRecord>,
        carry: Vec<CarryItem>,
    },
    /// The upstream answered success for these records.
    Delivered {
        sns: Vec<String>,
        at: i64,
        upstream: String,
        http: u16,
    },
    /// The upstream refused these records for a reason retrying will not fix.
    Parked {
        sns: Vec<String>,
        at: i64,
        reason: String,
    },
    /// The seller's relay holds these records durably (relay mode); it reports later
    /// whether the marketplace took them.
    Relayed {
        sns: Vec<String>,
        at: i64,
        relay: String,
    },
    /// Parked records put back in the queue (`usage.flush {"retry_parked": true}`).
    Requeued(Vec<String>),
    /// Forget what is older than `cutoff` (usage.max_age_days).
    Prune { cutoff: i64 },
}

impl Entry {
    pub fn close(c: Closing) -> Entry {
        Entry::Close {
            closed_before: c.closed_before,
            records: c.records,
            carry: c
                .carry
                .into_iter()
                .map(|(k, v)| CarryItem { k, v })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Delivery {
    Pending,
    Delivered {
        at: i64,
        upstream: String,
        http: u16,
    },
    Parked {
        at: i64,
        reason: String,
    },
    /// Held by the seller's relay, which uploads it (relay mode).
    Relayed {
        at: i64,
        relay: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub rec: HourRecord,
    pub delivery: Delivery,
}

/// Per-meter counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub records: u64,
    #[serde(with = "i128_str")]
    pub value: i128,
}

/// What was dropped to keep the ledger bounded, never silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// Closed records never delivered (pending or parked), per meter, by age or size.
    pub unsent: BTreeMap<String, Totals>,
    /// Usage of hours that could not be closed before they grew too old, per meter.
    pub unclosed: BTreeMap<String, Totals>,
    /// Delivered records whose history was forgotten (nothing billable lost).
    pub delivered_history: u64,
}

/// The serialised model (maps with structured keys become lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub created: i64,
    pub closed_before: i64,
    pub open: Vec<OpenItem>,
    pub carry: Vec<CarryItem>,
    pub records: Vec<Stored>,
    pub totals: BTreeMap<String, Totals>,
    pub dropped: Dropped,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// When the ledger was first created (Unix seconds).
    pub created: i64,
    /// Every hour starting before this is closed.
    pub closed_before: i64,
    /// Totals of open hours per (hour start, key).
    pub open: BTreeMap<(i64, Key), i128>,
    /// Remainders not sent yet per key (below 10^-4, or above the per-record maximum).
    pub carry: BTreeMap<Key, i128>,
    /// Closed hours' records by metering_sn.
    pub records: BTreeMap<String, Stored>,
    /// Usage acknowledged since the ledger was created, per meter.
    pub totals: BTreeMap<String, Totals>,
    pub dropped: Dropped,
}

impl State {
    pub fn new(created: i64) -> State {
        State {
            created,
            ..Default::default()
        }
    }

    pub fn apply(&mut self, e: &Entry) {
        match e {
            Entry::Snapshot(s) => *self = State::from_snapshot(s),
            Entry::Usage(deltas) => {
                for d in deltas {
                    *self.open.entry((d.h, d.k.clone())).or_insert(0) += d.v;
                    let t = self.totals.entry(d.k.meter.clone()).or_default();
                    t.records += d.n;
                    t.value += d.v;
                }
            }
            Entry::Close {
                closed_before,
                records,
                carry,
            } => {
                let keep = self.open.split_off(&(*closed_before, min_key()));
                self.open = keep;
                self.carry = carry.iter().map(|c| (c.k.clone(), c.v)).collect();
                for r in records {
                    // A frozen record is never rewritten.
                    self.records.entry(r.sn.clone()).or_insert_with(|| Stored {
                        rec: r.clone(),
                        delivery: Delivery::Pending,
                    });
                }
                self.closed_before = self.closed_before.max(*closed_before);
            }
            Entry::Delivered {
                sns,
                at,
                upstream,
                http,
            } => {
                for sn in sns {
                    if let Some(s) = self.records.get_mut(sn) {
                        s.delivery = Delivery::Delivered {
                            at: *at,
                            upstream: upstream.clone(),
                            http: *http,
                        };
                    }
                }
            }
            Entry::Parked { sns, at, reason } => {
                for sn in sns {
                    if let Some(s) = self.records.get_mut(sn) {
                        if !matches!(s.delivery, Delivery::Delivered { .. }) {
                            s.delivery = Delivery::Parked {
                                at: *at,
                                reason: reason.clone(),
                            };
                        }
                    }
                }
            }
            Entry::Relayed { sns, at, relay } => {
                for sn in sns {
                    if let Some(s) = self.records.get_mut(sn) {
                        if s.delivery == Delivery::Pending {
                            s.delivery = Delivery::Relayed {
                                at: *at,
                                relay: relay.clone(),
                            };
                        }
                    }
                }
            }
            Entry::Requeued(sns) => {
                for sn in sns {
                    if let Some(s) = self.records.get_mut(sn) {
                        if matches!(s.delivery, Delivery::Parked { .. }) {
                            s.delivery = Delivery::Pending;
                        }
                    }
                }
            }
            Entry::Prune { cutoff } => self.prune(*cutoff),
        }
    }

    fn prune(&mut self, cutoff: i64) {
        let old: Vec<String> = self
            .records
            .iter()
            .filter(|(_, s)| s.rec.end() < cutoff)
            .map(|(sn, _)| sn.clone())
            .collect();
        for sn in old {
            self.drop_record(&sn);
        }
        let old_open: Vec<(i64, Key)> = self
            .open
            .keys()
            .filter(|(h, _)| h + HOUR < cutoff)
            .cloned()
            .collect();
        for k in old_open {
            if let Some(v) = self.open.remove(&k) {
                let t = self.dropped.unclosed.entry(k.1.meter.clone()).or_default();
                t.records += 1;
                t.value += v;
            }
        }
    }

    fn drop_record(&mut self, sn: &str) {
        if let Some(s) = self.records.remove(sn) {
            // A record the relay holds is the relay's to deliver: nothing is lost here.
            if matches!(
                s.delivery,
                Delivery::Delivered { .. } | Delivery::Relayed { .. }
            ) {
                self.dropped.delivered_history += 1;
            } else {
                let v = super::decimal::parse(&s.rec.usage_value)
                    .map(|a| a.0)
                    .unwrap_or(0);
                let t = self
                    .dropped
                    .unsent
                    .entry(s.rec.key.meter.clone())
                    .or_default();
                t.records += 1;
                t.value += v;
            }
        }
    }

    /// Drops the oldest records, delivered history first, until the snapshot fits in
    /// `budget` bytes. Returns how many records were dropped.
    pub fn shrink_to(&mut self, budget: usize) -> usize {
        let mut dropped = 0;
        loop {
            let size = self.encoded_len();
            if size <= budget || self.records.is_empty() {
                return dropped;
            }
            // Drop in proportion to the excess (at least one) to keep this loop short.
            let excess = (size - budget) as f64 / size as f64;
            let n = ((self.records.len() as f64 * excess).ceil() as usize).max(1);
            let mut victims: Vec<(bool, i64, String)> = self
                .records
                .iter()
                .map(|(sn, s)| {
                    let undelivered = !matches!(
                        s.delivery,
                        Delivery::Delivered { .. } | Delivery::Relayed { .. }
                    );
                    (undelivered, s.rec.begin, sn.clone())
                })
                .collect();
            victims.sort();
            for (undelivered, _, sn) in victims.into_iter().take(n) {
                if undelivered {
                    log::warn!("usage ledger over usage.max_bytes: dropping unsent record {sn}");
                }
                self.drop_record(&sn);
                dropped += 1;
            }
        }
    }

    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(&Entry::Snapshot(Box::new(self.snapshot())))
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: 1,
            created: self.created,
            closed_before: self.closed_before,
            open: self
                .open
                .iter()
                .map(|((h, k), v)| OpenItem {
                    k: k.clone(),
                    h: *h,
                    v: *v,
                })
                .collect(),
            carry: self
                .carry
                .iter()
                .map(|(k, v)| CarryItem {
                    k: k.clone(),
                    v: *v,
                })
                .collect(),
            records: self.records.values().cloned().collect(),
            totals: self.totals.clone(),
            dropped: self.dropped.clone(),
        }
    }

    pub fn from_snapshot(s: &Snapshot) -> State {
        State {
            created: s.created,
            closed_before: s.closed_before,
            open: s.open.iter().map(|o| ((o.h, o.k.clone()), o.v)).collect(),
            carry: s.carry.iter().map(|c| (c.k.clone(), c.v)).collect(),
            records: s
                .records
                .iter()
                .map(|r| (r.rec.sn.clone(), r.clone()))
                .collect(),
            totals: s.totals.clone(),
            dropped: s.dropped.clone(),
        }
    }

    /// Records waiting for delivery, oldest hour first.
    pub fn pending(&self, limit: usize) -> Vec<HourRecord> {
        let mut v: Vec<&HourRecord> = self
            .records
            .values()
            .filter(|s| s.delivery == Delivery::Pending)
            .map(|s| &s.rec)
            .collect();
        v.sort_by(|a, b| (a.begin, &a.sn).cmp(&(b.begin, &b.sn)));
        v.into_iter().take(limit).cloned().collect()
    }

    pub fn count(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for s in self.records.values() {
            match s.delivery {
                Delivery::Pending => c.0 += 1,
                Delivery::Delivered { .. } => c.1 += 1,
                Delivery::Parked { .. } => c.2 += 1,
                Delivery::Relayed { .. } => {}
            }
        }
        c
    }

    /// Records the seller's relay holds and has not reported done.
    pub fn relayed(&self) -> usize {
        self.records
            .values()
            .filter(|s| matches!(s.delivery, Delivery::Relayed { .. }))
            .count()
    }
}

fn min_key() -> Key {
    Key {
        instance: String::new(),
        meter: String::new(),
        pkg: None,
    }
}

/// Convenience for status output.
pub fn amount(v: i128) -> String {
    Amount(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::hours;

    fn key(m: &str) -> Key {
        Key {
            instance: "inst".into(),
            meter: m.into(),
            pkg: None,
        }
    }

    const T0: i64 = 1_700_000_000 / HOUR * HOUR;

    fn usage(h: i64, m: &str, v: i128, n: u64) -> Entry {
        Entry::Usage(vec![Delta { k: key(m), h, v, n }])
    }

    #[test]
    fn entries_round_trip_through_json() {
        let entries = vec![
            usage(T0, "cpu", i128::MAX / 3, 7),
            Entry::Delivered {
                sns: vec!["a".into()],
                at: 5,
                upstream: "https://x".into(),
                http: 200,
            },
            Entry::Prune { cutoff: 9 },
        ];
        for e in entries {
            let bytes = serde_json::to_vec(&e).unwrap();
            assert_eq!(serde_json::from_slice::<Entry>(&bytes).unwrap(), e);
        }
    }

    #[test]
    fn replay_and_snapshot_give_the_same_state() {
        let mut s = State::new(T0);
        s.apply(&usage(T0, "cpu", 1_500_000_000, 3));
        s.apply(&usage(T0 + HOUR, "cpu", 7, 1));
        let c = hours::close(&s.open, &s.carry, s.closed_before, T0 + HOUR, 0, "dev").unwrap();
        let sn = c.records[0].sn.clone();
        s.apply(&Entry::close(c));
        assert_eq!(s.open.len(), 1, "the current hour stays open");
        assert_eq!(s.count(), (1, 0, 0));
        s.apply(&Entry::Delivered {
            sns: vec![sn.clone()],
            at: T0 + HOUR,
            upstream: "u".into(),
            http: 200,
        });
        // Parking a delivered record does not undo the delivery.
        s.apply(&Entry::Parked {
            sns: vec![sn.clone()],
            at: 0,
            reason: "x".into(),
        });
        assert_eq!(s.count(), (0, 1, 0));
        assert_eq!(s.totals["cpu"].records, 4);
        let snap = Entry::Snapshot(Box::new(s.snapshot()));
        let back: Entry = serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap();
        let mut t = State::default();
        t.apply(&back);
        assert_eq!(t, s);
    }

    #[test]
    fn relayed_records_wait_for_the_relays_outcome() {
        let mut s = State::new(T0);
        s.apply(&usage(T0, "cpu", 2_000_000_000, 1));
        s.apply(&usage(T0, "mem", 1_000_000_000, 1));
        let c = hours::close(&s.open, &s.carry, 0, T0 + HOUR, 0, "dev").unwrap();
        s.apply(&Entry::close(c));
        let sns: Vec<String> = s.pending(10).into_iter().map(|r| r.sn).collect();
        s.apply(&Entry::Relayed {
            sns: sns.clone(),
            at: 1,
            relay: "https://seller".into(),
        });
        // Relayed: not pending any more, not delivered yet.
        assert!(s.pending(10).is_empty());
        assert_eq!((s.count(), s.relayed()), ((0, 0, 0), 2));
        s.apply(&Entry::Delivered {
            sns: vec![sns[0].clone()],
            at: 2,
            upstream: "https://seller (relay)".into(),
            http: 200,
        });
        s.apply(&Entry::Parked {
            sns: vec![sns[1].clone()],
            at: 2,
            reason: "parked by the seller's relay: x".into(),
        });
        assert_eq!((s.count(), s.relayed()), ((0, 1, 1), 0));
        // Relaying never undoes an outcome.
        s.apply(&Entry::Relayed {
            sns,
            at: 3,
            relay: "r".into(),
        });
        assert_eq!(s.relayed(), 0);
        let snap = Entry::Snapshot(Box::new(s.snapshot()));
        let mut t = State::default();
        t.apply(&serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap());
        assert_eq!(t, s);
    }

    #[test]
    fn pruning_counts_what_it_drops() {
        let mut s = State::new(T0);
        s.apply(&usage(T0, "cpu", 2_000_000_000, 1));
        s.apply(&usage(T0 + HOUR, "mem", 1_000_000_000, 1));
        let c = hours::close(&s.open, &s.carry, 0, T0 + HOUR, 0, "dev").unwrap();
        s.apply(&Entry::close(c));
        s.apply(&Entry::Prune {
            cutoff: T0 + 3 * HOUR,
        });
        assert!(s.records.is_empty() && s.open.is_empty());
        assert_eq!(s.dropped.unsent["cpu"].value, 2_000_000_000);
        assert_eq!(s.dropped.unclosed["mem"].records, 1);
    }

    #[test]
    fn shrinking_drops_delivered_history_first() {
        let mut s = State::new(T0);
        for i in 0..50 {
            s.apply(&usage(T0 + i * HOUR, "cpu", 1_000_000_000, 1));
        }
        let c = hours::close(&s.open, &s.carry, 0, T0 + 50 * HOUR, 0, "dev").unwrap();
        s.apply(&Entry::close(c));
        let delivered: Vec<String> = s.pending(25).into_iter().map(|r| r.sn).collect();
        s.apply(&Entry::Delivered {
            sns: delivered,
            at: 1,
            upstream: "u".into(),
            http: 200,
        });
        let full = s.encoded_len();
        let n = s.shrink_to(full * 6 / 10);
        assert!(n >= 20 && s.encoded_len() <= full * 6 / 10);
        assert_eq!(s.dropped.delivered_history as usize, n.min(25));
        assert!(s.dropped.unsent.is_empty() || n > 25);
    }
}
