//! The usage relay's outbox (issue 19): hourly records a device handed to this server,
//! keyed by `metering_sn`, until the marketplace's usage-data API accepted or refused
//! them. A row is written once, in the transaction that answers the device, and then only
//! changes state: `pending` → `delivered` or `parked` (with the reason). A device's resend
//! is answered from the row, so a record is accepted once however often it is sent.
//!
//! Both backends implement [`UsageOutbox`]; it is reached through `Tx::usage`.

use super::DbError;
use kooagent_core::usage::hours::{HourRecord, Key};

/// Created by both backends after the main schema (types both accept; times in Unix
/// seconds except `next_at`, Unix milliseconds, so test backoffs can be short).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_outbox (
    metering_sn  TEXT PRIMARY KEY,
    instance_id  TEXT NOT NULL,
    meter        TEXT NOT NULL,
    pkg          TEXT,
    begin_time   BIGINT NOT NULL,
    record_time  BIGINT NOT NULL,
    usage_value  TEXT NOT NULL,
    device_key   TEXT NOT NULL,
    state        TEXT NOT NULL,
    reason       TEXT,
    upstream     TEXT,
    http         BIGINT,
    accepted_at  BIGINT NOT NULL,
    done_at      BIGINT,
    attempts     BIGINT NOT NULL,
    next_at      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_outbox_due ON usage_outbox (state, next_at);
";

/// Where a relayed record stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxState {
    /// Durably accepted; not yet accepted by the marketplace.
    Pending,
    Delivered {
        at: i64,
        upstream: String,
        http: u16,
    },
    /// Refused by the marketplace for a reason retrying will not fix.
    Parked { at: i64, reason: String },
}

impl OutboxState {
    pub fn name(&self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Delivered { .. } => "delivered",
            OutboxState::Parked { .. } => "parked",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub rec: HourRecord,
    /// The device key (base64) that handed the record over.
    pub device_key: String,
    pub state: OutboxState,
    pub accepted_at: i64,
}

/// Counts per state, for status and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub delivered: i64,
    pub parked: i64,
}

pub trait UsageOutbox {
    /// Instance id → product of every instance whose issued license is bound to a device
    /// code bound to `device_key`: what a record from that device may bill. Only these two
    /// columns: the relay asks once per request, and a whole `InstanceRow` carries the
    /// license text (kilobytes) and the device list to parse.
    fn usage_billable(&mut self, device_key: &str) -> Result<Vec<(String, String)>, DbError>;
    /// The rows of those of `sns` that exist.
    fn usage_get(&mut self, sns: &[&str]) -> Result<Vec<OutboxRow>, DbError>;
    /// Inserts `recs` as pending rows handed over by `device_key`, due at `next_at` (ms),
    /// skipping each whose `metering_sn` is already held: per record, whether it was
    /// inserted. One pass and no lookup first: a fresh record (the common case) costs
    /// its insert only, and a concurrent replica's insert of the same record is not a
    /// conflict to retry.
    fn usage_insert_new(
        &mut self,
        recs: &[HourRecord],
        device_key: &str,
        accepted_at: i64,
        next_at: i64,
    ) -> Result<Vec<bool>, DbError>;
    /// Deletes pending rows among `sns` (a request's own inserts, undone when a later
    /// record of the same request is refused).
    fn usage_forget(&mut self, sns: &[&str]) -> Result<(), DbError>;
    /// Up to `limit` pending rows due at `now_ms`, oldest hour first, and makes them due
    /// again only at `lease_until` (ms): another worker (a replica) does not take them
    /// meanwhile, and a worker killed mid-delivery has them sent again after the lease.
    fn usage_claim(
        &mut self,
        limit: usize,
        now_ms: i64,
        lease_until: i64,
    ) -> Result<Vec<HourRecord>, DbError>;
    /// Pending rows among `sns` become due at `next_at` (ms); counts an attempt.
    fn usage_retry_at(&mut self, sns: &[String], next_at: i64) -> Result<(), DbError>;
    /// Pending rows among `sns` are now in `state` (delivered or parked).
    fn usage_finish(&mut self, sns: &[String], state: &OutboxState) -> Result<(), DbError>;
    fn usage_counts(&mut self) -> Result<OutboxCounts, DbError>;
    /// Parked rows, newest first, for the seller.
    fn usage_parked(&mut self, limit: usize) -> Result<Vec<OutboxRow>, DbError>;
    /// The earliest `next_at` of a pending row (when the worker should look again).
    fn usage_next_due(&mut self) -> Result<Option<i64>, DbError>;
    /// Forgets delivered rows of hours starting before `before` (records that old are
    /// refused anyway, so no resend can need them); parked rows stay for the seller.
    fn usage_prune(&mut self, before: i64) -> Result<u64, DbError>;
}

