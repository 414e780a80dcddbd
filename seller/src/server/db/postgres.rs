//! The PostgreSQL backend, for sellers running several server replicas behind a load
//! balancer. Every batch runs REPEATABLE READ (snapshot isolation, first updater wins):
//! every rule the server keeps across requests is a row both writers write or a unique
//! key both insert (the `eventId` answer, the instance and its sequence number, a token's
//! `(license_id, seq)`, a nonce, a device code's binding, a bucket, an enrollment's
//! count), and PostgreSQL refuses the second writer of such a row or key; the database
//! thread runs that request again and it then sees the winner. SERIALIZABLE would add
//! predicate locks, which on these small, insert-heavy indexes lock whole pages: with
//! three replicas, unrelated orders inserting into the same index page kept failing each
//! other (issue 16), so it is not used.
//!
//! The connection is plain TCP or a Unix socket (`host=/run/postgresql`): put the
//! database on the same host or a private network, or in front of it a TLS tunnel.

use postgres::error::SqlState;
use postgres::{Client, NoTls, Row};

use super::{
    Backend, BucketRow, CallsBy, CodeActivityRow, CodeRow, DbError, DeviceRow, EnrollmentRow,
    EventRow, InstanceRow, InstanceStatus, TokenRow, Tx, UploadRow, EVENT_SELECT, INSTANCE_COLS,
    INSTANCE_SELECT,
};

/// A row of [`EVENT_SELECT`], its answer rebuilt when it references its license.
fn event_row(r: &Row) -> Result<EventRow, DbError> {
    let license = match (r.get(12), r.get(13)) {
        (Some(id), Some(text)) => Some((id, text)),
        _ => None,
    };
    let mut row = EventRow {
        event_id: r.get(0),
        activity: r.get(1),
        digest: r.get(2),
        response: r.get(3),
        created_at: r.get(4),
        instance_id: r.get(5),
        order_id: r.get(6),
        customer_id: r.get(7),
        result_code: r.get(8),
        retries: r.get(9),
        last_at: r.get(10),
        license_sha256: r.get(11),
    };
    super::stored_response(&mut row, license)?;
    Ok(row)
}

pub struct Postgres {
    pub(super) client: Client,
}

/// Conflicts with another replica's transaction are retried. A unique violation counts:
/// two replicas both read "no token #1 yet" and both insert it; PostgreSQL reports that as
/// a unique violation rather than a serialization failure when the key itself was not
/// read first. A real duplicate (a bug) still fails once the retries run out.
pub(super) fn err(e: postgres::Error) -> DbError {
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::UNIQUE_VIOLATION =>
        {
            DbError::Retry
        }
        _ => DbError::Backend(match e.as_db_error() {
            Some(d) => format!("PostgreSQL {}: {}", d.code().code(), d.message()),
            None => e.to_string(),
        }),
    }
}

/// A schema name we put in SQL unquoted-safe: lower-case letters, digits, `_`.
pub fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Columns added since the first schema, for databases made by an older version.
const MIGRATIONS: &str = "ALTER TABLE codes ADD COLUMN IF NOT EXISTS device_key TEXT; \
                          CREATE INDEX IF NOT EXISTS codes_by_key ON codes (device_key); \
                          ALTER TABLE instances ADD COLUMN IF NOT EXISTS license_sha256 TEXT;";

