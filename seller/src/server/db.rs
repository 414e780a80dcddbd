//! Storage of the seller server: every issued license, status token, marketplace request
//! (by `eventId`) and nonce. Two backends behind one transaction interface ([`Tx`]):
//! SQLite (embedded default, one file under the state directory) and PostgreSQL (for
//! several replicas behind a load balancer).
//!
//! All database work runs on dedicated threads ([`Db`]: one for SQLite, one per
//! connection for PostgreSQL), never on the async workers. A thread commits in groups: it
//! takes every request waiting, runs them in one transaction and commits once, so a burst
//! of orders costs one durable commit, not one each. A request that fails is rolled back
//! alone: when one fails, the batch is rolled back and run again with each request in its
//! own savepoint (savepoints are not free: SQLite copies every page a savepoint changes,
//! so the common case, where all succeed, goes without). A batch the database refuses to
//! serialise (PostgreSQL, concurrent replicas) is run again one request per transaction,
//! retrying only the requests that collide, after a pause with jitter; batches then shrink
//! while conflicts last (docs/seller-server.md "Several processes").

use std::any::Any;
use std::sync::mpsc;

pub mod postgres;
pub mod sqlite;
pub mod usage;

/// The schema, the same for both backends (types both accept). Times are Unix seconds.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    event_id   TEXT PRIMARY KEY,
    activity   TEXT NOT NULL,
    digest     TEXT NOT NULL,
    response   TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    instance_id TEXT,
    order_id    TEXT,
    customer_id TEXT,
    result_code TEXT,
    retries     BIGINT NOT NULL DEFAULT 0,
    last_at     BIGINT,
    license_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    product     TEXT NOT NULL,
    license_id  TEXT NOT NULL UNIQUE,
    devices     TEXT NOT NULL,
    not_before  BIGINT NOT NULL,
    not_after   BIGINT,
    status      TEXT NOT NULL,
    frozen      BIGINT NOT NULL,
    license     TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    license_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS licenses (
    sha256     TEXT PRIMARY KEY,
    license_id TEXT NOT NULL,
    event_id   TEXT,
    issued_at  BIGINT NOT NULL,
    text       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    license_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    action     TEXT NOT NULL,
    token      TEXT NOT NULL,
    issued_at  BIGINT NOT NULL,
    PRIMARY KEY (license_id, seq)
);
CREATE TABLE IF NOT EXISTS nonces (
    nonce   TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS nonces_by_time ON nonces (seen_at);
CREATE TABLE IF NOT EXISTS uploads (
    event_id    TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    license     TEXT NOT NULL,
    attempts    BIGINT NOT NULL,
    next_at     BIGINT NOT NULL,
    done_at     BIGINT,
    last_error  TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_due ON uploads (next_at) WHERE done_at IS NULL;
CREATE TABLE IF NOT EXISTS codes (
    code       TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    frozen     BIGINT NOT NULL,
    expire_at  BIGINT,
    seq        BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    device_key TEXT
);
CREATE TABLE IF NOT EXISTS code_activity (
    code          TEXT PRIMARY KEY,
    query_at      BIGINT,
    query_status  TEXT,
    usage_calls   BIGINT NOT NULL,
    usage_entries BIGINT NOT NULL,
    usage_at      BIGINT,
    usage_result  TEXT
);
CREATE TABLE IF NOT EXISTS console_sessions (
    id_sha256  TEXT PRIMARY KEY,
    csrf       TEXT NOT NULL,
    address    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device_code TEXT PRIMARY KEY,
    device_key  TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_key ON devices (device_key);
CREATE TABLE IF NOT EXISTS enrollments (
    token_sha256 TEXT PRIMARY KEY,
    label        TEXT NOT NULL,
    quota        BIGINT NOT NULL,
    used         BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    revoked      BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrolled_keys (
    device_key   TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    enrolled_at  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS buckets (
    name  TEXT PRIMARY KEY,
    level BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
";

/// The device code → instance links: one row per code in an instance's `devices` list,
/// kept by `put_instance` in the same transaction, so "which instances may this device
/// bill" is an index lookup, not a scan of every instance's list (issue 19). Created by
/// each backend's migration, which fills it from `instances.devices` when the table is
/// new (a database made before the table existed).
pub const LINK_SCHEMA: &str = "
CREATE TABLE instance_devices (
    device_code TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    PRIMARY KEY (device_code, instance_id)
);
CREATE INDEX instance_devices_by_instance ON instance_devices (instance_id);
";

/// Indexes older versions made that no query reads, dropped by each backend's migration:
/// each was one more B-tree insert, at a random position, for every license issued
/// (`licenses_by_id`: nothing looks a license up by id in `licenses`; the current
/// license of an id is `instances`', by its own unique index).
pub const DROPPED_INDEXES: &str = "DROP INDEX IF EXISTS licenses_by_id;";

/// The call-history columns of `events` (issue 16, the console), added to databases made
/// before them by each backend's migration, and the indexes the console's lookups use
/// (created after the migration: an older table has no such columns before it). The
/// order and customer indexes are partial: most calls (§2 `getLicense` with an
/// `instanceId`) carry neither, and write no entry there.
///
/// `license_sha256` came later (storing each license once): a license answer's row keeps
/// the license it answered by reference (`licenses.sha256`) and an empty `response`, which
/// reading rebuilds byte for byte ([`stored_response`]).
pub const EVENT_HISTORY_COLUMNS: [(&str, &str); 7] = [
    ("instance_id", "TEXT"),
    ("order_id", "TEXT"),
    ("customer_id", "TEXT"),
    ("result_code", "TEXT"),
    ("retries", "BIGINT NOT NULL DEFAULT 0"),
    ("last_at", "BIGINT"),
    ("license_sha256", "TEXT"),
];
pub const EVENT_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS events_by_instance ON events (instance_id, created_at);
CREATE INDEX IF NOT EXISTS events_by_order ON events (order_id) WHERE order_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_customer ON events (customer_id) WHERE customer_id IS NOT NULL;
";

/// The columns of an [`EventRow`] as both backends write them.
macro_rules! event_cols {
    () => {
        "event_id, activity, digest, response, created_at, instance_id, order_id, \
         customer_id, result_code, retries, last_at, license_sha256"
    };
}
pub(crate) use event_cols;

/// What both backends read for an [`EventRow`]: its columns in [`event_cols`]' order, then
/// the referenced license's id and text (NULL for an answer stored whole), which
/// [`stored_response`] turns back into the answer. A `WHERE` on `e.` follows.
/// (A macro, so that the hot statements are `concat!`ed constants, not rebuilt per call.)
macro_rules! event_select {
    () => {
        "SELECT e.event_id, e.activity, e.digest, e.response, e.created_at, e.instance_id, \
         e.order_id, e.customer_id, e.result_code, e.retries, e.last_at, e.license_sha256, \
         l.license_id, l.text FROM events e LEFT JOIN licenses l ON l.sha256 = e.license_sha256"
    };
}
pub(crate) use event_select;
pub const EVENT_SELECT: &str = event_select!();

/// The answer an `events` row stands for: `response` as stored, or for a row that
/// references its license (`license_sha256`, with that license's id and text from
/// `licenses`) the license answer rebuilt from it, the same bytes
/// ([`super::activities::answer_for`] made them when the row was written).
pub fn stored_response(
    row: &mut EventRow,
    license: Option<(String, String)>,
) -> Result<(), DbError> {
    let Some(sha) = &row.license_sha256 else {
        return Ok(());
    };
    let (Some((license_id, text)), Some(instance)) = (license, &row.instance_id) else {
        return Err(DbError::Backend(format!(
            "events {}: license {sha} or its instance is missing",
            row.event_id
        )));
    };
    row.response = super::activities::answer_for(instance, &license_id, &text);
    Ok(())
}

/// The columns of an [`InstanceRow`], in the order both backends read them.
macro_rules! instance_cols {
    () => {
        "instance_id, product, license_id, devices, not_before, not_after, status, frozen, \
         license, seq, updated_at"
    };
}
pub(crate) use instance_cols;
pub const INSTANCE_COLS: &str = instance_cols!();

/// What both backends read for an [`InstanceRow`], in [`instance_cols`]' order: the
/// license from `licenses` when the row references it (`license_sha256`, written by
/// [`Tx::put_new_instance`]; its own `license` is then empty), else its own. A `WHERE`
/// on `i.` follows.
macro_rules! instance_select {
    () => {
        "SELECT i.instance_id, i.product, i.license_id, i.devices, i.not_before, \
         i.not_after, i.status, i.frozen, \
         CASE WHEN i.license_sha256 IS NULL THEN i.license ELSE l.text END, i.seq, \
         i.updated_at FROM instances i LEFT JOIN licenses l ON l.sha256 = i.license_sha256"
    };
}
pub(crate) use instance_select;
pub const INSTANCE_SELECT: &str = instance_select!();

/// Columns of `instances` added since the first schema, for databases made before them
/// (SQLite's migration; PostgreSQL's `MIGRATIONS` names it too): `license_sha256`, an
/// instance's license by reference.
pub const INSTANCE_COLUMNS: [(&str, &str); 1] = [("license_sha256", "TEXT")];

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DbError {
    /// The database failed; the message is for the log, not for responses.
    #[error("database: {0}")]
    Backend(String),
    /// The request's work is given up and rolled back (e.g. a status token could not be
    /// made); the message may be shown.
    #[error("{0}")]
    Abort(String),
    /// A conflict with a concurrent transaction: the batch runs again.
    #[error("serialization conflict")]
    Retry,
    #[error("the database thread has stopped")]
    Stopped,
}

/// A marketplace request already answered, by `eventId`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub event_id: String,
    pub activity: String,
    /// SHA-256 (hex) of the canonical request: a resend has the same.
    pub digest: String,
    /// The exact response body sent.
    pub response: String,
    pub created_at: i64,
    /// What the call was about: its instance (the one a §2.1 order made), or for the
    /// authorization-code activities the code. None: not known (rows from before these
    /// columns, or a call refused before its instance could be read).
    pub instance_id: Option<String>,
    pub order_id: Option<String>,
    pub customer_id: Option<String>,
    /// The `resultCode` answered (None: a row from before this column).
    pub result_code: Option<String>,
    /// Times the marketplace sent the same request again and got this answer back.
    pub retries: i64,
    /// When it was last answered again (None: never resent).
    pub last_at: Option<i64>,
    /// A license answer stored by reference: the SHA-256 (hex) of the license in
    /// `licenses`, which holds the only copy; `put_event` then ignores `response`
    /// (stores an empty string) and reading rebuilds it. The answer must be the license
    /// answer `activities::answer_for(instance_id, that license's id, its text)`. None:
    /// the response is stored whole.
    pub license_sha256: Option<String>,
}

/// Which calls the console's history lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallsBy<'a> {
    Instance(&'a str),
    Order(&'a str),
    Customer(&'a str),
}

/// One marketplace instance and its current license.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub instance_id: String,
    pub product: String,
    pub license_id: String,
    pub devices: Vec<String>,
    pub not_before: i64,
    pub not_after: Option<i64>,
    pub status: InstanceStatus,
    pub frozen: bool,
    /// The current license text.
    pub license: String,
    /// The last status-token sequence number used for this license (0: none yet).
    pub seq: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    Active,
    Expired,
    Released,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Active => "active",
            InstanceStatus::Expired => "expired",
            InstanceStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Result<Self, DbError> {
        match s {
            "active" => Ok(InstanceStatus::Active),
            "expired" => Ok(InstanceStatus::Expired),
            "released" => Ok(InstanceStatus::Released),
            other => Err(DbError::Backend(format!(
                "unknown instance status {other:?}"
            ))),
        }
    }
}

/// A signed status token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub license_id: String,
    pub seq: i64,
    pub action: String,
    pub token: String,
    pub issued_at: i64,
}

/// An authorization code (Part B) the marketplace has told us about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRow {
    pub code: String,
    /// `active` or `released`.
    pub status: String,
    pub frozen: bool,
    pub expire_at: Option<i64>,
    pub seq: i64,
    pub updated_at: i64,
    /// The relay's trust on first use: the device key (base64) that activated the code
    /// through the relay; None: not activated through the relay yet.
    pub device_key: Option<String>,
}

/// What the relay forwarded for an authorization code (the console's codes page): the
/// last daily query and what the marketplace said, and the usage reports relayed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CodeActivityRow {
    pub code: String,
    /// The last daily query (heartbeat) relayed, and the marketplace's answer: the
    /// code's status (`ALIVE`, `EXPIRED`…) or the error.
    pub query_at: Option<i64>,
    pub query_status: Option<String>,
    /// Usage reports relayed that named this code, and their entries in total.
    pub usage_calls: i64,
    pub usage_entries: i64,
    pub usage_at: Option<i64>,
    /// The marketplace's answer to the last one (`accepted` or the error).
    pub usage_result: Option<String>,
}

/// A license to upload to the marketplace (`getLicenseAsync`, §2): the outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub event_id: String,
    pub instance_id: String,
    pub license: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// Not before this time (Unix seconds).
    pub next_at: i64,
    /// When the marketplace accepted it; None: still to do.
    pub done_at: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
}

/// The device registry: a device key (base64 ed25519, the relay protocol's) bound to one
/// device code by trust on first use (docs/seller-server.md "Security"). A key may hold
/// several codes (a device code is per product); a code has one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub device_code: String,
    pub device_key: String,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// An enrollment token of the relay (stored by its SHA-256, never in clear): up to
/// `quota` device keys may enroll with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentRow {
    pub token_sha256: String,
    pub label: String,
    pub quota: i64,
    pub used: i64,
    pub created_at: i64,
    pub revoked: bool,
}

/// A token bucket's stored state (see `limits`): milli-tokens at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRow {
    pub level: i64,
    pub at_ms: i64,
}

