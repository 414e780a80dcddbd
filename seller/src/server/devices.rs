//! The device registry and the agents' license/status fetches (docs/seller-server.md
//! "Security"). A fetch is signed with the device key (the relay protocol's headers, over
//! `GET` and the path with its query) and says the device code in the query
//! (`?device_code=`). The first signed fetch of a license this server issued for that
//! device code binds the key to the code (trust on first use); from then on only that key
//! is served for that code, until the seller releases it (`kooagent seller device
//! release`). Fetches that find nothing for the caller are misses, and misses are
//! rate-limited per key, per source address and in total (token buckets in the database).

use super::db::{DbError, DeviceRow, Tx};
use super::limits::{self, LimitsConfig};

/// `error_code`s of the fetch answers (JSON bodies, like the relay's).
pub const ERR_UNAUTHENTICATED: &str = "KOOAGENT.DEVICE.0401";
pub const ERR_BOUND: &str = "KOOAGENT.DEVICE.0403";
pub const ERR_NOT_FOUND: &str = "KOOAGENT.DEVICE.0404";
pub const ERR_LIMITED: &str = "KOOAGENT.DEVICE.0429";
/// The query parameter carrying the device code.
pub const DEVICE_CODE_PARAM: &str = "device_code";

/// One authenticated fetch.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub license_id: String,
    /// The status token instead of the license.
    pub status: bool,
    /// Canonical device code the agent says it is (None: it said none).
    pub device_code: Option<String>,
    pub key: String,
    pub nonce: String,
    /// Bucket name of the source address (`limits::address_key`).
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The license or token text.
    Serve(String),
    /// Nothing for this caller (charged to the miss buckets).
    NotFound(String),
    /// The device code is bound to another key.
    Bound(String),
    /// Over a miss limit: the bucket's name.
    Limited(String),
    Replay,
}

/// The device code from a request's query (`device_code=...`), canonical; Err: present
/// but not a device code.
pub fn code_from_query(query: Option<&str>) -> Result<Option<String>, String> {
    let Some(q) = query else { return Ok(None) };
    for (k, v) in url_pairs(q) {
        if k == DEVICE_CODE_PARAM {
            return kooagent_core::device_code::parse_code(&v)
                .map(Some)
                .map_err(|e| format!("{DEVICE_CODE_PARAM}: {e}"));
        }
    }
    Ok(None)
}

fn url_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k.to_string(), v.replace('+', " ").replace("%2D", "-"))
    })
}

fn miss_buckets(f: &Fetch, limits: &LimitsConfig) -> Vec<(String, limits::Rate)> {
    vec![
        (format!("miss:key:{}", f.key), limits.miss_per_key),
        (format!("miss:addr:{}", f.address), limits.miss_per_address),
        ("miss:all".to_string(), limits.miss_global),
    ]
}

/// A miss: charged, and answered `not_found` while the buckets hold tokens, `Limited`
/// after (so existence is never learned faster than the limit).
fn miss(
    tx: &mut dyn Tx,
    f: &Fetch,
    limits: &LimitsConfig,
    now_ms: i64,
    answer: Answer,
) -> Result<Answer, DbError> {
    match limits::take_all(tx, &miss_buckets(f, limits), now_ms)? {
        None => Ok(answer),
        Some(bucket) => Ok(Answer::Limited(bucket)),
    }
}