impl Postgres {
    /// Connects (a libpq-style URL or key=value string) and creates the tables in
    /// `schema` if missing.
    pub fn connect(url: &str, schema: &str) -> Result<Postgres, DbError> {
        if !valid_schema(schema) {
            return Err(DbError::Backend(format!(
                "schema {schema:?}: use lower-case letters, digits and _"
            )));
        }
        let mut client = Client::connect(url, NoTls)
            .map_err(|e| DbError::Backend(format!("connecting to PostgreSQL: {e}")))?;
        // Replicas starting together: one creates the tables, the others wait for it. (On
        // an error the connection is dropped, which releases the lock.)
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock(7265001); \
                 CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}; {}; \
                 {MIGRATIONS} {} {}",
                super::SCHEMA.trim().trim_end_matches(';'),
                super::DROPPED_INDEXES,
                super::usage::SCHEMA.trim()
            ))
            .map_err(err)?;
        let columns: String = super::EVENT_HISTORY_COLUMNS
            .iter()
            .map(|(name, ty)| format!("ALTER TABLE events ADD COLUMN IF NOT EXISTS {name} {ty}; "))
            .collect();
        client
            .batch_execute(&format!("{columns}{}", super::EVENT_INDEXES))
            .map_err(err)?;
        link_table(&mut client)?;
        client
            .batch_execute("SELECT pg_advisory_unlock(7265001)")
            .map_err(err)?;
        Ok(Postgres { client })
    }

    fn opt(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<Row>, DbError> {
        self.client.query_opt(sql, p).map_err(err)
    }

    /// Makes the links of `instance_id` exactly `devices` (inside the caller's
    /// transaction); an unchanged list (a freeze, a refresh) writes nothing.
    fn link_devices(&mut self, instance_id: &str, devices: &[String]) -> Result<(), DbError> {
        let have: Vec<String> = self
            .client
            .query(
                "SELECT device_code FROM instance_devices WHERE instance_id = $1",
                &[&instance_id],
            )
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for gone in have.iter().filter(|h| !devices.contains(h)) {
            self.exec(
                "DELETE FROM instance_devices WHERE device_code = $1 AND instance_id = $2",
                &[gone, &instance_id],
            )?;
        }
        self.link_new_devices(instance_id, devices.iter().filter(|d| !have.contains(d)))
    }

    /// Adds links of `instance_id` it does not have yet (all of them for an instance just
    /// inserted).
    fn link_new_devices<'a>(
        &mut self,
        instance_id: &str,
        devices: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), DbError> {
        for code in devices {
            self.exec(
                "INSERT INTO instance_devices (device_code, instance_id) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[code, &instance_id],
            )?;
        }
        Ok(())
    }

    /// The instances whose id `ids` selects (a query with one parameter, `$1`), by id.
    fn instances_where(&mut self, ids: &str, arg: &str) -> Result<Vec<InstanceRow>, DbError> {
        self.client
            .query(
                &format!("{INSTANCE_SELECT} WHERE i.instance_id IN ({ids}) ORDER BY i.instance_id"),
                &[&arg],
            )
            .map_err(err)?
            .into_iter()
            .map(|r| instance_row(Some(r)).map(|i| i.expect("a row")))
            .collect()
    }

    fn exec(
        &mut self,
        sql: &str,
        p: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, DbError> {
        self.client.execute(sql, p).map_err(err)
    }
}

/// Creates the device code → instance links ([`super::LINK_SCHEMA`]) if missing and fills
/// them from every instance's `devices` list, in one transaction (the caller holds the
/// schema lock, so replicas starting together do it once).
fn link_table(client: &mut Client) -> Result<(), DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('instance_devices') IS NOT NULL", &[])
        .map_err(err)?
        .get(0);
    if exists {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(err)?;
    tx.batch_execute(super::LINK_SCHEMA).map_err(err)?;
    let n = tx
        .execute(
            "INSERT INTO instance_devices (device_code, instance_id) \
             SELECT DISTINCT d.code, i.instance_id FROM instances i, \
             jsonb_array_elements_text(i.devices::jsonb) AS d(code) ON CONFLICT DO NOTHING",
            &[],
        )
        .map_err(err)?;
    tx.commit().map_err(err)?;
    log::info!("database: added instance_devices ({n} device links from instances.devices)");
    Ok(())
}

impl Backend for Postgres {
    fn begin(&mut self) -> Result<(), DbError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .map_err(err)
    }
    fn savepoint(&mut self) -> Result<(), DbError> {
        self.client.batch_execute("SAVEPOINT job").map_err(err)
    }
    fn release_savepoint(&mut self) -> Result<(), DbError> {
        self.client
            .batch_execute("RELEASE SAVEPOINT job")
            .map_err(err)
    }
    fn rollback_savepoint(&mut self) -> Result<(), DbError> {
        self.client
            .batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job")
            .map_err(err)
    }
    fn commit(&mut self) -> Result<(), DbError> {
        self.client.batch_execute("COMMIT").map_err(err)
    }
    fn rollback(&mut self) {
        if let Err(e) = self.client.batch_execute("ROLLBACK") {
            log::error!("database: rollback: {e}");
        }
    }
    fn tx(&mut self) -> &mut dyn Tx {
        self
    }
}