/// Reassembles a row from its columns (both backends read the same ones).
#[allow(clippy::too_many_arguments)]
pub(super) fn row_from(
    sn: String,
    instance: String,
    meter: String,
    pkg: Option<String>,
    begin: i64,
    record_time: i64,
    usage_value: String,
    device_key: String,
    state: String,
    reason: Option<String>,
    upstream: Option<String>,
    http: Option<i64>,
    accepted_at: i64,
    done_at: Option<i64>,
) -> Result<OutboxRow, DbError> {
    let at = done_at.unwrap_or(accepted_at);
    let state = match state.as_str() {
        "pending" => OutboxState::Pending,
        "delivered" => OutboxState::Delivered {
            at,
            upstream: upstream.unwrap_or_default(),
            http: http.unwrap_or(200) as u16,
        },
        "parked" => OutboxState::Parked {
            at,
            reason: reason.unwrap_or_default(),
        },
        other => {
            return Err(DbError::Backend(format!(
                "usage_outbox.state {other:?} unknown"
            )))
        }
    };
    Ok(OutboxRow {
        rec: HourRecord {
            sn,
            key: Key {
                instance,
                meter,
                pkg,
            },
            begin,
            record_time,
            usage_value,
        },
        device_key,
        state,
        accepted_at,
    })
}

/// The columns [`row_from`] takes, in its order.
pub(super) const COLS: &str = "metering_sn, instance_id, meter, pkg, begin_time, record_time, \
     usage_value, device_key, state, reason, upstream, http, accepted_at, done_at";

/// `(state, reason, upstream, http, done_at)` columns of a finished state.
pub(super) fn finish_cols(
    s: &OutboxState,
) -> (&'static str, Option<&str>, Option<&str>, Option<i64>, i64) {
    match s {
        OutboxState::Pending => ("pending", None, None, None, 0),
        OutboxState::Delivered { at, upstream, http } => (
            "delivered",
            None,
            Some(upstream.as_str()),
            Some(*http as i64),
            *at,
        ),
        OutboxState::Parked { at, reason } => ("parked", Some(reason.as_str()), None, None, *at),
    }
}

/// [`UsageOutbox::usage_billable`]: index lookups (devices by key, links by code,
/// instances by id).
const BILLABLE_SQLITE: &str = "SELECT i.instance_id, i.product FROM devices d \
     JOIN instance_devices l ON l.device_code = d.device_code \
     JOIN instances i ON i.instance_id = l.instance_id WHERE d.device_key = ?1";

mod sqlite_impl {
    use rusqlite::{params, OptionalExtension};

    use super::*;
    use crate::server::db::sqlite::Sqlite;

    fn err(e: rusqlite::Error) -> DbError {
        DbError::Backend(e.to_string())
    }

    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<OutboxRow, DbError>> {
        Ok(row_from(
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
            r.get(11)?,
            r.get(12)?,
            r.get(13)?,
        ))
    }

