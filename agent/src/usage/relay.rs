//! Usage through the seller's relay (issue 19; docs/usage.md "Relay mode"): the device
//! posts its closed hourly records to the seller's server signed with its ed25519 device
//! key (the authorization-code relay's scheme, `authcode::relay_auth`); the server checks
//! them, keeps them in its outbox and uploads them to the marketplace with the
//! interconnection key, which therefore never sits on a buyer's machine.
//!
//! Both sides share this module: the wire types, the error codes, and [`check_record`],
//! the per-record limits (the usage-data API's own, koogallery.md §1.1). The agent's side
//! is [`RelayClient`] and [`deliver`]; the server's is `seller_server::usage_relay`.
//!
//! A record is pending on the device until the server answers that it holds it durably
//! (`pending` on the server: stored, not yet uploaded). The device then keeps it as
//! `relayed` and asks again later by resending it (the server answers a resend from the
//! stored row) until the answer is `delivered` or `parked`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use ed25519_dalek::SigningKey;

pub use kooagent_core::usage::relay::*;

use super::hours::HourRecord;
use super::ledger::{Ledger, LedgerError};
use super::state::{Delivery, Entry};
use super::upload::{Round, MAX_RECORDS};
use crate::authcode::relay_auth;
use crate::clock::Clock;

/// Posts records to the seller's relay, signed with the device key.
pub struct RelayClient {
    agent: ureq::Agent,
    base: String,
    key: SigningKey,
}

