//! The embedded backend: one SQLite file, write-ahead log, `synchronous = FULL` (a
//! commit is on disk before the marketplace hears success; group commit keeps that cheap).

use std::cell::Cell;
use std::path::Path;
use std::sync::mpsc;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Backend, BucketRow, CallsBy, CodeActivityRow, CodeRow, DbError, DeviceRow, EnrollmentRow,
    EventRow, InstanceRow, InstanceStatus, TokenRow, Tx, UploadRow, EVENT_SELECT, INSTANCE_SELECT,
};

pub struct Sqlite {
    pub(super) conn: Connection,
    /// Wakes the checkpoint thread ([`Sqlite::checkpoint_in_background`]); None: SQLite
    /// checkpoints inline, in the commit that fills the log past 1000 pages.
    checkpoints: Option<mpsc::SyncSender<()>>,
    /// The log's length (pages) when a checkpoint was last asked for.
    asked_at: i32,
}

/// Pages in the write-ahead log after which a checkpoint is due (SQLite's own
/// `wal_autocheckpoint` default).
const CHECKPOINT_PAGES: i32 = 1000;
/// Pages after which the database thread checkpoints itself: the checkpoint thread's
/// passive checkpoints copy pages while commits go on, but only a checkpoint that ends
/// with nothing left to copy lets the next commit start the log from its beginning, so
/// under a steady stream of commits the log would only grow.
const CHECKPOINT_INLINE_PAGES: i32 = 8 * CHECKPOINT_PAGES;

thread_local! {
    /// Pages in the log after the last commit on this thread (the WAL hook runs on the
    /// committing thread, inside `COMMIT`).
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

fn note_wal_pages(_: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}

fn checkpoint(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        log::warn!("database: checkpoint: {e}");
    }
}