    impl UsageOutbox for Sqlite {
        fn usage_billable(&mut self, device_key: &str) -> Result<Vec<(String, String)>, DbError> {
            let mut st = self.conn.prepare_cached(BILLABLE_SQLITE).map_err(err)?;
            let it = st
                .query_map(params![device_key], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?;
            it.collect::<Result<_, _>>().map_err(err)
        }

        fn usage_get(&mut self, sns: &[&str]) -> Result<Vec<OutboxRow>, DbError> {
            let mut st = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLS} FROM usage_outbox WHERE metering_sn = ?1"
                ))
                .map_err(err)?;
            let mut out = Vec::new();
            for sn in sns {
                if let Some(r) = st.query_row(params![sn], read).optional().map_err(err)? {
                    out.push(r?);
                }
            }
            Ok(out)
        }

        fn usage_insert_new(
            &mut self,
            recs: &[HourRecord],
            device_key: &str,
            accepted_at: i64,
            next_at: i64,
        ) -> Result<Vec<bool>, DbError> {
            let mut st = self
                .conn
                .prepare_cached(
                    "INSERT INTO usage_outbox (metering_sn, instance_id, meter, pkg, begin_time, \
                     record_time, usage_value, device_key, state, accepted_at, attempts, next_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, 0, ?10) \
                     ON CONFLICT (metering_sn) DO NOTHING",
                )
                .map_err(err)?;
            let mut out = Vec::with_capacity(recs.len());
            for r in recs {
                let n = st
                    .execute(params![
                        r.sn,
                        r.key.instance,
                        r.key.meter,
                        r.key.pkg,
                        r.begin,
                        r.record_time,
                        r.usage_value,
                        device_key,
                        accepted_at,
                        next_at
                    ])
                    .map_err(err)?;
                out.push(n == 1);
            }
            Ok(out)
        }

        fn usage_forget(&mut self, sns: &[&str]) -> Result<(), DbError> {
            let mut st = self
                .conn
                .prepare_cached(
                    "DELETE FROM usage_outbox WHERE metering_sn = ?1 AND state = 'pending'",
                )
                .map_err(err)?;
            for sn in sns {
                st.execute(params![sn]).map_err(err)?;
            }
            Ok(())
        }

        fn usage_claim(
            &mut self,
            limit: usize,
            now_ms: i64,
            lease_until: i64,
        ) -> Result<Vec<HourRecord>, DbError> {
            let rows = {
                let mut st = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {COLS} FROM usage_outbox WHERE state = 'pending' AND next_at <= ?1 \
                         ORDER BY begin_time, metering_sn LIMIT ?2"
                    ))
                    .map_err(err)?;
                let it = st
                    .query_map(params![now_ms, limit as i64], read)
                    .map_err(err)?;
                let mut v = Vec::new();
                for r in it {
                    v.push(r.map_err(err)??.rec);
                }
                v
            };
            let mut up = self
                .conn
                .prepare_cached("UPDATE usage_outbox SET next_at = ?2 WHERE metering_sn = ?1")
                .map_err(err)?;
            for r in &rows {
                up.execute(params![r.sn, lease_until]).map_err(err)?;
            }
            Ok(rows)
        }

        fn usage_retry_at(&mut self, sns: &[String], next_at: i64) -> Result<(), DbError> {
            let mut st = self
                .conn
                .prepare_cached(
                    "UPDATE usage_outbox SET next_at = ?2, attempts = attempts + 1 \
                     WHERE metering_sn = ?1 AND state = 'pending'",
                )
                .map_err(err)?;
            for sn in sns {
                st.execute(params![sn, next_at]).map_err(err)?;
            }
            Ok(())
        }

        fn usage_finish(&mut self, sns: &[String], state: &OutboxState) -> Result<(), DbError> {
            let (name, reason, upstream, http, at) = finish_cols(state);
            let mut st = self
                .conn
                .prepare_cached(
                    "UPDATE usage_outbox SET state = ?2, reason = ?3, upstream = ?4, http = ?5, \
                     done_at = ?6, attempts = attempts + 1 \
                     WHERE metering_sn = ?1 AND state = 'pending'",
                )
                .map_err(err)?;
            for sn in sns {
                st.execute(params![sn, name, reason, upstream, http, at])
                    .map_err(err)?;
            }
            Ok(())
        }

        fn usage_counts(&mut self) -> Result<OutboxCounts, DbError> {
            let mut c = OutboxCounts::default();
            let mut st = self
                .conn
                .prepare_cached("SELECT state, COUNT(*) FROM usage_outbox GROUP BY state")
                .map_err(err)?;
            let it = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(err)?;
            for r in it {
                let (s, n) = r.map_err(err)?;
                match s.as_str() {
                    "pending" => c.pending = n,
                    "delivered" => c.delivered = n,
                    "parked" => c.parked = n,
                    _ => {}
                }
            }
            Ok(c)
        }

        fn usage_parked(&mut self, limit: usize) -> Result<Vec<OutboxRow>, DbError> {
            let mut st = self
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLS} FROM usage_outbox WHERE state = 'parked' \
                     ORDER BY done_at DESC, metering_sn LIMIT ?1"
                ))
                .map_err(err)?;
            let it = st.query_map(params![limit as i64], read).map_err(err)?;
            let mut v = Vec::new();
            for r in it {
                v.push(r.map_err(err)??);
            }
            Ok(v)
        }

        fn usage_prune(&mut self, before: i64) -> Result<u64, DbError> {
            let n = self
                .conn
                .execute(
                    "DELETE FROM usage_outbox WHERE state = 'delivered' AND begin_time < ?1",
                    params![before],
                )
                .map_err(err)?;
            Ok(n as u64)
        }

        fn usage_next_due(&mut self) -> Result<Option<i64>, DbError> {
            self.conn
                .query_row(
                    "SELECT MIN(next_at) FROM usage_outbox WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)
        }
    }
}