/// The queries, inside a transaction.
pub trait Tx {
    /// Remembers `nonce`; false if it was already seen.
    fn nonce_fresh(&mut self, nonce: &str, now: i64) -> Result<bool, DbError>;
    /// Forgets nonces seen before `before` (they are outside the timestamp window).
    fn prune_nonces(&mut self, before: i64) -> Result<u64, DbError>;
    fn event(&mut self, event_id: &str) -> Result<Option<EventRow>, DbError>;
    fn put_event(&mut self, row: &EventRow) -> Result<(), DbError>;
    /// The marketplace sent `event_id` again and got its stored answer: one more retry,
    /// last answered at `now`.
    fn event_resent(&mut self, event_id: &str, now: i64) -> Result<(), DbError>;
    /// The calls about an instance (or code), an order or a customer, latest first, at
    /// most `limit`.
    fn calls(&mut self, by: CallsBy<'_>, limit: i64) -> Result<Vec<EventRow>, DbError>;
    fn instance(&mut self, instance_id: &str) -> Result<Option<InstanceRow>, DbError>;
    fn instance_by_license(&mut self, license_id: &str) -> Result<Option<InstanceRow>, DbError>;
    /// Inserts or replaces.
    fn put_instance(&mut self, row: &InstanceRow) -> Result<(), DbError>;
    /// Inserts an instance the caller has just looked up in this transaction and not
    /// found: no upsert, and no device links to compare with. Its license is the one
    /// [`Tx::record_license`] stored under `license_sha256` (in this transaction): the row
    /// references it instead of holding a second copy, and reads give it back whole.
    /// ([`Tx::put_instance`], e.g. a freeze, writes the license inline again.)
    fn put_new_instance(&mut self, row: &InstanceRow, license_sha256: &str) -> Result<(), DbError> {
        let _ = license_sha256;
        self.put_instance(row)
    }
    /// Keeps a copy of every license issued (the same bytes twice are stored once);
    /// returns its key, the SHA-256 (hex) of the text.
    fn record_license(
        &mut self,
        license_id: &str,
        event_id: Option<&str>,
        text: &str,
        issued_at: i64,
    ) -> Result<String, DbError>;
    fn put_token(&mut self, row: &TokenRow) -> Result<(), DbError>;
    fn latest_token(&mut self, license_id: &str) -> Result<Option<TokenRow>, DbError>;
    fn code(&mut self, code: &str) -> Result<Option<CodeRow>, DbError>;
    /// Inserts or replaces.
    fn put_code(&mut self, row: &CodeRow) -> Result<(), DbError>;
    /// Every authorization code, latest change first, at most `limit`.
    fn all_codes(&mut self, limit: i64) -> Result<Vec<CodeRow>, DbError>;
    fn code_activity(&mut self, code: &str) -> Result<Option<CodeActivityRow>, DbError>;
    /// The relay forwarded a daily query for `code`; the marketplace said `status`.
    fn note_code_query(&mut self, code: &str, at: i64, status: &str) -> Result<(), DbError>;
    /// The relay forwarded a usage report with `entries` entries for `code`.
    fn note_code_usage(
        &mut self,
        code: &str,
        at: i64,
        entries: i64,
        result: &str,
    ) -> Result<(), DbError>;
    /// The console session whose cookie hashes to `id_sha256`, made at or after
    /// `since`: (CSRF token, address, created).
    fn console_session(
        &mut self,
        id_sha256: &str,
        since: i64,
    ) -> Result<Option<(String, String, i64)>, DbError>;
    /// Stores a session; forgets those made before `expired_before`, and the oldest
    /// beyond `max` sessions.
    fn put_console_session(
        &mut self,
        id_sha256: &str,
        csrf: &str,
        address: &str,
        created_at: i64,
        expired_before: i64,
        max: i64,
    ) -> Result<(), DbError>;
    fn delete_console_session(&mut self, id_sha256: &str) -> Result<(), DbError>;
    /// Distinct licenses issued so far (checks and the bench).
    fn count_licenses(&mut self) -> Result<i64, DbError>;
    /// The license upload outbox (`getLicenseAsync`): inserts or replaces by event.
    fn put_upload(&mut self, row: &UploadRow) -> Result<(), DbError>;
    fn upload(&mut self, event_id: &str) -> Result<Option<UploadRow>, DbError>;
    /// Uploads not done whose `next_at` has come, oldest first, at most `limit`.
    fn due_uploads(&mut self, now: i64, limit: i64) -> Result<Vec<UploadRow>, DbError>;
    /// (not done, done) counts.
    fn count_uploads(&mut self) -> Result<(i64, i64), DbError>;
    /// The outbox for `seller outbox`: every row not done (next try first), then at most
    /// `done_limit` done rows (latest first).
    fn list_uploads(&mut self, done_limit: i64) -> Result<Vec<UploadRow>, DbError>;

    /// The binding of device code `code`, if any.
    fn device_by_code(&mut self, code: &str) -> Result<Option<DeviceRow>, DbError>;
    /// Every code bound to `key`, most recently seen first.
    fn device_codes(&mut self, key: &str) -> Result<Vec<DeviceRow>, DbError>;
    /// Every binding, by device code (the seller's listing).
    fn all_devices(&mut self) -> Result<Vec<DeviceRow>, DbError>;
    /// Inserts or replaces (by device code).
    fn put_device(&mut self, row: &DeviceRow) -> Result<(), DbError>;
    /// Forgets the binding of `code` (the seller's release); false: there was none.
    fn release_device(&mut self, code: &str) -> Result<bool, DbError>;
    /// Instances whose license is bound to device code `code`, by instance id.
    fn instances_with_device(&mut self, code: &str) -> Result<Vec<InstanceRow>, DbError>;
    /// The instances whose issued license is bound to a device code bound to `key`
    /// (what a usage record from that device may bill), by instance id: index lookups
    /// (devices by key → links by code → instances by id).
    fn instances_for_device(&mut self, key: &str) -> Result<Vec<InstanceRow>, DbError>;
    fn bucket(&mut self, name: &str) -> Result<Option<BucketRow>, DbError>;
    /// Inserts or replaces.
    fn put_bucket(&mut self, name: &str, row: BucketRow) -> Result<(), DbError>;
    /// Forgets buckets untouched since `before_ms` (they have refilled by then).
    fn prune_buckets(&mut self, before_ms: i64) -> Result<u64, DbError>;

    /// Whether `key` holds a device code (registry) or an authorization code (relay).
    fn key_bound(&mut self, key: &str) -> Result<bool, DbError>;
    /// Whether `key` enrolled with an enrollment token.
    fn key_enrolled(&mut self, key: &str) -> Result<bool, DbError>;
    fn enrollment(&mut self, token_sha256: &str) -> Result<Option<EnrollmentRow>, DbError>;
    fn all_enrollments(&mut self) -> Result<Vec<EnrollmentRow>, DbError>;
    /// Inserts or replaces.
    fn put_enrollment(&mut self, row: &EnrollmentRow) -> Result<(), DbError>;
    fn put_enrolled_key(&mut self, key: &str, token_sha256: &str, at: i64) -> Result<(), DbError>;

    /// The device `key`: its most recently seen binding; None: unknown key.
    fn device(&mut self, key: &str) -> Result<Option<DeviceRow>, DbError> {
        Ok(self.device_codes(key)?.into_iter().next())
    }

    /// The usage relay's outbox (issue 19).
    fn usage(&mut self) -> &mut dyn usage::UsageOutbox;
}

/// A database connection with transaction control.
pub trait Backend: Send {
    fn begin(&mut self) -> Result<(), DbError>;
    fn savepoint(&mut self) -> Result<(), DbError>;
    fn release_savepoint(&mut self) -> Result<(), DbError>;
    fn rollback_savepoint(&mut self) -> Result<(), DbError>;
    fn commit(&mut self) -> Result<(), DbError>;
    fn rollback(&mut self);
    fn tx(&mut self) -> &mut dyn Tx;
}

type Work = Box<dyn FnMut(&mut dyn Tx) -> Result<Box<dyn Any + Send>, DbError> + Send>;
type Reply = tokio::sync::oneshot::Sender<Result<Box<dyn Any + Send>, DbError>>;

struct Job {
    work: Work,
    reply: Reply,
}

impl Job {
    /// `f` as a job, and the receiver of its result.
    fn new<R: Send + 'static>(
        mut f: impl FnMut(&mut dyn Tx) -> Result<R, DbError> + Send + 'static,
    ) -> (Job, tokio::sync::oneshot::Receiver<JobResult>) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let work: Work = Box::new(move |tx| f(tx).map(|r| Box::new(r) as Box<dyn Any + Send>));
        (Job { work, reply }, rx)
    }
}