fn instance_row(r: Option<Row>) -> Result<Option<InstanceRow>, DbError> {
    let Some(r) = r else { return Ok(None) };
    let devices: String = r.get(3);
    let status: String = r.get(6);
    Ok(Some(InstanceRow {
        instance_id: r.get(0),
        product: r.get(1),
        license_id: r.get(2),
        devices: serde_json::from_str(&devices)
            .map_err(|e| DbError::Backend(format!("instances.devices: {e}")))?,
        not_before: r.get(4),
        not_after: r.get(5),
        status: InstanceStatus::parse(&status)?,
        frozen: r.get::<_, i64>(7) != 0,
        license: r.get(8),
        seq: r.get(9),
        updated_at: r.get(10),
    }))
}

impl Tx for Postgres {
    fn nonce_fresh(&mut self, nonce: &str, now: i64) -> Result<bool, DbError> {
        let n = self.exec(
            "INSERT INTO nonces (nonce, seen_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&nonce, &now],
        )?;
        Ok(n == 1)
    }

    fn prune_nonces(&mut self, before: i64) -> Result<u64, DbError> {
        self.exec("DELETE FROM nonces WHERE seen_at < $1", &[&before])
    }

    fn event(&mut self, event_id: &str) -> Result<Option<EventRow>, DbError> {
        self.opt(
            concat!(super::event_select!(), " WHERE e.event_id = $1"),
            &[&event_id],
        )?
        .map(|r| event_row(&r))
        .transpose()
    }

    fn put_event(&mut self, e: &EventRow) -> Result<(), DbError> {
        // By reference: the license's one copy is in `licenses`.
        let response = match e.license_sha256 {
            Some(_) => "",
            None => e.response.as_str(),
        };
        self.exec(
            concat!(
                "INSERT INTO events (",
                super::event_cols!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &e.event_id,
                &e.activity,
                &e.digest,
                &response,
                &e.created_at,
                &e.instance_id,
                &e.order_id,
                &e.customer_id,
                &e.result_code,
                &e.retries,
                &e.last_at,
                &e.license_sha256,
            ],
        )
        .map(drop)
    }

    fn event_resent(&mut self, event_id: &str, now: i64) -> Result<(), DbError> {
        self.exec(
            "UPDATE events SET retries = retries + 1, last_at = $2 WHERE event_id = $1",
            &[&event_id, &now],
        )
        .map(drop)
    }

    fn calls(&mut self, by: CallsBy<'_>, limit: i64) -> Result<Vec<EventRow>, DbError> {
        let (column, value) = match by {
            CallsBy::Instance(v) => ("instance_id", v),
            CallsBy::Order(v) => ("order_id", v),
            CallsBy::Customer(v) => ("customer_id", v),
        };
        self.client
            .query(
                &format!(
                    "{EVENT_SELECT} WHERE e.{column} = $1 \
                     ORDER BY e.created_at DESC, e.event_id DESC LIMIT $2"
                ),
                &[&value, &limit],
            )
            .map_err(err)?
            .iter()
            .map(event_row)
            .collect()
    }

    fn instance(&mut self, instance_id: &str) -> Result<Option<InstanceRow>, DbError> {
        let r = self.opt(
            concat!(super::instance_select!(), " WHERE i.instance_id = $1"),
            &[&instance_id],
        )?;
        instance_row(r)
    }

    fn instance_by_license(&mut self, license_id: &str) -> Result<Option<InstanceRow>, DbError> {
        let r = self.opt(
            concat!(super::instance_select!(), " WHERE i.license_id = $1"),
            &[&license_id],
        )?;
        instance_row(r)
    }