mod postgres_impl {
    use postgres::Row;

    use super::*;
    use crate::server::db::postgres::{err, Postgres};

    fn read(r: &Row) -> Result<OutboxRow, DbError> {
        row_from(
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
            r.get(7),
            r.get(8),
            r.get(9),
            r.get(10),
            r.get(11),
            r.get(12),
            r.get(13),
        )
    }

    impl UsageOutbox for Postgres {
        fn usage_billable(&mut self, device_key: &str) -> Result<Vec<(String, String)>, DbError> {
            let sql = BILLABLE_SQLITE.replace("?1", "$1");
            let rows = self.client.query(&sql, &[&device_key]).map_err(err)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        }

        fn usage_get(&mut self, sns: &[&str]) -> Result<Vec<OutboxRow>, DbError> {
            let sql = format!("SELECT {COLS} FROM usage_outbox WHERE metering_sn = ANY($1)");
            let rows = self.client.query(&sql, &[&sns]).map_err(err)?;
            rows.iter().map(read).collect()
        }

        fn usage_insert_new(
            &mut self,
            recs: &[HourRecord],
            device_key: &str,
            accepted_at: i64,
            next_at: i64,
        ) -> Result<Vec<bool>, DbError> {
            // One statement for the whole batch: a round trip per record would cost more
            // than the insert.
            let sn: Vec<&str> = recs.iter().map(|r| r.sn.as_str()).collect();
            let inst: Vec<&str> = recs.iter().map(|r| r.key.instance.as_str()).collect();
            let meter: Vec<&str> = recs.iter().map(|r| r.key.meter.as_str()).collect();
            let pkg: Vec<Option<&str>> = recs.iter().map(|r| r.key.pkg.as_deref()).collect();
            let begin: Vec<i64> = recs.iter().map(|r| r.begin).collect();
            let rt: Vec<i64> = recs.iter().map(|r| r.record_time).collect();
            let val: Vec<&str> = recs.iter().map(|r| r.usage_value.as_str()).collect();
            let rows = self
                .client
                .query(
                    "INSERT INTO usage_outbox (metering_sn, instance_id, meter, pkg, begin_time, \
                     record_time, usage_value, device_key, state, accepted_at, attempts, next_at) \
                     SELECT a, b, c, d, e, f, g, $8, 'pending', $9, 0, $10 FROM \
                     UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                     $6::bigint[], $7::text[]) AS t(a, b, c, d, e, f, g) \
                     ON CONFLICT (metering_sn) DO NOTHING RETURNING metering_sn",
                    &[
                        &sn,
                        &inst,
                        &meter,
                        &pkg,
                        &begin,
                        &rt,
                        &val,
                        &device_key,
                        &accepted_at,
                        &next_at,
                    ],
                )
                .map_err(err)?;
            let new: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
            Ok(recs.iter().map(|r| new.contains(&r.sn)).collect())
        }

