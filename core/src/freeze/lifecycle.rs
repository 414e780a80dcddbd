//! The per-license lifecycle: `active` → `grace` → `frozen` → (proof) → `active`, and
//! `released`. Pure: every input carries what it depends on, time is an argument, and the
//! result is the new state plus the transitions it caused.
//!
//! A record keeps *facts* (the last seller token, the grace end that froze it, the latest
//! proof of life for a lease, a detected tamper); the phase is derived from the facts and
//! the license at each input, so no order of inputs can leave a phase that the facts do not
//! justify. Facts that freeze are sticky: only a newer proof removes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::token::{Action, TokenRequest};
use crate::clock::format_rfc3339;

/// Tokens and licenses issued this long before a tamper was detected do not lift it (the
/// seller's and the device's clocks disagree a little; an older one could be a replay).
pub const TAMPER_SLACK_SECS: i64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Active,
    Grace,
    Frozen,
    Released,
}

impl Phase {
    /// Whether the seller's software may run in this phase.
    pub fn running(self) -> bool {
        matches!(self, Phase::Active | Phase::Grace)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::Grace => "grace",
            Phase::Frozen => "frozen",
            Phase::Released => "released",
        }
    }
}

/// Why a license is frozen (several at once are possible).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Expired,
    Seller,
    Marketplace,
    Lease,
    StateTampered,
}

/// A license's lease: a fresh status token at least every `every_secs`, frozen
/// `grace_secs` after it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub every_secs: i64,
    pub grace_secs: i64,
}

/// What the lifecycle needs to know about one installed license that verified and is
/// bound to this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseFacts {
    pub id: String,
    pub issued_at: i64,
    pub not_after: Option<i64>,
    pub grace_end: Option<i64>,
    pub lease: Option<Lease>,
}

/// A marketplace status (the heartbeat answers of the authorization-code flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum External {
    Alive,
    Expired,
    Released,
}

#[derive(Debug, Clone)]
pub enum Input {
    /// The installed licenses changed, or a boundary passed: every usable license.
    Licenses(Vec<LicenseFacts>),
    /// A token whose signature and device binding were checked.
    Token(TokenRequest),
    /// Time passed (a lease boundary).
    Tick,
    /// A marketplace status for a license, observed at `at` (a trustworthy time).
    External {
        license_id: String,
        status: External,
        at: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMark {
    pub action: Action,
    pub seq: u64,
    pub issued_at: i64,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalMark {
    pub status: External,
    pub at: i64,
}

/// One license's persisted lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub phase: Phase,
    pub since: i64,
    pub reason: String,
    pub causes: Vec<Cause>,
    /// The last token applied.
    pub token: Option<TokenMark>,
    pub external: Option<ExternalMark>,
    /// The grace end that froze it (a renewal must end later).
    pub expired_at: Option<i64>,
    /// The latest issue time of a token or a marketplace "alive" (leases).
    pub lease_proof: Option<i64>,
    /// When tampering with the state was detected for this license.
    pub tampered_at: Option<i64>,
    /// Issue time of the license when last seen.
    pub license_issued_at: i64,
    /// A lease is due (still running): when it freezes.
    pub lease_deadline: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub license_id: String,
    pub from: Option<Phase>,
    pub to: Phase,
    pub reason: String,
    pub since: i64,
    pub causes: Vec<Cause>,
}

/// Why a token changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no license {0} is installed on this device")]
    UnknownLicense(String),
    #[error(
        "sequence number {seq} is older than the last token applied for {license} (seq {last})"
    )]
    Stale {
        license: String,
        seq: u64,
        last: u64,
    },
    #[error("the token is issued at {at}, later than this device's trusted time allows")]
    FromFuture { at: String },
    #[error("license {0} was released by the seller; only a newly issued license revives it")]
    Released(String),
}

/// What an input did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub transitions: Vec<Transition>,
    /// The same token was applied before: nothing changed.
    pub replayed: bool,
    /// Any record changed (save the state).
    pub changed: bool,
}