fn err(e: rusqlite::Error) -> DbError {
    DbError::Backend(e.to_string())
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite, DbError> {
        private_file(path).map_err(|e| DbError::Backend(format!("{}: {e}", path.display())))?;
        let conn = Connection::open(path)
            .map_err(|e| DbError::Backend(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .map_err(err)?;
        conn.execute_batch(super::SCHEMA).map_err(err)?;
        conn.execute_batch(super::usage::SCHEMA).map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(Sqlite {
            conn,
            checkpoints: None,
            asked_at: 0,
        })
    }

    /// Moves the log's checkpoints (copying committed pages into the database file, with
    /// two fsyncs) to a thread of their own with a second connection to `path`: done
    /// inline, one commit in a thousand pages waited for a checkpoint, and with it every
    /// request of its group and of the groups queued behind it. The thread ends with this
    /// connection.
    pub fn checkpoint_in_background(&mut self, path: &Path) -> Result<(), DbError> {
        let conn = Connection::open(path)
            .map_err(|e| DbError::Backend(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let (wake, due) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("seller-db-ckpt".into())
            .spawn(move || {
                while due.recv().is_ok() {
                    checkpoint(&conn);
                }
            })
            .map_err(|e| DbError::Backend(format!("checkpoint thread: {e}")))?;
        self.checkpoint_elsewhere(wake);
        Ok(())
    }

    /// Commits no longer checkpoint (but past [`CHECKPOINT_INLINE_PAGES`]); `wake` gets a
    /// message when one is due.
    fn checkpoint_elsewhere(&mut self, wake: mpsc::SyncSender<()>) {
        // Replaces SQLite's autocheckpoint, which is a WAL hook too.
        self.conn.wal_hook(Some(note_wal_pages));
        self.checkpoints = Some(wake);
    }
}

/// Creates the database file mode 0600, or makes an existing one 0600: it holds every
/// license and the device registry. SQLite gives its `-wal` and `-shm` files the main
/// file's mode.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode() & 0o777;
    if mode != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        log::warn!(
            "{}: was mode {mode:04o}, now 0600 (it holds licenses and device keys)",
            path.display()
        );
    }
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

/// Brings a database made by an older version up to [`super::SCHEMA`] (columns added
/// since; `CREATE TABLE IF NOT EXISTS` leaves an existing table as it was).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has = conn
        .prepare("SELECT 1 FROM pragma_table_info('codes') WHERE name = 'device_key'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE codes ADD COLUMN device_key TEXT")?;
        log::info!("database: added codes.device_key (relay)");
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS codes_by_key ON codes (device_key)")?;
    conn.execute_batch(super::DROPPED_INDEXES)?;
    for (name, ty) in super::INSTANCE_COLUMNS {
        add_column(conn, "instances", name, ty)?;
    }
    event_history(conn)?;
    link_table(conn)
}

/// Adds column `name` to `table` if missing. A second process opening the same file at
/// the same time may add it first (an `ALTER` that lost that race fails with "duplicate
/// column", which is checked for again).
fn add_column(conn: &Connection, table: &str, name: &str, ty: &str) -> rusqlite::Result<()> {
    let has = || {
        conn.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists([table, name])
    };
    if has()? {
        return Ok(());
    }
    if let Err(e) = conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {ty}")) {
        if !has()? {
            return Err(e);
        }
    }
    log::info!("database: added {table}.{name}");
    Ok(())
}

/// Adds the call-history columns to an `events` table made before them (issue 16), then
/// their indexes. Each column is checked on its own: a second process opening the same
/// file at the same time may have added some (an `ALTER` that lost that race fails with
/// "duplicate column", which is checked for again).
fn event_history(conn: &Connection) -> rusqlite::Result<()> {
    let has = |name: &str| {
        conn.prepare("SELECT 1 FROM pragma_table_info('events') WHERE name = ?1")?
            .exists([name])
    };
    for (name, ty) in super::EVENT_HISTORY_COLUMNS {
        if has(name)? {
            continue;
        }
        if let Err(e) = conn.execute_batch(&format!("ALTER TABLE events ADD COLUMN {name} {ty}")) {
            if !has(name)? {
                return Err(e);
            }
        }
        log::info!("database: added events.{name} (console call history)");
    }
    conn.execute_batch(super::EVENT_INDEXES)
}

/// Creates the device code → instance links ([`super::LINK_SCHEMA`]) if missing and fills
/// them from every instance's `devices` list, in one transaction: a second process opening
/// the same file waits for the write lock and then finds the table made.
fn link_table(conn: &Connection) -> rusqlite::Result<()> {
    let exists = || {
        conn.prepare(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instance_devices'",
        )?
        .exists([])
    };
    if exists()? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let made = (|| {
        if exists()? {
            return Ok(None);
        }
        conn.execute_batch(super::LINK_SCHEMA)?;
        conn.execute(
            "INSERT OR IGNORE INTO instance_devices (device_code, instance_id) \
             SELECT j.value, i.instance_id FROM instances i, json_each(i.devices) j",
            [],
        )
        .map(Some)
    })();
    match made {
        Ok(n) => {
            conn.execute_batch("COMMIT")?;
            if let Some(n) = n {
                log::info!(
                    "database: added instance_devices ({n} device links from instances.devices)"
                );
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

impl Backend for Sqlite {
    fn begin(&mut self) -> Result<(), DbError> {
        // IMMEDIATE: take the write lock now, so a second process on the same file waits
        // (busy timeout) instead of failing half-way.
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(err)
    }
    fn savepoint(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch("SAVEPOINT job").map_err(err)
    }
    fn release_savepoint(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch("RELEASE job").map_err(err)
    }
    fn rollback_savepoint(&mut self) -> Result<(), DbError> {
        self.conn
            .execute_batch("ROLLBACK TO job; RELEASE job")
            .map_err(err)
    }
    fn commit(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch("COMMIT").map_err(err)?;
        if let Some(wake) = &self.checkpoints {
            let pages = WAL_PAGES.with(Cell::get);
            if pages < self.asked_at {
                // The log started over.
                self.asked_at = 0;
            }
            if pages >= CHECKPOINT_INLINE_PAGES {
                checkpoint(&self.conn);
                self.asked_at = 0;
            } else if pages - self.asked_at >= CHECKPOINT_PAGES {
                // Once per 1000 new pages, as SQLite's own: a checkpoint running while
                // commits go on leaves the log's length as it is, and asking after every
                // commit would copy the same hot pages again and again. (Full: one is
                // already due and will see these pages too.)
                let _ = wake.try_send(());
                self.asked_at = pages;
            }
        }
        Ok(())
    }
    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                log::error!("database: rollback: {e}");
            }
        }
    }
    fn tx(&mut self) -> &mut dyn Tx {
        self
    }
}

impl Sqlite {
    /// Makes the links of `instance_id` exactly `devices` (inside the caller's
    /// transaction); an unchanged list (a freeze, a refresh) writes nothing.
    fn link_devices(&mut self, instance_id: &str, devices: &[String]) -> Result<(), DbError> {
        let have: Vec<String> = self
            .conn
            .prepare_cached("SELECT device_code FROM instance_devices WHERE instance_id = ?1")
            .and_then(|mut s| {
                s.query_map(params![instance_id], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(err)?;
        for gone in have.iter().filter(|h| !devices.contains(h)) {
            self.conn
                .prepare_cached(
                    "DELETE FROM instance_devices WHERE device_code = ?1 AND instance_id = ?2",
                )
                .and_then(|mut s| s.execute(params![gone, instance_id]))
                .map_err(err)?;
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
            self.conn
                .prepare_cached(
                    "INSERT INTO instance_devices (device_code, instance_id) VALUES (?1, ?2) \
                     ON CONFLICT DO NOTHING",
                )
                .and_then(|mut s| s.execute(params![code, instance_id]))
                .map_err(err)?;
        }
        Ok(())
    }

    /// Runs `sql`, an insert of an instance's columns in `instance_cols!` order then
    /// `license_sha256`, with `license` (its text, or empty when stored by reference).
    fn write_instance(
        &mut self,
        sql: &str,
        r: &InstanceRow,
        license: (&str, Option<&str>),
    ) -> Result<(), DbError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.execute(params![
                    r.instance_id,
                    r.product,
                    r.license_id,
                    devices_json(&r.devices),
                    r.not_before,
                    r.not_after,
                    r.status.as_str(),
                    r.frozen as i64,
                    license.0,
                    r.seq,
                    r.updated_at,
                    license.1
                ])
            })
            .map(drop)
            .map_err(err)
    }

    /// The instances whose id `ids` selects (a query with one parameter, `?1`), by id.
    fn instances_where(&mut self, ids: &str, arg: &str) -> Result<Vec<InstanceRow>, DbError> {
        let rows = self
            .conn
            .prepare_cached(&format!(
                "{INSTANCE_SELECT} WHERE i.instance_id IN ({ids}) ORDER BY i.instance_id"
            ))
            .and_then(|mut s| {
                s.query_map(params![arg], instance_row)?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(err)?;
        rows.into_iter()
            .map(|r| finish_instance(Some(r)).map(|i| i.expect("a row")))
            .collect()
    }
}

fn devices_json(d: &[String]) -> String {
    serde_json::to_string(d).expect("strings serialise")
}

fn devices_parse(s: &str) -> Result<Vec<String>, DbError> {
    serde_json::from_str(s).map_err(|e| DbError::Backend(format!("instances.devices: {e}")))
}

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(InstanceRow, String, String)> {
    Ok((
        InstanceRow {
            instance_id: r.get(0)?,
            product: r.get(1)?,
            license_id: r.get(2)?,
            devices: vec![],
            not_before: r.get(4)?,
            not_after: r.get(5)?,
            status: InstanceStatus::Active,
            frozen: r.get::<_, i64>(7)? != 0,
            license: r.get(8)?,
            seq: r.get(9)?,
            updated_at: r.get(10)?,
        },
        r.get(3)?,
        r.get(6)?,
    ))
}

fn finish_instance(
    x: Option<(InstanceRow, String, String)>,
) -> Result<Option<InstanceRow>, DbError> {
    let Some((mut row, devices, status)) = x else {
        return Ok(None);
    };
    row.devices = devices_parse(&devices)?;
    row.status = InstanceStatus::parse(&status)?;
    Ok(Some(row))
}

impl Tx for Sqlite {
    fn nonce_fresh(&mut self, nonce: &str, now: i64) -> Result<bool, DbError> {
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO nonces (nonce, seen_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![nonce, now]))
            .map_err(err)?;
        Ok(n == 1)
    }

    fn prune_nonces(&mut self, before: i64) -> Result<u64, DbError> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM nonces WHERE seen_at < ?1")
            .and_then(|mut s| s.execute(params![before]))
            .map_err(err)?;
        Ok(n as u64)
    }

    fn event(&mut self, event_id: &str) -> Result<Option<EventRow>, DbError> {
        self.conn
            .prepare_cached(concat!(super::event_select!(), " WHERE e.event_id = ?1"))
            .and_then(|mut s| s.query_row(params![event_id], event_row).optional())
            .map_err(err)?
            .map(finish_event)
            .transpose()
    }

    fn put_event(&mut self, e: &EventRow) -> Result<(), DbError> {
        // By reference: the license's one copy is in `licenses`.
        let response = match e.license_sha256 {
            Some(_) => "",
            None => e.response.as_str(),
        };
        self.conn
            .prepare_cached(concat!(
                "INSERT INTO events (",
                super::event_cols!(),
                ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    e.event_id,
                    e.activity,
                    e.digest,
                    response,
                    e.created_at,
                    e.instance_id,
                    e.order_id,
                    e.customer_id,
                    e.result_code,
                    e.retries,
                    e.last_at,
                    e.license_sha256
                ])
            })
            .map(drop)
            .map_err(err)
    }

    fn event_resent(&mut self, event_id: &str, now: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "UPDATE events SET retries = retries + 1, last_at = ?2 WHERE event_id = ?1",
            )
            .and_then(|mut s| s.execute(params![event_id, now]))
            .map(drop)
            .map_err(err)
    }

    fn calls(&mut self, by: CallsBy<'_>, limit: i64) -> Result<Vec<EventRow>, DbError> {
        let (column, value) = match by {
            CallsBy::Instance(v) => ("instance_id", v),
            CallsBy::Order(v) => ("order_id", v),
            CallsBy::Customer(v) => ("customer_id", v),
        };
        self.conn
            .prepare_cached(&format!(
                "{EVENT_SELECT} WHERE e.{column} = ?1 \
                 ORDER BY e.created_at DESC, e.event_id DESC LIMIT ?2"
            ))
            .and_then(|mut s| {
                s.query_map(params![value, limit], event_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?
            .into_iter()
            .map(finish_event)
            .collect()
    }

    fn instance(&mut self, instance_id: &str) -> Result<Option<InstanceRow>, DbError> {
        let x = self
            .conn
            .prepare_cached(concat!(
                super::instance_select!(),
                " WHERE i.instance_id = ?1"
            ))
            .and_then(|mut s| s.query_row(params![instance_id], instance_row).optional())
            .map_err(err)?;
        finish_instance(x)
    }

    fn instance_by_license(&mut self, license_id: &str) -> Result<Option<InstanceRow>, DbError> {
        let x = self
            .conn
            .prepare_cached(concat!(
                super::instance_select!(),
                " WHERE i.license_id = ?1"
            ))
            .and_then(|mut s| s.query_row(params![license_id], instance_row).optional())
            .map_err(err)?;
        finish_instance(x)
    }

    fn put_instance(&mut self, r: &InstanceRow) -> Result<(), DbError> {
        self.write_instance(
            concat!(
                "INSERT INTO instances (",
                super::instance_cols!(),
                ", license_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
                 ON CONFLICT (instance_id) DO UPDATE SET product = excluded.product, \
                 license_id = excluded.license_id, devices = excluded.devices, \
                 not_before = excluded.not_before, not_after = excluded.not_after, \
                 status = excluded.status, frozen = excluded.frozen, license = excluded.license, \
                 seq = excluded.seq, updated_at = excluded.updated_at, \
                 license_sha256 = excluded.license_sha256"
            ),
            r,
            (&r.license, None),
        )?;
        self.link_devices(&r.instance_id, &r.devices)
    }

    fn put_new_instance(&mut self, r: &InstanceRow, license_sha256: &str) -> Result<(), DbError> {
        self.write_instance(
            concat!(
                "INSERT INTO instances (",
                super::instance_cols!(),
                ", license_sha256) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            r,
            ("", Some(license_sha256)),
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
        self.conn
            .prepare_cached(
                "INSERT INTO licenses (sha256, license_id, event_id, issued_at, text) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![sha, license_id, event_id, issued_at, text]))
            .map_err(err)?;
        Ok(sha)
    }

    fn put_token(&mut self, t: &TokenRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO tokens (license_id, seq, action, token, issued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![t.license_id, t.seq, t.action, t.token, t.issued_at]))
            .map(drop)
            .map_err(err)
    }

    fn latest_token(&mut self, license_id: &str) -> Result<Option<TokenRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT license_id, seq, action, token, issued_at FROM tokens \
                 WHERE license_id = ?1 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![license_id], |r| {
                    Ok(TokenRow {
                        license_id: r.get(0)?,
                        seq: r.get(1)?,
                        action: r.get(2)?,
                        token: r.get(3)?,
                        issued_at: r.get(4)?,
                    })
                })
                .optional()
            })
            .map_err(err)
    }

    fn code(&mut self, code: &str) -> Result<Option<CodeRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT code, status, frozen, expire_at, seq, updated_at, device_key FROM codes WHERE code = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![code], |r| {
                    Ok(CodeRow {
                        code: r.get(0)?,
                        status: r.get(1)?,
                        frozen: r.get::<_, i64>(2)? != 0,
                        expire_at: r.get(3)?,
                        seq: r.get(4)?,
                        updated_at: r.get(5)?,
                        device_key: r.get(6)?,
                    })
                })
                .optional()
            })
            .map_err(err)
    }

    fn all_codes(&mut self, limit: i64) -> Result<Vec<CodeRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT code, status, frozen, expire_at, seq, updated_at, device_key FROM codes \
                 ORDER BY updated_at DESC, code LIMIT ?1",
            )
            .and_then(|mut s| {
                s.query_map(params![limit], |r| {
                    Ok(CodeRow {
                        code: r.get(0)?,
                        status: r.get(1)?,
                        frozen: r.get::<_, i64>(2)? != 0,
                        expire_at: r.get(3)?,
                        seq: r.get(4)?,
                        updated_at: r.get(5)?,
                        device_key: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)
    }

    fn code_activity(&mut self, code: &str) -> Result<Option<CodeActivityRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT code, query_at, query_status, usage_calls, usage_entries, usage_at, \
                 usage_result FROM code_activity WHERE code = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![code], |r| {
                    Ok(CodeActivityRow {
                        code: r.get(0)?,
                        query_at: r.get(1)?,
                        query_status: r.get(2)?,
                        usage_calls: r.get(3)?,
                        usage_entries: r.get(4)?,
                        usage_at: r.get(5)?,
                        usage_result: r.get(6)?,
                    })
                })
                .optional()
            })
            .map_err(err)
    }

    fn note_code_query(&mut self, code: &str, at: i64, status: &str) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO code_activity (code, query_at, query_status, usage_calls, usage_entries) \
                 VALUES (?1, ?2, ?3, 0, 0) ON CONFLICT (code) DO UPDATE SET \
                 query_at = excluded.query_at, query_status = excluded.query_status",
            )
            .and_then(|mut s| s.execute(params![code, at, status]))
            .map(drop)
            .map_err(err)
    }

    fn note_code_usage(
        &mut self,
        code: &str,
        at: i64,
        entries: i64,
        result: &str,
    ) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO code_activity (code, usage_calls, usage_entries, usage_at, usage_result) \
                 VALUES (?1, 1, ?2, ?3, ?4) ON CONFLICT (code) DO UPDATE SET \
                 usage_calls = code_activity.usage_calls + 1, \
                 usage_entries = code_activity.usage_entries + excluded.usage_entries, \
                 usage_at = excluded.usage_at, usage_result = excluded.usage_result",
            )
            .and_then(|mut s| s.execute(params![code, entries, at, result]))
            .map(drop)
            .map_err(err)
    }

    fn console_session(
        &mut self,
        id_sha256: &str,
        since: i64,
    ) -> Result<Option<(String, String, i64)>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT csrf, address, created_at FROM console_sessions \
                 WHERE id_sha256 = ?1 AND created_at >= ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![id_sha256, since], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(err)
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
        self.conn
            .execute(
                "DELETE FROM console_sessions WHERE created_at < ?1",
                params![expired_before],
            )
            .map_err(err)?;
        self.conn
            .execute(
                "DELETE FROM console_sessions WHERE id_sha256 IN (SELECT id_sha256 FROM \
                 console_sessions ORDER BY created_at DESC, id_sha256 LIMIT -1 OFFSET ?1)",
                params![max - 1],
            )
            .map_err(err)?;
        self.conn
            .execute(
                "INSERT INTO console_sessions (id_sha256, csrf, address, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![id_sha256, csrf, address, created_at],
            )
            .map(drop)
            .map_err(err)
    }

    fn delete_console_session(&mut self, id_sha256: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "DELETE FROM console_sessions WHERE id_sha256 = ?1",
                params![id_sha256],
            )
            .map(drop)
            .map_err(err)
    }

    fn put_code(&mut self, c: &CodeRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO codes (code, status, frozen, expire_at, seq, updated_at, device_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (code) DO UPDATE SET \
                 status = excluded.status, frozen = excluded.frozen, expire_at = excluded.expire_at, \
                 seq = excluded.seq, updated_at = excluded.updated_at, device_key = excluded.device_key",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.code,
                    c.status,
                    c.frozen as i64,
                    c.expire_at,
                    c.seq,
                    c.updated_at,
                    c.device_key
                ])
            })
            .map(drop)
            .map_err(err)
    }

    fn usage(&mut self) -> &mut dyn super::usage::UsageOutbox {
        self
    }
    fn count_licenses(&mut self) -> Result<i64, DbError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM licenses", [], |r| r.get(0))
            .map_err(err)
    }

    fn put_upload(&mut self, u: &UploadRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO uploads ({UPLOAD_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (event_id) DO UPDATE SET instance_id = excluded.instance_id, \
                 license = excluded.license, attempts = excluded.attempts, \
                 next_at = excluded.next_at, done_at = excluded.done_at, \
                 last_error = excluded.last_error, created_at = excluded.created_at"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    u.event_id,
                    u.instance_id,
                    u.license,
                    u.attempts,
                    u.next_at,
                    u.done_at,
                    u.last_error,
                    u.created_at
                ])
            })
            .map(drop)
            .map_err(err)
    }

    fn upload(&mut self, event_id: &str) -> Result<Option<UploadRow>, DbError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE event_id = ?1"
            ))
            .and_then(|mut s| s.query_row(params![event_id], upload_row).optional())
            .map_err(err)
    }

    fn due_uploads(&mut self, now: i64, limit: i64) -> Result<Vec<UploadRow>, DbError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NULL AND next_at <= ?1 \
                 ORDER BY next_at LIMIT ?2"
            ))
            .and_then(|mut s| {
                s.query_map(params![now, limit], upload_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)
    }

    fn count_uploads(&mut self) -> Result<(i64, i64), DbError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FILTER (WHERE done_at IS NULL), \
                 COUNT(*) FILTER (WHERE done_at IS NOT NULL) FROM uploads",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(err)
    }

    fn list_uploads(&mut self, done_limit: i64) -> Result<Vec<UploadRow>, DbError> {
        let mut rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NULL \
                 ORDER BY next_at, event_id"
            ))
            .and_then(|mut s| {
                s.query_map([], upload_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        let done = self
            .conn
            .prepare_cached(&format!(
                "SELECT {UPLOAD_COLS} FROM uploads WHERE done_at IS NOT NULL \
                 ORDER BY done_at DESC, event_id LIMIT ?1"
            ))
            .and_then(|mut s| {
                s.query_map(params![done_limit], upload_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(err)?;
        rows.extend(done);
        Ok(rows)
    }

    fn device_by_code(&mut self, code: &str) -> Result<Option<DeviceRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices WHERE device_code = ?1",
            )
            .and_then(|mut s| s.query_row(params![code], device_row).optional())
            .map_err(err)
    }

    fn device_codes(&mut self, key: &str) -> Result<Vec<DeviceRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices \
                 WHERE device_key = ?1 ORDER BY last_seen DESC, device_code",
            )
            .and_then(|mut s| s.query_map(params![key], device_row)?.collect())
            .map_err(err)
    }

    fn all_devices(&mut self) -> Result<Vec<DeviceRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT device_code, device_key, first_seen, last_seen FROM devices ORDER BY device_code",
            )
            .and_then(|mut s| s.query_map([], device_row)?.collect())
            .map_err(err)
    }

    fn put_device(&mut self, d: &DeviceRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO devices (device_code, device_key, first_seen, last_seen) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (device_code) DO UPDATE SET \
                 device_key = excluded.device_key, first_seen = excluded.first_seen, \
                 last_seen = excluded.last_seen",
            )
            .and_then(|mut s| {
                s.execute(params![
                    d.device_code,
                    d.device_key,
                    d.first_seen,
                    d.last_seen
                ])
            })
            .map(drop)
            .map_err(err)
    }

    fn release_device(&mut self, code: &str) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("DELETE FROM devices WHERE device_code = ?1")
            .and_then(|mut s| s.execute(params![code]))
            .map(|n| n > 0)
            .map_err(err)
    }

    fn instances_with_device(&mut self, code: &str) -> Result<Vec<InstanceRow>, DbError> {
        self.instances_where(
            "SELECT instance_id FROM instance_devices WHERE device_code = ?1",
            code,
        )
    }

    fn instances_for_device(&mut self, key: &str) -> Result<Vec<InstanceRow>, DbError> {
        self.instances_where(
            "SELECT l.instance_id FROM devices d JOIN instance_devices l \
             ON l.device_code = d.device_code WHERE d.device_key = ?1",
            key,
        )
    }

    fn key_bound(&mut self, key: &str) -> Result<bool, DbError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE device_key = ?1) \
                 OR EXISTS (SELECT 1 FROM codes WHERE device_key = ?1)",
            )
            .and_then(|mut s| s.query_row(params![key], |r| r.get::<_, bool>(0)))
            .map_err(err)
    }

    fn key_enrolled(&mut self, key: &str) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM enrolled_keys WHERE device_key = ?1)")
            .and_then(|mut s| s.query_row(params![key], |r| r.get::<_, bool>(0)))
            .map_err(err)
    }

    fn enrollment(&mut self, token_sha256: &str) -> Result<Option<EnrollmentRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT token_sha256, label, quota, used, created_at, revoked FROM enrollments \
                 WHERE token_sha256 = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![token_sha256], enrollment_row)
                    .optional()
            })
            .map_err(err)
    }

    fn all_enrollments(&mut self) -> Result<Vec<EnrollmentRow>, DbError> {
        self.conn
            .prepare_cached(
                "SELECT token_sha256, label, quota, used, created_at, revoked FROM enrollments \
                 ORDER BY created_at, label",
            )
            .and_then(|mut s| s.query_map([], enrollment_row)?.collect())
            .map_err(err)
    }

    fn put_enrollment(&mut self, e: &EnrollmentRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO enrollments (token_sha256, label, quota, used, created_at, revoked) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (token_sha256) DO UPDATE SET \
                 label = excluded.label, quota = excluded.quota, used = excluded.used, \
                 revoked = excluded.revoked",
            )
            .and_then(|mut s| {
                s.execute(params![
                    e.token_sha256,
                    e.label,
                    e.quota,
                    e.used,
                    e.created_at,
                    e.revoked as i64
                ])
            })
            .map(drop)
            .map_err(err)
    }

    fn put_enrolled_key(&mut self, key: &str, token_sha256: &str, at: i64) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO enrolled_keys (device_key, token_sha256, enrolled_at) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (device_key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, token_sha256, at]))
            .map(drop)
            .map_err(err)
    }

    fn bucket(&mut self, name: &str) -> Result<Option<BucketRow>, DbError> {
        self.conn
            .prepare_cached("SELECT level, at_ms FROM buckets WHERE name = ?1")
            .and_then(|mut s| {
                s.query_row(params![name], |r| {
                    Ok(BucketRow {
                        level: r.get(0)?,
                        at_ms: r.get(1)?,
                    })
                })
                .optional()
            })
            .map_err(err)
    }

    fn put_bucket(&mut self, name: &str, b: BucketRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO buckets (name, level, at_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET level = excluded.level, at_ms = excluded.at_ms",
            )
            .and_then(|mut s| s.execute(params![name, b.level, b.at_ms]))
            .map(drop)
            .map_err(err)
    }

    fn prune_buckets(&mut self, before_ms: i64) -> Result<u64, DbError> {
        self.conn
            .prepare_cached("DELETE FROM buckets WHERE at_ms < ?1")
            .and_then(|mut s| s.execute(params![before_ms]))
            .map(|n| n as u64)
            .map_err(err)
    }
}

