//! The state of one license at one moment, for one device and one trusted time, and the
//! next moment that state can change. Pure: everything it depends on is an argument.

use serde::Serialize;

use super::format::License;
use super::keys::Integrity;
use crate::device_code::canonical;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Valid,
    Grace,
    Expired,
    NotYetValid,
    WrongDevice,
    BadSignature,
    UntrustedKey,
    ClockRollback,
    Frozen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Valid => "valid",
            State::Grace => "grace",
            State::Expired => "expired",
            State::NotYetValid => "not_yet_valid",
            State::WrongDevice => "wrong_device",
            State::BadSignature => "bad_signature",
            State::UntrustedKey => "untrusted_key",
            State::ClockRollback => "clock_rollback",
            State::Frozen => "frozen",
        }
    }

    /// Whether the seller's software may run.
    pub fn allows_use(self) -> bool {
        matches!(self, State::Valid | State::Grace)
    }

    /// Ordering among several licenses for one product: lower is better.
    pub fn rank(self) -> u8 {
        match self {
            State::Valid => 0,
            State::Grace => 1,
            State::NotYetValid => 2,
            State::Expired => 3,
            State::Frozen => 4,
            State::ClockRollback => 5,
            State::WrongDevice => 6,
            State::UntrustedKey => 7,
            State::BadSignature => 8,
        }
    }
}

/// What is known about this machine's identity.
#[derive(Debug, Clone, Copy)]
pub enum DeviceView<'a> {
    /// Codes a license bound to this device may carry (the current code, plus the baseline
    /// code while drift is within the tolerance of docs/device-code.md).
    Known(&'a [String]),
    /// No code yet (being computed, settling, or failed): why.
    Unknown(&'a str),
}

/// The time a verdict is computed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeView {
    /// The system clock.
    pub now: i64,
    /// The latest trustworthy time seen (see trusted_time.rs).
    pub trusted: i64,
    /// How far behind `trusted` the clock may be before it counts as rolled back.
    pub tolerance: i64,
}

impl TimeView {
    /// Seconds the clock is behind the trusted mark beyond the tolerance, if it is.
    pub fn rollback(&self) -> Option<i64> {
        let behind = self.trusted.saturating_sub(self.now);
        (behind > self.tolerance).then_some(behind)
    }