impl RelayClient {
    pub fn new(
        base: &str,
        extra_ca: Option<&Path>,
        ca_key: &str,
        timeout: Duration,
        key: SigningKey,
    ) -> Result<RelayClient, String> {
        Ok(RelayClient {
            agent: crate::https::agent(extra_ca, ca_key, timeout)?,
            base: base.trim_end_matches('/').to_string(),
            key,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn post(&self, records: &[&HourRecord], now_ms: i64) -> Outcome {
        let req = Request {
            records: records.iter().map(|r| WireRecord::from_record(r)).collect(),
        };
        let body = serde_json::to_vec(&req).expect("strings serialise");
        let h = relay_auth::sign(
            &self.key,
            "POST",
            PATH,
            &body,
            now_ms,
            &relay_auth::new_nonce(),
        );
        let mut r = self
            .agent
            .post(format!("{}{PATH}", self.base))
            .header("content-type", "application/json");
        for (k, v) in h.pairs() {
            r = r.header(k, v);
        }
        match r.send(&body[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_string()
                    .unwrap_or_default();
                classify(status, &text)
            }
            Err(e) => Outcome::Transient(format!("{} cannot be reached: {e}", self.base)),
        }
    }
}

/// One relay round: pending records oldest first, then the relayed ones again to learn
/// their outcome. Stops at the first transient failure.
pub fn deliver(
    ledger: &Ledger,
    client: &RelayClient,
    clock: &dyn Clock,
    batch: usize,
) -> Result<Round, LedgerError> {
    let batch = batch.clamp(1, MAX_RECORDS);
    let mut round = Round {
        upstream: Some(client.base().to_string()),
        ..Default::default()
    };
    loop {
        let pending = ledger.state().pending(batch);
        if pending.is_empty() {
            break;
        }
        let refs: Vec<&HourRecord> = pending.iter().collect();
        if !send(ledger, client, clock, &refs, &mut round)? {
            return Ok(round);
        }
        // An answer that leaves every record pending (results missing) would loop.
        let st = ledger.state();
        let stuck = pending.iter().all(|r| {
            st.records
                .get(&r.sn)
                .is_some_and(|s| s.delivery == Delivery::Pending)
        });
        drop(st);
        if stuck {
            round.transient = Some("the relay's answer had no result for the records sent".into());
            return Ok(round);
        }
    }
    // Ask about what the server holds but has not reported done, a batch at a time.
    let relayed: Vec<HourRecord> = ledger
        .state()
        .records
        .values()
        .filter(|s| matches!(s.delivery, Delivery::Relayed { .. }))
        .map(|s| s.rec.clone())
        .collect();
    for chunk in relayed.chunks(batch) {
        let refs: Vec<&HourRecord> = chunk.iter().collect();
        if !send(ledger, client, clock, &refs, &mut round)? {
            break;
        }
    }
    Ok(round)
}

/// Sends `records` (halving on 413); false when a transient failure ended the round.
fn send(
    ledger: &Ledger,
    client: &RelayClient,
    clock: &dyn Clock,
    records: &[&HourRecord],
    round: &mut Round,
) -> Result<bool, LedgerError> {
    round.requests += 1;
    let now = clock.now_secs();
    match client.post(records, clock.now_ms()) {
        Outcome::Held(results) => {
            apply_results(ledger, records, &results, now, client.base(), round)?;
            Ok(true)
        }
        Outcome::TooLarge if records.len() > 1 => {
            let (a, b) = records.split_at(records.len() / 2);
            Ok(send(ledger, client, clock, a, round)? && send(ledger, client, clock, b, round)?)
        }
        Outcome::TooLarge => {
            park(
                ledger,
                records,
                None,
                "HTTP 413 from the relay for one record",
                now,
                round,
            )?;
            Ok(true)
        }
        Outcome::Refused { sn, reason } => {
            log::warn!("usage relay: {reason}");
            park(ledger, records, sn.as_deref(), &reason, now, round)?;
            Ok(true)
        }
        Outcome::Transient(reason) => {
            log::info!("usage relay: will retry: {reason}");
            round.transient = Some(reason);
            Ok(false)
        }
    }
}

/// Parks the one refused record when the server named it (the others are sent again in
/// the next batch), else the whole batch.
fn park(
    ledger: &Ledger,
    records: &[&HourRecord],
    sn: Option<&str>,
    reason: &str,
    now: i64,
    round: &mut Round,
) -> Result<(), LedgerError> {
    let sns: Vec<String> = match sn.filter(|s| records.iter().any(|r| r.sn == *s)) {
        Some(s) => vec![s.to_string()],
        None => records.iter().map(|r| r.sn.clone()).collect(),
    };
    round.parked += sns.len() as u64;
    ledger.mark(Entry::Parked {
        sns,
        at: now,
        reason: reason.to_string(),
    })
}

fn apply_results(
    ledger: &Ledger,
    records: &[&HourRecord],
    results: &[RecordResult],
    now: i64,
    base: &str,
    round: &mut Round,
) -> Result<(), LedgerError> {
    let asked: HashMap<&str, ()> = records.iter().map(|r| (r.sn.as_str(), ())).collect();
    let mut relayed = Vec::new();
    let mut delivered = Vec::new();
    let mut parked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| asked.contains_key(r.metering_sn.as_str()))
    {
        match r.state.as_str() {
            "delivered" => delivered.push(r.metering_sn.clone()),
            "parked" => parked
                .entry(format!(
                    "parked by the seller's relay: {}",
                    r.reason.as_deref().unwrap_or("no reason given")
                ))
                .or_default()
                .push(r.metering_sn.clone()),
            _ => relayed.push(r.metering_sn.clone()),
        }
    }
    let st = ledger.state();
    // Only changes are written: a record already relayed stays as it is.
    let is_relayed = |sn: &str| {
        matches!(
            st.records.get(sn).map(|s| &s.delivery),
            Some(Delivery::Relayed { .. })
        )
    };
    let relayed: Vec<String> = relayed.into_iter().filter(|s| !is_relayed(s)).collect();
    drop(st);
    round.relayed += relayed.len() as u64;
    if !relayed.is_empty() {
        ledger.mark(Entry::Relayed {
            sns: relayed,
            at: now,
            relay: base.to_string(),
        })?;
    }
    if !delivered.is_empty() {
        round.delivered += delivered.len() as u64;
        ledger.mark(Entry::Delivered {
            sns: delivered,
            at: now,
            upstream: format!("{base} (relay)"),
            http: 200,
        })?;
    }
    for (reason, sns) in parked {
        round.parked += sns.len() as u64;
        ledger.mark(Entry::Parked {
            sns,
            at: now,
            reason,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::format_compact;
    use crate::usage::hours::HOUR;

    const NOW: i64 = 1_800_000_000;
    const H: i64 = NOW / HOUR * HOUR - HOUR;

    fn wire() -> WireRecord {
        WireRecord {
            metering_sn: "sn-1".into(),
            instance_id: "inst".into(),
            meter: "cpu".into(),
            begin_time: format_compact(H),
            end_time: format_compact(H + HOUR),
            record_time: format_compact(H + HOUR + 60),
            usage_value: "1.5".into(),
            relate_pkg_instance: None,
        }
    }

    #[test]
    fn records_inside_the_api_limits_pass_and_the_rest_name_the_field() {
        let r = check_record(&wire(), NOW, 35 * 86_400).unwrap();
        assert_eq!((r.begin, r.usage_value.as_str()), (H, "1.5"));
        type Change = Box<dyn Fn(&mut WireRecord)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|w| w.metering_sn = "x".repeat(65)), "metering_sn"),
            (Box::new(|w| w.instance_id = String::new()), "instance_id"),
            (Box::new(|w| w.meter = "a b".into()), "meter"),
            (
                Box::new(|w| w.begin_time = "2026-01-01".into()),
                "begin_time",
            ),
            (
                Box::new(|w| w.end_time = format_compact(H + 2 * HOUR)),
                "whole UTC hour",
            ),
            (
                Box::new(|w| w.begin_time = format_compact(H + 60)),
                "whole UTC hour",
            ),
            (
                Box::new(|w| w.record_time = format_compact(H)),
                "before end_time",
            ),
            (
                Box::new(|w| w.record_time = format_compact(NOW + 3600)),
                "future",
            ),
            (Box::new(|w| w.usage_value = "0".into()), "usage_value"),
            (Box::new(|w| w.usage_value = "-1".into()), "usage_value"),
            (
                Box::new(|w| w.usage_value = "1.23456".into()),
                "more than 4 decimals",
            ),
            (
                Box::new(|w| w.usage_value = "100000000".into()),
                "usage_value",
            ),
            (Box::new(|w| w.usage_value = "1.50".into()), "API's form"),
            (
                Box::new(|w| w.relate_pkg_instance = Some(String::new())),
                "relate_pkg_instance",
            ),
        ];
        for (change, want) in cases {
            let mut w = wire();
            change(&mut w);
            let e = check_record(&w, NOW, 35 * 86_400).unwrap_err();
            assert!(e.contains(want), "{e} (want {want})");
        }
        let mut old = wire();
        old.begin_time = format_compact(H - 40 * 86_400);
        old.end_time = format_compact(H - 40 * 86_400 + HOUR);
        assert!(check_record(&old, NOW, 35 * 86_400)
            .unwrap_err()
            .contains("older than 35 days"));
    }

    #[test]
    fn answers_are_classified() {
        let held = r#"{"error_code":"KOOAGENT.USAGE.0000","error_msg":"","results":[{"metering_sn":"a","state":"pending"}]}"#;
        assert!(matches!(classify(200, held), Outcome::Held(r) if r.len() == 1));
        assert!(matches!(classify(200, "{}"), Outcome::Transient(_)));
        assert_eq!(classify(413, ""), Outcome::TooLarge);
        for s in [401, 404, 429, 500, 502, 503] {
            assert!(matches!(classify(s, ""), Outcome::Transient(_)), "{s}");
        }
        let unknown = r#"{"error_code":"KOOAGENT.USAGE.UNKNOWN_DEVICE","error_msg":"x"}"#;
        assert!(matches!(classify(403, unknown), Outcome::Transient(_)));
        let nb =
            r#"{"error_code":"KOOAGENT.USAGE.NOT_BOUND","error_msg":"inst","metering_sn":"a"}"#;
        match classify(403, nb) {
            Outcome::Refused { sn, reason } => {
                assert_eq!(sn.as_deref(), Some("a"));
                assert!(reason.contains("NOT_BOUND"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
    }
}
