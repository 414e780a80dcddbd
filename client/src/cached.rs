//! A license check answered from memory: [`CachedClient`].
//!
//! A background thread subscribes to the agent's `watch` stream with `{"verdicts": true}`
//! (docs/protocol.md): the agent sends its whole verdict table when the subscription starts
//! and again each time the table is rebuilt (a license installed or removed, a freeze or
//! release, an expiry, the device identity settling). The thread keeps the latest table;
//! [`CachedClient::check`] picks the answer from it exactly as the agent's `license.check`
//! does, without a round trip or a system call.
//!
//! When the cache cannot answer, the check goes over the socket like [`Client::check`]:
//! the stream is down (the agent stopped or restarted; the thread subscribes again with
//! backoff and the cache resumes with the new agent's table), the product has no license
//! file (products sold by authorization code, and `no_license`, are the agent's to answer),
//! or the agent is still computing the device identity.
//!
//! Readers never wait for the thread: the table is an immutable `Arc` swapped under a
//! `RwLock` (held for a pointer copy only). std's lock is enough here: the writer takes it
//! a few times per change, so readers practically never meet it, and the crate stays on
//! serde, serde_json and thiserror.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{Check, Client, ClientError};

/// First and longest wait between two subscription attempts while the agent is away.
const BACKOFF_FIRST: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// One license of the table: the agent's `license.check` answer without its
/// time-dependent fields.
#[derive(Debug)]
pub struct Entry {
    /// The answer's fields, without `allowed`, `secs_left`, `days_left` and `feature`.
    answer: Map<String, Value>,
    state: String,
    allows_use: bool,
    license_id: Option<String>,
    reason: Option<String>,
    features: Vec<String>,
    /// Sorted, for binary search.
    sorted_features: Vec<String>,
    /// When `secs_left` reaches 0 (Unix seconds); `None` when it is not counting.
    ends_at: Option<i64>,
}

impl Entry {
    fn grants(&self, feature: &str) -> bool {
        self.sorted_features
            .binary_search_by(|f| f.as_str().cmp(feature))
            .is_ok()
    }

    fn from_event(v: &Value) -> Option<Entry> {
        let mut answer = v.get("check")?.as_object()?.clone();
        let allows_use = answer.remove("allowed")?.as_bool()?;
        let text = |m: &Map<String, Value>, k: &str| m.get(k)?.as_str().map(str::to_owned);
        let features: Vec<String> = answer
            .get("features")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut sorted_features = features.clone();
        sorted_features.sort();
        Some(Entry {
            state: text(&answer, "state")?,
            license_id: text(&answer, "license_id"),
            reason: text(&answer, "reason"),
            ends_at: v.get("ends_at").and_then(Value::as_i64),
            allows_use,
            features,
            sorted_features,
            answer,
        })
    }

    /// An answer that came over the socket, kept as the agent sent it.
    fn from_check(c: &Check) -> Entry {
        let mut answer = c.extra.clone();
        for k in ["allowed", "secs_left", "days_left", "feature"] {
            answer.remove(k);
        }
        answer.insert("state".into(), json!(c.state));
        answer.insert("license_id".into(), json!(c.license_id));
        answer.insert("reason".into(), json!(c.reason));
        answer.insert("features".into(), json!(c.features));
        answer.insert("limits".into(), Value::Object(c.limits.clone()));
        let mut sorted_features = c.features.clone();
        sorted_features.sort();
        Entry {
            answer,
            state: c.state.clone(),
            allows_use: c.allowed,
            license_id: c.license_id.clone(),
            reason: c.reason.clone(),
            features: c.features.clone(),
            sorted_features,
            ends_at: None,
        }
    }
}

/// The verdict table as the agent last sent it.
#[derive(Debug)]
struct Table {
    /// Every product's licenses, best first (the agent's order).
    products: HashMap<String, Vec<Arc<Entry>>>,
    /// The agent was still computing the device identity: checks go to the socket (which
    /// waits for it), as bound licenses are not judged yet.
    device_pending: bool,
    /// The event's `seq`.
    seq: u64,
    /// When the table was read off the stream: from then on every check answers from it.
    received_at: std::time::Instant,
}

#[derive(Deserialize)]
struct TableEvent {
    #[serde(default)]
    device_pending: bool,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    licenses: Vec<Value>,
}