    fn put_instance(&mut self, r: &InstanceRow) -> Result<(), DbError> {
        let devices = serde_json::to_string(&r.devices).expect("strings serialise");
        self.exec(
            &format!(
                "INSERT INTO instances ({INSTANCE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (instance_id) DO UPDATE SET product = excluded.product, \
                 license_id = excluded.license_id, devices = excluded.devices, \
                 not_before = excluded.not_before, not_after = excluded.not_after, \
                 status = excluded.status, frozen = excluded.frozen, license = excluded.license, \
                 seq = excluded.seq, updated_at = excluded.updated_at, license_sha256 = NULL"
            ),
            &[
                &r.instance_id,
                &r.product,
                &r.license_id,
                &devices,
                &r.not_before,
                &r.not_after,
                &r.status.as_str(),
                &(r.frozen as i64),
                &r.license,
                &r.seq,
                &r.updated_at,
            ],
        )?;
        self.link_devices(&r.instance_id, &r.devices)
    }

    fn put_new_instance(&mut self, r: &InstanceRow, license_sha256: &str) -> Result<(), DbError> {
        let devices = serde_json::to_string(&r.devices).expect("strings serialise");
        self.exec(
            concat!(
                "INSERT INTO instances (",
                super::instance_cols!(),
                ", license_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &r.instance_id,
                &r.product,
                &r.license_id,
                &devices,
                &r.not_before,
                &r.not_after,
                &r.status.as_str(),
                &(r.frozen as i64),
                &"",
                &r.seq,
                &r.updated_at,
                &license_sha256,
            ],
        )?;
        self.link_new_devices(&r.instance_id, &r.devices)
    }

    fn record_license(
        &mut self,
        license_id: &str,
        event_id: Option<&str>,
        text: &str,
        issued_at: i64,
    ) -> Result<String, DbError> {
        let sha =
            kooagent_core::license::format::hex(&<sha2::Sha256 as sha2::Digest>::digest(text));
        self.exec(
            "INSERT INTO licenses (sha256, license_id, event_id, issued_at, text) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&sha, &license_id, &event_id, &issued_at, &text],
        )?;
        Ok(sha)
    }