/// Decides one fetch, inside a transaction.
pub fn fetch(
    tx: &mut dyn Tx,
    f: &Fetch,
    limits: &LimitsConfig,
    now_ms: i64,
) -> Result<Answer, DbError> {
    if !tx.nonce_fresh(&format!("device:{}", f.nonce), now_ms.div_euclid(1000))? {
        return Ok(Answer::Replay);
    }
    let not_found = || Answer::NotFound(format!("no license {} for this device", f.license_id));
    let Some(inst) = tx.instance_by_license(&f.license_id)? else {
        return miss(tx, f, limits, now_ms, not_found());
    };
    if !inst.devices.is_empty() {
        // A license bound to device codes is served only to the key bound to one of them.
        let Some(code) = f.device_code.as_ref().filter(|c| inst.devices.contains(c)) else {
            return miss(tx, f, limits, now_ms, not_found());
        };
        let now = now_ms.div_euclid(1000);
        match tx.device_by_code(code)? {
            Some(d) if d.device_key == f.key => {
                if now - d.last_seen >= 60 {
                    tx.put_device(&DeviceRow {
                        last_seen: now,
                        ..d
                    })?;
                }
            }
            Some(_) => {
                let m = format!(
                    "device code {code} is bound to another device key; the seller can release \
                     it (kooagent seller device release {code})"
                );
                return miss(tx, f, limits, now_ms, Answer::Bound(m));
            }
            None => {
                tx.put_device(&DeviceRow {
                    device_code: code.clone(),
                    device_key: f.key.clone(),
                    first_seen: now,
                    last_seen: now,
                })?;
                log::info!("device code {code} bound to device key {}", f.key);
            }
        }
    }
    if f.status {
        return Ok(match tx.latest_token(&f.license_id)? {
            Some(t) => Answer::Serve(t.token),
            None => Answer::NotFound("no status token for this license".into()),
        });
    }
    Ok(Answer::Serve(inst.license))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::{self, Db, InstanceRow, InstanceStatus};

    const CODE: &str = "ABCD-EFGH-JKMN-PQRS-TVW1";

    fn inst(id: &str, devices: &[&str]) -> InstanceRow {
        InstanceRow {
            instance_id: id.into(),
            product: "sku".into(),
            license_id: format!("kg-{id}"),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            not_before: 0,
            not_after: None,
            status: InstanceStatus::Active,
            frozen: false,
            license: format!("kl1.{id}"),
            seq: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn first_signed_fetch_binds_and_other_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in db::tests::backends(dir.path()) {
            let db = Db::start(b);
            db.run_blocking(|tx| {
                tx.put_instance(&inst("i1", &[CODE]))?;
                tx.put_instance(&inst("i2", &[CODE, "OTHER"]))?;
                tx.put_instance(&inst("i3", &["OTHER"]))
            })
            .unwrap();
            let limits = LimitsConfig {
                miss_per_key: limits::Rate::new(2, 1),
                ..LimitsConfig::default()
            };
            let n = std::sync::atomic::AtomicU32::new(0);
            let ask = |id: &str, key: &str, code: Option<&str>| {
                let f = Fetch {
                    license_id: id.into(),
                    status: false,
                    device_code: code.map(str::to_string),
                    key: key.into(),
                    nonce: format!("n{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                    address: "127.0.0.1".into(),
                };
                let l = limits.clone();
                db.run_blocking(move |tx| fetch(tx, &f, &l, 1_000_000))
                    .unwrap()
            };
            assert_eq!(
                ask("kg-i1", "K1", Some(CODE)),
                Answer::Serve("kl1.i1".into())
            );
            let d = db.run_blocking(|tx| tx.device("K1")).unwrap().unwrap();
            assert_eq!(
                (d.device_code.as_str(), d.first_seen),
                (CODE, 1000),
                "{name}"
            );
            let got: Vec<String> = db
                .run_blocking(|tx| tx.instances_for_device("K1"))
                .unwrap()
                .into_iter()
                .map(|i| i.instance_id)
                .collect();
            assert_eq!(got, ["i1", "i2"], "{name}");
            assert!(db.run_blocking(|tx| tx.device("K2")).unwrap().is_none());
            // Another key for the same code: refused, charged as a miss.
            assert!(
                matches!(ask("kg-i1", "K2", Some(CODE)), Answer::Bound(m) if m.contains("release"))
            );
            // Not this device's license, or no code said: a miss, like an unknown id.
            assert!(matches!(
                ask("kg-i3", "K2", Some(CODE)),
                Answer::NotFound(_)
            ));
            assert!(matches!(ask("kg-i1", "K2", None), Answer::Limited(b) if b == "miss:key:K2"));
            assert!(matches!(ask("kg-nope", "K2", None), Answer::Limited(_)));
            // The bound key is still served; the seller releases the code, a new key binds.
            assert_eq!(
                ask("kg-i2", "K1", Some(CODE)),
                Answer::Serve("kl1.i2".into())
            );
            assert!(db.run_blocking(|tx| tx.release_device(CODE)).unwrap());
            assert_eq!(
                ask("kg-i1", "K3", Some(CODE)),
                Answer::Serve("kl1.i1".into())
            );
            assert!(db
                .run_blocking(|tx| tx.instances_for_device("K1"))
                .unwrap()
                .is_empty());
        }
    }

    #[test]
    fn the_device_code_comes_from_the_query() {
        assert_eq!(code_from_query(None), Ok(None));
        assert_eq!(code_from_query(Some("x=1")), Ok(None));
        let code = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
            .chars()
            .map(|c| format!("ABCD-EFGH-JKMN-PQRS-TVW{c}"))
            .find(|c| kooagent_core::device_code::parse_code(c).is_ok())
            .unwrap();
        let q = format!("a=b&device_code={}", code.to_lowercase());
        assert_eq!(code_from_query(Some(&q)), Ok(Some(code)));
        assert!(code_from_query(Some("device_code=nope")).is_err());
    }
}