/// Every license's lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub records: BTreeMap<String, Record>,
    /// The whole state was lost or forged (detected then): licenses without a record that
    /// were issued before then start frozen.
    pub tampered_at: Option<i64>,
    #[serde(skip)]
    licenses: BTreeMap<String, LicenseFacts>,
}

impl Machine {
    /// A machine whose state was lost to tampering detected at `at`.
    pub fn tampered(at: i64) -> Machine {
        Machine {
            tampered_at: Some(at),
            ..Machine::default()
        }
    }

    /// `now`: the trusted time (never behind the clock-rollback mark); `tolerance`: how far
    /// in the future a token may be issued.
    pub fn apply(&mut self, input: Input, now: i64, tolerance: i64) -> Result<Outcome, Refusal> {
        let mut out = Outcome::default();
        match input {
            Input::Licenses(list) => {
                self.licenses = list.into_iter().map(|f| (f.id.clone(), f)).collect();
            }
            Input::Tick => {}
            Input::Token(t) => {
                let Some(facts) = self.licenses.get(&t.license_id) else {
                    return Err(Refusal::UnknownLicense(t.license_id));
                };
                if t.issued_at > now.saturating_add(tolerance) {
                    return Err(Refusal::FromFuture {
                        at: format_rfc3339(t.issued_at),
                    });
                }
                let issued = facts.issued_at;
                let rec = self
                    .records
                    .entry(t.license_id.clone())
                    .or_insert_with(|| fresh(now, issued));
                let mark = TokenMark {
                    action: t.action,
                    seq: t.seq,
                    issued_at: t.issued_at,
                    reason: t.reason.clone(),
                };
                if let Some(last) = &rec.token {
                    if *last == mark {
                        out.replayed = true;
                        return Ok(out);
                    }
                    if t.seq <= last.seq {
                        return Err(Refusal::Stale {
                            license: t.license_id,
                            seq: t.seq,
                            last: last.seq,
                        });
                    }
                }
                if rec.phase == Phase::Released {
                    return Err(Refusal::Released(t.license_id));
                }
                rec.lease_proof = Some(rec.lease_proof.map_or(t.issued_at, |p| p.max(t.issued_at)));
                if rec
                    .tampered_at
                    .is_some_and(|at| t.issued_at >= at - TAMPER_SLACK_SECS)
                {
                    rec.tampered_at = None;
                }
                rec.token = Some(mark);
                out.changed = true;
            }
            Input::External {
                license_id,
                status,
                at,
            } => {
                let Some(facts) = self.licenses.get(&license_id) else {
                    return Err(Refusal::UnknownLicense(license_id));
                };
                let issued = facts.issued_at;
                let rec = self
                    .records
                    .entry(license_id)
                    .or_insert_with(|| fresh(now, issued));
                if rec.external.as_ref().is_some_and(|e| e.at > at) {
                    return Ok(out);
                }
                if status == External::Alive {
                    rec.lease_proof = Some(rec.lease_proof.map_or(at, |p| p.max(at)));
                }
                rec.external = Some(ExternalMark { status, at });
                out.changed = true;
            }
        }
        self.derive_all(now, &mut out);
        Ok(out)
    }

    fn derive_all(&mut self, now: i64, out: &mut Outcome) {
        let global_tamper = self.tampered_at;
        for (id, facts) in &self.licenses {
            let rec = self.records.entry(id.clone()).or_insert_with(|| {
                out.changed = true;
                let mut r = fresh(now, facts.issued_at);
                r.tampered_at = global_tamper.filter(|at| facts.issued_at < at - TAMPER_SLACK_SECS);
                r
            });
            let before = rec.clone();
            let first = rec.reason.is_empty();
            derive(rec, facts, now);
            if *rec != before {
                out.changed = true;
            }
            if first || rec.phase != before.phase {
                rec.since = now;
                out.transitions.push(Transition {
                    license_id: id.clone(),
                    from: (!first).then_some(before.phase),
                    to: rec.phase,
                    reason: rec.reason.clone(),
                    since: now,
                    causes: rec.causes.clone(),
                });
            }
        }
    }