    fn put_token(&mut self, t: &TokenRow) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO tokens (license_id, seq, action, token, issued_at) VALUES ($1, $2, $3, $4, $5)",
            &[&t.license_id, &t.seq, &t.action, &t.token, &t.issued_at],
        )
        .map(drop)
    }

    fn latest_token(&mut self, license_id: &str) -> Result<Option<TokenRow>, DbError> {
        Ok(self
            .opt(
                "SELECT license_id, seq, action, token, issued_at FROM tokens \
                 WHERE license_id = $1 ORDER BY seq DESC LIMIT 1",
                &[&license_id],
            )?
            .map(|r| TokenRow {
                license_id: r.get(0),
                seq: r.get(1),
                action: r.get(2),
                token: r.get(3),
                issued_at: r.get(4),
            }))
    }

    fn code(&mut self, code: &str) -> Result<Option<CodeRow>, DbError> {
        Ok(self
            .opt(
                "SELECT code, status, frozen, expire_at, seq, updated_at, device_key FROM codes WHERE code = $1",
                &[&code],
            )?
            .map(|r| CodeRow {
                code: r.get(0),
                status: r.get(1),
                frozen: r.get::<_, i64>(2) != 0,
                expire_at: r.get(3),
                seq: r.get(4),
                updated_at: r.get(5),
                device_key: r.get(6),
            }))
    }

    fn all_codes(&mut self, limit: i64) -> Result<Vec<CodeRow>, DbError> {
        Ok(self
            .client
            .query(
                "SELECT code, status, frozen, expire_at, seq, updated_at, device_key FROM codes \
                 ORDER BY updated_at DESC, code LIMIT $1",
                &[&limit],
            )
            .map_err(err)?
            .iter()
            .map(|r| CodeRow {
                code: r.get(0),
                status: r.get(1),
                frozen: r.get::<_, i64>(2) != 0,
                expire_at: r.get(3),
                seq: r.get(4),
                updated_at: r.get(5),
                device_key: r.get(6),
            })
            .collect())
    }

    fn code_activity(&mut self, code: &str) -> Result<Option<CodeActivityRow>, DbError> {
        Ok(self
            .opt(
                "SELECT code, query_at, query_status, usage_calls, usage_entries, usage_at, \
                 usage_result FROM code_activity WHERE code = $1",
                &[&code],
            )?
            .map(|r| CodeActivityRow {
                code: r.get(0),
                query_at: r.get(1),
                query_status: r.get(2),
                usage_calls: r.get(3),
                usage_entries: r.get(4),
                usage_at: r.get(5),
                usage_result: r.get(6),
            }))
    }

    fn note_code_query(&mut self, code: &str, at: i64, status: &str) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO code_activity (code, query_at, query_status, usage_calls, usage_entries) \
             VALUES ($1, $2, $3, 0, 0) ON CONFLICT (code) DO UPDATE SET \
             query_at = excluded.query_at, query_status = excluded.query_status",
            &[&code, &at, &status],
        )
        .map(drop)
    }

    fn note_code_usage(
        &mut self,
        code: &str,
        at: i64,
        entries: i64,
        result: &str,
    ) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO code_activity (code, usage_calls, usage_entries, usage_at, usage_result) \
             VALUES ($1, 1, $2, $3, $4) ON CONFLICT (code) DO UPDATE SET \
             usage_calls = code_activity.usage_calls + 1, \
             usage_entries = code_activity.usage_entries + excluded.usage_entries, \
             usage_at = excluded.usage_at, usage_result = excluded.usage_result",
            &[&code, &entries, &at, &result],
        )
        .map(drop)
    }

    fn console_session(
        &mut self,
        id_sha256: &str,
        since: i64,
    ) -> Result<Option<(String, String, i64)>, DbError> {
        Ok(self
            .opt(
                "SELECT csrf, address, created_at FROM console_sessions \
                 WHERE id_sha256 = $1 AND created_at >= $2",
                &[&id_sha256, &since],
            )?
            .map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    fn put_console_session(
        &mut self,
        id_sha256: &str,
        csrf: &str,
        address: &str,
        created_at: i64,
        expired_before: i64,
        max: i64,
    ) -> Result<(), DbError> {
        self.exec(
            "DELETE FROM console_sessions WHERE created_at < $1",
            &[&expired_before],
        )?;
        self.exec(
            "DELETE FROM console_sessions WHERE id_sha256 IN (SELECT id_sha256 FROM \
             console_sessions ORDER BY created_at DESC, id_sha256 OFFSET $1)",
            &[&(max - 1)],
        )?;
        self.exec(
            "INSERT INTO console_sessions (id_sha256, csrf, address, created_at) \
             VALUES ($1, $2, $3, $4)",
            &[&id_sha256, &csrf, &address, &created_at],
        )
        .map(drop)
    }

    fn delete_console_session(&mut self, id_sha256: &str) -> Result<(), DbError> {
        self.exec(
            "DELETE FROM console_sessions WHERE id_sha256 = $1",
            &[&id_sha256],
        )
        .map(drop)
    }

    fn put_code(&mut self, c: &CodeRow) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO codes (code, status, frozen, expire_at, seq, updated_at, device_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (code) DO UPDATE SET \
             status = excluded.status, frozen = excluded.frozen, expire_at = excluded.expire_at, \
             seq = excluded.seq, updated_at = excluded.updated_at, device_key = excluded.device_key",
            &[
                &c.code,
                &c.status,
                &(c.frozen as i64),
                &c.expire_at,
                &c.seq,
                &c.updated_at,
                &c.device_key,
            ],
        )
        .map(drop)
    }

    fn usage(&mut self) -> &mut dyn super::usage::UsageOutbox {
        self
    }
    fn count_licenses(&mut self) -> Result<i64, DbError> {
        Ok(self
            .opt("SELECT COUNT(*) FROM licenses", &[])?
            .map(|r| r.get(0))
            .unwrap_or(0))
    }

    fn put_upload(&mut self, u: &UploadRow) -> Result<(), DbError> {
        self.exec(
            &format!(
                "INSERT INTO uploads ({UPLOAD_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (event_id) DO UPDATE SET instance_id = excluded.instance_id, \
                 license = excluded.license, attempts = excluded.attempts, \
                 next_at = excluded.next_at, done_at = excluded.done_at, \
                 last_error = excluded.last_error, created_at = excluded.created_at"
            ),
            &[
                &u.event_id,
                &u.instance_id,
                &u.license,
                &u.attempts,
                &u.next_at,
                &u.done_at,
                &u.last_error,
                &u.created_at,
            ],
        )
        .map(drop)
    }

    fn upload(&mut self, event_id: &str) -> Result<Option<UploadRow>, DbError> {
        Ok(self
            .opt(
                &format!("SELECT {UPLOAD_COLS} FROM uploads WHERE event_id = $1"),
                &[&event_id],
            )?
            .map(|r| upload_row(&r)))
    }

    fn due_uploads(&mut self, now: i64, limit: i64) -> Result<Vec<UploadRow>, DbError> {
        Ok(self
            .client
            .query(
                &format!(
                    "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NULL AND next_at <= $1 \
                     ORDER BY next_at LIMIT $2"
                ),
                &[&now, &limit],
            )
            .map_err(err)?
            .iter()
            .map(upload_row)
            .collect())
    }

    fn list_uploads(&mut self, done_limit: i64) -> Result<Vec<UploadRow>, DbError> {
        let mut rows: Vec<UploadRow> = self
            .client
            .query(
                &format!(
                    "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NULL \
                     ORDER BY next_at, event_id"
                ),
                &[],
            )
            .map_err(err)?
            .iter()
            .map(upload_row)
            .collect();
        let done = self
            .client
            .query(
                &format!(
                    "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NOT NULL \
                     ORDER BY done_at DESC, event_id LIMIT $1"
                ),
                &[&done_limit],
            )
            .map_err(err)?;
        rows.extend(done.iter().map(upload_row));
        Ok(rows)
    }

    fn count_uploads(&mut self) -> Result<(i64, i64), DbError> {
        Ok(self
            .opt(
                "SELECT COUNT(*) FILTER (WHERE done_at IS NULL), \
                 COUNT(*) FILTER (WHERE done_at IS NOT NULL) FROM uploads",
                &[],
            )?
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, 0)))
    }

    fn device_by_code(&mut self, code: &str) -> Result<Option<DeviceRow>, DbError> {
        Ok(self
            .opt(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices WHERE device_code = $1",
                &[&code],
            )?
            .map(|r| device_row(&r)))
    }

    fn device_codes(&mut self, key: &str) -> Result<Vec<DeviceRow>, DbError> {
        let rows = self
            .client
            .query(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices \
                 WHERE device_key = $1 ORDER BY last_seen DESC, device_code",
                &[&key],
            )
            .map_err(err)?;
        Ok(rows.iter().map(device_row).collect())
    }

    fn all_devices(&mut self) -> Result<Vec<DeviceRow>, DbError> {
        let rows = self
            .client
            .query(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices ORDER BY device_code",
                &[],
            )
            .map_err(err)?;
        Ok(rows.iter().map(device_row).collect())
    }

    fn put_device(&mut self, d: &DeviceRow) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO devices (device_code, device_key, first_seen, last_seen) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (device_code) DO UPDATE SET \
             device_key = excluded.device_key, first_seen = excluded.first_seen, \
             last_seen = excluded.last_seen",
            &[&d.device_code, &d.device_key, &d.first_seen, &d.last_seen],
        )
        .map(drop)
    }

    fn release_device(&mut self, code: &str) -> Result<bool, DbError> {
        Ok(self.exec("DELETE FROM devices WHERE device_code = $1", &[&code])? > 0)
    }

    fn instances_with_device(&mut self, code: &str) -> Result<Vec<InstanceRow>, DbError> {
        self.instances_where(
            "SELECT instance_id FROM instance_devices WHERE device_code = $1",
            code,
        )
    }

    fn instances_for_device(&mut self, key: &str) -> Result<Vec<InstanceRow>, DbError> {
        self.instances_where(
            "SELECT l.instance_id FROM devices d JOIN instance_devices l \
             ON l.device_code = d.device_code WHERE d.device_key = $1",
            key,
        )
    }

    fn key_bound(&mut self, key: &str) -> Result<bool, DbError> {
        Ok(self
            .opt(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE device_key = $1) \
                 OR EXISTS (SELECT 1 FROM codes WHERE device_key = $1)",
                &[&key],
            )?
            .is_some_and(|r| r.get::<_, bool>(0)))
    }

    fn key_enrolled(&mut self, key: &str) -> Result<bool, DbError> {
        Ok(self
            .opt(
                "SELECT EXISTS (SELECT 1 FROM enrolled_keys WHERE device_key = $1)",
                &[&key],
            )?
            .is_some_and(|r| r.get::<_, bool>(0)))
    }

    fn enrollment(&mut self, token_sha256: &str) -> Result<Option<EnrollmentRow>, DbError> {
        Ok(self
            .opt(
                "SELECT token_sha256, label, quota, used, created_at, revoked FROM enrollments \
                 WHERE token_sha256 = $1",
                &[&token_sha256],
            )?
            .map(|r| enrollment_row(&r)))
    }

    fn all_enrollments(&mut self) -> Result<Vec<EnrollmentRow>, DbError> {
        let rows = self
            .client
            .query(
                "SELECT token_sha256, label, quota, used, created_at, revoked FROM enrollments \
                 ORDER BY created_at, label",
                &[],
            )
            .map_err(err)?;
        Ok(rows.iter().map(enrollment_row).collect())
    }

    fn put_enrollment(&mut self, e: &EnrollmentRow) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO enrollments (token_sha256, label, quota, used, created_at, revoked) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token_sha256) DO UPDATE SET \
             label = excluded.label, quota = excluded.quota, used = excluded.used, \
             revoked = excluded.revoked",
            &[
                &e.token_sha256,
                &e.label,
                &e.quota,
                &e.used,
                &e.created_at,
                &(e.revoked as i64),
            ],
        )
        .map(drop)
    }

    fn put_enrolled_key(&mut self, key: &str, token_sha256: &str, at: i64) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO enrolled_keys (device_key, token_sha256, enrolled_at) \
             VALUES ($1, $2, $3) ON CONFLICT (device_key) DO NOTHING",
            &[&key, &token_sha256, &at],
        )
        .map(drop)
    }

    fn bucket(&mut self, name: &str) -> Result<Option<BucketRow>, DbError> {
        Ok(self
            .opt("SELECT level, at_ms FROM buckets WHERE name = $1", &[&name])?
            .map(|r| BucketRow {
                level: r.get(0),
                at_ms: r.get(1),
            }))
    }

    fn put_bucket(&mut self, name: &str, b: BucketRow) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO buckets (name, level, at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET level = excluded.level, at_ms = excluded.at_ms",
            &[&name, &b.level, &b.at_ms],
        )
        .map(drop)
    }

    fn prune_buckets(&mut self, before_ms: i64) -> Result<u64, DbError> {
        self.exec("DELETE FROM buckets WHERE at_ms < $1", &[&before_ms])
    }
}