fn enrollment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EnrollmentRow> {
    Ok(EnrollmentRow {
        token_sha256: r.get(0)?,
        label: r.get(1)?,
        quota: r.get(2)?,
        used: r.get(3)?,
        created_at: r.get(4)?,
        revoked: r.get::<_, i64>(5)? != 0,
    })
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        device_code: r.get(0)?,
        device_key: r.get(1)?,
        first_seen: r.get(2)?,
        last_seen: r.get(3)?,
    })
}

/// A row of [`EVENT_SELECT`], and the license it references (id, text), if any.
type StoredEvent = (EventRow, Option<(String, String)>);

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let license = match (r.get(12)?, r.get(13)?) {
        (Some(id), Some(text)) => Some((id, text)),
        _ => None,
    };
    let row = EventRow {
        event_id: r.get(0)?,
        activity: r.get(1)?,
        digest: r.get(2)?,
        response: r.get(3)?,
        created_at: r.get(4)?,
        instance_id: r.get(5)?,
        order_id: r.get(6)?,
        customer_id: r.get(7)?,
        result_code: r.get(8)?,
        retries: r.get(9)?,
        last_at: r.get(10)?,
        license_sha256: r.get(11)?,
    };
    Ok((row, license))
}

fn finish_event((mut row, license): StoredEvent) -> Result<EventRow, DbError> {
    super::stored_response(&mut row, license)?;
    Ok(row)
}