        fn usage_forget(&mut self, sns: &[&str]) -> Result<(), DbError> {
            self.client
                .execute(
                    "DELETE FROM usage_outbox WHERE metering_sn = ANY($1) AND state = 'pending'",
                    &[&sns],
                )
                .map_err(err)?;
            Ok(())
        }

        fn usage_claim(
            &mut self,
            limit: usize,
            now_ms: i64,
            lease_until: i64,
        ) -> Result<Vec<HourRecord>, DbError> {
            let sql = format!(
                "UPDATE usage_outbox SET next_at = $3 WHERE metering_sn IN (\
                 SELECT metering_sn FROM usage_outbox WHERE state = 'pending' AND next_at <= $1 \
                 ORDER BY begin_time, metering_sn LIMIT $2) RETURNING {COLS}"
            );
            let rows = self
                .client
                .query(&sql, &[&now_ms, &(limit as i64), &lease_until])
                .map_err(err)?;
            let mut v: Vec<HourRecord> = rows
                .iter()
                .map(|r| read(r).map(|o| o.rec))
                .collect::<Result<_, _>>()?;
            v.sort_by(|a, b| (a.begin, &a.sn).cmp(&(b.begin, &b.sn)));
            Ok(v)
        }

        fn usage_retry_at(&mut self, sns: &[String], next_at: i64) -> Result<(), DbError> {
            self.client
                .execute(
                    "UPDATE usage_outbox SET next_at = $2, attempts = attempts + 1 \
                     WHERE metering_sn = ANY($1) AND state = 'pending'",
                    &[&sns, &next_at],
                )
                .map_err(err)?;
            Ok(())
        }

        fn usage_finish(&mut self, sns: &[String], state: &OutboxState) -> Result<(), DbError> {
            let (name, reason, upstream, http, at) = finish_cols(state);
            self.client
                .execute(
                    "UPDATE usage_outbox SET state = $2, reason = $3, upstream = $4, http = $5, \
                     done_at = $6, attempts = attempts + 1 \
                     WHERE metering_sn = ANY($1) AND state = 'pending'",
                    &[&sns, &name, &reason, &upstream, &http, &at],
                )
                .map_err(err)?;
            Ok(())
        }

        fn usage_counts(&mut self) -> Result<OutboxCounts, DbError> {
            let mut c = OutboxCounts::default();
            for r in self
                .client
                .query(
                    "SELECT state, COUNT(*) FROM usage_outbox GROUP BY state",
                    &[],
                )
                .map_err(err)?
            {
                let (s, n): (String, i64) = (r.get(0), r.get(1));
                match s.as_str() {
                    "pending" => c.pending = n,
                    "delivered" => c.delivered = n,
                    "parked" => c.parked = n,
                    _ => {}
                }
            }
            Ok(c)
        }

        fn usage_parked(&mut self, limit: usize) -> Result<Vec<OutboxRow>, DbError> {
            let sql = format!(
                "SELECT {COLS} FROM usage_outbox WHERE state = 'parked' \
                 ORDER BY done_at DESC, metering_sn LIMIT $1"
            );
            let rows = self.client.query(&sql, &[&(limit as i64)]).map_err(err)?;
            rows.iter().map(read).collect()
        }

        fn usage_prune(&mut self, before: i64) -> Result<u64, DbError> {
            self.client
                .execute(
                    "DELETE FROM usage_outbox WHERE state = 'delivered' AND begin_time < $1",
                    &[&before],
                )
                .map_err(err)
        }

        fn usage_next_due(&mut self) -> Result<Option<i64>, DbError> {
            let r = self
                .client
                .query_one(
                    "SELECT MIN(next_at) FROM usage_outbox WHERE state = 'pending'",
                    &[],
                )
                .map_err(err)?;
            Ok(r.get(0))
        }
    }
}