    /// When a rolled-back clock counts as right again.
    fn rollback_ends(&self) -> i64 {
        self.trusted.saturating_sub(self.tolerance)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub state: State,
    pub reason: String,
    /// The next time (Unix seconds, system clock) this verdict may change by itself.
    pub next_boundary: Option<i64>,
}

/// Whether two device codes are the same code: they are typed by people, so both are
/// compared in the one canonical form, [`crate::device_code::canonical`] (case, spaces and
/// hyphens do not matter, for codes of other schemes too).
pub fn same_code(a: &str, b: &str) -> bool {
    canonical(a) == canonical(b)
}

/// Decides the state of `lic`. `frozen` is the freeze capability's say (a reason when the
/// marketplace froze this license), `None` until that capability exists.
pub fn evaluate(
    lic: &License,
    integrity: &Integrity,
    device: DeviceView<'_>,
    time: TimeView,
    frozen: Option<&str>,
) -> Verdict {
    let fixed = |state, reason: String| Verdict {
        state,
        reason,
        next_boundary: None,
    };
    match integrity {
        Integrity::Verified => {}
        Integrity::BadSignature => {
            return fixed(
                State::BadSignature,
                format!(
                    "the signature does not match key {}: the license was altered or signed by another key",
                    lic.key_id
                ),
            )
        }
        Integrity::UntrustedKey(why) => return fixed(State::UntrustedKey, why.clone()),
    }
    if !lic.unbound {
        match device {
            DeviceView::Unknown(why) => {
                return fixed(
                    State::WrongDevice,
                    format!("this device's identification code is not available: {why}"),
                )
            }
            DeviceView::Known(codes) => {
                let bound = lic
                    .devices
                    .iter()
                    .any(|d| codes.iter().any(|c| same_code(c, d)));
                if !bound {
                    return fixed(
                        State::WrongDevice,
                        format!(
                            "bound to {}, not to this device ({})",
                            lic.devices.join(", "),
                            codes.first().map(String::as_str).unwrap_or("no code")
                        ),
                    );
                }
            }
        }
    }
    if let Some(behind) = time.rollback() {
        return Verdict {
            state: State::ClockRollback,
            reason: format!(
                "the system clock is {} behind the latest trusted time {} (tolerance {})",
                human_secs(behind),
                crate::clock::format_rfc3339(time.trusted),
                human_secs(time.tolerance)
            ),
            next_boundary: Some(time.rollback_ends()),
        };
    }
    if let Some(why) = frozen {
        return fixed(State::Frozen, why.to_string());
    }
    let now = time.now;
    if now < lic.not_before {
        return Verdict {
            state: State::NotYetValid,
            reason: format!(
                "valid from {}",
                crate::clock::format_rfc3339(lic.not_before)
            ),
            next_boundary: Some(lic.not_before),
        };
    }
    let Some(not_after) = lic.not_after else {
        return fixed(State::Valid, "perpetual license".into());
    };
    if now < not_after {
        return Verdict {
            state: State::Valid,
            reason: format!("valid until {}", crate::clock::format_rfc3339(not_after)),
            next_boundary: Some(not_after),
        };
    }
    let grace_end = lic.grace_end().unwrap_or(not_after);
    if now < grace_end {
        return Verdict {
            state: State::Grace,
            reason: format!(
                "expired {}; grace period until {}",
                crate::clock::format_rfc3339(not_after),
                crate::clock::format_rfc3339(grace_end)
            ),
            next_boundary: Some(grace_end),
        };
    }
    fixed(
        State::Expired,
        format!(
            "expired {}{}",
            crate::clock::format_rfc3339(not_after),
            if lic.grace_secs > 0 {
                format!(
                    "; grace period ended {}",
                    crate::clock::format_rfc3339(grace_end)
                )
            } else {
                String::new()
            }
        ),
    )
}

/// Seconds left in the current state (until expiry when valid, until the grace period
/// ends in grace); `None` when perpetual or not running.
pub fn secs_left(lic: &License, state: State, now: i64) -> Option<i64> {
    match state {
        State::Valid => lic.not_after.map(|t| t - now),
        State::Grace => lic.grace_end().map(|t| t - now),
        _ => None,
    }
    .map(|s| s.max(0))
}

pub fn human_secs(s: i64) -> String {
    match s {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sample;

    const HERE: &str = "AAAA-BBBB-CCCC-DDDD-EEEE";
    const DAY: i64 = 86_400;

    fn at(now: i64) -> TimeView {
        TimeView {
            now,
            trusted: now,
            tolerance: DAY,
        }
    }

    fn state(lic: &License, now: i64) -> (State, Option<i64>) {
        let codes = [HERE.to_string()];
        let v = evaluate(
            lic,
            &Integrity::Verified,
            DeviceView::Known(&codes),
            at(now),
            None,
        );
        (v.state, v.next_boundary)
    }

    #[test]
    fn each_time_state_at_and_around_its_boundaries() {
        let l = sample();
        let (nb, na, ge) = (l.not_before, l.not_after.unwrap(), l.grace_end().unwrap());
        assert_eq!(state(&l, nb - 1), (State::NotYetValid, Some(nb)));
        assert_eq!(state(&l, nb), (State::Valid, Some(na)));
        assert_eq!(state(&l, na - 1), (State::Valid, Some(na)));
        assert_eq!(state(&l, na), (State::Grace, Some(ge)));
        assert_eq!(state(&l, ge - 1), (State::Grace, Some(ge)));
        assert_eq!(state(&l, ge), (State::Expired, None));
        assert_eq!(secs_left(&l, State::Valid, na - 10), Some(10));
        assert_eq!(secs_left(&l, State::Grace, ge - 5), Some(5));
        assert_eq!(secs_left(&l, State::Expired, ge), None);
    }

    #[test]
    fn no_grace_goes_straight_to_expired() {
        let mut l = sample();
        l.grace_secs = 0;
        let na = l.not_after.unwrap();
        assert_eq!(state(&l, na - 1), (State::Valid, Some(na)));
        assert_eq!(state(&l, na), (State::Expired, None));
    }

    #[test]
    fn perpetual_has_no_boundary_after_start() {
        let mut l = sample();
        l.not_after = None;
        assert_eq!(
            state(&l, l.not_before + 100 * 365 * DAY),
            (State::Valid, None)
        );
        assert_eq!(state(&l, l.not_before - 1).0, State::NotYetValid);
        assert_eq!(secs_left(&l, State::Valid, l.not_before), None);
    }

    #[test]
    fn device_binding() {
        let mut l = sample();
        let now = l.not_before + 1;
        let codes = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let eval = |l: &License, device: DeviceView| {
            evaluate(l, &Integrity::Verified, device, at(now), None).state
        };
        // Typed codes differ in case and spaces only.
        assert_eq!(
            eval(
                &l,
                DeviceView::Known(&codes(&[" aaaa-bbbb-cccc-dddd-eeee"]))
            ),
            State::Valid
        );
        // A clone gets a new code and only that is accepted: the copied license is refused.
        assert_eq!(
            eval(&l, DeviceView::Known(&codes(&["ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ"]))),
            State::WrongDevice
        );
        // Drift within tolerance: the baseline code is still among the accepted ones.
        assert_eq!(
            eval(
                &l,
                DeviceView::Known(&codes(&["NEWC-ODE0-0000-0000-0000", HERE]))
            ),
            State::Valid
        );
        assert_eq!(
            eval(&l, DeviceView::Unknown("settling")),
            State::WrongDevice
        );
        // Several codes on one license (a cluster): any of them matches.
        l.devices = codes(&["NODE-1111-1111-1111-1111", HERE]);
        assert_eq!(eval(&l, DeviceView::Known(&codes(&[HERE]))), State::Valid);
        // Unbound, explicitly: any device, even an unknown one.
        l.unbound = true;
        l.devices.clear();
        assert_eq!(eval(&l, DeviceView::Unknown("pending")), State::Valid);
        assert_eq!(eval(&l, DeviceView::Known(&codes(&["ZZZZ"]))), State::Valid);
    }

    #[test]
    fn integrity_and_freeze_come_first() {
        let l = sample();
        let codes = [HERE.to_string()];
        let now = l.not_before + 1;
        let e = |i: Integrity, frozen| {
            evaluate(&l, &i, DeviceView::Known(&codes), at(now), frozen).state
        };
        assert_eq!(e(Integrity::BadSignature, None), State::BadSignature);
        assert_eq!(
            e(Integrity::UntrustedKey("revoked".into()), None),
            State::UntrustedKey
        );
        assert_eq!(
            e(Integrity::Verified, Some("frozen by the marketplace")),
            State::Frozen
        );
    }

    #[test]
    fn clock_rollback_and_recovery() {
        let l = sample();
        let codes = [HERE.to_string()];
        let trusted = l.not_before + 10 * DAY;
        let v = |now| {
            evaluate(
                &l,
                &Integrity::Verified,
                DeviceView::Known(&codes),
                TimeView {
                    now,
                    trusted,
                    tolerance: DAY,
                },
                None,
            )
        };
        // Within tolerance: fine.
        assert_eq!(v(trusted - DAY).state, State::Valid);
        // Beyond it: rollback, until the clock reaches trusted - tolerance again.
        let r = v(trusted - DAY - 1);
        assert_eq!(r.state, State::ClockRollback);
        assert_eq!(r.next_boundary, Some(trusted - DAY));
        assert!(r.reason.contains("behind"), "{}", r.reason);
        assert_eq!(v(l.not_before + 2).state, State::ClockRollback);
        assert_eq!(v(trusted).state, State::Valid);
    }

    #[test]
    fn ranks_prefer_usable_licenses() {
        assert!(State::Valid.rank() < State::Grace.rank());
        assert!(State::Grace.rank() < State::Expired.rank());
        assert!(State::Expired.rank() < State::BadSignature.rank());
        assert!(State::Grace.allows_use() && !State::Expired.allows_use());
    }
}