    /// The next time a phase may change by itself (grace starting or ending, a lease
    /// falling due or lapsing), after `now`.
    pub fn next_boundary(&self, now: i64) -> Option<i64> {
        let mut best: Option<i64> = None;
        let mut consider = |t: Option<i64>| {
            if let Some(t) = t.filter(|t| *t > now) {
                best = Some(best.map_or(t, |b| b.min(t)));
            }
        };
        for (id, f) in &self.licenses {
            consider(f.not_after);
            consider(f.grace_end);
            if let (Some(l), Some(r)) = (f.lease, self.records.get(id)) {
                let proof = r.lease_proof.unwrap_or(f.issued_at).max(f.issued_at);
                consider(Some(proof.saturating_add(l.every_secs)));
                consider(Some(
                    proof
                        .saturating_add(l.every_secs)
                        .saturating_add(l.grace_secs),
                ));
            }
        }
        best
    }

    /// Why a license is not allowed to run, and since when (for `license.check`).
    pub fn frozen(&self, id: &str) -> Option<(&Record, Phase)> {
        self.records
            .get(id)
            .filter(|r| !r.phase.running())
            .map(|r| (r, r.phase))
    }

    /// Ids of licenses currently known (installed, usable here).
    pub fn present(&self) -> impl Iterator<Item = &String> {
        self.licenses.keys()
    }

    pub fn is_present(&self, id: &str) -> bool {
        self.licenses.contains_key(id)
    }
}

fn fresh(now: i64, issued_at: i64) -> Record {
    Record {
        phase: Phase::Active,
        since: now,
        reason: String::new(),
        causes: vec![],
        token: None,
        external: None,
        expired_at: None,
        lease_proof: None,
        tampered_at: None,
        license_issued_at: issued_at,
        lease_deadline: None,
    }
}

fn days(secs: i64) -> String {
    if secs % 86_400 == 0 {
        format!("{} day(s)", secs / 86_400)
    } else {
        format!("{secs} s")
    }
}