/// Most requests one transaction takes.
const MAX_BATCH: usize = 512;
/// Times a request is run again after serialization conflicts before giving up.
const MAX_RETRIES: u32 = 20;
/// The pause before the first retry after a conflict, and the most it grows to (equal
/// jitter, `kooagent_edge::backoff`): replicas whose transactions collided must not collide again
/// at once.
const RETRY_INITIAL_MS: u64 = 2;
const RETRY_MAX_MS: u64 = 250;

/// The handle to the database threads; cheap to clone.
#[derive(Clone)]
pub struct Db {
    jobs: mpsc::Sender<Job>,
}

impl Db {
    /// Starts the database thread on `backend`.
    pub fn start(backend: Box<dyn Backend>) -> Db {
        Self::start_pool(vec![backend])
    }

    /// Starts one database thread per connection in `backends` (at least one), taking
    /// jobs from one queue: a transaction stalled on a lock held by another replica holds
    /// up its own batch, not every request of this process.
    pub fn start_pool(backends: Vec<Box<dyn Backend>>) -> Db {
        assert!(!backends.is_empty(), "a database pool needs a connection");
        let (jobs, rx) = mpsc::channel();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for (i, backend) in backends.into_iter().enumerate() {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("seller-db-{i}"))
                .spawn(move || db_thread(backend, &rx))
                .expect("spawn a database thread");
        }
        Db { jobs }
    }

    fn submit<R: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<R, DbError> + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<Box<dyn Any + Send>, DbError>> {
        let (job, rx) = Job::new(f);
        // A send error drops the reply, which the receiver sees as Stopped.
        let _ = self.jobs.send(job);
        rx
    }

    fn unpack<R: 'static>(
        r: Result<Result<Box<dyn Any + Send>, DbError>, tokio::sync::oneshot::error::RecvError>,
    ) -> Result<R, DbError> {
        let any = r.map_err(|_| DbError::Stopped)??;
        Ok(*any.downcast::<R>().expect("the job's own result type"))
    }

    /// Runs `f` in a transaction (with others); `f` may run more than once when the
    /// database asks for a retry, so it must only read and write through `tx`.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<R, DbError> + Send + 'static,
    ) -> Result<R, DbError> {
        Self::unpack(self.submit(f).await)
    }

    /// The same, for callers outside the async runtime (CLI, tests).
    pub fn run_blocking<R: Send + 'static>(
        &self,
        f: impl FnMut(&mut dyn Tx) -> Result<R, DbError> + Send + 'static,
    ) -> Result<R, DbError> {
        Self::unpack(self.submit(f).blocking_recv())
    }
}