const UPLOAD_COLS: &str =
    "event_id, instance_id, license, attempts, next_at, done_at, last_error, created_at";

fn upload_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRow> {
    Ok(UploadRow {
        event_id: r.get(0)?,
        instance_id: r.get(1)?,
        license: r.get(2)?,
        attempts: r.get(3)?,
        next_at: r.get(4)?,
        done_at: r.get(5)?,
        last_error: r.get(6)?,
        created_at: r.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::tests::{
        check_old_events_migrated, check_old_instances_migrated, check_old_licenses_migrated, ids,
        OLD_EVENTS, OLD_INSTANCES, OLD_LICENSES,
    };

    /// `n` commits of 100 rows of about a page each.
    fn fill(db: &mut Sqlite, from: usize, n: usize) {
        for c in 0..n {
            db.begin().unwrap();
            for r in 0..100 {
                let nonce = format!("{:06}{}", from + c * 100 + r, "x".repeat(3000));
                assert!(db.nonce_fresh(&nonce, 1).unwrap());
            }
            db.commit().unwrap();
        }
    }

    /// A commit that fills the log past 1000 pages does not copy it (the database file
    /// stays as it was) but asks for a checkpoint.
    #[test]
    fn commits_leave_checkpoints_to_the_checkpoint_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        let mut db = Sqlite::open(&path).unwrap();
        let (wake, due) = mpsc::sync_channel(1);
        db.checkpoint_elsewhere(wake);
        let before = std::fs::metadata(&path).unwrap().len();
        fill(&mut db, 0, 12);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        assert!(due.try_recv().is_ok(), "a checkpoint is asked for");
        // Not again at every commit: once per 1000 new pages.
        fill(&mut db, 2000, 2);
        assert!(due.try_recv().is_err(), "asked once for these pages");
        fill(&mut db, 4000, 10);
        assert!(due.try_recv().is_ok(), "asked again 1000 pages later");
    }

    /// With the checkpoint thread, commits leave the log to it: the database file gets
    /// the pages without a commit copying them, and under a steady stream of commits the
    /// log still starts over (the inline fallback) instead of growing without end.
    #[test]
    fn the_checkpoint_thread_copies_the_log_and_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        let mut db = Sqlite::open(&path).unwrap();
        db.checkpoint_in_background(&path).unwrap();
        let file_len = || std::fs::metadata(&path).unwrap().len();
        let before = file_len();
        fill(&mut db, 0, 12);
        let mut waited = 0;
        while file_len() < before + 1000 * 4096 && waited < 200 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            waited += 1;
        }
        assert!(
            file_len() >= before + 1000 * 4096,
            "the checkpoint thread copied the log into the database file"
        );
        let wal = dir.path().join("seller.db-wal");
        let mut largest = 0;
        for i in 0..12 {
            fill(&mut db, 10_000 + i * 1000, 10);
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        assert!(
            // Each commit here writes ≈ 300 pages (rows, index entries), ≈ 36,000 in all.
            largest < (CHECKPOINT_INLINE_PAGES as u64 + 2000) * 4200,
            "the log stays bounded: {largest} bytes"
        );
        assert_eq!(
            db.conn
                .query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            13_200
        );
    }

    /// A database made with the index no query reads loses it at start and keeps its
    /// licenses; new ones are still stored once.
    #[test]
    fn an_older_database_loses_the_unread_license_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(OLD_LICENSES)
            .unwrap();
        let indexes = |db: &Sqlite| -> i64 {
            db.conn
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'licenses' \
                     AND name = 'licenses_by_id'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        let mut db = Sqlite::open(&path).unwrap();
        assert_eq!(indexes(&db), 0);
        check_old_licenses_migrated(&mut db);
        drop(db);
        let db = Sqlite::open(&path).unwrap();
        assert_eq!(indexes(&db), 0);
    }

    /// A database made before the call-history columns gets them (and their indexes),
    /// keeps its stored answers, and opening it again changes nothing.
    #[test]
    fn an_older_database_gets_the_call_history_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(OLD_EVENTS)
            .unwrap();
        drop(Sqlite::open(&path).unwrap());
        let mut db = Sqlite::open(&path).unwrap();
        let indexes: i64 = db
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'events_by_%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 3);
        check_old_events_migrated(&mut db);
        // The answer by reference holds no second copy of its license.
        let stored: String = db
            .conn
            .query_row(
                "SELECT response FROM events WHERE event_id = 'e-ref'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, "");
    }

    /// A database made before the device links existed opens, gets the links from each
    /// instance's device list, answers lookups like the old scan did, and opening it
    /// again adds nothing twice.
    #[test]
    fn an_older_database_gets_its_device_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(OLD_INSTANCES)
            .unwrap();
        let links = |db: &Sqlite| -> i64 {
            db.conn
                .query_row("SELECT COUNT(*) FROM instance_devices", [], |r| r.get(0))
                .unwrap()
        };
        {
            let db = Sqlite::open(&path).unwrap();
            assert_eq!(links(&db), 5);
        }
        let mut db = Sqlite::open(&path).unwrap();
        assert_eq!(links(&db), 5);
        check_old_instances_migrated(&mut db);
        // Frozen by put_instance, r1 holds its license itself again; a new instance
        // written by reference holds none.
        let license = |db: &Sqlite, id: &str| -> String {
            db.conn
                .query_row(
                    "SELECT license FROM instances WHERE instance_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(license(&db, "r1"), "kl1.instance-by-ref");
        let sha = db.record_license("kg-r2", None, "kl1.r2", 8).unwrap();
        let mut r2 = db.instance("r1").unwrap().unwrap();
        r2.instance_id = "r2".into();
        r2.license_id = "kg-r2".into();
        r2.license = "kl1.r2".into();
        db.put_new_instance(&r2, &sha).unwrap();
        assert_eq!(license(&db, "r2"), "");
        assert_eq!(db.instance("r2").unwrap(), Some(r2));
        drop(db);
        let mut db = Sqlite::open(&path).unwrap();
        assert_eq!(ids(db.instances_for_device("K3").unwrap()), ["i1", "i3"]);
    }

    #[test]
    fn an_older_database_gets_the_device_key_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seller.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE codes (code TEXT PRIMARY KEY, status TEXT NOT NULL, \
                 frozen BIGINT NOT NULL, expire_at BIGINT, seq BIGINT NOT NULL, \
                 updated_at BIGINT NOT NULL); \
                 INSERT INTO codes VALUES ('OLD', 'active', 1, 44, 2, 9);",
            )
            .unwrap();
        }
        for _ in 0..2 {
            let mut db = Sqlite::open(&path).unwrap();
            let row = db.code("OLD").unwrap().unwrap();
            assert_eq!(
                (row.frozen, row.expire_at, row.seq, row.device_key),
                (true, Some(44), 2, None)
            );
        }
        let mut db = Sqlite::open(&path).unwrap();
        let mut row = db.code("OLD").unwrap().unwrap();
        row.device_key = Some("K".into());
        db.put_code(&row).unwrap();
        assert_eq!(
            db.code("OLD").unwrap().unwrap().device_key.as_deref(),
            Some("K")
        );
    }
}