impl Table {
    fn from_event(ev: Value) -> Result<Table, ClientError> {
        let ev: TableEvent = serde_json::from_value(ev)
            .map_err(|e| ClientError::BadAnswer(format!("verdicts event: {e}")))?;
        let mut products: HashMap<String, Vec<Arc<Entry>>> = HashMap::new();
        for l in &ev.licenses {
            let e = Entry::from_event(l)
                .ok_or_else(|| ClientError::BadAnswer(format!("verdicts event entry: {l}")))?;
            let product = e
                .answer
                .get("product")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            products.entry(product).or_default().push(Arc::new(e));
        }
        Ok(Table {
            products,
            device_pending: ev.device_pending,
            seq: ev.seq,
            received_at: std::time::Instant::now(),
        })
    }
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The table the agent streamed (no round trip).
    Cache,
    /// A `license.check` over the socket.
    Socket,
}

/// The answer of a check: what `license.check` answers, cheap to produce and to clone (the
/// license's fields are shared).
#[derive(Debug, Clone)]
pub struct Verdict {
    /// May the software run? (`valid` or `grace`, and the feature if one was asked.)
    pub allowed: bool,
    /// Seconds until the license (or its grace) ends; `None` when perpetual or not running.
    pub secs_left: Option<i64>,
    pub days_left: Option<i64>,
    /// Whether the license grants the feature asked for (`None`: no feature asked, or no
    /// license).
    pub granted: Option<bool>,
    pub source: Source,
    /// The feature asked for.
    feature: Option<String>,
    license: Arc<Entry>,
}

impl Verdict {
    /// `valid`, `grace`, `expired`, `frozen`, `no_license`, ... (as [`Check::state`]).
    pub fn state(&self) -> &str {
        &self.license.state
    }

    pub fn license_id(&self) -> Option<&str> {
        self.license.license_id.as_deref()
    }

    pub fn reason(&self) -> Option<&str> {
        self.license.reason.as_deref()
    }

    /// The features the license grants.
    pub fn features(&self) -> &[String] {
        &self.license.features
    }

    /// The whole answer, as [`Client::check`] returns it.
    pub fn to_check(&self) -> Check {
        let mut answer = self.license.answer.clone();
        answer.insert("allowed".into(), json!(self.allowed));
        answer.insert("secs_left".into(), json!(self.secs_left));
        answer.insert("days_left".into(), json!(self.days_left));
        if let (Some(f), Some(g)) = (&self.feature, self.granted) {
            answer.insert("feature".into(), json!({"name": f, "granted": g}));
        }
        Check::deserialize(Value::Object(answer)).unwrap_or_else(|_| Check {
            state: self.license.state.clone(),
            allowed: self.allowed,
            days_left: self.days_left,
            license_id: self.license.license_id.clone(),
            reason: self.license.reason.clone(),
            features: self.license.features.clone(),
            limits: Default::default(),
            extra: Default::default(),
        })
    }
}

struct Shared {
    path: PathBuf,
    /// `None` while the stream is down: checks go to the socket.
    table: RwLock<Option<Arc<Table>>>,
    /// Tables received so far (tests and the bench wait on it).
    tables: AtomicU64,
    stop: AtomicBool,
    /// The stream being read, so that dropping the client can end a blocking read.
    stream: Mutex<Option<UnixStream>>,
    /// Wakes the thread from its backoff when the client is dropped.
    wake: (Mutex<()>, Condvar),
}