/// The batch size adapts (additive increase, multiplicative decrease): every conflict
/// halves the most the next batch takes, every clean commit raises it by one. One
/// process alone never conflicts and keeps group commit's full batches; replicas that
/// collide settle on small batches, so one conflict re-runs few requests.
fn db_thread(mut backend: Box<dyn Backend>, rx: &std::sync::Mutex<mpsc::Receiver<Job>>) {
    super::heap::warm_this_thread(super::heap::DB_HEAP);
    let mut limit = MAX_BATCH;
    loop {
        let mut batch = {
            // The queue is held while a batch is gathered, never while it runs.
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            let Ok(first) = rx.recv() else { return };
            let mut batch = vec![first];
            while batch.len() < limit {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            batch
        };
        let (results, conflicts) = run_batch(backend.as_mut(), &mut batch);
        limit = if conflicts > 0 {
            (limit / 2).max(1)
        } else {
            (limit + 1).min(MAX_BATCH)
        };
        for (job, r) in batch.into_iter().zip(results) {
            // The work first: what it holds that the caller shares is then the caller's
            // to free, on its own thread, once it has the answer.
            let Job { work, reply } = job;
            drop(work);
            let _ = reply.send(r);
        }
    }
}

type JobResult = Result<Box<dyn Any + Send>, DbError>;

/// Runs a batch; also returns how many serialization conflicts it met. After a conflict a
/// batch of several requests is not run again whole: each request then runs in a
/// transaction of its own, so only those that really collide are retried (after a
/// pause), and rows are locked one request at a time (no lock-order cycle between two
/// replicas' batches).
fn run_batch(b: &mut dyn Backend, batch: &mut [Job]) -> (Vec<JobResult>, u32) {
    match run_together(b, batch) {
        Ok(results) => (results, 0),
        Err(()) if batch.len() == 1 => {
            let (r, conflicts) = run_alone(b, &mut batch[0], 1);
            (vec![r], conflicts)
        }
        Err(()) => {
            let mut conflicts = 1;
            let mut results = Vec::with_capacity(batch.len());
            for job in batch.iter_mut() {
                let (r, c) = run_alone(b, job, 0);
                conflicts += c;
                results.push(r);
            }
            (results, conflicts)
        }
    }
}

/// The batch in one transaction; Err(()) after a serialization conflict (rolled back).
fn run_together(b: &mut dyn Backend, batch: &mut [Job]) -> Result<Vec<JobResult>, ()> {
    let fail_all = |e: DbError, n: usize| (0..n).map(|_| Err(e.clone())).collect::<Vec<_>>();
    // First without savepoints: almost every job succeeds, and a savepoint per job costs
    // a copy of every page it changes (SQLite's sub-journal) besides its statements.
    let mut savepoints = false;
    loop {
        let started = std::time::Instant::now();
        let attempt = try_batch(b, batch, savepoints);
        let outcome = match &attempt {
            Ok(_) => super::metrics::TxOutcome::Done,
            Err(DbError::Retry) => super::metrics::TxOutcome::Conflict,
            Err(_) => super::metrics::TxOutcome::Error,
        };
        super::metrics::transaction(started.elapsed(), outcome);
        match attempt {
            Ok(Attempt::Done(results)) => return Ok(results),
            Ok(Attempt::JobFailed) => {
                // A job failed after (maybe) writing: only its own savepoint can undo
                // its work alone, so the batch runs again, each job in one.
                b.rollback();
                savepoints = true;
            }
            Err(DbError::Retry) => {
                b.rollback();
                return Err(());
            }
            Err(e) => {
                log::error!("{e}");
                b.rollback();
                return Ok(fail_all(e, batch.len()));
            }
        }
    }
}

/// One job in transactions of its own until it commits, fails, or meets
/// [`MAX_RETRIES`] conflicts (`conflicts` already met), pausing with jitter before each
/// retry. Returns its result and the conflicts met here.
fn run_alone(b: &mut dyn Backend, job: &mut Job, mut conflicts: u32) -> (JobResult, u32) {
    let first = conflicts;
    loop {
        if conflicts > 0 {
            let ms =
                kooagent_edge::backoff::equal_jitter(RETRY_INITIAL_MS, RETRY_MAX_MS, conflicts);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        match run_together(b, std::slice::from_mut(job)) {
            Ok(mut r) => return (r.pop().expect("one result"), conflicts - first),
            Err(()) => {
                conflicts += 1;
                if conflicts >= MAX_RETRIES {
                    log::error!("database: gave up after {MAX_RETRIES} serialization conflicts");
                    super::metrics::db_error();
                    let e = DbError::Backend("too many serialization conflicts".into());
                    return (Err(e), conflicts - first);
                }
            }
        }
    }
}

enum Attempt {
    Done(Vec<JobResult>),
    /// Without savepoints, a job returned an error: the transaction must be rolled back.
    JobFailed,
}

/// One attempt: Err only for what fails the whole batch (begin/commit, a conflict).
/// Without `savepoints`, the first job that fails ends the attempt (`JobFailed`) unless
/// it is the batch's only job: then rolling back the transaction is rolling back the job.
fn try_batch(b: &mut dyn Backend, batch: &mut [Job], savepoints: bool) -> Result<Attempt, DbError> {
    b.begin()?;
    let alone = batch.len() == 1;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        if savepoints {
            b.savepoint()?;
        }
        match (job.work)(b.tx()) {
            Ok(v) => {
                if savepoints {
                    b.release_savepoint()?;
                }
                results.push(Ok(v));
            }
            Err(DbError::Retry) => return Err(DbError::Retry),
            Err(e) if savepoints => {
                b.rollback_savepoint()?;
                results.push(Err(e));
            }
            Err(e) if alone => {
                b.rollback();
                return Ok(Attempt::Done(vec![Err(e)]));
            }
            Err(_) => return Ok(Attempt::JobFailed),
        }
    }
    b.commit()?;
    Ok(Attempt::Done(results))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The backends every storage test runs on: SQLite always, PostgreSQL when
    /// `KOOAGENT_TEST_PG_URL` is set (scripts/pg-test.sh starts one). Each PostgreSQL
    /// backend gets a schema of its own, so tests do not see each other's rows.
    pub fn backends(dir: &std::path::Path) -> Vec<(&'static str, Box<dyn Backend>)> {
        let mut v: Vec<(&'static str, Box<dyn Backend>)> = vec![(
            "sqlite",
            Box::new(sqlite::Sqlite::open(&dir.join("seller.db")).unwrap()),
        )];
        if let Some(url) = pg_url() {
            let schema = postgres::tests::fresh_schema(&url);
            v.push((
                "postgres",
                Box::new(postgres::Postgres::connect(&url, &schema).unwrap()),
            ));
        }
        v
    }

    pub fn pg_url() -> Option<String> {
        std::env::var("KOOAGENT_TEST_PG_URL")
            .ok()
            .filter(|s| !s.is_empty())
    }

    /// The `instances` and `devices` tables as made before the device links existed, with
    /// rows: instances i1 [A], i2 [A, B], i3 [C], i4 [] (and AB, whose code contains A);
    /// device A and AB with key K1, B with K2, C with K3. SQL both backends take.
    pub const OLD_INSTANCES: &str = "
        CREATE TABLE instances (instance_id TEXT PRIMARY KEY, product TEXT NOT NULL,
            license_id TEXT NOT NULL UNIQUE, devices TEXT NOT NULL, not_before BIGINT NOT NULL,
            not_after BIGINT, status TEXT NOT NULL, frozen BIGINT NOT NULL,
            license TEXT NOT NULL, seq BIGINT NOT NULL, updated_at BIGINT NOT NULL);
        CREATE TABLE devices (device_code TEXT PRIMARY KEY, device_key TEXT NOT NULL,
            first_seen BIGINT NOT NULL, last_seen BIGINT NOT NULL);
        INSERT INTO instances VALUES
            ('i1', 'p1', 'kg-i1', '[\"A\"]', 0, NULL, 'active', 0, 'kl1.1', 0, 1),
            ('i2', 'p2', 'kg-i2', '[\"A\",\"B\"]', 0, NULL, 'released', 1, 'kl1.2', 3, 1),
            ('i3', 'p1', 'kg-i3', '[\"C\"]', 0, 9, 'expired', 0, 'kl1.3', 0, 1),
            ('i4', 'p1', 'kg-i4', '[]', 0, NULL, 'active', 0, 'kl1.4', 0, 1),
            ('i5', 'p1', 'kg-i5', '[\"AB\"]', 0, NULL, 'active', 0, 'kl1.5', 0, 1);
        INSERT INTO devices VALUES ('A', 'K1', 1, 5), ('AB', 'K1', 1, 4), ('B', 'K2', 1, 1),
            ('C', 'K3', 1, 1);
    ";

    /// The `licenses` table as made before [`DROPPED_INDEXES`], with its index and two
    /// licenses. SQL both backends take.
    pub const OLD_LICENSES: &str = "
        CREATE TABLE licenses (sha256 TEXT PRIMARY KEY, license_id TEXT NOT NULL,
            event_id TEXT, issued_at BIGINT NOT NULL, text TEXT NOT NULL);
        CREATE INDEX licenses_by_id ON licenses (license_id);
        INSERT INTO licenses VALUES ('s1', 'kg-a', 'e1', 1, 'kl1.a'), ('s2', 'kg-b', NULL, 2, 'kl1.b');
    ";

    /// What [`OLD_LICENSES`] holds once migrated: the rows, and new licenses stored once.
    pub fn check_old_licenses_migrated(tx: &mut dyn Tx) {
        assert_eq!(tx.count_licenses().unwrap(), 2);
        tx.record_license("kg-a", Some("e2"), "kl1.a2", 3).unwrap();
        tx.record_license("kg-a", Some("e2"), "kl1.a2", 3).unwrap();
        assert_eq!(tx.count_licenses().unwrap(), 3);
    }

    /// The `events` table as made before the call-history columns (issue 16), with a
    /// stored answer. SQL both backends take.
    pub const OLD_EVENTS: &str = "
        CREATE TABLE events (event_id TEXT PRIMARY KEY, activity TEXT NOT NULL,
            digest TEXT NOT NULL, response TEXT NOT NULL, created_at BIGINT NOT NULL);
        INSERT INTO events VALUES ('e-old', 'getLicense', 'v2:abc:X', '{\"resultCode\":\"000000\"}', 5);
    ";

    /// What [`OLD_EVENTS`] reads once migrated: the old row whole with empty history
    /// fields, resends counted on it, and new rows with every column.
    pub fn check_old_events_migrated(tx: &mut dyn Tx) {
        let old = tx.event("e-old").unwrap().unwrap();
        assert_eq!(
            (
                old.activity.as_str(),
                old.digest.as_str(),
                old.response.as_str(),
                old.created_at
            ),
            ("getLicense", "v2:abc:X", "{\"resultCode\":\"000000\"}", 5)
        );
        assert_eq!(
            (old.instance_id, old.result_code, old.retries, old.last_at),
            (None, None, 0, None)
        );
        tx.event_resent("e-old", 9).unwrap();
        let old = tx.event("e-old").unwrap().unwrap();
        assert_eq!((old.retries, old.last_at), (1, Some(9)));
        let new = EventRow {
            event_id: "e-new".into(),
            activity: "getLicense".into(),
            digest: "d".into(),
            response: "r".into(),
            created_at: 6,
            instance_id: Some("i1".into()),
            order_id: Some("o1".into()),
            customer_id: Some("c1".into()),
            result_code: Some("000000".into()),
            retries: 0,
            last_at: None,
            license_sha256: None,
        };
        tx.put_event(&new).unwrap();
        for by in [
            CallsBy::Instance("i1"),
            CallsBy::Order("o1"),
            CallsBy::Customer("c1"),
        ] {
            assert_eq!(tx.calls(by, 10).unwrap(), std::slice::from_ref(&new));
        }
        check_answer_by_reference(tx);
    }

    /// A license answer stored by reference (its license's one copy in `licenses`) reads
    /// back byte for byte, by `eventId` and in the call history.
    pub fn check_answer_by_reference(tx: &mut dyn Tx) {
        let text = "kl1.by-ref \"quoted\"";
        let sha = tx.record_license("kg-i9", Some("e-ref"), text, 7).unwrap();
        let answer = crate::server::activities::answer_for("i9", "kg-i9", text);
        let by_ref = EventRow {
            event_id: "e-ref".into(),
            activity: "getLicense".into(),
            digest: "d".into(),
            response: answer,
            created_at: 7,
            instance_id: Some("i9".into()),
            order_id: None,
            customer_id: None,
            result_code: Some("000000".into()),
            retries: 0,
            last_at: None,
            license_sha256: Some(sha),
        };
        tx.put_event(&by_ref).unwrap();
        assert_eq!(tx.event("e-ref").unwrap().as_ref(), Some(&by_ref));
        assert_eq!(
            tx.calls(CallsBy::Instance("i9"), 10).unwrap(),
            std::slice::from_ref(&by_ref)
        );
    }

    /// The instance ids of a lookup.
    pub fn ids(rows: Vec<InstanceRow>) -> Vec<String> {
        rows.into_iter().map(|i| i.instance_id).collect()
    }

    /// What [`OLD_INSTANCES`] answers once the links are made, and a rebind moving them.
    pub fn check_old_instances_migrated(tx: &mut dyn Tx) {
        assert_eq!(
            ids(tx.instances_for_device("K1").unwrap()),
            ["i1", "i2", "i5"]
        );
        assert_eq!(ids(tx.instances_for_device("K2").unwrap()), ["i2"]);
        assert_eq!(ids(tx.instances_for_device("K3").unwrap()), ["i3"]);
        assert!(tx.instances_for_device("K9").unwrap().is_empty());
        assert_eq!(ids(tx.instances_with_device("A").unwrap()), ["i1", "i2"]);
        assert_eq!(ids(tx.instances_with_device("AB").unwrap()), ["i5"]);
        // The rows come back whole.
        let i2 = tx.instances_for_device("K2").unwrap().remove(0);
        assert_eq!(
            (i2.devices, i2.status, i2.frozen, i2.seq),
            (
                vec!["A".to_string(), "B".to_string()],
                InstanceStatus::Released,
                true,
                3
            )
        );
        // A rebind of i1 from A to C moves its link.
        let mut i1 = tx.instance("i1").unwrap().unwrap();
        i1.devices = vec!["C".into()];
        tx.put_instance(&i1).unwrap();
        assert_eq!(ids(tx.instances_for_device("K1").unwrap()), ["i2", "i5"]);
        assert_eq!(ids(tx.instances_for_device("K3").unwrap()), ["i1", "i3"]);
        assert_eq!(ids(tx.instances_with_device("A").unwrap()), ["i2"]);
        check_instance_by_reference(tx);
    }

    /// An instance written with its license by reference reads back whole by every
    /// lookup; rewritten by `put_instance` (a freeze) it holds its license itself again.
    pub fn check_instance_by_reference(tx: &mut dyn Tx) {
        let text = "kl1.instance-by-ref";
        let sha = tx.record_license("kg-r1", Some("e-r1"), text, 7).unwrap();
        let mut row = InstanceRow {
            instance_id: "r1".into(),
            product: "p1".into(),
            license_id: "kg-r1".into(),
            devices: vec!["R".into()],
            not_before: 1,
            not_after: None,
            status: InstanceStatus::Active,
            frozen: false,
            license: text.into(),
            seq: 0,
            updated_at: 1,
        };
        tx.put_new_instance(&row, &sha).unwrap();
        assert_eq!(tx.instance("r1").unwrap().as_ref(), Some(&row));
        assert_eq!(
            tx.instance_by_license("kg-r1").unwrap().as_ref(),
            Some(&row)
        );
        assert_eq!(tx.instances_with_device("R").unwrap(), [row.clone()]);
        row.frozen = true;
        tx.put_instance(&row).unwrap();
        assert_eq!(tx.instance("r1").unwrap().as_ref(), Some(&row));
    }

    /// Links follow every `put_instance`, inside its transaction: a rebind moves them, a
    /// job that fails after writing an instance leaves no link behind.
    #[test]
    fn device_links_follow_instances_and_roll_back_with_them() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in backends(dir.path()) {
            let db = Db::start(b);
            db.run_blocking(|tx| {
                for (code, key) in [("A", "K1"), ("B", "K2")] {
                    tx.put_device(&DeviceRow {
                        device_code: code.into(),
                        device_key: key.into(),
                        first_seen: 1,
                        last_seen: 1,
                    })?;
                }
                let mut one = instance("i1");
                one.devices = vec!["A".into()];
                tx.put_instance(&one)?;
                tx.put_instance(&instance("i2"))
            })
            .unwrap();
            let for_key = |k: &'static str| {
                ids(db
                    .run_blocking(move |tx| tx.instances_for_device(k))
                    .unwrap())
            };
            assert_eq!(for_key("K1"), ["i1", "i2"], "{name}");
            assert_eq!(for_key("K2"), ["i2"], "{name}");
            // Rebind i1 to B, and i2 to nothing: K1 bills nothing any more.
            db.run_blocking(|tx| {
                let mut one = instance("i1");
                one.devices = vec!["B".into()];
                tx.put_instance(&one)?;
                let mut two = instance("i2");
                two.devices = vec![];
                tx.put_instance(&two)
            })
            .unwrap();
            assert!(for_key("K1").is_empty(), "{name}");
            assert_eq!(for_key("K2"), ["i1"], "{name}");
            // A failed job's instance and links are both undone.
            let failing = db.submit(|tx| {
                tx.put_instance(&instance("i3"))?;
                Err::<(), _>(DbError::Abort("no".into()))
            });
            assert!(Db::unpack::<()>(failing.blocking_recv()).is_err());
            assert!(for_key("K1").is_empty(), "{name}");
            assert_eq!(for_key("K2"), ["i1"], "{name}");
            assert!(db.run_blocking(|tx| tx.instance("i3")).unwrap().is_none());
            // The seller releases device code B: its key bills nothing; a new key that
            // binds B inherits the instances licensed to B.
            assert!(db.run_blocking(|tx| tx.release_device("B")).unwrap());
            assert!(for_key("K2").is_empty(), "{name}");
            db.run_blocking(|tx| {
                tx.put_device(&DeviceRow {
                    device_code: "B".into(),
                    device_key: "K3".into(),
                    first_seen: 2,
                    last_seen: 2,
                })
            })
            .unwrap();
            assert_eq!(for_key("K3"), ["i1"], "{name}");
        }
    }

    fn job(
        f: impl FnMut(&mut dyn Tx) -> Result<bool, DbError> + Send + 'static,
    ) -> (Job, tokio::sync::oneshot::Receiver<JobResult>) {
        Job::new(f)
    }

    /// Batches run without savepoints until a job fails; then the failed job alone is
    /// undone, whether it is in a batch with others or alone.
    #[test]
    fn a_failing_job_is_undone_alone_with_or_without_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mut b) in backends(dir.path()) {
            let (j1, _) = job(|tx| tx.nonce_fresh("a", 1));
            let (j2, _) = job(|tx| {
                tx.nonce_fresh("b", 1)?;
                Err(DbError::Abort("no".into()))
            });
            let (j3, _) = job(|tx| tx.nonce_fresh("c", 1));
            let mut batch = vec![j1, j2, j3];
            let r = run_batch(b.as_mut(), &mut batch).0;
            let r: Vec<_> = r
                .into_iter()
                .map(|r| r.map(|v| *v.downcast::<bool>().unwrap()))
                .collect();
            assert_eq!(
                r,
                vec![Ok(true), Err(DbError::Abort("no".into())), Ok(true)],
                "{name}"
            );
            let (alone, _) = job(|tx| {
                tx.nonce_fresh("d", 1)?;
                Err(DbError::Abort("no".into()))
            });
            let r = run_batch(b.as_mut(), &mut [alone]).0;
            assert_eq!(r.len(), 1);
            assert!(r[0].is_err(), "{name}");
            let (check, _) = job(|tx| {
                Ok(!tx.nonce_fresh("a", 2)?
                    && tx.nonce_fresh("b", 2)?
                    && !tx.nonce_fresh("c", 2)?
                    && tx.nonce_fresh("d", 2)?)
            });
            let r = run_batch(b.as_mut(), &mut [check]).0;
            assert!(
                *r.into_iter()
                    .next()
                    .unwrap()
                    .unwrap()
                    .downcast::<bool>()
                    .unwrap(),
                "{name}"
            );
        }
    }

    fn instance(id: &str) -> InstanceRow {
        InstanceRow {
            instance_id: id.into(),
            product: "sku".into(),
            license_id: format!("kg-{id}"),
            devices: vec!["A".into(), "B".into()],
            not_before: 10,
            not_after: Some(20),
            status: InstanceStatus::Active,
            frozen: false,
            license: "kl1.x.y".into(),
            seq: 0,
            updated_at: 5,
        }
    }

    #[test]
    fn rows_round_trip_and_failed_jobs_roll_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        for (name, b) in backends(dir.path()) {
            let db = Db::start(b);
            assert!(db.run_blocking(|tx| tx.nonce_fresh("n1", 100)).unwrap());
            assert!(!db.run_blocking(|tx| tx.nonce_fresh("n1", 101)).unwrap());
            let row = instance("i1");
            let r2 = row.clone();
            db.run_blocking(move |tx| tx.put_instance(&r2)).unwrap();
            let got = db.run_blocking(|tx| tx.instance("i1")).unwrap();
            assert_eq!(got.as_ref(), Some(&row), "{name}");
            let got = db
                .run_blocking(|tx| tx.instance_by_license("kg-i1"))
                .unwrap();
            assert_eq!(got, Some(row.clone()), "{name}");
            let mut changed = row.clone();
            changed.not_after = None;
            changed.frozen = true;
            changed.status = InstanceStatus::Released;
            let c2 = changed.clone();
            db.run_blocking(move |tx| tx.put_instance(&c2)).unwrap();
            assert_eq!(
                db.run_blocking(|tx| tx.instance("i1")).unwrap(),
                Some(changed),
                "{name}"
            );
            // A job that writes and then fails leaves nothing behind; its neighbours commit.
            let failing = db.submit(|tx| {
                tx.nonce_fresh("gone", 1)?;
                Err::<(), _>(DbError::Abort("no".into()))
            });
            let ok = db.submit(|tx| tx.nonce_fresh("kept", 1));
            assert_eq!(
                Db::unpack::<()>(failing.blocking_recv()),
                Err(DbError::Abort("no".into()))
            );
            assert!(Db::unpack::<bool>(ok.blocking_recv()).unwrap());
            assert!(db.run_blocking(|tx| tx.nonce_fresh("gone", 2)).unwrap());
            assert!(!db.run_blocking(|tx| tx.nonce_fresh("kept", 2)).unwrap());
            assert_eq!(db.run_blocking(|tx| tx.prune_nonces(50)).unwrap(), 2);
            assert!(!db.run_blocking(|tx| tx.nonce_fresh("n1", 102)).unwrap());

            let ev = EventRow {
                event_id: "e1".into(),
                activity: "getLicense".into(),
                digest: "d".into(),
                response: " {\"a\":1}\t".into(),
                created_at: 7,
                instance_id: Some("i1".into()),
                order_id: None,
                customer_id: Some("c1".into()),
                result_code: Some("000000".into()),
                retries: 0,
                last_at: None,
                license_sha256: None,
            };
            let e2 = ev.clone();
            db.run_blocking(move |tx| tx.put_event(&e2)).unwrap();
            assert_eq!(db.run_blocking(|tx| tx.event("e1")).unwrap(), Some(ev));
            assert_eq!(db.run_blocking(|tx| tx.event("e2")).unwrap(), None);

            for seq in [1, 2] {
                db.run_blocking(move |tx| {
                    tx.put_token(&TokenRow {
                        license_id: "kg-i1".into(),
                        seq,
                        action: "freeze".into(),
                        token: format!("t{seq}"),
                        issued_at: 9,
                    })
                })
                .unwrap();
            }
            let t = db.run_blocking(|tx| tx.latest_token("kg-i1")).unwrap();
            assert_eq!(t.unwrap().token, "t2", "{name}");
            // A sequence number is never used twice.
            let dup = db.run_blocking(|tx| {
                tx.put_token(&TokenRow {
                    license_id: "kg-i1".into(),
                    seq: 2,
                    action: "unfreeze".into(),
                    token: "x".into(),
                    issued_at: 9,
                })
            });
            assert!(dup.is_err(), "{name}");

            db.run_blocking(|tx| {
                tx.record_license("kg-i1", Some("e1"), "kl1.a", 3)?;
                tx.record_license("kg-i1", Some("e1"), "kl1.a", 3)?;
                tx.record_license("kg-i1", None, "kl1.b", 4)
            })
            .unwrap();
            assert_eq!(db.run_blocking(|tx| tx.count_licenses()).unwrap(), 2);

            let code = CodeRow {
                code: "PL1".into(),
                status: "active".into(),
                frozen: true,
                expire_at: Some(44),
                seq: 3,
                updated_at: 1,
                device_key: Some("a2V5".into()),
            };
            let c2 = code.clone();
            db.run_blocking(move |tx| tx.put_code(&c2)).unwrap();
            assert_eq!(db.run_blocking(|tx| tx.code("PL1")).unwrap(), Some(code));

            let up = UploadRow {
                event_id: "ev-u".into(),
                instance_id: "i1".into(),
                license: "kl1.u".into(),
                attempts: 0,
                next_at: 100,
                done_at: None,
                last_error: None,
                created_at: 90,
            };
            let u2 = up.clone();
            db.run_blocking(move |tx| tx.put_upload(&u2)).unwrap();
            assert_eq!(
                db.run_blocking(|tx| tx.due_uploads(99, 10)).unwrap(),
                vec![]
            );
            assert_eq!(
                db.run_blocking(|tx| tx.due_uploads(100, 10)).unwrap(),
                vec![up.clone()],
                "{name}"
            );
            let mut done = up.clone();
            done.attempts = 2;
            done.done_at = Some(120);
            done.last_error = Some("x".into());
            let d2 = done.clone();
            db.run_blocking(move |tx| tx.put_upload(&d2)).unwrap();
            assert_eq!(
                db.run_blocking(|tx| tx.upload("ev-u")).unwrap(),
                Some(done.clone())
            );
            assert_eq!(
                db.run_blocking(|tx| tx.due_uploads(1000, 10)).unwrap(),
                vec![]
            );
            assert_eq!(db.run_blocking(|tx| tx.count_uploads()).unwrap(), (0, 1));

            // The status listing: pending by next try, then the latest done ones.
            let pending = |id: &str, next_at: i64| UploadRow {
                event_id: id.into(),
                next_at,
                ..up.clone()
            };
            let (p1, p2) = (pending("ev-p1", 500), pending("ev-p2", 400));
            let mut d3 = pending("ev-d3", 0);
            d3.done_at = Some(130);
            for r in [p1.clone(), p2.clone(), d3.clone()] {
                db.run_blocking(move |tx| tx.put_upload(&r)).unwrap();
            }
            assert_eq!(
                db.run_blocking(|tx| tx.list_uploads(10)).unwrap(),
                vec![p2.clone(), p1.clone(), d3.clone(), done.clone()],
                "{name}"
            );
            assert_eq!(
                db.run_blocking(|tx| tx.list_uploads(1)).unwrap(),
                vec![p2, p1, d3],
                "{name}"
            );
        }
    }
}