fn enrollment_row(r: &Row) -> EnrollmentRow {
    EnrollmentRow {
        token_sha256: r.get(0),
        label: r.get(1),
        quota: r.get(2),
        used: r.get(3),
        created_at: r.get(4),
        revoked: r.get::<_, i64>(5) != 0,
    }
}

fn device_row(r: &Row) -> DeviceRow {
    DeviceRow {
        device_code: r.get(0),
        device_key: r.get(1),
        first_seen: r.get(2),
        last_seen: r.get(3),
    }
}

const UPLOAD_COLS: &str =
    "event_id, instance_id, license, attempts, next_at, done_at, last_error, created_at";

fn upload_row(r: &Row) -> UploadRow {
    UploadRow {
        event_id: r.get(0),
        instance_id: r.get(1),
        license: r.get(2),
        attempts: r.get(3),
        next_at: r.get(4),
        done_at: r.get(5),
        last_error: r.get(6),
        created_at: r.get(7),
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A new, empty schema for one test.
    pub fn fresh_schema(url: &str) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        let mut c = Client::connect(url, NoTls).expect("KOOAGENT_TEST_PG_URL connects");
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .unwrap();
        name
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(valid_schema("public"));
        assert!(valid_schema("t1_x"));
        assert!(!valid_schema("1x"));
        assert!(!valid_schema("a;drop"));
        assert!(!valid_schema("A"));
        assert!(!valid_schema(""));
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;
    use crate::server::db::tests::{
        check_old_events_migrated, check_old_instances_migrated, check_old_licenses_migrated, ids,
        OLD_EVENTS, OLD_INSTANCES, OLD_LICENSES,
    };

    /// The index no query reads: see the SQLite twin.
    #[test]
    fn an_older_database_loses_the_unread_license_index() {
        let Some(url) = crate::server::db::tests::pg_url() else {
            return;
        };
        let schema = tests::fresh_schema(&url);
        let mut c = Client::connect(&url, NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {OLD_LICENSES}"
        ))
        .unwrap();
        let indexes = |db: &mut Postgres| -> i64 {
            db.client
                .query_one(
                    "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = $1 \
                     AND indexname = 'licenses_by_id'",
                    &[&schema],
                )
                .unwrap()
                .get(0)
        };
        let mut db = Postgres::connect(&url, &schema).unwrap();
        assert_eq!(indexes(&mut db), 0);
        check_old_licenses_migrated(&mut db);
        let mut db = Postgres::connect(&url, &schema).unwrap();
        assert_eq!(indexes(&mut db), 0);
    }

    /// A database made before the call-history columns: see the SQLite twin.
    #[test]
    fn an_older_database_gets_the_call_history_columns() {
        let Some(url) = crate::server::db::tests::pg_url() else {
            return;
        };
        let schema = tests::fresh_schema(&url);
        let mut c = Client::connect(&url, NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {OLD_EVENTS}"
        ))
        .unwrap();
        drop(Postgres::connect(&url, &schema).unwrap());
        let mut db = Postgres::connect(&url, &schema).unwrap();
        let indexes: i64 = db
            .client
            .query_one(
                "SELECT COUNT(*) FROM pg_indexes WHERE schemaname = $1 AND indexname LIKE 'events_by_%'",
                &[&schema],
            )
            .unwrap()
            .get(0);
        assert_eq!(indexes, 3);
        check_old_events_migrated(&mut db);
    }

    /// A database made before the device links existed: see the SQLite twin.
    #[test]
    fn an_older_database_gets_its_device_links() {
        let Some(url) = crate::server::db::tests::pg_url() else {
            return;
        };
        let schema = tests::fresh_schema(&url);
        let mut c = Client::connect(&url, NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {OLD_INSTANCES}"
        ))
        .unwrap();
        let links = |db: &mut Postgres| -> i64 {
            db.client
                .query_one("SELECT COUNT(*) FROM instance_devices", &[])
                .unwrap()
                .get(0)
        };
        let mut db = Postgres::connect(&url, &schema).unwrap();
        assert_eq!(links(&mut db), 5);
        let mut db = Postgres::connect(&url, &schema).unwrap();
        assert_eq!(links(&mut db), 5);
        check_old_instances_migrated(&mut db);
        let mut db = Postgres::connect(&url, &schema).unwrap();
        assert_eq!(ids(db.instances_for_device("K3").unwrap()), ["i1", "i3"]);
    }

    #[test]
    fn an_older_database_gets_the_device_key_column_and_keeps_its_rows() {
        let Some(url) = crate::server::db::tests::pg_url() else {
            return;
        };
        let schema = tests::fresh_schema(&url);
        let mut c = Client::connect(&url, NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.codes (code TEXT PRIMARY KEY, \
             status TEXT NOT NULL, frozen BIGINT NOT NULL, expire_at BIGINT, \
             seq BIGINT NOT NULL, updated_at BIGINT NOT NULL); \
             INSERT INTO {schema}.codes VALUES ('OLD', 'active', 1, 44, 2, 9);"
        ))
        .unwrap();
        for _ in 0..2 {
            let mut db = Postgres::connect(&url, &schema).unwrap();
            let mut row = db.code("OLD").unwrap().unwrap();
            assert_eq!(
                (row.frozen, row.seq, row.device_key.as_deref()),
                (true, 2, None)
            );
            row.device_key = Some("K".into());
            db.put_code(&row).unwrap();
            assert_eq!(
                db.code("OLD").unwrap().unwrap().device_key.as_deref(),
                Some("K")
            );
            row.device_key = None;
            db.put_code(&row).unwrap();
        }
    }
}