/// Derives the phase of one license from its facts; clears facts a newer proof lifted.
fn derive(rec: &mut Record, f: &LicenseFacts, now: i64) {
    // A license issued after a release is a new sale: start over.
    if rec.phase == Phase::Released {
        let released_at = rec.token.as_ref().map_or(i64::MIN, |t| t.issued_at);
        let ext_at = rec.external.as_ref().map_or(i64::MIN, |e| e.at);
        if f.issued_at > released_at.max(ext_at) {
            *rec = Record {
                reason: rec.reason.clone(),
                phase: rec.phase,
                ..fresh(now, f.issued_at)
            };
        } else {
            return;
        }
    }
    rec.license_issued_at = f.issued_at;
    if let Some(t) = rec.token.as_ref().filter(|t| t.action == Action::Release) {
        rec.phase = Phase::Released;
        rec.causes.clear();
        rec.reason = format!(
            "released by the seller (token seq {} issued {}){}",
            t.seq,
            format_rfc3339(t.issued_at),
            t.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        return;
    }
    if let Some(e) = rec
        .external
        .as_ref()
        .filter(|e| e.status == External::Released)
    {
        rec.phase = Phase::Released;
        rec.causes.clear();
        rec.reason = format!(
            "the marketplace reports the instance released ({})",
            format_rfc3339(e.at)
        );
        return;
    }
    let mut causes = Vec::new();
    let mut why = Vec::new();
    // Expiry: sticky until a license whose grace ends later (or never).
    if let Some(g) = f.grace_end.filter(|g| now >= *g) {
        rec.expired_at = Some(rec.expired_at.map_or(g, |e| e.max(g)));
    }
    if let Some(e) = rec.expired_at {
        let renewed = match f.grace_end {
            None => true,
            Some(g) => g > e && now < g,
        };
        if renewed {
            rec.expired_at = None;
        } else {
            causes.push(Cause::Expired);
            why.push(format!(
                "the license's grace period ended on {}; install a renewed license",
                format_rfc3339(e)
            ));
        }
    }
    if let Some(t) = rec.token.as_ref().filter(|t| t.action == Action::Freeze) {
        if f.issued_at <= t.issued_at {
            causes.push(Cause::Seller);
            why.push(format!(
                "frozen by the seller (token seq {} issued {}){}; an unfreeze token or a renewed license lifts it",
                t.seq,
                format_rfc3339(t.issued_at),
                t.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            ));
        }
    }
    if let Some(e) = rec
        .external
        .as_ref()
        .filter(|e| e.status == External::Expired)
    {
        if f.issued_at <= e.at {
            causes.push(Cause::Marketplace);
            why.push(format!(
                "the marketplace reports the instance expired ({})",
                format_rfc3339(e.at)
            ));
        }
    }
    rec.lease_deadline = None;
    if let Some(l) = f.lease {
        let proof = rec.lease_proof.unwrap_or(f.issued_at).max(f.issued_at);
        let due = proof.saturating_add(l.every_secs);
        let deadline = due.saturating_add(l.grace_secs);
        if now >= deadline {
            causes.push(Cause::Lease);
            why.push(format!(
                "no status token from the seller since {} (one is required every {}, then {} of grace); a new token lifts it",
                format_rfc3339(proof),
                days(l.every_secs),
                days(l.grace_secs)
            ));
        } else if now >= due {
            rec.lease_deadline = Some(deadline);
        }
    }
    if let Some(at) = rec.tampered_at {
        if f.issued_at >= at - TAMPER_SLACK_SECS {
            rec.tampered_at = None;
        } else {
            causes.push(Cause::StateTampered);
            why.push(format!(
                "the freeze state was edited or removed (detected {}); a status token or license issued after that lifts it",
                format_rfc3339(at)
            ));
        }
    }
    rec.causes = causes;
    if !rec.causes.is_empty() {
        rec.phase = Phase::Frozen;
        rec.reason = why.join("; ");
    } else if let (Some(na), Some(g)) = (f.not_after, f.grace_end) {
        if now >= na && now < g {
            rec.phase = Phase::Grace;
            rec.reason = format!(
                "expired on {}; grace period until {}",
                format_rfc3339(na),
                format_rfc3339(g)
            );
        } else {
            rec.phase = Phase::Active;
            rec.reason = active_reason(rec, f);
        }
    } else {
        rec.phase = Phase::Active;
        rec.reason = active_reason(rec, f);
    }
}

fn active_reason(rec: &Record, f: &LicenseFacts) -> String {
    let mut s = match f.not_after {
        Some(na) => format!("valid until {}", format_rfc3339(na)),
        None => "perpetual".to_string(),
    };
    if let Some(d) = rec.lease_deadline {
        s.push_str(&format!(
            "; a status token from the seller is due, frozen at {} without one",
            format_rfc3339(d)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;
    const TOL: i64 = DAY;

    fn lic(id: &str, issued_at: i64, days_valid: i64, grace_days: i64) -> LicenseFacts {
        LicenseFacts {
            id: id.into(),
            issued_at,
            not_after: Some(issued_at + days_valid * DAY),
            grace_end: Some(issued_at + (days_valid + grace_days) * DAY),
            lease: None,
        }
    }

    fn tok(action: Action, seq: u64, at: i64) -> Input {
        Input::Token(TokenRequest {
            license_id: "L".into(),
            action,
            seq,
            issued_at: at,
            devices: vec![],
            reason: Some("r".into()),
        })
    }

    fn phase(m: &Machine) -> Phase {
        m.records["L"].phase
    }

    fn phases(o: &Outcome) -> Vec<(Option<Phase>, Phase)> {
        o.transitions.iter().map(|t| (t.from, t.to)).collect()
    }

    #[test]
    fn expiry_into_grace_then_frozen_renewal_unfreezes() {
        let mut m = Machine::default();
        let l = lic("L", T0, 30, 7);
        let o = m.apply(Input::Licenses(vec![l.clone()]), T0, TOL).unwrap();
        assert_eq!(phases(&o), vec![(None, Phase::Active)]);
        assert_eq!(m.next_boundary(T0), Some(T0 + 30 * DAY));
        let o = m.apply(Input::Tick, T0 + 30 * DAY, TOL).unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Grace)]);
        let o = m.apply(Input::Tick, T0 + 37 * DAY, TOL).unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Grace), Phase::Frozen)]);
        assert_eq!(m.records["L"].causes, vec![Cause::Expired]);
        assert_eq!(m.records["L"].since, T0 + 37 * DAY);
        // Nothing changes on another tick, and a clock set back does not unfreeze.
        assert!(m
            .apply(Input::Tick, T0 + 38 * DAY, TOL)
            .unwrap()
            .transitions
            .is_empty());
        assert!(m
            .apply(Input::Tick, T0 + 10 * DAY, TOL)
            .unwrap()
            .transitions
            .is_empty());
        assert_eq!(phase(&m), Phase::Frozen);
        // A renewal: the same id, issued later, grace ending later.
        let renewed = lic("L", T0 + 38 * DAY, 30, 7);
        let o = m
            .apply(Input::Licenses(vec![renewed]), T0 + 38 * DAY, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
    }

    #[test]
    fn token_ordering_replay_and_unknown() {
        let mut m = Machine::default();
        m.apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0, TOL)
            .unwrap();
        let o = m
            .apply(tok(Action::Freeze, 5, T0 + 10), T0 + 20, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Frozen)]);
        assert!(m.records["L"].reason.contains("seq 5"));
        // Replay: nothing changes, reported as such.
        let o = m
            .apply(tok(Action::Freeze, 5, T0 + 10), T0 + 30, TOL)
            .unwrap();
        assert!(o.replayed && o.transitions.is_empty() && !o.changed);
        // An older unfreeze never overrides the newer freeze.
        let e = m
            .apply(tok(Action::Unfreeze, 4, T0 + 5), T0 + 30, TOL)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Refusal::Stale {
                    seq: 4,
                    last: 5,
                    ..
                }
            ),
            "{e}"
        );
        // Same seq, different content: refused too.
        assert!(m
            .apply(tok(Action::Unfreeze, 5, T0 + 10), T0 + 30, TOL)
            .is_err());
        assert_eq!(phase(&m), Phase::Frozen);
        let o = m
            .apply(tok(Action::Unfreeze, 6, T0 + 40), T0 + 50, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
        let mut other = TokenRequest {
            license_id: "X".into(),
            action: Action::Freeze,
            seq: 1,
            issued_at: T0,
            devices: vec![],
            reason: None,
        };
        assert_eq!(
            m.apply(Input::Token(other.clone()), T0 + 50, TOL)
                .unwrap_err(),
            Refusal::UnknownLicense("X".into())
        );
        other.license_id = "L".into();
        other.seq = 7;
        other.issued_at = T0 + 50 + 2 * TOL;
        assert!(matches!(
            m.apply(Input::Token(other), T0 + 50, TOL).unwrap_err(),
            Refusal::FromFuture { .. }
        ));
    }

    #[test]
    fn renewal_lifts_a_seller_freeze_only_when_issued_after_it() {
        let mut m = Machine::default();
        m.apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0, TOL)
            .unwrap();
        m.apply(tok(Action::Freeze, 1, T0 + 100), T0 + 100, TOL)
            .unwrap();
        // Re-reading the same (older) license changes nothing.
        m.apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0 + 200, TOL)
            .unwrap();
        assert_eq!(phase(&m), Phase::Frozen);
        let o = m
            .apply(
                Input::Licenses(vec![lic("L", T0 + 300, 365, 0)]),
                T0 + 300,
                TOL,
            )
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
    }

    #[test]
    fn release_is_final_until_a_new_license() {
        let mut m = Machine::default();
        m.apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0, TOL)
            .unwrap();
        let o = m
            .apply(tok(Action::Release, 1, T0 + 1), T0 + 1, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Released)]);
        assert!(matches!(
            m.apply(tok(Action::Unfreeze, 2, T0 + 2), T0 + 2, TOL),
            Err(Refusal::Released(_))
        ));
        let o = m
            .apply(
                Input::Licenses(vec![lic("L", T0 + 10, 365, 0)]),
                T0 + 10,
                TOL,
            )
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Released), Phase::Active)]);
    }

    #[test]
    fn lease_lapses_and_replayed_tokens_do_not_extend_it() {
        let mut m = Machine::default();
        let mut l = lic("L", T0, 365, 0);
        l.lease = Some(Lease {
            every_secs: 7 * DAY,
            grace_secs: 2 * DAY,
        });
        m.apply(Input::Licenses(vec![l]), T0, TOL).unwrap();
        assert_eq!(m.next_boundary(T0), Some(T0 + 7 * DAY));
        // A token on day 1 renews the lease from its issue time.
        m.apply(tok(Action::Unfreeze, 1, T0 + DAY), T0 + DAY, TOL)
            .unwrap();
        assert_eq!(m.next_boundary(T0 + DAY), Some(T0 + 8 * DAY));
        m.apply(Input::Tick, T0 + 9 * DAY, TOL).unwrap();
        assert_eq!(phase(&m), Phase::Active);
        assert_eq!(m.records["L"].lease_deadline, Some(T0 + 10 * DAY));
        let o = m.apply(Input::Tick, T0 + 10 * DAY, TOL).unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Frozen)]);
        assert_eq!(m.records["L"].causes, vec![Cause::Lease]);
        // The day-1 token captured and replayed now does not extend the lease.
        let o = m
            .apply(tok(Action::Unfreeze, 1, T0 + DAY), T0 + 10 * DAY, TOL)
            .unwrap();
        assert!(o.replayed && o.transitions.is_empty());
        assert_eq!(phase(&m), Phase::Frozen);
        let o = m
            .apply(tok(Action::Unfreeze, 2, T0 + 10 * DAY), T0 + 10 * DAY, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
        assert_eq!(m.next_boundary(T0 + 10 * DAY), Some(T0 + 17 * DAY));
    }

    #[test]
    fn tamper_freezes_until_a_later_proof() {
        let mut m = Machine {
            tampered_at: Some(T0 + DAY),
            ..Machine::default()
        };
        let o = m
            .apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0 + DAY, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(None, Phase::Frozen)]);
        assert_eq!(m.records["L"].causes, vec![Cause::StateTampered]);
        // A token from before the detection (a replay) does not lift it ...
        m.apply(tok(Action::Unfreeze, 1, T0 + 10), T0 + DAY, TOL)
            .unwrap();
        assert_eq!(phase(&m), Phase::Frozen);
        // ... one issued after it does.
        let o = m
            .apply(tok(Action::Unfreeze, 2, T0 + DAY + 5), T0 + DAY + 5, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
        // A license issued after the detection starts active.
        let o = m
            .apply(
                Input::Licenses(vec![lic("L", T0, 365, 0), lic("M", T0 + 2 * DAY, 30, 0)]),
                T0 + 2 * DAY,
                TOL,
            )
            .unwrap();
        assert_eq!(phases(&o), vec![(None, Phase::Active)]);
    }

    #[test]
    fn external_statuses_feed_the_same_lifecycle() {
        let mut m = Machine::default();
        m.apply(Input::Licenses(vec![lic("L", T0, 365, 0)]), T0, TOL)
            .unwrap();
        let ext = |status, at| Input::External {
            license_id: "L".into(),
            status,
            at,
        };
        let o = m
            .apply(ext(External::Expired, T0 + 10), T0 + 10, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Frozen)]);
        // An older answer arriving late changes nothing.
        m.apply(ext(External::Alive, T0 + 5), T0 + 11, TOL).unwrap();
        assert_eq!(phase(&m), Phase::Frozen);
        let o = m
            .apply(ext(External::Alive, T0 + 20), T0 + 20, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Frozen), Phase::Active)]);
        let o = m
            .apply(ext(External::Released, T0 + 30), T0 + 30, TOL)
            .unwrap();
        assert_eq!(phases(&o), vec![(Some(Phase::Active), Phase::Released)]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut m = Machine::default();
        m.apply(Input::Licenses(vec![lic("L", T0, 1, 0)]), T0 + 2 * DAY, TOL)
            .unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: Machine = serde_json::from_str(&json).unwrap();
        assert_eq!(back.records, m.records);
        assert_eq!(back.records["L"].phase, Phase::Frozen);
    }
}