impl Shared {
    fn set(&self, t: Option<Table>) {
        let t = t.map(Arc::new);
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

/// A client whose [`CachedClient::check`] answers from the verdict table the agent
/// streams, and falls back to the socket when it cannot. Share it between threads
/// (`&self` everywhere; socket fallbacks are serialised on one connection).
pub struct CachedClient {
    shared: Arc<Shared>,
    socket: Mutex<Client>,
    thread: Option<JoinHandle<()>>,
}

impl CachedClient {
    /// Starts the background subscription to the agent at `path` and returns at once; until
    /// the first table arrives, checks go over the socket.
    pub fn new(path: impl Into<PathBuf>) -> CachedClient {
        CachedClient::with_client(Client::new(path))
    }

    /// Like [`CachedClient::new`], with `socket` (its timeout and reconnect window) for the
    /// checks the cache cannot answer.
    pub fn with_client(socket: Client) -> CachedClient {
        let shared = Arc::new(Shared {
            path: socket.path().to_path_buf(),
            table: RwLock::new(None),
            tables: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stream: Mutex::new(None),
            wake: (Mutex::new(()), Condvar::new()),
        });
        let me = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kooagent-cache".into())
            .spawn(move || refresh(&me))
            .ok();
        CachedClient {
            shared,
            socket: Mutex::new(socket),
            thread,
        }
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// `license.check` for `product` (and `feature`): from memory when the cache holds the
    /// product's licenses, else over the socket (errors as [`Client::check`]).
    pub fn check(&self, product: &str, feature: Option<&str>) -> Result<Verdict, ClientError> {
        if let Some(v) = self.cached(product, feature) {
            return Ok(v);
        }
        let check = self
            .socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(product, feature)?;
        Ok(Verdict {
            allowed: check.allowed,
            secs_left: check.extra.get("secs_left").and_then(Value::as_i64),
            days_left: check.days_left,
            granted: check
                .extra
                .get("feature")
                .and_then(|f| f.get("granted"))
                .and_then(Value::as_bool),
            source: Source::Socket,
            feature: feature.map(str::to_owned),
            license: Arc::new(Entry::from_check(&check)),
        })
    }

    /// The answer from memory only: `None` when the cache cannot answer (see the module's
    /// documentation), never a round trip.
    pub fn cached(&self, product: &str, feature: Option<&str>) -> Option<Verdict> {
        let pick = {
            let table = self.shared.table.read().unwrap_or_else(|p| p.into_inner());
            let table = table.as_ref()?;
            if table.device_pending {
                return None;
            }
            let list = table.products.get(product)?;
            // As the agent picks: a license that allows use and grants the feature first,
            // else the best one.
            let best = match feature {
                Some(f) => list.iter().find(|e| e.allows_use && e.grants(f)),
                None => None,
            };
            best.or(list.first())?.clone()
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let secs_left = pick.ends_at.map(|t| (t - now).max(0));
        let granted = feature.map(|f| pick.grants(f));
        Some(Verdict {
            allowed: pick.allows_use && granted.unwrap_or(true),
            secs_left,
            days_left: secs_left.map(|s| s / 86_400),
            granted,
            source: Source::Cache,
            feature: feature.map(str::to_owned),
            license: pick,
        })
    }

    /// Whether the stream is up (a table is held).
    pub fn is_live(&self) -> bool {
        self.shared
            .table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The `seq` of the table held, `None` while the stream is down.
    pub fn table_seq(&self) -> Option<u64> {
        let t = self.shared.table.read().unwrap_or_else(|p| p.into_inner());
        t.as_ref().map(|t| t.seq)
    }

    /// When the table held arrived (from then on checks answered from it), `None` while
    /// the stream is down. How fresh the cache is; the bench times a change in the agent
    /// reaching the client with it.
    pub fn table_received_at(&self) -> Option<std::time::Instant> {
        let t = self.shared.table.read().unwrap_or_else(|p| p.into_inner());
        t.as_ref().map(|t| t.received_at)
    }

    /// How many tables have arrived since the client was made.
    pub fn tables_received(&self) -> u64 {
        self.shared.tables.load(Ordering::Acquire)
    }

    /// Waits (up to `timeout`) until the stream is up; whether it is.
    pub fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.is_live() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for CachedClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(s) = self
            .shared
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        {
            let _guard = self.shared.wake.0.lock();
            self.shared.wake.1.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The background thread: subscribe, keep every table, and on a broken stream mark the
/// cache down and subscribe again with backoff.
fn refresh(shared: &Shared) {
    let mut wait = BACKOFF_FIRST;
    while !shared.stop.load(Ordering::Acquire) {
        if let Ok(reader) = subscribe(shared) {
            if follow(shared, reader) {
                wait = BACKOFF_FIRST;
            }
        }
        shared.set(None);
        *shared.stream.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let guard = shared.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let _ = shared.wake.1.wait_timeout(guard, wait);
        wait = (wait * 2).min(BACKOFF_MAX);
    }
}

fn subscribe(shared: &Shared) -> Result<BufReader<UnixStream>, ClientError> {
    let mut s = UnixStream::connect(&shared.path)?;
    let mut line = serde_json::to_vec(
        &json!({"v": 1, "id": "cache", "op": "watch", "params": {"verdicts": true}}),
    )
    .expect("the watch request encodes");
    line.push(b'\n');
    s.write_all(&line)?;
    *shared.stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.try_clone()?);
    if shared.stop.load(Ordering::Acquire) {
        return Err(ClientError::ConnectionLost);
    }
    Ok(BufReader::new(s))
}

/// Reads the stream until it ends; whether any table arrived.
fn follow(shared: &Shared, mut reader: BufReader<UnixStream>) -> bool {
    let mut line = String::new();
    let mut got = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return got,
            Ok(_) => {}
        }
        let Ok(mut v) = serde_json::from_str::<Value>(&line) else {
            return got;
        };
        if v["ok"] != json!(true) {
            // An agent without the `verdicts` param (older) refuses it: stay on the socket.
            return got;
        }
        let ev = v["event"].take();
        if ev["type"] != json!("verdicts") {
            continue;
        }
        match Table::from_event(ev) {
            Ok(t) => {
                shared.set(Some(t));
                shared.tables.fetch_add(1, Ordering::AcqRel);
                got = true;
            }
            Err(_) => return got,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn table() -> Value {
        json!({
            "type": "verdicts", "seq": 7, "device_pending": false,
            "licenses": [
                {"check": {"product": "p", "license_id": "L1", "state": "valid", "allowed": true,
                           "reason": "ok", "features": ["b", "a"], "limits": {"cores": 8}},
                 "ends_at": 4_000_000_000i64},
                {"check": {"product": "p", "license_id": "L0", "state": "expired", "allowed": false,
                           "reason": "expired", "features": ["x"], "limits": {}},
                 "ends_at": null},
            ]
        })
    }

    #[test]
    fn picks_as_the_agent_does() {
        let t = Table::from_event(table()).unwrap();
        let c = CachedClient {
            shared: Arc::new(Shared {
                path: "/nonexistent".into(),
                table: RwLock::new(Some(Arc::new(t))),
                tables: AtomicU64::new(1),
                stop: AtomicBool::new(true),
                stream: Mutex::new(None),
                wake: (Mutex::new(()), Condvar::new()),
            }),
            socket: Mutex::new(Client::new("/nonexistent")),
            thread: None,
        };
        let v = c.cached("p", None).unwrap();
        assert_eq!(
            (v.state(), v.allowed, v.license_id()),
            ("valid", true, Some("L1"))
        );
        assert!(v.days_left.unwrap() > 0);
        let v = c.cached("p", Some("a")).unwrap();
        assert_eq!((v.allowed, v.granted), (true, Some(true)));
        // A feature only the expired license has: the best license answers, not granted.
        let v = c.cached("p", Some("x")).unwrap();
        assert_eq!(
            (v.license_id(), v.allowed, v.granted),
            (Some("L1"), false, Some(false))
        );
        let check = v.to_check();
        assert_eq!(
            check.extra["feature"],
            json!({"name": "x", "granted": false})
        );
        assert_eq!(check.limits["cores"], json!(8));
        assert!(c.cached("other", None).is_none());
        assert_eq!(c.table_seq(), Some(7));
    }

    #[test]
    fn follows_the_stream_and_marks_it_down_when_it_ends() {
        let path = std::env::temp_dir().join(format!("kac-{}-cache", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let fake = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            let req: Value = serde_json::from_str(&req).unwrap();
            assert_eq!(req["op"], "watch");
            assert_eq!(req["params"], json!({"verdicts": true}));
            let mut w = s;
            let ev = json!({"v": 1, "id": "cache", "ok": true, "event": table()});
            writeln!(w, "{ev}").unwrap();
            go_rx.recv().unwrap();
            // Closing the stream: the cache must stop answering.
        });
        let before = std::time::Instant::now();
        let c = CachedClient::with_client(Client::new(&path).reconnect_for(Duration::ZERO));
        assert!(c.wait_live(Duration::from_secs(10)));
        assert_eq!(c.check("p", None).unwrap().source, Source::Cache);
        let at = c.table_received_at().expect("the time the table arrived");
        assert!(before <= at && at <= std::time::Instant::now());
        go_tx.send(()).unwrap();
        fake.join().unwrap();
        let t0 = std::time::Instant::now();
        while c.is_live() {
            assert!(t0.elapsed() < Duration::from_secs(10), "still live");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(c.table_received_at(), None);
        let _ = std::fs::remove_file(&path);
        // The agent is gone: the check reports it as the socket client does.
        let e = c.check("p", None).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }
}
